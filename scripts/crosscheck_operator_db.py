"""Cross-check of a converted operator database on the GPU we measured (issue 15, part 1).

Hardware ``rtxpro6000_opdb`` is the RTX PRO 6000 Blackwell Server converted from NVIDIA
AIConfigurator's operator tables by :mod:`jaxsim.operator_db`; ``RTXPRO6000`` is the native bundle
measured by the vLLM layerwise profiler on the same GPU model. Three measurements, all
``err = converted / native - 1``:

1. **Table by table**, for every model and TP degree of the native bundles (Llama-3.1-8B,
   Qwen3-32B, Qwen3-30B-A3B-Instruct-2507 at TP 1 and 2), both loaded with
   :func:`jaxsim.profiles.load_profile_bundle` (variant bf16), at the **native grid's points**:

   * dense layers at the native token keys, per-sequence layers at its sequence keys; the
     converted value by the engine's 1-D lookup (REFERENCE.md §2.4, re-implemented in numpy:
     clamp below, linear between keys, linear extrapolation above). Kinds: ``gemm`` and
     ``memory`` (:func:`jaxsim.operators.layer_operators`' kind of the layer). The memory-bound
     layers' joint constants were fitted on these very native tables (with the RTX 4090's:
     ``scripts/fit_operator_db.py``), so their joint figures are in-sample (the left-out run below
     is not);
   * attention at every ``(pc, kp, nd, kvd)`` point of the native table; the converted value by
     the engine's own lookup (:func:`jaxsim.latency.latency_tables` of the converted bundle, then
     the per-layer attention term of ``jaxsim.latency.profile._components``, jitted and vmapped,
     with ``kvd_min = kvd_max = kvd`` so no skew correction applies). The native value is the
     table's; the same lookup on the native tables is checked to return it exactly. Kinds:
     ``attention_prefill`` (nd = 0), ``attention_decode`` (pc = 0), ``attention_mixed``;
   * MoE (Qwen3-30B-A3B) at every ``(tokens, activated_experts)`` point of the native MoE table
     (§2.7 lookup in numpy): ``moe`` all points, ``moe_balanced_path`` the points the engine's
     BALANCED closed form can query at the bundle's EP degree (= TP), where the converted table
     is exact rather than a constant extension.

2. **Whole iterations** over the validation run's batch shapes: the RTX PRO 6000 validation case
   (``profiles/validation/RTXPRO6000-Llama-3.1-8B``) simulated with the native bundle
   (``scripts/validate.py``'s machinery); each iteration's batch shape ``(T, S, pc, kp, nd,
   kvd_sum, kvd_min, kvd_max)`` is rebuilt from the SimResult (decodes from the token emission
   times, prefill chunks from each request's first-scheduled and first-token iterations and its
   prefix hits); the native tables priced at the rebuilt shapes must reproduce the run's
   ``iter_busy_ns`` exactly (checked: the rebuild is right). Every shape is then priced with both
   bundles' :class:`jaxsim.latency.profile.LatencyTables` (``jax.jit(jax.vmap(iteration_time))``),
   the case's own hardware knobs, only the hardware name differing.

3. **The validation run simulated with the converted bundle**: the same case, its config.json's
   hardware ``RTXPRO6000`` replaced by ``rtxpro6000_opdb`` (a copy of the case folder; everything
   else the case's own, memory 96 GiB included), scored by ``scripts/validate.py``: its 15
   statistics (TTFT, TPOT, E2E x mean, median, P90, P95, P99) against the real measurement, next
   to the native bundle's.

**Twice**: with the converter's default constants (``rtxpro6000_opdb``: the bandwidth model, the
prefill-latency ``gamma`` and the mixed-batch constants fitted jointly on the native RTX PRO 6000
*and* RTX 4090 tables, so partly in-sample here), and with the same constants refitted with the
RTX PRO 6000 left out (``rtxpro6000_opdb_loo``: RTX 4090 alone, ``fit.json``
``leave_out.RTXPRO6000``; :mod:`jaxsim.operator_db` "Constant sets"): the out-of-sample transfer
figure. The GEMM, decode-attention and MoE tables use no fitted constant and come out the same
in both. The engine-cost calibration (``jaxsim.spec.Calibration``, fitted jointly on the
development cases including this one) is the same for both bundles and both runs.

Writes ``tests/data/opdb_crosscheck.json`` (top level: the joint constants; block
``leave_out_RTXPRO6000``: the left-out ones; each with ``constants``: the set it used) and prints
the tables.

Usage: ``PYTHONPATH=. python scripts/crosscheck_operator_db.py [--out PATH]`` (both constant
sets: 85 s on 2 cores with ``--no-compile-cache``, 33 s with the JAX compilation cache warm).
Deterministic: a rerun writes the same figures (``wall_s`` aside).
"""

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxsim import compile_cache, latency, planning, validation  # noqa: E402
from jaxsim.latency.profile import _components  # noqa: E402
from jaxsim.model import load_model_config  # noqa: E402
from jaxsim.operators import layer_operators  # noqa: E402
from jaxsim.profiles import load_profile_bundle  # noqa: E402
from jaxsim.spec import HardwareConfig  # noqa: E402

