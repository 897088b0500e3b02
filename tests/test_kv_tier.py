"""The KV tier below the GPU (REFERENCE.md §1.5, engine/chunk_tier.py): hand-computed lookups,
LRU eviction and recall times on the pools directly, then small cluster runs (one compile) for a
shared-pool hit from another instance, private pools, LRU at capacity, the recall time on the
critical path and the invariants (chunks conserved, no pool over capacity)."""

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np
import pytest

from _shared import PROFILES, load_model
from jaxsim import simulator
from jaxsim.engine import chunk_tier, routing
from jaxsim.errors import JaxsimInputError
from jaxsim.planning import chunk_ids
from jaxsim.spec import Calibration, HardwareConfig, InstanceSpec, KVTierConfig, SchedulerConfig, Workload

NEVER = np.iinfo(np.int64).max
i32 = functools.partial(jnp.asarray, dtype=jnp.int32)
i64 = functools.partial(jnp.asarray, dtype=jnp.int64)


def _pools(capacity, bw=32.0, latency=10_000, num_chunks=8):
    n = len(capacity)
    return chunk_tier.init_pools(num_chunks, capacity, [bw] * n, [latency] * n)


def _write(tier, state, pool, chunks, at):
    state = tier.write(state, i32([pool] * len(chunks)), i32(chunks), jnp.ones(len(chunks), bool), i64([at] * len(chunks)))
    return tier.settle(state)


def test_chunk_ids_key_each_full_chunk_by_its_last_block():
    # two requests sharing their first 4 blocks (hash ids 0..3), chunks of 2 blocks
    hashes = np.array([[0, 1, 2, 3, 4, -1], [0, 1, 2, 3, 5, 6]], np.int32)
    chunks, n = chunk_ids(hashes, np.array([5, 6]), 2)
    assert chunks.tolist() == [[0, 1, -1], [0, 1, 2]] and n == 3  # keys: hash 1, hash 3, hash 6


def test_lookup_counts_resident_chunks_after_the_gpu_hits():
    tier = chunk_tier.ChunkTier(chunk_blocks=4)
    st = _write(tier, _pools([8]), 0, [0, 1, 3], at=100)  # chunks of blocks 0-3, 4-7, (not 8-11), 12-15
    row = i32([0, 1, 2, 3])

    def look(matched, limit, now=200, t=tier):
        return tuple(int(x) for x in t.lookup(st, i32(0), row, i32(matched), i32(limit), i64(now)))

    assert look(0, 16) == (8, 2)  # chunks 0 and 1; chunk 2 is missing, so chunk 3 does not count
    assert look(5, 16) == (3, 1)  # GPU hit 5 blocks: the straddling chunk 1 is read whole for 3 blocks
    assert look(0, 6) == (6, 2)  # GPU + tier hits capped together at the lookup limit
    assert look(8, 16) == (0, 0)  # chunk 2 missing
    assert look(0, 16, now=99) == (0, 0)  # written at t=100: not visible before
    strict = chunk_tier.ChunkTier(chunk_blocks=4, min_gain_chunk=True)  # the reference: a whole chunk or nothing
    assert look(5, 16, t=strict) == (0, 0) and look(4, 16, t=strict) == (4, 1)


def test_lru_eviction_counters_and_capacity():
    tier = chunk_tier.ChunkTier(chunk_blocks=4, evict_window=2)
    st = _write(tier, _pools([3, 5]), 0, [0, 1], at=10)
    st = _write(tier, st, 0, [2], at=20)
    st = _write(tier, st, 0, [0], at=30)  # a hit refreshes chunk 0: chunk 1 is now the oldest
    st = _write(tier, st, 0, [4, 5, 6], at=40)  # 6 > 3: evicts chunks 1, 2, then 0 (two trips of 2)
    resident = np.flatnonzero(np.asarray(st.written_at[0]) < NEVER).tolist()
    assert resident == [4, 5, 6]
    assert (int(st.resident[0]), int(st.written[0]), int(st.evicted[0])) == (3, 6, 3)
    assert int(st.written[0]) - int(st.evicted[0]) == int(st.resident[0])  # chunks conserved
    assert int(st.resident[1]) == 0  # the other pool untouched


