"""A slow, obvious, plain-Python simulation of one vLLM V1 instance (REFERENCE.md §1.1-1.4).

It is the test oracle for the JAX engine: same discrete semantics, written as a direct port of
the pseudo-code (lists, a doubly linked free list via OrderedDict, a dict as the prefix index).
The iteration latency comes from a callable so that tests can plug in the reference latency
model or a hand-made one.
"""

import collections
import dataclasses
import math

import numpy as np


@dataclasses.dataclass
class _Req:
    rid: int
    arrival: int
    prompt: int
    target: int
    hashes: list  # dense hash ids of the full blocks of input+output ids
    reached: int = 0
    computed: int = 0
    first: bool = True
    num_preemptions: int = 0
    last_emit: int = 0
    blocks: list = dataclasses.field(default_factory=list)
    num_registered: int = 0
    first_scheduled: int = -1
    first_token: int = -1
    finish: int = -1
    prefix_hit: int = -1  # recorded once, at first admission
    recomputed: int = 0
    token_times: list = dataclasses.field(default_factory=list)


class _BlockPool:
    """Port of vLLM's BlockPool: LRU free list, ref counts, a prefix index.

    ``all_copies`` (vLLM 0.19.0 ``BlockHashToBlockMap``): the index maps a hash to every block
    registered under it, in insertion order; a lookup returns the first (oldest) and evicting a
    block removes only that copy. Otherwise one block per hash, the newest (the reference)."""

    def __init__(self, num_blocks: int, all_copies: bool = True):
        self.free = collections.OrderedDict((b, None) for b in range(num_blocks))
        self.ref = [0] * num_blocks
        self.hash = [None] * num_blocks
        self.all_copies = all_copies
        self.index = {}  # hash -> block, or with all_copies hash -> {block: None} (insertion order)

    def num_free(self) -> int:
        return len(self.free)

    def pop(self) -> int:
        b, _ = self.free.popitem(last=False)
        h = self.hash[b]
        if h is not None:
            if self.all_copies:
                copies = self.index[h]
                del copies[b]
                if not copies:
                    del self.index[h]
            elif self.index.get(h) == b:
                del self.index[h]
            self.hash[b] = None
        self.ref[b] = 1
        return b

    def touch(self, b: int) -> None:
        if self.ref[b] == 0:
            del self.free[b]
        self.ref[b] += 1

    def release(self, blocks: list) -> None:
        for b in reversed(blocks):  # tail first: the end of a sequence is evicted before its prefix
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free[b] = None

    def register(self, b: int, h: int) -> None:
        if self.hash[b] is None:
            self.hash[b] = h
            if self.all_copies:
                self.index.setdefault(h, {})[b] = None
            else:
                self.index[h] = b

    def get(self, h: int):
        """The block found for hash ``h`` (the oldest copy with all_copies), None for a miss."""
        if self.all_copies:
            return next(iter(self.index[h])) if h in self.index else None
        return self.index.get(h)


