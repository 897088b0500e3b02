"""Iteration latency (REFERENCE.md §2): worked checks, parity with the plain-Python oracle, TP
AllReduce, stacking/vmap over configurations, and clear errors for bad profile bundles."""

import dataclasses
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsim  # noqa: F401  (enables x64)
from jaxsim.errors import JaxsimInputError
from jaxsim.latency import iteration_time, latency_tables, stack_tables
from jaxsim.model import load_model_config
from jaxsim.profiles import load_profile_bundle
from jaxsim.spec import HardwareConfig

import reference_latency as ref
from _shared import LLAMA, MODELS, PROFILES, load_model

QWEN_MOE = "Qwen/Qwen3-30B-A3B-Instruct-2507"

# compiled once per module (one compile per distinct table shape)
_ONE = jax.jit(iteration_time)
_MANY = jax.jit(jax.vmap(iteration_time, in_axes=(None,) + (0,) * 8))
_CONFIGS = jax.jit(jax.vmap(iteration_time, in_axes=(0,) + (None,) * 8))

_BUNDLES = {}


def _setup(hardware="RTXPRO6000", model=LLAMA, tp=1, **hw_kw):
    """(model config, bundle, hardware, tables, oracle bundle), loaded once per key."""
    key = (hardware, model, tp)
    if key not in _BUNDLES:
        m = load_model(model)
        _BUNDLES[key] = (m, load_profile_bundle(PROFILES, hardware, m, tp=tp), ref.RefBundle(PROFILES, hardware, m, tp))
    m, b, rb = _BUNDLES[key]
    hw = HardwareConfig(name=hardware, tp=tp, **hw_kw)
    return m, b, hw, rb


def _time(tb, *shape):
    t, e = _ONE(tb, *shape)
    return int(t), [int(x) for x in e]


# ------------------------------------------------------------------------------ worked checks
def test_worked_check_request0():
    """REFERENCE.md §1.1: the validation case's request 0 (2048-token chunk, then 310 over 2048)."""
    m, b, hw, _ = _setup(cpu_mem_bw_gbps=256.0, cpu_mem_latency_ns=0.0)
    tb = latency_tables(b, m, hw)
    t1, e1 = _time(tb, 2048, 1, 2048, 0, 0, 0, 0, 0)
    t2, e2 = _time(tb, 310, 1, 310, 2048, 0, 0, 0, 0)
    assert t1 == 82_945_344 + 64
    assert t2 == 19_496_205 + 8
    assert t1 + t2 == 102_441_621  # the reference's TTFT of that request
    assert e1 == e2 == [0, 0, 0, 0]


def test_sanity_values_kernels_only():
    """REFERENCE.md §2.1 sanity values, host memory operations removed (infinite host bandwidth)."""
    m, b, hw, rb = _setup(cpu_mem_bw_gbps=math.inf, cpu_mem_latency_ns=0.0)
    tb = latency_tables(b, m, hw)
    assert _time(tb, 1, 1, 0, 0, 1, 512, 512, 512)[0] == 11_284_385
    assert _time(tb, 128, 128, 0, 0, 128, 128 * 1024, 1024, 1024)[0] == 25_338_691
    assert _time(tb, 2048, 1, 2048, 0, 0, 0, 0, 0)[0] == 82_945_344
    # per-layer attention values quoted there, checked on the oracle
    assert ref.attn(rb, 0, 0, 128, 1024)[0] == 404_865
    assert ref.attn(rb, 2048, 0, 0, 0)[0] == 172_609


def test_host_memory_ops_are_floored_separately():
    m, b, hw, _ = _setup(cpu_mem_bw_gbps=256.0, cpu_mem_latency_ns=0.0)
    m2, b2, hw0, _ = _setup(cpu_mem_bw_gbps=math.inf, cpu_mem_latency_ns=0.0)
    hw_lat = dataclasses.replace(hw, cpu_mem_latency_ns=1000.5)
    for T in (1, 63, 64, 310, 2048):
        shape = (T, 1, T, 0, 0, 0, 0, 0)
        base = _time(latency_tables(b, m, hw0), *shape)[0]
        assert _time(latency_tables(b, m, hw), *shape)[0] - base == (4 * T) // 256 + (4 * T) // 256
        assert _time(latency_tables(b, m, hw_lat), *shape)[0] - base == 2 * math.floor(1000.5 + 4 * T / 256)


# ------------------------------------------------------------------------------------- parity
def _random_shapes(rng, n):
    """Mixed prefill + decode batches, skewed decode lengths, and values above every grid."""
    shapes = []
    for _ in range(n):
        kind = rng.integers(0, 4)  # 0 prefill only, 1 decode only, 2-3 mixed
        big = rng.random() < 0.15  # push past the grids
        nd = 0 if kind == 0 else int(rng.integers(0, 400 if big else 257))
        pc = 0 if kind == 1 else int(rng.integers(0, 4000 if big else 2049))
        if pc and rng.random() < 0.3:  # on the skew-fit pc grid (and one value just off the profiled grid)
            pc = int(rng.choice([16, 32, 48, 64, 128, 256, 512, 1024, 2048, 2064]))
        if pc == 0 and nd == 0:
            nd = 1
        kp = int(rng.integers(0, 30000 if big else 16385)) if pc else 0
        if pc and rng.random() < 0.2:
            kp = int(rng.choice([0, 512, 1024, 2048, 4096, 16384]))
        if nd:
            lo = int(rng.integers(1, 20000 if big else 16384))
            kv = rng.integers(lo, lo + 1 + int(rng.integers(0, 8000)), size=nd)
            if rng.random() < 0.3:
                kv[:] = lo  # homogeneous: no skew correction
            kvs, kmin, kmax = int(kv.sum()), int(kv.min()), int(kv.max())
        else:
            kvs = kmin = kmax = 0
        T = pc + nd
        S = nd + (1 + int(rng.integers(0, 3)) if pc else 0)  # several chunks merged into one prefill
        shapes.append((T, S, pc, kp, nd, kvs, kmin, kmax))
    # hand-picked corners: on-grid keys, one decode, the top of every grid, empty-ish batches
    shapes += [(1, 1, 0, 0, 1, 16, 16, 16), (1, 1, 0, 0, 1, 0, 0, 0), (2048, 1, 2048, 16384, 0, 0, 0, 0),
               (256, 256, 0, 0, 256, 256 * 16384, 16384, 16384), (3000, 300, 2700, 20000, 300, 300 * 20000, 1, 39000),
               (0, 0, 0, 0, 0, 0, 0, 0), (17, 2, 16, 0, 1, 5, 5, 5), (40, 3, 24, 768, 2, 3000, 1000, 2000)]
    return shapes