PROFILES = ROOT / "profiles"
NATIVE, CONVERTED, CONVERTED_LOO = "RTXPRO6000", "rtxpro6000_opdb", "rtxpro6000_opdb_loo"
LOO_KEY = "leave_out_RTXPRO6000"  # the JSON block of the left-out constants
MODELS = ("meta-llama/Llama-3.1-8B", "Qwen/Qwen3-32B", "Qwen/Qwen3-30B-A3B-Instruct-2507")
CASE = PROFILES / "validation" / "RTXPRO6000-Llama-3.1-8B"
VARIANT = "bf16"
KINDS = ("gemm", "memory", "attention_prefill", "attention_decode", "attention_mixed", "moe", "moe_balanced_path")
STATS15 = tuple(f"{m}_{s}" for m in ("ttft", "tpot", "e2e") for s in ("mean", "median", "p90", "p95", "p99"))


# ------------------------------------------------------------------------------------ statistics
def error_stats(err) -> dict:
    """``n``, ``p50`` / ``p90`` / ``max`` of ``|err|`` and ``signed_median`` of ``err`` (relative
    errors converted/native - 1); None for no points."""
    e = np.asarray(err, np.float64)
    if e.size == 0:
        return None
    a = np.abs(e)
    return {"n": int(e.size), "p50": float(np.median(a)), "p90": float(np.percentile(a, 90)), "max": float(a.max()),
            "signed_median": float(np.median(e))}


def rel_err(converted, native) -> np.ndarray:
    return np.asarray(converted, np.float64) / np.asarray(native, np.float64) - 1.0


# ------------------------------------------------------------------------------ 1-D lookups (numpy)
def lookup_1d(keys, values, q) -> np.ndarray:
    """REFERENCE.md §2.4 on sorted ``keys``: clamp below the first key, linear between keys, linear
    extrapolation from the last two above the last; ``max(1, trunc(v))`` as the engine returns."""
    keys, values, q = (np.asarray(x, np.float64) for x in (keys, values, q))
    v = np.interp(q, keys, values)
    if len(keys) > 1:
        above = q > keys[-1]
        slope = (values[-1] - values[-2]) / (keys[-1] - keys[-2])
        v = np.where(above, values[-1] + slope * (q - keys[-1]), v)
    return np.maximum(np.trunc(v), 1.0)


def moe_lookup(mo, tokens, ae) -> np.ndarray:
    """REFERENCE.md §2.7 on a :class:`jaxsim.profiles.MoETable`: bracket ``ae`` on its axis (clamp
    below, extrapolate above), a 1-D token lookup on each bracketing row's own keys, then linear
    across ``ae``."""
    axis = mo.ae_axis.astype(np.float64)
    rows = [lookup_1d(mo.token_keys[i, :mo.n_tokens[i]], mo.values_ns[i, :mo.n_tokens[i]], tokens)
            for i in range(len(axis))]
    out = np.empty(len(tokens))
    for j, a in enumerate(np.asarray(ae, np.float64)):
        if a <= axis[0] or len(axis) == 1:
            out[j] = rows[0][j]
            continue
        hi = min(int(np.searchsorted(axis, a)), len(axis) - 1)
        if a > axis[-1]:
            hi = len(axis) - 1
        lo = hi - 1 if axis[hi] != a else hi
        t = 0.0 if lo == hi else (a - axis[lo]) / (axis[hi] - axis[lo])
        out[j] = rows[lo][j] + t * (rows[hi][j] - rows[lo][j])
    return np.maximum(np.trunc(out), 1.0)


