"""Batched sweeps (jaxsim.sweep): every configuration of a sweep equals its own single run, knobs
that change shapes share one compile, static knobs split groups, chunks pad without leaking, the
results table round-trips, and a sweep split over two (virtual) CPU devices gives the same rows.

Compile budget: one small trace (16 requests), power metered; the sweep compiles once per (group shape, chunk
size) and each distinct single-run shape compiles once.
"""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import jaxsim
from jaxsim import power, report, sweep
from jaxsim.engine import cluster
from jaxsim.errors import JaxsimInputError
from jaxsim.spec import HardwareConfig, SchedulerConfig

from _shared import PROFILES, ROOT, TESTS, load_model, load_trace, runtime_for

RTX4090 = HardwareConfig(name="RTX4090", mem_size_gb=24, link_latency_ns=1000,
                         cpu_mem_bw_gbps=50, num_gpu_blocks=900)


# Power metered on every point (one node block for both GPUs): each row's energy equals its single run's.
POWER = power.PowerConfig(default=power.node_power({"base_node_power": 100, "npu": {
    "RTXPRO6000": {"idle_power": 35, "standby_power": 150, "active_power": 600, "standby_duration": 5},
    "RTX4090": {"idle_power": 20, "standby_power": 100, "active_power": 450, "standby_duration": 5},
    "h100": {"idle_power": 60, "standby_power": 200, "active_power": 700, "standby_duration": 5},
    "mi300x": {"idle_power": 90, "standby_power": 250, "active_power": 750, "standby_duration": 5}}}))
# Hardware from the three other sources: a converted operator database (h100) and a spec sheet priced
# by the roofline model (spec/mi300x), whose peak FLOP/s and bandwidth are per-point knobs.
H100 = HardwareConfig(name="h100", mem_size_gb=80, link_bw_gbps=450, num_gpu_blocks=900)
MI300X = HardwareConfig(name="spec/mi300x", mem_size_gb=192, link_bw_gbps=448, num_gpu_blocks=900)


def _base(**kw):
    # max_model_len 4800: what the smallest cache of the points (300 blocks) holds; vLLM refuses a
    # cache smaller than one max_model_len request, and so does the sweep (test below).
    kw = {"runtime": runtime_for(300), "power": POWER, **kw}
    return sweep.SweepBase(load_trace(16), load_model(), hardware=HardwareConfig(num_gpu_blocks=900),
                           scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=1024),
                           profiles_dir=PROFILES, max_slots=24, slo_ttft_ms=400, slo_tpot_ms=30,
                           hardware_options={"pro6000": HardwareConfig(num_gpu_blocks=900), "rtx4090": RTX4090,
                                             "h100": H100, "mi300x": MI300X}, **kw)


BASE = _base()
# Knobs that change shapes (KV capacity, profile grids) next to purely numeric ones. 300 blocks
# leaves room for one long request at a time: preemptions happen.
POINTS = [
    {},
    {"num_gpu_blocks": 300},
    {"max_num_seqs": 3, "long_prefill_token_threshold": 256, "npu_active_power_w": 500.0},
    # a power cap below the active power slows compute: it composes with compute_scale
    {"arrival_rate_scale": 4.0, "compute_scale": 0.7, "memory_scale": 1.3, "power_cap_w": 400.0},
    {"hardware": "rtx4090", "max_num_batched_tokens": 512},
    {"enable_prefix_caching": False, "async_scheduling": False, "num_gpu_blocks": 300},
    {"hardware": "h100"},
    {"hardware": "mi300x"},
    {"hardware": "mi300x", "peak_tflops": 600.0, "mem_bw_gbs": 2650.0},
]


@pytest.fixture(scope="module")
def swept():
    before = cluster.run_batch._cache_size()
    result = sweep.sweep(BASE, POINTS, chunk_size=5, progress=False, keep_requests=True)  # 2 chunks, the last padded
    return result, cluster.run_batch._cache_size() - before


def _single(point):
    kw = sweep.point_inputs(BASE, point)
    return jaxsim.simulate(kw.pop("workload"), kw.pop("model"), kw.pop("hw"), kw.pop("sched"), **kw,
                           record_token_times=False, power=sweep._point_power(BASE, point))


