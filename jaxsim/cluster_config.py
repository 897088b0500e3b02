"""Cluster descriptions -> ``list[InstanceSpec]`` + a ``Router``: the Hydra ``cluster`` section
and the reference simulator's cluster JSON (REFERENCE.md §3.1).

Hydra (``conf/cluster/*.yaml``)::

    cluster:
      routing: least_loaded          # a registered policy (engine/routers/), but custom
      routing_seed: 42               # for the seeded policies: random, power_of_two
      json: null                     # a reference cluster JSON; replaces `instances`
      instances:                     # empty: one instance from `hardware` + `scheduler`
        - count: 2                   # two instances as the run's hardware/scheduler sections
          role: prefill              # colocated (default) | prefill | decode (P/D, REFERENCE.md §1.7)
          node: 0                    # the node it sits on (default 0)
        - hardware: {name: RTX4090, mem_size_gb: 24}
          scheduler: {max_num_seqs: 32}
          role: decode
          node: 1
          dp_group: null             # instances naming one group form a DP group (REFERENCE.md §1.8)
          model: null                # another model than the run's (org/name)
      dp_sync: moe                   # DP groups run wave-synchronised rounds: moe (MoE models) | always | never
      links:                         # KV hand-off links per level (spec.LinkConfig)
        intra_node_bw_gbps: 16
        intra_node_latency_ns: 20000
        inter_node_bw_gbps: 16
        inter_node_latency_ns: 20000
        kv_transfer: layerwise       # or after_prefill

Each instance entry overrides the run's ``hardware`` and ``scheduler`` (same keys) and may name
its own ``model`` (org/name under profiles/models; default: the run's model). The JSON importer
maps each instance's fields onto the same dataclasses (``pd_type`` to the role, the node's
position to ``node``, ``tp_size``/``pp_size``/``ep_size``/``dp_group``, a per-dimension
``link_bw``/``link_latency`` list to the two link levels) and rejects what the engine does not
model yet (block copy): a cluster is never simulated with a field ignored. Weight placement, the
KV cache's ``kv_loc``, local offloading, ``cxl_mem`` and the dtypes are modelled
(:mod:`jaxsim.placement`, REFERENCE.md §1.10, §1.14, §1.16), and PIM attention offload and
sub-batch interleaving (``enable_attn_offloading``, ``enable_sub_batch_interleaving``, the node's
``cpu_mem.pim_config``: :mod:`jaxsim.pim`, §1.11-1.12); a node's ``power`` block is read by
:func:`power_from_cluster_json` (:mod:`jaxsim.power`).
(``npu_mem.mem_bw``/``mem_latency`` are required by the format but have no effect, the profiles
holding the measured kernel times, unless ``enable_local_offloading`` reads the weights at them.)

Both paths build every spec with :func:`jaxsim.spec.build`, so a value passes the same checks
(the dataclasses' own) whether it comes from YAML, the command line or a JSON file; errors name
the YAML key or the JSON path it came from.
"""

import dataclasses
import json
import warnings
from pathlib import Path
from typing import ClassVar

from jaxsim.engine import routers
from jaxsim.engine.routing import Router
from jaxsim.errors import JaxsimInputError, unknown_key_fix
from jaxsim import pim as pim_lib, placement as placement_lib
from jaxsim import power as power_lib
from jaxsim.model import dtype_bytes, load_model_config
from jaxsim.planning import profile_variant
from jaxsim.spec import (DP_SYNC, Calibration, HardwareConfig, InstanceSpec, KVTierConfig, LinkConfig, ModelRuntimeConfig,
                         SchedulerConfig, build,
                         check_expert_parallel, check_field, check_fields, checked)


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    KEY: ClassVar[str] = "cluster"

    instances: tuple  # of InstanceSpec
    router: Router
    links: LinkConfig = LinkConfig()
    # which DP groups run wave-synchronised (simulator.place_instances)
    dp_sync: str = checked("moe", choices=DP_SYNC, fix="one of moe, always, never")

    def __post_init__(self):
        check_fields(self)


