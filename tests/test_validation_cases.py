"""Every kind of validation case (profiles/validation/*): the scoring rules by hand on tiny made-up
series, loading and engine settings of every shipped case, the per-instance time series, the report,
and errors for malformed cases. No simulation compiles here except in the ``slow`` end-to-end test."""

import json
import shutil
import types
from pathlib import Path

import numpy as np
import pytest

from jaxsim import metrics, validation, validation_report
from jaxsim.errors import JaxsimInputError
from jaxsim.validation import (bench_summary, busy_ticks, compare, compare_timeseries, engine_settings, lagged_nmae,
                               load_case, pad, score_series)

from _shared import MODELS, PROFILES, WORKLOADS

CASES = PROFILES / "validation"
SHIPPED = sorted(p.name for p in CASES.iterdir() if (p / "vllm" / "meta.json").is_file())
FIG5 = "A6000-Llama-3.1-8B-SD+PC"
PULSE_SD = "A6000-Llama-3.1-8B-pulse-SD+PC"
PULSE_MD = "A6000-Llama-3.1-8B-pulse-MD+PC+PS"


def load(name):
    return load_case(CASES / name, MODELS, WORKLOADS)


def copy_case(tmp_path, name=FIG5) -> Path:
    dst = tmp_path / name
    shutil.copytree(CASES / name, dst)
    return dst


def edit_json(path: Path, fn):
    obj = json.loads(path.read_text())
    fn(obj)
    path.write_text(json.dumps(obj))


# ---------------------------------------------------------------------------------------------
# scoring rules, by hand
# ---------------------------------------------------------------------------------------------


def test_padding_rules():
    np.testing.assert_array_equal(pad([1, 2], 4, gauge=False), [1, 2, 0, 0])  # throughput: 0
    np.testing.assert_array_equal(pad([1, 2], 4, gauge=True), [1, 2, 2, 2])  # gauge: its last value
    np.testing.assert_array_equal(pad([1, 2, 3], 2, gauge=True), [1, 2])
    np.testing.assert_array_equal(pad([], 2, gauge=True), [0, 0])


def test_busy_ticks():
    real = {"t": np.arange(1, 5), "gen_throughput": np.array([0, 5, 0, 0.]), "running": np.array([0, 1, 1, 0.]),
            "waiting": np.array([0, 0, 0, 2.])}
    # gen > 0 at row 2; running + waiting > 0 at rows 2, 3, 4; row 5 is padding (gauges: last value)
    np.testing.assert_array_equal(busy_ticks(real, 5), [False, True, True, True, True])
    assert busy_ticks({"gen_throughput": np.array([0, 3., 0])}, 4).tolist() == [False, True, False, False]


def test_score_series_by_hand():
    real = np.array([0, 10, 20, 0.])
    sim = np.array([0, 12, 16, 4, 2.])
    busy = np.array([False, True, True, False, False])  # the measurement's busy rows
    s = score_series(real, sim, busy, "gen_throughput")
    # busy rows 2, 3: |12 - 10| and |16 - 20| -> MAE 3; mean |real| over them 15 -> nMAE 0.2
    assert s["mae"] == pytest.approx(3.0) and s["nmae"] == pytest.approx(0.2)
    a, b = np.array([0, 10, 20, 0, 0.]), sim  # real padded with 0 to the longer series
    r = ((a - a.mean()) * (b - b.mean())).sum() / np.sqrt(((a - a.mean()) ** 2).sum() * ((b - b.mean()) ** 2).sum())
    assert s["corr"] == pytest.approx(r)
    assert (s["total_real"], s["total_sim"]) == (30.0, 34.0)
    assert (s["last_tick_real"], s["last_tick_sim"]) == (3, 5)
    assert s["final_real"] is None and s["busy_ticks"] == 2 and s["rows"] == 5

    # a gauge: padded with its last value, no totals; a cumulative gauge reports its final values
    g = score_series(np.array([1, 2, 3.]), np.array([1, 2.]), np.ones(3, bool), "running")
    assert g["mae"] == pytest.approx(1 / 3) and g["nmae"] == pytest.approx((1 / 3) / 2)
    assert g["total_real"] is None and (g["last_tick_real"], g["last_tick_sim"]) == (3, 3)
    c = score_series(np.array([0, 10, 25.]), np.array([0, 12, 20, 21.]), np.ones(4, bool), "prefix_hit_pct",
                     cumulative=True)
    assert (c["final_real"], c["final_sim"]) == (25.0, 21.0)
    assert c["last_tick_real"] is None
    # constant side: no correlation; no busy row: no MAE
    assert score_series(np.ones(3), np.arange(3.), np.ones(3, bool), "running")["corr"] is None
    z = score_series(np.zeros(3), np.ones(3), np.zeros(3, bool), "gen_throughput")
    assert z["mae"] is None and z["nmae"] is None


