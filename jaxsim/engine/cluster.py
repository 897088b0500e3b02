"""The simulation loop: a cluster of instances advanced one engine iteration at a time.

The whole run is one loop inside one ``jit`` (:func:`run`); a batch of configurations is the same
loop under ``vmap`` (:func:`run_batch`). Every loop is a ``masked_while_loop`` (engine/loops.py):
each step is a no-op for a configuration that is done, so batching never copies the state per trip.

One step (:func:`step`) is a straight line of phases, each a small function of
``(static, params, workload, state)``:

1. :func:`_clock`: which instances act in this step, and at what time. Instances interact only
   when requests are routed, so between those moments each instance advances on its own clock
   (a *lane* step: every instance whose next event comes first processes it); a *global* step
   routes the arrivals and releases of one moment.
2. :func:`end_batches`: the batches that end now finish (tokens emitted, finished requests
   released; pipelines, P/D KV transfers).
3. :func:`write_request_outputs`: per-request outputs (token times, TTFT, finish, ...).
4. :func:`schedule_releases`: P/D hand-offs and agentic sub-requests get their release times.
5. :func:`admit_arrivals`: route arrivals and releases (global steps) and fill request slots.
6. :func:`record_iterations`: the meters see the iterations that ended.
7. :func:`start_batches`: each idle acting instance schedules a batch (vLLM's scheduler) and the
   latency model times it.
8. :func:`leap_decodes`: an instance that started a steady decode batch runs the ends of its
   next batches now, up to the next moment a request may reach it (engine/leap.py).
9. :func:`advance_clock`: retries, stall detection, the global clock.

The state has an instance axis throughout (``InstanceState`` leaves are ``[instance, ...]``,
per-instance work is ``vmap``-ed). The static feature set (:class:`jaxsim.engine.static.Static`)
says which variants compile. Time is int64 nanoseconds (x64 is enabled by ``jaxsim``): exact
however long the run. A run ends with one :class:`jaxsim.engine.status.Status`.
"""

import dataclasses
import functools
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from jaxsim.engine import costs, disagg, leap, meters, pipeline, power
from jaxsim.engine import instance as inst_lib
from jaxsim.engine import routing
from jaxsim.engine.instance import I32, I64, NEVER, RUNNING, WAITING
from jaxsim.engine.loops import masked_while_loop
from jaxsim.engine.ops import expand_ranges, prefix_sum
from jaxsim.engine.routing import PREFILL
from jaxsim.engine.static import Static
from jaxsim.engine.status import run_status
from jaxsim.engine.vmap import per_instance
from jaxsim.latency.base import AbstractLatencyModel, BatchShape


class WorkloadArrays(eqx.Module):
    """The trace, shared by every configuration. Request ids are trace lines."""

    arrival_sorted: Int[Array, " req"]  # arrival times in (arrival, id) order, int64 ns (NEVER for
    # agentic sub-requests after the first: they are released during the run, at the end of the order)
    order: Int[Array, " req"]  # request id at each position of that order
    prompt: Int[Array, " req"]
    output: Int[Array, " req"]
    hashes: Int[Array, "req mb"]  # dense prefix-hash ids of full blocks, -1 padded
    n_hashes: Int[Array, " req"]
    token_offset: Int[Array, " req"]  # start of the request's output tokens in token_times
    next_in_session: Int[Array, " req"]  # the agentic sub-request released when this one finishes, -1
    tool_ns: Int[Array, " req"]  # its predecessor's tool time: released at that finish + tool_ns
    chunks: Int[Array, "req mc"]  # dense ids of the KV-tier chunk keys of its full chunks, -1 padded


class EngineParams(eqx.Module):
    """Per-instance numeric parameters (leaves have a leading instance axis)."""

    sched: inst_lib.SchedulerParams
    latency: AbstractLatencyModel  # times an iteration from its batch shape (jaxsim/latency)
    # The parallel layout the loop itself needs (never read from the latency model):
    pp: Int[Array, ""]  # pipeline stages (REFERENCE.md §1.8)
    num_layers: Int[Array, ""]  # transformer blocks (a KV transfer streams layer by layer)
    tp: Int[Array, ""]  # TP ranks (each sends its shard of a KV transfer)
    # Engine costs beyond the GPU (engine/costs.py, Calibration)
    iteration_overhead_ns: Int[Array, ""]
    step_cpu_ns: Int[Array, ""]
    seq_cpu_ns: Int[Array, ""]
    first_token_delay_ns: Int[Array, ""]
    token_output_delay_ns: Int[Array, ""]
    # False for an instance that only pads a smaller cluster design to a sweep's instance count:
    # arrivals are never routed to it, so it stays idle.
    routable: Bool[Array, ""]
    role: Int[Array, ""]  # routing.COLOCATED | PREFILL | DECODE
    node: Int[Array, ""]  # the node it sits on (selects the link level of a KV transfer)
    kv_token_bytes: Int[Array, ""]  # K+V bytes of one token, all layers, all TP ranks
    kv_link_bw: Float[Array, " 2"]  # bytes/ns of its KV links: [within its node, to other nodes]
    kv_link_latency: Float[Array, " 2"]  # ns per message on those links
    kv_layerwise: Bool[Array, ""]  # stream KV layer by layer during prefill (else send it after)
    dp_group: Int[Array, ""]  # wave-synchronised DP group (an instance index), -1 for none
    # ns each shared memory device (a node's host memory, a CXL device) is busy with one iteration's
    # weight loads (building.weight_load_devices); [0] when no weights sit off a GPU
    wload_busy: Int[Array, " dev"]
    # The power meter's values (engine/power.py); None: the run meters no power (nothing compiles).
    power: "power.PowerParams | None" = None


