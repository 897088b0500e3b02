"""Legacy-format profiles (REFERENCE.md §2.8) converted into a :class:`jaxsim.profiles.ProfileBundle`.

Layout: ``<profiles>/legacy/<HW>/<org>/<model>/tp<N>/`` with ``layers.csv`` and, where profiled,
``attention.csv``; either file may be gzipped (``.csv.gz``). The hardware name is ``legacy/<HW>``
(e.g. ``legacy/H100``); :func:`jaxsim.profiles.load_profile_bundle` dispatches such names here, so
:func:`jaxsim.latency.latency_tables` and the whole simulator use the result unchanged. There is no
variant level: the format records no dtype, and it is served as the ``bf16`` variant only.

Dense layers (``layers.csv``: ``layer_name,input,kv_cache,tp_size,latency(ns)``, already in ns;
each value becomes ``max(1, round(v))`` int ns):

=================  =================================================================================
bundle layer       legacy rows
=================  =================================================================================
embedding          embedding
layernorm          ``(input_layernorm + post_layernorm) // 2``: the architecture sequence uses one
                   layernorm table twice per block, so a block adds exactly their sum (±1 ns)
qkv_proj           q_proj + k_proj + v_proj, summed per token count
rotary_emb         rope (skipped on hardware whose name contains "TPU", §2.1)
o_proj, act_fn,    same name
down_proj,
final_layernorm
gate_up_proj       gate_proj + up_proj, summed per token count
lm_head            lm_head, a ``per_sequence`` table: the legacy key is the number of rows that go
                   through the LM head (tokens); vLLM computes logits for the last token of each
                   sequence only, so the simulator's lookup at S sequences reads the row for S tokens
sampler            not in the legacy format: skipped with a warning (§2.1)
=================  =================================================================================

Checks (each failure is a :class:`JaxsimInputError` naming the file, and the line or layer): a
``(layer, input)`` point appears once (naming both lines), the ``tp_size`` column must equal the
folder's N, ``kv_cache`` must be 0, a layer taken as is must have
rows for every token count of the file's fullest layer, every part of a sum for every token count of
the first part, and every layer of the architecture sequence must be derivable. Two partial-coverage
patterns are accepted only after they are verified in the data (with a warning): ``up_proj`` rows
missing for a prefix of token counts [1, T0) while ``down_proj`` drops at T0 by at least half of
``up_proj(T0)`` and the MLP total (gate + up + down) stays within 10% across T0 (the up projection
was timed inside ``down_proj`` below T0; ``gate_up_proj`` is then ``gate_proj`` alone there); and
``act_fn`` rows present for only some token counts, each under 1% of gate_proj + down_proj at that
count (fused into the GEMMs; the layer is skipped). Everything else raises; in particular
``qkv_proj`` is never guessed from ``q_proj`` alone.

TPU-v6e-1 Llama-3.1-8B tp1 (verified): no k_proj / v_proj rows at all. Were q_proj the fused QKV
it would cost about 1.5x o_proj (same input, 1.5x the output columns); the measured q_proj/o_proj
ratio is 3.7 at T < 128 but 0.96-1.0 over T = 1025-1536 and 0.7-0.8 above (median 0.99 over
T >= 256), so the data do not show a fused QKV and the folder raises (naming layers.csv and the
missing k_proj/v_proj). Its up_proj (rows from T = 313) and act_fn (one row, T = 1, 33 ns) gaps pass
the checks above.

Attention (``attention.csv``; the same :class:`AttentionTable` as the native bundles, §2.5):

* GPU (Vidur-style): ``time_stats.attn_{prefill,decode}.mean`` in ms -> ``max(1, round(ms*1e6))``
  ns. Prefill rows (batch 1) give ``prefill(chunk, kp)``; their ``kv_cache_size`` counts the chunk
  itself (it is always >= the chunk, the first chunk has kv = chunk, and the A6000 times follow
  a + b*chunk*kv: 55.9 / 99.5 / 143.0 us at chunk 512, kv 512 / 1024 / 1536 predict 186.4 us at
  chunk 1024, kv 1024, measured 186.4 us), so the history is ``kp = kv - chunk``.
  Decode rows (chunk 0) give ``decode(batch, kvd)``; the rows with ``kv_cache_size < batch_size``
  are dropped: they time a no-op (<= 3.1 us for any batch, while every valid row is >= 4.3 us).
  The headers must match the model (``n_embd``, ``n_q_head``, ``n_kv_head``) and the folder's TP.
* TPU: ``mean_ns`` in ns; ``kv_cache_size`` of a prefill row is the history (it starts at 0).

Grid: pc axis = {0} + profiled chunks, nd axis = {0} + profiled decode batch sizes. A mixed batch
is ``prefill(pc, kp) + decode(nd, kvd)``, so the slices are filled as follows:

* ``(pc, 0)``: the chunk's kp rows, each with the single kvd key 0 -> ``prefill(pc, kp)``;
* ``(0, nd)``: one kp row (kp = 0) with the batch's kvd keys -> ``decode(nd, kvd)``;
* ``(pc, nd)``: the product of the chunk's kp rows and the batch's kvd keys, value
  ``prefill(pc, kp_r) + decode(nd, kvd_k)``. The §2.5 blend is linear with weights summing to 1 on
  every axis, so a lookup returns exactly ``prefill~(pc, kp) + decode~(nd, kvd)`` (each
  interpolated on its own data) for any batch, on and between grid points;
* ``(0, 0)`` has no slice and falls back (§2.5 nearest slice) to ``(0, 1)``: a prefill shorter
  than the first profiled chunk is a blend of one decode at the smallest KV and that chunk.

The full product does not fit (33 pc x 145 nd x 63 kp x 320 kvd values = 96M on A6000), so the
rows are thinned: per decode batch at most 32 kvd keys, per chunk at most 8 kp keys, chosen by
greedy worst-point insertion (endpoints first, then the point worst reproduced by linear
interpolation of the kept ones, until every dropped point is within 0.5% or the cap is reached).
Kept points are exact CSV values. Reproduction of *every* (valid) CSV row by the converted table
through the §2.5 lookup, relative error p50 / p90 / p99 / max:

==================  ===============================  ===============================
folder              decode                           prefill
==================  ===============================  ===============================
A6000 8B tp1        0.12% / 1.8% / 4.0% / 6.5%       0.03% / 0.23% / 0.31% / 0.50%
H100 70B tp4        0.18% / 1.2% / 3.1% / 6.0%       0.01% / 1.6% / 5.6% / 7.7%
H100 Mixtral tp4    0.14% / 0.5% / 2.4% / 4.4%       0.01% / 1.4% / 5.6% / 7.9%
TPU 8B tp1          0% / 0.31% / 0.47% / 0.69%       0.59% / 2.5% / 4.5% / 5.8%
==================  ===============================  ===============================

(the GPU decode data have steps of 20-30% in kvd and nd, e.g. FlashAttention's split heuristics,
so thinning cannot be lossless; all nd values are kept). A mixed lookup equals the
prefill-only plus the decode-only lookup to within 1 ns (integer truncation).

A chunk with a single kp row (GPU chunks >= 704, TPU chunk 2048: ``chunk + kv`` was capped at
2048) would be constant in kp (§2.4: one key). It gets one derived row at ``kp = chunk`` with slope
``s_ref * chunk / c_ref``, ``s_ref`` being the kp slope of the largest chunk ``c_ref`` with two or
more rows (history cost is per query, hence proportional to the chunk); ``meta["conversion"]``
lists these rows. Outside the profiled ranges the table extrapolates linearly like every bundle
(pc > 1024 on GPU, kvd above a batch's largest profiled KV).

No ``attention.csv`` (H100 Llama-3.1-8B tp1/tp2): attention comes from the layers.csv ``attn``
rows (attention without KV cache, keyed by tokens) with a warning: ``attn(pc + nd)``, on a grid
pc = 0..max key, nd = 0..256 (exact there, linear beyond); kp and kvd have no effect. A folder with
neither (Mixtral tp1/tp2) raises.

MoE (Mixtral-8x7B-v0.1; H100 tp4 is the only Mixtral folder with attention). Its layers.csv has
``gate`` (router), ``expert.w1``, ``expert.w3``, ``act_fn`` and ``expert.w2`` rows keyed by the
tokens through *one* expert, and they are the same at tp1/2/4 (whole experts on a rank: expert
parallelism; they match the H100 Llama-8B gate/up/down rows, the same 4096x14336 shapes). That is a
per-expert-load model, mapped onto the bundle's MoE table (``sequence.mlp_moe = [moe]`` of
mixtral.yaml: router and experts as one unit) as the time of one EP rank::

    moe(tokens, ae) = gate(tokens / f) + ae * FFN(tokens * k_loc / ae)
    FFN(n) = w1(n) + w3(n) + act_fn(n) + w2(n)     (1-D lookups of §2.4 at a fractional n)

with ``f = 1 - ((ep-1)/ep)**k`` (local tokens = f*T under BALANCED routing, so the replicated
router sees T = tokens/f) and ``k_loc = (k/ep)/f`` (expert assignments per local token, T*k/ep in
all), i.e. the rank's assignments spread evenly over its ``ae`` activated experts. ``ep`` is taken
as the TP degree (the simulator's default, and what the tp-invariant expert rows imply); with
``hardware.ep`` set otherwise only this load split is off. Rows: ae = 1..E, tokens = the profiled
token counts (1..2048). The AllGather/ReduceScatter and the single o_proj AllReduce are added by
:mod:`jaxsim.latency` as for any MoE bundle.

Outliers: the raw rows are checked along their axes (layers.csv rows of the layers the bundle uses
along ``input``; attention prefill rows along the history at each chunk, decode rows along the KV at
each batch size) with :func:`jaxsim.profiles.grid_outliers`; flagged points are used as measured,
listed in ``ProfileBundle.outliers`` and counted in one warning. The shipped rows have one:
TPU-v6e-1's ``o_proj`` at 1 token (22,919 ns against 5,296 and 5,217 ns at 2 and 3 tokens), in a
folder that is refused anyway (no k_proj / v_proj rows); the folders that load have none.

Repeated attention measurements: the shipped attention.csv files time about 300 points twice each
(A6000 302, H100 70B 390, Mixtral 437, TPU 293), within 1.25% of each other. Such a repeat is
accepted when the two times are within :data:`REPEAT_TOL` of each other (the later row is used, as
before); a repeat that disagrees more is an error naming both lines.

Skew correction (§2.6) is disabled (``SkewFit.enabled = False``): the legacy format has no skew fit.
``engine_effective`` is ``max_num_batched_tokens: 2048, max_num_seqs: 256`` (the profiled ranges).
"""

