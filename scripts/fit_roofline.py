"""Calibrate the roofline latency model's efficiency curves on every measured table we have.

    PYTHONPATH=. python scripts/fit_roofline.py            # fit + leave-one-hardware-out, writes both outputs
    PYTHONPATH=. python scripts/fit_roofline.py --steps 300 --max-rows 500 --no-write   # a quick look

One parameter set (:class:`jaxsim.latency.roofline.Efficiency`: 6 parameters x 5 operator classes, and
the memory class's L2 gain)
is fitted JOINTLY over all hardware, each hardware entering only through its spec sheet
(``profiles/specs/<hw>.yaml``). Data (times as measured; each row's FLOPs and bytes from
:mod:`jaxsim.operators` and the same formulas the model uses):

* native bundles (``profiles/RTXPRO6000``: Llama-3.1-8B, Qwen3-32B, Qwen3-30B-A3B at TP 1 and 2;
  ``profiles/RTX4090``: Llama-3.1-8B TP 1): dense and per-sequence layers, every measured attention
  point (mixed prefill + decode batches included: priced as one varlen kernel, ``roofline.attention_ns``),
  the MoE block (``moe.csv``);
* legacy bundles (``profiles/legacy/A6000`` Llama-3.1-8B TP 1, ``profiles/legacy/H100`` Llama-3.1-70B
  TP 4, Llama-3.1-8B TP 1/2 and Mixtral-8x7B TP 4): the layers, and the attention points that are
  pure prefill or pure decode (the mixed ones are sums the loader made, not measurements; the
  Mixtral MoE table is synthesised from per-expert rows and not used);
* AIConfigurator's vLLM 0.19.0 operator tables (``../shared/data/operator-db/aiconfigurator``,
  H100 / H200 / B200 / GB200 / RTX PRO 6000 Server; latency in ms): bf16 GEMMs, prefill (context)
  and decode (generation) attention with a bf16 KV cache and no sliding window, and the balanced
  bf16 fused MoE at expert-parallel size 1.

Tables larger than ``--max-rows`` are subsampled (seed 0). Loss: the squared log-ratio of predicted
to measured time, each (hardware, operator class) group weighted equally. Optimizer: Adam (optax)
on unconstrained parameters (sigmoid for the peak fractions, exp for the sizes and the floor,
1 + exp for p).

Leave-one-hardware-out (LOHO): for each of the 7 hardware, refit without it and score it: median
and p90 relative error ``|pred/measured - 1|`` per operator class, and on whole iterations (the
roofline with the held-out calibration against the bundle's LatencyTables, over 34 batch shapes:
decode batches of 1..256 at KV 128..8192, prefill chunks 16..2048 with and without history, mixed).
Outputs: ``profiles/specs/roofline_calibration.yaml`` (the all-hardware fit, with provenance) and
``tests/data/roofline_fit.json`` (the figures).
"""

import argparse
import datetime
import json
import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jaxsim  # noqa: E402,F401  (x64)
from jaxsim.latency.base import BatchShape  # noqa: E402
from jaxsim.latency.roofline import (ATTN_DECODE, ATTN_PREFILL, CLASSES, DEFAULT_CALIBRATION, GEMM, MEMORY,  # noqa: E402
                                     MIXED_QUERY_TILE, MOE, Efficiency, RooflineModel, attention_work, kernel_ns,
                                     moe_work)
from jaxsim.latency.tables import latency_tables  # noqa: E402
from jaxsim.model import load_model_config  # noqa: E402
from jaxsim.operators import layer_operators, moe_expert_shapes  # noqa: E402
from jaxsim.profiles import load_profile_bundle  # noqa: E402
from jaxsim.spec import HardwareConfig  # noqa: E402
from jaxsim.specs import load_spec  # noqa: E402

