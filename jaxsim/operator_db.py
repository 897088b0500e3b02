"""Profile bundles converted from NVIDIA AIConfigurator's measured operator tables.

``profiles/operator-db/<system>/`` holds AIConfigurator's vLLM 0.19.0 tables for five systems,
converted by ``scripts/import_operator_db.py`` (provenance and filters: that folder's README).
:func:`load_converted_bundle` turns one system's tables into a :class:`jaxsim.profiles.ProfileBundle`
for any shipped model at any TP degree whose head counts divide, so that the simulator prices
those GPUs exactly as it prices a native bundle. :func:`jaxsim.profiles.load_profile_bundle`
dispatches the hardware names of :data:`HARDWARE` here.

=====================  ========================  ==========================================
hardware name          system folder             note
=====================  ========================  ==========================================
``h100``               ``h100_sxm``              H100 SXM 80 GB
``h200``               ``h200_sxm``              H200 SXM 141 GB
``b200``               ``b200_sxm``              B200 SXM
``gb200``              ``gb200``                 GB200 (one Blackwell GPU of the superchip)
``rtxpro6000_opdb``    ``rtx_pro_6000_server``   the converted RTX PRO 6000 (``RTXPRO6000``
                                                 stays the native bundle): the cross-check
=====================  ========================  ==========================================

Constant sets. The converter's native-fitted constants (bandwidth model, prefill-latency
``gamma``, mixed-batch ``(gamma_mix, beta, c0)``; ``fit.json`` ``bandwidth`` and ``attention``)
are by default the **joint** fit on both native GPUs (RTX PRO 6000 and RTX 4090). That set
includes the native RTX PRO 6000 tables, so a comparison of ``rtxpro6000_opdb`` with them is
partly in-sample. Hardware ``rtxpro6000_opdb_loo`` (:data:`LEAVE_OUT_HARDWARE`) is the same
converted RTX PRO 6000 priced with the constants refitted with the RTX PRO 6000 **left out**
(RTX 4090 alone; ``fit.json`` ``leave_out.RTXPRO6000``, :func:`fit_constants`): the honest
transfer figure of ``scripts/crosscheck_operator_db.py``. It is a cross-check name only: not
listed by :func:`operator_db_hardware` (nor ``known_hardware``), no ``conf/hardware`` file.
qk_norm, never measured on the RTX 4090, takes the RTX 4090's layernorm constants there.

Variants: ``bf16`` (bfloat16 GEMMs and MoE, bfloat16 KV cache), ``bf16-kvfp8`` (FP8 KV cache),
``fp8`` and ``fp8-kvfp8`` (per-tensor FP8 GEMMs and MoE).

How each layer is priced (times are the tables' milliseconds as µs, then int ns by
:func:`jaxsim.profiles.us_to_ns`):

* **GEMM layers** (``qkv_proj``, ``o_proj``, ``gate_up_proj``, ``down_proj``; ``lm_head`` per
  sequence): the layer's per-rank ``(n, k)`` from :func:`jaxsim.operators.layer_operators`,
  looked up in the GEMM table for every ``m`` it holds (74 token counts, 1-32768), which become
  the layer's keys. The table's n and k grids are sparse (22 values each, 32-65536), so
  :func:`gemm_us` interpolates **bilinearly in (log n, log k) on log time** (a power law between
  grid points, the shape of a GEMM's time in each dimension). Outside the grid: below the
  smallest n or k the time is clamped (a GEMM that small is launch-bound); above the largest it
  scales linearly, ``t(n) = t(n_max) * n / n_max`` (the work splits into column blocks: Llama's
  and Qwen's ``lm_head`` at TP 1, n = 128256 / 151936). Leave-one-out error of the interpolation
  on the tables themselves (each interior n or k grid point dropped and predicted from the rest,
  every m; ``profiles/operator-db/fit.json`` ``gemm_interpolation``): |relative error| p50 2.6%
  (H100) to 3.9% (GB200), p90 10-13% (RTX PRO 6000: 24%); dropping a point doubles the gap, so
  the error at the real grid spacing is smaller.
* **Memory-bound layers** the tables lack (embedding, layernorm, qk_norm, rotary_emb, act_fn,
  final_layernorm, sampler): ``t = t0 + bytes / (eff * mem_bw)`` with bytes from
  :func:`jaxsim.operators.layer_operators`, ``mem_bw`` the spec sheet's and ``(t0, eff)`` per
  operator fitted on the native RTX PRO 6000 and RTX 4090 bundles by
  ``scripts/fit_operator_db.py`` (``fit.json``: ``bandwidth``, with its leave-one-hardware-out
  error, p50 13-49% by operator). ``eff`` above 1 means the kernel beats DRAM bandwidth (its input
  is still in L2); the L2 sizes of the target GPUs are not modelled.
* **Attention** (the §2.5 table, :class:`jaxsim.profiles.AttentionTable`) for the per-rank heads
  ``num_heads/tp``, ``num_kv_heads/tp``, ``head_dim`` and the variant's KV dtype:

  - prefill of ``pc`` new tokens over ``kp`` cached ones = the largest of three costs:
    (a) the FLOPs: the context table (batch 1) at the causal length with the same attention
    FLOPs, ``L = sqrt(pc^2 + 2*pc*kp)`` (pc queries over kp + pc/2 keys on average = L^2/2
    query-key pairs), interpolated log-log in ``isl``; above the table's largest isl,
    ``t(L_max) * (L/L_max)^2``; (b) the latency path: FlashAttention's varlen forward gives each
    query tile of a head one SM, which streams all its keys without splitting them, so a chunk
    costs at least itself without history plus ``gamma * kp * head_dim/128`` (``gamma`` µs per
    key, ``fit.json`` ``attention.prefill_latency``, fitted on the prefill-only cells of both native
    GPUs, pc <= 128, kp >= 256; joint fit p50 10-19% by table, leave-one-GPU-out p50 28-39%:
    a constant per key does not carry exactly across GPUs); (c) the KV read: a batch-1 decode at
    context ``kp + pc`` (the chunk reads its whole KV context at least as a decode does);
  - ``nd`` decodes at KV ``kvd`` = the generation table at ``batch_size = nd`` and context
    ``isl + step = kvd``, bilinear in (log batch, log context) on log time; above the largest
    context, linear in kvd (KV-read bound); below the smallest, clamped;
  - a **mixed** batch is one varlen call in vLLM, not the sum of the two: its decodes go through
    the prefill path, each one a query tile per *query* head (no GQA packing, so a KV head's cache
    is read by each of its ``G = num_heads/num_kv_heads`` query heads) streaming its kvd keys with
    no split. :func:`mixed_us`: ``max(max(P, gamma_mix*kvd) + (1 + beta*(G-1))*D - c0, P, D)`` on
    the parts ``P`` (prefill) and ``D`` (decodes), ``c0`` the launch the sum counts twice;
    ``(gamma_mix, beta, c0)`` fitted jointly on the mixed cells of both native GPUs (each GPU
    weighted equally) by ``scripts/fit_operator_db.py`` (``fit.json`` ``attention.mixed``: the sum
    of the parts misses by p50 24-43% per table, the model p50 13-19%; leave-one-GPU-out p50 15%
    (RTX PRO 6000 -> RTX 4090) and 31% (RTX 4090 -> RTX PRO 6000)). The form assumes a
    FlashAttention-style varlen kernel; FlashInfer systems (B200, GB200) use it unverified.

  Grid: pc 0, 16, 32, ..., 8192; kp 0, 16, ..., 65536 as far as ``L`` stays within the context
  table (isl <= 16384: all of them up to pc = 128, kp <= 8192 at pc = 8192), so that no grid value
  is itself extrapolated and a query beyond is flagged like any extrapolation; nd 0 and the table's
  batch sizes (1, 2, ..., 2048); kvd 16, 32, ..., 131072 (the generation table's contexts). The slices are laid out as the legacy
  converter does (:func:`jaxsim.profiles.sum_attention`), the mixed cells then
  recombined by :func:`mixed_us`.
* **MoE** (``tp1/moe.csv``'s role, §2.7): the MoE table's rows for the model's
  ``(hidden, moe_intermediate, topk, num_experts)``, ``moe_tp = 1`` and ``moe_ep = ep``
  (``ep`` = the TP degree, the simulator's default, as the legacy converter assumes), balanced
  distribution, plus the router GEMM ``(m = tokens, n = E, k = H)`` from the GEMM table. A row of
  ``T`` tokens is the work of one EP rank that receives ``local = round(T*(1-((ep-1)/ep)**k))``
  tokens on ``act = min(round(T*k/ep), E/ep)`` experts (§1.9 BALANCED), so it is stored at
  ``(tokens = local, activated_experts = act)``. The table is exact along the balanced path
  (the engine's closed form queries exactly these pairs, interpolating across act between
  the table's T; each row is extended, constant, to its neighbours' token counts so that such a
  query stays inside both rows it blends); off it (``expert_routing: zipf``) a row is constant in
  tokens: an estimate.

  **Fallback** for a shape (or ``moe_ep``) the table lacks (``microsoft/Phi-mini-MoE-instruct``:
  intermediate 960, 16 experts): the block is composed from the GEMM table
  (:func:`moe_fallback_us`), as the legacy loader composes it from per-expert rows: the router GEMM
  plus, for the rank's ``ae`` activated experts of ``m = T*k/(ep*ae)`` rows each, gate/up GEMM
  ``(m, 2I, H)`` + act_fn (bandwidth model) + down GEMM ``(m, H, I)``, summed over the experts,
  with the ``ae - 1`` extra launches a grouped kernel does not pay removed, times a per-system
  and dtype factor ``fit.json`` ``moe_fallback.scale`` (the fused-MoE kernel's time over this
  composition, fitted on every shape of that system's MoE table by ``scripts/fit_operator_db.py
  --moe-fallback``: 1.30 H100, 1.33 H200, 1.64 B200, 1.63 GB200, 1.01 RTX PRO 6000 in bf16; the
  fused Triton kernel is slower than cuBLAS at large m, and faster than ``ae`` separate small GEMMs
  at small m). Error against the table on its balanced path, each shape left out of the factor in
  turn (``moe_fallback.leave_one_shape_out``, bf16, all 12 shapes): |relative error| p50 36-57%
  (RTX PRO 6000 18%), p90 69-145%, signed median +0.3 to +4.7%; Qwen3-30B-A3B p50 42-69%
  (signed -21.5 to +15.5%), Mixtral p50 9-28% (signed -10 to -4%). It is a coarse estimate (the
  error depends on T and the shape: the composition's shape across T is not the fused
  kernel's); the bundle's ``meta["conversion"]["moe"]["path"]`` says ``"table"`` or
  ``"gemm_fallback"`` (with the missing shape), and loading warns once per hardware, model, dtype
  and ep.
* **TP all-reduce** is not in the bundle: the engine's ring model reads ``link_bw_gbps`` /
  ``link_latency_ns`` of ``conf/hardware/<name>.yaml``, fitted to the custom all-reduce table by
  ``scripts/fit_operator_db.py``.

Skew correction (§2.6) is disabled (the tables have no skew data). ``engine_effective`` is
``max_num_batched_tokens`` = the largest pc key and ``max_num_seqs`` = the largest nd key.
Outliers: the source rows each table is built from are checked along their axes with
:func:`jaxsim.profiles.grid_outliers` (GEMM rows along m at the corners used; context rows along
isl; generation rows along context at each batch size; MoE rows along tokens). A flagged point is a
measurement glitch of a third party's collection (rtx_pro_6000_server: generation batch 1, context
4096, 185.9 µs between 14.8 and 28.9 µs): it is **dropped** and its neighbours interpolate it, and
it is listed in ``meta["conversion"]["dropped_outliers"]``; the bundle's ``outliers`` (points used
as measured) stays empty. Native bundles keep and warn about theirs.

Errors (:class:`jaxsim.errors.JaxsimInputError`): unknown hardware or variant, a TP degree that
does not divide the heads, head counts / head_dim absent from the attention tables (naming what
they hold), a missing or malformed shipped file (``fit.json`` without ``moe_fallback`` where the
fallback is needed).
"""