def check_profiled(name: str, profiles: Path, where: str) -> None:
    """Hardware ``name`` has profiles (a bundle folder, legacy/<HW>, REFERENCE.md §2.8, a converted
    operator database, :mod:`jaxsim.operator_db`, or a spec sheet, :mod:`jaxsim.spec_bundle`)."""
    from jaxsim.profiles import bundle_source, has_hardware

    if bundle_source(name) == "roofline":  # a spec sheet: its own error names the file looked for
        from jaxsim.spec_bundle import sheet_path

        sheet_path(profiles, name)
    if not has_hardware(profiles, name):
        from jaxsim.profiles import known_hardware

        raise JaxsimInputError(where, f"no profiles for hardware {name!r} in {profiles}",
                               f"known hardware: {known_hardware(Path(profiles))}")


def _links(d, key: str, base: LinkConfig = LinkConfig()) -> LinkConfig:
    """The ``cluster.links`` section on top of ``base``: a key missing or None keeps ``base``'s
    value (LinkConfig's default, or a cluster JSON's links)."""
    given = {k: v for k, v in (d or {}).items() if v is not None}
    if not given:
        return base
    build(LinkConfig, given, key)  # unknown keys and ranges, named
    return dataclasses.replace(base, **given)


def _model_named(models_dir: Path, name: str, key: str):
    """The model config of an instance's model name, with an unknown name reported at ``key`` (the
    JSON path or YAML key that names it, not the models folder)."""
    try:
        return load_model_config(models_dir, name)
    except JaxsimInputError as e:
        if "unknown model" not in e.problem:
            raise
        raise JaxsimInputError(key, e.problem, e.fix) from None


def check_dp_groups(instances, key: str) -> None:
    """Members of a DP group share tp and ep; for EP across the group, ``ep % dp == 0`` and
    ``ep / dp <= tp`` (REFERENCE.md §1.8). Outside a group, ``ep <= tp``."""
    groups: dict = {}
    for i, spec in enumerate(instances):
        groups.setdefault(spec.dp_group, []).append(i)
    for g, members in groups.items():
        for i in members:
            check_expert_parallel(instances[i].hw, len(members) if g is not None else 1, f"{key}[{i}].ep")


# The runtime overrides of a JSON instance (REFERENCE.md §3.1) that are SchedulerConfig fields (same names).
_JSON_SCHEDULER = ("max_num_seqs", "max_num_batched_tokens", "long_prefill_token_threshold", "block_size",
                   "enable_chunked_prefill", "enable_prefix_caching", "reserve_full_isl")
# Fields whose behaviour the engine does not model yet: present and not at their neutral value,
# they are refused rather than ignored.
_JSON_UNSUPPORTED = {"enable_block_copy": (False,),
                     # an instance-level kv_loc: refused before this table with its own hint (the KV
                     # cache is placed by the placement's kv_loc entries: jaxsim.placement)
                     "kv_loc": ("npu",)}
# Weight placement and dtypes (REFERENCE.md §1.10, §1.14): jaxsim.placement, planning.profile_variant.
_JSON_MEMORY = ("placement", "enable_local_offloading", "dtype", "kv_cache_dtype")
# PIM attention offload (REFERENCE.md §1.11-1.12): HardwareConfig fields of the same names, with the
# node's cpu_mem.pim_config and cpu_mem.mem_size (json_hardware).
_JSON_PIM = ("enable_attn_offloading", "enable_sub_batch_interleaving")
_JSON_TOP_UNSUPPORTED = ()
# Every key the reference format has (REFERENCE.md §3.1, the shipped cluster examples), per
# object: anything else is a typo and an error, never silently a default.
_JSON_KEYS = {
    "top level": {"num_nodes", "link_bw", "link_latency", "nodes", "cxl_mem"},
    "node": {"num_instances", "instances", "cpu_mem", "power"},
    "cpu_mem": {"mem_size", "mem_bw", "mem_latency", "pim_config"},
    "npu_mem": {"mem_size", "mem_bw", "mem_latency", "mem_util"},
    "instance": {"model_name", "hardware", "npu_mem", "num_npus", "npu_num", "npu_group", "tp_size", "pp_size",
                 "ep_size", "dp_group", "pd_type", *_JSON_SCHEDULER, *_JSON_UNSUPPORTED, *_JSON_MEMORY, *_JSON_PIM},
}


