"""Hydra composition of every option of every group, and bad-value errors (no JAX)."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from jaxsim import config as jconfig
from jaxsim.errors import JaxsimInputError
from jaxsim.metrics import OutputOptions
from jaxsim.spec import Calibration, HardwareConfig, KVTierConfig, LinkConfig, ModelRuntimeConfig, SchedulerConfig, Workload

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
GROUPS = ("hardware", "model", "scheduler", "workload", "calibration")
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


def make(overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def spec(overrides=()):
    return jconfig.from_hydra(make(overrides))


def test_conf_dir_and_root():
    assert jconfig.CONF_DIR == CONF and jconfig.PROJECT_ROOT == ROOT
    assert {g for g, _ in OPTIONS} == set(GROUPS)
    assert len(OPTIONS) >= 12


def test_defaults():
    r = spec()
    assert r.hardware == HardwareConfig()  # conf/hardware/rtxpro6000 == the spec defaults
    assert r.scheduler == SchedulerConfig()
    assert r.model == ModelRuntimeConfig(name="meta-llama/Llama-3.1-8B")
    assert r.calibration == Calibration()
    assert r.sim == jconfig.SimOptions(max_slots=0, record_token_times=True, max_iterations=0, progress=True,
                                       compile_cache=True, compile_cache_dir=None)
    assert r.output == OutputOptions(requests_format="auto", itl_lists=False, reference_csv=False)
    assert r.paths.root == ROOT
    assert r.paths.profiles == ROOT / "profiles"
    assert r.paths.models == ROOT / "profiles" / "models"
    assert r.paths.workloads == ROOT / "profiles" / "workloads"
    assert isinstance(r.workload, Workload) and r.workload.num_requests == 300
    assert r.model_config.max_position_embeddings == 131072
    assert r.output_dir is None  # ${hydra:runtime.output_dir} needs a @hydra.main run
    assert r.config["scheduler"]["max_num_seqs"] == 128
    assert r.config["paths"]["workloads"] == str(ROOT / "profiles" / "workloads")


@pytest.mark.parametrize("group, option", OPTIONS)
def test_every_option_composes(group, option):
    r = spec([f"{group}={option}"])
    assert isinstance(r.hardware, HardwareConfig)
    assert isinstance(r.scheduler, SchedulerConfig)
    assert isinstance(r.model, ModelRuntimeConfig)
    assert isinstance(r.calibration, Calibration)
    w = r.workload
    assert isinstance(w, Workload) and w.num_requests > 0
    assert w.arrival_ns.dtype == np.int64 and w.input_toks.dtype == np.int32
    assert np.all(w.output_toks >= 1)
    for obj in (r.hardware, r.scheduler, r.model, r.calibration, r.sim):
        hash(obj)  # frozen, hashable: usable as jit static arguments
        for v in vars(obj).values():
            assert isinstance(v, (int, float, str, bool, type(None)))


def test_option_values():
    assert spec(["hardware=rtxpro6000_tp2"]).hardware.tp == 2
    hw = spec(["hardware=rtx4090"]).hardware
    assert (hw.name, hw.mem_size_gb, hw.cpu_mem_bw_gbps) == ("RTX4090", 24, 50)
    assert spec(["model=qwen3_32b"]).model.name == "Qwen/Qwen3-32B"
    assert not spec(["scheduler=no_prefix_cache"]).scheduler.enable_prefix_caching
    assert spec(["workload=example"]).workload.num_requests == 10
    g = spec(["workload=synthetic_gamma"]).workload
    assert g.num_requests == 300 and g.source.startswith("synthetic(")
    assert (g.input_toks > 512).mean() > 0.3  # the shared prefix is prepended


def test_overrides():
    r = spec(["scheduler.max_num_seqs=0", "hardware.num_gpu_blocks=1000", "workload=example",
              "workload.num_requests=4", "workload.shift_ns=5", "sim.max_slots=64",
              "calibration.iteration_overhead_ns=1500"])
    assert r.scheduler.max_num_seqs == 0 and r.hardware.num_gpu_blocks == 1000
    assert r.workload.num_requests == 4 and int(r.workload.arrival_ns[0]) == 46926808 + 5
    assert r.sim.max_slots == 64 and r.calibration.iteration_overhead_ns == 1500
    # a workload file given by absolute path, and the synthetic generator's trace lengths
    path = ROOT / "profiles" / "workloads" / "example_trace.jsonl"
    assert spec([f"workload.path={path}"]).workload.num_requests == 10
    t = spec(["workload=synthetic_poisson", "workload.num_requests=20",
              "workload.input_len.kind=trace", "+workload.input_len.path=example_trace.jsonl"]
             ).workload
    assert set(t.input_toks.tolist()) <= {10, 22, 16, 4} | set(
        spec(["workload=example"]).workload.input_toks.tolist())


def test_paths_override(tmp_path):
    r = spec([f"paths.workloads={ROOT / 'profiles' / 'workloads'}", f"paths.root={ROOT}"])
    assert r.paths.workloads == ROOT / "profiles" / "workloads"
    with pytest.raises(JaxsimInputError, match=r"^paths\.profiles: .* is not a directory"):
        spec([f"paths.root={tmp_path}"])


@pytest.mark.parametrize("override, message", [
    ("scheduler.max_num_seqs=-3", "scheduler.max_num_seqs: must be >= 0, got -3"),
    ("scheduler.max_num_batched_tokens=-1", "scheduler.max_num_batched_tokens: must be >= 0"),
    ("scheduler.block_size=0", "scheduler.block_size: must be >= 1, got 0"),
    ("scheduler.block_size=100000", "scheduler.block_size: 100000 is not a block size vLLM accepts (one of 1, 8,"),
    ("scheduler.max_num_batched_tokens=1", "scheduler.max_num_batched_tokens: 1 is smaller than max_num_seqs (128): "
                                           "vLLM refuses this at start-up"),
    ("scheduler.long_prefill_token_threshold=-2", "scheduler.long_prefill_token_threshold:"),
    ("hardware.mem_util=1.5", "hardware.mem_util: must be <= 1, got 1.5"),
    ("hardware.mem_util=0", "hardware.mem_util: must be > 0"),
    ("hardware.mem_size_gb=-96", "hardware.mem_size_gb: must be > 0"),
    ("hardware.tp=0", "hardware.tp: must be >= 1, got 0"),
    ("hardware.num_gpu_blocks=0", "hardware.num_gpu_blocks: must be >= 1, got 0"),
    ("hardware.activation_reserve_gb=90", "hardware.activation_reserve_gb:"),
    ("hardware.name=H100", "hardware.name: no profiles for hardware 'H100'"),
    ("model.name=foo/bar", "model.name: unknown model 'foo/bar'"),
    ("model.dtype=float7", "model.dtype: unknown dtype 'float7'"),
    ("model.max_model_len=-1", "model.max_model_len: must be >= 0"),
    ("model.max_model_len=200000", "model.max_model_len: 200000 exceeds"),
    ("calibration.iteration_overhead_ns=-5", "calibration.iteration_overhead_ns: must be >= 0"),
    ("sim.max_slots=-1", "sim.max_slots: must be >= 0, got -1"),
    ("sim.max_iterations=-1", "sim.max_iterations: must be >= 0"),
    ("workload.kind=stream", "workload.kind: unknown workload kind 'stream'"),
    ("workload.path=missing.jsonl", "workload.path: workload file 'missing.jsonl' not found"),
    ("workload.num_requests=-1", "workload.num_requests: must be >= 0"),
    ("workload.shift_ns=-1", "workload.shift_ns: must be >= 0"),
])
def test_bad_values(override, message):
    with pytest.raises(JaxsimInputError) as e:
        spec([override])
    assert str(e.value).startswith(message), str(e.value)


@pytest.mark.parametrize("overrides, message", [
    (["workload.rate_rps=0"], "workload.rate_rps: must be > 0"),
    (["workload.arrival=uniform"], "workload.arrival: unknown arrival process"),
    (["workload.num_requests=0"], "workload.num_requests: must be >= 1"),
    (["workload.cv=-1"], "workload.cv: must be > 0"),
    (["workload.prefix_fraction=2"], "workload.prefix_fraction: must be in [0, 1]"),
    (["workload.input_len.sigma=-1"], "workload.input_len.sigma: must be >= 0"),
    (["workload.output_len.kind=zipf"], "workload.output_len.kind: unknown length"),
    (["workload.input_len.max=1"], "workload.input_len.max: must be >="),
])
def test_bad_synthetic_values(overrides, message):
    with pytest.raises(JaxsimInputError) as e:
        spec(["workload=synthetic_poisson"] + overrides)
    assert str(e.value).startswith(message), str(e.value)


def test_context_and_chunking_checks():
    with pytest.raises(JaxsimInputError) as e:
        spec(["model.max_model_len=1000"])
    assert "sharegpt-llama-3.1-8b-300-sps10.jsonl:1" in str(e.value)
    assert "model.max_model_len is 1000" in str(e.value)
    with pytest.raises(JaxsimInputError, match="^scheduler.max_num_batched_tokens: 2048 is "
                                               "smaller than the longest prompt"):
        spec(["scheduler.enable_chunked_prefill=false"])
    assert not spec(["scheduler.enable_chunked_prefill=false",
                     "scheduler.max_num_batched_tokens=0"]).scheduler.enable_chunked_prefill


def test_unprofiled_pair():
    with pytest.raises(JaxsimInputError, match="^model.name: no profiles for 'Qwen/Qwen3-32B' on "
                                               "'RTX4090'"):
        spec(["hardware=rtx4090", "model=qwen3_32b"])


def test_schema_type_errors_at_compose():
    # the structured schema rejects wrong types and unknown keys while composing
    with pytest.raises(ConfigCompositionException, match="scheduler.max_num_seqs=abc"):
        make(["scheduler.max_num_seqs=abc"])
    with pytest.raises(ConfigCompositionException, match="max_num_seq"):
        make(["scheduler.max_num_seq=3"])


# Config group -> the dataclass it is: its Hydra schema must have exactly the dataclass's fields
# (every field overridable without "+", nothing else accepted). Documented exceptions, sections
# without a dataclass of their own: `workload` (a trace file or synthetic_workload's arguments),
# `sweep` (-> SweepOptions, a flat slo), `cluster` (-> ClusterSpec: instance entries, routing),
# `paths` (-> Paths, with interpolations), `power` (-> jaxsim.power.PowerConfig: a node block keyed
# by hardware, checked by jaxsim.power.node_power) and `output_dir`.
SPEC_GROUPS = {"hardware": HardwareConfig, "model": ModelRuntimeConfig, "scheduler": SchedulerConfig,
               "calibration": Calibration, "sim": jconfig.SimOptions, "output": OutputOptions, "kv_tier": KVTierConfig}
OTHER_SECTIONS = {"workload", "sweep", "cluster", "paths", "power", "output_dir", "distributed"}
# A valid value for every field, other than the default where the rest of the config allows it.
OVERRIDES = {
    "hardware": dict(name="RTX4090", mem_size_gb=24.0, mem_util=0.8, num_gpu_blocks=1000, activation_reserve_gb=1.5,
                     tp=2, link_bw_gbps=64.0, link_latency_ns=500.0, cpu_mem_bw_gbps=50.0, cpu_mem_latency_ns=10.0,
                     ep=2, pp=2, weights_offload_fraction=0.25, weights_offload_device="cxl", offload_bw_gbps=60.0,
                     offload_latency_ns=250.0, kv_offload_device="cxl", kv_offload_capacity_gb=128.0,
                     # (PIM attention offloading needs pp = 1: off here, its other fields set)
                     enable_attn_offloading=False, pim_config="HBM2_1GB_2000_pim", pim_mem_size_gb=256.0,
                     enable_sub_batch_interleaving=False, pim_slope_ns=300.0, pim_intercept_ns=20000.0,
                     pim_context="prompt", pim_overlap=False, peak_tflops=500.0, mem_bw_gbs=2000.0),
    "model": dict(name="meta-llama/Llama-3.1-8B", dtype="bfloat16", kv_cache_dtype="fp8", max_model_len=100000,
                  expert_routing="balanced", expert_zipf_s=0.5, expert_seed=3),
    "scheduler": dict(max_num_seqs=64, max_num_batched_tokens=4096, enable_chunked_prefill=False,
                      long_prefill_token_threshold=512, reserve_full_isl=False, enable_prefix_caching=False,
                      block_size=32, async_scheduling=False, reserve_null_block=False,
                      prefix_stats_every_attempt=False, prefix_index_all_copies=False),
    "calibration": dict(iteration_overhead_ns=1, first_token_delay_ns=2, token_output_delay_ns=3, step_cpu_ns=4,
                        seq_cpu_ns=5),
    "kv_tier": dict(storage="cxl", enable_prefix_sharing=True, capacity_gb=64.0, bandwidth_gbps=32.0, latency_ns=300.0,
                    chunk_size=512, min_gain="chunk"),
    "sim": dict(max_slots=64, record_token_times=False, max_iterations=1000, progress=False, compile_cache=False,
                compile_cache_dir="/tmp/jaxsim-cache"),
    "output": dict(requests_format="csv", itl_lists=True, reference_csv=True),
}


def test_schema_fields_are_the_spec_fields():
    """The drift test: Hydra's schema of each group is its dataclass, field for field."""
    cfg = make()
    assert set(cfg) == set(SPEC_GROUPS) | OTHER_SECTIONS
    for group, cls in SPEC_GROUPS.items():
        fields = {f.name for f in dataclasses.fields(cls)}
        assert set(cfg[group]) == fields, group
        assert set(OVERRIDES[group]) == fields, group
    from jaxsim.distributed import DistributedOptions  # validated by jaxsim.distributed, not spec.build
    assert set(cfg["distributed"]) == {f.name for f in dataclasses.fields(DistributedOptions)}


