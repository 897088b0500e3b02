"""Plain, hashable descriptions of one simulation: what the Hydra config and the validation tool
build, and what the engine consumes. No JAX here: these are host-side inputs and outputs.

Units: times in integer ns, sizes in GiB where the name ends in ``_gb`` (REFERENCE.md §0 reads the
nominal "GB" of configs as GiB), bandwidths in GB/s where 1 GB/s = 1 byte/ns.
"""

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """vLLM V1 scheduler knobs (REFERENCE.md §1.2). 0 means unlimited where noted."""

    max_num_seqs: int = 128  # 0 = unlimited
    max_num_batched_tokens: int = 2048  # 0 = unlimited (clamped to the model context)
    enable_chunked_prefill: bool = True
    long_prefill_token_threshold: int = 0  # 0 = off
    reserve_full_isl: bool = True
    enable_prefix_caching: bool = True
    block_size: int = 16
    # vLLM V1 async scheduling (on by default in v0.19): the next batch is built before the
    # previous one's outputs are processed, so finished requests free their seat and KV blocks
    # one batch late. Off reproduces the reference simulator (LLMServingSim) exactly.
    async_scheduling: bool = True


@dataclasses.dataclass(frozen=True)
class HardwareConfig:
    """One serving instance's hardware (REFERENCE.md §3.1 ``npu_mem``, node ``cpu_mem``, links)."""

    name: str = "RTXPRO6000"  # a folder under profiles/
    mem_size_gb: float = 96.0  # per accelerator, read as GiB
    mem_bw_gbps: float = 1597.0
    mem_latency_ns: float = 0.0
    mem_util: float = 0.9  # vLLM gpu_memory_utilization
    num_gpu_blocks: int | None = None  # explicit KV block count; overrides the memory model
    activation_reserve_gb: float = 0.0  # activation peak + CUDA graphs + non-torch memory, GiB per rank
    tp: int = 1
    link_bw_gbps: float = 16.0  # TP collectives (within node)
    link_latency_ns: float = 20000.0
    cpu_mem_bw_gbps: float = 256.0  # host memory: token ids in / sampled ids out
    cpu_mem_latency_ns: float = 0.0
    ep: int = 0  # expert-parallel degree of a MoE model; 0 = tp (REFERENCE.md §1.8)
    pp: int = 1  # pipeline stages per instance (num_npus = tp * pp; REFERENCE.md §1.8)


@dataclasses.dataclass(frozen=True)
class ModelRuntimeConfig:
    name: str = "meta-llama/Llama-3.1-8B"  # org/name under profiles/models and the profile bundle
    dtype: str = "auto"  # weight dtype; auto = the model's torch_dtype
    kv_cache_dtype: str = "auto"  # auto = the activation dtype
    max_model_len: int = 0  # vLLM max_model_len; 0 = the model's max_position_embeddings
    expert_routing: str = "balanced"  # MoE expert popularity: "balanced" (§1.9 closed form) | "zipf"
    expert_zipf_s: float = 1.0  # Zipf exponent of expert popularity (routing "zipf"; 0 = uniform)
    expert_seed: int = 0  # permutation of the Zipf ranks over experts (-1 = hottest experts on rank 0)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Engine costs that the operator profiles do not contain (REFERENCE.md §2.9).

    These are properties of the serving engine (vLLM V1 on a CPU host), not of a case: they are
    fitted once on the development validation case and are the same for every case.
    """

    # Fitted on profiles/validation/RTXPRO6000-Llama-3.1-8B (grid search, README "Calibration").
    iteration_overhead_ns: int = 700_000  # CPU time per engine step not hidden behind the GPU
    first_token_delay_ns: int = 10_000_000  # engine core -> detokenizer -> frontend, first token
    token_output_delay_ns: int = 10_000_000  # the same path for every later token

    @classmethod
    def none(cls) -> "Calibration":
        """No engine costs beyond the profiles: the reference simulator's latency model."""
        return cls(0, 0, 0)


ROLES = ("colocated", "prefill", "decode")  # REFERENCE.md §1.7 pd_type: null | prefill | decode
KV_TRANSFERS = ("layerwise", "after_prefill")


@dataclasses.dataclass(frozen=True)
class InstanceSpec:
    """One instance of a cluster: its hardware, scheduler knobs and engine costs (same model),
    its role (``colocated`` serves requests whole; under P/D, ``prefill`` instances compute the
    prompt and the first token and hand the request to a ``decode`` instance), and its node."""

    hw: HardwareConfig = HardwareConfig()
    sched: SchedulerConfig = SchedulerConfig()
    calib: Calibration = Calibration()
    role: str = "colocated"
    node: int = 0
    # Instances with the same dp_group form a DP group (REFERENCE.md §1.8): wave-synchronised
    # rounds padded to the group's largest batch (for MoE models by default). None: no group.
    dp_group: str | None = None
    # The model this instance serves (a jaxsim.model.ModelConfig); None: the cluster's model.
    # Every request may go to any instance; P/D pairs and DP groups share one model.
    model: object = None

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"instance role {self.role!r}: expected one of {ROLES}")
        if self.node < 0:
            raise ValueError(f"instance node must be >= 0, got {self.node}")


@dataclasses.dataclass(frozen=True)
class LinkConfig:
    """The links that carry KV between instances (P/D hand-offs), per level: within a node and
    between nodes. Defaults: the reference's cluster default (16 GB/s, 20 µs) on both levels."""

    intra_node_bw_gbps: float = 16.0
    intra_node_latency_ns: float = 20000.0
    inter_node_bw_gbps: float = 16.0
    inter_node_latency_ns: float = 20000.0
    # "layerwise": each prefill iteration streams its KV layer by layer while it computes (as the
    # reference does); "after_prefill": a request's whole KV is sent when its prefill is done.
    kv_transfer: str = "layerwise"

    def __post_init__(self):
        if self.kv_transfer not in KV_TRANSFERS:
            raise ValueError(f"kv_transfer {self.kv_transfer!r}: expected one of {KV_TRANSFERS}")
        for f in ("intra_node_bw_gbps", "inter_node_bw_gbps"):
            if not getattr(self, f) > 0:
                raise ValueError(f"links.{f} must be > 0, got {getattr(self, f)}")


@dataclasses.dataclass
class Workload:
    """A request trace, numbered in file-line order. Arrays have length N."""

    arrival_ns: np.ndarray  # int64, on the simulator clock
    input_toks: np.ndarray  # int32
    output_toks: np.ndarray  # int32, >= 1
    token_ids: list  # per request: int array of input ids + output ids (None = no ids: never hits)
    source: str = "<memory>"  # file path or generator description, for messages
    line_numbers: np.ndarray | None = None  # int64 1-based file line per request; None if generated
    # Agentic sessions (REFERENCE.md §1.15): the sub-request released when request i finishes
    # (-1: none), and per request the tool time between its predecessor's finish and its release.
    # A released request's ``arrival_ns`` is its session's arrival (the simulated release time is
    # in the result). None: no sessions.
    next_in_session: np.ndarray | None = None
    tool_ns: np.ndarray | None = None

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
      iteration's end processing), iter_kv_blocks_used (pinned blocks).
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
