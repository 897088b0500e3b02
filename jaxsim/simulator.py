"""Host-side entry point: turn a description of one instance and a trace into a compiled run.

``simulate(...)`` loads the profile bundle, sizes the KV cache, hashes the trace's blocks,
builds the fixed-shape state, runs the jitted loop and converts the result to numpy
(``jaxsim.spec.SimResult``). ``prepare(...)`` stops before running, for benchmarks and sweeps.
"""

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxsim import latency, profiles
from jaxsim.engine import cluster
from jaxsim.engine import instance as inst_lib
from jaxsim.errors import CapacityOverflowError, JaxsimInputError
from jaxsim.model import ModelConfig, dtype_bytes
from jaxsim.prefix import hash_ids
from jaxsim.spec import (Calibration, HardwareConfig, ModelRuntimeConfig, SchedulerConfig, SimResult,
                         Workload)

GIB = 2**30
POP_WINDOW = 64  # free-list entries (and registrations) handled per loop trip; any value is correct
SLOT_HEADROOM = 32  # waiting-request slots beyond max_num_seqs when sim.max_slots is auto


class IterationBufferFull(CapacityOverflowError):
    """The per-iteration record buffer filled up before every request finished."""


def weight_and_kv_bytes(model: ModelConfig, rt: ModelRuntimeConfig) -> tuple[int, int]:
    """Bytes per weight and per KV element (REFERENCE.md §1.14: KV follows the activation dtype)."""
    w = dtype_bytes(model.torch_dtype if rt.dtype == "auto" else rt.dtype, "model.dtype")
    act = dtype_bytes(model.torch_dtype, "model.torch_dtype")
    kv = act if rt.kv_cache_dtype == "auto" else dtype_bytes(rt.kv_cache_dtype, "model.kv_cache_dtype")
    return w, kv


def num_kv_blocks(model: ModelConfig, hw: HardwareConfig, sched: SchedulerConfig,
                  rt: ModelRuntimeConfig) -> int:
    """KV blocks per instance: an explicit count, or the memory model of REFERENCE.md §1.3
    (``util * device bytes - weights - activation reserve``, per rank, over bytes per block)."""
    if hw.num_gpu_blocks is not None:
        if hw.num_gpu_blocks <= 0:
            raise JaxsimInputError("hardware.num_gpu_blocks", f"must be > 0, got {hw.num_gpu_blocks}")
        return int(hw.num_gpu_blocks)
    w, kv = weight_and_kv_bytes(model, rt)
    weights = model.weight_bytes_per_rank(w, tp=hw.tp)
    usable = math.floor(hw.mem_size_gb * GIB * hw.mem_util) - weights - int(hw.activation_reserve_gb * GIB)
    per_block = sched.block_size * model.kv_bytes_per_token_per_rank(kv, tp=hw.tp)
    blocks = usable // per_block
    if blocks <= 0:
        raise JaxsimInputError(
            "hardware.mem_size_gb", f"{hw.mem_size_gb} GiB x util {hw.mem_util} leaves no room for KV "
            f"after {weights / GIB:.2f} GiB of weights per rank", "use more memory, a higher TP, or num_gpu_blocks")
    return int(blocks)


@dataclasses.dataclass
class Prepared:
    state: cluster.ClusterState
    params: cluster.EngineParams
    workload: cluster.WorkloadArrays
    static: dict  # keyword arguments of cluster.run (shapes and loop bounds)
    num_blocks: int
    block_size: int
    workload_host: Workload
    max_iters_bound: int  # the iteration buffer never needs more rows than this