def _check_keys(obj, kind: str, where: str) -> None:
    """``obj`` (a JSON object of ``kind``) has only keys of the reference format."""
    if not isinstance(obj, dict):
        raise JaxsimInputError(where, f"must be a JSON object, got {obj!r}")
    for key in obj:
        if key not in _JSON_KEYS[kind]:
            name = f"{where}: {key}" if kind == "top level" else f"{where}.{key}"
            raise JaxsimInputError(name, f"unknown {kind} field", unknown_key_fix(key, _JSON_KEYS[kind]))


def check_reference_keys(d: dict, path) -> None:
    """Every key of a reference-format cluster JSON (REFERENCE.md §3.1) at every level is one the
    format has (:data:`_JSON_KEYS`); a typo is an error naming its JSON path and the nearest key.
    For readers of the format that check the values themselves (``jaxsim.validation``)."""
    _check_keys(d, "top level", str(path))
    for n, node in enumerate(d.get("nodes") or []):
        _check_keys(node, "node", f"{path}: nodes[{n}]")
        if isinstance(node.get("cpu_mem"), dict):
            _check_keys(node["cpu_mem"], "cpu_mem", f"{path}: nodes[{n}].cpu_mem")
        for i, inst in enumerate(node.get("instances") or []):
            where = f"{path}: nodes[{n}].instances[{i}]"
            _check_keys(inst, "instance", where)
            if isinstance(inst.get("npu_mem"), dict):
                _check_keys(inst["npu_mem"], "npu_mem", f"{where}.npu_mem")


def cluster_spec(section: dict | None, hardware: HardwareConfig, scheduler: SchedulerConfig, calib: Calibration,
                 profiles: Path, model_name: str) -> ClusterSpec | None:
    """The ``cluster`` section (None or no instances and no JSON: a single instance -> None) on top
    of the run's ``hardware`` and ``scheduler``; every instance's hardware must have profiles."""
    if not section:
        return None
    routing = section.get("routing", "least_loaded")
    # Every registered policy, but those taking a Python callable (custom's score_fn).
    python_only = [p for p in routers.names() if "score_fn" in routers.params(p)]
    if routing not in routers.names() or routing in python_only:
        raise JaxsimInputError("cluster.routing", f"unknown policy {routing!r}",
                               f"one of {[p for p in routers.names() if p not in python_only]} "
                               f"({', '.join(python_only)}: from Python)")
    seed = section.get("routing_seed", 42)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise JaxsimInputError("cluster.routing_seed", f"must be an integer, got {seed!r}")
    router = Router(routing, seed)
    dp_sync = section.get("dp_sync", "moe")
    if section.get("json"):
        instances, links = load_cluster_json(section["json"], hardware, scheduler, calib, model_name,
                                             models_dir=Path(profiles) / "models", profiles_dir=profiles)
        for k, spec in enumerate(instances):
            check_profiled(spec.hw.name, profiles, f"{section['json']}: instances[{k}].hardware")
        links = _links(section.get("links"), "cluster.links", links)  # the fields set replace the JSON's
        check_dp_groups(instances, f"{section['json']}: instances")
        return build(ClusterSpec, dict(instances=tuple(instances), router=router, links=links, dp_sync=dp_sync))
    entries = section.get("instances") or []
    if not isinstance(entries, list):
        raise JaxsimInputError("cluster.instances", f"must be a list, got {type(entries).__name__}")
    links_set = [k for k, v in (section.get("links") or {}).items() if v is not None]
    if not entries:
        if links_set:
            _warn_unused_links(links_set, "the run has one instance")
        return None
    instances = []
    for i, e in enumerate(entries):
        key = f"cluster.instances[{i}]"
        if not isinstance(e, dict):
            raise JaxsimInputError(key, f"must be a mapping, got {e!r}")
        unknown = set(e) - {"count", "hardware", "scheduler", "role", "node", "dp_group", "model"}
        if unknown:
            raise JaxsimInputError(f"{key}.{sorted(unknown)[0]}", "unknown field",
                                   "use count, hardware, scheduler, role, node, dp_group, model")
        count = e.get("count", 1)
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise JaxsimInputError(f"{key}.count", f"must be an integer >= 1, got {count!r}")
        over = {}
        for sec in ("hardware", "scheduler"):
            over[sec] = e.get(sec) or {}
            if not isinstance(over[sec], dict):
                raise JaxsimInputError(f"{key}.{sec}", f"must be a mapping, got {over[sec]!r}")
        # ep may span a DP group's ranks: checked with the groups below
        hw = build(HardwareConfig, {**dataclasses.asdict(hardware), **over["hardware"]}, f"{key}.hardware")
        check_profiled(hw.name, profiles, f"{key}.hardware.name")
        sched = build(SchedulerConfig, {**dataclasses.asdict(scheduler), **over["scheduler"]}, f"{key}.scheduler")
        model = None
        if e.get("model") not in (None, model_name):
            if not isinstance(e["model"], str):
                raise JaxsimInputError(f"{key}.model", f"must be a model name (org/name), got {e['model']!r}")
            model = _model_named(Path(profiles) / "models", e["model"], f"{key}.model")
        placement = {k: e[k] for k in ("role", "node", "dp_group") if k in e}
        instances += [build(InstanceSpec, dict(hw=hw, sched=sched, calib=calib, model=model, **placement), key)] * count
    check_dp_groups(instances, "cluster.instances")
    if links_set and all(spec.role == "colocated" for spec in instances):
        _warn_unused_links(links_set, "no instance has a prefill or decode role")
    return build(ClusterSpec, dict(instances=tuple(instances), router=router,
                                   links=_links(section.get("links"), "cluster.links"), dp_sync=dp_sync))


