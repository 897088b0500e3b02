"""Clusters of several instances (engine/routing.py, simulator.simulate_cluster): routing
decisions by hand, a round-robin pair equals two lone instances on the halves of the trace,
invariants on a heterogeneous least-loaded cluster, and prefix affinity.

Compile budget: a 2-instance and a 3-instance cluster loop (~15 s each on CPU), plus the lone
runs on the two halves (one shape).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsim import simulator
from jaxsim.engine import cluster, routing
from jaxsim.errors import JaxsimInputError
from jaxsim.spec import HardwareConfig, InstanceSpec, SchedulerConfig, Workload

from _shared import PROFILES, load_model, load_trace, runtime_for

MODEL = load_model()
SCHED = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=1024)
PRO = InstanceSpec(HardwareConfig(num_gpu_blocks=600), SCHED)
RTX4090 = HardwareConfig(name="RTX4090", mem_size_gb=24, link_latency_ns=1000,
                         cpu_mem_bw_gbps=50, num_gpu_blocks=400)
RT = runtime_for(400)  # a max_model_len every instance's cache holds (vLLM refuses a smaller cache)


def _features(**kw):
    f = dict(waiting=[0, 0, 0], running=[0, 0, 0], free_blocks=[0, 0, 0], num_blocks=[9, 9, 9], max_num_seqs=[4, 4, 4])
    f.update(kw)
    return {k: jnp.asarray(v, jnp.int32) for k, v in f.items()}


def _choose(policy, f, counter=0, cached=(0, 0, 0), pos=0, **kw):
    best, new = routing.choose(routing.Router(policy, **kw), f, jnp.int32(counter), jnp.int32(pos),
                               jnp.asarray(cached, jnp.int32), jnp.int32(100))
    return int(best), int(new)


def test_routing_decisions_by_hand():
    # LOAD = (4 waiting + running) / max_num_seqs, raw when unlimited: 8/4 = 2, 3/4, 4 -> instance 1.
    assert _choose("least_loaded", _features(waiting=[2, 0, 1], running=[0, 3, 0], max_num_seqs=[4, 4, 0])) == (1, 2)
    # Ties: the scan starts at the counter; the first minimum wins.
    assert _choose("least_loaded", _features(), counter=2) == (2, 3)
    assert _choose("least_loaded", _features(), counter=4) == (1, 2)
    assert _choose("round_robin", _features(), counter=5) == (2, 3)
    assert _choose("kv_aware", _features(free_blocks=[10, 30, 30])) == (1, 2)
    assert _choose("kv_aware", _features(free_blocks=[10, 30, 30]), counter=2) == (2, 3)
    # Most cached blocks first, then least loaded: instances 1 and 2 tie on cache, 2 is idler.
    f = _features(waiting=[0, 1, 0], running=[0, 0, 1])
    assert _choose("prefix_affinity", f, cached=(0, 2, 2)) == (2, 3)
    assert _choose("prefix_affinity", f, cached=(3, 2, 2)) == (0, 1)
    # Random: seeded by (seed, arrival position), so reproducible, and it covers the instances.
    picks = [_choose("random", _features(), pos=p, seed=7)[0] for p in range(30)]
    assert picks == [_choose("random", _features(), pos=p, seed=7)[0] for p in range(30)]
    assert set(picks) == {0, 1, 2}
    # A user score: fewest running, lowest wins.
    assert _choose("custom", _features(running=[3, 1, 2]), score_fn=lambda f: f["running"]) == (1, 2)
    with pytest.raises(ValueError, match="custom"):
        routing.Router("custom")
    with pytest.raises(ValueError, match="policy"):
        routing.Router("nearest")


def _split(w: Workload, idx) -> Workload:
    idx = np.asarray(idx)
    return dataclasses.replace(w, arrival_ns=w.arrival_ns[idx], input_toks=w.input_toks[idx],
                               output_toks=w.output_toks[idx], token_ids=[w.token_ids[i] for i in idx],
                               line_numbers=None if w.line_numbers is None else w.line_numbers[idx])


@pytest.mark.slow
def test_round_robin_pair_equals_two_lone_instances(sharegpt16):
    """Round robin sends arrivals alternately to two identical instances; each then serves
    exactly the requests a lone instance would serve on that half of the trace."""
    w = sharegpt16
    res = simulator.simulate_cluster(w, MODEL, [PRO, PRO], routing.Router("round_robin"), RT, profiles_dir=PROFILES,
                                     max_slots=12, record_token_times=False)
    order = np.lexsort((np.arange(w.num_requests), w.arrival_ns))
    np.testing.assert_array_equal(res.instance[order], np.arange(w.num_requests) % 2)
    for k in range(2):
        idx = np.sort(order[k::2])
        lone = simulator.simulate(_split(w, idx), MODEL, PRO.hw, PRO.sched, RT, profiles_dir=PROFILES, max_slots=12,
                                  record_token_times=False)
        for name in ("first_scheduled_ns", "first_token_ns", "finish_ns", "prefix_hit_tokens", "num_preemptions"):
            np.testing.assert_array_equal(getattr(res, name)[idx], getattr(lone, name), err_msg=name)
        rows = res.iter_instance == k
        np.testing.assert_array_equal(res.iter_end_ns[rows], lone.iter_end_ns)
        np.testing.assert_array_equal(res.iter_waiting[rows], lone.iter_waiting)
    assert res.stats["requests_per_instance"] == [8, 8]


def _three_instances():
    small = InstanceSpec(RTX4090, dataclasses.replace(SCHED, max_num_seqs=2, max_num_batched_tokens=512))
    return [PRO, small, PRO]


def test_least_loaded_heterogeneous_cluster_invariants(sharegpt16):
    w = sharegpt16
    specs = _three_instances()
    p = simulator.prepare_cluster(w, MODEL, specs, routing.Router("least_loaded"), RT, profiles_dir=PROFILES,
                                  max_slots=12, record_token_times=False)
    final = jax.device_get(simulator.run_prepared(p))
    res = simulator.to_result(p, final)
    n = w.num_requests
    # Every request routed once, served once, finished after it arrived.
    assert int(final.finished) == n and np.all(res.finish_ns > res.first_token_ns)
    assert np.all(res.first_token_ns >= res.arrival_ns)
    assert sorted(res.stats["requests_per_instance"]) == sorted(np.bincount(res.instance, minlength=3).tolist())
    assert sum(res.stats["requests_per_instance"]) == n and min(res.stats["requests_per_instance"]) > 0
    # All KV returned: each instance's pool is back to its own capacity (600, 400, 600 blocks, less
    # vLLM's null block each).
    np.testing.assert_array_equal(final.inst.pool.num_free, [599, 399, 599])
    np.testing.assert_array_equal(final.router.head, final.router.tail)  # queues drained
    # Iteration rows: per instance, in time order and never overlapping.
    for k in range(3):
        rows = res.iter_instance == k
        assert np.all(res.iter_start_ns[rows][1:] >= res.iter_end_ns[rows][:-1])
    assert np.all(np.diff(res.iter_end_ns) >= 0)
    # Decisions replayed on the host: at each arrival, the least loaded instance got it. The
    # load at an arrival is taken from the per-request times (waiting = routed, not yet first
    # scheduled; running = scheduled, not finished) -- valid when no request is preempted.
    assert res.stats["preemptions"] == 0
    seqs = np.array([s.sched.max_num_seqs for s in specs])
    order = np.lexsort((np.arange(n), w.arrival_ns))
    counter = 0
    for j, r in enumerate(order):
        t = w.arrival_ns[r]
        before = order[:j]
        waiting = [np.sum((res.instance[before] == k) & (res.first_scheduled_ns[before] > t)) for k in range(3)]
        running = [np.sum((res.instance[before] == k) & (res.first_scheduled_ns[before] <= t)
                          & (res.finish_ns[before] > t)) for k in range(3)]
        load = (4 * np.array(waiting) + np.array(running)) / seqs
        scan = (counter + np.arange(3)) % 3
        best = scan[np.argmin(load[scan])]
        assert res.instance[r] == best, f"arrival {j}"
        counter = best + 1


def test_prefix_affinity_follows_the_cache():
    """Two prompt families; after the first request of each family has run, later requests of a
    family go to the instance holding its prefix, whatever the load."""
    rng = np.random.default_rng(0)
    fam = [rng.integers(0, 30_000, 160) for _ in range(2)]
    ids, arrival = [], []
    for i in range(8):
        f = fam[(i // 2) % 2] if i >= 2 else fam[i]
        ids.append(np.concatenate([f, rng.integers(0, 30_000, 20 + i), rng.integers(0, 30_000, 8)]))
        arrival.append(i * 2_000_000_000)  # 2 s apart: each request is done before the next
    w = Workload(arrival_ns=np.array(arrival, np.int64), input_toks=np.array([len(x) - 8 for x in ids], np.int32),
                 output_toks=np.full(8, 8, np.int32), token_ids=ids, source="<families>")
    res = simulator.simulate_cluster(w, MODEL, [PRO, PRO], routing.Router("prefix_affinity"), RT,
                                     profiles_dir=PROFILES, max_slots=12, record_token_times=False)
    first = {0: res.instance[0], 1: res.instance[1]}
    assert first[0] != first[1]  # the idle cluster spreads the first two (scan order)
    for i in range(2, 8):
        assert res.instance[i] == first[(i // 2) % 2]
        assert res.prefix_hit_tokens[i] == 160  # 10 full blocks of the family prefix


def test_cluster_input_errors():
    w = load_trace(4)
    with pytest.raises(JaxsimInputError, match="at least one instance"):
        simulator.prepare_cluster(w, MODEL, [], profiles_dir=PROFILES)
    other = InstanceSpec(PRO.hw, dataclasses.replace(SCHED, block_size=32))
    with pytest.raises(JaxsimInputError, match="block size"):
        simulator.prepare_cluster(w, MODEL, [PRO, other], profiles_dir=PROFILES)


MIXED_PAIR = (PRO, InstanceSpec(RTX4090, SCHED))


def _check_sweep_equals_runs(base, points, result):
    from jaxsim import sweep
    for i, point in enumerate(points):
        kw = sweep.point_inputs(base, point)
        single = simulator.simulate_cluster(kw["workload"], MODEL, sweep.point_instances(base, point), base.router,
                                            kw["rt"], profiles_dir=PROFILES, max_slots=12, record_token_times=False,
                                            scales=kw["scales"])
        np.testing.assert_array_equal(result.requests[i]["first_token"], single.first_token_ns)
        np.testing.assert_array_equal(result.requests[i]["finish"], single.finish_ns)
        assert result.rows[i]["status"] == "ok"
        assert result.rows[i]["iterations"] == single.stats["iterations"]


@pytest.mark.slow  # ~75 s of compiles; equal-size designs in one sweep: tests/test_disagg.py (fast)
def test_cluster_designs_of_different_sizes_share_a_sweep(sharegpt16):
    """A sweep over cluster designs: each point equals its own simulate_cluster. Designs of 1 and 2
    instances share one compiled chunk: the 1-instance design is padded with an instance nothing
    is routed to, and still equals its own (lone-instance) run; knobs apply to every instance."""
    from jaxsim import sweep
    base = sweep.SweepBase(sharegpt16, MODEL, runtime=RT, profiles_dir=PROFILES, max_slots=12,
                           router=routing.Router("least_loaded"), cluster_options={"one": (PRO,), "mixed": MIXED_PAIR})
    points = [{"cluster": "one"}, {"cluster": "mixed"}, {"cluster": "one", "max_num_seqs": 2},
              {"cluster": "mixed", "max_num_seqs": 2}, {"cluster": "mixed", "arrival_rate_scale": 3.0, "compute_scale": 0.8}]
    result = sweep.sweep(base, points, chunk_size=5, progress=False, keep_requests=True)
    assert result.num_groups == 1
    _check_sweep_equals_runs(base, points, result)
    assert sweep.point_instances(base, points[3])[1].sched.max_num_seqs == 2
    with pytest.raises(JaxsimInputError, match="unknown cluster design"):
        sweep.sweep(base, [{"cluster": "three"}], progress=False)


def test_a_request_routed_to_an_instance_too_small_for_it_is_diagnosed_there():
    """Round robin sends r1 (3000 + 2 tokens: 188 blocks) to instance 1, which has 50 blocks (49
    after vLLM's null block); the 600-block instance 0 could serve it, so the run is not refused up
    front. The run stalls once instance 0 is done, and the error names r1, instance 1 and its own 49 blocks (not the
    cluster's 650). (max_model_len 800, what the 50 blocks hold: vLLM would reject r1 as longer
    than that, but the Python API leaves request lengths to the caller, so the stall path is
    still reachable.)"""
    w = Workload(np.arange(4, dtype=np.int64) * 1_000_000, np.array([100, 3000, 100, 100], np.int32),
                 np.full(4, 2, np.int32), [None] * 4, "mixed-sizes")
    tiny = InstanceSpec(HardwareConfig(num_gpu_blocks=50), SCHED)
    with pytest.raises(JaxsimInputError, match=r"mixed-sizes:2: request 1 \(line 2\) can never be scheduled on instance 1: "
                                               r".*cache of 49 blocks of 16 tokens"):
        simulator.simulate_cluster(w, MODEL, [PRO, tiny], routing.Router("round_robin"), runtime_for(50),
                                   profiles_dir=PROFILES, max_slots=8, record_token_times=False)
    # No instance can hold it: refused before the run, with the largest capacity on offer.
    with pytest.raises(JaxsimInputError, match=r"mixed-sizes:2: request 1 .*needs 188 blocks.*the largest instance that "
                                               r"may hold it has 49 blocks \(after vLLM reserves its null block\) \[cluster.instances\]"):
        simulator.prepare_cluster(w, MODEL, [tiny, tiny], routing.Router("round_robin"), runtime_for(50),
                                  profiles_dir=PROFILES, max_slots=8)


def test_requests_fit_check_follows_every_path_a_request_may_take():
    """Host-side (no compile). A cluster of a small colocated instance and a P/D pair: a request the
    colocated one cannot hold may still go the P/D way, so it is not refused; under P/D alone a
    prompt over the prefill instance's budget (chunking off) is named as such."""
    w = Workload(np.zeros(1, np.int64), np.array([300], np.int32), np.array([5], np.int32), [None], "one")

    def plans(specs):
        pl = [simulator.plan(w, MODEL, s.hw, s.sched, profiles_dir=PROFILES, max_slots=8) for s in specs]
        return simulator.place_instances(pl, specs, simulator.LinkConfig(), MODEL)

    big = HardwareConfig(num_gpu_blocks=1000)
    small = InstanceSpec(HardwareConfig(num_gpu_blocks=10), SCHED)
    pre, dec = InstanceSpec(big, SCHED, role="prefill"), InstanceSpec(big, SCHED, role="decode")
    simulator.check_requests_fit(plans([small, pre, dec]))
    with pytest.raises(JaxsimInputError, match=r"KV at its last decode needs 19 blocks"):
        simulator.check_requests_fit(plans([small, small]))
    no_chunk = dataclasses.replace(SCHED, enable_chunked_prefill=False, max_num_batched_tokens=256)
    with pytest.raises(JaxsimInputError, match=r"prompt of 300 tokens exceeds max_num_batched_tokens \(256\)"):
        simulator.check_requests_fit(plans([InstanceSpec(big, no_chunk, role="prefill"), dec]))