def test_best_lag_by_hand():
    # the measured spikes sit one row before the simulated ones (the power case's pulses 2/3)
    real = np.array([0, 100, 0, 0, 50, 0.])
    sim = np.array([0, 0, 100, 0, 0, 50.])
    busy = real > 0
    assert lagged_nmae(real, sim, busy, +1) == pytest.approx(0.0)
    assert lagged_nmae(real, sim, busy, 0) == pytest.approx((100 + 50) / 2 / 75)
    assert lagged_nmae(real, sim, busy, -1) == pytest.approx(1.0)  # sim rows 1, 4 are 0
    s = score_series(real, sim, busy, "prompt_throughput", lags=(-1, 0, 1))
    assert s["best_lag"] == 1 and s["best_lag_nmae"] == pytest.approx(0.0)
    assert s["nmae"] == pytest.approx(1.0)  # the lag-0 score is still the nMAE
    assert s["lag_nmae"] == {"-1": pytest.approx(1.0), "0": pytest.approx(1.0), "1": pytest.approx(0.0)}
    # ties go to the lag nearest 0
    assert score_series(real, real, busy, "prompt_throughput", lags=(-1, 0, 1))["best_lag"] == 0


def test_compare_timeseries_columns():
    real = {"t": np.arange(1., 4), "prompt_throughput": np.array([0, 8, 0.]), "gen_throughput": np.array([0, 1, 2.]),
            "kv_cache_pct": np.array([0, 5, 9.]), "prefix_hit_pct": np.array([0, 0, 10.]),
            "gpu_power_w": np.array([30, 200, 250.]), "cpu_pool_gib": np.array([0, 0.1, 0.2])}
    sim = {"t": np.arange(1., 4), "prompt_throughput": np.array([8, 0, 0.]), "gen_throughput": np.array([0, 1, 2.]),
           "kv_cache_pct": np.array([0, 5, 1.]), "kv_cache_cached_pct": np.array([0, 5, 9.])}
    scores, missing, unrecorded = compare_timeseries(real, sim, counts_cached=True, pulse=True)
    assert set(scores) == {"prompt_throughput", "gen_throughput", "kv_cache_pct"}
    # the 0.13 gauge counts cached blocks: compared with pinned + cached, and its final value reported
    assert scores["kv_cache_pct"]["mae"] == 0 and scores["kv_cache_pct"]["final_sim"] == 9.0
    assert scores["prompt_throughput"]["best_lag"] == -1  # pulse trace: best lag of the prompt spikes
    assert "best_lag" not in scores["gen_throughput"]
    # measured but not simulated: listed with the reason, never dropped
    assert set(missing) == {"prefix_hit_pct", "gpu_power_w", "cpu_pool_gib"}
    assert "power" in missing["gpu_power_w"] and "no CPU KV tier" in missing["cpu_pool_gib"]
    assert unrecorded == {}
    s2, m2, _ = compare_timeseries(real, sim, counts_cached=False)
    assert s2["kv_cache_pct"]["mae"] == pytest.approx((0 + 8) / 2)  # pinned only; busy rows 2, 3
    assert "best_lag" not in s2["prompt_throughput"]
    u = compare_timeseries({"t": np.arange(1., 3), "gen_throughput": np.array([1, 0.]),
                            "kv_cache_pct": np.zeros(2)}, sim)[2]
    assert u == {"kv_cache_pct": "0 in every row: not recorded by this run"}


def hand_requests():
    ms = 1_000_000
    return {
        "arrival_ns": np.array([0, 1000, 2000]) * ms, "first_token_ns": np.array([100, 1200, 2050]) * ms,
        "end_ns": np.array([400, 1200, 2650]) * ms, "input": np.array([10, 20, 30]), "output": np.array([4, 1, 3]),
        "itl_ns": [np.array([100, 100, 100]) * ms, np.zeros(0, np.int64), np.array([200, 400]) * ms],
    }