def test_recalls_of_one_pool_share_its_bandwidth():
    tier = chunk_tier.ChunkTier(chunk_blocks=16)
    st = _pools([10, 10], bw=32.0, latency=10_000)
    chunk = 256 * 131_072  # bytes of a 256-token chunk of Llama-3.1-8B in bf16 (all layers, K and V)
    # instances 0 and 1 on pool 0 recall 2 and 1 chunks at t=1000; instance 2 on pool 1 recalls 1
    delay, st = tier.recall(st, i32([0, 0, 1]), i32([2, 1, 1]), i64([chunk] * 3), i64([1000] * 3),
                            jnp.ones(3, bool))
    one = chunk // 32  # 1,048,576 ns per chunk at 32 GB/s
    assert np.asarray(delay).tolist() == [10_000 + 2 * one, 10_000 + 3 * one, 10_000 + one]
    assert np.asarray(st.free_at).tolist() == [1000 + 10_000 + 3 * one, 1000 + 10_000 + one]
    # a later recall while pool 0 is still busy waits for it
    delay, _ = tier.recall(st, i32([0]), i32([1]), i64([chunk]), i64([2000]), jnp.ones(1, bool))
    assert int(delay[0]) == (1000 + 10_000 + 3 * one) + 10_000 + one - 2000


# ----------------------------------------------------------------------------- cluster runs
MODEL = load_model()
PRO = InstanceSpec(HardwareConfig(), SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=1024), Calibration.none())


def _families_workload():
    """Three 520-token prompt families (32 full blocks: two 256-token chunks each), requests 2 s
    apart (each done before the next), routed round robin: A@0, A@1, B@0, C@1, A@0, B@1."""
    rng = np.random.default_rng(1)
    fam = {k: rng.integers(0, 30_000, 520) for k in "ABC"}
    order = "AABCAB"
    ids = [np.concatenate([fam[k], rng.integers(0, 30_000, 4)]) for k in order]
    return Workload(arrival_ns=np.arange(6, dtype=np.int64) * 2_000_000_000, input_toks=np.full(6, 520, np.int32),
                    output_toks=np.full(6, 4, np.int32), token_ids=ids, source="<families>")


W = _families_workload()
SHARED = KVTierConfig(storage="cpu", enable_prefix_sharing=True, capacity_gb=6 * 256 * 131_072 / 2**30,
                      bandwidth_gbps=32, latency_ns=10_000)  # 6 chunks


def _run(tier: KVTierConfig):
    p = simulator.prepare_cluster(W, MODEL, [PRO, PRO], routing.Router("round_robin"), profiles_dir=PROFILES,
                                  max_slots=8, kv_tier=tier)
    final = simulator.run_prepared(p)
    return simulator.to_result(p, final), final


@pytest.fixture(scope="module")
def shared():
    return _run(SHARED)


def test_a_shared_pool_serves_a_prefix_another_instance_computed(shared):
    res, final = shared
    assert res.instance.tolist() == [0, 1, 0, 1, 0, 1]
    # request 1 (instance 1) finds family A's two chunks, written by instance 0: 32 blocks, the
    # lookup limit ((520 - 1) // 16 = 32); request 4 hits instance 0's GPU cache; request 5 finds
    # family B (instance 0's) in the pool
    assert res.prefix_hit_tokens.tolist() == [0, 512, 0, 0, 512, 512]
    assert np.asarray(final.inst.counters.tier_hits).tolist() == [0, 1024]
    assert np.asarray(final.inst.counters.tier_served).tolist() == [0, 1024]  # one admission attempt each
    assert res.stats["kv_tier"]["served_tokens"] == res.stats["kv_tier"]["hit_tokens"] == 1024
    assert np.asarray(final.inst.counters.tier_recalled).tolist() == [0, 4]
    assert res.stats["kv_tier"]["pools"]["0"]["written_chunks"] == 6  # A, B, C: 2 chunks each, A once


def test_private_pools_do_not_share(shared):
    res, final = _run(KVTierConfig(**{**SHARED.__dict__, "enable_prefix_sharing": False}))
    assert res.prefix_hit_tokens.tolist() == [0, 0, 0, 0, 512, 0]  # the GPU hit only
    assert int(np.sum(final.inst.counters.tier_hits)) == 0
    # each private pool has half the device: 3 chunks
    assert np.asarray(final.tier.capacity).tolist() == [3, 3]


