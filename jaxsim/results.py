"""Results: a finished run's state checked (its :class:`jaxsim.engine.status.Status`) and
converted to numpy (:class:`jaxsim.spec.SimResult`): per-request times, token times, iteration
rows of every instance in end order, counters, P/D transfer figures."""

from typing import TYPE_CHECKING

import jax
import numpy as np

from jaxsim import power as power_lib
from jaxsim import profiles
from jaxsim.engine import cluster, meters
from jaxsim.engine.instance import WAITING
from jaxsim.engine.status import Status
from jaxsim.errors import CapacityOverflowError, JaxsimInputError
from jaxsim.profiles import OUTLIERS_SHOWN
from jaxsim.spec import SimResult

if TYPE_CHECKING:
    from jaxsim import simulator


class IterationBufferFull(CapacityOverflowError):
    """The per-iteration record buffer filled up before every request finished."""


def stall_error(p: "simulator.Prepared", f: cluster.ClusterState) -> JaxsimInputError:
    """The diagnosis of a stalled run (``f``: its final state, on the host): nothing runs, nothing
    arrives, requests are left. Names the request at the head of the stuck waiting queue (vLLM's
    order: preempted first, then arrival), its instance and that instance's own capacity, and why
    it cannot be scheduled there."""
    w = p.workload_host
    s = f.inst.slots
    status, key = np.asarray(s.status), np.asarray(s.wait_key)
    n_inst = status.shape[0]
    stuck = [i for i in range(n_inst) if not bool(f.inst.busy[i]) and (status[i] == WAITING).any()]
    if not stuck:  # (not expected: a stall leaves a waiting request on an idle instance)
        left = np.nonzero(np.asarray(f.finish) < 0)[0]
        return JaxsimInputError(f"{w.source}: request {int(left[0])}", "can never be scheduled (the run stalled)",
                                "raise the KV capacity or shorten the request")
    i = stuck[0]
    head = int(np.argmin(np.where(status[i] == WAITING, key[i], np.iinfo(key.dtype).max)))
    req = int(np.asarray(s.req)[i, head])
    sched = jax.tree.map(lambda x: np.asarray(x).reshape(-1)[i] if np.ndim(x) else x, p.params.sched)
    prompt, out = int(w.input_toks[req]), int(w.output_toks[req])
    line = int(w.line_numbers[req]) if w.line_numbers is not None else req + 1
    where = f"{w.source}:{line}"
    inst = f"instance {i}" if n_inst > 1 else "the instance"
    if not bool(sched.chunked_prefill) and prompt > int(sched.max_num_batched_tokens):
        return JaxsimInputError(
            where, f"request {req} (line {line}) can never be scheduled on {inst}: its prompt of {prompt} tokens "
            f"exceeds that instance's max_num_batched_tokens ({int(sched.max_num_batched_tokens)}) and chunked prefill is off",
            "enable chunked prefill, raise max_num_batched_tokens, or route such requests elsewhere")
    return JaxsimInputError(
        where, f"request {req} (line {line}) can never be scheduled on {inst}: with input {prompt} + output {out} "
        f"tokens its KV never fits that instance's cache of {int(sched.num_blocks)} blocks of {p.block_size} tokens",
        "raise that instance's KV capacity (hardware.mem_size_gb, num_gpu_blocks) or shorten the request")


