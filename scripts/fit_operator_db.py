"""Fit and measure the operator-database converter's models; writes ``profiles/operator-db/fit.json``
and ``conf/hardware/{h100,h200,b200,gb200,rtxpro6000_opdb}.yaml``.

Three parts (module docstring of :mod:`jaxsim.operator_db` for how they are used):

1. **Bandwidth model** of the layers the tables lack, ``t = t0 + bytes / (eff * mem_bw)``, one
   ``(t0, eff)`` per operator class, fitted jointly on every native bundle of both GPUs we
   measured (``profiles/RTXPRO6000``: Llama-3.1-8B, Qwen3-32B, Qwen3-30B-A3B at TP 1 and 2;
   ``profiles/RTX4090``: Llama-3.1-8B TP 1), all their token / sequence keys. Least squares on
   the *relative* error (each row divided by the measured time), so small and large batches
   count alike. ``tp_stable`` layers are taken at TP 1 only (their TP 2 rows are copies).
   One class per operator: the per-operator kernels differ more than their byte counts say (a
   class ``norm`` of layernorm + final_layernorm + qk_norm fitted qk_norm at p50 51%: vLLM's
   per-head norm runs at about half the speed of the fused residual RMSNorm for the same bytes;
   a class ``elementwise`` of rotary_emb + act_fn was no better than per operator either). qk_norm
   exists on the RTX PRO 6000 only (Qwen3 was not run on the RTX 4090): its fit has no
   leave-one-hardware-out score. ``eff`` well above 1 means the kernel's input is still in L2
   (RTX PRO 6000 128 MB, RTX 4090 72 MB); one linear model cannot follow the step from L2 to DRAM
   speed, which is what act_fn's large error is (eff ~2 at 256 tokens, ~1 at 2048).
   Memory bandwidth: the RTX PRO 6000 spec sheet of AIConfigurator (1792 GB/s); RTX 4090
   1008 GB/s (NVIDIA Ada Lovelace whitepaper v1.01, Appendix A). Reported: the joint fit's error
   per class and GPU, and leave-one-hardware-out (fit on one GPU, score on the other).
2. **GEMM interpolation error**: per system, bfloat16, every interior n (then k) grid point
   is left out of the grid and predicted by :func:`jaxsim.operator_db.gemm_us` from the rest, at
   every m and every k (n) on the grid; median / p90 / p99 of |relative error|, all m and m >= 64.
   A left-out point doubles the bracketing gap, so this bounds the error at the real gaps from above.
3. **TP all-reduce link**: per system and GPU count N, the engine's ring model
   ``t = 2(N-1) * link_latency + 2(N-1)/N * S / link_bw`` (S = T*H*2 bytes) fitted by least squares
   on the relative error to vLLM's custom all-reduce table (**eager backend**: the native
   profiles and the engine's calibration are eager-mode timings, and the eager kernel includes
   the copy into the registered buffer that vLLM does outside CUDA graphs), interpolated log-log
   at the messages the shipped models produce: H in {2048, 4096, 5120, 8192} and T log-spaced
   over 1..8192 (``round(2**(j/16))``, deduplicated). The graph-backend fit is reported too.

4. **Attention combination** (``fit.json`` ``attention``), on the native attention tables of both
   GPUs (RTX PRO 6000: the three models at TP 1 and 2; RTX 4090: Llama-3.1-8B TP 1), each GPU
   weighted equally (least squares on the relative / log error), reported per GPU and model and
   leave-one-GPU-out:

   * ``prefill_latency``: a prefill chunk over a history is one query tile per head that streams
     all ``kp + pc`` keys on one SM (FlashAttention's varlen forward; no split over the keys), so
     its time is at least the same chunk without history plus the history's keys streamed,
     ``prefill(pc, 0) + gamma * kp * head_dim/128``, fitted on the prefill-only cells with
     pc <= 128 and kp >= 256 (where that path is the whole cost: the native times are flat in pc
     there), with the native ``prefill(pc, 0)``.
   * ``mixed``: vLLM runs a batch's prefill and decodes in one varlen call; the decodes then go
     through the prefill path: each is a query tile per *query* head (no GQA packing of the decode
     kernel, so the KV of a KV head is read by each of its G = num_heads/num_kv_heads query heads)
     and it streams its kvd keys without a split. Model, on the parts' times P (prefill-only) and
     D (decode-only): ``mixed = max(max(P, gamma_mix*kvd) + (1 + beta*(G-1))*D - c0, P, D)``
     (``c0``: the one kernel launch and metadata step the sum counts twice), fitted on the mixed
     cells with the native P and D at the same coordinates.

5. **Leave one GPU out** (``fit.json`` ``leave_out.RTXPRO6000``): every constant of parts 1 and 4
   refitted on the RTX 4090 alone (:func:`leave_out_fit`), so that the converted RTX PRO 6000 can be
   checked against the native one with constants that never saw it (``jaxsim.operator_db`` hardware
   ``rtxpro6000_opdb_loo``, ``scripts/crosscheck_operator_db.py``). qk_norm, never measured on the
   RTX 4090, borrows the RTX 4090's layernorm constants (recorded under ``borrowed``).

6. **MoE fallback** (``fit.json`` ``moe_fallback``, :func:`moe_fallback_fit`): for MoE shapes the
   fused-MoE table lacks, the converter composes the block from the GEMM table
   (:func:`jaxsim.operator_db.moe_fallback_us`) times a factor per system and dtype, fitted here on
   every ``moe_tp = 1`` shape and EP size of that system's table (median over shapes of each shape's
   median log(table / composed)). Reported against the table on its balanced path (the router GEMM
   included on both sides): the scaled fallback with each shape left out of the factor in turn
   (pooled and for Qwen3-30B-A3B and Mixtral-8x7B), the unscaled grouped composition, and the plain
   sum of ``ae`` separate expert GEMMs.

Usage: ``PYTHONPATH=. python scripts/fit_operator_db.py`` (about 30 s). Deterministic.
``--moe-fallback`` refits part 6 alone (about 9 s), leaving the rest of ``fit.json`` as it is.
"""