PARITY_CASES = [
    ("RTXPRO6000", LLAMA, 1, None),
    ("RTXPRO6000", LLAMA, 2, None),
    ("RTX4090", LLAMA, 1, None),  # skew_fit disabled -> alpha = 0
    ("RTXPRO6000", QWEN_MOE, 1, 1),
    ("RTXPRO6000", QWEN_MOE, 2, 2),  # o_proj AllReduce + EP dispatch/combine
]


@pytest.mark.parametrize("hardware,model,tp,ep", PARITY_CASES)
def test_parity_with_reference(hardware, model, tp, ep):
    m, b, hw, rb = _setup(hardware, model, tp, cpu_mem_bw_gbps=256.0, cpu_mem_latency_ns=0.0)
    tb = latency_tables(b, m, hw, ep=ep)
    rng = np.random.default_rng(1234 + tp)
    shapes = _random_shapes(rng, 300)
    cols = [np.array(c, np.int64) for c in zip(*shapes)]
    t_jax, e_jax = (np.asarray(x) for x in _MANY(tb, *cols))
    skewed = 0
    for i, s in enumerate(shapes):
        t_ref, e_ref = ref.iteration_time(rb, *s, cpu_bw=256.0, cpu_lat=0.0, link_bw=hw.link_bw_gbps,
                                          link_lat=hw.link_latency_ns, hardware=hardware, ep=ep or 1)
        assert (int(t_jax[i]), list(e_jax[i])) == (t_ref, e_ref), f"shape {s}"
        nd = s[4]
        skewed += nd > 1 and s[7] != s[5] // nd
    assert skewed > 50  # the skew correction path is well exercised
    assert e_jax[:, 0].any() and e_jax[:, 1].any() and e_jax[:, 2].any()  # above-grid lookups happen
    assert e_jax[:, 3].any() == (model == QWEN_MOE)


def test_extrapolation_flags():
    m, b, hw, _ = _setup()
    tb = latency_tables(b, m, hw)
    assert _time(tb, 100, 10, 0, 0, 100, 100 * 1000, 1000, 1000)[1] == [0, 0, 0, 0]
    assert _time(tb, 3000, 1, 3000, 0, 0, 0, 0, 0)[1] == [1, 0, 1, 0]  # T and pc above 2048
    assert _time(tb, 300, 300, 0, 0, 300, 300 * 1000, 1000, 1000)[1] == [0, 1, 1, 0]  # S and nd above 256
    assert _time(tb, 8, 8, 0, 0, 8, 8 * 20000, 20000, 20000)[1] == [0, 0, 1, 0]  # kvd above 16384


def test_skew_correction_changes_attention():
    """A skewed decode batch costs more than a homogeneous one with the same mean (alpha > 0)."""
    m, b, hw, rb = _setup()
    tb = latency_tables(b, m, hw)
    homog = _time(tb, 64, 64, 0, 0, 64, 64 * 2048, 2048, 2048)[0]
    skew = _time(tb, 64, 64, 0, 0, 64, 64 * 2048, 1024, 8192)[0]
    assert skew > homog
    assert skew == ref.iteration_time(rb, 64, 64, 0, 0, 64, 64 * 2048, 1024, 8192)[0]
    # RTX4090's meta.yaml disables the fit: no correction at all
    m4, b4, hw4, _ = _setup("RTX4090")
    tb4 = latency_tables(b4, m4, hw4)
    assert _time(tb4, 64, 64, 0, 0, 64, 64 * 2048, 1024, 8192)[0] == _time(tb4, 64, 64, 0, 0, 64, 64 * 2048, 2048, 2048)[0]


# ------------------------------------------------------------------------- TP, MoE, stacking
def test_tp2_allreduce_matches_hand_computation():
    T, H, fp, N, L = 100, 4096, 2, 2, 32
    m, b, hw, _ = _setup(tp=2, link_bw_gbps=16.0, link_latency_ns=20000.0)
    assert b.tp == 2 and b.path.endswith("bf16")
    no_link = dataclasses.replace(hw, link_bw_gbps=math.inf, link_latency_ns=0.0)
    shape = (T, 4, 96, 512, 4, 4 * 700, 700, 700)
    with_ar = _time(latency_tables(b, m, hw), *shape)[0]
    without = _time(latency_tables(b, m, no_link), *shape)[0]
    per_ar = math.floor(2 * (N - 1) * (20000.0 + (T * H * fp / N) / 16.0))
    assert per_ar == 91_200
    assert with_ar - without == L * 2 * per_ar  # after o_proj and after down_proj, every block
    # MoE models have only the o_proj AllReduce (ep = 1 here: no EP collectives)
    mm, bm, hwm, _ = _setup(model=QWEN_MOE, tp=2, link_bw_gbps=16.0, link_latency_ns=20000.0)
    no_link_m = dataclasses.replace(hwm, link_bw_gbps=math.inf, link_latency_ns=0.0)
    Hm, Lm = mm.hidden_size, mm.num_layers
    d = (_time(latency_tables(bm, mm, hwm, ep=1), *shape)[0]
         - _time(latency_tables(bm, mm, no_link_m, ep=1), *shape)[0])
    assert d == Lm * math.floor(2 * (N - 1) * (20000.0 + (T * Hm * fp / N) / 16.0))