def test_lru_at_capacity_drops_the_least_recently_used_family(shared):
    # 4 chunks: C's write (t=6 s) evicts A (last used at t=2 s); A's rewrite by request 4 (t=8 s)
    # evicts B (t=4 s), so request 5 misses B, and its rewrite of B evicts C (t=6 s)
    res, final = _run(KVTierConfig(**{**SHARED.__dict__, "capacity_gb": 4 * 256 * 131_072 / 2**30}))
    assert res.prefix_hit_tokens.tolist() == [0, 512, 0, 0, 512, 0]
    t = final.tier
    assert (int(t.resident[0]), int(t.written[0]), int(t.evicted[0])) == (4, 10, 6)  # 2 chunks x 5 writes
    assert int(np.max(res.iter_tier_resident)) <= 4  # never over capacity at any iteration


def test_the_recall_is_on_the_critical_path(shared):
    res, _ = shared
    free, _ = _run(KVTierConfig(**{**SHARED.__dict__, "bandwidth_gbps": float("inf"), "latency_ns": 0}))
    recall = 10_000 + 2 * (256 * 131_072) // 32  # two chunks at 32 GB/s + latency
    ttft = res.first_token_ns - res.arrival_ns
    ttft_free = free.first_token_ns - free.arrival_ns
    assert (ttft - ttft_free).tolist() == [0, recall, 0, 0, 0, recall]


def test_time_series_and_summary_report_the_tier(shared, tmp_path):
    import csv
    from jaxsim import metrics
    res, _ = shared
    ts = metrics.time_series(res, 1.0, origin_ns=0)
    gib = 256 * 131_072 / 2**30
    assert ts["cpu_pool_gib"][-1] == pytest.approx(6 * gib)
    assert ts["cpu_write_gib"].sum() == pytest.approx(6 * gib)
    assert ts["cpu_recall_gib"].sum() == pytest.approx(4 * gib)
    # cumulative tier hits / queried tokens (vLLM counts each admission attempt, the prompt: one each here)
    assert ts["cpu_prefix_hit_pct"][-1] == pytest.approx(1024 / (6 * 520) * 100)
    s = metrics.summarize(res, metrics.request_table(res))
    assert s["memory"]["cpu_pool_gib"]["peak"] == pytest.approx(6 * gib)
    # the files: the cluster's series and each instance's; a shared pool is counted once, and each
    # instance sees all of it
    summary = metrics.write_outputs(res, tmp_path)
    assert summary["outputs"][2:] == ["timeseries.csv", "timeseries.inst0.csv", "timeseries.inst1.csv"]
    rows = {f: list(csv.DictReader(open(tmp_path / f))) for f in summary["outputs"][2:]}
    assert {f: float(r[-1]["cpu_pool_gib"]) for f, r in rows.items()} == pytest.approx(
        {f: round(6 * gib, 4) for f in rows})
    weights = 16_060_522_496 / 2**30  # Llama-3.1-8B bf16 on one GPU (REFERENCE.md §1.3)
    assert float(rows["timeseries.inst0.csv"][0]["gpu_mem_gib"]) >= weights
    assert float(rows["timeseries.csv"][0]["gpu_mem_gib"]) >= 2 * weights


def test_tier_config_errors():
    with pytest.raises(JaxsimInputError, match="kv_tier.capacity_gb: set to 3.0, but kv_tier.storage is none"):
        KVTierConfig(capacity_gb=3)
    with pytest.raises(JaxsimInputError, match="kv_tier.chunk_size: 100 tokens is not a whole number of 16-token"):
        simulator.plan_cluster(W, MODEL, [PRO], kv_tier=dataclasses.replace(SHARED, chunk_size=100),
                               profiles_dir=PROFILES)
    assert KVTierConfig(storage="cxl", latency_ns=5).with_device_defaults() == KVTierConfig(
        storage="cxl", capacity_gb=256.0, bandwidth_gbps=64.0, latency_ns=5)


