"""Decode leaps: an instance in steady decode runs its next iterations within one loop step.

Most engine iterations of a serving run are steady decode: every running request generates one
token, nothing arrives, nothing finishes, nobody waits. Such an iteration's end changes nothing
any other instance (or the router) can see before the next interaction, so it need not cost a
loop step of the whole cluster. After :func:`jaxsim.engine.cluster.start_batches`, an instance
that has just started a steady decode batch runs the ends of that batch and of the ones after
it, one per trip of a small loop, each exactly as a step would have: it emits the tokens, writes
the iteration's row, allocates the blocks the next iteration needs (in running-list order, from
the free-list head, with the same evictions) and times the next batch with the latency model.
The last batch of the leap stays in flight and its end is an ordinary event. What the early
ends emitted (token times, iteration rows) is kept in a small :class:`Pending` log and written by
the next step together with its own emissions: a second write to those large buffers in one
step makes XLA copy them on every step.

A batch end may be run early only when the step that would have run it is certain to do exactly
this: the instance's batch is steady decode (every running request is scheduled for one decode
token, none is parked as FINISHING, and none is waiting unless every seat (``max_num_seqs``) is
taken), its end comes before ``limit`` (the next moment a request can be routed
to it: the next arrival or release, or the next event of an instance that can release one), no
request finishes at it, and the next batch's new blocks fit in the free blocks (otherwise vLLM
would preempt). Pipelines and wave-synchronised DP groups never leap (``Static.leaps``). The
results are identical to a run without leaps (``Static.leap = 1``); tests/test_leap.py checks it.
"""

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int

from jaxsim.engine import instance as inst_lib
from jaxsim.engine import costs, kvpool, meters
from jaxsim.engine.instance import I32, I64, NEVER, RUNNING, WAITING
from jaxsim.engine.loops import masked_while_loop
from jaxsim.engine.ops import prefix_sum
from jaxsim.engine.vmap import per_instance


def steady(inst: inst_lib.InstanceState, max_num_seqs, queued) -> Bool[Array, ""]:
    """One instance (no instance axis): its batch in flight is steady decode, and no request can
    be admitted at its end (none waits, in its slots or its router queue: ``queued``, or every
    seat is taken)."""
    s = inst.slots
    run = s.status == RUNNING
    decode = (s.sched_n == 1) & ~s.first & (s.computed == s.reached)
    seats_full = (max_num_seqs > 0) & (jnp.sum(run.astype(I32), dtype=I32) >= max_num_seqs)
    return (inst.busy & jnp.any(run) & jnp.all(~run | decode) & ~jnp.any(s.status == inst_lib.FINISHING)
            & (seats_full | (~jnp.any(s.status == WAITING) & (queued == 0))))


def _next_blocks(s: inst_lib.Slots, block_size: int):
    """Per slot, the new blocks the next decode iteration needs (0 for a slot not running)."""
    need = (s.reached + 1 + block_size - 1) // block_size - s.nblk  # it will hold reached + 1 tokens
    return jnp.where(s.status == RUNNING, jnp.maximum(need, 0), 0)


def can_continue(inst: inst_lib.InstanceState, limit, max_iters, *, block_size: int) -> Bool[Array, ""]:
    """One instance: its batch end may be run now (see the module docstring), given that its
    batch is steady decode. ``max_iters``: the iteration buffer's rows (the loop stops when an
    instance fills it; a leap never takes it there)."""
    s = inst.slots
    run = s.status == RUNNING
    finishes = jnp.any(run & (s.reached + 1 >= s.target))
    need = jnp.sum(_next_blocks(s, block_size), dtype=I32)
    return (inst.batch_end < limit) & ~finishes & (need <= inst.pool.num_free) & (inst.n_iters + 2 < max_iters)


