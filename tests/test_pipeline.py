"""Pipeline parallelism per instance (REFERENCE.md §1.8): stage boundaries (vLLM get_pp_indices),
per-stage latencies that sum to the pp = 1 iteration, a 2-stage run composed by hand, and
invariants of a pp = 2 run on a small trace.

Compile budget: two pp = 2 loops (the hand-made 2-request traces share one; the 16-request trace).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsim import latency, simulator
from jaxsim.engine import instance as inst_lib
from jaxsim.spec import Calibration, HardwareConfig, ModelRuntimeConfig, SchedulerConfig, Workload

from _shared import PROFILES, load_model, runtime_for

MODEL = load_model()
SHAPE_ARGS = ("T", "S", "pc", "kp", "nd", "kvd_sum", "kvd_min", "kvd_max")


def _shape(T=0, S=0, pc=0, kp=0, nd=0, kvd_sum=0, kvd_min=0, kvd_max=0):
    return dict(T=T, S=S, pc=pc, kp=kp, nd=nd, kvd_sum=kvd_sum, kvd_min=kvd_min, kvd_max=kvd_max)


PREFILL = _shape(T=100, S=1, pc=100)
DECODE = _shape(T=1, S=1, nd=1, kvd_sum=100, kvd_min=100, kvd_max=100)
MIXED = _shape(T=700, S=5, pc=600, kp=300, nd=4, kvd_sum=4000, kvd_min=200, kvd_max=2500)


def test_stage_boundaries_are_vllm_get_pp_indices():
    def layers(L, pp, max_pp=None):
        return [int(x) for x in latency.pp_layers(L, pp, max_pp or pp)]

    # vLLM: partitions = [L // pp] * pp; for i in range(2, r + 2): partitions[-i] += 1
    assert layers(32, 1) == [32]
    assert layers(32, 2) == [16, 16]
    assert layers(32, 3) == [11, 11, 10]  # r = 2: the two stages before the last
    assert layers(32, 5) == [6, 6, 7, 7, 6]
    assert layers(80, 3) == [27, 27, 26]
    assert layers(5, 4) == [1, 1, 2, 1]
    assert layers(48, 4, max_pp=6) == [12, 12, 12, 12, 0, 0]  # stages past pp hold nothing
    for L in (5, 32, 48, 80):
        for pp in range(1, 7):
            got = layers(L, pp)
            r = L % pp
            want = [L // pp + (1 if pp - 1 - r <= s < pp - 1 else 0) for s in range(pp)]
            assert got == want and sum(got) == L


def _tables(pp, tp=1, **scales):
    hw = HardwareConfig(pp=pp, tp=tp)
    tb = simulator.latency_tables(str(PROFILES), hw, MODEL, "bf16", 2)
    return dataclasses.replace(tb, **{k: jnp.asarray(v, jnp.float64) for k, v in scales.items()})


@pytest.mark.parametrize("shape", [PREFILL, DECODE, MIXED])
def test_stage_times_split_the_iteration(shape):
    args = [shape[k] for k in SHAPE_ARGS]
    for pp in (1, 2, 3, 4):
        tb = _tables(pp)
        total, ext = latency.iteration_time(tb, *args)
        st, ext_s, p2p = latency.stage_times(tb, 4, *args)
        st = [int(x) for x in st]
        assert sum(st) == int(total)  # stages always add up to the pp = 1 iteration
        assert list(np.asarray(ext_s)) == list(np.asarray(ext))
        assert st[pp:] == [0] * (4 - pp)
        # [stage 0: in + prologue] + L_s x block + [last: head + out], exactly
        _, _, (t_pro, t_head) = latency._iteration(tb, *args, parts=True)
        blocks = int(total) - int(t_pro) - int(t_head)
        assert blocks % MODEL.num_layers == 0
        per_block = blocks // MODEL.num_layers
        L_s = [int(x) for x in latency.pp_layers(MODEL.num_layers, pp, pp)]
        want = [L_s[s] * per_block + (int(t_pro) if s == 0 else 0) + (int(t_head) if s == pp - 1 else 0)
                for s in range(pp)]
        assert st[:pp] == want
        # the hidden state to the next stage: latency + T*H*fp / bw on the TP link, floored
        hw = HardwareConfig()
        assert int(p2p) == math.floor(hw.link_latency_ns + shape["T"] * MODEL.hidden_size * 2 / hw.link_bw_gbps)
    # with pp = 1 the one stage is the iteration, whatever the scales (floors included)
    tb = _tables(1, compute_scale=0.77, memory_scale=1.3, link_scale=0.9)
    assert int(latency.stage_times(tb, 1, *args)[0][0]) == int(latency.iteration_time(tb, *args)[0])
    tb2 = _tables(2, link_scale=0.5)
    assert int(latency.stage_times(tb2, 2, *args)[2]) == math.floor(
        (20000.0 + shape["T"] * MODEL.hidden_size * 2 / 16.0) * 0.5)


def test_kv_capacity_with_pp():
    hw1, hw2 = HardwareConfig(), HardwareConfig(pp=2)
    sched, rt = SchedulerConfig(), ModelRuntimeConfig()
    w2 = MODEL.weight_bytes_per_rank(2, tp=1, pp=2)
    want = (math.floor(96 * 2**30 * 0.9) - w2) // (16 * (2 * MODEL.kv_dim * MODEL.num_layers * 2 // 2))
    assert simulator.num_kv_blocks(MODEL, hw2, sched, rt) == want
    assert simulator.num_kv_blocks(MODEL, hw2, sched, rt) > 2 * simulator.num_kv_blocks(MODEL, hw1, sched, rt)


@pytest.mark.parametrize("o", [1000, 2_000_000])  # a small overhead: stage 1 gates; a large one: stage 0
def test_two_stage_run_by_hand(o):
    """Two 100-token prompts (2 output tokens) arrive at 0; the token budget (100) fits one, so
    they go into different batches: batch 1 (A's prefill) forms at 0, batch 2 (B's prefill) when
    stage 0 is free, A's decode when A's batch is done and stage 0 is free, then B's decode.
    ``o`` is the iteration overhead: paid once per batch, on stage 0."""
    w = Workload(np.zeros(2, np.int64), np.array([100, 100], np.int32), np.array([2, 2], np.int32), [None, None])
    sched = SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=100)
    hw = HardwareConfig(pp=2, num_gpu_blocks=64)
    r = simulator.simulate(w, MODEL, hw, sched, runtime_for(64), calib=dataclasses.replace(Calibration.none(), iteration_overhead_ns=o), profiles_dir=PROFILES)
    tb = _tables(2)

    def stages(shape):
        st, _, p2p = latency.stage_times(tb, 2, *(shape[k] for k in SHAPE_ARGS))
        return int(st[0]), int(st[1]), int(p2p)

    a0, a1, pP = stages(PREFILL)
    d0, d1, pD = stages(DECODE)
    f0 = o + a0  # batch 1 (A prefill): stage 0 at 0
    f1 = f0 + pP + a1  # stage 1 is free: A's first token
    g0 = f0 + o + a0  # batch 2 (B prefill) forms at f0
    g1 = max(g0 + pP, f1) + a1
    t3 = max(f1, g0)  # batch 3 (A decode): A is back and stage 0 is free
    h0 = t3 + o + d0
    h1 = max(h0 + pD, g1) + d1
    t4 = max(g1, h0)  # batch 4 (B decode)
    i0 = t4 + o + d0
    i1 = max(i0 + pD, h1) + d1
    assert list(r.first_token_ns) == [f1, g1]
    assert list(r.finish_ns) == [h1, i1]
    assert list(r.iter_start_ns) == [0, f0, t3, t4]
    assert list(r.iter_end_ns) == [f1, g1, h1, i1]
    assert list(r.iter_num_tokens) == [100, 100, 1, 1]
    assert list(r.first_scheduled_ns) == [0, f0]
    assert (t3 == g0) == (o > 1000)  # with the large overhead A is back before stage 0 is free


def test_request_preempted_while_its_batch_is_in_flight_keeps_that_token():
    """Issue 12 / vLLM 0.19 ``stopped_preempted_reqs``: two 80-token prompts (16 outputs) at 0 and
    1 ns, a 100-token budget, 10 usable blocks of 16, pp = 2. A's prefill forms batch 1 (5 blocks),
    B's forms batch 2 at once (the other 5). At the end of batch 1, A's first decode needs a 6th
    block: the tail of the running list, B, is preempted while batch 2 is in flight. vLLM applies
    the token sampled for B when batch 2 ends, so B's first token is out then (jaxsim used to drop
    it and emit it only after recomputing the prompt, at 194 ms); B is admitted again when A's
    blocks come back, and recomputes its prompt and that token (81)."""
    w = Workload(np.array([0, 1], np.int64), np.array([80, 80], np.int32), np.array([16, 16], np.int32),
                 [None, None])
    sched = SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=100, enable_prefix_caching=False)
    hw = HardwareConfig(pp=2, num_gpu_blocks=11)  # 10 usable: vLLM reserves a null block
    r = simulator.simulate(w, MODEL, hw, sched, runtime_for(11), calib=Calibration.none(), profiles_dir=PROFILES)
    start, end = r.iter_start_ns, r.iter_end_ns
    assert list(r.iter_num_tokens[:3]) == [80, 80, 1]  # A's prefill, B's prefill, A's first decode
    assert list(r.first_scheduled_ns) == [0, start[1]]
    assert list(r.num_preemptions) == [0, 1]
    assert r.first_token_ns[1] == end[1]  # when batch 2 ends, not after a recomputation
    # B waits for A's blocks (A finishes), then recomputes 80 prompt + 1 output token
    again = int(np.flatnonzero(start >= r.finish_ns[0])[0])
    assert start[again] == r.finish_ns[0] and r.iter_num_tokens[again] == 81
    assert list(r.recomputed_tokens) == [0, 81]
    t = r.token_times_ns[r.token_offsets[1]:r.token_offsets[2]]
    assert len(t) == 16 and np.all(np.diff(t) > 0) and t[-1] == r.finish_ns[1]
    assert int(np.sum(r.iter_gen_tokens)) == 32


def test_pp2_invariants_on_a_trace(sharegpt16):
    w = sharegpt16
    sched = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512)
    p = simulator.prepare(w, MODEL, HardwareConfig(pp=2, num_gpu_blocks=800), sched, runtime_for(800),
                          profiles_dir=PROFILES)
    assert p.static.max_pp == 2
    final = jax.block_until_ready(simulator.run_prepared(p))
    r = simulator.to_result(p, final)
    n = w.num_requests
    assert np.all(r.finish_ns > 0) and int(final.finished) == n
    # tokens in order: each request's emissions strictly increase, from its first token to its finish
    for i in range(n):
        t = r.token_times_ns[r.token_offsets[i]:r.token_offsets[i + 1]]
        assert len(t) == w.output_toks[i]
        assert t[0] == r.first_token_ns[i] and t[-1] == r.finish_ns[i]
        assert np.all(np.diff(t) > 0)
        assert r.first_scheduled_ns[i] >= w.arrival_ns[i]
    # every KV block comes back (requests parked by async scheduling still hold theirs)
    f = jax.device_get(final)
    s = f.inst.slots
    assert not np.any((s.status == inst_lib.RUNNING) | (s.status == inst_lib.WAITING))
    parked = int(np.sum(np.where(s.status == inst_lib.FINISHING, s.nblk, 0)))
    assert int(f.inst.pool.num_free[0]) + parked == p.num_blocks
    assert np.all(f.inst.pipe.end == np.iinfo(np.int64).max) and np.all(f.inst.pipe.slot_batch == -1)
    # one row per batch: formation < completion, completions one at a time; at most pp = 2
    # batches in flight at any time, and the pipeline does fill up
    start, end = r.iter_start_ns, r.iter_end_ns
    assert np.all(start < end) and np.all(np.diff(end) > 0)
    in_flight = [int(np.sum((start <= t) & (t < end))) for t in start]
    assert max(in_flight) == 2
    # a batch forms only when stage 0 is free: formations are strictly ordered
    assert np.all(np.diff(start) > 0)
    assert int(np.sum(r.iter_gen_tokens)) == int(w.output_toks.sum())
    if r.stats["preemptions"] == 0:
        assert int(np.sum(r.iter_prompt_tokens)) == int(w.input_toks.sum())


def test_mixed_pp_cluster_equals_lone_instances(sharegpt16):
    """A cluster may mix pp degrees (one compiled max_pp): round robin over a pp = 1 and a pp = 2
    instance; the pp = 2 one serves its half of the trace exactly as a lone pp = 2 instance would
    (pp = 1 instances are the rest of the suite's engine)."""
    from jaxsim.engine import routing
    from jaxsim.spec import InstanceSpec

    w = sharegpt16
    sched = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=512)
    hws = [HardwareConfig(num_gpu_blocks=600), HardwareConfig(pp=2, num_gpu_blocks=600)]
    kw = dict(rt=runtime_for(600), profiles_dir=PROFILES, max_slots=12, record_token_times=False)
    res = simulator.simulate_cluster(w, MODEL, [InstanceSpec(h, sched) for h in hws], routing.Router("round_robin"),
                                     **kw)
    order = np.lexsort((np.arange(w.num_requests), w.arrival_ns))
    np.testing.assert_array_equal(res.instance[order], np.arange(w.num_requests) % 2)
    for k, hw in [(1, hws[1])]:
        idx = np.sort(order[k::2])
        half = Workload(w.arrival_ns[idx], w.input_toks[idx], w.output_toks[idx], [w.token_ids[i] for i in idx])
        lone = simulator.simulate(half, MODEL, hw, sched, **kw)
        for name in ("first_scheduled_ns", "first_token_ns", "finish_ns"):
            np.testing.assert_array_equal(getattr(res, name)[idx], getattr(lone, name), err_msg=name)
        rows = res.iter_instance == k
        np.testing.assert_array_equal(res.iter_start_ns[rows], lone.iter_start_ns)
        np.testing.assert_array_equal(res.iter_end_ns[rows], lone.iter_end_ns)