def test_tier_needs_prefix_caching_and_a_device():
    import dataclasses
    off = InstanceSpec(HardwareConfig(), dataclasses.replace(SchedulerConfig(), enable_prefix_caching=False))
    with pytest.raises(JaxsimInputError, match="needs prefix caching"):
        simulator.plan_cluster(W, MODEL, [off], kv_tier=SHARED, profiles_dir=PROFILES)
    with pytest.raises(JaxsimInputError, match="kv_tier.capacity_gb"):
        simulator.prepare_cluster(W, MODEL, [PRO, PRO], kv_tier=KVTierConfig(storage="cxl"), profiles_dir=PROFILES)


def test_tier_knobs_vary_per_configuration_in_one_compiled_sweep(shared):
    """Capacity and sharing are sweep knobs: one group (one compile), and each point's tier hits
    equal its own run's (shared 6 chunks: requests 1 and 5 hit; 4 chunks: request 1 only;
    private: none)."""
    from jaxsim import sweep
    base = sweep.SweepBase(workload=W, model=MODEL, profiles_dir=PROFILES, instances=(PRO, PRO),
                           router=routing.Router("round_robin"), max_slots=8, kv_tier=SHARED)
    gib = 256 * 131_072 / 2**30
    points = sweep.expand_grid({"kv_tier_capacity_gb": [4 * gib, 6 * gib], "enable_prefix_sharing": [False, True]})
    r = sweep.sweep(base, points, progress=False)
    assert r.num_groups == 1
    assert [row["cpu_hit_tokens"] for row in r.rows] == [0, 512, 0, 1024]
    with pytest.raises(JaxsimInputError, match="no KV tier"):
        sweep.sweep(sweep.SweepBase(workload=W, model=MODEL, profiles_dir=PROFILES), [{"kv_tier_capacity_gb": 1.0}])


def test_kv_evict_loc_names_the_runs_tier():
    """A cluster JSON's kv_evict_loc other than the default cpu must be the run's tier (never ignored)."""
    import dataclasses
    cxl = dataclasses.replace(PRO, kv_evict_loc="cxl:0")
    with pytest.raises(JaxsimInputError, match=r"instances\[0\].kv_evict_loc: 'cxl:0', but the run has no KV tier"):
        simulator.plan_cluster(W, MODEL, [cxl], profiles_dir=PROFILES)
    with pytest.raises(JaxsimInputError, match="set kv_tier=cxl"):
        simulator.plan_cluster(W, MODEL, [cxl], kv_tier=SHARED, profiles_dir=PROFILES)
    plans = simulator.plan_cluster(W, MODEL, [cxl], kv_tier=dataclasses.replace(SHARED, storage="cxl"),
                                   profiles_dir=PROFILES)
    assert plans[0].kv_tier.storage == "cxl"


def test_a_single_instance_sweeps_tier_and_offload_knobs():
    """One instance (the lone engine path): tier knobs vary per point in one compile, as do the
    weight-offload fraction and the KV dtype; each row equals its single run's hits."""
    from jaxsim import sweep
    one = InstanceSpec(HardwareConfig(offload_bw_gbps=60.0, weights_offload_device="cxl"), PRO.sched, PRO.calib)
    w = Workload(arrival_ns=np.array([0, 2_000_000_000]), input_toks=np.full(2, 520, np.int32),
                 output_toks=np.full(2, 2, np.int32), token_ids=list(W.token_ids[:2]), source="<two>")
    base = sweep.SweepBase(workload=w, model=MODEL, hardware=one.hw, scheduler=one.sched, calibration=one.calib,
                           profiles_dir=PROFILES, max_slots=8, kv_tier=SHARED)
    points = [{"kv_tier_capacity_gb": 0.0}, {"kv_tier_capacity_gb": 1.0, "weights_offload_fraction": 0.125},
              {"kv_tier_capacity_gb": 1.0, "kv_cache_dtype": "fp8"}]
    r = sweep.sweep(base, points, progress=False)
    assert r.num_groups == 1 and all(row["status"] == "ok" for row in r.rows)
    # request 1 repeats request 0's prompt: the GPU cache serves it (the tier is never needed here)
    assert [row["cpu_hit_tokens"] for row in r.rows] == [0, 0, 0]
    assert r.rows[1]["ttft_mean_ms"] > r.rows[0]["ttft_mean_ms"]  # weights read from CXL every iteration