def balanced_path(model, ep: int, max_tokens: int = 8192) -> set:
    """The ``(tokens, activated_experts)`` pairs the engine's BALANCED closed form queries at EP
    degree ``ep`` (jaxsim/latency/profile.py ``_components``) for T = 1..max_tokens."""
    T = np.arange(1, max_tokens + 1, dtype=np.float64)
    k, E = model.experts_per_token, model.num_experts
    ae = np.maximum(np.minimum(np.round(T * k / ep), E / ep), 1.0)
    tok = np.maximum(np.round(T * (1.0 - ((ep - 1) / ep) ** k)), 1.0)
    return set(zip(tok.astype(int).tolist(), ae.astype(int).tolist()))


# ----------------------------------------------------------------------------- attention lookups
def attention_points(at) -> np.ndarray:
    """Every measured point of a native :class:`jaxsim.profiles.AttentionTable` as int64
    ``[N, 5]`` rows ``(pc, kp, nd, kvd, time_ns)``."""
    rows = []
    for i, j in zip(*np.nonzero(at.has_slice)):
        for r in range(at.n_kp[i, j]):
            for c in range(at.n_kvd[i, j, r]):
                rows.append((at.pc_axis[i], at.kp_keys[i, j, r], at.nd_axis[j], at.kvd_keys[i, j, r, c],
                             at.values_ns[i, j, r, c]))
    return np.array(rows, np.int64)


@jax.jit
def _attention_ns(tb, pc, kp, nd, kvd):
    """One attention layer's time and its extrapolation flag at each point, by the engine's own
    lookup (``_components``): T = pc + nd tokens, S = nd + (pc > 0) sequences, every decode at kvd
    (kvd_min = kvd_max = kvd: no skew correction)."""
    def one(pc, kp, nd, kvd):
        c = _components(tb, pc + nd, nd + (pc > 0), pc, kp, nd, nd * kvd, jnp.where(nd > 0, kvd, 0),
                        jnp.where(nd > 0, kvd, 0))
        return c.t_att, c.extrapolated[2]
    return jax.vmap(one)(pc, kp, nd, kvd)


def tables_of(bundle, model, tp: int):
    return latency.latency_tables(bundle, model, HardwareConfig(name=bundle.hardware, tp=tp), weight_bytes=2)