import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jaxsim import operator_db as odb  # noqa: E402
from jaxsim.model import load_model_config  # noqa: E402
from jaxsim.operators import layer_operators  # noqa: E402
from jaxsim.profiles import load_profile_bundle  # noqa: E402

PROFILES = ROOT / "profiles"
CLASSES = {name: name for name in ("embedding", "layernorm", "final_layernorm", "qk_norm", "rotary_emb", "act_fn",
                                   "sampler")}
NATIVE = {"RTXPRO6000": 1792e9, "RTX4090": 1008e9}  # bytes/s (module docstring)
AR_HIDDEN = (2048, 4096, 5120, 8192)  # hidden sizes of the shipped models
AR_T = sorted({int(round(2 ** (j / 16))) for j in range(0, 13 * 16 + 1)})  # 1 .. 8192, log-spaced


def _q(err) -> dict:
    e = np.abs(np.asarray(err, np.float64))
    return {"n": int(e.size), "p50": float(np.median(e)), "p90": float(np.quantile(e, 0.9)),
            "p99": float(np.quantile(e, 0.99)), "max": float(e.max())}


# ---------------------------------------------------------------------------------- bandwidth
def native_points() -> list:
    """``(gpu, class, layer, model, tp, x, bytes, t_us)`` rows of every native memory-bound layer."""
    rows = []
    for gpu, name, model, tp, _ in native_folders():
        b = load_profile_bundle(PROFILES, gpu, model, "bf16", tp)
        ops = layer_operators(model, tp)
        for layer, cls in CLASSES.items():
            tab = b.dense.get(layer) or b.per_sequence.get(layer)
            if tab is None or (tp != 1 and layer in b.tp_stable):
                continue
            x = tab.keys.astype(np.float64)
            for xi, by, t in zip(x, ops[layer].bytes(x), tab.values_ns / 1000.0):
                rows.append((gpu, cls, layer, name, tp, xi, float(by), float(t)))
    return rows


def native_folders():
    """``(gpu, model name, ModelConfig, tp, tp folder)`` of every native bf16 bundle of :data:`NATIVE`."""
    for gpu in NATIVE:
        for meta in sorted((PROFILES / gpu).glob("*/*/bf16/meta.yaml")):
            name = str(meta.parent.parent.relative_to(PROFILES / gpu))
            model = load_model_config(PROFILES / "models", name)
            for tpdir in sorted(meta.parent.glob("tp*")):
                yield gpu, name, model, int(tpdir.name[2:]), tpdir