import csv
import gzip
import math
import warnings
import zlib
from pathlib import Path

import numpy as np

from jaxsim.errors import JaxsimInputError
from jaxsim.model import ModelConfig
from jaxsim.profiles import (AttentionTable, MoETable, ProfileBundle, Table1D, axis_outliers, disabled_skew,
                             duplicate_point, fallback_table, known_hardware, load_architecture, ordered_outliers,
                             sum_attention, tp_folder, warn_outliers)

LEGACY_DIR = "legacy"
PREFIX = LEGACY_DIR + "/"
VARIANT = "bf16"
ENGINE_EFFECTIVE = {"max_num_batched_tokens": 2048, "max_num_seqs": 256}

KVD_CAP = 32  # kvd keys kept per decode batch
KP_CAP = 8  # kp keys kept per prefill chunk
THIN_TOL = 0.005  # stop thinning a row once every dropped point is within 0.5%
FALLBACK_MAX_ND = 256  # nd axis of the layers.csv attn fallback: 0..256
REPEAT_TOL = 0.10  # repeated attention measurements of one point must agree within 10%

_LAYER_COLS = ("layer_name", "input", "kv_cache", "tp_size", "latency(ns)")
_VIDUR_COLS = ("time_stats.attn_prefill.mean", "time_stats.attn_decode.mean", "n_embd", "n_q_head", "n_kv_head",
               "num_tensor_parallel_workers", "batch_size", "prefill_chunk_size", "kv_cache_size", "is_prefill")