def test_moe_block_ep1():
    """§2.7 with ep = 1: moe(T, min(T*k, E)) per layer, from tp1/moe.csv."""
    m, b, hw, rb = _setup(model=QWEN_MOE)
    assert b.moe is not None and int(b.moe.ae_axis[-1]) == 128
    # (2048, 128) is on the grid: 1066.6 us
    assert ref.moe_lookup(rb, 2048, 128)[0] == 1_066_600
    # the ae = 128 row starts at 16 tokens: 3 tokens clamp to its 16-token value (§2.7)
    row = {int(k): int(v) for k, v in zip(b.moe.token_keys[-1][: b.moe.n_tokens[-1]], b.moe.values_ns[-1])}
    assert ref.moe_lookup(rb, 3, 128)[0] == row[16]
    tb = latency_tables(b, m, hw)
    t, e = _time(tb, 2048, 1, 2048, 0, 0, 0, 0, 0)
    assert (t, e) == tuple(ref.iteration_time(rb, 2048, 1, 2048, 0, 0, 0, 0, 0))


def test_stacked_configs_vmap():
    """Tables of different bundles and knobs stack (padded) and vmap to the per-config results."""
    m, b, hw, _ = _setup(cpu_mem_bw_gbps=256.0)
    m2, b2, hw2, _ = _setup(model=QWEN_MOE, tp=2, cpu_mem_bw_gbps=64.0, cpu_mem_latency_ns=500.0)
    m3, b3, hw3, _ = _setup("RTX4090")
    tabs = [latency_tables(b, m, hw), latency_tables(b2, m2, hw2), latency_tables(b3, m3, hw3),
            latency_tables(b, m, dataclasses.replace(hw, cpu_mem_latency_ns=1234.0))]
    stacked = stack_tables(tabs)
    for shape in [(2048, 1, 2048, 0, 0, 0, 0, 0), (96, 90, 6, 700, 90, 90 * 3000, 100, 9000), (1, 1, 0, 0, 1, 7, 7, 7),
                  (3000, 300, 2700, 20000, 300, 300 * 20000, 1, 39000)]:
        t, e = _CONFIGS(stacked, *shape)
        for i, tb in enumerate(tabs):
            assert (int(t[i]), [int(x) for x in e[i]]) == _time(tb, *shape)


def test_iteration_time_traces_once():
    m, b, hw, _ = _setup()
    tb = latency_tables(b, m, hw)
    count = {"n": 0}

    def f(tb, *a):
        count["n"] += 1
        return iteration_time(tb, *a)

    g = jax.jit(f)
    for shape in [(1, 1, 0, 0, 1, 5, 5, 5), (9, 2, 8, 3, 1, 4, 4, 4), (2048, 1, 2048, 0, 0, 0, 0, 0)]:
        g(tb, *(jnp.int64(x) for x in shape))
    g(latency_tables(b, m, dataclasses.replace(hw, cpu_mem_bw_gbps=1.0)), *(jnp.int64(x) for x in shape))
    assert count["n"] == 1


# -------------------------------------------------------------------------------- bad inputs
def _copy_bundle(tmp_path, model=LLAMA):
    """A private copy of profiles/ holding only the RTXPRO6000 bundle of ``model`` (tp1, tp2)."""
    root = tmp_path / "profiles"
    shutil.copytree(PROFILES / "architectures", root / "architectures")
    src = PROFILES / "RTXPRO6000" / model / "bf16"
    dst = root / "RTXPRO6000" / model / "bf16"
    shutil.copytree(src, dst)
    return root, dst


def test_unknown_hardware(llama):
    m = llama
    with pytest.raises(JaxsimInputError) as e:
        load_profile_bundle(PROFILES, "H100", m)
    assert "H100" in str(e.value) and "RTXPRO6000" in str(e.value) and "RTX4090" in str(e.value)


def test_missing_model_and_tp_folder(llama):
    m = load_model_config(MODELS, "meta-llama/Llama-3.1-70B")
    with pytest.raises(JaxsimInputError, match="Llama-3.1-70B"):
        load_profile_bundle(PROFILES, "RTXPRO6000", m)
    m = llama
    with pytest.raises(JaxsimInputError) as e:
        load_profile_bundle(PROFILES, "RTX4090", m, tp=2)
    msg = str(e.value)
    assert "tp2" in msg and "never extrapolated" in msg and "[1]" in msg


def test_malformed_csv_line_names_file_and_line(tmp_path, llama):
    root, dst = _copy_bundle(tmp_path)
    path = dst / "tp1" / "dense.csv"
    lines = path.read_text().splitlines()
    lines[5] = "act_fn,6,not-a-number"
    path.write_text("\n".join(lines) + "\n")
    m = llama
    with pytest.raises(JaxsimInputError) as e:
        load_profile_bundle(root, "RTXPRO6000", m)
    assert f"{path}:6" in str(e.value) and "time_us" in str(e.value)


def test_attention_csv_wrong_field_count(tmp_path, llama):
    root, dst = _copy_bundle(tmp_path)
    path = dst / "tp1" / "attention.csv"
    with open(path, "a") as f:
        f.write("16,0,1\n")
    n = len(path.read_text().splitlines())
    with pytest.raises(JaxsimInputError) as e:
        load_profile_bundle(root, "RTXPRO6000", llama)
    assert f"{path}:{n}" in str(e.value)


