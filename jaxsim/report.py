"""Tables and plots of sweep results: one row (a ``dict``) per simulated configuration.

A sweep produces ``list[dict]`` rows holding ``config`` (the configuration index), the swept knob
columns (``arrival_rate_scale``, ``max_num_seqs``, ``hardware``, ``seed``, ...) and the metric
columns of :data:`METRIC_COLUMNS` (floats; NaN where no request finished). This module turns such
rows into files a person reads; it never runs a simulation and needs neither JAX nor a GPU.

* :func:`write_table` / :func:`read_table` — CSV (or Parquet, when pyarrow is installed) that
  round-trips the rows exactly.
* :func:`format_table`, :func:`best_rows` — text tables of the best configurations.
* :func:`plot_latency_vs_load`, :func:`plot_slo_heatmap`, :func:`plot_pareto` — PNG plots;
  :func:`default_plots` picks sensible ones from which knobs vary.
* :func:`pareto_front`, :func:`grid_mean` — the data behind the Pareto and heatmap plots.

Plots are drawn on :class:`matplotlib.figure.Figure` objects rendered by Agg, never through
``pyplot``: no global figure registry is touched, nothing is shown, and no figure outlives its
function, so this is safe inside long sweeps, notebooks and headless machines alike.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tabulate import tabulate

from jaxsim.errors import JaxsimInputError

# The metric columns a sweep row carries, in the order a sweep writes them. Everything else
# (except ``config``) is a knob.
METRIC_COLUMNS = (
    "ttft_mean_ms", "ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms",
    "tpot_mean_ms", "tpot_p50_ms", "tpot_p90_ms", "tpot_p99_ms",
    "e2e_mean_ms", "e2e_p50_ms", "e2e_p99_ms",
    "offered_rate_rps", "throughput_rps", "output_tok_s", "makespan_s",
    "preemptions", "iterations", "slo_attainment", "goodput_rps",
)
# The metrics :func:`format_table` shows by default: a full row of METRIC_COLUMNS is too wide to
# read in a terminal, and these answer "how fast, how much, how many met the SLO".
SUMMARY_METRICS = ("ttft_p99_ms", "tpot_p99_ms", "throughput_rps", "output_tok_s",
                   "slo_attainment", "goodput_rps")
LATENCY_METRICS = ("ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms")
# Knobs that set the offered load; when one varies, latency-vs-load is the plot to draw.
LOAD_COLUMNS = ("arrival_rate_scale", "offered_rate_rps")
# Knobs that repeat a configuration rather than change it: default_plots averages over them
# instead of drawing them as a series, a heatmap axis or a Pareto label.
REPLICATE_KNOBS = ("seed",)

_DPI = 120
_MAX_SERIES = 8          # more lines than this in one legend cannot be told apart
_MAX_PARETO_LABELS = 30  # beyond this the labels of frontier points overlap into a blur
_LOG_RANGE = 100.0       # a y range wider than this is drawn on a log axis

# Numbers as write_table writes them (int, repr(float), nan/inf). Matched explicitly rather than
# by trying int()/float(), which also accept "1_000", " 7 " and "infinity" — strings that a
# knob such as a hardware name could legitimately be and must stay strings.
_INT_RE = re.compile(r"[+-]?\d+")
_FLOAT_RE = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?|[+-]?(nan|inf)")


# --------------------------------------------------------------------------- input checking

def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Union of the rows' keys in first-seen order, with ``config`` first when present."""
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            seen.setdefault(key, None)
    names = list(seen)
    if "config" in seen:
        names.remove("config")
        names.insert(0, "config")
    return names


def _require_rows(rows: Sequence[Mapping[str, Any]], where: str) -> None:
    if rows is None or len(rows) == 0:
        raise JaxsimInputError(where, "no rows were given", "pass the non-empty list of sweep rows")


def _require_columns(rows: Sequence[Mapping[str, Any]], where: str,
                     **named: str | None) -> None:
    """Raise naming the argument and the column when a named column is in no row."""
    available = _columns(rows)
    for arg, column in named.items():
        if column is not None and column not in available:
            raise JaxsimInputError(
                f"{where}({arg}={column!r})", f"no column {column!r} in the rows",
                "available columns: " + ", ".join(available))


