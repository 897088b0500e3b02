"""Prefill/decode disaggregation and agentic sessions (requests that enter queues during a run).

* KV transfer times worked out by hand from REFERENCE.md §1.7 and the link model of
  ``disagg.kv_transfer``: compute-bound and link-bound layer-wise streaming, the send after
  prefill, within a node and across nodes.
* Invariants of a mixed-hardware P/D cluster: every request prefilled on a prefill instance and
  finished once on a decode instance, KV bytes conserved through the hand-off, every block
  returned, decode admission bounded by max_num_seqs.
* Sessions: a sub-request arrives exactly when its predecessor finished plus the tool time, and
  finds the predecessor's context in the prefix cache.
* A sweep over a colocated and a disaggregated design (one compiled group) equals the single runs.

Compile budget: a 2-instance and a 3-instance P/D loop, a lone instance with releases, and one
batched sweep group (~15 s each on CPU).
"""

import dataclasses
import functools
import math

import jax
import numpy as np
import pytest

from jaxsim import latency, metrics, simulator, sweep
from jaxsim.engine import routing
from jaxsim.errors import JaxsimInputError
from jaxsim.spec import Calibration, HardwareConfig, InstanceSpec, LinkConfig, SchedulerConfig, Workload

from _shared import PROFILES, load_model, load_trace, runtime_for

MODEL = load_model()
SCHED = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=1024)
HW = HardwareConfig(num_gpu_blocks=600)
RTX4090 = HardwareConfig(name="RTX4090", mem_size_gb=24, link_latency_ns=1000,
                         cpu_mem_bw_gbps=50, num_gpu_blocks=400)
RT = runtime_for(400)  # a max_model_len every instance's cache holds (vLLM refuses a smaller cache)
CALIB = Calibration()
KV_TOKEN_BYTES = 2 * MODEL.kv_dim * MODEL.num_layers * 2  # K+V, 32 layers, bf16: 131,072 bytes


def _iteration_ns(T, S, pc, kp, nd, kvd):
    tables = simulator.plan(_separated(), MODEL, HW, SCHED, profiles_dir=PROFILES).tables
    t, _ = jax.jit(latency.iteration_time)(tables, T, S, pc, kp, nd, kvd * nd, kvd, kvd)
    return int(t) + CALIB.iteration_overhead_ns


@functools.lru_cache(maxsize=None)
def _separated():
    """Three requests 10 s apart: each is done before the next arrives. Single-chunk prompts."""
    return Workload(arrival_ns=np.array([0, 10, 20], np.int64) * 1_000_000_000,
                    input_toks=np.array([600, 1000, 250], np.int32), output_toks=np.array([3, 3, 3], np.int32),
                    token_ids=[None] * 3, source="<separated>")


LINKS = LinkConfig(intra_node_bw_gbps=100.0, intra_node_latency_ns=1000.0,
                   inter_node_bw_gbps=1.0, inter_node_latency_ns=5000.0)


