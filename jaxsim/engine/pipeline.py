"""Pipeline parallelism (REFERENCE.md §1.8): up to pp batches of an instance in flight.

A batch forms when stage 0 is free; stage s starts when stage s-1 has sent the hidden state and
stage s is free; the batch's tokens come out when its last stage finishes. The loop sees an
instance's next *event* (``busy``/``batch_end``): a batch completion, or the moment stage 0 frees
up while the pipeline has room. At a completion, :func:`ending_view` presents the instance as if
the completed batch were its only one, so that the end of an iteration is processed as with
pp = 1, and :func:`after_end` restores the other batches in flight. Compiled only when the run's
``Static.max_pp > 1``.
"""

import equinox as eqx
import jax.numpy as jnp

from jaxsim.engine import costs
from jaxsim.engine import instance as inst_lib
from jaxsim.engine.instance import I32, NEVER
from jaxsim.engine.vmap import per_instance


def ending_view(inst: inst_lib.InstanceState, now, active):
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
    view = eqx.tree_at(lambda i: (i.slots.sched_n, i.busy, i.batch_start, i.batch_end, i.batch_tokens, i.batch_seqs,
                                  i.batch_busy, i.batch_pim),
                       inst, (jnp.where(in_b, s.sched_n, 0), inst.busy | ending, pe.start[b],
                              jnp.where(ending, now, inst.batch_end), pe.tokens[b], pe.seqs[b], pe.busy_ns[b],
                              pe.pim_ns[b]))
    return view, ending, in_b


def after_end(inst: inst_lib.InstanceState, before: inst_lib.InstanceState, ending, in_b):
    """Undo the view of :func:`ending_view` after the batch end: the other batches in flight
    keep their slots' ``sched_n``; the completed batch's entry is freed."""
    pe = inst.pipe
    hit = ending & (pe.end == inst.batch_end)
    return eqx.tree_at(
        lambda i: (i.slots.sched_n, i.pipe.end, i.pipe.slot_batch), inst,
        (jnp.where(in_b, 0, before.slots.sched_n), jnp.where(hit, NEVER, pe.end),
         jnp.where(in_b, -1, pe.slot_batch)))


def start_batches(inst, prm, wl, now, active, ending, *, block_size, window, ring_cap, max_pp: int, kv_tier,
                  tier_state=None):
    """Pipeline parallelism (REFERENCE.md §1.8): on every instance whose stage 0 is free and that
    has fewer than pp batches in flight, form a batch of the requests not in flight and compute
    when each of its stages finishes: stage 0 starts now (the iteration overhead is paid there),
    stage s at ``max(stage s-1 done + p2p, stage s free)``; the batch completes when its last
    stage is done. ``busy``/``batch_end`` become the instance's next event: a completion, or the
    time stage 0 frees up while the pipeline has room.

    An instance with batches in flight decides only at those events (``ending``: a batch of it
    completed now), as vLLM's engine with a batch queue blocks on its oldest batch when it has
    nothing to schedule: an arrival at another time waits, as it does for a lone instance.

    A batch that recalls KV from the tier below (``kv_tier``) pays the recall before stage 0; under
    pipelines the recalls of instances sharing a pool do not queue behind each other."""

    def one(inst, prm, ending, now, active):
        pe = inst.pipe
        pp = prm.pp
        n_fl = jnp.sum((pe.end < NEVER).astype(I32), dtype=I32)
        decides = (n_fl == 0) | ending | (pe.try_at <= now)
        can = active & decides & (pe.stage_free[0] <= now) & (n_fl < pp)
        in_flight = pe.slot_batch >= 0
        old = (inst.slots.sched_n, inst.slots.sched_c, inst.slots.sched_pos)
        new = inst_lib.schedule(eqx.tree_at(lambda i: i.busy, inst, jnp.asarray(False)), prm.sched, wl, now, can,
                                block_size=block_size, window=window, ring_cap=ring_cap, skip=in_flight, kv_tier=kv_tier,
                                tier_state=tier_state, async_lag=False)
        shape = inst_lib.batch_shape(new.slots)
        mine = new.slots.sched_n > 0
        keep = ~can | (in_flight & ~mine)  # requests of the batches in flight keep their fields
        sched = tuple(jnp.where(keep, o, n) for o, n in
                      zip(old, (new.slots.sched_n, new.slots.sched_c, new.slots.sched_pos)))
        start = can & (shape.seqs > 0)
        times, extrap, p2p = prm.latency.stage_times(shape, max_pp)
        recall, _ = kv_tier.recall(tier_state, prm.sched.tier_pool[None], new.recall_chunks[None],
                                   kv_tier.chunk_bytes(prm.kv_token_bytes, block_size)[None], now[None], start[None])
        gpu0 = times[0] + recall[0]
        done = now + gpu0 + costs.host_time_ns(gpu0, shape.seqs, *costs.host_args(prm))
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
                             tokens=put(pe.tokens, shape.tokens), seqs=put(pe.seqs, shape.seqs),
                             busy_ns=put(pe.busy_ns, jnp.sum(times)), pim_ns=put(pe.pim_ns, jnp.zeros_like(now)),
                             slot_batch=jnp.where(start & mine, b, pe.slot_batch), try_at=try_at)
        extrapolated = new.counters.extrapolated + jnp.where(start, (extrap > 0).astype(I32), 0)
        busy = (n_after > 0) | (try_at < NEVER)
        return eqx.tree_at(
            lambda i: (i.slots.sched_n, i.slots.sched_c, i.slots.sched_pos, i.pipe, i.busy, i.batch_end,
                       i.counters.extrapolated),
            new, (*sched, pipe, busy, jnp.minimum(jnp.min(end), try_at), extrapolated))

    return per_instance(one)(inst, prm, ending, now, active)