def test_missing_column_and_missing_csv(tmp_path, llama):
    root, dst = _copy_bundle(tmp_path)
    m = llama
    path = dst / "tp1" / "per_sequence.csv"
    text = path.read_text()
    path.write_text(text.replace("layer,sequences,time_us", "layer,seqs,time_us", 1))
    with pytest.raises(JaxsimInputError) as e:
        load_profile_bundle(root, "RTXPRO6000", m)
    assert str(path) in str(e.value) and "sequences" in str(e.value)
    path.write_text(text)
    (dst / "tp1" / "attention.csv").unlink()
    with pytest.raises(JaxsimInputError, match="attention.csv"):
        load_profile_bundle(root, "RTXPRO6000", m)


def test_bad_skew_label(tmp_path, llama):
    root, dst = _copy_bundle(tmp_path)
    path = dst / "tp1" / "skew_fit.csv"
    lines = path.read_text().splitlines()
    lines[3] = lines[3].replace("n<=", "nn<=", 1)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(JaxsimInputError) as e:
        load_profile_bundle(root, "RTXPRO6000", llama)
    assert f"{path}:4" in str(e.value)


def test_missing_layer_is_an_error_naming_file_and_layer(tmp_path, llama):
    """A layer of the sequence without rows used to be skipped with one stderr line (deleting a
    layer's rows cut TPOT 13%): it is an error naming the CSV and the layer, like lm_head and an
    empty dense table."""
    root, dst = _copy_bundle(tmp_path)
    m = llama
    path = dst / "tp1" / "dense.csv"
    text = path.read_text()
    path.write_text("\n".join(x for x in text.splitlines() if not x.startswith("rotary_emb,")) + "\n")
    with pytest.raises(JaxsimInputError) as e:
        load_profile_bundle(root, "RTXPRO6000", m)
    assert e.value.where == str(path)
    assert e.value.problem == "no rows for layer 'rotary_emb' (sequence.pre_attn of architectures/llama.yaml)"
    path.write_text(text)
    ps = dst / "tp1" / "per_sequence.csv"
    ps.write_text("\n".join(x for x in ps.read_text().splitlines() if not x.startswith("lm_head,")) + "\n")
    with pytest.raises(JaxsimInputError, match=r"per_sequence.csv: no rows for layer 'lm_head'"):
        load_profile_bundle(root, "RTXPRO6000", m)
    path.write_text("layer,tokens,time_us\n")
    with pytest.raises(JaxsimInputError, match="dense"):
        load_profile_bundle(root, "RTXPRO6000", m)


def test_grid_point_profiled_twice_names_both_lines(tmp_path, llama):
    """One appended line `qkv_proj,1,100000` used to replace the profiled 35.8 µs (the last row won:
    the makespan went from 66 s to 605 s without a warning). A repeated point of any table is an
    error naming both lines."""
    root, dst = _copy_bundle(tmp_path)
    for name, extra, what in (("dense.csv", "qkv_proj,1,100000", "layer 'qkv_proj' at tokens = 1"),
                              ("attention.csv", "0,0,1,32,9.0", "the attention point (prefill_chunk 0, kv_prefill 0, "
                                                                "n_decode 1, kv_decode 32)"),
                              ("skew_fit.csv", None, "the skew bucket")):
        path = dst / "tp1" / name
        text = path.read_text()
        lines = text.splitlines()
        extra = extra or lines[1]  # the first data row again
        first = next(i for i, x in enumerate(lines, start=1) if x.rsplit(",", 1)[0] == extra.rsplit(",", 1)[0])
        n = len(lines) + 1
        path.write_text(text + extra + "\n")
        with pytest.raises(JaxsimInputError) as e:
            load_profile_bundle(root, "RTXPRO6000", llama)
        assert e.value.where == f"{path}:{n}", name
        assert e.value.problem.startswith(what) and f"profiled twice (lines {first} and {n})" in e.value.problem
        path.write_text(text)


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_non_finite_or_negative_time_names_the_line(tmp_path, llama, value):
    root, dst = _copy_bundle(tmp_path)
    path = dst / "tp1" / "dense.csv"
    lines = path.read_text().splitlines()
    lines[1092] = f"qkv_proj,64,{value}"  # line 1093
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(JaxsimInputError, match="negative time_us" if value == "-1" else "is not a finite number") as e:
        load_profile_bundle(root, "RTXPRO6000", llama)
    assert e.value.where == f"{path}:1093"


def test_rows_in_any_order_give_the_same_tables(tmp_path, llama):
    """The format does not require sorted rows: the loader sorts every axis."""
    root, dst = _copy_bundle(tmp_path)
    path = dst / "tp1" / "dense.csv"
    header, *rows = path.read_text().splitlines()
    path.write_text("\n".join([header] + rows[::-1]) + "\n")
    _, want, _, _ = _setup()
    got = load_profile_bundle(root, "RTXPRO6000", llama)
    for layer, tab in want.dense.items():
        np.testing.assert_array_equal(got.dense[layer].keys, tab.keys)
        np.testing.assert_array_equal(got.dense[layer].values_ns, tab.values_ns)