def _warn_unused_links(keys: list, why: str) -> None:
    """cluster.links carry P/D KV hand-offs only: set where none happens, they change nothing."""
    warnings.warn(f"cluster.links ({', '.join(keys)}) set, but {why}: the links only carry prefill -> decode KV "
                  "hand-offs, so they change nothing in this run", stacklevel=3)


def json_links(link_bw: list, link_latency: list) -> LinkConfig:
    """The two link levels of a reference cluster JSON's per-dimension ``link_bw``/``link_latency``
    lists (a scalar is a one-entry list): the first entry within a node, the last between nodes."""
    return LinkConfig(intra_node_bw_gbps=link_bw[0], intra_node_latency_ns=link_latency[0],
                      inter_node_bw_gbps=link_bw[-1], inter_node_latency_ns=link_latency[-1])


# HardwareConfig field -> the key of a JSON instance (or of its node) it comes from, for errors.
_JSON_HARDWARE = {"name": "hardware", "mem_size_gb": "npu_mem.mem_size", "mem_util": "npu_mem.mem_util",
                  "tp": "tp_size", "pp": "pp_size", "ep": "ep_size", **{k: k for k in _JSON_PIM}}
_JSON_NODE_HARDWARE = {"cpu_mem_bw_gbps": "cpu_mem.mem_bw", "cpu_mem_latency_ns": "cpu_mem.mem_latency",
                       "pim_config": "cpu_mem.pim_config", "pim_mem_size_gb": "cpu_mem.mem_size"}