import csv
import dataclasses
import functools
import gzip
import json
import math
from pathlib import Path

import numpy as np

from jaxsim.errors import JaxsimInputError
from jaxsim.model import ModelConfig
from jaxsim.operators import layer_operators, moe_expert_shapes
from jaxsim.profiles import (ProfileBundle, Table1D, axis_outliers, disabled_skew, load_architecture,
                             moe_table_from_rows, ordered_outliers, sum_attention, us_to_ns)

OPDB_DIR = "operator-db"
HARDWARE = {"h100": "h100_sxm", "h200": "h200_sxm", "b200": "b200_sxm", "gb200": "gb200",
            "rtxpro6000_opdb": "rtx_pro_6000_server"}
# variant -> (GEMM / MoE dtype, KV-cache dtype) in the tables' names; weight bytes for the byte model
VARIANTS = {"bf16": ("bfloat16", "bfloat16", 2), "bf16-kvfp8": ("bfloat16", "fp8", 2),
            "fp8": ("fp8", "bfloat16", 1), "fp8-kvfp8": ("fp8", "fp8", 1)}
FIT_FILE = "fit.json"
PC_AXIS = tuple(16 * 2 ** i for i in range(10))  # 16 ... 8192
KP_AXIS = (0,) + tuple(16 * 2 ** i for i in range(13))  # 0, 16 ... 65536
KVD_AXIS = tuple(16 * 2 ** i for i in range(14))  # 16 ... 131072
# cross-check names: hardware -> (converted hardware it reprices, native GPU left out of its constants)
LEAVE_OUT_HARDWARE = {"rtxpro6000_opdb_loo": ("rtxpro6000_opdb", "RTXPRO6000")}
MEMORY_LAYERS = ("embedding", "layernorm", "final_layernorm", "qk_norm", "rotary_emb", "act_fn", "sampler")