_TPU_COLS = ("prefill_chunk_size", "kv_cache_size", "batch_size", "is_prefill", "mean_ns")
_DIRECT = {"embedding": "embedding", "o_proj": "o_proj", "act_fn": "act_fn", "down_proj": "down_proj",
           "final_layernorm": "final_layernorm", "rotary_emb": "rope", "lm_head": "lm_head"}
_SUMS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_MEAN = {"layernorm": ("input_layernorm", "post_layernorm")}
_MOE_PARTS = ("gate", "expert.w1", "expert.w3", "act_fn", "expert.w2")


def is_legacy(hardware) -> bool:
    return str(hardware).startswith(PREFIX)


def legacy_hardware(profiles_dir) -> list:
    """``legacy/<HW>`` for every folder under ``<profiles_dir>/legacy/``."""
    p = Path(profiles_dir) / LEGACY_DIR
    if not p.is_dir():
        return []
    return sorted(PREFIX + x.name for x in p.iterdir() if x.is_dir() and not x.name.startswith("."))


# ------------------------------------------------------------------------------------------- CSVs
def _find(folder: Path, name: str):
    """``folder/name`` or ``folder/name.gz``, whichever exists (None if neither)."""
    for p in (folder / name, folder / (name + ".gz")):
        if p.is_file():
            return p
    return None


def _read(path: Path, required: tuple, optional: tuple = ()):
    """``(index, rows)``: column -> position for ``required`` (+ the ``optional`` present), and
    ``(line, fields)`` for every non-empty line. Clear errors for unreadable files and headers."""
    try:
        f = gzip.open(path, "rt", newline="") if path.suffix == ".gz" else open(path, newline="")
        with f:
            text = f.read()
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise JaxsimInputError(str(path), f"unreadable file: {e}", "restore it from the source data") from None
    try:
        lines = list(csv.reader(text.splitlines()))
    except csv.Error as e:
        raise JaxsimInputError(str(path), f"unreadable CSV: {e}", "restore it from the source data") from None
    if not lines or not any(h.strip() for h in lines[0]):
        raise JaxsimInputError(str(path), "empty file", f"expected a header with {list(required)}")
    header = [h.strip() for h in lines[0]]
    missing = [c for c in required if c not in header]
    if missing:
        raise JaxsimInputError(f"{path}:1", f"missing column(s) {missing} (header is {header})",
                               f"the file needs columns {list(required)}")
    index = {c: header.index(c) for c in (*required, *optional) if c in header}
    rows = []
    for n, fields in enumerate(lines[1:], start=2):
        if not fields or all(not x.strip() for x in fields):
            continue
        if len(fields) != len(header):
            raise JaxsimInputError(f"{path}:{n}", f"expected {len(header)} fields, found {len(fields)}",
                                   "fix or delete this line")
        rows.append((n, fields))
    return index, rows