# -------------------------------------------------------------------------------- 1. table by table
def compare_tables(profiles=PROFILES, models=MODELS, converted=CONVERTED) -> dict:
    """Part 1: ``{model: {"tp<N>": {"kinds": {kind: stats}, "layers": {layer: stats}, ...}}}``."""
    out = {}
    for name in models:
        model = load_model_config(profiles / "models", name)
        out[name] = {}
        for tp in (1, 2):
            try:
                nb = load_profile_bundle(profiles, NATIVE, model, VARIANT, tp)
            except Exception:  # noqa: BLE001 - a TP degree the native profiles lack is skipped
                continue
            cb = load_profile_bundle(profiles, converted, model, VARIANT, tp)
            ops = layer_operators(model, tp)
            errs = {k: [] for k in KINDS}
            layers = {}
            for table, conv in ((nb.dense, cb.dense), (nb.per_sequence, cb.per_sequence)):
                for layer, t in table.items():
                    c = conv[layer]
                    e = rel_err(lookup_1d(c.keys, c.values_ns, t.keys), t.values_ns)
                    kind = ops[layer].kind
                    errs[kind].append(e)
                    layers[layer] = {"kind": kind, **error_stats(e),
                                     "signed_median_keys_le_16": float(np.median(e[t.keys <= 16])),
                                     "signed_median_keys_gt_256": (float(np.median(e[t.keys > 256]))
                                                                   if np.any(t.keys > 256) else None)}
            # attention at every native grid point
            pts = attention_points(nb.attention)
            args = [jnp.asarray(pts[:, k]) for k in range(4)]
            t_nat, _ = _attention_ns(tables_of(nb, model, tp), *args)
            if not np.array_equal(np.asarray(t_nat), pts[:, 4]):
                raise AssertionError(f"{name} tp{tp}: the native lookup does not return its own grid values")
            t_conv, ext = _attention_ns(tables_of(cb, model, tp), *args)
            e = rel_err(np.asarray(t_conv), pts[:, 4])
            pc, kp, nd, kvd = (pts[:, k] for k in range(4))
            for kind, m in (("attention_prefill", nd == 0), ("attention_decode", pc == 0),
                            ("attention_mixed", (pc > 0) & (nd > 0))):
                errs[kind].append(e[m])
            attention = {
                "points": int(len(pts)), "converted_extrapolated_points": int(np.asarray(ext).sum()),
                # where the error sits: decodes by batch size, prefills by chunk size (signed medians)
                "decode_signed_median_by_nd": {int(n): float(np.median(e[(pc == 0) & (nd == n)]))
                                               for n in np.unique(nd[pc == 0])},
                "prefill_signed_median_by_pc": {int(p): float(np.median(e[(nd == 0) & (pc == p)]))
                                                for p in np.unique(pc[nd == 0])},
                "mixed_sum_vs_parts": _mixed_additivity(pts, e),
            }
            moe = None
            if nb.moe is not None:
                mo = nb.moe
                tok = np.concatenate([mo.token_keys[i, :mo.n_tokens[i]] for i in range(len(mo.ae_axis))])
                ae = np.concatenate([np.full(mo.n_tokens[i], mo.ae_axis[i]) for i in range(len(mo.ae_axis))])
                nat = np.concatenate([mo.values_ns[i, :mo.n_tokens[i]] for i in range(len(mo.ae_axis))])
                e_moe = rel_err(moe_lookup(cb.moe, tok, ae), nat)
                path = balanced_path(model, tp)
                on = np.array([(int(a), int(b)) in path for a, b in zip(tok, ae)])
                errs["moe"].append(e_moe)
                errs["moe_balanced_path"].append(e_moe[on])
                moe = {"points": [{"tokens": int(a), "activated_experts": int(b), "native_us": float(n) / 1e3,
                                   "err": float(x), "balanced_path": bool(o)}
                                  for a, b, n, x, o in zip(tok, ae, nat, e_moe, on)]}
            out[name][f"tp{tp}"] = {
                "kinds": {k: error_stats(np.concatenate(v)) if v else None for k, v in errs.items()},
                "layers": layers, "attention": attention, "moe": moe,
                "converted_outliers": list(cb.outliers),  # DB points far off their neighbours, used as measured
                "_errors": {k: np.concatenate(v) if v else np.zeros(0) for k, v in errs.items()},
            }
    return out


def _mixed_additivity(pts, e) -> dict:
    """How the mixed cells' error compares with its parts: the signed median error of mixed cells
    whose native time exceeds the native prefill-only + decode-only times at the same coordinates
    (vLLM's one varlen call is not the sum of two) — the sum model's own share of the error."""
    key = {(int(p), int(k), int(n), int(v)): int(t) for p, k, n, v, t in pts}
    ratio, errs = [], []
    for (p, k, n, v, t), x in zip(pts, e):
        if p > 0 and n > 0:
            a, b = key.get((int(p), int(k), 0, 0)), key.get((0, 0, int(n), int(v)))
            if a and b:
                ratio.append(t / (a + b) - 1.0)
                errs.append(x)
    if not ratio:
        return {"n": 0}
    return {"n": len(ratio), "native_mixed_over_sum_of_parts_signed_median": float(np.median(ratio)),
            "native_mixed_over_sum_of_parts_p90_abs": float(np.percentile(np.abs(ratio), 90)),
            "converted_err_signed_median_same_cells": float(np.median(errs))}


