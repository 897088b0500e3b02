"""One serving instance: its request slots, its KV pool, and the vLLM V1 scheduler.

REFERENCE.md §1.1-1.4. A slot holds a request that has been routed to the instance and has not
finished (waiting or running). The running list is kept as an array of slot ids in admission
order (``InstanceState.run_list``: admissions append, preemption pops the tail, requests that
stop running are compacted out before the next schedule). The waiting queue is ordered by a key,
``wait_key`` (preempted requests get negative keys, the newest preemption first, ahead of
arrivals keyed by their position in arrival order).

The scheduler is vectorised where vLLM's loop has no cross-request dependence (the running
phase's token budget is a prefix sum) and uses ``masked_while_loop`` where it does (tail
preemption, one admission at a time): those loops run only as many trips as there are
preemptions or admissions, so a steady decode step costs O(slots).
"""

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int

from jaxsim.engine import kvpool
from jaxsim.engine.kvtier import AbstractKVTier, NoLowerTier
from jaxsim.engine.loops import masked_while_loop
from jaxsim.engine.ops import expand_ranges, prefix_sum
from jaxsim.latency.base import BatchShape, BatchSlots

I32 = jnp.int32
I64 = jnp.int64
BIG = 1 << 30  # "unlimited" for int32 knobs and sort keys
NEVER = jnp.iinfo(jnp.int64).max  # a time that never comes

EMPTY, WAITING, RUNNING, FINISHING = 0, 1, 2, 3
# FINISHING: vLLM V1's async scheduling builds batch k+1 before it has processed the outputs of
# batch k, so a request that finished in batch k still holds its seat (max_num_seqs) and its KV
# blocks while batch k+1 runs; they are released when batch k+1 ends.


class Slots(eqx.Module):
    req: Int[Array, " slot"]  # request id (trace line), -1 when empty
    status: Int[Array, " slot"]  # EMPTY | WAITING | RUNNING
    prompt: Int[Array, " slot"]
    target: Int[Array, " slot"]  # prompt + output tokens
    reached: Int[Array, " slot"]  # vLLM num_tokens
    computed: Int[Array, " slot"]  # vLLM num_computed_tokens
    first: Bool[Array, " slot"]  # first token not yet emitted
    num_preemptions: Int[Array, " slot"]
    last_emit: Int[Array, " slot"]  # ns
    first_scheduled: Int[Array, " slot"]  # ns, -1 before the first scheduling
    prefix_hit: Int[Array, " slot"]  # prefix-hit tokens at first admission, -1 before it
    recomputed: Int[Array, " slot"]  # prompt tokens recomputed after preemptions
    nblk: Int[Array, " slot"]  # blocks held
    nreg: Int[Array, " slot"]  # leading blocks already indexed in the prefix cache
    blocks: Int[Array, "slot mb"]  # block table
    wait_key: Int[Array, " slot"]
    # The batch being executed: tokens scheduled and computed-before, 0 when not scheduled.
    sched_n: Int[Array, " slot"]
    sched_c: Int[Array, " slot"]
    sched_pos: Int[Array, " slot"]  # position in the batch (vLLM's scheduled order)
    # Prompt tokens whose KV arrived from a prefill instance (P/D hand-off): the next admission
    # starts from them instead of computing them; 0 otherwise (and after that admission).
    kv_in: Int[Array, " slot"]
    # When the request entered this instance's queue (its arrival, or the moment a released
    # request was put in the slot), ns: with async scheduling it is first seen one batch later.
    queued_at: Int[Array, " slot"]


class Counters(eqx.Module):
    preemptions: Int[Array, ""]
    # Prefix-cache lookups (tokens; int64): at first admission, or at every admission attempt of a
    # request never preempted (SchedulerParams.prefix_stats_every_attempt, vLLM <= 0.19); none
    # without prefix caching, as in vLLM.
    prefix_requested: Int[Array, ""]
    prefix_hits: Int[Array, ""]
    recomputed: Int[Array, ""]
    extrapolated: Int[Array, " 4"]  # iterations whose lookups left the profile grid, per table kind
    slot_overflow: Bool[Array, ""]  # a request could not be admitted for lack of slots
    # The KV tier below the GPU (engine/kvtier.py): its hit tokens as the prefix-cache counters
    # count them (every admission attempt with prefix_stats_every_attempt, as vLLM's external
    # prefix-cache counters; int64), chunks recalled (int64), its pool's resident chunks and chunks
    # written so far (copied from the tier's state at the end of each step; the pool may be
    # shared), and the tokens it served to admitted requests (int64).
    tier_hits: Int[Array, ""]
    tier_recalled: Int[Array, ""]
    tier_resident: Int[Array, ""]
    tier_written: Int[Array, ""]
    tier_served: Int[Array, ""]


