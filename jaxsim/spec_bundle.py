"""Profile bundles for hardware known only by its spec sheet: the roofline model, tabulated.

Hardware ``spec/<sheet>`` (``profiles/specs/<sheet>.yaml``, :mod:`jaxsim.specs`) has no measured
tables. :func:`load_spec_bundle` prices every layer of the architecture sequence with the
calibrated roofline model (:mod:`jaxsim.latency.roofline`: the same ``kernel_ns``,
``attention_work`` and ``moe_work``) on the grids below and returns an ordinary
:class:`jaxsim.profiles.ProfileBundle`. Everything built on bundles then works unchanged for such a
part: pipeline and expert parallelism, DP, power and its cap, weight and KV offload, PIM, sweeps
that mix it with measured and converted hardware in one compiled call, and the ``peak_tflops`` /
``mem_bw_gbs`` what-if knobs (each value is its own tabulation; the points still share one
compile). The differentiable model itself (exact ``jax.grad``) is :class:`RooflineModel`; this
module is how the engine's other features reach it.

Grids (chosen so that the table lookups of REFERENCE.md §2.4-2.5 reproduce the model closely; the
error against :func:`jaxsim.latency.roofline.iteration_ns` is measured in ``tests/test_spec_bundle.py``):

* dense layers by tokens and per-sequence layers by sequences: every count 1..32, then steps of
  2^(1/4) up to 65,536;
* attention ``(pc, kp, nd, kvd)``: the prefill part on ``pc`` in {0, 1, 2, 3, 4, 6, 8, 11, ...}
  (steps of sqrt 2: its FLOPs grow as pc^2) by ``kp`` in {0, 16, 32, ..., 2^17}; the decode part
  on ``nd`` in {0, 1, 2, 4, ..., 4096} by ``kvd`` in {0, 16, 32, ..., 2^17}. The decode part is
  linear in ``nd * kvd`` on the memory side, which the table's bilinear lookup reproduces; a pure cell
  is its part, a mixed cell (both parts) the one varlen kernel of ``roofline.attention_ns`` at the
  cell's own (pc, kp, nd, kvd) (the roofline model's own composition);
* MoE by local tokens x activated experts (1..E/ep), with ``ep = tp`` (as the legacy loader
  assumes): a rank's ``x`` local tokens stand for ``x / f`` routed tokens and ``x k / (ep f)``
  expert assignments, ``f = 1 - ((ep-1)/ep)^k`` (REFERENCE.md §1.9, BALANCED).

Times are rounded to whole ns with ``max(1, round(t))`` like every other bundle (REFERENCE.md §0).
Host-side only (numpy and the roofline's jnp formulas on concrete arrays).
"""

import dataclasses
import functools
from pathlib import Path

import numpy as np

from jaxsim.errors import JaxsimInputError
from jaxsim.latency import roofline
from jaxsim.model import ModelConfig
from jaxsim.operators import kv_bytes_per_token, layer_operators, moe_expert_shapes
from jaxsim.profiles import MoETable, ProfileBundle, Table1D, disabled_skew, load_architecture, sum_attention

PREFIX = "spec/"
SPECS_DIR = "specs"  # under profiles_dir
# variant -> (weight bytes, KV bytes): the roofline prices any dtype, so each variant is exact
VARIANTS = {"bf16": (2, 2), "bf16-kvfp8": (2, 1), "fp8": (1, 2), "fp8-kvfp8": (1, 1)}  # as jaxsim.operator_db
ENGINE_EFFECTIVE = {"source": "roofline model (no engine ran)"}


def is_spec(hardware) -> bool:
    """``hardware`` names a spec-sheet part (``spec/<sheet>`` or ``spec/<path>.yaml``)."""
    return str(hardware).startswith(PREFIX)


def spec_hardware(profiles_dir) -> list:
    """``spec/<sheet>`` for every sheet under ``<profiles_dir>/specs`` (sorted)."""
    d = Path(profiles_dir) / SPECS_DIR
    return sorted(PREFIX + p.stem for p in d.glob("*.yaml") if p.stem != "roofline_calibration") if d.is_dir() else []


def sheet_path(profiles_dir, hardware) -> Path:
    """The YAML of ``spec/<sheet>`` (``<profiles_dir>/specs/<sheet>.yaml``) or of ``spec/<path>.yaml``
    (a sheet anywhere: a path ending in ``.yaml``, relative to the working directory).

    Raises:
      JaxsimInputError: no such sheet (naming the file looked for and the shipped sheets).
    """
    root = Path(profiles_dir)
    name = str(hardware)[len(PREFIX):] if is_spec(hardware) else ""
    path = Path(name) if name.endswith(".yaml") else root / SPECS_DIR / f"{name}.yaml"
    if not name or (not name.endswith(".yaml") and "/" in name) or not path.is_file():
        raise JaxsimInputError(str(path), f"no such file: hardware {hardware!r} names a spec sheet that does not exist",
                               f"spec-sheet hardware: {spec_hardware(root)}, or spec/<path to a sheet>.yaml "
                               f"(a sheet like {root / SPECS_DIR / 'h100.yaml'})")
    return path