# ------------------------------------------------------------------------- 2. whole iterations
def batch_shapes(r) -> np.ndarray:
    """The batch shape of every iteration of a single-instance :class:`jaxsim.spec.SimResult`,
    int64 ``[iterations, 8]`` = ``(T, S, pc, kp, nd, kvd_sum, kvd_min, kvd_max)``
    (REFERENCE.md §2.1; ``jaxsim.engine.instance.batch_shape``).

    Rebuilt from the per-request outputs: output token j >= 1 of request q is a decode in the
    iteration that ends at its emission time, with ``prompt + j - 1`` tokens computed before;
    request q's prompt is prefilled in the iterations from the one starting at its first-scheduled
    time to the one ending at its first token, from ``prefix_hit_tokens`` on: a request that
    finishes its prefill in an iteration takes its remaining tokens, one that continues takes what
    is left of the iteration's prefill tokens (T - decodes). A 1-token chunk counts as a decode, as
    in the engine. Needs a run without preemptions (a preempted request recomputes); raises
    otherwise, or when the rebuilt T / S disagree with the recorded ones.
    """
    if np.any(r.num_preemptions):
        raise ValueError("batch_shapes: the run has preemptions (recomputed prefills are not rebuilt)")
    st, en = np.asarray(r.iter_start_ns), np.asarray(r.iter_end_ns)
    n_it = len(st)
    slots = [[] for _ in range(n_it)]  # (tokens, computed before)
    for q in range(len(r.arrival_ns)):
        tt = r.token_times_ns[r.token_offsets[q]:r.token_offsets[q + 1]]
        for j, it in enumerate(np.searchsorted(en, tt[1:]), start=1):
            slots[it].append((1, int(r.input_toks[q]) + j - 1))
    i0 = np.searchsorted(st, r.first_scheduled_ns)
    i1 = np.searchsorted(en, r.first_token_ns)
    if not (np.array_equal(st[i0], r.first_scheduled_ns) and np.array_equal(en[i1], r.first_token_ns)):
        raise ValueError("batch_shapes: first-scheduled / first-token times are not iteration boundaries")
    order = np.lexsort((np.arange(len(i0)), r.first_scheduled_ns))
    computed = np.asarray(r.prefix_hit_tokens, np.int64).copy()
    left = np.asarray(r.iter_num_tokens, np.int64) - np.array([len(s) for s in slots])
    for i in range(n_it):
        act = [q for q in order if i0[q] <= i <= i1[q]]
        for q in [q for q in act if i1[q] == i] + [q for q in act if i1[q] != i]:
            n = int(r.input_toks[q] - computed[q]) if i1[q] == i else int(left[i])
            slots[i].append((n, int(computed[q])))
            computed[q] += n
            left[i] -= n
    if np.any(left != 0):
        raise ValueError(f"batch_shapes: {int(np.sum(left != 0))} iterations' prefill tokens do not add up")
    shapes = np.zeros((n_it, 8), np.int64)
    for i, s in enumerate(slots):
        n, c = np.array(s, np.int64).reshape(-1, 2).T
        d, p = n == 1, n > 1
        shapes[i] = (n.sum(), len(n), n[p].sum(), c[p].sum(), d.sum(), c[d].sum(),
                     c[d].min() if d.any() else 0, c[d].max() if d.any() else 0)
    if not (np.array_equal(shapes[:, 0], r.iter_num_tokens) and np.array_equal(shapes[:, 1], r.iter_num_seqs)):
        raise ValueError("batch_shapes: rebuilt T / S differ from the recorded iterations")
    return shapes


def price(tb, shapes) -> tuple:
    """``(time_ns, extrapolated [N, 4])`` of every shape: ``jax.jit(jax.vmap(iteration_time))``."""
    f = jax.jit(jax.vmap(lambda *a: latency.iteration_time(tb, *a)))
    t, ext = f(*[jnp.asarray(shapes[:, k]) for k in range(8)])
    return np.asarray(t), np.asarray(ext)


def components(tb, shapes) -> dict:
    """Per shape, the linear layers' total ``t_lin`` and one attention layer's ``t_att`` (int64 ns,
    ``jaxsim.latency.profile._components``, jitted and vmapped)."""
    c = jax.jit(jax.vmap(lambda *a: _components(tb, *a)))(*[jnp.asarray(shapes[:, k]) for k in range(8)])
    return {"t_lin": np.asarray(c.t_lin), "t_att": np.asarray(c.t_att)}


