"""Hydra configuration: the structured schema and the one conversion into plain dataclasses.

``conf/config.yaml`` composes the groups ``hardware``, ``model``, ``scheduler``, ``workload`` and
``calibration`` on top of the schema registered here in Hydra's ConfigStore as ``jaxsim_schema``
(so importing this module must precede ``compose``/``hydra.main``). :func:`from_hydra` validates
every field, loads or generates the workload and returns a :class:`RunSpec`; no ``DictConfig``
goes further than this module.

The sections ``hardware``, ``model``, ``scheduler``, ``calibration``, ``sim`` and ``output`` are the
dataclasses :class:`~jaxsim.spec.HardwareConfig`, :class:`~jaxsim.spec.ModelRuntimeConfig`,
:class:`~jaxsim.spec.SchedulerConfig`, :class:`~jaxsim.spec.Calibration`, :class:`SimOptions` and
:class:`jaxsim.metrics.OutputOptions`:
their schemas are generated from the dataclass fields (:func:`spec_schema`) and
:func:`from_hydra` builds them with :func:`jaxsim.spec.build`, so their checks are the
dataclasses' own (``__post_init__``), shared with the cluster JSON importer and the Python API.
This module adds only the checks that need more than the section: profiles for the hardware, the
model's config (context length, experts), the workload.

The ``sweep`` group (``scripts/sweep.py``) adds the axes of a batched sweep: :func:`sweep_options`
validates that section and :func:`sweep_base` builds the :class:`jaxsim.sweep.SweepBase` every
point starts from (both import JAX lazily; the rest of this module does not need it).

Data paths: ``paths.root`` defaults to the project root derived from this package's location,
and ``paths.profiles`` / ``paths.models`` / ``paths.workloads`` derive from it (each overridable).
"""

import dataclasses
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from jaxsim import power as power_lib
from jaxsim.cluster_config import ClusterSpec, check_profiled, cluster_spec, power_from_cluster_json, tier_from_cluster_json
from jaxsim.engine.routing import Router
from jaxsim.errors import JaxsimInputError, unknown_key_fix
from jaxsim.metrics import OutputOptions
from jaxsim.model import ModelConfig, load_model_config
from jaxsim.spec import (Calibration, HardwareConfig, InstanceSpec, KVTierConfig, LinkConfig, ModelRuntimeConfig, Rule, SchedulerConfig,
                         Workload, build, check_expert_parallel, check_field, check_fields, check_value, checked,
                         scalar_type)
from jaxsim.traces import TraceOptions, load_trace
from jaxsim.workload import (check_context, closed_loop_workload, length_spec, load_workload, shared_prefix_workload,
                             shift_workload, synthetic_workload)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = PROJECT_ROOT / "conf"


# ------------------------------------------------------------------------------------------------
# Run options that only the Hydra path has (the other sections are the jaxsim.spec dataclasses)
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SimOptions:
    KEY: ClassVar[str] = "sim"

    max_slots: int = checked(0, lo=0)  # request slots of the engine state (a shape); 0 = auto
    record_token_times: bool = True  # keep every token's emission time (ITL)
    max_iterations: int = checked(0, lo=0)  # engine iteration cap; 0 = derived from the workload
    progress: bool = True  # a progress bar (simulated time, finished requests) on runs over ~2 s
    # JAX's persistent compilation cache (jaxsim.compile_cache): a second run with the same shapes
    # skips the compile. compile_cache_dir None = $JAXSIM_CACHE_DIR or the user cache folder.
    compile_cache: bool = True
    compile_cache_dir: str | None = None

    def __post_init__(self):
        check_fields(self)


# ------------------------------------------------------------------------------------------------
# Structured schema (types and defaults; the values live in conf/*.yaml)
# ------------------------------------------------------------------------------------------------


def _schema_type(typ):
    """The annotation OmegaConf gets for a spec field: scalars as they are, ``X | None`` as
    ``Optional[X]``, anything else ``Any``."""
    base, optional = scalar_type(typ)
    if base is None:
        return Any
    return Optional[base] if optional else base


def spec_schema(cls, required: tuple = (), unset: bool = False) -> type:
    """The Hydra structured config of spec dataclass ``cls``: one field per init field of ``cls``,
    same name, type and default (``required`` ones are MISSING: a config option must set them;
    with ``unset``, every field is Optional and None, "not set here"). Not frozen (command-line overrides write to it); the values are checked when
    :func:`from_hydra` builds ``cls`` from them."""
    fields = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if unset:
            fields.append((f.name, Optional[_schema_type(f.type)], dataclasses.field(default=None)))
            continue
        if f.name in required:
            default = MISSING
        elif f.default is not dataclasses.MISSING:
            default = f.default
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no default; list it in required")
        fields.append((f.name, _schema_type(f.type), dataclasses.field(default=default)))
    schema = dataclasses.make_dataclass(f"{cls.__name__}Schema", fields)
    schema.__module__ = __name__
    return schema


# The sections that are spec dataclasses: every field is overridable from the command line
# (hardware.pp=2) and nothing else is; a config option must name its hardware and model.
HardwareSchema = spec_schema(HardwareConfig, required=("name", "mem_size_gb"))
ModelSchema = spec_schema(ModelRuntimeConfig, required=("name",))
SchedulerSchema = spec_schema(SchedulerConfig)
CalibrationSchema = spec_schema(Calibration)
SimSchema = spec_schema(SimOptions)
LinksSchema = spec_schema(LinkConfig, unset=True)
OutputSchema = spec_schema(OutputOptions)
KVTierSchema = spec_schema(KVTierConfig)


