"""Reference-mode parity (``scheduler=reference calibration=none``) with the reference simulator's
own outputs of its feature examples (``tests/data/reference_runs``, provenance in its README).

``scripts/reference_parity.py`` runs every example and prints the table; here its verdicts are
tests: the exact examples, the one within a tolerance, each reason for a deliberate difference
(stating both values, the reference's from its CSV and jaxsim's from its run or its latency model,
and why), the refusals, and that every reference output is accounted for. The known gap of the
dual-node example (EP over per-dimension links) is reproduced by hand in
``tests/test_collectives.py`` (a strict xfail). The memory-hierarchy examples run as the reference
ran them: the CPU prefix pools as jaxsim's KV tier (``--enable-prefix-sharing --prefix-storage
CPU``), the CXL example's weights on its CXL devices; the PIM examples with the reference's own
DDR4 fit and its prompt-length contexts (``PIM_REFERENCE``). Runs of the examples compile an engine each
(10-25 s): they are marked ``slow`` (``python -m pytest -m slow``); the checks that need only the
CSVs or the latency model run in the default suite.
"""

import dataclasses
import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference_parity as rp  # scripts/reference_parity.py (tests/conftest.py puts scripts/ on sys.path)
from jaxsim import latency, metrics, pim, simulator
from jaxsim.errors import JaxsimInputError
from jaxsim.latency import profile as latency_profile
from jaxsim.latency.base import BatchShape, BatchSlots
from jaxsim.spec import KVTierConfig

EXAMPLES = {ex.name: ex for ex in rp.EXAMPLES}
ITER = jax.jit(latency.iteration_time)


@functools.cache
def ref(name: str) -> dict:
    return rp.read_reference(rp.DATA / EXAMPLES[name].csv)


@functools.cache
def run(name: str):
    """jaxsim's result of an example: ``(SimResult, request table)``."""
    result = rp.simulate(EXAMPLES[name])
    return result, metrics.request_table(result)


def row(table: dict, rid: int) -> dict:
    k = int(np.flatnonzero(table["request_id"] == rid)[0])
    return {c: table[c][k] for c in ("instance_id", "arrival_ns", "first_scheduled_ns", "first_token_ns", "end_ns",
                                     "queuing_delay_ns", "ttft_ns", "tpot_ns", "e2e_ns", "itl_ns")}


def emissions(r: dict) -> np.ndarray:
    """A reference row's token times: arrival + TTFT, then each ITL gap."""
    return np.cumsum([r["arrival"] + r["TTFT"], *r["ITL"]])


@functools.cache
def plans(name: str) -> list:
    """The plans (``jaxsim.planning.Plan``) of an example's instances."""
    spec = rp.run_spec(EXAMPLES[name])
    c = spec.cluster
    return simulator.plan_cluster(spec.workload, spec.model_config, list(c.instances), spec.model, c.links,
                                  c.dp_sync, profiles_dir=spec.paths.profiles, kv_tier=spec.kv_tier)


def plan_tables(name: str, instance: int = 0):
    """The latency tables the engine runs an example's instance on."""
    return plans(name)[instance].tables


def decode_ns(tables, kv: int) -> int:
    """One decode of KV length ``kv``, alone in its batch."""
    return int(ITER(tables, 1, 1, 0, 0, 1, kv, kv, kv)[0])


# ------------------------------------------------------------------ the data (default suite)
def test_every_reference_output_is_accounted_for():
    """The 19 reference CSVs: each is run by the parity script or listed as not modelled (with its
    issue), never silently left out."""
    csvs = sorted(p.name for p in rp.DATA.glob("example_*_run.csv"))
    assert len(csvs) == 19
    covered = {ex.csv for ex in rp.EXAMPLES} | {path for _, path, _ in rp.NOT_MODELLED}
    assert sorted(covered) == csvs
    for name, _, why in rp.NOT_MODELLED:
        assert "issue 13" in why or "issue 14" in why or "not in the snapshot" in why, name


def test_feature_runs_equal_their_base_runs():
    """Two features leave the reference's latencies unchanged on this trace: the power run (its
    power block is metered, but without a power cap it changes no latency; the reference only logs
    its energy) equals the single run, and the shared CPU prefix pool run (its pool never holds a chunk:
    test_cpu_pools_hold_nothing_on_this_trace) equals the multi-instance run, row for row."""
    assert ref("power") == ref("single")
    assert ref("prefix_cpu_mem_pool") == ref("multi")
    # the tier's 256-token chunks: no request of the trace has that many tokens
    assert max(r["input"] + r["output"] for r in ref("multi").values()) == 22 + 104 < 256