def test_outliers_are_counted_listed_and_reach_the_summary(tmp_path, llama):
    """A point far off its neighbours (grid_outliers: > 4x above or below both) is used as measured,
    listed on the bundle, warned about once, and counted in the run summary. The shipped bundles
    have none. Host-side: the summary comes from the prepared (not run) state."""
    from jaxsim import metrics, simulator
    from jaxsim.profiles import grid_outliers
    from jaxsim.spec import SchedulerConfig, Workload

    assert grid_outliers([1, 2, 3, 4], [10, 11, 100, 13]) == [(2, (11.0, 13.0))]
    assert grid_outliers([1, 2, 3, 4], [10, 11, 2, 13]) == [(2, (11.0, 13.0))]
    assert grid_outliers([1, 2, 4, 8], [1, 4, 16, 64]) == []  # steep but smooth (quadratic over a doubling grid)
    assert grid_outliers([1, 2, 3], [50, 11, 12]) == [(0, (11.0, 10.0))]  # an end: its neighbour, the extrapolation
    _, shipped, _, _ = _setup()
    assert shipped.outliers == []
    root, dst = _copy_bundle(tmp_path)
    path = dst / "tp1" / "dense.csv"
    lines = path.read_text().splitlines()
    lines[1092] = "qkv_proj,64,100000"  # line 1093; neighbours 35.808 (60 tokens) and 42.7097 (80)
    path.write_text("\n".join(lines) + "\n")
    att = dst / "tp1" / "attention.csv"  # an attention point 10x its kvd (and kp) neighbours: listed once
    lines = att.read_text().splitlines()
    assert lines[9234] == "128,512,4,1024,45.216"
    lines[9234] = "128,512,4,1024,452.16"
    att.write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match=r"2 profile point\(s\) more than 4x above or below their grid neighbours"):
        b = load_profile_bundle(root, "RTXPRO6000", llama)
    assert b.outliers == [f"{att}:9235 attention pc=128 kp=512 nd=4 kvd=1024 time_us=452.16 (neighbours 32.6613, "
                          "66.4103)", f"{path}:1093 qkv_proj tokens=64 time_us=100000 (neighbours 35.808, 42.7097)"]
    assert int(b.dense["qkv_proj"].values_ns[list(b.dense["qkv_proj"].keys).index(64)]) == 100_000_000  # as measured
    w = Workload(np.zeros(1, np.int64), np.array([100], np.int32), np.array([2], np.int32), [None], "one")
    with pytest.warns(UserWarning):
        p = simulator.prepare(w, llama, HardwareConfig(), SchedulerConfig(max_num_seqs=4), profiles_dir=root,
                              max_slots=8)
    assert p.profile_outliers == tuple(b.outliers)
    summary = metrics.summarize(simulator.to_result(p, p.state))  # the initial state: nothing ran
    assert summary["profile_outliers"] == {"count": 2, "first": b.outliers}


# ------------------------------------------------------------ MoE: EP collectives, expert skew, hybrid
def _moe_setup(tp=1, **hw_kw):
    return _setup(model=QWEN_MOE, tp=tp, **hw_kw)