# Sections without a spec dataclass of their own: the workload's generator arguments, and the
# sweep / cluster / paths sections, which from_hydra resolves into other objects (SweepOptions,
# ClusterSpec, Paths).
@dataclasses.dataclass
class WorkloadSchema:
    kind: str = "file"  # "file" | "synthetic" | "closed_loop" | "shared_prefix"
    # kind: file
    path: Optional[str] = None  # absolute, relative to the cwd, or a name in paths.workloads
    # jsonl (jaxsim's own) or a public trace: azure | splitwise | burstgpt | mooncake | vidur
    # (jaxsim.traces; the options below apply to the public formats)
    format: str = "jsonl"
    start: float = 0.0  # s after the trace's first row: the window's start
    duration: float = 0.0  # s; 0 = to the end
    sample: float = 1.0  # keep each row with this probability (seeded by seed)
    rate_scale: float = 1.0  # arrivals this many times faster
    zero_tokens: str = "drop"  # rows with 0 input or output tokens: drop | clip (to 1)
    max_tokens: int = 0  # rows with more input + output tokens (0 = no limit) ...
    over_long: str = "drop"  # ... are dropped or clipped
    block_tokens: int = 512  # tokens per Mooncake hash_ids block
    # every kind: a cap on the requests, 0 = all (of the file, the stages, the conversations);
    # synthetic with rate_rps and closed_loop need >= 1
    num_requests: int = 0
    # kind: synthetic (jaxsim.workload.synthetic_workload); rate_rps or stages also time the
    # conversation starts of shared_prefix
    rate_rps: Optional[float] = None  # requests/s
    # [{rate: requests/s, duration: s}, ...] back to back, instead of rate_rps (Any: checked by
    # jaxsim.workload.check_stages, with errors naming workload.stages[i].<key>)
    stages: Any = None
    arrival: str = "poisson"  # "poisson" | "gamma" | "constant"
    cv: float = 1.0
    # length specs: a whole number (a fixed length) or {kind: fixed|uniform|lognormal|trace, ...}
    # (Any so that workload.input_len=1024 is accepted; checked by jaxsim.workload.length_spec)
    input_len: Any = None
    output_len: Any = None  # also closed_loop and shared_prefix
    seed: int = 0
    prefix_len: int = 0
    prefix_fraction: float = 0.0
    num_prefixes: int = 1
    # kind: closed_loop (jaxsim.workload.closed_loop_workload; input_len, output_len, seed too)
    concurrency: int = 1  # clients, each sending its next request when the previous finishes
    think_time_ns: int = 0  # between a finish and the next request (closed_loop, shared_prefix)
    # kind: shared_prefix (jaxsim.workload.shared_prefix_workload)
    num_groups: int = 1  # groups, each with its own system prompt
    num_users_per_group: int = 1  # users (conversations) per group
    num_turns: int = 1  # turns per conversation
    system_prompt_len: int = 0  # tokens of each group's system prompt
    question_len: Any = None  # length spec of each turn's new question
    # every kind: added to every arrival (closed_loop: when the clients start)
    shift_ns: int = 0


@dataclasses.dataclass
class SloSchema:
    ttft_ms: Optional[float] = None  # a request meets the SLO when its TTFT <= ttft_ms ...
    tpot_ms: Optional[float] = None  # ... and its TPOT <= tpot_ms (null = no bound)


@dataclasses.dataclass
class SweepSchema:
    # knob (jaxsim.sweep.KNOBS) -> list of values; the cartesian product runs as one batched call
    axes: Dict[str, Any] = dataclasses.field(default_factory=dict)
    slo: SloSchema = dataclasses.field(default_factory=SloSchema)
    chunk_size: int = 128  # configurations per compiled call
    progress: bool = True  # progress bar
    plots: bool = True  # report.default_plots into the output dir
    table: str = "sweep.csv"  # results table in the output dir (.csv or .parquet)
    # folder of the sweep's checkpoint (finished chunks); rerunning the same command resumes there
    checkpoint: Optional[str] = None


@dataclasses.dataclass
class DistributedSchema:
    # several processes, one global device mesh (jaxsim/distributed.py); 1 = a plain run
    num_processes: int = 1
    process_id: Optional[int] = None  # this process's index in [0, num_processes)
    coordinator: Optional[str] = None  # HOST:PORT of process 0
    auto: bool = False  # let jax.distributed.initialize() read SLURM / Open MPI variables instead
    timeout_s: int = 300  # how long a process waits for the others


@dataclasses.dataclass
class ClusterSchema:
    # Empty instances and no json: one instance from `hardware` + `scheduler` (jaxsim/cluster_config.py).
    instances: List[Any] = dataclasses.field(default_factory=list)
    json: Optional[str] = None  # a reference cluster JSON (REFERENCE.md §3.1); replaces `instances`
    routing: str = "least_loaded"
    routing_seed: int = 42
    # KV hand-off links per level: LinkConfig's fields, each None = its default (or a cluster JSON's)
    links: LinksSchema = dataclasses.field(default_factory=LinksSchema)
    dp_sync: str = "moe"  # which DP groups run wave-synchronised rounds: moe | always | never


