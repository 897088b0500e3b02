"""Tests of jaxsim.report on small hand-built sweep rows (no simulation runs here)."""

import csv
import itertools
import math
import random
import sys

import numpy as np
import pytest

from jaxsim import report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _sweep_rows():
    """A 3 (load) x 2 (max_num_seqs) x 2 (seed) sweep with made-up but plausible metrics."""
    rows = []
    for config, (scale, seqs, seed) in enumerate(
            itertools.product((0.5, 1.0, 2.0), (32, 64), (0, 1))):
        load = 4.0 * scale
        rows.append({
            "config": config, "arrival_rate_scale": scale, "max_num_seqs": seqs,
            "hardware": "rtxpro6000", "seed": seed,
            "ttft_p50_ms": 20.0 * scale ** 4 + seed, "ttft_p99_ms": 60.0 * scale ** 5,
            "tpot_p50_ms": 10.0 + scale * seqs / 32, "tpot_p99_ms": 15.0 + 2 * scale * seqs / 32,
            "offered_rate_rps": load, "output_tok_s": 100.0 * load * (1 + seqs / 64),
            "slo_attainment": max(0.0, 1.0 - 0.3 * scale * seqs / 64),
            "goodput_rps": load * (1.0 - 0.1 * scale),
        })
    return rows


def _assert_png(path):
    data = path.read_bytes()
    assert len(data) > 1000
    assert data[:8] == PNG_SIGNATURE


# --------------------------------------------------------------------------- tables

def test_csv_round_trip_values_types_and_header(tmp_path):
    rows = [
        {"config": 0, "max_num_seqs": 64, "hardware": "rtx4090", "compute_scale": 0.1,
         "ttft_p50_ms": 1 / 3, "slo_attainment": float("nan"), "makespan_s": 1e-300},
        {"config": 1, "max_num_seqs": 128, "hardware": "rtxpro6000", "compute_scale": 1.0,
         "ttft_p50_ms": 12345.678901234567, "slo_attainment": 0.95, "makespan_s": 2.5e16},
    ]
    path = report.write_table(rows, tmp_path / "sweep.csv")
    assert path == tmp_path / "sweep.csv"
    with path.open() as f:
        assert next(csv.reader(f)) == list(rows[0])
    back = report.read_table(path)
    assert len(back) == 2
    for original, read in zip(rows, back):
        assert list(read) == list(original)
        for key, value in original.items():
            assert type(read[key]) is type(value), key
            if isinstance(value, float) and math.isnan(value):
                assert math.isnan(read[key])
            else:
                assert read[key] == value, key  # exact: floats are written with repr


def test_csv_missing_cells_and_union_header(tmp_path):
    rows = [{"tp": 1, "config": 0, "ttft_p50_ms": 5.0},
            {"config": 1, "tp": 2, "seed": 7},
            {"config": 2, "ttft_p50_ms": None, "goodput_rps": 1.5}]
    path = report.write_table(rows, tmp_path / "t.csv")
    lines = path.read_text().splitlines()
    # union of keys in first-seen order, config moved first
    assert lines[0] == "config,tp,ttft_p50_ms,seed,goodput_rps"
    assert lines[2] == "1,2,,7,"
    assert lines[3] == "2,,,,1.5"
    assert report.read_table(path) == [{"config": 0, "tp": 1, "ttft_p50_ms": 5.0},
                                       {"config": 1, "tp": 2, "seed": 7},
                                       {"config": 2, "goodput_rps": 1.5}]


def test_csv_numpy_scalars_and_string_knobs(tmp_path):
    rows = [{"config": np.int64(0), "x": np.float64(0.1), "name": "1_000", "flag": True,
             "label": "inf-cluster"}]
    path = report.write_table(rows, tmp_path / "n.csv")
    assert path.read_text().splitlines()[1] == "0,0.1,1_000,True,inf-cluster"
    assert report.read_table(path) == [{"config": 0, "x": 0.1, "name": "1_000", "flag": True,
                                        "label": "inf-cluster"}]