def fit_class(pts: list) -> tuple:
    """``(t0_us, eff)`` minimising the relative error of ``t0 + bytes/(eff*bw)``."""
    A = np.array([[1.0, by / NATIVE[g] * 1e6] for g, _, _, _, _, _, by, _ in pts])
    t = np.array([p[-1] for p in pts])
    sol, *_ = np.linalg.lstsq(A / t[:, None], np.ones_like(t), rcond=None)
    t0, c = float(sol[0]), float(sol[1])
    if t0 < 0:  # keep the constant physical: refit the slope alone
        t0 = 0.0
        c = float(np.linalg.lstsq((A[:, 1] / t)[:, None], np.ones_like(t), rcond=None)[0][0])
    return t0, 1.0 / c


def rel_err(pts, t0, eff) -> np.ndarray:
    return np.array([(t0 + by / (eff * NATIVE[g]) * 1e6) / t - 1.0 for g, _, _, _, _, _, by, t in pts])


def bandwidth_fit() -> dict:
    pts = native_points()
    classes, joint, loho = {}, {}, {}
    for cls in sorted(set(CLASSES.values())):
        cp = [p for p in pts if p[1] == cls]
        t0, eff = fit_class(cp)
        classes[cls] = {"t0_us": round(t0, 6), "eff": round(eff, 6)}
        joint[cls] = {g: _q(rel_err([p for p in cp if p[0] == g], t0, eff)) for g in NATIVE
                      if any(p[0] == g for p in cp)}
        for train in NATIVE:
            test = [g for g in NATIVE if g != train][0]
            tr = [p for p in cp if p[0] == train]
            te = [p for p in cp if p[0] == test]
            if tr and te:
                a, e = fit_class(tr)
                loho.setdefault(cls, {})[f"fit {train} -> score {test}"] = {"t0_us": a, "eff": e,
                                                                            **_q(rel_err(te, a, e))}
    per_layer = {}
    for layer, cls in CLASSES.items():
        lp = [p for p in pts if p[2] == layer]
        if lp:
            per_layer[layer] = {g: _q(rel_err([p for p in lp if p[0] == g], classes[cls]["t0_us"], classes[cls]["eff"]))
                                for g in NATIVE if any(p[0] == g for p in lp)}
    return {
        "formula": "t_us = t0_us + bytes / (eff * mem_bw) * 1e6; bytes from jaxsim.operators.layer_operators",
        "classes": classes, "operator_class": CLASSES,
        "provenance": {"script": "scripts/fit_operator_db.py", "data": sorted({f"profiles/{p[0]}/{p[3]}/bf16/tp{p[4]}"
                                                                               for p in pts}),
                       "mem_bw_bytes_per_s": NATIVE, "points": len(pts),
                       "mem_bw_sources": {"RTXPRO6000": "profiles/operator-db/rtx_pro_6000_server/spec.yaml gpu.mem_bw",
                                          "RTX4090": "NVIDIA Ada Lovelace whitepaper v1.01, Appendix A"}},
        "joint_fit_rel_err": joint, "joint_fit_rel_err_per_layer": per_layer, "leave_one_hardware_out": loho,
    }


# ---------------------------------------------------------------------------------- attention
def native_attention() -> list:
    """``(gpu, model, tp, G, head_dim, mixed [N, 7], prefill [M, 3])``: per native attention table, the
    mixed cells as ``(pc, kp, nd, kvd, t, P, D)`` with the prefill-only ``P`` and decode-only ``D``
    times at the same coordinates, and the prefill-only cells ``(pc, kp, t)`` (µs)."""
    out = []
    for gpu, name, model, tp, tpdir in native_folders():
        a = np.loadtxt(tpdir / "attention.csv", delimiter=",", skiprows=1, ndmin=2)
        pre = {(int(r[0]), int(r[1])): r[4] for r in a if r[2] == 0}
        dec = {(int(r[2]), int(r[3])): r[4] for r in a if r[0] == 0}
        mix = [(*r[:5], pre[(int(r[0]), int(r[1]))], dec[(int(r[2]), int(r[3]))]) for r in a
               if r[0] > 0 and r[2] > 0 and (int(r[0]), int(r[1])) in pre and (int(r[2]), int(r[3])) in dec]
        out.append((gpu, name, tp, model.num_heads // model.num_kv_heads, model.head_dim,
                    np.array(mix, np.float64), np.array([(p, k, v) for (p, k), v in pre.items()], np.float64)))
    return out


def _latency_cells(tabs, gpus) -> list:
    """``(gpu, [N, 4] (pc, kp, t, prefill(pc, 0)), head_dim)`` per table."""
    out = []
    for g, _, _, _, hd, _, p in tabs:
        if g in gpus:
            p0 = {r[0]: r[2] for r in p if r[1] == 0}
            c = p[(p[:, 0] > 0) & (p[:, 0] <= 128) & (p[:, 1] >= 256) & np.isin(p[:, 0], list(p0))]
            out.append((g, np.column_stack([c, [p0[x] for x in c[:, 0]]]), hd))
    return out


