"""The roofline latency model (jaxsim/latency/roofline.py) and spec sheets (jaxsim/specs.py):
operator and whole-iteration times against hand computations, pipeline stages, exact gradients
against finite differences, stacking/vmap, spec-sheet errors, and the fit's recorded figures."""

import json
import math
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

import jaxsim  # noqa: F401  (x64)
from jaxsim.errors import JaxsimInputError
from jaxsim.latency.base import BatchShape
from jaxsim.latency.roofline import (CLASSES, GEMM, MEMORY, Efficiency, RooflineModel, iteration_ns, kernel_ns,
                                     load_calibration, stack_rooflines, with_hardware)
from jaxsim.model import ModelConfig
from jaxsim.specs import SpecSheet, load_spec, spec_names

REPO = Path(__file__).resolve().parents[1]
SPECS = REPO / "profiles" / "specs"
FIT = REPO / "tests" / "data" / "roofline_fit.json"

# distinct values per class so that a class mix-up shows
CAL = {c: {"e_max": 0.5 + 0.05 * i, "f_half": 1e6 * (i + 1), "b_max": 0.6 + 0.05 * i, "b_half": 1e4 * (i + 1),
           "lat": 1000.0 + 500 * i, "p": 2.0 + i} for i, c in enumerate(CLASSES)}
SPEC = SpecSheet(name="test", source="hand", peak_tflops={"bf16": 100.0}, mem_bw_gbs=1000.0, mem_gib=16.0,
                 link_bw_gbs=50.0, link_latency_us=5.0)
PEAK, BW = 100.0 * 1e3, 1000.0  # FLOP/ns, bytes/ns


def tiny(model_type="llama", layers=2):
    return ModelConfig(name="test/tiny", model_type=model_type, num_layers=layers, hidden_size=64, num_heads=4,
                       num_kv_heads=2, head_dim=16, intermediate_size=128, vocab_size=256,
                       max_position_embeddings=4096, torch_dtype="bfloat16")


def shape(T, S, pc, kp, nd, kvd_sum, kvd_min=0, kvd_max=0):
    return BatchShape(*[jnp.asarray(v, jnp.int32) for v in (T, S, pc, kp, nd, kvd_sum, kvd_min, kvd_max)])


def hand_kernel(cls, F, B):
    c = CAL[cls]
    tc = (F + c["f_half"]) / (PEAK * c["e_max"])
    tm = (B + c["b_half"]) / (BW * c["b_max"])
    return c["lat"] + (tc ** c["p"] + tm ** c["p"]) ** (1 / c["p"])


@pytest.fixture(scope="module")
def model():
    return RooflineModel.from_spec(SPEC, tiny(), calibration=CAL)


def test_gemm_operator_by_hand(model):
    # qkv_proj of the tiny Llama at T = 512: [512, 64] @ [64, 4*16 + 2*2*16 = 128]
    T = 512
    F = 2 * T * 128 * 64
    B = T * (128 + 64) * 2 + 128 * 64 * 2
    c = CAL["gemm"]
    tc = (F + c["f_half"]) / (PEAK * c["e_max"])  # = F / (peak * e_max * F/(F + f_half))
    tm = (B + c["b_half"]) / (BW * c["b_max"])
    want = c["lat"] + (tc ** c["p"] + tm ** c["p"]) ** (1 / c["p"])
    got = float(kernel_ns(F, B, GEMM, model.eff, model.peak_flops, model.mem_bw))
    assert got == pytest.approx(want, rel=1e-12)
    # the model's rows carry the same FLOPs and bytes (qkv_proj, and down_proj: 64 x 128, the same n*k)
    r = [i for i in range(model.op_flops.shape[0]) if float(model.op_flops[i]) * T == F
         and float(model.op_bytes[i]) * T + float(model.op_fixed[i]) == B]
    assert len(r) == 2 and all(int(model.op_cls[i]) == GEMM for i in r)


def test_memory_operator_by_hand(model):
    # fused residual-add RMSNorm at T = 4096: reads x and the residual, writes both (4 rows of H), H weights
    T = 4096
    F, B = 4 * 64 * T, 4 * 64 * 2 * T + 64 * 2
    c = CAL["memory"]
    tc = (F + c["f_half"]) / (PEAK * c["e_max"])
    tm = (B + c["b_half"]) / (BW * c["b_max"])
    assert tm > 3 * tc  # memory-bound
    want = c["lat"] + (tc ** c["p"] + tm ** c["p"]) ** (1 / c["p"])
    assert float(kernel_ns(F, B, MEMORY, model.eff, model.peak_flops, model.mem_bw)) == pytest.approx(want, rel=1e-12)


