"""PIM attention offload and sub-batch interleaving (REFERENCE.md §1.11-1.12; jaxsim/pim.py,
jaxsim/latency/pim.py): the INI reader and the channel geometry, the derived latency model against
the reference's per-device fits, a channel assignment and an interleaved iteration by hand, and the
configuration errors. No engine compiles here (the reference-mode runs are in
tests/test_reference_parity.py)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pim_fit  # scripts/pim_fit.py (tests/conftest.py puts scripts/ on sys.path)
from jaxsim import pim
from jaxsim.cluster_config import load_cluster_json
from jaxsim.errors import JaxsimInputError
from jaxsim.latency import pim as pim_dev
from jaxsim.spec import Calibration, HardwareConfig, SchedulerConfig

from _shared import LLAMA, PROFILES, TESTS, load_model

PIM_DIR = PROFILES / "pim"
SHIPPED = ["DDR4_8GB_3200_pim", "HBM2_1GB_2000_pim", "LPDDR4X_2GB_4266_pim", "LPDDR5_2GB_6400_pim"]
PIM_JSON = TESTS / "data" / "reference_runs" / "clusters" / "single_node_pim_instance.json"
LAYER = jax.jit(pim_dev.pim_layer_ns)
SIDES = jax.jit(pim_dev.split_sides)
INTERLEAVED = jax.jit(pim_dev.interleaved_ns)


# ------------------------------------------------------------------------------ INI, geometry
def test_ddr4_geometry_by_hand():
    """REFERENCE.md §1.11 on DDR4_8GB_3200 (bus 64, device width 16, 1024 columns, 65,536 rows, 2 x 4
    banks): 4 devices, 2,048-byte pages, 128 MB per bank, 4,096 MB per rank, a channel of max(8,192,
    4,096) MB = 8 GB, 64 / 8 x 3.2 = 25.6 GB/s, CL 22 x tCK 0.63 = 13.86 ns; 512 GB of host memory
    (single_node_pim_instance.json) hold 64 channels, whose aggregate 1,638.4 GB/s replaces cpu_mem's."""
    d = pim.load_device("DDR4_8GB_3200_pim", PIM_DIR)
    assert (d.devices, d.page_bytes, d.mb_per_bank, d.mb_per_rank) == (4, 2048, 128, 4096)
    assert d.channel_gb == 8 and d.channel_bw_gbps == pytest.approx(25.6) and d.read_latency_ns == pytest.approx(13.86)
    assert (d.banks, d.idle_power_mw, d.peak_power_mw) == (8, 623, 3803)
    assert d.num_channels(512) == 64 and d.num_channels(15.9) == 1
    plan = pim.pim_plan(HardwareConfig(enable_attn_offloading=True, pim_config="DDR4_8GB_3200_pim", pim_mem_size_gb=512,
                                       pim_slope_ns=333.2538, pim_intercept_ns=30675.2739), load_model(), 2, 2, PIM_DIR)
    assert (plan.num_channels, plan.split, plan.bandwidth_gbps) == (64, 8, pytest.approx(1638.4))
    # Llama-3.1-8B: g = (32 / 8) / 4 = 1, q = 32 x 128 / 4096 = 1: the fit over 8 channels
    assert (plan.placement_a, plan.placement_b) == (pytest.approx(333.2538 / 8), pytest.approx(30675.2739 / 8))
    assert plan.io_bytes_per_decode == (2 * 32 + 2 * 8) * 128 * 2 == 20480 and not plan.derived


@pytest.mark.parametrize("name, gb, bw, lat", [("HBM2_1GB_2000_pim", 1, 32.0, 14.0),
                                               ("LPDDR4X_2GB_4266_pim", 2, 8.532, 16.848),
                                               ("LPDDR5_2GB_6400_pim", 2, 12.8, 10.625)])