PROFILES = REPO / "profiles"
OPDB = REPO.parent / "shared" / "data" / "operator-db" / "aiconfigurator" / "data"
# hardware name -> spec sheet; bundles and operator-DB systems per hardware
NATIVE = [("RTXPRO6000", "meta-llama/Llama-3.1-8B", 1), ("RTXPRO6000", "meta-llama/Llama-3.1-8B", 2),
          ("RTXPRO6000", "Qwen/Qwen3-32B", 1), ("RTXPRO6000", "Qwen/Qwen3-32B", 2),
          ("RTXPRO6000", "Qwen/Qwen3-30B-A3B-Instruct-2507", 1), ("RTXPRO6000", "Qwen/Qwen3-30B-A3B-Instruct-2507", 2),
          ("RTX4090", "meta-llama/Llama-3.1-8B", 1),
          ("legacy/A6000", "meta-llama/Llama-3.1-8B", 1), ("legacy/H100", "meta-llama/Llama-3.1-70B", 4),
          ("legacy/H100", "meta-llama/Llama-3.1-8B", 1), ("legacy/H100", "meta-llama/Llama-3.1-8B", 2),
          ("legacy/H100", "mistralai/Mixtral-8x7B-v0.1", 4)]
SPEC_OF = {"RTXPRO6000": "rtxpro6000", "RTX4090": "rtx4090", "legacy/A6000": "a6000", "legacy/H100": "h100",
           "h100_sxm": "h100", "h200_sxm": "h200", "b200_sxm": "b200", "gb200": "gb200",
           "rtx_pro_6000_server": "rtxpro6000"}
SYSTEMS = ("h100_sxm", "h200_sxm", "b200_sxm", "gb200", "rtx_pro_6000_server")
# bundles whose attention is measured with KV dependence (whole-iteration comparison)
ITER_BUNDLES = [b for b in NATIVE if not (b[0] == "legacy/H100" and b[2] in (1, 2)) and "Mixtral" not in b[1]]
REPORT = ("gemm", "memory", "attn_prefill", "attn_decode", "attn_mixed", "moe", "memory_legacy", "attn_decode_legacy")
# Scored but not fitted (weight 0): the legacy profiles' element-wise layers are Hugging Face's unfused
# modules (layernorm 17.7 us at 1 token on H100 against vLLM's fused 2.4 us on the RTX PRO 6000), and
# their Vidur-style decode attention does not follow the KV read (A6000: one decode at KV 19,968 takes
# 1.0 ms, 10x its KV read at 768 GB/s, while 128 decodes take 105 us at any KV length).
NOT_FITTED = ("memory_legacy", "attn_decode_legacy")


class Rows:
    """The fit's rows: up to two priced parts each (class, FLOPs, bytes), the measured ns."""

    def __init__(self):
        self.cols = {k: [] for k in ("hw", "src", "rep", "c1", "f1", "b1", "c2", "f2", "b2", "two", "t", "kern",
                                     "layer")}

    def add(self, hw, src, rep, parts, t_ns, kernels=1, layer=""):
        (c1, f1, b1), second = parts[0], (parts[1] if len(parts) > 1 else (0, 0.0, 0.0))
        for k, v in zip(self.cols, (hw, src, rep, c1, f1, b1, second[0], second[1], second[2], len(parts) > 1, t_ns,
                                    kernels, layer)):
            self.cols[k].append(v)

    def arrays(self):
        a = {k: np.asarray(v) for k, v in self.cols.items()}
        keep = a["t"] > 0
        return {k: v[keep] for k, v in a.items()}


def subsample(n, cap, rng):
    return np.arange(n) if n <= cap else np.sort(rng.choice(n, cap, replace=False))