def test_bench_summary_by_hand():
    keys = ["completed_requests", "duration_s", "output_throughput_tok_s", "total_token_throughput_tok_s",
            "request_throughput_req_s", "input_tokens_total", "output_tokens_total", "ttft_mean_ms", "ttft_median_ms",
            "tpot_mean_ms", "tpot_median_ms", "tpot_p99_ms", "itl_mean_ms", "itl_median_ms", "itl_p99_ms",
            "itl_std_ms", "e2el_mean_ms"]
    s = bench_summary(hand_requests(), keys)
    assert s["completed_requests"] == 3 and s["duration_s"] == pytest.approx(2.65)  # last completion - first sent
    assert s["output_throughput_tok_s"] == pytest.approx(8 / 2.65)
    assert s["total_token_throughput_tok_s"] == pytest.approx(68 / 2.65)
    assert s["request_throughput_req_s"] == pytest.approx(3 / 2.65)
    assert (s["input_tokens_total"], s["output_tokens_total"]) == (60, 8)
    assert s["ttft_mean_ms"] == pytest.approx((100 + 200 + 50) / 3) and s["ttft_median_ms"] == pytest.approx(100)
    # TPOT per request (E2E - TTFT) / (output - 1), outputs > 1 only: 300/3 = 100 and 600/2 = 300
    assert s["tpot_mean_ms"] == pytest.approx(200) and s["tpot_median_ms"] == pytest.approx(200)
    assert s["tpot_p99_ms"] == pytest.approx(100 + 0.99 * 200)
    # ITL over all gaps [100, 100, 100, 200, 400]
    assert s["itl_mean_ms"] == pytest.approx(180) and s["itl_median_ms"] == pytest.approx(100)
    assert s["itl_p99_ms"] == pytest.approx(200 + 0.96 * 200)
    assert s["itl_std_ms"] == pytest.approx(np.sqrt((3 * 80 ** 2 + 20 ** 2 + 220 ** 2) / 5))
    assert s["e2el_mean_ms"] == pytest.approx((400 + 200 + 650) / 3)
    with pytest.raises(KeyError):
        bench_summary(hand_requests(), ["ttft_mode_ms"])


def test_summary_diff_pct():
    case = load(PULSE_SD)
    case.real_summary = {"completed_requests": 3.0, "ttft_mean_ms": 140.0, "tpot_mean_ms": 250.0,
                         "output_throughput_tok_s": 4.0}
    res = compare(case, hand_requests())
    assert set(res) == {"summary"}  # no series given: only the summary is scored
    assert res["summary"]["completed_requests"]["diff_pct"] == pytest.approx(0.0)
    assert res["summary"]["ttft_mean_ms"]["diff_pct"] == pytest.approx((350 / 3 - 140) / 140 * 100)
    assert res["summary"]["tpot_mean_ms"] == {"real": 250.0, "sim": pytest.approx(200), "diff_pct": pytest.approx(-20)}
    assert res["summary"]["output_throughput_tok_s"]["diff_pct"] == pytest.approx((8 / 2.65 - 4) / 4 * 100)


# ---------------------------------------------------------------------------------------------
# per-instance simulated series (metrics.time_series)
# ---------------------------------------------------------------------------------------------


def two_instance_result():
    s = 1_000_000_000
    return types.SimpleNamespace(
        arrival_ns=np.array([300_000_000, 600_000_000]), num_blocks=20, iter_instance=np.array([0, 1, 0, 1]),
        first_token_ns=np.array([0.5, 0.7]) * s, input_toks=np.array([10, 20]), instance=np.array([0, 1]),
        iter_end_ns=np.array([0.5, 0.7, 1.5, 2.2]) * s, iter_prompt_tokens=np.array([10, 20, 0, 0]),
        iter_gen_tokens=np.array([1, 2, 3, 4]), iter_running=np.array([1, 2, 1, 0]), iter_waiting=np.array([0, 1, 0, 0]),
        iter_kv_blocks_used=np.array([4, 6, 5, 0]), iter_prefix_queried=np.array([10, 20, 10, 20]),
        iter_prefix_hits=np.array([0, 5, 5, 5]), iter_kv_blocks_cached=np.array([0, 0, 2, 6]))