def test_ep_dispatch_combine_hand_computed():
    """§1.8 EP collectives on Qwen3-30B-A3B (H = 2048, E = 128, L = 48, fp = 2), 16 GB/s, 20 us per
    step: dispatch = ring AllGather, (ep-1) steps of a max(1, T//ep)*(H+E)*fp chunk; combine = ring
    ReduceScatter, (ep-1) steps of T*H*fp/ep. Each floored, once per MoE block."""
    m, b, hw, rb = _moe_setup(link_bw_gbps=16.0, link_latency_ns=20000.0)
    assert (m.hidden_size, m.num_experts, m.num_layers, m.experts_per_token) == (2048, 128, 48, 8)
    no_link = dataclasses.replace(hw, link_bw_gbps=math.inf, link_latency_ns=0.0)
    H, E, fp, L = 2048, 128, 2, 48

    def ag(T, ep):
        return math.floor((ep - 1) * (20000.0 + max(1, T // ep) * (H + E) * fp / 16.0))

    def rs(T, ep):
        return math.floor((ep - 1) * (20000.0 + T * H * fp / ep / 16.0))

    # by hand: T = 100, ep = 2: AG 1 x (20000 + 50*2176*2/16) = 33,600; RS 1 x (20000 + 100*2048*2/2/16) = 32,800
    assert (ag(100, 2), rs(100, 2)) == (33_600, 32_800)
    # ep = 4: AG 3 x (20000 + 25*2176*2/16) = 80,400; RS 3 x (20000 + 100*2048*2/4/16) = 79,200
    assert (ag(100, 4), rs(100, 4)) == (80_400, 79_200)
    # T = 3 < ep = 4: the dispatch chunk is max(1, 3//4) = 1 token: 3 x (20000 + 4352/16) = 60,816;
    # RS 3 x (20000 + 3*2048*2/4/16) = 60,576
    assert (ag(3, 4), rs(3, 4)) == (60_816, 60_576)
    for ep in (2, 4):
        tb, tb0 = latency_tables(b, m, hw, ep=ep), latency_tables(b, m, no_link, ep=ep)
        for shape in [(100, 4, 96, 512, 4, 4 * 700, 700, 700), (3, 3, 0, 0, 3, 300, 100, 100),
                      (2048, 1, 2048, 0, 0, 0, 0, 0)]:
            T = shape[0]
            assert _time(tb, *shape)[0] - _time(tb0, *shape)[0] == L * (ag(T, ep) + rs(T, ep))
            assert _time(tb, *shape) == tuple(ref.iteration_time(rb, *shape, ep=ep))
    # with TP 2 and ep = tp (the default): the o_proj AllReduce plus the EP collectives
    m2, b2, hw2, _ = _moe_setup(tp=2, link_bw_gbps=16.0, link_latency_ns=20000.0)
    no_link2 = dataclasses.replace(hw2, link_bw_gbps=math.inf, link_latency_ns=0.0)
    shape = (100, 4, 96, 512, 4, 4 * 700, 700, 700)
    d = _time(latency_tables(b2, m2, hw2), *shape)[0] - _time(latency_tables(b2, m2, no_link2), *shape)[0]
    ar = math.floor(2 * 1 * (20000.0 + 100 * H * fp / 2 / 16.0))
    # AllReduce: 2 x (20000 + 100*2048*2/2/16) = 65,600
    assert d == L * (ar + ag(100, 2) + rs(100, 2)) == L * (65_600 + 33_600 + 32_800)
    # hw.ep overrides the default (ep = 1: no EP collectives, only the AllReduce)
    hw_ep1 = dataclasses.replace(hw2, ep=1)
    d1 = _time(latency_tables(b2, m2, hw_ep1), *shape)[0] - _time(
        latency_tables(b2, m2, dataclasses.replace(no_link2, ep=1)), *shape)[0]
    assert d1 == L * ar


def test_zipf_popularity():
    from jaxsim.latency import rank_popularity, zipf_popularity

    p = zipf_popularity(128, 1.0, seed=None)
    assert p.shape == (128,) and abs(p.sum() - 1) < 1e-12 and np.all(np.diff(p) < 0)
    assert p[0] / p[9] == pytest.approx(10.0)
    assert np.array_equal(zipf_popularity(128, 0.0), np.full(128, 1 / 128))
    q = zipf_popularity(128, 1.0, seed=3)
    assert np.array_equal(np.sort(q), np.sort(p)) and not np.array_equal(q, p)
    assert np.array_equal(zipf_popularity(128, 1.0, seed=3), q) and np.array_equal(zipf_popularity(128, 1.0, -1), p)
    # expert e on rank floor(e*ep/E): contiguous blocks (uneven when ep does not divide E)
    r = rank_popularity(np.arange(10) / 45.0, 4)
    assert [list(np.round(x * 45).astype(int)) for x in r] == [[0, 1, 2], [3, 4], [5, 6, 7], [8, 9]]


def test_uniform_popularity_is_balanced():
    """A uniform popularity gives bit-identical results to BALANCED (None), for every ep; the
    per-rank local-token formula T*(1-(1-P_r)^k) reduces to the closed form."""
    from jaxsim.latency import zipf_popularity

    m, b, hw, rb = _moe_setup(tp=2)
    shapes = _random_shapes(np.random.default_rng(5), 60)
    cols = [np.array(c, np.int64) for c in zip(*shapes)]
    for ep in (1, 2, 4):
        bal = [np.asarray(x) for x in _MANY(latency_tables(b, m, hw, ep=ep), *cols)]
        for pop in (np.full(128, 1 / 128), zipf_popularity(128, 0.0, seed=7)):
            tb = latency_tables(b, m, hw, ep=ep, expert_popularity=pop)
            assert not bool(tb.moe_skewed)
            got = [np.asarray(x) for x in _MANY(tb, *cols)]
            assert np.array_equal(got[0], bal[0]) and np.array_equal(got[1], bal[1])
        for T in range(0, 3000, 7):  # local tokens: P_r = 1/ep
            assert round(T * (1 - (1 - 1 / ep) ** 8)) == round(T * (1 - ((ep - 1) / ep) ** 8))
    # a nearly uniform popularity gives the closed form's counts: the cost is continuous at s = 0
    assert ref.moe_routing(16, 8, 128, 1) == [(16, 128)]
    skew_uniformish = [1 / 128 * (1 + 1e-6)] + [(1 - 1 / 128 * (1 + 1e-6)) / 127] * 127
    assert ref.moe_routing(16, 8, 128, 1, skew_uniformish) == [(16, 128)]
    assert ref.moe_routing(100, 8, 128, 4, skew_uniformish) == ref.moe_routing(100, 8, 128, 4)


@pytest.mark.parametrize("ep", [2, 4])
def test_skewed_popularity_moe_term(ep):
    """Zipf(1.2) popularity, hottest experts on rank 0: the MoE block term is max_r moe(local_r,
    act_r) (the oracle's plain-Python per-rank routing and moe.csv lookup), larger than BALANCED
    for prefill-sized batches; whole iterations match the oracle."""
    from jaxsim.latency import zipf_popularity

    m, b, hw, rb = _moe_setup()
    pop = zipf_popularity(128, 1.2, seed=-1)
    tb_bal = latency_tables(b, m, hw, ep=ep)
    tb = latency_tables(b, m, hw, ep=ep, expert_popularity=pop)
    assert bool(tb.moe_skewed) and tb.moe_pop.shape == (ep, 128 // ep)
    L, k = m.num_layers, m.experts_per_token
    for T in (256, 1024, 2048):
        shape = (T, 1, T, 0, 0, 0, 0, 0)
        d = _time(tb, *shape)[0] - _time(tb_bal, *shape)[0]
        # by hand, rank by rank (expert e on rank e*ep//E)
        per_rank = []
        for r in range(ep):
            pr = [float(pop[e]) for e in range(128) if e * ep // 128 == r]
            local = round(T * (1 - (1 - sum(pr)) ** k))
            act = min(max(round(sum(min(1.0, T * k * p) for p in pr)), 1), len(pr))
            per_rank.append(ref.moe_lookup(rb, local, act)[0])
        skew_term = max(per_rank)
        bal_term = ref.moe_lookup(rb, round(T * (1 - ((ep - 1) / ep) ** k)), min(round(T * k / ep), 128 / ep))[0]
        assert skew_term == ref.moe_compute(rb, T, ep, list(pop))[0]
        assert skew_term > bal_term
        assert d == L * (skew_term - bal_term)
    # parity on mixed batches (including decode-only ones, where skew may lower the term)
    shapes = _random_shapes(np.random.default_rng(11 + ep), 80)
    cols = [np.array(c, np.int64) for c in zip(*shapes)]
    t_jax, e_jax = (np.asarray(x) for x in _MANY(tb, *cols))
    for i, s in enumerate(shapes):
        assert (int(t_jax[i]), list(e_jax[i])) == ref.iteration_time(rb, *s, ep=ep, popularity=list(pop)), s


def test_skewed_and_balanced_tables_stack():
    """Tables with different EP rank counts (balanced: 1 row; skewed: ep rows) pad and vmap."""
    from jaxsim.latency import zipf_popularity

    m, b, hw, _ = _moe_setup()
    ml, bl, hwl, _ = _setup()
    tabs = [latency_tables(b, m, hw, ep=2), latency_tables(b, m, hw, ep=4, expert_popularity=zipf_popularity(128, 1.0)),
            latency_tables(bl, ml, hwl), latency_tables(b, m, hw, ep=2, expert_popularity=zipf_popularity(128, 2.0, 1))]
    stacked = stack_tables(tabs)
    assert stacked.moe_pop.shape == (4, 4, 64)
    for shape in [(2048, 1, 2048, 0, 0, 0, 0, 0), (96, 90, 6, 700, 90, 90 * 3000, 100, 9000), (1, 1, 0, 0, 1, 7, 7, 7)]:
        t, e = _CONFIGS(stacked, *shape)
        for i, tb in enumerate(tabs):
            assert (int(t[i]), [int(x) for x in e[i]]) == _time(tb, *shape)


def test_bad_ep_and_popularity():
    m, b, hw, _ = _moe_setup()
    with pytest.raises(JaxsimInputError, match="hardware.ep"):
        latency_tables(b, m, hw, ep=129)
    with pytest.raises(JaxsimInputError, match="one entry per expert"):
        latency_tables(b, m, hw, ep=2, expert_popularity=np.full(64, 1 / 64))
    with pytest.raises(JaxsimInputError, match="sum to 1"):
        latency_tables(b, m, hw, ep=2, expert_popularity=np.full(128, 1 / 100))
    with pytest.raises(JaxsimInputError, match=">= 0"):
        latency_tables(b, m, hw, ep=2, expert_popularity=np.r_[-0.5, np.full(127, 1.5 / 127)])
    # dense models ignore ep and the popularity
    ml, bl, hwl, _ = _setup()
    assert int(latency_tables(bl, ml, hwl, ep=8, expert_popularity=np.ones(3)).ep) == 1


@pytest.mark.parametrize("edit, message", [
    ({"num_key_value_heads": 0}, r"num_key_value_heads: must be a whole number >= 1, got 0"),
    ({"num_key_value_heads": 3}, r"num_key_value_heads: 3 does not divide num_attention_heads \(32\)"),
    ({"intermediate_size": None}, r"intermediate_size: missing"),
    ({"hidden_size": "abc"}, r"hidden_size: must be a whole number >= 1, got 'abc'"),
    ({"num_hidden_layers": 2.5}, r"num_hidden_layers: must be a whole number >= 1, got 2.5"),
    ({"vocab_size": -1}, r"vocab_size: must be a whole number >= 1"),
])
def test_bad_model_configs_name_the_field(tmp_path, edit, message):
    """Fields that used to be read loosely (0 KV heads as multi-head attention, a missing MLP width
    as 0, a string as a traceback) are errors naming the file and field."""
    import json

    raw = {**json.loads((MODELS / f"{LLAMA}.json").read_text()), **edit}
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "m.json").write_text(json.dumps({k: v for k, v in raw.items() if v is not None}))
    with pytest.raises(JaxsimInputError, match=message):
        load_model_config(tmp_path, "x/m")


def test_hybrid_moe_layers(tmp_path):
    """mlp_only_layers / decoder_sparse_step (§1.9): the shipped MoE models have none; a hybrid
    model needs dense MLP tables (clear error otherwise) and composes L_moe*MoE + L_dense*dense MLP."""
    import json

    for name in ("Qwen/Qwen3-30B-A3B-Instruct-2507", "mistralai/Mixtral-8x7B-v0.1", "microsoft/Phi-mini-MoE-instruct"):
        mc = load_model_config(MODELS, name)
        assert mc.is_moe and mc.n_moe_layers == mc.num_layers and mc.n_dense_mlp_layers == 0
    assert load_model_config(MODELS, LLAMA).n_dense_mlp_layers == 32
    # parsing: every 2nd layer sparse, layers 1 and 5 forced dense
    raw = json.loads((MODELS / f"{QWEN_MOE}.json").read_text())
    (tmp_path / "Qwen").mkdir()
    (tmp_path / "Qwen" / "hyb.json").write_text(json.dumps({**raw, "decoder_sparse_step": 2, "mlp_only_layers": [1, 5]}))
    hyb = load_model_config(tmp_path, "Qwen/hyb")
    assert (hyb.decoder_sparse_step, hyb.mlp_only_layers, hyb.n_moe_layers, hyb.n_dense_mlp_layers) == (2, (1, 5), 22, 26)
    for bad in ({"decoder_sparse_step": 0}, {"mlp_only_layers": [48]}, {"mlp_only_layers": "0"}):
        (tmp_path / "Qwen" / "bad.json").write_text(json.dumps({**raw, **bad}))
        with pytest.raises(JaxsimInputError, match=next(iter(bad))):
            load_model_config(tmp_path, "Qwen/bad")

    # the shipped bundle has no dense MLP rows for Qwen3-30B-A3B: a clear error
    m, b, hw, _ = _moe_setup()
    with pytest.raises(JaxsimInputError, match="dense MLP") as e:
        latency_tables(b, dataclasses.replace(m, mlp_only_layers=(0, 47)), hw)
    assert "mlp_only_layers=[0, 47]" in str(e.value)

    # a bundle whose architecture has both MLP kinds (dense MLP rows borrowed from Qwen3-32B)
    root, dst = _copy_bundle(tmp_path, QWEN_MOE)
    arch = (root / "architectures" / "qwen3_moe.yaml").read_text()
    arch = arch.replace("mlp_dense: []", "mlp_dense: [gate_up_proj, act_fn, down_proj]").replace(
        "  per_sequence:\n", "    gate_up_proj: {}\n    act_fn: {}\n    down_proj: {}\n  per_sequence:\n")
    (root / "architectures" / "qwen3_moe_hybrid.yaml").write_text(arch)
    mlp_rows = [x for x in (PROFILES / "RTXPRO6000" / "Qwen/Qwen3-32B/bf16/tp1/dense.csv").read_text().splitlines()
                if x.split(",")[0] in ("gate_up_proj", "act_fn", "down_proj")]
    with open(dst / "tp1" / "dense.csv", "a") as f:
        f.write("\n".join(mlp_rows) + "\n")
    hm = dataclasses.replace(hyb, name=QWEN_MOE, model_type="qwen3_moe_hybrid")
    hb = load_profile_bundle(root, "RTXPRO6000", hm)
    hrb = ref.RefBundle(root, "RTXPRO6000", hm, 1)
    pop = list(np.linspace(1, 3, 128) / np.linspace(1, 3, 128).sum())
    for ep, p in ((1, None), (2, None), (2, pop)):
        tb = latency_tables(hb, hm, hw, ep=ep, expert_popularity=None if p is None else np.array(p))
        # AllReduces after every o_proj and after the dense MLPs' down_proj (free at tp = 1)
        assert int(tb.moe_blocks) == 22 and int(tb.ar_count) == 48 + 26
        for shape in [(2048, 1, 2048, 0, 0, 0, 0, 0), (64, 64, 0, 0, 64, 64 * 900, 500, 1500), (1, 1, 0, 0, 1, 5, 5, 5)]:
            assert _time(tb, *shape) == tuple(ref.iteration_time(hrb, *shape, ep=ep, popularity=p))
    # the composition by hand: 26 dense MLPs replace 26 MoE blocks of the all-MoE model
    tb_h = latency_tables(hb, hm, hw, ep=1)
    tb_all = latency_tables(hb, dataclasses.replace(hm, decoder_sparse_step=1, mlp_only_layers=()), hw, ep=1)
    T = 512
    shape = (T, 1, T, 0, 0, 0, 0, 0)
    dense_mlp = sum(ref.trunc(ref.lookup_1d(hrb.dense[n], T)[0]) for n in ("gate_up_proj", "act_fn", "down_proj"))
    moe = ref.moe_lookup(hrb, T, min(T * 8, 128))[0]
    assert _time(tb_h, *shape)[0] - _time(tb_all, *shape)[0] == 26 * (dense_mlp - moe)


def test_simulator_tables_plumbing():
    """simulator._tables passes hardware.ep and the model's expert routing to latency_tables."""
    from jaxsim import simulator
    from jaxsim.spec import ModelRuntimeConfig

    m, _, hw, _ = _moe_setup(tp=2)
    rt = ModelRuntimeConfig(name=QWEN_MOE)
    tb = simulator.latency_tables(str(PROFILES), hw, m, "bf16", 2, rt)
    assert int(tb.ep) == 2 and not bool(tb.moe_skewed)
    tb = simulator.latency_tables(str(PROFILES), dataclasses.replace(hw, ep=1), m, "bf16", 2,
                           dataclasses.replace(rt, expert_routing="zipf", expert_zipf_s=1.0, expert_seed=0))
    assert int(tb.ep) == 1 and bool(tb.moe_skewed) and tb.moe_pop.shape == (1, 128)
    with pytest.raises(JaxsimInputError, match="model.expert_routing"):
        simulator.latency_tables(str(PROFILES), hw, m, "bf16", 2, dataclasses.replace(rt, expert_routing="rr"))


def test_config_validates_ep_and_expert_routing():
    from jaxsim import config as config_lib

    hw = dict(name="RTXPRO6000", mem_size_gb=96, mem_util=0.9,
              num_gpu_blocks=None, activation_reserve_gb=0.0, tp=2, link_bw_gbps=16, link_latency_ns=20000,
              cpu_mem_bw_gbps=256, cpu_mem_latency_ns=0)
    assert config_lib._hardware(hw, PROFILES).ep == 0
    assert config_lib._hardware({**hw, "ep": 2}, PROFILES).ep == 2
    for bad, msg in ((-1, ">= 0"), (4, "exceeds tp"), (1.5, "integer")):
        with pytest.raises(JaxsimInputError, match=r"hardware\.ep") as e:
            config_lib._hardware({**hw, "ep": bad}, PROFILES)
        assert msg in str(e.value)
    md = dict(name=QWEN_MOE, dtype="auto", kv_cache_dtype="auto", max_model_len=0)
    rt, _ = config_lib._model({**md, "expert_routing": "zipf", "expert_zipf_s": 0.8, "expert_seed": -1}, MODELS)
    assert (rt.expert_routing, rt.expert_zipf_s, rt.expert_seed) == ("zipf", 0.8, -1)
    assert config_lib._model(md, MODELS)[0].expert_routing == "balanced"
    for key, bad in (("expert_routing", "rr"), ("expert_zipf_s", -1.0), ("expert_seed", -2), ("expert_zipf_s", "x")):
        with pytest.raises(JaxsimInputError, match=rf"model\.{key}"):
            config_lib._model({**md, key: bad}, MODELS)
    with pytest.raises(JaxsimInputError, match=r"model\.expert_routing.*no experts"):
        config_lib._model({**md, "name": LLAMA, "expert_routing": "zipf"}, MODELS)
