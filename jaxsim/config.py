"""Hydra configuration: the structured schema and the one conversion into plain dataclasses.

``conf/config.yaml`` composes the groups ``hardware``, ``model``, ``scheduler``, ``workload`` and
``calibration`` on top of the schema registered here in Hydra's ConfigStore as ``jaxsim_schema``
(so importing this module must precede ``compose``/``hydra.main``). :func:`from_hydra` validates
every field, loads or generates the workload and returns a :class:`RunSpec`; no ``DictConfig``
goes further than this module.

The ``sweep`` group (``scripts/sweep.py``) adds the axes of a batched sweep: :func:`sweep_options`
validates that section and :func:`sweep_base` builds the :class:`jaxsim.sweep.SweepBase` every
point starts from (both import JAX lazily; the rest of this module does not need it).

Data paths: ``paths.root`` defaults to the project root derived from this package's location,
and ``paths.profiles`` / ``paths.models`` / ``paths.workloads`` derive from it (each overridable).
"""

import dataclasses
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from jaxsim.cluster_config import ClusterSpec, cluster_spec
from jaxsim.engine.routing import Router
from jaxsim.errors import JaxsimInputError
from jaxsim.model import ModelConfig, dtype_bytes, load_model_config
from jaxsim.spec import (Calibration, HardwareConfig, InstanceSpec, LinkConfig, ModelRuntimeConfig, SchedulerConfig,
                         Workload)
from jaxsim.workload import check_context, load_workload, shift_workload, synthetic_workload

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = PROJECT_ROOT / "conf"


# ------------------------------------------------------------------------------------------------
# Structured schema (types only; the values live in conf/*.yaml)
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class HardwareSchema:
    name: str = MISSING
    mem_size_gb: float = MISSING
    mem_bw_gbps: float = MISSING
    mem_latency_ns: float = 0.0
    mem_util: float = 0.9
    num_gpu_blocks: Optional[int] = None
    activation_reserve_gb: float = 0.0
    tp: int = 1
    link_bw_gbps: float = 16.0
    link_latency_ns: float = 20000.0
    cpu_mem_bw_gbps: float = 256.0
    cpu_mem_latency_ns: float = 0.0
    ep: int = 0  # expert-parallel degree of a MoE model; 0 = tp


@dataclasses.dataclass
class ModelSchema:
    name: str = MISSING
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"
    max_model_len: int = 0
    expert_routing: str = "balanced"  # MoE expert popularity: "balanced" | "zipf"
    expert_zipf_s: float = 1.0  # Zipf exponent (expert_routing: zipf); 0 = uniform
    expert_seed: int = 0  # permutation of the Zipf ranks over experts; -1 = hottest experts on EP rank 0


@dataclasses.dataclass
class SchedulerSchema:
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    long_prefill_token_threshold: int = 0
    reserve_full_isl: bool = True
    enable_prefix_caching: bool = True
    block_size: int = 16
    async_scheduling: bool = True


@dataclasses.dataclass
class WorkloadSchema:
    kind: str = "file"  # "file" | "synthetic"
    # kind: file
    path: Optional[str] = None  # absolute, relative to the cwd, or a name in paths.workloads
    # both kinds: 0 = every line of the file; synthetic needs >= 1
    num_requests: int = 0
    # kind: synthetic (jaxsim.workload.synthetic_workload)
    rate_rps: float = 10.0
    arrival: str = "poisson"  # "poisson" | "gamma"
    cv: float = 1.0
    input_len: Dict[str, Any] = dataclasses.field(default_factory=dict)
    output_len: Dict[str, Any] = dataclasses.field(default_factory=dict)
    seed: int = 0
    prefix_len: int = 0
    prefix_fraction: float = 0.0
    num_prefixes: int = 1
    # both kinds: added to every arrival
    shift_ns: int = 0


@dataclasses.dataclass
class CalibrationSchema:
    iteration_overhead_ns: int = Calibration.iteration_overhead_ns
    first_token_delay_ns: int = Calibration.first_token_delay_ns
    token_output_delay_ns: int = Calibration.token_output_delay_ns


@dataclasses.dataclass
class SimSchema:
    max_slots: int = 0
    record_token_times: bool = True
    max_iterations: int = 0  # 0 = auto


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


