"""Spec-sheet hardware (``spec/<sheet>``): the roofline model tabulated as a profile bundle
(jaxsim/spec_bundle.py) must reproduce the direct model (jaxsim/latency/roofline.py) through the
ordinary table lookups, and plug into planning like any hardware."""

import dataclasses

import jax
import numpy as np
import pytest

from jaxsim import latency, planning, profiles
from jaxsim.errors import JaxsimInputError
from jaxsim.latency import roofline
from jaxsim.latency.base import BatchShape
from jaxsim.model import load_model_config
from jaxsim.spec import HardwareConfig
from jaxsim.spec_bundle import load_spec_bundle

P = "profiles"


@pytest.fixture(scope="module")
def llama():
    return load_model_config(f"{P}/models", "meta-llama/Llama-3.1-8B")


def _shapes(rng, n):
    """Realistic batches: decode-only, prefill-only and mixed (int arrays of the BatchShape fields)."""
    nd = rng.integers(0, 200, n)
    pc = np.where(rng.random(n) < 0.5, rng.integers(1, 2048, n), 0)
    nd = np.where((pc == 0) & (nd == 0), 1, nd)
    kvd_mean = rng.integers(64, 8000, n)
    kp = np.where(pc > 0, rng.integers(0, 4000, n) * (rng.random(n) < 0.5), 0)
    seqs = nd + (pc > 0)
    return dict(tokens=pc + nd, seqs=seqs, prefill_tokens=pc, prefill_history=kp, decodes=nd,
                decode_kv_sum=nd * kvd_mean, decode_kv_min=np.where(nd > 0, kvd_mean, 0),
                decode_kv_max=np.where(nd > 0, kvd_mean, 0))


# (H100 TP 1 compiles a shape of its own: in the slow set for the suite's budget)
@pytest.mark.parametrize("sheet,tp", [pytest.param("h100", 1, marks=pytest.mark.slow), ("mi300x", 2)])
def test_tabulated_matches_direct_roofline(llama, sheet, tp):
    hw = HardwareConfig(name=f"spec/{sheet}", tp=tp, link_bw_gbps=450.0, link_latency_ns=10000.0)
    tables = latency.latency_tables(load_spec_bundle(P, hw.name, llama, "bf16", tp), llama, hw)
    rm = roofline.RooflineModel.from_spec(sheet, llama, tp=tp, cpu_bw_gbs=hw.cpu_mem_bw_gbps,
                                          cpu_lat_ns=hw.cpu_mem_latency_ns)
    rm = roofline.with_hardware(rm, link_bw=hw.link_bw_gbps, link_lat=hw.link_latency_ns)
    s = {k: jax.numpy.asarray(v, jax.numpy.int32) for k, v in _shapes(np.random.default_rng(0), 400).items()}
    shape = BatchShape(**s)
    tab = np.asarray(jax.jit(jax.vmap(lambda t, b: t.iteration_time(b)[0], (None, 0)))(tables, shape), np.float64)
    direct = np.asarray(jax.jit(jax.vmap(roofline.iteration_ns, (None, 0)))(rm, shape))
    rel = np.abs(tab / direct - 1)
    # measured: h100 tp1 median 0.010%, max 0.11%; mi300x tp2 median 0.011%, max 0.07% (the
    # interpolation of pc^2 and of the p-norm between grid points)
    assert np.median(rel) < 0.003 and rel.max() < 0.02, (np.median(rel), rel.max())


def test_what_if_overrides_reprice_and_are_spec_only(llama):
    base = load_spec_bundle(P, "spec/h100", llama, "bf16", 1)
    fast = load_spec_bundle(P, "spec/h100", llama, "bf16", 1, mem_bw_gbs=2 * 3350.0)
    # a decode-sized GEMM is bandwidth bound: twice the bandwidth is close to half the time
    t1, t2 = base.dense["gate_up_proj"].values_ns[0], fast.dense["gate_up_proj"].values_ns[0]
    assert 0.45 < t2 / t1 < 0.7
    assert fast.meta["mem_bw_gbs"] == 6700.0 and base.meta["mem_bw_gbs"] == 3350.0
    with pytest.raises(JaxsimInputError, match="hardware.peak_tflops"):
        planning.hardware_bundle(P, HardwareConfig(name="RTXPRO6000", peak_tflops=100.0), llama, "bf16")
    hw = HardwareConfig(name="spec/h100", peak_tflops=100.0)
    b = planning.hardware_bundle(P, hw, llama, "bf16")
    assert b.meta["peak_tflops"] == 100.0


def test_sources_and_errors(llama):
    assert profiles.bundle_source("spec/h100") == "roofline"
    assert profiles.bundle_source("h100") == "operator-db"
    assert profiles.bundle_source("legacy/H100") == "legacy"
    assert profiles.bundle_source("RTXPRO6000") == "profiles"
    known = profiles.known_hardware(P)
    assert "spec/mi300x" in known and "h100" in known and "pim" not in known and "specs" not in known
    with pytest.raises(JaxsimInputError, match="no such file: hardware 'spec/nope'"):
        load_spec_bundle(P, "spec/nope", llama)
    with pytest.raises(JaxsimInputError, match="does not divide"):
        load_spec_bundle(P, "spec/h100", llama, "bf16", 3)
    with pytest.raises(JaxsimInputError, match="no variant"):
        load_spec_bundle(P, "spec/h100", llama, "int4")
    # an FP8 KV cache is priced from its own bytes (no kv_read_scale estimate)
    variant, scale = planning.profile_variant(P, "spec/h100", llama,
                                              dataclasses.replace(planning.ModelRuntimeConfig(), kv_cache_dtype="fp8"))
    assert (variant, scale) == ("bf16-kvfp8", 1.0)
    rt = planning.ModelRuntimeConfig(dtype="fp8")  # FP8 weights, the KV cache still bf16
    assert planning.profile_variant(P, "spec/h100", llama, rt) == ("fp8", 1.0)
    both = load_spec_bundle(P, "spec/h100", llama, "fp8-kvfp8")
    fp8 = load_spec_bundle(P, "spec/h100", llama, "fp8")
    # same weights, half the KV bytes: a long decode batch's attention is cheaper, its GEMMs are not
    assert both.attention.values_ns[0, -1, 0, -1] < 0.75 * fp8.attention.values_ns[0, -1, 0, -1]
    np.testing.assert_array_equal(both.dense["qkv_proj"].values_ns, fp8.dense["qkv_proj"].values_ns)


