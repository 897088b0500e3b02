"""scripts/gpu_check.sh, the one-command GPU check, kept from rotting on a machine without a GPU:
its CPU mode at small sizes runs every stage end to end (a fresh venv that installs offline from
an empty wheel folder on top of this interpreter's packages, the device probe, the test subset,
the single-run, sweep and cluster-scaling benches) and prints one JSON, checked here key by key.
"""

import json
import os
import subprocess
import sys

import jax
import pytest
from _shared import ROOT

SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STAGES = ["setup", "probe", "tests", "single", "sweep", "scaling"]


def _run(*args, timeout=60):
    return subprocess.run(["bash", str(SCRIPT), "--python", sys.executable, *args], cwd=ROOT,
                          env=dict(os.environ), capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.slow  # ~3.5 min on 2 loaded cores: four processes that each compile the default case
def test_cpu_small_end_to_end(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()  # empty: every requirement must already be met by the inherited packages
    out_file = tmp_path / "out" / "gpu_check.json"
    proc = _run("--cpu", "--small", "--venv", str(tmp_path / "venv"), "--inherit-site", "--wheels", str(wheels),
                "--work", str(tmp_path / "work"), "--json", str(out_file), timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(proc.stdout)  # stdout is the JSON alone; progress goes to stderr
    assert json.loads(out_file.read_text()) == out
    assert out["ok"] is True and out["timed_out"] == []
    assert list(out["stages"]) == STAGES
    assert all(s["status"] == "ok" and s["rc"] == 0 and 0 < s["wall_s"] <= s["limit_s"]
               for s in out["stages"].values()), out["stages"]
    assert sum(s["wall_s"] for s in out["stages"].values()) <= out["total_wall_s"] <= out["mode"]["budget_s"]
    mode = out["mode"]
    assert (mode["cpu"], mode["small"], mode["inherit_site"], mode["jax_spec"]) == (True, True, True, "jax")
    assert (mode["sweep_configs"], mode["instances"]) == (4, [1, 2])
    # the venv's interpreter ran the stages, with this checkout's JAX
    assert out["jax"]["executable"].startswith(str(tmp_path / "venv"))
    assert out["jax"]["jax"] == jax.__version__
    assert out["jax"]["x64"] is True and out["jax"]["int64_exact_on_device"] is True
    assert out["device"]["platform"] == "cpu" and out["device"]["device_count"] >= 1
    tests = out["tests"]
    assert (tests["passed"], tests["failed"], tests["errors"]) == (len(tests["selected"]), 0, 0) == (2, 0, 0)

    single, sweep, scaling = out["single_run"], out["sweep"], out["scaling"]
    assert single["compile_s"] > 0 and 0 < single["wall_s"] <= max(single["wall_s_all"])
    assert single["realtime_factor"] == pytest.approx(single["sim_s"] / single["wall_s"], rel=0.01)
    assert (sweep["n_configs"], sweep["configs_ok"], sweep["chunk_size"]) == (4, 4, 4)
    assert sweep["aggregate_realtime_factor"] > 0 and sweep["peak_mem_gib"] > 0
    # invariant: a cluster of one instance behind the router is the single run (same iterations,
    # same simulated span); two instances share the trace, so it ends sooner
    one, two = scaling["strong"]["1"], scaling["strong"]["2"]
    assert one["iterations"] == single["iterations"]
    assert one["sim_s"] == pytest.approx(single["sim_s"], abs=0.01)
    assert two["sim_s"] < one["sim_s"]


def test_out_of_budget_stages_are_reported_not_run(tmp_path):
    """A budget with no time for any stage: each is listed (no_time, then not_run), the JSON is
    still printed, and the exit status says the check did not pass."""
    proc = _run("--cpu", "--small", "--budget", "10", "--work", str(tmp_path))
    assert proc.returncode == 1, proc.stderr
    out = json.loads(proc.stdout)
    assert out["ok"] is False
    assert {k: s["status"] for k, s in out["stages"].items()} == {
        "setup": "skipped", "probe": "no_time", "tests": "not_run", "single": "not_run", "sweep": "not_run",
        "scaling": "not_run"}
    assert out["tests"]["passed"] == 0 and out["single_run"] is None and out["device"] == {}


def test_without_cpu_a_machine_with_no_gpu_stops_after_the_probe(tmp_path):
    """GPU mode on a CPU-only JAX: the probe fails and names why; nothing runs at GPU sizes."""
    if jax.default_backend() != "cpu":
        pytest.skip("this machine's JAX sees an accelerator")
    proc = _run("--no-venv", "--work", str(tmp_path))
    assert proc.returncode == 1, proc.stderr
    out = json.loads(proc.stdout)
    assert {k: s["status"] for k, s in out["stages"].items()} == {
        "setup": "skipped", "probe": "failed", "tests": "not_run", "single": "not_run", "sweep": "not_run",
        "scaling": "not_run"}
    assert out["device"]["platform"] == "cpu" and out["jax"]["int64_exact_on_device"] is True
    assert "JAX sees no GPU (platform 'cpu')" in out["stages"]["probe"]["log_tail"][-1]
    assert out["mode"]["cpu"] is False and out["mode"]["sweep_configs"] == 10_000


@pytest.mark.parametrize("args, message", [
    (["--wheels", "/nonexistent/wheels"], "--wheels /nonexistent/wheels: no such folder"),
    (["--bogus"], "unknown option '--bogus'"),
])
def test_bad_options_exit_2(args, message):
    proc = _run(*args)
    assert proc.returncode == 2 and message in proc.stderr and proc.stdout == ""
