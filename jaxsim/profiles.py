"""Host-side (numpy) loading of a profile bundle, REFERENCE.md §2.2-§2.7.

A bundle is ``<profiles_dir>/<hardware>/<org>/<name>/<variant>/`` with ``meta.yaml`` and one
``tp<N>/`` folder per profiled TP degree. :func:`load_profile_bundle` reads it into a
:class:`ProfileBundle` of plain numpy arrays; :func:`jaxsim.latency.latency_tables` turns that into
JAX arrays. Every profiled time is converted from µs to integer ns with ``max(1, round(us*1000))``
*before* any interpolation (REFERENCE.md §0).

Checks on load (each failure is a :class:`JaxsimInputError` naming the file and line, or the
file and layer): every field parses (whole numbers >= 0 for keys, finite times >= 0); a grid point
appears once (a repeated ``(layer, tokens)``, ``(pc, kp, nd, kvd)``, ``(tokens, activated_experts)``
or skew bucket is an error naming both lines: one of the two values would be silently dropped);
every layer of the architecture sequence has rows (only ``rotary_emb`` on TPU hardware is skipped,
REFERENCE.md §2.1). Rows may come in any order: the format does not require sorted files, and the
loader sorts every axis (so axes are strictly increasing). Points far off their grid neighbours
(:func:`grid_outliers`) are not errors: they are used as measured, listed in
``ProfileBundle.outliers``, counted in one warning per bundle and in the run summary
(``profile_outliers``).

Conventions (also followed by the test oracle ``tests/reference_latency.py``):
  * keys are sorted per table (and unique, see above);
  * the attention table keeps the raw structure of §2.5: a global ``pc`` axis and ``nd`` axis, a
    slice per ``(pc, nd)`` pair with its own sorted ``kp`` keys, and per ``kp`` row its own sorted
    ``kvd`` keys; a missing ``(pc, nd)`` corner falls back to the existing slice nearest in squared
    raw distance, ties going to the smallest ``(pc, nd)``;
  * skew-fit alphas live in a dense array over (pc grid 0,16,...,2048; n; skew rate; kv_big; kp)
    labels, NaN where no bucket exists; rows whose pc is off that grid can never be hit and are
    dropped.
"""

import csv
import dataclasses
import math
import warnings
from pathlib import Path

import numpy as np
import yaml

from jaxsim.errors import JaxsimInputError
from jaxsim.model import ModelConfig

SEQUENCE_GROUPS = ("prologue", "pre_attn", "post_attn", "mlp_dense", "mlp_moe", "head")
CATEGORIES = ("dense", "per_sequence", "attention", "moe")
SKEW_PC_GRID = np.arange(0, 2049, 16, dtype=np.int64)  # §2.6: pc must be exactly one of these
OUTLIER_FACTOR = 4.0  # grid_outliers: a point this many times above (or below) both references
OUTLIERS_SHOWN = 5  # outliers quoted in the warning and the run summary (all are on the bundle)
_NOT_HARDWARE = {"architectures", "models", "validation", "workloads", "clusters", "legacy", "operator-db", "specs",
                 "pim"}


@dataclasses.dataclass
class Table1D:
    """One token- or sequence-keyed layer: sorted unique keys and integer ns values."""

    keys: np.ndarray  # int64 [K], strictly increasing
    values_ns: np.ndarray  # int64 [K]


@dataclasses.dataclass
class AttentionTable:
    """The 4-D attention table of §2.5 as padded arrays (P pc values, D nd values)."""

    pc_axis: np.ndarray  # int64 [P], sorted
    nd_axis: np.ndarray  # int64 [D], sorted
    has_slice: np.ndarray  # bool [P, D]: the (pc, nd) pair was profiled
    fallback: np.ndarray  # int64 [P, D, 2]: (pc index, nd index) of the slice to use (itself if present)
    n_kp: np.ndarray  # int32 [P, D]: number of kp rows in the slice (0 where absent)
    kp_keys: np.ndarray  # int64 [P, D, KP], sorted in the first n_kp entries, 0-padded
    n_kvd: np.ndarray  # int32 [P, D, KP]: number of kvd keys in each kp row
    kvd_keys: np.ndarray  # int64 [P, D, KP, KV], sorted in the first n_kvd entries, 0-padded
    values_ns: np.ndarray  # int64 [P, D, KP, KV], 0-padded


@dataclasses.dataclass
class MoETable:
    """``tp1/moe.csv`` (§2.7): per activated-experts row, its own token keys."""

    ae_axis: np.ndarray  # int64 [A], sorted
    n_tokens: np.ndarray  # int32 [A]
    token_keys: np.ndarray  # int64 [A, K], sorted in the first n_tokens entries, 0-padded
    values_ns: np.ndarray  # int64 [A, K]


@dataclasses.dataclass
class SkewFit:
    """Skew correction α per bucket (§2.6). ``alpha`` is NaN where the bucket was not fitted."""

    enabled: bool
    alpha_default: float  # per_tp[tp].alpha_default of the loaded tp; 0 when disabled
    alpha_default_per_tp: dict  # {tp: alpha_default} for every profiled TP degree ({} when disabled)
    n_bins: np.ndarray  # float64 [nN + 1]; (lo, hi] bins
    n_labels: list
    sr_bins: np.ndarray  # float64 [nSR + 1]
    sr_labels: list
    kvb_bins: np.ndarray  # float64 [nKVB + 1]
    kvb_labels: list
    kp_bins: np.ndarray  # float64 [nKP + 1]
    kp_labels: list
    pc_grid: np.ndarray  # int64 [129] = 0, 16, ..., 2048
    alpha: np.ndarray  # float64 [129, nN, nSR, nKVB, nKP], NaN = no bucket
    has_alpha: np.ndarray  # bool, same shape