@pytest.mark.parametrize("decode_node, mode", [(0, "layerwise"), (1, "layerwise"), (1, "after_prefill")])
def test_kv_transfer_times_by_hand(decode_node, mode):
    links = dataclasses.replace(LINKS, kv_transfer=mode)
    specs = [InstanceSpec(HW, SCHED, role="prefill", node=0), InstanceSpec(HW, SCHED, role="decode", node=decode_node)]
    res = simulator.simulate_cluster(_separated(), MODEL, specs, rt=RT, links=links, profiles_dir=PROFILES, max_slots=8)
    bw, lat = ((LINKS.intra_node_bw_gbps, LINKS.intra_node_latency_ns) if decode_node == 0
               else (LINKS.inter_node_bw_gbps, LINKS.inter_node_latency_ns))
    L = MODEL.num_layers
    per_layer = KV_TOKEN_BYTES / L  # bytes of one token's K+V in one layer (tp = 1)
    for i, (a, p) in enumerate(zip(_separated().arrival_ns, _separated().input_toks)):
        a, p = int(a), int(p)
        dt = _iteration_ns(p, 1, p, 0, 0, 0)  # the whole prompt in one iteration
        end = a + dt
        s = lat + p * per_layer / bw  # one layer's message
        if mode == "layerwise":  # compute-bound: end + s; link-bound: start + dt/L + L*s
            ready = end + math.ceil(max(s, dt / L - dt + L * s))
        else:
            ready = end + math.ceil(lat + L * p * per_layer / bw)
        assert res.prefill_end_ns[i] == end
        assert res.kv_ready_ns[i] == ready, (i, res.kv_ready_ns[i] - ready)
        assert res.kv_transfer_bytes[i] == p * KV_TOKEN_BYTES
        assert res.first_token_ns[i] == end + CALIB.first_token_delay_ns  # TTFT: the prefill instance
        # the decode instance is idle: it admits the request when its last layer arrives, and
        # decodes token 2 with the prompt's p tokens of KV
        tok = res.token_times_ns[res.token_offsets[i]:res.token_offsets[i + 1]]
        assert tok[1] == ready + _iteration_ns(1, 1, 0, 0, 1, p) + CALIB.token_output_delay_ns
        assert res.prefill_instance[i] == 0 and res.instance[i] == 1
    # the per-request table (requests.csv) reports the hand-off
    table = metrics.request_table(res)
    np.testing.assert_array_equal(table["kv_wait_ns"], res.kv_ready_ns - res.prefill_end_ns)
    np.testing.assert_array_equal(table["kv_transfer_bytes"], _separated().input_toks.astype(np.int64) * KV_TOKEN_BYTES)
    np.testing.assert_array_equal(table["prefill_instance_id"], 0)
    if decode_node == 1 and mode == "layerwise":  # 1 GB/s: the link, not the compute, sets the pace
        # 1000 tokens: 32 layers x 4.1 ms on the link against a 43 ms iteration
        assert res.kv_ready_ns[1] - res.prefill_end_ns[1] > 80_000_000


def test_mixed_hardware_pd_cluster_invariants(sharegpt16):
    small = InstanceSpec(RTX4090, dataclasses.replace(SCHED, max_num_seqs=2), role="decode", node=1)
    specs = [InstanceSpec(HW, SCHED, role="prefill"), InstanceSpec(HW, SCHED, role="decode", node=1), small]
    w = sharegpt16
    p = simulator.prepare_cluster(w, MODEL, specs, routing.Router("least_loaded"), RT, profiles_dir=PROFILES,
                                  max_slots=8)
    final = jax.device_get(simulator.run_prepared(p))
    res = simulator.to_result(p, final)
    n = w.num_requests
    # every request prefilled on the prefill instance, handed off once, finished once on a decode one
    assert int(final.finished) == n and np.all(res.finish_ns > res.first_token_ns)
    np.testing.assert_array_equal(res.prefill_instance, 0)
    assert set(res.instance.tolist()) == {1, 2}
    assert res.stats["prefills_per_instance"] == [n, 0, 0]
    # tokens conserved: every output token emitted once, in time order
    for i in range(n):
        tok = res.token_times_ns[res.token_offsets[i]:res.token_offsets[i + 1]]
        assert np.all(tok > 0) and np.all(np.diff(tok) >= 0)
        # the first inter-token gap contains the hand-off: KV arrival after the prefill's end
        assert tok[1] - tok[0] >= res.kv_ready_ns[i] - res.prefill_end_ns[i] > 0
    # KV conserved through the hand-off: the whole prompt's KV is sent (prefix hits included);
    # a request preempted on the prefill instance sends its recomputed chunks again
    prompt_bytes = w.input_toks.astype(np.int64) * KV_TOKEN_BYTES
    assert np.all(res.kv_transfer_bytes >= prompt_bytes)
    np.testing.assert_array_equal(res.kv_transfer_bytes[res.num_preemptions == 0],
                                  prompt_bytes[res.num_preemptions == 0])
    # every block returned to its own pool; queues and releases drained
    np.testing.assert_array_equal(final.inst.pool.num_free, [599, 599, 399])  # less the null blocks
    np.testing.assert_array_equal(final.router.head, final.router.tail)
    assert np.all(final.releases.release_at == np.iinfo(np.int64).max)
    np.testing.assert_array_equal(final.releases.inbound, 0)
    # decode-side admission waits for a seat: the running gauge never exceeds max_num_seqs
    assert res.iter_running[res.iter_instance == 1].max() <= 4
    assert res.iter_running[res.iter_instance == 2].max() <= 2