def test_cpu_pools_are_the_reference_flags():
    """``--enable-prefix-sharing --prefix-storage CPU`` (run.sh.txt) as jaxsim's KV tier: a CPU pool
    per node shared by its instances, hits in whole chunks (the reference's rule, REFERENCE.md §1.5),
    the device the cluster JSON's ``cpu_mem`` (512 GB, 256 GB/s, 0 ns)."""
    for name in ("prefix_cpu_mem_pool", "dual_prefix_cpu_mem_pool"):
        assert rp.run_spec(EXAMPLES[name]).kv_tier == KVTierConfig(
            storage="cpu", enable_prefix_sharing=True, capacity_gb=512, bandwidth_gbps=256, latency_ns=0,
            chunk_size=256, min_gain="chunk")


# The CXL example (single_node_cxl_instance.json): every weight of Llama-3.1-8B on four CXL devices
# (cxl_mem: 60 GB/s, 250 ns per load, 1024 GB over 4); cxl:3 holds blocks 11-23 and the lm_head,
# the longest chain. Per-rank bf16 weight bytes of a block's operators (the two RMSNorms, qkv_proj,
# o_proj, gate_up_proj, down_proj) and of the embedding / lm_head:
H, Q, KV, INTER, VOCAB, FP, LAYERS = 4096, 4096, 1024, 14336, 128256, 2, 32
BLOCK_OPS = (H * FP, H * (Q + 2 * KV) * FP, Q * H * FP, H * FP, 2 * H * INTER * FP, INTER * H * FP)
LM_HEAD = H * VOCAB * FP
CXL3_BLOCKS = 13


def cxl_load_ns(nbytes: int) -> int:
    """One load from a CXL device: ``floor(latency + bytes / bandwidth)`` (§1.10, §2.1)."""
    return math.floor(250 + nbytes / 60)


def reference_cxl_tables(tb):
    """The reference's iteration on the CXL example, as jaxsim's latency model: the head gated by
    the lm_head's load at the end of cxl:3's chain of *per-operator* loads, and the final norm off
    the head (it waits for its own load, on cxl:2, long done, and computes before the lm_head's)."""
    chain = CXL3_BLOCKS * sum(cxl_load_ns(b) for b in BLOCK_OPS) + cxl_load_ns(LM_HEAD)
    final_norm = (np.asarray(tb.lin_head) > 0) & ~np.asarray(tb.lin_by_seq)  # the head's only dense layer
    assert final_norm.sum() == 1
    return eqx.tree_at(lambda t: (t.wload_head, t.lin_head), tb,
                       (jnp.asarray(chain, tb.wload_head.dtype), jnp.where(final_norm, 0, tb.lin_head)))


def test_cxl_weight_loads_by_hand():
    """Known difference, not deliberate (weight-load granularity, REFERENCE.md §1.10). jaxsim loads
    an off-GPU block's weights as one load (jaxsim/placement.py) and starts the head once the final
    norm's and the lm_head's weights are in place. The reference's times equal, to the nanosecond,
    a model that loads each weight-bearing operator on its own (six loads per block, each with the
    250 ns latency and its own floor) and gates each operator on its own load, so the final norm
    computes before the lm_head's load ends.

    cxl:3's chain: jaxsim 13 x 7,270,650 + 17,511,469 = 112,029,919 ns; the reference 13 x 5 more
    latencies less 13 x 4 ns of floors (each block's six fractions sum to 4.0 ns) = 112,046,117 ns,
    16,198 ns later. Request 0 (queue 0): its 10-token prefill and its first decode both take the
    reference 112,784,869 ns = 112,046,117 + lm_head(1) 714,006 + sampler(1) 24,746; jaxsim's are
    16,198 ns shorter, plus final_layernorm(T) (2,624 ns at T = 10, 2,422 at T = 1)."""
    tb = plan_tables("cxl")
    jax_chain = CXL3_BLOCKS * cxl_load_ns(sum(BLOCK_OPS)) + cxl_load_ns(LM_HEAD)
    assert int(tb.wload_head) == jax_chain == 112_029_919
    rt = reference_cxl_tables(tb)
    assert int(rt.wload_head) == 112_046_117 == jax_chain + CXL3_BLOCKS * (5 * 250 - 4)
    r0 = ref("cxl")[0]
    assert r0["queuing_delay"] == 0 and r0["TTFT"] == r0["ITL"][0] == 112_784_869
    prefill, decode = (10, 1, 10, 0, 0, 0, 0, 0), (1, 1, 0, 0, 1, 10, 10, 10)
    assert int(ITER(rt, *prefill)[0]) == int(ITER(rt, *decode)[0]) == 112_784_869 == 112_046_117 + 714_006 + 24_746
    assert int(ITER(tb, *prefill)[0]) == 112_771_295 == 112_784_869 - 16_198 + 2_624
    assert int(ITER(tb, *decode)[0]) == 112_771_093 == 112_784_869 - 16_198 + 2_422


