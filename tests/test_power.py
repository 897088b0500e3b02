"""Power and energy (REFERENCE.md §1.13, jaxsim/power.py, engine/power.py): the power block's checks,
hand-computed pricing (one iteration by component, a TP-2 iteration's links, standby decay), the
power cap's frequency model, then one small run (one compile) whose metered activity, per-tick
watts, per-request energy and sweep row agree with the hand formulas and with each other."""

import dataclasses
import json
import math

import numpy as np
import pytest

from _shared import PROFILES, load_model
from jaxsim import metrics, power, simulator
from jaxsim.cluster_config import power_from_cluster_json
from jaxsim.errors import JaxsimInputError
from jaxsim.spec import HardwareConfig, SchedulerConfig, Workload

BLOCK = {"base_node_power": 60, "npu": {"RTXPRO6000": {"idle_power": 35, "standby_power": 300, "active_power": 600,
                                                       "standby_duration": 2}},
         "cpu": {"idle_power": 10, "active_power": 200, "util": 0.15},
         "dram": {"dimm_size": 32, "idle_power": 2.0, "energy_per_bit": 6.0},
         "link": {"num_links": 1, "idle_power": 5, "energy_per_bit": 4.0},
         "nic": {"num_nics": 1, "idle_power": 20}, "storage": {"num_devices": 2, "idle_power": 5}}
HW = HardwareConfig(name="RTXPRO6000", mem_size_gb=96)


def _config(**npu):
    block = json.loads(json.dumps(BLOCK))
    block["npu"]["RTXPRO6000"].update(npu)
    return power.PowerConfig(default=power.node_power(block), default_cpu_mem_gb=512)


def test_power_block_errors_name_the_field():
    with pytest.raises(JaxsimInputError, match=r"power\.npu\.RTXPRO6000\.idle_pwr.*unknown field"):
        power.node_power({**BLOCK, "npu": {"RTXPRO6000": {**BLOCK["npu"]["RTXPRO6000"], "idle_pwr": 1}}})
    with pytest.raises(JaxsimInputError, match=r"power\.cpu\.util.*in \[0.0, 1.0\]"):
        power.node_power({**BLOCK, "cpu": {"idle_power": 10, "active_power": 200, "util": 1.5}})
    with pytest.raises(JaxsimInputError, match=r"idle_power <= standby_power <= active_power"):
        power.node_power({**BLOCK, "npu": {"X": {"idle_power": 50, "standby_power": 40, "active_power": 300,
                                                 "standby_duration": 1}}})
    with pytest.raises(JaxsimInputError, match=r"power\.base_node_power.*missing"):
        power.node_power({"npu": BLOCK["npu"]})
    b = power.node_power(BLOCK)
    with pytest.raises(JaxsimInputError, match=r"power\.npu.*no entry for 'A6000'"):
        b.npu_of("A6000", "instance 0")
    # standby_duration is in seconds (REFERENCE.md §1.16); standby_duration_s is the same field
    alt = json.loads(json.dumps(BLOCK))
    alt["npu"]["RTXPRO6000"]["standby_duration_s"] = alt["npu"]["RTXPRO6000"].pop("standby_duration")
    assert power.node_power(alt) == b
    assert b.unmodelled == () and power.node_power({"base_node_power": 1, "npu": BLOCK["npu"]}).unmodelled == (
        "cpu", "dram", "link", "nic", "storage")


def test_cluster_json_power_blocks_per_node(tmp_path):
    d = {"num_nodes": 2, "link_bw": 16, "link_latency": 0, "nodes": [
        {"num_instances": 0, "instances": [], "cpu_mem": {"mem_size": 256, "mem_bw": 100, "mem_latency": 0},
         "power": BLOCK}, {"num_instances": 0, "instances": []}]}
    cfg = power_from_cluster_json(tmp_path / "c.json", d)
    assert cfg.block(0) == dataclasses.replace(power.node_power(BLOCK), where=f"{tmp_path / 'c.json'}: nodes[0].power")
    assert cfg.block(1) is None and cfg.cpu_mem_gb == {0: 256.0}  # node 1: unmodelled, no memory given
    d["nodes"][0]["power"] = {**BLOCK, "gpu": {}}
    with pytest.raises(JaxsimInputError, match=r"nodes\[0\]\.power\.gpu.*unknown field"):
        power_from_cluster_json(tmp_path / "c.json", d)