def test_pd_cluster_needs_both_roles():
    with pytest.raises(JaxsimInputError, match="needs prefill and decode instances"):
        simulator.prepare_cluster(load_trace(4), MODEL, [InstanceSpec(HW, SCHED, role="prefill"),
                                                          InstanceSpec(HW, SCHED)], profiles_dir=PROFILES)
    with pytest.raises(ValueError, match="role"):
        InstanceSpec(HW, SCHED, role="both")


@functools.lru_cache(maxsize=None)
def _sessions():
    """Two sessions of three sub-requests whose prompts grow by the previous turn (prompt and
    output ids) plus 40 new tokens, with 50 ms tool calls; and one flat request."""
    rng = np.random.default_rng(1)
    ids, inp, out, arrival, nxt, tool = [], [], [], [], [], []
    for s in range(2):
        ctx = rng.integers(0, 30_000, 200 + 50 * s)
        for k in range(3):
            o = 16 + 4 * k
            gen = rng.integers(0, 30_000, o)
            ids.append(np.concatenate([ctx, gen]))
            inp.append(len(ctx))
            out.append(o)
            arrival.append(s * 20_000_000)
            nxt.append(len(inp) if k < 2 else -1)
            tool.append(50_000_000 if k else 0)
            ctx = np.concatenate([ctx, gen, rng.integers(0, 30_000, 40)])
    ids.append(rng.integers(0, 30_000, 300))
    inp.append(290)
    out.append(10)
    arrival.append(5_000_000)
    nxt.append(-1)
    tool.append(0)
    return Workload(arrival_ns=np.array(arrival, np.int64), input_toks=np.array(inp, np.int32),
                    output_toks=np.array(out, np.int32), token_ids=ids, source="<sessions>",
                    next_in_session=np.array(nxt, np.int32), tool_ns=np.array(tool, np.int64))


def _check_session_release(w, res):
    for i, j in enumerate(w.next_in_session):
        if j >= 0:
            assert res.arrival_ns[j] == res.finish_ns[i] + w.tool_ns[j]
            assert res.first_scheduled_ns[j] >= res.arrival_ns[j]


def test_sessions_release_on_finish_and_hit_their_context():
    w = _sessions()
    res = simulator.simulate(w, MODEL, HW, SCHED, RT, profiles_dir=PROFILES, max_slots=8)
    _check_session_release(w, res)
    np.testing.assert_array_equal(res.arrival_ns[~w.released], w.arrival_ns[~w.released])
    # A sub-request finds its predecessor's prompt and output (all but the last token, whose KV is
    # never computed) cached, in whole 16-token blocks.
    for i, j in enumerate(w.next_in_session):
        if j >= 0:
            assert res.prefix_hit_tokens[j] == (w.input_toks[i] + w.output_toks[i] - 1) // 16 * 16


@pytest.mark.slow
def test_sweep_over_colocated_and_disaggregated_designs_equals_runs():
    """Two 2-instance designs in one compiled group (the colocated one runs with releases on, for
    the sessions); each equals its own simulate_cluster."""
    w = _sessions()
    designs = {"colocated": (InstanceSpec(HW, SCHED), InstanceSpec(HW, SCHED)),
               "pd": (InstanceSpec(HW, SCHED, role="prefill"), InstanceSpec(HW, SCHED, role="decode", node=1))}
    base = sweep.SweepBase(w, MODEL, runtime=RT, profiles_dir=PROFILES, max_slots=8, cluster_options=designs,
                           router=routing.Router("least_loaded"), links=LINKS)
    points = [{"cluster": "colocated"}, {"cluster": "pd"}]
    result = sweep.sweep(base, points, progress=False, keep_requests=True)
    assert result.num_groups == 1
    for i, point in enumerate(points):
        single = simulator.simulate_cluster(w, MODEL, sweep.point_instances(base, point), base.router, RT,
                                            links=base.links, profiles_dir=PROFILES, max_slots=8,
                                            record_token_times=False)
        _check_session_release(w, single)
        for name, field in (("first_token", "first_token_ns"), ("finish", "finish_ns"), ("arrival", "arrival_ns")):
            got = result.requests[i][name]
            want = getattr(single, field)
            if name == "arrival":  # the engine records release times only
                got, want = got[w.released], want[w.released]
            np.testing.assert_array_equal(got, want, err_msg=f"{point} {name}")
        assert result.rows[i]["status"] == "ok"
    assert "kv_wait_p99_ms" in result.rows[1] and "kv_wait_p99_ms" not in result.rows[0]