def test_every_spec_field_overrides_from_the_command_line():
    """Each field of each group, set without "+", reaches the built dataclass."""
    overrides = ["workload=example"] + [f"{g}.{k}={'null' if v is None else v}"
                                        for g, values in OVERRIDES.items() for k, v in values.items()]
    r = spec(overrides)
    got = {"hardware": r.hardware, "model": r.model, "scheduler": r.scheduler, "calibration": r.calibration,
           "sim": r.sim, "output": r.output, "kv_tier": r.kv_tier}
    for group, cls in SPEC_GROUPS.items():
        assert got[group] == cls(**OVERRIDES[group]), group


def test_hardware_pp_on_the_command_line():
    assert spec(["hardware.pp=2"]).hardware == HardwareConfig(pp=2)
    with pytest.raises(JaxsimInputError, match=r"^hardware\.pp: must be >= 1, got 0"):
        spec(["hardware.pp=0"])
    with pytest.raises(ConfigCompositionException):  # removed: nothing read it
        make(["hardware.mem_bw_gbps=1597"])


def test_command_line_typos_are_named_before_hydra():
    """scripts/run.py and sweep.py check override keys first: Hydra's own message would advise `+`."""
    with pytest.raises(JaxsimInputError, match=r"^scheduler\.max_num_seq: unknown field \(did you mean 'max_num_seqs'"):
        jconfig.check_cli_overrides(["hardware=rtx4090", "scheduler.max_num_seq=8"])
    with pytest.raises(JaxsimInputError, match=r"^sweep\.axis: unknown field \(did you mean 'axes'"):
        jconfig.check_cli_overrides(["-m", "sweep.axis.x=[1,2]"])
    with pytest.raises(JaxsimInputError, match=r"^output\.itl_list: unknown field \(did you mean 'itl_lists'"):
        jconfig.check_cli_overrides(["output.itl_list=true"])
    # valid keys, free-form mappings, + and ~, Hydra's keys and flags pass (Hydra reads them)
    jconfig.check_cli_overrides(["scheduler.max_num_seqs=8", "workload.input_len.kind=fixed", "+x.y=1", "~sim",
                                 "hydra.run.dir=/tmp", "hydra/launcher=basic", "--cfg", "job", "sweep.axes.tp=[1,2]"])


