"""Validation-case loading, spec conversion and scoring (no JAX)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from jaxsim.errors import JaxsimInputError
from jaxsim.validation import (
    case_to_cluster, case_to_spec, compare, format_comparison, load_case, measured_arrival_workload,
)

from _shared import CASE, MODELS, WORKLOADS

STATS = ("mean", "median", "p90", "p95", "p99")


@pytest.fixture(scope="module")
def case():
    return load_case(CASE, MODELS, WORKLOADS)


def real_table(case, scale=None):
    """A sim table whose values are the measured ones (optionally scaled per metric)."""
    scale = scale or {}
    r = case.real
    arrival = np.rint(r["arrival_s"] * 1e9).astype(np.int64)
    return {
        "request_id": r["request_id"].copy(),
        "ttft_ns": r["ttft_ms"] * 1e6 * scale.get("ttft", 1.0),
        "tpot_ns": r["tpot_ms"] * 1e6 * scale.get("tpot", 1.0),
        "e2e_ns": r["e2e_ms"] * 1e6 * scale.get("e2e", 1.0),
        "arrival_ns": arrival,
        "end_ns": np.rint(r["last_token_s"] * 1e9).astype(np.int64),
    }


def copy_case(tmp_path) -> Path:
    dst = tmp_path / "case"
    shutil.copytree(CASE, dst)
    return dst


def edit_json(path: Path, fn):
    obj = json.loads(path.read_text())
    fn(obj)
    path.write_text(json.dumps(obj))


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------


def test_load_shipped_case(case):
    assert case.name == "RTXPRO6000-Llama-3.1-8B"
    assert case.workload.num_requests == 300
    assert case.max_model_len == 131072
    assert case.num_gpu_blocks is None
    assert case.model.name == "meta-llama/Llama-3.1-8B"
    assert case.workload_path.name == "sharegpt-llama-3.1-8b-300-sps10.jsonl"
    np.testing.assert_array_equal(case.real["request_id"], np.arange(300))
    # bench-0 (REFERENCE.md §4.2): arrival is queued_ts (the clocks differ)
    assert case.real["arrival_s"][0] == pytest.approx(479748.340626232)
    assert case.real["ttft_ms"][0] == pytest.approx((479748.510151426 - 479748.340626232) * 1e3)
    assert case.real["tpot_ms"][0] == pytest.approx(
        (479764.054028055 - 479748.510151426) / 530 * 1e3)
    assert case.real_makespan_s == pytest.approx(65.9, abs=0.05)
    ts = case.real_timeseries
    assert ts["t"].shape == (67,)
    assert ts["prompt_throughput"].sum() == 257239 and ts["gen_throughput"].sum() == 195753
    assert ts["running"].max() == 128 and ts["waiting"].max() == 104


def test_real_stats_reproduce_summary_txt(case):
    # the vLLM column of validation/summary.txt is exactly reproducible (REFERENCE.md §4.6)
    expected = {}
    for line in (CASE / "validation" / "summary.txt").read_text().splitlines():
        parts = line.split()
        if len(parts) == 5 and parts[0] in ("TTFT", "TPOT", "Latency"):
            m = {"TTFT": "ttft", "TPOT": "tpot", "Latency": "e2e"}[parts[0]]
            expected[f"{m}_{parts[1].lower()}"] = float(parts[2])
    assert len(expected) == 15
    res = compare(case, real_table(case))
    for key, v in expected.items():
        assert round(res["stats"][key]["real"], 1) == v, key


def test_case_to_spec(case):
    hw, sched, model = case_to_spec(case)
    assert hw.name == "RTXPRO6000"
    assert (hw.mem_size_gb, hw.mem_util) == (96, 0.9)
    assert hw.tp == 1 and hw.num_gpu_blocks is None
    assert (hw.link_bw_gbps, hw.link_latency_ns) == (16, 20000)
    assert (hw.cpu_mem_bw_gbps, hw.cpu_mem_latency_ns) == (256, 0)
    assert sched.max_num_seqs == 128 and sched.max_num_batched_tokens == 2048
    assert sched.enable_chunked_prefill and sched.enable_prefix_caching and sched.reserve_full_isl
    assert sched.long_prefill_token_threshold == 0 and sched.block_size == 16
    assert model.name == "meta-llama/Llama-3.1-8B"
    assert model.dtype == "bfloat16" and model.kv_cache_dtype == "auto"
    assert model.max_model_len == 131072


def test_measured_arrivals(case):
    w = measured_arrival_workload(case)
    assert w.arrival_ns[0] == case.workload.arrival_ns[0]
    offsets = (w.arrival_ns - case.workload.arrival_ns) / 1e9
    assert np.all(np.abs(offsets) < 0.2)  # replay jitter is -0.02 ... +0.09 s


# ---------------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------------


def test_compare_identical_is_zero(case):
    res = compare(case, real_table(case), case.real_timeseries)
    assert set(res) == {"stats", "paired", "timeseries", "not_simulated", "not_recorded"}
    # kv_cache_pct is 0 in every row of this case: not recorded (REFERENCE.md §4.3), not scored
    assert res["not_recorded"] == {"kv_cache_pct": "0 in every row: not recorded by this run"}
    assert res["not_simulated"] == {}
    assert set(res["stats"]) == {f"{m}_{s}" for m in ("ttft", "tpot", "e2e") for s in STATS}
    for row in res["stats"].values():
        assert set(row) == {"real", "sim", "diff_pct"}
        assert row["diff_pct"] == pytest.approx(0, abs=1e-9)
    for m in ("ttft", "tpot", "e2e"):
        p = res["paired"][m]
        assert set(p) == {"mean_abs_pct", "median_abs_pct", "signed_mean_pct", "worst"}
        assert p["mean_abs_pct"] == pytest.approx(0, abs=1e-9)
        assert p["median_abs_pct"] == pytest.approx(0, abs=1e-9)
        assert len(p["worst"]) == 5
    assert res["paired"]["makespan_s"]["diff_pct"] == pytest.approx(0, abs=1e-6)
    assert set(res["timeseries"]) == {"prompt_throughput", "gen_throughput", "running", "waiting"}
    for v in res["timeseries"].values():
        assert v["mae"] == 0 and v["corr"] == pytest.approx(1.0)
    json.dumps(res, allow_nan=False)
    text = format_comparison(res)
    assert "TTFT Mean" in text and "Latency P99" in text and "+0.0%" in text


def test_compare_scaled(case):
    # every TTFT 10% high: each statistic is 10% high (percentiles scale linearly)
    res = compare(case, real_table(case, {"ttft": 1.1, "e2e": 0.95}))
    for s in STATS:
        assert res["stats"][f"ttft_{s}"]["diff_pct"] == pytest.approx(10.0)
        assert res["stats"][f"e2e_{s}"]["diff_pct"] == pytest.approx(-5.0)
        assert res["stats"][f"tpot_{s}"]["diff_pct"] == pytest.approx(0.0, abs=1e-9)
    assert res["paired"]["ttft"]["mean_abs_pct"] == pytest.approx(10.0)
    assert res["paired"]["ttft"]["signed_mean_pct"] == pytest.approx(10.0)
    assert res["paired"]["e2e"]["median_abs_pct"] == pytest.approx(5.0)
    assert res["paired"]["e2e"]["signed_mean_pct"] == pytest.approx(-5.0)
    assert "timeseries" not in res  # no simulated series given


def test_compare_one_request_perturbed(case):
    t = real_table(case)
    t["e2e_ns"] = t["e2e_ns"].copy()
    t["e2e_ns"][7] *= 1.5
    t["tpot_ns"] = t["tpot_ns"].copy()
    t["tpot_ns"][42] *= 0.8
    res = compare(case, t)
    e2e = case.real["e2e_ms"]
    assert res["stats"]["e2e_mean"]["diff_pct"] == pytest.approx(0.5 * e2e[7] / e2e.sum() * 100)
    p = res["paired"]["e2e"]
    assert p["worst"][0] == [7, pytest.approx(50.0)]
    assert p["mean_abs_pct"] == pytest.approx(50.0 / 300)
    assert p["signed_mean_pct"] == pytest.approx(50.0 / 300)
    assert p["median_abs_pct"] == pytest.approx(0.0, abs=1e-9)
    assert res["paired"]["tpot"]["worst"][0] == [42, pytest.approx(-20.0)]
    assert res["paired"]["tpot"]["signed_mean_pct"] == pytest.approx(-20.0 / 300)


def test_compare_makespan_and_timeseries(case):
    t = real_table(case)
    t["end_ns"] = t["end_ns"].copy()
    last = int(np.argmax(t["end_ns"]))
    t["end_ns"][last] += 2 * 10**9  # finishes 2 s later
    ts = {k: v.copy() for k, v in case.real_timeseries.items()}
    ts["running"] = ts["running"] + 1
    ts["waiting"] = ts["waiting"][:-10]  # shorter series: a gauge, padded with its last value
    res = compare(case, t, ts)
    mk = res["paired"]["makespan_s"]
    assert mk["sim"] == pytest.approx(mk["real"] + 2, abs=1e-6)
    assert mk["diff_pct"] == pytest.approx(2 / mk["real"] * 100, rel=1e-6)
    assert res["timeseries"]["running"]["mae"] == pytest.approx(1.0)
    assert res["timeseries"]["running"]["corr"] == pytest.approx(1.0)
    r = case.real_timeseries
    busy = (r["prompt_throughput"] > 0) | (r["gen_throughput"] > 0) | (r["running"] + r["waiting"] > 0)
    w = r["waiting"]
    padded = np.concatenate([w[:-10], np.full(10, w[-11])])
    assert res["timeseries"]["waiting"]["mae"] == pytest.approx(np.abs(padded - w)[busy].mean())
    assert res["timeseries"]["waiting"]["nmae"] == pytest.approx(np.abs(padded - w)[busy].mean() / w[busy].mean())


def test_compare_needs_table_columns(case):
    with pytest.raises(JaxsimInputError, match="missing column 'ttft_ns'"):
        compare(case, {"request_id": np.arange(3)})


# ---------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------


def _instance(c):
    return c["nodes"][0]["instances"][0]


@pytest.mark.parametrize("edit, jpath", [
    (lambda c: _instance(c)["npu_mem"].update(mem_bw="fast"),
     "nodes[0].instances[0].npu_mem.mem_bw"),
    (lambda c: _instance(c)["npu_mem"].pop("mem_size"), "nodes[0].instances[0].npu_mem.mem_size"),
    (lambda c: _instance(c)["npu_mem"].update(mem_latency=-1),
     "nodes[0].instances[0].npu_mem.mem_latency"),
    (lambda c: _instance(c)["npu_mem"].update(mem_util=1.5),
     "nodes[0].instances[0].npu_mem.mem_util"),
    (lambda c: _instance(c).pop("npu_mem"), "nodes[0].instances[0].npu_mem"),
    (lambda c: _instance(c).pop("model_name"), "nodes[0].instances[0].model_name"),
    (lambda c: _instance(c).pop("hardware"), "nodes[0].instances[0].hardware"),
    (lambda c: _instance(c).update(pd_type="both"), "nodes[0].instances[0].pd_type"),
    (lambda c: _instance(c).update(num_npus=2), "nodes[0].instances[0].num_npus"),
    (lambda c: _instance(c).update(model_name="Qwen/Qwen3-32B"),
     "nodes[0].instances[0].model_name"),
    (lambda c: c.update(num_nodes=2), "num_nodes"),
    (lambda c: c["nodes"][0].update(num_instances=3), "nodes[0].num_instances"),
    (lambda c: c.pop("link_bw"), "link_bw"),
    (lambda c: c.update(link_latency=[500, "x"]), "link_latency[1]"),
    (lambda c: c["nodes"][0]["cpu_mem"].pop("mem_bw"), "nodes[0].cpu_mem.mem_bw"),
    # a misspelt key is an error (it was ignored: the case ran with the baseline's value)
    (lambda c: _instance(c).update(tp_szie=_instance(c).pop("tp_size", 1)), "nodes[0].instances[0].tp_szie"),
    (lambda c: _instance(c)["npu_mem"].update(mem_utl=0.9), "nodes[0].instances[0].npu_mem.mem_utl"),
])
def test_bad_config_json_names_json_path(tmp_path, edit, jpath):
    d = copy_case(tmp_path)
    edit_json(d / "config.json", edit)
    with pytest.raises(JaxsimInputError) as e:
        load_case(d, MODELS, WORKLOADS)
    assert str(e.value).startswith(f"{d / 'config.json'}: {jpath}:"), str(e.value)


def test_invalid_json_names_line(tmp_path):
    d = copy_case(tmp_path)
    (d / "config.json").write_text('{\n  "num_nodes": 1,\n  oops\n}')
    with pytest.raises(JaxsimInputError, match=r"config.json:3: invalid JSON"):
        load_case(d, MODELS, WORKLOADS)


@pytest.mark.parametrize("edit, jpath", [
    (lambda m: m.pop("engine_kwargs"), "engine_kwargs"),
    (lambda m: m["engine_kwargs"].update(max_num_seqs="many"), "engine_kwargs.max_num_seqs"),
    (lambda m: m.update(vllm_verison="0.19.0"), "vllm_verison"),
    (lambda m: m.update(vllm_version="latest"), "vllm_version"),
    (lambda m: m.update(kv_cache={"num_gpu_blok": 10}), "kv_cache.num_gpu_blok"),
    (lambda m: m.update(dataset_hash="0" * 64), "dataset_hash"),
    (lambda m: m.update(schema_version=7), "schema_version"),
    (lambda m: m["engine_kwargs"].update(max_num_batched_tokens=-1),
     "engine_kwargs.max_num_batched_tokens"),
    (lambda m: m["engine_kwargs"].update(dtype="float7"), "engine_kwargs.dtype"),
    (lambda m: m["engine_kwargs"].update(max_model_len=1000), "engine_kwargs.max_model_len"),
    (lambda m: m.update(dataset_path="workloads/nope.jsonl"), "dataset_path"),
    (lambda m: m.update(kv_cache={"num_gpu_blocks": 0}), "kv_cache.num_gpu_blocks"),
])
def test_bad_meta_json(tmp_path, edit, jpath):
    d = copy_case(tmp_path)
    edit_json(d / "vllm" / "meta.json", edit)
    with pytest.raises(JaxsimInputError) as e:
        load_case(d, MODELS, WORKLOADS)
    assert jpath in str(e.value) and "meta.json" in str(e.value), str(e.value)


def test_meta_overrides(tmp_path):
    d = copy_case(tmp_path)

    def edit(m):
        m["kv_cache"] = {"num_gpu_blocks": 30000}
        m["num_requests"] = 50
        m["engine_kwargs"].update(max_model_len=8192, enable_prefix_caching=False,
                                  gpu_memory_utilization=0.8)
    edit_json(d / "vllm" / "meta.json", edit)
    c = load_case(d, MODELS, WORKLOADS)
    assert c.workload.num_requests == 50 and c.real["ttft_ms"].shape == (50,)
    hw, sched, model = case_to_spec(c)
    assert hw.num_gpu_blocks == 30000 and hw.mem_util == 0.8
    assert not sched.enable_prefix_caching and model.max_model_len == 8192


def test_requests_jsonl_mismatch(tmp_path):
    d = copy_case(tmp_path)
    lines = (d / "vllm" / "requests.jsonl").read_text().splitlines()
    obj = json.loads(lines[4])
    obj["input_toks"] += 1
    lines[4] = json.dumps(obj)
    (d / "vllm" / "requests.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(JaxsimInputError, match=r"requests.jsonl:5: input_toks"):
        load_case(d, MODELS, WORKLOADS)
    (d / "vllm" / "requests.jsonl").write_text("\n".join(lines[:3] + lines[5:]) + "\n")
    with pytest.raises(JaxsimInputError, match="no measurement for bench-3"):
        load_case(d, MODELS, WORKLOADS)


def test_dp_ep_tp_cases_map_to_clusters(tmp_path):
    """Cases laid out like the development case with tensor_parallel_size, data_parallel_size
    and enable_expert_parallel (the DP/EP/TP validation runs of the cluster issue)."""
    d = copy_case(tmp_path / "dp")
    edit_json(d / "vllm" / "meta.json", lambda m: m["engine_kwargs"].update(data_parallel_size=2))
    specs, rt, links = case_to_cluster(load_case(d, MODELS, WORKLOADS))
    assert [(s.dp_group, s.hw.tp, s.hw.ep, s.role) for s in specs] == [("dp", 1, 0, "colocated")] * 2
    with pytest.raises(JaxsimInputError, match="2 instances"):
        case_to_spec(load_case(d, MODELS, WORKLOADS))

    # MoE, TP 2 x DP 2 with expert parallelism: experts over tp * dp = 4 ranks
    e = copy_case(tmp_path / "ep")
    def qwen_meta(m):
        m["engine_kwargs"].update(data_parallel_size=2, tensor_parallel_size=2, enable_expert_parallel=True)
        for where in (m, m["engine_kwargs"]):
            if "model" in where:
                where["model"] = "Qwen/Qwen3-30B-A3B-Instruct-2507"
    edit_json(e / "vllm" / "meta.json", qwen_meta)

    def qwen_tp2(c):
        inst = c["nodes"][0]["instances"][0]
        inst.update(model_name="Qwen/Qwen3-30B-A3B-Instruct-2507", tp_size=2, num_npus=2)
    edit_json(e / "config.json", qwen_tp2)
    specs, _, _ = case_to_cluster(load_case(e, MODELS, WORKLOADS))
    assert [(s.dp_group, s.hw.tp, s.hw.ep) for s in specs] == [("dp", 2, 4)] * 2

    # several instances that are not one DP group of dp members
    f = copy_case(tmp_path / "bad")

    def two(c):
        node = c["nodes"][0]
        node["instances"].append(json.loads(json.dumps(node["instances"][0])))
        node["num_instances"] = 2
    edit_json(f / "config.json", two)
    edit_json(f / "vllm" / "meta.json", lambda m: m["engine_kwargs"].update(data_parallel_size=2))
    with pytest.raises(JaxsimInputError, match="data_parallel_size"):
        case_to_cluster(load_case(f, MODELS, WORKLOADS))


def test_an_engine_kwarg_typo_is_reported(tmp_path):
    """meta.json's engine_kwargs: a key jaxsim neither reads nor knows to be irrelevant is warned
    with the nearest known name (vLLM has hundreds of arguments, so not an error)."""
    d = copy_case(tmp_path)
    edit_json(d / "vllm" / "meta.json", lambda m: m["engine_kwargs"].update(max_num_seq=8))
    with pytest.warns(UserWarning, match=r"engine_kwargs.max_num_seq: not a vLLM engine argument jaxsim reads; ignored "
                                         r"\(did you mean 'max_num_seqs'"):
        load_case(d, MODELS, WORKLOADS)