def test_cxl_weights_leave_the_gpu_ledger():
    """Deliberate difference (REFERENCE.md §1.16 'Off-NPU weights'), invisible in this example's
    latencies: jaxsim takes the CXL-placed weights (all of them here, 16,060,522,496 bytes) out of
    the GPU's weight ledger, so the KV cache gains their bytes // 2,097,152 (a 16-token block, 32
    layers) = 7,658 blocks: 44,236 instead of the single run's 36,578, which the reference keeps. The
    run holds at most a few dozen blocks (test_cxl_within_tolerance), so no latency depends on it."""
    cxl, single = plans("cxl")[0], plans("single")[0]
    moved = sum(cxl.offloaded.values())
    assert moved == LAYERS * sum(BLOCK_OPS) + 2 * H * VOCAB * FP + H * FP == 16_060_522_496
    assert single.num_blocks == 36_578
    assert cxl.num_blocks == single.num_blocks + moved // (16 * 2 * KV * LAYERS * FP) == 44_236


@pytest.mark.parametrize("name", ["moe_dp_pp", "moe_dp_tp_pp"])
def test_moe_dp_groups_with_pp_are_refused(name):
    """Not modelled by jaxsim yet: wave-synchronised (MoE) DP groups whose members are pipelined.
    Refused with the reason, before anything compiles."""
    with pytest.raises(JaxsimInputError, match="DP groups with pipeline parallelism"):
        rp.run_example(EXAMPLES[name])


def test_moe_dp_members_run_one_after_the_other_in_the_reference():
    """Deliberate difference (MoE DP rounds). REFERENCE.md §1.8: a DP round ends when its slowest
    member is done; jaxsim does that. The reference's output (example_moe_dp_tp_run.csv, dp 2 x tp
    2, ep 2) runs the two members' iterations one after the other: once request 1 (instance 1) has
    its first token, requests 0 and 1 alternate, so each one's ITL is the *sum* of both iterations.

    Request 0's gap from its token 37 to 38 holds instance 1's decode of request 1's token 2 (KV
    22 + 2 - 1 = 23) and then instance 0's decode of request 0's token 38 (KV 10 + 38 - 1 = 47),
    each costing the engine's decode time plus the reference's collective timing difference at
    T = 1 (1,440 ns: see test_moe_within_tolerance). jaxsim runs the two decodes side by side: the
    round is the larger of the two."""
    r0, r1 = ref("moe_dp_tp")[0], ref("moe_dp_tp")[1]
    e0, e1 = emissions(r0), emissions(r1)
    assert (r0["instance id"], r1["instance id"]) == (0, 1)
    # the reference's event order: req 1 tok 1, req 0 tok 37, req 1 tok 2, req 0 tok 38
    assert e1[1] < e0[37] < e1[2] < e0[38]
    tb = plan_tables("moe_dp_tp")
    assert e0[37] - e1[1] == decode_ns(tb, 46) + 1_440 == 7_918_358  # instance 0 alone
    assert e1[2] - e0[37] == decode_ns(tb, 23) + 1_440 == 7_916_006  # then instance 1 alone
    assert e0[38] - e1[2] == decode_ns(tb, 47) + 1_440 == 7_918_454  # then instance 0 again
    reference_gap = int(e0[38] - e0[37])
    assert reference_gap == decode_ns(tb, 23) + decode_ns(tb, 47) + 2 * 1_440 == 15_834_460
    jaxsim_round = max(decode_ns(tb, 23), decode_ns(tb, 47))  # side by side, no padding (T = 1 each)
    assert jaxsim_round == 7_917_014


# PIM attention offload (single_node_pim_instance.json: DDR4_8GB_3200, 64 channels, 8 per request),
# in reference mode: the reference's DDR4 fit, prompt-length contexts, PIM after the NPU's prefill
# attention (rp.PIM_REFERENCE). One layer's PIM work for one decode of context L on its 8 channels:
# floor((333.2538 L + 30675.2739) / 8 + 13.86) ns.
PIM_LAYERS = 32


def pim_slots(*reqs):
    """The batch's requests as ``BatchSlots`` (4 slots): ``(tokens, computed, prompt)`` each, in
    batch order."""
    rows = np.zeros((3, 4), np.int32)
    for k, r in enumerate(reqs):
        rows[:, k] = r
    return BatchSlots(*(jnp.asarray(x) for x in rows), pos=jnp.arange(4, dtype=jnp.int32))


def pim_ns(tables, shape, *reqs) -> int:
    """``iteration_time`` of a batch shape (the 8 arguments of REFERENCE.md §2.1) with its requests
    (tables with PIM need them: their decodes go to the PIM channels)."""
    return int(ITER(tables, *shape, slots=pim_slots(*reqs))[0])


def no_host_ops(tables):
    """The tables with free host operations (token ids in, sampled ids out)."""
    return eqx.tree_at(lambda t: (t.cpu_bw, t.cpu_lat), tables, (jnp.asarray(np.inf), jnp.asarray(0.0)))