def test_time_series_per_instance_and_new_columns():
    r = two_instance_result()
    c = metrics.time_series(r, origin_ns=0)  # trace time: bins [0,1), [1,2), [2,3)
    np.testing.assert_array_equal(c["prompt_throughput"], [30, 0, 0])
    np.testing.assert_array_equal(c["gen_throughput"], [3, 3, 4])
    np.testing.assert_array_equal(c["running"], [3, 3, 1])  # each instance's latest, summed
    np.testing.assert_allclose(c["kv_cache_pct"], [50, 55, 25])
    np.testing.assert_allclose(c["prefix_hit_pct"], [100 * 5 / 30, 100 * 10 / 30, 100 * 10 / 30])
    np.testing.assert_allclose(c["kv_cache_cached_pct"], [50, 65, 65])
    i0 = metrics.time_series(r, origin_ns=0, instance=0)  # num_blocks: an even share, 10
    np.testing.assert_array_equal(i0["gen_throughput"], [1, 3])
    np.testing.assert_allclose(i0["kv_cache_pct"], [40, 50])
    np.testing.assert_allclose(i0["prefix_hit_pct"], [0, 50])
    np.testing.assert_allclose(i0["kv_cache_cached_pct"], [40, 70])
    i1 = metrics.time_series(r, origin_ns=0, instance=1, num_blocks=12)
    np.testing.assert_array_equal(i1["prompt_throughput"], [20, 0, 0])
    np.testing.assert_array_equal(i1["running"], [2, 2, 0]) and np.testing.assert_array_equal(i1["waiting"], [1, 1, 0])
    np.testing.assert_allclose(i1["kv_cache_pct"], [50, 50, 0])
    np.testing.assert_allclose(i1["prefix_hit_pct"], [25, 25, 25])
    # default origin: the first arrival (0.3 s)
    assert metrics.time_series(r)["t"].tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="instance 2"):
        metrics.time_series(r, instance=2)
    # a result without the new arrays has no new columns
    for k in ("iter_prefix_queried", "iter_prefix_hits", "iter_kv_blocks_cached"):
        delattr(r, k)
    assert set(metrics.time_series(r)) == set(metrics.TIMESERIES_COLUMNS) | {"prompt_computed_throughput"}


# ---------------------------------------------------------------------------------------------
# every shipped case: loading and engine settings (no simulation)
# ---------------------------------------------------------------------------------------------

SETTINGS_KEYS = {"vllm_version", "enforce_eager", "async_scheduling", "block_size", "enable_prefix_caching",
                 "enable_chunked_prefill", "long_prefill_token_threshold", "scheduler_reserve_full_isl", "max_num_seqs",
                 "max_num_batched_tokens", "max_model_len", "gpu_memory_utilization", "num_gpu_blocks", "dtype",
                 "kv_cache_dtype", "tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size", "pd",
                 "routing", "kv_connector", "kv_cache_pct_counts_cached", "kv_tier"}


def test_all_eight_cases_are_shipped():
    assert len(SHIPPED) == 8, SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_case_loads(name):
    case = load(name)
    s, assumed = engine_settings(case)
    assert set(s) == SETTINGS_KEYS
    assert isinstance(s["enforce_eager"], bool) and isinstance(s["async_scheduling"], bool)
    assert s["vllm_version"] is None or isinstance(s["vllm_version"], str)
    for a in assumed:  # "knob=value: why"
        knob, _, why = a.partition(": ")
        assert "=" in knob and why, a
    # the measurement is there, and every per-instance file belongs to an instance
    assert case.real is not None or case.real_timeseries is not None or case.real_summary is not None
    specs, rt, _ = validation.case_to_cluster(case, PROFILES)
    assert set(case.real_timeseries_instances) <= set(range(len(specs)))
    for sp in specs:  # every instance's hardware has profiles here (A6000: the legacy ones)
        assert (PROFILES / sp.hw.name).is_dir(), sp.hw.name
        assert sp.sched.async_scheduling == s["async_scheduling"]
    assert rt.max_model_len == s["max_model_len"]


def _assumed_knobs(assumed):
    return {a.split("=", 1)[0] for a in assumed}


