"""Cluster descriptions (jaxsim/cluster_config.py): the Hydra `cluster` group and the reference
cluster JSON importer, with their errors (no JAX compile)."""

import dataclasses
import json

import pytest

from jaxsim.cluster_config import check_dp_groups, load_cluster_json
from jaxsim.engine.routing import Router
from jaxsim.errors import JaxsimInputError
from jaxsim.spec import Calibration, HardwareConfig, LinkConfig, SchedulerConfig

from _shared import CLUSTERS, LLAMA, MODELS, PROFILES, WORKLOADS
from test_config import spec  # Hydra compose + from_hydra


def _load(name, **kw):
    return load_cluster_json(CLUSTERS / name, HardwareConfig(), SchedulerConfig(), Calibration(), LLAMA, **kw)[0]


def test_reference_json_instances():
    a, b = _load("single_node_multi_instance.json")
    assert a == b
    assert a.hw == dataclasses.replace(HardwareConfig(), mem_size_gb=96.0, link_bw_gbps=16.0,
                                       link_latency_ns=20000.0, cpu_mem_bw_gbps=256.0)
    assert a.sched == SchedulerConfig()
    r = _load("rtx4090_multi_instance.json")
    assert [x.hw.name for x in r] == ["RTX4090", "RTX4090"]
    assert r[0].hw.mem_util == 0.833919 and r[0].hw.mem_size_gb == 24 and r[0].hw.link_latency_ns == 1000
    assert r[0].hw.cpu_mem_bw_gbps == 50
    # Two nodes: each instance on its node's index.
    dual = _load("dual_node_multi_instance.json")
    assert [x.node for x in dual] == [0, 0, 1, 1] and {x.role for x in dual} == {"colocated"}


def test_reference_json_pd_roles_and_link_levels(tmp_path):
    specs, links = load_cluster_json(CLUSTERS / "single_node_pd_instance.json", HardwareConfig(), SchedulerConfig(),
                                     Calibration(), LLAMA)
    assert [x.role for x in specs] == ["prefill", "decode"] and [x.node for x in specs] == [0, 0]
    assert links == LinkConfig(16.0, 20000.0, 16.0, 20000.0)
    # per-instance scheduler knobs: prefill MNBT 8192 / 32 seqs; decode unlimited MNBT, 256 seqs, no chunking
    pd, _ = load_cluster_json(CLUSTERS / "single_node_pd_per_instance_config.json", HardwareConfig(),
                              SchedulerConfig(), Calibration(), LLAMA)
    assert [x.role for x in pd] == ["prefill", "decode"]
    assert (pd[0].sched.max_num_batched_tokens, pd[0].sched.max_num_seqs) == (8192, 32)
    assert (pd[1].sched.max_num_batched_tokens, pd[1].sched.max_num_seqs) == (256, 256)
    assert pd[0].sched.long_prefill_token_threshold == 2048 and pd[1].sched.long_prefill_token_threshold == 0
    # a per-dimension link list: [within a node, between nodes]
    d = json.loads((CLUSTERS / "dual_node_multi_instance.json").read_text())
    d["link_bw"], d["link_latency"] = [128, 16], [500, 20000]
    two = tmp_path / "two.json"
    two.write_text(json.dumps(d))
    specs, links = load_cluster_json(two, HardwareConfig(), SchedulerConfig(), Calibration(), LLAMA)
    assert links == LinkConfig(128.0, 500.0, 16.0, 20000.0)
    assert specs[0].hw.link_bw_gbps == 128.0  # TP collectives stay within the instance's node


def test_reference_json_dp_group_across_nodes():
    """Two TP-2 instances on two nodes in DP group A with EP 4 (= tp x dp) over [128, 16] GB/s links."""
    specs, links = load_cluster_json(CLUSTERS / "dual_node_moe_dp_ep_intra_inter_instance.json", HardwareConfig(),
                                     SchedulerConfig(), Calibration(), "Qwen/Qwen3-30B-A3B-Instruct-2507")
    assert [(x.dp_group, x.node, x.hw.tp, x.hw.ep) for x in specs] == [("A", 0, 2, 4), ("A", 1, 2, 4)]
    assert links == LinkConfig(128.0, 500.0, 16.0, 20000.0)
    check_dp_groups(specs, "x")  # ep 4 = 2 ranks x tp 2
    with pytest.raises(JaxsimInputError, match=r"x\[0\].ep"):
        check_dp_groups([dataclasses.replace(specs[0], dp_group=None)], "x")  # ep 4 > tp 2 without the group