def test_pim_iterations_by_hand():
    """Reference mode, to the ns (example_pim_run.csv, request 0). Host operations on the PIM memory
    (64 x 25.6 = 1,638.4 GB/s, 13.86 ns): floor(13.86 + 40 B / 1,638.4) = 13 ns each way.

    * one decode (prompt 10): its PIM work per layer floor((3,332.5 + 30,675.3) / 8 + 13.86) = 4,264 ns,
      so the iteration is the attention-free decode (10,879,553) + 2 x 13 + 32 x 4,264 = 11,016,027 ns,
      the reference's gap 0 (and gaps 1-26: the reference keeps pricing the prompt's 10 tokens);
    * request 1's 22-token prompt with request 0's decode (gap 27): the reference runs the PIM work
      after the NPU's prefill attention: the PIM-free iteration (request 1's prefill alone on the
      NPU) + 26 + 32 x 4,264 = 11,636,420 ns. jaxsim's default (hardware.pim_overlap) runs them side
      by side, the layer taking the longer (REFERENCE.md §1.11 Timing: both follow qkv_proj, o_proj
      waits for both): the NPU's prefill attention of 22 tokens (7,909 ns a layer) hides the PIM
      work, 11,499,972 ns."""
    tb = plan_tables("pim")
    r0 = ref("pim")[0]["ITL"]
    assert r0[:27] == [11_016_027] * 27 and r0[27] == 11_636_420
    assert pim_ns(tb, (1, 1, 0, 0, 0, 0, 0, 0)) == 10_879_553 + 26  # no attention at all, host ops 2 x 13
    assert pim_ns(tb, (1, 1, 0, 0, 1, 10, 10, 10), (1, 10, 10)) == 10_879_553 + 26 + 32 * 4_264 == 11_016_027
    mixed = (23, 2, 22, 0, 1, 10, 10, 10)
    prefill_only = pim_ns(tb, (23, 2, 22, 0, 0, 0, 0, 0), (22, 0, 22))
    assert pim_ns(tb, mixed, (22, 0, 22), (1, 10, 10)) == prefill_only + 32 * 4_264 == 11_636_420
    side_by_side = eqx.tree_at(lambda t: t.pim_serial, tb, jnp.asarray(False))
    npu_attention = (prefill_only - pim_ns(tb, (23, 2, 0, 0, 0, 0, 0, 0))) // 32
    assert npu_attention == 7_909 > 4_264  # the longer of the two: the PIM work is hidden
    assert pim_ns(side_by_side, mixed, (22, 0, 22), (1, 10, 10)) == prefill_only == 11_636_420 - 32 * 4_264


def test_pim_interleaved_iteration_by_hand():
    """Reference mode, sub-batch interleaving (example_pim_sub_batch_run.csv, request 0's gap 27):
    request 1's 22-token prompt is sub-batch A, request 0's decode B. One layer's PIM work (4,264 ns)
    is far shorter than the other half's NPU layers, so the NPU never waits: the iteration is A's
    and B's NPU work back to back (each half's prologue, 32 blocks and head at its own token count,
    B's attention on PIM), plus the host operations: the reference's 22,406,194 ns shows one of them
    (13 ns), jaxsim charges both (26): 22,406,207 ns (PIM_HOST_OPS)."""
    tb = plan_tables("pim_sub_batch")
    assert ref("pim_sub_batch")[0]["ITL"][27] == 22_406_194
    free = no_host_ops(tb)
    halves = pim_ns(free, (22, 1, 22, 0, 0, 0, 0, 0), (22, 0, 22)) + pim_ns(free, (1, 1, 0, 0, 0, 0, 0, 0))
    assert halves + 13 == 22_406_194
    assert pim_ns(tb, (23, 2, 22, 0, 1, 10, 10, 10), (22, 0, 22), (1, 10, 10)) == halves + 26 == 22_406_207
    # one request (request 0 alone, gaps 0-26): the normal schedule, as in the PIM run
    assert ref("pim_sub_batch")[0]["ITL"][:27] == [11_016_027] * 27
    assert pim_ns(tb, (1, 1, 0, 0, 1, 10, 10, 10), (1, 10, 10)) == 11_016_027


def test_pim_work_for_the_power_model():
    """What the power model reads of an iteration (``pim_work``): the PIM busy time, every layer's
    PIM work (32 x 4,264 ns for one decode of 10 tokens; interleaved halves add theirs) and the
    bytes its PIM operations move, per decode and layer q, k, v in and the output out ((2 x 32 + 2
    x 8) x 128 x 2 B = 20,480 B)."""
    work = jax.jit(latency_profile.pim_work)
    assert [int(x) for x in work(plan_tables("pim"), pim_slots((1, 10, 10)))] == [32 * 4_264, 32 * 20_480]
    two = pim_slots((1, 10, 10), (1, 22, 22))  # two decodes: one placement set each, on 64 channels
    p22 = int((333.2538 * 22 + 30675.2739) / 8 + 13.86)
    assert [int(x) for x in work(plan_tables("pim"), two)] == [32 * p22, 2 * 32 * 20_480]
    assert [int(x) for x in work(plan_tables("pim_sub_batch"), two)] == [32 * (4_264 + p22), 2 * 32 * 20_480]
    assert [int(x) for x in work(plan_tables("single"), two)] == [0, 0]