def is_operator_db(hardware) -> bool:
    """Whether ``hardware`` names a converted operator-database system (:data:`HARDWARE`, or a
    cross-check name of :data:`LEAVE_OUT_HARDWARE`)."""
    return str(hardware) in HARDWARE or str(hardware) in LEAVE_OUT_HARDWARE


def system_dir(profiles_dir, hardware: str) -> Path:
    """``<profiles_dir>/operator-db/<system>`` of a hardware name; an error for an unknown name."""
    if not is_operator_db(hardware):
        from jaxsim.profiles import known_hardware

        raise JaxsimInputError(str(Path(profiles_dir) / OPDB_DIR), f"unknown hardware {hardware!r}",
                               f"known hardware: {known_hardware(profiles_dir)}")
    d = Path(profiles_dir) / OPDB_DIR / HARDWARE[LEAVE_OUT_HARDWARE.get(hardware, (hardware,))[0]]
    if not d.is_dir():
        raise JaxsimInputError(str(d), f"missing operator-database folder of {hardware!r}",
                               "run python scripts/import_operator_db.py")
    return d


def operator_db_hardware(profiles_dir) -> list:
    """The hardware names whose converted folder exists under ``<profiles_dir>/operator-db``."""
    return sorted(h for h, s in HARDWARE.items() if (Path(profiles_dir) / OPDB_DIR / s).is_dir())


# ------------------------------------------------------------------------------------- reading
@functools.lru_cache(maxsize=64)
def read_table(path: str) -> dict:
    """A shipped CSV (``.csv`` or ``.csv.gz``) as ``{column: numpy array}`` (numbers as float64,
    text as str arrays), plus ``"_line"``: each row's file line. Errors name the file and line."""
    p = Path(path)
    if not p.is_file():
        raise JaxsimInputError(path, "missing operator-database table", "run python scripts/import_operator_db.py")
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rt", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            raise JaxsimInputError(path, "empty file", "run python scripts/import_operator_db.py")
        rows = []
        for fields in reader:
            if len(fields) != len(header):
                raise JaxsimInputError(f"{path}:{reader.line_num}", f"expected {len(header)} fields, found "
                                       f"{len(fields)}", "rerun python scripts/import_operator_db.py")
            rows.append(fields)
    cols = {}
    for j, name in enumerate(header):
        vals = [r[j] for r in rows]
        try:
            cols[name] = np.array([float(v) for v in vals], np.float64)
        except ValueError:
            cols[name] = np.array(vals, dtype=str)
    cols["_line"] = np.arange(2, len(rows) + 2, dtype=np.int64)
    if "time_us" in cols and (cols["time_us"].dtype.kind != "f" or not np.all(np.isfinite(cols["time_us"]))
                              or np.any(cols["time_us"] < 0)):
        raise JaxsimInputError(path, "column 'time_us' has a non-numeric, negative or non-finite value",
                               "rerun python scripts/import_operator_db.py")
    return cols


def load_fit(profiles_dir) -> dict:
    """``profiles/operator-db/fit.json`` (written by ``scripts/fit_operator_db.py``)."""
    path = Path(profiles_dir) / OPDB_DIR / FIT_FILE
    if not path.is_file():
        raise JaxsimInputError(str(path), "missing fitted constants of the operator-database converter",
                               "run python scripts/fit_operator_db.py")
    return json.loads(path.read_text())


def fit_constants(fit: dict, leave_out: "str | None" = None) -> dict:
    """``fit`` (``fit.json``) with the constant set to price with: unchanged for ``leave_out=None``
    (the joint fit); else a copy whose ``bandwidth.classes`` and ``attention.prefill_latency`` /
    ``attention.mixed`` constants are ``fit["leave_out"][leave_out]``'s (fitted without native GPU
    ``leave_out``, module docstring), with ``constant_set`` naming it.

    Raises :class:`JaxsimInputError` when ``fit.json`` holds no such set (or an incomplete one).
    """
    if leave_out is None:
        return {**fit, "constant_set": "joint"}
    path = f"{OPDB_DIR}/{FIT_FILE}"
    lo = fit.get("leave_out", {}).get(leave_out)
    if lo is None:
        raise JaxsimInputError(path, f"no constants fitted with {leave_out} left out (leave_out.{leave_out})",
                               "rerun python scripts/fit_operator_db.py")
    missing = sorted(set(fit["bandwidth"]["classes"]) - set(lo["bandwidth"]["classes"]))
    if missing:
        raise JaxsimInputError(path, f"leave_out.{leave_out}.bandwidth.classes lacks {missing}",
                               "rerun python scripts/fit_operator_db.py")
    att = fit["attention"]
    return {**fit, "constant_set": f"leave_out {leave_out}",
            "bandwidth": {**fit["bandwidth"], "classes": lo["bandwidth"]["classes"],
                          "provenance": lo["provenance"]},
            "attention": {**att, "prefill_latency": {**att["prefill_latency"], **lo["attention"]["prefill_latency"]},
                          "mixed": {**att["mixed"], **lo["attention"]["mixed"]},
                          "provenance": lo["provenance"]}}


def spec_sheet(sdir: Path) -> dict:
    import yaml

    return yaml.safe_load((Path(sdir) / "spec.yaml").read_text())


