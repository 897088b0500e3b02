"""Plain, hashable descriptions of one simulation: what the Hydra config and the validation tool
build, and what the engine consumes. No JAX here: these are host-side inputs and outputs.

Units: times in integer ns, sizes in GiB where the name ends in ``_gb`` (REFERENCE.md §0 reads the
nominal "GB" of configs as GiB), bandwidths in GB/s where 1 GB/s = 1 byte/ns.

Each configuration dataclass is the single declaration of its concept: its fields, types and
defaults are the Hydra schema of its config group (``jaxsim.config`` generates the structured
config from them), and the value rule of each field (range, allowed values) is declared with the
field (:func:`checked`) and enforced by ``__post_init__``, whichever path builds it (Hydra, the
cluster JSON importer, the validation tool, Python). A bad value raises
:class:`~jaxsim.errors.JaxsimInputError` naming the field under the class's config key, e.g.
``hardware.pp: must be >= 1, got 0``; :func:`build` re-keys it to where the values came from
(``cluster.instances[1].hardware.pp``, a JSON path, ...).
"""

import dataclasses
import functools
import math
import numbers
import types
import typing
from typing import ClassVar

import numpy as np

from jaxsim.errors import JaxsimInputError, unknown_key_fix
from jaxsim.model import dtype_bytes

# ------------------------------------------------------------------------------------------------
# Field rules: declared with the field, checked in __post_init__
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rule:
    """The value rule of a field beyond its type: ``lo`` (``>``, with ``lo_open``) / ``hi``
    bounds, ``finite`` (floats; bandwidths allow ``inf`` = free), ``choices`` (strings; an
    unknown one reads "unknown <noun> 'x'")."""

    lo: float | None = None
    lo_open: bool = False
    hi: float | None = None
    finite: bool = True
    choices: tuple | None = None
    noun: str = "value"
    fix: str = ""


def checked(default, **rule) -> dataclasses.Field:
    """A dataclass field with a default and a :class:`Rule` (``lo=1``, ``choices=(...)``, ...)."""
    return dataclasses.field(default=default, metadata={"rule": Rule(**rule)})


def scalar_type(typ):
    """``(base, optional)`` of an annotation: ``int | None`` -> ``(int, True)``; non-scalar -> None."""
    optional = False
    if isinstance(typ, types.UnionType) or typing.get_origin(typ) is typing.Union:
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        optional = len(args) < len(typing.get_args(typ))
        typ = args[0] if len(args) == 1 else None
    return (typ if typ in (bool, int, float, str) else None), optional


def _in_range(v, rule: Rule, where: str, fmt: str):
    """``v`` within the bounds of ``rule`` (numbers printed with format ``fmt``)."""
    if rule.lo is not None and (v <= rule.lo if rule.lo_open else v < rule.lo):
        raise JaxsimInputError(where, f"must be {'>' if rule.lo_open else '>='} {rule.lo:{fmt}}, got {v:{fmt}}")
    if rule.hi is not None and v > rule.hi:
        raise JaxsimInputError(where, f"must be <= {rule.hi:{fmt}}, got {v:{fmt}}")
    return v


def check_value(v, typ, where: str, rule: Rule = Rule()):
    """``v`` checked against type ``typ`` (bool, int, float, str, optionally ``| None``) and
    ``rule``, normalised (numpy scalars -> Python, int -> float for floats); raises
    :class:`JaxsimInputError` at ``where``."""
    base, optional = scalar_type(typ)
    if v is None and optional:
        return None
    if base is bool:
        if not isinstance(v, (bool, np.bool_)):
            raise JaxsimInputError(where, f"must be true or false, got {v!r}")
        return bool(v)
    if base is int:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
            raise JaxsimInputError(where, f"must be an integer, got {v!r}")
        return _in_range(int(v), rule, where, "")
    if base is float:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real) or math.isnan(v):
            raise JaxsimInputError(where, f"must be a number, got {v!r}")
        v = _in_range(float(v), rule, where, "g")
        if rule.finite and not math.isfinite(v):
            raise JaxsimInputError(where, f"must be finite, got {v}")
        return v
    if base is str:
        if not isinstance(v, str) or not v:
            raise JaxsimInputError(where, f"must be a non-empty string, got {v!r}")
        if rule.choices is not None and v not in rule.choices:
            raise JaxsimInputError(where, f"unknown {rule.noun} {v!r}", rule.fix or f"one of {list(rule.choices)}")
        return v
    return v  # not a scalar field (a nested spec, a model config): its own class checks it


@functools.cache
def _rules(cls) -> tuple:
    """``(name, type, Rule)`` of every scalar init field of ``cls``."""
    return tuple((f.name, f.type, f.metadata.get("rule", Rule())) for f in dataclasses.fields(cls)
                 if f.init and scalar_type(f.type)[0] is not None)