def _number(row: Mapping[str, Any], column: str) -> float:
    """The value as a float; NaN where missing, None or not a number (e.g. a string knob)."""
    value = row.get(column)
    if value is None or isinstance(value, (str, bytes)):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _scalar(value: Any) -> Any:
    """numpy/JAX scalars as plain Python ones: numpy 2 reprs a float64 as ``np.float64(1.5)``,
    which would land in the CSV verbatim."""
    if isinstance(value, np.generic) or (isinstance(value, np.ndarray) and value.ndim == 0):
        return value.item()
    if hasattr(value, "shape") and getattr(value, "shape", None) == () and hasattr(value, "item"):
        return value.item()  # a 0-d JAX array
    return value


def _sort_key(value: Any) -> tuple:
    """Order knob values: numbers numerically, then everything else by its text (mixed types
    would make plain ``sorted`` raise)."""
    if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def _distinct(rows: Sequence[Mapping[str, Any]], column: str) -> list[Any]:
    """Distinct values of a column over the rows that have it, sorted."""
    values = {_scalar(r[column]) for r in rows if r.get(column) is not None}
    # NaN is not a knob value (and, unequal to itself, could not index a grid cell).
    values = {v for v in values if not (isinstance(v, float) and math.isnan(v))}
    return sorted(values, key=_sort_key)


def _fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _nanmean(values: Iterable[float]) -> float:
    """Mean of the finite values; NaN when there are none (a config where nothing finished must
    not turn the mean of its neighbours into NaN)."""
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _slo_threshold(slo: Any, metric: str) -> float | None:
    """The SLO bound that applies to a metric column, if ``slo`` has one.

    ``slo`` may be a mapping or an object with attributes; ``ttft_ms`` bounds the ``ttft_*_ms``
    columns, ``tpot_ms`` the ``tpot_*`` ones and ``e2e_ms`` the ``e2e_*`` ones.
    """
    if slo is None:
        return None
    prefix = metric.split("_", 1)[0]
    name = f"{prefix}_ms"
    value = slo.get(name) if isinstance(slo, Mapping) else getattr(slo, name, None)
    return None if value is None else float(value)


# --------------------------------------------------------------------------- tables

def write_table(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write the rows to ``path`` and return it: CSV, or Parquet when the name ends in ``.parquet``.

    The header is the union of the rows' keys in first-seen order, ``config`` first. Floats are
    written with ``repr`` (shortest text that reads back to the same float, NaN as ``nan``);
    a key a row lacks, or a ``None`` value, is an empty cell.
    """
    _require_rows(rows, "write_table")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = _columns(rows)
    if path.suffix == ".parquet":
        pa, pq = _import_pyarrow("write_table", path)
        # Built column by column: pyarrow's from_pylist takes its schema from the first row only
        # and would silently drop columns that appear later.
        table = pa.table({c: [_scalar(r.get(c)) for r in rows] for c in header})
        pq.write_table(table, path)
        return path
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            writer.writerow([_csv_cell(row.get(c)) for c in header])
    return path


def _csv_cell(value: Any) -> str:
    value = _scalar(value)
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def read_table(path: str | Path) -> list[dict]:
    """Read a table written by :func:`write_table` back into rows.

    Numeric cells become ``int`` (no decimal point or exponent) or ``float``; ``True``/``False``
    become bools; everything else stays a string. An empty cell is left out of its row, so
    ``read_table(write_table(rows, p)) == rows`` for rows that lack some keys.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"read_table: {path} does not exist")
    if path.suffix == ".parquet":
        _, pq = _import_pyarrow("read_table", path)
        return [{k: v for k, v in row.items() if v is not None}
                for row in pq.read_table(path).to_pylist()]
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return [{k: _parse_cell(v) for k, v in row.items() if v not in ("", None)}
                for row in reader]


def _parse_cell(text: str) -> Any:
    if _INT_RE.fullmatch(text):
        return int(text)
    if _FLOAT_RE.fullmatch(text):
        return float(text)
    if text in ("True", "False"):
        return text == "True"
    return text


def _import_pyarrow(where: str, path: Path):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise JaxsimInputError(
            f"{where}({str(path)!r})", "Parquet needs the pyarrow package, which is not installed",
            "run `pip install pyarrow`, or give a path ending in .csv") from e
    return pa, pq


