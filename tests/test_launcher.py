"""Structural axes spread by a Hydra launcher plugin: a 2-job multirun of scripts/sweep.py through
hydra-joblib-launcher (two worker processes on this machine, the test extra installs it) writes the
same two tables, row for row, as a plain single-process run of each job.

Structural axis: the hardware option (RTX PRO 6000, RTX 4090: other profile tables, so one sweep
per value); each job is a batched 2-point sweep (max_num_seqs 4, 8) of an 8-request synthetic
trace. The same plugin mechanism takes `hydra/launcher=submitit_slurm` (hydra-submitit-launcher)
on a SLURM cluster; that one needs a cluster and is not tested here.
"""

import json
import os
import subprocess
import sys

import pytest
import yaml
from _shared import CONF, ROOT, SCRIPTS
from hydra import compose, initialize_config_dir

from jaxsim import report

SCRIPT = SCRIPTS / "sweep.py"
JOB = ["workload=synthetic_poisson", "workload.num_requests=8", "sweep.progress=false",
       "sweep.plots=false", "sim.progress=false", "++sweep.axes.max_num_seqs=[4,8]"]
HARDWARE = ["rtxpro6000", "rtx4090"]  # job 0, job 1 (Hydra numbers jobs in sweep order)


@pytest.mark.slow  # two worker processes that each compile (~30 s here), then both jobs in-process
def test_joblib_multirun_tables_equal_plain_runs(tmp_path):
    # a clear failure, not a skip, when the test extra is not installed
    import hydra_plugins.hydra_joblib_launcher  # noqa: F401  (pip install hydra-joblib-launcher)

    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    multi = tmp_path / "multirun"
    cmd = [sys.executable, str(SCRIPT), "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
           f"hydra.sweep.dir={multi}", *JOB, "hardware=" + ",".join(HARDWARE)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    # the joblib launcher ran the jobs (two loky worker processes), not Hydra's basic launcher
    assert "Joblib.Parallel(n_jobs=2,backend=loky" in log and "is launching 2 jobs" in log, log[-3000:]
    assert "Launching 2 jobs locally" not in log
    launcher = yaml.safe_load((multi / "multirun.yaml").read_text())["hydra"]["launcher"]
    assert launcher["_target_"].endswith("JoblibLauncher") and launcher["n_jobs"] == 2

    # the same two jobs run plainly, one after the other in this process
    from sweep import run_sweep  # scripts/sweep.py (conftest puts scripts/ on sys.path)

    tables = []
    for job, hw in enumerate(HARDWARE):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("config", overrides=JOB + [f"hardware={hw}"])
        plain = tmp_path / f"plain{job}"
        run_sweep(cfg, plain, echo=False)
        launched = multi / str(job)
        summary = json.loads((launched / "sweep.json").read_text())
        assert summary["choices"]["hardware"] == hw and summary["n_configs"] == 2
        # row for row, every metric: the CSV text itself is equal
        assert (launched / "sweep.csv").read_text() == (plain / "sweep.csv").read_text(), hw
        rows = report.read_table(launched / "sweep.csv")
        assert [r["max_num_seqs"] for r in rows] == [4, 8]
        assert all(r["status"] == "ok" and r["finished"] == 8 for r in rows)
        tables.append(rows)
    # the jobs are the two hardware options, not one table twice: the RTX 4090 decodes slower
    pro6000, rtx4090 = tables
    assert all(b["tpot_mean_ms"] > a["tpot_mean_ms"] for a, b in zip(pro6000, rtx4090))