class ClusterState(eqx.Module):
    now: Int[Array, ""]  # int64 ns
    next_pending: Int[Array, ""]  # position in arrival order of the first request not yet routed
    inst: inst_lib.InstanceState  # [instance, ...]
    router: routing.RouterState  # per-instance queues of routed requests (unused with one instance)
    releases: routing.Releases  # requests entering queues during the run (P/D hand-offs, sessions)
    link_free: Int[Array, " inst"]  # when each instance's outgoing KV link is next free, ns
    retry_at: Int[Array, " inst"]  # an idle instance schedules again at this time (NEVER: no retry)
    finished: Int[Array, ""]
    stalled: Bool[Array, ""]  # nothing runs, nothing arrives, work is left: a request never fits
    steps: Int[Array, ""]
    max_steps: Int[Array, ""]  # the run stops after this many steps (Status.STEP_LIMIT): a guard
    status: Int[Array, ""]  # engine/status.py Status, set when the loop ends
    # Per-request outputs, written at emission and at finish.
    first_token: Int[Array, " req"]
    finish: Int[Array, " req"]
    first_scheduled: Int[Array, " req"]
    prefix_hit: Int[Array, " req"]
    num_preemptions: Int[Array, " req"]
    recomputed: Int[Array, " req"]
    instance: Int[Array, " req"]
    arrival: Int[Array, " req"]  # release time of an agentic sub-request (-1: the trace's arrival)
    prefill_instance: Int[Array, " req"]  # P/D: the prefill instance, -1 without a hand-off
    prefill_end: Int[Array, " req"]  # P/D: end of the iteration that completed the prefill
    kv_ready: Int[Array, " req"]  # P/D: when the last KV layer reached the decode instance
    kv_bytes: Int[Array, " req"]  # P/D: KV bytes sent (all layers and ranks)
    token_times: Int[Array, " tok"]
    # Per-iteration rows [instance, iteration]. Kept out of InstanceState so that the large
    # buffers never pass through the scheduler's conditionals (which may copy their operands).
    records: meters.Records  # the IterationRecords meter
    # The KV tier below the GPU pools (engine/kvtier.py; () without one), and per request the
    # chunks of it already written down (a request writes each of its chunks once).
    tier: Any = ()
    tier_written: "Int[Array, ' req'] | None" = None
    # When each shared memory device is next free of weight loads, ns (None when no weights sit off
    # a GPU: EngineParams.wload_busy has no device).
    dev_free: "Int[Array, ' dev'] | None" = None
    # What the batch ends run early by decode leaps emitted, written by the next step (None
    # when the run compiles no leaps, Static.leaps; engine/leap.py).
    pending: "leap.Pending | None" = None
    # The power meter (engine/power.py; None without one): activity per instance, and per request
    # its share of the dynamic NPU energy of the iterations that scheduled it, J.
    power: "power.Activity | None" = None
    request_npu_j: "Float[Array, ' req'] | None" = None


def _route(inst: inst_lib.InstanceState, wl: WorkloadArrays, next_pending, now, active):
    """Move arrived requests (arrival <= now) into free slots of instance 0, in arrival order.

    Requests that find no free slot stay pending: for one instance that is the tail of the
    waiting queue, so the schedule is unchanged (they are counted in the waiting gauge).
    """
    # Only the per-request fields change; the block table is left alone (it is large).
    fields = inst_lib.ROUTED_FIELDS
    s = {f: getattr(inst.slots, f)[0] for f in fields}
    n_req = wl.arrival_sorted.shape[0]
    arrived = jnp.searchsorted(wl.arrival_sorted, now, side="right", method="scan_unrolled").astype(I32)
    arrived = jnp.where(active, arrived, next_pending)
    free = s["status"] == inst_lib.EMPTY
    n_route = jnp.minimum(arrived - next_pending, jnp.sum(free.astype(I32), dtype=I32))
    rank = prefix_sum(free.astype(I32)) - 1
    take = free & (rank < n_route)
    pos = jnp.minimum(next_pending + rank, n_req - 1)
    s = inst_lib.routed_slot_values(s, take, pos, wl, now)
    slots = eqx.tree_at(lambda x: tuple(getattr(x, f) for f in fields), inst.slots,
                        tuple(getattr(inst.slots, f).at[0].set(s[f]) for f in fields))
    unrouted = arrived - next_pending - n_route
    # Overflow: arrivals wait outside while no slot holds a waiting request, so the scheduler
    # could stop admitting for lack of slots rather than for a vLLM reason.
    no_waiting_slot = ~jnp.any(s["status"] == WAITING)
    overflow = inst.counters.slot_overflow.at[0].set(
        inst.counters.slot_overflow[0] | ((unrouted > 0) & no_waiting_slot))
    inst = eqx.tree_at(lambda i: (i.slots, i.counters.slot_overflow), inst, (slots, overflow))
    return inst, next_pending + n_route, unrouted


def weight_load_waits(busy, free, now, start):
    """Weight loads of instances sharing a memory device queue behind each other (REFERENCE.md
    §1.10: loads queue on their memory device; a node's host memory, a CXL device). ``busy``
    [inst, dev]: ns each device is busy with one iteration's loads of each instance; ``free`` [dev]:
    when each device is next free; ``now``, ``start`` [inst]: the instances starting a batch now.
    The starters' loads are served in instance order after the device frees up. Returns
    ``(wait [inst], free [dev])``: how long each starter's loads wait for its most contended
    device (added to its iteration: a bound, exact when the iteration is load-bound), and when
    each device is free again."""
    use = (busy > 0) & start[:, None]
    b = jnp.where(use, busy, 0)
    prior = jnp.cumsum(b, axis=0) - b  # the earlier starters' loads on each device
    base = jnp.maximum(free[None, :], now[:, None])
    wait = jnp.max(jnp.where(use, base + prior - now[:, None], 0), axis=1)
    return wait, jnp.maximum(free, jnp.max(jnp.where(use, base + prior + b, 0), axis=0))


