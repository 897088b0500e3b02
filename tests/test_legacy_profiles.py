"""Legacy-format profiles (REFERENCE.md §2.8, jaxsim/legacy_profiles.py): values hand-composed from
the CSV rows, the attention grid, the Mixtral MoE table, the whole iteration, and clear errors."""

import csv
import gzip
import math
import shutil
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxsim  # noqa: F401  (enables x64)
from jaxsim import config as config_lib
from jaxsim import simulator
from jaxsim.errors import JaxsimInputError
from jaxsim.latency import iteration_time, latency_tables
from jaxsim.legacy_profiles import load_legacy_bundle
from jaxsim.model import load_model_config
from jaxsim.profiles import known_hardware, load_profile_bundle
from jaxsim.spec import Calibration, HardwareConfig, SchedulerConfig, Workload

from _shared import LEGACY, LLAMA, MODELS, PROFILES, load_model

LLAMA70, MIXTRAL = "meta-llama/Llama-3.1-70B", "mistralai/Mixtral-8x7B-v0.1"
A6000 = LEGACY / "A6000" / LLAMA / "tp1"

_ONE = jax.jit(iteration_time)
_CACHE = {}


def _bundle(hardware, model, tp=1):
    key = (hardware, model, tp)
    if key not in _CACHE:
        m = load_model(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _CACHE[key] = (m, load_profile_bundle(PROFILES, hardware, m, tp=tp))
    return _CACHE[key]


def _open(path: Path):
    return gzip.open(path, "rt") if path.suffix == ".gz" else open(path)


def _layers(folder: Path) -> dict:
    """layer -> {tokens: ns} straight from layers.csv."""
    out = {}
    with _open(folder / "layers.csv") as f:
        for r in csv.DictReader(f):
            out.setdefault(r["layer_name"], {})[int(r["input"])] = int(r["latency(ns)"])
    return out


def _vidur(folder: Path):
    """(prefill {(chunk, kv): ms}, decode {(batch, kv): ms}) straight from attention.csv.gz."""
    pre, dec = {}, {}
    with _open(folder / "attention.csv.gz") as f:
        for r in csv.DictReader(f):
            c, kv, b = int(r["prefill_chunk_size"]), int(r["kv_cache_size"]), int(r["batch_size"])
            if r["is_prefill"] == "True":
                pre[(c, kv)] = float(r["time_stats.attn_prefill.mean"])
            else:
                dec[(b, kv)] = float(r["time_stats.attn_decode.mean"])
    return pre, dec


def _ns(ms):
    return max(1, round(ms * 1e6))


def _slice_value(at, pc, nd, kp, kvd):
    """The stored value at a grid point of the AttentionTable (pc, nd on their axes)."""
    i, j = int(np.searchsorted(at.pc_axis, pc)), int(np.searchsorted(at.nd_axis, nd))
    assert at.pc_axis[i] == pc and at.nd_axis[j] == nd and at.has_slice[i, j]
    r = list(at.kp_keys[i, j, : at.n_kp[i, j]]).index(kp)
    k = list(at.kvd_keys[i, j, r, : at.n_kvd[i, j, r]]).index(kvd)
    return int(at.values_ns[i, j, r, k])


# ----------------------------------------------------------------------------------- discovery
def test_known_hardware_lists_legacy_folders():
    known = known_hardware(PROFILES)
    assert {"legacy/A6000", "legacy/H100", "legacy/TPU-v6e-1", "RTXPRO6000"} <= set(known)
    assert "legacy" not in known and "clusters" not in known


def test_config_error_lists_legacy_hardware():
    with pytest.raises(JaxsimInputError, match=r"legacy/H100") as e:
        config_lib._hardware({"name": "legacy/B200"}, PROFILES)
    assert e.value.where == "hardware.name"


# ---------------------------------------------------------------------------------- dense rows
def test_dense_rows_map_by_name_and_sum():
    m, b = _bundle("legacy/A6000", LLAMA)
    raw = _layers(A6000)
    for t in (1, 100, 2048):
        i = t - 1  # keys are 1..2048
        assert b.dense["qkv_proj"].values_ns[i] == raw["q_proj"][t] + raw["k_proj"][t] + raw["v_proj"][t]
        assert b.dense["gate_up_proj"].values_ns[i] == raw["gate_proj"][t] + raw["up_proj"][t]
        assert b.dense["layernorm"].values_ns[i] == (raw["input_layernorm"][t] + raw["post_layernorm"][t]) // 2
        assert b.dense["rotary_emb"].values_ns[i] == raw["rope"][t]
        for name in ("embedding", "o_proj", "act_fn", "down_proj", "final_layernorm"):
            assert b.dense[name].values_ns[i] == raw[name][t]
        assert b.per_sequence["lm_head"].values_ns[i] == raw["lm_head"][t]  # keyed by rows = sequences
    assert list(b.dense["qkv_proj"].keys[:3]) == [1, 2, 3]
    assert "sampler" not in b.sequence["head"]  # not in the legacy format: skipped
    assert b.skew.enabled is False and b.engine_effective["max_num_batched_tokens"] == 2048


# ---------------------------------------------------------------------------------- attention
def test_attention_grid_points_are_csv_values():
    _, b = _bundle("legacy/A6000", LLAMA)
    at = b.attention
    pre, dec = _vidur(A6000)
    # decode: batch 1 at KV 32 and batch 256 at its largest KV (row endpoints are always kept)
    assert _slice_value(at, 0, 1, 0, 32) == _ns(dec[(1, 32)])
    kv_max = max(kv for (bb, kv) in dec if bb == 256)
    assert _slice_value(at, 0, 256, 0, kv_max) == _ns(dec[(256, kv_max)])
    # prefill: kv_cache_size counts the chunk, so chunk 512 at kv 1024 has history kp = 512
    assert _slice_value(at, 512, 0, 512, 0) == _ns(pre[(512, 1024)])
    assert _slice_value(at, 512, 0, 0, 0) == _ns(pre[(512, 512)])
    # a mixed slice holds prefill + decode
    assert _slice_value(at, 512, 2, 512, 32) == _ns(pre[(512, 1024)]) + _ns(dec[(2, 32)])
    # the kv < batch decode rows time a no-op and are dropped: batch 64's KV keys start at 64
    j = int(np.searchsorted(at.nd_axis, 64))
    assert at.kvd_keys[0, j, 0, 0] == 64 and dec[(64, 32)] < 0.004
    assert not at.has_slice[0, 0] and tuple(at.fallback[0, 0]) == (0, 1)


def test_iteration_time_is_the_hand_composed_sum():
    """A6000 Llama-3.1-8B tp1, kernels only: one decode at KV 32, then a mixed batch."""
    m, b = _bundle("legacy/A6000", LLAMA)
    hw = HardwareConfig(name="legacy/A6000", tp=1, cpu_mem_bw_gbps=math.inf, cpu_mem_latency_ns=0.0)
    tb = latency_tables(b, m, hw)
    raw = _layers(A6000)
    pre, dec = _vidur(A6000)

    def block(t):
        ln = (raw["input_layernorm"][t] + raw["post_layernorm"][t]) // 2
        return (2 * ln + raw["q_proj"][t] + raw["k_proj"][t] + raw["v_proj"][t] + raw["rope"][t] + raw["o_proj"][t]
                + raw["gate_proj"][t] + raw["up_proj"][t] + raw["act_fn"][t] + raw["down_proj"][t])

    def once(t, s):
        return raw["embedding"][t] + raw["final_layernorm"][t] + raw["lm_head"][s]

    t, ext = _ONE(tb, 1, 1, 0, 0, 1, 32, 32, 32)  # T, S, pc, kp, nd, kvd sum/min/max
    assert int(t) == once(1, 1) + 32 * (block(1) + _ns(dec[(1, 32)]))
    assert [int(x) for x in ext] == [0, 0, 0, 0]
    # 512-token chunk over 512 history + 2 decodes at KV 32: T = 514, S = 3
    t, _ = _ONE(tb, 514, 3, 512, 512, 2, 64, 32, 32)
    assert int(t) == once(514, 3) + 32 * (block(514) + _ns(pre[(512, 1024)]) + _ns(dec[(2, 32)]))


def test_attn_rows_fallback_without_attention_csv(llama):
    m = llama
    with pytest.warns(UserWarning, match="no attention.csv.*'attn' rows"):
        b = load_legacy_bundle(PROFILES, "legacy/H100", m, tp=2)
    raw = _layers(LEGACY / "H100" / LLAMA / "tp2")
    at = b.attention
    assert _slice_value(at, 100, 3, 0, 0) == raw["attn"][103]  # attn(pc + nd), KV ignored
    assert _slice_value(at, 0, 1, 0, 0) == raw["attn"][1]


# ----------------------------------------------------------------------------------------- MoE
def test_mixtral_moe_table_is_per_expert_load():
    m, b = _bundle("legacy/H100", MIXTRAL, tp=4)
    assert b.sequence["mlp_moe"] == ["moe"] and b.sequence["mlp_dense"] == []
    raw = _layers(LEGACY / "H100" / MIXTRAL / "tp4")
    # ep = tp = 4, k = 2: local fraction f = 1 - (3/4)^2 = 7/16, k_loc = (2/4)/f = 8/7. 112 local
    # tokens on 2 activated experts: T = 112/f = 256 through the router, 112*8/7/2 = 64 per expert.
    ffn = sum(raw[p][64] for p in ("expert.w1", "expert.w3", "act_fn", "expert.w2"))
    mo = b.moe
    assert list(mo.ae_axis) == list(range(1, 9))
    assert mo.values_ns[1, 111] == raw["gate"][256] + 2 * ffn
    assert mo.token_keys[1, 111] == 112
    tb = latency_tables(b, m, HardwareConfig(name="legacy/H100", tp=4))  # builds for the engine
    assert int(tb.moe_blocks) == m.num_layers


# -------------------------------------------------------------------------------------- errors
def test_tpu_missing_kv_projections_raise_naming_the_file(llama):
    m = llama
    with pytest.raises(JaxsimInputError, match=r"TPU-v6e-1/.*/tp1/layers\.csv: no rows for layer\(s\) 'k_proj', "
                                               r"'v_proj'.*qkv_proj") as e:
        load_profile_bundle(PROFILES, "legacy/TPU-v6e-1", m)
    assert "up_proj" not in e.value.problem and "act_fn" not in e.value.problem  # those gaps pass the checks


def test_folder_without_attention_raises():
    m = load_model_config(MODELS, MIXTRAL)
    with pytest.raises(JaxsimInputError, match=r"Mixtral-8x7B-v0.1/tp1/attention\.csv: missing.*'attn'.*\[4\]"):
        load_profile_bundle(PROFILES, "legacy/H100", m, tp=1)


def test_unknown_hardware_tp_and_variant(llama):
    m = llama
    with pytest.raises(JaxsimInputError, match=r"unknown hardware 'legacy/B200'.*legacy/H100"):
        load_profile_bundle(PROFILES, "legacy/B200", m)
    with pytest.raises(JaxsimInputError, match=r"A6000/meta-llama/Llama-3.1-8B/tp2: TP degree 2.*\[1\]"):
        load_profile_bundle(PROFILES, "legacy/A6000", m, tp=2)
    with pytest.raises(JaxsimInputError, match=r"no variant 'fp8'"):
        load_profile_bundle(PROFILES, "legacy/A6000", m, variant="fp8")
    with pytest.raises(JaxsimInputError, match=r"no legacy profiles of model 'meta-llama/Llama-3.1-70B' on A6000"):
        load_profile_bundle(PROFILES, "legacy/A6000", load_model_config(MODELS, LLAMA70))


@pytest.fixture
def legacy_copy(tmp_path):
    """A writable copy of the A6000 folder (and the architectures) under tmp_path."""
    shutil.copytree(PROFILES / "architectures", tmp_path / "architectures")
    dst = tmp_path / "legacy" / "A6000" / LLAMA / "tp1"
    shutil.copytree(A6000, dst)
    return tmp_path, dst


def test_bad_files_are_named(legacy_copy, llama):
    root, folder = legacy_copy
    m = llama
    layers = folder / "layers.csv"
    text = layers.read_text().splitlines()
    layers.write_text("\n".join(text[:5] + ["q_proj,abc,0,1,100"] + text[6:]) + "\n")
    with pytest.raises(JaxsimInputError, match=r"tp1/layers\.csv:6: column 'input' = 'abc'"):
        load_profile_bundle(root, "legacy/A6000", m)
    layers.write_text("\n".join(t for t in text if not t.startswith("v_proj,")) + "\n")
    with pytest.raises(JaxsimInputError, match=r"tp1/layers\.csv: no rows for layer\(s\) 'v_proj'"):
        load_profile_bundle(root, "legacy/A6000", m)
    layers.write_text("\n".join(text[:2] + [text[2].replace(",1,", ",2,")] + text[3:]) + "\n")
    with pytest.raises(JaxsimInputError, match=r"tp1/layers\.csv:3: tp_size 2 in the tp1 folder"):
        load_profile_bundle(root, "legacy/A6000", m)
    layers.unlink()
    with pytest.raises(JaxsimInputError, match=r"tp1/layers\.csv: missing profile table"):
        load_profile_bundle(root, "legacy/A6000", m)
    shutil.copy(A6000 / "layers.csv", layers)
    att = folder / "attention.csv.gz"
    att.write_bytes(b"not gzip")
    with pytest.raises(JaxsimInputError, match=r"tp1/attention\.csv\.gz: unreadable file"):
        load_profile_bundle(root, "legacy/A6000", m)
    with gzip.open(att, "wt") as f:
        f.write("batch_size,prefill_chunk_size,kv_cache_size,is_prefill\n1,32,32,True\n")
    with pytest.raises(JaxsimInputError, match=r"tp1/attention\.csv\.gz:1: neither the Vidur-style"):
        load_profile_bundle(root, "legacy/A6000", m)


def test_repeated_points_and_outliers(legacy_copy, llama):
    """A layers.csv point given twice is an error naming both lines. The shipped attention files
    time ~300 points twice each (within 1.25%): repeats within 10% are accepted, a repeat that
    disagrees more is an error naming both lines. A point 4x off its neighbours is kept, listed
    and warned about once."""
    root, folder = legacy_copy
    layers = folder / "layers.csv"
    text = layers.read_text()
    layers.write_text(text + "o_proj,5,0,1,999999\n")
    n = len(text.splitlines()) + 1
    with pytest.raises(JaxsimInputError) as e:
        load_profile_bundle(root, "legacy/A6000", llama)
    assert e.value.where == f"{layers}:{n}"
    assert e.value.problem.startswith(f"layer 'o_proj' at input = 5 is profiled twice (lines 69 and {n})")
    lines = text.splitlines()
    lines[68] = "o_proj,5,0,1,999999"  # 50,197 ns between 50,489 and 50,623
    layers.write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match=r"tp1: 1 profile point\(s\) more than 4x above or below"):
        b = load_profile_bundle(root, "legacy/A6000", llama)
    assert b.outliers == [f"{layers}:69 o_proj input=5 latency(ns)=999999 (neighbours 50489, 50623)"]
    layers.write_text(text)
    att = folder / "attention.csv.gz"
    with gzip.open(att, "rt") as f:
        rows = f.read().splitlines()
    # line 131 repeats line 116 (chunk 128 over no history, 9.866 us): make it 20% slower
    assert rows[130].split(",")[10:] == rows[115].split(",")[10:]
    fields = rows[130].split(",")
    fields[2] = "0.0118"
    rows[130] = ",".join(fields)
    with gzip.open(att, "wt") as f:
        f.write("\n".join(rows) + "\n")
    with pytest.raises(JaxsimInputError) as e:
        load_profile_bundle(root, "legacy/A6000", llama)
    assert e.value.where == f"{att}:131"
    assert e.value.problem == ("the prefill of chunk 128 over 0 history tokens is measured twice, 9866 ns at line "
                               "116 and 11800 ns here: repeated measurements of a point must agree within 10%")


# ------------------------------------------------------------------------------ one simulation
def test_simulation_runs_on_legacy_hardware():
    """One request end to end on legacy/A6000: the first iteration is the whole prompt."""
    m, b = _bundle("legacy/A6000", LLAMA)
    hw = HardwareConfig(name="legacy/A6000", mem_size_gb=48.0, tp=1)
    w = Workload(arrival_ns=np.array([0], np.int64), input_toks=np.array([100], np.int32),
                 output_toks=np.array([3], np.int32), token_ids=[None])
    res = simulator.simulate(w, m, hw, SchedulerConfig(max_num_seqs=4), calib=Calibration.none(),
                             profiles_dir=str(PROFILES), max_slots=8)
    tb = latency_tables(b, m, hw)
    first = int(_ONE(tb, 100, 1, 100, 0, 0, 0, 0, 0)[0])
    assert int(res.iter_end_ns[0] - res.iter_start_ns[0]) == first
    assert res.first_token_ns[0] == first and res.finish_ns[0] > first