def hardware_defaults(profiles_dir, hardware: str, tp: int) -> dict:
    """What a converted system supplies for a hardware config's null fields
    (:func:`jaxsim.planning.resolve_hardware`): ``mem_size_gb`` from its spec sheet
    (``gpu.mem_capacity``, GiB) and the TP ring's ``link_bw_gbps`` / ``link_latency_ns`` fitted to
    its vLLM custom all-reduce table (eager backend) at ``tp`` GPUs (``fit.json`` ``allreduce``;
    ``tp = 1`` runs no collective and takes the smallest fitted degree's).

    Raises:
      JaxsimInputError: at ``hardware.tp`` when the table holds no all-reduce at ``tp`` GPUs.
    """
    sdir = system_dir(profiles_dir, hardware)
    fits = load_fit(profiles_dir)["allreduce"][sdir.name]["vllm_eager"]
    degrees = sorted(int(n) for n in fits)
    n = degrees[0] if tp == 1 else tp
    if str(n) not in fits:
        raise JaxsimInputError("hardware.tp", f"{hardware}'s all-reduce table holds {degrees} GPUs, not {tp}, so its "
                               "TP link cannot be derived", "set hardware.link_bw_gbps and hardware.link_latency_ns")
    cap = float(spec_sheet(sdir)["gpu"]["mem_capacity"])
    return {"mem_size_gb": round(cap / 2 ** 30, 2), "link_bw_gbps": float(fits[str(n)]["link_bw_gbps"]),
            "link_latency_ns": float(fits[str(n)]["link_latency_ns"])}


# ----------------------------------------------------------------------------------------- GEMM
class GemmGrid:
    """One dtype of the GEMM table as a dense ``[M, N, K]`` array of µs (NaN where not measured)."""

    def __init__(self, path: str, dtype: str):
        t = read_table(path)
        sel = t["gemm_dtype"] == dtype
        if not sel.any():
            raise JaxsimInputError(path, f"no GEMM rows of dtype {dtype!r}",
                                   f"dtypes held: {sorted(set(t['gemm_dtype'].tolist()))}")
        self.path = path
        m, n, k = (t[c][sel].astype(np.int64) for c in ("m", "n", "k"))
        self.m, self.n, self.k = np.unique(m), np.unique(n), np.unique(k)
        self.us = np.full((len(self.m), len(self.n), len(self.k)), np.nan)
        self.line = np.zeros(self.us.shape, np.int64)
        idx = (np.searchsorted(self.m, m), np.searchsorted(self.n, n), np.searchsorted(self.k, k))
        self.us[idx] = t["time_us"][sel]
        self.line[idx] = t["_line"][sel]


def _log_bracket(axis: np.ndarray, x: float) -> tuple:
    """``(i0, i1, w, scale)``: ``x`` between ``axis[i0]`` and ``axis[i1]`` at weight ``w`` of ``i1`` in log
    space; outside the axis the end point with ``scale`` = 1 below (clamp) and ``x / axis[-1]``
    above (linear growth)."""
    x = float(x)
    if x <= axis[0]:
        return 0, 0, 0.0, 1.0
    if x >= axis[-1]:
        return len(axis) - 1, len(axis) - 1, 0.0, x / float(axis[-1])
    i1 = int(np.searchsorted(axis, x))
    if axis[i1] == x:
        return i1, i1, 0.0, 1.0
    i0 = i1 - 1
    return i0, i1, math.log(x / axis[i0]) / math.log(axis[i1] / axis[i0]), 1.0


def gemm_us(grid: GemmGrid, n: int, k: int, n_axis=None, k_axis=None) -> tuple:
    """Time (µs) of a ``[m, k] @ [k, n]`` GEMM for every ``m`` of the table: ``(times [M], corners)``.

    Bilinear in ``(log n, log k)`` on ``log t`` between the bracketing grid points (module
    docstring); NaN where a corner was not measured. ``corners``: the ``(n index, k index)`` pairs
    used. ``n_axis``/``k_axis``: index subsets of the grid to interpolate on (the leave-one-out
    measurement drops one point); default all.
    """
    ni = np.arange(len(grid.n)) if n_axis is None else np.asarray(n_axis)
    ki = np.arange(len(grid.k)) if k_axis is None else np.asarray(k_axis)
    a0, a1, wa, sa = _log_bracket(grid.n[ni], n)
    b0, b1, wb, sb = _log_bracket(grid.k[ki], k)
    na = [(a0, 1.0 - wa), (a1, wa)] if a0 != a1 else [(a0, 1.0)]
    nb = [(b0, 1.0 - wb), (b1, wb)] if b0 != b1 else [(b0, 1.0)]
    corners = [(ni[a], ki[b], u * v) for a, u in na for b, v in nb]
    logt = sum(w * np.log(grid.us[:, i, j]) for i, j, w in corners)
    return np.exp(logt) * sa * sb, [(i, j) for i, j, _ in corners]


def _gemm_table(grid: GemmGrid, n: int, k: int, name: str) -> tuple:
    """``(Table1D keyed by m, dropped outliers)`` of one GEMM layer: an m whose value at a corner used
    is a grid outlier along m is left out (the engine interpolates it from the neighbouring m)."""
    us, corners = gemm_us(grid, n, k)
    outliers = []
    for i, j in corners:
        pts = {int(grid.m[r]): (float(grid.us[r, i, j]), int(grid.line[r, i, j]))
               for r in range(len(grid.m)) if np.isfinite(grid.us[r, i, j])}
        out = axis_outliers(grid.path, pts, lambda x, i=i, j=j: f"gemm n={grid.n[i]} k={grid.k[j]} m={x}")
        bad = {ln for _, ln, _ in out}
        us = np.where(np.isin(grid.line[:, i, j], list(bad)), np.nan, us)
        outliers += out
    ok = np.isfinite(us)
    if not ok.any():
        raise JaxsimInputError(grid.path, f"layer {name!r}: no measured GEMM at n={n}, k={k}", "")
    return Table1D(grid.m[ok].astype(np.int64), us_to_ns(us[ok])), outliers


# -------------------------------------------------------------------------------- memory-bound
def memory_us(op, x, mem_bw_bytes_per_s: float, t0_us: float, eff: float):
    """``t0 + bytes(x) / (eff * mem_bw)`` in µs (module docstring); ``x`` rows (tokens or sequences)."""
    return t0_us + np.asarray(op.bytes(np.asarray(x, np.float64))) / (eff * mem_bw_bytes_per_s) * 1e6


