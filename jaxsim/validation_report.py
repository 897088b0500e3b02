"""The report of ``scripts/validate.py --all``: one Markdown file with PNG plots.

* an overview table (one row per case, the key figures), then every statistic of every case (rows:
  statistics, columns: cases);
* per case: its engine settings, tables (per-request statistics, paired errors, summary.json Diff%,
  time-series scores per column, per instance), what is not simulated and what was assumed, and
  plots: measured vs simulated series (cluster and each measured instance), TTFT/TPOT/E2E CDFs for
  per-request cases.

Plots are drawn on :class:`matplotlib.figure.Figure` objects rendered by Agg (as
:mod:`jaxsim.report`), never through ``pyplot``.
"""

from __future__ import annotations

import csv
import datetime
import math
import subprocess
from pathlib import Path

import numpy as np

from jaxsim.metrics import STAT_NAMES
from jaxsim.validation import METRICS, SUMMARY_KEYS, TIMESERIES_COLUMNS

_DPI = 100
_UNITS = {"prompt_throughput": "tok/s", "gen_throughput": "tok/s", "running": "requests", "waiting": "requests",
          "kv_cache_pct": "%", "prefix_hit_pct": "%", "cpu_prefix_hit_pct": "%", "gpu_mem_gib": "GiB",
          "cpu_pool_gib": "GiB", "gpu_power_w": "W", "server_power_w": "W"}


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # Agg canvas by default; no pyplot state

    return Figure(figsize=(width, height), layout="constrained")


def short_name(case: str) -> str:
    """``A6000-Llama-3.1-8B-pulse-SD+PC`` -> ``A6000 pulse-SD+PC`` (table headers)."""
    return case.replace("-Llama-3.1-8B", "").replace("-", " ", 1)