def check_fields(obj) -> None:
    """Check (and normalise, see :func:`check_value`) every scalar field of a config dataclass,
    errors at ``<obj.KEY>.<field>``; ``__post_init__`` of the config dataclasses calls it."""
    for name, typ, rule in _rules(type(obj)):
        object.__setattr__(obj, name, check_value(getattr(obj, name), typ, f"{obj.KEY}.{name}", rule))


def check_field(cls, name: str, v, where: str):
    """``v`` checked as a value of field ``name`` of ``cls`` (e.g. a sweep knob), errors at ``where``."""
    for n, typ, rule in _rules(cls):
        if n == name:
            return check_value(v, typ, where, rule)
    raise KeyError(f"{cls.__name__} has no scalar field {name!r}")


def build(cls, values: dict, where: "str | dict | None" = None):
    """``cls(**values)`` with errors naming where the values came from: ``where`` is the key of the
    section (a field ``f`` is then ``<where>.f``; default ``cls.KEY``) or a dict field -> key (e.g.
    the JSON path of each field). Unknown keys are errors too; missing ones keep the defaults."""
    key = cls.KEY
    where = key if where is None else where

    def at(field: str) -> str:
        return where.get(field, f"{key}.{field}") if isinstance(where, dict) else f"{where}.{field}"

    if not isinstance(values, dict):
        raise JaxsimInputError(where if isinstance(where, str) else key, f"must be a mapping, got {values!r}")
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(values) - set(names), key=str)
    if unknown:
        raise JaxsimInputError(at(str(unknown[0])), "unknown field", unknown_key_fix(unknown[0], names))
    try:
        return cls(**values)
    except JaxsimInputError as e:
        if not e.where.startswith(key + "."):
            raise
        raise JaxsimInputError(at(e.where[len(key) + 1:]), e.problem, e.fix) from None


# Arrivals must be earlier than this many ns after 0 (2^62 ns, about 146 years). The engine adds
# iteration and tool durations to arrival times in int64 ns, and int64's largest value stands for
# "arrives when released" (jaxsim.planning.workload_arrays): with arrivals below 2^62 no sum
# overflows unless the run itself lasts another 146 simulated years.
ARRIVAL_HORIZON_NS = 2**62
# Durations the engine adds to those clocks (engine costs and delays, session tool times) are at
# most this (2^40 ns, about 18 minutes each; a session's arrival plus its tool times stay below the
# horizon): larger values overflowed int64 into negative times (jaxsim.workload checks sessions).
MAX_DURATION_NS = 2**40


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """vLLM V1 scheduler knobs (REFERENCE.md §1.2). 0 means unlimited where noted."""

    KEY: ClassVar[str] = "scheduler"

    max_num_seqs: int = checked(128, lo=0)  # 0 = unlimited
    max_num_batched_tokens: int = checked(2048, lo=0)  # 0 = unlimited (clamped to the model context)
    enable_chunked_prefill: bool = True
    long_prefill_token_threshold: int = checked(0, lo=0)  # 0 = off
    reserve_full_isl: bool = True
    enable_prefix_caching: bool = True
    block_size: int = checked(16, lo=1)
    # vLLM V1 async scheduling (on by default in v0.19): the next batch is built before the
    # previous one's outputs are processed, so finished requests free their seat and KV blocks
    # one batch late. Off reproduces the reference simulator (LLMServingSim) exactly.
    async_scheduling: bool = True
    # vLLM's BlockPool reserves block 0 as the "null block" (vllm/v1/core/block_pool.py), so
    # num_gpu_blocks N leaves N - 1 blocks for requests and KV usage is over N - 1. The reference
    # simulator has no null block (REFERENCE.md §1.3): scheduler=reference sets this off.
    reserve_null_block: bool = True
    # vLLM <= 0.19 records a prefix-cache lookup's queried / hit tokens on every admission attempt
    # of a new request, refused ones included (KVCacheManager.get_computed_blocks), and its
    # exported counters and hit rate reflect that; later vLLM, and the reference, count each
    # request once, at its first admission (off).
    prefix_stats_every_attempt: bool = True
    # vLLM's prefix index keeps every block registered under a hash (vllm/v1/core/block_pool.py,
    # BlockHashToBlockMap): a lookup returns the oldest copy still present and evicting one copy
    # leaves the others findable. Copies arise when a request computes blocks that another is
    # computing at the same time. The reference keeps one block per hash, the newest (off).
    prefix_index_all_copies: bool = True

    # vLLM's CacheConfig BlockSize (vllm/config/cache.py): the sizes its attention kernels take.
    VLLM_BLOCK_SIZES: ClassVar[tuple] = (1, 8, 16, 32, 64, 128, 256)

    def __post_init__(self):
        check_fields(self)
        # What vLLM refuses at start-up, refused here with its reason (vllm/config/scheduler.py,
        # cache.py), so that a simulated configuration is one vLLM would run.
        if self.max_num_seqs and self.max_num_batched_tokens and self.max_num_batched_tokens < self.max_num_seqs:
            raise JaxsimInputError(
                "scheduler.max_num_batched_tokens", f"{self.max_num_batched_tokens} is smaller than max_num_seqs "
                f"({self.max_num_seqs}): vLLM refuses this at start-up (max_num_batched_tokens must be >= max_num_seqs)",
                "raise max_num_batched_tokens or lower max_num_seqs")
        if self.block_size not in self.VLLM_BLOCK_SIZES:
            raise JaxsimInputError("scheduler.block_size", f"{self.block_size} is not a block size vLLM accepts",
                                   f"one of {', '.join(map(str, self.VLLM_BLOCK_SIZES))}")