# The points whose single run compiles a shape of its own (300 blocks, RTX 4090 grids) are in the
# slow set (the suite's 10-minute budget); the sweep itself always runs all six.
@pytest.mark.parametrize("i", [pytest.param(i, marks=pytest.mark.slow) if i in (1, 4, 5, 6, 7, 8) else i
                               for i in range(len(POINTS))])
def test_each_configuration_equals_its_single_run(swept, i):
    result, _ = swept
    single = _single(POINTS[i])
    got = result.requests[i]
    np.testing.assert_array_equal(got["first_token"], single.first_token_ns)
    np.testing.assert_array_equal(got["finish"], single.finish_ns)
    np.testing.assert_array_equal(got["first_scheduled"], single.first_scheduled_ns)
    np.testing.assert_array_equal(got["prefix_hit"], single.prefix_hit_tokens)
    np.testing.assert_array_equal(got["num_preemptions"], single.num_preemptions)
    row = result.rows[i]
    assert row["status"] == "ok" and row["finished"] == 16
    assert row["iterations"] == single.stats["iterations"]
    assert row["preemptions"] == single.stats["preemptions"]
    ttft_ms = (single.first_token_ns - single.arrival_ns) / 1e6
    assert row["ttft_mean_ms"] == pytest.approx(ttft_ms.mean(), rel=1e-12)
    assert row["ttft_p99_ms"] == pytest.approx(np.percentile(ttft_ms, 99), rel=1e-12)
    energy = power.energy(single.power, int(single.arrival_ns.min()), int(single.finish_ns.max()))
    assert row["energy_j"] == pytest.approx(energy["total_j"], rel=1e-12) and row["energy_j"] > 0
    assert row["j_per_output_token"] == pytest.approx(energy["total_j"] / single.output_toks.sum(), rel=1e-12)


def test_configurations_differ_and_knobs_act(swept):
    result, _ = swept
    rows = result.rows
    assert len({r["e2e_mean_ms"] for r in rows}) == len(rows)
    assert rows[1]["preemptions"] > rows[0]["preemptions"]  # less KV -> more preemption
    assert rows[3]["offered_rate_rps"] == pytest.approx(4 * rows[0]["offered_rate_rps"], rel=1e-3)
    assert all(0.0 <= r["slo_attainment"] <= 1.0 for r in rows)


def test_hardware_of_every_source_in_one_call(swept):
    result, _ = swept
    rows = result.rows
    assert [r["latency_model"] for r in rows[-4:]] == ["profiles", "operator-db", "roofline", "roofline"]
    # half the sheet's bandwidth and under half its FLOP/s: every decode iteration is slower
    assert rows[8]["tpot_mean_ms"] > 1.5 * rows[7]["tpot_mean_ms"]
    # an MI300X (5.3 TB/s) decodes faster than the RTX PRO 6000 (1.8 TB/s), an H100 (3.35 TB/s) too
    assert rows[7]["tpot_mean_ms"] < rows[6]["tpot_mean_ms"] < rows[0]["tpot_mean_ms"]


def test_one_compile_for_shape_changing_knobs(swept):
    result, compiles = swept
    assert result.num_groups == 1
    assert compiles == 1  # KV capacity, seats and another GPU's profile grid: padded, not recompiled


@pytest.mark.slow  # ~40 s of compiles (two more groups) for the 10-minute suite budget: `pytest -m slow`
def test_static_knob_splits_groups_and_still_matches():
    points = [{"block_size": 16}, {"block_size": 32}, {"block_size": 32, "max_num_seqs": 4}]
    result = sweep.sweep(BASE, points, chunk_size=4, progress=False, keep_requests=True)
    assert result.num_groups == 2
    # (each group is the same compiled sweep as the block-16 one the tests above check against
    # single runs; a single run of the block-32 group costs another compile, so it is not redone)
    assert result.rows[0]["e2e_mean_ms"] != result.rows[1]["e2e_mean_ms"]
    assert result.rows[1]["e2e_mean_ms"] != result.rows[2]["e2e_mean_ms"]  # the numeric knob acts in the group