def operator_class(fit: dict, name: str) -> str:
    cls = fit["bandwidth"]["operator_class"].get(name)
    if cls is None:
        raise JaxsimInputError(f"{OPDB_DIR}/{FIT_FILE}", f"no bandwidth-model class for layer {name!r}",
                               "rerun python scripts/fit_operator_db.py")
    return cls


# ------------------------------------------------------------------------------------ attention
def _loglog(xs: np.ndarray, ys: np.ndarray, x: float, power_above: float) -> float:
    """Piecewise log-log interpolation of ``ys(xs)`` at ``x``; clamp below; ``y_last * (x/x_last)**power_above``
    above."""
    if x <= xs[0]:
        return float(ys[0])
    if x >= xs[-1]:
        return float(ys[-1]) * (x / float(xs[-1])) ** power_above
    return float(np.exp(np.interp(math.log(x), np.log(xs), np.log(ys))))


def mixed_us(P, D, kvd, G, c: dict):
    """A mixed batch's attention (µs) from its parts (module docstring; ``fit.json`` ``attention.mixed``):
    ``max(max(P, gamma*kvd) + (1 + beta*(G-1))*D - c0, P, D)``; P the prefill-only and D the
    decode-only time, kvd the decodes' KV length, G = num_heads / num_kv_heads. Arrays broadcast."""
    P, D, kvd = (np.asarray(x, np.float64) for x in (P, D, kvd))
    t = np.maximum(P, c["gamma_us_per_key"] * kvd) + (1.0 + c["beta"] * (G - 1.0)) * D - c["c0_us"]
    return np.maximum(t, np.maximum(P, D))


def _drop_outliers(path, points: dict, what) -> tuple:
    """``(kept points, dropped [(file, line, text)])``: the :func:`jaxsim.profiles.grid_outliers` of one
    axis removed (module docstring: a third party's measurement glitches; the neighbours interpolate)."""
    out = axis_outliers(path, points, what)
    bad = {ln for _, ln, _ in out}
    return {k: v for k, v in points.items() if v[1] not in bad}, out


def _head_rows(path: str, t: dict, base, heads: tuple, what: str, model, tp: int, hardware: str):
    """The mask of ``t``'s rows within ``base`` at (query heads, KV heads, head_dim) = ``heads``; a
    :func:`_heads_error` listing the head shapes ``base`` holds when there are none."""
    h, kvh, hd = heads
    sel = base & (t["num_heads"] == h) & (t["num_key_value_heads"] == kvh) & (t["head_dim"] == hd)
    if not sel.any():
        held = sorted({(int(a), int(b), int(d)) for a, b, d in zip(t["num_heads"][base], t["num_key_value_heads"][base],
                                                                      t["head_dim"][base])})
        raise _heads_error(path, what, held, model, tp, hardware)
    return sel


def _heads_error(path, what, held, model, tp, hardware):
    return JaxsimInputError(path, f"{hardware}: {model.name} at tp={tp} needs {what}, which the table does not hold",
                            f"(num_heads, num_kv_heads, head_dim) per rank held: {held}")