def test_settings_of_the_bench_cases():
    s, a = engine_settings(load("RTXPRO6000-Llama-3.1-8B"))
    assert (s["vllm_version"], s["enforce_eager"], s["async_scheduling"]) == ("0.19.0", False, True)
    assert {"enforce_eager", "async_scheduling", "num_gpu_blocks", "block_size"} <= _assumed_knobs(a)
    assert "max_num_seqs" not in _assumed_knobs(a) and s["max_num_seqs"] == 128
    # RTX 4090: resolved_config records eager mode, async scheduling and the KV size
    s, a = engine_settings(load("RTX4090-Llama-3.1-8B"))
    assert (s["enforce_eager"], s["async_scheduling"], s["num_gpu_blocks"], s["max_num_seqs"]) == (False, True, 2588, 256)
    assert not {"enforce_eager", "async_scheduling", "num_gpu_blocks", "block_size"} & _assumed_knobs(a)


def test_settings_of_the_fig5_cases():
    for name in (FIG5, "A6000-Llama-3.1-8B-MD", "A6000-Llama-3.1-8B-PDD"):
        s, a = engine_settings(load(name))
        assert s["vllm_version"] is None
        assert (s["enforce_eager"], s["async_scheduling"], s["block_size"]) == (True, False, 16)
        assert (s["max_num_batched_tokens"], s["max_num_seqs"], s["num_gpu_blocks"]) == (2048, 256, None)
        knobs = _assumed_knobs(a)
        assert {"vllm_version", "enforce_eager", "async_scheduling", "block_size", "max_num_batched_tokens",
                "max_num_seqs", "num_gpu_blocks", "enable_prefix_caching"} <= knobs
        assert any("meta.json notes" in x for x in a if x.startswith("enforce_eager="))
        assert any("< 70 GiB" in x for x in a if x.startswith("max_num_seqs="))
    md = load("A6000-Llama-3.1-8B-MD")
    assert md.settings["routing"] == "round_robin" and "routing" in _assumed_knobs(md.assumed)
    assert validation.case_router(md).policy == "round_robin"
    pdd = load("A6000-Llama-3.1-8B-PDD")
    specs, _, links = validation.case_to_cluster(pdd, PROFILES)
    assert [sp.role for sp in specs] == ["prefill", "decode"] and pdd.settings["pd"]
    assert links.intra_node_bw_gbps == 112 and "kv_connector" in _assumed_knobs(pdd.assumed)
    assert [sp.hw.name for sp in specs] == ["legacy/A6000"] * 2


def test_settings_of_the_pulse_and_power_cases():
    sd = load(PULSE_SD)
    s, a = engine_settings(sd)
    assert s["vllm_version"].startswith("0.13.0") and s["enforce_eager"] and not s["async_scheduling"]
    assert s["kv_cache_pct_counts_cached"] and s["num_gpu_blocks"] == 13844 and s["max_model_len"] == 2048
    assert "async_scheduling" in _assumed_knobs(a) and "enforce_eager" not in _assumed_knobs(a)
    assert sd.pulse and sd.real is None and len(sd.real_summary) == 16
    assert sd.real_summary["ttft_mean_ms"] == 110.44
    md = load(PULSE_MD)
    assert md.settings["routing"] == "round_robin" and "routing" not in _assumed_knobs(md.assumed)  # recorded
    assert sorted(md.real_timeseries_instances) == [0, 1]
    assert "cpu_pool_gib" in md.real_timeseries and "cpu_pool_gib" not in md.real_timeseries_instances[0]
    assert any(x.startswith("kv_connector='LMCacheConnectorV1'") and "CPU KV tier" in x for x in md.assumed)
    assert md.settings["kv_tier"] == {"storage": "cpu", "enable_prefix_sharing": True} and sd.settings["kv_tier"] is None
    pw = load("A6000-Llama-3.1-8B-power-TP1")
    s, a = engine_settings(pw)
    assert (s["vllm_version"], s["enable_prefix_caching"], s["num_gpu_blocks"]) == ("0.11.1", False, 13545)
    assert not s["kv_cache_pct_counts_cached"] and pw.pulse and pw.workload.num_requests == 30
    assert pw.model.name == "meta-llama/Llama-3.1-8B"  # sim_model
    assert {"max_num_seqs", "gpu_memory_utilization", "model"} <= _assumed_knobs(a)  # vLLM defaults per the case