def test_reference_json_pipeline_and_refusals(tmp_path):
    d = json.loads((CLUSTERS / "single_node_multi_instance.json").read_text())
    d["nodes"][0]["instances"][0].update(pp_size=2, num_npus=2)
    pp = tmp_path / "pp.json"
    pp.write_text(json.dumps(d))
    specs, _ = load_cluster_json(pp, HardwareConfig(), SchedulerConfig(), Calibration(), LLAMA)
    assert [(x.hw.tp, x.hw.pp) for x in specs] == [(1, 2), (1, 1)]
    d["nodes"][0]["instances"][0].update(num_npus=3)
    pp.write_text(json.dumps(d))
    with pytest.raises(JaxsimInputError, match=r"instances\[0\].num_npus"):
        load_cluster_json(pp, HardwareConfig(), SchedulerConfig(), Calibration(), LLAMA)
    with pytest.raises(JaxsimInputError, match="but the run's model is"):
        load_cluster_json(CLUSTERS / "single_node_multi_instance.json", HardwareConfig(), SchedulerConfig(),
                          Calibration(), "Qwen/Qwen3-32B")
    d = json.loads((CLUSTERS / "single_node_multi_instance.json").read_text())
    d["nodes"][0]["num_instances"] = 3
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(d))
    with pytest.raises(JaxsimInputError, match=r"num_instances.*3 but 2 instances"):
        load_cluster_json(bad, HardwareConfig(), SchedulerConfig(), Calibration(), LLAMA)
    d["nodes"][0]["num_instances"] = 2
    d["nodes"][0]["power"] = {"base_node_power": 60}
    bad.write_text(json.dumps(d))
    with pytest.raises(JaxsimInputError, match="power"):
        load_cluster_json(bad, HardwareConfig(), SchedulerConfig(), Calibration(), LLAMA)


@pytest.mark.parametrize("edit, where, hint", [
    (lambda d: d["nodes"][0]["instances"][0].update(tp_szie=2), "nodes[0].instances[0].tp_szie", "'tp_size'"),
    (lambda d: d["nodes"][0]["instances"][1].update(max_num_seq=8), "nodes[0].instances[1].max_num_seq",
     "'max_num_seqs'"),
    (lambda d: d["nodes"][0]["instances"][0]["npu_mem"].update(mem_utl=0.5), "nodes[0].instances[0].npu_mem.mem_utl",
     "'mem_util'"),
    (lambda d: d["nodes"][0].update(num_instance=2), "nodes[0].num_instance", "'num_instances'"),
    (lambda d: d.update(linkbw=3), "linkbw", "'link_bw'"),
])
def test_reference_json_typos_are_errors_with_the_nearest_name(tmp_path, edit, where, hint):
    """A misspelt key used to be ignored (the instance kept the baseline's value): now it names
    the key's JSON path and suggests the field it was meant to be."""
    d = json.loads((CLUSTERS / "single_node_multi_instance.json").read_text())
    edit(d)
    bad = tmp_path / "typo.json"
    bad.write_text(json.dumps(d))
    with pytest.raises(JaxsimInputError) as e:
        load_cluster_json(bad, HardwareConfig(), SchedulerConfig(), Calibration(), LLAMA)
    assert str(e.value).startswith(f"{bad}: {where}: unknown") and f"did you mean {hint}" in str(e.value), str(e.value)