def _start_batches_one_stage(inst, prm: EngineParams, wl, now, active, *, block_size, window, ring_cap,
                             dp_sync: bool, kv_tier, tier_state, dev_free=None):
    """On every idle instance, schedule a batch and compute when it ends.

    With ``dp_sync``, the members of a DP group (``EngineParams.dp_group``) run wave-synchronous
    rounds as vLLM does for MoE data parallelism (REFERENCE.md §1.8): when any member has a batch,
    every member runs one (an idle member a dummy: 1 token, 1 decode at KV length 1), each is
    padded to the group's largest token count (dense layers see the padded T; per-sequence layers
    see S + the padding, each pad token counting as a sequence; attention sees the real requests
    only; the MoE collectives the padded T), and the round ends for all when its slowest member
    is done.

    A batch that recalls KV from the tier below (``kv_tier``) waits for it before its first layer;
    the recalls from one pool queue behind each other. Returns the instances and the tier's state.
    """

    def plan(inst, prm, now, active):
        inst = inst_lib.schedule(inst, prm.sched, wl, now, active, block_size=block_size, window=window,
                                 ring_cap=ring_cap, kv_tier=kv_tier, tier_state=tier_state)  # no-op when busy
        return inst, inst_lib.batch_shape(inst.slots)

    inst, shape = per_instance(plan)(inst, prm, now, active)
    idle = ~inst.busy & active
    start = idle & (shape.seqs > 0)
    pad = jnp.zeros_like(shape.tokens)
    if dp_sync:
        n_inst = inst.busy.shape[0]
        member = prm.dp_group >= 0
        gid = jnp.where(member, prm.dp_group, n_inst)  # non-members: a group of their own, never read

        def group_max(x):
            return jax.ops.segment_max(x, gid, num_segments=n_inst + 1)[gid]

        runs = member & idle & (group_max((start & member).astype(I32)) > 0)
        dummy = runs & ~start
        shape = BatchShape.where(dummy, BatchShape.dummy_like(shape), shape)
        pad = jnp.where(runs, group_max(jnp.where(runs, shape.tokens, 0)) - shape.tokens, 0)
        start = start | runs
    padded = shape.padded(pad)
    dt, extrap = per_instance(lambda model, shape: model.iteration_time(shape))(prm.latency, padded)
    # its PIM channel time and I/O bytes (zeros, compiled away, without PIM; the power meter's), and
    # the NPU's own work: with PIM the NPU waits for PIM results part of the iteration
    pim, pim_io = per_instance(lambda model, shape: model.pim_work(shape))(prm.latency, padded)
    npu = dt
    if prm.latency.needs_slots:
        npu = per_instance(lambda model, shape: model.npu_time(shape))(prm.latency, padded)
    recall, tier_state = kv_tier.recall(tier_state, prm.sched.tier_pool, inst.recall_chunks,
                                        kv_tier.chunk_bytes(prm.kv_token_bytes, block_size), now, start)
    gpu = dt.astype(I64) + recall  # the recall comes before layer 0
    if dev_free is not None:  # weights off the GPU on shared memory devices
        wait, dev_free = weight_load_waits(prm.wload_busy, dev_free, now, start)
        gpu = gpu + wait
    end = now + gpu + costs.host_time_ns(gpu, padded.seqs, *costs.host_args(prm))
    if dp_sync:
        end = jnp.where(runs, jax.ops.segment_max(jnp.where(runs, end, 0), gid, num_segments=n_inst + 1)[gid], end)
    extrapolated = inst.counters.extrapolated + jnp.where(start[:, None], (extrap > 0).astype(I32), 0)

    def pick(new, old):
        return jnp.where(start, new, old)

    return eqx.tree_at(
        lambda i: (i.busy, i.batch_start, i.batch_end, i.batch_tokens, i.batch_seqs, i.batch_busy,
                   i.batch_pim, i.batch_pim_io, i.counters.extrapolated),
        inst, (inst.busy | start, pick(now, inst.batch_start), pick(end, inst.batch_end),
               pick(padded.tokens, inst.batch_tokens), pick(padded.seqs, inst.batch_seqs),
               pick(npu.astype(I64), inst.batch_busy), pick(pim, inst.batch_pim), pick(pim_io, inst.batch_pim_io),
               extrapolated)), tier_state, dev_free


def _drain_if_stuck(inst, active, *, ring_cap):
    """An idle instance with work left whose batch came out empty because requests parked as
    FINISHING (async scheduling) still hold their blocks: vLLM then processes those outputs and
    schedules again. Release them; the loop retries at the same instant."""
    s = inst.slots
    work = jnp.any((s.status == WAITING) | (s.status == RUNNING))
    retry = active & (~inst.busy) & work & jnp.any(s.status == inst_lib.FINISHING)
    inst = inst_lib.release_parked(inst, retry, ring_cap)
    return inst, retry


class Clock(eqx.Module):
    """Who acts in a step, and at what time (see :func:`_clock`)."""

    now: Int[Array, " inst"]  # each instance's time in this step, ns
    acts: Bool[Array, " inst"]  # the instance processes its event (or, in a global step, the moment)
    is_global: Bool[Array, ""]  # arrivals and releases up to ``horizon`` are routed in this step
    horizon: Int[Array, ""]  # the next moment at which instances interact, ns


def _group_min(x, prm: EngineParams):
    """Per instance, the minimum of ``x`` over its DP group (itself when it has none)."""
    n_inst = x.shape[0]
    member = prm.dp_group >= 0
    gid = jnp.where(member, prm.dp_group, n_inst)
    return jnp.where(member, jax.ops.segment_min(x, gid, num_segments=n_inst + 1)[gid], x)