def test_non_pulse_traces():
    assert not load(FIG5).pulse and not load("RTXPRO6000-Llama-3.1-8B").pulse


# ---------------------------------------------------------------------------------------------
# the report (no simulation: the measurement stands in for the simulation)
# ---------------------------------------------------------------------------------------------


def test_report_from_measured_series(tmp_path):
    md = load(PULSE_MD)
    sim = {k: v.copy() for k, v in md.real_timeseries.items()}
    sim["gen_throughput"] = sim["gen_throughput"] * 1.1
    sim["kv_cache_cached_pct"] = sim.pop("kv_cache_pct")
    inst = {k: dict(v) for k, v in md.real_timeseries_instances.items()}
    comparison = {"case": md.name, **compare(md, None, sim, inst), "assumed": md.assumed, "settings": md.settings}
    assert comparison["timeseries"]["gen_throughput"]["nmae"] == pytest.approx(0.1)
    assert set(comparison["timeseries_instances"]) == {"0", "1"}
    assert "instance 0: kv_cache_pct" in comparison["not_simulated"]  # the instances' sim has no cached series
    assert "cpu_pool_gib" in comparison["timeseries"] and "gpu_power_w" not in comparison["not_simulated"]
    ev = types.SimpleNamespace(case=md, comparison=comparison, table=None, series=sim, instance_series=inst, wall_s=0.0)
    path = validation_report.write_report([ev], {"X": "JaxsimInputError: broken"}, tmp_path, command="cmd")
    text = path.read_text()
    assert "## Overview" in text and "## Every statistic" in text and "X: JaxsimInputError" in text
    assert "gen_throughput nMAE" in text and "inst1 gen_throughput nMAE" in text
    for f in (f"{md.name}.timeseries.png", f"{md.name}.inst0.timeseries.png", f"{md.name}.inst1.timeseries.png",
              f"{md.name}.sim_timeseries.csv"):
        assert (tmp_path / f).stat().st_size > 0, f
        assert f in text or f.endswith(".csv")
    assert (tmp_path / f"{md.name}.timeseries.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------------------------
# malformed cases
# ---------------------------------------------------------------------------------------------


def _rewrite(path: Path, fn):
    lines = path.read_text().splitlines()
    path.write_text("\n".join(fn(lines)) + "\n")


@pytest.mark.parametrize("edit, message", [
    (lambda ls: [ls[0].replace("t,", "tick,")] + ls[1:], "unknown column 'tick'"),
    (lambda ls: [ls[0].replace("gen_throughput", "gen_thruput")] + ls[1:], "did you mean 'gen_throughput'"),
    (lambda ls: ["gen_throughput"] + [x.split(",")[1] for x in ls[1:]], "missing column 't'"),
    (lambda ls: ["t"] + [x.split(",")[0] for x in ls[1:]], "no measured column"),
    (lambda ls: ls[:3] + ["3,abc"] + ls[4:], "timeseries.csv:4: column 'gen_throughput' is not a number"),
    (lambda ls: ls[:3] + ls[4:], "timeseries.csv:4: t is 4, expected 3"),
    (lambda ls: ls[:2] + ["2,-5"] + ls[3:], "must be a finite number >= 0"),
    (lambda ls: ls[:1], "no data rows"),
    (lambda ls: [ls[0] + ",gen_throughput"] + [x + ",1" for x in ls[1:]], "appears twice"),
])
def test_bad_timeseries(tmp_path, edit, message):
    d = copy_case(tmp_path)
    _rewrite(d / "vllm" / "timeseries.csv", edit)
    with pytest.raises(JaxsimInputError, match=message):
        load_case(d, MODELS, WORKLOADS)


def test_bad_instance_files(tmp_path):
    d = copy_case(tmp_path, "A6000-Llama-3.1-8B-MD")
    shutil.copy(d / "vllm" / "timeseries.csv", d / "vllm" / "timeseries.inst2.csv")
    with pytest.raises(JaxsimInputError, match="instance 2, but config.json has 2 instance"):
        load_case(d, MODELS, WORKLOADS)
    (d / "vllm" / "timeseries.inst2.csv").rename(d / "vllm" / "timeseries.gpu0.csv")
    with pytest.raises(JaxsimInputError, match="timeseries.gpu0.csv: unexpected file name"):
        load_case(d, MODELS, WORKLOADS)
    (d / "vllm" / "timeseries.gpu0.csv").rename(d / "vllm" / "timeseries.inst1.csv")
    assert list(load_case(d, MODELS, WORKLOADS).real_timeseries_instances) == [1]
    (d / "vllm" / "timeseries.csv").unlink()
    with pytest.raises(JaxsimInputError, match="per-instance series need the cluster's timeseries.csv"):
        load_case(d, MODELS, WORKLOADS)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(ttft_mean=1.0), r"summary.json: ttft_mean: unknown summary key \(did you mean 'ttft_mean_ms'"),
    (lambda s: s.update(itl_p99_ms="fast"), "itl_p99_ms: must be a finite number"),
    (lambda s: s.clear(), "empty summary"),
])
def test_bad_summary(tmp_path, edit, message):
    d = copy_case(tmp_path, PULSE_SD)
    edit_json(d / "vllm" / "summary.json", edit)
    with pytest.raises(JaxsimInputError, match=message):
        load_case(d, MODELS, WORKLOADS)
    assert load_case(CASES / PULSE_SD, MODELS, WORKLOADS).real_summary["itl_p99_ms"] == 98.28