def test_expand_grid_and_bad_knobs():
    pts = sweep.expand_grid({"max_num_seqs": [4, 8], "compute_scale": [1.0, 0.5, 0.25]})
    assert len(pts) == 6 and pts[0] == {"max_num_seqs": 4, "compute_scale": 1.0}
    assert pts[1] == {"max_num_seqs": 4, "compute_scale": 0.5}  # last knob fastest
    with pytest.raises(JaxsimInputError, match="max_num_seq.*unknown knob"):
        sweep.sweep(BASE, [{"max_num_seq": 4}], progress=False)
    with pytest.raises(JaxsimInputError, match="hardware.*unknown hardware 'a100'"):
        sweep.sweep(BASE, [{"hardware": "a100"}], progress=False)
    with pytest.raises(JaxsimInputError, match="hardware.peak_tflops.*only spec-sheet hardware"):
        sweep.sweep(BASE, [{"peak_tflops": 100.0}], progress=False)
    with pytest.raises(JaxsimInputError, match="seed knob needs a synthetic workload"):
        sweep.sweep(BASE, [{"seed": 1}], progress=False)
    with pytest.raises(JaxsimInputError, match="arrival_rate_scale.*> 0"):
        sweep.scale_arrivals(BASE.workload, 0.0)


def test_a_knob_value_vllm_refuses_names_the_point():
    """Host-side: the dataclass's own refusal (vLLM's reason) is prefixed with the point's knobs
    (it named only scheduler.block_size, not the sweep axis that set it)."""
    with pytest.raises(JaxsimInputError, match=r"^sweep point \(block_size=24\): scheduler\.block_size: 24 is not a block "
                                               r"size vLLM accepts"):
        sweep.sweep(BASE, [{}, {"block_size": 24}], progress=False)


def test_a_point_whose_cache_cannot_hold_max_model_len_is_refused():
    """Host-side (refused while planning, before any compile): a point whose memory model gives
    fewer than max_model_len tokens of KV is refused with vLLM's reason, naming the point (an
    explicit num_gpu_blocks is vLLM's override, applied after its check: not refused)."""
    # mem_util varies the memory model's capacity: an RTX 4090 at 0.9 holds 3,400 blocks (54,400 tokens)
    base = sweep.SweepBase(load_trace(16), load_model(), dataclasses.replace(RTX4090, num_gpu_blocks=None),
                           runtime=runtime_for(3401), profiles_dir=PROFILES)
    with pytest.raises(JaxsimInputError, match=r"sweep point 0 \(mem_util=0.9\): vLLM refuses this.*estimated maximum "
                                               r"model length is 54400"):
        sweep.sweep(base, [{"mem_util": 0.9}, {"mem_util": 0.95}], progress=False)


def test_results_table_round_trip(swept, tmp_path):
    result, _ = swept
    path = result.write(tmp_path / "sweep.csv")
    back = report.read_table(path)
    assert len(back) == len(POINTS)
    for row, got in zip(result.rows, back):
        assert got["config"] == row["config"] and got["status"] == "ok"
        assert got["ttft_p99_ms"] == row["ttft_p99_ms"] and got["preemptions"] == row["preemptions"]
    assert back[4]["hardware"] == "rtx4090" and back[1]["num_gpu_blocks"] == 300


_SHARDED = r"""
import json, sys
sys.path[:0] = [{root!r}, {tests!r}]  # jaxsim, and tests/_shared.py for tests.test_sweep
import jax
from tests.test_sweep import BASE, POINTS
from jaxsim import sweep
assert len(jax.local_devices()) == 2, jax.local_devices()
r = sweep.sweep(BASE, POINTS, chunk_size=4, progress=False)
print(json.dumps(r.rows))
"""


@pytest.mark.slow
def test_sharded_over_two_cpu_devices_gives_the_same_rows(swept):
    result, _ = swept
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _SHARDED.format(root=str(ROOT), tests=str(TESTS))], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert rows == json.loads(json.dumps(result.rows))