@dataclasses.dataclass
class ClusterSchema:
    # Empty instances and no json: one instance from `hardware` + `scheduler` (jaxsim/cluster_config.py).
    instances: List[Any] = dataclasses.field(default_factory=list)
    json: Optional[str] = None  # a reference cluster JSON (REFERENCE.md §3.1); replaces `instances`
    routing: str = "least_loaded"
    routing_seed: int = 42
    links: Optional[Dict[str, Any]] = None  # KV hand-off links per level (spec.LinkConfig fields)
    dp_sync: str = "moe"  # which DP groups run wave-synchronised rounds: moe | always | never


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
    sweep: SweepSchema = dataclasses.field(default_factory=SweepSchema)
    cluster: ClusterSchema = dataclasses.field(default_factory=ClusterSchema)
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
class SimOptions:
    max_slots: int = 0  # request slots of the engine state (a shape); 0 = auto
    record_token_times: bool = True  # keep every token's emission time (ITL)
    max_iterations: int = 0  # engine iteration cap; 0 = derived from the workload


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


def _check_int(v, key: str, lo: int | None = None, allow_none: bool = False):
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise JaxsimInputError(key, f"must be an integer, got {v!r}")
    if lo is not None and v < lo:
        raise JaxsimInputError(key, f"must be >= {lo}, got {v}")
    return int(v)


def _check_float(v, key: str, lo: float | None = None, lo_open: bool = False,
                 hi: float | None = None):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
        raise JaxsimInputError(key, f"must be a number, got {v!r}")
    v = float(v)
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise JaxsimInputError(key, f"must be {'>' if lo_open else '>='} {lo:g}, got {v:g}")
    if hi is not None and v > hi:
        raise JaxsimInputError(key, f"must be <= {hi:g}, got {v:g}")
    if not math.isfinite(v):
        raise JaxsimInputError(key, f"must be finite, got {v}")
    return v


def _check_bool(v, key: str) -> bool:
    if not isinstance(v, bool):
        raise JaxsimInputError(key, f"must be true or false, got {v!r}")
    return v


def _check_str(v, key: str) -> str:
    if not isinstance(v, str) or not v:
        raise JaxsimInputError(key, f"must be a non-empty string, got {v!r}")
    return v


def _section(cfg: dict, name: str) -> dict:
    sec = cfg.get(name)
    if not isinstance(sec, dict):
        raise JaxsimInputError(name, "missing config group",
                               f"select one, e.g. {name}=<option> (see conf/{name}/)")
    return sec


def _hardware(d: dict, profiles: Path, p: str = "hardware") -> HardwareConfig:
    name = _check_str(d.get("name"), f"{p}.name")
    if not (profiles / name).is_dir():
        from jaxsim.profiles import known_hardware  # bundle folders and legacy/<HW> (REFERENCE.md §2.8)

        known = known_hardware(profiles)
        raise JaxsimInputError(f"{p}.name", f"no profiles for hardware {name!r} in {profiles}",
                               f"known hardware: {known}")
    hw = HardwareConfig(
        name=name,
        mem_size_gb=_check_float(d.get("mem_size_gb"), f"{p}.mem_size_gb", 0, lo_open=True),
        mem_bw_gbps=_check_float(d.get("mem_bw_gbps"), f"{p}.mem_bw_gbps", 0, lo_open=True),
        mem_latency_ns=_check_float(d.get("mem_latency_ns"), f"{p}.mem_latency_ns", 0),
        mem_util=_check_float(d.get("mem_util"), f"{p}.mem_util", 0, lo_open=True, hi=1),
        num_gpu_blocks=_check_int(d.get("num_gpu_blocks"), f"{p}.num_gpu_blocks", 1,
                                  allow_none=True),
        activation_reserve_gb=_check_float(d.get("activation_reserve_gb"),
                                           f"{p}.activation_reserve_gb", 0),
        tp=_check_int(d.get("tp"), f"{p}.tp", 1),
        link_bw_gbps=_check_float(d.get("link_bw_gbps"), f"{p}.link_bw_gbps", 0, lo_open=True),
        link_latency_ns=_check_float(d.get("link_latency_ns"), f"{p}.link_latency_ns", 0),
        cpu_mem_bw_gbps=_check_float(d.get("cpu_mem_bw_gbps"), f"{p}.cpu_mem_bw_gbps", 0,
                                     lo_open=True),
        cpu_mem_latency_ns=_check_float(d.get("cpu_mem_latency_ns"), f"{p}.cpu_mem_latency_ns",
                                        0),
        ep=_check_int(d.get("ep", 0), f"{p}.ep", 0),
        pp=_check_int(d.get("pp", 1), f"{p}.pp", 1),  # pipeline stages (num_npus = tp * pp)
    )
    if hw.ep > hw.tp:
        raise JaxsimInputError(f"{p}.ep", f"{hw.ep} exceeds tp = {hw.tp}: without DP groups the expert-parallel "
                               "group is the instance's TP ranks", "use 0 (= tp) or a value <= tp")
    if hw.activation_reserve_gb >= hw.mem_size_gb * hw.mem_util:
        raise JaxsimInputError(f"{p}.activation_reserve_gb",
                               f"{hw.activation_reserve_gb:g} GiB leaves no memory of "
                               f"mem_size_gb·mem_util = {hw.mem_size_gb * hw.mem_util:g} GiB",
                               "lower it")
    return hw


