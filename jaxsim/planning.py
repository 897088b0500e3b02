"""Planning: one configuration checked and computed on the host, before any device array.

:func:`plan` validates a configuration (scheduler knobs, the trace against the model, the
parallel layout), sizes the KV cache (REFERENCE.md §1.3), loads the profile tables and hashes
the trace's blocks for the prefix cache, and returns a :class:`Plan` with the static sizes of its
compiled run (:class:`Dims`). :func:`place_instances` puts plans into a cluster (roles, nodes,
DP groups, links). Nothing here touches the engine's state: :mod:`jaxsim.building` turns plans
into device arrays, :mod:`jaxsim.simulator` runs them and :mod:`jaxsim.results` reads the result.
"""

import dataclasses
import functools
import math
import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxsim import latency, pim as pim_lib, placement as placement_lib, profiles
from jaxsim.engine import routing
from jaxsim.engine.chunk_tier import ChunkTier
from jaxsim.engine.kvtier import AbstractKVTier, NoLowerTier
from jaxsim.engine.static import Static
from jaxsim.errors import JaxsimInputError
from jaxsim.model import ModelConfig, dtype_bytes
from jaxsim.prefix import hash_ids
from jaxsim.spec import (ARRIVAL_HORIZON_NS, KVTierConfig, MAX_DURATION_NS, Calibration, HardwareConfig, InstanceSpec, LinkConfig, ModelRuntimeConfig,
                         SchedulerConfig, Workload)
from jaxsim.workload import describe_request

GIB = 2**30
POP_WINDOW = 64  # free-list entries (and registrations) handled per loop trip; any value is correct
SLOT_HEADROOM = 32  # waiting-request slots beyond max_num_seqs when sim.max_slots is auto
CLUSTER_LEAP = 9  # Static.leap of a large cluster: 1 + the most batch ends an instance runs early per step
# Decode leaps cost ~6 s more compile (a second latency lookup and block allocation in the loop)
# and save per run: 0.07 s at 4 instances, ~0.9 s at 16, ~3 s at 64 (the default trace, README
# "Speed"), so they are compiled from this many instances on.
LEAP_MIN_INSTANCES = 16


def weight_and_kv_bytes(model: ModelConfig, rt: ModelRuntimeConfig) -> tuple[int, int]:
    """Bytes per weight and per KV element (REFERENCE.md §1.14: KV follows the activation dtype)."""
    w = dtype_bytes(model.torch_dtype if rt.dtype == "auto" else rt.dtype, "model.dtype")
    act = dtype_bytes(model.torch_dtype, "model.torch_dtype")
    kv = act if rt.kv_cache_dtype == "auto" else dtype_bytes(rt.kv_cache_dtype, "model.kv_cache_dtype")
    return w, kv


def num_kv_blocks(model: ModelConfig, hw: HardwareConfig, sched: SchedulerConfig,
                  rt: ModelRuntimeConfig, placement: "placement_lib.WeightPlacement | None" = None,
                  profiles_dir="profiles") -> int:
    """KV blocks per instance: an explicit count, or the memory model of REFERENCE.md §1.3
    (``util * device bytes - weights - activation reserve``, per rank, over bytes per block).

    Weights placed off the NPU (``placement``, or ``hw.weights_offload_fraction``; REFERENCE.md
    §1.10, §1.16) leave the weight ledger: :func:`jaxsim.placement.offloaded_bytes`. The KV bytes
    per token follow ``rt.kv_cache_dtype`` (fp8: 1 byte, §1.14).

    A KV cache placed off the NPU (``kv_loc`` cpu / cxl:<id>, or ``hw.kv_offload_device``;
    §1.16 row ``kv_loc``) takes its blocks from that device's capacity instead:
    :func:`jaxsim.placement.kv_device_blocks` (the instance's share of the device, less its own
    weights there, over the bytes of a block on all ranks). The GPU's leftover memory, the KV share
    of §1.3, is then unused (the weights must still fit the GPU). A null memory size comes from the
    hardware's source (:func:`resolve_hardware`, with ``profiles_dir``)."""
    hw = resolve_hardware(hw, str(profiles_dir))
    if hw.num_gpu_blocks is not None:
        if hw.num_gpu_blocks <= 0:
            raise JaxsimInputError("hardware.num_gpu_blocks", f"must be > 0, got {hw.num_gpu_blocks}")
        return int(hw.num_gpu_blocks)
    w, kv = weight_and_kv_bytes(model, rt)
    # Experts are split over the ranks either way: by expert (EP, ep ranks) or TP-sharded (tp ranks).
    ep = (hw.ep or hw.tp) if model.is_moe else 1
    weights = model.weight_bytes_per_rank(w, tp=hw.tp, pp=hw.pp, ep=ep)
    wp = placement_lib.resolve(placement, hw, model.num_layers)
    if wp.off_npu:
        weights -= sum(placement_lib.offloaded_bytes(wp, model, w, tp=hw.tp, ep=ep).values())
    usable = math.floor(hw.mem_size_gb * GIB * hw.mem_util) - weights - int(hw.activation_reserve_gb * GIB)
    if wp.kv_off_npu:
        if usable < 0:
            raise JaxsimInputError(
                "hardware.mem_size_gb", f"{hw.mem_size_gb} GiB x util {hw.mem_util} does not hold "
                f"{weights / GIB:.2f} GiB of weights per rank", "use more memory, a higher TP, or offload weights")
        return placement_lib.kv_device_blocks(wp, model, sched.block_size, kv, w, tp=hw.tp, pp=hw.pp, ep=ep)
    per_block = sched.block_size * model.kv_bytes_per_token_per_rank(kv, tp=hw.tp, pp=hw.pp)
    blocks = usable // per_block
    if blocks <= 0:
        raise JaxsimInputError(
            "hardware.mem_size_gb", f"{hw.mem_size_gb} GiB x util {hw.mem_util} leaves no room for KV "
            f"after {weights / GIB:.2f} GiB of weights per rank", "use more memory, a higher TP, or num_gpu_blocks")
    return int(blocks)