def compare_iterations(ev, profiles=PROFILES, converted=CONVERTED) -> dict:
    """Part 2 on the native run ``ev`` (a ``scripts/validate.py`` Evaluation), converted bundle
    ``converted``."""
    r, case = ev.result, ev.case
    shapes = batch_shapes(r)
    specs, rt, _ = validation.case_to_cluster(case, profiles)
    hw = specs[0].hw
    tb_nat = planning.latency_tables(str(profiles), hw, case.model, VARIANT, 2, rt)
    tb_conv = planning.latency_tables(str(profiles), dataclasses.replace(hw, name=converted), case.model, VARIANT, 2, rt)
    t_nat, _ = price(tb_nat, shapes)
    exact = int(np.sum(t_nat == np.asarray(r.iter_busy_ns)))
    if exact != len(shapes):
        raise AssertionError(f"rebuilt shapes reproduce {exact} of {len(shapes)} iterations' busy time")
    t_conv, ext = price(tb_conv, shapes)
    e = rel_err(t_conv, t_nat)
    prefill = shapes[:, 2] > 0
    T = shapes[:, 0]
    # where the iteration error comes from: the dense + per-sequence layers (t_lin, the whole
    # iteration's) and one attention layer (t_att, the native one with its skew correction)
    parts = [components(tb, shapes) for tb in (tb_nat, tb_conv)]
    layers = int(case.model.num_layers)
    split = {}
    for label, m in (("with_prefill", prefill), ("decode_only", ~prefill)):
        n, c = parts
        split[label] = {
            "linear_layers": error_stats(rel_err(c["t_lin"][m], n["t_lin"][m])),
            "attention": error_stats(rel_err(c["t_att"][m], n["t_att"][m])),
            "native_attention_share_median": float(np.median(layers * n["t_att"][m] / t_nat[m])),
            "contribution_linear_median": float(np.median((c["t_lin"][m] - n["t_lin"][m]) / t_nat[m])),
            "contribution_attention_median": float(np.median(layers * (c["t_att"][m] - n["t_att"][m]) / t_nat[m])),
        }
    return {
        "case": case.name, "iterations": int(len(shapes)), "native_reproduces_busy_ns": exact,
        "all": error_stats(e), "with_prefill": error_stats(e[prefill]), "decode_only": error_stats(e[~prefill]),
        "by_tokens": {band: error_stats(e[m]) for band, m in
                      (("T<=16", T <= 16), ("16<T<=256", (T > 16) & (T <= 256)), ("T>256", T > 256)) if m.any()},
        "components": split,
        "busy_time_ratio": float(t_conv.sum() / t_nat.sum()),
        "converted_extrapolated_iterations": int(np.any(ext, axis=1).sum()),
        "shape_ranges": {k: [int(shapes[:, i].min()), int(shapes[:, i].max())]
                         for i, k in enumerate(("T", "S", "pc", "kp", "nd", "kvd_sum", "kvd_min", "kvd_max"))},
    }


# ---------------------------------------------------------------------- 3. the validation run
def evaluate_case(case_dir, profiles=PROFILES, hardware: str | None = None):
    """``scripts/validate.py``'s evaluation of ``case_dir``; with ``hardware``, of a copy whose
    config.json names that hardware instead (everything else the case's own)."""
    import validate

    models, workloads = profiles / "models", profiles / "workloads"
    if hardware is None:
        return validate.evaluate(case_dir, profiles, models, workloads)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / Path(case_dir).name
        shutil.copytree(case_dir, d)
        cfg = json.loads((d / "config.json").read_text())
        for node in cfg["nodes"]:
            for inst in node["instances"]:
                inst["hardware"] = hardware
        (d / "config.json").write_text(json.dumps(cfg, indent=4))
        return validate.evaluate(d, profiles, models, workloads)


def score(ev) -> dict:
    c = ev.comparison
    return {"stats": {k: c["stats"][k] for k in STATS15},
            "mean_abs_diff_pct": float(np.mean([abs(c["stats"][k]["diff_pct"]) for k in STATS15])),
            "paired_median_abs_pct": {m: c["paired"][m]["median_abs_pct"] for m in ("ttft", "tpot", "e2e")},
            "num_blocks": int(ev.result.num_blocks), "iterations": int(len(ev.result.iter_start_ns)),
            "extrapolated_iterations": ev.result.stats.get("extrapolated_iterations"),
            "latency_model": ev.result.stats.get("latency_model")}