def test_cluster_links_from_the_command_line():
    """cluster.links has LinkConfig's fields (None: the default, or a cluster JSON's value), so one
    link setting overrides without `+`, and a cluster JSON's links are replaced field by field."""
    assert spec(["cluster=pair", "cluster.links.intra_node_bw_gbps=3"]).cluster.links == LinkConfig(
        intra_node_bw_gbps=3.0)
    assert spec(["cluster=pair", "cluster.links={inter_node_latency_ns:5}"]).cluster.links == LinkConfig(
        inter_node_latency_ns=5.0)
    # single_node_pd_instance.json: the reference's default links; one field replaced, the rest kept
    c = spec(["cluster=reference_json", "cluster.json=${paths.profiles}/clusters/single_node_pd_instance.json",
              "cluster.links.kv_transfer=after_prefill"]).cluster
    assert c.links == LinkConfig(16.0, 20000.0, 16.0, 20000.0, kv_transfer="after_prefill")
    with pytest.raises(JaxsimInputError, match=r"^cluster\.links\.intra_bw: unknown field \(did you mean "
                                               r"'intra_node_bw_gbps'"):
        jconfig.check_cli_overrides(["cluster.links={intra_bw:3}"])


def test_a_bad_model_config_names_its_file_and_field(tmp_path):
    """An error in the HF config.json of model.name keeps the file and the field (it used to read
    "model.name: must be a whole number >= 1, got 0", naming neither)."""
    d = json.loads((ROOT / "profiles" / "models" / "meta-llama" / "Llama-3.1-8B.json").read_text())
    d["num_key_value_heads"] = 0
    (tmp_path / "meta-llama").mkdir()
    (tmp_path / "meta-llama" / "Llama-3.1-8B.json").write_text(json.dumps(d))
    with pytest.raises(JaxsimInputError, match=rf"^model\.name: {tmp_path}/meta-llama/Llama-3.1-8B.json: "
                                               r"num_key_value_heads: must be a whole number >= 1, got 0"):
        spec([f"paths.models={tmp_path}"])