class Pipe(eqx.Module):
    """Pipeline-parallel batches in flight (REFERENCE.md §1.8), present when the compiled run's
    ``max_pp > 1``. Entry b of the [P] arrays is a batch in flight (``end < NEVER``) or free."""

    stage_free: Int[Array, " P"]  # when each stage is next free, ns
    start: Int[Array, " P"]  # formation time of each batch in flight
    end: Int[Array, " P"]  # its completion (last stage done), NEVER for a free entry
    tokens: Int[Array, " P"]
    seqs: Int[Array, " P"]
    busy_ns: Int[Array, " P"]  # NPU time of each batch summed over its stages (InstanceState.batch_busy)
    pim_ns: Int[Array, " P"]  # its PIM attention time (InstanceState.batch_pim)
    slot_batch: Int[Array, " slot"]  # the entry whose batch holds the slot's request, -1 none
    try_at: Int[Array, ""]  # next time (not a completion) to try to form a batch, NEVER none


class InstanceState(eqx.Module):
    slots: Slots
    pool: kvpool.KVPool
    busy: Bool[Array, ""]  # a batch is in flight
    batch_start: Int[Array, ""]  # ns
    batch_end: Int[Array, ""]  # ns
    batch_tokens: Int[Array, ""]
    batch_seqs: Int[Array, ""]
    # What the batch in flight keeps its accelerators busy for (the power meter, engine/power.py):
    # the latency model's time, ns (under pp > 1 summed over the stages; a recall, a wait for
    # weights or for PIM results is not NPU work: AbstractLatencyModel.npu_time), and the time of
    # its attention on PIM channels (0 without PIM).
    batch_busy: Int[Array, ""]
    batch_pim: Int[Array, ""]
    batch_pim_io: Int[Array, ""]  # bytes its PIM operations move (q, k, v in, outputs out; 0 without PIM)
    run_list: Int[Array, " slot"]  # the running list: slot ids in order, -1 past its end
    preempt_counter: Int[Array, ""]
    n_iters: Int[Array, ""]
    counters: Counters
    recall_chunks: Int[Array, ""]  # chunks the batch being formed recalls from the KV tier below
    pipe: "Pipe | None" = None  # pipeline parallelism (None when the run's max_pp = 1)


class SchedulerParams(eqx.Module):
    """Numeric knobs of one instance: arrays, so that configurations can be stacked and vmapped."""

    max_num_seqs: Int[Array, ""]  # 0 = unlimited
    max_num_batched_tokens: Int[Array, ""]  # 0 = unlimited
    long_prefill_threshold: Int[Array, ""]  # 0 = off
    chunked_prefill: Bool[Array, ""]
    reserve_full_isl: Bool[Array, ""]
    prefix_caching: Bool[Array, ""]
    async_scheduling: Bool[Array, ""]  # finished requests release their seat one batch later
    prefix_stats_every_attempt: Bool[Array, ""]  # SchedulerConfig.prefix_stats_every_attempt
    prefix_index_all_copies: Bool[Array, ""]  # SchedulerConfig.prefix_index_all_copies (kvpool.py)
    num_blocks: Int[Array, ""]
    tier_pool: Int[Array, ""]  # the pool of the KV tier below (engine/kvtier.py) this instance uses


def init_pipe(num_slots: int, max_pp: int) -> Pipe:
    never = jnp.full(max_pp, NEVER, I64)
    zi = jnp.zeros(max_pp, I32)
    return Pipe(stage_free=jnp.zeros(max_pp, I64), start=jnp.zeros(max_pp, I64), end=never, tokens=zi, seqs=zi,
                busy_ns=jnp.zeros(max_pp, I64), pim_ns=jnp.zeros(max_pp, I64), slot_batch=jnp.full(num_slots, -1, I32), try_at=jnp.asarray(NEVER, I64))


def init_instance(num_slots, max_blocks_per_req, num_blocks_cap, ring_cap, num_hashes, window,
                  num_blocks, max_pp: int = 1) -> InstanceState:
    z = jnp.zeros(num_slots, I32)
    slots = Slots(
        req=jnp.full(num_slots, -1, I32), status=z, prompt=z, target=z, reached=z, computed=z,
        first=jnp.zeros(num_slots, bool), num_preemptions=z, last_emit=jnp.zeros(num_slots, I64),
        first_scheduled=jnp.full(num_slots, -1, I64), prefix_hit=jnp.full(num_slots, -1, I32),
        recomputed=z, nblk=z, nreg=z, blocks=jnp.full((num_slots, max_blocks_per_req), -1, I32),
        wait_key=jnp.full(num_slots, BIG, I32), sched_n=z, sched_c=z, sched_pos=z, kv_in=z,
        queued_at=jnp.zeros(num_slots, I64))
    zero = jnp.asarray(0, I32)
    zero64 = jnp.asarray(0, I64)
    return InstanceState(
        slots=slots,
        pool=kvpool.init_pool(num_blocks_cap, ring_cap, num_hashes, window, num_blocks),
        busy=jnp.asarray(False), batch_start=jnp.asarray(0, I64), batch_end=jnp.asarray(0, I64),
        batch_tokens=zero, batch_seqs=zero, batch_busy=zero64, batch_pim=zero64, batch_pim_io=zero64, run_list=jnp.full(num_slots, -1, I32), preempt_counter=zero, n_iters=zero,
        counters=Counters(zero, zero64, zero64, zero, jnp.zeros(4, I32), jnp.asarray(False), zero64, zero64, zero,
                          zero64, zero64), recall_chunks=zero,
        pipe=init_pipe(num_slots, max_pp) if max_pp > 1 else None,
    )