def best_rows(rows: Sequence[Mapping[str, Any]], key: str = "goodput_rps", n: int = 10,
              ascending: bool = False) -> list[Mapping[str, Any]]:
    """The ``n`` rows with the largest ``key`` (smallest when ``ascending``).

    Rows where ``key`` is missing or NaN come last whatever the direction: a configuration
    where nothing finished is never "best". Ties keep the rows' order.
    """
    _require_rows(rows, "best_rows")
    _require_columns(rows, "best_rows", key=key)
    sign = 1.0 if ascending else -1.0

    def order(row: Mapping[str, Any]) -> tuple[bool, float]:
        v = _number(row, key)
        return (True, 0.0) if math.isnan(v) else (False, sign * v)

    return sorted(rows, key=order)[:max(n, 0)]


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
                 max_rows: int = 20) -> str:
    """A plain-text table of the first ``max_rows`` rows, for printing.

    ``columns`` defaults to ``config``, the knobs (every non-metric column) and the
    :data:`SUMMARY_METRICS` present — all metrics would be too wide for a terminal.
    """
    _require_rows(rows, "format_table")
    if columns is None:
        available = _columns(rows)
        columns = [c for c in available if c not in METRIC_COLUMNS]
        columns += [m for m in SUMMARY_METRICS if m in available]
    else:
        columns = list(columns)
        for c in columns:
            _require_columns(rows, "format_table", columns=c)
    shown = rows[:max(max_rows, 0)]
    body = [[_scalar(r.get(c)) for c in columns] for r in shown]
    text = tabulate(body, headers=columns, tablefmt="simple", floatfmt=".4g", missingval="")
    if len(rows) > len(shown):
        text += f"\n... ({len(rows) - len(shown)} more rows)"
    return text


# --------------------------------------------------------------------------- analysis

def pareto_front(rows: Sequence[Mapping[str, Any]], x: str, y: str) -> list[int]:
    """Indices of the Pareto-optimal rows when ``x`` is maximized and ``y`` minimized.

    A row is on the front when no other row has ``x`` at least as large and ``y`` at least as
    small, one of the two strictly. Rows with equal (x, y) do not dominate each other, so all of
    them are on the front. Rows where x or y is missing or NaN are ignored. The indices are
    ordered by increasing x (then index), the order in which to connect the front.
    """
    _require_rows(rows, "pareto_front")
    _require_columns(rows, "pareto_front", x=x, y=y)
    points = [(i, _number(r, x), _number(r, y)) for i, r in enumerate(rows)]
    points = [p for p in points if not (math.isnan(p[1]) or math.isnan(p[2]))]
    # Sweep from the largest x down, keeping the smallest y seen so far: a point is on the front
    # iff its y beats every point with a strictly larger x, and it is the smallest y at its x.
    points.sort(key=lambda p: (-p[1], p[2], p[0]))
    front: list[int] = []
    best_y = math.inf
    k = 0
    while k < len(points):
        x_value = points[k][1]
        group = []
        while k < len(points) and points[k][1] == x_value:
            group.append(points[k])
            k += 1
        min_y = group[0][2]  # the group is sorted by y
        if min_y < best_y:
            front.extend(p[0] for p in group if p[2] == min_y)
            best_y = min_y
    front.sort(key=lambda i: (_number(rows[i], x), i))
    return front


def _grid(rows: Sequence[Mapping[str, Any]], x: str, y: str, value: str):
    """The heatmap grid plus the number of rows averaged into each cell."""
    xs, ys = _distinct(rows, x), _distinct(rows, y)
    x_index = {v: i for i, v in enumerate(xs)}
    y_index = {v: i for i, v in enumerate(ys)}
    cells: dict[tuple[int, int], list[float]] = {}
    for row in rows:
        xv, yv = _scalar(row.get(x)), _scalar(row.get(y))
        if xv not in x_index or yv not in y_index:
            continue  # the row lacks one of the knobs (or has NaN there)
        key = (y_index[yv], x_index[xv])
        cells.setdefault(key, []).append(_number(row, value))
    matrix = np.full((len(ys), len(xs)), np.nan)
    counts = np.zeros((len(ys), len(xs)), dtype=int)
    for (j, i), values in cells.items():
        matrix[j, i] = _nanmean(values)
        counts[j, i] = len(values)
    return xs, ys, matrix, counts