def test_npu_time_leaves_out_the_wait_for_pim():
    """The NPU's own work of an iteration (``npu_time``, the power meter's busy time): a decode-only
    batch waits for its PIM attention in each of 32 layers (reference mode: PIM after the NPU's
    attention, here none), so its NPU time is the iteration's less 32 x the PIM layer time; without
    PIM it is the iteration time itself."""
    shape = BatchShape(*(jnp.asarray(x, jnp.int32) for x in (1, 1, 0, 0, 1, 10, 10, 10)), slots=pim_slots((1, 10, 10)))
    npu = jax.jit(lambda t, s: t.npu_time(s))
    tb = plan_tables("pim")
    assert int(npu(tb, shape)) == pim_ns(tb, (1, 1, 0, 0, 1, 10, 10, 10), (1, 10, 10)) - 32 * 4_264
    single = plan_tables("single")
    assert int(npu(single, shape)) == int(ITER(single, 1, 1, 0, 0, 1, 10, 10, 10)[0])


def test_pim_host_ops_known_difference():
    """Known difference, not deliberate (PIM_HOST_OPS). Request 0's prefill, alone (no PIM work):
    the single run's 10,998,250 ns; the reference's PIM run 13 ns more (10,998,263: one host
    operation on the PIM memory), jaxsim's 26 ns more (both of them). Every later time of the PIM
    run is therefore 13 ns later in jaxsim (test_pim_within_tolerance)."""
    tb = plan_tables("pim")
    assert ref("single")[0]["TTFT"] == 10_998_250 and ref("pim")[0]["TTFT"] == 10_998_263
    assert pim_ns(tb, (10, 1, 10, 0, 0, 0, 0, 0), (10, 0, 10)) == 10_998_276 == 10_998_250 + 2 * 13


def test_pim_current_context_is_deliberate():
    """Deliberate difference (REFERENCE.md §1.16 'PIM context length'): the reference prices a
    decode's PIM attention at its prompt length for ever: request 0's first 27 gaps are all
    11,016,027 ns (10 tokens). jaxsim's default (hardware.pim_context=current) takes the tokens
    computed so far: request 0's 27th decode (context 10 + 26 = 36) puts floor((333.2538 x 36 +
    30,675.2739) / 8 + 13.86) = 5,347 ns of PIM work in each layer: 11,050,683 ns."""
    tb = plan_tables("pim")
    current = eqx.tree_at(lambda t: t.pim_prompt_ctx, tb, jnp.asarray(False))
    assert ref("pim")[0]["ITL"][26] == 11_016_027 == pim_ns(tb, (1, 1, 0, 0, 1, 36, 36, 36), (1, 36, 10))
    assert int((333.2538 * 36 + 30675.2739) / 8 + 13.86) == 5_347
    assert pim_ns(current, (1, 1, 0, 0, 1, 36, 36, 36), (1, 36, 10)) == 10_879_553 + 26 + 32 * 5_347 == 11_050_683


def test_pim_derived_coefficients_against_the_reference_fit():
    """jaxsim's default coefficients come from the INI (jaxsim/pim.py, README "PIM attention
    offload"): DDR4 332.12 ns per token (the reference's fit: 333.25) and 34,208 ns (30,675): one
    decode of 10 tokens takes floor((3,321.2 + 34,208.2) / 8 + 13.86) = 4,705 ns per layer instead of
    4,264, 32 x 441 = 14,112 ns more than the reference's 11,016,027 per iteration (+0.13%)."""
    spec = rp.run_spec(EXAMPLES["pim"])
    hw = dataclasses.replace(spec.cluster.instances[0].hw, pim_slope_ns=None, pim_intercept_ns=None)
    p = pim.pim_plan(hw, spec.model_config, 2, 2, rp.ROOT / "profiles" / "pim")
    assert p.derived and (round(p.slope_ns, 2), round(p.intercept_ns)) == (332.12, 34208)
    derived = eqx.tree_at(lambda t: (t.pim_a, t.pim_b), plan_tables("pim"),
                          (jnp.asarray(p.placement_a), jnp.asarray(p.placement_b)))
    assert pim_ns(derived, (1, 1, 0, 0, 1, 10, 10, 10), (1, 10, 10)) == 11_016_027 + 32 * (4_705 - 4_264) == 11_030_139


# ---------------------------------------------------------------- runs (python -m pytest -m slow)
@pytest.mark.slow
@pytest.mark.parametrize("name", ["single", "power"])
def test_exact_parity(name):
    """Same output as the reference to the nanosecond: every request's instance, end, E2E, queueing
    delay, TTFT, TPOT and every ITL gap."""
    d = rp.compare(run(name)[1], ref(name))
    assert d["requests"] == 10 and not d["missing"] and not d["itl_len"]
    assert {m: d[m] for m in rp.METRICS} == {m: 0 for m in rp.METRICS}
    assert rp.verdict(EXAMPLES[name], d) == ("exact", True)


