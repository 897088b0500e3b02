"""Cluster descriptions -> ``list[InstanceSpec]`` + a ``Router``: the Hydra ``cluster`` section
and the reference simulator's cluster JSON (REFERENCE.md §3.1).

Hydra (``conf/cluster/*.yaml``)::

    cluster:
      routing: least_loaded          # engine/routing.py POLICIES
      routing_seed: 42               # for routing: random
      json: null                     # a reference cluster JSON; replaces `instances`
      instances:                     # empty: one instance from `hardware` + `scheduler`
        - count: 2                   # two instances as the run's hardware/scheduler sections
          role: prefill              # colocated (default) | prefill | decode (P/D, REFERENCE.md §1.7)
          node: 0                    # the node it sits on (default 0)
        - hardware: {name: RTX4090, mem_size_gb: 24, mem_bw_gbps: 1008}
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

Each instance entry overrides the run's ``hardware`` and ``scheduler`` sections (same keys) and
may name its own ``model`` (org/name under profiles/models; default: the run's model). The JSON
importer maps each instance's fields onto the same dataclasses (``pd_type`` to the role, the
node's position to ``node``, ``tp_size``/``pp_size``/``ep_size``/``dp_group``, a per-dimension
``link_bw``/``link_latency`` list to the two link levels) and rejects what the engine does not
model yet (placement, offloading, CXL, power): a cluster is never simulated with a field ignored.
"""

import dataclasses
import json
from pathlib import Path

from jaxsim.engine.routing import POLICIES, Router
from jaxsim.errors import JaxsimInputError
from jaxsim.model import load_model_config
from jaxsim.spec import KV_TRANSFERS, ROLES, Calibration, HardwareConfig, InstanceSpec, LinkConfig, SchedulerConfig


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    instances: tuple  # of InstanceSpec
    router: Router
    links: LinkConfig = LinkConfig()
    dp_sync: str = "moe"  # which DP groups run wave-synchronised (simulator.place_instances)


def _links(d, key: str) -> LinkConfig:
    """The ``cluster.links`` section (missing keys keep LinkConfig's defaults)."""
    if d is None:
        return LinkConfig()
    if not isinstance(d, dict):
        raise JaxsimInputError(key, f"must be a mapping, got {d!r}")
    fields = {f.name: f for f in dataclasses.fields(LinkConfig)}
    unknown = set(d) - set(fields)
    if unknown:
        raise JaxsimInputError(f"{key}.{sorted(unknown)[0]}", "unknown field", f"fields: {sorted(fields)}")
    vals = {}
    for name, v in d.items():
        if name == "kv_transfer":
            if v not in KV_TRANSFERS:
                raise JaxsimInputError(f"{key}.kv_transfer", f"unknown mode {v!r}", f"one of {list(KV_TRANSFERS)}")
            vals[name] = v
            continue
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (v > 0 if "bw" in name else v >= 0)
        if not ok:
            raise JaxsimInputError(f"{key}.{name}", f"must be a number {'> 0' if 'bw' in name else '>= 0'}, got {v!r}")
        vals[name] = float(v)
    return LinkConfig(**vals)


def check_dp_groups(instances, key: str) -> None:
    """Members of a DP group share tp and ep; for EP across the group, ``ep % dp == 0`` and
    ``ep / dp <= tp`` (REFERENCE.md §1.8). Outside a group, ``ep <= tp``."""
    groups: dict = {}
    for i, spec in enumerate(instances):
        groups.setdefault(spec.dp_group, []).append(i)
    for g, members in groups.items():
        for i in members:
            hw = instances[i].hw
            dp = len(members) if g is not None else 1
            ep = hw.ep or hw.tp
            if ep > hw.tp * dp or ep % dp:
                raise JaxsimInputError(f"{key}[{i}].ep", f"ep {ep} with tp {hw.tp} and {dp} DP rank(s)",
                                       "ep must be a multiple of the DP size and ep / dp <= tp")