@dataclasses.dataclass
class PowerSchema:
    # A node's power block (REFERENCE.md §3.1, §1.13; jaxsim.power.node_power), given to every node
    # without one of its own in a cluster JSON; all null (power=none): no block.
    base_node_power: Optional[float] = None
    npu: Optional[Dict[str, Any]] = None  # <hardware>: {idle_power, standby_power, active_power, standby_duration, ...}
    cpu: Optional[Dict[str, Any]] = None
    dram: Optional[Dict[str, Any]] = None
    link: Optional[Dict[str, Any]] = None
    nic: Optional[Dict[str, Any]] = None
    storage: Optional[Dict[str, Any]] = None
    cpu_mem_size: Optional[float] = None  # GB of host memory per node (DIMM count; a cluster JSON's cpu_mem wins)
    power_cap: Optional[float] = None  # W, every NPU (also those of a cluster JSON's blocks) that sets none


@dataclasses.dataclass
class PathsSchema:
    root: str = str(PROJECT_ROOT)
    profiles: str = "${paths.root}/profiles"
    models: str = "${paths.profiles}/models"
    workloads: str = "${paths.profiles}/workloads"


@dataclasses.dataclass
class RootSchema:
    hardware: HardwareSchema = MISSING
    model: ModelSchema = MISSING
    scheduler: SchedulerSchema = MISSING
    workload: WorkloadSchema = MISSING
    calibration: CalibrationSchema = MISSING
    sim: SimSchema = dataclasses.field(default_factory=SimSchema)
    output: OutputSchema = dataclasses.field(default_factory=OutputSchema)
    sweep: SweepSchema = dataclasses.field(default_factory=SweepSchema)
    distributed: DistributedSchema = dataclasses.field(default_factory=DistributedSchema)
    cluster: ClusterSchema = dataclasses.field(default_factory=ClusterSchema)
    kv_tier: KVTierSchema = dataclasses.field(default_factory=KVTierSchema)
    power: PowerSchema = dataclasses.field(default_factory=PowerSchema)
    paths: PathsSchema = dataclasses.field(default_factory=PathsSchema)
    output_dir: Optional[str] = None


def register_configs() -> None:
    """Register the schema in Hydra's ConfigStore (done on import of this module)."""
    ConfigStore.instance().store(name="jaxsim_schema", node=RootSchema)


register_configs()


# ------------------------------------------------------------------------------------------------
# Converted, validated run description
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Paths:
    root: Path
    profiles: Path
    models: Path
    workloads: Path


@dataclasses.dataclass
class RunSpec:
    """Everything one run needs, as plain Python (no DictConfig)."""

    hardware: HardwareConfig
    scheduler: SchedulerConfig
    model: ModelRuntimeConfig
    model_config: ModelConfig  # the HF config of ``model.name``
    calibration: Calibration
    workload: Workload
    sim: SimOptions
    paths: Paths
    output_dir: Path | None  # Hydra's run dir; None outside a @hydra.main run (compose API)
    config: dict  # the resolved config as a plain dict (written as config.yaml)
    choices: dict  # group -> chosen option, e.g. {"hardware": "rtxpro6000", ...} when known
    cluster: ClusterSpec | None = None  # several instances (None: the one of hardware + scheduler)
    output: OutputOptions = OutputOptions()  # what scripts/run.py writes besides the summary
    kv_tier: KVTierConfig = KVTierConfig()  # the KV tier below the GPU (CPU / CXL; none by default)
    power: "power_lib.PowerConfig | None" = None  # the nodes' power blocks (None: no power metered)


# Value checks of the sections without a spec dataclass (workload, paths, sweep): the same
# jaxsim.spec.check_value that checks every spec field.
def _check_int(v, key: str, lo: int | None = None, allow_none: bool = False):
    return check_value(v, int | None if allow_none else int, key, Rule(lo=lo))


def _check_float(v, key: str, lo: float | None = None, lo_open: bool = False,
                 hi: float | None = None):
    return check_value(v, float, key, Rule(lo=lo, lo_open=lo_open, hi=hi))


def _check_bool(v, key: str) -> bool:
    return check_value(v, bool, key)


def _check_str(v, key: str) -> str:
    return check_value(v, str, key)


def _section(cfg: dict, name: str) -> dict:
    sec = cfg.get(name)
    if not isinstance(sec, dict):
        raise JaxsimInputError(name, "missing config group",
                               f"select one, e.g. {name}=<option> (see conf/{name}/)")
    return sec


def _hardware(d: dict, profiles: Path, p: str = "hardware") -> HardwareConfig:
    """The hardware of one instance (no DP group): the spec's checks, profiles for its name, and
    ``ep <= tp``."""
    hw = build(HardwareConfig, d, p)
    check_profiled(hw.name, profiles, f"{p}.name")
    check_expert_parallel(hw, 1, f"{p}.ep")
    return hw


def _scheduler(d: dict, p: str = "scheduler") -> SchedulerConfig:
    return build(SchedulerConfig, d, p)