def bundle_rows(rows: Rows, hw, name, tp, cap, rng):
    model = load_model_config(PROFILES / "models", name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = load_profile_bundle(PROFILES, hw, model, tp=tp)
    legacy = hw.startswith("legacy/")
    src = "legacy" if legacy else "native"
    spec = SPEC_OF[hw]
    ops = layer_operators(model, tp)
    for tables in (b.dense, b.per_sequence):
        for layer, tab in tables.items():
            if layer not in ops or (tp > 1 and layer in b.tp_stable):
                continue  # a copy of the TP1 rows
            op = ops[layer]
            cls = GEMM if op.kind == "gemm" else MEMORY
            rep = CLASSES[cls] + ("_legacy" if legacy and cls == MEMORY else "")
            for i in subsample(len(tab.keys), cap // 8, rng):
                x = float(tab.keys[i])
                rows.add(spec, src, rep, [(cls, op.flops(x), op.bytes(x))], float(tab.values_ns[i]),
                         getattr(op, "kernels", 1), layer)
    if legacy and tp in (1, 2) and "70B" not in name and hw == "legacy/H100":
        return  # attention from 'attn' rows without KV: not a measurement of KV-dependent attention
    if "Mixtral" in name:
        return
    at = b.attention
    qhd = (model.num_heads // tp) * model.head_dim
    kv_tok = 2 * (model.kv_dim // tp) * 2
    pts = []
    for i, pc in enumerate(at.pc_axis):
        for j, nd in enumerate(at.nd_axis):
            if not at.has_slice[i, j] or (legacy and pc > 0 and nd > 0):
                continue
            for r in range(at.n_kp[i, j]):
                for c in range(at.n_kvd[i, j, r]):
                    pts.append((int(pc), int(at.kp_keys[i, j, r]), int(nd), int(at.kvd_keys[i, j, r, c]),
                                float(at.values_ns[i, j, r, c])))
    for k in subsample(len(pts), cap, rng):
        pc, kp, nd, kvd, t = pts[k]
        f_p, b_p, f_d, b_d = (float(v) for v in attention_work(qhd, kv_tok, qhd * 2, pc, kp, nd, nd * kvd))
        parts = ([(ATTN_PREFILL, f_p, b_p)] if pc > 0 else []) + ([(ATTN_DECODE, f_d, b_d)] if nd > 0 else [])
        rep = "attn_mixed" if len(parts) == 2 else ("attn_prefill" if pc > 0 else "attn_decode")
        rep += "_legacy" if legacy and rep == "attn_decode" else ""
        rows.add(spec, src, rep, parts, t)
    if b.moe is not None and model.is_moe and not legacy:
        (n1, k1), (n2, k2) = moe_expert_shapes(model, 1)
        mo = b.moe
        for a, ae in enumerate(mo.ae_axis):
            for j in range(mo.n_tokens[a]):
                T = float(mo.token_keys[a, j])
                f, by = moe_work(T, T * model.experts_per_token, float(ae), model.hidden_size, model.num_experts,
                                 (n1 * k1 + n2 * k2, n1 + k1 + n2 + k2), 2, 2)
                rows.add(spec, src, "moe", [(MOE, float(f), float(by))], float(mo.values_ns[a, j]))


def _table(path, **eq):
    t = pq.read_table(path).to_pydict()
    n = len(t["latency"])
    keep = np.ones(n, bool)
    for k, v in eq.items():
        col = np.asarray(t[k])
        keep &= (col == v)
    return {k: np.asarray(v)[keep] for k, v in t.items()}


def opdb_rows(rows: Rows, system, cap, rng):
    spec = SPEC_OF[system]
    base = OPDB / system
    g = _table(base / "gemm/vllm/0.19.0/gemm_perf.parquet", gemm_dtype="bfloat16")
    for i in subsample(len(g["m"]), cap, rng):
        m, n, k = (float(g[c][i]) for c in ("m", "n", "k"))
        rows.add(spec, "opdb", "gemm", [(GEMM, 2 * m * n * k, (m * (n + k) + n * k) * 2)], g["latency"][i] * 1e6)
    for fname, rep in (("context_attention_perf", "attn_prefill"), ("generation_attention_perf", "attn_decode")):
        a = _table(base / f"attention/vllm/0.19.0/{fname}.parquet", kv_cache_dtype="bfloat16", attn_dtype="bfloat16")
        if "window_size" in a:
            a = {k: v[a["window_size"] == 0] for k, v in a.items()}
        for i in subsample(len(a["latency"]), cap, rng):
            b, isl, h, kvh, d = (float(a[c][i]) for c in ("batch_size", "isl", "num_heads", "num_key_value_heads",
                                                         "head_dim"))
            kv_tok = 2 * kvh * d * 2
            if rep == "attn_prefill":  # b sequences of isl new tokens, no history
                f, by, _, _ = attention_work(h * d, kv_tok, h * d * 2, isl, 0.0, 0.0, 0.0)
                parts = [(ATTN_PREFILL, b * float(f), b * float(by))]
            else:  # b decodes at context isl + step
                ctx = isl + float(a["step"][i])
                _, _, f, by = attention_work(h * d, kv_tok, h * d * 2, 0.0, 0.0, b, b * ctx)
                parts = [(ATTN_DECODE, float(f), float(by))]
            rows.add(spec, "opdb", rep, parts, a["latency"][i] * 1e6)
    mo = _table(base / "moe/vllm/0.19.0/moe_perf.parquet", moe_dtype="bfloat16", distribution="balanced",
                kernel_source="vllm_fused_moe", moe_ep_size=1)
    for i in subsample(len(mo["latency"]), cap, rng):
        T, H, inter, k, E, tp = (float(mo[c][i]) for c in ("num_tokens", "hidden_size", "inter_size", "topk",
                                                           "num_experts", "moe_tp_size"))
        n1, k1, n2, k2 = 2 * inter / tp, H, H, inter / tp
        f, by = moe_work(T, T * k, min(T * k, E), H, E, (n1 * k1 + n2 * k2, n1 + k1 + n2 + k2), 2, 2)
        rows.add(spec, "opdb", "moe", [(MOE, float(f), float(by))], mo["latency"][i] * 1e6)


# ----------------------------------------------------------------------------------- the fit
def _raw0():
    d = DEFAULT_CALIBRATION
    col = lambda k: np.array([d[c][k] for c in CLASSES])  # noqa: E731
    logit = lambda x: np.log(x / (1 - x))  # noqa: E731
    l2 = np.log(np.maximum(col("l2_gain"), 1e-3))
    return jnp.asarray(np.stack([logit(col("e_max")), np.log(col("f_half") / 1e9), logit(col("b_max")),
                                 np.log(col("b_half") / 1e6), np.log(col("lat") / 1e3), np.log(col("p") - 1.0), l2]))


# only the memory class has an L2 gain (roofline module docstring); the others' stay 0
_L2_FREE = jnp.asarray([c == "memory" for c in CLASSES], jnp.float64)


def to_eff(raw) -> Efficiency:
    s = jax.nn.sigmoid
    return Efficiency(e_max=s(raw[0]), f_half=1e9 * jnp.exp(raw[1]), b_max=s(raw[2]), b_half=1e6 * jnp.exp(raw[3]),
                      lat=1e3 * jnp.exp(raw[4]), p=1.0 + jnp.exp(raw[5]), l2_gain=_L2_FREE * jnp.exp(raw[6]))


def predict(eff, d):
    """Each row's time: one operator (``kern`` launches, L2 size ``l2``), or a mixed attention cell
    (``two``: prefill part 1 + decode part 2) as the one varlen kernel of ``roofline.attention_ns``."""
    t1 = kernel_ns(d["f1"], d["b1"], d["c1"], eff, d["peak"], d["bw"], d["kern"], d["l2"])
    t_mix = kernel_ns(d["f1"] + MIXED_QUERY_TILE * d["f2"], d["b1"] + d["b2"], ATTN_PREFILL, eff, d["peak"], d["bw"])
    return jnp.where(d["two"], t_mix, t1)


def make_fit(d, steps, lr):
    dj = {k: jnp.asarray(d[k]) for k in ("f1", "b1", "c1", "f2", "b2", "c2", "two", "peak", "bw", "kern", "l2")}
    logt = jnp.log(jnp.asarray(d["t"]))
    opt = optax.adam(lr)

    def loss(raw, w):
        r = jnp.log(predict(to_eff(raw), dj)) - logt
        return jnp.sum(w * r * r) / jnp.sum(w)

    @jax.jit
    def fit(w):
        raw = _raw0()

        def step(carry, _):
            raw, st = carry
            val, g = jax.value_and_grad(loss)(raw, w)
            up, st = opt.update(g, st, raw)
            return (optax.apply_updates(raw, up), st), val

        (raw, _), hist = jax.lax.scan(step, (raw, opt.init(raw)), None, length=steps)
        return raw, hist[-1]

    return fit, jax.jit(lambda raw: predict(to_eff(raw), dj))


def err_stats(rel):
    rel = np.asarray(rel)
    if not len(rel):
        return None
    return {"median": round(float(np.median(rel)), 4), "p90": round(float(np.quantile(rel, 0.9)), 4), "n": int(len(rel))}


def iteration_shapes():
    s = []
    for nd in (1, 8, 32, 128, 256):
        for kv in (128, 1024, 4096, 8192):
            s.append((nd, nd, 0, 0, nd, nd * kv, kv, kv))
    for pc in (16, 128, 512, 2048):
        for kp in (0, 2048):
            s.append((pc, 1, pc, kp, 0, 0, 0, 0))
    for pc in (256, 1024):
        for nd in (16, 64, 128):
            s.append((pc + nd, nd + 1, pc, 0, nd, nd * 2048, 2048, 2048))
    a = np.asarray(s, np.int32)
    return BatchShape(*[jnp.asarray(a[:, i]) for i in range(8)])


def iteration_errors(hw, name, tp, eff):
    model = load_model_config(PROFILES / "models", name)
    spec = load_spec(SPEC_OF[hw], PROFILES / "specs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = load_profile_bundle(PROFILES, hw, model, tp=tp)
    hc = HardwareConfig(name=hw, tp=tp, mem_size_gb=spec.mem_gib, link_bw_gbps=spec.link_bw_gbs,
                        link_latency_ns=spec.link_latency_us * 1e3, cpu_mem_bw_gbps=256.0, cpu_mem_latency_ns=0.0)
    ep = tp if model.is_moe else 1
    tab = latency_tables(b, model, hc, ep=ep if model.is_moe else None)
    roof = RooflineModel.from_spec(spec, model, tp=tp, ep=ep, calibration=eff)
    shapes = iteration_shapes()
    t_tab = np.asarray(jax.jit(jax.vmap(lambda s: tab.iteration_time(s)[0]))(shapes), np.float64)
    t_roof = np.asarray(jax.jit(jax.vmap(lambda s: roof.iteration_time(s)[0]))(shapes), np.float64)
    return np.abs(t_roof / t_tab - 1.0), t_tab, t_roof


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-rows", type=int, default=600, help="rows per table at most (subsampled, seed 0)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--no-write", action="store_true", help="print the figures only")
    ap.add_argument("--calibration-out", default=str(PROFILES / "specs" / "roofline_calibration.yaml"))
    ap.add_argument("--figures-out", default=str(REPO / "tests" / "data" / "roofline_fit.json"))
    args = ap.parse_args(argv)
    t0 = time.time()
    rng = np.random.default_rng(0)
    rows = Rows()
    for hw, name, tp in NATIVE:
        bundle_rows(rows, hw, name, tp, args.max_rows, rng)
    for system in SYSTEMS:
        opdb_rows(rows, system, args.max_rows, rng)
    d = rows.arrays()
    specs = {s: load_spec(s, PROFILES / "specs") for s in set(d["hw"])}
    d["peak"] = np.array([specs[h].peak("bf16") for h in d["hw"]])
    d["bw"] = np.array([specs[h].mem_bw_gbs for h in d["hw"]])
    d["l2"] = np.array([(specs[h].l2_mib or 0.0) * 2.0 ** 20 for h in d["hw"]])
    d["kern"] = d["kern"].astype(np.float64)
    groups = {}
    for i, key in enumerate(zip(d["hw"], d["rep"])):
        groups.setdefault(key, []).append(i)
    w = np.zeros(len(d["t"]))
    for (h, rep), idx in groups.items():
        w[idx] = 0.0 if rep in NOT_FITTED else 1.0 / len(idx)
    d["hw"] = d["hw"].astype(str)
    hws = sorted(str(h) for h in set(d["hw"].tolist()))
    counts = {str(h): {str(r): int(np.sum((d["hw"] == h) & (d["rep"] == r))) for r in REPORT
                  if np.any((d["hw"] == h) & (d["rep"] == r))} for h in hws}
    print(f"{len(d['t'])} rows ({time.time() - t0:.1f} s to read): {counts}", flush=True)

    fit, pred = make_fit(d, args.steps, args.lr)
    raw_all, loss_all = fit(jnp.asarray(w))
    eff_all = to_eff(raw_all)
    rel_in = np.abs(np.asarray(pred(raw_all)) / d["t"] - 1.0)
    print(f"all-hardware fit: loss {float(loss_all):.4f} ({time.time() - t0:.1f} s)", flush=True)

    loho_rel = np.full(len(d["t"]), np.nan)
    loho_eff = {}
    for h in hws:
        raw_h, loss_h = fit(jnp.asarray(np.where(d["hw"] == h, 0.0, w)))
        loho_eff[h] = to_eff(raw_h)
        sel = d["hw"] == h
        loho_rel[sel] = np.abs(np.asarray(pred(raw_h))[sel] / d["t"][sel] - 1.0)
        print(f"  without {h}: loss {float(loss_h):.4f}; {h} median {np.median(loho_rel[sel]):.3f} "
              f"({time.time() - t0:.1f} s)", flush=True)

    def by(rel):
        return {
            "per_class": {r: err_stats(rel[d["rep"] == r]) for r in REPORT if np.any(d["rep"] == r)},
            "per_hardware": {h: {r: err_stats(rel[(d["hw"] == h) & (d["rep"] == r)]) for r in counts[h]}
                             | {"all": err_stats(rel[d["hw"] == h])} for h in hws},
            "all": err_stats(rel),
        }

    it_rows, it_all = {}, []
    for hw, name, tp in ITER_BUNDLES:
        rel, t_tab, t_roof = iteration_errors(hw, name, tp, loho_eff[SPEC_OF[hw]])
        key = f"{hw} {name} tp{tp}"
        it_rows[key] = err_stats(rel) | {"signed_median": round(float(np.median(t_roof / t_tab - 1.0)), 4)}
        it_all.append(rel)
        print(f"  iteration {key}: {it_rows[key]}", flush=True)
    it_cat = np.concatenate(it_all)
    figures = {
        "command": "PYTHONPATH=. python scripts/fit_roofline.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "rows": counts, "steps": args.steps, "max_rows": args.max_rows,
        "metric": "relative error |pred/measured - 1|; LOHO: calibration refitted without the scored hardware",
        "loho": by(loho_rel),
        "in_sample": by(rel_in),
        "iteration_loho": {"per_bundle": it_rows, "all": err_stats(it_cat),
                           "shapes": "decode nd 1,8,32,128,256 x kvd 128,1024,4096,8192; prefill pc 16,128,512,2048 x "
                                     "kp 0,2048; mixed pc 256,1024 + nd 16,64,128 at kvd 2048",
                           "reference": "the bundle's LatencyTables (same link and host parameters)"},
        "runtime_s": round(time.time() - t0, 1),
    }
    print(json.dumps({"loho": figures["loho"]["per_class"], "iteration": figures["iteration_loho"]["all"]}, indent=1))
    if args.no_write:
        return figures
    cal = {
        "provenance": {
            "command": figures["command"], "date": figures["date"],
            "data": "native profiles/RTXPRO6000 (Llama-3.1-8B, Qwen3-32B, Qwen3-30B-A3B; tp1, tp2), profiles/RTX4090 "
                    "(Llama-3.1-8B tp1); legacy profiles/legacy/A6000 (Llama-3.1-8B tp1), profiles/legacy/H100 "
                    "(Llama-3.1-70B tp4; Llama-3.1-8B tp1, tp2 and Mixtral-8x7B tp4 layers only); AIConfigurator "
                    "vLLM 0.19.0 bf16 gemm / context + generation attention / balanced fused MoE (ep 1) of "
                    + ", ".join(SYSTEMS) + f"; at most {args.max_rows} rows per table (seed 0)",
            "rows": counts,
            "loss": "mean squared log(pred/measured), each (hardware, operator class) group weighted equally; legacy "
                    "element-wise layers and legacy decode attention scored but not fitted (see the script)",
            "loho_iteration_median_rel_err": figures["iteration_loho"]["all"]["median"],
            "figures": "tests/data/roofline_fit.json",
        },
        "units": {"e_max": "fraction of peak FLOP/s", "f_half": "FLOPs at half compute efficiency",
                  "b_max": "fraction of peak memory bandwidth", "b_half": "bytes at half bandwidth efficiency",
                  "lat": "ns per kernel", "p": "p-norm exponent of (compute time, memory time)",
                  "l2_gain": "bandwidth gain over DRAM of bytes that fit in the sheet's L2 (l2_mib); memory class "
                             "only"},
        "classes": {c: {k: float(f"{v:.6g}") for k, v in row.items()} for c, row in eff_all.to_dict().items()},
    }
    Path(args.calibration_out).write_text(
        "# Roofline efficiency calibration (jaxsim/latency/roofline.py), written by scripts/fit_roofline.py.\n"
        + yaml.safe_dump(cal, sort_keys=False, width=110))
    Path(args.figures_out).write_text(json.dumps(figures, indent=1) + "\n")
    print(f"wrote {args.calibration_out} and {args.figures_out} ({time.time() - t0:.1f} s)")
    return figures


if __name__ == "__main__":
    main()
