"""Metrics from a hand-built SimResult: exact per-request, summary and time-series values."""

import csv
import dataclasses
import json

import numpy as np
import pytest
import yaml

from jaxsim.metrics import (
    REQUEST_COLUMNS, TIMESERIES_COLUMNS, OutputOptions, format_summary, request_table, summarize, time_series,
    write_outputs,
)
from jaxsim.spec import SimResult

S = 1_000_000_000  # ns per second
MS = 1_000_000


def tiny_result() -> SimResult:
    """Four requests; request 3 never finished. Iterations end at 0.7, 1.1, 1.8 and 3.9 s.

    r0: arrives 0.5 s, tokens at 0.7, 1.1, 1.8 s (+1 ns)  -> TTFT 200 ms, TPOT (1.1 s + 1) // 2
    r1: arrives 0.7 s, one token at 1.1 s                 -> TTFT 400 ms, TPOT 0, no ITL
    r2: arrives 0.9 s, scheduled 1.1 s, tokens 1.8, 3.9 s -> TTFT 900 ms, TPOT 2100 ms
    r3: arrives 1.0 s, unfinished
    """
    tok = np.array([7 * S // 10, 11 * S // 10, 18 * S // 10 + 1,  # r0
                    11 * S // 10,  # r1
                    18 * S // 10, 39 * S // 10], dtype=np.int64)  # r2
    return SimResult(
        arrival_ns=np.array([5, 7, 9, 10], dtype=np.int64) * S // 10,
        first_scheduled_ns=np.array([5, 7, 11, -1], dtype=np.int64) * S // 10,
        first_token_ns=np.array([7 * S // 10, 11 * S // 10, 18 * S // 10, -1], dtype=np.int64),
        finish_ns=np.array([18 * S // 10 + 1, 11 * S // 10, 39 * S // 10, -1], dtype=np.int64),
        input_toks=np.array([5, 3, 2, 8], dtype=np.int32),
        output_toks=np.array([3, 1, 2, 5], dtype=np.int32),
        prefix_hit_tokens=np.array([0, 2, 1, 0], dtype=np.int32),
        num_preemptions=np.array([0, 1, 0, 0], dtype=np.int32),
        recomputed_tokens=np.array([0, 3, 0, 0], dtype=np.int32),
        instance=np.zeros(4, dtype=np.int32),
        token_times_ns=tok,
        token_offsets=np.array([0, 3, 4, 6, 6], dtype=np.int64),
        iter_start_ns=np.array([5, 7, 11, 18], dtype=np.int64) * S // 10,
        iter_end_ns=np.array([7, 11, 18, 39], dtype=np.int64) * S // 10,
        iter_prompt_tokens=np.array([5, 3, 0, 2], dtype=np.int32),
        iter_gen_tokens=np.array([1, 1, 2, 1], dtype=np.int32),
        iter_num_tokens=np.array([5, 4, 2, 1], dtype=np.int32),
        iter_num_seqs=np.array([1, 2, 2, 1], dtype=np.int32),
        iter_running=np.array([1, 2, 2, 0], dtype=np.int32),
        iter_waiting=np.array([2, 1, 0, 0], dtype=np.int32),
        iter_kv_blocks_used=np.array([3, 5, 6, 0], dtype=np.int32),
        num_blocks=10,
        block_size=16,
        stats={"wall_s": 1.5, "requests": 99, "extrapolated_lookups": 2},
    )


def test_request_table_exact():
    t = request_table(tiny_result())
    assert set(t) == set(REQUEST_COLUMNS)
    np.testing.assert_array_equal(t["request_id"], [0, 1, 2])
    np.testing.assert_array_equal(t["ttft_ns"], [200 * MS, 400 * MS, 900 * MS])
    np.testing.assert_array_equal(t["e2e_ns"], [1300 * MS + 1, 400 * MS, 3000 * MS])
    np.testing.assert_array_equal(t["tpot_ns"], [(1100 * MS + 1) // 2, 0, 2100 * MS])
    np.testing.assert_array_equal(t["queuing_delay_ns"], [0, 0, 200 * MS])
    np.testing.assert_array_equal(t["end_ns"], [1800 * MS + 1, 1100 * MS, 3900 * MS])
    np.testing.assert_array_equal(t["itl_ns"][0], [400 * MS, 700 * MS + 1])
    assert t["itl_ns"][1].size == 0
    np.testing.assert_array_equal(t["itl_ns"][2], [2100 * MS])
    assert t["itl_mean_ns"][0] == (1100 * MS + 1) / 2
    assert t["itl_median_ns"][0] == (1100 * MS + 1) / 2
    assert t["itl_p99_ns"][0] == pytest.approx(400 * MS + 0.99 * (300 * MS + 1))
    assert t["itl_max_ns"][0] == 700 * MS + 1
    assert np.isnan(t["itl_mean_ns"][1]) and np.isnan(t["itl_max_ns"][1])
    np.testing.assert_array_equal(t["prefix_hit_tokens"], [0, 2, 1])
    np.testing.assert_array_equal(t["num_preemptions"], [0, 1, 0])
    np.testing.assert_array_equal(t["recomputed_tokens"], [0, 3, 0])
    np.testing.assert_array_equal(t["input"], [5, 3, 2])
    np.testing.assert_array_equal(t["output"], [3, 1, 2])


def test_request_table_orders_by_instance_then_id():
    r = tiny_result()
    r.instance = np.array([1, 0, 1, 0], dtype=np.int32)
    t = request_table(r)
    np.testing.assert_array_equal(t["request_id"], [1, 0, 2])
    np.testing.assert_array_equal(t["instance_id"], [0, 1, 1])


def test_summary_exact():
    s = summarize(tiny_result())
    assert s["requests"] == 3 and s["unfinished_requests"] == 1
    assert s["makespan_ns"] == 3400 * MS and s["makespan_s"] == 3.4
    assert s["total_input_tokens"] == 10 and s["total_generated_tokens"] == 6
    assert s["preemptions"] == 1 and s["recomputed_tokens"] == 3
    assert s["request_throughput_rps"] == pytest.approx(3 / 3.4)
    assert s["prompt_throughput_tps"] == pytest.approx(10 / 3.4)
    assert s["generation_throughput_tps"] == pytest.approx(6 / 3.4)
    assert s["total_throughput_tps"] == pytest.approx(16 / 3.4)
    # TTFT [200, 400, 900] ms: linear percentiles
    assert s["ttft_ms_mean"] == pytest.approx(500)
    assert s["ttft_ms_median"] == pytest.approx(400)
    assert s["ttft_ms_p90"] == pytest.approx(400 + 0.8 * 500)
    assert s["ttft_ms_p95"] == pytest.approx(400 + 0.9 * 500)
    assert s["ttft_ms_p99"] == pytest.approx(400 + 0.98 * 500)
    assert s["tpot_ms_mean"] == pytest.approx((550 + 0 + 2100) / 3, abs=1e-6)
    # ITL over all gaps: [400, 700.000001, 2100] ms
    assert s["itl_ms_mean"] == pytest.approx((400 + 700.000001 + 2100) / 3)
    assert s["itl_ms_median"] == pytest.approx(700.000001)
    assert s["e2e_ms_median"] == pytest.approx(1300.000001)
    assert s["prefix_cache_requested_tokens"] == 10
    assert s["prefix_cache_hit_tokens"] == 3
    assert s["prefix_cache_hit_ratio"] == pytest.approx(0.3)
    assert s["kv_num_blocks"] == 10 and s["kv_block_size"] == 16 and s["kv_num_tokens"] == 160
    assert s["kv_peak_usage_pct"] == pytest.approx(60.0)
    assert s["iterations"] == 4
    # SimResult.stats are merged; a colliding key is renamed
    assert s["wall_s"] == 1.5 and s["extrapolated_lookups"] == 2
    assert s["requests"] == 3 and s["stats_requests"] == 99
    json.dumps(s, allow_nan=False)  # plain, strict-JSON values


def test_time_series_exact():
    ts = time_series(tiny_result())
    assert set(ts) == set(TIMESERIES_COLUMNS) | {"prompt_computed_throughput"}
    # bins from the first arrival (0.5 s): iterations end at +0.2, +0.6, +1.3, +3.4 s
    np.testing.assert_array_equal(ts["t"], [1.0, 2.0, 3.0, 4.0])
    # prompt tokens as vLLM logs them: each prompt once, in its first token's bin (r0 5 and r1 3
    # in bin 1, r2 2 in bin 2); the tokens the iterations computed, by the iteration's end
    np.testing.assert_array_equal(ts["prompt_throughput"], [8, 2, 0, 0])
    np.testing.assert_array_equal(ts["prompt_computed_throughput"], [8, 0, 0, 2])
    np.testing.assert_array_equal(ts["gen_throughput"], [2, 2, 0, 1])
    np.testing.assert_array_equal(ts["running"], [2, 2, 2, 0])  # bin 3 empty: carried forward
    np.testing.assert_array_equal(ts["waiting"], [1, 0, 0, 0])
    np.testing.assert_allclose(ts["kv_cache_pct"], [50, 60, 60, 0])
    # half-second bins: throughput is per second
    half = time_series(tiny_result(), interval_s=0.5)
    np.testing.assert_array_equal(half["t"], np.arange(1, 8) * 0.5)
    np.testing.assert_array_equal(half["prompt_throughput"], [10, 6, 4, 0, 0, 0, 0])
    np.testing.assert_array_equal(half["prompt_computed_throughput"], [10, 6, 0, 0, 0, 0, 4])
    np.testing.assert_array_equal(half["running"], [1, 2, 2, 2, 2, 2, 0])


def test_no_token_times():
    r = tiny_result()
    r.token_times_ns = np.zeros(0, dtype=np.int64)
    r.token_offsets = np.zeros(5, dtype=np.int64)
    t = request_table(r)
    np.testing.assert_array_equal(t["tpot_ns"], [(1100 * MS + 1) // 2, 0, 2100 * MS])
    assert all(x.size == 0 for x in t["itl_ns"])
    s = summarize(r, t)
    assert s["itl_ms_mean"] is None  # NaN becomes null in JSON


def test_write_outputs(tmp_path):
    out = tmp_path / "run"
    summary = write_outputs(tiny_result(), out, config_dict={"a": {"b": 1}, "p": np.int64(3)},
                            model_name="meta-llama/Llama-3.1-8B",
                            options=OutputOptions(requests_format="csv", itl_lists=True, reference_csv=True))
    assert summary["outputs"] == ["requests.csv", "summary.json", "timeseries.csv", "requests_reference.csv",
                                  "config.yaml"]
    assert sorted(x.name for x in out.iterdir()) == sorted(summary["outputs"])
    with open(out / "requests.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(REQUEST_COLUMNS)
    assert len(rows) == 3
    assert json.loads(rows[0]["itl_ns"]) == [400 * MS, 700 * MS + 1]
    assert json.loads(rows[1]["itl_ns"]) == [] and rows[1]["itl_mean_ns"] == ""
    assert int(rows[2]["tpot_ns"]) == 2100 * MS
    assert json.loads((out / "summary.json").read_text()) == summary
    with open(out / "timeseries.csv") as f:
        ts = list(csv.reader(f))
    assert ts[0] == list(TIMESERIES_COLUMNS)
    assert ts[1] == ["1.0", "8.0", "2.0", "2", "1", "50.0"]
    assert len(ts) == 5
    assert yaml.safe_load((out / "config.yaml").read_text()) == {"a": {"b": 1}, "p": 3}
    with open(out / "requests_reference.csv") as f:
        ref = list(csv.reader(f))
    assert ref[0][:3] == ["instance id", "request id", "model"]
    assert ref[1][2] == "meta-llama/Llama-3.1-8B" and ref[1][-1] == "[400000000, 700000001]"


def test_format_summary():
    text = format_summary(summarize(tiny_result()))
    for needle in ("TTFT", "TPOT", "ITL", "E2E", "makespan_s", "prefix_cache_hit_ratio",
                   "wall_s", "stats_requests"):
        assert needle in text


@pytest.mark.parametrize("interval", [0.0, -1.0, 1e-12, float("nan"), float("inf")])
def test_time_series_refuses_a_bin_width_that_is_not_a_positive_duration(interval):
    with pytest.raises(ValueError, match="interval_s must be a positive number"):
        time_series(tiny_result(), interval_s=interval)


def test_a_first_token_delayed_past_the_last_iteration_still_counts_its_prompt():
    """A first token reaches the client after an output delay: r2's at 5.2 s, past the last
    iteration's bin (3.9 s); the series grows a bin rather than drop its 2 prompt tokens."""
    r = tiny_result()
    first = r.first_token_ns.copy()
    first[2] = 52 * S // 10
    ts = time_series(dataclasses.replace(r, first_token_ns=first))
    np.testing.assert_array_equal(ts["prompt_throughput"], [8, 0, 0, 0, 2])
    np.testing.assert_array_equal(ts["gen_throughput"], [2, 2, 0, 1, 0])
    assert ts["running"][-1] == 0 and ts["prompt_throughput"].sum() == 10