def _model(d: dict, models: Path) -> tuple[ModelRuntimeConfig, ModelConfig]:
    """The ``model`` section and the HF config of its model (the checks that need that config:
    the context length and MoE-only expert routing)."""
    p = "model"
    rt = build(ModelRuntimeConfig, d, p)
    try:
        mc = load_model_config(models, rt.name)
    except JaxsimInputError as e:  # an unknown name is this key's; a bad config file keeps its file and field
        problem = e.problem if "unknown model" in e.problem else f"{e.where}: {e.problem}"
        raise JaxsimInputError(f"{p}.name", problem, e.fix) from None
    if rt.max_model_len > mc.max_position_embeddings:
        raise JaxsimInputError(f"{p}.max_model_len",
                               f"{rt.max_model_len} exceeds {rt.name}'s max_position_embeddings "
                               f"{mc.max_position_embeddings}", "use 0 for the model's context")
    if rt.expert_routing != "balanced" and not mc.is_moe:
        raise JaxsimInputError(f"{p}.expert_routing", f"{rt.expert_routing!r} needs a MoE model; {rt.name} has no "
                               "experts", "use 'balanced'")
    return rt, mc


def _length_arg(d: dict, key: str, workloads: Path) -> dict:
    """The checked length spec ``workload.<key>`` (a whole number is a fixed length), a trace
    path resolved against ``paths.workloads``."""
    v = d.get(key)
    if v is None or v == {}:
        raise JaxsimInputError(f"workload.{key}", "missing length distribution",
                               f"e.g. workload.{key}=1024 or {{kind: lognormal, mean: 512, "
                               "sigma: 0.7}")
    spec = length_spec(v, f"workload.{key}")
    if spec["kind"] == "trace" and spec.get("path"):
        tp = Path(str(spec["path"])).expanduser()
        if not tp.is_absolute() and not tp.is_file():
            spec["path"] = str(workloads / tp)
    return spec


def _synthetic_kwargs(d: dict, workloads: Path) -> dict:
    """The keyword arguments of :func:`jaxsim.workload.synthetic_workload` for a synthetic
    ``workload`` section (trace length paths resolved against ``paths.workloads``)."""
    p = "workload"
    n = _check_int(d.get("num_requests"), f"{p}.num_requests", 0)
    if n < 1 and d.get("stages") is None:
        raise JaxsimInputError(f"{p}.num_requests", f"must be >= 1 for a synthetic workload "
                               f"with a rate_rps, got {n}", "0 = all arrivals needs stages")
    return dict(
        num_requests=n, rate_rps=d.get("rate_rps"), stages=d.get("stages"),
        arrival=d.get("arrival"), cv=d.get("cv"), input_len=_length_arg(d, "input_len", workloads),
        output_len=_length_arg(d, "output_len", workloads), seed=d.get("seed"),
        prefix_len=d.get("prefix_len"), prefix_fraction=d.get("prefix_fraction"),
        num_prefixes=d.get("num_prefixes"))


def _closed_loop_kwargs(d: dict, workloads: Path) -> dict:
    """The keyword arguments of :func:`jaxsim.workload.closed_loop_workload`."""
    return dict(
        num_requests=d.get("num_requests"), concurrency=d.get("concurrency"),
        input_len=_length_arg(d, "input_len", workloads),
        output_len=_length_arg(d, "output_len", workloads), seed=d.get("seed"),
        think_time_ns=d.get("think_time_ns"))


def _shared_prefix_kwargs(d: dict, workloads: Path) -> dict:
    """The keyword arguments of :func:`jaxsim.workload.shared_prefix_workload`."""
    return dict(
        num_groups=d.get("num_groups"), num_users_per_group=d.get("num_users_per_group"),
        num_turns=d.get("num_turns"), system_prompt_len=d.get("system_prompt_len"),
        question_len=_length_arg(d, "question_len", workloads),
        output_len=_length_arg(d, "output_len", workloads), rate_rps=d.get("rate_rps"),
        stages=d.get("stages"), arrival=d.get("arrival"), cv=d.get("cv"),
        think_time_ns=d.get("think_time_ns"), num_requests=d.get("num_requests"),
        seed=d.get("seed"))


# The workload fields that only the public trace formats read (jaxsim.traces.TraceOptions; the
# request cap and the seed are shared with the other kinds).
_TRACE_OPTIONS = tuple(f.name for f in dataclasses.fields(TraceOptions) if f.name not in ("num_requests", "seed"))