def _scheduler(d: dict, p: str = "scheduler") -> SchedulerConfig:
    return SchedulerConfig(
        max_num_seqs=_check_int(d.get("max_num_seqs"), f"{p}.max_num_seqs", 0),
        max_num_batched_tokens=_check_int(d.get("max_num_batched_tokens"),
                                          f"{p}.max_num_batched_tokens", 0),
        enable_chunked_prefill=_check_bool(d.get("enable_chunked_prefill"),
                                           f"{p}.enable_chunked_prefill"),
        long_prefill_token_threshold=_check_int(d.get("long_prefill_token_threshold"),
                                                f"{p}.long_prefill_token_threshold", 0),
        reserve_full_isl=_check_bool(d.get("reserve_full_isl"), f"{p}.reserve_full_isl"),
        enable_prefix_caching=_check_bool(d.get("enable_prefix_caching"),
                                          f"{p}.enable_prefix_caching"),
        block_size=_check_int(d.get("block_size"), f"{p}.block_size", 1),
        async_scheduling=_check_bool(d.get("async_scheduling", True), f"{p}.async_scheduling"),
    )


def _model(d: dict, models: Path) -> tuple[ModelRuntimeConfig, ModelConfig]:
    p = "model"
    name = _check_str(d.get("name"), f"{p}.name")
    try:
        mc = load_model_config(models, name)
    except JaxsimInputError as e:
        raise JaxsimInputError(f"{p}.name", e.problem, e.fix) from None
    for key in ("dtype", "kv_cache_dtype"):
        v = _check_str(d.get(key), f"{p}.{key}")
        if v != "auto":
            dtype_bytes(v, f"{p}.{key}")
    mml = _check_int(d.get("max_model_len"), f"{p}.max_model_len", 0)
    if mml > mc.max_position_embeddings:
        raise JaxsimInputError(f"{p}.max_model_len",
                               f"{mml} exceeds {name}'s max_position_embeddings "
                               f"{mc.max_position_embeddings}", "use 0 for the model's context")
    routing = _check_str(d.get("expert_routing", "balanced"), f"{p}.expert_routing")
    if routing not in ("balanced", "zipf"):
        raise JaxsimInputError(f"{p}.expert_routing", f"unknown expert routing {routing!r}",
                               "use 'balanced' or 'zipf'")
    if routing != "balanced" and not mc.is_moe:
        raise JaxsimInputError(f"{p}.expert_routing", f"{routing!r} needs a MoE model; {name} has no experts",
                               "use 'balanced'")
    zipf_s = _check_float(d.get("expert_zipf_s", 1.0), f"{p}.expert_zipf_s", 0)
    seed = _check_int(d.get("expert_seed", 0), f"{p}.expert_seed", -1)
    return ModelRuntimeConfig(name=name, dtype=d["dtype"], kv_cache_dtype=d["kv_cache_dtype"],
                              max_model_len=mml, expert_routing=routing, expert_zipf_s=zipf_s,
                              expert_seed=seed), mc


def _calibration(d: dict) -> Calibration:
    p = "calibration"
    return Calibration(**{f.name: _check_int(d.get(f.name), f"{p}.{f.name}", 0)
                          for f in dataclasses.fields(Calibration)})


def _sim(d: dict) -> SimOptions:
    p = "sim"
    return SimOptions(
        max_slots=_check_int(d.get("max_slots"), f"{p}.max_slots", 0),
        record_token_times=_check_bool(d.get("record_token_times"), f"{p}.record_token_times"),
        max_iterations=_check_int(d.get("max_iterations"), f"{p}.max_iterations", 0),
    )


