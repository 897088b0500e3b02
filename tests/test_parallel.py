"""Data parallelism: wave-synchronised DP groups (REFERENCE.md §1.8, engine/cluster.py
``_start_batches``), worked out by hand on a MoE model, and the rules that decide which groups
synchronise. Compile budget: one 2-instance MoE loop (~15 s)."""

import dataclasses

import jax
import numpy as np
import pytest

from jaxsim import latency, simulator
from jaxsim.engine import routing
from jaxsim.errors import JaxsimInputError
from jaxsim.spec import Calibration, HardwareConfig, InstanceSpec, LinkConfig, SchedulerConfig, Workload

from _shared import PROFILES, load_model, runtime_for

MOE = load_model("Qwen/Qwen3-30B-A3B-Instruct-2507")
DENSE = load_model()  # Llama-3.1-8B
HW = HardwareConfig(ep=2, num_gpu_blocks=500)  # EP over the 2 DP ranks (tp = 1 each)
SCHED = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=1024)
OVERHEAD = Calibration().iteration_overhead_ns


def _two_requests():
    return Workload(arrival_ns=np.zeros(2, np.int64), input_toks=np.array([300, 200], np.int32),
                    output_toks=np.array([3, 5], np.int32), token_ids=[None, None], source="<two>")


def test_dp_group_runs_padded_wave_synchronous_rounds():
    w = _two_requests()
    specs = [InstanceSpec(HW, SCHED, dp_group="A"), InstanceSpec(HW, SCHED, dp_group="A")]
    res = simulator.simulate_cluster(w, MOE, specs, routing.Router("round_robin"), runtime_for(500),
                                     profiles_dir=PROFILES, max_slots=8)
    assert res.instance.tolist() == [0, 1]
    tables = simulator.plan(w, MOE, HW, SCHED, profiles_dir=PROFILES).tables
    t = jax.jit(latency.iteration_time)

    def ns(*shape):
        return int(t(tables, *shape)[0])

    # Round 1: both prompts, padded to the group's 300 tokens; instance 1's 100 pad tokens count
    # as sequences (S = 1 + 100) in the per-sequence layers, its attention sees its 200 only.
    round1 = max(ns(300, 1, 300, 0, 0, 0, 0, 0), ns(300, 101, 200, 0, 0, 0, 0, 0)) + OVERHEAD
    rows = [res.iter_instance == k for k in (0, 1)]
    ends = [res.iter_end_ns[r] for r in rows]
    assert ends[0][0] == ends[1][0] == round1
    np.testing.assert_array_equal(ends[0], ends[1])  # every round ends together
    # Request 0 (3 tokens) is done after round 3; instance 0 then runs dummy batches (1 token,
    # 1 decode at KV 1) until request 1 (5 tokens) finishes in round 5.
    assert len(ends[0]) == 5
    np.testing.assert_array_equal(res.iter_num_tokens[rows[0]], [300, 1, 1, 1, 1])
    np.testing.assert_array_equal(res.iter_num_tokens[rows[1]], [300, 1, 1, 1, 1])
    np.testing.assert_array_equal(res.iter_num_seqs[rows[1]], [101, 1, 1, 1, 1])
    round4 = max(ns(1, 1, 0, 0, 1, 1, 1, 1), ns(1, 1, 0, 0, 1, 202, 202, 202)) + OVERHEAD
    assert ends[0][3] - ends[0][2] == round4
    assert res.finish_ns[1] == ends[1][4] + Calibration().token_output_delay_ns


def test_which_dp_groups_synchronise():
    w = _two_requests()
    plans = [simulator.plan(w, DENSE, HardwareConfig(num_gpu_blocks=500), SCHED, profiles_dir=PROFILES)] * 3
    dense = [InstanceSpec(HardwareConfig(num_gpu_blocks=500), SCHED, dp_group="g")] * 2 + [InstanceSpec()]
    # dense models: independent engines behind the load balancer unless asked (REFERENCE.md §1.16)
    assert [p.dp_group for p in simulator.place_instances(plans, dense, LinkConfig(), DENSE)] == [-1, -1, -1]
    assert [p.dp_group for p in simulator.place_instances(plans, dense, LinkConfig(), DENSE, "always")] == [0, 0, -1]
    assert [p.dp_group for p in simulator.place_instances(plans, dense, LinkConfig(), MOE)] == [0, 0, -1]
    assert [p.dp_group for p in simulator.place_instances(plans, dense, LinkConfig(), MOE, "never")] == [-1, -1, -1]
    mixed = [dense[0], dataclasses.replace(dense[1], hw=dataclasses.replace(dense[1].hw, tp=2))]
    with pytest.raises(JaxsimInputError, match=r"cluster.instances\[1\].dp_group"):
        simulator.place_instances(plans[:2], mixed, LinkConfig(), MOE)
    with pytest.raises(JaxsimInputError, match="dp_sync"):
        simulator.place_instances(plans, dense, LinkConfig(), MOE, "sometimes")
