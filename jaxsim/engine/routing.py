"""Routing arrivals across the instances of a cluster (REFERENCE.md §1.6).

Each request is routed once, when it arrives, in arrival order. A routed request joins its
instance's queue (a FIFO of positions in arrival order, ``RouterState.queue``) and moves into a
free request slot of that instance as soon as there is one; queued and slotted-but-waiting
requests together form the instance's waiting queue (FCFS by arrival position, so the scheduler
sees exactly what a lone instance would see of the same requests).

Policies (``Router.policy``; static: a policy is a code path, so it splits sweep groups):

``round_robin``  ``idx = counter % n; counter = idx + 1``
``random``       uniform over instances, from ``Router.seed`` and the request's arrival position
``least_loaded`` vLLM's DP load-balancer score ``(4 * waiting + running) / max_num_seqs``
                 (the raw score when the cap is unlimited); the scan starts at the rotating
                 counter, the strict minimum wins (first on ties), then ``counter = best + 1``
``kv_aware``     most free KV blocks (ties as for ``least_loaded``)
``prefix_affinity`` most leading prompt blocks already cached on the instance; ties go to the
                 least loaded, then to the scan order
``custom``       ``Router.score_fn(features) -> scores[instance]`` (lowest wins, ties in scan
                 order); ``features`` is a dict of per-instance arrays: ``waiting``, ``running``,
                 ``free_blocks``, ``num_blocks``, ``max_num_seqs`` (0 = unlimited),
                 ``cached_blocks`` (of this request's prefix) and ``prompt`` (a scalar)
"""

import dataclasses
from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int

from jaxsim.engine import instance as inst_lib
from jaxsim.engine import kvpool
from jaxsim.engine.instance import I32, RUNNING, WAITING
from jaxsim.engine.loops import masked_while_loop
from jaxsim.engine.ops import prefix_sum

POLICIES = ("round_robin", "random", "least_loaded", "kv_aware", "prefix_affinity", "custom")


@dataclasses.dataclass(frozen=True)
class Router:
    """How arrivals pick an instance. Hashable: it is a static argument of the compiled run."""

    policy: str = "least_loaded"
    seed: int = 42
    score_fn: Callable | None = None  # for policy "custom"

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"routing policy {self.policy!r}: expected one of {POLICIES}")
        if (self.policy == "custom") != (self.score_fn is not None):
            raise ValueError("routing policy 'custom' needs score_fn, and score_fn needs policy 'custom'")


class RouterState(eqx.Module):
    queue: Int[Array, "inst q"]  # arrival positions routed to the instance, FIFO (index mod q)
    head: Int[Array, " inst"]  # entries head..tail-1 are queued (monotone counters)
    tail: Int[Array, " inst"]
    counter: Int[Array, ""]  # the rotating scan start of round_robin / least_loaded / ...
    overflow: Bool[Array, ""]  # a queue was full (never with the default capacity: all requests)


def init_router(num_instances: int, capacity: int) -> RouterState:
    z = jnp.zeros(num_instances, I32)
    return RouterState(queue=jnp.zeros((num_instances, max(capacity, 1)), I32), head=z, tail=z,
                       counter=jnp.asarray(0, I32), overflow=jnp.asarray(False))


def _features(inst: inst_lib.InstanceState, rs: RouterState, sched: inst_lib.SchedulerParams) -> dict:
    status = inst.slots.status
    return dict(waiting=jnp.sum((status == WAITING).astype(I32), axis=1, dtype=I32) + (rs.tail - rs.head),
                running=jnp.sum((status == RUNNING).astype(I32), axis=1, dtype=I32),
                free_blocks=inst.pool.num_free, num_blocks=sched.num_blocks, max_num_seqs=sched.max_num_seqs)


def _first_best(scores, counter):
    """Index of the lowest score, scanning from ``counter`` (wrapping); first on ties."""
    n = scores.shape[0]
    scan = (counter + jnp.arange(n, dtype=I32)) % n
    k = jnp.argmin(scores[scan])  # argmin returns the first minimum
    return scan[k].astype(I32)