def _placement(e: dict, key: str) -> dict:
    """``role``, ``node`` and ``dp_group`` of a cluster instance entry."""
    role = e.get("role", "colocated")
    if role not in ROLES:
        raise JaxsimInputError(f"{key}.role", f"unknown role {role!r}", f"one of {list(ROLES)}")
    node = e.get("node", 0)
    if not isinstance(node, int) or isinstance(node, bool) or node < 0:
        raise JaxsimInputError(f"{key}.node", f"must be an integer >= 0, got {node!r}")
    group = e.get("dp_group")
    if group is not None and not isinstance(group, (str, int)):
        raise JaxsimInputError(f"{key}.dp_group", f"must be a name, got {group!r}")
    return dict(role=role, node=node, dp_group=None if group is None else str(group))


# JSON instance field -> (section, our key). Runtime overrides of REFERENCE.md §3.1.
_JSON_SCHEDULER = {"max_num_seqs": "max_num_seqs", "max_num_batched_tokens": "max_num_batched_tokens",
                   "long_prefill_token_threshold": "long_prefill_token_threshold", "block_size": "block_size",
                   "enable_chunked_prefill": "enable_chunked_prefill",
                   "enable_prefix_caching": "enable_prefix_caching", "reserve_full_isl": "reserve_full_isl"}
# Fields whose behaviour the engine does not model yet: present and not at their neutral value,
# they are refused rather than ignored.
_JSON_UNSUPPORTED = {"placement": (None, {}),
                     "enable_local_offloading": (False,), "enable_attn_offloading": (False,),
                     "enable_sub_batch_interleaving": (False,), "enable_block_copy": (False,),
                     "kv_loc": ("npu",), "kv_cache_dtype": ("auto",),
                     # the shipped profiles are bf16 (the shipped models' torch_dtype)
                     "dtype": ("auto", "bfloat16", "bf16")}
_JSON_TOP_UNSUPPORTED = ("cxl_mem",)
_JSON_NODE_UNSUPPORTED = ("power",)


def cluster_spec(section: dict | None, hardware: dict, scheduler: dict, calib: Calibration, profiles: Path,
                 model_name: str, parse_hardware, parse_scheduler) -> ClusterSpec | None:
    """The ``cluster`` section (None or no instances and no JSON: a single instance -> None).

    ``parse_hardware(dict, key) -> HardwareConfig`` and ``parse_scheduler(dict, key)`` are the
    run config's validators (jaxsim.config), so a cluster entry is checked like the top level."""
    if not section:
        return None
    routing = section.get("routing", "least_loaded")
    if routing not in POLICIES or routing == "custom":
        raise JaxsimInputError("cluster.routing", f"unknown policy {routing!r}",
                               f"one of {[p for p in POLICIES if p != 'custom']} (custom: from Python)")
    seed = section.get("routing_seed", 42)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise JaxsimInputError("cluster.routing_seed", f"must be an integer, got {seed!r}")
    router = Router(routing, seed)
    if section.get("json"):
        base_hw = parse_hardware(hardware, "hardware")
        base_sched = parse_scheduler(scheduler, "scheduler")
        instances, links = load_cluster_json(section["json"], base_hw, base_sched, calib, model_name,
                                             models_dir=Path(profiles) / "models")
        for k, spec in enumerate(instances):  # the JSON's values pass the same checks as the YAML's
            parse_hardware({**dataclasses.asdict(spec.hw), "ep": 0}, f"{section['json']}: instance {k}")
            parse_scheduler(dataclasses.asdict(spec.sched), f"{section['json']}: instance {k}")
        if section.get("links"):  # the YAML's links override the JSON's
            links = dataclasses.replace(links, **dataclasses.asdict(_links(section["links"], "cluster.links")))
        check_dp_groups(instances, f"{section['json']}: instances")
        return ClusterSpec(tuple(instances), router, links, section.get("dp_sync", "moe"))
    entries = section.get("instances") or []
    if not isinstance(entries, list):
        raise JaxsimInputError("cluster.instances", f"must be a list, got {type(entries).__name__}")
    if not entries:
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
        for sec, base in (("hardware", hardware), ("scheduler", scheduler)):
            extra = set(e.get(sec) or {}) - set(base)
            if extra:
                raise JaxsimInputError(f"{key}.{sec}.{sorted(extra)[0]}", "unknown field",
                                       f"fields of the {sec} section: {sorted(base)}")
        merged = {**hardware, **(e.get("hardware") or {})}
        # ep is checked with the DP groups (it may span the group's ranks)
        hw = parse_hardware({**merged, "ep": 0}, f"{key}.hardware")
        ep = merged.get("ep", 0)
        if not isinstance(ep, int) or isinstance(ep, bool) or ep < 0:
            raise JaxsimInputError(f"{key}.hardware.ep", f"must be an integer >= 0, got {ep!r}")
        hw = dataclasses.replace(hw, ep=ep)
        sched = parse_scheduler({**scheduler, **(e.get("scheduler") or {})}, f"{key}.scheduler")
        model = None
        if e.get("model") not in (None, model_name):
            if not isinstance(e["model"], str):
                raise JaxsimInputError(f"{key}.model", f"must be a model name (org/name), got {e['model']!r}")
            model = load_model_config(Path(profiles) / "models", e["model"])
        instances += [InstanceSpec(hw, sched, calib, model=model, **_placement(e, key))] * count
    check_dp_groups(instances, "cluster.instances")
    dp_sync = section.get("dp_sync", "moe")
    if dp_sync not in ("moe", "always", "never"):
        raise JaxsimInputError("cluster.dp_sync", f"unknown value {dp_sync!r}", "one of moe, always, never")
    return ClusterSpec(tuple(instances), router, _links(section.get("links"), "cluster.links"), dp_sync)