def _workload(d: dict, workloads: Path) -> Workload:
    p = "workload"
    kind = d.get("kind")
    n = _check_int(d.get("num_requests"), f"{p}.num_requests", 0)
    shift = _check_int(d.get("shift_ns", 0), f"{p}.shift_ns", 0)
    if kind == "file":
        raw = d.get("path")
        if not raw:
            raise JaxsimInputError(f"{p}.path", "missing", "name a JSONL trace (workload.path=...)")
        path = Path(str(raw)).expanduser()
        if not path.is_absolute() and not path.is_file():
            path = workloads / path
        if not path.is_file():
            known = sorted(x.name for x in workloads.glob("*.jsonl")) if workloads.is_dir() else []
            raise JaxsimInputError(f"{p}.path", f"workload file {str(raw)!r} not found (also "
                                   f"looked in {workloads})", f"available: {known}")
        fmt = _check_str(d.get("format", "jsonl"), f"{p}.format")
        if fmt == "jsonl":
            if path.suffix.lower() == ".csv":
                raise JaxsimInputError(f"{p}.format", f"{path.name} is a CSV, read as jaxsim JSONL",
                                       "set workload.format to its trace format: azure, splitwise, burstgpt or vidur")
            defaults = TraceOptions()
            for key in _TRACE_OPTIONS:
                if key in d and d[key] != getattr(defaults, key):
                    raise JaxsimInputError(f"{p}.{key}", "applies to the public trace formats only",
                                           "set workload.format (azure, splitwise, burstgpt, mooncake, vidur)")
            w = load_workload(path, n)
        else:
            opts = {k: d[k] for k in (*_TRACE_OPTIONS, "seed") if k in d}
            w = load_trace(path, fmt, TraceOptions(**opts, num_requests=n))
    elif kind == "synthetic":
        w = synthetic_workload(**_synthetic_kwargs(d, workloads), where=p)
    elif kind == "closed_loop":
        w = closed_loop_workload(**_closed_loop_kwargs(d, workloads), where=p)
    elif kind == "shared_prefix":
        w = shared_prefix_workload(**_shared_prefix_kwargs(d, workloads), where=p)
    else:
        raise JaxsimInputError(f"{p}.kind", f"unknown workload kind {kind!r}",
                               "use 'file', 'synthetic', 'closed_loop' or 'shared_prefix'")
    return shift_workload(w, shift, f"{p}.shift_ns") if shift else w


def _output_dir(cfg: DictConfig) -> Path | None:
    try:
        v = cfg.get("output_dir")
    except Exception:  # ${hydra:...} outside a Hydra run: HydraConfig is not set
        return None
    return Path(v) if v else None


def _choices(cfg: DictConfig) -> dict:
    try:
        from hydra.core.hydra_config import HydraConfig

        return {k: v for k, v in HydraConfig.get().runtime.choices.items()
                if not k.startswith("hydra")}
    except Exception:
        return {}