def test_shipped_devices_geometry(name, gb, bw, lat):
    """The other shipped INIs against REFERENCE.md §1.11's table (1 GB / 32 GB/s / 14.0 ns; 2 GB /
    8.53 GB/s / 16.85 ns; 2 GB / 12.8 GB/s / 10.62 ns)."""
    d = pim.load_device(name, PIM_DIR)
    assert (d.channel_gb, d.channel_bw_gbps, d.read_latency_ns) == (gb, pytest.approx(bw), pytest.approx(lat))


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.replace("CL = 22\n", ""), r"bad.ini: CL: missing"),
    (lambda t: t.replace("[timing]\n", "[timing]\nrows = 4\n"), r"bad.ini:\d+: key 'rows' given twice"),
    (lambda t: t.replace("tCK = 0.63", "tCK = fast"), r"bad.ini: tCK: must be a number"),
    (lambda t: t.replace("bus_width = 64", "bus_width = 40"), r"bus_width: 40 is not a multiple of device_width 16"),
    (lambda t: t + "what\n", r"bad.ini:\d+: not a 'key = value' line"),
])
def test_ini_errors_name_the_file_and_key(tmp_path, edit, match):
    bad = tmp_path / "bad.ini"
    bad.write_text(edit((PIM_DIR / "DDR4_8GB_3200_pim.ini").read_text()))
    with pytest.raises(JaxsimInputError, match=match):
        pim.load_device(str(bad), PIM_DIR)


def test_unknown_device_lists_the_shipped_ones():
    assert pim.shipped_devices(PIM_DIR) == SHIPPED
    with pytest.raises(JaxsimInputError, match=r"hardware.pim_config: unknown PIM device 'DDR5_pim'.*DDR4_8GB_3200_pim"):
        pim.load_device("DDR5_pim", PIM_DIR)


# -------------------------------------------------------------------------- the derived model
def test_derived_model_against_the_reference_fits():
    """The derived coefficients (three global constants, fitted jointly on the reference's four
    per-device fits; README "PIM attention offload") and their documented errors: slope within
    1.1% on every device (leave-one-device-out within 1.9%), intercept within 15.7% (leave-one-out
    19.2%), a placement's time within 6.6% at 128 tokens of context and 1.5% at 2,048."""
    t = pim_fit.table(PIM_DIR)
    assert np.allclose(t["constants"], (pim.C_CLOCK, pim.C_STREAM, pim.C_WRITE), rtol=1e-4)
    rows = t["rows"]
    assert set(rows) == set(SHIPPED)
    documented = {  # slope err, slope LOO, intercept err, intercept LOO (README table), in %
        "DDR4_8GB_3200_pim": (-0.3, -0.5, 11.5, 16.8), "LPDDR4X_2GB_4266_pim": (-0.9, -1.5, -15.7, -19.2),
        "LPDDR5_2GB_6400_pim": (1.1, 1.9, 6.1, 8.5), "HBM2_1GB_2000_pim": (0.1, 1.7, -6.5, -8.3)}
    for n, (se, sl, ie, il) in documented.items():
        r = rows[n]
        got = (100 * r["error"][0], 100 * r["loo"][0], 100 * r["error"][1], 100 * r["loo"][1])
        assert np.allclose(got, (se, sl, ie, il), atol=0.051), (n, got)
        assert abs(r["time_error"][128]) <= 0.066 and abs(r["time_error"][2048]) <= 0.015
    # DDR4 by hand: 146.29 x 0.63 + 11.998 x 4096 / (25.6 x 8) = 332.12 ns/token; 3393.7 x 16 x 0.63 = 34,208 ns
    slope, intercept = pim.derived_coefficients(pim.load_device("DDR4_8GB_3200_pim", PIM_DIR))
    assert (round(slope, 2), round(intercept)) == (332.12, 34208)


def test_derived_model_needs_cwl(tmp_path):
    ini = tmp_path / "nocwl.ini"
    ini.write_text((PIM_DIR / "DDR4_8GB_3200_pim.ini").read_text().replace("CWL = 16\n", ""))
    with pytest.raises(JaxsimInputError, match=r"nocwl.ini: CWL: missing.*pim_slope_ns"):
        pim.derived_coefficients(pim.load_device(str(ini), PIM_DIR))