def prefill_latency_model(c, hd, gamma) -> np.ndarray:
    return c[:, 3] + gamma * c[:, 1] * hd / 128.0


def fit_prefill_latency(tabs, gpus) -> tuple:
    """``gamma_us_per_key`` of ``prefill(pc, 0) + gamma*kp*hd/128`` (relative least squares, GPUs
    weighted equally)."""
    cells = _latency_cells(tabs, gpus)
    n = {g: sum(len(c) for gg, c, _ in cells if gg == g) for g in gpus}
    A = np.concatenate([(c[:, 1] * hd / 128 / c[:, 2]) / math.sqrt(n[g]) for g, c, hd in cells])[:, None]
    b = np.concatenate([(1.0 - c[:, 3] / c[:, 2]) / math.sqrt(n[g]) for g, c, _ in cells])
    return float(np.linalg.lstsq(A, b, rcond=None)[0][0])


def mixed_model(theta, G, P, D, kvd) -> np.ndarray:
    """The mixed-batch combination (module docstring); the same formula as
    :func:`jaxsim.operator_db.mixed_us`."""
    return odb.mixed_us(P, D, kvd, G, {"gamma_us_per_key": theta[0], "beta": theta[1], "c0_us": theta[2]})


def fit_mixed(tabs, gpus) -> tuple:
    from scipy.optimize import least_squares

    sel = [t for t in tabs if t[0] in gpus]
    n = {g: sum(len(t[5]) for t in sel if t[0] == g) for g in gpus}

    def resid(th):
        return np.concatenate([np.log(mixed_model(th, G, m[:, 5], m[:, 6], m[:, 3]) / m[:, 4]) / math.sqrt(n[g])
                               for g, _, _, G, _, m, _ in sel])
    r = least_squares(resid, [0.02, 0.3, 5.0], bounds=([0.0, 0.0, 0.0], [1.0, 4.0, 50.0]))
    return tuple(float(x) for x in r.x)


def _signed(e) -> dict:
    return {**_q(e), "signed_median": float(np.median(e))}


def attention_fit() -> dict:
    tabs = native_attention()
    gpus = tuple(NATIVE)
    g = fit_prefill_latency(tabs, gpus)
    th = fit_mixed(tabs, gpus)
    res = {"prefill_latency": {"gamma_us_per_key": round(g, 6),
                               "formula": "prefill(pc, kp) >= prefill(pc, 0) + gamma_us_per_key * kp * head_dim / 128",
                               "cells": "native prefill-only cells with 0 < pc <= 128, kp >= 256"},
           "mixed": {"gamma_us_per_key": round(th[0], 6), "beta": round(th[1], 6), "c0_us": round(th[2], 4),
                     "formula": "max(max(P, gamma_us_per_key*kvd) + (1 + beta*(G-1))*D - c0_us, P, D); "
                                "G = num_heads / num_kv_heads"},
           "provenance": {"script": "scripts/fit_operator_db.py",
                          "data": sorted({f"profiles/{t[0]}/{t[1]}/bf16/tp{t[2]}/attention.csv" for t in tabs}),
                          "weighting": "each GPU's cells weighted equally"},
           "joint_fit_rel_err": {}, "leave_one_gpu_out": {}}
    for gpu, name, tp, G, hd, m, p in tabs:
        key = f"{gpu} {name} tp{tp}"
        c = _latency_cells([(gpu, name, tp, G, hd, m, p)], (gpu,))[0][1]
        res["joint_fit_rel_err"][key] = {
            "prefill_latency": _signed(prefill_latency_model(c, hd, g) / c[:, 2] - 1.0),
            "mixed_sum_of_parts": _signed((m[:, 5] + m[:, 6]) / m[:, 4] - 1.0),
            "mixed_model": _signed(mixed_model(th, G, m[:, 5], m[:, 6], m[:, 3]) / m[:, 4] - 1.0)}
    for train in gpus:
        test = [x for x in gpus if x != train][0]
        b = fit_prefill_latency(tabs, (train,))
        tt = fit_mixed(tabs, (train,))
        cells = _latency_cells(tabs, (test,))
        ep = np.concatenate([prefill_latency_model(c, hd, b) / c[:, 2] - 1.0 for _, c, hd in cells])
        em = np.concatenate([mixed_model(tt, G, m[:, 5], m[:, 6], m[:, 3]) / m[:, 4] - 1.0
                             for gg, _, _, G, _, m, _ in tabs if gg == test])
        res["leave_one_gpu_out"][f"fit {train} -> score {test}"] = {
            "prefill_latency": {"gamma_us_per_key": b, **_signed(ep)},
            "mixed": {"gamma_us_per_key": tt[0], "beta": tt[1], "c0_us": tt[2], **_signed(em)}}
    return res