@dataclasses.dataclass
class ProfileBundle:
    hardware: str
    model_name: str
    model_type: str
    variant: str
    tp: int
    path: str  # the bundle folder
    meta: dict  # meta.yaml as read
    engine_effective: dict  # the profiler's engine kwargs (for extrapolation warnings)
    sequence: dict  # group -> [layer names], missing layers already dropped (§2.1)
    category: dict  # layer name -> dense | per_sequence | attention | moe
    tp_stable: set  # layer names marked tp_stable in the architecture YAML
    dense: dict  # layer -> Table1D (tokens)
    per_sequence: dict  # layer -> Table1D (sequences)
    attention: AttentionTable
    moe: "MoETable | None"
    skew: SkewFit
    # Points far off their grid neighbours (grid_outliers), used as measured: one text per point,
    # "<file>:<line> <layer> <key>=<k> <column>=<value> (neighbours <a>, <b>)", in file-line order.
    outliers: list = dataclasses.field(default_factory=list)


# ------------------------------------------------------------------------------------------ CSVs
def _read_csv(path: Path, columns: tuple) -> list:
    """Rows of ``path`` as tuples typed per ``columns`` = ((name, int|float|str), ...), with the
    file line number as the last element. Clear errors for every malformed input."""
    if not path.is_file():
        raise JaxsimInputError(str(path), "missing profile table",
                               "re-run the profiler for this bundle or pick another hardware/model/tp")
    rows = []
    with open(path, newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise JaxsimInputError(str(path), "empty file",
                                   f"expected a header {','.join(c for c, _ in columns)}") from None
        except csv.Error as e:
            raise JaxsimInputError(f"{path}:1", f"unreadable CSV header: {e}") from None
        header = [h.strip() for h in header]
        index = []
        for name, _ in columns:
            if name not in header:
                raise JaxsimInputError(f"{path}:1", f"missing column {name!r} (header is {header})",
                                       f"the file needs columns {[c for c, _ in columns]}")
            index.append(header.index(name))
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                raise JaxsimInputError(f"{path}:{reader.line_num}", f"unreadable CSV line: {e}") from None
            line = reader.line_num
            if not fields or all(not x.strip() for x in fields):
                continue
            if len(fields) != len(header):
                raise JaxsimInputError(f"{path}:{line}",
                                       f"expected {len(header)} fields, found {len(fields)}: {fields}",
                                       "fix or delete this line")
            out = []
            for (name, kind), i in zip(columns, index):
                text = fields[i].strip()
                try:
                    if kind is int:
                        v = float(text)
                        if not v.is_integer():
                            raise ValueError
                        v = int(v)
                        if v < 0:
                            raise ValueError
                    elif kind is float:
                        v = float(text)
                        if not math.isfinite(v):
                            raise ValueError
                    else:
                        v = text
                except ValueError:
                    what = "a non-negative integer" if kind is int else "a finite number" if kind is float else "text"
                    raise JaxsimInputError(f"{path}:{line}", f"column {name!r} = {text!r} is not {what}",
                                           "fix or delete this line") from None
                out.append(v)
            out.append(line)
            rows.append(tuple(out))
    return rows


def us_to_ns(us) -> np.ndarray:
    """``max(1, round(us*1000))`` as int64 (round half to even, as Python's ``round``)."""
    return np.maximum(1, np.rint(np.asarray(us, dtype=np.float64) * 1000.0)).astype(np.int64)


def _check_time(path, rows, col=-2):
    for r in rows:
        if r[col] < 0:
            raise JaxsimInputError(f"{path}:{r[-1]}", f"negative time_us {r[col]}", "fix or delete this line")


def duplicate_point(path, line: int, first: int, what: str) -> JaxsimInputError:
    """The error for a grid point profiled twice (at ``first`` and again at ``line``)."""
    return JaxsimInputError(f"{path}:{line}", f"{what} is profiled twice (lines {first} and {line}): one of "
                            "the two values would be silently dropped", "delete the wrong line")


def grid_outliers(keys, values, factor: float = OUTLIER_FACTOR) -> list:
    """Points of one profiled axis that are far off their neighbours, as ``[(index, references)]``.

    ``keys``: the axis, strictly increasing; ``values``: the times there (any one unit). A point is
    an outlier when it is more than ``factor`` times above both of its references, or more than
    ``factor`` times below both. The references of an interior point are its two neighbours; those
    of the first or last point are its one neighbour and the linear extrapolation of the two points
    next to it (the neighbour alone when the axis has two points; an end is not judged when its
    neighbour is itself an outlier, which would skew the extrapolation). The rule is robust: a time that
    grows with the key (linearly, or quadratically as prefill attention over a doubling grid) lies
    between its neighbours, or near the extrapolation at an end, so a smooth grid never trips it,
    while one bad measurement does (a warm-up, a unit slip, a stray line such as
    ``qkv_proj,64,100000`` among 25-µs neighbours). On the shipped bundles nothing is flagged: over
    the axes checked (dense and per_sequence layers; attention kvd and kp; MoE tokens and experts)
    the most any point rises above (or falls below) both of its references is a factor of 2.5
    (an end point of a dense layer), so 4 leaves a margin. Of the legacy rows only TPU-v6e-1's ``o_proj`` at 1 token is
    (22,919 ns against 5,296 and 5,217 ns at 2 and 3 tokens, a warm-up; that folder is refused
    anyway, for its missing k_proj / v_proj).
    """
    k = np.asarray(keys, np.float64)
    v = np.asarray(values, np.float64)
    n = len(v)
    if n < 2:
        return []

    def off(i, refs):
        return v[i] > factor * max(refs) or factor * v[i] < min(refs)

    out = {i: (v[i - 1], v[i + 1]) for i in range(1, n - 1) if off(i, (v[i - 1], v[i + 1]))}
    for i, j, m in ((0, 1, 2), (n - 1, n - 2, n - 3)):
        if n == 2:
            refs = (v[j],)
        elif j in out:
            continue  # its neighbour is the outlier (and would skew the extrapolation)
        else:
            refs = (v[j], v[j] + (v[j] - v[m]) / (k[j] - k[m]) * (k[i] - k[j]))
        if off(i, refs):
            out[i] = refs
    return [(i, tuple(float(r) for r in out[i])) for i in sorted(out)]


def outlier_text(path, line: int, what: str, column: str, value: float, refs: tuple) -> str:
    """``<file>:<line> <what> <column>=<value> (neighbours a, b)``: one entry of ``ProfileBundle.outliers``."""
    return f"{path}:{line} {what} {column}={value:.6g} (neighbours {', '.join(f'{r:.6g}' for r in refs)})"


def axis_outliers(path, points: dict, what, column: str = "time_us") -> list:
    """``[(file, line, text)]`` of :func:`grid_outliers` along one axis (sortable into file-line
    order). ``points``: key -> (value, line); ``what(key)``: the point's layer and coordinates."""
    keys = sorted(points)
    vals = [points[k][0] for k in keys]
    return [(str(path), points[keys[i]][1],
             outlier_text(path, points[keys[i]][1], what(keys[i]), column, vals[i], refs))
            for i, refs in grid_outliers(keys, vals)]


def ordered_outliers(outliers: list) -> list:
    """The texts of :func:`axis_outliers` entries in file-line order, one per line (a point off on
    two axes, or a layer used twice in the sequence, is listed once)."""
    first: dict = {}
    for path, line, text in sorted(outliers):
        first.setdefault((path, line), text)
    return list(first.values())


def warn_outliers(where, outliers: list) -> None:
    """One warning line for a bundle's outliers (none: no warning)."""
    if outliers:
        shown = "; ".join(outliers[:OUTLIERS_SHOWN]) + ("; ..." if len(outliers) > OUTLIERS_SHOWN else "")
        warnings.warn(f"{where}: {len(outliers)} profile point(s) more than {OUTLIER_FACTOR:g}x above or below "
                      f"their grid neighbours, used as measured: {shown}", stacklevel=3)


def _tables_1d(path: Path, key_col: str) -> tuple:
    """``({layer: Table1D}, {layer: outliers})`` of a ``layer,<key_col>,time_us`` CSV (outliers as
    :func:`axis_outliers` gives them)."""
    rows = _read_csv(path, (("layer", str), (key_col, int), ("time_us", float)))
    _check_time(path, rows)
    per_layer: dict = {}
    for layer, key, us, line in rows:
        points = per_layer.setdefault(layer, {})
        if key in points:
            raise duplicate_point(path, line, points[key][1], f"layer {layer!r} at {key_col} = {key}")
        points[key] = (us, line)
    out, outliers = {}, {}
    for layer, d in per_layer.items():
        keys = np.array(sorted(d), dtype=np.int64)
        out[layer] = Table1D(keys, us_to_ns([d[k][0] for k in keys]))
        outliers[layer] = axis_outliers(path, d, lambda k, layer=layer: f"{layer} {key_col}={k}")
    return out, outliers


def _attention_table(path: Path) -> tuple:
    """``(AttentionTable, outliers)`` (:func:`axis_outliers`): outliers along each kp row's kvd axis and
    along the kp axis at each kvd (the pc axis is not checked: ``pc = 0``, decodes only, is another
    kernel than a batch with a prefill chunk, so its neighbour may well be 4x slower)."""
    rows = _read_csv(path, (("prefill_chunk", int), ("kv_prefill", int), ("n_decode", int),
                            ("kv_decode", int), ("time_us", float)))
    _check_time(path, rows)
    if not rows:
        raise JaxsimInputError(str(path), "no attention rows", "re-run the profiler for this bundle")
    d: dict = {}
    by_kvd: dict = {}  # (pc, nd, kvd) -> {kp: (us, line)}: the kp axis
    for pc, kp, nd, kvd, us, line in rows:
        row = d.setdefault((pc, nd), {}).setdefault(kp, {})
        if kvd in row:
            raise duplicate_point(path, line, row[kvd][1], f"the attention point (prefill_chunk {pc}, kv_prefill "
                                  f"{kp}, n_decode {nd}, kv_decode {kvd})")
        row[kvd] = (us, line)
        by_kvd.setdefault((pc, nd, kvd), {})[kp] = (us, line)
    outliers = []
    for (pc, nd), sl in d.items():
        for kp, row in sl.items():
            outliers += axis_outliers(path, row,
                                      lambda k, pc=pc, nd=nd, kp=kp: f"attention pc={pc} kp={kp} nd={nd} kvd={k}")
    for (pc, nd, kvd), col in by_kvd.items():
        outliers += axis_outliers(path, col,
                                  lambda k, pc=pc, nd=nd, kvd=kvd: f"attention pc={pc} kp={k} nd={nd} kvd={kvd}")
    pc_axis = np.array(sorted({k[0] for k in d}), dtype=np.int64)
    nd_axis = np.array(sorted({k[1] for k in d}), dtype=np.int64)
    P, D = len(pc_axis), len(nd_axis)
    KP = max(len(s) for s in d.values())
    KV = max(len(r) for s in d.values() for r in s.values())
    has = np.zeros((P, D), bool)
    n_kp = np.zeros((P, D), np.int32)
    kp_keys = np.zeros((P, D, KP), np.int64)
    n_kvd = np.zeros((P, D, KP), np.int32)
    kvd_keys = np.zeros((P, D, KP, KV), np.int64)
    values = np.zeros((P, D, KP, KV), np.int64)
    pc_pos = {int(v): i for i, v in enumerate(pc_axis)}
    nd_pos = {int(v): i for i, v in enumerate(nd_axis)}
    for (pc, nd), sl in d.items():
        i, j = pc_pos[pc], nd_pos[nd]
        has[i, j] = True
        kps = sorted(sl)
        n_kp[i, j] = len(kps)
        kp_keys[i, j, : len(kps)] = kps
        for r, kp in enumerate(kps):
            kvds = sorted(sl[kp])
            n_kvd[i, j, r] = len(kvds)
            kvd_keys[i, j, r, : len(kvds)] = kvds
            values[i, j, r, : len(kvds)] = us_to_ns([sl[kp][k][0] for k in kvds])
    return AttentionTable(pc_axis, nd_axis, has, fallback_table(has, pc_axis, nd_axis), n_kp, kp_keys, n_kvd,
                          kvd_keys, values), outliers


def _moe_table(path: Path) -> tuple:
    """``(MoETable, outliers)`` (:func:`axis_outliers`): outliers along each row's tokens axis and along the
    activated-experts axis at each token count."""
    rows = _read_csv(path, (("tokens", int), ("activated_experts", int), ("time_us", float)))
    _check_time(path, rows)
    if not rows:
        raise JaxsimInputError(str(path), "no MoE rows", "re-run the profiler's MoE stage for this bundle")
    d: dict = {}
    by_tok: dict = {}
    for tok, ae, us, line in rows:
        row = d.setdefault(ae, {})
        if tok in row:
            raise duplicate_point(path, line, row[tok][1], f"the MoE point (tokens {tok}, activated_experts {ae})")
        row[tok] = (us, line)
        by_tok.setdefault(tok, {})[ae] = (us, line)
    outliers = []
    for ae, row in d.items():
        outliers += axis_outliers(path, row, lambda k, ae=ae: f"moe tokens={k} activated_experts={ae}")
    for tok, col in by_tok.items():
        outliers += axis_outliers(path, col, lambda k, tok=tok: f"moe tokens={tok} activated_experts={k}")
    return moe_table_from_rows({ae: {t: v[0] for t, v in row.items()} for ae, row in d.items()}), outliers


def moe_table_from_rows(rows: dict) -> MoETable:
    """A :class:`MoETable` from ``{activated_experts: {tokens: time_us}}`` (any order; each row its
    own token keys, padded with zeros past ``n_tokens``; µs converted by :func:`us_to_ns`)."""
    ae_axis = np.array(sorted(rows), dtype=np.int64)
    K = max(len(r) for r in rows.values())
    n_tok = np.zeros(len(ae_axis), np.int32)
    keys = np.zeros((len(ae_axis), K), np.int64)
    vals = np.zeros((len(ae_axis), K), np.int64)
    for a, ae in enumerate(ae_axis):
        toks = sorted(rows[int(ae)])
        n_tok[a] = len(toks)
        keys[a, : len(toks)] = toks
        vals[a, : len(toks)] = us_to_ns([rows[int(ae)][t] for t in toks])
    return MoETable(ae_axis, n_tok, keys, vals)


def fallback_table(present: np.ndarray, pc_axis, nd_axis) -> np.ndarray:
    """Nearest present slice per (pc, nd) in squared raw distance, ties -> smallest (pc, nd) (§2.5)."""
    P, D = present.shape
    fb = np.zeros((P, D, 2), np.int64)
    fb[..., 0], fb[..., 1] = np.meshgrid(np.arange(P), np.arange(D), indexing="ij")
    idx = np.argwhere(present)
    ppc, pnd = pc_axis[idx[:, 0]].astype(np.float64), nd_axis[idx[:, 1]].astype(np.float64)
    for i, j in np.argwhere(~present):
        dist = (ppc - pc_axis[i]) ** 2 + (pnd - nd_axis[j]) ** 2
        fb[i, j] = idx[int(np.argmin(dist))]
    return fb


def sum_attention(kp_rows: dict, kv_rows: dict) -> AttentionTable:
    """The (pc, nd) attention grid whose cells are a prefill part plus a decode part (the legacy
    format's composition, REFERENCE.md §2.8; also the converted and spec-sheet bundles' start).

    ``kp_rows``: ``{pc: (kp keys, ns values)}`` of the prefill part; ``kv_rows``: ``{nd: (kvd keys,
    ns values)}`` of the decode part. The ``pc = 0`` and ``nd = 0`` axes are added (a part that is
    absent costs 0); the ``(0, 0)`` corner has no attention term and falls back to ``(0, 1)``."""
    chunks, batches = sorted(kp_rows), sorted(kv_rows)
    pc_axis = np.array([0] + chunks, np.int64)
    nd_axis = np.array([0] + batches, np.int64)
    P, D = len(pc_axis), len(nd_axis)
    KP = max(len(k) for k, _ in kp_rows.values())
    KV = max(len(k) for k, _ in kv_rows.values())
    # per pc: kp keys / prefill values (pc = 0: one row kp = 0, value 0); per nd likewise (nd = 0: kvd 0)
    pk, pv, pn = np.zeros((P, KP), np.int64), np.zeros((P, KP), np.int64), np.ones(P, np.int32)
    for i, c in enumerate(chunks, start=1):
        k, v = kp_rows[c]
        pk[i, : len(k)], pv[i, : len(k)], pn[i] = k, v, len(k)
    dk, dv, dn = np.zeros((D, KV), np.int64), np.zeros((D, KV), np.int64), np.ones(D, np.int32)
    for j, b in enumerate(batches, start=1):
        k, v = kv_rows[b]
        dk[j, : len(k)], dv[j, : len(k)], dn[j] = k, v, len(k)
    row_ok = np.arange(KP)[None, :] < pn[:, None]  # [P, KP]
    col_ok = np.arange(KV)[None, :] < dn[:, None]  # [D, KV]
    mask = row_ok[:, None, :, None] & col_ok[None, :, None, :]  # [P, D, KP, KV]
    values = np.where(mask, pv[:, None, :, None] + dv[None, :, None, :], 0)
    kvd_keys = np.where(mask, np.broadcast_to(dk[None, :, None, :], mask.shape), 0)
    kp_keys = np.where(row_ok[:, None, :], np.broadcast_to(pk[:, None, :], (P, D, KP)), 0)
    n_kp = np.broadcast_to(pn[:, None], (P, D)).astype(np.int32)
    n_kvd = np.where(row_ok[:, None, :], np.broadcast_to(dn[None, :, None], (P, D, KP)), 0).astype(np.int32)
    has = np.ones((P, D), bool)
    has[0, 0] = False  # no attention term at pc = nd = 0; the corner falls back to (0, 1)
    values[0, 0] = 0
    n_kp[0, 0] = 0
    n_kvd[0, 0] = 0
    return AttentionTable(pc_axis, nd_axis, has, fallback_table(has, pc_axis, nd_axis), np.ascontiguousarray(n_kp),
                          kp_keys, n_kvd, kvd_keys, values)


def disabled_skew() -> SkewFit:
    """A skew fit that is off (bundles without skew data: legacy, converted, spec-sheet)."""
    one = np.array([0.0, 1.0])
    return SkewFit(False, 0.0, {}, one, ["all"], one, ["all"], one, ["all"], one, ["all"], SKEW_PC_GRID,
                   np.full((len(SKEW_PC_GRID), 1, 1, 1, 1), np.nan), np.zeros((len(SKEW_PC_GRID), 1, 1, 1, 1), bool))


# ------------------------------------------------------------------------------------ skew fit
def _bins(meta_path, axes, name, n_labels_expected=None):
    bins_key, labels_key = f"{name}_bins", f"{name}_labels"
    if bins_key not in axes or labels_key not in axes:
        raise JaxsimInputError(str(meta_path), f"skew_fit.bucket_axes lacks {bins_key!r} or {labels_key!r}",
                               "re-run the profiler's skew fit or set skew_fit.enabled: false")
    try:
        bins = np.array([float(b) for b in axes[bins_key]], dtype=np.float64)
    except (TypeError, ValueError):
        raise JaxsimInputError(str(meta_path), f"skew_fit.bucket_axes.{bins_key} is not a list of numbers") from None
    labels = [str(x) for x in axes[labels_key]]
    if len(bins) != len(labels) + 1 or len(labels) == 0 or np.any(np.diff(bins) <= 0):
        raise JaxsimInputError(str(meta_path), f"skew_fit.bucket_axes.{bins_key} must be increasing and have "
                               f"one more entry than {labels_key} ({len(bins)} vs {len(labels)})")
    return bins, labels


def _skew_fit(meta: dict, meta_path: Path, tpdir: Path, tp: int) -> SkewFit:
    fit = meta.get("skew_fit") or {}
    enabled = bool(fit.get("enabled", False)) if isinstance(fit, dict) else False
    empty = SkewFit(False, 0.0, {}, np.array([0.0, 1.0]), ["all"], np.array([0.0, 1.0]), ["all"],
                    np.array([0.0, 1.0]), ["all"], np.array([0.0, 1.0]), ["all"], SKEW_PC_GRID,
                    np.full((len(SKEW_PC_GRID), 1, 1, 1, 1), np.nan), np.zeros((len(SKEW_PC_GRID), 1, 1, 1, 1), bool))
    if not enabled:
        return empty  # α = 0 (§2.6 step 3)
    axes = fit.get("bucket_axes")
    if not isinstance(axes, dict):
        raise JaxsimInputError(str(meta_path), "skew_fit.enabled is true but skew_fit.bucket_axes is missing",
                               "re-run the profiler's skew fit or set skew_fit.enabled: false")
    n_bins, n_labels = _bins(meta_path, axes, "n")
    sr_bins, sr_labels = _bins(meta_path, axes, "skew_rate")
    kvb_bins, kvb_labels = _bins(meta_path, axes, "kv_big")
    kp_bins, kp_labels = _bins(meta_path, axes, "kp")
    per_tp = fit.get("per_tp") or {}
    entry = per_tp.get(tp, per_tp.get(str(tp)))
    if not isinstance(entry, dict) or "alpha_default" not in entry:
        raise JaxsimInputError(str(meta_path), f"skew_fit.per_tp has no alpha_default for tp {tp}",
                               "re-run the profiler's skew fit for this TP degree or set skew_fit.enabled: false")
    alpha_default = float(entry["alpha_default"])
    per_tp_defaults = {int(k): float(v["alpha_default"]) for k, v in per_tp.items()
                       if isinstance(v, dict) and "alpha_default" in v}
    path = tpdir / "skew_fit.csv"
    rows = _read_csv(path, (("pc", int), ("n_label", str), ("skew_rate_label", str), ("kv_big_label", str),
                            ("kp_label", str), ("alpha", float)))
    shape = (len(SKEW_PC_GRID), len(n_labels), len(sr_labels), len(kvb_labels), len(kp_labels))
    alpha = np.full(shape, np.nan)
    has = np.zeros(shape, bool)
    lookups = [(n_labels, "n_label"), (sr_labels, "skew_rate_label"), (kvb_labels, "kv_big_label"),
               (kp_labels, "kp_label")]
    seen: dict = {}
    for pc, nl, sl, kl, pl, a, line in rows:
        bucket = (pc, nl, sl, kl, pl)
        if bucket in seen:
            raise duplicate_point(path, line, seen[bucket], f"the skew bucket pc={pc}|{nl}|{sl}|{kl}|{pl}")
        seen[bucket] = line
        idx = []
        for (labels, col), text in zip(lookups, (nl, sl, kl, pl)):
            if text not in labels:
                raise JaxsimInputError(f"{path}:{line}", f"{col} {text!r} is not one of {labels}",
                                       f"use a label from {meta_path}::skew_fit.bucket_axes")
            idx.append(labels.index(text))
        if pc % 16 != 0 or pc > 2048:
            continue  # can never be hit: §2.6 needs pc exactly on 0, 16, ..., 2048
        alpha[(pc // 16, *idx)] = a
        has[(pc // 16, *idx)] = True
    return SkewFit(True, alpha_default, per_tp_defaults, n_bins, n_labels, sr_bins, sr_labels, kvb_bins, kvb_labels,
                   kp_bins, kp_labels, SKEW_PC_GRID, alpha, has)


# ------------------------------------------------------------------------------------- bundle
def known_hardware(profiles_dir) -> list:
    """Hardware names: the bundle folders, then ``legacy/<HW>`` (REFERENCE.md §2.8, :mod:`jaxsim.legacy_profiles`),
    then the converted operator-database systems (:mod:`jaxsim.operator_db`), then the spec sheets
    (``spec/<sheet>``, :mod:`jaxsim.spec_bundle`)."""
    from jaxsim.legacy_profiles import legacy_hardware
    from jaxsim.operator_db import operator_db_hardware
    from jaxsim.spec_bundle import spec_hardware

    p = Path(profiles_dir)
    if not p.is_dir():
        return []
    return sorted(x.name for x in p.iterdir() if x.is_dir() and x.name not in _NOT_HARDWARE
                  and not x.name.startswith(".")) + legacy_hardware(p) + operator_db_hardware(p) + spec_hardware(p)


# Where a hardware name's tables come from (the run summary's ``latency_model``): a measured bundle
# folder, the legacy format (REFERENCE.md §2.8), a converted operator database, or a spec sheet
# priced by the roofline model. The last two build a bundle for any model (no folder per model).
SOURCES = {"profiles": "measured profiles", "legacy": "legacy profiles (REFERENCE.md §2.8)",
           "operator-db": "operator database (AIConfigurator, converted by jaxsim.operator_db)",
           "roofline": "roofline model of a spec sheet (jaxsim.latency.roofline, tabulated by jaxsim.spec_bundle)"}


def bundle_source(hardware) -> str:
    """The key of :data:`SOURCES` for a hardware name (by its form: ``legacy/<HW>``, a converted
    system name, ``spec/<sheet>``, else a bundle folder)."""
    from jaxsim.operator_db import is_operator_db
    from jaxsim.spec_bundle import is_spec

    h = str(hardware)
    return ("legacy" if h.startswith("legacy/") else "operator-db" if is_operator_db(h)
            else "roofline" if is_spec(h) else "profiles")


def any_model(hardware) -> bool:
    """The hardware's tables are built for any model (converted operator databases, spec sheets)."""
    return bundle_source(hardware) in ("operator-db", "roofline")


def generated_variants(hardware) -> "dict | None":
    """The profile variants a generated source builds (None for folder-based hardware)."""
    from jaxsim import operator_db, spec_bundle

    return {"operator-db": operator_db.VARIANTS, "roofline": spec_bundle.VARIANTS}.get(bundle_source(hardware))


def has_hardware(profiles_dir, hardware) -> bool:
    """Hardware ``hardware`` can be loaded from ``profiles_dir`` (a folder, a converted system or a sheet)."""
    if bundle_source(hardware) == "roofline":  # a shipped sheet or spec/<path>.yaml
        from jaxsim.spec_bundle import sheet_path

        try:
            return sheet_path(profiles_dir, hardware).is_file()
        except JaxsimInputError:
            return False
    return str(hardware) in known_hardware(profiles_dir) or (Path(profiles_dir) / str(hardware)).is_dir()


def _load_yaml(path: Path, what: str) -> dict:
    if not path.is_file():
        raise JaxsimInputError(str(path), f"missing {what}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise JaxsimInputError(where, f"invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise JaxsimInputError(str(path), f"{what} must be a YAML mapping")
    return data


def load_architecture(profiles_dir, model_type: str):
    """``(sequence, category, tp_stable)`` from ``<profiles_dir>/architectures/<model_type>.yaml``."""
    adir = Path(profiles_dir) / "architectures"
    path = adir / f"{model_type}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in adir.glob("*.yaml"))
        raise JaxsimInputError(str(path), f"no architecture YAML for model_type {model_type!r}",
                               f"known architectures: {known}")
    arch = _load_yaml(path, "architecture YAML")
    seq_raw = arch.get("sequence")
    cat_raw = arch.get("catalog")
    if not isinstance(seq_raw, dict) or not isinstance(cat_raw, dict):
        raise JaxsimInputError(str(path), "needs a 'sequence' mapping and a 'catalog' mapping")
    category, tp_stable = {}, set()
    for cat, layers in cat_raw.items():
        if cat not in CATEGORIES:
            raise JaxsimInputError(str(path), f"unknown catalog category {cat!r}", f"use one of {list(CATEGORIES)}")
        for name, info in (layers or {}).items():
            category[name] = cat
            if isinstance(info, dict) and info.get("tp_stable"):
                tp_stable.add(name)
    sequence = {}
    for group in SEQUENCE_GROUPS:
        names = seq_raw.get(group) or []
        for name in names:
            if name not in category:
                raise JaxsimInputError(str(path), f"sequence.{group} names {name!r}, which is not in the catalog",
                                       "add it to the catalog or remove it from the sequence")
        sequence[group] = [str(n) for n in names]
    for group in seq_raw:
        if group not in SEQUENCE_GROUPS:
            raise JaxsimInputError(str(path), f"unknown sequence group {group!r}", f"use {list(SEQUENCE_GROUPS)}")
    return sequence, category, tp_stable


def tp_folder(base: Path, tp: int, model_name: str, hardware: str) -> Path:
    """``base/tp<N>``; an error listing the profiled degrees when it is missing (TP is never
    extrapolated)."""
    tpdir = Path(base) / f"tp{tp}"
    if not tpdir.is_dir():
        known = sorted(int(p.name[2:]) for p in Path(base).glob("tp*") if p.is_dir() and p.name[2:].isdigit())
        raise JaxsimInputError(str(tpdir), f"TP degree {tp} was not profiled for {model_name} on {hardware}",
                               f"TP is never extrapolated; profiled degrees: {known}")
    return tpdir


def load_profile_bundle(profiles_dir, hardware: str, model: ModelConfig, variant: str = "bf16",
                        tp: int = 1, spec: "dict | None" = None) -> ProfileBundle:
    """Read one profile bundle (REFERENCE.md §2.2) for ``model`` at TP degree ``tp``.

    ``legacy/<HW>``, converted operator-database systems and ``spec/<sheet>`` go to their loaders
    (:func:`bundle_source`); ``spec``: what-if overrides of a sheet (``peak_tflops``, ``mem_bw_gbs``;
    only for ``spec/<sheet>``).

    Raises :class:`JaxsimInputError` naming the file (and line) for unknown hardware, a missing
    model/variant/``tp<N>`` folder (TP is never extrapolated), a missing CSV or column, an
    unparsable line, a negative or non-finite time, a grid point profiled twice, and a layer of the
    architecture sequence with no rows (naming the CSV and the layer; before, such a layer was
    skipped with a warning, and deleting a layer's rows silently cut TPOT 13%). Only
    ``rotary_emb`` is skipped on hardware whose name contains "TPU" (REFERENCE.md §2.1). Points far
    off their grid neighbours are kept, listed in ``outliers`` and reported in one warning.
    """
    if str(hardware).startswith("legacy/"):  # the legacy format (REFERENCE.md §2.8)
        from jaxsim.legacy_profiles import load_legacy_bundle

        return load_legacy_bundle(profiles_dir, hardware, model, variant=variant, tp=tp)
    source = bundle_source(hardware)
    if source == "operator-db":  # converted operator databases (jaxsim.operator_db)
        from jaxsim.operator_db import load_converted_bundle

        return load_converted_bundle(profiles_dir, hardware, model, variant=variant, tp=tp)
    if source == "roofline":  # a spec sheet: the roofline model tabulated (jaxsim.spec_bundle)
        from jaxsim.spec_bundle import load_spec_bundle

        return load_spec_bundle(profiles_dir, hardware, model, variant=variant, tp=tp, **(spec or {}))
    root = Path(profiles_dir)
    hw_dir = root / hardware
    if not hw_dir.is_dir() or hardware in _NOT_HARDWARE:
        raise JaxsimInputError(str(hw_dir), f"unknown hardware {hardware!r}",
                               f"known hardware: {known_hardware(root)}")
    model_dir = hw_dir / model.name
    if not model_dir.is_dir():
        known = sorted(str(p.parent.relative_to(hw_dir)) for p in hw_dir.glob("*/*/*/meta.yaml"))
        known = sorted(set(str(Path(k).parent) for k in known))
        raise JaxsimInputError(str(model_dir), f"no profiles of model {model.name!r} on {hardware}",
                               f"profiled models on {hardware}: {known}")
    base = model_dir / variant
    if not base.is_dir():
        known = sorted(p.name for p in model_dir.iterdir() if p.is_dir())
        raise JaxsimInputError(str(base), f"no variant {variant!r} of {model.name} on {hardware}",
                               f"profiled variants: {known}")
    tp = int(tp)
    tpdir = tp_folder(base, tp, model.name, hardware)
    meta_path = base / "meta.yaml"
    meta = _load_yaml(meta_path, "meta.yaml")
    sequence, category, tp_stable = load_architecture(root, model.model_type)

    dense, dense_out = _tables_1d(tpdir / "dense.csv", "tokens")
    per_seq, per_seq_out = _tables_1d(tpdir / "per_sequence.csv", "sequences")
    if not dense:
        raise JaxsimInputError(str(tpdir / "dense.csv"), "the dense table has no rows",
                               "re-run the profiler for this bundle")
    if tp != 1:
        # tp_stable layers are profiled at TP1 and copied; fall back to tp1 where a copy is missing.
        for name, fname, tables, found in (("dense", "dense.csv", dense, dense_out),
                                           ("per_sequence", "per_sequence.csv", per_seq, per_seq_out)):
            need = [n for n in tp_stable if category.get(n) == name and n not in tables
                    and any(n in g for g in sequence.values())]
            if need and (base / "tp1" / fname).is_file():
                tp1, tp1_out = _tables_1d(base / "tp1" / fname, "tokens" if name == "dense" else "sequences")
                for n in need:
                    if n in tp1:
                        tables[n], found[n] = tp1[n], tp1_out[n]
    attention, outliers = _attention_table(tpdir / "attention.csv")
    needs_moe = any(category[n] == "moe" for g in sequence.values() for n in g)
    moe = None
    if needs_moe:
        moe, moe_out = _moe_table(base / "tp1" / "moe.csv")
        outliers += moe_out

    is_tpu = "TPU" in hardware
    kept = {}
    for group, names in sequence.items():
        kept[group] = []
        for name in names:
            cat = category[name]
            if name == "rotary_emb" and is_tpu:
                continue  # §2.1: skipped on TPU hardware
            tables, found, fname = {"dense": (dense, dense_out, "dense.csv"),
                                    "per_sequence": (per_seq, per_seq_out, "per_sequence.csv")}.get(cat, (None,) * 3)
            if tables is not None and name not in tables:
                # A layer without rows would add nothing to every iteration: an error, not a warning.
                raise JaxsimInputError(str(tpdir / fname), f"no rows for layer {name!r} (sequence.{group} of "
                                       f"architectures/{model.model_type}.yaml)",
                                       "restore the layer's rows or re-run the profiler for this bundle")
            if tables is not None:
                outliers += found[name]  # (a layer used twice is listed once: ordered_outliers)
            kept[group].append(name)
    if not any(category[n] == "attention" for g in kept.values() for n in g):
        raise JaxsimInputError(str(root / "architectures" / f"{model.model_type}.yaml"),
                               "the sequence has no attention layer", "add 'attention' to sequence.pre_attn")
    skew = _skew_fit(meta, meta_path, tpdir, tp)
    outliers = ordered_outliers(outliers)
    warn_outliers(f"{base} (tp{tp})", outliers)
    engine = meta.get("engine_effective") or {}
    return ProfileBundle(
        hardware=hardware, model_name=model.name, model_type=model.model_type, variant=variant, tp=tp,
        path=str(base), meta=meta, engine_effective=dict(engine) if isinstance(engine, dict) else {},
        sequence=kept, category=category, tp_stable=tp_stable, dense=dense, per_sequence=per_seq,
        attention=attention, moe=moe, skew=skew, outliers=outliers,
    )


def check_engine_limits(bundle: ProfileBundle, max_num_batched_tokens: int, max_num_seqs: int) -> list:
    """Warn (and return the messages) when runtime limits exceed what the profiler ran with.

    REFERENCE.md §2.2: lookups above ``engine_effective`` extrapolate linearly (§2.4).
    """
    messages = []
    eff = bundle.engine_effective
    for name, value in (("max_num_batched_tokens", max_num_batched_tokens), ("max_num_seqs", max_num_seqs)):
        limit = eff.get(name)
        if isinstance(limit, int) and value and value > limit:
            messages.append(f"{bundle.path}/meta.yaml: {name} = {value} exceeds the profiled {limit}; "
                            "latency lookups above it are extrapolated linearly")
    for msg in messages:
        warnings.warn(msg, stacklevel=2)
    return messages