def test_links_without_pd_hand_offs_are_reported_unused():
    with pytest.warns(UserWarning, match=r"cluster.links \(intra_node_bw_gbps\) set, but no instance has a prefill or "
                                         r"decode role: the links only carry prefill -> decode KV hand-offs"):
        spec(["cluster=pair", "cluster.links.intra_node_bw_gbps=64"])
    with pytest.warns(UserWarning, match=r"set, but the run has one instance"):
        spec(["cluster.links.inter_node_latency_ns=5"])


def test_power_group_gives_every_node_a_block():
    from types import SimpleNamespace

    from jaxsim import power
    s = spec(["power=a6000_server", "hardware=A6000_legacy"])
    assert s.power.default.npu["A6000"].active_power > s.power.default.npu["A6000"].standby_power > 0
    assert s.power.default_cpu_mem_gb == 128 and s.power.block(3) is s.power.default
    capped = spec(["power=reference_example", "power.power_cap=400"]).power.default.npu["RTXPRO6000"]
    assert capped.power_cap == 400 and capped.busy_power == 400
    assert spec().power is None  # power=none
    with pytest.raises(JaxsimInputError, match=r"power\.power_cap.*no node has a power block"):
        spec(["power.power_cap=300"])
    with pytest.raises(JaxsimInputError, match=r"power\.npu\.RTXPRO6000\.active_pwr.*unknown field"):
        spec(["power=reference_example", "+power.npu.RTXPRO6000.active_pwr=1"])
    with pytest.raises(JaxsimInputError, match=r"power\.dram.*host memory size is unknown"):
        plan = SimpleNamespace(node=0, power=None, tables=SimpleNamespace(ep=1))  # a node without cpu_mem_size
        power.host_info([plan], power.PowerConfig(default=spec(["power=reference_example"]).power.default))