def _field(path, line, fields, index, col, kind):
    text = fields[index[col]].strip()
    try:
        if kind is int:
            v = float(text)
            if not v.is_integer() or v < 0:
                raise ValueError
            return int(v)
        if kind is float:
            v = float(text)
            if not math.isfinite(v) or v < 0:
                raise ValueError
            return v
        if kind is bool:
            if text not in ("True", "False", "true", "false", "1", "0"):
                raise ValueError
            return text in ("True", "true", "1")
        return text
    except ValueError:
        what = {int: "a non-negative integer", float: "a finite non-negative number", bool: "True or False"}[kind]
        raise JaxsimInputError(f"{path}:{line}", f"column {col!r} = {text!r} is not {what}",
                               "fix or delete this line") from None


def _ns(v) -> int:
    return max(1, int(round(v)))


def _read_layers(path: Path, tp: int) -> tuple:
    """``(layer -> {tokens: int ns}, layer -> {tokens: file line})``; a point repeated is an error."""
    index, rows = _read(path, _LAYER_COLS)
    out: dict = {}
    lines: dict = {}
    for line, fields in rows:
        name = _field(path, line, fields, index, "layer_name", str)
        tokens = _field(path, line, fields, index, "input", int)
        kv = _field(path, line, fields, index, "kv_cache", int)
        tps = _field(path, line, fields, index, "tp_size", int)
        ns = _field(path, line, fields, index, "latency(ns)", float)
        if tps != tp:
            raise JaxsimInputError(f"{path}:{line}", f"tp_size {tps} in the tp{tp} folder",
                                   "the file belongs to another TP degree")
        if kv != 0:
            raise JaxsimInputError(f"{path}:{line}", f"kv_cache = {kv}: the legacy dense rows must have kv_cache 0",
                                   "KV-dependent dense rows are not supported; keep attention in attention.csv")
        if tokens < 1:
            raise JaxsimInputError(f"{path}:{line}", "input must be >= 1 token", "fix or delete this line")
        seen = lines.setdefault(name, {})
        if tokens in seen:
            raise duplicate_point(path, line, seen[tokens], f"layer {name!r} at input = {tokens}")
        seen[tokens] = line
        out.setdefault(name, {})[tokens] = _ns(ns)
    if not out:
        raise JaxsimInputError(str(path), "no rows", "restore the file from the source data")
    return out, lines


# -------------------------------------------------------------------------------- 1-D helpers
def _lookup(keys, values, q):
    """§2.4 at (float) queries: clamp below, interpolate, extrapolate above from the last two keys."""
    keys = np.asarray(keys, np.float64)
    values = np.asarray(values, np.float64)
    q = np.asarray(q, np.float64)
    if len(keys) == 1:
        return np.full(q.shape, values[0])
    out = np.interp(q, keys, values)
    above = q > keys[-1]
    slope = (values[-1] - values[-2]) / (keys[-1] - keys[-2])
    return np.where(above, values[-1] + (q - keys[-1]) * slope, out)


def _thin(xs, ys, cap: int, tol: float = THIN_TOL) -> np.ndarray:
    """Indices of at most ``cap`` points kept by greedy worst-point insertion (endpoints first)."""
    xs = np.asarray(xs, np.float64)
    ys = np.asarray(ys, np.float64)
    n = len(xs)
    if n <= max(cap, 2):
        return np.arange(n)
    keep = np.zeros(n, bool)
    keep[[0, n - 1]] = True
    while keep.sum() < cap:
        err = np.abs(np.interp(xs, xs[keep], ys[keep]) - ys) / np.maximum(ys, 1e-12)
        j = int(np.argmax(err))
        if err[j] <= tol:
            break
        keep[j] = True
    return np.flatnonzero(keep)


def _table(d: dict) -> Table1D:
    keys = np.array(sorted(d), np.int64)
    return Table1D(keys, np.array([d[int(k)] for k in keys], np.int64))


def _ranges(tokens) -> str:
    """'1-312, 400' for a sorted list of ints."""
    tokens = sorted(tokens)
    out, start, prev = [], tokens[0], tokens[0]
    for t in tokens[1:] + [None]:
        if t is not None and t == prev + 1:
            prev = t
            continue
        out.append(f"{start}-{prev}" if prev != start else f"{start}")
        if t is not None:
            start = prev = t
    return ", ".join(out)