# --------------------------------------------------------------------- placement and schedule
def _layer(ctx, a, b, lat, channels, split, pad=0, k=None):
    ctx = np.asarray(ctx)
    load0 = np.r_[np.zeros(channels), np.full(pad, np.inf)]
    return int(LAYER(jnp.asarray(ctx), jnp.asarray(ctx > 0), a, b, lat, jnp.asarray(load0),
                     jnp.arange(k or split, dtype=jnp.float64), split))


def test_channel_assignment_by_hand():
    """Three decodes of contexts 10, 6, 4 (a slot without a decode between them), one placement =
    context x 1 ns, 2 placements each on 3 channels, longest first, each on the least-loaded channel:
    10 -> channels 0 and 1 (10, 10, 0); 6 -> channel 2 twice (0 + 6 = 6 is below 10) (10, 10, 12);
    4 -> channels 0 and 1 (14, 14, 12). The layer takes the largest load, 14, + the 0.5 ns latency,
    floored: 14. Padding channels (+inf) and a wider placement axis change nothing."""
    assert _layer([10, 0, 6, 4], 1.0, 0.0, 0.5, 3, 2) == 14
    assert _layer([4, 0, 6, 10], 1.0, 0.0, 0.5, 3, 2, pad=2, k=4) == 14
    # equal requests: two fill the 4 channels, the third doubles two of them; the intercept counts per placement
    assert _layer([8, 8, 8], 1.0, 2.0, 0.0, 4, 2) == 20
    # the reference's DDR4 fit on 64 channels, split 8: one decode at context 10 (the PIM run's request 0)
    assert _layer([10], 333.2538 / 8, 30675.2739 / 8, 13.86, 64, 8) == 4264 == int((333.2538 * 10 + 30675.2739) / 8
                                                                                   + 13.86)
    assert _layer([0, 0], 1.0, 1.0, 13.86, 64, 8) == 0  # no decode, no PIM work


def test_sub_batch_split_by_hand():
    """Tokens 1, 5, 0 (not scheduled), 3, 1, 1 in batch order: largest first (5, 3, then the 1s in
    batch order), each to the lighter side, ties to A: 5 -> A (5 | 0), 3 -> B (5 | 3), 1 (slot 0)
    -> B (5 | 4), 1 (slot 4) -> B (5 | 5), 1 (slot 5) -> A (6 | 5)."""
    side_a = np.asarray(SIDES(jnp.asarray([1, 5, 0, 3, 1, 1]), jnp.asarray([0, 1, 5, 2, 3, 4])))
    assert side_a.tolist() == [False, True, False, False, False, True]


def test_interleaved_iteration_by_hand():
    """Two halves, 2 layers; host ops 5 + 7; per half (A, B): prologue 10, 20; pre-attention 3, 4;
    NPU attention 2, 0; post-attention 30, 40; head 6, 8; PIM 50, 25. On one in-order NPU, the PIM
    work queued on one PIM:

        side by side (jaxsim): A's PIM(0) 18-68; B's 68-93 (queued behind A's); A's post(0) waits to
        68 -> 98, pre(1) + attention -> 103, PIM(1) 101-151; B's post(0) 103 -> 143, pre(1) -> 147,
        PIM(1) 151-176; A's post(1) waits to 151 -> 181; B's 181 -> 221; heads and host op: 242.
        serial (the reference): each PIM starts after its NPU attention: 246."""
    a = lambda x, y: jnp.asarray([x, y], jnp.int64)  # noqa: E731
    args = (5, 7, a(10, 20), a(3, 4), a(2, 0), a(30, 40), a(6, 8), a(50, 25), 2)
    assert int(INTERLEAVED(*args, False)) == 242
    assert int(INTERLEAVED(*args, True)) == 246
    # PIM far shorter than the other half's NPU work (the reference's runs): the NPU never waits, the
    # iteration is the two halves' NPU work back to back
    args = (5, 7, a(10, 20), a(3, 4), a(2, 0), a(30, 40), a(6, 8), a(1, 1), 2)
    assert int(INTERLEAVED(*args, True)) == 5 + 7 + 10 + 20 + 2 * (3 + 2 + 30 + 4 + 40) + 6 + 8


