"""The simulation loop: a cluster of instances advanced one engine iteration at a time.

One step of the loop moves the clock to the next iteration end (or, when every instance is
idle, to the next arrival), finishes the batches that end then, routes the arrivals, records the
iteration, and starts the next batch on every idle instance. The whole run is one loop inside one
``jit``: a run is one compiled call (:func:`run`), and a batch of configurations is the same loop
under ``vmap`` (:func:`run_batch`). Every loop is a ``masked_while_loop`` (engine/loops.py): each
step is a no-op for a configuration that is done, so batching never copies the state per trip.

The state has an instance axis from the start (``InstanceState`` leaves are ``[instance, ...]``,
and per-instance work is ``vmap``-ed). With several instances, arrivals are routed by a
``routing.Router`` policy into per-instance queues (engine/routing.py).

Requests can also enter a queue during the run (the static ``releases`` flag turns that on):
prefill/decode disaggregation (REFERENCE.md §1.7) hands a request from its prefill instance to
its decode instance once its KV has arrived over the link (:func:`_kv_transfer`), and an agentic
sub-request (§1.15) is released when its predecessor has finished plus its tool time. The clock
then also stops at every release.

Time is int64 nanoseconds (x64 is enabled by ``jaxsim``): exact however long the run.
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from jaxsim import latency
from jaxsim.engine import instance as inst_lib
from jaxsim.engine import routing
from jaxsim.engine.instance import I32, I64, NEVER, RUNNING, WAITING
from jaxsim.engine.loops import masked_while_loop
from jaxsim.engine.ops import prefix_sum
from jaxsim.engine.routing import PREFILL


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


class EngineParams(eqx.Module):
    """Per-instance numeric parameters (leaves have a leading instance axis)."""

    sched: inst_lib.SchedulerParams
    tables: latency.LatencyTables
    iteration_overhead_ns: Int[Array, ""]
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
    records: inst_lib.Records


def per_instance(fn, in_axes=0):
    """``jax.vmap(fn)`` over the instance axis; called directly when there is one instance.

    Under ``vmap`` a ``while_loop`` with a batched predicate selects over its whole carry on every
    trip, so the common single-instance case skips the batching to keep the scheduler's loops cheap.
    """
    def call(*args):
        axes = in_axes if isinstance(in_axes, tuple) else (in_axes,) * len(args)
        leaves = [a for a, ax in zip(args, axes) if ax == 0]
        n = jax.tree.leaves(leaves)[0].shape[0]
        if n != 1:
            return jax.vmap(fn, in_axes=axes)(*args)
        squeezed = [jax.tree.map(lambda x: x[0], a) if ax == 0 else a for a, ax in zip(args, axes)]
        return jax.tree.map(lambda x: jnp.asarray(x)[None], fn(*squeezed))
    return call


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
    s = inst_lib.routed_slot_values(s, take, pos, wl)
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


_SHAPE_ARGS = ("T", "S", "pc", "kp", "nd", "kvd_sum", "kvd_min", "kvd_max")  # iteration_time's order


def _start_batches(inst, prm: EngineParams, wl, now, active, *, block_size, window, ring_cap, dp_sync: bool):
    """On every idle instance, schedule a batch and compute when it ends.

    With ``dp_sync``, the members of a DP group (``EngineParams.dp_group``) run wave-synchronous
    rounds as vLLM does for MoE data parallelism (REFERENCE.md §1.8): when any member has a batch,
    every member runs one (an idle member a dummy: 1 token, 1 decode at KV length 1), each is
    padded to the group's largest token count (dense layers see the padded T; per-sequence layers
    see S + the padding, each pad token counting as a sequence; attention sees the real requests
    only; the MoE collectives the padded T), and the round ends for all when its slowest member
    is done.
    """

    def plan(inst, prm, now, active):
        inst = inst_lib.schedule(inst, prm.sched, wl, now, active, block_size=block_size, window=window,
                                 ring_cap=ring_cap)  # a no-op on a busy instance
        return inst, inst_lib.batch_shape(inst.slots)

    inst, shape = per_instance(plan)(inst, prm, now, active)
    idle = ~inst.busy & active
    start = idle & (shape["S"] > 0)
    pad = jnp.zeros_like(shape["T"])
    if dp_sync:
        n_inst = inst.busy.shape[0]
        member = prm.dp_group >= 0
        gid = jnp.where(member, prm.dp_group, n_inst)  # non-members: a group of their own, never read

        def group_max(x):
            return jax.ops.segment_max(x, gid, num_segments=n_inst + 1)[gid]

        runs = member & idle & (group_max((start & member).astype(I32)) > 0)
        dummy = runs & ~start
        one = jnp.ones_like(shape["T"])
        shape = {k: jnp.where(dummy, one if k in ("T", "S", "nd", "kvd_sum", "kvd_min", "kvd_max") else 0, v)
                 for k, v in shape.items()}
        pad = jnp.where(runs, group_max(jnp.where(runs, shape["T"], 0)) - shape["T"], 0)
        start = start | runs
    padded = dict(shape, T=shape["T"] + pad, S=shape["S"] + pad)
    dt, extrap = per_instance(latency.iteration_time)(prm.tables, *(padded[k] for k in _SHAPE_ARGS))
    end = now + dt.astype(I64) + prm.iteration_overhead_ns
    if dp_sync:
        end = jnp.where(runs, jax.ops.segment_max(jnp.where(runs, end, 0), gid, num_segments=n_inst + 1)[gid], end)
    extrapolated = inst.counters.extrapolated + jnp.where(start[:, None], (extrap > 0).astype(I32), 0)

    def pick(new, old):
        return jnp.where(start, new, old)

    return eqx.tree_at(
        lambda i: (i.busy, i.batch_start, i.batch_end, i.batch_tokens, i.batch_seqs, i.counters.extrapolated),
        inst, (inst.busy | start, pick(now, inst.batch_start), pick(end, inst.batch_end),
               pick(padded["T"], inst.batch_tokens), pick(padded["S"], inst.batch_seqs), extrapolated))


def _pipe_ending(inst: inst_lib.InstanceState, now, active):
    """Pipeline parallelism: the batch of this instance that completes ``now`` (at most one: the
    last stage finishes its batches one after another), as a view of the instance in which that
    batch is the one in flight (its slots' ``sched_n``, its start, tokens and sequences), so that
    the end of an iteration is processed as with pp = 1. Returns ``(view, ending, in_batch)``."""
    pe = inst.pipe
    hit = pe.end == now
    ending = active & jnp.any(hit)
    b = jnp.argmax(hit).astype(I32)
    in_b = ending & (pe.slot_batch == b)
    s = inst.slots
    view = eqx.tree_at(lambda i: (i.slots.sched_n, i.busy, i.batch_start, i.batch_end, i.batch_tokens, i.batch_seqs),
                       inst, (jnp.where(in_b, s.sched_n, 0), inst.busy | ending, pe.start[b],
                              jnp.where(ending, now, inst.batch_end), pe.tokens[b], pe.seqs[b]))
    return view, ending, in_b


def _pipe_after_end(inst: inst_lib.InstanceState, before: inst_lib.InstanceState, ending, in_b):
    """Undo the view of :func:`_pipe_ending` after the batch end: the other batches in flight
    keep their slots' ``sched_n``; the completed batch's entry is freed."""
    pe = inst.pipe
    hit = ending & (pe.end == inst.batch_end)
    return eqx.tree_at(
        lambda i: (i.slots.sched_n, i.pipe.end, i.pipe.slot_batch), inst,
        (jnp.where(in_b, 0, before.slots.sched_n), jnp.where(hit, NEVER, pe.end),
         jnp.where(in_b, -1, pe.slot_batch)))


def _start_batches_pp(inst, prm: EngineParams, wl, now, active, ending, *, block_size, window, ring_cap,
                      max_pp: int):
    """Pipeline parallelism (REFERENCE.md §1.8): on every instance whose stage 0 is free and that
    has fewer than pp batches in flight, form a batch of the requests not in flight and compute
    when each of its stages finishes: stage 0 starts now (the iteration overhead is paid there),
    stage s at ``max(stage s-1 done + p2p, stage s free)``; the batch completes when its last
    stage is done. ``busy``/``batch_end`` become the instance's next event: a completion, or the
    time stage 0 frees up while the pipeline has room.

    An instance with batches in flight decides only at those events (``ending``: a batch of it
    completed now), as vLLM's engine with a batch queue blocks on its oldest batch when it has
    nothing to schedule: an arrival at another time waits, as it does for a lone instance."""

    def one(inst, prm, ending, now, active):
        pe = inst.pipe
        pp = prm.tables.pp
        n_fl = jnp.sum((pe.end < NEVER).astype(I32), dtype=I32)
        decides = (n_fl == 0) | ending | (pe.try_at <= now)
        can = active & decides & (pe.stage_free[0] <= now) & (n_fl < pp)
        in_flight = pe.slot_batch >= 0
        old = (inst.slots.sched_n, inst.slots.sched_c, inst.slots.sched_pos)
        new = inst_lib.schedule(eqx.tree_at(lambda i: i.busy, inst, jnp.asarray(False)), prm.sched, wl, now, can,
                                block_size=block_size, window=window, ring_cap=ring_cap, skip=in_flight)
        shape = inst_lib.batch_shape(new.slots)
        mine = new.slots.sched_n > 0
        keep = ~can | (in_flight & ~mine)  # requests of the batches in flight keep their fields
        sched = tuple(jnp.where(keep, o, n) for o, n in
                      zip(old, (new.slots.sched_n, new.slots.sched_c, new.slots.sched_pos)))
        start = can & (shape["S"] > 0)
        times, extrap, p2p = latency.stage_times(prm.tables, max_pp, *(shape[k] for k in _SHAPE_ARGS))
        done = now + times[0] + prm.iteration_overhead_ns
        free = [done]
        for st in range(1, max_pp):
            fs = jnp.maximum(done + p2p, pe.stage_free[st]) + times[st]
            on = st < pp
            done = jnp.where(on, fs, done)
            free.append(jnp.where(on, fs, pe.stage_free[st]))
        b = jnp.argmax(pe.end == NEVER).astype(I32)
        stage_free = jnp.where(start, jnp.stack(free), pe.stage_free)
        put = lambda a, v: jnp.where(start, a.at[b].set(v), a)  # noqa: E731
        n_after = n_fl + start.astype(I32)
        # the next time stage 0 frees up with room in the pipeline; none after a failed try (the
        # next completion retries); unchanged when the instance did not decide now
        try_at = jnp.where(active & decides, jnp.where((n_after < pp) & ~(can & ~start), stage_free[0], NEVER),
                           pe.try_at)
        end = put(pe.end, done)
        pipe = inst_lib.Pipe(stage_free=stage_free, start=put(pe.start, now), end=end,
                             tokens=put(pe.tokens, shape["T"]), seqs=put(pe.seqs, shape["S"]),
                             slot_batch=jnp.where(start & mine, b, pe.slot_batch), try_at=try_at)
        extrapolated = new.counters.extrapolated + jnp.where(start, (extrap > 0).astype(I32), 0)
        busy = (n_after > 0) | (try_at < NEVER)
        return eqx.tree_at(
            lambda i: (i.slots.sched_n, i.slots.sched_c, i.slots.sched_pos, i.pipe, i.busy, i.batch_end,
                       i.counters.extrapolated),
            new, (*sched, pipe, busy, jnp.minimum(jnp.min(end), try_at), extrapolated))

    return per_instance(one)(inst, prm, ending, now, active)


def _record(records, inst, ending, prm: EngineParams, ptok, gtok, now, queued):
    """Append one row per instance whose iteration ended now (gauges after routing; ``queued``:
    per instance, requests routed to it that wait outside its slots)."""

    def one(records, inst, ending, num_blocks, ptok, gtok, queued, now):
        s = inst.slots
        row = dict(start=inst.batch_start, end=now, prompt_tokens=ptok, gen_tokens=gtok,
                   num_tokens=inst.batch_tokens, num_seqs=inst.batch_seqs,
                   running=jnp.sum((s.status == RUNNING).astype(I32), dtype=I32),
                   waiting=jnp.sum((s.status == WAITING).astype(I32), dtype=I32) + queued,
                   kv_used=num_blocks - inst.pool.num_free)
        idx = jnp.where(ending, inst.n_iters, records.start.shape[0])  # out of range = not written
        records = inst_lib.Records(**{k: getattr(records, k).at[idx].set(v, mode="drop") for k, v in row.items()})
        return records, eqx.tree_at(lambda i: i.n_iters, inst, inst.n_iters + ending.astype(I32))

    return per_instance(one)(records, inst, ending, prm.sched.num_blocks, ptok, gtok, queued, now)


def _drain_if_stuck(inst, active, *, ring_cap):
    """An idle instance with work left whose batch came out empty because requests parked as
    FINISHING (async scheduling) still hold their blocks: vLLM then processes those outputs and
    schedules again. Release them; the loop retries at the same instant."""
    s = inst.slots
    work = jnp.any((s.status == WAITING) | (s.status == RUNNING))
    retry = active & (~inst.busy) & work & jnp.any(s.status == inst_lib.FINISHING)
    inst = inst_lib.release_parked(inst, retry, ring_cap)
    return inst, retry


def _kv_transfer(st: ClusterState, prm: EngineParams, ending, now):
    """KV sent by the prefill instances whose iteration ends ``now`` (REFERENCE.md §1.7).

    Every request that will be handed off sends the KV of the tokens computed for it in the
    iteration (plus, on its first chunk, its prefix-hit tokens: the decode side needs them too):
    per layer and TP rank, ``kv_token_bytes / (L * tp)`` bytes per token (ranks send their shards in
    parallel). One layer's messages leave back to back on the instance's link, so a layer takes
    ``s = latency + Σ bytes / bw``, each request on the link level (within the node, or between
    nodes) of its decode instance, with the largest latency among them.

    Layer-wise streaming (``kv_layerwise``) overlaps the compute: layer i's KV leaves when layer i
    is done (the iteration split evenly over its L layers, period p) and the link is free, so the
    last layer arrives at ``max(end + s, start + p + L*s, link_free + L*s)``: compute-bound,
    link-bound, or still busy with earlier KV. Otherwise a request's whole prompt KV leaves when its
    prefill ends: ``max(end, link_free) + latency + L * Σ bytes / bw`` for the requests done now.

    Returns ``(ready, sent_bytes, link_free)``: per slot ``[inst, slot]`` the arrival time of the
    last KV layer of a request whose prefill completed now (NEVER elsewhere), and the bytes sent
    (all layers and ranks); and each instance's new link-free time.
    """
    s = st.inst.slots
    req = jnp.maximum(s.req, 0)
    leaving = ((prm.role == PREFILL) & ending)[:, None] & (s.sched_n > 0) & s.first & (s.target - s.prompt > 1)
    completes = leaving & (s.computed >= s.prompt)
    first_chunk = s.sched_c == jnp.maximum(s.prefix_hit, 0)
    streamed = s.sched_n + jnp.where(first_chunk, s.sched_c, 0)
    sent = jnp.where(prm.kv_layerwise[:, None], jnp.where(leaving, streamed, 0), jnp.where(completes, s.prompt, 0))
    dest = st.releases.dest[req]
    level = (prm.node[jnp.maximum(dest, 0)] != prm.node[:, None]).astype(I32)  # 0 within the node, 1 across
    bw = jnp.take_along_axis(prm.kv_link_bw, level, axis=1)
    lat = jnp.where(sent > 0, jnp.take_along_axis(prm.kv_link_latency, level, axis=1), 0.0)
    layers = prm.tables.num_layers.astype(jnp.float64)
    per_rank_layer = prm.kv_token_bytes.astype(jnp.float64) / (layers * prm.tables.tp.astype(jnp.float64))
    wire = jnp.sum(sent.astype(jnp.float64) * per_rank_layer[:, None] / bw, axis=1)  # one layer, ns
    latency = jnp.max(lat, axis=1)
    s_layer = latency + wire
    # Offsets from now (exact int64 differences; the float parts are < one run's span)
    since_start = (now - st.inst.batch_start).astype(jnp.float64)
    backlog = (st.link_free - now).astype(jnp.float64)  # > 0: the link is still sending
    streamed_end = jnp.maximum(jnp.maximum(s_layer, since_start / layers - since_start + layers * s_layer),
                               backlog + layers * s_layer)
    whole_end = jnp.maximum(backlog, 0.0) + latency + layers * wire
    done = now + jnp.ceil(jnp.where(prm.kv_layerwise, streamed_end, whole_end)).astype(I64)
    link_free = jnp.where(jnp.any(sent > 0, axis=1), done, st.link_free)
    ready = jnp.where(completes, done[:, None], NEVER)
    return ready, sent.astype(I64) * prm.kv_token_bytes[:, None], link_free


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


def _clock(st: ClusterState, prm: EngineParams, wl: WorkloadArrays, active, *, releases: bool,
           dp_sync: bool) -> Clock:
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
    """
    inst = st.inst
    n_req = wl.arrival_sorted.shape[0]
    event = jnp.where(inst.busy, inst.batch_end, st.retry_at)
    if dp_sync:
        event = _group_min(event, prm)
    next_arrival = jnp.where(st.next_pending < n_req,
                             wl.arrival_sorted[jnp.minimum(st.next_pending, n_req - 1)], NEVER)
    horizon = jnp.maximum(next_arrival, st.now)
    if releases:
        producer = (prm.role == PREFILL) | (st.releases.holders > 0)
        horizon = jnp.minimum(horizon, jnp.minimum(jnp.min(st.releases.release_at),
                                                   jnp.min(jnp.where(producer, event, NEVER))))
    due = event < horizon
    is_global = ~jnp.any(due)
    acts = active & jnp.where(is_global, horizon < NEVER, due)
    return Clock(now=jnp.where(is_global, horizon, event), acts=acts, is_global=active & is_global, horizon=horizon)


def _step(st: ClusterState, prm: EngineParams, wl: WorkloadArrays, active, *, block_size, window, ring_cap,
          router: routing.Router, releases: bool, dp_sync: bool, max_pp: int = 1):
    """One step of the cluster (see :func:`_clock`). A no-op when not ``active`` (see ``run``).

    A lone instance (no releases) keeps one clock: it sees arrivals at its batch ends, its only
    decision points. With ``max_pp > 1`` (pipeline parallelism), an instance's event is a batch's
    completion or the moment its stage 0 frees up (:func:`_start_batches_pp`)."""
    inst = st.inst
    n_req = st.finish.shape[0]
    n_inst = inst.busy.shape[0]
    lone = n_inst == 1 and not releases
    if lone:
        now = jnp.broadcast_to(st.now, (1,))
        acts = jnp.broadcast_to(active, (1,))
    else:
        clk = _clock(st, prm, wl, active, releases=releases, dp_sync=dp_sync)
        now, acts = clk.now, clk.acts
    if max_pp > 1:
        before = inst
        inst, ending, in_b = per_instance(_pipe_ending)(inst, now, acts)
        st = eqx.tree_at(lambda s: s.inst, st, inst)
    else:
        ending = acts & inst.busy & (inst.batch_end == now)
    if releases:
        kv_ready, kv_sent, link_free = _kv_transfer(st, prm, ending, now)
        st = eqx.tree_at(lambda s: s.link_free, st, link_free)
    inst, ev, ptok, gtok = per_instance(functools.partial(inst_lib.end_iteration, ring_cap=ring_cap))(
        inst, prm.sched.async_scheduling, prm.role == PREFILL, ending, now)
    if max_pp > 1:
        inst = per_instance(_pipe_after_end)(inst, before, ending, in_b)
    # Per-request outputs from the emissions of every instance (flattened over instance, slot).
    ev = jax.tree.map(lambda x: x.reshape(-1), ev)
    req = jnp.maximum(ev.req, 0)
    per_slot = ev.req.shape[0] // n_inst
    inst_id = jnp.repeat(jnp.arange(n_inst, dtype=I32), per_slot)
    delay = jnp.where(ev.first_emit, prm.first_token_delay_ns[inst_id], prm.token_output_delay_ns[inst_id])
    stamp = now[inst_id] + delay  # when the client has the token
    tok_pos = jnp.where(ev.emit, wl.token_offset[req] + ev.token_index, st.token_times.shape[0])
    token_times = st.token_times.at[tok_pos].set(stamp, mode="drop")
    first_pos = jnp.where(ev.first_emit, req, n_req)
    fin = jnp.where(ev.finish, req, n_req)
    # A hand-off carries the request's outputs so far to its decode instance, like a finish.
    out = jnp.where(ev.finish | ev.handoff, req, n_req)
    st = eqx.tree_at(
        lambda s: (s.token_times, s.first_token, s.finish, s.first_scheduled, s.prefix_hit,
                   s.num_preemptions, s.recomputed, s.instance, s.finished),
        st, (token_times, st.first_token.at[first_pos].set(stamp, mode="drop"),
             st.finish.at[fin].set(stamp, mode="drop"),
             st.first_scheduled.at[out].set(ev.first_scheduled, mode="drop"),
             st.prefix_hit.at[out].set(ev.prefix_hit, mode="drop"),
             st.num_preemptions.at[out].set(ev.num_preemptions, mode="drop"),
             st.recomputed.at[out].set(ev.recomputed, mode="drop"),
             st.instance.at[fin].set(inst_id, mode="drop"),
             st.finished + jnp.sum(ev.finish.astype(I32), dtype=I32)))

    rs, rel = st.router, st.releases
    if releases:
        hand = jnp.where(ev.handoff, req, n_req)
        ready = kv_ready.reshape(-1)
        # The next agentic sub-request: released when the client has this one's last token, plus
        # the tool time.
        nxt = wl.next_in_session[req]
        child = jnp.where(ev.finish & (nxt >= 0), nxt, n_req)
        child_at = stamp + wl.tool_ns[jnp.maximum(nxt, 0)]
        release_at = rel.release_at.at[hand].set(ready, mode="drop")
        release_at = release_at.at[child].set(child_at, mode="drop")
        let_go = (ev.finish | ev.handoff) & (ev.req >= 0) & (nxt >= 0)  # no longer held here
        rel = eqx.tree_at(lambda r: (r.release_at, r.kv_in, r.holders), rel,
                          (release_at, rel.kv_in.at[hand].set(wl.prompt[req], mode="drop"),
                           rel.holders.at[jnp.where(let_go, inst_id, n_inst)].add(-1, mode="drop")))
        st = eqx.tree_at(
            lambda s: (s.prefill_instance, s.prefill_end, s.kv_ready, s.kv_bytes, s.arrival),
            st, (st.prefill_instance.at[hand].set(inst_id, mode="drop"),
                 st.prefill_end.at[hand].set(now[inst_id], mode="drop"),
                 st.kv_ready.at[hand].set(ready, mode="drop"),
                 st.kv_bytes.at[jnp.where(ev.req >= 0, req, n_req)].add(kv_sent.reshape(-1), mode="drop"),
                 st.arrival.at[child].set(child_at, mode="drop")))

    if lone:  # arrivals wait in arrival order outside the slots: no queue needed
        inst, next_pending, unrouted = _route(inst, wl, st.next_pending, st.now, active)
        queued = unrouted[None]
    else:  # routed only in a global step, at the horizon
        arrived = jnp.searchsorted(wl.arrival_sorted, clk.horizon, side="right", method="scan_unrolled").astype(I32)
        next_pending = jnp.where(clk.is_global, arrived, st.next_pending)
        pd = releases  # P/D routing picks decode instances only when some instance hands off
        rs, rel = routing.route_arrivals(inst, rs, rel, prm.sched, prm.routable, prm.role, wl, st.next_pending,
                                         next_pending, router=router, block_size=block_size, pd=pd)
        reentries = None
        if releases:
            rs, rel = routing.release_due(inst, rs, rel, prm.sched, prm.routable, prm.role, wl,
                                          jnp.where(clk.is_global, clk.horizon, -1), router=router,
                                          block_size=block_size, pd=pd)
            reentries = inst_lib.Reentries(
                req=rel.entry_req, kv_in=rel.kv_in, carried_first_scheduled=st.first_scheduled,
                carried_prefix_hit=st.prefix_hit, carried_num_preemptions=st.num_preemptions,
                carried_recomputed=st.recomputed)
        inst, rs, queued = routing.fill_slots(inst, rs, wl, reentries)
    records, inst = _record(st.records, inst, ending, prm, ptok, gtok, now, queued)
    if max_pp > 1:
        inst = _start_batches_pp(inst, prm, wl, now, acts, ending, block_size=block_size, window=window,
                                 ring_cap=ring_cap, max_pp=max_pp)
    else:
        inst = _start_batches(inst, prm, wl, now, acts, block_size=block_size, window=window, ring_cap=ring_cap,
                              dp_sync=dp_sync)
    inst, retry = per_instance(functools.partial(_drain_if_stuck, ring_cap=ring_cap))(inst, acts)

    next_arrival = jnp.where(next_pending < n_req,
                             wl.arrival_sorted[jnp.minimum(next_pending, n_req - 1)], NEVER)
    if releases:
        next_arrival = jnp.minimum(next_arrival, jnp.min(rel.release_at))
    if lone:
        any_busy = jnp.any(inst.busy) | jnp.any(retry)
        next_end = jnp.min(jnp.where(inst.busy, inst.batch_end, jnp.where(retry, st.now, NEVER)))
        # a lone instance sees arrivals at its next batch end (its only decision point)
        next_now = jnp.where(any_busy, next_end, jnp.maximum(next_arrival, st.now))
        retry_at = st.retry_at
    else:
        retry_at = jnp.where(acts, jnp.where(retry, now, NEVER), st.retry_at)
        any_busy = jnp.any(inst.busy) | jnp.any(retry_at < NEVER)
        next_now = jnp.where(clk.is_global, clk.horizon, st.now)  # the last global moment
    stalled = (~any_busy) & (next_arrival == NEVER) & (st.finished < n_req)
    return eqx.tree_at(lambda s: (s.now, s.next_pending, s.inst, s.router, s.releases, s.stalled, s.steps, s.records,
                                  s.retry_at),
                       st, (jnp.where(active, next_now, st.now), next_pending, inst, rs, rel,
                            jnp.where(active, stalled, st.stalled), st.steps + active.astype(I32), records, retry_at))


def init_state(inst: inst_lib.InstanceState, n_req: int, n_tokens: int, max_iters: int,
               releases: bool = False) -> ClusterState:
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
        stalled=jnp.asarray(False), steps=zero, first_token=z64, finish=z64, first_scheduled=z64,
        prefix_hit=z32, num_preemptions=z32, recomputed=z32, instance=z32, arrival=z64,
        prefill_instance=jnp.full(n_req, -1, I32), prefill_end=z64, kv_ready=z64, kv_bytes=jnp.zeros(n_req, I64),
        token_times=jnp.full(max(n_tokens, 1), -1, I64),
        records=jax.tree.map(lambda x: jnp.broadcast_to(x, (inst.busy.shape[0],) + x.shape),
                             inst_lib.init_records(max_iters)))