@pytest.mark.slow  # the engine compiles once more for the roofline's own pytree (~40 s on 2 cores)
def test_engine_runs_the_roofline_model_directly():
    """The roofline model behind the engine's latency interface, without tables: the engine's
    parameters of a spec-sheet run with its latency model swapped for the direct RooflineModel give
    (nearly) the same run as the tabulated bundle (the tables reproduce the model to ~0.01%)."""
    import equinox as eqx

    from jaxsim import simulator
    from jaxsim.results import to_result
    from jaxsim.spec import SchedulerConfig

    from _shared import load_model, load_trace

    m, w = load_model(), load_trace(40)
    hw = HardwareConfig(name="spec/h100", mem_size_gb=80, link_bw_gbps=450, link_latency_ns=10000)
    sched = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=1024)
    p = simulator.prepare(w, m, hw, sched, record_token_times=False)
    tab = to_result(p, simulator.run_prepared(p))
    rm = roofline.RooflineModel.from_spec("h100", m, cpu_bw_gbs=hw.cpu_mem_bw_gbps, cpu_lat_ns=hw.cpu_mem_latency_ns)
    rm = roofline.with_hardware(rm, link_bw=hw.link_bw_gbps, link_lat=hw.link_latency_ns)
    # the engine's parameters have an instance axis: a stack of one
    direct_p = dataclasses.replace(p, params=eqx.tree_at(lambda q: q.latency, p.params, roofline.stack_rooflines([rm])))
    direct = to_result(direct_p, simulator.run_prepared(direct_p))
    assert direct.stats["iterations"] == pytest.approx(tab.stats["iterations"], rel=0.02)
    for a, b in ((direct.first_token_ns - direct.arrival_ns, tab.first_token_ns - tab.arrival_ns),
                 (direct.finish_ns, tab.finish_ns)):
        assert np.mean(a) == pytest.approx(np.mean(b), rel=0.005)


def test_a_sheet_anywhere_by_path(llama, tmp_path):
    sheet = tmp_path / "part.yaml"
    sheet.write_text("name: Part\nsource: a design study\npeak_tflops: {bf16: 400}\nmem_bw_gbs: 2000\nmem_gib: 64\n"
                     "link_bw_gbs: 100\nlink_latency_us: 5\n")
    hw = f"spec/{sheet}"
    assert profiles.has_hardware(P, hw) and not profiles.has_hardware(P, f"spec/{tmp_path / 'nope.yaml'}")
    b = load_spec_bundle(P, hw, llama)
    assert b.meta["mem_bw_gbs"] == 2000.0 and b.meta["peak_tflops"] == 400.0
    # the same numbers under another name price the same tables
    same = tmp_path / "same.yaml"
    same.write_text(sheet.read_text().replace("name: Part", "name: Same"))
    np.testing.assert_array_equal(load_spec_bundle(P, f"spec/{same}", llama).dense["qkv_proj"].values_ns,
                                  b.dense["qkv_proj"].values_ns)


def test_null_memory_and_link_come_from_the_hardware_source():
    """A spec sheet supplies its memory and TP link; a converted operator database its spec sheet's
    memory and the all-reduce fit at the run's TP degree; measured profiles supply neither."""
    import json

    none = dict(mem_size_gb=None, link_bw_gbps=None, link_latency_ns=None)
    hw = planning.resolve_hardware(HardwareConfig(name="spec/mi300x", **none), P)
    assert (hw.mem_size_gb, hw.link_bw_gbps, hw.link_latency_ns) == (192.0, 448.0, 10000.0)
    fits = json.load(open(f"{P}/operator-db/fit.json"))["allreduce"]["h200_sxm"]["vllm_eager"]
    for tp in (2, 4, 8):
        hw = planning.resolve_hardware(HardwareConfig(name="h200", tp=tp, **none), P)
        assert (hw.link_bw_gbps, hw.link_latency_ns) == (fits[str(tp)]["link_bw_gbps"], fits[str(tp)]["link_latency_ns"])
        assert hw.mem_size_gb == 141.0
    # a value given wins over the source's
    assert planning.resolve_hardware(HardwareConfig(name="spec/mi300x", mem_size_gb=64.0, link_bw_gbps=None,
                                                    link_latency_ns=None), P).mem_size_gb == 64.0
    with pytest.raises(JaxsimInputError, match="hardware.mem_size_gb: is null, but 'RTXPRO6000'"):
        planning.resolve_hardware(HardwareConfig(mem_size_gb=None), P)
    with pytest.raises(JaxsimInputError, match="hardware.tp: h200's all-reduce table holds"):
        planning.resolve_hardware(HardwareConfig(name="h200", tp=16, **none), P)