def test_bad_meta(tmp_path):
    d = copy_case(tmp_path, "A6000-Llama-3.1-8B-MD")
    edit_json(d / "vllm" / "meta.json", lambda m: m.update(routng="round robin"))
    with pytest.raises(JaxsimInputError, match=r"meta.json: routng: unknown meta.json key \(did you mean 'routing'"):
        load_case(d, MODELS, WORKLOADS)
    edit_json(d / "vllm" / "meta.json", lambda m: (m.pop("routng"), m.update(routing="by the moon")))
    with pytest.raises(JaxsimInputError, match="routing: cannot tell the policy"):
        load_case(d, MODELS, WORKLOADS)
    edit_json(d / "vllm" / "meta.json", lambda m: m.update(routing="least loaded (vLLM DP)", num_instances=3))
    with pytest.raises(JaxsimInputError, match="num_instances: is 3"):
        load_case(d, MODELS, WORKLOADS)
    edit_json(d / "vllm" / "meta.json", lambda m: m.update(num_instances=2))
    assert load_case(d, MODELS, WORKLOADS).settings["routing"] == "least_loaded"


def test_no_measurement(tmp_path):
    d = copy_case(tmp_path)
    (d / "vllm" / "timeseries.csv").unlink()
    with pytest.raises(JaxsimInputError, match="no measurement: none of requests.jsonl, timeseries.csv, summary.json"):
        load_case(d, MODELS, WORKLOADS)


# ---------------------------------------------------------------------------------------------
# end to end (compiles simulations: slow)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_validate_all_end_to_end(tmp_path):
    """scripts/validate.py --all on the power (30 requests, pulses) and pulse-MD (two instances,
    per-instance series) cases: the JSON sections and the report."""
    import validate

    cases = tmp_path / "cases"
    for name in ("A6000-Llama-3.1-8B-power-TP1", PULSE_MD):
        shutil.copytree(CASES / name, cases / name)
    out = tmp_path / "report"
    assert validate.main(["--all", str(cases), "--out", str(out), "--no-compile-cache"]) == 0
    power = json.loads((out / "A6000-Llama-3.1-8B-power-TP1.json").read_text())
    assert {"case", "timeseries", "assumed", "settings", "not_simulated"} <= set(power)
    assert "stats" not in power and "summary" not in power
    assert set(power["not_simulated"]) == {"gpu_power_w", "server_power_w"}
    gen = power["timeseries"]["gen_throughput"]
    assert abs(gen["total_sim"] - gen["total_real"]) / gen["total_real"] < 0.01  # the trace's output tokens
    assert power["timeseries"]["prompt_throughput"]["best_lag"] in (-1, 0, 1)
    md = json.loads((out / f"{PULSE_MD}.json").read_text())
    assert set(md["timeseries_instances"]) == {"0", "1"}
    assert {"cpu_prefix_hit_pct", "cpu_pool_gib"} <= set(md["not_simulated"])
    text = (out / "report.md").read_text()
    assert "## Overview" in text and (out / f"{PULSE_MD}.inst1.timeseries.png").is_file()