def json_hardware(inst: dict, cpu: dict, links: LinkConfig, base_hw: HardwareConfig, *, tp, pp, ep,
                  where: tuple[str, str] | None = None) -> HardwareConfig:
    """The hardware of a reference cluster JSON instance: its ``hardware`` and ``npu_mem``, its
    node's ``cpu_mem`` and the link within the node (TP collectives); fields the JSON does not give
    keep ``base_hw``'s values. ``where``, the JSON paths of the instance and of its node, names the
    JSON key of a bad value (default: the ``hardware.*`` field)."""
    mem = inst["npu_mem"]
    values = dict(dataclasses.asdict(base_hw), name=inst["hardware"], mem_size_gb=mem["mem_size"],
                  mem_util=mem.get("mem_util", base_hw.mem_util), tp=tp, pp=pp, ep=ep,
                  link_bw_gbps=links.intra_node_bw_gbps, link_latency_ns=links.intra_node_latency_ns,
                  cpu_mem_bw_gbps=cpu.get("mem_bw", base_hw.cpu_mem_bw_gbps),
                  cpu_mem_latency_ns=cpu.get("mem_latency", base_hw.cpu_mem_latency_ns),
                  **{k: inst.get(k, getattr(base_hw, k)) for k in _JSON_PIM})
    if values["enable_attn_offloading"] is True:  # the node's host memory holds the PIM channels
        values.update(pim_config=cpu.get("pim_config", base_hw.pim_config),
                      pim_mem_size_gb=cpu.get("mem_size", base_hw.pim_mem_size_gb))
    keys = None
    if where is not None:
        keys = {**{f: f"{where[0]}.{k}" for f, k in _JSON_HARDWARE.items()},
                **{f: f"{where[1]}.{k}" for f, k in _JSON_NODE_HARDWARE.items()}}
    return build(HardwareConfig, values, keys)


def _json_memory(inst: dict, where: str, hw: HardwareConfig, cpu: dict, cxl: tuple, other, model_name: str,
                 models_dir, profiles_dir) -> dict:
    """The InstanceSpec fields of a JSON instance's memory keys (``placement``,
    ``enable_local_offloading``, ``dtype``, ``kv_cache_dtype``; REFERENCE.md §1.10, §1.14)."""
    out = {}
    for key in ("dtype", "kv_cache_dtype"):
        if key in inst:
            if not isinstance(inst[key], str):
                raise JaxsimInputError(f"{where}.{key}", f"must be a dtype name, got {inst[key]!r}")
            if inst[key] != "auto":
                dtype_bytes(inst[key], f"{where}.{key}")
            out[key] = inst[key]
    wants_layers = bool(inst.get("placement")) or inst.get("enable_local_offloading", False) is not False
    if not wants_layers and not (out and profiles_dir is not None):
        return out  # (the dtypes are checked against the profiles again when the run is planned)
    if other is None and models_dir is None:
        raise JaxsimInputError(f"{where}.placement" if wants_layers else f"{where}.dtype",
                               "needs the model's config (its layers and dtype)", "give the models folder")
    model = other or _model_named(models_dir, model_name, f"{where}.model_name")
    if out and profiles_dir is not None:
        rt = ModelRuntimeConfig(name=model.name, dtype=out.get("dtype", "auto"),
                                kv_cache_dtype=out.get("kv_cache_dtype", "auto"))
        profile_variant(str(profiles_dir), hw.name, model, rt, where=where)
    if wants_layers:
        size = cpu.get("mem_size")
        if size is not None and (isinstance(size, bool) or not isinstance(size, (int, float)) or not size > 0):
            raise JaxsimInputError(f"{where.rsplit('.instances', 1)[0]}.cpu_mem.mem_size",
                                   f"must be a number > 0 (GB), got {size!r}")
        cpu_dev = placement_lib.MemoryDevice("cpu", hw.cpu_mem_bw_gbps, hw.cpu_mem_latency_ns, size)
        wp, evict = placement_lib.json_instance_placement(inst, where, model.num_layers, cpu=cpu_dev, cxl=cxl)
        out.update(placement=wp, kv_evict_loc=evict)
    return out