def _geometric(lo: int, hi: int, step: float) -> np.ndarray:
    """Whole numbers lo..hi in steps of ``step`` (x), rounded, unique, ``hi`` included."""
    n = int(np.ceil(np.log(hi / lo) / np.log(step)))
    return np.unique(np.r_[np.rint(lo * step ** np.arange(n)), hi]).astype(np.int64)


TOKEN_GRID = np.unique(np.r_[np.arange(1, 33), _geometric(32, 65536, 2 ** 0.25)])
PC_GRID = np.unique(np.r_[np.arange(1, 5), _geometric(4, 65536, 2 ** 0.5)])
KV_GRID = np.r_[0, 16 * 2 ** np.arange(14)].astype(np.int64)  # 0, 16 .. 131072
ND_GRID = (2 ** np.arange(13)).astype(np.int64)  # 1 .. 4096


def _ns(t) -> np.ndarray:
    return np.maximum(1, np.rint(np.asarray(t, np.float64))).astype(np.int64)


@functools.lru_cache(maxsize=32)
def load_spec_bundle(profiles_dir, hardware: str, model: ModelConfig, variant: str = "bf16", tp: int = 1,
                     peak_tflops: "float | None" = None, mem_bw_gbs: "float | None" = None) -> ProfileBundle:
    """The roofline model of spec-sheet hardware ``spec/<sheet>`` tabulated as a bundle.

    Args:
      profiles_dir: the profiles folder (sheets under ``specs/``, ``architectures/``).
      variant: ``bf16`` | ``bf16-kvfp8`` | ``fp8`` | ``fp8-kvfp8`` (weights, then the KV cache when it differs:
        :data:`VARIANTS`, the names of the profile variants, REFERENCE.md §1.14).
      tp: tensor-parallel degree (heads, intermediate size and vocabulary per rank; any degree that
        divides the model's KV heads).
      peak_tflops, mem_bw_gbs: what-if overrides of the sheet's peak TFLOP/s (of the variant's
        compute dtype) and memory bandwidth (GB/s); None keeps the sheet's.

    Raises:
      JaxsimInputError: unknown sheet (naming the known ones), an invalid sheet (its file and key),
        an unknown variant, or a TP degree that does not divide the model's KV heads.
    """
    from jaxsim.specs import load_spec

    root = Path(profiles_dir)
    path = sheet_path(root, hardware)
    if variant not in VARIANTS:
        raise JaxsimInputError(str(path), f"no variant {variant!r} for spec-sheet hardware", f"use one of {sorted(VARIANTS)}")
    tp = int(tp)
    if tp < 1 or model.num_kv_heads % tp or model.num_heads % tp:
        raise JaxsimInputError("hardware.tp", f"{tp} does not divide {model.name}'s {model.num_heads} query and "
                               f"{model.num_kv_heads} KV heads", "use a TP degree that divides both")
    spec = load_spec(path)
    if peak_tflops is not None or mem_bw_gbs is not None:
        dtype = "bf16" if VARIANTS[variant][0] >= 2 else "fp8"
        peaks = dict(spec.peak_tflops)
        if peak_tflops is not None:
            peaks[dtype] = float(peak_tflops)
        spec = dataclasses.replace(spec, peak_tflops=peaks,
                                   mem_bw_gbs=float(mem_bw_gbs) if mem_bw_gbs is not None else spec.mem_bw_gbs)
    w_bytes, kv_bytes = VARIANTS[variant]
    act = 2
    rm = roofline.RooflineModel.from_spec(spec, model, tp=tp, act_bytes=act, weight_bytes=w_bytes,
                                          kv_bytes=kv_bytes, profiles_dir=root)
    eff, peak, bw = rm.eff, float(rm.peak_flops), float(rm.mem_bw)
    l2 = float(rm.l2_bytes)
    kernel = lambda f, b, cls, n=1.0: np.asarray(roofline.kernel_ns(f, b, cls, eff, peak, bw, n, l2),  # noqa: E731
                                                 np.float64)

    sequence, category, tp_stable = load_architecture(root, model.model_type)
    ops = layer_operators(model, tp, act, w_bytes)
    dense, per_seq = {}, {}
    for names in sequence.values():
        for lname in names:
            cat = category[lname]
            if cat not in ("dense", "per_sequence") or lname in dense or lname in per_seq:
                continue
            if lname not in ops:
                raise JaxsimInputError(f"architectures/{model.model_type}.yaml", f"layer {lname!r} has no operator "
                                       "model in jaxsim.operators", "add it to jaxsim.operators.layer_operators")
            op = ops[lname]
            x = TOKEN_GRID.astype(np.float64)
            cls = np.full(x.shape, roofline.GEMM if op.kind == "gemm" else roofline.MEMORY)
            (per_seq if cat == "per_sequence" else dense)[lname] = Table1D(TOKEN_GRID.copy(),
                                                                           _ns(kernel(op.flops(x), op.bytes(x), cls,
                                                                                      float(op.kernels))))

    # attention: prefill part by (pc, kp), decode part by (nd, kvd); cells are their sums
    qhd = float((model.num_heads // tp) * model.head_dim)
    kv_tok = float(kv_bytes_per_token(model, tp, kv_bytes))
    q_bytes = qhd * act
    kp_rows, kv_rows = {}, {}
    for pc in PC_GRID:
        f_p, b_p, _, _ = roofline.attention_work(qhd, kv_tok, q_bytes, float(pc), KV_GRID.astype(float), 0.0, 0.0)
        kp_rows[int(pc)] = (KV_GRID.copy(), _ns(kernel(f_p, b_p, np.full(KV_GRID.shape, roofline.ATTN_PREFILL))))
    for nd in ND_GRID:
        _, _, f_d, b_d = roofline.attention_work(qhd, kv_tok, q_bytes, 0.0, 0.0, float(nd), nd * KV_GRID.astype(float))
        kv_rows[int(nd)] = (KV_GRID.copy(), _ns(kernel(f_d, b_d, np.full(KV_GRID.shape, roofline.ATTN_DECODE))))

    attention = sum_attention(kp_rows, kv_rows)
    # mixed cells (pc > 0 and nd > 0) are one varlen kernel, not the sum (roofline.attention_ns)
    at = attention
    pcs = at.pc_axis[:, None, None, None].astype(float)
    nds = at.nd_axis[None, :, None, None].astype(float)
    kps = at.kp_keys[:, :, :, None].astype(float)
    kvds = at.kvd_keys.astype(float)
    f_p, b_p, _, _ = roofline.attention_work(qhd, kv_tok, q_bytes, pcs, kps, 0.0, 0.0)
    _, _, f_d, b_d = roofline.attention_work(qhd, kv_tok, q_bytes, 0.0, 0.0, nds, nds * kvds)
    mixed = _ns(np.asarray(roofline.attention_ns(pcs, nds, f_p, b_p, f_d, b_d, eff, peak, bw), np.float64))
    cells = (pcs > 0) & (nds > 0) & (at.values_ns > 0)
    attention = dataclasses.replace(at, values_ns=np.where(cells, mixed, at.values_ns))

    moe = None
    if any(category[n] == "moe" for names in sequence.values() for n in names):
        if not model.is_moe:
            raise JaxsimInputError(f"architectures/{model.model_type}.yaml", f"{model.name} has no experts but its "
                                   "architecture sequence has a MoE block", "check the model config")
        E, k = model.num_experts, model.experts_per_token
        ep = max(1, min(tp, E))
        f = 1.0 - ((ep - 1) / ep) ** k
        (n1, k1), (n2, k2) = moe_expert_shapes(model, 1)
        ae_axis = np.arange(1, E // ep + 1, dtype=np.int64)
        x = TOKEN_GRID.astype(np.float64)
        vals = np.zeros((len(ae_axis), len(x)), np.int64)
        for a, ae in enumerate(ae_axis):
            fm, bm = roofline.moe_work(x / f, x * k / (ep * f), float(ae), float(model.hidden_size), float(E),
                                       (float(n1 * k1 + n2 * k2), float(n1 + k1 + n2 + k2)), float(act), float(w_bytes))
            vals[a] = _ns(kernel(fm, bm, np.full(x.shape, roofline.MOE)))
        moe = MoETable(ae_axis, np.full(len(ae_axis), len(x), np.int32),
                       np.broadcast_to(TOKEN_GRID, (len(ae_axis), len(x))).copy(), vals)

    meta = {
        "format": "roofline model tabulated (jaxsim/spec_bundle.py)",
        "source": f"spec sheet {path} ({spec.source})",
        "hardware": hardware, "model": model.name, "tp": tp, "variant": variant,
        "peak_tflops": float(rm.peak_flops), "mem_bw_gbs": float(rm.mem_bw),
        "calibration": str(roofline.CALIBRATION_FILE), "skew_fit": {"enabled": False},
    }
    return ProfileBundle(
        hardware=hardware, model_name=model.name, model_type=model.model_type, variant=variant, tp=tp,
        path=str(path), meta=meta, engine_effective=dict(ENGINE_EFFECTIVE), sequence=sequence, category=category,
        tp_stable=tp_stable, dense=dense, per_sequence=per_seq, attention=attention, moe=moe, skew=disabled_skew(),
    )