def hand_iteration(T, S, pc, kp, nd, kvd_sum, L=2):
    """The tiny Llama at tp 1, every FLOP and byte written out from its shapes (H 64, q 64, kv 32,
    I 128, V 256, head_dim 16, bf16)."""
    k = hand_kernel
    tok = {  # (class, FLOPs, bytes) at x = T
        "embedding": ("memory", 0, 2 * 64 * 2 * T),
        "layernorm": ("memory", 4 * 64 * T, 4 * 64 * 2 * T + 64 * 2),
        "qkv_proj": ("gemm", 2 * 128 * 64 * T, (128 + 64) * 2 * T + 128 * 64 * 2),
        "rotary_emb": ("memory", 3 * 96 * T, (2 * 96 + 16) * 2 * T),
        "o_proj": ("gemm", 2 * 64 * 64 * T, 128 * 2 * T + 64 * 64 * 2),
        "gate_up_proj": ("gemm", 2 * 256 * 64 * T, 320 * 2 * T + 256 * 64 * 2),
        "act_fn": ("memory", 4 * 128 * T, 3 * 128 * 2 * T),
        "down_proj": ("gemm", 2 * 64 * 128 * T, 192 * 2 * T + 64 * 128 * 2),
    }
    t = {n: k(*v) for n, v in tok.items()}
    lm = k("gemm", 2 * 256 * 64 * S, 320 * 2 * S + 256 * 64 * 2)
    samp = k("memory", 5 * 256 * S, 2 * 256 * 4 * S) + 9 * CAL["memory"]["lat"]  # 10 kernels: 9 more floors
    kvt = 2 * 32 * 2
    fp, bp = 4 * 64 * pc * (kp + (pc + 1) / 2), (kp + pc) * kvt + pc * (2 * 64 * 2 + kvt)
    fd, bd = 4 * 64 * kvd_sum, kvd_sum * kvt + nd * (2 * 64 * 2 + kvt)
    if pc and nd:  # mixed: one varlen kernel, the decodes' compute in 64-row query tiles
        att = k("attn_prefill", fp + 64 * fd, bp + bd)
    else:
        att = (k("attn_prefill", fp, bp) if pc else 0.0) + (k("attn_decode", fd, bd) if nd else 0.0)
    block = (2 * t["layernorm"] + t["qkv_proj"] + t["rotary_emb"] + att + t["o_proj"] + t["gate_up_proj"]
             + t["act_fn"] + t["down_proj"])
    host = 2 * 2 * T / 256 + 4 * T / 256  # token ids in, sampled ids out (256 GB/s, 0 latency)
    return host + t["embedding"] + L * block + t["layernorm"] + lm + samp


@pytest.mark.parametrize("args", [(1, 1, 0, 0, 1, 512), (300, 45, 256, 1024, 44, 44 * 700), (2048, 1, 2048, 0, 0, 0)])
def test_iteration_is_the_sum_of_its_parts(model, args):
    want = hand_iteration(*args)
    s = shape(*args)
    assert float(iteration_ns(model, s)) == pytest.approx(want, rel=1e-12)
    t, ext = model.iteration_time(s)
    assert int(t) == math.floor(float(iteration_ns(model, s))) and t.dtype == jnp.int64
    assert np.all(np.asarray(ext) == 0)


def test_kernel_count_and_l2_by_hand():
    # a 10-kernel memory operator pays 10 floors; bytes well inside L2 move at (1 + gain) x DRAM, far above it at ~1x
    cal = {c: dict(v) for c, v in CAL.items()}
    cal["memory"]["l2_gain"] = 1.5
    eff = Efficiency.from_dict(cal)
    c = cal["memory"]
    l2 = 64 * 2.0 ** 20
    for B in (1e6, 64 * 2.0 ** 20, 1e9):
        F = B / 4
        bw = BW * (1 + 1.5 / (1 + (B / l2) ** 4))
        tc = (F + c["f_half"]) / (PEAK * c["e_max"])
        tm = (B + c["b_half"]) / (bw * c["b_max"])
        want = 10 * c["lat"] + (tc ** c["p"] + tm ** c["p"]) ** (1 / c["p"])
        assert float(kernel_ns(F, B, MEMORY, eff, 100.0, 1000.0, 10.0, l2)) == pytest.approx(want, rel=1e-12)
    # no L2 on the sheet (0) = no gain; other classes have none by default
    no_l2 = float(kernel_ns(1e3, 1e6, MEMORY, eff, 100.0, 1000.0, 1.0, 0.0))
    assert no_l2 == pytest.approx(hand_kernel("memory", 1e3, 1e6))
    assert float(kernel_ns(1e3, 1e6, GEMM, eff, 100.0, 1000.0, 1.0, l2)) == pytest.approx(hand_kernel("gemm", 1e3, 1e6))
    bad = {c: dict(v) for c, v in CAL.items()}
    bad["memory"]["l2_gain"] = -1.0
    with pytest.raises(JaxsimInputError, match="memory.l2_gain"):
        Efficiency.from_dict(bad)
    assert load_spec("rtx4090", SPECS).l2_mib == 72 and load_spec("b200", SPECS).l2_mib is None