def load_cluster_json(path, base_hw: HardwareConfig, base_sched: SchedulerConfig, calib: Calibration,
                      model_name: str, models_dir=None, profiles_dir=None) -> tuple:
    """The instances of a reference cluster JSON and its links: ``(list[InstanceSpec], LinkConfig)``.

    Fields it does not give keep the values of ``base_hw`` / ``base_sched``. The top-level
    ``link_bw``/``link_latency`` is a scalar (every link) or a per-dimension list: its first entry
    is the link within a node (TP collectives, KV hand-offs inside the node), its last the link
    between nodes. ``pd_type`` gives the role; the node's position in ``nodes`` gives ``node``.
    An instance serving another model than ``model_name`` gets that model's config from
    ``models_dir`` (without it, such an instance is refused).

    PIM (REFERENCE.md §1.11-1.12): an instance's ``enable_attn_offloading`` /
    ``enable_sub_batch_interleaving`` (absent: the run's ``base_hw``, the reference's command-line
    defaults) with its node's ``cpu_mem.pim_config`` (an INI stem, checked against ``profiles_dir``
    when given) and ``cpu_mem.mem_size`` become its hardware's PIM fields.

    Memory (REFERENCE.md §1.10, §1.14, §1.16): the top-level ``cxl_mem`` and each instance's
    ``placement`` / ``enable_local_offloading`` become its ``placement`` (with ``kv_loc`` cpu or
    cxl:<id>, the KV cache's device and how many instances share it) and ``kv_evict_loc``
    (:func:`jaxsim.placement.json_instance_placement`; needs ``models_dir`` for the layer count);
    ``dtype`` / ``kv_cache_dtype`` its own dtypes, checked against the profile variants in
    ``profiles_dir`` when given (:func:`jaxsim.planning.profile_variant`: fp8 weights need an
    fp8 variant; an FP8 KV cache without a ``-kvfp8`` variant is priced from the bf16 tables, an
    estimate the run summary lists)."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise JaxsimInputError(str(path), f"cannot read the cluster JSON: {e}") from None

    def need(obj, key, where, kind=None):
        """``obj[key]``, present and, with ``kind`` (dict, list, int), of that JSON type."""
        if key not in obj:
            raise JaxsimInputError(f"{path}: {where}", f"missing required field {key!r}")
        v = obj[key]
        if kind is not None and (not isinstance(v, kind) or isinstance(v, bool)):
            name = {dict: "an object", list: "a list", int: "an integer"}[kind]
            raise JaxsimInputError(f"{path}: {where}.{key}" if where != "top level" else f"{path}: {key}",
                                   f"must be {name}, got {v!r}")
        return v

    _check_keys(d, "top level", str(path))
    cxl = placement_lib.parse_cxl_mem(d.get("cxl_mem"), f"{path}: cxl_mem")
    nodes = need(d, "nodes", "top level", list)
    if need(d, "num_nodes", "top level", int) != len(nodes):
        raise JaxsimInputError(f"{path}: num_nodes", f"{d['num_nodes']} but {len(nodes)} nodes are listed")
    link_bw, link_lat = need(d, "link_bw", "top level"), need(d, "link_latency", "top level")
    bws = link_bw if isinstance(link_bw, list) else [link_bw]
    lats = link_lat if isinstance(link_lat, list) else [link_lat]
    for name, v in (("link_bw", bws), ("link_latency", lats)):
        if not v or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for x in v) \
                or (name == "link_bw" and min(v) <= 0):
            raise JaxsimInputError(f"{path}: {name}", f"must be a positive number or a list of them, got {v!r}")
    links = json_links(bws, lats)
    out = []
    for n, node in enumerate(nodes):
        _check_keys(node, "node", f"{path}: nodes[{n}]")
        if node.get("cpu_mem") is not None:
            _check_keys(node["cpu_mem"], "cpu_mem", f"{path}: nodes[{n}].cpu_mem")
        if node.get("power") is not None:  # checked here; read by power_from_cluster_json
            power_lib.node_power(node["power"], f"{path}: nodes[{n}].power")
        insts = need(node, "instances", f"nodes[{n}]", list)
        if need(node, "num_instances", f"nodes[{n}]", int) != len(insts):
            raise JaxsimInputError(f"{path}: nodes[{n}].num_instances",
                                   f"{node['num_instances']} but {len(insts)} instances are listed")
        cpu = node.get("cpu_mem") or {}
        if cpu.get("pim_config") is not None and profiles_dir is not None:  # an unknown stem, named here
            pim_lib.load_device(cpu["pim_config"], Path(profiles_dir) / "pim", f"{path}: nodes[{n}].cpu_mem.pim_config")
        for i, inst in enumerate(insts):
            where = f"{path}: nodes[{n}].instances[{i}]"
            _check_keys(inst, "instance", where)
            need(inst, "npu_mem", f"nodes[{n}].instances[{i}]", dict)
            _check_keys(inst["npu_mem"], "npu_mem", f"{where}.npu_mem")
            model = need(inst, "model_name", f"nodes[{n}].instances[{i}]")
            other = None
            if model != model_name:
                if models_dir is None:
                    raise JaxsimInputError(f"{where}.model_name", f"{model!r}, but the run's model is {model_name!r}",
                                           "set model.name to it, or give the models folder")
                other = _model_named(models_dir, model, f"{where}.model_name")
            if inst.get("kv_loc", "npu") != "npu":
                raise JaxsimInputError(f"{where}.kv_loc", f"{inst['kv_loc']!r}: an instance-level kv_loc is not "
                                       "read (the KV cache is placed per block)",
                                       f"use placement.default.kv_loc {json.dumps(inst['kv_loc'])}")
            for key, neutral in _JSON_UNSUPPORTED.items():
                if key in inst and inst[key] not in neutral:
                    raise JaxsimInputError(f"{where}.{key}", f"{inst[key]!r} is not modelled yet",
                                           f"only {json.dumps(neutral[0])} is supported today")
            mem = need(inst, "npu_mem", f"nodes[{n}].instances[{i}]", dict)
            pp = check_field(HardwareConfig, "pp", inst.get("pp_size", 1), f"{where}.pp_size")
            npus = need(inst, "num_npus", f"nodes[{n}].instances[{i}]", int) if "num_npus" in inst else None
            tp = check_field(HardwareConfig, "tp", inst.get(
                "tp_size", npus // pp if isinstance(npus, int) and not isinstance(npus, bool) else 1), f"{where}.tp_size")
            if inst.get("num_npus", tp * pp) != tp * pp:
                raise JaxsimInputError(f"{where}.num_npus", f"{inst['num_npus']} NPUs for tp_size {tp} x pp_size {pp}",
                                       "num_npus = tp_size * pp_size")
            need(inst, "hardware", f"nodes[{n}].instances[{i}]")
            need(mem, "mem_size", "npu_mem"), need(mem, "mem_bw", "npu_mem")
            hw = json_hardware(inst, cpu, links, base_hw, tp=tp, pp=pp, ep=inst.get("ep_size", 0),
                               where=(where, f"{path}: nodes[{n}]"))
            if hw.enable_attn_offloading and (hw.pim_config is None or hw.pim_mem_size_gb is None):
                missing = "pim_config" if hw.pim_config is None else "mem_size"
                raise JaxsimInputError(f"{path}: nodes[{n}].cpu_mem.{missing}", f"instances[{i}] offloads attention "
                                       f"to PIM (enable_attn_offloading), but its node's cpu_mem has no {missing}",
                                       "name the node's PIM device, e.g. \"pim_config\": \"DDR4_8GB_3200_pim\""
                                       if missing == "pim_config" else "give the node's host memory size (GB)")
            sched = build(SchedulerConfig, {**dataclasses.asdict(base_sched),
                                            **{k: inst[k] for k in _JSON_SCHEDULER if k in inst}}, where)
            pd = inst.get("pd_type")
            if pd not in (None, "prefill", "decode"):
                raise JaxsimInputError(f"{where}.pd_type", f"unknown role {pd!r}", 'use null, "prefill" or "decode"')
            memory = _json_memory(inst, where, hw, cpu, cxl, other, model_name, models_dir, profiles_dir)
            out.append(build(InstanceSpec, dict(hw=hw, sched=sched, calib=calib, role=pd or "colocated", node=n,
                                                dp_group=inst.get("dp_group"), model=other, **memory), where))
    if not out:
        raise JaxsimInputError(str(path), "the cluster has no instances")
    # A KV cache off the NPU (placement kv_loc, REFERENCE.md §1.16): the instances keeping theirs on
    # one device (a node's host memory, a CXL device) split its capacity evenly.
    sharers = placement_lib.kv_sharers([spec.placement for spec in out], [spec.node for spec in out])
    out = [dataclasses.replace(spec, placement=dataclasses.replace(spec.placement, kv_sharers=k))
           if spec.placement is not None and spec.placement.kv_off_npu else spec for spec, k in zip(out, sharers)]
    return out, links


def power_from_cluster_json(path, d: dict | None = None, default: "power_lib.NodePower | None" = None,
                            cap: float | None = None) -> "power_lib.PowerConfig | None":
    """The power blocks of a reference cluster JSON's nodes (REFERENCE.md §3.1, §1.13), each node's
    host memory (``cpu_mem.mem_size``, GB: its DIMM count), and ``default`` (the Hydra ``power``
    section) for the nodes without a block; None when neither gives any. ``cap``: a power cap (W)
    for every NPU that sets none. ``d``: the JSON already read."""
    if d is None:
        d = json.loads(Path(path).read_text())
    nodes = {n: power_lib.node_power(node["power"], f"{path}: nodes[{n}].power", cap=cap)
             for n, node in enumerate(d.get("nodes") or []) if node.get("power") is not None}
    if not nodes and default is None:
        return None
    # a node without cpu_mem.mem_size takes the default (power.cpu_mem_size)
    mem = {n: float(node["cpu_mem"]["mem_size"]) for n, node in enumerate(d.get("nodes") or [])
           if isinstance(node.get("cpu_mem"), dict) and "mem_size" in node["cpu_mem"]}
    return power_lib.PowerConfig(nodes=nodes, default=default, cpu_mem_gb=mem)


def tier_from_cluster_json(kv_tier: KVTierConfig, path, d: dict | None = None) -> KVTierConfig:
    """``kv_tier`` with the fields it leaves unset (None) taken from a reference cluster JSON: its
    nodes' ``cpu_mem`` (storage cpu; every node with instances must give the same values) or its
    ``cxl_mem`` (storage cxl; ``mem_size`` is the whole pool over ``num_devices``). REFERENCE.md §3.1.
    ``d``: the JSON already read (``path`` then only names it in errors)."""
    unset = [f for f in ("capacity_gb", "bandwidth_gbps", "latency_ns") if getattr(kv_tier, f) is None]
    if not unset:
        return kv_tier
    if d is None:
        d = json.loads(Path(path).read_text())
    if kv_tier.storage == "cxl":
        where, devs = [f"{path}: cxl_mem"], [d.get("cxl_mem")]
    else:
        nodes = [(n, node) for n, node in enumerate(d.get("nodes") or []) if node.get("instances")]
        where, devs = [f"{path}: nodes[{n}].cpu_mem" for n, _ in nodes], [node.get("cpu_mem") for _, node in nodes]
    keys = {"capacity_gb": "mem_size", "bandwidth_gbps": "mem_bw", "latency_ns": "mem_latency"}
    values = None
    for w, dev in zip(where, devs):
        if not isinstance(dev, dict) or not all(keys[f] in dev or f == "latency_ns" for f in unset):
            raise JaxsimInputError(w, f"kv_tier.storage={kv_tier.storage} takes {', '.join(unset)} from here, but it "
                                   f"lacks {', '.join(keys[f] for f in unset)}", f"add them, or set kv_tier.{unset[0]}")
        v = {f: dev.get(keys[f], 0) for f in unset}
        if values is not None and v != values:
            raise JaxsimInputError(w, f"differs from {where[0]} ({v} vs {values}): one tier device per run",
                                   f"give every node the same cpu_mem, or set kv_tier.{unset[0]}")
        values = v
    return dataclasses.replace(kv_tier, **values)