def end_and_restart(inst: inst_lib.InstanceState, model, host, prefix_caching, all_copies, go, wl, *,
                    block_size: int, window: int) -> inst_lib.InstanceState:
    """One instance: when ``go``, end its steady decode batch (each running request emits one
    token) and start the next one at that moment, as :func:`jaxsim.engine.instance.schedule`
    would: new blocks from the free-list head and blocks that fill indexed in the prefix cache,
    both in running-list order, and the batch timed by the latency ``model`` and the engine's host
    costs (``host``: :func:`jaxsim.engine.costs.host_args`). ``all_copies``: the pool's
    prefix-index mode (SchedulerParams.prefix_index_all_copies)."""
    s = inst.slots
    run = (s.status == RUNNING) & go
    end = inst.batch_end
    order = jnp.maximum(inst.run_list, 0)
    listed = inst.run_list >= 0
    need = jnp.where(go, _next_blocks(s, block_size), 0)
    pool, blocks = inst_lib.allocate_in_order(inst.pool, s.blocks, s.nblk, order, jnp.where(listed, need[order], 0),
                                              window=window, all_copies=all_copies)
    step = run.astype(I32)
    reached = s.reached + step
    # A decode fills at most one block: index it (REFERENCE.md §1.3, vLLM caches full blocks).
    n_hashes = jnp.where(prefix_caching, wl.n_hashes[jnp.maximum(s.req, 0)], 0)
    new_reg = jnp.where(run, jnp.maximum(jnp.minimum(reached // block_size, n_hashes) - s.nreg, 0), 0)
    reg_o = listed & (new_reg[order] > 0)
    col = jnp.minimum(s.nreg[order], blocks.shape[1] - 1)
    h = wl.hashes[jnp.maximum(s.req[order], 0), jnp.minimum(s.nreg[order], wl.hashes.shape[1] - 1)]
    pool = kvpool.register_blocks(pool, blocks[order, col], h, reg_o, prefix_sum(reg_o.astype(I32)) - 1, all_copies)
    s = eqx.tree_at(lambda x: (x.reached, x.computed, x.sched_c, x.last_emit, x.nblk, x.nreg, x.blocks), s,
                    (reached, s.computed + step, jnp.where(run, s.computed, s.sched_c),
                     jnp.where(run, end, s.last_emit), s.nblk + need, s.nreg + new_reg, blocks))
    shape = inst_lib.batch_shape(s)
    dt, extrap = model.iteration_time(shape)
    new_end = end + dt.astype(I64) + costs.host_time_ns(dt.astype(I64), shape.seqs, *host)
    return eqx.tree_at(
        lambda i: (i.slots, i.pool, i.batch_start, i.batch_end, i.batch_busy, i.n_iters, i.counters.extrapolated),
        inst, (s, pool, jnp.where(go, end, inst.batch_start), jnp.where(go, new_end, end),
               jnp.where(go, dt.astype(I64), inst.batch_busy),
               inst.n_iters + go.astype(I32),
               inst.counters.extrapolated + jnp.where(go, (extrap > 0).astype(I32), 0)))


class _Log(eqx.Module):
    """Per trip (and instance, [inst, trip], after :func:`leap`'s vmap): the batch ends run early."""

    ended: Bool[Array, " trip"]
    start: Int[Array, " trip"]
    end: Int[Array, " trip"]
    busy: Int[Array, " trip"]  # the batch's NPU time (InstanceState.batch_busy)
    kv_used: Int[Array, " trip"]  # KV blocks in use after the end (before the next allocation)
    kv_cached: Int[Array, " trip"]  # free blocks holding a cached prefix, at the same moment


def _run_ends(inst, eligible, limit, model, host, prefix_caching, all_copies, num_blocks, wl, *, max_trips: int,
              max_iters: int, block_size: int, window: int) -> "tuple[inst_lib.InstanceState, _Log]":
    """One instance: run its batch ends early while it may, logging each ([trip] log)."""

    def go_of(inst, eligible, limit):
        return eligible & can_continue(inst, limit, max_iters, block_size=block_size)

    def cond(consts, c):
        return c[1] & (c[2] < max_trips)

    def body(consts, c):  # a no-op once go is False (masked_while_loop)
        eligible, limit, model, host, prefix_caching, all_copies, num_blocks, wl = consts
        inst, go, trip, log = c
        go = go & (trip < max_trips)
        t = jnp.minimum(trip, max_trips - 1)

        def put(a, v):
            return a.at[t].set(jnp.where(go, v, a[t]))

        log = _Log(ended=put(log.ended, go), start=put(log.start, inst.batch_start), end=put(log.end, inst.batch_end),
                   busy=put(log.busy, inst.batch_busy), kv_used=put(log.kv_used, num_blocks - inst.pool.num_free),
                   kv_cached=put(log.kv_cached, inst.pool.num_cached_free))
        inst = end_and_restart(inst, model, host, prefix_caching, all_copies, go, wl, block_size=block_size,
                               window=window)
        return inst, go & go_of(inst, eligible, limit), trip + go.astype(I32), log

    z = jnp.zeros(max_trips, I64)
    log0 = _Log(ended=jnp.zeros(max_trips, bool), start=z, end=z, busy=z, kv_used=jnp.zeros(max_trips, I32),
                kv_cached=jnp.zeros(max_trips, I32))
    inst, _, _, log = masked_while_loop(cond, body, (inst, go_of(inst, eligible, limit), jnp.asarray(0, I32), log0),
                                        (eligible, limit, model, host, prefix_caching, all_copies, num_blocks, wl))
    return inst, log


class Pending(eqx.Module):
    """What the batch ends run early in one step emitted, written by the next step
    (:func:`jaxsim.engine.cluster.write_request_outputs` and ``record_iterations``)."""

    rows: meters.IterationEnd  # [inst, trip] iteration rows (``ending`` False: none)
    token_first: Int[Array, "inst slot"]  # token_times position of the slot's first early token
    running: Bool[Array, "inst slot"]  # the slot emitted one token at each early end of its instance
    stamp: Int[Array, "inst trip"]  # when the client has the tokens of each early end, ns

    def token_writes(self, size: int):
        """``(positions, stamps)`` of the early tokens, flattened; ``size`` (out of range) where none."""
        n_trip = self.stamp.shape[-1]
        emits = self.running[:, :, None] & self.rows.ending[:, None, :]  # [inst, slot, trip]
        pos = jnp.where(emits, self.token_first[:, :, None] + jnp.arange(n_trip, dtype=I32), size)
        return pos.reshape(-1), jnp.broadcast_to(self.stamp[:, None, :], pos.shape).reshape(-1)


def init_pending(num_instances: int, num_slots: int, max_trips: int) -> Pending:
    z = jnp.zeros((num_instances, max_trips), I32)
    z64 = jnp.zeros((num_instances, max_trips), I64)
    rows = meters.IterationEnd(ending=jnp.zeros((num_instances, max_trips), bool), index=z, start=z64, end=z64,
                               prompt_tokens=z, gen_tokens=z, num_tokens=z, num_seqs=z, busy_ns=z64, pim_ns=z64, pim_io_bytes=z64,
                               running=z, waiting=z,
                               kv_used=z, kv_cached=z, prefix_queried=z64, prefix_hits=z64, tier_hits=z64,
                               tier_recalled=z64, tier_resident=z, tier_written=z64)
    return Pending(rows=rows, token_first=jnp.zeros((num_instances, num_slots), I32),
                   running=jnp.zeros((num_instances, num_slots), bool), stamp=z64)


def leap(inst0: inst_lib.InstanceState, prm, wl, started: Bool[Array, " inst"], queued: Int[Array, " inst"],
         limit: Int[Array, " inst"], *, max_trips: int, max_iters: int, block_size: int,
         window: int) -> "tuple[inst_lib.InstanceState, Pending]":
    """Run early the batch ends of every instance that ``started`` a steady decode batch in this
    step, while each may (see the module docstring), at most ``max_trips`` per instance and never
    up to ``max_iters`` iterations.
    ``prm``: :class:`jaxsim.engine.cluster.EngineParams`; ``queued``: per instance, requests
    routed to it that wait outside its slots; ``limit``: per instance, the next moment a request
    may be routed to it, ns. Returns the instances and what the early ends emitted."""
    s0 = inst0.slots
    n_running = jnp.sum((s0.status == RUNNING).astype(I32), axis=-1, dtype=I32)
    eligible = started & per_instance(steady)(inst0, prm.sched.max_num_seqs, queued)
    n_inst = started.shape[0]

    def one(inst, eligible, limit, model, host, prefix_caching, all_copies, num_blocks):
        return _run_ends(inst, eligible, limit, model, host, prefix_caching, all_copies, num_blocks, wl,
                         max_trips=max_trips, max_iters=max_iters, block_size=block_size, window=window)

    inst, log = per_instance(one)(inst0, eligible, limit, prm.latency, costs.host_args(prm),
                                  prm.sched.prefix_caching, prm.sched.prefix_index_all_copies, prm.sched.num_blocks)
    const = lambda x: jnp.broadcast_to(x[:, None], (n_inst, max_trips))  # noqa: E731
    n_waiting = jnp.sum((s0.status == WAITING).astype(I32), axis=-1, dtype=I32) + queued
    rows = meters.IterationEnd(
        ending=log.ended, index=inst0.n_iters[:, None] + jnp.arange(max_trips, dtype=I32), start=log.start,
        end=log.end, prompt_tokens=jnp.zeros((n_inst, max_trips), I32), gen_tokens=const(inst0.batch_seqs),
        num_tokens=const(inst0.batch_tokens), num_seqs=const(inst0.batch_seqs), busy_ns=log.busy,
        pim_ns=jnp.zeros_like(log.busy), pim_io_bytes=jnp.zeros_like(log.busy), running=const(n_running),
        waiting=const(n_waiting), kv_used=log.kv_used, kv_cached=log.kv_cached,
        prefix_queried=const(inst0.counters.prefix_requested), prefix_hits=const(inst0.counters.prefix_hits),
        tier_hits=const(inst0.counters.tier_hits), tier_recalled=const(inst0.counters.tier_recalled),
        tier_resident=const(inst0.counters.tier_resident), tier_written=const(inst0.counters.tier_written))
    # The running requests emitted tokens reached - prompt, +1, ... at the early ends.
    first = wl.token_offset[jnp.maximum(s0.req, 0)] + s0.reached - s0.prompt
    return inst, Pending(rows=rows, token_first=first, running=s0.status == RUNNING,
                         stamp=log.end + prm.token_output_delay_ns[:, None])


def next_routing(next_arrival, release_at, producer, busy, batch_end, retry) -> Int[Array, " inst"]:
    """Per instance, a lower bound of the next moment a request may be routed to it: the next
    arrival not yet routed (``next_arrival``, ns), the next release, and the next event of every other instance that
    may release a request (``producer``: a prefill instance or one holding an agentic parent;
    its event is its batch end, or now when it retries; ``retry``: [inst] retry time or NEVER).
    ``release_at`` is None without releases."""
    n_inst = busy.shape[0]
    lim = jnp.broadcast_to(next_arrival, (n_inst,))
    if release_at is None:
        return lim
    event = jnp.where(producer, jnp.where(busy, batch_end, retry), NEVER)
    others = jnp.where(jnp.eye(n_inst, dtype=bool), NEVER, event[None, :])  # [inst, other]
    return jnp.minimum(jnp.minimum(lim, jnp.min(release_at)), jnp.min(others, axis=1))