def test_tp_allreduce_and_moe_collectives_follow_the_ring():
    # tp 2 adds 2 AllReduces per layer (o_proj, down_proj), each 2(N-1) = 2 steps of lat + (T*H*2/2)/bw
    m1 = RooflineModel.from_spec(SPEC, tiny(), tp=2, calibration=CAL)
    m0 = eqx.tree_at(lambda m: m.ar_count, m1, jnp.asarray(0.0))
    T = 100
    s = shape(T, T, 0, 0, T, T * 64)
    ar = 2 * (5000.0 + T * 64 * 2 / 2 / 50.0)
    assert float(iteration_ns(m1, s) - iteration_ns(m0, s)) == pytest.approx(2 * 2 * ar, rel=1e-12)


@pytest.mark.parametrize("pp", [2, 3])
def test_stage_times_sum_to_iteration_time(pp):
    m = RooflineModel.from_spec(SPEC, tiny(layers=7), pp=pp, calibration=CAL)
    for args in [(1, 1, 0, 0, 1, 512), (300, 45, 256, 1024, 44, 44 * 700)]:
        s = shape(*args)
        st, ext, p2p = m.stage_times(s, 4)
        st = np.asarray(st)
        assert st.sum() == int(m.iteration_time(s)[0])
        assert np.all(st[:pp] > 0) and np.all(st[pp:] == 0)
        T = args[0]
        assert int(p2p) == math.floor(5000.0 + T * 64 * 2 / 50.0)
        # 7 blocks over pp stages (vLLM's split: 4+3, or 2+3+2): the middle stage of 3 is blocks only
        if pp == 3:
            blocks = float(iteration_ns(m, s)) - st[0] - st[2]
            assert st[1] == pytest.approx(blocks, abs=2)


def _fd(f, x, h):
    return (f(x + h) - f(x - h)) / (2 * h)


def test_gradients_match_finite_differences(model):
    s = shape(300, 45, 256, 1024, 44, 44 * 700)

    def t_hw(name):
        return lambda v: iteration_ns(with_hardware(model, **{name: v}), s)

    for name in ("peak_flops", "mem_bw"):
        x = float(getattr(model, name))
        g = float(jax.grad(t_hw(name))(jnp.asarray(x)))
        fd = float(_fd(t_hw(name), x, 1e-4 * x))
        assert g < 0 and g == pytest.approx(fd, rel=1e-5), name

    def t_eff(v):
        return iteration_ns(eqx.tree_at(lambda m: m.eff.e_max, model, model.eff.e_max.at[GEMM].set(v)), s)

    x = float(model.eff.e_max[GEMM])
    g = float(jax.grad(t_eff)(jnp.asarray(x)))
    assert g < 0 and g == pytest.approx(float(_fd(t_eff, x, 1e-5)), rel=1e-5)
    # the whole gradient tree in one pass (what a design search takes)
    grads = eqx.filter_grad(lambda m: iteration_ns(m, s))(model)
    assert float(grads.mem_bw) == pytest.approx(float(jax.grad(t_hw("mem_bw"))(model.mem_bw)), rel=1e-12)


def test_vmap_over_stacked_spec_sheets():
    a = RooflineModel.from_spec(load_spec("rtxpro6000", SPECS), tiny(), calibration=CAL)
    b = RooflineModel.from_spec(load_spec("h100", SPECS), tiny("qwen3", layers=3), calibration=CAL)  # + qk_norm row
    assert b.op_flops.shape[0] == a.op_flops.shape[0] + 1
    st = stack_rooflines([a, b])
    s = shape(300, 45, 256, 1024, 44, 44 * 700)
    both = jax.vmap(lambda m: m.iteration_time(s)[0])(st)
    assert [int(x) for x in both] == [int(a.iteration_time(s)[0]), int(b.iteration_time(s)[0])]
    # with_hardware on the stack: per-configuration knobs
    st2 = with_hardware(st, mem_bw=jnp.asarray([1792.0 * 2, 3350.0]))
    t2 = jax.vmap(lambda m: m.iteration_time(s)[0])(st2)
    assert int(t2[0]) < int(both[0]) and int(t2[1]) == int(both[1])