OFFLOAD_DEVICES = ("cpu", "cxl")  # HardwareConfig.weights_offload_device
KV_OFFLOAD_DEVICES = ("none", "cpu", "cxl")  # HardwareConfig.kv_offload_device
PIM_CONTEXTS = ("current", "prompt")  # HardwareConfig.pim_context


@dataclasses.dataclass(frozen=True)
class HardwareConfig:
    """One serving instance's hardware (REFERENCE.md §3.1 ``npu_mem``, node ``cpu_mem``, links).

    The accelerator's own memory bandwidth and latency (the JSON's ``npu_mem.mem_bw`` /
    ``mem_latency``) are not fields: the profiles hold the measured kernel times, and nothing
    reads them. Bandwidths may be ``inf`` (a free link / host copy)."""

    KEY: ClassVar[str] = "hardware"

    name: str = "RTXPRO6000"  # a folder under profiles/ (or legacy/<HW>, a converted system, spec/<sheet>)
    # per accelerator, read as GiB. mem_size_gb and the TP link may be None ("null"): taken from the
    # hardware's own source (resolve_hardware in jaxsim/planning.py: a spec sheet's mem_gib and link, a
    # converted operator database's spec sheet and its all-reduce fit at this TP degree); measured
    # profiles carry neither, so their hardware must give them.
    mem_size_gb: float | None = checked(96.0, lo=0, lo_open=True)
    mem_util: float = checked(0.9, lo=0, lo_open=True, hi=1)  # vLLM gpu_memory_utilization
    # explicit KV block count; overrides the memory model
    num_gpu_blocks: int | None = checked(None, lo=1)
    # activation peak + CUDA graphs + non-torch memory, GiB per rank
    activation_reserve_gb: float = checked(0.0, lo=0)
    tp: int = checked(1, lo=1)
    link_bw_gbps: float | None = checked(16.0, lo=0, lo_open=True, finite=False)  # TP collectives (within node)
    link_latency_ns: float | None = checked(20000.0, lo=0)
    # host memory: token ids in / sampled ids out
    cpu_mem_bw_gbps: float = checked(256.0, lo=0, lo_open=True, finite=False)
    cpu_mem_latency_ns: float = checked(0.0, lo=0)
    # expert-parallel degree of a MoE model; 0 = tp (REFERENCE.md §1.8). It may exceed tp only
    # across a DP group's ranks: check_expert_parallel.
    ep: int = checked(0, lo=0)
    pp: int = checked(1, lo=1)  # pipeline stages per instance (num_npus = tp * pp; REFERENCE.md §1.8)
    # Weight offloading (REFERENCE.md §1.10, jaxsim/placement.py): the last
    # round(weights_offload_fraction * L) transformer blocks' weights sit in host memory ("cpu") or
    # on a CXL device ("cxl"): they leave the GPU (more KV blocks) and are read over the device
    # every iteration. offload_bw_gbps / offload_latency_ns: the device's GB/s and ns per load
    # (None: cpu_mem_bw_gbps / cpu_mem_latency_ns for "cpu"; "cxl" needs the bandwidth, latency 0).
    weights_offload_fraction: float = checked(0.0, lo=0, hi=1)
    weights_offload_device: str = checked("cpu", choices=OFFLOAD_DEVICES, noun="offload device",
                                          fix="use cpu or cxl")
    offload_bw_gbps: float | None = checked(None, lo=0, lo_open=True, finite=False)
    offload_latency_ns: float | None = checked(None, lo=0)
    # The KV cache itself off the GPU (REFERENCE.md §1.16 row kv_loc, §1.3, jaxsim/placement.py):
    # "cpu" (host memory) or "cxl" (one CXL device, cxl:0) holds every block's KV, the Hydra form of
    # a cluster JSON's placement kv_loc. The KV block count then comes from kv_offload_capacity_gb
    # (GiB this instance's KV gets on the device, all ranks; the GPU's leftover memory is unused)
    # and every iteration reads the KV it attends over from the device at offload_bw_gbps /
    # offload_latency_ns (None: cpu_mem_bw_gbps / cpu_mem_latency_ns for "cpu"; "cxl" needs the
    # bandwidth, latency 0). "none": the KV cache on the GPU (the memory model of §1.3).
    kv_offload_device: str = checked("none", choices=KV_OFFLOAD_DEVICES, noun="KV offload device",
                                     fix="use none, cpu or cxl")
    kv_offload_capacity_gb: float | None = checked(None, lo=0, lo_open=True)
    # PIM attention offload (REFERENCE.md §1.11-1.12; jaxsim/pim.py, README "PIM attention offload"):
    # decode attention runs on the PIM channels of the node's host memory (a cluster JSON's
    # enable_attn_offloading with its node's cpu_mem.pim_config and cpu_mem.mem_size). pim_config: an
    # INI stem under profiles/pim (e.g. DDR4_8GB_3200_pim) or a path to an .ini; pim_mem_size_gb: the
    # host memory holding the channels (GB). Sub-batch interleaving (§1.12) needs it, and pp = 1.
    enable_attn_offloading: bool = False
    pim_config: str | None = None
    pim_mem_size_gb: float | None = checked(None, lo=0, lo_open=True)
    enable_sub_batch_interleaving: bool = False
    # The PIM latency per request and channel (jaxsim/pim.py): derived from the INI, unless both
    # coefficients are given (ns per context token, ns; e.g. the reference simulator's own fits).
    pim_slope_ns: float | None = checked(None, lo=0, lo_open=True)
    pim_intercept_ns: float | None = checked(None, lo=0)
    # Reference mode: "prompt" prices a decode's PIM attention at its prompt length (the reference
    # simulator's defect, §1.16) instead of its current context; pim_overlap false runs the PIM work
    # after the NPU's prefill attention (as the reference's outputs do) instead of beside it.
    pim_context: str = checked("current", choices=PIM_CONTEXTS, noun="PIM context", fix="use current or prompt")
    pim_overlap: bool = True
    # Hardware known only by its spec sheet (name ``spec/<sheet>``, profiles/specs/<sheet>.yaml; priced
    # by the roofline model, jaxsim/latency/roofline.py): the sheet's peak FLOP/s of the model's
    # compute dtype (TFLOP/s) and memory bandwidth (GB/s), overridden for a what-if part (None: the
    # sheet's). Only spec hardware has them: measured tables cannot be re-priced this way.
    peak_tflops: float | None = checked(None, lo=0, lo_open=True)
    mem_bw_gbs: float | None = checked(None, lo=0, lo_open=True)

    def __post_init__(self):
        check_fields(self)
        self._check_pim()
        if self.weights_offload_fraction > 0 and self.weights_offload_device == "cxl" and self.offload_bw_gbps is None:
            raise JaxsimInputError(f"{self.KEY}.offload_bw_gbps", "weights offloaded to a CXL device need the "
                                   "device's bandwidth", "set hardware.offload_bw_gbps (GB/s)")
        if self.kv_offload_device != "none" and self.kv_offload_capacity_gb is None:
            raise JaxsimInputError(f"{self.KEY}.kv_offload_capacity_gb", f"a KV cache on {self.kv_offload_device!r} "
                                   "(kv_offload_device) needs the device's capacity for it",
                                   "set hardware.kv_offload_capacity_gb (GiB)")
        if self.kv_offload_device == "cxl" and self.offload_bw_gbps is None:
            raise JaxsimInputError(f"{self.KEY}.offload_bw_gbps", "a KV cache on a CXL device needs the device's "
                                   "bandwidth", "set hardware.offload_bw_gbps (GB/s)")
        if self.mem_size_gb is not None and self.activation_reserve_gb >= self.mem_size_gb * self.mem_util:
            raise JaxsimInputError(f"{self.KEY}.activation_reserve_gb",
                                   f"{self.activation_reserve_gb:g} GiB leaves no memory of "
                                   f"mem_size_gb·mem_util = {self.mem_size_gb * self.mem_util:g} GiB",
                                   "lower it")

    def _check_pim(self):
        k = self.KEY
        if (self.pim_slope_ns is None) != (self.pim_intercept_ns is None):
            missing = "pim_intercept_ns" if self.pim_intercept_ns is None else "pim_slope_ns"
            raise JaxsimInputError(f"{k}.{missing}", "explicit PIM coefficients come in pairs",
                                   "set both pim_slope_ns and pim_intercept_ns, or neither (derived from the INI)")
        if self.enable_sub_batch_interleaving and not self.enable_attn_offloading:
            raise JaxsimInputError(f"{k}.enable_sub_batch_interleaving", "interleaves sub-batches around PIM "
                                   "attention, but enable_attn_offloading is false", "enable attention offloading")
        if self.enable_attn_offloading and self.pp != 1:
            raise JaxsimInputError(f"{k}.pp", f"{self.pp} pipeline stages with PIM attention offloading: modelled "
                                   "for pp = 1 (sub-batch interleaving needs pp = 1)", "use pp 1")