# --------------------------------------------------------------------------------------- GEMM
def gemm_loo(system: str) -> dict:
    grid = odb.GemmGrid(str(PROFILES / "operator-db" / system / "gemm.csv.gz"), "bfloat16")
    errs, errs64 = [], []
    big = grid.m >= 64
    for axis in ("n", "k"):
        vals = grid.n if axis == "n" else grid.k
        for i in range(1, len(vals) - 1):
            keep = [j for j in range(len(vals)) if j != i]
            for other in range(len(grid.k if axis == "n" else grid.n)):
                n, k = (vals[i], grid.k[other]) if axis == "n" else (grid.n[other], vals[i])
                pred, _ = odb.gemm_us(grid, n, k, n_axis=keep if axis == "n" else None,
                                      k_axis=keep if axis == "k" else None)
                true = grid.us[:, i, other] if axis == "n" else grid.us[:, other, i]
                ok = np.isfinite(pred) & np.isfinite(true)
                errs += list(pred[ok] / true[ok] - 1.0)
                errs64 += list(pred[ok & big] / true[ok & big] - 1.0)
    return {"all_m": _q(errs), "m_ge_64": _q(errs64)}


# --------------------------------------------------------------------------------- all-reduce
def allreduce_fit(system: str) -> dict:
    t = odb.read_table(str(PROFILES / "operator-db" / system / "allreduce.csv"))
    out = {}
    S = np.array([T * H * 2.0 for H in AR_HIDDEN for T in AR_T])  # bytes
    for backend in ("vllm_eager", "vllm_graph"):
        for N in sorted(set(t["num_gpus"].astype(int).tolist())):
            m = (t["backend"] == backend) & (t["num_gpus"] == N)
            if not m.any():
                continue
            o = np.argsort(t["message_size"][m])
            xs, ys = t["message_size"][m][o] * 2.0, t["time_us"][m][o] * 1000.0  # bytes, ns
            meas = np.exp(np.interp(np.log(S), np.log(xs), np.log(ys)))
            A = np.stack([np.full_like(S, 2.0 * (N - 1)), 2.0 * (N - 1) / N * S], axis=1)
            sol, *_ = np.linalg.lstsq(A / meas[:, None], np.ones_like(S), rcond=None)
            lat, inv_bw = float(sol[0]), float(sol[1])
            bw = 1.0 / inv_bw  # bytes/ns = GB/s
            pred = A @ np.array([lat, inv_bw])
            out.setdefault(backend, {})[str(N)] = {"link_latency_ns": round(lat, 1), "link_bw_gbps": round(bw, 2),
                                                   "rel_err": _q(pred / meas - 1.0),
                                                   "message_bytes": [float(S.min()), float(S.max())],
                                                   "table_bytes": [float(xs.min()), float(xs.max())]}
    return out


YAML = """# {title}: AIConfigurator's measured vLLM 0.19.0 operator tables converted at load time
# (profiles/operator-db/{system}, jaxsim/operator_db.py). Written by scripts/fit_operator_db.py: do not edit.
name: {name}
mem_size_gb: {mem}  # read as GiB (REFERENCE.md §0); spec.yaml gpu.mem_capacity = {cap} bytes
mem_util: 0.9  # vLLM gpu_memory_utilization (default)
num_gpu_blocks: null  # explicit KV block count; null = from the memory model
activation_reserve_gb: 0.0  # activation peak + CUDA graphs + non-torch memory per rank
tp: 1
# TP collectives: null = the ring model fitted to vLLM's custom all-reduce table (eager backend) at the
# run's TP degree (jaxsim.operator_db.hardware_defaults; profiles/operator-db/fit.json allreduce), over
# the shipped models' messages (T*H*2 bytes, T = 1..8192):{others}
link_bw_gbps: null
link_latency_ns: null
cpu_mem_bw_gbps: {pcie}  # host memory over PCIe: spec.yaml node.pcie_bw
cpu_mem_latency_ns: 0
"""