# --------------------------------------------------------------------------- configuration
def _pim_json(tmp_path, node=None, inst=None):
    d = json.loads(PIM_JSON.read_text())
    d["nodes"][0].pop("power")  # (read by the power model, not here)
    for k, v in (node or {}).items():
        if v is None:
            d["nodes"][0]["cpu_mem"].pop(k)
        else:
            d["nodes"][0]["cpu_mem"][k] = v
    d["nodes"][0]["instances"][0].update(inst or {})
    p = tmp_path / "pim.json"
    p.write_text(json.dumps(d))
    return p


def _load(path, **hw):
    return load_cluster_json(path, HardwareConfig(**hw), SchedulerConfig(), Calibration(), LLAMA,
                             profiles_dir=PROFILES)[0]


def test_json_pim_fields(tmp_path):
    """The node's cpu_mem.pim_config and mem_size and the instance's flags (or the run's, the
    reference's command-line defaults) become the instance's hardware."""
    (spec,) = _load(_pim_json(tmp_path, inst={"enable_attn_offloading": True, "enable_sub_batch_interleaving": True}))
    hw = spec.hw
    assert (hw.enable_attn_offloading, hw.enable_sub_batch_interleaving) == (True, True)
    assert (hw.pim_config, hw.pim_mem_size_gb, hw.cpu_mem_bw_gbps) == ("DDR4_8GB_3200_pim", 512, 256)
    (spec,) = _load(_pim_json(tmp_path), enable_attn_offloading=True)
    assert spec.hw.enable_attn_offloading and not spec.hw.enable_sub_batch_interleaving


@pytest.mark.parametrize("node, inst, hw, where, match", [
    ({"pim_config": None}, {"enable_attn_offloading": True}, {}, r"nodes\[0\].cpu_mem.pim_config",
     "enable_attn_offloading.*no pim_config"),
    ({"pim_config": "DDR5_pim"}, {}, {}, r"nodes\[0\].cpu_mem.pim_config", "unknown PIM device.*HBM2_1GB_2000_pim"),
    ({}, {"enable_sub_batch_interleaving": True}, {}, r"instances\[0\].enable_sub_batch_interleaving",
     "enable_attn_offloading is false"),
    ({}, {"pp_size": 2, "num_npus": 2}, {"enable_attn_offloading": True}, r"instances\[0\].pp_size",
     "pipeline stages with PIM"),
])
def test_json_pim_errors_name_the_json_path(tmp_path, node, inst, hw, where, match):
    with pytest.raises(JaxsimInputError, match=f"{where}.*{match}"):
        _load(_pim_json(tmp_path, node, inst), **hw)


def test_hardware_pim_errors():
    with pytest.raises(JaxsimInputError, match="hardware.pim_intercept_ns: explicit PIM coefficients come in pairs"):
        HardwareConfig(pim_slope_ns=300.0)
    with pytest.raises(JaxsimInputError, match="hardware.pim_context: unknown PIM context 'decode'"):
        HardwareConfig(pim_context="decode")
    model = load_model()
    with pytest.raises(JaxsimInputError, match="hardware.pim_config: attention offloading needs a PIM device"):
        pim.pim_plan(HardwareConfig(enable_attn_offloading=True), model, 2, 2, PIM_DIR)
    with pytest.raises(JaxsimInputError, match="hardware.pim_mem_size_gb: 4 GB of host memory holds no "):
        pim.pim_plan(HardwareConfig(enable_attn_offloading=True, pim_config="DDR4_8GB_3200_pim", pim_mem_size_gb=4),
                     model, 2, 2, PIM_DIR)