def to_result(p: "simulator.Prepared", final: cluster.ClusterState, wall_s: float | None = None) -> SimResult:
    """Check the run's flags and convert its state to numpy."""
    f = jax.device_get(final)
    w = p.workload_host
    n = w.num_requests
    n_inst = f.inst.busy.shape[0]
    counts = [int(x) for x in f.inst.n_iters]
    status = Status(int(f.status))
    if status == Status.ITERATION_BUFFER_FULL:
        raise IterationBufferFull(f"the iteration buffer ({f.records.start.shape[-1]} rows) filled up before the run "
                                  "ended: raise sim.max_iterations (0 = automatic)")
    if status == Status.STALLED:
        raise stall_error(p, f)
    if status != Status.OK:
        raise CapacityOverflowError(status.message + (f" ({n - int(f.finished)} requests unfinished)"
                                                      if status == Status.STEP_LIMIT else ""))
    if int(np.sum(f.finish >= 0)) != int(f.finished):
        raise AssertionError(f"internal: {int(f.finished)} finishes counted, {int(np.sum(f.finish >= 0))} recorded")
    out = w.output_toks.astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(out)])
    ctr = jax.tree.map(lambda x: np.asarray(x).sum(axis=0), f.inst.counters)  # summed over instances
    # Iteration rows of every instance, in order of end time (then instance).
    rows = {name: np.concatenate([getattr(f.records, name)[i, :counts[i]] for i in range(n_inst)])
            for name in meters.ROW_FIELDS}
    row_inst = np.concatenate([np.full(c, i, np.int32) for i, c in enumerate(counts)])
    by_end = np.lexsort((row_inst, rows["end"]))
    rows = {k: v[by_end] for k, v in rows.items()}
    stats = dict(
        iterations=sum(counts), steps=int(f.steps), preemptions=int(ctr.preemptions),
        prefix_requested_tokens=int(ctr.prefix_requested), prefix_hit_tokens=int(ctr.prefix_hits),
        recomputed_tokens=int(ctr.recomputed),
        extrapolated_iterations=dict(zip(("dense", "per_sequence", "attention", "moe"),
                                         (int(x) for x in ctr.extrapolated))))
    if n_inst > 1:
        stats["iterations_per_instance"] = counts
        stats["requests_per_instance"] = np.bincount(np.asarray(f.instance), minlength=n_inst).tolist()
    handed = np.asarray(f.prefill_instance) >= 0
    pd = bool(np.any(np.asarray(p.params.role) != 0))
    if pd:
        stats["prefills_per_instance"] = np.bincount(np.asarray(f.prefill_instance)[handed], minlength=n_inst).tolist()
        stats["kv_transfer_bytes"] = int(np.sum(f.kv_bytes))
        wait = (np.asarray(f.kv_ready) - np.asarray(f.prefill_end))[handed]
        stats["kv_transfer_wait_ms"] = ({"mean": float(wait.mean()) / 1e6, "p50": float(np.percentile(wait, 50)) / 1e6,
                                         "p99": float(np.percentile(wait, 99)) / 1e6, "max": float(wait.max()) / 1e6}
                                        if wait.size else {})
    released = w.released
    arrival = np.where(released, np.asarray(f.arrival), np.asarray(w.arrival_ns, np.int64))
    # Profile points far off their grid neighbours, used as measured (profiles.grid_outliers): the
    # count and the first few ("file:line layer key=value ..."), so a suspicious table shows in the
    # run summary; 0 when none.
    outliers = list(p.profile_outliers)
    stats["profile_outliers"] = {"count": len(outliers), "first": outliers[:OUTLIERS_SHOWN]}
    # Where the result rests on an estimate rather than measured profiles (e.g. FP8 KV priced from
    # bf16 tables, REFERENCE.md §1.14): one sentence each; absent when there is none.
    if p.approximations:
        stats["approximations"] = list(p.approximations)
    # What priced the iterations: per source (profiles.SOURCES) its hardware and iteration count.
    if p.latency_sources:
        by = {}
        for (source, hw), c in zip(p.latency_sources, counts):
            d = by.setdefault(source, {"model": profiles.SOURCES[source], "hardware": [], "iterations": 0})
            d["hardware"] = sorted(set(d["hardware"]) | {hw})
            d["iterations"] += c
        stats["latency_model"] = by
    if p.memory.get("tier_storage"):
        stats["kv_tier"] = tier_stats(p.memory, f.tier, ctr)
    if wall_s is not None:
        stats["wall_s_with_compile"] = wall_s
    power = None if p.power is None else power_info(p, f, rows, row_inst[by_end])
    return SimResult(
        arrival_ns=arrival, first_scheduled_ns=np.asarray(f.first_scheduled),
        first_token_ns=np.asarray(f.first_token), finish_ns=np.asarray(f.finish),
        input_toks=np.asarray(w.input_toks), output_toks=np.asarray(w.output_toks),
        prefix_hit_tokens=np.asarray(f.prefix_hit), num_preemptions=np.asarray(f.num_preemptions),
        recomputed_tokens=np.asarray(f.recomputed), instance=np.asarray(f.instance),
        token_times_ns=np.asarray(f.token_times) if f.token_times.shape[0] == offsets[-1] else np.zeros(0, np.int64),
        token_offsets=offsets,
        iter_start_ns=rows["start"], iter_end_ns=rows["end"], iter_prompt_tokens=rows["prompt_tokens"],
        iter_gen_tokens=rows["gen_tokens"], iter_num_tokens=rows["num_tokens"], iter_num_seqs=rows["num_seqs"],
        iter_running=rows["running"], iter_waiting=rows["waiting"], iter_kv_blocks_used=rows["kv_used"],
        num_blocks=p.num_blocks, block_size=p.block_size, stats=stats,
        iter_instance=row_inst[by_end] if n_inst > 1 else None,
        prefill_instance=np.asarray(f.prefill_instance) if pd else None,
        prefill_end_ns=np.asarray(f.prefill_end) if pd else None,
        kv_ready_ns=np.asarray(f.kv_ready) if pd else None,
        kv_transfer_bytes=np.asarray(f.kv_bytes) if pd else None,
        iter_prefix_queried=rows["prefix_queried"], iter_prefix_hits=rows["prefix_hits"],
        iter_kv_blocks_cached=rows["kv_cached"],
        **({f"iter_{k}": rows[k] for k in ("tier_hits", "tier_recalled", "tier_resident", "tier_written")}
           if p.memory.get("tier_storage") else {}),
        memory=p.memory or None, iter_busy_ns=rows["busy_ns"], iter_pim_ns=rows["pim_ns"],
        iter_pim_io_bytes=rows["pim_io_bytes"],
        request_npu_energy_j=None if power is None else np.asarray(f.request_npu_j),
        power=power)