def test_reference_json_model_name_typo_names_the_json_key(tmp_path):
    d = json.loads((CLUSTERS / "single_node_multi_instance.json").read_text())
    d["nodes"][0]["instances"][1]["model_name"] = "meta-llama/Llama-3.1-8b"
    bad = tmp_path / "typo.json"
    bad.write_text(json.dumps(d))
    with pytest.raises(JaxsimInputError) as e:
        load_cluster_json(bad, HardwareConfig(), SchedulerConfig(), Calibration(), LLAMA, models_dir=PROFILES / "models")
    assert str(e.value).startswith(f"{bad}: nodes[0].instances[1].model_name: unknown model 'meta-llama/Llama-3.1-8b' "
                                   "(did you mean 'meta-llama/Llama-3.1-8B'")


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(nodes=None), r"nodes: must be a list, got None"),
    (lambda d: d.update(num_nodes="1"), r"num_nodes: must be an integer, got '1'"),
    (lambda d: d["nodes"][0]["instances"][0].update(npu_mem=96), r"instances\[0\].npu_mem: must be an object, got 96"),
    (lambda d: d["nodes"][0]["instances"][0].update(num_npus="2"), r"instances\[0\].num_npus: must be an integer"),
    (lambda d: d["nodes"][0].update(instances={}), r"nodes\[0\].instances: must be a list"),
])
def test_reference_json_wrong_types_name_the_key(tmp_path, edit, message):
    d = json.loads((CLUSTERS / "single_node_multi_instance.json").read_text())
    edit(d)
    bad = tmp_path / "types.json"
    bad.write_text(json.dumps(d))
    with pytest.raises(JaxsimInputError, match=message):
        load_cluster_json(bad, HardwareConfig(), SchedulerConfig(), Calibration(), LLAMA)


def test_hydra_typo_suggests_the_field():
    with pytest.raises(JaxsimInputError, match=r"^scheduler.max_num_seq: unknown field \(did you mean 'max_num_seqs'\?"):
        spec(["+scheduler.max_num_seq=8"])


def test_instances_of_another_model(llama):
    """An instance may serve its own model: the JSON importer loads its config; the engine gets
    that model's tables and KV size per instance; P/D pairs must share a model."""
    from jaxsim import simulator
    from jaxsim.model import load_model_config
    from jaxsim.spec import InstanceSpec, ModelRuntimeConfig
    from jaxsim.workload import load_workload

    specs, _ = load_cluster_json(CLUSTERS / "single_node_multi_instance.json", HardwareConfig(), SchedulerConfig(),
                                 Calibration(), "Qwen/Qwen3-32B", models_dir=MODELS)
    assert [s.model.name for s in specs] == ["meta-llama/Llama-3.1-8B"] * 2
    qwen = load_model_config(MODELS, "Qwen/Qwen3-32B")
    w = load_workload(WORKLOADS / "example_trace.jsonl")
    hw = HardwareConfig(num_gpu_blocks=300)
    rt = ModelRuntimeConfig(max_model_len=300 * 16)  # what the 300 blocks hold (vLLM refuses less)
    p = simulator.prepare_cluster(w, llama, [InstanceSpec(hw), InstanceSpec(hw, model=qwen)], rt=rt,
                                  profiles_dir=PROFILES)
    assert p.params.num_layers.tolist() == [32, 64]
    assert p.params.kv_token_bytes.tolist() == [2 * 1024 * 32 * 2, 2 * 1024 * 64 * 2]
    with pytest.raises(JaxsimInputError, match="prefill and decode instances serve different models"):
        simulator.prepare_cluster(w, llama, [InstanceSpec(hw, role="prefill"), InstanceSpec(hw, model=qwen, role="decode")],
                                  profiles_dir=PROFILES)


def test_hydra_cluster_groups():
    assert spec().cluster is None  # cluster=none: one instance
    pair = spec(["cluster=pair", "cluster.routing=round_robin"]).cluster
    assert len(pair.instances) == 2 and pair.router == Router("round_robin", 42)
    assert pair.instances[0].hw == HardwareConfig() and pair.instances[0].sched == SchedulerConfig()
    mixed = spec(["cluster=mixed"]).cluster
    assert [i.hw.name for i in mixed.instances] == ["RTXPRO6000", "RTXPRO6000", "RTX4090"]
    assert mixed.instances[2].sched.max_num_seqs == 64 and mixed.instances[2].hw.mem_size_gb == 24
    assert mixed.instances[2].sched.max_num_batched_tokens == SchedulerConfig().max_num_batched_tokens
    ref = spec(["cluster=reference_json"]).cluster
    assert len(ref.instances) == 2 and ref.router.policy == "least_loaded"