def _synthetic_kwargs(d: dict, workloads: Path) -> dict:
    """The keyword arguments of :func:`jaxsim.workload.synthetic_workload` for a synthetic
    ``workload`` section (trace length paths resolved against ``paths.workloads``)."""
    p = "workload"
    n = _check_int(d.get("num_requests"), f"{p}.num_requests", 0)
    if n < 1:
        raise JaxsimInputError(f"{p}.num_requests", f"must be >= 1 for a synthetic workload, "
                               f"got {n}")
    lens = {}
    for key in ("input_len", "output_len"):
        v = d.get(key)
        if not v:
            raise JaxsimInputError(f"{p}.{key}", "missing length distribution",
                                   "e.g. {kind: lognormal, mean: 512, sigma: 0.7}")
        lens[key] = dict(v)
        if lens[key].get("kind") == "trace" and lens[key].get("path"):
            tp = Path(str(lens[key]["path"])).expanduser()
            if not tp.is_absolute() and not tp.is_file():
                lens[key]["path"] = str(workloads / tp)
    return dict(
        num_requests=n, rate_rps=d.get("rate_rps"), arrival=d.get("arrival"),
        cv=d.get("cv"), input_len=lens["input_len"], output_len=lens["output_len"],
        seed=d.get("seed"), prefix_len=d.get("prefix_len"),
        prefix_fraction=d.get("prefix_fraction"), num_prefixes=d.get("num_prefixes"))


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
        w = load_workload(path, n)
    elif kind == "synthetic":
        w = synthetic_workload(**_synthetic_kwargs(d, workloads), where=p)
    else:
        raise JaxsimInputError(f"{p}.kind", f"unknown workload kind {kind!r}",
                               "use 'file' or 'synthetic'")
    return shift_workload(w, shift) if shift else w


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
    calibration = _calibration(_section(d, "calibration"))
    sim = _sim(_section(d, "sim"))
    workload = _workload(_section(d, "workload"), paths.workloads)

    bundle = paths.profiles / hardware.name / model.name
    if not bundle.is_dir():
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
    cluster = cluster_spec(d.get("cluster"), _section(d, "hardware"), _section(d, "scheduler"), calibration,
                           paths.profiles, model.name, lambda h, k: _hardware(h, paths.profiles, k), _scheduler)
    return RunSpec(
        hardware=hardware, scheduler=scheduler, model=model, model_config=model_config,
        calibration=calibration, workload=workload, sim=sim, paths=paths,
        output_dir=_output_dir(cfg), config=d, choices=_choices(cfg), cluster=cluster,
    )


# ------------------------------------------------------------------------------------------------
# Sweeps (scripts/sweep.py): the ``sweep`` section -> jaxsim.sweep.SweepBase + points
# ------------------------------------------------------------------------------------------------

# Value checks of the knobs of jaxsim.sweep.KNOBS (the keys must match it; tests check).
_INT_KNOBS = {"tp": 1, "num_gpu_blocks": 1, "block_size": 1, "max_num_seqs": 0,
              "max_num_batched_tokens": 0, "long_prefill_token_threshold": 0,
              "seed": 0}  # knob -> lowest value
_BOOL_KNOBS = ("enable_prefix_caching", "enable_chunked_prefill", "async_scheduling")
_FLOAT_KNOBS = {"mem_util": (0.0, True, 1.0), "link_bw_gbps": (0.0, True, None),
                "link_latency_ns": (0.0, False, None), "compute_scale": (0.0, True, None),
                "memory_scale": (0.0, True, None), "link_scale": (0.0, True, None),
                "arrival_rate_scale": (0.0, True, None)}  # knob -> (lo, lo_open, hi)


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
    if name in ("hardware", "cluster"):
        return _check_str(v, key)
    if name in _BOOL_KNOBS:
        return _check_bool(v, key)
    if name in _INT_KNOBS:
        return _check_int(v, key, _INT_KNOBS[name], allow_none=name == "num_gpu_blocks")
    if name in _FLOAT_KNOBS:
        lo, lo_open, hi = _FLOAT_KNOBS[name]
        return _check_float(v, key, lo, lo_open=lo_open, hi=hi)
    return v  # a knob added to jaxsim.sweep.KNOBS after this table: jaxsim.sweep checks it


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
        node = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.load(path))
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
    if model_name is not None and not (profiles / hw.name / model_name).is_dir():
        raise JaxsimInputError(key, f"hardware option {name!r}: no profiles for {model_name!r} on "
                               f"{hw.name!r} (looked for {profiles / hw.name / model_name})",
                               "pick a profiled model/hardware pair")
    return hw


def cluster_option(name: str, spec: RunSpec, key: str = "cluster") -> tuple:
    """The instances of option ``name`` of the ``cluster`` group (``conf/cluster/<name>.yaml``
    as it is on disk), on top of the run's hardware and scheduler sections."""
    d = _group_option("cluster", name, ClusterSchema, key, paths=spec.config["paths"])
    c = cluster_spec(d, _section(spec.config, "hardware"), _section(spec.config, "scheduler"), spec.calibration,
                     spec.paths.profiles, spec.model.name, lambda h, k: _hardware(h, spec.paths.profiles, k),
                     _scheduler)
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
        max_slots=spec.sim.max_slots)