def _write(tmp_path, text):
    p = tmp_path / "part.yaml"
    p.write_text(text)
    return p


GOOD = """name: x
source: y
peak_tflops: {bf16: 100}
mem_bw_gbs: 1000
mem_gib: 16
link_bw_gbs: 50
link_latency_us: 5
"""


def test_spec_sheet_errors_name_file_and_key(tmp_path):
    assert load_spec(_write(tmp_path, GOOD)).mem_bw_gbs == 1000.0
    for text, key in ((GOOD + "mem_bw_gb: 3\n", "mem_bw_gb"),
                      (GOOD.replace("link_bw_gbs: 50\n", ""), "link_bw_gbs"),
                      (GOOD.replace("mem_bw_gbs: 1000", "mem_bw_gbs: -1000"), "mem_bw_gbs"),
                      (GOOD.replace("{bf16: 100}", "{bf16: 100, fp7: 3}"), "peak_tflops.fp7"),
                      (GOOD.replace("{bf16: 100}", "{fp8: 100}"), "peak_tflops.bf16")):
        p = _write(tmp_path, text)
        with pytest.raises(JaxsimInputError) as e:
            load_spec(p)
        assert str(p) in str(e.value) and key in str(e.value)
    with pytest.raises(JaxsimInputError, match="did you mean 'mem_bw_gbs'"):
        load_spec(_write(tmp_path, GOOD + "mem_bw_gb: 3\n"))
    with pytest.raises(JaxsimInputError, match="known spec sheets"):
        load_spec("no_such_part", SPECS)


def test_shipped_sheets_and_calibration_load():
    names = spec_names(SPECS)
    for n in ("rtx4090", "rtxpro6000", "a6000", "h100", "h200", "b200", "gb200", "mi300x", "tpu_v5e", "tpu_v6e",
              "whatif_h100_2xbw"):
        assert n in names
    # the five AIConfigurator systems carry its spec-sheet numbers
    aic = REPO.parent / "shared" / "data" / "operator-db" / "aiconfigurator"
    for sheet, system in (("h100", "h100_sxm"), ("h200", "h200_sxm"), ("b200", "b200_sxm"), ("gb200", "gb200"),
                          ("rtxpro6000", "rtx_pro_6000_server")):
        if not (aic / f"{system}.yaml").is_file():
            continue
        gpu = yaml.safe_load((aic / f"{system}.yaml").read_text())["gpu"]
        s = load_spec(sheet, SPECS)
        assert s.peak("bf16") == pytest.approx(gpu["bfloat16_tc_flops"] / 1e12, rel=1e-3)
        assert s.mem_bw_gbs == pytest.approx(gpu["mem_bw"] / 1e9, rel=1e-9)
    h, w = load_spec("h100", SPECS), load_spec("whatif_h100_2xbw", SPECS)
    assert w.mem_bw_gbs == 2 * h.mem_bw_gbs and w.peak("bf16") == h.peak("bf16") / 2
    eff = load_calibration()
    assert isinstance(eff, Efficiency)
    assert np.all((np.asarray(eff.e_max) > 0) & (np.asarray(eff.e_max) < 1)) and np.all(np.asarray(eff.p) >= 1)


def test_loho_figures_recorded():
    fig = json.loads(FIT.read_text())
    it = fig["iteration_loho"]["all"]
    # the report's figure (scripts/fit_roofline.py, leave-one-hardware-out, 9 bundles x 34 shapes)
    assert it["n"] == 306 and it["median"] <= 0.11 and it["p90"] <= 0.38  # measured 0.101, 0.358
    assert set(fig["loho"]["per_hardware"]) == {"a6000", "b200", "gb200", "h100", "h200", "rtx4090", "rtxpro6000"}
    pc = fig["loho"]["per_class"]
    assert pc["gemm"]["median"] <= 0.11  # measured 0.0994
    assert pc["memory"]["median"] <= 0.22  # measured 0.193 (0.617 before kernel counts and the L2 term)
    assert pc["attn_mixed"]["median"] <= 0.31  # measured 0.280 (0.453 with mixed = prefill + decode kernels)
    assert pc["attn_decode"]["median"] <= 0.28  # measured 0.256
    cal = yaml.safe_load((SPECS / "roofline_calibration.yaml").read_text())
    assert cal["provenance"]["loho_iteration_median_rel_err"] == it["median"]