# ---------------------------------------------------------------------------- dense mapping
class _Dense:
    """Builds the bundle's dense / per-sequence layers from the raw legacy rows."""

    def __init__(self, path: Path, raw: dict):
        self.path, self.raw = path, raw
        self.problems: list = []  # fatal: collected, raised together
        self.notes: list = []  # accepted deviations (warnings)
        self.skipped: set = set()

    def _need(self, name, target):
        if name not in self.raw:
            self.problems.append(f"no rows for layer {name!r} (needed for {target})")
            return None
        return self.raw[name]

    def direct(self, target):
        src = _DIRECT.get(target, target)
        d = self._need(src, target)
        if d is None:
            return None
        full = max((set(v) for v in self.raw.values()), key=len)  # the token counts of the fullest layer
        if target != "act_fn" and not set(d) >= full:
            self.problems.append(f"layer {src!r} has no rows for tokens {_ranges(sorted(full - set(d)))} "
                                 f"(needed for {target})")
            return None
        if target == "act_fn" and "down_proj" in self.raw:
            down = self.raw["down_proj"]
            missing = sorted(set(down) - set(d))
            if missing:
                gate = self.raw.get("gate_proj", {})
                share = max(v / max(1, down[t] + gate.get(t, 0)) for t, v in d.items() if t in down) \
                    if any(t in down for t in d) else math.inf
                if share < 0.01:
                    self.notes.append(f"'act_fn' has rows for tokens {_ranges(list(d))} only, each under 1% of "
                                      f"gate_proj + down_proj (max {share:.2%}): the activation is fused into the "
                                      "GEMMs on this hardware; the layer is skipped")
                    self.skipped.add(target)
                    return None
                self.problems.append(f"layer 'act_fn' has no rows for tokens {_ranges(missing)}")
                return None
        return _table(d)

    def mean(self, target):
        parts = [self._need(p, target) for p in _MEAN[target]]
        if any(p is None for p in parts):
            return None
        a, b = parts
        missing = sorted(set(a) ^ set(b))
        if missing:
            self.problems.append(f"{' and '.join(map(repr, _MEAN[target]))} differ in token counts "
                                 f"{_ranges(missing)} (needed for {target})")
            return None
        return _table({t: max(1, (a[t] + b[t]) // 2) for t in a})

    def total(self, target):
        names = _SUMS[target]
        absent = [n for n in names if n not in self.raw]
        if absent:
            why = ""
            if target == "qkv_proj" and names[0] in self.raw and "o_proj" in self.raw and len(absent) == 2:
                q, o = self.raw[names[0]], self.raw["o_proj"]
                r = [q[t] / o[t] for t in q if t >= 256 and t in o]
                if r:
                    why = (f"; q_proj alone is not evidently a fused QKV: q_proj/o_proj has median "
                           f"{np.median(r):.2f} over T >= 256 (range {min(r):.2f}-{max(r):.2f}), a fused QKV "
                           "would be about 1.5")
            self.problems.append(f"no rows for layer(s) {', '.join(map(repr, absent))}: {target} = "
                                 f"{' + '.join(names)} cannot be formed{why}")
            return None
        first = self.raw[names[0]]
        out = dict(first)
        for n in names[1:]:
            d = self.raw[n]
            missing = sorted(set(first) - set(d))
            if missing and not (n == "up_proj" and self._up_fused(d, missing)):
                self.problems.append(f"layer {n!r} has no rows for tokens {_ranges(missing)} "
                                     f"(needed for {target} = {' + '.join(names)})")
                return None
            for t in out:
                out[t] += d.get(t, 0)
        return _table(out)

    def _up_fused(self, up: dict, missing: list) -> bool:
        """up_proj missing for [1, T0): verified as timed inside down_proj below T0 (module docstring)."""
        t0 = min(up)
        gate, down = self.raw.get("gate_proj", {}), self.raw.get("down_proj", {})
        if missing != list(range(1, t0)) or any(t not in down or t not in gate for t in (t0 - 1, t0)):
            return False
        drop = down[t0 - 1] - down[t0]
        before = gate[t0 - 1] + down[t0 - 1]
        after = gate[t0] + up[t0] + down[t0]
        if drop < 0.5 * up[t0] or abs(after - before) > 0.10 * after:
            return False
        self.notes.append(f"'up_proj' has no rows below {t0} tokens; down_proj drops there by {drop} ns "
                          f"(up_proj({t0}) = {up[t0]} ns) and gate + up + down is continuous ({before} -> {after} "
                          f"ns), so the up projection was timed inside down_proj: gate_up_proj = gate_proj "
                          f"below {t0}")
        return True

    def build(self, target):
        if target in _SUMS:
            return self.total(target)
        if target in _MEAN:
            return self.mean(target)
        return self.direct(target)


# --------------------------------------------------------------------------------- attention
def _repeat(table: dict, lines: dict, a: int, b: int, ns: int, path, line: int, what: str) -> None:
    """``table[a][b] = ns`` (``lines`` likewise); a repeated point must agree with the first within
    :data:`REPEAT_TOL` (module docstring), the later row being used."""
    row, at = table.setdefault(a, {}), lines.setdefault(a, {})
    if b in row and abs(ns - row[b]) > REPEAT_TOL * min(ns, row[b]):
        raise JaxsimInputError(f"{path}:{line}", f"{what} is measured twice, {row[b]} ns at line {at[b]} and {ns} ns "
                               f"here: repeated measurements of a point must agree within {REPEAT_TOL:.0%}",
                               "delete the wrong line")
    row[b], at[b] = ns, line


def _attention_rows(path: Path, model: ModelConfig, tp: int):
    """``(prefill {chunk: {kp: ns}}, decode {batch: {kvd: ns}}, info, outliers)`` of a GPU or TPU
    attention.csv (outliers as :func:`jaxsim.profiles.axis_outliers` gives them)."""
    index, rows = _read(path, ("prefill_chunk_size", "kv_cache_size", "batch_size", "is_prefill"),
                        optional=_VIDUR_COLS + _TPU_COLS)
    vidur = all(c in index for c in _VIDUR_COLS)
    if not vidur and "mean_ns" not in index:
        raise JaxsimInputError(f"{path}:1", "neither the Vidur-style GPU columns (time_stats.attn_*.mean in ms) "
                               "nor the TPU column mean_ns",
                               f"GPU columns: {list(_VIDUR_COLS)}; TPU: {list(_TPU_COLS)}")
    pre: dict = {}
    dec: dict = {}
    pre_lines: dict = {}
    dec_lines: dict = {}
    dropped = 0
    for line, fields in rows:
        get = lambda col, kind: _field(path, line, fields, index, col, kind)  # noqa: E731
        c, kv, b, is_pre = get("prefill_chunk_size", int), get("kv_cache_size", int), get("batch_size", int), \
            get("is_prefill", bool)
        if vidur:
            for col, want in (("n_embd", model.hidden_size), ("n_q_head", model.num_heads),
                              ("n_kv_head", model.num_kv_heads), ("num_tensor_parallel_workers", tp)):
                v = get(col, int)
                if v != want:
                    raise JaxsimInputError(f"{path}:{line}", f"{col} = {v}, expected {want} for {model.name} at tp{tp}",
                                           "this attention.csv belongs to another model or TP degree")
            ms = get("time_stats.attn_prefill.mean" if is_pre else "time_stats.attn_decode.mean", float)
            ns = _ns(ms * 1e6)
        else:
            ns = _ns(get("mean_ns", float))
        if is_pre:
            if b != 1 or c < 1:
                raise JaxsimInputError(f"{path}:{line}", f"a prefill row needs batch_size 1 and a chunk >= 1 "
                                       f"(got batch {b}, chunk {c})", "fix or delete this line")
            if vidur and kv < c:
                raise JaxsimInputError(f"{path}:{line}", f"kv_cache_size {kv} < prefill_chunk_size {c}: the GPU "
                                       "format counts the chunk in kv_cache_size", "fix or delete this line")
            kp = kv - c if vidur else kv
            _repeat(pre, pre_lines, c, kp, ns, path, line, f"the prefill of chunk {c} over {kp} history tokens")
        else:
            if c != 0 or b < 1:
                raise JaxsimInputError(f"{path}:{line}", f"a decode row needs prefill_chunk_size 0 and batch >= 1 "
                                       f"(got chunk {c}, batch {b})", "fix or delete this line")
            if vidur and kv < b:
                dropped += 1  # a no-op measurement (module docstring)
                continue
            _repeat(dec, dec_lines, b, kv, ns, path, line, f"the decode of batch {b} at KV {kv}")
    if not pre or not dec:
        raise JaxsimInputError(str(path), f"no {'prefill' if not pre else 'decode'} rows",
                               "the legacy attention table needs both")
    outliers = []
    for c, row in pre.items():
        outliers += axis_outliers(path, {k: (v, pre_lines[c][k]) for k, v in row.items()},
                                  lambda k, c=c: f"attention prefill chunk={c} kp={k}", "ns")
    for b, row in dec.items():
        outliers += axis_outliers(path, {k: (v, dec_lines[b][k]) for k, v in row.items()},
                                  lambda k, b=b: f"attention decode batch={b} kvd={k}", "ns")
    info = {"format": "vidur-gpu-ms" if vidur else "tpu-ns", "dropped_decode_rows_kv_lt_batch": dropped}
    return pre, dec, info, outliers


def _grid_from_rows(pre: dict, dec: dict):
    """Thinned per-chunk kp rows and per-batch kvd keys, plus the derived kp rows (module docstring)."""
    chunks = sorted(pre)
    kp_rows, derived = {}, {}
    for c in chunks:
        xs = np.array(sorted(pre[c]), np.int64)
        ys = np.array([pre[c][int(x)] for x in xs], np.int64)
        keep = _thin(xs, ys, KP_CAP)
        kp_rows[c] = (xs[keep], ys[keep])
    multi = [c for c in chunks if len(pre[c]) >= 2]
    if multi:
        c_ref = max(multi)
        xs = sorted(pre[c_ref])
        s_ref = (pre[c_ref][xs[-1]] - pre[c_ref][xs[0]]) / (xs[-1] - xs[0])
        for c in chunks:
            if len(pre[c]) == 1:
                kp0, v0 = int(kp_rows[c][0][0]), int(kp_rows[c][1][0])
                kp1 = kp0 + c
                v1 = _ns(v0 + s_ref * c / c_ref * c)
                kp_rows[c] = (np.array([kp0, kp1], np.int64), np.array([v0, v1], np.int64))
                derived[c] = {"kp": kp1, "ns": v1, "from_chunk": c_ref}
    kv_rows = {}
    for b in sorted(dec):
        xs = np.array(sorted(dec[b]), np.int64)
        ys = np.array([dec[b][int(x)] for x in xs], np.int64)
        keep = _thin(xs, ys, KVD_CAP)
        kv_rows[b] = (xs[keep], ys[keep])
    return kp_rows, kv_rows, derived


def _attn_rows_attention(attn: dict) -> AttentionTable:
    """Attention from the layers.csv ``attn`` rows: ``attn(pc + nd)`` (module docstring)."""
    keys = np.array(sorted(attn), np.int64)
    vals = np.array([attn[int(k)] for k in keys], np.int64)
    pc_axis = np.concatenate([[0], np.arange(1, int(keys[-1]) + 1)]).astype(np.int64)
    nd_axis = np.arange(0, FALLBACK_MAX_ND + 1, dtype=np.int64)
    P, D = len(pc_axis), len(nd_axis)
    q = (pc_axis[:, None] + nd_axis[None, :]).astype(np.float64)
    values = np.maximum(1, np.rint(_lookup(keys, vals, q))).astype(np.int64).reshape(P, D, 1, 1)
    has = np.ones((P, D), bool)
    has[0, 0] = False
    values[0, 0] = 0
    n_kp = np.ones((P, D), np.int32)
    n_kp[0, 0] = 0
    n_kvd = n_kp[..., None].copy()
    return AttentionTable(pc_axis, nd_axis, has, fallback_table(has, pc_axis, nd_axis), n_kp,
                          np.zeros((P, D, 1), np.int64), n_kvd, np.zeros((P, D, 1, 1), np.int64), values)


# ---------------------------------------------------------------------------------------- MoE
def _moe_table(path: Path, raw: dict, model: ModelConfig, ep: int) -> tuple:
    """Per-expert-load MoE rows -> the bundle's MoE table (module docstring)."""
    missing = [p for p in _MOE_PARTS if p not in raw]
    if missing:
        raise JaxsimInputError(str(path), f"no rows for layer(s) {missing} (needed for the MoE block 'moe' = gate + "
                               "experts' w1 + w3 + act_fn + w2)", "this folder cannot price the MoE block")
    if not model.is_moe:
        raise JaxsimInputError(str(path), f"{model.name} has no experts but its architecture sequence has a MoE "
                               "block", "check the model config")
    first = raw[_MOE_PARTS[1]]
    for p in _MOE_PARTS:
        lack = sorted(set(first) - set(raw[p]))
        if lack:
            raise JaxsimInputError(str(path), f"layer {p!r} has no rows for tokens {_ranges(lack)} "
                                   "(needed for the MoE block)", "restore the rows")
    E, k = model.num_experts, model.experts_per_token
    ep = max(1, min(int(ep), E))
    f = 1.0 - ((ep - 1) / ep) ** k
    k_loc = (k / ep) / f
    tokens = np.array(sorted(first), np.int64)
    tab = {p: (np.array(sorted(raw[p]), np.int64), np.array([raw[p][t] for t in sorted(raw[p])], np.int64))
           for p in _MOE_PARTS}
    gate = _lookup(*tab["gate"], tokens / f)
    ae_axis = np.arange(1, E + 1, dtype=np.int64)
    vals = np.zeros((E, len(tokens)), np.int64)
    for a, ae in enumerate(ae_axis):
        n = tokens * k_loc / ae
        ffn = sum(_lookup(*tab[p], n) for p in ("expert.w1", "expert.w3", "act_fn", "expert.w2"))
        vals[a] = np.maximum(1, np.rint(gate + ae * ffn)).astype(np.int64)
    keys = np.broadcast_to(tokens, (E, len(tokens))).copy()
    info = {"ep_assumed": ep, "local_fraction": f, "assignments_per_local_token": k_loc,
            "formula": "gate(tokens/f) + ae * (w1 + w3 + act_fn + w2)(tokens*k_loc/ae)"}
    return MoETable(ae_axis, np.full(E, len(tokens), np.int32), keys, vals), info


# ------------------------------------------------------------------------------------- bundle
def _models_on(hw_dir: Path) -> list:
    return sorted(str(p.parent.relative_to(hw_dir)) for p in hw_dir.glob("*/*") if p.is_dir()
                  and any(q.is_dir() and q.name.startswith("tp") for q in p.iterdir())) \
        if hw_dir.is_dir() else []


def load_legacy_bundle(profiles_dir, hardware: str, model: ModelConfig, variant: str = VARIANT,
                       tp: int = 1) -> ProfileBundle:
    """Read ``<profiles_dir>/legacy/<HW>/<model>/tp<N>/`` (hardware ``legacy/<HW>``) as a ProfileBundle.

    Raises :class:`JaxsimInputError` naming the folder or file (and line or layer) for an unknown
    hardware/model/TP/variant, a missing or malformed CSV, and any layer of the architecture
    sequence that the legacy rows cannot provide (see the module docstring).
    """
    root = Path(profiles_dir)
    name = str(hardware)[len(PREFIX):] if is_legacy(hardware) else ""
    hw_dir = root / LEGACY_DIR / name
    if not name or "/" in name or name.startswith(".") or not hw_dir.is_dir():
        raise JaxsimInputError(str(hw_dir), f"unknown hardware {hardware!r}", f"known hardware: {known_hardware(root)}")
    model_dir = hw_dir / model.name
    if not model_dir.is_dir():
        raise JaxsimInputError(str(model_dir), f"no legacy profiles of model {model.name!r} on {name}",
                               f"profiled models on {hardware}: {_models_on(hw_dir)}")
    if variant != VARIANT:
        raise JaxsimInputError(str(model_dir), f"no variant {variant!r} of {model.name} on {hardware}",
                               f"legacy profiles record no dtype and are served as {VARIANT!r} only")
    tp = int(tp)
    tpdir = tp_folder(model_dir, tp, model.name, hardware)
    layers_path = _find(tpdir, "layers.csv")
    if layers_path is None:
        raise JaxsimInputError(str(tpdir / "layers.csv"), "missing profile table",
                               "a legacy folder needs layers.csv (or layers.csv.gz)")
    sequence, category, tp_stable = load_architecture(root, model.model_type)
    raw, raw_lines = _read_layers(layers_path, tp)
    is_tpu = "TPU" in name
    notes = []

    # attention first: a folder without any attention data is unusable whatever its layers
    att_path = _find(tpdir, "attention.csv")
    conversion: dict = {}
    if att_path is not None:
        pre, dec, info, outliers = _attention_rows(att_path, model, tp)
        kp_rows, kv_rows, derived = _grid_from_rows(pre, dec)
        attention = sum_attention(kp_rows, kv_rows)
        conversion.update(info, attention_source=att_path.name, derived_kp_rows=derived,
                          kvd_cap=KVD_CAP, kp_cap=KP_CAP, thin_tol=THIN_TOL)
    elif "attn" in raw:
        attention, outliers = _attn_rows_attention(raw["attn"]), []
        conversion.update(attention_source="layers.csv attn")
        notes.append(f"{tpdir}: no attention.csv; attention is taken from the layers.csv 'attn' rows (attention "
                     "without KV cache, keyed by tokens) as attn(pc + nd): the KV-cache lengths (kp, kvd) have "
                     "no effect")
    else:
        with_att = sorted(int(p.name[2:]) for p in model_dir.glob("tp*") if p.is_dir() and p.name[2:].isdigit()
                          and (_find(p, "attention.csv") is not None))
        raise JaxsimInputError(str(tpdir / "attention.csv"), f"missing, and {layers_path.name} has no 'attn' rows "
                               "either: attention cannot be priced",
                               f"TP degrees of {model.name} on {hardware} with attention.csv: {with_att}")

    dense, per_seq, kept, moe, tried = {}, {}, {}, None, set()
    builder = _Dense(layers_path, raw)
    for group, names in sequence.items():
        kept[group] = []
        for lname in names:
            cat = category[lname]
            if cat == "attention":
                kept[group].append(lname)
                continue
            if lname == "rotary_emb" and is_tpu:
                continue  # §2.1: skipped on TPU hardware
            if cat == "moe":
                if moe is None:
                    moe, conversion["moe"] = _moe_table(layers_path, raw, model, ep=tp)
                kept[group].append(lname)
                continue
            if lname == "sampler" and "sampler" not in raw:
                notes.append(f"{layers_path}: the legacy format has no 'sampler' rows; the layer is skipped")
                continue
            if lname in dense or lname in per_seq:
                kept[group].append(lname)
                continue
            if lname in tried:
                continue  # already reported or skipped
            tried.add(lname)
            tab = builder.build(lname)
            if tab is None:
                continue  # a problem (raised below) or a verified skip
            (per_seq if cat == "per_sequence" else dense)[lname] = tab
            kept[group].append(lname)
    if builder.problems:
        raise JaxsimInputError(str(layers_path), "; ".join(builder.problems),
                               "the legacy rows cannot provide these layers; nothing is guessed")
    notes += [f"{layers_path}: {n}" for n in builder.notes]
    for msg in notes:
        warnings.warn(msg, stacklevel=3)
    # Outliers of the raw layers.csv rows the bundle is built from (module docstring).
    used = {src for names in kept.values() for t in names if category[t] in ("dense", "per_sequence")
            for src in _SUMS.get(t) or _MEAN.get(t) or (_DIRECT.get(t, t),)}
    used |= set(_MOE_PARTS) if moe is not None else set()
    used |= {"attn"} if att_path is None else set()
    for layer in sorted(used & set(raw)):
        outliers += axis_outliers(layers_path, {k: (v, raw_lines[layer][k]) for k, v in raw[layer].items()},
                                  lambda k, layer=layer: f"{layer} input={k}", "latency(ns)")
    outliers = ordered_outliers(outliers)
    warn_outliers(tpdir, outliers)

    meta = {
        "format": "legacy (REFERENCE.md §2.8)",
        "source": "LLMServingSim repository via shared/data/profiles-legacy",
        "hardware": hardware, "model": model.name, "tp": tp,
        "layers": str(layers_path), "attention": str(att_path) if att_path else None,
        "engine_effective": dict(ENGINE_EFFECTIVE), "skew_fit": {"enabled": False},
        "conversion": conversion, "notes": notes,
    }
    return ProfileBundle(
        hardware=hardware, model_name=model.name, model_type=model.model_type, variant=variant, tp=tp,
        path=str(model_dir), meta=meta, engine_effective=dict(ENGINE_EFFECTIVE), sequence=kept, category=category,
        tp_stable=tp_stable, dense=dense, per_sequence=per_seq, attention=attention, moe=moe, skew=disabled_skew(),
        outliers=outliers,
    )