@pytest.mark.slow
def test_moe_within_tolerance():
    """Known difference, not deliberate (collective timing): Qwen3-30B-A3B on tp 2 / ep 2
    (example_moe_run.csv). jaxsim prices each ring step as latency + bytes/bandwidth (§1.8); the
    reference's ASTRA-sim back end charges per MoE block (one AllReduce, one dispatch, one combine)
    30 ns more at T = 1 and 908 ns less at T = 35, so a one-token decode costs 48 x 30 = 1,440 ns
    more in the reference: request 0's second gap is 7,915,622 ns there, 7,914,182 in jaxsim. The
    differences accumulate over the run but stay within 1% of every latency."""
    result, table = run("moe")
    r0 = row(table, 0)
    assert ref("moe")[0]["ITL"][1] == 7_915_622
    assert int(r0["itl_ns"][1]) == 7_914_182 == decode_ns(plan_tables("moe"), 11)  # KV 10 + 2 - 1
    d = rp.compare(table, ref("moe"))
    assert d["inst"] == 0 and not d["itl_len"] and 0 < d["rel"] <= 0.01
    assert rp.verdict(EXAMPLES["moe"], d) == ("within 1.0%", True)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["multi", "prefix_cpu_mem_pool"])
def test_routing_at_arrival(name):
    """Deliberate difference (routing at arrival). Request 1 arrives at 347,938,952 ns while
    instance 0 decodes request 0 and instance 1 is idle. jaxsim routes it at once to instance 1,
    which starts it at once (queue 0; vLLM's DP load balancer hands a request to an engine when it
    arrives); the reference routes it at its next simulator event, 82,418 ns later (240,126 ns into
    instance 0's iteration). Nothing else differs: instance 0's requests are equal to the
    nanosecond, and every request of instance 1 (which inherits the earlier start) has its clock
    times 82,418 ns earlier, with equal TPOT and ITLs."""
    _, table = run(name)
    reference = ref(name)
    assert reference[1]["queuing_delay"] == 82_418 and int(row(table, 1)["queuing_delay_ns"]) == 0
    for rid, r in reference.items():
        j = row(table, rid)
        assert int(j["instance_id"]) == r["instance id"]
        shift = 0 if r["instance id"] == 0 else -82_418
        assert int(j["end_ns"]) - r["end_time"] == shift
        assert int(j["ttft_ns"]) - r["TTFT"] == shift
        assert int(j["queuing_delay_ns"]) - r["queuing_delay"] == shift
        assert (int(j["tpot_ns"]), j["itl_ns"].tolist()) == (r["TPOT"], r["ITL"])


@pytest.mark.slow
@pytest.mark.parametrize("name, pools", [("prefix_cpu_mem_pool", [[0, 1]]),
                                         ("dual_prefix_cpu_mem_pool", [[0, 1], [2, 3]])])
def test_cpu_pools_hold_nothing_on_this_trace(name, pools):
    """The CPU prefix pools as the reference ran them: a pool per node, shared by the node's
    instances, of 512 GiB // (256 tokens x 131,072 bytes) = 16,384 chunks. No request of the trace
    reaches 256 tokens (22 + 104 at most), so no chunk is ever written, nothing is found or
    recalled, and the runs' latencies are the pool-less ones (test_routing_at_arrival, and its
    dual-node form below). The tier's deliberate differences (REFERENCE.md §1.16: the recall
    source, NPU + tier hits capped at reached - 1, private pools' split capacity) do not arise."""
    result, _ = run(name)
    st = result.stats["kv_tier"]
    assert (st["storage"], st["hit_tokens"], st["recalled_chunks"]) == ("cpu", 0, 0)
    assert [p["instances"] for p in st["pools"].values()] == pools
    for p in st["pools"].values():
        assert p["capacity_chunks"] == 512 * 2**30 // (256 * 2 * KV * LAYERS * FP) == 16_384
        assert p["written_chunks"] == p["resident_chunks"] == 0
    assert not np.asarray(result.iter_tier_written).any() and not np.asarray(result.iter_tier_hits).any()


