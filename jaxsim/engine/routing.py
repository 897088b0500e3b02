"""Routing arrivals across the instances of a cluster (REFERENCE.md §1.6).

Each request is routed once, when it arrives, in arrival order. A routed request joins its
instance's queue (a FIFO of positions in arrival order, ``RouterState.queue``) and moves into a
free request slot of that instance as soon as there is one; queued and slotted-but-waiting
requests together form the instance's waiting queue (FCFS by arrival position, so the scheduler
sees exactly what a lone instance would see of the same requests).

Policies (``Router.policy``; static: a policy is a code path, so it splits sweep groups) are
registered by name in ``engine/routers/`` (one file each, behind ``AbstractRoutingPolicy``):

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
``power_of_two`` two distinct routable instances drawn uniformly (seeded as ``random``), the less
                 loaded by the ``least_loaded`` score wins (the first drawn on ties)

Prefill/decode disaggregation (REFERENCE.md §1.7): arrivals go to prefill (or colocated)
instances only. The decode instance is picked by the same policy, among the decode instances,
with its own rotating counter, when the request is routed: like vLLM's disaggregated proxy, which
names both instances when a request arrives, so that the prefill instance can stream the KV
layer by layer to the instance that will use it. A decode instance's load counts the requests
already assigned to it and still in prefill or in transfer (``Releases.inbound``).

Requests that enter a queue during the run (``Releases``): a handed-off request when its last KV
layer has arrived (it joins its decode instance's queue), and an agentic sub-request when its
predecessor has finished and its tool call is over (it is routed like an arrival). Their queue
entries are ``n_req + k`` for the k-th such release, so that queue order is arrival order, then
release order.
"""

import dataclasses
from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int

from jaxsim.engine import instance as inst_lib
from jaxsim.engine import kvpool, routers
from jaxsim.engine.instance import I32, NEVER, RUNNING, WAITING
from jaxsim.engine.loops import masked_while_loop
from jaxsim.engine.ops import prefix_sum

# The policy names registered when jaxsim is imported (engine/routers/__init__.py), in order;
# routers.names() also lists any registered later.
POLICIES = routers.names()
COLOCATED, PREFILL, DECODE = 0, 1, 2  # instance roles (EngineParams.role)


@dataclasses.dataclass(frozen=True)
class Router:
    """How arrivals pick an instance. Hashable: it is a static argument of the compiled run.

    ``policy`` names a registered policy (``routers.names()``); the policy's parameters are taken
    from the fields of the same name here (``routers.build``)."""

    policy: str = "least_loaded"
    seed: int = 42  # for the seeded policies (random, power_of_two)
    score_fn: Callable | None = None  # for policy "custom"

    def __post_init__(self):
        if self.policy not in routers.names():
            raise ValueError(f"routing policy {self.policy!r}: expected one of {routers.names()}")
        # score_fn is the one optional field: it must be given exactly to a policy that takes it.
        takes = [p for p in routers.names() if "score_fn" in routers.params(p)]
        if self.policy in takes and self.score_fn is None:
            raise ValueError(f"routing policy {self.policy!r} needs score_fn")
        if self.policy not in takes and self.score_fn is not None:
            raise ValueError(f"score_fn needs routing policy {' or '.join(map(repr, takes))}, not {self.policy!r}")


class RouterState(eqx.Module):
    queue: Int[Array, "inst q"]  # arrival positions routed to the instance, FIFO (index mod q)
    head: Int[Array, " inst"]  # entries head..tail-1 are queued (monotone counters)
    tail: Int[Array, " inst"]
    counter: Int[Array, ""]  # the rotating scan start of round_robin / least_loaded / ...
    decode_counter: Int[Array, ""]  # the same, for picking decode instances (P/D)
    overflow: Bool[Array, ""]  # a queue was full (never with the default capacity: all requests)


class Releases(eqx.Module):
    """Requests that enter a queue during the run, and the P/D routing decisions (per request)."""

    release_at: Int[Array, " req"]  # when the request (re-)enters a queue; NEVER when not pending
    dest: Int[Array, " req"]  # its decode instance (P/D), -1 before routing or without P/D
    kv_in: Int[Array, " req"]  # prompt tokens whose KV it brings (a hand-off); 0 for a fresh request
    # the request of re-entry k (queue entry n_req + k): a request enters at most twice during the
    # run (released by its session, handed off to decode), so 2 * n_req entries
    entry_req: Int[Array, " reentry"]
    n_entries: Int[Array, ""]
    inbound: Int[Array, " inst"]  # assigned to the decode instance, not yet in its queue
    # Requests with an agentic successor routed to each instance and not yet finished or handed
    # off there: such an instance may release a request when one of its iterations ends, so the
    # other instances may not run ahead of it (engine/cluster.py, the lane horizon).
    holders: Int[Array, " inst"]