def check_expert_parallel(hw: HardwareConfig, dp: int, where: str) -> None:
    """The EP group of an instance with ``dp`` DP ranks (1: no DP group): ``ep`` (0 = tp) must be
    a multiple of ``dp`` with ``ep / dp <= tp`` (REFERENCE.md §1.8)."""
    ep = hw.ep or hw.tp
    if dp == 1 and ep > hw.tp:
        raise JaxsimInputError(where, f"{ep} exceeds tp = {hw.tp}: without DP groups the expert-parallel "
                               "group is the instance's TP ranks", "use 0 (= tp) or a value <= tp")
    if ep > hw.tp * dp or ep % dp:
        raise JaxsimInputError(where, f"ep {ep} with tp {hw.tp} and {dp} DP rank(s)",
                               "ep must be a multiple of the DP size and ep / dp <= tp")


EXPERT_ROUTINGS = ("balanced", "zipf")


@dataclasses.dataclass(frozen=True)
class ModelRuntimeConfig:
    KEY: ClassVar[str] = "model"

    name: str = "meta-llama/Llama-3.1-8B"  # org/name under profiles/models and the profile bundle
    dtype: str = "auto"  # weight dtype; auto = the model's torch_dtype
    kv_cache_dtype: str = "auto"  # auto = the activation dtype
    max_model_len: int = checked(0, lo=0)  # vLLM max_model_len; 0 = the model's max_position_embeddings
    # MoE expert popularity: "balanced" (§1.9 closed form) | "zipf"
    expert_routing: str = checked("balanced", choices=EXPERT_ROUTINGS, noun="expert routing",
                                  fix="use 'balanced' or 'zipf'")
    expert_zipf_s: float = checked(1.0, lo=0)  # Zipf exponent of expert popularity (routing "zipf"; 0 = uniform)
    expert_seed: int = checked(0, lo=-1)  # permutation of the Zipf ranks over experts (-1 = hottest experts on rank 0)

    def __post_init__(self):
        check_fields(self)
        for key in ("dtype", "kv_cache_dtype"):
            if getattr(self, key) != "auto":
                dtype_bytes(getattr(self, key), f"{self.KEY}.{key}")


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Engine costs that the operator profiles do not contain (REFERENCE.md §2.9).

    These are properties of the serving engine (vLLM V1 on a CPU host) and its configuration
    (async scheduling, the batch: jaxsim/engine/costs.py), not of a case: fitted jointly on the
    development cases (scripts/fit_engine_costs.py, README "Calibration"), the same for every case.
    """

    KEY: ClassVar[str] = "calibration"

    # Fitted jointly on RTXPRO6000 and RTX4090 (vLLM 0.19, async) and A6000 pulse-SD+PC (vLLM
    # 0.13, eager, sync): scripts/fit_engine_costs.py, outputs in README "Calibration".
    # (each at most 2^40 ns, 18 minutes: the engine adds them to int64 ns clocks, see ARRIVAL_HORIZON_NS)
    iteration_overhead_ns: int = checked(500_000, lo=0, hi=MAX_DURATION_NS)  # per engine step, async or not
    first_token_delay_ns: int = checked(0, lo=0, hi=MAX_DURATION_NS)  # engine core -> detokenizer -> frontend, first token
    token_output_delay_ns: int = checked(0, lo=0, hi=MAX_DURATION_NS)  # the same path for every later token
    # CPU time of an engine step (scheduling, input preparation, sampling, output processing):
    # step_cpu_ns + seq_cpu_ns per scheduled sequence; all of it shows without async scheduling,
    # only what exceeds the GPU time with it (jaxsim/engine/costs.py).
    step_cpu_ns: int = checked(2_000_000, lo=0, hi=MAX_DURATION_NS)
    seq_cpu_ns: int = checked(40_000, lo=0, hi=MAX_DURATION_NS)

    def __post_init__(self):
        check_fields(self)

    @classmethod
    def none(cls) -> "Calibration":
        """No engine costs beyond the profiles: the reference simulator's latency model."""
        return cls(iteration_overhead_ns=0, first_token_delay_ns=0, token_output_delay_ns=0, step_cpu_ns=0,
                   seq_cpu_ns=0)