def prepare(workload: Workload, model: ModelConfig, hw: HardwareConfig, sched: SchedulerConfig,
            rt: ModelRuntimeConfig = ModelRuntimeConfig(), calib: Calibration = Calibration(), *,
            profiles_dir="profiles", max_slots: int = 0, record_token_times: bool = True,
            max_iterations: int = 0, variant: str | None = None) -> Prepared:
    bs = sched.block_size
    n = workload.num_requests
    if n == 0:
        raise JaxsimInputError(workload.source, "the workload has no requests")
    if bs <= 0:
        raise JaxsimInputError("scheduler.block_size", f"must be > 0, got {bs}")
    for field in ("max_num_seqs", "max_num_batched_tokens", "long_prefill_token_threshold"):
        if getattr(sched, field) < 0:
            raise JaxsimInputError(f"scheduler.{field}", f"must be >= 0 (0 = unlimited/off), got {getattr(sched, field)}")
    # Slots hold the running requests and the head of the waiting queue; with one instance, the
    # rest of the queue waits in arrival order outside the state, which schedules identically.
    if max_slots == 0:
        max_slots = sched.max_num_seqs + SLOT_HEADROOM if sched.max_num_seqs else n + 1
    elif sched.max_num_seqs and max_slots <= sched.max_num_seqs:
        raise JaxsimInputError(
            "sim.max_slots", f"must exceed scheduler.max_num_seqs ({sched.max_num_seqs}); got {max_slots}",
            "raise sim.max_slots or set it to 0 (auto): each slot holds one running or waiting request")
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

    w_bytes, _ = weight_and_kv_bytes(model, rt)
    variant = variant or {1: "fp8", 2: "bf16", 4: "fp32"}.get(w_bytes, "bf16")
    bundle = profiles.load_profile_bundle(profiles_dir, hw.name, model, variant=variant, tp=hw.tp)
    tables = latency.latency_tables(bundle, model, hw, weight_bytes=w_bytes)
    profiles.check_engine_limits(bundle, sched.max_num_batched_tokens, sched.max_num_seqs)
    num_blocks = num_kv_blocks(model, hw, sched, rt)

    # Prefix-cache keys: dense hash ids of each request's full blocks, padded to the block table.
    max_blocks = int(-(-target.max() // bs)) + 1
    hashes = np.full((n, max_blocks), -1, np.int32)
    n_hashes = np.zeros(n, np.int32)
    num_hashes = 1
    if sched.enable_prefix_caching:
        ids, num_hashes = hash_ids(workload.token_ids, bs)
        for i, h in enumerate(ids):
            h = h[:max_blocks]
            hashes[i, : len(h)] = h
            n_hashes[i] = len(h)
    order = np.lexsort((np.arange(n), workload.arrival_ns)).astype(np.int32)
    out = workload.output_toks.astype(np.int64)
    token_offset = np.concatenate([[0], np.cumsum(out)[:-1]]).astype(np.int32)
    wl = cluster.WorkloadArrays(
        arrival_sorted=jnp.asarray(workload.arrival_ns[order], jnp.int64), order=jnp.asarray(order),
        prompt=jnp.asarray(workload.input_toks, jnp.int32), output=jnp.asarray(workload.output_toks, jnp.int32),
        hashes=jnp.asarray(hashes), n_hashes=jnp.asarray(n_hashes), token_offset=jnp.asarray(token_offset))

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
    ring_cap = 2 * num_blocks + POP_WINDOW
    inst = inst_lib.init_instance(max_slots, max_blocks, num_blocks, ring_cap, num_hashes, POP_WINDOW,
                                  num_blocks)
    inst = jax.tree.map(lambda x: x[None], inst)  # instance axis
    sp = inst_lib.SchedulerParams(
        max_num_seqs=jnp.asarray(sched.max_num_seqs, jnp.int32),
        max_num_batched_tokens=jnp.asarray(mnbt, jnp.int32),
        long_prefill_threshold=jnp.asarray(sched.long_prefill_token_threshold, jnp.int32),
        chunked_prefill=jnp.asarray(sched.enable_chunked_prefill),
        reserve_full_isl=jnp.asarray(sched.reserve_full_isl),
        prefix_caching=jnp.asarray(sched.enable_prefix_caching),
        async_scheduling=jnp.asarray(sched.async_scheduling),
        num_blocks=jnp.asarray(num_blocks, jnp.int32))
    params = cluster.EngineParams(
        sched=sp, tables=tables,
        iteration_overhead_ns=jnp.asarray(calib.iteration_overhead_ns, jnp.int64),
        first_token_delay_ns=jnp.asarray(calib.first_token_delay_ns, jnp.int64),
        token_output_delay_ns=jnp.asarray(calib.token_output_delay_ns, jnp.int64))
    params = jax.tree.map(lambda x: jnp.asarray(x)[None], params)
    n_tokens = int(out.sum()) if record_token_times else 0
    state = cluster.init_state(inst, n, n_tokens, max_iters)
    static = dict(block_size=bs, window=POP_WINDOW, ring_cap=ring_cap, max_steps=4 * max_iters + 2 * n + 16)
    return Prepared(state, params, wl, static, num_blocks, bs, workload, bound)


def run_prepared(p: Prepared) -> cluster.ClusterState:
    return cluster.run(p.state, p.params, p.workload, **p.static)


def to_result(p: Prepared, final: cluster.ClusterState, wall_s: float | None = None) -> SimResult:
    """Check the run's flags and convert its state to numpy."""
    f = jax.device_get(final)
    w = p.workload_host
    n = w.num_requests
    inst = jax.tree.map(lambda x: x[0], f.inst)
    rec = jax.tree.map(lambda x: x[0], f.records)
    k = int(inst.n_iters)
    if bool(inst.counters.slot_overflow):
        raise CapacityOverflowError("request slots overflowed: raise sim.max_slots")
    if k >= rec.start.shape[0] and int(f.finished) < n:
        raise IterationBufferFull(f"the iteration buffer ({rec.start.shape[0]} rows) filled up before the run "
                                  "ended: raise sim.max_iterations (0 = automatic)")
    if bool(f.stalled):
        left = np.nonzero(f.finish < 0)[0]
        raise JaxsimInputError(
            f"{w.source}: request {int(left[0])}", "can never be scheduled: its KV blocks exceed the cache "
            f"({p.num_blocks} blocks of {p.block_size} tokens)", "raise KV capacity or shorten the request")
    if int(f.finished) < n:
        raise CapacityOverflowError(f"the step limit was reached with {n - int(f.finished)} requests unfinished")
    out = w.output_toks.astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(out)])
    ctr = inst.counters
    stats = dict(
        iterations=k, steps=int(f.steps), preemptions=int(ctr.preemptions),
        prefix_requested_tokens=int(ctr.prefix_requested), prefix_hit_tokens=int(ctr.prefix_hits),
        recomputed_tokens=int(ctr.recomputed),
        extrapolated_iterations=dict(zip(("dense", "per_sequence", "attention", "moe"),
                                         (int(x) for x in ctr.extrapolated))))
    if wall_s is not None:
        stats["wall_s_with_compile"] = wall_s
    return SimResult(
        arrival_ns=np.asarray(w.arrival_ns, np.int64), first_scheduled_ns=np.asarray(f.first_scheduled),
        first_token_ns=np.asarray(f.first_token), finish_ns=np.asarray(f.finish),
        input_toks=np.asarray(w.input_toks), output_toks=np.asarray(w.output_toks),
        prefix_hit_tokens=np.asarray(f.prefix_hit), num_preemptions=np.asarray(f.num_preemptions),
        recomputed_tokens=np.asarray(f.recomputed), instance=np.asarray(f.instance),
        token_times_ns=np.asarray(f.token_times) if f.token_times.shape[0] == offsets[-1] else np.zeros(0, np.int64),
        token_offsets=offsets,
        iter_start_ns=rec.start[:k], iter_end_ns=rec.end[:k], iter_prompt_tokens=rec.prompt_tokens[:k],
        iter_gen_tokens=rec.gen_tokens[:k], iter_num_tokens=rec.num_tokens[:k], iter_num_seqs=rec.num_seqs[:k],
        iter_running=rec.running[:k], iter_waiting=rec.waiting[:k], iter_kv_blocks_used=rec.kv_used[:k],
        num_blocks=p.num_blocks, block_size=p.block_size, stats=stats)


def simulate(workload: Workload, model: ModelConfig, hw: HardwareConfig, sched: SchedulerConfig,
             rt: ModelRuntimeConfig = ModelRuntimeConfig(), calib: Calibration = Calibration(),
             **kwargs) -> SimResult:
    """Simulate one instance serving ``workload``; returns per-request and per-iteration results.

    With an automatic iteration buffer (``max_iterations=0``), a run that fills it is rerun with
    twice the rows (a recompile), up to the proven bound.
    """
    t0 = time.perf_counter()
    p = prepare(workload, model, hw, sched, rt, calib, **kwargs)
    while True:
        final = jax.block_until_ready(run_prepared(p))
        try:
            return to_result(p, final, wall_s=time.perf_counter() - t0)
        except IterationBufferFull:
            rows = p.state.records.start.shape[-1]
            if kwargs.get("max_iterations") or rows >= p.max_iters_bound:
                raise
            p = prepare(workload, model, hw, sched, rt, calib,
                        **{**kwargs, "max_iterations": min(2 * rows, p.max_iters_bound)})