def choose(router: Router, f: dict, counter, pos, cached_blocks, prompt, routable=None):
    """The instance for the request at arrival position ``pos``; and the new counter. Instances
    that are not ``routable`` (padding of a smaller cluster design) are never chosen."""
    n = f["waiting"].shape[0]
    routable = jnp.ones(n, bool) if routable is None else routable
    load = (4 * f["waiting"] + f["running"]).astype(jnp.float64)
    load = jnp.where(f["max_num_seqs"] > 0, load / jnp.maximum(f["max_num_seqs"], 1), load)

    def best_of(scores):
        return _first_best(jnp.where(routable, jnp.asarray(scores, jnp.float64), jnp.inf), counter)

    if router.policy == "round_robin":
        best = best_of(jnp.zeros(n))  # the first routable instance from the counter on
    elif router.policy == "random":
        key = jax.random.fold_in(jax.random.PRNGKey(router.seed), pos)
        k = jax.random.randint(key, (), 0, jnp.sum(routable.astype(I32)), dtype=I32)
        return jnp.argmax(prefix_sum(routable.astype(I32)) > k).astype(I32), counter  # the k-th routable
    elif router.policy == "least_loaded":
        best = best_of(load)
    elif router.policy == "kv_aware":
        best = best_of(-f["free_blocks"].astype(jnp.float64))
    elif router.policy == "prefix_affinity":
        # Lexicographic (most cached blocks, then least load): load < 2**40 for any real state.
        best = best_of(-cached_blocks.astype(jnp.float64) * 2.0**40 + load)
    else:
        best = best_of(router.score_fn({**f, "cached_blocks": cached_blocks, "prompt": prompt}))
    return best.astype(I32), (best + 1).astype(I32)


def route_arrivals(inst, rs: RouterState, sched, routable, wl, next_pending, arrived, *, router: Router,
                   block_size: int):
    """Route the requests at arrival positions ``next_pending .. arrived - 1``, one at a time
    (each decision sees the queues as the previous ones left them)."""
    q = rs.queue.shape[1]

    def cond(consts, c):
        return c[1] < consts[0]

    def body(consts, c):  # a no-op once every arrival is routed (the write index is out of range)
        arrived, inst, sched, routable, wl = consts
        rs, pos = c
        act = pos < arrived
        req = wl.order[jnp.minimum(pos, wl.order.shape[0] - 1)]
        f = _features(inst, rs, sched)
        if router.policy in ("prefix_affinity", "custom"):
            # The blocks its admission would find cached: vLLM looks up (prompt - 1) // block_size.
            limit = jnp.minimum((wl.prompt[req] - 1) // block_size, wl.n_hashes[req])
            cached = jax.vmap(lambda pool: kvpool.lookup_prefix(pool, wl.hashes[req], limit)[0])(inst.pool)
        else:
            cached = jnp.zeros_like(f["waiting"])
        best, counter = choose(router, f, rs.counter, pos, cached, wl.prompt[req], routable)
        full = rs.tail[best] - rs.head[best] >= q
        ok = act & ~full
        row = jnp.where(ok, best, rs.queue.shape[0])
        queue = rs.queue.at[row, rs.tail[best] % q].set(pos, mode="drop")
        tail = rs.tail.at[row].add(1, mode="drop")
        rs = RouterState(queue=queue, head=rs.head, tail=tail, counter=jnp.where(act, counter, rs.counter),
                         overflow=rs.overflow | (act & full))
        return rs, pos + act.astype(I32)

    rs, _ = masked_while_loop(cond, body, (rs, next_pending), (arrived, inst, sched, routable, wl))
    return rs


def fill_slots(inst: inst_lib.InstanceState, rs: RouterState, wl):
    """Move queued requests into free slots of their instance, in queue (arrival) order."""
    q = rs.queue.shape[1]

    def one(inst, queue, head, tail):
        s = inst.slots
        free = s.status == inst_lib.EMPTY
        n_move = jnp.minimum(tail - head, jnp.sum(free.astype(I32), dtype=I32))
        rank = prefix_sum(free.astype(I32)) - 1
        take = free & (rank < n_move)
        pos = queue[(head + jnp.maximum(rank, 0)) % q]
        inst = inst_lib.admit_to_slots(inst, take, pos, wl)
        left = tail - head - n_move
        no_waiting_slot = ~jnp.any(inst.slots.status == WAITING)
        overflow = inst.counters.slot_overflow | ((left > 0) & no_waiting_slot)
        inst = eqx.tree_at(lambda i: i.counters.slot_overflow, inst, overflow)
        return inst, head + n_move, left

    inst, head, left = jax.vmap(one)(inst, rs.queue, rs.head, rs.tail)
    return inst, eqx.tree_at(lambda r: r.head, rs, head), left