def constants_used(converted: str, profiles=PROFILES) -> dict:
    """The fitted constants bundle ``converted`` is priced with (:func:`jaxsim.operator_db.fit_constants`):
    the set's name, the GPUs it was fitted on, the bandwidth classes and the attention constants."""
    from jaxsim import operator_db as odb

    fit = odb.load_fit(profiles)
    left_out = odb.LEAVE_OUT_HARDWARE.get(converted, (None, None))[1]
    f = odb.fit_constants(fit, left_out)
    return {"constant_set": f["constant_set"],
            "fitted_on": (fit["leave_out"][left_out]["fitted_on"] if left_out
                          else list(fit["bandwidth"]["provenance"]["mem_bw_bytes_per_s"])),
            "source": f"profiles/operator-db/fit.json {'leave_out.' + left_out if left_out else 'bandwidth, attention'}",
            "bandwidth": f["bandwidth"]["classes"],
            "bandwidth_borrowed": fit["leave_out"][left_out]["bandwidth"]["borrowed"] if left_out else {},
            "prefill_latency_gamma_us_per_key": f["attention"]["prefill_latency"]["gamma_us_per_key"],
            "mixed": {k: f["attention"]["mixed"][k] for k in ("gamma_us_per_key", "beta", "c0_us")}}


# ---------------------------------------------------------------------------------- reporting
def pooled(tables: dict) -> dict:
    """Every model and TP degree pooled, per kind."""
    return {k: error_stats(np.concatenate([tp["_errors"][k] for m in tables.values() for tp in m.values()]))
            for k in KINDS}


def _row(label, s) -> str:
    if s is None:
        return f"  {label:<34} {'-':>6}"
    return (f"  {label:<34} {s['n']:>6} {100 * s['p50']:>8.1f} {100 * s['p90']:>8.1f} "
            f"{100 * s['signed_median']:>+9.1f}")


HEAD = f"  {'':<34} {'n':>6} {'p50|e|%':>8} {'p90|e|%':>8} {'signed%':>9}"


def print_report(res: dict) -> None:
    c = res["constants"]
    print(f"=== {res['converted']}: constants {c['constant_set']} (fitted on {', '.join(c['fitted_on'])}; {c['source']})")
    print("1. Converted vs native tables, err = converted/native - 1, at the native grid points")
    for name, per_tp in res["tables"].items():
        for tp, d in per_tp.items():
            print(f"\n {name} {tp}\n{HEAD}")
            for k in KINDS:
                if d["kinds"][k] is not None:
                    print(_row(k, d["kinds"][k]))
            for layer, s in d["layers"].items():
                print(_row(f"  {layer} ({s['kind']})", s))
    print(f"\n all models and TP degrees pooled\n{HEAD}")
    for k in KINDS:
        print(_row(k, res["pooled"][k]))
    it = res["iterations"]
    print(f"\n2. Whole iterations of {it['case']} ({it['iterations']} batch shapes; the native tables reproduce "
          f"{it['native_reproduces_busy_ns']} iterations' busy time exactly)\n{HEAD}")
    print(_row("all iterations", it["all"]))
    print(_row("with a prefill", it["with_prefill"]))
    print(_row("decode only", it["decode_only"]))
    for band, s in it["by_tokens"].items():
        print(_row(band, s))
    for label, d in it["components"].items():
        print(_row(f"{label}: linear layers", d["linear_layers"]))
        print(_row(f"{label}: attention (per layer)", d["attention"]))
        print(f"    share of attention in the native time {100 * d['native_attention_share_median']:.0f}%; median "
              f"contribution to the iteration error: linear {100 * d['contribution_linear_median']:+.1f}%, "
              f"attention {100 * d['contribution_attention_median']:+.1f}%")
    print(f"  total busy time converted/native: {it['busy_time_ratio']:.3f}; converted lookups extrapolated in "
          f"{it['converted_extrapolated_iterations']} iterations")
    v = res["validation"]
    print(f"\n3. {it['case']} simulated with each bundle vs the real run (Diff% = sim/real - 1)")
    print(f"  {'statistic':<14} {'real':>10} {'native':>10} {'diff%':>7} {'converted':>10} {'diff%':>7}")
    for k in STATS15:
        a, b = v["native"]["stats"][k], v["converted"]["stats"][k]
        print(f"  {k:<14} {a['real']:>10.1f} {a['sim']:>10.1f} {a['diff_pct']:>+7.1f} {b['sim']:>10.1f} "
              f"{b['diff_pct']:>+7.1f}")
    print(f"  mean |Diff%| over the 15: native {v['native']['mean_abs_diff_pct']:.1f}, converted "
          f"{v['converted']['mean_abs_diff_pct']:.1f}")