def test_parquet_without_pyarrow_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow` fail
    with pytest.raises(ValueError, match=r"pip install pyarrow.*\.csv"):
        report.write_table([{"config": 0}], tmp_path / "t.parquet")


def test_parquet_round_trip(tmp_path):
    pytest.importorskip("pyarrow")
    rows = [{"config": 0, "tp": 1, "hardware": "a", "ttft_p50_ms": 1.5},
            {"config": 1, "tp": 2, "hardware": "b", "ttft_p50_ms": 2.5, "seed": 3}]
    path = report.write_table(rows, tmp_path / "t.parquet")
    assert report.read_table(path) == rows


def test_empty_rows_raise():
    with pytest.raises(ValueError, match="no rows"):
        report.write_table([], "unused.csv")
    with pytest.raises(ValueError, match="no rows"):
        report.default_plots([], "unused", knobs=[])


def test_best_rows_orders_and_puts_nan_last():
    rows = [{"config": 0, "goodput_rps": 2.0}, {"config": 1, "goodput_rps": float("nan")},
            {"config": 2, "goodput_rps": 5.0}, {"config": 3},
            {"config": 4, "goodput_rps": 2.0}]
    assert [r["config"] for r in report.best_rows(rows, n=10)] == [2, 0, 4, 1, 3]
    assert [r["config"] for r in report.best_rows(rows, n=2, ascending=True)] == [0, 4]
    with pytest.raises(ValueError, match="'goodput'"):
        report.best_rows(rows, key="goodput")


def test_format_table_default_columns_and_truncation():
    rows = _sweep_rows()
    text = report.format_table(rows, max_rows=3)
    header = text.splitlines()[0].split()
    assert header[:5] == ["config", "arrival_rate_scale", "max_num_seqs", "hardware", "seed"]
    assert "goodput_rps" in header and "ttft_p50_ms" not in header
    assert text.endswith(f"... ({len(rows) - 3} more rows)")
    text = report.format_table(rows[:2], columns=["config", "goodput_rps"])
    assert text.splitlines()[0].split() == ["config", "goodput_rps"]
    assert len(text.splitlines()) == 4  # header, rule, two rows
    with pytest.raises(ValueError, match="'nope'"):
        report.format_table(rows, columns=["config", "nope"])


# --------------------------------------------------------------------------- analysis

def test_pareto_front_hand_case():
    points = [(10, 5), (20, 8), (15, 5), (20, 10), (5, 1), (25, 20), (float("nan"), 0.5),
              (15, 5), (12, 6)]
    rows = [{"config": i, "tok": x, "lat": y} for i, (x, y) in enumerate(points)]
    rows.append({"config": 9, "tok": 100.0})  # no latency: ignored
    # (5,1), (15,5) twice (equal points do not dominate each other), (20,8), (25,20); ordered by x
    assert report.pareto_front(rows, "tok", "lat") == [4, 2, 7, 1, 5]


def test_pareto_front_matches_brute_force():
    rng = random.Random(0)
    rows = [{"x": rng.randint(0, 9), "y": rng.randint(0, 9)} for _ in range(200)]

    def dominated(i):
        xi, yi = rows[i]["x"], rows[i]["y"]
        return any(r["x"] >= xi and r["y"] <= yi and (r["x"] > xi or r["y"] < yi) for r in rows)

    expected = sorted((i for i in range(len(rows)) if not dominated(i)),
                      key=lambda i: (rows[i]["x"], i))
    assert report.pareto_front(rows, "x", "y") == expected


def test_grid_mean_hand_case():
    rows = [
        {"tp": 1, "hw": "b", "seed": 0, "slo": 0.2},
        {"tp": 1, "hw": "b", "seed": 1, "slo": 0.4},
        {"tp": 2, "hw": "b", "seed": 0, "slo": 1.0},
        {"tp": 2, "hw": "b", "seed": 1, "slo": float("nan")},  # nothing finished: left out
        {"tp": 1, "hw": "a", "seed": 0, "slo": 0.5},
        {"tp": 4, "hw": "a", "seed": 0, "slo": float("nan")},  # only NaN: cell is NaN
    ]  # (tp=2, hw=a) has no rows: NaN
    xs, ys, matrix = report.grid_mean(rows, "tp", "hw", "slo")
    assert xs == [1, 2, 4]
    assert ys == ["a", "b"]
    expected = np.array([[0.5, np.nan, np.nan],
                         [0.3, 1.0, np.nan]])
    np.testing.assert_allclose(matrix, expected, equal_nan=True)


def test_bad_column_names_raise_with_name_and_choices(tmp_path):
    rows = _sweep_rows()
    calls = [
        lambda: report.plot_latency_vs_load(rows, tmp_path / "a.png", x="bogus_x"),
        lambda: report.plot_latency_vs_load(rows, tmp_path / "a.png", series="bogus_x"),
        lambda: report.plot_latency_vs_load(rows, tmp_path / "a.png", metrics=["bogus_x"]),
        lambda: report.plot_slo_heatmap(rows, tmp_path / "b.png", x="bogus_x", y="seed"),
        lambda: report.plot_slo_heatmap(rows, tmp_path / "b.png", x="seed", y="bogus_x"),
        lambda: report.plot_pareto(rows, tmp_path / "c.png", label="bogus_x"),
        lambda: report.grid_mean(rows, "seed", "max_num_seqs", "bogus_x"),
        lambda: report.pareto_front(rows, "bogus_x", "tpot_p99_ms"),
        lambda: report.default_plots(rows, tmp_path, knobs=["seed", "bogus_x"]),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="bogus_x") as info:
            call()
        assert "max_num_seqs" in str(info.value)  # the available columns are listed
    with pytest.raises(ValueError, match="same column"):
        report.grid_mean(rows, "seed", "seed", "slo_attainment")


# --------------------------------------------------------------------------- plots

def test_plots_write_png(tmp_path):
    rows = _sweep_rows()
    _assert_png(report.plot_latency_vs_load(rows, tmp_path / "lat.png", series="max_num_seqs",
                                            slo={"ttft_ms": 200.0, "tpot_ms": 50.0}))
    _assert_png(report.plot_slo_heatmap(rows, tmp_path / "heat.png", x="arrival_rate_scale",
                                        y="max_num_seqs"))
    _assert_png(report.plot_pareto(rows, tmp_path / "sub" / "pareto.png",
                                   label=["max_num_seqs", "arrival_rate_scale"]))


def test_latency_figure_means_over_seeds_and_log_scale():
    rows = _sweep_rows()
    fig = report._latency_figure(rows, "offered_rate_rps", "max_num_seqs",
                                 ["ttft_p99_ms", "tpot_p50_ms"], None)
    assert "mean over seed" in fig._suptitle.get_text()
    ttft_ax, tpot_ax = fig.axes[:2]
    assert ttft_ax.get_yscale() == "log"     # 60*0.5^5 .. 60*2^5 spans 1024x
    assert tpot_ax.get_yscale() == "linear"
    assert len(ttft_ax.get_lines()) == 2     # one line per max_num_seqs value
    line = ttft_ax.get_lines()[0]
    assert list(line.get_xdata()) == [2.0, 4.0, 8.0]  # sorted by x, one point per (x, series)
    # without averaging the title does not claim a mean
    one_seed = [r for r in rows if r["seed"] == 0]
    fig = report._latency_figure(one_seed, "offered_rate_rps", "max_num_seqs",
                                 ["ttft_p50_ms"], None)
    assert "mean" not in fig._suptitle.get_text()


def test_default_plots_chooses_from_varying_knobs(tmp_path, monkeypatch):
    # Drawing is covered above; here record what default_plots asks for (and stay fast).
    calls = []

    def fake(name):
        def plot(rows, path, **kwargs):
            calls.append((name, kwargs))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(PNG_SIGNATURE)
            return path
        return plot

    for name in ("plot_latency_vs_load", "plot_slo_heatmap", "plot_pareto"):
        monkeypatch.setattr(report, name, fake(name))
    rows = _sweep_rows()
    knobs = ["arrival_rate_scale", "max_num_seqs", "hardware", "seed"]
    slo = {"tpot_ms": 30.0}
    paths = report.default_plots(rows, tmp_path / "plots", knobs, slo=slo)
    assert [p.name for p in paths] == ["latency_vs_load.png",
                                       "heatmap_arrival_rate_scale_max_num_seqs.png",
                                       "pareto.png"]
    assert all(p.exists() for p in paths)
    (_, lat), (_, heat), (_, pareto) = calls
    assert lat["x"] == "offered_rate_rps" and lat["series"] == "max_num_seqs"
    assert lat["slo"] is slo
    assert (heat["x"], heat["y"], heat["value"]) == ("arrival_rate_scale", "max_num_seqs",
                                                     "slo_attainment")
    assert pareto["label"] == ["arrival_rate_scale", "max_num_seqs"]  # seeds are replicates
    # one row: nothing varies, nothing to compare
    assert report.default_plots(rows[:1], tmp_path / "one", knobs) == []
    # seeds are replicates, not a heatmap axis: load and seed vary -> no heatmap
    calls.clear()
    same_seqs = [r for r in rows if r["max_num_seqs"] == 32]
    paths = report.default_plots(same_seqs, tmp_path / "load", knobs)
    assert [p.name for p in paths] == ["latency_vs_load.png", "pareto.png"]
    assert calls[0][1]["series"] is None
    # only the seed varies: no load plot, no heatmap, still a Pareto plot
    same_load = [r for r in rows if r["arrival_rate_scale"] == 1.0 and r["max_num_seqs"] == 32]
    paths = report.default_plots(same_load, tmp_path / "seeds", knobs)
    assert [p.name for p in paths] == ["pareto.png"]
