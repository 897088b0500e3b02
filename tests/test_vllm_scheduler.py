"""Scheduler details of vLLM 0.19.0 that its own unit tests pin down (issue 12, part 0), each
checked in the engine and in the plain-Python oracle (tests/reference_sim.py) alike:

* async scheduling: a request arriving while batch k runs is first computed in batch k+2 (vLLM
  builds batch k+1 when k is launched); an idle engine starts it at once;
* the null block: ``num_gpu_blocks`` N leaves N - 1 blocks for requests;
* prefix-cache counters: every admission attempt of a never-preempted request is recorded
  (v0.19), or each request once at its first admission (later vLLM, the reference); nothing
  without prefix caching;
* the prefix index keeps every copy of a block hash (``BlockHashToBlockMap``): a hash stays
  findable while any copy is cached (the reference keeps the newest block only).
"""

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np
import pytest

import reference_sim
from _shared import PROFILES, load_model, runtime_for
from jaxsim import simulator
from jaxsim.engine import costs
from jaxsim.prefix import hash_ids
from jaxsim.spec import Calibration, HardwareConfig, SchedulerConfig, Workload

MS = 1_000_000
NONE = Calibration.none()


def _run(w, sched, num_gpu_blocks):
    return simulator.simulate(w, load_model(), HardwareConfig(num_gpu_blocks=num_gpu_blocks), sched,
                              runtime_for(num_gpu_blocks, sched.block_size), calib=NONE, profiles_dir=PROFILES,
                              max_slots=8)


def _oracle(w, sched, num_blocks, iter_time=lambda T, *_: 10 * MS + 1000 * T):
    """The oracle on ``num_blocks`` request blocks. Its iterations take 10 ms + 1 us per token
    unless ``iter_time`` says otherwise (the order of events, not the latency model, is under
    test)."""
    hashes = hash_ids([t if t is not None else [] for t in w.token_ids], sched.block_size)[0]
    return reference_sim.simulate(
        w.arrival_ns, w.input_toks, w.output_toks, hashes, num_blocks,
        iter_time, block_size=sched.block_size, max_num_seqs=sched.max_num_seqs,
        max_num_batched_tokens=sched.max_num_batched_tokens,
        long_prefill_threshold=sched.long_prefill_token_threshold, async_scheduling=sched.async_scheduling,
        enable_prefix_caching=sched.enable_prefix_caching,
        prefix_stats_every_attempt=sched.prefix_stats_every_attempt,
        prefix_index_all_copies=sched.prefix_index_all_copies)


# ------------------------------------------------------------------------ async scheduling
@functools.cache
def _arrivals() -> Workload:
    """A (100 + 40 tokens) at 0, B (10 + 5) at 100 ms while A decodes, C (10 + 5) at 3 s, long
    after both finished (the engine is idle)."""
    return Workload(np.array([0, 100 * MS, 3000 * MS], np.int64), np.array([100, 10, 10], np.int32),
                    np.array([40, 5, 5], np.int32), [None] * 3, "arrivals")


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_arrival_into_a_busy_engine_waits_one_batch_under_async_scheduling(async_scheduling):
    sched = SchedulerConfig(async_scheduling=async_scheduling, max_num_seqs=4)
    r = _run(_arrivals(), sched, 64)
    start, end = r.iter_start_ns, r.iter_end_ns
    k = int(np.flatnonzero((start <= 100 * MS) & (100 * MS < end))[0])  # the batch in flight at B's arrival
    # vLLM had built batch k+1 when k was launched: B is first computed in batch k+2 (async), or
    # in batch k+1 (sync: batches are built at the previous batch's end)
    expected = end[k + 1] if async_scheduling else end[k]
    assert r.first_scheduled_ns[1] == expected
    assert start[np.searchsorted(start, expected)] == expected  # a batch starts then, with B in it
    # an idle engine starts an arrival at once, either way
    assert r.first_scheduled_ns[2] == r.arrival_ns[2] == 3000 * MS
    # the oracle agrees on the order of events (its own iteration lengths)
    reqs, iters = _oracle(_arrivals(), sched, 63)
    o_start = np.array([it["start"] for it in iters])
    o_end = np.array([it["end"] for it in iters])
    j = int(np.flatnonzero((o_start <= 100 * MS) & (100 * MS < o_end))[0])
    assert reqs[1].first_scheduled == (o_end[j + 1] if async_scheduling else o_end[j])
    assert reqs[2].first_scheduled == 3000 * MS


# ------------------------------------------------------------------------------ null block
@functools.cache
def _two_small() -> Workload:
    """Two 20-token prompts with different ids, 12 output tokens each, at t = 0."""
    rng = np.random.default_rng(0)
    ids = [rng.integers(0, 100_000, 32).astype(np.int32) for _ in range(2)]
    return Workload(np.array([0, 0], np.int64), np.array([20, 20], np.int32), np.array([12, 12], np.int32), ids,
                    "two-small")


