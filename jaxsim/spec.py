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


@dataclasses.dataclass(frozen=True)
class ModelRuntimeConfig:
    name: str = "meta-llama/Llama-3.1-8B"  # org/name under profiles/models and the profile bundle
    dtype: str = "auto"  # weight dtype; auto = the model's torch_dtype
    kv_cache_dtype: str = "auto"  # auto = the activation dtype
    max_model_len: int = 0  # vLLM max_model_len; 0 = the model's max_position_embeddings


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


@dataclasses.dataclass(frozen=True)
class InstanceSpec:
    """One instance of a cluster: its hardware, scheduler knobs and engine costs (same model)."""

    hw: HardwareConfig = HardwareConfig()
    sched: SchedulerConfig = SchedulerConfig()
    calib: Calibration = Calibration()


@dataclasses.dataclass
class Workload:
    """A request trace, numbered in file-line order. Arrays have length N."""

    arrival_ns: np.ndarray  # int64, on the simulator clock
    input_toks: np.ndarray  # int32
    output_toks: np.ndarray  # int32, >= 1
    token_ids: list  # per request: int array of input ids + output ids (None = no ids: never hits)
    source: str = "<memory>"  # file path or generator description, for messages
    line_numbers: np.ndarray | None = None  # int64 1-based file line per request; None if generated

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
