"""The ``sweep`` config group and scripts/sweep.py: composition, validation, one in-process sweep
and one real Hydra multirun.

Kept fast for a 2-core CI machine: JAX compiles once per distinct shape (~15-25 s here), so every
in-process run uses the same shape (12 requests, knobs max_num_seqs x enable_prefix_caching)
and shares one compile; the subprocess multirun pays its own.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from jaxsim import config as jconfig
from jaxsim import report
from jaxsim.errors import JaxsimInputError

from _shared import CONF, ROOT, SCRIPTS

SCRIPT = SCRIPTS / "sweep.py"
OPTIONS = sorted(p.stem for p in (CONF / "sweep").glob("*.yaml"))
FAST = ["workload.num_requests=12", "sweep.progress=false", "sweep.plots=false"]
# The one in-process shape: 2 x 2 points, knobs that leave the static sizes alone.
AXES = ["++sweep.axes.max_num_seqs=[4,8]", "++sweep.axes.enable_prefix_caching=[true,false]"]


def make(overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def options(overrides=()):
    return jconfig.sweep_options(jconfig.to_container(make(overrides))["sweep"])


def _load_script():
    spec = importlib.util.spec_from_file_location("jaxsim_sweep_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def script():
    return _load_script()


def test_knob_checks_cover_every_knob():
    """Every knob is checked: as the spec field it is (HardwareConfig, SchedulerConfig), or by a
    rule of config._OTHER_KNOBS (which lists knobs only)."""
    import dataclasses

    from jaxsim.sweep import KNOBS

    fields = {f.name for cls in jconfig._KNOB_SPECS for f in dataclasses.fields(cls)}
    assert set(jconfig._OTHER_KNOBS) <= set(KNOBS)
    assert set(KNOBS) <= set(jconfig._OTHER_KNOBS) | fields


def test_options_compose_and_expand():
    assert OPTIONS == ["capacity", "hardware", "hardware_sources", "load", "none", "roofline_part", "seeds", "whatif"]
    none = options()
    assert none.axes == {} and none.points() == [{}] and none.slo is None
    assert (none.chunk_size, none.progress, none.plots, none.table) == (128, True, True, "sweep.csv")
    load = options(["sweep=load"])
    assert list(load.axes) == ["arrival_rate_scale", "max_num_seqs"]
    points = load.points()
    assert len(points) == 24
    assert points[0] == {"arrival_rate_scale": 0.25, "max_num_seqs": 32}
    assert points[1] == {"arrival_rate_scale": 0.25, "max_num_seqs": 64}  # last knob fastest
    assert load.slo == {"ttft_ms": 1000.0, "tpot_ms": 50.0}
    sizes = {o: len(options([f"sweep={o}"]).points()) for o in OPTIONS}
    assert sizes == {"capacity": 25, "hardware": 12, "hardware_sources": 21, "load": 24, "none": 1,
                     "roofline_part": 18, "seeds": 32, "whatif": 27}
    # command-line axes: ++ adds or replaces a knob, ~ drops one
    o = options(["sweep=load", "++sweep.axes.max_num_seqs=[4,8]", "++sweep.axes.tp=[1]",
                 "~sweep.axes.arrival_rate_scale", "sweep.slo.tpot_ms=null"])
    assert o.axes == {"max_num_seqs": [4, 8], "tp": [1]}
    assert o.slo == {"ttft_ms": 1000.0, "tpot_ms": None}


def test_sweep_base_from_spec():
    spec = jconfig.from_hydra(make(["sweep=hardware", "workload=example"]))
    base = jconfig.sweep_base(spec)
    assert base.workload is spec.workload and base.model is spec.model_config
    assert base.hardware == spec.hardware and base.scheduler == spec.scheduler
    assert base.runtime == spec.model and base.calibration == spec.calibration
    assert base.profiles_dir == spec.paths.profiles and base.max_slots == spec.sim.max_slots
    assert (base.slo_ttft_ms, base.slo_tpot_ms) == (1000.0, 50.0)
    assert base.synthetic is None
    assert sorted(base.hardware_options) == ["rtxpro6000", "rtxpro6000_tp2"]
    assert base.hardware_options["rtxpro6000"] == jconfig.from_hydra(make()).hardware
    assert base.hardware_options["rtxpro6000_tp2"].tp == 2
    # a synthetic workload: the seed knob regenerates the same trace the config generates
    from jaxsim.workload import synthetic_workload

    spec = jconfig.from_hydra(make(["sweep=seeds", "workload=synthetic_poisson",
                                    "workload.num_requests=20", "workload.seed=3",
                                    "workload.shift_ns=7"]))
    base = jconfig.sweep_base(spec)
    again = synthetic_workload(**base.synthetic)  # seed 3 as configured
    assert (again.arrival_ns == spec.workload.arrival_ns).all()
    assert (again.input_toks == spec.workload.input_toks).all()
    assert (again.output_toks == spec.workload.output_toks).all()


@pytest.mark.parametrize("overrides, message", [
    (["++sweep.axes.max_num_seq=[4,8]"], "sweep.axes.max_num_seq: unknown knob (known knobs: ["),
    (["++sweep.axes.model=[a]"], "sweep.axes.model: unknown knob"),
    (["++sweep.axes.max_num_seqs=[]"], "sweep.axes.max_num_seqs: must be a non-empty list"),
    (["++sweep.axes.max_num_seqs=4"], "sweep.axes.max_num_seqs: must be a non-empty list"),
    (["++sweep.axes.max_num_seqs=[4,-8]"], "sweep.axes.max_num_seqs[1]: must be >= 0, got -8"),
    (["++sweep.axes.arrival_rate_scale=[0]"], "sweep.axes.arrival_rate_scale[0]: must be > 0"),
    (["++sweep.axes.mem_util=[1.5]"], "sweep.axes.mem_util[0]: must be <= 1"),
    (["++sweep.axes.enable_prefix_caching=[1]"],
     "sweep.axes.enable_prefix_caching[0]: must be true or false"),
    (["++sweep.axes.hardware=[a100]"], "sweep.axes.hardware[0]: unknown hardware option 'a100'"),
    (["model=qwen3_32b", "++sweep.axes.hardware=[rtxpro6000,rtx4090]"],
     "sweep.axes.hardware[1]: hardware option 'rtx4090': no profiles for 'Qwen/Qwen3-32B'"),
    (["sweep=seeds"], "sweep.axes.seed: the seed knob needs a synthetic workload"),
    (["sweep.slo.ttft_ms=0"], "sweep.slo.ttft_ms: must be > 0"),
    (["sweep.chunk_size=0"], "sweep.chunk_size: must be >= 1"),
    (["sweep.table=sweep.xlsx"], "sweep.table: 'sweep.xlsx' is neither .csv nor .parquet"),
])
def test_bad_sweep_values(overrides, message):
    spec = jconfig.from_hydra(make(["workload=example"] + overrides))
    with pytest.raises(JaxsimInputError) as e:
        jconfig.sweep_base(spec)
    assert str(e.value).startswith(message), str(e.value)


def test_bad_knob_stops_run_sweep_before_simulating(script, tmp_path):
    with pytest.raises(JaxsimInputError, match=r"^sweep\.axes\.max_num_seq: unknown knob"):
        script.run_sweep(make(FAST + ["++sweep.axes.max_num_seq=[4,8]"]), tmp_path)
    assert not any(tmp_path.iterdir())


def test_run_sweep_writes_table_and_summary(script, tmp_path, capsys):
    out = script.run_sweep(make(FAST + AXES), tmp_path)
    rows = report.read_table(tmp_path / "sweep.csv")
    assert len(rows) == 4
    assert [r["output_tok_s"] for r in rows] == [r["output_tok_s"] for r in out["rows"]]
    grid = [(4, True), (4, False), (8, True), (8, False)]
    assert [(r["max_num_seqs"], r["enable_prefix_caching"]) for r in rows] == grid
    assert [r["config"] for r in rows] == [0, 1, 2, 3]
    assert all(r["status"] == "ok" and r["finished"] == 12 for r in rows)
    assert "slo_attainment" not in rows[0]  # no SLO configured
    summary = json.loads((tmp_path / "sweep.json").read_text())
    assert summary["n_configs"] == 4 and summary["num_groups"] == 1
    assert summary["axes"] == {"max_num_seqs": [4, 8], "enable_prefix_caching": [True, False]}
    assert summary["status"] == {"ok": 4} and summary["plots"] == []
    assert summary["aggregate_realtime_factor"] == pytest.approx(
        summary["sim_s"] / summary["wall_s"])
    assert summary["sim_s"] > 0
    config = (tmp_path / "config.yaml").read_text()
    assert "num_requests: 12" in config and "max_num_seq" in config
    printed = capsys.readouterr().out
    assert "best by output_tok_s" in printed and "4 configurations in 1 compiled group" in printed


def test_run_sweep_with_slo_and_plots(script, tmp_path, capsys):
    # the same shape as above: no new compile
    out = script.run_sweep(make(FAST + AXES + ["sweep.plots=true", "sweep.slo.ttft_ms=1000",
                                               "sweep.slo.tpot_ms=50",
                                               "sweep.table=table.csv"]), tmp_path)
    rows = report.read_table(tmp_path / "table.csv")
    assert len(rows) == 4 and all(0 <= r["slo_attainment"] <= 1 for r in rows)
    assert "goodput_rps" in rows[0]
    assert {Path(p).name for p in out["plots"]} == {"heatmap_max_num_seqs_enable_prefix_caching.png",
                                                     "pareto.png"}
    for p in out["plots"]:
        assert Path(p).stat().st_size > 1000
    assert out["slo"] == {"ttft_ms": 1000.0, "tpot_ms": 50.0}
    assert "best by goodput_rps" in capsys.readouterr().out


@pytest.mark.slow  # a subprocess and its own compile; run_sweep itself is tested in-process above
def test_multirun_subprocess(tmp_path):
    """One real Hydra multirun: two scheduler options, each job one batched 2-point sweep."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, str(SCRIPT), "-m", f"hydra.sweep.dir={tmp_path}",
           "workload.num_requests=8", "sweep.progress=false", "sweep.plots=false",
           "++sweep.axes.max_num_seqs=[4,8]", "scheduler=vllm_default,no_prefix_cache"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for job, prefix_caching in (("0", True), ("1", False)):
        rows = report.read_table(tmp_path / job / "sweep.csv")
        assert [r["max_num_seqs"] for r in rows] == [4, 8]
        assert all(r["status"] == "ok" and r["finished"] == 8 for r in rows)
        summary = json.loads((tmp_path / job / "sweep.json").read_text())
        assert summary["n_configs"] == 2
        assert summary["choices"]["scheduler"] == ("vllm_default" if prefix_caching
                                                   else "no_prefix_cache")
        assert f"enable_prefix_caching: {str(prefix_caching).lower()}" in (
            tmp_path / job / "config.yaml").read_text()
    assert proc.stdout.count("2 configurations in 1 compiled group") == 2


def test_bad_knob_cli_exit_code(tmp_path):
    """The CLI reports a config error on stderr with exit code 2, before importing any trace."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, str(SCRIPT), f"hydra.run.dir={tmp_path}",
                           "workload=example", "++sweep.axes.max_num_seq=[4]"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "error: sweep.axes.max_num_seq: unknown knob" in proc.stderr