@pytest.mark.parametrize("reserve_null_block, recomputed", [(True, 9), (False, 1)])
def test_null_block_leaves_one_block_less(reserve_null_block, recomputed):
    """block_size 8, num_gpu_blocks 7. vLLM keeps block 0 as its null block: 6 blocks for R0 and
    R1 (3 each after their prefill; blocks 0-1 full and cached). In it6 R0 needs a 4th block (21
    + 5 tokens): R1 (25 tokens) is preempted, its blocks freed last first, and R0 takes R1's
    third block from the free-list head (evicting it). When R0 finishes, R1 finds its first 2
    blocks cached and recomputes 25 - 16 = 9 tokens. With all 7 blocks R0 takes the free 7th
    block, R1 preempts itself in the same step with its 3 blocks cached: it recomputes 25 - 24 = 1
    (vLLM's scheduler test case, at a block size vLLM's config accepts)."""
    sched = SchedulerConfig(block_size=8, max_num_batched_tokens=64, max_num_seqs=4,
                            reserve_null_block=reserve_null_block)
    r = _run(_two_small(), sched, 7)
    assert r.num_blocks == 7 - reserve_null_block
    assert r.iter_kv_blocks_used.max() <= r.num_blocks
    assert r.num_preemptions.tolist() == [0, 1]
    assert r.recomputed_tokens.tolist() == [0, recomputed]
    reqs, _ = _oracle(_two_small(), sched, 7 - reserve_null_block)
    assert [q.recomputed for q in reqs] == [0, recomputed]


# ------------------------------------------------------------------- prefix-cache counters
@functools.cache
def _refused() -> Workload:
    """A (100 + 3 tokens) and B (50 + 2) at t = 0; B's first 48 prompt tokens are A's."""
    rng = np.random.default_rng(1)
    a = rng.integers(0, 100_000, 103).astype(np.int32)
    b = np.concatenate([a[:48], rng.integers(0, 100_000, 4)]).astype(np.int32)
    return Workload(np.array([0, 0], np.int64), np.array([100, 50], np.int32), np.array([3, 2], np.int32),
                    [a, b], "refused")


REFUSED = SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4, async_scheduling=False)


@pytest.mark.parametrize("every, caching, queried, hits", [
    # 8 blocks = 7 for requests. it1: A takes 64 of its 100 tokens (queried 100, hit 0); B is not
    # tried (no budget left). it2-it4: A holds all 7 blocks (ceil(103/16)); B is tried each time
    # (budget left, a seat free), finds A's 3 full blocks of its 48 shared tokens (limit (50-1)//16
    # = 3), and is refused by the full-ISL gate (it needs 1 more block, 0 free). it5: A finished
    # and freed its blocks: B is admitted with the same 48-token hit. vLLM 0.19 records all four
    # attempts of B: 100 + 4 x 50 queried, 4 x 48 hit.
    (True, True, 100 + 4 * 50, 4 * 48),
    (False, True, 100 + 50, 48),  # later vLLM / the reference: once per request
    (True, False, 0, 0),  # no prefix caching: vLLM records no lookups
])
def test_prefix_cache_counters(every, caching, queried, hits):
    sched = dataclasses.replace(REFUSED, prefix_stats_every_attempt=every, enable_prefix_caching=caching)
    r = _run(_refused(), sched, 8)
    assert r.first_scheduled_ns[1] == r.iter_start_ns[4]  # admitted in the fifth iteration
    assert r.stats["prefix_requested_tokens"] == queried and r.stats["prefix_hit_tokens"] == hits
    assert r.iter_prefix_queried[-1] == queried and r.iter_prefix_hits[-1] == hits
    assert r.prefix_hit_tokens.tolist() == ([0, 48] if caching else [0, 0])  # per request: first admission
    _, iters = _oracle(_refused(), sched, 7)
    assert iters[-1]["prefix_queried"] == queried and iters[-1]["prefix_hits"] == hits
    np.testing.assert_array_equal(r.iter_prefix_queried, [it["prefix_queried"] for it in iters])


# ------------------------------------------------------------ every copy of a block hash
@functools.cache
def _copies() -> Workload:
    """A (128 + 1 tokens) at 0; B, A's prompt (+ 2), at 1 ms; D (32 + 1, other ids) at 500 ms;
    C, A's prompt again (+ 1), at 1 s."""
    rng = np.random.default_rng(2)
    p = rng.integers(0, 100_000, 128)
    a, b, c = (np.concatenate([p, rng.integers(0, 100_000, o)]).astype(np.int32) for o in (1, 2, 1))
    d = rng.integers(0, 100_000, 33).astype(np.int32)
    return Workload(np.array([0, MS, 500 * MS, 1000 * MS], np.int64), np.array([128, 128, 32, 128], np.int32),
                    np.array([1, 2, 1, 1], np.int32), [a, b, d, c], "copies")