@pytest.mark.slow
def test_cxl_within_tolerance():
    """The CXL run (test_cxl_weight_loads_by_hand): every iteration waits for cxl:3's loads, so
    each reference gap is jaxsim's plus 16,198 ns - final_layernorm(T) of its batch, to the
    nanosecond (13,467-13,776 ns shorter in jaxsim). The differences accumulate along a request
    (request 1, 104 tokens, ends 1,460,406 ns earlier) and through the queue (request 9 starts
    122,274 ns earlier), within 0.1% of every latency. Nothing else differs: same instance, same
    number of tokens, no preemption, at most a few dozen KV blocks held."""
    result, table = run("cxl")
    tb = plan_tables("cxl")
    rt = reference_cxl_tables(tb)
    shape_of = {int(e): (int(t), int(s)) for e, t, s in zip(result.iter_end_ns, result.iter_num_tokens,
                                                          result.iter_num_seqs)}

    @functools.cache
    def reference_minus_jaxsim(t, s):  # 16,198 - final_layernorm(t): only the head's T and S matter
        shape = (t, s, t, 0, 0, 0, 0, 0)
        return int(ITER(rt, *shape)[0]) - int(ITER(tb, *shape)[0])

    assert reference_minus_jaxsim(1, 1) == 16_198 - 2_422
    gaps = 0
    for rid, r in ref("cxl").items():
        j = row(table, rid)
        times = np.cumsum([int(j["first_token_ns"]), *j["itl_ns"].tolist()])
        assert len(j["itl_ns"]) == len(r["ITL"])
        for k, (mine, theirs) in enumerate(zip(j["itl_ns"].tolist(), r["ITL"])):
            assert theirs - mine == reference_minus_jaxsim(*shape_of[int(times[k + 1])]), (rid, k)
            gaps += 1
    assert gaps == sum(len(r["ITL"]) for r in ref("cxl").values()) == 581
    assert not table["num_preemptions"].any() and int(np.max(result.iter_kv_blocks_used)) < 100
    d = rp.compare(table, ref("cxl"))
    assert (d["inst"], d["itl_len"], d["itl"], d["end"], d["queue"]) == (0, 0, 13_776, 1_460_406, 122_274)
    assert 0 < d["rel"] <= 0.001
    assert rp.verdict(EXAMPLES["cxl"], d) == ("within 0.1%", True)


@pytest.mark.slow
def test_routing_at_arrival_shifts_a_later_arrival_by_an_iteration():
    """The same deliberate difference on the dual-node cluster (4 instances, a CPU prefix pool per
    node as the reference ran it; the pools serve no hit here): instance 1 starts request 1 82,418 ns
    earlier in jaxsim, so its iterations end 82,418 ns earlier. Request 5 arrives 9,839 ns before
    one of them ends in the reference (queue 9,839) but 72,579 ns after the corresponding one ends
    in jaxsim, and waits for the next: queue = that iteration (request 1's ITL then) - 72,579."""
    _, table = run("dual_prefix_cpu_mem_pool")
    reference = ref("dual_prefix_cpu_mem_pool")
    assert reference[5]["queuing_delay"] == 9_839 and reference[5]["instance id"] == 1
    assert reference[1]["queuing_delay"] == 82_418 and int(row(table, 1)["queuing_delay_ns"]) == 0
    r1, r5 = row(table, 1), row(table, 5)
    start = int(r5["first_scheduled_ns"])
    t1 = np.cumsum([int(r1["first_token_ns"]), *r1["itl_ns"].tolist()])
    k = int(np.searchsorted(t1, start))
    assert t1[k] == start  # request 5 starts at an iteration end of instance 1
    iteration = int(t1[k] - t1[k - 1])
    assert int(r5["queuing_delay_ns"]) == iteration - (82_418 - 9_839) == 11_077_374
    for rid in (0, 4, 8):  # instance 0: no request routed differently, equal to the nanosecond
        assert int(row(table, rid)["end_ns"]) == reference[rid]["end_time"]


@pytest.mark.slow
def test_pd_handoff():
    """Deliberate difference (P/D, REFERENCE.md §1.7 and §1.16). Request 0 (10 prompt tokens) on the
    prefill instance: the reference's prefill iteration is 20,002 ns longer than the colocated one
    (its KV send to phantom NPUs; TTFT 11,018,252 against the single run's 10,998,250), then it
    hands off at once. jaxsim streams each layer's K+V while the next layer computes, so TTFT is
    the colocated 10,998,250; the last layer (2 x kv_dim 1024 x 10 tokens x 2 bytes = 40,960
    bytes) leaves at the end of the iteration and arrives 20,000 + 40,960/16 = 22,560 ns later,
    when the decode instance may start it. The decode instance's clock therefore runs 22,560 -
    20,002 = 2,558 ns behind the reference's, and every request ends exactly 2,558 ns later."""
    _, table = run("pd")
    reference = ref("pd")
    r0 = row(table, 0)
    assert reference[0]["TTFT"] == 11_018_252 == ref("single")[0]["TTFT"] + 20_002
    assert int(r0["ttft_ns"]) == 10_998_250 == ref("single")[0]["TTFT"]
    kv_wait = 20_000 + 2 * 1024 * 10 * 2 // 16
    assert int(table["kv_wait_ns"][int(np.flatnonzero(table["request_id"] == 0)[0])]) == kv_wait == 22_560
    # the first gap: the reference decodes at once after its (longer) prefill, jaxsim after the KV wait
    assert reference[0]["ITL"][0] == 11_146_817 and int(r0["itl_ns"][0]) == 11_146_817 + kv_wait
    for rid, r in reference.items():
        assert int(row(table, rid)["end_ns"]) - r["end_time"] == 2_558