def check_cli_overrides(args: list) -> None:
    """Refuse a command-line override of a key the schema does not have, before Hydra does.

    Hydra's own message for ``scheduler.max_num_seq=8`` is "Could not override ... To append to
    your config use +scheduler.max_num_seq=8", which sends the user to a second error. This names
    the key and the nearest valid one instead: ``scheduler.max_num_seq: unknown field (did you mean
    'max_num_seqs'?)``. Keys below a free-form mapping (``workload.input_len.*``, ``sweep.axes.*``,
    ``cluster.instances``), ``+``/``~`` overrides (checked by :func:`from_hydra`), Hydra's own
    keys and options (``hydra.*``, ``-m``) are left to Hydra.

    Raises:
      JaxsimInputError: naming the full key.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for arg in args:
        try:  # Hydra's flags and their values (-m, --cfg job) are not overrides: Hydra reads them
            (o,) = parser.parse_overrides([arg]) if not arg.startswith("-") else ()
        except Exception:
            continue
        key = o.key_or_group
        if o.is_add() or o.is_force_add() or o.is_delete() or key.startswith("hydra") or "/" in key:
            continue
        node = RootSchema
        parts = key.split(".")
        for depth, name in enumerate(parts):
            if not dataclasses.is_dataclass(node):
                break  # a free-form value (a mapping or Any): its keys are checked where it is read
            fields = {f.name: f.type for f in dataclasses.fields(node)}
            if name not in fields:
                raise JaxsimInputError(".".join(parts[:depth + 1]), "unknown field", unknown_key_fix(name, list(fields)))
            node = fields[name]
        value = o.value()
        if dataclasses.is_dataclass(node) and isinstance(value, dict):  # cluster.links={...}
            fields = [f.name for f in dataclasses.fields(node)]
            for name in value:
                if name not in fields:
                    raise JaxsimInputError(f"{key}.{name}", "unknown field", unknown_key_fix(str(name), fields))


def to_container(cfg: DictConfig) -> dict:
    """The resolved config as a plain dict (``output_dir`` left as None outside a Hydra run)."""
    out = {}
    for key in cfg:
        if key in ("hydra",):
            continue
        if key == "output_dir":
            d = _output_dir(cfg)
            out[key] = str(d) if d is not None else None
            continue
        node = cfg[key] if not OmegaConf.is_missing(cfg, key) else None
        try:
            out[key] = (OmegaConf.to_container(node, resolve=True)
                        if OmegaConf.is_config(node) else node)
        except Exception as e:  # interpolation errors, missing values
            raise JaxsimInputError(str(key), f"cannot resolve the config: {e}") from None
    return out


def from_hydra(cfg: DictConfig) -> RunSpec:
    """Validate a composed config and build the :class:`RunSpec` (loads/generates the workload).

    Errors are :class:`~jaxsim.errors.JaxsimInputError` naming the config key, e.g.
    ``scheduler.max_num_seqs: must be >= 0, got -3``.
    """
    d = to_container(cfg)
    # Sections without a spec dataclass: a key added with `+` that the schema does not have is a
    # typo (the spec sections are checked by spec.build).
    for name, schema in (("workload", WorkloadSchema), ("paths", PathsSchema), ("sweep", SweepSchema),
                         ("cluster", ClusterSchema), ("power", PowerSchema), ("distributed", DistributedSchema)):
        known = [f.name for f in dataclasses.fields(schema)]
        for key in (d.get(name) or {}):
            if key not in known:
                raise JaxsimInputError(f"{name}.{key}", "unknown field", unknown_key_fix(key, known))
    paths_d = _section(d, "paths")
    root = Path(_check_str(paths_d.get("root"), "paths.root")).expanduser()
    paths = Paths(
        root=root,
        profiles=Path(_check_str(paths_d.get("profiles"), "paths.profiles")).expanduser(),
        models=Path(_check_str(paths_d.get("models"), "paths.models")).expanduser(),
        workloads=Path(_check_str(paths_d.get("workloads"), "paths.workloads")).expanduser(),
    )
    for key in ("profiles", "models", "workloads"):
        if not getattr(paths, key).is_dir():
            raise JaxsimInputError(f"paths.{key}", f"{getattr(paths, key)} is not a directory",
                                   f"set paths.{key}=<dir> or paths.root=<project root>")

    hardware = _hardware(_section(d, "hardware"), paths.profiles)
    scheduler = _scheduler(_section(d, "scheduler"))
    model, model_config = _model(_section(d, "model"), paths.models)
    calibration = build(Calibration, _section(d, "calibration"))
    sim = build(SimOptions, _section(d, "sim"))
    output = build(OutputOptions, _section(d, "output"))
    workload = _workload(_section(d, "workload"), paths.workloads)

    from jaxsim.profiles import any_model

    bundle = paths.profiles / hardware.name / model.name
    if not bundle.is_dir() and not any_model(hardware.name):  # converted tables and spec sheets: any model
        raise JaxsimInputError("model.name", f"no profiles for {model.name!r} on "
                               f"{hardware.name!r} (looked for {bundle})",
                               "pick a profiled model/hardware pair")
    max_model_len = model.max_model_len or model_config.max_position_embeddings
    check_context(workload, max_model_len, "model.max_model_len")
    if not scheduler.enable_chunked_prefill and scheduler.max_num_batched_tokens:
        longest = int(workload.input_toks.max())
        if longest > scheduler.max_num_batched_tokens:
            raise JaxsimInputError("scheduler.max_num_batched_tokens",
                                   f"{scheduler.max_num_batched_tokens} is smaller than the "
                                   f"longest prompt ({longest} tokens) while "
                                   "scheduler.enable_chunked_prefill is false",
                                   "raise it (0 = unlimited) or enable chunked prefill")
    cluster = cluster_spec(d.get("cluster"), hardware, scheduler, calibration, paths.profiles, model.name)
    kv_tier = build(KVTierConfig, _section(d, "kv_tier"))
    if kv_tier.enabled and (d.get("cluster") or {}).get("json"):
        kv_tier = tier_from_cluster_json(kv_tier, d["cluster"]["json"])
    kv_tier = kv_tier.with_device_defaults()  # what the config and the JSON leave unset
    power = _power(d.get("power") or {}, (d.get("cluster") or {}).get("json"))
    return RunSpec(
        hardware=hardware, scheduler=scheduler, model=model, model_config=model_config,
        calibration=calibration, workload=workload, sim=sim, paths=paths,
        output_dir=_output_dir(cfg), config=d, choices=_choices(cfg), cluster=cluster, output=output,
        kv_tier=kv_tier, power=power,
    )


def _power(sec: dict, cluster_json: str | None) -> "power_lib.PowerConfig | None":
    """The ``power`` section: a node block for every node (all fields null: none), merged with a
    cluster JSON's own blocks (which win for their nodes)."""
    sec = dict(sec)
    cap, mem = sec.pop("power_cap", None), sec.pop("cpu_mem_size", None)
    if cap is not None:
        _check_float(cap, "power.power_cap", lo=0, lo_open=True)
    if mem is not None:
        _check_float(mem, "power.cpu_mem_size", lo=0)
    block = {k: v for k, v in sec.items() if v is not None}
    default = power_lib.node_power(block, "power", cap=cap) if block else None
    if cluster_json:
        cfg = power_from_cluster_json(cluster_json, default=default, cap=cap)
        if cfg is not None and mem is not None:
            cfg = dataclasses.replace(cfg, default_cpu_mem_gb=float(mem))
    elif default is None:
        cfg = None
    else:
        cfg = power_lib.PowerConfig(default=default, default_cpu_mem_gb=float(mem or 0.0))
    if cfg is None and cap is not None:
        raise JaxsimInputError("power.power_cap", f"set to {cap} W, but no node has a power block",
                               "select one (power=<option>, conf/power/) or a cluster JSON with node power blocks")
    return cfg



# ------------------------------------------------------------------------------------------------
# Sweeps (scripts/sweep.py): the ``sweep`` section -> jaxsim.sweep.SweepBase + points
# ------------------------------------------------------------------------------------------------

# Value checks of the knobs of jaxsim.sweep.KNOBS: a knob that is a field of one of _KNOB_SPECS
# has that field's rule (jaxsim.spec); the others are listed here (a test checks every knob is covered).
_KNOB_SPECS = (HardwareConfig, SchedulerConfig)
_POSITIVE = Rule(lo=0, lo_open=True)
_OTHER_KNOBS = {"hardware": (str, Rule()), "cluster": (str, Rule()), "seed": (int, Rule(lo=0)),
                "compute_scale": (float, _POSITIVE), "memory_scale": (float, _POSITIVE),
                "link_scale": (float, _POSITIVE), "arrival_rate_scale": (float, _POSITIVE),
                "kv_cache_dtype": (str, Rule()),
                # the KV tier's knobs (jaxsim.sweep._TIER_KNOBS): KVTierConfig's rules
                "kv_tier_capacity_gb": (float, Rule(lo=0)), "kv_tier_bandwidth_gbps": (float, _POSITIVE),
                "kv_tier_latency_ns": (float, Rule(lo=0)), "enable_prefix_sharing": (bool, Rule()),
                # the power knobs (jaxsim.sweep._POWER_KNOBS): W and s, checked again by jaxsim.power
                "power_cap_w": (float, _POSITIVE), "npu_idle_power_w": (float, Rule(lo=0)),
                "npu_standby_power_w": (float, Rule(lo=0)), "npu_active_power_w": (float, Rule(lo=0)),
                "standby_duration_s": (float, Rule(lo=0))}