def bucket(n: int) -> int:
    """``n`` rounded up to a size class: a power of two up to 4,096, then a multiple of an
    eighth of the power of two below (at most 25% more). Shapes are static, so every distinct
    size is a compile; size classes let similar runs share one."""
    n = max(int(n), 16)
    if n <= 4096:
        return 1 << (n - 1).bit_length()
    step = 1 << (n.bit_length() - 3)
    return -(-n // step) * step


@dataclasses.dataclass(frozen=True)
class Dims:
    """The static sizes of one compiled run. Configurations batched together share one ``Dims``
    (the elementwise max of theirs, :meth:`merge`); larger sizes never change a result."""

    num_slots: int  # request slots (running + head of the waiting queue)
    max_blocks: int  # block-table width: blocks of the longest request, + 1
    num_hashes: int  # prefix-index entries (distinct full-block hashes of the trace)
    num_blocks_cap: int  # KV-pool capacity in blocks (each configuration uses num_blocks of it)
    max_iters: int  # rows of the per-iteration record buffer
    num_tokens: int  # token-time buffer (0 = token times not recorded)
    num_requests: int
    max_pp: int = 1  # largest pipeline degree of an instance (static: pp = 1 compiles no pipeline)
    num_chunks: int = 1  # KV-tier chunk keys of the trace (the tier's state width; 1 without a tier)
    max_chunks: int = 1  # chunk keys of the longest request (WorkloadArrays.chunks width)

    @staticmethod
    def merge(dims: "list[Dims]") -> "Dims":
        return Dims(**{f.name: max(getattr(d, f.name) for d in dims) for f in dataclasses.fields(Dims)})

    @property
    def ring_cap(self) -> int:
        return 2 * self.num_blocks_cap + POP_WINDOW

    def max_steps(self, num_instances: int) -> int:
        """The step limit (a guard against a run that never ends, ``ClusterState.max_steps``):
        it covers every instance's iterations (``max_iters`` each) and a stop at every arrival and
        release."""
        steps = (3 + self.max_pp) * num_instances * self.max_iters + 4 * self.num_requests + 16
        return min(steps, np.iinfo(np.int32).max)

    def bucketed(self, exact_iters: bool = False) -> "Dims":
        """These sizes rounded up to a few per octave (:func:`bucket`), so that runs of similar
        traces and caches share one compiled loop (larger sizes never change a result). The
        request and slot counts stay exact (they are the trace's and the user's); so does
        ``max_iters`` when ``exact_iters`` (set by the user: the buffer full status must come at
        that row)."""
        return dataclasses.replace(self, max_blocks=bucket(self.max_blocks), num_hashes=bucket(self.num_hashes),
                                   num_chunks=bucket(self.num_chunks),
                                   num_blocks_cap=bucket(self.num_blocks_cap),
                                   max_iters=self.max_iters if exact_iters else bucket(self.max_iters))

    def static(self, block_size: int, record_iterations: bool = True, num_instances: int = 1,
               releases: bool = False, router: routing.Router = routing.Router(), dp_sync: bool = False,
               kv_tier: KVTierConfig = KVTierConfig()) -> Static:
        """The static part of :func:`cluster.run` / :func:`cluster.run_batch`. Clusters of ``LEAP_MIN_INSTANCES`` or more
        run decode leaps (:mod:`jaxsim.engine.leap`, up to ``CLUSTER_LEAP - 1`` early batch ends
        per step): there a step is costly and leaps save a third to two thirds of them; below
        that the leap loop's compile time exceeds what it saves."""
        return Static(block_size=block_size, window=POP_WINDOW, ring_cap=self.ring_cap, num_instances=num_instances,
                      record_iterations=record_iterations, router=router, releases=releases, dp_sync=dp_sync,
                      max_pp=self.max_pp, kv_tier=lower_tier(kv_tier, block_size),
                      leap=CLUSTER_LEAP if num_instances >= LEAP_MIN_INSTANCES else 1)


@dataclasses.dataclass
class Plan:
    """One configuration on the host, before any device array: what ``prepare`` builds from."""

    workload: Workload
    workload_arrays: dict  # numpy fields of cluster.WorkloadArrays
    tables: latency.LatencyTables
    sched: dict  # numpy fields of inst_lib.SchedulerParams (num_blocks included)
    calibration: Calibration
    num_blocks: int
    block_size: int
    dims: Dims
    max_iters_bound: int  # the iteration buffer never needs more rows than this
    kv_token_bytes: int  # K+V bytes of one token (all layers and ranks): what a P/D hand-off sends
    # The parallel layout the engine loop needs (EngineParams.pp / tp / num_layers).
    pp: int = 1
    tp: int = 1
    num_layers: int = 1
    # Its place in a cluster (set by prepare_cluster / the sweep; a lone instance keeps these).
    role: str = "colocated"
    node: int = 0
    links: LinkConfig = LinkConfig()
    dp_group: int = -1  # wave-synchronised DP group: the index of its first instance; -1 none
    # vLLM's max_model_len (ModelRuntimeConfig.max_model_len, 0 -> max_position_embeddings) and the
    # K+V bytes of one token on one rank: what check_kv_holds_context compares with the cache.
    max_model_len: int = 0
    kv_rank_token_bytes: int = 0
    kv_from_memory: bool = True  # num_blocks from the memory model (False: hardware.num_gpu_blocks)
    null_block: int = 0  # 1 when vLLM's null block is reserved: num_blocks is then vLLM's count - 1
    profile_outliers: tuple = ()  # the profile bundle's outliers (profiles.ProfileBundle.outliers)
    # What priced this instance's iterations: profiles.bundle_source of its hardware ("profiles",
    # "legacy", "operator-db", "roofline") and the hardware name; the run summary's latency_model.
    latency_source: tuple = ("profiles", "")
    # What the result rests on besides the measured profiles (e.g. FP8 KV priced from bf16 tables,
    # REFERENCE.md §1.14): one sentence each; the run summary's ``approximations``.
    approximations: tuple = ()
    # Per-rank weight bytes off the NPU per device (jaxsim.placement.offloaded_bytes; {}: none).
    offloaded: dict = dataclasses.field(default_factory=dict)
    kv_tier: KVTierConfig = KVTierConfig()  # the KV tier below the GPU (its pools: tier_layout)
    # GPU memory that does not vary during the run, all ranks: the weights held on the GPUs and
    # the activation reserve (bytes; the run's memory series add the KV in use to it)
    gpu_static_bytes: int = 0
    kv_on_gpu: bool = True  # False: the KV cache sits in host or CXL memory (kv_loc, jaxsim.placement)
    # ns each shared memory device (cpu: the node's host memory; cxl:<id>) is busy with one
    # iteration's weight loads (placement.load_gates; {}: none): the loads of instances sharing a
    # device queue behind each other (engine/cluster.py, weight_load_waits)
    wload_busy: dict = dataclasses.field(default_factory=dict)
    # PIM attention offload (jaxsim.pim.PimPlan: the device, its channels, the latency
    # coefficients, the I/O per decode); None without it
    pim: "pim_lib.PimPlan | None" = None
    # Its power (jaxsim.power.attach: the node's block, the NPU's states, its traffic per token);
    # None: the run meters no power.
    power: object = None


def check_scheduler(sched: SchedulerConfig) -> None:
    if sched.block_size <= 0:
        raise JaxsimInputError("scheduler.block_size", f"must be > 0, got {sched.block_size}")
    for field in ("max_num_seqs", "max_num_batched_tokens", "long_prefill_token_threshold"):
        if getattr(sched, field) < 0:
            raise JaxsimInputError(f"scheduler.{field}", f"must be >= 0 (0 = unlimited/off), got {getattr(sched, field)}")


def check_workload_fits(workload: Workload, model: ModelConfig) -> None:
    target = workload.input_toks.astype(np.int64) + workload.output_toks
    ctx = model.max_position_embeddings
    too_long = np.nonzero(target > ctx)[0]
    if len(too_long):
        i = int(too_long[0])
        line = int(workload.line_numbers[i]) if workload.line_numbers is not None else i + 1
        raise JaxsimInputError(
            f"{workload.source}:{line}",
            f"request {i} (line {line}): input {int(workload.input_toks[i])} + output {int(workload.output_toks[i])} tokens exceed the "
            f"context of {model.name} ({ctx})", "drop or truncate the request")


def _line(workload: Workload, i: int) -> int:
    return int(workload.line_numbers[i]) if workload.line_numbers is not None else i + 1


def check_workload(workload: Workload) -> None:
    """The structure of a :class:`Workload`, however it was made (the loaders check their files
    line by line; this covers Python-built, rate-scaled and shifted traces before the engine sees
    them): 1-D arrays of one length N >= 1; integer arrival times (NaN or fractions refused) within
    ``[0, ARRIVAL_HORIZON_NS)`` (2^62 ns, about 146 years; :data:`jaxsim.spec.ARRIVAL_HORIZON_NS`);
    input and output counts >= 1 and < 2^31; ``token_ids`` of length N; sessions: a request is
    released only by an *earlier* one (``next_in_session[i] > i``, so chains cannot loop), at most
    once, after a tool time in ``[0, MAX_DURATION_NS]``, and a session's arrival plus its tool
    times stays below the horizon (int64 sums cannot overflow).

    Raises:
        JaxsimInputError: naming the field, or the request (its trace line when it has one).
    """
    w = workload
    n = np.shape(w.arrival_ns)[0] if np.ndim(w.arrival_ns) == 1 else -1
    for name in ("arrival_ns", "input_toks", "output_toks"):
        x = np.asarray(getattr(w, name))
        if x.ndim != 1 or x.shape[0] != n or n < 1:
            raise JaxsimInputError(f"Workload.{name}", f"must be a 1-D array of one length N >= 1 for every field, "
                                   f"got shape {x.shape} (arrival_ns: {np.shape(w.arrival_ns)})")
        if not (np.issubdtype(x.dtype, np.integer) or (np.issubdtype(x.dtype, np.floating) and np.all(np.isfinite(x))
                                                        and np.all(x == np.round(x)))):
            bad = int(np.nonzero(~np.isfinite(x) | (x != np.round(x)))[0][0]) if np.issubdtype(x.dtype, np.floating) else 0
            raise JaxsimInputError(f"Workload.{name}", f"must hold whole numbers, got {x[bad].item()!r} (request {bad})")
    for name, lo in (("input_toks", 1), ("output_toks", 1)):
        x = np.asarray(getattr(w, name), np.int64)
        bad = np.nonzero((x < lo) | (x > 2**31 - 1))[0]
        if len(bad):
            i = int(bad[0])
            raise JaxsimInputError(describe_request(w, i), f"request {i}: {name} {int(x[i])} is outside [{lo}, 2^31-1]")
    if len(w.token_ids) != n:
        raise JaxsimInputError("Workload.token_ids", f"has {len(w.token_ids)} entries for {n} requests",
                               "one array (or None) per request")
    a = np.asarray(w.arrival_ns, np.int64)
    bad = np.nonzero((a < 0) | (a >= ARRIVAL_HORIZON_NS))[0]
    if len(bad):
        i = int(bad[0])
        raise JaxsimInputError(describe_request(w, i), f"request {i} arrives at {int(a[i])} ns, outside "
                               f"[0, 2^62) ns (about 146 years): the engine adds durations to arrival times in "
                               f"int64 ns", "arrival times are ns from 0 on the simulator clock")
    if w.next_in_session is None:
        return
    nxt, tool = np.asarray(w.next_in_session, np.int64), np.asarray(w.tool_ns, np.int64)
    if nxt.shape != (n,) or tool.shape != (n,):
        raise JaxsimInputError("Workload.next_in_session", f"next_in_session and tool_ns must have shape ({n},), got "
                               f"{nxt.shape} and {tool.shape}")
    idx = np.arange(n)
    bad = np.nonzero((nxt >= 0) & ((nxt <= idx) | (nxt >= n)) | (nxt < -1))[0]
    if len(bad):
        i = int(bad[0])
        raise JaxsimInputError(describe_request(w, i), f"request {i} releases request {int(nxt[i])}: a session's next "
                               f"request must come later in the trace (index in ({i}, {n}))",
                               "number sub-requests in session order (-1: none)")
    released = nxt[nxt >= 0]
    if len(np.unique(released)) != len(released):
        raise JaxsimInputError("Workload.next_in_session", "a request is released by two others",
                               "each sub-request has one predecessor")
    bad = np.nonzero((tool < 0) | (tool > MAX_DURATION_NS))[0]
    if len(bad):
        i = int(bad[0])
        raise JaxsimInputError(describe_request(w, i), f"request {i}: tool_duration_ns {int(tool[i])} is outside "
                               f"[0, 2^40] ns (about 18 minutes)", "tool times are ns")
    # a session's last release: its arrival plus its tool times (chains run forward: one pass)
    latest = a.copy()
    for i in np.nonzero(nxt >= 0)[0]:
        latest[nxt[i]] = latest[i] + tool[nxt[i]]
    bad = np.nonzero(latest >= ARRIVAL_HORIZON_NS)[0]
    if len(bad):
        i = int(bad[0])
        raise JaxsimInputError(describe_request(w, i), f"request {i} is released at least {int(latest[i])} ns after 0, "
                               f"past the 2^62 ns horizon (its session's arrival plus tool times)",
                               "shorten the tool times or the arrival")


def check_token_ids(workload: Workload, model: ModelConfig, key: str = "") -> None:
    """Refuse token ids outside the model's vocabulary ``[0, vocab_size)``, before the run.

    Ids only drive prefix-cache hashing, so an id out of range would simulate without a sign; but
    it means the trace was tokenised for another model (Qwen3's 151,936 ids fed to Llama-3's
    128,256, say), whose prompt lengths are not this model's either. The check covers every id of
    a request (input and output): those from a trace file, and those jaxsim makes up (synthetic
    workloads and Mooncake hash_ids draw them below :data:`jaxsim.spec.GENERATED_TOKEN_IDS`,
    valid for every shipped model). ``key``: where the model comes from, for the message (a
    sweep point, a cluster instance).

    Raises:
        JaxsimInputError: naming the request's trace line, the id and the model's vocab_size.
    """
    vocab = int(model.vocab_size)
    if getattr(workload.token_ids, "max_id", vocab) < vocab:
        return  # ids made up below a known bound (traces.BlockTokenIds): no need to make them all
    for i, ids in enumerate(workload.token_ids):
        if ids is None or not len(ids):
            continue
        ids = np.asarray(ids)
        if int(ids.min()) >= 0 and int(ids.max()) < vocab:
            continue
        pos = int(np.nonzero((ids < 0) | (ids >= vocab))[0][0])
        n_in = int(workload.input_toks[i])
        part = f"input_tok_ids[{pos}]" if pos < n_in else f"output_tok_ids[{pos - n_in}]"
        suffix = f" [{key}]" if key else ""
        raise JaxsimInputError(
            describe_request(workload, i), f"request {i}: token id {int(ids[pos])} ({part}) is outside the "
            f"vocabulary of {model.name} (vocab_size {vocab}: ids 0 to {vocab - 1}){suffix}",
            "tokenize the trace with this model's tokenizer, or drop its token ids (then no request hits the "
            "prefix cache)")


def check_kv_holds_context(plans: "list[Plan]", where: "list[str]") -> None:
    """Refuse an instance whose KV cache cannot hold one request of ``max_model_len`` tokens, with
    vLLM's reason: vLLM refuses it at start-up (``check_enough_kv_cache_memory``), so a run of it
    would predict a deployment that cannot exist.

    The capacity is the plan's: ``num_blocks`` blocks of ``block_size`` tokens per instance (under
    TP/PP each rank holds its shard of every block: the GiB figures are per rank, as vLLM's are
    per worker), from the memory model. vLLM compares the free memory it profiled, before a
    ``num_gpu_blocks_override`` applies, so an explicit ``hardware.num_gpu_blocks`` (vLLM's
    override, or the count a measured run recorded) is not checked here, as vLLM does not; a
    request that such a cache can never hold is refused by :func:`check_requests_fit`.
    ``where``: per plan, the setting that names it (``model.max_model_len`` for a lone instance,
    ``cluster.instances[i]``, a sweep point).

    Raises:
        JaxsimInputError: vLLM's message (the KV GiB needed and available) and the largest
        ``max_model_len`` the cache holds.
    """
    for p, name in zip(plans, where):
        need = -(-p.max_model_len // p.block_size)  # blocks of one max_model_len request
        num_gpu_blocks = p.num_blocks + p.null_block  # vLLM checks its whole KV memory
        if num_gpu_blocks >= need or not p.kv_from_memory:
            continue
        block_gib = p.block_size * p.kv_rank_token_bytes / GIB
        cap = num_gpu_blocks * p.block_size
        raise JaxsimInputError(
            name, f"vLLM refuses this at start-up: to serve at least one request with the model's max seq len "
            f"({p.max_model_len}), {need * block_gib:.2f} GiB KV cache is needed, which is larger than the available "
            f"KV cache memory ({num_gpu_blocks * block_gib:.2f} GiB: {num_gpu_blocks} blocks of {p.block_size} tokens); "
            f"based on the available memory, the estimated maximum model length is {cap}",
            f"try increasing `gpu_memory_utilization` (hardware.mem_util), or decreasing `max_model_len` "
            f"(model.max_model_len, at most {cap})")


def check_requests_fit(plans: "list[Plan]", key: str = "") -> None:
    """Refuse a run in which a request can never be scheduled, before it starts.

    A request must at some point hold the KV of its prompt and all but its last output token
    (``input + output - 1`` tokens) on the instance that decodes it, and its prompt on the one
    that prefills it; with chunked prefill off its prompt must also fit the instance's token budget
    (``max_num_batched_tokens``; vLLM refuses longer prompts). A run where no instance that may
    serve a request can do so would only stall (or preempt itself forever); this names the
    request (trace line), what it needs and the largest capacity on offer. Where some instance
    could serve it, the router decides, and the loop's stall check reports a request that lands on
    one that cannot (``results.stall_error``). ``plans``: the instances of one run (their roles set
    by :func:`place_instances`); ``key``: where they come from, for the message.

    Raises:
        JaxsimInputError: naming the request's trace line, its tokens and the capacity.
    """
    w = plans[0].workload
    if w.num_requests == 0:
        return
    prompt = w.input_toks.astype(np.int64)
    held = np.maximum(prompt + w.output_toks.astype(np.int64) - 1, prompt)  # tokens held at the last decode
    bs = plans[0].block_size
    blocks = np.array([p.num_blocks for p in plans], np.int64)
    budget = np.array([int(p.sched["max_num_batched_tokens"]) for p in plans], np.int64)
    chunked = np.array([bool(p.sched["chunked_prefill"]) for p in plans])
    roles = np.array([p.role for p in plans])
    cap = blocks * bs  # tokens each instance's cache holds
    budget_ok = chunked[None, :] | (prompt[:, None] <= budget[None, :])  # [req, inst]
    holds_prompt = (prompt[:, None] <= cap[None, :]) & budget_ok  # can prefill it
    holds_all = held[:, None] <= cap[None, :]  # can hold it at its last decode
    colocated, prefill, decode = roles == "colocated", roles == "prefill", roles == "decode"
    # A colocated instance prefills and decodes; under P/D a prefill instance holds the prompt and a
    # decode instance the rest (a request whose first token is its last never moves). The router
    # may send a request to any of these, so it is refused only when no path can serve it.
    colo_ok = (holds_prompt & holds_all & colocated[None, :]).any(axis=1)
    pd_ok = (holds_prompt & prefill[None, :]).any(axis=1) & (
        (w.output_toks <= 1) | (holds_all & decode[None, :]).any(axis=1)) if decode.any() else False
    bad = np.nonzero(~(colo_ok | pd_ok))[0]
    if not len(bad):
        return
    i = int(bad[0])
    line = _line(w, i)
    where = f"{w.source}:{line}"
    suffix = f" [{key}]" if key else ""
    first = colocated | prefill  # the instances that may prefill it
    if not budget_ok[i][first].any():
        raise JaxsimInputError(
            where, f"request {i} (line {line}) can never be scheduled: its prompt of {int(prompt[i])} tokens exceeds "
            f"max_num_batched_tokens ({int(budget[first].max())}{' at most' if first.sum() > 1 else ''}) with chunked "
            f"prefill off (vLLM rejects such prompts){suffix}",
            "enable chunked prefill, raise max_num_batched_tokens, or shorten the request")
    needs_all = not colocated.any() and not (holds_prompt[i] & prefill).any()
    tokens, kind = (int(prompt[i]), "prompt") if needs_all else (int(held[i]), "KV at its last decode")
    offer_on = (prefill if needs_all else (colocated | decode)) if len(plans) > 1 else np.ones(len(plans), bool)
    offer = int(blocks[offer_on].max())
    many = len(plans) > 1
    null = any(p.null_block for p in plans)
    raise JaxsimInputError(
        where, f"request {i} (line {line}) can never be scheduled: its {kind} needs {-(-tokens // bs)} blocks of {bs} "
        f"tokens (input {int(prompt[i])} + output {int(w.output_toks[i])} tokens) and "
        f"{'the largest instance that may hold it has' if many else 'the KV cache holds'} {offer} blocks"
        f"{' (after vLLM reserves its null block)' if null else ''}{suffix}",
        "raise the KV capacity (hardware.mem_size_gb, hardware.num_gpu_blocks) or shorten the request")


def block_table_width(workload: Workload, block_size: int) -> int:
    """Blocks of the longest request (prompt + output), + 1: the block table's width."""
    target = workload.input_toks.astype(np.int64) + workload.output_toks
    return int(-(-target.max() // block_size)) + 1


def workload_hashes(workload: Workload, block_size: int, prefix_caching: bool, max_blocks: int) -> dict:
    """The prefix-cache keys of the trace: dense hash ids of each request's full blocks, padded to
    the block table (``hashes``, ``n_hashes``), and the id count. They depend only on the token
    ids, so traces that differ in arrival times only (a sweep's rate scaling) share them."""
    n = workload.num_requests
    hashes = np.full((n, max_blocks), -1, np.int32)
    n_hashes = np.zeros(n, np.int32)
    num_hashes = 1
    if prefix_caching:
        ids, num_hashes = hash_ids(workload.token_ids, block_size)
        for i, h in enumerate(ids):
            h = h[:max_blocks]
            hashes[i, : len(h)] = h
            n_hashes[i] = len(h)
    return dict(hashes=hashes, n_hashes=n_hashes, num_hashes=num_hashes)


def chunk_ids(hashes: np.ndarray, n_hashes: np.ndarray, chunk_blocks: int) -> tuple[np.ndarray, int]:
    """The KV tier's chunk keys (REFERENCE.md §1.5): chunk j of request r (its blocks
    ``f·j .. f·j + f - 1``, ``f = chunk_blocks``) is keyed by the prefix hash of its last block,
    which identifies the whole prefix. Returns ``([req, mc] dense chunk ids, -1 where the request
    has no full chunk j; the number of distinct keys)``."""
    f = chunk_blocks
    n, mb = hashes.shape
    mc = max(mb // f, 1)
    cols = np.minimum(np.arange(mc) * f + f - 1, mb - 1)
    full = (np.arange(mc) * f + f - 1)[None, :] < n_hashes[:, None]
    keys = hashes[:, cols]
    uniq, inv = np.unique(keys[full], return_inverse=True)
    chunks = np.full((n, mc), -1, np.int32)
    chunks[full] = inv.astype(np.int32)
    return chunks, max(len(uniq), 1)


def workload_arrays(workload: Workload, block_size: int, prefix_caching: bool, max_blocks: int,
                    hashes: dict | None = None, chunk_blocks: int = 0) -> dict:
    """The trace as the engine's numpy arrays (``cluster.WorkloadArrays`` fields) + hash count
    (``hashes``: :func:`workload_hashes` of the same token ids, when already computed) + the KV
    tier's chunk keys and their count (``chunk_blocks`` > 0: blocks per chunk; 0: no tier)."""
    if hashes is None:
        hashes = workload_hashes(workload, block_size, prefix_caching, max_blocks)
    if chunk_blocks and prefix_caching:
        chunks, num_chunks = chunk_ids(hashes["hashes"], hashes["n_hashes"], chunk_blocks)
    else:
        chunks, num_chunks = np.full((workload.num_requests, 1), -1, np.int32), 1
    n = workload.num_requests
    # Agentic sub-requests after the first arrive when their predecessor finishes: they sort last,
    # at a time that never comes (the engine releases them).
    arrival = np.where(workload.released, np.iinfo(np.int64).max, np.asarray(workload.arrival_ns, np.int64))
    order = np.lexsort((np.arange(n), arrival)).astype(np.int32)
    out = workload.output_toks.astype(np.int64)
    token_offset = np.concatenate([[0], np.cumsum(out)[:-1]]).astype(np.int32)
    nxt = workload.next_in_session if workload.next_in_session is not None else np.full(n, -1)
    tool = workload.tool_ns if workload.tool_ns is not None else np.zeros(n)
    return dict(arrival_sorted=arrival[order], order=order,
                prompt=np.asarray(workload.input_toks, np.int32), output=np.asarray(workload.output_toks, np.int32),
                token_offset=token_offset, next_in_session=np.asarray(nxt, np.int32),
                tool_ns=np.asarray(tool, np.int64), chunks=chunks, num_chunks=num_chunks, **hashes)


_W_VARIANT = {1: "fp8", 2: "bf16", 4: "fp32"}  # weight bytes -> variant folder (REFERENCE.md §1.14)
_KV_VARIANT = "fp8"  # the one KV dtype with a variant suffix: <weight>-kvfp8


def profile_variant(profiles_dir: str, hardware: str, model: ModelConfig, rt: ModelRuntimeConfig,
                    where: str = "model") -> tuple:
    """``(variant folder, kv_read_scale)`` of a configuration (REFERENCE.md §1.14): ``<weight>``
    (``bf16``, ``fp8``, ``fp32`` by the weight bytes) or, for a 1-byte KV cache, ``<weight>-kvfp8``
    when the bundle has it (scale 1.0). Without it the ``<weight>`` tables are used with the
    attention's KV-read term scaled by KV bytes / activation bytes (0.5 for FP8 over bf16): an
    estimate, which :func:`plan` lists in ``Plan.approximations``.

    Raises:
      JaxsimInputError: at ``<where>.dtype`` when no ``<weight>`` variant was profiled (e.g. fp8
        weights with bf16 profiles only: GEMM times of another weight dtype have no fallback model).
    """
    w, kv = weight_and_kv_bytes(model, rt)
    act = dtype_bytes(model.torch_dtype, "model.torch_dtype")
    base = _W_VARIANT.get(w, "bf16")
    model_dir = Path(profiles_dir) / hardware / model.name
    variants = profiles.generated_variants(hardware)
    if variants is not None:  # converted tables or a spec sheet: its VARIANTS, no folders
        if base not in variants:
            raise JaxsimInputError(f"{where}.dtype", f"{rt.dtype}: weights of {w} byte(s) need a {base!r} variant, "
                                   f"which {hardware} does not build (built: {sorted(variants)})",
                                   f"use dtype auto ({model.torch_dtype})")
        if kv == act:
            return base, 1.0
        if kv == 1 and f"{base}-kv{_KV_VARIANT}" in variants:
            return f"{base}-kv{_KV_VARIANT}", 1.0
        return base, kv / act
    if not hardware.startswith("legacy/") and model_dir.is_dir() and not (model_dir / base).is_dir():
        known = sorted(p.name for p in model_dir.iterdir() if p.is_dir())
        raise JaxsimInputError(f"{where}.dtype", f"{rt.dtype}: weights of {w} byte(s) need a {base!r} profile variant "
                               f"of {model.name} on {hardware}, which has {known}; GEMM times of another weight dtype "
                               "are not modelled from these", f"profile the {base} variant, or use dtype auto "
                               f"({model.torch_dtype})")
    if kv == act:
        return base, 1.0
    if kv == 1 and (model_dir / f"{base}-kv{_KV_VARIANT}").is_dir():
        return f"{base}-kv{_KV_VARIANT}", 1.0
    return base, kv / act


@functools.lru_cache(maxsize=64)
def _bundle(profiles_dir: str, hardware: str, model: ModelConfig, variant: str, tp: int,
            peak_tflops: "float | None" = None, mem_bw_gbs: "float | None" = None):
    spec = {k: v for k, v in dict(peak_tflops=peak_tflops, mem_bw_gbs=mem_bw_gbs).items() if v is not None}
    return profiles.load_profile_bundle(profiles_dir, hardware, model, variant=variant, tp=tp, spec=spec or None)


SOURCE_FIELDS = ("mem_size_gb", "link_bw_gbps", "link_latency_ns")  # None = from the hardware's source


@functools.lru_cache(maxsize=256)
def resolve_hardware(hw: HardwareConfig, profiles_dir: str = "profiles") -> HardwareConfig:
    """``hw`` with the fields of :data:`SOURCE_FIELDS` that are None filled from its source.

    * a spec sheet (``spec/...``): its ``mem_gib``, ``link_bw_gbs`` and ``link_latency_us``;
    * a converted operator database: its spec sheet's memory (``gpu.mem_capacity``) and the ring
      link fitted to its custom all-reduce table at ``hw.tp`` (``profiles/operator-db/fit.json``
      ``allreduce``; TP 1 has no collective and takes the smallest fitted degree's).

    Raises:
      JaxsimInputError: at ``hardware.<field>`` for measured or legacy profiles (they carry no
        memory size or link: the hardware must give them), or a TP degree the all-reduce table
        does not hold.
    """
    missing = [k for k in SOURCE_FIELDS if getattr(hw, k) is None]
    if not missing:
        return hw
    source = profiles.bundle_source(hw.name)
    if source == "roofline":
        from jaxsim.spec_bundle import sheet_path
        from jaxsim.specs import load_spec

        sheet = load_spec(sheet_path(profiles_dir, hw.name))
        vals = dict(mem_size_gb=sheet.mem_gib, link_bw_gbps=sheet.link_bw_gbs,
                    link_latency_ns=sheet.link_latency_us * 1e3)
    elif source == "operator-db":
        from jaxsim import operator_db

        vals = operator_db.hardware_defaults(profiles_dir, hw.name, hw.tp)
    else:
        raise JaxsimInputError(f"hardware.{missing[0]}", f"is null, but {hw.name!r} is priced by "
                               f"{profiles.SOURCES[source]}, which carry no memory size or link",
                               "set it (only spec sheets and converted operator databases supply their own)")
    return dataclasses.replace(hw, **{k: vals[k] for k in missing})


def hardware_bundle(profiles_dir: str, hw: HardwareConfig, model: ModelConfig, variant: str):
    """The profile bundle of ``hw`` (its name, TP degree and, for a spec sheet, its what-if
    ``peak_tflops`` / ``mem_bw_gbs``), cached.

    Raises:
      JaxsimInputError: at ``hardware.peak_tflops`` / ``hardware.mem_bw_gbs`` when set on hardware that
        is not a spec sheet (measured tables cannot be re-priced that way: use compute_scale /
        memory_scale), and whatever the bundle's loader raises.
    """
    if profiles.bundle_source(hw.name) != "roofline":
        for k in ("peak_tflops", "mem_bw_gbs"):
            if getattr(hw, k) is not None:
                raise JaxsimInputError(f"hardware.{k}", f"only spec-sheet hardware (spec/<sheet>) has a {k}; "
                                       f"{hw.name!r} is priced by {profiles.SOURCES[profiles.bundle_source(hw.name)]}",
                                       "unset it; measured tables are scaled by the sweep knobs compute_scale / "
                                       "memory_scale (scripts/sweep.py), or use a spec sheet (hardware=roofline_<sheet>)")
    return _bundle(profiles_dir, hw.name, model, variant, hw.tp, hw.peak_tflops, hw.mem_bw_gbs)


@functools.lru_cache(maxsize=64)
def latency_tables(profiles_dir: str, hw: HardwareConfig, model: ModelConfig, variant: str, w_bytes: int,
            rt: ModelRuntimeConfig = ModelRuntimeConfig()):
    bundle = hardware_bundle(profiles_dir, hw, model, variant)
    if rt.expert_routing not in ("balanced", "zipf"):
        raise JaxsimInputError("model.expert_routing", f"unknown routing {rt.expert_routing!r}",
                               "use 'balanced' or 'zipf'")
    pop = None  # BALANCED expert routing (REFERENCE.md §1.9)
    if model.is_moe and rt.expert_routing == "zipf":
        pop = latency.zipf_popularity(model.num_experts, rt.expert_zipf_s, seed=rt.expert_seed)
    return latency.latency_tables(bundle, model, hw, weight_bytes=w_bytes, ep=hw.ep or None, expert_popularity=pop)


def plan(workload: Workload, model: ModelConfig, hw: HardwareConfig, sched: SchedulerConfig,
         rt: ModelRuntimeConfig = ModelRuntimeConfig(), calib: Calibration = Calibration(), *,
         profiles_dir="profiles", max_slots: int = 0, record_token_times: bool = True,
         max_iterations: int = 0, variant: str | None = None, scales: dict | None = None,
         placement: "placement_lib.WeightPlacement | None" = None,
         arrays: dict | None = None, kv_tier: KVTierConfig = KVTierConfig()) -> Plan:
    """Check one configuration and compute everything host-side (``variant``: the profile
    variant folder, default :func:`profile_variant`'s; ``placement``: where the weights sit, a
    cluster JSON's, default ``hw``'s ``weights_offload_*`` fields, :mod:`jaxsim.placement`;
    ``arrays``: precomputed
    :func:`workload_arrays` of this workload, reused across a sweep, with the chunk keys of
    ``kv_tier``, the KV tier below the GPU)."""
    if kv_tier.enabled and not sched.enable_prefix_caching:
        raise JaxsimInputError("kv_tier.storage", f"{kv_tier.storage!r} needs prefix caching (its chunks are found "
                               "by prefix hash), but scheduler.enable_prefix_caching is false",
                               "enable prefix caching, or use kv_tier=none")
    if kv_tier.enabled and kv_tier.chunk_size % sched.block_size:
        raise JaxsimInputError("kv_tier.chunk_size", f"{kv_tier.chunk_size} tokens is not a whole number of "
                               f"{sched.block_size}-token KV blocks (a chunk is copied and found block by block)",
                               f"use a multiple of scheduler.block_size, e.g. "
                               f"{max(1, kv_tier.chunk_size // sched.block_size) * sched.block_size}")
    hw = resolve_hardware(hw, str(profiles_dir))  # null memory / link: the hardware source's own
    bs = sched.block_size
    n = workload.num_requests
    if n == 0:
        raise JaxsimInputError(workload.source, "the workload has no requests")
    check_scheduler(sched)
    check_workload(workload)
    # Slots hold the running requests and the head of the waiting queue; with one instance, the
    # rest of the queue waits in arrival order outside the state, which schedules identically.
    if max_slots == 0:
        max_slots = sched.max_num_seqs + SLOT_HEADROOM if sched.max_num_seqs else n + 1
    elif sched.max_num_seqs and max_slots <= sched.max_num_seqs:
        raise JaxsimInputError(
            "sim.max_slots", f"must exceed scheduler.max_num_seqs ({sched.max_num_seqs}); got {max_slots}",
            "raise sim.max_slots or set it to 0 (auto): each slot holds one running or waiting request")
    check_workload_fits(workload, model)
    if not 1 <= hw.pp <= model.num_layers:
        raise JaxsimInputError("hardware.pp", f"must be in [1, {model.num_layers}] ({model.name}'s layers), got {hw.pp}")
    ctx = model.max_position_embeddings
    if rt.max_model_len > ctx:  # (vLLM's own check at start-up; config.py gives it the Hydra key first)
        raise JaxsimInputError("model.max_model_len", f"{rt.max_model_len} is greater than the derived max_model_len "
                               f"of {model.name} ({ctx}, its max_position_embeddings): vLLM refuses this at start-up",
                               f"use 0 (the model's context) or at most {ctx}")

    w_bytes, kv_bytes = weight_and_kv_bytes(model, rt)
    approximations = []
    kv_scale = 1.0
    if variant is None:
        variant, kv_scale = profile_variant(str(profiles_dir), hw.name, model, rt)
        if kv_scale != 1.0:
            approximations.append(
                f"attention: kv_cache_dtype {rt.kv_cache_dtype} has no '{variant}-kv{_KV_VARIANT}' profile variant of "
                f"{model.name} on {hw.name}; attention is priced from the {variant} tables with decode attention's "
                f"KV-read term (fitted a + b*nd*kvd) scaled by {kv_scale:g}, an estimate (REFERENCE.md §1.14)")
    bundle = hardware_bundle(str(profiles_dir), hw, model, variant)
    width = int(bundle.meta.get("width", 1) or 1)
    if width != 1:  # scripts/profile.py width=N: the operators of a narrower model were timed
        approximations.append(
            f"{hw.name}: the {model.name} profiles were measured at 1/{width} of its width (scripts/profile.py "
            f"width={width}: hidden size, intermediate size, heads and vocabulary divided by {width}, "
            f"{bundle.path}/meta.yaml); their times are the narrower model's, while the KV cache and memory "
            "are sized for the full model")
        warnings.warn(approximations[-1], stacklevel=2)
    tables = latency_tables(str(profiles_dir), hw, model, variant, w_bytes, rt)
    f64 = lambda x: jnp.asarray(x, jnp.float64)  # noqa: E731
    if scales:
        tables = dataclasses.replace(tables, **{k: f64(v) for k, v in scales.items()})
    if kv_scale != 1.0:
        tables = dataclasses.replace(tables, kv_read_scale=f64(kv_scale), kv_scaled=True)
    # Weights off the NPU (REFERENCE.md §1.10): out of the weight ledger, read every iteration.
    wp = placement_lib.resolve(placement, hw, model.num_layers)
    # A KV cache off the NPU (§1.16 kv_loc): blocks from its device (num_kv_blocks), its KV read
    # every iteration (the kvloc_* fields, values: sweep points share one compile).
    if wp.kv_off_npu:
        if hw.pp != 1:
            raise JaxsimInputError("hardware.pp", f"{hw.pp} pipeline stages with the KV cache off the NPU ({wp.kv_src}"
                                   f" = {wp.kv}): the KV-read critical path is modelled for pp = 1",
                                   "use pp 1, or keep the KV cache on the NPU")
        kvp = placement_lib.kv_read_params(wp, model, kv_bytes, tp=hw.tp)
        tables = dataclasses.replace(tables, **{k: jnp.asarray(v, jnp.float64) for k, v in kvp.items()}, offload=True)
    offloaded = {}
    if wp.off_npu:
        if hw.pp != 1:
            raise JaxsimInputError("hardware.pp", f"{hw.pp} pipeline stages with weights off the NPU (placement or "
                                   "weights_offload_fraction): the weight-load critical path is modelled for pp = 1",
                                   "use pp 1, or keep the weights on the NPU")
        ep = (hw.ep or hw.tp) if model.is_moe else 1
        offloaded = placement_lib.offloaded_bytes(wp, model, w_bytes, tp=hw.tp, ep=ep)
        g = placement_lib.load_gates(wp, model, w_bytes, tp=hw.tp, ep=ep)
        i64 = lambda x: jnp.asarray(x, jnp.int64)  # noqa: E731
        tables = dataclasses.replace(tables, wload_pro=i64(g["prologue"]), wload_blocks=i64(g["blocks"]),
                                     wload_head=i64(g["head"]), offload=True)
    pim_plan = None
    if hw.enable_attn_offloading:  # decode attention on PIM channels (REFERENCE.md §1.11)
        pim_plan, tables = _with_pim(tables, hw, model, wp, kv_bytes, profiles_dir)
    profiles.check_engine_limits(bundle, sched.max_num_batched_tokens, sched.max_num_seqs)
    # vLLM's null block (SchedulerConfig.reserve_null_block) is not a request's: num_blocks is what
    # requests can use, and KV usage is over it (vllm/v1/core/block_pool.py).
    null_block = int(sched.reserve_null_block)
    num_blocks = num_kv_blocks(model, hw, sched, rt, placement, profiles_dir) - null_block
    if num_blocks <= 0:
        raise JaxsimInputError("hardware.num_gpu_blocks", "1 block is vLLM's null block alone: no block is left "
                               "for requests", "give the KV cache at least 2 blocks")

    # Prefix-cache keys: dense hash ids of each request's full blocks, padded to the block table.
    if arrays is None:
        arrays = workload_arrays(workload, bs, sched.enable_prefix_caching, block_table_width(workload, bs),
                                 chunk_blocks=kv_tier.chunk_blocks(bs))
    out = workload.output_toks.astype(np.int64)

    mnbt = sched.max_num_batched_tokens or ctx
    mnbt = min(mnbt, ctx)  # vLLM clamps the budget to the context length
    # Iteration buffer. Every iteration emits a token or advances prefill chunks that fill the
    # token budget (a chunk smaller than the budget and the threshold completes its prefill and
    # emits), which bounds the count (doubled as headroom for recomputation after preemptions).
    # That bound is large and mostly unused, so the buffer starts from a guess for a batched
    # engine; ``simulate`` doubles it and reruns when it fills (overflow is detected, never silent).
    chunk = min(mnbt, sched.long_prefill_token_threshold or mnbt)
    chunks = -(-int(workload.input_toks.sum()) // chunk)
    bound = int(2 * (out.sum() + chunks) + 64)
    max_iters = max_iterations or min(bound, int(out.sum()) // 4 + 4 * chunks + 8 * n + 1024)
    sp = dict(max_num_seqs=np.int32(sched.max_num_seqs), max_num_batched_tokens=np.int32(mnbt),
              long_prefill_threshold=np.int32(sched.long_prefill_token_threshold),
              chunked_prefill=np.bool_(sched.enable_chunked_prefill), reserve_full_isl=np.bool_(sched.reserve_full_isl),
              prefix_caching=np.bool_(sched.enable_prefix_caching), async_scheduling=np.bool_(sched.async_scheduling),
              prefix_stats_every_attempt=np.bool_(sched.prefix_stats_every_attempt),
              prefix_index_all_copies=np.bool_(sched.prefix_index_all_copies),
              num_blocks=np.int32(num_blocks), tier_pool=np.int32(0))
    dims = Dims(num_slots=max_slots, max_blocks=arrays["hashes"].shape[1], num_hashes=arrays["num_hashes"],
                num_blocks_cap=num_blocks, max_iters=max_iters,
                num_tokens=int(out.sum()) if record_token_times else 0, num_requests=n, max_pp=hw.pp,
                num_chunks=arrays["num_chunks"], max_chunks=arrays["chunks"].shape[1])
    return Plan(workload, arrays, tables, sp, calib, num_blocks, bs, dims, bound,
                model.kv_bytes_per_token_per_rank(kv_bytes), pp=hw.pp, tp=hw.tp, num_layers=model.num_layers,
                max_model_len=int(rt.max_model_len or ctx),
                kv_rank_token_bytes=model.kv_bytes_per_token_per_rank(kv_bytes, tp=hw.tp, pp=hw.pp),
                kv_from_memory=hw.num_gpu_blocks is None, null_block=null_block,
                approximations=tuple(approximations), offloaded=offloaded,
                profile_outliers=tuple(bundle.outliers), kv_tier=kv_tier,
                latency_source=(profiles.bundle_source(hw.name), hw.name),
                gpu_static_bytes=_gpu_static_bytes(model, hw, w_bytes, offloaded), kv_on_gpu=not wp.kv_off_npu,
                wload_busy=dict(g["busy"]) if wp.off_npu else {}, pim=pim_plan)


def _with_pim(tables, hw: HardwareConfig, model: ModelConfig, wp, kv_bytes: int, profiles_dir):
    """``(PimPlan, tables)`` of an instance that offloads decode attention to PIM (REFERENCE.md
    §1.11): the PIM fields set, and the host operations priced on the PIM memory (its aggregate
    bandwidth and read latency replace ``cpu_mem``'s)."""
    if wp.kv_off_npu:
        raise JaxsimInputError("hardware.enable_attn_offloading", f"with the KV cache off the NPU ({wp.kv_src} = "
                               f"{wp.kv}): PIM attention reads the KV in the PIM memory", "use one or the other")
    if hw.enable_sub_batch_interleaving and wp.off_npu:
        raise JaxsimInputError("hardware.enable_sub_batch_interleaving", "with weights off the NPU: the weight-load "
                               "critical path is not modelled for interleaved sub-batches",
                               "keep the weights on the NPU, or turn interleaving off")
    act = dtype_bytes(model.torch_dtype, "model.torch_dtype")
    p = pim_lib.pim_plan(hw, model, kv_bytes, act, Path(profiles_dir) / "pim")
    f64 = lambda x: jnp.asarray(x, jnp.float64)  # noqa: E731
    return p, dataclasses.replace(tables, **latency.pim_fields(p, hw), cpu_bw=f64(p.bandwidth_gbps),
                                  cpu_lat=f64(p.device.read_latency_ns))


def _gpu_static_bytes(model: ModelConfig, hw: HardwareConfig, w_bytes: int, offloaded: dict) -> int:
    """Weights on the GPUs (less what is placed off them) plus the activation reserve, summed over
    the instance's ``tp x pp`` ranks (REFERENCE.md §1.3 ledger), bytes."""
    ep = (hw.ep or hw.tp) if model.is_moe else 1
    per_rank = model.weight_bytes_per_rank(w_bytes, tp=hw.tp, pp=hw.pp, ep=ep) - sum(offloaded.values())
    return int((per_rank + int(hw.activation_reserve_gb * GIB)) * hw.tp * hw.pp)


def instance_runtime(rt: ModelRuntimeConfig, spec: InstanceSpec) -> ModelRuntimeConfig:
    """The run's model runtime with an instance's own weight / KV dtypes (a cluster JSON's
    ``dtype`` / ``kv_cache_dtype``; None keeps the run's)."""
    over = {k: getattr(spec, k) for k in ("dtype", "kv_cache_dtype") if getattr(spec, k) is not None}
    return dataclasses.replace(rt, **over) if over else rt


def check_offload_capacity(plans: "list[Plan]", instances: "list[InstanceSpec]", model: ModelConfig,
                           key: str) -> None:
    """Weights and KV caches placed off the NPU fit their devices' capacity
    (:func:`jaxsim.placement.check_capacity`)."""
    placements = [placement_lib.resolve(spec.placement, spec.hw, (spec.model or model).num_layers) for spec in instances]
    if not any(pl.offloaded for pl in plans) and not any(wp.kv_off_npu for wp in placements):
        return
    placement_lib.check_capacity(plans, placements, [spec.node for spec in instances], key)


def needs_dp_sync(plans: "list[Plan]") -> bool:
    return any(p.dp_group >= 0 for p in plans)


def needs_releases(plans: "list[Plan]") -> bool:
    """Whether requests enter queues during the run: P/D hand-offs or agentic sessions."""
    return any(p.role != "colocated" or p.workload.has_sessions for p in plans)


def place_instances(plans: "list[Plan]", instances: "list[InstanceSpec]", links: LinkConfig, model: ModelConfig,
                    dp_sync: str = "moe", key: str = "cluster.instances") -> "list[Plan]":
    """The plans with their instances' roles, nodes, DP groups and the cluster's links.

    Checks that a disaggregated cluster has both prefill and decode instances of one model (the
    KV they hand over), and that the members of a DP group share a role, a model and tp/ep
    degrees (``model``: the cluster's model, for instances that do not name one). ``dp_sync``
    says which DP groups run
    wave-synchronised rounds: ``moe`` (MoE models only: vLLM lock-steps DP ranks for the expert
    collectives, while dense DP members are independent engines behind the load balancer),
    ``always`` or ``never``."""
    if dp_sync not in ("moe", "always", "never"):
        raise JaxsimInputError("cluster.dp_sync", f"unknown value {dp_sync!r}", "one of moe, always, never")
    roles = [spec.role for spec in instances]
    if ("prefill" in roles) != ("decode" in roles):
        have = "prefill" if "prefill" in roles else "decode"
        raise JaxsimInputError(f"{key}[*].role", f"a disaggregated cluster needs prefill and decode instances; "
                               f"it has {have} instances only", "add the other role, or make them colocated")
    models = [spec.model or model for spec in instances]
    pd_models = {m.name for m, r in zip(models, roles) if r != "colocated"}
    if len(pd_models) > 1:
        raise JaxsimInputError(f"{key}[*].model", f"prefill and decode instances serve different models "
                               f"{sorted(pd_models)}", "the KV handed over must be the same model's")
    pd_kv = {pl.kv_token_bytes for pl, r in zip(plans, roles) if r != "colocated"}
    if len(pd_kv) > 1:
        raise JaxsimInputError(f"{key}[*].kv_cache_dtype", f"prefill and decode instances hold KV of different sizes "
                               f"({sorted(pd_kv)} bytes per token)", "give them the same kv_cache_dtype")
    first = {}
    groups = []
    for i, spec in enumerate(instances):
        if spec.dp_group is None or dp_sync == "never":
            groups.append(-1)
            continue
        if not (dp_sync == "always" or models[i].is_moe):
            groups.append(-1)
            continue
        lead = first.setdefault(spec.dp_group, i)
        a = instances[lead]
        if (a.role, a.hw.tp, a.hw.ep, models[lead].name) != (spec.role, spec.hw.tp, spec.hw.ep, models[i].name):
            raise JaxsimInputError(f"{key}[{i}].dp_group", f"DP group {spec.dp_group!r} mixes roles, models or tp/ep "
                                   "degrees", "members of a DP group have equal role, model, tp and ep")
        if spec.hw.pp != 1:
            raise JaxsimInputError(f"{key}[{i}].dp_group", "wave-synchronised DP groups with pipeline parallelism "
                                   f"(pp = {spec.hw.pp}) are not modelled", "use pp 1, or dp_sync never")
        groups.append(lead)
    return [dataclasses.replace(pl, role=spec.role, node=spec.node, links=links, dp_group=g)
            for pl, spec, g in zip(plans, instances, groups)]


def check_block_sizes(plans: "list[Plan]", key: str) -> None:
    """The instances of one cluster share a block size (a compiled shape)."""
    sizes = {pl.block_size for pl in plans}
    if len(sizes) > 1:
        raise JaxsimInputError(key, f"instances of one cluster share a block size, got {sorted(sizes)}")


def lower_tier(cfg: KVTierConfig, block_size: int) -> AbstractKVTier:
    """The engine's KV tier for ``cfg`` (a static part of the compiled run)."""
    if not cfg.enabled:
        return NoLowerTier()
    return ChunkTier(chunk_blocks=cfg.chunk_blocks(block_size), min_gain_chunk=cfg.min_gain == "chunk")


@dataclasses.dataclass(frozen=True)
class TierDevice:
    """The memory that holds a KV tier: one node's CPU memory or the cluster's CXL pool."""

    capacity_gb: float  # GiB
    bandwidth_gbps: float  # GB/s = bytes/ns
    latency_ns: float


@dataclasses.dataclass(frozen=True)
class TierLayout:
    """The KV tier's pools for one cluster: ``pool_of[i]`` the pool of instance i; per pool
    ``capacity`` (chunks; 0 for a pool no instance uses), ``bw`` (bytes/ns), ``latency`` (ns).
    There are as many pools as instances (a shared pool takes the index of its first instance),
    so that private and shared layouts have one shape."""

    pool_of: np.ndarray
    capacity: np.ndarray
    bw: np.ndarray
    latency: np.ndarray


def tier_device(cfg: KVTierConfig, node: int, devices: dict | None, key: str = "kv_tier") -> TierDevice:
    """The device of ``cfg.storage`` for an instance on ``node``: ``cfg``'s fields where set, else
    the cluster JSON's (``devices``: ``{"cpu": {node: TierDevice}, "cxl": TierDevice}``)."""
    base = None
    if devices:
        base = devices.get("cxl") if cfg.storage == "cxl" else (devices.get("cpu") or {}).get(node)
    values = {}
    for f in ("capacity_gb", "bandwidth_gbps", "latency_ns"):
        v = getattr(cfg, f)
        if v is None and base is not None:
            v = getattr(base, f)
        if v is None:
            src = "cxl_mem" if cfg.storage == "cxl" else f"nodes[{node}].cpu_mem"
            raise JaxsimInputError(f"{key}.{f}", f"not set, and no cluster JSON gives it ({src})",
                                   f"set {key}.{f}, or give a cluster JSON with {src}")
        values[f] = float(v)
    return TierDevice(**values)


def tier_layout(plans: "list[Plan]", cfg: KVTierConfig, devices: dict | None = None,
                key: str = "kv_tier") -> TierLayout:
    """The pools of the KV tier ``cfg`` for a cluster of ``plans`` (placed: their ``node``s).

    Shared (``enable_prefix_sharing``): one pool per node (CPU) or one for the cluster (CXL), of
    the whole device. Private: one pool per instance with an even share of its device (the
    instances of its node for CPU, every instance for CXL), REFERENCE.md §1.5 and §1.16.
    Capacity in chunks: ``floor(bytes / (chunk tokens x K+V bytes per token, all ranks))``.
    """
    n = len(plans)
    if not cfg.enabled:
        return TierLayout(np.zeros(n, np.int32), np.zeros(n, np.int32), np.ones(n), np.zeros(n, np.int64))
    group = [0 if cfg.storage == "cxl" else pl.node for pl in plans]  # instances on one device
    first = {}
    for i, g in enumerate(group):
        first.setdefault(g, i)
    sharers = {g: group.count(g) for g in first}
    pool_of = np.array([first[g] if cfg.enable_prefix_sharing else i for i, g in enumerate(group)], np.int32)
    cap, bw, lat = np.zeros(n, np.int64), np.ones(n), np.zeros(n, np.int64)
    for i, pl in enumerate(plans):
        if pool_of[i] != i:
            continue
        dev = tier_device(cfg, pl.node, devices, key)
        share = 1 if cfg.enable_prefix_sharing else sharers[group[i]]
        chunk_bytes = cfg.chunk_bytes(pl.block_size, pl.kv_token_bytes)
        cap[i] = int(dev.capacity_gb * GIB / share) // chunk_bytes
        if cap[i] == 0 and dev.capacity_gb > 0:
            warnings.warn(f"{key}.capacity_gb: {dev.capacity_gb:g} GiB{' shared by ' + str(share) + ' pools' if share > 1 else ''}"
                          f" holds no {chunk_bytes / 2**20:g}-MiB chunk: every write is evicted at once", stacklevel=2)
        bw[i], lat[i] = dev.bandwidth_gbps, int(round(dev.latency_ns))
    if cfg.enable_prefix_sharing:
        for i, pl in enumerate(plans):
            a = plans[pool_of[i]]
            if (pl.kv_token_bytes, pl.block_size) != (a.kv_token_bytes, a.block_size):
                raise JaxsimInputError(f"{key}.enable_prefix_sharing", f"instances {pool_of[i]} and {i} share a "
                                       "pool but their KV differs (model, dtype or block size)",
                                       "share pools only between instances of one model and KV layout")
    return TierLayout(pool_of, np.minimum(cap, np.iinfo(np.int32).max).astype(np.int32), bw, lat)