def _fmt(v, spec: str = ".3f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if isinstance(v, str):
        return v
    return format(v, spec)


def _pct(v) -> str:
    return "—" if v is None else f"{v:+.1f}%"


def _sim_column(comparison: dict, col: str) -> str:
    if col == "kv_cache_pct" and (comparison.get("settings") or {}).get("kv_cache_pct_counts_cached"):
        return "kv_cache_cached_pct"
    return col


# ------------------------------------------------------------------------------------------------
# plots
# ------------------------------------------------------------------------------------------------


def plot_timeseries(real: dict, sim: dict, path: str | Path, title: str, comparison: dict,
                    scores: dict | None = None) -> Path:
    """One panel per measured column: the measurement and the simulation against t (s); a column
    with no simulated series is drawn alone and titled so."""
    cols = [c for c in real if c != "t"]
    fig = _figure(10, 1.9 * len(cols) + 0.6)
    axes = fig.subplots(len(cols), 1, sharex=True, squeeze=False)[:, 0]
    for ax, col in zip(axes, cols):
        r = np.asarray(real[col], dtype=np.float64)
        ax.plot(np.arange(1, r.size + 1), r, color="black", lw=1.2, label="vLLM (measured)")
        sc = _sim_column(comparison, col)
        label = col
        if sc in sim:
            s = np.asarray(sim[sc], dtype=np.float64)
            ax.plot(np.arange(1, s.size + 1), s, color="tab:orange", lw=1.0, label=f"jaxsim ({sc})")
            v = (scores or {}).get(col)
            if v:
                label += f"  nMAE {_fmt(v['nmae'])}, corr {_fmt(v['corr'])}"
        else:
            label += "  (not simulated)"
        ax.set_title(label, fontsize=9, loc="left")
        ax.set_ylabel(_UNITS.get(col, ""), fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper right")
    axes[-1].set_xlabel("t (s of trace time; row t = [t-1, t))", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=_DPI, format="png")
    return Path(path)


def plot_cdfs(real: dict, table: dict, path: str | Path, title: str) -> Path:
    """TTFT, TPOT and E2E CDFs, measured (requests.jsonl) vs simulated (ms)."""
    fig = _figure(12, 3.4)
    axes = fig.subplots(1, 3)
    sim = {"ttft": table["ttft_ns"], "tpot": table["tpot_ns"], "e2e": table["e2e_ns"]}
    for ax, m in zip(axes, METRICS):
        for values, label, color in ((real[f"{m}_ms"], "vLLM", "black"),
                                     (np.asarray(sim[m], dtype=np.float64) / 1e6, "jaxsim", "tab:orange")):
            v = np.sort(np.asarray(values, dtype=np.float64))
            ax.plot(v, np.arange(1, v.size + 1) / max(v.size, 1), color=color, label=label, lw=1.2)
        ax.set_title(f"{m.upper()} CDF", fontsize=9)
        ax.set_xlabel("ms", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=_DPI, format="png")
    return Path(path)


def write_series_csv(series: dict, path: str | Path) -> Path:
    """The simulated series (every column) as CSV, rows t = 1, 2, ..."""
    cols = ["t"] + [c for c in series if c != "t"]
    n = max(len(np.asarray(series[c])) for c in cols)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for i in range(n):
            w.writerow([_cell(series[c], i) for c in cols])
    return Path(path)


def _cell(values, i):
    a = np.asarray(values)
    if i >= a.size:
        return ""
    v = a[i]
    return int(v) if np.issubdtype(a.dtype, np.integer) else round(float(v), 4)


# ------------------------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------------------------


def _md_table(header: list, rows: list) -> list:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return out


def _measured(c: dict) -> str:
    parts = []
    if "stats" in c:
        parts.append("requests")
    if "summary" in c:
        parts.append("summary")
    if "timeseries" in c:
        n = len(c["timeseries"]) + len([k for k in c.get("not_simulated", {}) if not k.startswith("instance")])
        parts.append(f"{n} series" + (f" x {len(c['timeseries_instances'])} inst" if c.get("timeseries_instances") else ""))
    return ", ".join(parts)


def _ts(c: dict, col: str) -> dict:
    return (c.get("timeseries") or {}).get(col) or {}


def _total_diff(v: dict):
    if not v or v.get("total_real") in (None, 0) or v.get("total_sim") is None:
        return None
    return (v["total_sim"] - v["total_real"]) / v["total_real"] * 100


def _last_tick(v: dict) -> str:
    if not v or (v.get("last_tick_real") is None and v.get("last_tick_sim") is None):
        return "—"
    return f"{_fmt(v.get('last_tick_real'), 'd')}/{_fmt(v.get('last_tick_sim'), 'd')}"


def overview_rows(comparisons: list) -> tuple[list, list]:
    """The overview table: one row per case, the key figures."""
    header = ["case", "measured", "TTFT mean", "TPOT mean", "E2E mean", "makespan", "gen nMAE", "gen corr",
              "gen tokens", "last gen tick vLLM/sim", "prompt nMAE (best lag)", "running nMAE",
              "summary max abs Diff", "not simulated"]
    rows = []
    for c in comparisons:
        st = c.get("stats") or {}
        gen, prompt, run = _ts(c, "gen_throughput"), _ts(c, "prompt_throughput"), _ts(c, "running")
        p = _fmt(prompt.get("nmae"))
        if prompt.get("best_lag") is not None:
            p += f" ({prompt['best_lag']:+d}: {_fmt(prompt['best_lag_nmae'])})"
        summ = [abs(v["diff_pct"]) for v in (c.get("summary") or {}).values() if v["diff_pct"] is not None]
        rows.append([
            short_name(c["case"]), _measured(c),
            _pct((st.get("ttft_mean") or {}).get("diff_pct")), _pct((st.get("tpot_mean") or {}).get("diff_pct")),
            _pct((st.get("e2e_mean") or {}).get("diff_pct")),
            _pct(((c.get("paired") or {}).get("makespan_s") or {}).get("diff_pct")),
            _fmt(gen.get("nmae")), _fmt(gen.get("corr")), _pct(_total_diff(gen)), _last_tick(gen), p,
            _fmt(run.get("nmae")), (f"{max(summ):.1f}%" if summ else "—"),
            ", ".join(sorted({k.split(": ")[-1] for k in c.get("not_simulated") or {}})) or "—",
        ])
    return header, rows


def statistic_rows(comparisons: list) -> tuple[list, list]:
    """Every statistic (rows: per-request, paired, summary.json, then each time-series column of
    the cluster and of each instance) of every case (columns)."""
    cells: dict = {}

    def put(name, case, value):
        cells.setdefault(name, {})[case] = value

    names = []
    for c in comparisons:
        k = c["case"]
        for s, v in (c.get("stats") or {}).items():
            put(f"{s} Diff%", k, _pct(v["diff_pct"]))
        for m, v in (c.get("paired") or {}).items():
            if m == "makespan_s":
                put("makespan Diff%", k, _pct(v["diff_pct"]))
            else:
                put(f"paired {m} mean/median abs err%", k,
                    f"{_fmt(v['mean_abs_pct'], '.1f')}/{_fmt(v['median_abs_pct'], '.1f')}")
        for s, v in (c.get("summary") or {}).items():
            put(f"summary {s} Diff%", k, _pct(v["diff_pct"]))
        scopes = [("", c.get("timeseries") or {})]
        scopes += [(f"inst{i} ", sc) for i, sc in (c.get("timeseries_instances") or {}).items()]
        for prefix, scores in scopes:
            for col, v in scores.items():
                put(f"{prefix}{col} nMAE", k, _fmt(v["nmae"]))
                put(f"{prefix}{col} corr", k, _fmt(v["corr"]))
                if v.get("best_lag") is not None:
                    put(f"{prefix}{col} best lag: nMAE", k, f"{v['best_lag']:+d}: {_fmt(v['best_lag_nmae'])}")
                if v.get("total_real") is not None:
                    put(f"{prefix}{col} total Diff%", k, _pct(_total_diff(v)))
                if v.get("last_tick_real") is not None or v.get("last_tick_sim") is not None:
                    put(f"{prefix}{col} last tick vLLM/sim", k, _last_tick(v))
                if v.get("final_real") is not None:
                    put(f"{prefix}{col} final vLLM/sim", k, f"{_fmt(v['final_real'], '.2f')}/{_fmt(v['final_sim'], '.2f')}")
    # a fixed order: per request, paired, summary, then the series (cluster first), column by column
    metrics_order = [f"{m}_{s} Diff%" for m in METRICS for s in STAT_NAMES]
    metrics_order += [f"paired {m} mean/median abs err%" for m in METRICS] + ["makespan Diff%"]
    metrics_order += sorted((n for n in cells if n.startswith("summary ")), key=_summary_order)
    prefixes = [""] + sorted({n.split(" ", 1)[0] + " " for n in cells if n.startswith("inst")})
    for prefix in prefixes:
        for col in TIMESERIES_COLUMNS[1:]:
            for what in ("nMAE", "corr", "best lag: nMAE", "total Diff%", "last tick vLLM/sim", "final vLLM/sim"):
                metrics_order.append(f"{prefix}{col} {what}")
    names = [n for n in metrics_order if n in cells]
    names += [n for n in cells if n not in names]
    cases = [c["case"] for c in comparisons]
    header = ["statistic"] + [short_name(x) for x in cases]
    rows = [[n] + [cells[n].get(x, "") for x in cases] for n in names]
    return header, rows


def _summary_order(name: str):
    key = name.split(" ")[1]
    if key in SUMMARY_KEYS:
        return (0, SUMMARY_KEYS.index(key), "")
    metric = key.split("_")[0]
    return (1, ("ttft", "tpot", "itl", "e2el").index(metric) if metric in ("ttft", "tpot", "itl", "e2el") else 9, key)


def _ts_table(scores: dict) -> list:
    rows = []
    for col, v in scores.items():
        lag = f"{v['best_lag']:+d}: {_fmt(v['best_lag_nmae'])}" if v.get("best_lag") is not None else "—"
        total = (f"{_fmt(v['total_real'], ',.0f')} / {_fmt(v['total_sim'], ',.0f')}"
                 if v.get("total_real") is not None else "—")
        final = (f"{_fmt(v['final_real'], '.2f')} / {_fmt(v['final_sim'], '.2f')}"
                 if v.get("final_real") is not None else "—")
        rows.append([col, _fmt(v["mae"], ".2f"), _fmt(v["nmae"]), _fmt(v["corr"]), lag, total, _last_tick(v), final,
                     v["busy_ticks"]])
    return _md_table(["column", "MAE", "nMAE", "corr", "best lag: nMAE", "total vLLM / sim", "last tick vLLM/sim",
                      "final vLLM / sim", "busy ticks"], rows)


def _settings_line(s: dict) -> str:
    keys = ("vllm_version", "enforce_eager", "async_scheduling", "max_num_seqs", "max_num_batched_tokens",
            "block_size", "enable_prefix_caching", "max_model_len", "num_gpu_blocks", "routing", "pd", "kv_connector")
    return ", ".join(f"{k}={s.get(k)}" for k in keys if k in s)


def case_section(ev, out_dir: Path) -> list:
    """The Markdown of one case (and its plots and simulated series, written into ``out_dir``)."""
    c, case = ev.comparison, ev.case
    name = c["case"]
    lines = [f"## {name}", "", f"Settings: {_settings_line(c.get('settings') or {})}. "
             f"Simulated in {ev.wall_s:.1f} s (with compile).", ""]
    if "stats" in c:
        rows = [[s, _fmt(v["real"], ".1f"), _fmt(v["sim"], ".1f"), _pct(v["diff_pct"])] for s, v in c["stats"].items()]
        lines += ["Per request (ms; Diff% = (sim - vLLM) / vLLM):", ""] + _md_table(["statistic", "vLLM", "sim", "Diff%"], rows)
        p = c["paired"]
        rows = [[m, _fmt(p[m]["mean_abs_pct"], ".1f"), _fmt(p[m]["median_abs_pct"], ".1f"),
                 _fmt(p[m]["signed_mean_pct"], "+.1f")] for m in METRICS]
        mk = p["makespan_s"]
        lines += ["", f"Paired by request id (|err| %); makespan vLLM {_fmt(mk['real'], '.1f')} s, sim "
                  f"{_fmt(mk['sim'], '.1f')} s ({_pct(mk['diff_pct'])}):", ""]
        lines += _md_table(["metric", "mean abs", "median abs", "signed mean"], rows) + [""]
    if "summary" in c:
        rows = [[k, _fmt(v["real"], ",.2f"), _fmt(v["sim"], ",.2f"), _pct(v["diff_pct"])] for k, v in c["summary"].items()]
        lines += ["summary.json (`vllm bench serve`; simulated side computed the same way):", ""]
        lines += _md_table(["key", "vLLM", "sim", "Diff%"], rows) + [""]
    if "timeseries" in c:
        lines += ["Time series (MAE / nMAE over busy ticks, Pearson over all rows):", ""] + _ts_table(c["timeseries"])
        lines.append("")
        png = plot_timeseries(case.real_timeseries, ev.series, out_dir / f"{name}.timeseries.png",
                              f"{name}: cluster" if ev.instance_series else name, c, c["timeseries"])
        lines += [f"![{name} time series]({png.name})", ""]
        write_series_csv(ev.series, out_dir / f"{name}.sim_timeseries.csv")
    for k, scores in (c.get("timeseries_instances") or {}).items():
        lines += [f"Instance {k}:", ""] + _ts_table(scores) + [""]
        png = plot_timeseries(case.real_timeseries_instances[int(k)], ev.instance_series[int(k)],
                              out_dir / f"{name}.inst{k}.timeseries.png", f"{name}: instance {k}", c, scores)
        lines += [f"![{name} instance {k}]({png.name})", ""]
        write_series_csv(ev.instance_series[int(k)], out_dir / f"{name}.inst{k}.sim_timeseries.csv")
    if case.real is not None:
        png = plot_cdfs(case.real, ev.table, out_dir / f"{name}.cdf.png", name)
        lines += [f"![{name} CDFs]({png.name})", ""]
    if c.get("not_simulated"):
        lines += ["Not simulated:", ""] + [f"* `{k}`: {v}" for k, v in c["not_simulated"].items()] + [""]
    if c.get("not_recorded"):
        lines += ["Not recorded by the run:", ""] + [f"* `{k}`: {v}" for k, v in c["not_recorded"].items()] + [""]
    if c.get("assumed"):
        lines += ["Assumed:", ""] + [f"* {a}" for a in c["assumed"]] + [""]
    return lines


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parents[1])
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                               timeout=5, cwd=Path(__file__).resolve().parents[1])
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_report(evaluations: list, failures: dict, out_dir: str | Path, command: str = "") -> Path:
    """``out_dir/report.md`` (and the plots and simulated series it links) for ``evaluations``
    (``scripts/validate.py``'s :class:`Evaluation` objects); ``failures``: case -> error text."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    comparisons = [ev.comparison for ev in evaluations]
    lines = ["# jaxsim validation report", ""]
    lines += [f"{len(evaluations)} case(s) run" + (f", {len(failures)} failed" if failures else "") +
              f"; {datetime.datetime.now().isoformat(timespec='seconds')}; jaxsim {_git_commit()}."]
    if command:
        lines += ["", f"    {command}"]
    lines += ["", "Diff% = (sim - vLLM) / vLLM x 100. nMAE = mean |sim - vLLM| / mean |vLLM| over the ticks where the "
              "measurement is busy (non-zero throughput or running + waiting > 0); corr = Pearson over all rows; "
              "rows t = 1 ... the longer series (throughputs padded with 0, gauges with their last value). "
              "Scoring rules: profiles/validation/README.md, \"How to score a case\".", ""]
    if failures:
        lines += ["Failed:", ""] + [f"* {k}: {v}" for k, v in failures.items()] + [""]
    if comparisons:
        lines += ["## Overview", ""] + _md_table(*overview_rows(comparisons)) + [""]
        lines += ["## Every statistic", ""] + _md_table(*statistic_rows(comparisons)) + [""]
    for ev in evaluations:
        lines += case_section(ev, out)
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


__all__ = ["write_report", "plot_timeseries", "plot_cdfs", "overview_rows", "statistic_rows", "short_name",
           "write_series_csv"]