def power_info(p: "simulator.Prepared", f: cluster.ClusterState, rows: dict, row_inst) -> dict:
    """``SimResult.power``: the run's metered activity per instance (engine/power.py) and the
    bytes it moved off the GPUs and over the links, with what pricing them needs
    (``Prepared.power``; :func:`jaxsim.power.energy`, :func:`jaxsim.power.power_series`)."""
    info = p.power
    n_inst = len(info["instances"])
    node_of = [ip.node for ip in info["instances"]]
    row_dram = (np.array([ip.wload_bytes for ip in info["instances"]], np.float64)[row_inst]
                + np.asarray(rows["pim_io_bytes"], np.float64))
    mem = p.memory or {}
    chunk, recalled, written, write_events = np.zeros(n_inst), np.zeros(n_inst), {}, {}
    if mem.get("tier_storage"):
        chunk = np.asarray(mem["tier_chunk_bytes"], np.float64)
        recalled = np.asarray(f.inst.counters.tier_recalled, np.float64)
        cum_recalled = np.asarray(rows["tier_recalled"], np.int64)
        for i in range(n_inst):  # recalls: per instance, the cumulative counter's steps
            r = np.nonzero(row_inst == i)[0]
            row_dram[r] += np.diff(cum_recalled[r], prepend=0) * chunk[i]
        written, write_events = _write_through(mem, f, rows, row_inst, node_of)
    pre = np.asarray(f.prefill_instance)
    sent = np.asarray(f.kv_bytes, np.float64)
    kv_sent = np.array([sent[pre == i].sum() for i in range(n_inst)])
    link_events: dict = {}
    for i in np.unique(pre[pre >= 0]):  # P/D: the KV each prefill instance sent, when its prefill ended
        mine = pre == i
        link_events.setdefault(node_of[i], []).append((np.asarray(f.prefill_end)[mine], sent[mine]))
    out = power_lib.run_info(info, {k: getattr(f.power, k) for k in power_lib.ACTIVITY_FIELDS}, recalled, written,
                             chunk, kv_sent)
    out.update(row_dram_bytes=row_dram, write_events=write_events, link_events=link_events)
    return out


def _write_through(mem: dict, f, rows: dict, row_inst, node_of) -> tuple:
    """Chunks written through to each KV-tier pool (charged to its first instance, ``{first:
    chunks}``) and, per node, when they were written (``{node: [(ns [k], bytes [k])]}``: the steps
    of the pool's cumulative counter at its instances' iteration rows)."""
    pool_of, chunk = np.asarray(mem["tier_pool_of"]), np.asarray(mem["tier_chunk_bytes"], np.float64)
    written, events = {}, {}
    for pool in np.unique(pool_of):
        first = int(np.argmax(pool_of == pool))
        written[first] = int(np.asarray(f.tier.written)[pool])
        r = np.nonzero(pool_of[row_inst] == pool)[0]
        cum = np.maximum.accumulate(np.asarray(rows["tier_written"], np.int64)[r]) if r.size else r
        events.setdefault(node_of[first], []).append((np.asarray(rows["end"], np.int64)[r],
                                                      np.diff(cum, prepend=0) * chunk[first]))
    return written, events


def tier_stats(memory: dict, tier, ctr) -> dict:
    """The KV tier's run totals: tokens served to admitted requests, hit tokens as the prefix-cache
    counters count them, chunks recalled (all instances), and per pool in
    use its resident, written and evicted chunks and the bytes they are (``memory``:
    :func:`jaxsim.simulator.memory_layout`; ``tier``: the final ChunkPools; ``ctr``: the summed
    instance counters)."""
    pool_of, chunk = np.asarray(memory["tier_pool_of"]), np.asarray(memory["tier_chunk_bytes"])
    pools = sorted(set(pool_of.tolist()))
    per = {}
    for p in pools:
        b = int(chunk[np.argmax(pool_of == p)])
        per[str(p)] = dict(instances=np.flatnonzero(pool_of == p).tolist(), capacity_chunks=int(tier.capacity[p]),
                           resident_chunks=int(tier.resident[p]), written_chunks=int(tier.written[p]),
                           evicted_chunks=int(tier.evicted[p]), resident_gib=int(tier.resident[p]) * b / 2**30,
                           written_gib=int(tier.written[p]) * b / 2**30)
    # hit_tokens: as the prefix-cache counters count them (every admission attempt by default, like
    # vLLM's external prefix-cache counters); served_tokens: loaded into admitted requests
    return dict(storage=memory["tier_storage"], served_tokens=int(ctr.tier_served), hit_tokens=int(ctr.tier_hits),
                recalled_chunks=int(ctr.tier_recalled), pools=per)
