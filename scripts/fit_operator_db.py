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

Usage: ``PYTHONPATH=. python scripts/fit_operator_db.py`` (about 20 s). Deterministic.
"""

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
    for gpu in NATIVE:
        for meta in sorted((PROFILES / gpu).glob("*/*/bf16/meta.yaml")):
            name = str(meta.parent.parent.relative_to(PROFILES / gpu))
            model = load_model_config(PROFILES / "models", name)
            for tpdir in sorted(meta.parent.glob("tp*")):
                tp = int(tpdir.name[2:])
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
# TP collectives: ring model fitted to vLLM's custom all-reduce table (eager backend) at TP {N}
# over the shipped models' messages (T*H*2 bytes, T = 1..8192): relative error p50 {p50:.1%}, p90 {p90:.1%}
# (profiles/operator-db/fit.json allreduce). For other TP degrees set hardware.link_bw_gbps /
# hardware.link_latency_ns to:{others}
link_bw_gbps: {bw}
link_latency_ns: {lat}
cpu_mem_bw_gbps: {pcie}  # host memory over PCIe: spec.yaml node.pcie_bw
cpu_mem_latency_ns: 0
"""


def write_yaml(hw: str, system: str, ar: dict) -> None:
    spec = odb.spec_sheet(PROFILES / "operator-db" / system)
    eager = ar["vllm_eager"]
    N = "2"
    others = "".join(f"\n#   TP {n}: link_bw_gbps {v['link_bw_gbps']}, link_latency_ns {v['link_latency_ns']} "
                     f"(p50 {v['rel_err']['p50']:.1%}, p90 {v['rel_err']['p90']:.1%})" for n, v in eager.items()
                     if n != N) or " (the table holds TP 2 only)"
    cap = int(spec["gpu"]["mem_capacity"])
    text = YAML.format(title=spec_title(system), system=system, name=hw, mem=round(cap / 2 ** 30, 2), cap=cap, N=N,
                       p50=eager[N]["rel_err"]["p50"], p90=eager[N]["rel_err"]["p90"], others=others,
                       bw=eager[N]["link_bw_gbps"], lat=eager[N]["link_latency_ns"],
                       pcie=round(float(spec["node"]["pcie_bw"]) / 1e9, 1))
    (ROOT / "conf" / "hardware" / f"{hw}.yaml").write_text(text)


def spec_title(system: str) -> str:
    return {"h100_sxm": "One NVIDIA H100 SXM 80 GB", "h200_sxm": "One NVIDIA H200 SXM 141 GB",
            "b200_sxm": "One NVIDIA B200 SXM", "gb200": "One NVIDIA GB200 (one Blackwell GPU)",
            "rtx_pro_6000_server": "One NVIDIA RTX PRO 6000 Blackwell Server Edition (converted; the "
                                   "native bundle is RTXPRO6000)"}[system]


def main() -> None:
    out = {"bandwidth": bandwidth_fit(), "gemm_interpolation": {}, "allreduce": {},
           "allreduce_messages": {"hidden_sizes": list(AR_HIDDEN), "tokens": "round(2**(j/16)), j = 0..208"}}
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
    for s, d in out["gemm_interpolation"].items():
        print(f"gemm LOO {s:20s} all m: p50 {d['all_m']['p50']:.1%} p90 {d['all_m']['p90']:.1%}; "
              f"m>=64: p50 {d['m_ge_64']['p50']:.1%} p90 {d['m_ge_64']['p90']:.1%}")
    for s, d in out["allreduce"].items():
        for be, per in d.items():
            for n, v in per.items():
                print(f"allreduce {s:20s} {be:10s} N={n}: bw {v['link_bw_gbps']} GB/s lat {v['link_latency_ns']} ns "
                      f"p50 {v['rel_err']['p50']:.1%} p90 {v['rel_err']['p90']:.1%} max {v['rel_err']['max']:.1%}")
    print("wrote", path)


if __name__ == "__main__":
    main()