def _inst(tp=1, pp=1, link=0.0, disp=0.0, wload=0, **npu):
    p = power.node_power(BLOCK).npu["RTXPRO6000"]
    return power.InstancePower(node=0, npu=dataclasses.replace(p, **npu), npus=tp * pp, tp=tp, link_token_bytes=link,
                               dispatch_bytes=disp, wload_bytes=wload)


def test_one_iteration_energy_by_component_by_hand():
    # one iteration: 10 ms of NPU time in 12 ms of service, 100 tokens, 1 MB of weights read from host memory
    block, p = power.node_power(BLOCK), _inst(wload=1_000_000)
    e = power._dynamic_j(p, block, 10_000_000, 12_000_000, 0, 100, 100, 1_000_000, 0, 0)
    assert e["npu"] == pytest.approx((600 - 35) * 0.010 + (300 - 35) * 0.002)  # active 10 ms, standby 2 ms
    assert e["cpu"] == pytest.approx((200 - 10) * (0.7 - 0.15) * 0.012)  # busy increment over the iteration
    assert e["memory"] == pytest.approx(6.0e-12 * 8 * 1_000_000)  # 6 pJ/bit x 8 Mbit
    assert e["link"] == 0.0  # TP 1: no collective
    const = power._node_constant_w(block, [p], 512)
    assert const == {"base": 60, "npu": 35, "cpu": 10 + 190 * 0.15, "memory": 2.0 * 16, "pim": 0.0, "link": 5,
                     "nic": 20, "storage": 10}


def test_tp2_iteration_links_and_ranks_by_hand():
    # a TP-2 Llama-3.1-8B plan's traffic: 2 AllReduces per block (o_proj, down_proj), 32 blocks, H 4096, bf16
    hw = dataclasses.replace(HW, name="RTXPRO6000", tp=2)
    wl = Workload(np.zeros(1, np.int64), np.array([64], np.int32), np.array([1], np.int32), [None])
    pl = simulator.plan_run(wl, load_model(), hw, SchedulerConfig(), profiles_dir=PROFILES)
    per_token, disp = power.traffic_coefficients(pl.tables, pl.pp)
    assert per_token == 64 * 2 * (2 - 1) * 4096 * 2 and disp == 0  # ring AllReduce 2(N-1) S over both ranks
    p = _inst(tp=2, link=per_token)
    e = power._dynamic_j(p, power.node_power(BLOCK), 5_000_000, 5_000_000, 0, 64, 64, 0, 0, 0)
    assert e["npu"] == pytest.approx((600 - 35) * 2 * 0.005)  # both ranks busy the whole iteration
    assert e["link"] == pytest.approx(4.0e-12 * 8 * 64 * per_token)


def test_sweep_knobs_are_checked_like_a_block():
    # the sweep's power knobs replace NPU fields (PowerConfig.with_npu): the block's checks rerun
    cfg = _config()
    with pytest.raises(JaxsimInputError, match=r"idle_power <= standby_power <= active_power"):
        cfg.with_npu(idle_power=400.0)
    with pytest.raises(JaxsimInputError, match=r"power_cap.*not above the idle power"):
        cfg.with_npu(power_cap=20.0)
    with pytest.raises(JaxsimInputError, match=r"PowerConfig.nodes\['0'\].*node index"):
        power.PowerConfig(nodes={"0": cfg.default})
    with pytest.raises(JaxsimInputError, match=r"^power: must be a jaxsim.power.PowerConfig"):
        power.attach([None], {"npu": {}}, ["RTXPRO6000"], ["hardware"])


def test_power_cap_frequency_model():
    p = _inst()
    assert p.npu.compute_stretch == 1.0 and p.npu.busy_power == 600
    capped = dataclasses.replace(p.npu, power_cap=400)
    f = ((400 - 35) / (600 - 35)) ** (1 / 3)  # dynamic power ~ f^3
    assert capped.compute_stretch == pytest.approx(1 / f) and capped.busy_power == 400
    assert dataclasses.replace(p.npu, power_cap=700).compute_stretch == 1.0  # above the demand: no effect
    assert capped.standby_draw == 300 and dataclasses.replace(p.npu, power_cap=100).standby_draw == 100