def simulate_until_done(st: ClusterState, prm: EngineParams, wl: WorkloadArrays, *, block_size: int,
                        window: int, ring_cap: int, max_steps: int, record_iterations: bool = True,
                        router: routing.Router = routing.Router(), releases: bool = False,
                        dp_sync: bool = False, max_pp: int = 1) -> ClusterState:
    """Advance until every request has finished (or the run stalls, or a buffer would overflow).

    Unjitted; :func:`run` (one configuration) and :func:`run_batch` (a ``vmap`` over
    configurations) compile it. ``record_iterations=False`` ignores the iteration buffer's size
    (its writes past the end are dropped), for sweeps that only need per-request results.
    ``releases``: requests enter queues during the run (P/D hand-offs, agentic sessions); the
    state must come from ``init_state(..., releases=True)``. ``dp_sync``: some instances form
    wave-synchronised DP groups (``EngineParams.dp_group``). ``max_pp``: the largest pipeline
    degree of an instance (``LatencyTables.pp``); with 1 no pipeline is compiled, and the state
    must come from instances initialised with the same ``max_pp``.
    """
    if max_pp > 1 and dp_sync:
        raise NotImplementedError("wave-synchronised DP groups with pipeline parallelism")
    max_iters = st.records.start.shape[-1]
    n_req = wl.prompt.shape[0]

    def cond(consts, st):
        ok = (st.finished < n_req) & (~st.stalled) & (st.steps < max_steps)
        return ok & jnp.all(st.inst.n_iters < max_iters) if record_iterations else ok

    def body(consts, st):
        prm, wl = consts
        return _step(st, prm, wl, cond(consts, st), block_size=block_size, window=window, ring_cap=ring_cap,
                     router=router, releases=releases, dp_sync=dp_sync, max_pp=max_pp)

    if st.inst.busy.shape[0] != 1:
        return masked_while_loop(cond, body, st, (prm, wl))
    # One instance: the loop carries the state without its instance axis. Under a vmap over
    # configurations, XLA otherwise lays out [config, 1, ...] carries differently from the
    # body's results and copies the whole state (records included) on every step.
    squeeze = functools.partial(_map_instance_parts, lambda x: x[0])
    expand = functools.partial(_map_instance_parts, lambda x: x[None])
    out = masked_while_loop(lambda c, s: cond(c, expand(s)), lambda c, s: squeeze(body(c, expand(s))),
                            squeeze(st), (prm, wl))
    return expand(out)


def _map_instance_parts(fn, st: ClusterState) -> ClusterState:
    """Apply ``fn`` to every leaf with an instance axis (the instances and their records)."""
    return eqx.tree_at(lambda s: (s.inst, s.records), st, (jax.tree.map(fn, st.inst), jax.tree.map(fn, st.records)))


_STATIC = ("block_size", "window", "ring_cap", "max_steps", "record_iterations", "router", "releases", "dp_sync",
           "max_pp")
run = functools.partial(jax.jit, static_argnames=_STATIC)(simulate_until_done)


@functools.partial(jax.jit, static_argnames=_STATIC + ("workload_batched",))
def run_batch(st: ClusterState, prm: EngineParams, wl: WorkloadArrays, *, workload_batched: bool = False,
              **static) -> ClusterState:
    """:func:`simulate_until_done` for a leading configuration axis on ``st`` and ``prm`` (and on
    ``wl`` when ``workload_batched``). The loop runs until the last configuration is done; the
    others stand still meanwhile (every step is masked by its own predicate)."""
    fn = functools.partial(simulate_until_done, **static)
    return jax.vmap(fn, in_axes=(0, 0, 0 if workload_batched else None))(st, prm, wl)