@pytest.mark.slow
def test_dense_dp_members_are_independent_engines():
    """Deliberate difference (REFERENCE.md §1.16 'DP sync'), dp 2 x tp 2 Llama-3.1-8B
    (example_dp_run.csv). While instance 1 computes request 1's 22-token prompt, instance 0
    decodes request 0. The reference lock-steps the two members, padding instance 0 to 22 tokens
    (22 sequences): request 0's 35th gap is 9,784,905 ns instead of its ~8.67 ms decode. jaxsim
    runs dense DP members as independent engines (vLLM synchronises DP ranks only for MoE): the
    gap is request 0's own decode. With ``cluster.dp_sync=always`` jaxsim lock-steps them too and
    the gap is the padded round (up to the collective timing difference of test_moe_within_tolerance:
    jaxsim's 22-token AllReduce here is 576 ns dearer than the reference's)."""
    reference = ref("dp")[0]["ITL"]
    assert reference[33:36] == [8_667_488, 9_784_905, 8_667_648]
    own = run("dp")[1]
    synced = run("dp[dp_sync=always]")[1]
    gap_own = int(row(own, 0)["itl_ns"][34])
    gap_synced = int(row(synced, 0)["itl_ns"][34])
    tb = plan_tables("dp")
    assert gap_own == decode_ns(tb, 10 + 35 - 1) == 8_667_552  # its own decode, KV 44
    # the padded round; it differs from the reference's by collective timing alone: 64 AllReduces of
    # 22 tokens, each 576 ns dearer in jaxsim (0.4% of the round)
    assert gap_synced == 9_821_769 == reference[34] + 64 * 576


@pytest.mark.slow
def test_pp_arrival_waits_for_the_batch_in_flight():
    """Deliberate difference (PP arrivals), pp 4 Llama-3.1-8B (example_pp_run.csv). Request 1
    arrives at 347,938,952 ns while request 0's batch is in the pipeline and nothing else waits.
    vLLM's engine with a batch queue then blocks on that batch (it schedules again only when it
    completes), and jaxsim does the same: request 1 is scheduled, together with request 0's next
    decode, when request 0's token comes out, 1,517,588 ns after the arrival. The reference starts
    it in a batch of its own at its next event, 33,983 ns after the arrival."""
    result, table = run("pp")
    assert ref("pp")[1]["queuing_delay"] == 33_983
    r0, r1 = row(table, 0), row(table, 1)
    t0 = np.cumsum([int(r0["first_token_ns"]), *r0["itl_ns"].tolist()])
    arrival = int(r1["arrival_ns"])
    nxt = int(t0[np.searchsorted(t0, arrival)])  # request 0's first token after the arrival
    assert int(r1["first_scheduled_ns"]) == nxt and int(r1["queuing_delay_ns"]) == nxt - arrival == 1_517_588
    # that batch holds both: 22 prompt tokens + 1 decode
    starts = np.asarray(result.iter_start_ns)
    assert int(np.asarray(result.iter_num_tokens)[np.flatnonzero(starts == nxt)[0]]) == 23


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pim", "pim_sub_batch"])
def test_pim_within_tolerance(name):
    """PIM attention offload in reference mode (test_pim_iterations_by_hand,
    test_pim_interleaved_iteration_by_hand): every iteration equal to the reference's to the ns but
    for the host operations (PIM_HOST_OPS): an iteration without PIM work or an interleaved one is
    13 ns longer in jaxsim. In the PIM run that is only request 0's prefill (every later time 13 ns
    later, every gap equal); with sub-batch interleaving every iteration of two or more requests is
    interleaved (13 ns longer each: those gaps 13 ns longer, the times drifting to 1,365 ns by the
    end). Same instance, same number of tokens, same batches."""
    result, table = run(name)
    seqs_at = {int(e): int(s) for e, s in zip(result.iter_end_ns, result.iter_num_seqs)}
    reference = ref(name)
    for rid, r in reference.items():
        j = row(table, rid)
        times = np.cumsum([int(j["first_token_ns"]), *j["itl_ns"].tolist()])
        assert len(j["itl_ns"]) == len(r["ITL"])
        for k, (mine, theirs) in enumerate(zip(j["itl_ns"].tolist(), r["ITL"])):
            longer = name == "pim_sub_batch" and seqs_at[int(times[k + 1])] >= 2
            assert mine - theirs == (13 if longer else 0), (rid, k)
    # what the power model reads: request 0's prefill has no PIM work, its first decode 32 x 4,264 ns
    # (test_pim_work_for_the_power_model); every iteration with PIM work moves 20,480 B per decode and layer
    order = np.argsort(result.iter_end_ns)
    pim_rows, io_rows = np.asarray(result.iter_pim_ns)[order], np.asarray(result.iter_pim_io_bytes)[order]
    assert pim_rows[:2].tolist() == [0, 32 * 4_264] and io_rows[:2].tolist() == [0, 32 * 20_480]
    assert np.array_equal(pim_rows > 0, io_rows > 0) and not np.any(io_rows % (32 * 20_480))
    d = rp.compare(table, reference)
    assert (d["inst"], d["itl_len"], d["itl"]) == (0, 0, 0 if name == "pim" else 13)
    assert d["end"] == (13 if name == "pim" else 1_365)
    assert rp.verdict(EXAMPLES[name], d)[1]
