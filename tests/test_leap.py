"""Decode leaps (engine/leap.py) change how many loop steps a run takes, never its results.

Leaps are compiled by default only for clusters of ``planning.LEAP_MIN_INSTANCES`` or more, so
the runs here turn them on explicitly (``Static.leap = 9``). Here a run with leaps is compared, leaf by leaf, with the same run where
every batch end takes a step of its own (``Static.leap = 1``): the whole final state (per-request
outputs, token times, iteration rows, KV pools and prefix index, counters, the power meter's
activity) is equal (each request's share of the NPU energy, summed in another order, to 1e-12),
and the leaps did happen (fewer steps). The P/D run is also run in the progress bar's stretches.

Compile budget: one batch of four single-instance configurations and one 3-instance P/D cluster,
each compiled with and without leaps (~10 s each).
"""

import dataclasses

import jax
import numpy as np
import pytest

from jaxsim import power, progress, simulator
from jaxsim.engine import cluster
from jaxsim.engine.routing import Router
from jaxsim.spec import HardwareConfig, InstanceSpec, LinkConfig, SchedulerConfig

from _shared import PROFILES, load_model, load_trace, runtime_for

# Four single-instance regimes: plenty of KV; KV-bound (preemptions, waiting requests); every seat
# taken with requests waiting (leaps with a waiting queue); no async scheduling, no prefix cache.
CONFIGS = [
    (HardwareConfig(num_gpu_blocks=2000), SchedulerConfig(max_num_seqs=16)),
    (HardwareConfig(num_gpu_blocks=400), SchedulerConfig(max_num_seqs=16)),
    (HardwareConfig(num_gpu_blocks=2000), SchedulerConfig(max_num_seqs=3)),
    (HardwareConfig(num_gpu_blocks=400), SchedulerConfig(max_num_seqs=16, async_scheduling=False,
                                                         enable_prefix_caching=False)),
]


def _assert_same_state(a: cluster.ClusterState, b: cluster.ClusterState):
    a, b = (dataclasses.replace(x, steps=x.steps * 0) for x in (a, b))
    paths = jax.tree_util.tree_leaves_with_path(a)
    for (path, x), y in zip(paths, jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        if np.issubdtype(x.dtype, np.floating):  # float sums (the requests' energy) in another order
            np.testing.assert_allclose(x, y, rtol=1e-12, err_msg=jax.tree_util.keystr(path))
        else:
            np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def batch():
    workload, model = load_trace(20), load_model()
    plans = [simulator.plan(workload, model, hw, sched, profiles_dir=PROFILES, max_slots=24,
                             max_iterations=8_000) for hw, sched in CONFIGS]
    npu = {"RTXPRO6000": {"idle_power": 35, "standby_power": 300, "active_power": 600, "standby_duration": 0.001}}
    plans = power.attach(plans, power.PowerConfig(default=power.node_power({"base_node_power": 0, "npu": npu})),
                         [hw.name for hw, _ in CONFIGS], [str(i) for i in range(len(CONFIGS))])
    dims = simulator.Dims.merge([pl.dims for pl in plans])
    state, params, wl, wl_batched = simulator.build(plans, dims, batched=True)
    static = dims.static(plans[0].block_size).replace(leap=9)  # off by default for small runs
    return state, params, wl, wl_batched, static


def test_single_instance_leaps_change_nothing(batch):
    state, params, wl, wl_batched, static = batch
    assert static.leaps
    leapt = cluster.run_batch(state, params, wl, static, workload_batched=wl_batched)
    stepped = cluster.run_batch(state, params, wl, static.replace(leap=1), workload_batched=wl_batched)
    assert (np.asarray(leapt.status) == 0).all() and (np.asarray(leapt.finished) == 20).all()
    _assert_same_state(leapt, stepped)
    assert (np.asarray(stepped.records.start) >= 0).all()
    assert (np.asarray(leapt.request_npu_j) > 0).all() and (np.asarray(leapt.power.busy_ns) > 0).all()
    # Leaps happened where decode is steady; the KV-bound run preempted (its leaps stop there).
    assert (np.asarray(leapt.steps) < np.asarray(stepped.steps)).all(), (leapt.steps, stepped.steps)
    assert int(np.asarray(leapt.inst.counters.preemptions)[1].sum()) > 0
    assert int(np.asarray(leapt.steps)[0]) < 0.7 * int(np.asarray(stepped.steps)[0])  # leaps skip over 30% of the steps


@pytest.mark.slow
def test_pd_cluster_leaps_change_nothing():
    """1 prefill + 2 decode instances, least-loaded routing: leaps stop before every arrival,
    release and prefill-instance event (the decode instances' next chance of a new request)."""
    workload, model = load_trace(16), load_model()
    hw, sched = HardwareConfig(num_gpu_blocks=600), SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=1024)
    specs = [InstanceSpec(hw=hw, sched=sched, role="prefill")] + [InstanceSpec(hw=hw, sched=sched, role="decode")] * 2
    p = simulator.prepare_cluster(workload, model, specs, Router("least_loaded"), runtime_for(600), links=LinkConfig(),
                                  profiles_dir=PROFILES, max_slots=24)
    assert p.static.releases and not p.static.leaps  # 3 instances: off by default
    leapt = cluster.run(p.state, p.params, p.workload, p.static.replace(leap=9))
    stepped = cluster.run(p.state, p.params, p.workload, p.static)
    assert int(leapt.status) == 0 and int(leapt.finished) == 16
    _assert_same_state(leapt, stepped)
    assert int(leapt.steps) < int(stepped.steps)
    # The progress bar's stretches (jaxsim/progress.py) stop this loop every few steps and call it
    # again on the returned state (early ends of leaps flushed at each stop): the same final state.
    shown = []

    class Recorder:
        def show(self, now_ns, finished):
            shown.append((now_ns, finished))

    parts = progress.run_in_stretches(lambda st: cluster.run(st, p.params, p.workload, p.static.replace(leap=9)),
                                      p.state, Recorder(), first=5)
    assert len(shown) >= 3 and shown[-1] == (int(leapt.now), 16)  # stretches of 5, 40, 320, ... steps
    _assert_same_state(leapt, parts)