def json_links(link_bw: list, link_latency: list) -> LinkConfig:
    """The two link levels of a reference cluster JSON's per-dimension ``link_bw``/``link_latency``
    lists (a scalar is a one-entry list): the first entry within a node, the last between nodes."""
    return LinkConfig(intra_node_bw_gbps=float(link_bw[0]), intra_node_latency_ns=float(link_latency[0]),
                      inter_node_bw_gbps=float(link_bw[-1]), inter_node_latency_ns=float(link_latency[-1]))


def json_hardware(inst: dict, cpu: dict, links: LinkConfig, base_hw: HardwareConfig, *, tp, pp, ep) -> HardwareConfig:
    """The hardware of a reference cluster JSON instance: its ``hardware`` and ``npu_mem``, its
    node's ``cpu_mem`` and the link within the node (TP collectives); fields the JSON does not give
    keep ``base_hw``'s values."""
    mem = inst["npu_mem"]
    return dataclasses.replace(
        base_hw, name=inst["hardware"], mem_size_gb=float(mem["mem_size"]), mem_bw_gbps=float(mem["mem_bw"]),
        mem_latency_ns=float(mem.get("mem_latency", 0)), mem_util=float(mem.get("mem_util", base_hw.mem_util)),
        tp=int(tp), pp=int(pp), ep=int(ep), link_bw_gbps=links.intra_node_bw_gbps,
        link_latency_ns=links.intra_node_latency_ns,
        cpu_mem_bw_gbps=float(cpu.get("mem_bw", base_hw.cpu_mem_bw_gbps)),
        cpu_mem_latency_ns=float(cpu.get("mem_latency", base_hw.cpu_mem_latency_ns)))