KV_TIER_STORAGES = ("none", "cpu", "cxl")  # REFERENCE.md §1.5 prefix_storage (none: no tier)
KV_TIER_MIN_GAINS = ("token", "chunk")


@dataclasses.dataclass(frozen=True)
class KVTierConfig:
    """A KV tier below the GPU's paged cache (REFERENCE.md §1.5): vLLM + LMCache, or the reference
    simulator's ``prefix_storage`` / ``enable_prefix_sharing``. Chunks of ``chunk_size`` tokens of a
    request's computed KV are copied down as the GPU blocks covering them fill (write-through,
    inclusive, LRU eviction); at admission, after the GPU prefix hits, the leading chunks the tier
    holds are recalled before the batch's first layer (``latency_ns + bytes / bandwidth``, the
    pool's bandwidth shared by the recalls in flight) and count as computed.

    ``capacity_gb``, ``bandwidth_gbps``, ``latency_ns``: one pool's device; None takes the cluster
    JSON's ``cpu_mem`` (storage cpu, per node) or ``cxl_mem`` (storage cxl). With
    ``enable_prefix_sharing`` the instances of a node share one CPU pool, and every instance one
    CXL pool; without it each instance has a private pool with its share of the device (the
    capacity split evenly among the instances on it; REFERENCE.md §1.16).
    """

    KEY: ClassVar[str] = "kv_tier"

    storage: str = checked("none", choices=KV_TIER_STORAGES, noun="storage", fix="use none, cpu or cxl")
    enable_prefix_sharing: bool = False
    capacity_gb: float | None = checked(None, lo=0)  # GiB of one device (a node's CPU memory); 0 holds nothing
    bandwidth_gbps: float | None = checked(None, lo=0, lo_open=True, finite=False)  # GB/s = bytes/ns
    latency_ns: float | None = checked(None, lo=0)  # per recall
    chunk_size: int = checked(256, lo=1)  # tokens per chunk (LMCache's chunk_size), rounded down to blocks
    # A tier hit is used when it gains at least one block ("token", vLLM + LMCache: any hit beyond the
    # GPU's) or at least one whole chunk ("chunk", the reference simulator).
    min_gain: str = checked("token", choices=KV_TIER_MIN_GAINS, noun="min_gain", fix="use token or chunk")

    # The device when neither the config nor a cluster JSON gives it (conf/kv_tier/*.yaml say so):
    # host DRAM over PCIe for cpu, a CXL memory expander for cxl.
    DEVICE_DEFAULTS: ClassVar[dict] = {"cpu": dict(capacity_gb=128.0, bandwidth_gbps=64.0, latency_ns=10_000.0),
                                       "cxl": dict(capacity_gb=256.0, bandwidth_gbps=64.0, latency_ns=250.0)}

    def __post_init__(self):
        check_fields(self)
        if not self.enabled:
            for f in ("capacity_gb", "bandwidth_gbps", "latency_ns"):
                if getattr(self, f) is not None:
                    raise JaxsimInputError(f"{self.KEY}.{f}", f"set to {getattr(self, f)!r}, but {self.KEY}.storage is "
                                           "none: there is no tier for it", "set kv_tier=cpu (or cxl), or drop it")

    def with_device_defaults(self) -> "KVTierConfig":
        """The unset device fields (None) filled with :attr:`DEVICE_DEFAULTS` of the storage."""
        if not self.enabled:
            return self
        return dataclasses.replace(self, **{k: v for k, v in self.DEVICE_DEFAULTS[self.storage].items()
                                            if getattr(self, k) is None})

    @property
    def enabled(self) -> bool:
        return self.storage != "none"

    def chunk_blocks(self, block_size: int) -> int:
        """Blocks per chunk: ``max(bs, (chunk // bs) * bs) / bs`` (REFERENCE.md §1.5); 0 without a
        tier (no chunk keys are computed)."""
        return max(1, self.chunk_size // block_size) if self.enabled else 0

    def chunk_bytes(self, block_size: int, kv_token_bytes: int) -> int:
        """Bytes of one chunk: its tokens x ``kv_token_bytes`` (K+V, all layers and ranks)."""
        return self.chunk_blocks(block_size) * block_size * kv_token_bytes


ROLES = ("colocated", "prefill", "decode")  # REFERENCE.md §1.7 pd_type: null | prefill | decode
KV_TRANSFERS = ("layerwise", "after_prefill")
DP_SYNC = ("moe", "always", "never")  # which DP groups run wave-synchronised rounds


@dataclasses.dataclass(frozen=True)
class InstanceSpec:
    """One instance of a cluster: its hardware, scheduler knobs and engine costs (same model),
    its role (``colocated`` serves requests whole; under P/D, ``prefill`` instances compute the
    prompt and the first token and hand the request to a ``decode`` instance), and its node."""

    KEY: ClassVar[str] = "instance"

    hw: HardwareConfig = HardwareConfig()
    sched: SchedulerConfig = SchedulerConfig()
    calib: Calibration = Calibration()
    role: str = checked("colocated", choices=ROLES, noun="role")
    node: int = checked(0, lo=0)
    # Instances with the same dp_group form a DP group (REFERENCE.md §1.8): wave-synchronised
    # rounds padded to the group's largest batch (for MoE models by default). None: no group.
    # An integer names the group too (it is kept as a string).
    dp_group: str | None = None
    # The model this instance serves (a jaxsim.model.ModelConfig); None: the cluster's model.
    # Every request may go to any instance; P/D pairs and DP groups share one model.
    model: object = None
    # Where each weight-bearing layer sits (a jaxsim.placement.WeightPlacement: a cluster JSON's
    # `placement`, REFERENCE.md §1.10); None: as ``hw`` says (weights_offload_fraction).
    placement: object = None
    # Where KV evicted from the GPU goes (the lower KV tier, REFERENCE.md §1.10 kv_evict_loc):
    # npu | cpu | cxl:<id>.
    kv_evict_loc: str = "cpu"
    # Weight and KV dtypes of this instance (a cluster JSON's `dtype` / `kv_cache_dtype`); None:
    # the run's model section (ModelRuntimeConfig).
    dtype: str | None = None
    kv_cache_dtype: str | None = None

    def __post_init__(self):
        for key in ("dtype", "kv_cache_dtype"):
            if getattr(self, key) not in (None, "auto"):
                dtype_bytes(getattr(self, key), f"{self.KEY}.{key}")
        if not (isinstance(self.kv_evict_loc, str)
                and (self.kv_evict_loc in ("npu", "cpu") or self.kv_evict_loc.startswith("cxl:")
                     and self.kv_evict_loc[4:].isdigit())):
            raise JaxsimInputError(f"{self.KEY}.kv_evict_loc", f"unknown device {self.kv_evict_loc!r}",
                                   "use npu, cpu or cxl:<id>")
        g = self.dp_group
        if isinstance(g, numbers.Integral) and not isinstance(g, (bool, np.bool_)):
            object.__setattr__(self, "dp_group", str(g))
        elif g is not None and not isinstance(g, str):
            raise JaxsimInputError(f"{self.KEY}.dp_group", f"must be a name, got {g!r}")
        check_fields(self)


@dataclasses.dataclass(frozen=True)
class LinkConfig:
    """The links that carry KV between instances (P/D hand-offs), per level: within a node and
    between nodes. Defaults: the reference's cluster default (16 GB/s, 20 µs) on both levels."""

    KEY: ClassVar[str] = "cluster.links"

    intra_node_bw_gbps: float = checked(16.0, lo=0, lo_open=True, finite=False)
    intra_node_latency_ns: float = checked(20000.0, lo=0)
    inter_node_bw_gbps: float = checked(16.0, lo=0, lo_open=True, finite=False)
    inter_node_latency_ns: float = checked(20000.0, lo=0)
    # "layerwise": each prefill iteration streams its KV layer by layer while it computes (as the
    # reference does); "after_prefill": a request's whole KV is sent when its prefill is done.
    kv_transfer: str = checked("layerwise", choices=KV_TRANSFERS, noun="mode")

    def __post_init__(self):
        check_fields(self)


# Token ids that jaxsim makes up (synthetic workloads, Mooncake hash_ids) are drawn in [0, this):
# Llama-2 / Mistral / Mixtral's 32,000 is the smallest vocabulary of the common model families
# (Llama-3 128,256; Qwen3 151,936), so they are valid ids of every shipped model and pass the
# vocabulary check (jaxsim.planning.check_token_ids). Random prompts still never share a block by
# chance: two random 16-token blocks are equal with probability 32,000^-16.
GENERATED_TOKEN_IDS = 32_000


@dataclasses.dataclass
class Workload:
    """A request trace, numbered in file-line order. Arrays have length N."""

    arrival_ns: np.ndarray  # int64, on the simulator clock, in [0, ARRIVAL_HORIZON_NS)
    input_toks: np.ndarray  # int32
    output_toks: np.ndarray  # int32, >= 1
    # per request: int array of input ids + output ids (None = no ids: never hits); each id in
    # [0, vocab_size) of the model that serves it (checked before a run). A list, or a sequence
    # that makes them on access (jaxsim.traces.BlockTokenIds: Mooncake's hash_ids)
    token_ids: list
    source: str = "<memory>"  # file path or generator description, for messages
    line_numbers: np.ndarray | None = None  # int64 1-based file line per request; None if generated
    # Agentic sessions (REFERENCE.md §1.15): the sub-request released when request i finishes
    # (-1: none), and per request the tool time between its predecessor's finish and its release.
    # A released request's ``arrival_ns`` is its session's arrival (the simulated release time is
    # in the result). None: no sessions.
    next_in_session: np.ndarray | None = None
    tool_ns: np.ndarray | None = None
    # A public trace's import (jaxsim.traces.load_trace): rows in the window, kept, dropped or
    # clipped by the row policies, sampled out. None for other workloads.
    import_stats: dict | None = None

    @property
    def has_sessions(self) -> bool:
        return self.next_in_session is not None and bool(np.any(self.next_in_session >= 0))

    @property
    def released(self) -> np.ndarray:
        """True for the sub-requests that arrive when their predecessor finishes."""
        out = np.zeros(self.num_requests, bool)
        if self.next_in_session is not None:
            out[self.next_in_session[self.next_in_session >= 0]] = True
        return out

    @property
    def num_requests(self) -> int:
        return int(self.arrival_ns.shape[0])


@dataclasses.dataclass
class SimResult:
    """Host-side result of one single-instance simulation. Times in ns on the simulator clock.

    Per request (index = request id = trace line):
      arrival_ns, first_scheduled_ns, first_token_ns, finish_ns, input_toks, output_toks,
      prefix_hit_tokens, num_preemptions, recomputed_tokens, instance
      token_times_ns[token_offsets[i]:token_offsets[i+1]]: emission time of each output token of
      request i (the first one is the first token), so ITL = np.diff of that slice.
    Per engine iteration (index = iteration number, in time order):
      iter_start_ns, iter_end_ns, iter_prompt_tokens (prompt tokens counted at that iteration's
      end, cached and recomputed ones included, REFERENCE.md §1.1 counters), iter_gen_tokens,
      iter_num_tokens (T), iter_num_seqs (S), iter_running / iter_waiting (gauges after the
      iteration's end processing), iter_kv_blocks_used (pinned blocks), iter_prefix_queried /
      iter_prefix_hits / iter_kv_blocks_cached (see the fields).
    Scalars: num_blocks (KV capacity), block_size, counters in ``stats``.
    """

    arrival_ns: np.ndarray
    first_scheduled_ns: np.ndarray
    first_token_ns: np.ndarray
    finish_ns: np.ndarray
    input_toks: np.ndarray
    output_toks: np.ndarray
    prefix_hit_tokens: np.ndarray
    num_preemptions: np.ndarray
    recomputed_tokens: np.ndarray
    instance: np.ndarray
    token_times_ns: np.ndarray
    token_offsets: np.ndarray
    iter_start_ns: np.ndarray
    iter_end_ns: np.ndarray
    iter_prompt_tokens: np.ndarray
    iter_gen_tokens: np.ndarray
    iter_num_tokens: np.ndarray
    iter_num_seqs: np.ndarray
    iter_running: np.ndarray
    iter_waiting: np.ndarray
    iter_kv_blocks_used: np.ndarray
    num_blocks: int
    block_size: int
    stats: dict  # e.g. preemptions, prefix requested/hit tokens, extrapolated lookups, wall times
    # Cluster runs: the instance of each iteration row (rows of all instances, ordered by end
    # time then instance); None for a single instance.
    iter_instance: np.ndarray | None = None
    # P/D runs (None otherwise), per request: the prefill instance (-1: served colocated, or its
    # only output token came from the prefill instance), the end of the iteration that completed
    # its prefill, when its last KV layer reached the decode instance, and the KV bytes sent.
    prefill_instance: np.ndarray | None = None
    prefill_end_ns: np.ndarray | None = None
    kv_ready_ns: np.ndarray | None = None
    kv_transfer_bytes: np.ndarray | None = None
    # Per iteration row, of the row's instance at the iteration's end: the cumulative prefix-cache
    # queried and hit tokens (vLLM's prefix_cache_queries / hits counters, int64) and the blocks
    # free but still holding a cached prefix (int32; pinned + cached is what vLLM 0.13's
    # KV-usage gauge showed with prefix caching).
    iter_prefix_queried: np.ndarray | None = None
    iter_prefix_hits: np.ndarray | None = None
    iter_kv_blocks_cached: np.ndarray | None = None
    # The KV tier below the GPU (KVTierConfig; None without one), per iteration row: the
    # instance's cumulative tier hit tokens and chunks recalled, its pool's resident chunks and
    # cumulative chunks written (as of the iteration's end step).
    iter_tier_hits: np.ndarray | None = None
    iter_tier_recalled: np.ndarray | None = None
    iter_tier_resident: np.ndarray | None = None
    iter_tier_written: np.ndarray | None = None
    # Per instance, for the memory series (jaxsim.simulator.memory_layout): GPU bytes that do not
    # vary (weights + activation reserve, all ranks), bytes of one KV block (all ranks), the tier's
    # storage ("cpu" | "cxl" | None), each instance's pool and bytes of one chunk.
    memory: dict | None = None
    # Per iteration row: its NPU time (the latency model's; summed over pipeline stages) and its
    # attention time on PIM channels, ns.
    iter_busy_ns: np.ndarray | None = None
    iter_pim_ns: np.ndarray | None = None
    iter_pim_io_bytes: np.ndarray | None = None  # bytes each iteration's PIM operations moved (0 without PIM)
    # With a power model (jaxsim.power; None otherwise): per request, its share of the dynamic NPU
    # energy of the iterations that scheduled it (by its tokens), J; and what pricing the run's
    # energy needs (jaxsim.power.host_info plus the metered activity; jaxsim.power.energy).
    request_npu_energy_j: np.ndarray | None = None
    power: dict | None = None
