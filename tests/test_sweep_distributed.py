"""Sweeps beyond one process: checkpoints and restarts (jaxsim.checkpoint), and several processes
over one global device mesh with jax.distributed (jaxsim.distributed, scripts/sweep.py).

The in-process runs share one shape (12 requests, 2 configurations per chunk) and one compile;
the multi-process runs are subprocesses on this machine's CPU (loopback coordinator, a free port).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from jaxsim import distributed
from jaxsim.checkpoint import SweepCheckpoint
from jaxsim.errors import JaxsimInputError

from _shared import ROOT, SCRIPTS
from test_sweep_hydra import AXES, FAST, make, script  # noqa: F401  (the script fixture)

CHUNKED = FAST + AXES + ["sweep.chunk_size=2"]  # 4 configurations in 2 chunks of 2


def _csv(path):
    return path.read_text().splitlines()


def test_distributed_options_are_checked():
    assert distributed.distributed_options(None) == distributed.DistributedOptions()
    assert not distributed.distributed_options({"num_processes": 1}).enabled
    ok = distributed.distributed_options({"num_processes": 2, "process_id": 1, "coordinator": "127.0.0.1:1234"})
    assert ok.enabled and ok.process_id == 1
    assert distributed.distributed_options({"auto": True}).enabled  # SLURM / Open MPI variables
    for bad, message in (({"num_processes": 2, "process_id": 2, "coordinator": "h:1"}, r"process_id: must be in \[0, 1\]"),
                         ({"num_processes": 2, "process_id": 0}, r"coordinator: must be HOST:PORT"),
                         ({"num_processes": 2, "process_id": 0, "coordinator": "h:99999"}, r"a port in 1-65535"),
                         ({"num_processes": 2, "process_id": 0, "coordinator": "h:abc"}, r"a port in 1-65535"),
                         ({"num_processes": 0}, r"num_processes: must be an integer >= 1"),
                         ({"num_proceses": 2}, r"num_proceses: unknown field"),
                         ({"process_id": 1}, r"process_id: set, but distributed.num_processes is 1")):
        with pytest.raises(JaxsimInputError, match=message):
            distributed.distributed_options(bad)
    with pytest.raises(JaxsimInputError, match=r"distributed\.num_proceses: unknown field"):
        from jaxsim import config as jconfig
        jconfig.from_hydra(make(FAST + ["+distributed.num_proceses=2"]))


def test_checkpoint_restart_skips_finished_chunks_and_loses_nothing(script, tmp_path):  # noqa: F811
    ck = tmp_path / "ck"
    full = script.run_sweep(make(CHUNKED + [f"sweep.checkpoint={ck}"]), tmp_path / "a", echo=False)
    assert full["restored_from_checkpoint"] == 0 and full["status"] == {"ok": 4}
    manifest = (ck / "manifest.jsonl").read_text().splitlines()
    assert len(manifest) == 3 and json.loads(manifest[0])["points"] == 4  # header + 2 chunks
    chunks = [json.loads(line)["configs"] for line in manifest[1:]]
    assert sorted(c for cs in chunks for c in cs) == [0, 1, 2, 3] and all(len(cs) == 2 for cs in chunks)

    # a kill during the second chunk: its rows half written (a row and a cut line), no manifest line
    rows = (ck / "rows.jsonl").read_text().splitlines()
    assert len(rows) == 4
    second = [r for r in rows if json.loads(r)["config"] in chunks[1]]
    (ck / "manifest.jsonl").write_text("\n".join(manifest[:2]) + "\n")
    (ck / "rows.jsonl").write_text("\n".join([r for r in rows if r not in second] + second[:1]) + "\n"
                                   + second[1][:25])
    again = script.run_sweep(make(CHUNKED + [f"sweep.checkpoint={ck}"]), tmp_path / "b", echo=False)
    assert again["restored_from_checkpoint"] == 2  # the first chunk read back, the second run again
    assert _csv(tmp_path / "b" / "sweep.csv") == _csv(tmp_path / "a" / "sweep.csv")  # row for row
    assert len((ck / "manifest.jsonl").read_text().splitlines()) == 3
    assert len((ck / "rows.jsonl").read_text().splitlines()) == 5  # the cut line dropped; one row twice

    # everything finished: nothing simulated, the same table
    third = script.run_sweep(make(CHUNKED + [f"sweep.checkpoint={ck}"]), tmp_path / "c", echo=False)
    assert third["restored_from_checkpoint"] == 4 and third["sim_s"] == 0.0
    assert _csv(tmp_path / "c" / "sweep.csv") == _csv(tmp_path / "a" / "sweep.csv")

    # another sweep in the same folder is refused, not mixed in
    with pytest.raises(JaxsimInputError, match=r"holds the checkpoint of another sweep"):
        script.run_sweep(make(CHUNKED + [f"sweep.checkpoint={ck}", "workload.num_requests=10"]),
                         tmp_path / "d", echo=False)


def test_an_unreachable_coordinator_is_named():
    # process 1 waits for process 0's coordinator, then says so (JAX itself would abort the process)
    with pytest.raises(JaxsimInputError, match=r"distributed\.coordinator: cannot reach 127\.0\.0\.1:1 within 1 s"):
        distributed._wait_for_coordinator("127.0.0.1:1", 1)


def test_checkpoint_refuses_a_damaged_manifest(tmp_path):
    with pytest.raises(JaxsimInputError, match=r"is a file, not a folder"):
        (tmp_path / "f").write_text("x")
        SweepCheckpoint(tmp_path / "f", "abc", 3)
    ck = SweepCheckpoint(tmp_path, "abc", 3)
    ck.record(0, [{"config": 0, "x": 1.5}], 2.0)
    assert SweepCheckpoint(tmp_path, "abc", 3).finished() == {0: {"config": 0, "x": 1.5}}
    lines = (tmp_path / "manifest.jsonl").read_text().splitlines()
    (tmp_path / "manifest.jsonl").write_text(lines[0] + "\n{not json\n" + lines[1] + "\n")
    with pytest.raises(JaxsimInputError, match=r"line 2 is not JSON"):
        SweepCheckpoint(tmp_path, "abc", 3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int):
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}


def _sweep_cmd(out, *extra):
    return [sys.executable, str(SCRIPTS / "sweep.py"), f"hydra.run.dir={out}", *FAST, *AXES,
            "sim.compile_cache=false", *extra]


def test_two_processes_give_the_single_process_table(script, tmp_path):  # noqa: F811
    """Two processes on loopback, one CPU device each: one global mesh, each process builds its
    half of every chunk; process 0 gathers and writes the table, equal row for row to the table of
    one process (run in-process here, same points)."""
    script.run_sweep(make(FAST + AXES), tmp_path / "one", echo=False)
    port = _free_port()
    procs = [subprocess.Popen(_sweep_cmd(tmp_path / f"p{i}", "distributed.num_processes=2",
                                         f"distributed.process_id={i}", f"distributed.coordinator=127.0.0.1:{port}",
                                         "distributed.timeout_s=120"),
                              cwd=tmp_path, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    assert _csv(tmp_path / "p0" / "sweep.csv") == _csv(tmp_path / "one" / "sweep.csv")
    assert json.loads((tmp_path / "p0" / "sweep.json").read_text())["processes"] == 2
    assert not (tmp_path / "p1" / "sweep.csv").exists()  # process 1 writes nothing


@pytest.mark.slow  # three subprocess compiles (~1-2 min on 2 cores)
def test_a_killed_sweep_restarted_with_the_same_command(tmp_path):
    """A real kill: the sweep (6 chunks of 1 configuration) is killed once a chunk is in the
    manifest; the same command then skips the finished chunks and the table equals an
    uninterrupted run's."""
    axes = ["++sweep.axes.max_num_seqs=[4,6,8]", "++sweep.axes.enable_prefix_caching=[true,false]",
            "sweep.chunk_size=1"]
    ref = subprocess.run(_sweep_cmd(tmp_path / "ref", *axes), cwd=tmp_path, env=_env(1), capture_output=True,
                         text=True, timeout=400)
    assert ref.returncode == 0, ref.stdout + ref.stderr
    ck = tmp_path / "ck"
    cmd = _sweep_cmd(tmp_path / "run", *axes, f"sweep.checkpoint={ck}")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(1), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = ck / "manifest.jsonl"
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if manifest.is_file() and len(manifest.read_text().splitlines()) >= 2:  # one chunk done
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(manifest.read_text().splitlines()) - 1
    assert 1 <= done_before < 6, "the sweep was not killed midway"
    again = subprocess.run(cmd, cwd=tmp_path, env=_env(1), capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stdout + again.stderr
    summary = json.loads((tmp_path / "run" / "sweep.json").read_text())
    assert summary["restored_from_checkpoint"] == done_before
    assert _csv(tmp_path / "run" / "sweep.csv") == _csv(tmp_path / "ref" / "sweep.csv")


def test_processes_given_different_sweeps_stop_with_an_error(tmp_path):
    """Different sweeps in different processes would wait on each other's collectives for ever:
    every process compares its sweep's fingerprint with the others' and all stop (exit 2)."""
    port = _free_port()
    procs = [subprocess.Popen(_sweep_cmd(tmp_path / f"p{i}", "distributed.num_processes=2", f"distributed.process_id={i}",
                                         f"distributed.coordinator=127.0.0.1:{port}", "distributed.timeout_s=120",
                                         *(["++sweep.axes.max_num_seqs=[4,8,16]"] if i else [])),
                              cwd=tmp_path, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [2, 2], "\n".join(o[-2000:] for o in outs)
    assert all("were not given the same sweep" in o for o in outs)