def attention_parts(sdir: Path, hardware: str, model: ModelConfig, tp: int, kv_dtype: str, fit=None) -> tuple:
    """``(prefill(pc, kp) -> µs, decode(nd, kvd) -> µs, batch sizes, dropped outliers, info)`` for the
    model's per-rank heads (module docstring). ``fit``: ``fit.json``'s ``attention`` (default: the
    shipped one); the prefill's latency-path bound comes from it."""
    if fit is None:
        fit = load_fit(Path(sdir).parent.parent)["attention"]
    lat = fit["prefill_latency"]
    h, kvh, hd = model.num_heads // tp, model.num_kv_heads // tp, model.head_dim
    outliers = []
    cpath = str(sdir / "context_attention.csv.gz")
    c = read_table(cpath)
    sel = _head_rows(cpath, c, (c["kv_cache_dtype"] == kv_dtype) & (c["batch_size"] == 1), (h, kvh, hd),
                     f"prefill attention with ({h}, {kvh}, {hd}) and a {kv_dtype} KV cache", model, tp, hardware)
    pts, out = _drop_outliers(cpath, {int(x): (float(v), int(ln)) for x, v, ln in
                                      zip(c["isl"][sel], c["time_us"][sel], c["_line"][sel])},
                              lambda x: f"context_attention heads={h}/{kvh} isl={x}")
    outliers += out
    isl = np.array(sorted(pts), np.float64)
    cus = np.array([pts[int(x)][0] for x in isl])

    gpath = str(sdir / "generation_attention.csv.gz")
    g = read_table(gpath)
    gsel = _head_rows(gpath, g, g["kv_cache_dtype"] == kv_dtype, (h, kvh, hd),
                      f"decode attention with ({h}, {kvh}, {hd}) and a {kv_dtype} KV cache", model, tp, hardware)
    ctx = (g["isl"] + g["step"])[gsel]
    bs, gus, glines = g["batch_size"][gsel], g["time_us"][gsel], g["_line"][gsel]
    batches = np.unique(bs).astype(np.int64)
    rows = {}
    for b in batches:
        m = bs == b
        pts, out = _drop_outliers(gpath, {int(x): (float(v), int(ln)) for x, v, ln in zip(ctx[m], gus[m], glines[m])},
                                  lambda x, b=b: f"generation_attention heads={h}/{kvh} batch={b} context={x}")
        outliers += out
        xs = np.array(sorted(pts), np.float64)
        rows[int(b)] = (xs, np.array([pts[int(x)][0] for x in xs]))
    common = sorted(set.intersection(*(set(r[0].tolist()) for r in rows.values())))

    def decode_at(b, kvd):
        xs, ys = rows[b]
        return _loglog(xs, ys, kvd, 1.0)

    def prefill(pc, kp):
        L = math.sqrt(pc * pc + 2.0 * pc * kp)
        flops = _loglog(isl, cus, L, 2.0)  # the causal prefill with the same attention FLOPs
        # the chunk's last query tile streams the history's keys too (fit.json attention.prefill_latency)
        stream = _loglog(isl, cus, pc, 2.0) + lat["gamma_us_per_key"] * kp * hd / 128.0
        return max(flops, stream, decode_at(int(batches[0]), kp + pc) if batches[0] == 1 else 0.0)

    def decode(nd, kvd):
        if nd in rows:
            return decode_at(nd, kvd)
        i0, i1, w, s = _log_bracket(batches.astype(np.float64), nd)
        t0, t1 = decode_at(int(batches[i0]), kvd), decode_at(int(batches[i1]), kvd)
        return math.exp((1 - w) * math.log(t0) + w * math.log(t1)) * s

    return prefill, decode, batches, outliers, {"context_isl_max": int(isl[-1]), "generation_context_common": common[-1:],
                                                 "group_size": model.num_heads // model.num_kv_heads}


def attention_table(sdir: Path, hardware: str, model: ModelConfig, tp: int, kv_dtype: str, fit=None) -> tuple:
    """``(AttentionTable, dropped outliers, info)``: the §2.5 table; prefill-only and decode-only cells
    from :func:`attention_parts`, mixed cells combined by :func:`mixed_us` (module docstring)."""

    if fit is None:
        fit = load_fit(Path(sdir).parent.parent)["attention"]
    prefill, decode, batches, outliers, info = attention_parts(sdir, hardware, model, tp, kv_dtype, fit)
    # per chunk, only the histories whose equivalent length is in the context table: a query beyond
    # them extrapolates linearly in kp (the engine flags it), never a silently extrapolated grid value
    top = info["context_isl_max"]
    kp_rows = {}
    for pc in PC_AXIS:
        kps = [kp for kp in KP_AXIS if pc * pc + 2 * pc * kp <= top * top]
        kp_rows[pc] = (np.array(kps, np.int64), us_to_ns([prefill(pc, kp) for kp in kps]))
    kv_rows = {int(b): (np.array(KVD_AXIS, np.int64), us_to_ns([decode(int(b), kvd) for kvd in KVD_AXIS]))
               for b in batches}
    at = sum_attention(kp_rows, kv_rows)
    # mixed cells (pc > 0, nd > 0): recombine the parts (the slice's first row / column are nd = 0 / pc = 0)
    vals = at.values_ns.copy()
    pv = {int(pc): dict(zip(k.tolist(), v.tolist())) for pc, (k, v) in kp_rows.items()}
    dv = {int(b): dict(zip(k.tolist(), v.tolist())) for b, (k, v) in kv_rows.items()}
    for i, pc in enumerate(at.pc_axis):
        for j, nd in enumerate(at.nd_axis):
            if pc == 0 or nd == 0:
                continue
            kp = at.kp_keys[i, j, : at.n_kp[i, j]]
            for r, k in enumerate(kp):
                kvd = at.kvd_keys[i, j, r, : at.n_kvd[i, j, r]]
                P = pv[int(pc)][int(k)] / 1000.0
                D = np.array([dv[int(nd)][int(x)] for x in kvd]) / 1000.0
                vals[i, j, r, : len(kvd)] = us_to_ns(mixed_us(P, D, kvd, info["group_size"], fit["mixed"]))
    info["mixed"] = {k: fit["mixed"][k] for k in ("gamma_us_per_key", "beta", "c0_us")}
    info["prefill_latency"] = {"gamma_us_per_key": fit["prefill_latency"]["gamma_us_per_key"]}
    return dataclasses.replace(at, values_ns=vals), outliers, info


# ------------------------------------------------------------------------------------------ MoE
MOE_PATHS = ("table", "gemm_fallback")
_WARNED_FALLBACK: set = set()  # (hardware, model, dtype, ep) already warned about


def moe_shape_rows(t: dict, model: ModelConfig, ep: int, dtype: str) -> np.ndarray:
    """Mask of the MoE table ``t``'s rows of ``model``'s shape at ``moe_tp = 1``, ``moe_ep = ep``."""
    return ((t["moe_dtype"] == dtype) & (t["hidden_size"] == model.hidden_size)
            & (t["inter_size"] == model.moe_intermediate_size) & (t["topk"] == model.experts_per_token)
            & (t["num_experts"] == model.num_experts) & (t["moe_tp_size"] == 1) & (t["moe_ep_size"] == ep))


def balanced_keys(T, ep: int, k: int, E: int) -> tuple:
    """``(local tokens, activated experts)`` of one EP rank for ``T`` tokens (§1.9 BALANCED):
    ``local = max(1, round(T*(1-((ep-1)/ep)**k)))``, ``act = max(1, min(round(T*k/ep), E/ep))``."""
    f = 1.0 - ((ep - 1) / ep) ** k
    return max(1, int(round(T * f))), max(1, int(min(round(T * k / ep), E // ep)))


def gemm_at(grid: GemmGrid, n: int, k: int, m) -> np.ndarray:
    """GEMM time (µs) at fractional row counts ``m``: :func:`gemm_us` at ``(n, k)``, linear in m
    between the table's m (§2.4's token lookup), clamped below its smallest m, linear growth
    ``t(m_max) * m / m_max`` above its largest (the work splits into row blocks)."""
    us, _ = gemm_us(grid, n, k)
    ok = np.isfinite(us)
    if not ok.any():
        raise JaxsimInputError(grid.path, f"no measured GEMM at n={n}, k={k}", "")
    ms, ts = grid.m[ok].astype(np.float64), us[ok]
    m = np.asarray(m, np.float64)
    return np.where(m > ms[-1], ts[-1] * m / ms[-1], np.interp(m, ms, ts))


def moe_fallback_us(grid: GemmGrid, model: ModelConfig, ep: int, T, act_fn: dict, mem_bw: float,
                    weight_bytes: int = 2, form: str = "grouped") -> tuple:
    """The experts' part of a MoE block on one EP rank, composed from the GEMM table (µs), for
    token counts ``T`` (array): ``(times [len(T)], per-expert floor removed, µs)``.

    The legacy per-expert composition (:func:`jaxsim.legacy_profiles._moe_table`, REFERENCE.md
    §1.9 / §2.7): the rank's ``T*k/ep`` token-expert assignments spread evenly on its
    ``ae`` activated experts (:func:`balanced_keys`), so each expert sees ``m = T*k/(ep*ae)`` rows and
    runs its gate/up GEMM ``(m, 2I, H)`` (:func:`gemm_at`), ``act_fn`` (``3*I`` activations per row,
    the converter's bandwidth model ``t0 + bytes / (eff * mem_bw)`` with ``act_fn``'s fitted
    ``(t0_us, eff)``) and its down GEMM ``(m, H, I)``; the block is ``ae`` times that. A fused-MoE
    kernel runs the experts as one grouped GEMM, not ``ae`` launches of each kernel: with
    ``grouped`` (the default, what the converter uses) the ``ae - 1`` extra launches are removed,
    ``(ae - 1) * floor`` with ``floor = 2 * gemm_floor + act_fn t0``, ``gemm_floor`` the GEMM
    table's smallest time at its smallest m (a launch-bound GEMM). ``fit.json`` ``moe_fallback``:
    the error of both forms against the fused-MoE table where it holds the shape
    (``scripts/fit_operator_db.py``). The router GEMM is not included (the caller adds it).
    """
    I, k, E = model.moe_intermediate_size, model.experts_per_token, model.num_experts
    T = np.asarray(T, np.float64)
    act = np.array([balanced_keys(t, ep, k, E)[1] for t in T], np.float64)
    m = T * k / ep / act
    (n1, k1), (n2, k2) = moe_expert_shapes(model, 1)
    op = layer_operators(dataclasses.replace(model, intermediate_size=I), 1, 2, weight_bytes)["act_fn"]
    per_expert = gemm_at(grid, n1, k1, m) + memory_us(op, m, mem_bw, act_fn["t0_us"], act_fn["eff"]) \
        + gemm_at(grid, n2, k2, m)
    floor = 2.0 * float(np.nanmin(grid.us[0])) + float(act_fn["t0_us"]) if form == "grouped" else 0.0
    return act * per_expert - (act - 1.0) * floor, floor


def moe_fallback_scale(sdir: Path, dtype: str) -> float:
    """``fit.json`` ``moe_fallback.scale[system][dtype]``: the system's fused-MoE kernel time over the
    grouped composition, fitted on every shape of its MoE table (``scripts/fit_operator_db.py``)."""
    fit = load_fit(Path(sdir).parent.parent)
    try:
        return float(fit["moe_fallback"]["scale"][Path(sdir).name][dtype])
    except KeyError:
        raise JaxsimInputError(f"{OPDB_DIR}/{FIT_FILE}", f"no moe_fallback.scale for {Path(sdir).name} {dtype}",
                               "run python scripts/fit_operator_db.py --moe-fallback") from None


def _balanced_rows(T, expert_us, router_us, ep: int, k: int, E: int) -> dict:
    """``{activated experts: {local tokens: µs}}`` of the block at token counts ``T`` (module docstring),
    each row extended (constant) to its neighbours' nearest token counts."""
    rows: dict = {}
    for tok, v, r in zip(T, expert_us, router_us):
        local, act = balanced_keys(float(tok), ep, k, E)
        rows.setdefault(act, {}).setdefault(local, float(v) + float(r))
    # Each row also gets its neighbours' nearest token counts at its own edge value (constant), so
    # that a balanced-path query, which blends the two rows around its act at its own token count,
    # interpolates inside both rows instead of counting as an extrapolation (the values it returns
    # do not change).
    order = sorted(rows)
    edges = [(min(rows[ae]), max(rows[ae])) for ae in order]  # before any extension
    for i, ae in enumerate(order):
        r = rows[ae]
        lo, hi = r[edges[i][0]], r[edges[i][1]]
        if i > 0:
            r.setdefault(edges[i - 1][1], lo)
        if i + 1 < len(order):
            r.setdefault(edges[i + 1][0], hi)
    return rows


def moe_table(sdir: Path, hardware: str, model: ModelConfig, ep: int, dtype: str, gemm: GemmGrid,
              act_fn: "dict | None" = None, mem_bw: "float | None" = None, weight_bytes: int = 2,
              force_fallback: bool = False) -> tuple:
    """``(MoETable, outliers, info)`` of one EP rank (module docstring): from the fused-MoE table
    when it holds the model's shape at ``moe_ep = ep``, else from :func:`moe_fallback_us` (needs
    ``act_fn`` = ``fit.json`` ``bandwidth.classes.act_fn`` and the spec sheet's ``mem_bw`` in bytes/s;
    warns once per hardware, model, dtype and ep). ``info["path"]``: ``"table"`` or ``"gemm_fallback"``.
    ``force_fallback``: the fallback even where the table holds the shape (its error measurement)."""
    path = str(sdir / "moe.csv.gz")
    t = read_table(path)
    H, I, k, E = model.hidden_size, model.moe_intermediate_size, model.experts_per_token, model.num_experts
    ep = max(1, min(int(ep), E))
    sel = moe_shape_rows(t, model, ep, dtype)
    router, _ = gemm_us(gemm, E, H)  # router logits for every token (replicated on each rank)
    ok = np.isfinite(router)
    info = {"ep_assumed": ep, "moe_tp": 1, "router_gemm": [E, H]}
    if sel.any() and not force_fallback:
        pts, outliers = _drop_outliers(path, {int(x): (float(v), int(ln)) for x, v, ln in
                                              zip(t["num_tokens"][sel], t["time_us"][sel], t["_line"][sel])},
                                       lambda x: f"moe H={H} I={I} topk={k} E={E} ep={ep} num_tokens={x}")
        T = np.array(sorted(pts), np.float64)
        us = np.array([pts[int(x)][0] for x in T])
        info.update(path="table", rows=int(sel.sum()),
                    formula="moe(num_tokens T) + router GEMM(T, E, H) at (round(T*f), min(round(T*k/ep), E/ep))")
    else:
        if act_fn is None or mem_bw is None:
            raise JaxsimInputError(path, f"{hardware}: the MoE fallback for {model.name} needs act_fn's bandwidth "
                                   "constants and mem_bw", "pass act_fn and mem_bw")
        outliers = []
        # the token counts the MoE table is measured at (its largest: 16384), so both paths share keys
        T = np.unique(t["num_tokens"]).astype(np.float64)
        composed, floor = moe_fallback_us(gemm, model, ep, T, act_fn, mem_bw, weight_bytes)
        scale = moe_fallback_scale(Path(sdir), dtype)
        us = scale * composed
        shape = f"(hidden {H}, moe intermediate {I}, topk {k}, {E} experts, moe_tp 1, moe_ep {ep}, {dtype})"
        info.update(path="gemm_fallback", missing_shape=shape, grouped_launch_floor_us=round(floor, 5), scale=scale,
                    gemm_shapes=[list(s) for s in moe_expert_shapes(model, 1)],
                    formula="router GEMM(T, E, H) + scale*(ae*(gate_up GEMM(m, 2I, H) + act_fn(m) + down GEMM(m, H, I)) "
                            "- (ae-1)*(2*gemm_floor + act_fn t0)), m = T*k/(ep*ae), at (round(T*f), ae)",
                    error="fit.json moe_fallback (fallback vs the fused-MoE table where it holds the shape)")
        key = (hardware, model.name, dtype, ep)
        if key not in _WARNED_FALLBACK and not force_fallback:
            _WARNED_FALLBACK.add(key)
            import warnings

            warnings.warn(f"{path}: {hardware}: the MoE table has no rows for {model.name} {shape}; its MoE block is "
                          "composed from the GEMM table (jaxsim.operator_db.moe_fallback_us; error: fit.json "
                          "moe_fallback)", stacklevel=3)
    r_us = np.interp(T, gemm.m[ok], router[ok])
    return moe_table_from_rows(_balanced_rows(T, us, r_us, ep, k, E)), outliers, info


# --------------------------------------------------------------------------------------- bundle
def check_tp(hardware: str, model: ModelConfig, tp: int) -> None:
    """An error when ``tp`` does not divide the heads (or the intermediate size)."""
    bad = [f"{name} {v}" for name, v in (("num_heads", model.num_heads), ("num_kv_heads", model.num_kv_heads),
                                          ("intermediate_size", model.intermediate_size)) if v % tp]
    if tp < 1 or bad:
        ok = [d for d in range(1, 65) if model.num_heads % d == 0 and model.num_kv_heads % d == 0
              and model.intermediate_size % d == 0]
        raise JaxsimInputError("hardware.tp", f"{hardware}: tp={tp} does not divide {model.name}'s "
                               f"{', '.join(bad) or 'heads'}", f"TP degrees that divide: {ok}")


@functools.lru_cache(maxsize=32)
def _load(profiles_dir: str, hardware: str, model: ModelConfig, variant: str, tp: int) -> ProfileBundle:
    sdir = system_dir(profiles_dir, hardware)
    if variant not in VARIANTS:
        raise JaxsimInputError(str(sdir), f"no variant {variant!r} of {model.name} on {hardware}",
                               f"converted variants: {sorted(VARIANTS)}")
    gdtype, kvdtype, wbytes = VARIANTS[variant]
    check_tp(hardware, model, tp)
    root = Path(profiles_dir)
    sequence, category, tp_stable = load_architecture(root, model.model_type)
    fit = fit_constants(load_fit(root), LEAVE_OUT_HARDWARE.get(hardware, (None, None))[1])
    spec = spec_sheet(sdir)
    mem_bw = float(spec["gpu"]["mem_bw"])
    gpath = str(sdir / "gemm.csv.gz")
    grid = GemmGrid(gpath, gdtype)
    ops = layer_operators(model, tp, act_bytes=2, weight_bytes=wbytes)
    dense, per_seq, kept, outliers, moe, conversion = {}, {}, {}, [], None, {}
    m_axis = grid.m.astype(np.int64)
    for group, names in sequence.items():
        kept[group] = []
        for name in names:
            cat = category[name]
            kept[group].append(name)
            if cat in ("attention", "moe") or name in dense or name in per_seq:
                continue
            op = ops.get(name)
            if op is None:
                raise JaxsimInputError(f"architectures/{model.model_type}.yaml", f"layer {name!r} has no operator "
                                       "shape in jaxsim.operators.layer_operators", "the converter cannot price it")
            if op.kind == "gemm":
                tab, out = _gemm_table(grid, op.n, op.k, name)
                outliers += out
            else:
                cls = operator_class(fit, name)
                c = fit["bandwidth"]["classes"][cls]
                tab = Table1D(m_axis, us_to_ns(memory_us(op, m_axis, mem_bw, c["t0_us"], c["eff"])))
            (per_seq if cat == "per_sequence" else dense)[name] = tab
    attention, att_out, att_info = attention_table(sdir, hardware, model, tp, kvdtype, fit["attention"])
    outliers += att_out
    conversion["attention"] = att_info
    if any(category[n] == "moe" for g in kept.values() for n in g):
        if not model.is_moe:
            raise JaxsimInputError(f"architectures/{model.model_type}.yaml", f"{model.name} has no experts but its "
                                   "architecture sequence has a MoE block", "check the model config")
        moe, moe_out, conversion["moe"] = moe_table(sdir, hardware, model, tp, gdtype, grid,
                                                      fit["bandwidth"]["classes"][operator_class(fit, "act_fn")],
                                                      mem_bw, wbytes)
        outliers += moe_out
    conversion["dropped_outliers"] = ordered_outliers(outliers)  # not used: interpolated from the neighbours
    engine = {"max_num_batched_tokens": int(attention.pc_axis[-1]), "max_num_seqs": int(attention.nd_axis[-1])}
    meta = {
        "format": "operator-db (jaxsim.operator_db)", "source": "NVIDIA AIConfigurator vLLM 0.19.0 tables",
        "system": sdir.name, "hardware": hardware, "constant_set": fit["constant_set"], "model": model.name, "variant": variant, "tp": tp,
        "gemm_dtype": gdtype, "kv_cache_dtype": kvdtype, "mem_bw": mem_bw,
        "bandwidth_fit": fit["bandwidth"]["provenance"], "attention_fit": fit["attention"]["provenance"], "engine_effective": engine, "skew_fit": {"enabled": False},
        "conversion": conversion,
    }
    return ProfileBundle(
        hardware=hardware, model_name=model.name, model_type=model.model_type, variant=variant, tp=tp,
        path=str(sdir), meta=meta, engine_effective=engine, sequence=kept, category=category, tp_stable=tp_stable,
        dense=dense, per_sequence=per_seq, attention=attention, moe=moe, skew=disabled_skew(), outliers=[])


def load_converted_bundle(profiles_dir, hardware: str, model: ModelConfig, variant: str = "bf16",
                          tp: int = 1) -> ProfileBundle:
    """The :class:`jaxsim.profiles.ProfileBundle` of ``model`` at TP ``tp`` on converted system
    ``hardware`` (:data:`HARDWARE`; or :data:`LEAVE_OUT_HARDWARE`: the same system priced with
    the constants fitted without its native twin), built from ``<profiles_dir>/operator-db/<system>/`` as the
    module docstring describes. Cached per (profiles_dir, hardware, model, variant, tp): the
    same object is returned (treat it as read-only).

    Raises :class:`JaxsimInputError` for an unknown hardware or variant, an indivisible TP
    degree, and shapes the tables do not hold (naming hardware, model, tp and what they hold).
    """
    return _load(str(profiles_dir), str(hardware), model, str(variant), int(tp))
