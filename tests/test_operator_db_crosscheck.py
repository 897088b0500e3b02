"""The converted RTX PRO 6000 bundle against the native one (scripts/crosscheck_operator_db.py,
tests/data/opdb_crosscheck.json): the script's numpy lookups by hand, the shipped figures'
internal consistency for both constant sets (joint, RTX PRO 6000 left out), and (slow) the
figures recomputed."""

import importlib.util
import json
import math

import numpy as np
import pytest

import jaxsim  # noqa: F401  (enables x64)
from jaxsim.profiles import MoETable

from _shared import LLAMA, ROOT, load_model

DATA = ROOT / "tests" / "data" / "opdb_crosscheck.json"


@pytest.fixture(scope="module")
def xc():
    spec = importlib.util.spec_from_file_location("crosscheck_operator_db", ROOT / "scripts" / "crosscheck_operator_db.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def res():
    return json.loads(DATA.read_text())


def test_lookup_1d_by_hand(xc):
    # keys 1, 2, 4 -> 10, 20, 40 ns: clamp below, linear between, linear from the last two above
    got = xc.lookup_1d([1, 2, 4], [10, 20, 40], [0, 1, 3, 4, 6])
    assert got.tolist() == [10, 10, 30, 40, 60]
    assert xc.lookup_1d([1, 2], [10, 11], [1.5]).tolist() == [10]  # 10.5 truncated, as the engine does


def test_moe_lookup_by_hand(xc):
    # rows ae=8 (tokens 1, 2 -> 100, 200) and ae=16 (tokens 2, 4 -> 300, 500)
    mo = MoETable(ae_axis=np.array([8, 16]), n_tokens=np.array([2, 2], np.int32),
                  token_keys=np.array([[1, 2], [2, 4]]), values_ns=np.array([[100, 200], [300, 500]]))
    # (2, 8): row 8 at 2 = 200; (2, 12): halfway between 200 and row 16 at 2 (300) = 250;
    # (3, 16): row 16 at 3 = 400; (1, 16): row 16 clamped at its first key = 300;
    # (3, 32): above the ae axis, t = (32 - 8) / (16 - 8) = 3 from row 8 at 3 (extrapolated: 300)
    # to row 16 at 3 (400): 300 + 3 * 100 = 600
    got = xc.moe_lookup(mo, np.array([2, 2, 3, 1, 3]), np.array([8, 12, 16, 16, 32]))
    assert got.tolist() == [200, 250, 400, 300, 600]


def test_balanced_path_by_hand(xc):
    m = load_model("Qwen/Qwen3-30B-A3B-Instruct-2507")  # k = 8 of E = 128
    p1 = xc.balanced_path(m, 1, max_tokens=64)
    assert {(1, 8), (2, 16), (8, 64), (16, 128), (64, 128)} <= p1 and (1, 16) not in p1
    # EP 2: one rank gets round(T * (1 - (1/2)^8)) tokens on min(round(T*8/2), 64) experts
    p2 = xc.balanced_path(m, 2, max_tokens=64)
    assert (1, 4) in p2 and (2, 8) in p2 and (64, 64) in p2 and (16, 64) in p2


def _stats(d):
    """Every error-stats dict in the report (those with n, p50, p90, max, signed_median)."""
    if isinstance(d, dict):
        if {"n", "p50", "p90", "max", "signed_median"} <= d.keys():
            yield d
        for v in d.values():
            yield from _stats(v)
    elif isinstance(d, list):
        for v in d:
            yield from _stats(v)


def _blocks(res):
    """``(converted hardware, block)`` of each constant set: the top level (joint), leave_out_RTXPRO6000."""
    return [("rtxpro6000_opdb", res), ("rtxpro6000_opdb_loo", res["leave_out_RTXPRO6000"])]


@pytest.mark.parametrize("which", [0, 1], ids=["joint", "leave_out"])
def test_figures_are_consistent(res, which):
    hw, res = _blocks(res)[which]
    assert res["converted"] == hw
    stats = list(_stats({k: v for k, v in res.items() if k != "leave_out_RTXPRO6000"}))
    assert len(stats) > 100
    for s in stats:
        assert s["n"] > 0 and all(math.isfinite(s[k]) for k in ("p50", "p90", "max", "signed_median"))
        assert 0 <= s["p50"] <= s["p90"] <= s["max"] and abs(s["signed_median"]) <= s["max"]
    # pooled counts are the per-bundle counts added up; every model and TP degree was compared
    tables = res["tables"]
    assert {m: sorted(v) for m, v in tables.items()} == {
        LLAMA: ["tp1", "tp2"], "Qwen/Qwen3-32B": ["tp1", "tp2"], "Qwen/Qwen3-30B-A3B-Instruct-2507": ["tp1", "tp2"]}
    for kind, s in res["pooled"].items():
        assert s["n"] == sum((tp["kinds"][kind] or {"n": 0})["n"] for m in tables.values() for tp in m.values()), kind
    for m in tables.values():
        for tp in m.values():
            k = tp["kinds"]
            assert k["attention_prefill"]["n"] + k["attention_decode"]["n"] + k["attention_mixed"]["n"] \
                == tp["attention"]["points"]
            assert k["gemm"]["n"] + k["memory"]["n"] == sum(layer["n"] for layer in tp["layers"].values())
    # whole iterations: the rebuilt shapes reproduced the native run exactly, and split into parts
    it = res["iterations"]
    assert it["native_reproduces_busy_ns"] == it["iterations"] == it["all"]["n"] > 1000
    assert it["with_prefill"]["n"] + it["decode_only"]["n"] == it["iterations"]
    assert sum(s["n"] for s in it["by_tokens"].values()) == it["iterations"]
    # the 15 statistics: Diff% is sim/real - 1 and both runs are scored against the same measurement
    v = res["validation"]
    for side in ("native", "converted"):
        st = v[side]["stats"]
        assert len(st) == 15
        for name, s in st.items():
            assert s["real"] == v["native"]["stats"][name]["real"] > 0
            assert s["diff_pct"] == pytest.approx(100 * (s["sim"] / s["real"] - 1), rel=1e-9, abs=1e-9)
        assert v[side]["mean_abs_diff_pct"] == pytest.approx(np.mean([abs(s["diff_pct"]) for s in st.values()]))


def test_constant_sets_are_the_fitted_ones(res):
    """Each block names the constants it used, and they are fit.json's; what uses no fitted constant
    (GEMMs, decode attention, MoE, the native run) is the same in both, what does differs."""
    fit = json.loads((ROOT / "profiles" / "operator-db" / "fit.json").read_text())
    joint, lo = res["constants"], res["leave_out_RTXPRO6000"]["constants"]
    assert joint["constant_set"] == "joint" and sorted(joint["fitted_on"]) == ["RTX4090", "RTXPRO6000"]
    assert lo["constant_set"] == "leave_out RTXPRO6000" and lo["fitted_on"] == ["RTX4090"]
    for c, src in ((joint, fit), (lo, fit["leave_out"]["RTXPRO6000"])):
        assert c["bandwidth"] == src["bandwidth"]["classes"]
        assert c["prefill_latency_gamma_us_per_key"] == src["attention"]["prefill_latency"]["gamma_us_per_key"]
        assert c["mixed"] == {k: src["attention"]["mixed"][k] for k in ("gamma_us_per_key", "beta", "c0_us")}
    other = res["leave_out_RTXPRO6000"]
    for m, per_tp in res["tables"].items():
        for tp, d in per_tp.items():
            e = other["tables"][m][tp]["kinds"]
            for kind in ("gemm", "attention_decode", "moe", "moe_balanced_path"):
                assert d["kinds"][kind] == e[kind], (m, tp, kind)
            for kind in ("memory", "attention_prefill", "attention_mixed"):
                assert d["kinds"][kind] != e[kind], (m, tp, kind)
    assert other["validation"]["native"] == res["validation"]["native"]
    assert other["iterations"]["iterations"] == res["iterations"]["iterations"]


@pytest.mark.slow
def test_figures_recomputed(xc, res):
    """Parts 1 (Llama-3.1-8B) and 2 recomputed equal the shipped JSON (deterministic) for both
    constant sets, and so do their constants; the rebuilt batch shapes reproduce every iteration
    of the native run exactly."""
    native = xc.evaluate_case(xc.CASE)
    for hw, block in _blocks(res):
        assert xc.constants_used(hw) == block["constants"], hw
        tables = xc.compare_tables(models=(LLAMA,), converted=hw)
        for tp, d in tables[LLAMA].items():
            for kind, s in d["kinds"].items():
                assert s == block["tables"][LLAMA][tp]["kinds"][kind], (hw, tp, kind)
        it = xc.compare_iterations(native, converted=hw)
        assert it["native_reproduces_busy_ns"] == it["iterations"]
        for key in ("all", "with_prefill", "decode_only", "busy_time_ratio"):
            assert it[key] == block["iterations"][key], (hw, key)