def grid_mean(rows: Sequence[Mapping[str, Any]], x: str, y: str,
              value: str = "slo_attainment") -> tuple[list, list, np.ndarray]:
    """Mean of ``value`` over the rows at each (x, y) knob pair — the heatmap's data.

    Returns ``(xs, ys, matrix)``: the sorted distinct values of knobs ``x`` and ``y`` and a
    ``(len(ys), len(xs))`` array whose ``[j, i]`` is the mean of ``value`` over the rows with
    ``y == ys[j]`` and ``x == xs[i]`` (so averaged over every other knob). NaN values are left
    out of the mean; a cell with no finite value is NaN.
    """
    _check_grid_args(rows, x, y, value, "grid_mean")
    xs, ys, matrix, _ = _grid(rows, x, y, value)
    return xs, ys, matrix


def _check_grid_args(rows, x: str, y: str, value: str, where: str) -> None:
    _require_rows(rows, where)
    _require_columns(rows, where, x=x, y=y, value=value)
    if x == y:
        raise JaxsimInputError(f"{where}(x={x!r}, y={y!r})", "x and y are the same column",
                               "pick two different knobs")


def _varying_others(rows: Sequence[Mapping[str, Any]], groups: Iterable[list[int]],
                    fixed: set[str]) -> list[str]:
    """Non-metric columns (other than ``fixed``) that differ within some group of row indices:
    the knobs a group mean averages over, named in plot titles."""
    candidates = [c for c in _columns(rows)
                  if c not in METRIC_COLUMNS and c != "config" and c not in fixed]
    varying = []
    for c in candidates:
        for group in groups:
            if len({repr(_scalar(rows[i].get(c))) for i in group}) > 1:
                varying.append(c)
                break
    return varying


# --------------------------------------------------------------------------- plots

def _figure(width: float, height: float):
    # Imported here so that the table functions work (and import fast) without matplotlib.
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), layout="constrained")


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI, format="png")
    return path


def plot_latency_vs_load(rows: Sequence[Mapping[str, Any]], path: str | Path,
                         x: str = "offered_rate_rps", series: str | None = None,
                         metrics: Sequence[str] = LATENCY_METRICS, slo: Any = None) -> Path:
    """Latency metrics against load: one subplot per metric, one line per value of ``series``.

    Points are sorted by x. Where several rows share (x, series value) because other knobs vary
    (seeds, say), the point is their mean and the title says over which knobs. A subplot whose
    positive values span more than 100x uses a log y axis. ``slo`` (a mapping or object with
    ``ttft_ms`` / ``tpot_ms`` / ``e2e_ms``) draws the bound on the matching subplots.
    """
    return _save(_latency_figure(rows, x, series, metrics, slo), path)