def test_prefix_index_keeps_every_copy_of_a_block_hash():
    """block_size 16, 13 blocks for requests, budget 64 tokens, chunks of at most 32 (sync).
    it1: A computes tokens 0-31 (blocks 0-1 = hashes h0-h1). it2: A 32-63 (blocks 2-3 = h2-h3);
    B arrives, hits h0-h3 (64 tokens) and computes 64-95 in blocks 4-5 (h4-h5). it3: A computes
    64-95 too (blocks 6-7: a second copy of h4-h5, newer), B 96-127 (blocks 8-9 = h6-h7). it4: A
    96-127 (blocks 10-11: copies of h6-h7), B decodes (block 12); both finish and free their
    blocks last first, A's ahead of B's: the free list starts 11, 10, 7, 6, 12, 9, 8, 5, 4.
    it5: D pops blocks 11 and 10, evicting A's copies of h7 and h6. it6: C looks up h0-h6
    ((128 - 1) // 16 = 7 blocks). vLLM (all copies) finds h6 in B's block 8: 112 tokens hit, 16
    computed. The reference (newest block only) indexed h6 at A's block 10 and lost it with that
    block, though block 8 still holds it: 96 tokens hit, 32 computed, a longer TTFT."""
    from test_engine import ITER_FIELDS, ref_iter_time  # the reference latency: exact parity

    base = SchedulerConfig(max_num_batched_tokens=64, long_prefill_token_threshold=32, max_num_seqs=4,
                           async_scheduling=False)
    ttft = {}
    for all_copies, hit, computed, cached in [(True, 112, 16, 12), (False, 96, 32, 13)]:
        sched = dataclasses.replace(base, prefix_index_all_copies=all_copies)
        r = _run(_copies(), sched, 14)  # + vLLM's null block
        assert r.prefix_hit_tokens.tolist() == [0, 64, 0, hit]
        assert r.iter_num_tokens.tolist() == [32, 64, 64, 33, 32, computed]
        assert r.first_scheduled_ns[3] == r.arrival_ns[3] == r.iter_start_ns[5]  # an idle engine
        assert r.first_token_ns[3] == r.iter_end_ns[5]
        ttft[all_copies] = int(r.first_token_ns[3] - r.arrival_ns[3])
        # free blocks holding a hash, after each iteration: the last one caches C's new blocks
        # (all copies: block 7, which held A's copy of h5; newest only: blocks 12 and 9)
        assert r.iter_kv_blocks_cached.tolist() == [0, 0, 0, 12, 12, cached]
        reqs, iters = _oracle(_copies(), sched, 13, ref_iter_time)
        assert [q.prefix_hit for q in reqs] == [0, 64, 0, hit]
        np.testing.assert_array_equal(r.first_token_ns, [q.first_token for q in reqs])
        np.testing.assert_array_equal(r.finish_ns, [q.finish for q in reqs])
        for k, field in ITER_FIELDS.items():
            np.testing.assert_array_equal(getattr(r, field), [it[k] for it in iters], err_msg=field)
    assert ttft[True] < ttft[False]


# ------------------------------------------------------------------- engine host costs
def test_host_costs_hand_computed():
    """engine/costs.py: the step's CPU time (1.5 ms + 50 us x 10 sequences = 2 ms) adds in full
    without async scheduling and only beyond the GPU time with it; the overhead always."""
    args = (jnp.asarray(1_000_000, jnp.int64), jnp.asarray(1_500_000, jnp.int64), jnp.asarray(50_000, jnp.int64))
    host = lambda gpu, asynch: int(costs.host_time_ns(jnp.asarray(gpu, jnp.int64), jnp.asarray(10), asynch, *args))  # noqa: E731
    assert host(10_000_000, False) == 1_000_000 + 2_000_000
    assert host(10_000_000, True) == 1_000_000  # hidden behind the 10 ms GPU iteration
    assert host(1_500_000, True) == 1_000_000 + 500_000  # the GPU finishes first: 0.5 ms shows


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_host_costs_in_the_engine(async_scheduling):
    """The arrivals run with 1 ms + 100 us per sequence of CPU per step: each iteration of the
    sync engine lasts its GPU time + 1 ms + 0.1 ms x S; the async engine hides it (its decode
    iterations of A alone take ~10 ms of GPU time), so its iterations are the GPU's alone."""
    sched = SchedulerConfig(async_scheduling=async_scheduling, max_num_seqs=4)
    plain = _run(_arrivals(), sched, 64)
    calib = dataclasses.replace(NONE, step_cpu_ns=1_000_000, seq_cpu_ns=100_000)
    r = simulator.simulate(_arrivals(), load_model(), HardwareConfig(num_gpu_blocks=64), sched, runtime_for(64),
                           calib=calib, profiles_dir=PROFILES, max_slots=8)
    extra = (r.iter_end_ns - r.iter_start_ns)[:3] - (plain.iter_end_ns - plain.iter_start_ns)[:3]
    expected = 0 if async_scheduling else 1_000_000 + 100_000 * r.iter_num_seqs[:3]
    np.testing.assert_array_equal(extra, expected)  # the first iterations: A alone (prefill, decodes)