def init_router(num_instances: int, capacity: int) -> RouterState:
    z = jnp.zeros(num_instances, I32)
    zero = jnp.asarray(0, I32)
    return RouterState(queue=jnp.zeros((num_instances, max(capacity, 1)), I32), head=z, tail=z,
                       counter=zero, decode_counter=zero, overflow=jnp.asarray(False))


def init_releases(num_instances: int, n_req: int) -> Releases:
    return Releases(release_at=jnp.full(n_req, NEVER), dest=jnp.full(n_req, -1, I32), kv_in=jnp.zeros(n_req, I32),
                    entry_req=jnp.zeros(2 * n_req, I32), n_entries=jnp.asarray(0, I32),
                    inbound=jnp.zeros(num_instances, I32), holders=jnp.zeros(num_instances, I32))


def _features(inst: inst_lib.InstanceState, rs: RouterState, sched: inst_lib.SchedulerParams) -> dict:
    status = inst.slots.status
    return dict(waiting=jnp.sum((status == WAITING).astype(I32), axis=1, dtype=I32) + (rs.tail - rs.head),
                running=jnp.sum((status == RUNNING).astype(I32), axis=1, dtype=I32),
                free_blocks=inst.pool.num_free, num_blocks=sched.num_blocks, max_num_seqs=sched.max_num_seqs)


def choose(router: Router, f: dict, counter, pos, cached_blocks, prompt, routable=None):
    """The instance for the request at arrival position ``pos``; and the new counter (both int32
    scalars). ``f``: ``_features`` (``int32[inst]`` each); ``cached_blocks``: ``int32[inst]``;
    ``prompt``: tokens. Instances that are not ``routable`` (padding of a smaller cluster design,
    the other P/D role) are never chosen. The rule is the policy's (``routers``,
    ``AbstractRoutingPolicy.pick``)."""
    n = f["waiting"].shape[0]
    routable = jnp.ones(n, bool) if routable is None else routable
    best, counter = routers.build(router).pick(f, counter, pos, cached_blocks, prompt, routable)
    return jnp.asarray(best).astype(I32), jnp.asarray(counter).astype(I32)


def _enqueue(rs: RouterState, target, entry, act) -> RouterState:
    """Append ``entry`` to ``target``'s queue when ``act`` (a full queue sets ``overflow``)."""
    q = rs.queue.shape[1]
    full = rs.tail[target] - rs.head[target] >= q
    row = jnp.where(act & ~full, target, rs.queue.shape[0])  # out of range: dropped
    return eqx.tree_at(lambda r: (r.queue, r.tail, r.overflow), rs,
                       (rs.queue.at[row, rs.tail[target] % q].set(entry, mode="drop"),
                        rs.tail.at[row].add(1, mode="drop"), rs.overflow | (act & full)))


def _hold(rel: Releases, wl, target, req, act) -> Releases:
    """Count ``req`` as held by ``target`` when it has an agentic successor (see ``holders``)."""
    held = act & (wl.next_in_session[req] >= 0)
    return eqx.tree_at(lambda r: r.holders, rel,
                       rel.holders.at[jnp.where(held, target, rel.holders.shape[0])].add(1, mode="drop"))