def write_yaml(hw: str, system: str, ar: dict) -> None:
    spec = odb.spec_sheet(PROFILES / "operator-db" / system)
    eager = ar["vllm_eager"]
    others = "".join(f"\n#   TP {n}: link_bw_gbps {v['link_bw_gbps']}, link_latency_ns {v['link_latency_ns']} "
                     f"(relative error p50 {v['rel_err']['p50']:.1%}, p90 {v['rel_err']['p90']:.1%})"
                     for n, v in eager.items())
    cap = int(spec["gpu"]["mem_capacity"])
    text = YAML.format(title=spec_title(system), system=system, name=hw, mem=round(cap / 2 ** 30, 2), cap=cap,
                       others=others, pcie=round(float(spec["node"]["pcie_bw"]) / 1e9, 1))
    (ROOT / "conf" / "hardware" / f"{hw}.yaml").write_text(text)


def spec_title(system: str) -> str:
    return {"h100_sxm": "One NVIDIA H100 SXM 80 GB", "h200_sxm": "One NVIDIA H200 SXM 141 GB",
            "b200_sxm": "One NVIDIA B200 SXM", "gb200": "One NVIDIA GB200 (one Blackwell GPU)",
            "rtx_pro_6000_server": "One NVIDIA RTX PRO 6000 Blackwell Server Edition (converted; the "
                                   "native bundle is RTXPRO6000)"}[system]


# ------------------------------------------------------------------------------ leave one GPU out
LEAVE_OUT = ("RTXPRO6000",)  # native GPUs with a converted twin (jaxsim.operator_db.LEAVE_OUT_HARDWARE)
BORROW = {"qk_norm": "layernorm"}  # class -> the class whose constants stand in where a GPU set lacks it


def leave_out_fit(left_out: str) -> dict:
    """Every native-fitted constant of the converter refitted without GPU ``left_out``: the
    bandwidth classes (t0, eff), the prefill-latency gamma and the mixed-batch (gamma_mix, beta, c0),
    by the same fits as the joint set (:func:`fit_class`, :func:`fit_prefill_latency`,
    :func:`fit_mixed`) on the remaining GPUs' rows. A class none of them measured (qk_norm: Qwen3 ran
    on the RTX PRO 6000 only) takes the constants of :data:`BORROW`'s class, recorded as such.
    Same rounding as the joint set. ``jaxsim.operator_db`` serves it as hardware
    ``<converted twin>_loo``."""
    gpus = tuple(g for g in NATIVE if g != left_out)
    pts = [p for p in native_points() if p[0] in gpus]
    classes, borrowed = {}, {}
    for cls in sorted(set(CLASSES.values())):
        cp = [p for p in pts if p[1] == cls]
        if cp:
            t0, eff = fit_class(cp)
            classes[cls] = {"t0_us": round(t0, 6), "eff": round(eff, 6)}
    for cls in sorted(set(CLASSES.values())):
        if cls not in classes:
            src = BORROW.get(cls)
            if src not in classes:
                raise SystemExit(f"leave out {left_out}: no rows of class {cls!r} and nothing to borrow")
            classes[cls] = dict(classes[src])
            borrowed[cls] = f"{src} (no {cls} rows on {', '.join(gpus)})"
    tabs = [t for t in native_attention() if t[0] in gpus]
    g = fit_prefill_latency(tabs, gpus)
    th = fit_mixed(tabs, gpus)
    return {
        "fitted_on": list(gpus),
        "bandwidth": {"classes": classes, "borrowed": borrowed},
        "attention": {"prefill_latency": {"gamma_us_per_key": round(g, 6)},
                      "mixed": {"gamma_us_per_key": round(th[0], 6), "beta": round(th[1], 6), "c0_us": round(th[2], 4)}},
        "provenance": {"script": "scripts/fit_operator_db.py (leave_out_fit)", "left_out": left_out,
                       "data": sorted({f"profiles/{p[0]}/{p[3]}/bf16/tp{p[4]}" for p in pts}
                                      | {f"profiles/{t[0]}/{t[1]}/bf16/tp{t[2]}/attention.csv" for t in tabs}),
                       "formulas": "as the joint set (bandwidth.formula, attention.*.formula)"},
    }


MOE_MODELS = ("Qwen/Qwen3-30B-A3B-Instruct-2507", "mistralai/Mixtral-8x7B-v0.1")  # shipped MoE models the table holds