def summary_rows(res: dict) -> list:
    """``(label, joint, left out)`` rows of the headline figures of both constant sets."""
    lo = res[LOO_KEY]
    rows = [("15 statistics: mean |Diff%|", *(r["validation"]["converted"]["mean_abs_diff_pct"] for r in (res, lo)))]
    for m in ("ttft", "tpot", "e2e"):
        for r in (res, lo):
            d = [r["validation"]["converted"]["stats"][f"{m}_{s}"]["diff_pct"] for s in ("mean", "median", "p90", "p95",
                                                                                           "p99")]
            r.setdefault("_range", {})[m] = f"{min(d):+.1f} .. {max(d):+.1f}"
        rows.append((f"{m.upper()} Diff% range", res["_range"][m], lo["_range"][m]))
    for r in (res, lo):
        r.pop("_range")
    for k in ("all", "with_prefill"):
        rows.append((f"iterations {k}: p50 |e|%, signed%", *(f"{100 * r['iterations'][k]['p50']:.1f}, "
                                                             f"{100 * r['iterations'][k]['signed_median']:+.1f}"
                                                             for r in (res, lo))))
    for k in KINDS:
        rows.append((f"tables pooled {k}: signed median %", *(f"{100 * r['pooled'][k]['signed_median']:+.1f}"
                                                              for r in (res, lo))))
    return rows


def print_summary(res: dict) -> None:
    print(f"\n=== Both constant sets (native bundle: mean |Diff%| {res['validation']['native']['mean_abs_diff_pct']:.1f})")
    print(f"  {'':<44} {'joint':>16} {'RTXPRO6000 left out':>20}")
    for label, a, b in summary_rows(res):
        a, b = (f"{x:.1f}" if isinstance(x, float) else x for x in (a, b))
        print(f"  {label:<44} {a:>16} {b:>20}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "tests" / "data" / "opdb_crosscheck.json"))
    ap.add_argument("--no-compile-cache", action="store_true")
    args = ap.parse_args(argv)
    if not args.no_compile_cache:
        compile_cache.enable()
    t0 = time.perf_counter()
    native = evaluate_case(CASE)
    t1 = time.perf_counter()
    print(f"[wall: native run {t1 - t0:.0f} s]")
    runs = {}
    for conv in (CONVERTED, CONVERTED_LOO):
        t1 = time.perf_counter()
        tables = compare_tables(converted=conv)
        t2 = time.perf_counter()
        iterations = compare_iterations(native, converted=conv)
        t3 = time.perf_counter()
        converted = evaluate_case(CASE, hardware=conv)
        t4 = time.perf_counter()
        print(f"[wall {conv}: tables {t2 - t1:.0f} s, iterations {t3 - t2:.0f} s, converted run {t4 - t3:.0f} s]")
        runs[conv] = {
            "native": NATIVE, "converted": conv, "variant": VARIANT, "constants": constants_used(conv),
            "tables": tables, "pooled": pooled(tables), "iterations": iterations,
            "validation": {"case": CASE.name, "native": score(native), "converted": score(converted)},
        }
    res = {"command": "PYTHONPATH=. python scripts/crosscheck_operator_db.py", **runs[CONVERTED],
           LOO_KEY: runs[CONVERTED_LOO]}
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    for r in (res, res[LOO_KEY]):
        print_report(r)
        print()
    print_summary(res)
    for r in (res, res[LOO_KEY]):
        for per_tp in r["tables"].values():
            for d in per_tp.values():
                d.pop("_errors")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1, allow_nan=False) + "\n")
    print(f"\nwrote {args.out} ({res['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