def _route_one(router: Router, rs: RouterState, rel: Releases, inst, sched, routable, role, wl, req, key_pos,
               act, *, block_size: int, pd: bool):
    """Route request ``req`` (when ``act``): its serving instance, and with ``pd`` its decode
    instance (recorded in ``rel``). Returns ``(instance, rs, rel)``."""
    f = _features(inst, rs, sched)
    if routers.get(router.policy).needs_prefix_lookup:
        # The blocks its admission would find cached: vLLM looks up (prompt - 1) // block_size.
        limit = jnp.minimum((wl.prompt[req] - 1) // block_size, wl.n_hashes[req])
        cached = jax.vmap(lambda pool: kvpool.lookup_prefix(pool, wl.hashes[req], limit)[0])(inst.pool)
    else:
        cached = jnp.zeros_like(f["waiting"])
    best, counter = choose(router, f, rs.counter, key_pos, cached, wl.prompt[req], routable & (role != DECODE))
    rs = eqx.tree_at(lambda r: r.counter, rs, jnp.where(act, counter, rs.counter))
    if pd:
        fd = {**f, "waiting": f["waiting"] + rel.inbound}
        dest, dcounter = choose(router, fd, rs.decode_counter, key_pos + (1 << 30), cached, wl.prompt[req],
                                routable & (role == DECODE))
        dest = jnp.where(role[best] == PREFILL, dest, -1)  # a colocated instance decodes itself
        w = jnp.where(act & (dest >= 0), req, rel.dest.shape[0])
        rs = eqx.tree_at(lambda r: r.decode_counter, rs, jnp.where(act & (dest >= 0), dcounter, rs.decode_counter))
        rel = eqx.tree_at(lambda r: (r.dest, r.inbound), rel,
                          (rel.dest.at[w].set(dest, mode="drop"),
                           rel.inbound.at[jnp.where(w < rel.dest.shape[0], dest, rel.inbound.shape[0])].add(
                               1, mode="drop")))
    return best, rs, rel


def route_arrivals(inst, rs: RouterState, rel: Releases, sched, routable, role, wl, next_pending, arrived, *,
                   router: Router, block_size: int, pd: bool):
    """Route the requests at arrival positions ``next_pending .. arrived - 1``, one at a time
    (each decision sees the queues as the previous ones left them)."""

    def cond(consts, c):
        return c[2] < consts[0]

    def body(consts, c):  # a no-op once every arrival is routed (the writes are masked)
        arrived, inst, sched, routable, role, wl = consts
        rs, rel, pos = c
        act = pos < arrived
        req = wl.order[jnp.minimum(pos, wl.order.shape[0] - 1)]
        best, rs, rel = _route_one(router, rs, rel, inst, sched, routable, role, wl, req, pos, act,
                                   block_size=block_size, pd=pd)
        return _enqueue(rs, best, pos, act), _hold(rel, wl, best, req, act), pos + act.astype(I32)

    rs, rel, _ = masked_while_loop(cond, body, (rs, rel, next_pending), (arrived, inst, sched, routable, role, wl))
    return rs, rel


def release_due(inst, rs: RouterState, rel: Releases, sched, routable, role, wl, now, *, router: Router,
                block_size: int, pd: bool):
    """Queue the requests whose release time has come, in order of release time (then request
    id): a handed-off request joins its decode instance's queue; a fresh one is routed."""
    n_req = rel.release_at.shape[0]

    def cond(consts, c):
        return jnp.any(c[1].release_at <= consts[0])

    def body(consts, c):
        now, inst, sched, routable, role, wl = consts
        rs, rel = c
        req = jnp.argmin(rel.release_at).astype(I32)
        act = rel.release_at[req] <= now
        handed = rel.kv_in[req] > 0
        # (a hand-off is not routed again: every write of _route_one is masked by its act)
        routed, rs, rel = _route_one(router, rs, rel, inst, sched, routable, role, wl, req,
                                     n_req + rel.n_entries, act & ~handed, block_size=block_size, pd=pd)
        target = jnp.where(handed, rel.dest[req], routed)
        inbound = rel.inbound.at[jnp.where(act & handed, target, rel.inbound.shape[0])].add(-1, mode="drop")
        entry = n_req + rel.n_entries
        rs = _enqueue(rs, target, entry, act)
        rel = _hold(rel, wl, target, req, act)
        w = jnp.where(act, req, n_req)
        rel = eqx.tree_at(lambda r: (r.release_at, r.entry_req, r.n_entries, r.inbound), rel,
                          (rel.release_at.at[w].set(NEVER, mode="drop"),
                           rel.entry_req.at[jnp.where(act, rel.n_entries, 2 * n_req)].set(req, mode="drop"),
                           rel.n_entries + act.astype(I32), inbound))
        return rs, rel

    return masked_while_loop(cond, body, (rs, rel), (now, inst, sched, routable, role, wl))


def fill_slots(inst: inst_lib.InstanceState, rs: RouterState, wl, now, reentries: "inst_lib.Reentries | None" = None):
    """Move queued requests into free slots of their instance, in queue order, at ``now``
    ([inst] ns: each instance's time in the step)."""
    q = rs.queue.shape[1]

    def one(inst, queue, head, tail, now):
        s = inst.slots
        free = s.status == inst_lib.EMPTY
        n_move = jnp.minimum(tail - head, jnp.sum(free.astype(I32), dtype=I32))
        rank = prefix_sum(free.astype(I32)) - 1
        take = free & (rank < n_move)
        pos = queue[(head + jnp.maximum(rank, 0)) % q]
        inst = inst_lib.admit_to_slots(inst, take, pos, wl, now, reentries)
        left = tail - head - n_move
        no_waiting_slot = ~jnp.any(inst.slots.status == WAITING)
        overflow = inst.counters.slot_overflow | ((left > 0) & no_waiting_slot)
        inst = eqx.tree_at(lambda i: i.counters.slot_overflow, inst, overflow)
        return inst, head + n_move, left

    inst, head, left = jax.vmap(one)(inst, rs.queue, rs.head, rs.tail, now)
    return inst, eqx.tree_at(lambda r: r.head, rs, head), left