def _moe_cases(system: str, dtype: str, act: dict, form: str = "grouped") -> list:
    """``[(shape, ep, T, table µs, composed µs, router µs)]``: every ``moe_tp = 1`` shape and EP size of
    the system's fused-MoE table in ``dtype``, at its token counts, with the grouped composition
    (:func:`jaxsim.operator_db.moe_fallback_us`, unscaled) and the router GEMM."""
    sdir = PROFILES / "operator-db" / system
    t = odb.read_table(str(sdir / "moe.csv.gz"))
    bw = float(odb.spec_sheet(sdir)["gpu"]["mem_bw"])
    grid = odb.GemmGrid(str(sdir / "gemm.csv.gz"), dtype)
    base = load_model_config(PROFILES / "models", MOE_MODELS[0])
    b = (t["moe_dtype"] == dtype) & (t["moe_tp_size"] == 1)
    out = []
    for sh in sorted({tuple(int(v) for v in r) for r in zip(*(t[c][b] for c in (
            "hidden_size", "inter_size", "topk", "num_experts", "moe_ep_size")))}):
        H, I, k, E, ep = sh
        model = dataclasses.replace(base, hidden_size=H, moe_intermediate_size=I, experts_per_token=k, num_experts=E)
        sel = odb.moe_shape_rows(t, model, ep, dtype)
        T, tab = t["num_tokens"][sel], t["time_us"][sel]
        comp, _ = odb.moe_fallback_us(grid, model, ep, T, act, bw, 1 if dtype == "fp8" else 2, form)
        r, _ = odb.gemm_us(grid, E, H)
        ok = np.isfinite(r)
        out.append(((H, I, k, E), ep, T, tab, comp, np.interp(T, grid.m[ok], r[ok])))
    return out


def _scale(cases, shapes) -> float:
    """exp(median over ``shapes`` of each shape's median log(table / composed)): each shape counts once."""
    return float(np.exp(np.median([np.median(np.concatenate([np.log(c[3] / c[4]) for c in cases if c[0] == s]))
                                   for s in shapes])))


def moe_fallback_fit(act: dict) -> dict:
    """``fit.json`` ``moe_fallback``: the fused-MoE kernel's time over the grouped GEMM composition
    (:func:`jaxsim.operator_db.moe_fallback_us`), one factor per system and dtype, fitted on every
    shape of its MoE table (median of the per-shape median log ratios), and the error of the
    fallback block (router included) against the table on the balanced path: every shape left out
    in turn (the factor refitted on the others), pooled and for the shipped MoE models; plus the
    unscaled composition's error (what the factor corrects), and that of the plain sum of ``ae``
    separate expert GEMMs (``form="sum"``: no launch removed). ``act``: ``bandwidth.classes.act_fn``."""
    out = {"formula": "scale[system][dtype] * grouped composition (jaxsim.operator_db.moe_fallback_us) + router GEMM",
           "fit": "scale = exp(median over table shapes of median log(table/composed)), moe_tp 1, every moe_ep",
           "scale": {}, "leave_one_shape_out": {}, "unscaled": {}, "unscaled_sum": {}}
    for system in odb.HARDWARE.values():
        for dtype in ("bfloat16", "fp8"):
            cases = _moe_cases(system, dtype, act)
            sums = _moe_cases(system, dtype, act, "sum")
            if not cases:
                continue
            shapes = sorted({c[0] for c in cases})
            out["scale"].setdefault(system, {})[dtype] = round(_scale(cases, shapes), 4)
            loso, raw, plain = {}, {}, {}
            for s in shapes:
                sc = _scale(cases, [x for x in shapes if x != s])
                mine = [c for c in cases if c[0] == s]
                loso[s] = np.concatenate([(sc * c[4] + c[5]) / (c[3] + c[5]) - 1.0 for c in mine])
                raw[s] = np.concatenate([(c[4] + c[5]) / (c[3] + c[5]) - 1.0 for c in mine])
                plain[s] = np.concatenate([(c[4] + c[5]) / (c[3] + c[5]) - 1.0 for c in sums if c[0] == s])
            named = {}
            for name in MOE_MODELS:
                m = load_model_config(PROFILES / "models", name)
                named[name] = (m.hidden_size, m.moe_intermediate_size, m.experts_per_token, m.num_experts)
            for tgt, errs in ((out["leave_one_shape_out"], loso), (out["unscaled"], raw), (out["unscaled_sum"], plain)):
                d = {"all_shapes": {**_q(np.concatenate(list(errs.values()))), **_signed(np.concatenate(list(errs.values())))}}
                for name, s in named.items():
                    if s in errs:
                        d[name] = {**_q(errs[s]), **_signed(errs[s])}
                tgt.setdefault(system, {})[dtype] = d
    return out