def test_spread_conserves_energy_across_tick_boundaries():
    out = power._spread([500, 1_500, 2_000], [1_500, 1_500, 4_500], [10.0, 3.0, 5.0], 0, 1_000, 5)
    assert out.tolist() == pytest.approx([5.0, 5.0 + 3.0 + 0.0, 2.0, 2.0, 1.0])
    # from t0 = 1,000: the first interval keeps its half after t0; an instant before t0 is dropped
    out = power._spread([500, 200, 2_000], [1_500, 200, 2_500], [10.0, 7.0, 4.0], 1_000, 1_000, 3)
    assert out.tolist() == pytest.approx([5.0, 4.0, 0.0])


# --- one small run: two requests 5 s apart, standby lasting 2 s -----------------------------------

def _workload():
    return Workload(np.array([0, 5_000_000_000], np.int64), np.array([200, 100], np.int32), np.array([1, 3], np.int32),
                    [None, None])


@pytest.fixture(scope="module")
def run():
    return simulator.simulate(_workload(), load_model(), HW, SchedulerConfig(), profiles_dir=PROFILES, power=_config())


def test_metered_activity_and_standby_decay(run):
    r = run
    act = r.power["activity"]
    start, end, busy = r.iter_start_ns, r.iter_end_ns, r.iter_busy_ns
    assert int(act["iterations"][0]) == len(end) == 1 + 3
    assert int(act["busy_ns"][0]) == int(busy.sum()) and np.all((busy > 0) & (busy <= end - start))
    assert int(act["in_service_ns"][0]) == int((end - start).sum())  # no overlap at pp = 1
    # the 5 s gap after the first request: standby for 2 s, then idle; the others are back to back
    gaps = start[1:] - end[:-1]
    assert int(act["standby_ns"][0]) == int(np.minimum(gaps, 2_000_000_000).sum())
    assert gaps.max() > 4_900_000_000 and np.sort(gaps)[:-1].max() < 2_000_000_000
    ts = metrics.time_series(r, 1.0)
    npu = ts["npu_power_w"]
    # tick 2 ([1, 2) s): standby the whole tick; ticks 4-5 idle; tick 3 holds the end of the standby
    assert npu[1] == pytest.approx(300) and npu[3] == npu[4] == pytest.approx(35)
    sb_end = end[0] + 2_000_000_000
    assert npu[2] == pytest.approx(35 + 265 * (sb_end - 2_000_000_000) / 1e9)


def test_energy_totals_ticks_and_requests_agree(run):
    r = run
    table = metrics.request_table(r)
    t_end = int(r.finish_ns.max())
    e = power.energy(r.power, 0, t_end)
    # by hand from the iteration rows: active, standby inside iterations, standby in the gap, idle
    busy_s, service_s = r.iter_busy_ns.sum() / 1e9, (r.iter_end_ns - r.iter_start_ns).sum() / 1e9
    gaps = r.iter_start_ns[1:] - r.iter_end_ns[:-1]
    standby_s = np.minimum(gaps, 2e9).sum() / 1e9
    assert e["joules"]["npu"] == pytest.approx(35 * t_end / 1e9 + 565 * busy_s + 265 * (service_s - busy_s + standby_s))
    assert e["joules"]["base"] == pytest.approx(60 * t_end / 1e9)
    # the 1-s ticks hold the same joules: the last tick is cut at the last completion (its watts the
    # mean over its part inside), so watts x covered seconds sum to the energy of every component
    ts = metrics.time_series(r, 1.0)
    covered = np.minimum(1.0, t_end / 1e9 - np.arange(len(ts["t"])))
    for c in power.COMPONENTS:
        assert (ts[f"{c}_power_w"] * covered).sum() == pytest.approx(e["joules"][c], rel=1e-9, abs=1e-9), c
    # each request's share of the dynamic NPU energy, by its tokens in each iteration: they sum to it
    assert table["npu_energy_j"].sum() == pytest.approx(565 * busy_s)
    first_iter = 565 * r.iter_busy_ns[0] / 1e9  # request 0 alone in its only iteration
    assert table["npu_energy_j"][0] == pytest.approx(first_iter)
    s = metrics.summarize(r, table)["energy"]
    assert s["total_j"] == pytest.approx(e["total_j"]) and s["j_per_output_token"] == pytest.approx(e["total_j"] / 4)
    assert s["unmodelled_nodes"] == [] and s["peak_w"] >= s["average_w"]
    assert s["peak_w"] == pytest.approx(ts["power_w"].max())


# (sweep rows: tests/test_sweep.py prices every point's energy like its single run, power knobs included)


