"""Long traces (README "Long traces"): the loop run in stretches with progress gives the one-call
run's results exactly, a run without iteration rows keeps its step limit and counts, and the
outputs of such a run are written. One compiled loop (a small cache, so that requests are
preempted and recomputed across the stretches' stops) serves every test; the heavy
measurements are benchmarks (``scripts/bench.py --long-trace``, ``--steps --long-requests``).
"""

import json

import numpy as np
import pytest

from _shared import PROFILES, load_model, load_trace, runtime_for
from jaxsim import metrics, progress, simulator
from jaxsim.errors import JaxsimInputError
from jaxsim.power import PowerConfig
from jaxsim.spec import HardwareConfig, SchedulerConfig

N = 40
HW, SCHED = HardwareConfig(num_gpu_blocks=400), SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512)
OPTIONS = dict(profiles_dir=PROFILES, record_iterations=False)
PER_REQUEST = ("arrival_ns", "first_scheduled_ns", "first_token_ns", "finish_ns", "prefix_hit_tokens",
               "num_preemptions", "recomputed_tokens", "token_times_ns", "token_offsets")


def _args():
    return load_trace(N), load_model(), HW, SCHED, runtime_for(400)


@pytest.fixture(scope="module")
def runs():
    """The same prepared run as one call and in stretches of 7, 56, 448, ... steps."""
    p = simulator.prepare(*_args(), **OPTIONS)
    shown = []
    whole = simulator.run_prepared(p, progress.Bar(N, enabled=False), first=10**9)
    parts = simulator.run_prepared(p, progress.Bar(N, enabled=False, callback=lambda *a: shown.append(a)), first=7)
    return p, simulator.result_of(p, whole), simulator.result_of(p, parts), shown, whole


def test_stretches_give_the_one_call_results(runs):
    p, whole, parts, shown, _ = runs
    assert len(shown) >= 4  # 7 + 56 + 448 + 3,584 steps < the run's
    assert int(np.sum(whole.num_preemptions)) > 0  # preempted requests are carried across the stops
    for name in PER_REQUEST:
        np.testing.assert_array_equal(getattr(parts, name), getattr(whole, name), err_msg=name)
    assert whole.token_times_ns.shape == (int(np.sum(whole.output_toks)),)
    for key in ("iterations", "steps", "preemptions", "prefix_hit_tokens", "recomputed_tokens"):
        assert parts.stats[key] == whole.stats[key], key
    assert int(p.state.steps) == 0  # the stretches donate a copy: the prepared state is still usable


def test_progress_callback_sees_requests_and_clock_advance(runs):
    _, whole, _, shown, _ = runs
    finished, now = np.array(shown).T
    assert np.all(np.diff(finished) >= 0) and np.all(np.diff(now) >= 0)
    assert finished[0] < N // 2 and finished[-1] == N  # the first stretch (7 steps) finishes few
    # After the last event the clock reads "never": the callback gets the last finish instead.
    assert now[-1] == int(whole.finish_ns.max())


def test_no_iteration_rows_keeps_the_step_limit_and_counts(runs):
    p, whole, _, _, final = runs
    assert p.state.records.start.shape[-1] == 1 and not p.static.record_iterations
    # The step limit is the one a full buffer would allow (planning.Dims.max_steps), not the 1-row one.
    pl = simulator.plan_run(*_args(), profiles_dir=PROFILES)
    assert int(p.state.max_steps) == pl.dims.bucketed().max_steps(1) > 4 * pl.dims.max_iters
    assert whole.iter_end_ns.shape == (0,) and whole.iter_kv_blocks_used.shape == (0,)
    assert whole.stats["iterations"] == int(final.inst.n_iters[0]) > N  # counted, not kept
    assert whole.stats["iteration_rows"] == "not recorded"
    assert whole.stats["latency_model"]["profiles"]["iterations"] == whole.stats["iterations"]


def test_simulate_with_a_progress_callback_and_outputs_without_rows(runs, tmp_path):
    """The public entry point: ``progress=callable`` and ``record_iterations=False`` give the
    prepared run's results (the same compiled loop), and the outputs are written from them."""
    _, whole, _, _, _ = runs
    seen = []
    r = simulator.simulate(*_args(), **OPTIONS, progress=lambda f, t: seen.append((f, t)))
    assert seen[-1] == (N, int(whole.finish_ns.max())) and len(seen) >= 2  # 6,697 steps: 2 stretches
    for name in PER_REQUEST:
        np.testing.assert_array_equal(getattr(r, name), getattr(whole, name), err_msg=name)
    summary = metrics.write_outputs(r, tmp_path)
    assert summary["requests"] == N and summary["unfinished_requests"] == 0 and summary["stats_iterations"] == whole.stats["iterations"]
    assert summary["iterations"] == whole.stats["iterations"] > 0  # counted, though no row is kept
    assert summary["kv_peak_usage_pct"] is None  # no KV gauge without rows (NaN, written null): not 0
    assert json.loads((tmp_path / "summary.json").read_text())["iteration_rows"] == "not recorded"
    assert (tmp_path / "timeseries.csv").exists()


def test_power_needs_the_iteration_rows():
    with pytest.raises(JaxsimInputError) as e:
        simulator.prepare(*_args(), **OPTIONS, power=PowerConfig())
    assert e.value.where == "record_iterations"


def test_run_script_drops_rows_and_token_times_for_long_traces_only():
    from types import SimpleNamespace

    import run  # scripts/run.py

    def spec(n, max_iterations=0, power=None):
        return SimpleNamespace(workload=SimpleNamespace(num_requests=n), sim=SimpleNamespace(max_iterations=max_iterations),
                               power=power)

    said = []
    assert run.long_trace_options(spec(run.LONG_TRACE), said.append) == dict(record_iterations=False,
                                                                               record_token_times=False)
    assert len(said) == 1 and "100,000 requests" in said[0]
    assert run.long_trace_options(spec(run.LONG_TRACE - 1), said.append) == {}
    assert run.long_trace_options(spec(10**6, max_iterations=5000), said.append) == {}  # rows asked for
    assert run.long_trace_options(spec(10**6, power=PowerConfig()), said.append) == {}  # power prices the rows
    assert len(said) == 1


def test_run_script_passes_the_long_trace_options(monkeypatch):
    """``simulate_spec`` hands them to the simulator over the config's own (one value each)."""
    from hydra import compose, initialize_config_dir

    import run  # scripts/run.py
    from _shared import CONF
    from jaxsim import config as jconfig

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        spec = jconfig.from_hydra(compose(config_name="config", overrides=["workload.num_requests=20"]))
    got = []
    monkeypatch.setattr(run.simulator, "simulate", lambda *a, **kw: got.append(kw))
    monkeypatch.setattr(run, "LONG_TRACE", 20)
    run.simulate_spec(spec)
    monkeypatch.setattr(run, "LONG_TRACE", 21)
    run.simulate_spec(spec)
    assert got[0]["record_iterations"] is False and got[0]["record_token_times"] is False
    assert "record_iterations" not in got[1] and got[1]["record_token_times"] is True  # the config's