@dataclasses.dataclass(frozen=True)
class SweepOptions:
    """The validated ``sweep`` section."""

    axes: dict  # knob -> list of values, in config order (the last knob varies fastest)
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    chunk_size: int = 128
    progress: bool = True
    plots: bool = True
    table: str = "sweep.csv"
    checkpoint: str | None = None  # folder of the checkpoint (jaxsim.checkpoint)

    @property
    def slo(self) -> dict | None:
        """``{"ttft_ms": ..., "tpot_ms": ...}``, or None when neither bound is set."""
        if self.slo_ttft_ms is None and self.slo_tpot_ms is None:
            return None
        return {"ttft_ms": self.slo_ttft_ms, "tpot_ms": self.slo_tpot_ms}

    def points(self) -> list:
        """The grid as a list of points (``[{}]``, the base configuration, when no axes)."""
        from jaxsim.sweep import expand_grid

        return expand_grid(self.axes) if self.axes else [{}]


def _check_knob_value(name: str, v, key: str):
    if name in _OTHER_KNOBS:
        typ, rule = _OTHER_KNOBS[name]
        return check_value(v, typ, key, rule)
    for cls in _KNOB_SPECS:
        if any(f.name == name for f in dataclasses.fields(cls)):
            return check_field(cls, name, v, key)
    return v  # a knob added to jaxsim.sweep.KNOBS without a rule here: jaxsim.sweep checks it


def sweep_options(d: dict | None) -> SweepOptions:
    """Validate a ``sweep`` section (a plain dict, e.g. ``RunSpec.config["sweep"]``).

    Errors name the key: ``sweep.axes.max_num_seq: unknown knob (known knobs: [...])``,
    ``sweep.axes.max_num_seqs[1]: must be >= 0, got -4``, ``sweep.slo.ttft_ms: must be > 0``.
    """
    from jaxsim.sweep import KNOBS

    p = "sweep"
    d = {} if d is None else d
    if not isinstance(d, dict):
        raise JaxsimInputError(p, f"must be a mapping, got {d!r}")
    axes_in = d.get("axes") or {}
    if not isinstance(axes_in, dict):
        raise JaxsimInputError(f"{p}.axes", f"must be a mapping knob -> list of values, got "
                               f"{axes_in!r}", "e.g. sweep.axes={max_num_seqs:[64,128]}")
    axes = {}
    for name, values in axes_in.items():
        key = f"{p}.axes.{name}"
        if name not in KNOBS:
            raise JaxsimInputError(key, "unknown knob", f"known knobs: {sorted(KNOBS)}; other "
                                   "choices (model, workload file, ...) go through Hydra "
                                   "multirun: -m model=a,b")
        if isinstance(values, tuple):
            values = list(values)
        if not isinstance(values, list) or not values:
            raise JaxsimInputError(key, f"must be a non-empty list of values, got {values!r}",
                                   f"e.g. {key}=[a,b]")
        axes[name] = [_check_knob_value(name, v, f"{key}[{i}]") for i, v in enumerate(values)]
    slo = d.get("slo") or {}
    if not isinstance(slo, dict):
        raise JaxsimInputError(f"{p}.slo", f"must be a mapping, got {slo!r}",
                               "e.g. sweep.slo={ttft_ms:1000,tpot_ms:50}")
    bounds = {k: None if slo.get(k) is None else _check_float(slo[k], f"{p}.slo.{k}", 0,
                                                               lo_open=True)
              for k in ("ttft_ms", "tpot_ms")}
    table = _check_str(d.get("table", "sweep.csv"), f"{p}.table")
    if Path(table).suffix not in (".csv", ".parquet"):
        raise JaxsimInputError(f"{p}.table", f"{table!r} is neither .csv nor .parquet",
                               "e.g. sweep.table=sweep.csv")
    return SweepOptions(
        axes=axes, slo_ttft_ms=bounds["ttft_ms"], slo_tpot_ms=bounds["tpot_ms"],
        chunk_size=_check_int(d.get("chunk_size", 128), f"{p}.chunk_size", 1),
        progress=_check_bool(d.get("progress", True), f"{p}.progress"),
        plots=_check_bool(d.get("plots", True), f"{p}.plots"),
        table=table,
        checkpoint=None if d.get("checkpoint") is None else _check_str(d["checkpoint"], f"{p}.checkpoint"),
    )