def _ceil_div(a, b):
    return (a + b - 1) // b


def release_finished(inst: InstanceState, zombies_due, finish, async_scheduling, ring_cap):
    """Free the blocks of finished requests and empty their slots.

    ``zombies_due``: release the FINISHING slots (requests that finished one batch earlier).
    ``finish``: this batch's finishers; released now, or parked as FINISHING when
    ``async_scheduling`` (then ``wait_key`` remembers their batch position for the release order).
    """
    s = inst.slots
    zombie = zombies_due & (s.status == FINISHING)
    park = finish & async_scheduling
    release_now = zombie | (finish & ~park)
    key = jnp.where(zombie, s.wait_key, BIG // 2 + s.sched_pos)

    def cond(key, c):
        return jnp.any(c[1])

    def body(key, c):  # with nothing left, slot 0 is released with no blocks: a no-op
        inst, left = c
        slot = jnp.argmin(jnp.where(left, key, BIG)).astype(I32)
        return _release_slot(inst, slot, ring_cap, jnp.any(left)), left.at[slot].set(False)

    inst, _ = masked_while_loop(cond, body, (inst, release_now), key)
    s = inst.slots
    s = eqx.tree_at(lambda x: (x.status, x.req, x.nblk, x.wait_key), s,
                    (jnp.where(release_now, EMPTY, jnp.where(park, FINISHING, s.status)),
                     jnp.where(release_now, -1, s.req), jnp.where(release_now, 0, s.nblk),
                     jnp.where(park, s.sched_pos, s.wait_key)))
    return eqx.tree_at(lambda i: i.slots, inst, s)


def release_parked(inst: InstanceState, due, ring_cap) -> InstanceState:
    """Release the requests parked as FINISHING when ``due`` (their outputs get processed)."""
    return release_finished(inst, due, jnp.zeros(inst.slots.status.shape, bool), False, ring_cap)


def _release_slot(inst: InstanceState, slot, ring_cap, active) -> InstanceState:
    """Give back the blocks of ``slot`` (none when not ``active``)."""
    s = inst.slots
    pool = kvpool.release_blocks(inst.pool, s.blocks[slot], jnp.where(active, s.nblk[slot], 0), ring_cap)
    return eqx.tree_at(lambda i: i.pool, inst, pool)


# The per-request fields a routed request sets in its slot (the block table is not among them).
ROUTED_FIELDS = ("req", "status", "prompt", "target", "reached", "computed", "first", "num_preemptions",
                 "last_emit", "first_scheduled", "prefix_hit", "recomputed", "nblk", "nreg", "wait_key", "kv_in",
                 "queued_at")


class Reentries(eqx.Module):
    """Queue entries beyond the trace's arrival positions (``entry >= n_req``): requests released
    during the run. ``req[entry - n_req]`` is the request. A request with ``kv_in > 0`` was
    handed off by a prefill instance (its prompt KV arrives with it; its first token is out and
    its per-request outputs so far travel in the ``carried_*`` arrays); otherwise it is a fresh
    request (an agentic sub-request released after its predecessor's tool call)."""

    req: Int[Array, " reentry"]
    kv_in: Int[Array, " req"]  # per request
    carried_first_scheduled: Int[Array, " req"]
    carried_prefix_hit: Int[Array, " req"]
    carried_num_preemptions: Int[Array, " req"]
    carried_recomputed: Int[Array, " req"]


def routed_slot_values(fields: dict, take, entry, wl, now, reentries: "Reentries | None" = None) -> dict:
    """``fields`` (the ROUTED_FIELDS of one instance's slots) with the slots where ``take`` now
    holding the queue entries ``entry`` (arrival positions, or re-entries, see :class:`Reentries`),
    waiting (FCFS by entry number: arrival order, then release order). ``now``: the time, ns (a
    re-entry's ``queued_at``; an arrival's is its arrival time)."""
    n_req = wl.order.shape[0]
    arrival = wl.arrival_sorted[jnp.minimum(entry, n_req - 1)]
    if reentries is None:
        req = wl.order[jnp.minimum(entry, n_req - 1)]
        kv = jnp.zeros_like(entry)
    else:
        late = entry >= n_req
        late_req = reentries.req[jnp.clip(entry - n_req, 0, reentries.req.shape[0] - 1)]
        req = jnp.where(late, late_req, wl.order[jnp.minimum(entry, n_req - 1)])
        kv = jnp.where(late, reentries.kv_in[req], 0)
    handed = kv > 0
    prompt = wl.prompt[req]

    def carried(name, default):
        return default if reentries is None else jnp.where(handed, getattr(reentries, f"carried_{name}")[req], default)

    new = dict(req=req, status=WAITING, prompt=prompt, target=prompt + wl.output[req],
               reached=prompt + handed.astype(I32), computed=0, first=~handed,
               num_preemptions=carried("num_preemptions", 0), last_emit=0,
               first_scheduled=carried("first_scheduled", -1), prefix_hit=carried("prefix_hit", -1),
               recomputed=carried("recomputed", 0), nblk=0, nreg=0, wait_key=entry, kv_in=kv,
               queued_at=jnp.where(entry < n_req, arrival, now))
    return {f: jnp.where(take, new[f], fields[f]) for f in ROUTED_FIELDS}


def admit_to_slots(inst: InstanceState, take, entry, wl, now, reentries: "Reentries | None" = None) -> InstanceState:
    """Place the queue entries ``entry`` in the slots where ``take`` (one instance) at ``now``."""
    vals = routed_slot_values({f: getattr(inst.slots, f) for f in ROUTED_FIELDS}, take, entry, wl, now, reentries)
    slots = eqx.tree_at(lambda x: tuple(getattr(x, f) for f in ROUTED_FIELDS), inst.slots,
                        tuple(vals[f] for f in ROUTED_FIELDS))
    return eqx.tree_at(lambda i: i.slots, inst, slots)


def _put(field, index, value):
    """``field[index] = value``; an out-of-range index (a masked write) changes nothing."""
    return field.at[index].set(value, mode="drop")


def allocate_in_order(pool: kvpool.KVPool, blocks, nblk, order, need_o, *, window: int,
                      all_copies=False):
    """Pop ``need_o[p]`` new blocks for slot ``order[p]``, p = 0, 1, ... in turn (the running
    list's order, which fixes which free blocks each request gets), appended after the slot's
    ``nblk`` blocks in the block table. Returns ``(pool, blocks)``. ``all_copies``: the pool's
    prefix-index mode (SchedulerParams.prefix_index_all_copies)."""
    num_slots = blocks.shape[0]
    need_ends = prefix_sum(need_o)

    def sink(consts, blocks, ids, first_k, count):
        need_ends, order, nblk = consts
        owner, offset, _ = expand_ranges(need_ends, first_k, window)
        valid = jnp.arange(window) < count
        slot = order[owner]
        col = nblk[slot] + offset
        return blocks.at[jnp.where(valid, slot, num_slots), col].set(ids, mode="drop")

    return kvpool.pop_blocks(pool, need_ends[-1], window, sink, blocks, (need_ends, order, nblk),
                             all_copies=all_copies)


def schedule(inst: InstanceState, prm: SchedulerParams, wl, now, allowed=True, *, block_size: int,
             window: int, ring_cap: int, skip=None, kv_tier: AbstractKVTier = NoLowerTier(),
             tier_state=None, async_lag: bool = True) -> InstanceState:
    """Form the next batch at time ``now`` (REFERENCE.md §1.2). Sets ``slots.sched_*``.

    A busy instance (a batch in flight), or one not ``allowed`` to schedule, is left unchanged.
    That is done by giving it no token budget rather than with ``lax.cond``, which may copy the
    whole state on every step.

    ``skip`` (pipeline parallelism, [slot] bool): requests already in a batch in flight; the
    running phase schedules nothing for them (vLLM's virtual engines), a chunked prefill included.
    Their ``sched_*`` fields are the caller's to keep (they are returned as for a new batch).

    ``kv_tier`` (engine/kvtier.py) and its state ``tier_state`` (the cluster's, read-only here):
    the KV tier below the GPU pool. At admission the prompt blocks its pool ``prm.tier_pool``
    holds after the GPU hits count as prefix hits (they get fresh GPU blocks, and the batch
    recalls ``recall_chunks`` chunks before layer 0); the step writes chunks down afterwards.

    ``async_lag``: with async scheduling, the batch that starts now was built when the previous
    one started (vLLM keeps two batches in flight), so it sees only the requests queued by then
    (see below). Pipelines pass False (their batches in flight are tracked by engine/pipeline.py).
    """
    bs = block_size
    idle = ~inst.busy & allowed
    s = inst.slots
    num_slots = s.req.shape[0]
    max_seqs = jnp.where(prm.max_num_seqs > 0, prm.max_num_seqs, BIG)
    budget0 = jnp.where(prm.max_num_batched_tokens > 0, prm.max_num_batched_tokens, BIG)
    budget0 = jnp.where(idle, budget0, 0)
    thr = prm.long_prefill_threshold
    in_flight = (s.sched_n, s.sched_c, s.sched_pos)
    s = eqx.tree_at(lambda x: (x.sched_n, x.sched_c, x.sched_pos), s,
                    (jnp.zeros_like(s.sched_n), jnp.zeros_like(s.sched_c), jnp.zeros_like(s.sched_pos)))
    inst = eqx.tree_at(lambda i: (i.slots, i.recall_chunks), inst, (s, jnp.where(idle, 0, inst.recall_chunks)))

    # With nothing running, the engine processes the last outputs before it idles: requests
    # parked as FINISHING give their seats and blocks back now.
    nothing_runs = idle & ~jnp.any(s.status == RUNNING)
    inst = release_parked(inst, nothing_runs, ring_cap)
    s = inst.slots

    # Async scheduling: vLLM builds batch k+1 as soon as batch k is launched, so a request that
    # arrives while batch k runs is first computed in batch k+2. Here batch k+1 is formed at the
    # end of batch k: it sees the requests queued by the start of batch k. An engine with nothing
    # running has no batch in flight and starts a new request at once.
    lag = prm.async_scheduling & jnp.any(s.status == RUNNING) & (inst.batch_end == now)
    cutoff = jnp.where(lag, inst.batch_start, now) if async_lag else now
    visible = s.queued_at <= cutoff
    if skip is not None:
        # A request preempted while its batch is in flight waits for that batch's output (its
        # sampled token is applied then, see end_iteration) before it can be admitted again.
        visible = visible & ~skip

    # ---- Phase A: the running list, in order. The budget is a prefix sum. ----
    # Requests that finished since the last schedule leave the list (a stable compaction: O(slots),
    # where sorting slots by an admission key cost O(slots^2) per step). Entries past m are 0.
    listed = inst.run_list
    still = (listed >= 0) & (s.status[jnp.maximum(listed, 0)] == RUNNING)
    m = jnp.sum(still.astype(I32), dtype=I32)
    order = jnp.zeros(num_slots, I32).at[jnp.where(still, prefix_sum(still.astype(I32)) - 1, num_slots)].set(
        listed, mode="drop")
    in_list = jnp.arange(num_slots) < m
    order_w = jnp.where(in_list, order, num_slots)  # scatter index: out of range past the list
    want = s.reached - s.computed
    want = jnp.where((thr > 0) & (thr < want), thr, want)
    if skip is not None:
        want = jnp.where(skip, 0, want)
    want_o = jnp.where(in_list, want[order], 0)
    used_before = prefix_sum(want_o) - want_o
    n_o = jnp.clip(budget0 - used_before, 0, want_o)
    need_o = jnp.where(n_o > 0, jnp.maximum(_ceil_div(s.computed[order] + n_o, bs) - s.nblk[order], 0), 0)
    need_cum = prefix_sum(need_o)

    # Tail preemption: pop the tail of the running list while the blocks needed by the entries
    # ahead of it exceed the free blocks (exactly vLLM's sequential loop, see module notes).
    def needs_victim(consts, c):
        need_cum, _ = consts
        inst, p = c
        return (p > 0) & (need_cum[jnp.maximum(p - 1, 0)] > inst.pool.num_free)

    def preempt_tail(consts, c):  # every write masked by `act` (see masked_while_loop)
        act = needs_victim(consts, c)
        _, order = consts
        inst, p = c
        v = order[jnp.maximum(p - 1, 0)]
        inst = _release_slot(inst, v, ring_cap, act)
        key = -(inst.preempt_counter + 1)  # prepended: ahead of every waiting request
        w = jnp.where(act, v, num_slots)
        sl = inst.slots
        sl = eqx.tree_at(
            lambda x: (x.status, x.computed, x.nblk, x.nreg, x.num_preemptions, x.wait_key),
            sl, (_put(sl.status, w, WAITING), _put(sl.computed, w, 0), _put(sl.nblk, w, 0),
                 _put(sl.nreg, w, 0), _put(sl.num_preemptions, w, sl.num_preemptions[v] + 1),
                 _put(sl.wait_key, w, key)))
        a = act.astype(I32)
        ctr = eqx.tree_at(lambda c: c.preemptions, inst.counters, inst.counters.preemptions + a)
        inst = eqx.tree_at(lambda i: (i.slots, i.preempt_counter, i.counters), inst,
                           (sl, inst.preempt_counter + a, ctr))
        return inst, p - a

    inst, kept = masked_while_loop(needs_victim, preempt_tail, (inst, m), (need_cum, order))
    preempted = kept < m
    n_o = jnp.where(jnp.arange(num_slots) < kept, n_o, 0)
    need_o = jnp.where(n_o > 0, need_o, 0)

    # Allocate the new blocks of every scheduled running request from the free-list head.
    pool, blocks = allocate_in_order(inst.pool, inst.slots.blocks, inst.slots.nblk, order, need_o,
                                     window=window, all_copies=prm.prefix_index_all_copies)
    sl = inst.slots
    n_slot = jnp.zeros(num_slots, I32).at[order_w].set(n_o, mode="drop")
    need_slot = jnp.zeros(num_slots, I32).at[order_w].set(need_o, mode="drop")
    pos_slot = jnp.zeros(num_slots, I32).at[order_w].set(jnp.arange(num_slots, dtype=I32), mode="drop")
    computed = sl.computed + n_slot
    nblk = sl.nblk + need_slot
    sl = eqx.tree_at(lambda x: (x.blocks, x.sched_n, x.sched_c, x.sched_pos, x.computed, x.nblk),
                     sl, (blocks, n_slot, sl.computed, pos_slot, computed, nblk))

    # Index the blocks that this iteration's tokens fill (vLLM caches them at allocation).
    n_hashes = jnp.where(prm.prefix_caching, wl.n_hashes[jnp.maximum(sl.req, 0)], 0)
    full = jnp.minimum(jnp.minimum(computed, sl.reached) // bs, n_hashes)
    new_reg = jnp.where(n_slot > 0, jnp.maximum(full - sl.nreg, 0), 0)
    reg_ends = prefix_sum(jnp.where(in_list, new_reg[order], 0))

    def reg_cond(consts, c):
        return c[1] < consts[0]

    def reg_body(consts, c):  # past total_reg no entry is valid: a no-op
        _, reg_ends, order, nreg, blocks, req, hashes, all_copies = consts
        pool, first = c
        owner, offset, valid = expand_ranges(reg_ends, first, window)
        slot = order[owner]
        j = nreg[slot] + offset
        blk = blocks[slot, jnp.minimum(j, blocks.shape[1] - 1)]
        h = hashes[jnp.maximum(req[slot], 0), jnp.minimum(j, hashes.shape[1] - 1)]  # [req, mb]
        # The valid entries lead the window: their rank among registrations is their index.
        return kvpool.register_blocks(pool, blk, h, valid, jnp.arange(window, dtype=I32), all_copies), first + window

    pool, _ = masked_while_loop(reg_cond, reg_body, (pool, jnp.asarray(0, I32)),
                                (reg_ends[-1], reg_ends, order, sl.nreg, sl.blocks, sl.req, wl.hashes,
                                 prm.prefix_index_all_copies))
    sl = eqx.tree_at(lambda x: x.nreg, sl, sl.nreg + new_reg)
    inst = eqx.tree_at(lambda i: (i.slots, i.pool), inst, (sl, pool))
    budget = budget0 - jnp.sum(n_o, dtype=I32)
    n_sched = jnp.sum((n_o > 0).astype(I32), dtype=I32)

    # ---- Phase B: admit from the head of the waiting queue, one at a time, FCFS. ----
    def admit_cond(consts, c):
        preempted, max_seqs = consts[:2]
        inst, budget, n_sched, stop, _ = c
        seats = (inst.slots.status == RUNNING) | (inst.slots.status == FINISHING)
        n_running = jnp.sum(seats.astype(I32), dtype=I32)
        has_waiting = jnp.any((inst.slots.status == WAITING) & consts[-1])
        return (~preempted) & (~stop) & (budget > 0) & (n_running < max_seqs) & has_waiting

    def admit_body(consts, c):  # every write masked by `ok`, which implies admit_cond
        act = admit_cond(consts, c)
        _, _, thr, now, hashes_all, n_hashes_all, chunks_all, tier_state, prm, visible = consts
        inst, budget, n_sched, _, run_len = c
        sl, pool = inst.slots, inst.pool
        r = jnp.argmin(jnp.where((sl.status == WAITING) & visible, sl.wait_key, BIG)).astype(I32)
        req = sl.req[r]
        reached = sl.reached[r]
        hashes = hashes_all[req]
        limit = jnp.where(prm.prefix_caching, jnp.minimum((reached - 1) // bs, n_hashes_all[req]), 0)
        matched, hit_blocks = kvpool.lookup_prefix(pool, hashes, limit)
        hit_mask = jnp.arange(hashes.shape[0]) < matched
        kv_in = sl.kv_in[r]  # prompt KV handed over by a prefill instance: already computed
        if kv_tier.enabled:  # held by the tier below, after the GPU hits (none for a hand-off)
            recalled, read = kv_tier.lookup(tier_state, prm.tier_pool, chunks_all[req], matched, limit, now)
            recalled, read = jnp.where(kv_in > 0, 0, recalled), jnp.where(kv_in > 0, 0, read)
        else:
            recalled = read = jnp.zeros((), I32)
        c0 = jnp.maximum((matched + recalled) * bs, kv_in)
        n = reached - c0
        n = jnp.where((thr > 0) & (thr < n), thr, n)
        no_chunk_stop = (~prm.chunked_prefill) & (n > budget)
        n = jnp.minimum(n, budget)
        hit_ref = pool.ref.at[jnp.where(hit_mask, hit_blocks, pool.ref.shape[0])].get(mode="fill", fill_value=1)
        hits_free = jnp.sum((hit_mask & (hit_ref == 0)).astype(I32), dtype=I32)
        full_need = _ceil_div(jnp.maximum(reached, c0), bs) - matched + hits_free
        new_blocks = _ceil_div(c0 + n, bs) - matched
        ok = (act & (~no_chunk_stop) & (n > 0)
              & ~(prm.reserve_full_isl & (full_need > pool.num_free))
              & (new_blocks + hits_free <= pool.num_free))

        # Admit r when ok; every write below is masked by ok (a lax.cond would copy the state).
        mb = sl.blocks.shape[1]
        pool = kvpool.touch_blocks(pool, hit_blocks, hit_mask & ok)
        row = hit_blocks  # the hit blocks lead the block table, -1 after them

        def sink_b(matched, row, ids, first_k, count):
            col = matched + first_k + jnp.arange(window, dtype=I32)
            return row.at[jnp.where(jnp.arange(window) < count, col, mb)].set(ids, mode="drop")

        pool, row = kvpool.pop_blocks(pool, jnp.where(ok, new_blocks, 0), window, sink_b, row, matched,
                                      all_copies=prm.prefix_index_all_copies)
        computed = c0 + n
        n_full = jnp.minimum(jnp.minimum(computed, reached) // bs,
                             jnp.where(prm.prefix_caching, n_hashes_all[req], 0))
        j = jnp.arange(mb)
        pool = kvpool.register_blocks(pool, row, hashes, ok & (j >= matched) & (j < n_full), j - matched,
                                      prm.prefix_index_all_copies)
        first_admission = sl.prefix_hit[r] < 0
        w = jnp.where(ok, r, num_slots)  # out of range: the writes are dropped

        def put(field, value):
            return _put(field, w, value)

        sl = eqx.tree_at(
            lambda x: (x.blocks, x.status, x.computed, x.nblk, x.nreg, x.wait_key, x.kv_in,
                       x.sched_n, x.sched_c, x.sched_pos, x.prefix_hit, x.recomputed, x.first_scheduled),
            sl, (put(sl.blocks, row), put(sl.status, RUNNING), put(sl.computed, computed),
                 put(sl.nblk, matched + new_blocks), put(sl.nreg, jnp.maximum(matched, n_full)),
                 put(sl.wait_key, BIG), put(sl.kv_in, 0),
                 put(sl.sched_n, n), put(sl.sched_c, c0), put(sl.sched_pos, n_sched),
                 put(sl.prefix_hit, jnp.where(first_admission, c0, sl.prefix_hit[r])),
                 put(sl.recomputed, sl.recomputed[r] + jnp.where(first_admission | (kv_in > 0), 0, reached - c0)),
                 put(sl.first_scheduled, jnp.where(sl.first_scheduled[r] < 0, now, sl.first_scheduled[r]))))
        # Prefix-cache statistics: vLLM <= 0.19 records every lookup of a request never preempted,
        # refused admissions included (tokens looked up: the request's num_tokens; hits: GPU
        # blocks); otherwise each request counts once, at its first admission.
        every = prm.prefix_stats_every_attempt
        attempt = act & every & (sl.num_preemptions[r] == 0)
        first_ok = ok & first_admission & ~every
        queried = jnp.where(attempt, reached, 0) + jnp.where(first_ok, sl.prompt[r], 0)
        # (GPU hits only: a hand-off's prompt or the tier's hits are not the GPU cache's)
        hit_tokens = jnp.where(attempt, matched * bs, 0) + jnp.where(first_ok, c0 - recalled * bs, 0)
        ctr = inst.counters
        ctr = eqx.tree_at(lambda c: (c.prefix_requested, c.prefix_hits, c.recomputed, c.tier_hits, c.tier_recalled,
                                     c.tier_served),
                          ctr, (ctr.prefix_requested + jnp.where(prm.prefix_caching, queried, 0).astype(I64),
                                ctr.prefix_hits + jnp.where(prm.prefix_caching, hit_tokens, 0).astype(I64),
                                ctr.recomputed + jnp.where(ok & ~first_admission & (kv_in == 0), reached - c0, 0),
                                ctr.tier_hits + jnp.where(prm.prefix_caching & (attempt | first_ok), recalled * bs,
                                                          0).astype(I64),
                                ctr.tier_recalled + jnp.where(ok, read, 0).astype(I64),
                                ctr.tier_served + jnp.where(ok, recalled * bs, 0).astype(I64)))
        run_list = _put(inst.run_list, jnp.where(ok, run_len, num_slots), r)  # appended to the running list
        inst = eqx.tree_at(lambda i: (i.slots, i.pool, i.run_list, i.counters, i.recall_chunks), inst,
                           (sl, pool, run_list, ctr, inst.recall_chunks + jnp.where(ok, read, 0)))
        return inst, budget - jnp.where(ok, n, 0), n_sched + ok.astype(I32), ~ok, run_len + ok.astype(I32)

    # The running list after preemption; admissions append to it.
    inst = eqx.tree_at(lambda i: i.run_list, inst, jnp.where(jnp.arange(num_slots) < kept, order, -1))
    inst, budget, n_sched, _, _ = masked_while_loop(
        admit_cond, admit_body, (inst, budget, n_sched, jnp.asarray(False), kept),
        (preempted, max_seqs, thr, now, wl.hashes, wl.n_hashes, wl.chunks, tier_state, prm, visible))
    sl = inst.slots
    kept = tuple(jnp.where(idle, new, old) for new, old in zip((sl.sched_n, sl.sched_c, sl.sched_pos), in_flight))
    return eqx.tree_at(lambda i: (i.slots.sched_n, i.slots.sched_c, i.slots.sched_pos), inst, kept)


def batch_shape(s: Slots) -> BatchShape:
    """The scheduled batch's :class:`jaxsim.latency.base.BatchShape` (REFERENCE.md §2.1), with
    its requests one by one (``BatchShape.slots``: read only by a model that places requests,
    e.g. on PIM channels; otherwise they compile to nothing)."""
    n, c = s.sched_n, s.sched_c
    sched = n > 0
    prefill = n > 1
    decode = n == 1
    big = jnp.iinfo(I32).max
    return BatchShape(
        tokens=jnp.sum(n, dtype=I32), seqs=jnp.sum(sched.astype(I32), dtype=I32),
        prefill_tokens=jnp.sum(jnp.where(prefill, n, 0), dtype=I32),
        prefill_history=jnp.sum(jnp.where(prefill, c, 0), dtype=I32),
        decodes=jnp.sum(decode.astype(I32), dtype=I32), decode_kv_sum=jnp.sum(jnp.where(decode, c, 0), dtype=I32),
        decode_kv_min=jnp.where(jnp.any(decode), jnp.min(jnp.where(decode, c, big)), 0),
        decode_kv_max=jnp.max(jnp.where(decode, c, 0)),
        slots=BatchSlots(tokens=n, computed=jnp.where(sched, c, 0), prompt=jnp.where(sched, s.prompt, 0),
                         pos=s.sched_pos),
    )


class Emissions(eqx.Module):
    """What an iteration's end produced, per slot (for the cluster's per-request outputs)."""

    emit: Bool[Array, " slot"]
    first_emit: Bool[Array, " slot"]
    token_index: Int[Array, " slot"]  # index of the emitted token in the request's output
    finish: Bool[Array, " slot"]
    handoff: Bool[Array, " slot"]  # prefill done on a prefill instance: the request moves on
    req: Int[Array, " slot"]
    first_scheduled: Int[Array, " slot"]
    prefix_hit: Int[Array, " slot"]
    num_preemptions: Int[Array, " slot"]
    recomputed: Int[Array, " slot"]


def end_iteration(inst: InstanceState, async_scheduling, hands_off, ending, now, *, ring_cap: int):
    """Process the end of the batch in flight at time ``now`` (REFERENCE.md §1.1).

    On a prefill instance (``hands_off``, REFERENCE.md §1.7) a request whose first token is
    emitted leaves the instance like a finished one (its blocks stay indexed in the prefix cache)
    and is handed off to its decode instance, unless that token was its last.
    """
    s = inst.slots
    sched = ending & (s.sched_n > 0)
    # The tokens this batch computed up to. A WAITING request in an ending batch was preempted
    # while the batch was in flight (pipeline parallelism): vLLM still applies the token sampled
    # for it (Scheduler.update_from_output, its stopped_preempted_reqs path), so it emits as if it
    # had kept running and later recomputes prompt and outputs. Not on a prefill instance, whose
    # hand-off needs the KV that the preemption freed: there the token is lost.
    preempted = s.status == WAITING
    upto = jnp.where(preempted, jnp.where(hands_off, 0, s.sched_c + s.sched_n), s.computed)
    first_emit = sched & s.first & (upto >= s.prompt)
    later_emit = sched & ~s.first & (upto >= s.reached)
    emit = first_emit | later_emit
    token_index = s.reached - s.prompt
    reached = s.reached + emit.astype(I32)
    finish = sched & (reached >= s.target)
    handoff = first_emit & hands_off & ~finish
    prompt_tokens = (jnp.sum(jnp.where(sched & ((s.sched_n > 1) | s.first), s.sched_n, 0), dtype=I32)
                     + jnp.sum(jnp.where(first_emit, jnp.maximum(s.prefix_hit, 0), 0), dtype=I32))
    gen_tokens = jnp.sum(emit.astype(I32), dtype=I32)
    events = Emissions(emit=emit, first_emit=first_emit, token_index=token_index, finish=finish,
                       handoff=handoff, req=s.req, first_scheduled=s.first_scheduled, prefix_hit=s.prefix_hit,
                       num_preemptions=s.num_preemptions, recomputed=s.recomputed)
    s = eqx.tree_at(lambda x: (x.reached, x.first, x.last_emit), s,
                    (reached, s.first & ~first_emit, jnp.where(emit, now, s.last_emit)))
    inst = eqx.tree_at(lambda i: i.slots, inst, s)

    # Release, in order: requests that finished in the previous batch (async scheduling), then
    # this batch's finishers in batch order (the free-list order depends on it).
    inst = release_finished(inst, ending, finish | handoff, async_scheduling, ring_cap)
    s = inst.slots
    s = eqx.tree_at(lambda x: x.sched_n, s, jnp.where(ending, 0, s.sched_n))
    inst = eqx.tree_at(lambda i: (i.slots, i.busy), inst, (s, inst.busy & ~ending))
    return inst, events, prompt_tokens, gen_tokens