@pytest.mark.parametrize("overrides, key", [
    (["cluster=pair", "cluster.routing=nearest"], "cluster.routing"),
    (["cluster=mixed", "++cluster.instances.1.hardware.mem_sizegb=3"], "cluster.instances[1].hardware.mem_sizegb"),
    (["cluster=mixed", "cluster.instances.1.hardware.mem_size_gb=-1"], "cluster.instances[1].hardware.mem_size_gb"),
    (["cluster=mixed", "cluster.instances.1.scheduler.max_num_seqs=-2"], "cluster.instances[1].scheduler.max_num_seqs"),
    (["cluster=mixed", "cluster.instances.1.hardware.name=TPU9"], "cluster.instances[1].hardware.name"),
    (["cluster=pair", "cluster.instances.0.count=0"], "cluster.instances[0].count"),
    (["cluster=reference_json", "cluster.json=/nonexistent/c.json"], "/nonexistent/c.json"),
])
def test_hydra_cluster_errors(overrides, key):
    with pytest.raises(JaxsimInputError) as e:
        spec(overrides)
    assert str(e.value).startswith(key), str(e.value)


def test_sweep_base_carries_the_cluster_and_cluster_designs():
    from jaxsim import config as jconfig
    r = spec(["cluster=pair", "cluster.routing=round_robin", "++sweep.axes.cluster=[none,mixed]"])
    base = jconfig.sweep_base(r)
    assert len(base.instances) == 2 and base.router == Router("round_robin", 42)
    assert [len(base.cluster_options[k]) for k in ("none", "mixed")] == [1, 3]
    assert base.cluster_options["mixed"][2].hw.name == "RTX4090"
    with pytest.raises(JaxsimInputError) as e:
        jconfig.sweep_base(spec(["++sweep.axes.cluster=[nowhere]"]))
    assert str(e.value).startswith("sweep.axes.cluster[0]")


def test_json_and_hydra_build_the_same_specs_through_the_same_checks(tmp_path):
    """The JSON importer and the Hydra `cluster` group build InstanceSpecs with the same
    constructors: equal values give equal specs, and a bad value fails with the dataclass's own
    check, named after the key it came from (YAML key, command line, JSON path)."""
    ref = spec(["cluster=reference_json"]).cluster.instances  # profiles/clusters/single_node_multi_instance.json
    pair = spec(["cluster=pair"]).cluster.instances
    assert ref == pair
    problem = "must be <= 1, got 1.5"
    d = json.loads((CLUSTERS / "single_node_multi_instance.json").read_text())
    d["nodes"][0]["instances"][1]["npu_mem"]["mem_util"] = 1.5
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(d))
    for overrides, where in ((["hardware.mem_util=1.5"], "hardware.mem_util"),
                             (["cluster=mixed", "cluster.instances.1.hardware.mem_util=1.5"],
                              "cluster.instances[1].hardware.mem_util"),
                             (["cluster=reference_json", f"cluster.json={bad}"],
                              f"{bad}: nodes[0].instances[1].npu_mem.mem_util")):
        with pytest.raises(JaxsimInputError) as e:
            spec(overrides)
        assert (e.value.where, e.value.problem) == (where, problem)
    with pytest.raises(JaxsimInputError) as e:
        load_cluster_json(bad, HardwareConfig(), SchedulerConfig(), Calibration(), LLAMA)
    assert (e.value.where, e.value.problem) == (f"{bad}: nodes[0].instances[1].npu_mem.mem_util", problem)
    with pytest.raises(JaxsimInputError) as e:
        dataclasses.replace(HardwareConfig(), mem_util=1.5)  # the Python API: the same check
    assert (e.value.where, e.value.problem) == ("hardware.mem_util", problem)