def _next_arrival(wl: WorkloadArrays, next_pending):
    """The arrival time of the first request not yet routed (NEVER when all are), ns."""
    n_req = wl.arrival_sorted.shape[0]
    return jnp.where(next_pending < n_req, wl.arrival_sorted[jnp.minimum(next_pending, n_req - 1)], NEVER)


def _clock(static: Static, prm: EngineParams, wl: WorkloadArrays, st: ClusterState, active) -> Clock:
    """Per-instance clocks of a cluster step (several instances, or requests released in the run).

    Instances interact only when a request is routed (an arrival, a release) and, under P/D and
    agentic sessions, when an instance releases a request at the end of one of its iterations.
    The *horizon* is the next such moment: the next arrival or release, and the next event of an
    instance that may release a request (a prefill instance, an instance holding a request with
    an agentic successor). Before it, every instance is on its own: each instance whose next
    event (a batch end, or a retry) comes before the horizon processes it at its own time, all
    in the same step (a *lane* step, no routing). When no instance has an event before the
    horizon, the step is *global*: at the horizon, batches that end then finish, arrivals and
    releases are routed, and idle instances start, exactly as a step of one shared clock would.
    So a step costs one iteration of each instance that has one, and a run takes about as many
    steps as its busiest instance has iterations (plus one per arrival), not one per event of
    every instance. Members of a wave-synchronised DP group share their next event.

    A lone instance (:attr:`Static.lone`) keeps one clock: it sees arrivals at its batch ends,
    its only decision points, and every step is global.
    """
    if static.lone:
        return Clock(now=jnp.broadcast_to(st.now, (1,)), acts=jnp.broadcast_to(active, (1,)), is_global=active,
                     horizon=st.now)
    inst = st.inst
    event = jnp.where(inst.busy, inst.batch_end, st.retry_at)
    if static.dp_sync:
        event = _group_min(event, prm)
    next_arrival = _next_arrival(wl, st.next_pending)
    horizon = jnp.maximum(next_arrival, st.now)
    if static.releases:
        producer = (prm.role == PREFILL) | (st.releases.holders > 0)
        horizon = jnp.minimum(horizon, jnp.minimum(jnp.min(st.releases.release_at),
                                                   jnp.min(jnp.where(producer, event, NEVER))))
    due = event < horizon
    is_global = ~jnp.any(due)
    acts = active & jnp.where(is_global, horizon < NEVER, due)
    return Clock(now=jnp.where(is_global, horizon, event), acts=acts, is_global=active & is_global, horizon=horizon)


class Ended(eqx.Module):
    """What the batch ends of one step produced (see :func:`end_batches`)."""

    ending: Bool[Array, " inst"]  # an iteration of the instance ended in this step
    emissions: inst_lib.Emissions  # per (instance, slot), flattened
    inst_id: Int[Array, " inst_slot"]  # the instance of each emission
    stamp: Int[Array, " inst_slot"]  # when the client has the token (end + output delay), ns
    prompt_tokens: Int[Array, " inst"]
    gen_tokens: Int[Array, " inst"]
    kv_ready: Int[Array, "inst slot"]  # P/D: arrival of a completed prefill's last KV layer (NEVER)
    kv_sent: Int[Array, "inst slot"]  # P/D: KV bytes sent in this iteration
    npu_j: "Float[Array, 'inst slot'] | None" = None  # the requests' shares of the NPU energy (power meter)


