"""What a run writes and shows: the per-request table (Parquet or CSV, ITL lists and the
reference CSV on request), the progress bar's stretches of the compiled loop (that they give the
same result as one call is tested on a P/D cluster with decode leaps in tests/test_leap.py), and the
persistent compilation cache's switches."""

import csv
import dataclasses
import json

import numpy as np
import pytest
from test_metrics import MS, tiny_result

from jaxsim import compile_cache, metrics, progress
from jaxsim.engine.status import Status
from jaxsim.errors import JaxsimInputError
from jaxsim.metrics import REQUEST_COLUMNS, OutputOptions, write_outputs

# ------------------------------------------------------------------------------------------------
# The per-request table
# ------------------------------------------------------------------------------------------------


def test_default_table_is_parquet_without_itl_lists(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    summary = write_outputs(tiny_result(), tmp_path, model_name="m")
    assert summary["outputs"] == ["requests.parquet", "summary.json", "timeseries.csv"]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["requests.parquet", "summary.json", "timeseries.csv"]
    t = pq.read_table(tmp_path / "requests.parquet").to_pydict()
    assert list(t) == list(REQUEST_COLUMNS[:-1])  # no itl_ns, no reference CSV unless asked
    assert t["request_id"] == [0, 1, 2] and t["ttft_ns"] == [200 * MS, 400 * MS, 900 * MS]
    assert t["tpot_ns"][2] == 2100 * MS
    assert t["itl_mean_ns"][0] == pytest.approx((400 * MS + 700 * MS + 1) / 2) and np.isnan(t["itl_mean_ns"][1])
    assert json.loads((tmp_path / "summary.json").read_text())["outputs"] == summary["outputs"]


def test_itl_lists_on_request(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    write_outputs(tiny_result(), tmp_path, options=OutputOptions(itl_lists=True))
    t = pq.read_table(tmp_path / "requests.parquet").to_pydict()
    assert list(t)[-1] == "itl_ns"
    assert t["itl_ns"] == [[400 * MS, 700 * MS + 1], [], [2100 * MS]]


def test_csv_without_pyarrow(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "_have_pyarrow", lambda: False)
    summary = write_outputs(tiny_result(), tmp_path)
    assert summary["outputs"][0] == "requests.csv"
    with open(tmp_path / "requests.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(REQUEST_COLUMNS[:-1]) and int(rows[2]["tpot_ns"]) == 2100 * MS
    with pytest.raises(JaxsimInputError, match=r"^output\.requests_format: parquet needs the pyarrow package.*"
                                               r"pip install pyarrow"):
        OutputOptions(requests_format="parquet")


def test_output_options_are_checked():
    with pytest.raises(JaxsimInputError, match=r"^output\.requests_format: unknown format 'xlsx'"):
        OutputOptions(requests_format="xlsx")
    with pytest.raises(ValueError, match="reference_csv needs model_name"):
        write_outputs(tiny_result(), "/nonexistent-never-written", options=OutputOptions(reference_csv=True))


# ------------------------------------------------------------------------------------------------
# Progress: the loop in stretches
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _FakeState:
    """A loop that needs ``done_at`` steps and finishes a request every 10 steps."""

    steps: int = 0
    max_steps: int = 1000
    now: int = 0
    finished: int = 0
    status: int = Status.OK


def _fake_run(done_at: int, calls: list):
    def run(st):
        calls.append(int(st.max_steps))
        steps = min(int(st.max_steps), done_at)
        return dataclasses.replace(st, steps=steps, now=steps * 1_000_000, finished=steps // 10,
                                   status=Status.OK if steps == done_at else Status.STEP_LIMIT)
    return run


class _Recorder:
    def __init__(self):
        self.shown = []

    def show(self, now_ns, finished):
        self.shown.append((now_ns, finished))


def test_stretches_run_to_the_end_and_report_each_one():
    calls, bar = [], _Recorder()
    out = progress.run_in_stretches(_fake_run(95, calls), _FakeState(), bar, first=10)
    assert calls[0] == 10 and calls == sorted(calls) and calls[-1] >= 95  # limits only grow
    assert int(out.steps) == 95 and out.status == Status.OK and int(out.max_steps) == 1000  # own limit back
    assert bar.shown[-1] == (95_000_000, 9) and len(bar.shown) == len(calls)


def test_stretches_stop_at_the_runs_own_limit():
    calls, bar = [], _Recorder()
    out = progress.run_in_stretches(_fake_run(10**6, calls), _FakeState(max_steps=50), bar, first=10)
    assert calls[-1] == 50 and out.status == Status.STEP_LIMIT and int(out.steps) == 50


# ------------------------------------------------------------------------------------------------
# The persistent compilation cache
# ------------------------------------------------------------------------------------------------


def test_compile_cache_folder_and_switch(monkeypatch, tmp_path):
    monkeypatch.delenv("JAXSIM_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.default_dir() == tmp_path / "xdg" / "jaxsim" / "xla"
    monkeypatch.setenv("JAXSIM_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_cache.default_dir() == tmp_path / "mine"
    monkeypatch.setenv("JAXSIM_COMPILE_CACHE", "0")  # (tests/conftest.py sets it for the suite)
    assert compile_cache.enable(tmp_path / "never") is None and not (tmp_path / "never").exists()


def test_a_run_spanning_years_gets_coarser_time_series_bins(tmp_path):
    """An iteration ending 10^8 s after the first arrival (a far-future arrival in a trace) would
    need 10^8 one-second rows; write_outputs widens the bins to whole multiples of the interval."""
    r = tiny_result()
    end = r.iter_end_ns.copy()
    end[-1] = (100_000_000 - 1) * 10**9 + 5 * 10**8  # 10^8 - 1 s after the first arrival (0.5 s): 10^8 bins
    r = dataclasses.replace(r, iter_end_ns=end)
    assert metrics.timeseries_interval(r) == 100.0 and metrics.timeseries_interval(tiny_result()) == 1.0
    summary = write_outputs(r, tmp_path, options=OutputOptions(requests_format="csv"))
    assert summary["timeseries_interval_s"] == 100.0
    with open(tmp_path / "timeseries.csv") as f:
        rows = list(csv.reader(f))
    # the three served prompts (5 + 3 + 2 tokens: first tokens all in the first bin), 4 generated tokens
    assert len(rows) == 1 + 1_000_000 and rows[1][:3] == ["100.0", "0.1", "0.04"]