def simulate(workload_arrival, input_toks, output_toks, hashes, num_blocks, iter_time_fn, *,
             block_size=16, max_num_seqs=128, max_num_batched_tokens=2048, long_prefill_threshold=0,
             enable_chunked_prefill=True, reserve_full_isl=True, enable_prefix_caching=True,
             async_scheduling=False, prefix_stats_every_attempt=False, prefix_index_all_copies=True,
             iteration_overhead_ns=0, max_iterations=10**7):
    """Run to completion. Returns (list of _Req in id order, list of per-iteration dicts).

    ``num_blocks`` is the blocks requests can use (vLLM's null block, when reserved, excluded).
    ``async_scheduling``: finished requests hold seat and blocks one batch longer, and a batch
    that follows another at once was built when that one started: it sees only the requests that
    had arrived by then (vLLM keeps two batches in flight). ``prefix_stats_every_attempt``: the
    prefix-cache counters record every admission attempt of a never-preempted request (vLLM <=
    0.19), else each request's first admission. ``prefix_index_all_copies``: the prefix index keeps
    every copy of a block hash (vLLM's BlockHashToBlockMap), else the newest only (the reference)."""
    bs = block_size
    msq = max_num_seqs or 10**9
    mnbt = max_num_batched_tokens or 10**9
    thr = long_prefill_threshold
    reqs = [
        _Req(i, int(a), int(p), int(p) + int(o), list(h) if enable_prefix_caching else [], reached=int(p))
        for i, (a, p, o, h) in enumerate(zip(workload_arrival, input_toks, output_toks, hashes))
    ]
    pending = sorted(reqs, key=lambda r: (r.arrival, r.rid))
    pool = _BlockPool(num_blocks, prefix_index_all_copies)
    running, waiting, iters = [], [], []
    finishing = []  # async scheduling: finished in the previous batch, seat and blocks still held
    now, done, pi = 0, 0, 0
    last_start = None  # start of the batch that ended at `now` (None: the engine was idle)
    queried = hits = 0  # prefix-cache counters (tokens)

    def lookup(r):
        if not enable_prefix_caching:
            return []
        m = min((r.reached - 1) // bs, len(r.hashes))
        hit = []
        for j in range(m):
            b = pool.get(r.hashes[j])
            if b is None:
                break
            hit.append(b)
        return hit

    def register_full(r):
        full = min(r.computed_after, r.reached) // bs
        for j in range(r.num_registered, min(full, len(r.hashes))):
            pool.register(r.blocks[j], r.hashes[j])
        r.num_registered = max(r.num_registered, min(full, len(r.hashes)))

    def drain_finishing():
        for r in finishing:
            pool.release(r.blocks)
            r.blocks = []
        finishing.clear()

    def preempt(v):
        pool.release(v.blocks)
        v.blocks, v.num_registered, v.computed = [], 0, 0
        v.num_preemptions += 1
        waiting.insert(0, v)

    while done < len(reqs):
        assert len(iters) < max_iterations, "iteration limit reached"
        while pi < len(pending) and pending[pi].arrival <= now:
            waiting.append(pending[pi])
            pi += 1
        if not running:  # the engine drains its last outputs before idling
            drain_finishing()
        if not running and not waiting:
            now = pending[pi].arrival
            last_start = None
            continue
        # async scheduling: with requests running, this batch was built when the previous began
        cutoff = last_start if (async_scheduling and running and last_start is not None) else now
        # ---- schedule (REFERENCE.md §1.2) ----
        budget, scheduled, preempted, i = mnbt, [], False, 0
        while i < len(running) and budget > 0:
            r = running[i]
            n = r.reached - r.computed
            if 0 < thr < n:
                n = thr
            n = min(n, budget)
            if n <= 0:
                i += 1
                continue
            stop = False
            while True:
                need = math.ceil((r.computed + n) / bs) - len(r.blocks)
                if need <= pool.num_free():
                    break
                v = running.pop()
                preempt(v)
                preempted = True
                if v is r:
                    stop = True
                    break
            if stop:
                break
            for _ in range(max(need, 0)):
                r.blocks.append(pool.pop())
            r.computed_after = r.computed + n
            register_full(r)
            scheduled.append((r, n, r.computed))
            budget -= n
            i += 1
        if not preempted:
            while waiting and budget > 0 and len(running) + len(finishing) < msq:
                r = waiting[0]
                if r.arrival > cutoff:  # not yet seen by this batch (arrivals are in FCFS order)
                    break
                hit_blocks = lookup(r) if r.computed == 0 else []
                npu_hit = len(hit_blocks) * bs
                if enable_prefix_caching and prefix_stats_every_attempt and r.num_preemptions == 0:
                    queried += r.reached
                    hits += npu_hit
                c = r.computed + npu_hit
                n = r.reached - c
                if 0 < thr < n:
                    n = thr
                if not enable_chunked_prefill and n > budget:
                    break
                n = min(n, budget)
                if n <= 0:
                    break
                hits_free = sum(1 for b in hit_blocks if pool.ref[b] == 0)
                if reserve_full_isl:
                    tokens = max(r.reached, c)
                    if math.ceil(tokens / bs) - len(hit_blocks) + hits_free > pool.num_free():
                        break
                need = math.ceil((c + n) / bs) - len(hit_blocks) + hits_free
                if need > pool.num_free():
                    break
                for b in hit_blocks:
                    pool.touch(b)
                r.blocks = list(hit_blocks)
                for _ in range(math.ceil((c + n) / bs) - len(hit_blocks)):
                    r.blocks.append(pool.pop())
                r.num_registered = len(hit_blocks)
                waiting.pop(0)
                running.append(r)
                if r.prefix_hit < 0:
                    r.prefix_hit = npu_hit
                    if enable_prefix_caching and not prefix_stats_every_attempt:
                        queried += r.prompt
                        hits += npu_hit
                else:
                    r.recomputed += r.reached - npu_hit
                if r.first_scheduled < 0:
                    r.first_scheduled = now
                r.computed = c
                r.computed_after = c + n
                register_full(r)
                scheduled.append((r, n, c))
                budget -= n
        for r, n, c in scheduled:
            r.computed = c + n
        if not scheduled and finishing:  # async: drain the parked outputs, then schedule again
            drain_finishing()
            continue
        if not scheduled:
            raise RuntimeError(f"no progress at t={now}: the head of the waiting queue never fits the KV cache")
        # ---- latency ----
        pc = sum(n for _, n, _ in scheduled if n > 1)
        kp = sum(c for _, n, c in scheduled if n > 1)
        dec = [c for _, n, c in scheduled if n == 1]
        T = sum(n for _, n, _ in scheduled)
        dt = iter_time_fn(T, len(scheduled), pc, kp, len(dec), sum(dec), min(dec, default=0), max(dec, default=0))
        start = now
        now = now + int(dt) + iteration_overhead_ns
        # ---- end of iteration (REFERENCE.md §1.1) ----
        prompt_tok, gen_tok = 0, 0
        drain_finishing()  # the previous batch's finishers, before this batch's
        for r, n, c in scheduled:
            if n > 1 or r.first:
                prompt_tok += n
            if r.first and r.computed >= r.prompt:
                r.first_token = now
                r.reached += 1
                r.first = False
                r.last_emit = now
                r.token_times.append(now)
                prompt_tok += r.prefix_hit
                gen_tok += 1
            elif not r.first and r.computed >= r.reached:
                r.reached += 1
                r.last_emit = now
                r.token_times.append(now)
                gen_tok += 1
            if r.reached >= r.target:
                r.finish = now
                if async_scheduling:
                    finishing.append(r)
                else:
                    pool.release(r.blocks)
                    r.blocks = []
                running.remove(r)
                done += 1
        # Arrivals during the iteration are counted as waiting at its end, like vLLM's gauge.
        arrived = sum(1 for p in pending[pi:] if p.arrival <= now)
        iters.append(dict(start=start, end=now, prompt=prompt_tok, gen=gen_tok, T=T, S=len(scheduled),
                          running=len(running), waiting=len(waiting) + arrived,
                          kv_used=num_blocks - pool.num_free(), prefix_queried=queried, prefix_hits=hits))
        last_start = start
    return reqs, iters