def _latency_figure(rows, x, series, metrics, slo):
    """The figure of :func:`plot_latency_vs_load`, unsaved (tests inspect its axes)."""
    _require_rows(rows, "plot_latency_vs_load")
    metrics = list(metrics)
    if not metrics:
        raise JaxsimInputError("plot_latency_vs_load(metrics=())", "no metric to plot",
                               "name at least one metric column")
    _require_columns(rows, "plot_latency_vs_load", x=x, series=series)
    for m in metrics:
        _require_columns(rows, "plot_latency_vs_load", metrics=m)

    series_values = _distinct(rows, series) if series is not None else [None]
    # (series value, x value) -> row indices; rows without a finite x cannot be placed.
    groups: dict[tuple[Any, float], list[int]] = {}
    for i, row in enumerate(rows):
        xv = _number(row, x)
        if math.isnan(xv):
            continue
        s = _scalar(row.get(series)) if series is not None else None
        if series is not None and s is None:
            continue
        groups.setdefault((s, xv), []).append(i)
    averaged = max((len(g) for g in groups.values()), default=0) > 1

    ncols = min(2, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    fig = _figure(5.5 * ncols, 3.8 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, metric in zip(axes, metrics):
        plotted: list[float] = []
        for s in series_values:
            xs = sorted(xv for (sv, xv) in groups if sv == s)
            ys = [_nanmean(_number(rows[i], metric) for i in groups[(s, xv)]) for xv in xs]
            keep = [(a, b) for a, b in zip(xs, ys) if math.isfinite(b)]
            if not keep:
                continue
            label = None if series is None else f"{series}={_fmt_value(s)}"
            ax.plot([a for a, _ in keep], [b for _, b in keep], marker="o", markersize=3,
                    label=label)
            plotted.extend(b for _, b in keep)
        bound = _slo_threshold(slo, metric)
        if bound is not None:
            ax.axhline(bound, color="red", linestyle="--", linewidth=1, label=f"SLO {bound:g}")
            plotted.append(bound)
        # Log only when every value is positive: a log axis would silently drop the others.
        if plotted and min(plotted) > 0 and max(plotted) > _LOG_RANGE * min(plotted):
            ax.set_yscale("log")
        ax.set_title(metric)
        ax.set_xlabel(x)
        ax.set_ylabel(metric)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    for ax in axes[len(metrics):]:
        ax.set_visible(False)

    title = f"Latency vs {x}"
    if averaged:
        over = _varying_others(rows, groups.values(), {x} | ({series} if series else set()))
        what = ", ".join(over) if over else "repeated rows"
        title += f"\n(each point: mean over {what})"
    fig.suptitle(title)
    return fig


def plot_slo_heatmap(rows: Sequence[Mapping[str, Any]], path: str | Path, x: str, y: str,
                     value: str = "slo_attainment") -> Path:
    """Heatmap of ``value`` over the distinct values of knobs ``x`` and ``y``.

    Each cell is the mean over the rows at that (x, y) — see :func:`grid_mean` — and is annotated
    with its value; empty cells are grey. Values within [0, 1] (SLO attainment) are coloured on a
    fixed 0..1 scale so that heatmaps of different sweeps compare.
    """
    _check_grid_args(rows, x, y, value, "plot_slo_heatmap")
    xs, ys, matrix, counts = _grid(rows, x, y, value)
    finite = matrix[np.isfinite(matrix)]
    unit_range = finite.size > 0 and finite.min() >= 0.0 and finite.max() <= 1.0
    vmin, vmax = (0.0, 1.0) if unit_range else (None, None)

    from matplotlib import colormaps
    cmap = colormaps["viridis"].with_extremes(bad="lightgrey")
    fig = _figure(max(4.5, 0.9 * len(xs) + 2.5), max(3.5, 0.6 * len(ys) + 2.0))
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=vmin, vmax=vmax,
                      origin="lower", aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, label=value)
    ax.set_xticks(range(len(xs)), [_fmt_value(v) for v in xs])
    ax.set_yticks(range(len(ys)), [_fmt_value(v) for v in ys])
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    if len(xs) > 6:
        ax.tick_params(axis="x", labelrotation=45)

    number_format = "{:.2f}" if unit_range else "{:.3g}"
    for j in range(len(ys)):
        for i in range(len(xs)):
            v = matrix[j, i]
            if not math.isfinite(v):
                text, color = "n/a", "black"
            else:
                text = number_format.format(v)
                # Dark text on light cells and light text on dark ones, by the cell's luminance.
                r, g, b, _ = cmap(image.norm(v))
                color = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
            ax.text(i, j, text, ha="center", va="center", color=color, fontsize="small")

    title = f"{value} by {x} and {y}"
    if counts.max(initial=0) > 1:
        title += "\n(each cell: mean over the other knobs)"
    ax.set_title(title)
    return _save(fig, path)


def plot_pareto(rows: Sequence[Mapping[str, Any]], path: str | Path, x: str = "output_tok_s",
                y: str = "tpot_p99_ms", label: str | Sequence[str] | None = None,
                slo: Any = None) -> Path:
    """Scatter of every configuration with the Pareto front (max ``x``, min ``y``) highlighted.

    ``label`` names one or more columns (knobs) written next to each front point, e.g.
    ``"max_num_seqs=64"``; only the first 30 front points are labelled. ``slo`` draws the bound
    that applies to ``y`` (see :func:`plot_latency_vs_load`).
    """
    _require_rows(rows, "plot_pareto")
    labels = [label] if isinstance(label, str) else list(label or [])
    _require_columns(rows, "plot_pareto", x=x, y=y)
    for name in labels:
        _require_columns(rows, "plot_pareto", label=name)
    front = pareto_front(rows, x, y)

    fig = _figure(6.5, 4.5)
    ax = fig.subplots()
    xs = [_number(r, x) for r in rows]
    ys = [_number(r, y) for r in rows]
    ax.scatter(xs, ys, s=14, color="tab:gray", alpha=0.6, label=f"all configs ({len(rows)})")
    fx = [xs[i] for i in front]
    fy = [ys[i] for i in front]
    ax.plot(fx, fy, color="tab:red", marker="o", markersize=5, linewidth=1.5,
            label=f"Pareto front ({len(front)})")
    if labels:
        # Coinciding front points (e.g. seeds that gave the same result) get one label.
        at: dict[tuple[float, float], list[int]] = {}
        for i in front:
            at.setdefault((xs[i], ys[i]), []).append(i)
        x_mid = (min(fx) + max(fx)) / 2
        for (px, py), same in list(at.items())[:_MAX_PARETO_LABELS]:
            text = ", ".join(f"{c}={_fmt_value(_scalar(rows[same[0]].get(c)))}" for c in labels)
            if len(same) > 1:
                text += f" (+{len(same) - 1} same)"
            # Labels point inwards so they stay inside the axes, and are left out of the layout
            # so that long ones do not squeeze the plot.
            right_half = px > x_mid
            note = ax.annotate(text, (px, py), textcoords="offset points",
                               xytext=(-5 if right_half else 5, 4),
                               ha="right" if right_half else "left", fontsize="x-small")
            note.set_in_layout(False)
    bound = _slo_threshold(slo, y)
    if bound is not None:
        ax.axhline(bound, color="red", linestyle="--", linewidth=1, label=f"SLO {bound:g}")
    ax.set_xlabel(f"{x} (higher is better)")
    ax.set_ylabel(f"{y} (lower is better)")
    ax.set_title(f"{y} vs {x}: Pareto front")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def default_plots(rows: Sequence[Mapping[str, Any]], out_dir: str | Path, knobs: Sequence[str],
                  slo: Any = None) -> list[Path]:
    """Draw the plots that suit which ``knobs`` vary (take more than one value); return the paths.

    * ``latency_vs_load.png`` when ``arrival_rate_scale`` or ``offered_rate_rps`` varies: x is
      ``offered_rate_rps`` when the rows have it, one line per value of the first other varying
      knob with at most 8 values.
    * ``heatmap_<a>_<b>.png`` of ``slo_attainment`` (else ``goodput_rps``) over the first two
      varying knobs, when at least two vary.
    * ``pareto.png`` of ``output_tok_s`` vs ``tpot_p99_ms``, labelled with the varying knobs,
      whenever at least two rows have both.

    Knobs in :data:`REPLICATE_KNOBS` (``seed``) are averaged over, never chosen as a series,
    heatmap axis or label. Plots whose inputs are missing are skipped, so one row gives an empty
    list.
    """
    _require_rows(rows, "default_plots")
    for k in knobs:
        _require_columns(rows, "default_plots", knobs=k)
    out_dir = Path(out_dir)
    available = set(_columns(rows))
    varying = [k for k in knobs if k not in REPLICATE_KNOBS and len(_distinct(rows, k)) > 1]
    paths: list[Path] = []

    load_varies = any(c in available and len(_distinct(rows, c)) > 1 for c in LOAD_COLUMNS)
    latency_metrics = [m for m in LATENCY_METRICS if m in available]
    if load_varies and latency_metrics:
        x = "offered_rate_rps" if "offered_rate_rps" in available else "arrival_rate_scale"
        series = next((k for k in varying
                       if k not in LOAD_COLUMNS and len(_distinct(rows, k)) <= _MAX_SERIES), None)
        paths.append(plot_latency_vs_load(rows, out_dir / "latency_vs_load.png", x=x,
                                          series=series, metrics=latency_metrics, slo=slo))

    value = next((v for v in ("slo_attainment", "goodput_rps") if v in available), None)
    if len(varying) >= 2 and value is not None:
        a, b = varying[0], varying[1]
        paths.append(plot_slo_heatmap(rows, out_dir / f"heatmap_{a}_{b}.png", x=a, y=b,
                                      value=value))

    px, py = "output_tok_s", "tpot_p99_ms"
    if px in available and py in available:
        both = sum(1 for r in rows
                   if math.isfinite(_number(r, px)) and math.isfinite(_number(r, py)))
        if both >= 2:
            paths.append(plot_pareto(rows, out_dir / "pareto.png", x=px, y=py,
                                     label=varying or None, slo=slo))
    return paths
