"""Bundles converted from the operator databases (jaxsim/operator_db.py, profiles/operator-db/):
values hand-checked against the shipped CSV rows, the interpolation and bandwidth formulas by hand,
the prefill + decode attention sum, the MoE mapping, errors, the config path and one simulation."""

import dataclasses
import gzip
import json
import math
import warnings

import jax
import numpy as np
import pytest

import jaxsim  # noqa: F401  (enables x64)
from jaxsim import config as config_lib
from jaxsim import operator_db as odb
from jaxsim import planning, simulator
from jaxsim.errors import JaxsimInputError
from jaxsim.latency import iteration_time, latency_tables
from jaxsim.profiles import known_hardware, load_profile_bundle
from jaxsim.spec import Calibration, HardwareConfig, SchedulerConfig, Workload

from _shared import LLAMA, PROFILES, load_model

QWEN_MOE = "Qwen/Qwen3-30B-A3B-Instruct-2507"
H100 = PROFILES / "operator-db" / "h100_sxm"
_ONE = jax.jit(iteration_time)


def _bundle(hw, name, tp=1, variant="bf16"):
    m = load_model(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return m, load_profile_bundle(PROFILES, hw, m, variant=variant, tp=tp)


def _row(name: str, prefix: str) -> float:
    """time_us of the one row of ``<h100>/<name>`` that starts with ``prefix``."""
    with gzip.open(H100 / name, "rt") as f:
        rows = [r for r in f if r.startswith(prefix)]
    assert len(rows) == 1, (name, prefix, rows)
    return float(rows[0].rstrip().split(",")[-1])


def _at(tab, key) -> int:
    return int(tab.values_ns[list(tab.keys).index(key)])


def _cell(at, pc, kp, nd, kvd) -> int:
    i, j = list(at.pc_axis).index(pc), list(at.nd_axis).index(nd)
    r = list(at.kp_keys[i, j, : at.n_kp[i, j]]).index(kp)
    q = list(at.kvd_keys[i, j, r, : at.n_kvd[i, j, r]]).index(kvd)
    return int(at.values_ns[i, j, r, q])


def test_gemm_layer_on_a_grid_point_is_the_table_value():
    """Llama-3.1-8B TP 1 qkv_proj is (n, k) = (4096 + 2*1024, 4096) = (6144, 4096), a grid point:
    gemm.csv.gz line 322 ``bfloat16,1,6144,4096,21.1653`` and line 10465 ``bfloat16,64,...,21.0258``."""
    _, b = _bundle("h100", LLAMA)
    assert _at(b.dense["qkv_proj"], 1) == 21165 and _row("gemm.csv.gz", "bfloat16,1,6144,4096,") == 21.1653
    assert _at(b.dense["qkv_proj"], 64) == 21026
    # TP 2: n = 3072 (grid point), k = 4096
    _, b2 = _bundle("h100", LLAMA, tp=2)
    assert _at(b2.dense["qkv_proj"], 64) == round(1000 * _row("gemm.csv.gz", "bfloat16,64,3072,4096,"))


def test_gemm_between_grid_points_is_log_bilinear_and_between_neighbours():
    """gate_up_proj (n, k) = (2*14336, 4096): n = 28672 lies between grid points 16384 and 51200."""
    _, b = _bundle("h100", LLAMA)
    lo, hi = _row("gemm.csv.gz", "bfloat16,64,16384,4096,"), _row("gemm.csv.gz", "bfloat16,64,51200,4096,")
    assert (lo, hi) == (60.2302, 181.512)
    w = math.log(28672 / 16384) / math.log(51200 / 16384)  # 0.4912
    hand = lo * (hi / lo) ** w  # 103.54 us
    assert abs(_at(b.dense["gate_up_proj"], 64) - hand * 1000) <= 1 and lo * 1000 < hand * 1000 < hi * 1000
    grid = odb.GemmGrid(str(H100 / "gemm.csv.gz"), "bfloat16")
    n_lo, n_hi = list(grid.n).index(16384), list(grid.n).index(51200)
    k = list(grid.k).index(4096)
    us = b.dense["gate_up_proj"].values_ns / 1000
    assert np.all(us >= grid.us[:, n_lo, k] - 1e-3) and np.all(us <= grid.us[:, n_hi, k] + 1e-3)
    # above the grid (lm_head at TP 1, n = 128256 > 65536): linear in n from the last grid point
    top = _row("gemm.csv.gz", "bfloat16,1,65536,4096,")
    assert abs(_at(b.per_sequence["lm_head"], 1) - top * 128256 / 65536 * 1000) <= 1


def test_bandwidth_model_by_hand():
    """layernorm at 64 tokens on H100: 4 rows of H read/written at 2 bytes + the weight vector."""
    _, b = _bundle("h100", LLAMA)
    fit = json.loads((PROFILES / "operator-db" / "fit.json").read_text())["bandwidth"]
    c = fit["classes"][fit["operator_class"]["layernorm"]]
    nbytes = 4 * 4096 * 2 * 64 + 4096 * 2  # 2,105,344
    hand_us = c["t0_us"] + nbytes / (c["eff"] * 3.35e12) * 1e6  # mem_bw of spec.yaml: 3350 GB/s
    assert _at(b.dense["layernorm"], 64) == round(hand_us * 1000)
    assert 0 < c["t0_us"] < 20 and c["eff"] > 0.5  # a physical fit (t0 a few µs)


def test_attention_cells_prefill_decode_and_mixed_by_hand():
    """(pc 512, kp 0, nd 4, kvd 1024), Llama-3.1-8B TP 1 heads 32/8 (G = 4), head_dim 128: prefill
    = context batch 1, isl 512; decode = generation batch 4 at context 1 + 1023; the mixed cell
    combines them by fit.json's attention.mixed (one varlen call, decodes as query tiles per head)."""
    _, b = _bundle("h100", LLAMA)
    pre = _row("context_attention.csv.gz", "bfloat16,1,512,32,8,128,")
    dec = _row("generation_attention.csv.gz", "bfloat16,4,1,32,8,128,1023,")
    assert (pre, dec) == (17.296, 14.0693)
    assert _cell(b.attention, 512, 0, 0, 0) == 17296 and _cell(b.attention, 0, 0, 4, 1024) == 14069
    c = json.loads((PROFILES / "operator-db" / "fit.json").read_text())["attention"]
    m = c["mixed"]
    hand = max(max(17.296, m["gamma_us_per_key"] * 1024) + (1 + m["beta"] * 3) * 14.069 - m["c0_us"], 17.296, 14.069)
    assert _cell(b.attention, 512, 0, 4, 1024) == round(hand * 1000)
    assert _cell(b.attention, 512, 0, 4, 1024) > 17296 + 14069 - 1000 * m["c0_us"]  # not less than the sum minus a launch
    # a history: at least the chunk alone plus its history's keys streamed (gamma per key), at least
    # the causal length with the same FLOPs (L = sqrt(16^2 + 2*16*504) = 128), at least a batch-1 decode
    gamma = c["prefill_latency"]["gamma_us_per_key"]
    parts = odb.attention_parts(H100, "h100", load_model(LLAMA), 1, "bfloat16")
    ctx16, ctx128 = _row("context_attention.csv.gz", "bfloat16,1,16,32,8,128,"), \
        _row("context_attention.csv.gz", "bfloat16,1,128,32,8,128,")
    assert parts[0](16, 504) == pytest.approx(max(ctx128, ctx16 + gamma * 504, parts[1](1, 520)), rel=1e-12)
    assert parts[0](16, 504) == pytest.approx(ctx16 + gamma * 504, rel=1e-12)  # the streaming path binds here
    assert _cell(b.attention, 16, 0, 0, 0) < _cell(b.attention, 16, 512, 0, 0)
    # TP 2 looks up the per-rank heads 16/8 -> 16/4
    _, b2 = _bundle("h100", LLAMA, tp=2)
    assert _cell(b2.attention, 512, 0, 0, 0) == round(1000 * _row("context_attention.csv.gz", "bfloat16,1,512,16,4,128,"))


def test_moe_table_and_bundles_load():
    """Qwen3-30B-A3B TP 1 (ep 1): T = 16 tokens activate min(16*8, 128) = 128 experts; the row is the
    MoE table's (moe line 594, 413.696 us) plus the router GEMM (16, 128, 2048) (5.07111 us)."""
    m, b = _bundle("h100", QWEN_MOE)
    assert _row("moe.csv.gz", "bfloat16,16,2048,768,8,128,1,1,") == 413.696
    assert _row("gemm.csv.gz", "bfloat16,16,128,2048,") == 5.07111
    a = list(b.moe.ae_axis).index(128)
    # the saturated row starts at T = 16, extended (constant) down to the previous row's T = 8
    assert list(b.moe.token_keys[a, : b.moe.n_tokens[a]])[:3] == [8, 16, 32]
    assert int(b.moe.values_ns[a, 0]) == int(b.moe.values_ns[a, 1]) == 418767
    # T = 3 activates 24 experts: the lookup blends the rows of T = 2 (16 experts) and 4 (32), each
    # extended to T = 3's neighbours, i.e. linear in T between the two table rows
    i16, i32 = list(b.moe.ae_axis).index(16), list(b.moe.ae_axis).index(32)
    assert list(b.moe.token_keys[i16, : b.moe.n_tokens[i16]]) == [1, 2, 4]
    assert len(set(b.moe.values_ns[i16, :3].tolist())) == 1 and list(b.moe.token_keys[i32, :3]) == [2, 4, 8]
    assert list(b.moe.ae_axis) == [8, 16, 32, 64, 128]  # T = 1, 2, 4, 8 then saturated
    assert "qk_norm" in b.dense and b.skew.enabled is False and b.meta["conversion"]["moe"]["ep_assumed"] == 1
    assert b.meta["conversion"]["moe"]["path"] == "table"  # the table holds the shape: no fallback
    _, b2 = _bundle("h100", QWEN_MOE, tp=2)  # ep 2: experts per rank 64, T = 1 -> 4 activated
    assert b2.moe.ae_axis[0] == 4 and b2.moe.ae_axis[-1] == 64
    assert {"h100", "h200", "b200", "gb200", "rtxpro6000_opdb"} <= set(known_hardware(PROFILES))


def test_outliers_are_dropped_and_listed():
    """rtx_pro_6000_server's generation row at batch 1, context 4096 (185.9 us between 14.8 and 28.9 us
    at 2048 and 8192) is a grid outlier: dropped, listed in meta, and the decode there is the log-log
    interpolation of its neighbours."""
    odb._load.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is used as measured: no outlier warning
        b = odb.load_converted_bundle(PROFILES, "rtxpro6000_opdb", load_model(LLAMA))
    dropped = b.meta["conversion"]["dropped_outliers"]
    assert b.outliers == [] and len(dropped) == 1 and "generation_attention.csv.gz:711" in dropped[0]
    assert "context=4096 time_us=185.867" in dropped[0]
    hand = math.exp((math.log(14.8267) + math.log(28.9387)) / 2)  # 4096 midway between 2048 and 8192 in log
    assert _cell(b.attention, 0, 0, 1, 4096) == round(hand * 1000)


def test_leave_out_constant_set():
    """``rtxpro6000_opdb_loo``: the converted RTX PRO 6000 with the constants fitted on the RTX 4090
    alone (fit.json leave_out.RTXPRO6000, the same fits as the leave-one-out scores next to the
    joint set); GEMMs unchanged, the memory-bound layers, prefill latency path and mixed cells by
    hand from that set."""
    from jaxsim.profiles import bundle_source, us_to_ns

    fit = odb.load_fit(PROFILES)
    lo = fit["leave_out"]["RTXPRO6000"]
    assert lo["fitted_on"] == ["RTX4090"]
    # the same refit that fit.json scores as "fit RTX4090 -> score RTXPRO6000", rounded alike
    for cls, v in fit["bandwidth"]["leave_one_hardware_out"].items():
        ref = v["fit RTX4090 -> score RTXPRO6000"]
        assert lo["bandwidth"]["classes"][cls] == {"t0_us": round(ref["t0_us"], 6), "eff": round(ref["eff"], 6)}, cls
    assert "qk_norm" not in fit["bandwidth"]["leave_one_hardware_out"]  # never measured on the RTX 4090:
    assert lo["bandwidth"]["classes"]["qk_norm"] == lo["bandwidth"]["classes"]["layernorm"]  # borrowed
    assert set(lo["bandwidth"]["borrowed"]) == {"qk_norm"}
    ref = fit["attention"]["leave_one_gpu_out"]["fit RTX4090 -> score RTXPRO6000"]
    assert lo["attention"]["prefill_latency"]["gamma_us_per_key"] == round(ref["prefill_latency"]["gamma_us_per_key"], 6)
    assert lo["attention"]["mixed"] == {"gamma_us_per_key": round(ref["mixed"]["gamma_us_per_key"], 6),
                                        "beta": round(ref["mixed"]["beta"], 6), "c0_us": round(ref["mixed"]["c0_us"], 4)}
    assert odb.fit_constants(fit)["bandwidth"] == fit["bandwidth"]
    with pytest.raises(JaxsimInputError, match=r"no constants fitted with A6000 left out \(leave_out.A6000\)"):
        odb.fit_constants(fit, "A6000")
    # a cross-check name: priced as operator-db, not advertised
    assert bundle_source("rtxpro6000_opdb_loo") == "operator-db"
    assert "rtxpro6000_opdb_loo" not in known_hardware(PROFILES)

    m, j = _bundle("rtxpro6000_opdb", LLAMA)
    _, b = _bundle("rtxpro6000_opdb_loo", LLAMA)
    assert (j.meta["constant_set"], b.meta["constant_set"]) == ("joint", "leave_out RTXPRO6000")
    assert np.array_equal(b.dense["qkv_proj"].values_ns, j.dense["qkv_proj"].values_ns)  # GEMMs: no constant
    c = lo["bandwidth"]["classes"]["layernorm"]
    nbytes = 4 * 4096 * 2 * 64 + 4096 * 2
    assert _at(b.dense["layernorm"], 64) == round((c["t0_us"] + nbytes / (c["eff"] * 1792e9) * 1e6) * 1000)
    # prefill of 16 tokens over 8192 cached: the latency path (gamma per key, head_dim 128) dominates
    dg = lo["attention"]["prefill_latency"]["gamma_us_per_key"] - fit["attention"]["prefill_latency"]["gamma_us_per_key"]
    assert abs(_cell(b.attention, 16, 8192, 0, 0) - _cell(j.attention, 16, 8192, 0, 0) - dg * 8192 * 1000) <= 1
    # a mixed cell from its parts with the left-out (gamma_mix, beta, c0); G = 32/8 = 4
    P, D = _cell(b.attention, 128, 1024, 0, 0) / 1e3, _cell(b.attention, 0, 0, 8, 2048) / 1e3
    hand = max(max(P, lo["attention"]["mixed"]["gamma_us_per_key"] * 2048)
               + (1 + 3 * lo["attention"]["mixed"]["beta"]) * D - lo["attention"]["mixed"]["c0_us"], P, D)
    assert _cell(b.attention, 128, 1024, 8, 2048) == int(us_to_ns(hand))
    assert _cell(b.attention, 128, 1024, 8, 2048) != _cell(j.attention, 128, 1024, 8, 2048)


PHI_MOE = "microsoft/Phi-mini-MoE-instruct"


def test_moe_fallback_for_a_shape_the_table_lacks_by_hand():
    """Phi-mini-MoE (H 4096, I 960, top-2 of 16 experts) is not in the h100 MoE table: the block is
    composed from gemm.csv.gz. T = 1 token at ep 1 activates ae = 2 experts with m = 1 row each:
    gate/up (1, 1920, 4096) between lines 168 (n 1536: 9.584 us) and 190 (n 2048: 10.8098 us),
    log-bilinear = 10.5218 us; down (1, 4096, 960) between lines 271 (k 768: 5.112) and 272
    (k 1024: 6.024) = 5.8062 us; act_fn 1.736483 + 3*960*2 B / (2.459302 * 3.35e12 B/s) = 1.737182 us;
    one grouped launch: minus (ae-1) * (2 * 2.52178 (line 3, the smallest m = 1 GEMM) + 1.736483);
    times fit.json's h100 bf16 scale; plus the router GEMM (1, 16, 4096), n clamped to 32: line 14,
    5.86933 us. = 44.151 us."""
    m = load_model(PHI_MOE)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        b = odb.load_converted_bundle(PROFILES, "h100", m, tp=2)  # tp 2: not loaded by another test
        odb.load_converted_bundle(PROFILES, "h100", m, tp=2)
    msg = [str(x.message) for x in w if "MoE table has no rows" in str(x.message)]
    assert len(msg) == 1 and PHI_MOE in msg[0] and "moe intermediate 960, topk 2, 16 experts, moe_tp 1, moe_ep 2" in msg[0]
    info = b.meta["conversion"]["moe"]
    assert info["path"] == "gemm_fallback" and "moe_ep 2" in info["missing_shape"] and info["ep_assumed"] == 2
    _, b1 = _bundle("h100", PHI_MOE)
    assert b1.meta["conversion"]["moe"]["path"] == "gemm_fallback"
    scale = odb.load_fit(PROFILES)["moe_fallback"]["scale"]["h100_sxm"]["bfloat16"]
    assert b1.meta["conversion"]["moe"]["scale"] == scale
    assert [_row("gemm.csv.gz", f"bfloat16,1,{n},{k},") for n, k in ((1536, 4096), (2048, 4096), (4096, 768),
                                                                       (4096, 1024), (32, 64), (32, 4096))] \
        == [9.584, 10.8098, 5.112, 6.024, 2.52178, 5.86933]
    w_n = math.log(1920 / 1536) / math.log(2048 / 1536)
    gu = 9.584 * (10.8098 / 9.584) ** w_n
    dn = 5.112 * (6.024 / 5.112) ** (math.log(960 / 768) / math.log(1024 / 768))
    act = 1.736483 + 3 * 960 * 2 / (2.459302 * 3.35e12) * 1e6
    hand = 5.86933 + scale * (2 * (gu + act + dn) - (2 * 2.52178 + 1.736483))
    a = list(b1.moe.ae_axis).index(2)
    assert list(b1.moe.ae_axis) == [2, 4, 8, 16] and b1.moe.token_keys[a, 0] == 1
    assert abs(int(b1.moe.values_ns[a, 0]) - hand * 1000) <= 1, (int(b1.moe.values_ns[a, 0]), hand)
    # ep 2: 8 experts per rank, T = 1 -> round(1*2/2) = 1 activated expert, local round(1*(1-0.5**2)) = 1
    assert b.moe.ae_axis[0] == 1 and b.moe.ae_axis[-1] == 8


def test_errors_name_hardware_model_tp_and_what_the_tables_hold():
    llama = load_model(LLAMA)
    with pytest.raises(JaxsimInputError, match="unknown hardware 'h300'.*known hardware"):
        odb.load_converted_bundle(PROFILES, "h300", llama)
    with pytest.raises(JaxsimInputError, match=r"h100: tp=8 does not divide .*num_kv_heads 4.*\[1, 2, 4\]"):
        load_profile_bundle(PROFILES, "h100", load_model(QWEN_MOE), tp=8)
    with pytest.raises(JaxsimInputError, match="no variant 'fp16'"):
        load_profile_bundle(PROFILES, "h100", llama, variant="fp16")
    # FP8 KV on the RTX PRO 6000: FlashInfer's rows (the FlashAttention rows are bf16-KV only)
    _, b = _bundle("rtxpro6000_opdb", LLAMA, variant="bf16-kvfp8")
    assert b.meta["kv_cache_dtype"] == "fp8"


def test_config_accepts_converted_hardware():
    hw = config_lib.hardware_option("h100", PROFILES, LLAMA)
    # the TP link is null in the option: the all-reduce fit at the run's TP degree (planning.resolve_hardware)
    assert hw.name == "h100" and hw.mem_size_gb == 80.0 and hw.link_bw_gbps is None
    hw = planning.resolve_hardware(dataclasses.replace(hw, tp=2), str(PROFILES))
    fit = json.loads((PROFILES / "operator-db" / "fit.json").read_text())["allreduce"]["h100_sxm"]["vllm_eager"]["2"]
    assert (hw.link_bw_gbps, hw.link_latency_ns) == (fit["link_bw_gbps"], fit["link_latency_ns"])


H100_HW = HardwareConfig(name="h100", mem_size_gb=80.0, tp=1, cpu_mem_bw_gbps=math.inf, cpu_mem_latency_ns=0.0)


def _first_iteration(m, b) -> int:
    """A 128-token prompt's first iteration, hand-composed from the bundle's layers (REFERENCE.md §2.1)."""
    d, ps = b.dense, b.per_sequence
    block = sum(_at(d[n], 128) for n in ("layernorm", "qkv_proj", "rotary_emb", "o_proj", "layernorm", "gate_up_proj",
                                         "act_fn", "down_proj")) + _cell(b.attention, 128, 0, 0, 0)
    hand = _at(d["embedding"], 128) + 32 * block + _at(d["final_layernorm"], 128) + _at(ps["lm_head"], 1) \
        + _at(ps["sampler"], 1)
    return hand


def test_iteration_on_h100_is_the_hand_composed_sum():
    m, b = _bundle("h100", LLAMA)
    assert int(_ONE(latency_tables(b, m, H100_HW), 128, 1, 128, 0, 0, 0, 0, 0)[0]) == _first_iteration(m, b)


@pytest.mark.slow  # 22 s on 2 cores: the engine compiles for the converted tables' shapes
def test_simulation_on_h100():
    """One request end to end on h100: the first iteration is the whole prompt, priced as the
    hand-composed sum of the converted layers."""
    m, b = _bundle("h100", LLAMA)
    hw = H100_HW
    first = _first_iteration(m, b)
    w = Workload(arrival_ns=np.array([0], np.int64), input_toks=np.array([128], np.int32),
                 output_toks=np.array([3], np.int32), token_ids=[None])
    res = simulator.simulate(w, m, hw, SchedulerConfig(max_num_seqs=4), calib=Calibration.none(),
                             profiles_dir=str(PROFILES), max_slots=8)
    assert int(res.iter_end_ns[0] - res.iter_start_ns[0]) == first
    assert res.first_token_ns[0] == first and res.finish_ns[0] > first