def main() -> None:
    if sys.argv[1:] == ["--moe-fallback"]:  # refit only fit.json moe_fallback (the rest unchanged)
        path = PROFILES / "operator-db" / odb.FIT_FILE
        out = json.loads(path.read_text())
        out["moe_fallback"] = moe_fallback_fit(out["bandwidth"]["classes"]["act_fn"])
        path.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
        print_moe_fallback(out["moe_fallback"])
        print("wrote", path)
        return
    out = {"bandwidth": bandwidth_fit(), "attention": attention_fit(), "gemm_interpolation": {}, "allreduce": {},
           "allreduce_messages": {"hidden_sizes": list(AR_HIDDEN), "tokens": "round(2**(j/16)), j = 0..208"},
           "leave_out": {g: leave_out_fit(g) for g in LEAVE_OUT}}
    out["moe_fallback"] = moe_fallback_fit(out["bandwidth"]["classes"]["act_fn"])
    for hw, system in odb.HARDWARE.items():
        out["gemm_interpolation"][system] = gemm_loo(system)
        out["allreduce"][system] = allreduce_fit(system)
        write_yaml(hw, system, out["allreduce"][system])
    path = PROFILES / "operator-db" / odb.FIT_FILE
    path.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    bw = out["bandwidth"]
    print("bandwidth classes:", json.dumps(bw["classes"]))
    for cls, d in bw["joint_fit_rel_err"].items():
        print(f"  joint {cls:12s}", {g: f"p50 {v['p50']:.1%} p90 {v['p90']:.1%}" for g, v in d.items()})
    for cls, d in bw["leave_one_hardware_out"].items():
        for k, v in d.items():
            print(f"  LOHO {cls:12s} {k}: t0 {v['t0_us']:.2f} us eff {v['eff']:.2f}  p50 {v['p50']:.1%} "
                  f"p90 {v['p90']:.1%}")
    at = out["attention"]
    print("attention: prefill latency", json.dumps({k: at["prefill_latency"][k] for k in ("gamma_us_per_key",)}),
          "mixed", json.dumps({k: at["mixed"][k] for k in ("gamma_us_per_key", "beta", "c0_us")}))
    for k, d in at["joint_fit_rel_err"].items():
        print(f"  joint {k:55s}", {x: f"p50 {v['p50']:.1%} signed {v['signed_median']:+.1%}" for x, v in d.items()})
    for k, d in at["leave_one_gpu_out"].items():
        print(f"  LOGO {k}:", {x: f"p50 {v['p50']:.1%} p90 {v['p90']:.1%} signed {v['signed_median']:+.1%}"
                               for x, v in d.items()})
    for g, d in out["leave_out"].items():
        print(f"leave out {g} (fit on {', '.join(d['fitted_on'])}): bandwidth", json.dumps(d["bandwidth"]["classes"]),
              "borrowed", json.dumps(d["bandwidth"]["borrowed"]), "attention", json.dumps(d["attention"]))
    for s, d in out["gemm_interpolation"].items():
        print(f"gemm LOO {s:20s} all m: p50 {d['all_m']['p50']:.1%} p90 {d['all_m']['p90']:.1%}; "
              f"m>=64: p50 {d['m_ge_64']['p50']:.1%} p90 {d['m_ge_64']['p90']:.1%}")
    for s, d in out["allreduce"].items():
        for be, per in d.items():
            for n, v in per.items():
                print(f"allreduce {s:20s} {be:10s} N={n}: bw {v['link_bw_gbps']} GB/s lat {v['link_latency_ns']} ns "
                      f"p50 {v['rel_err']['p50']:.1%} p90 {v['rel_err']['p90']:.1%} max {v['rel_err']['max']:.1%}")
    print_moe_fallback(out["moe_fallback"])
    print("wrote", path)


def print_moe_fallback(d: dict) -> None:
    for system, per in d["scale"].items():
        for dtype, sc in per.items():
            for key in ("unscaled_sum", "unscaled", "leave_one_shape_out"):
                for what, v in d[key][system][dtype].items():
                    print(f"moe fallback {system:20s} {dtype:8s} scale {sc:.3f} {key:19s} {what:34s} p50 {v['p50']:6.1%} "
                          f"p90 {v['p90']:6.1%} signed median {v['signed_median']:+6.1%}")


if __name__ == "__main__":
    main()