def _group_option(group: str, name: str, schema, key: str, paths: dict | None = None) -> dict:
    """Option ``name`` of config group ``group`` (``conf/<group>/<name>.yaml`` as it is on disk)
    checked against ``schema``, as a plain dict; ``${paths.*}`` resolve against ``paths``."""
    folder = CONF_DIR / group
    path = folder / f"{name}.yaml"
    if not isinstance(name, str) or "/" in name or not path.is_file():
        raise JaxsimInputError(key, f"unknown {group} option {name!r}",
                               f"options of conf/{group}: {sorted(x.stem for x in folder.glob('*.yaml'))}")
    try:
        raw = OmegaConf.load(path)
        if path.read_text().startswith("# @package _global_"):
            # an option that also sets another group's field (e.g. model.max_model_len): only its
            # own section is a value of the knob; the rest must be set on the base run
            raw = raw.get(group, OmegaConf.create({}))
        node = OmegaConf.merge(OmegaConf.structured(schema), raw)
        root = OmegaConf.merge(OmegaConf.create({"paths": paths or {}}), {group: node})
        return OmegaConf.to_container(root, resolve=True)[group]
    except Exception as e:  # type errors, unknown keys, bad YAML
        raise JaxsimInputError(key, f"cannot load {path}: {e}") from None


def hardware_option(name: str, profiles: Path, model_name: str | None = None,
                    key: str = "hardware") -> HardwareConfig:
    """The :class:`HardwareConfig` of option ``name`` of the ``hardware`` group
    (``conf/hardware/<name>.yaml`` as it is on disk), validated like the ``hardware`` section;
    with ``model_name``, also checks that the pair has a profile bundle."""
    d = _group_option("hardware", name, HardwareSchema, key)
    hw = _hardware(d, profiles, p=f"{key}={name}: hardware")
    from jaxsim.profiles import any_model

    # a converted operator database or a spec sheet builds a bundle for any model: no folder per model
    if model_name is not None and not any_model(hw.name) and not (profiles / hw.name / model_name).is_dir():
        raise JaxsimInputError(key, f"hardware option {name!r}: no profiles for {model_name!r} on "
                               f"{hw.name!r} (looked for {profiles / hw.name / model_name})",
                               "pick a profiled model/hardware pair")
    return hw


def cluster_option(name: str, spec: RunSpec, key: str = "cluster") -> tuple:
    """The instances of option ``name`` of the ``cluster`` group (``conf/cluster/<name>.yaml``
    as it is on disk), on top of the run's hardware and scheduler sections."""
    d = _group_option("cluster", name, ClusterSchema, key, paths=spec.config["paths"])
    c = cluster_spec(d, spec.hardware, spec.scheduler, spec.calibration, spec.paths.profiles, spec.model.name)
    return c.instances if c else (InstanceSpec(spec.hardware, spec.scheduler, spec.calibration),)


def sweep_base(spec: RunSpec, cfg_sweep: dict | SweepOptions | None = None):
    """The :class:`jaxsim.sweep.SweepBase` of a run: every point starts from ``spec``.

    ``cfg_sweep`` is the ``sweep`` section (a dict, default ``spec.config["sweep"]``) or its
    :class:`SweepOptions`. The ``hardware`` knob's values are options of the ``hardware`` group,
    loaded from ``conf/hardware/<name>.yaml`` (command-line overrides of ``hardware.*`` apply to
    the base hardware only). With a synthetic workload, ``SweepBase.synthetic`` holds the
    generator's arguments so that the ``seed`` knob regenerates the trace; a trace file has no
    seed (``sweep.axes.seed`` then raises).
    """
    from jaxsim.sweep import SweepBase

    opts = cfg_sweep if isinstance(cfg_sweep, SweepOptions) else sweep_options(
        spec.config.get("sweep") if cfg_sweep is None else cfg_sweep)
    hardware_options = {}
    for i, name in enumerate(opts.axes.get("hardware", [])):
        if name not in hardware_options:
            hardware_options[name] = hardware_option(name, spec.paths.profiles, spec.model.name,
                                                     key=f"sweep.axes.hardware[{i}]")
    wd = _section(spec.config, "workload")
    synthetic = None
    if wd.get("kind") == "synthetic":
        synthetic = {**_synthetic_kwargs(wd, spec.paths.workloads),
                     "start_ns": int(wd.get("shift_ns") or 0), "where": "workload"}
    elif "seed" in opts.axes:
        raise JaxsimInputError("sweep.axes.seed", "the seed knob needs a synthetic workload, "
                               f"the workload is a trace file ({wd.get('kind')})",
                               "add workload=synthetic_poisson (or synthetic_gamma)")
    cluster_options = {}
    for i, name in enumerate(opts.axes.get("cluster", [])):
        if name not in cluster_options:
            cluster_options[name] = cluster_option(name, spec, key=f"sweep.axes.cluster[{i}]")
    cluster = spec.cluster
    return SweepBase(
        instances=cluster.instances if cluster else None, router=cluster.router if cluster else Router(),
        cluster_options=cluster_options, links=cluster.links if cluster else LinkConfig(),
        dp_sync=cluster.dp_sync if cluster else "moe",
        workload=spec.workload, model=spec.model_config, hardware=spec.hardware,
        scheduler=spec.scheduler, runtime=spec.model, calibration=spec.calibration,
        profiles_dir=spec.paths.profiles, hardware_options=hardware_options,
        synthetic=synthetic, slo_ttft_ms=opts.slo_ttft_ms, slo_tpot_ms=opts.slo_tpot_ms,
        max_slots=spec.sim.max_slots, kv_tier=spec.kv_tier, power=spec.power)