def test_meter_folds_overlapping_pipeline_batches_and_gaps_by_hand():
    import jax.numpy as jnp

    from jaxsim.engine import meters
    from jaxsim.engine import power as engine_power
    i64 = lambda x: jnp.asarray([x], jnp.int64)  # noqa: E731  one instance, k rows
    z = i64([0, 0, 0])
    # pp = 2: batch 0 [0, 10), batch 1 [4, 14) overlaps it, then a 6 ns gap, batch 2 [20, 25)
    rows = meters.IterationEnd(
        ending=jnp.asarray([[True, True, True]]), index=z, start=i64([0, 4, 20]), end=i64([10, 14, 25]),
        prompt_tokens=z, gen_tokens=z, num_tokens=i64([8, 3, 1]), num_seqs=z, busy_ns=i64([9, 9, 4]),
        pim_ns=i64([0, 0, 2]), pim_io_bytes=z, running=z, waiting=z, kv_used=z, kv_cached=z, prefix_queried=z, prefix_hits=z,
        tier_hits=z, tier_recalled=z, tier_resident=z, tier_written=z)
    params = engine_power.PowerParams(standby_duration_ns=jnp.asarray([5], jnp.int64),
                                      npu_dynamic_w=jnp.asarray([1.0]), ep=jnp.asarray([2], jnp.int64))
    meter = engine_power.PowerMeter(params)
    acc = meter.update(meter.init(1), rows)
    assert int(acc.in_service_ns[0]) == 14 + 5  # the union [0, 14) + [20, 25)
    assert int(acc.standby_ns[0]) == 5  # the 6 ns gap, standby for at most 5
    assert int(acc.busy_ns[0]) == 22 and int(acc.tokens[0]) == 12 and int(acc.pim_ns[0]) == 2
    assert int(acc.dispatch[0]) == 4 + 1 + 1 and int(acc.last_end[0]) == 25  # max(1, T // ep)


def test_a_node_without_a_block_is_unmodelled_not_zero(run):
    info = {**run.power, "nodes": {0: None}}
    e = power.energy(info, 0, int(run.finish_ns.max()))
    assert e["unmodelled_nodes"] == [0] and all(math.isnan(v) for v in e["nodes"][0]["joules"].values())
    assert math.isnan(e["total_j"]) and e["nodes"][0]["modelled"] is False  # totals cover modelled nodes only
    s = metrics.energy_summary(dataclasses.replace(run, power=info), metrics.request_table(run), 0,
                               int(run.finish_ns.max()))
    assert math.isnan(s["j_per_output_token"]) and s["unmodelled_nodes"] == [0]  # no tokens without joules
    assert "power_w" not in power.power_series(dataclasses.replace(run, power=info), 1.0, 0, 3)


def test_pim_memory_and_work_by_hand():
    # DDR4_8GB_3200 (idle 623 mW, peak 3,803 mW): 64 channels of 8 GB hold 512 GB of host memory
    from jaxsim import pim
    dev = pim.load_device("DDR4_8GB_3200_pim", PROFILES / "pim")
    p = dataclasses.replace(_inst(), pim_dynamic_w=(dev.peak_power_mw - dev.idle_power_mw) / 1000, pim_dimms=64,
                            pim_idle_w=dev.idle_power_mw / 1000)
    block = power.node_power(BLOCK)
    assert power._node_constant_w(block, [p], 512)["memory"] == pytest.approx(64 * 0.623)  # not 16 DIMMs x 2 W
    # one decode's PIM work in 32 layers (32 x 4,264 ns) moving 32 x 20,480 B
    e = power._dynamic_j(p, block, 0, 0, 0, 0, 0, 32 * 20_480, 0, 32 * 4_264)
    assert e["pim"] == pytest.approx(3.18 * 32 * 4_264e-9) and e["memory"] == pytest.approx(6e-12 * 8 * 32 * 20_480)


def test_power_cap_relative_to_the_profiles_own_limit():
    # profiles measured under a 500 W limit with a 600 W demand: their clock is f(500) already
    p = dataclasses.replace(_inst().npu, profiled_power_cap=500)
    assert p.busy_power == 500 and p.compute_stretch == 1.0  # the limit in force, no stretch
    f = lambda cap: ((cap - 35) / 565) ** (1 / 3)  # noqa: E731
    assert dataclasses.replace(p, power_cap=500).compute_stretch == pytest.approx(1.0)
    assert dataclasses.replace(p, power_cap=400).compute_stretch == pytest.approx(f(500) / f(400))
    assert dataclasses.replace(p, power_cap=650).compute_stretch == pytest.approx(f(500))  # lifted: faster