def end_batches(static: Static, prm: EngineParams, st: ClusterState, clk: Clock) -> "tuple[ClusterState, Ended]":
    """Finish the batches that end at each acting instance's time (REFERENCE.md §1.1): emit
    tokens, release finished requests; under P/D, send the KV of prefills (:mod:`disagg`)."""
    inst, now = st.inst, clk.now
    if static.pipelined:
        before = inst
        inst, ending, in_b = per_instance(pipeline.ending_view)(inst, now, clk.acts)
        st = eqx.tree_at(lambda s: s.inst, st, inst)
    else:
        ending = clk.acts & inst.busy & (inst.batch_end == now)
    if static.releases:
        kv_ready, kv_sent, link_free = disagg.kv_transfer(st, prm, ending, now)
        st = eqx.tree_at(lambda s: s.link_free, st, link_free)
    else:
        kv_ready = kv_sent = jnp.zeros_like(inst.slots.req)
    npu_j = None
    if prm.power is not None:
        npu_j = power.request_npu_joules(prm.power, prm.tp, ending, inst.slots.sched_n, inst.batch_tokens,
                                         inst.batch_busy)
    inst, ev, ptok, gtok = per_instance(functools.partial(inst_lib.end_iteration, ring_cap=static.ring_cap))(
        inst, prm.sched.async_scheduling, prm.role == PREFILL, ending, now)
    if static.pipelined:
        inst = per_instance(pipeline.after_end)(inst, before, ending, in_b)
    n_inst = inst.busy.shape[0]
    ev = jax.tree.map(lambda x: x.reshape(-1), ev)  # flattened over (instance, slot)
    inst_id = jnp.repeat(jnp.arange(n_inst, dtype=I32), ev.req.shape[0] // n_inst)
    delay = jnp.where(ev.first_emit, prm.first_token_delay_ns[inst_id], prm.token_output_delay_ns[inst_id])
    ended = Ended(ending=ending, emissions=ev, inst_id=inst_id, stamp=now[inst_id] + delay, prompt_tokens=ptok,
                  gen_tokens=gtok, kv_ready=kv_ready, kv_sent=kv_sent, npu_j=npu_j)
    return eqx.tree_at(lambda s: s.inst, st, inst), ended


def write_request_outputs(wl: WorkloadArrays, st: ClusterState, out: Ended) -> ClusterState:
    """Per-request outputs from the emissions of every instance: token times, first token,
    finish; at a finish or a hand-off, what the request carries (first scheduling, prefix hits,
    preemptions, recomputed tokens)."""
    ev, n_req = out.emissions, st.finish.shape[0]
    req = jnp.maximum(ev.req, 0)
    tok_pos = jnp.where(ev.emit, wl.token_offset[req] + ev.token_index, st.token_times.shape[0])
    stamp = out.stamp
    if st.pending is not None:  # the previous step's early ends, in the same write
        pos, at = st.pending.token_writes(st.token_times.shape[0])
        tok_pos, stamp = jnp.concatenate([tok_pos, pos]), jnp.concatenate([stamp, at])
    first_pos = jnp.where(ev.first_emit, req, n_req)
    fin = jnp.where(ev.finish, req, n_req)
    # A hand-off carries the request's outputs so far to its decode instance, like a finish.
    carry = jnp.where(ev.finish | ev.handoff, req, n_req)
    if out.npu_j is not None:
        st = dataclasses.replace(st, request_npu_j=st.request_npu_j.at[jnp.where(ev.req >= 0, req, n_req)].add(
            out.npu_j.reshape(-1), mode="drop"))
    return eqx.tree_at(
        lambda s: (s.token_times, s.first_token, s.finish, s.first_scheduled, s.prefix_hit,
                   s.num_preemptions, s.recomputed, s.instance, s.finished),
        st, (st.token_times.at[tok_pos].set(stamp, mode="drop"),
             st.first_token.at[first_pos].set(out.stamp, mode="drop"),
             st.finish.at[fin].set(out.stamp, mode="drop"),
             st.first_scheduled.at[carry].set(ev.first_scheduled, mode="drop"),
             st.prefix_hit.at[carry].set(ev.prefix_hit, mode="drop"),
             st.num_preemptions.at[carry].set(ev.num_preemptions, mode="drop"),
             st.recomputed.at[carry].set(ev.recomputed, mode="drop"),
             st.instance.at[fin].set(out.inst_id, mode="drop"),
             st.finished + jnp.sum(ev.finish.astype(I32), dtype=I32)))


def schedule_releases(prm: EngineParams, wl: WorkloadArrays, st: ClusterState, out: Ended,
                      clk: Clock) -> ClusterState:
    """Requests that will enter a queue later (``Static.releases``): a hand-off when its last KV
    layer reaches its decode instance; an agentic sub-request when the client has its
    predecessor's last token plus the tool time (REFERENCE.md §1.7, §1.15)."""
    ev, rel = out.emissions, st.releases
    n_req, n_inst = st.finish.shape[0], st.inst.busy.shape[0]
    req = jnp.maximum(ev.req, 0)
    hand = jnp.where(ev.handoff, req, n_req)
    ready = out.kv_ready.reshape(-1)
    nxt = wl.next_in_session[req]
    child = jnp.where(ev.finish & (nxt >= 0), nxt, n_req)
    child_at = out.stamp + wl.tool_ns[jnp.maximum(nxt, 0)]
    release_at = rel.release_at.at[hand].set(ready, mode="drop").at[child].set(child_at, mode="drop")
    let_go = (ev.finish | ev.handoff) & (ev.req >= 0) & (nxt >= 0)  # no longer held by its instance
    rel = eqx.tree_at(lambda r: (r.release_at, r.kv_in, r.holders), rel,
                      (release_at, rel.kv_in.at[hand].set(wl.prompt[req], mode="drop"),
                       rel.holders.at[jnp.where(let_go, out.inst_id, n_inst)].add(-1, mode="drop")))
    return eqx.tree_at(
        lambda s: (s.releases, s.prefill_instance, s.prefill_end, s.kv_ready, s.kv_bytes, s.arrival),
        st, (rel, st.prefill_instance.at[hand].set(out.inst_id, mode="drop"),
             st.prefill_end.at[hand].set(clk.now[out.inst_id], mode="drop"),
             st.kv_ready.at[hand].set(ready, mode="drop"),
             st.kv_bytes.at[jnp.where(ev.req >= 0, req, n_req)].add(out.kv_sent.reshape(-1), mode="drop"),
             st.arrival.at[child].set(child_at, mode="drop")))


def admit_arrivals(static: Static, prm: EngineParams, wl: WorkloadArrays, st: ClusterState, clk: Clock,
                   active) -> "tuple[ClusterState, Int[Array, ' inst']]":
    """Route the arrivals (and releases) up to the horizon in a global step, then move queued
    requests into free slots. Returns the state and, per instance, the requests routed to it
    that wait outside its slots."""
    inst, rs, rel = st.inst, st.router, st.releases
    if static.lone:  # arrivals wait in arrival order outside the slots: no queue needed
        inst, next_pending, unrouted = _route(inst, wl, st.next_pending, st.now, active)
        return eqx.tree_at(lambda s: (s.inst, s.next_pending), st, (inst, next_pending)), unrouted[None]
    arrived = jnp.searchsorted(wl.arrival_sorted, clk.horizon, side="right", method="scan_unrolled").astype(I32)
    next_pending = jnp.where(clk.is_global, arrived, st.next_pending)
    pd = static.releases  # P/D routing picks decode instances only when some instance hands off
    rs, rel = routing.route_arrivals(inst, rs, rel, prm.sched, prm.routable, prm.role, wl, st.next_pending,
                                     next_pending, router=static.router, block_size=static.block_size, pd=pd)
    reentries = None
    if static.releases:
        rs, rel = routing.release_due(inst, rs, rel, prm.sched, prm.routable, prm.role, wl,
                                      jnp.where(clk.is_global, clk.horizon, -1), router=static.router,
                                      block_size=static.block_size, pd=pd)
        reentries = inst_lib.Reentries(
            req=rel.entry_req, kv_in=rel.kv_in, carried_first_scheduled=st.first_scheduled,
            carried_prefix_hit=st.prefix_hit, carried_num_preemptions=st.num_preemptions,
            carried_recomputed=st.recomputed)
    inst, rs, queued = routing.fill_slots(inst, rs, wl, clk.now, reentries)
    return eqx.tree_at(lambda s: (s.inst, s.router, s.releases, s.next_pending), st,
                       (inst, rs, rel, next_pending)), queued


def record_iterations(prm: EngineParams, st: ClusterState, out: Ended, clk: Clock, queued) -> ClusterState:
    """Show the iterations that ended to the meters (gauges after routing; ``queued``: per
    instance, requests routed to it that wait outside its slots) and count them."""
    inst = st.inst
    status = inst.slots.status
    it = meters.IterationEnd(
        ending=out.ending, index=inst.n_iters, start=inst.batch_start, end=clk.now, prompt_tokens=out.prompt_tokens,
        gen_tokens=out.gen_tokens, num_tokens=inst.batch_tokens, num_seqs=inst.batch_seqs, busy_ns=inst.batch_busy,
        pim_ns=inst.batch_pim, pim_io_bytes=inst.batch_pim_io, running=jnp.sum((status == RUNNING).astype(I32), axis=-1, dtype=I32),
        waiting=jnp.sum((status == WAITING).astype(I32), axis=-1, dtype=I32) + queued,
        kv_used=prm.sched.num_blocks - inst.pool.num_free, kv_cached=inst.pool.num_cached_free,
        prefix_queried=inst.counters.prefix_requested, prefix_hits=inst.counters.prefix_hits,
        tier_hits=inst.counters.tier_hits, tier_recalled=inst.counters.tier_recalled,
        tier_resident=inst.counters.tier_resident, tier_written=inst.counters.tier_written)
    if st.pending is not None:  # the previous step's early ends (they came first), in the same write
        it = jax.tree.map(lambda b, a: jnp.concatenate([b, a[:, None]], axis=1), st.pending.rows, it)
        st = eqx.tree_at(lambda s: s.pending.rows.ending, st, jnp.zeros_like(st.pending.rows.ending))
    if prm.power is not None:  # the power meter reads the rows in time order
        st = dataclasses.replace(st, power=power.PowerMeter(prm.power).update(st.power, it))
    return eqx.tree_at(lambda s: (s.records, s.inst.n_iters), st,
                       (meters.IterationRecords().update(st.records, it), inst.n_iters + out.ending.astype(I32)))


def start_batches(static: Static, prm: EngineParams, wl: WorkloadArrays, st: ClusterState, clk: Clock,
                  out: Ended) -> "tuple[ClusterState, Bool[Array, ' inst']]":
    """Each idle acting instance forms its next batch and the latency model times it; then an
    instance whose batch came out empty only because finished requests still hold their blocks
    (async scheduling) releases them and retries at once. Returns the state and the retries."""
    kw = dict(block_size=static.block_size, window=static.window, ring_cap=static.ring_cap, kv_tier=static.kv_tier,
              tier_state=st.tier)
    tier = st.tier
    if static.pipelined:
        inst = pipeline.start_batches(st.inst, prm, wl, clk.now, clk.acts, out.ending, max_pp=static.max_pp, **kw)
    else:
        inst, tier, dev_free = _start_batches_one_stage(st.inst, prm, wl, clk.now, clk.acts, dp_sync=static.dp_sync,
                                                        dev_free=st.dev_free, **kw)
    inst, retry = per_instance(functools.partial(_drain_if_stuck, ring_cap=static.ring_cap))(inst, clk.acts)
    if not static.pipelined:
        st = dataclasses.replace(st, dev_free=dev_free)
    return dataclasses.replace(st, inst=inst, tier=tier), retry


def _retry_at(st: ClusterState, clk: Clock, retry) -> Int[Array, " inst"]:
    """Each instance's next retry after this step: now for an acting instance that retries, none
    for the others that acted, unchanged for the rest."""
    return jnp.where(clk.acts, jnp.where(retry, clk.now, NEVER), st.retry_at)


def leap_decodes(static: Static, prm: EngineParams, wl: WorkloadArrays, st: ClusterState, clk: Clock, started,
                 queued, retry) -> ClusterState:
    """Instances that started a steady decode batch run its end, and those of the batches after
    it, now, up to the next moment a request may be routed to them (:mod:`jaxsim.engine.leap`)."""
    inst = st.inst
    rel = st.releases if static.releases else None
    retry_at = _retry_at(st, clk, retry)
    producer = prm.role == PREFILL if rel is None else (prm.role == PREFILL) | (rel.holders > 0)
    limit = leap.next_routing(_next_arrival(wl, st.next_pending), None if rel is None else rel.release_at, producer,
                              inst.busy, inst.batch_end, retry_at)
    max_iters = st.records.start.shape[-1] if static.record_iterations else jnp.iinfo(I32).max
    inst0 = inst
    inst, pending = leap.leap(inst, prm, wl, started, queued, limit, max_trips=static.leap - 1, max_iters=max_iters,
                              block_size=static.block_size, window=static.window)
    if prm.power is not None:  # the early ends' shares: every running request, one token each
        rows = pending.rows
        busy = jnp.sum(jnp.where(rows.ending, rows.busy_ns, 0), axis=1)
        j = power.request_npu_joules(prm.power, prm.tp, jnp.any(rows.ending, axis=1), pending.running.astype(I32),
                                     inst0.batch_tokens, busy)
        n_req = st.request_npu_j.shape[0]
        req = jnp.where(inst0.slots.req >= 0, inst0.slots.req, n_req).reshape(-1)
        st = dataclasses.replace(st, request_npu_j=st.request_npu_j.at[req].add(j.reshape(-1), mode="drop"))
    return eqx.tree_at(lambda s: (s.inst, s.pending), st, (inst, pending))


def write_down(static: Static, prm: EngineParams, wl: WorkloadArrays, st: ClusterState, clk: Clock) -> ClusterState:
    """Write-through to the KV tier below (``Static.kv_tier``, REFERENCE.md §1.5): every chunk of
    a request's sequence that its indexed GPU blocks now fully cover is copied to its instance's
    pool (a chunk already there is only touched: its LRU age refreshed), visible from the end of
    the iteration that computes it; then each pool over its capacity evicts, and the instances
    see their pool's gauges. Runs once per step, for every instance: a shared pool sees the
    writes of all its instances in instance order."""
    tier, inst = static.kv_tier, st.inst
    sl = inst.slots
    n_inst, n_slots = sl.req.shape
    n_req, mc = wl.chunks.shape
    f = tier.chunk_blocks
    req = jnp.maximum(sl.req, 0).reshape(-1)
    hi = jnp.where(sl.req >= 0, sl.nreg // f, 0).reshape(-1)  # chunks covered by indexed blocks
    lo = st.tier_written[req]
    count = jnp.maximum(hi - lo, 0)
    ends = prefix_sum(count)
    visible_at = jnp.where(inst.busy, inst.batch_end, clk.now)  # the end of the iteration computing it
    window = static.window

    def cond(consts, c):
        return c[1] < consts[0][-1]

    def body(consts, c):  # past the last entry nothing is valid: a no-op
        ends, lo, req, pool_of, at, chunks = consts
        state, first = c
        q, offset, valid = expand_ranges(ends, first, window)
        j = lo[q] + offset
        chunk = chunks[req[q], jnp.minimum(j, mc - 1)]
        i = q // n_slots
        return tier.write(state, pool_of[i], chunk, valid & (chunk >= 0), at[i]), first + window

    state, _ = masked_while_loop(cond, body, (st.tier, jnp.asarray(0, I32)),
                                 (ends, lo, req, prm.sched.tier_pool, visible_at, wl.chunks))
    state = tier.settle(state)
    written = st.tier_written.at[jnp.where(count > 0, req, n_req)].max(hi, mode="drop")
    resident, total = tier.pool_stats(state, prm.sched.tier_pool)
    inst = eqx.tree_at(lambda i: (i.counters.tier_resident, i.counters.tier_written), inst, (resident, total))
    return dataclasses.replace(st, inst=inst, tier=state, tier_written=written)


def advance_clock(static: Static, wl: WorkloadArrays, st: ClusterState, clk: Clock, retry, active) -> ClusterState:
    """Set the next decision time (a lone instance) or the retries and the global clock (a
    cluster), detect a stall (nothing runs, nothing will arrive, requests are left), count the step."""
    n_req = wl.arrival_sorted.shape[0]
    next_arrival = _next_arrival(wl, st.next_pending)
    if static.releases:
        next_arrival = jnp.minimum(next_arrival, jnp.min(st.releases.release_at))
    busy = st.inst.busy
    if static.lone:
        any_busy = jnp.any(busy) | jnp.any(retry)
        next_end = jnp.min(jnp.where(busy, st.inst.batch_end, jnp.where(retry, st.now, NEVER)))
        # a lone instance sees arrivals at its next batch end (its only decision point)
        next_now = jnp.where(any_busy, next_end, jnp.maximum(next_arrival, st.now))
        retry_at = st.retry_at
    else:
        retry_at = _retry_at(st, clk, retry)
        any_busy = jnp.any(busy) | jnp.any(retry_at < NEVER)
        next_now = jnp.where(clk.is_global, clk.horizon, st.now)  # the last global moment
    # Nothing will happen: nothing runs and no request will arrive. For a lone instance that
    # includes arrivals already due that found no free slot (they wait outside the slots): the
    # instance just failed to schedule, so it would retry the same moment forever.
    nothing_arrives = next_arrival == NEVER
    if static.lone:
        nothing_arrives = nothing_arrives | (next_arrival <= st.now)
    stalled = (~any_busy) & nothing_arrives & (st.finished < n_req)
    return eqx.tree_at(lambda s: (s.now, s.retry_at, s.stalled, s.steps), st,
                       (jnp.where(active, next_now, st.now), retry_at, jnp.where(active, stalled, st.stalled),
                        st.steps + active.astype(I32)))


def _leaps(static: Static, prm: EngineParams) -> bool:
    """Decode leaps compile (``Static.leaps``) unless weights sit on shared memory devices (a leap
    restarts batches without queueing their loads, :func:`weight_load_waits`) or attention runs on
    PIM (its per-iteration PIM work is not logged by a leap)."""
    return static.leaps and prm.wload_busy.shape[-1] == 0 and not prm.latency.needs_slots


def step(static: Static, prm: EngineParams, wl: WorkloadArrays, st: ClusterState, active) -> ClusterState:
    """One step of the loop (see the module docstring). A no-op when not ``active``."""
    clk = _clock(static, prm, wl, st, active)
    st, out = end_batches(static, prm, st, clk)
    st = write_request_outputs(wl, st, out)
    if static.releases:
        st = schedule_releases(prm, wl, st, out, clk)
    st, queued = admit_arrivals(static, prm, wl, st, clk, active)
    st = record_iterations(prm, st, out, clk, queued)
    busy_before = st.inst.busy
    st, retry = start_batches(static, prm, wl, st, clk, out)
    if _leaps(static, prm):
        st = leap_decodes(static, prm, wl, st, clk, st.inst.busy & ~busy_before, queued, retry)
    if static.kv_tier.enabled:
        st = write_down(static, prm, wl, st, clk)
    return advance_clock(static, wl, st, clk, retry, active)


def init_state(inst: inst_lib.InstanceState, n_req: int, n_tokens: int, max_iters: int,
               releases: bool = False, max_steps=1 << 30, tier=()) -> ClusterState:
    """A fresh cluster state around the instances ``inst`` ([instance, ...]); ``tier``: the empty
    state of the KV tier below (``()`` for none)."""
    z64 = jnp.full(n_req, -1, I64)
    z32 = jnp.zeros(n_req, I32)
    zero = jnp.asarray(0, I32)
    n_inst = inst.busy.shape[0]
    # A queue can hold every request: routing never overflows it (one instance needs none,
    # unless requests are released during the run).
    router = routing.init_router(n_inst, n_req if n_inst > 1 or releases else 1)
    return ClusterState(
        now=jnp.asarray(0, I64), next_pending=zero, inst=inst, router=router,
        releases=routing.init_releases(n_inst, n_req), link_free=jnp.zeros(n_inst, I64),
        retry_at=jnp.full(n_inst, NEVER, I64), finished=zero,
        stalled=jnp.asarray(False), steps=zero, max_steps=jnp.asarray(max_steps, I32), status=zero,
        first_token=z64, finish=z64, first_scheduled=z64,
        prefix_hit=z32, num_preemptions=z32, recomputed=z32, instance=z32, arrival=z64,
        prefill_instance=jnp.full(n_req, -1, I32), prefill_end=z64, kv_ready=z64, kv_bytes=jnp.zeros(n_req, I64),
        token_times=jnp.full(max(n_tokens, 1), -1, I64),
        records=meters.IterationRecords().init(n_inst, max_iters), tier=tier, tier_written=z32)


def simulate_until_done(st: ClusterState, prm: EngineParams, wl: WorkloadArrays, static: Static) -> ClusterState:
    """Advance until every request has finished (or the run stalls, or a limit is reached); the
    returned state's ``status`` says which (:class:`jaxsim.engine.status.Status`).

    Unjitted; :func:`run` (one configuration) and :func:`run_batch` (a ``vmap`` over
    configurations) compile it. The state must come from :func:`init_state` with the same
    ``static`` features (``releases``; instances initialised with ``max_pp``).
    """
    max_iters = st.records.start.shape[-1]
    n_req = wl.prompt.shape[0]
    n_inst, n_slots = st.inst.slots.req.shape
    st = dataclasses.replace(st, pending=leap.init_pending(n_inst, n_slots, static.leap - 1) if _leaps(static, prm)
                             else None)
    n_dev = prm.wload_busy.shape[-1]
    st = dataclasses.replace(st, dev_free=jnp.zeros(n_dev, I64) if n_dev else None)
    if prm.power is not None:
        st = dataclasses.replace(st, power=power.PowerMeter(prm.power).init(n_inst),
                                 request_npu_j=jnp.zeros(n_req, jnp.float64))

    def buffer_full(st):
        return jnp.any(st.inst.n_iters >= max_iters) if static.record_iterations else jnp.asarray(False)

    def cond(consts, st):
        return (st.finished < n_req) & (~st.stalled) & (st.steps < st.max_steps) & ~buffer_full(st)

    def body(consts, st):
        prm, wl = consts
        return step(static, prm, wl, st, cond(consts, st))

    if st.inst.busy.shape[0] != 1:
        out = masked_while_loop(cond, body, st, (prm, wl))
    else:
        # One instance: the loop carries the state without its instance axis. Under a vmap over
        # configurations, XLA otherwise lays out [config, 1, ...] carries differently from the
        # body's results and copies the whole state (records included) on every step.
        squeeze = functools.partial(_map_instance_parts, lambda x: x[0])
        expand = functools.partial(_map_instance_parts, lambda x: x[None])
        out = expand(masked_while_loop(lambda c, s: cond(c, expand(s)), lambda c, s: squeeze(body(c, expand(s))),
                                       squeeze(st), (prm, wl)))
    if out.pending is not None:  # early ends not yet written (a run that stopped at a limit)
        pos, at = out.pending.token_writes(out.token_times.shape[0])
        out = eqx.tree_at(lambda s: (s.token_times, s.records), out, (
            out.token_times.at[pos].set(at, mode="drop"),
            meters.IterationRecords().update(out.records, out.pending.rows)))
        if prm.power is not None:
            out = dataclasses.replace(out, power=power.PowerMeter(prm.power).update(out.power, out.pending.rows))
        out = dataclasses.replace(out, pending=None)
    status = run_status(finished=out.finished, num_requests=n_req,
                        slot_overflow=jnp.any(out.inst.counters.slot_overflow), queue_overflow=out.router.overflow,
                        buffer_full=buffer_full(out) & (out.finished < n_req), stalled=out.stalled)
    return eqx.tree_at(lambda s: s.status, out, status)


def _map_instance_parts(fn, st: ClusterState) -> ClusterState:
    """Apply ``fn`` to every leaf with an instance axis (the instances, their records and the
    pending early ends)."""
    return dataclasses.replace(st, inst=jax.tree.map(fn, st.inst), records=jax.tree.map(fn, st.records),
                               pending=jax.tree.map(fn, st.pending), power=jax.tree.map(fn, st.power))


run = jax.jit(simulate_until_done, static_argnames="static")


@functools.partial(jax.jit, static_argnames=("static", "workload_batched"))
def run_batch(st: ClusterState, prm: EngineParams, wl: WorkloadArrays, static: Static, *,
              workload_batched: bool = False) -> ClusterState:
    """:func:`simulate_until_done` for a leading configuration axis on ``st`` and ``prm`` (and on
    ``wl`` when ``workload_batched``). The loop runs until the last configuration is done; the
    others stand still meanwhile (every step is masked by its own predicate)."""
    fn = functools.partial(simulate_until_done, static=static)
    return jax.vmap(fn, in_axes=(0, 0, 0 if workload_batched else None))(st, prm, wl)