def load_cluster_json(path, base_hw: HardwareConfig, base_sched: SchedulerConfig, calib: Calibration,
                      model_name: str, models_dir=None) -> tuple:
    """The instances of a reference cluster JSON and its links: ``(list[InstanceSpec], LinkConfig)``.

    Fields it does not give keep the values of ``base_hw`` / ``base_sched``. The top-level
    ``link_bw``/``link_latency`` is a scalar (every link) or a per-dimension list: its first entry
    is the link within a node (TP collectives, KV hand-offs inside the node), its last the link
    between nodes. ``pd_type`` gives the role; the node's position in ``nodes`` gives ``node``.
    An instance serving another model than ``model_name`` gets that model's config from
    ``models_dir`` (without it, such an instance is refused)."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise JaxsimInputError(str(path), f"cannot read the cluster JSON: {e}") from None

    def need(obj, key, where):
        if key not in obj:
            raise JaxsimInputError(f"{path}: {where}", f"missing required field {key!r}")
        return obj[key]

    for key in _JSON_TOP_UNSUPPORTED:
        if d.get(key):
            raise JaxsimInputError(f"{path}: {key}", "CXL memory pools are not modelled yet", "remove it")
    nodes = need(d, "nodes", "top level")
    if need(d, "num_nodes", "top level") != len(nodes):
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
        for key in _JSON_NODE_UNSUPPORTED:
            if node.get(key):
                raise JaxsimInputError(f"{path}: nodes[{n}].{key}", "power modelling is not implemented yet",
                                       "remove the section")
        insts = need(node, "instances", f"nodes[{n}]")
        if need(node, "num_instances", f"nodes[{n}]") != len(insts):
            raise JaxsimInputError(f"{path}: nodes[{n}].num_instances",
                                   f"{node['num_instances']} but {len(insts)} instances are listed")
        cpu = node.get("cpu_mem") or {}
        for i, inst in enumerate(insts):
            where = f"{path}: nodes[{n}].instances[{i}]"
            model = need(inst, "model_name", f"nodes[{n}].instances[{i}]")
            other = None
            if model != model_name:
                if models_dir is None:
                    raise JaxsimInputError(f"{where}.model_name", f"{model!r}, but the run's model is {model_name!r}",
                                           "set model.name to it, or give the models folder")
                other = load_model_config(models_dir, model)
            for key, neutral in _JSON_UNSUPPORTED.items():
                if key in inst and inst[key] not in neutral:
                    raise JaxsimInputError(f"{where}.{key}", f"{inst[key]!r} is not modelled yet",
                                           f"only {json.dumps(neutral[0])} is supported today")
            mem = need(inst, "npu_mem", f"nodes[{n}].instances[{i}]")
            pp = inst.get("pp_size", 1)
            if not isinstance(pp, int) or isinstance(pp, bool) or pp < 1:
                raise JaxsimInputError(f"{where}.pp_size", f"must be an integer >= 1, got {pp!r}")
            npus = inst.get("num_npus")
            tp = inst.get("tp_size", npus // pp if isinstance(npus, int) and not isinstance(npus, bool) else 1)
            if inst.get("num_npus", tp * pp) != tp * pp:
                raise JaxsimInputError(f"{where}.num_npus", f"{inst['num_npus']} NPUs for tp_size {tp} x pp_size {pp}",
                                       "num_npus = tp_size * pp_size")
            need(inst, "hardware", f"nodes[{n}].instances[{i}]")
            need(mem, "mem_size", "npu_mem"), need(mem, "mem_bw", "npu_mem")
            hw = json_hardware(inst, cpu, links, base_hw, tp=tp, pp=pp, ep=inst.get("ep_size", 0))
            sched = dataclasses.replace(base_sched,
                                        **{ours: inst[k] for k, ours in _JSON_SCHEDULER.items() if k in inst})
            pd = inst.get("pd_type")
            if pd not in (None, "prefill", "decode"):
                raise JaxsimInputError(f"{where}.pd_type", f"unknown role {pd!r}", 'use null, "prefill" or "decode"')
            group = inst.get("dp_group")
            out.append(InstanceSpec(hw, sched, calib, role=pd or "colocated", node=n,
                                    dp_group=None if group is None else str(group), model=other))
    if not out:
        raise JaxsimInputError(str(path), "the cluster has no instances")
    return out, links
