"""Weight placement and offloading, FP8 KV (jaxsim/placement.py, REFERENCE.md §1.3, §1.10, §1.14,
§1.16): hand-computed block counts and weight-read times, placement parsing errors, the reference's
placement examples. Host-side only (planning and the latency model, no engine run)."""

import dataclasses
import json
import math

import jax
import numpy as np
import pytest

from jaxsim import latency, placement as P, planning, sweep
from jaxsim.cluster_config import load_cluster_json
from jaxsim.errors import JaxsimInputError
from jaxsim.spec import Calibration, HardwareConfig, InstanceSpec, ModelRuntimeConfig, SchedulerConfig, Workload

from _shared import CLUSTERS, LLAMA, PROFILES, load_model

GIB = 2**30
# Llama-3.1-8B (profiles/models/meta-llama/Llama-3.1-8B.json): V, H, L, q_dim, kv_dim, F
V, H, L, Q, KV, F = 128256, 4096, 32, 4096, 1024, 14336
W_BLOCK = 2 * H * 2 + H * (Q + 2 * KV) * 2 + Q * H * 2 + 3 * H * F * 2  # §1.3, bf16, tp 1
W_GPU = V * H * 2 + L * W_BLOCK + H * 2 + H * V * 2
USABLE = math.floor(96 * GIB * 0.9)  # RTXPRO6000 96 GiB, util 0.9
ONE = Workload(arrival_ns=np.array([0], np.int64), input_toks=np.array([32], np.int32),
               output_toks=np.array([4], np.int32), token_ids=[None])
# one compile for every table of these tests (same shapes), then fast calls
ITER = jax.jit(latency.iteration_time)
DECODE = (128, 128, 0, 0, 128, 128 * 1024, 1024, 1024)  # T, S, pc, kp, nd, kvd sum/min/max: 128 decodes at 1024


@pytest.fixture(scope="module")
def model():
    return load_model()


def _plan(model, hw=HardwareConfig(), rt=ModelRuntimeConfig(), **kw):
    rt = dataclasses.replace(rt, max_model_len=4096)
    return planning.plan(ONE, model, hw, SchedulerConfig(reserve_null_block=False), rt, profiles_dir=PROFILES, **kw)


def test_fp8_kv_doubles_the_block_count_and_halves_the_hand_off_bytes(model):
    """§1.3 by hand: W_gpu = 16,060,522,496 B; bf16 KV 131,072 B/token -> 36,578 blocks of 16; FP8 KV
    (1 B/element) 65,536 B/token -> 73,157 (twice, less the floor)."""
    assert W_GPU == 16_060_522_496
    per_block = {2: 16 * 2 * KV * L * 2, 1: 16 * 2 * KV * L * 1}
    assert (USABLE - W_GPU) // per_block[2] == 36_578 and (USABLE - W_GPU) // per_block[1] == 73_157
    hw, sched = HardwareConfig(), SchedulerConfig()
    assert planning.num_kv_blocks(model, hw, sched, ModelRuntimeConfig()) == 36_578
    assert planning.num_kv_blocks(model, hw, sched, ModelRuntimeConfig(kv_cache_dtype="fp8")) == 73_157
    bf16, fp8 = _plan(model), _plan(model, rt=ModelRuntimeConfig(kv_cache_dtype="fp8"))
    assert (bf16.num_blocks, fp8.num_blocks) == (36_578, 73_157)
    assert (bf16.kv_token_bytes, fp8.kv_token_bytes) == (131_072, 65_536)  # P/D hand-off bytes per token
    assert bf16.approximations == ()


def test_fp8_kv_from_bf16_tables_halves_the_kv_read_term_and_is_flagged(model):
    """No -kvfp8 variant ships: attention keeps the bf16 tables with b*kvd_sum (the fitted KV-read
    term of a + b*nd*kvd) halved per attention layer, and the plan says it is an estimate."""
    bf16, fp8 = _plan(model), _plan(model, rt=ModelRuntimeConfig(kv_cache_dtype="fp8"))
    assert float(fp8.tables.kv_read_scale) == 0.5 and float(bf16.tables.kv_read_scale) == 1.0
    assert len(fp8.approximations) == 1 and "estimate" in fp8.approximations[0]
    b = float(fp8.tables.kv_read_b)
    assert 1.0 < b < 5.0  # ns per KV token per layer: ~4 KiB at ~1.6 TB/s
    t16, _ = ITER(bf16.tables, *DECODE)
    t8, _ = ITER(fp8.tables, *DECODE)
    no_att = dataclasses.replace(bf16.tables, memory_scale=bf16.tables.memory_scale * 0)
    t_att = (int(t16) - int(ITER(no_att, *DECODE)[0])) // L  # one layer's attention
    cut = min(math.floor(0.5 * b * DECODE[5]), t_att - math.floor(0.5 * t_att))
    assert int(t16) - int(t8) == L * cut


def test_a_kvfp8_variant_folder_is_used_when_the_bundle_has_one(model, tmp_path):
    root = tmp_path / "profiles"  # profile_variant looks at the variant folders only
    bundle = root / "RTXPRO6000" / LLAMA
    bundle.mkdir(parents=True)
    (bundle / "bf16").symlink_to(PROFILES / "RTXPRO6000" / LLAMA / "bf16")
    rt = ModelRuntimeConfig(kv_cache_dtype="fp8")
    assert planning.profile_variant(str(PROFILES), "RTXPRO6000", model, rt) == ("bf16", 0.5)
    (bundle / "bf16-kvfp8").symlink_to(PROFILES / "RTXPRO6000" / LLAMA / "bf16")
    assert planning.profile_variant(str(root), "RTXPRO6000", model, rt) == ("bf16-kvfp8", 1.0)
    # fp8 weights: no fp8 variant and no fallback model for the GEMMs
    with pytest.raises(JaxsimInputError, match=r"^model\.dtype: fp8: .*'fp8' profile variant.*GEMM times .* \(profile "
                                               r"the fp8 variant, or use dtype auto"):
        planning.profile_variant(str(root), "RTXPRO6000", model, ModelRuntimeConfig(dtype="fp8"))


def _cxl_hw(fraction=4 / 32, bw=60.0):
    return HardwareConfig(weights_offload_fraction=fraction, weights_offload_device="cxl", offload_bw_gbps=bw,
                          offload_latency_ns=250.0)


def test_weights_off_the_gpu_add_exactly_the_bytes_moved_in_blocks(model):
    """4 of 32 blocks on CXL: 4 x W_block leave W_gpu; blocks = (usable - W_gpu + moved) // per block."""
    moved = 4 * W_BLOCK
    assert W_BLOCK == 436_224_000
    wp = P.from_hardware(_cxl_hw(), L)
    assert wp.blocks == ("npu",) * 28 + ("cxl:0",) * 4
    assert P.offloaded_bytes(wp, model, 2) == {"cxl:0": moved}
    per_block = 16 * 2 * KV * L * 2
    got = planning.num_kv_blocks(model, _cxl_hw(), SchedulerConfig(), ModelRuntimeConfig())
    assert got == (USABLE - W_GPU + moved) // per_block == 37_410
    # every layer off the GPU: the whole of W_gpu leaves the ledger (single_node_cxl_instance.json)
    assert sum(P.layer_weight_bytes(model, 2)["blocks"]) == L * W_BLOCK
    assert planning.num_kv_blocks(model, _cxl_hw(1.0), SchedulerConfig(), ModelRuntimeConfig()) == \
        (USABLE - W_GPU + L * W_BLOCK) // per_block


@pytest.mark.parametrize("bw", [60.0, 1e6])
def test_a_weight_read_from_cxl_costs_the_load_chain_beyond_the_compute_chain(model, bw):
    """§1.10 by hand, one decode iteration: blocks 28-31 load one after the other from cxl:0 (250 ns
    + W_block / bw each, floored); block i starts at max(end of block i-1, its load). The extra time
    is max(0, load chain - compute chain); at 1e6 GB/s the loads hide behind blocks 0-27 (0 extra)."""
    base = _plan(model)
    off = _plan(model, hw=_cxl_hw(bw=bw))
    assert off.num_blocks == 37_410 and off.offloaded == {"cxl:0": 4 * W_BLOCK}
    args = (1, 1, 0, 0, 1, 512, 512, 512)
    t0 = int(ITER(base.tables, *args)[0])
    assert t0 == 11_284_385  # REFERENCE.md §2.1 sanity value
    _, _, (pro, head) = jax.jit(latency._iteration, static_argnames='parts')(base.tables, *args, parts=True)
    pro, head = int(pro), int(head)
    block = (t0 - pro - head) // L  # identical blocks: the compute chain is pro + 32 blocks + head
    assert block * L == t0 - pro - head
    load = math.floor(250.0 + W_BLOCK / bw)
    loads = {28 + k: (k + 1) * load for k in range(4)}  # the cumulative load chain
    end = pro
    for i in range(L):
        end = max(end, loads.get(i, 0)) + block
    end += head
    t1 = int(ITER(off.tables, *args)[0])
    assert t1 == end
    assert t1 - t0 == max(0, loads[31] + block + head - t0)
    assert (t1 > t0) == (bw == 60.0)


def test_the_offload_fraction_and_kv_dtype_are_sweep_knobs_of_one_compiled_shape(model):
    """Points that differ in weights_offload_fraction (or kv_cache_dtype) differ in values only (KV blocks, load gates):
    their tables stack into one shape, so they share one compile."""
    base = sweep.SweepBase(ONE, model, hardware=_cxl_hw(0.0), runtime=ModelRuntimeConfig(max_model_len=4096),
                           profiles_dir=PROFILES)
    plans = []
    for f in (0.0, 0.125):
        kw = sweep.point_inputs(base, {"weights_offload_fraction": f})
        plans.append(planning.plan(**kw, record_token_times=False))
    assert [p.num_blocks for p in plans] == [36_578 - 1, 37_410 - 1]  # (vLLM's null block)
    a, b = plans[0].tables, plans[1].tables
    assert a.wload_blocks.shape == b.wload_blocks.shape == (L,)
    stacked = latency.stack_tables([a, b])
    assert int(stacked.wload_blocks[0].max()) == 0 and int(stacked.wload_blocks[1, -1]) == 4 * math.floor(
        250.0 + W_BLOCK / 60.0)
    # the kv_cache_dtype knob likewise: blocks and the KV-read scale are values
    fp8 = planning.plan(**sweep.point_inputs(base, {"kv_cache_dtype": "fp8"}), record_token_times=False)
    assert fp8.num_blocks == 73_157 - 1 and float(fp8.tables.kv_read_scale) == 0.5 and fp8.approximations
    # one compile once stacked (the optional paths are static flags that stack_tables ORs)
    assert jax.tree.map(np.shape, latency.stack_tables([fp8.tables, a])) == jax.tree.map(
        np.shape, latency.stack_tables([a, fp8.tables]))
    assert jax.tree.leaves(jax.tree.map(np.shape, fp8.tables)) == jax.tree.leaves(jax.tree.map(np.shape, a))
    assert fp8.tables.kv_scaled and not latency.stack_tables([a, a]).kv_scaled
    with pytest.raises(JaxsimInputError, match=r"^sweep point \(kv_cache_dtype=fp9\): model\.kv_cache_dtype: unknown"):
        sweep.point_inputs(base, {"kv_cache_dtype": "fp9"})


def test_pipeline_stages_with_offloaded_weights_are_refused(model):
    with pytest.raises(JaxsimInputError, match=r"^hardware\.pp: 2 pipeline stages with weights off the NPU"):
        _plan(model, hw=dataclasses.replace(_cxl_hw(), pp=2))
    with pytest.raises(JaxsimInputError, match=r"^hardware\.offload_bw_gbps: .*CXL device need"):
        HardwareConfig(weights_offload_fraction=0.5, weights_offload_device="cxl")


# ------------------------------------------------------------------------------------------------
# The cluster JSON
# ------------------------------------------------------------------------------------------------

def _load(path, **kw):
    return load_cluster_json(path, HardwareConfig(), SchedulerConfig(), Calibration(), LLAMA,
                             models_dir=PROFILES / "models", profiles_dir=PROFILES, **kw)[0]


def test_the_reference_placement_examples_load(model):
    """profiles/clusters/single_node_{cxl,memory}_instance.json (copies of the reference's
    data/cluster-examples/): every weight on cxl:0-3 (layer > block range > default), or all on the NPU."""
    (cxl,) = _load(CLUSTERS / "single_node_cxl_instance.json")
    wp = cxl.placement
    assert (wp.embedding, wp.final_layernorm, wp.lm_head) == ("cxl:1", "cxl:2", "cxl:3")
    assert wp.blocks == ("cxl:0",) * 4 + ("cxl:1",) * 4 + ("cxl:2",) * 3 + ("cxl:3",) * 13 + ("cxl:0",) * 8
    assert [d.name for d in wp.devices] == ["cxl:0", "cxl:1", "cxl:2", "cxl:3"]
    assert wp.device("cxl:2") == P.MemoryDevice("cxl:2", 60.0, 250.0, 256.0)  # 1024 GB over 4 devices and cxl.kv_evict_loc == "cpu"
    per_block = 16 * 2 * KV * L * 2
    assert planning.num_kv_blocks(model, cxl.hw, cxl.sched, ModelRuntimeConfig(), wp) == USABLE // per_block
    g = P.load_gates(wp, model, 2)
    one = math.floor(250.0 + W_BLOCK / 60.0)
    assert g["prologue"] == math.floor(250.0 + V * H * 2 / 60.0)  # the embedding, first on cxl:1
    assert g["blocks"][3] == 4 * one and g["blocks"][24] == 5 * one  # cxl:0 serves blocks 0-3, then 24-31
    (mem,) = _load(CLUSTERS / "single_node_memory_instance.json")
    assert mem.placement is None and mem.kv_evict_loc == "cpu"


def _edited(tmp_path, edit, name="single_node_cxl_instance.json"):
    d = json.loads((CLUSTERS / name).read_text())
    edit(d)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    return path


def _pl(d):
    return d["nodes"][0]["instances"][0]["placement"]


def _kv_on(d, dev, inst=0):
    """Every kv_loc of instance ``inst``'s placement set to ``dev``."""
    pl = d["nodes"][0]["instances"][inst]["placement"]
    for e in [pl["default"], *pl["blocks"], *pl["layers"].values()]:
        e["kv_loc"] = dev


@pytest.mark.parametrize("edit, where, problem", [
    (lambda d: _pl(d)["blocks"][0].update(blocks="3-1"), "placement.blocks[0].blocks", "runs backwards"),
    (lambda d: _pl(d)["blocks"][4].update(blocks="24-32"), "placement.blocks[4].blocks",
     "block 32 of range '24-32' is out of bounds: the model has 32 blocks"),
    (lambda d: _pl(d)["blocks"][2].update(blocks="8;9"), "placement.blocks[2].blocks", "bad block range '8;9'"),
    (lambda d: _pl(d)["blocks"][1].update(blocks="3-7"), "placement.blocks[1].blocks", "block 3 is also in"),
    (lambda d: d["cxl_mem"].update(num_devices=2), "placement.blocks[2].weights",
     "unknown device 'cxl:2': cxl_mem has num_devices 2"),
    (lambda d: _pl(d)["default"].update(weights="gpu"), "placement.default.weights", "unknown device 'gpu'"),
    (lambda d: _pl(d)["blocks"][0].update(weight="cpu"), "placement.blocks[0].weight",
     "unknown placement field (did you mean 'weights'"),
    (lambda d: _pl(d)["layers"].update(lm_haed={}), "placement.layers.lm_haed", "unknown layer"),
    (lambda d: _pl(d).update(block=[]), "placement.block", "unknown placement field (did you mean 'blocks'"),
    (lambda d: _pl(d)["blocks"][3].update(kv_loc="cxl:0"), "placement.blocks[3].kv_loc",
     "'cxl:0' for block 11 but 'npu' for block 0 (" ),
    (lambda d: _kv_on(d, "cpu") or _pl(d)["layers"]["lm_head"].update(kv_loc="npu"), "placement.layers.lm_head.kv_loc",
     "'npu', but the lm_head holds no KV cache and the blocks keep theirs on 'cpu'"),
    (lambda d: _kv_on(d, "cpu") or d["nodes"][0]["cpu_mem"].pop("mem_size"), "placement.blocks[0].kv_loc",
     "'cpu': a KV cache in the node's host memory needs its capacity, and the node has no cpu_mem.mem_size"),
    (lambda d: _kv_on(d, "cxl:4"), "placement.default.kv_loc", "unknown device 'cxl:4': cxl_mem has num_devices 4"),
    (lambda d: d["nodes"][0]["instances"][0].update(kv_loc="cpu"), "kv_loc",
     "'cpu': an instance-level kv_loc is not read (the KV cache is placed per block) (use placement.default.kv_loc"),
    (lambda d: _pl(d)["layers"]["lm_head"].update(kv_evict_loc="cxl:1"), "placement.layers.lm_head.kv_evict_loc",
     "kv_evict_loc differs between layers"),
    (lambda d: d["nodes"][0]["instances"][0].update(dtype="fp8"), "dtype", "'fp8' profile variant"),
])
def test_placement_errors_name_the_json_path(tmp_path, edit, where, problem):
    path = _edited(tmp_path, edit)
    with pytest.raises(JaxsimInputError) as e:
        _load(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: nodes[0].instances[0].{where}: ") and problem in msg, msg


def test_cxl_mem_errors_and_a_cxl_device_without_cxl_mem(tmp_path):
    path = _edited(tmp_path, lambda d: d["cxl_mem"].update(mem_bw=0))
    with pytest.raises(JaxsimInputError, match=r"cxl_mem\.mem_bw: must be a number > 0, got 0"):
        _load(path)
    path = _edited(tmp_path, lambda d: d.pop("cxl_mem"))
    with pytest.raises(JaxsimInputError, match=r"placement\.default\.weights: unknown device 'cxl:0': the cluster has no "
                                               r"cxl_mem section"):
        _load(path)


def test_json_dtypes_local_offloading_and_capacity(tmp_path, model):
    """kv_cache_dtype fp8 is accepted (bf16 tables + the flagged estimate); enable_local_offloading
    reads every NPU-resident weight from HBM at npu_mem.mem_bw; weights beyond a device's size are refused."""
    def fp8_local(d):
        inst = d["nodes"][0]["instances"][0]
        inst.update(kv_cache_dtype="fp8", enable_local_offloading=True)
        inst.pop("placement")
    (spec,) = _load(_edited(tmp_path, fp8_local))
    assert spec.kv_cache_dtype == "fp8" and spec.placement.hbm == P.MemoryDevice("hbm", 1597.0, 0.0)
    g = P.load_gates(spec.placement, model, 2)
    assert g["blocks"][0] == math.floor(V * H * 2 / 1597.0) + math.floor(W_BLOCK / 1597.0)
    rt = planning.instance_runtime(ModelRuntimeConfig(), spec)
    assert rt.kv_cache_dtype == "fp8" and planning.num_kv_blocks(model, spec.hw, spec.sched, rt) == 73_157
    # 32 blocks x 436 MB on 4 devices of 1 GiB each (mem_size 4 over 4 devices): refused where the plans meet (plan_cluster)
    (cxl,) = _load(_edited(tmp_path, lambda d: d["cxl_mem"].update(mem_size=4)))
    pl = _plan(model, placement=cxl.placement)
    with pytest.raises(JaxsimInputError, match=r"^x: 2.60 GiB of weights placed on cxl:1, which holds 1 GiB"):
        planning.check_offload_capacity([pl], [cxl], model, "x")
    assert InstanceSpec().kv_evict_loc == "cpu"
    with pytest.raises(JaxsimInputError, match=r"instance\.kv_evict_loc: unknown device 'disk'"):
        InstanceSpec(kv_evict_loc="disk")


# ------------------------------------------------------------------------------------------------
# The KV cache off the NPU: kv_loc cpu / cxl:<id>, hardware.kv_offload_device (REFERENCE.md §1.16)
# ------------------------------------------------------------------------------------------------

PER_BLOCK = 16 * 2 * KV * L * 2  # bytes of one bf16 KV block of 16 tokens, tp 1 (§1.3): 2 MiB


def _kv_json(tmp_path, dev, mem_size=64, instances=1, name="single_node_memory_instance.json"):
    """The reference's single-instance example with every kv_loc on ``dev`` and ``instances``
    copies of its instance on node 0 (host memory ``mem_size`` GB)."""
    def edit(d):
        node = d["nodes"][0]
        node["cpu_mem"]["mem_size"] = mem_size
        _kv_on(d, dev)
        node["instances"] = [node["instances"][0]] * instances
        node["num_instances"] = instances
        d.setdefault("cxl_mem", {"mem_size": 1024, "mem_latency": 250, "mem_bw": 60, "num_devices": 4})
    return _load(_edited(tmp_path, edit, name))


def test_kv_on_a_lower_tier_takes_its_blocks_from_that_device(tmp_path, model):
    """§1.16 kv_loc, by hand: the KV blocks come from the device's capacity (the GPU's leftover
    memory is unused): 64 GiB of host memory hold 64 GiB // 2 MiB = 32,768 blocks; two instances of
    the node keeping their KV there split it (16,384 each); a CXL device is cxl_mem.mem_size /
    num_devices = 256 GiB less the instance's own weights on it; FP8 KV doubles the count."""
    rt = ModelRuntimeConfig()
    (one,) = _kv_json(tmp_path, "cpu")
    wp = one.placement
    assert (wp.kv, wp.kv_device.capacity_gb, wp.kv_sharers) == ("cpu", 64, 1) and not wp.off_npu
    assert wp.kv_src.endswith("nodes[0].instances[0].placement.blocks[0].kv_loc")
    assert 64 * GIB // PER_BLOCK == 32_768
    assert planning.num_kv_blocks(model, one.hw, one.sched, rt, wp) == 32_768
    assert planning.num_kv_blocks(model, one.hw, one.sched, ModelRuntimeConfig(kv_cache_dtype="fp8"), wp) == 65_536
    two = _kv_json(tmp_path, "cpu", instances=2)
    assert [s.placement.kv_sharers for s in two] == [2, 2]
    assert [planning.num_kv_blocks(model, s.hw, s.sched, rt, s.placement) for s in two] == [16_384, 16_384]
    # cxl:1 of single_node_cxl_instance.json also holds the embedding and blocks 4-7's weights
    (cxl,) = _kv_json(tmp_path, "cxl:1", name="single_node_cxl_instance.json")
    own = V * H * 2 + 4 * W_BLOCK
    assert cxl.placement.kv_device == P.MemoryDevice("cxl:1", 60.0, 250.0, 256.0)
    assert planning.num_kv_blocks(model, cxl.hw, cxl.sched, rt, cxl.placement) == (256 * GIB - own) // PER_BLOCK == 129_738
    # the Hydra form: a device of the instance's own, kv_offload_capacity_gb GiB
    hw = HardwareConfig(kv_offload_device="cpu", kv_offload_capacity_gb=10)
    assert planning.num_kv_blocks(model, hw, SchedulerConfig(), rt) == 10 * GIB // PER_BLOCK == 5_120
    hw = HardwareConfig(kv_offload_device="cpu", kv_offload_capacity_gb=10, tp=2)
    assert planning.num_kv_blocks(model, hw, SchedulerConfig(), rt) == 5_120  # two ranks' shards of each block
    # a share that holds no block, named where the KV was placed
    with pytest.raises(JaxsimInputError, match=r"placement\.blocks\[0\]\.kv_loc: 'cpu': the KV cache on cpu "
                                               r"\(0\.001 GiB for this instance, .* holds no block"):
        planning.num_kv_blocks(model, one.hw, one.sched, rt, dataclasses.replace(
            wp, kv_device=dataclasses.replace(wp.kv_device, capacity_gb=0.001)))


def test_one_iterations_kv_read_from_the_device_hand_computed(model):
    """§1.16 kv_loc, one iteration by hand: a chunk of 512 prompt tokens with 2,048 history tokens
    and 3 decodes of KV 1,000 read 2,048 + 3,000 = 5,048 tokens per layer, 4,096 B each (K+V of
    one Llama layer, bf16, tp 1): r = floor(1,000 + 5,048 x 4,096 / 64) ns per block, the reads
    queued from the iteration's start; block i starts at max(end of block i-1, (i+1) r): only
    block 0 waits (r less the prologue). 128 decodes at KV 1,024 are read-bound (32 r + the last
    block + the head). A first chunk (no history) reads nothing. With the KV on the GPU
    (kvloc_bytes 0) the time is unchanged."""
    base = _plan(model)
    assert float(base.tables.kvloc_bytes) == 0.0
    hw = HardwareConfig(kv_offload_device="cpu", kv_offload_capacity_gb=10, offload_bw_gbps=64.0,
                        offload_latency_ns=1000.0)
    off = _plan(model, hw=hw)
    assert off.num_blocks == 5_120 and off.offloaded == {}
    assert (float(off.tables.kvloc_lat), float(off.tables.kvloc_bw), float(off.tables.kvloc_bytes)) == (1000.0, 64.0,
                                                                                                       4096.0)
    # values: one compile once stacked (the path itself is a static flag, on for the stack)
    assert jax.tree.leaves(jax.tree.map(np.shape, off.tables)) == jax.tree.leaves(jax.tree.map(np.shape, base.tables))
    assert off.tables.offload and not base.tables.offload and latency.stack_tables([base.tables, off.tables]).offload
    for args, tokens in (((515, 4, 512, 2048, 3, 3000, 1000, 1000), 5048), ((1, 1, 0, 0, 1, 512, 512, 512), 512),
                         ((128, 1, 128, 0, 0, 0, 0, 0), 0), (DECODE, 128 * 1024)):
        t0 = int(ITER(base.tables, *args)[0])
        _, _, (pro, head) = jax.jit(latency._iteration, static_argnames='parts')(base.tables, *args, parts=True)
        block = (t0 - int(pro) - int(head)) // L
        assert block * L == t0 - int(pro) - int(head)
        r = math.floor(1000.0 + tokens * 4096 / 64.0) if tokens else 0
        end = int(pro)
        for i in range(L):
            end = max(end, (i + 1) * r) + block
        end += int(head)
        t1 = int(ITER(off.tables, *args)[0])
        assert t1 == end, (args, t1, end)
        if tokens == 5048:  # the reads hide behind the blocks' compute but for block 0's
            assert r == 324_072 and t1 - t0 == r - int(pro) == 319_237
        if tokens == 128 * 1024:  # read-bound: 32 reads, then the last block and the head
            assert r == 8_389_608 and t1 == 32 * r + block + int(head) and t1 - t0 == 244_696_735
        if tokens == 0:
            assert t1 == t0  # a first chunk reads nothing


def test_kv_off_the_npu_refusals(tmp_path, model):
    """pp > 1, a placement together with hardware.kv_offload_device, a missing capacity, and a device
    over its capacity (KV of one instance + weights of another on the node's host memory)."""
    hw = HardwareConfig(kv_offload_device="cpu", kv_offload_capacity_gb=10, pp=2)
    with pytest.raises(JaxsimInputError, match=r"^hardware\.pp: 2 pipeline stages with the KV cache off the NPU "
                                               r"\(hardware\.kv_offload_device = cpu\)"):
        _plan(model, hw=hw)
    with pytest.raises(JaxsimInputError, match=r"^hardware\.kv_offload_capacity_gb: a KV cache on 'cxl'"):
        HardwareConfig(kv_offload_device="cxl", offload_bw_gbps=60.0)
    with pytest.raises(JaxsimInputError, match=r"^hardware\.offload_bw_gbps: a KV cache on a CXL device"):
        HardwareConfig(kv_offload_device="cxl", kv_offload_capacity_gb=1.0)
    (one,) = _kv_json(tmp_path, "cpu")
    with pytest.raises(JaxsimInputError, match=r"^hardware\.kv_offload_device: 'cpu', but the instance already has"):
        P.resolve(one.placement, HardwareConfig(kv_offload_device="cpu", kv_offload_capacity_gb=1.0), L)
    # instance 0: KV on node 0's host memory (all 64 GiB); instance 1: every weight there too
    def edit(d):
        node = d["nodes"][0]
        node["cpu_mem"]["mem_size"] = 64
        _kv_on(d, "cpu")
        other = json.loads(json.dumps(node["instances"][0]))
        node["instances"].append(other)
        node["num_instances"] = 2
        _kv_on(d, "npu", inst=1)
        pl = other["placement"]
        for e in [pl["default"], *pl["blocks"], *pl["layers"].values()]:
            e["weights"] = "cpu"
    specs = _load(_edited(tmp_path, edit, "single_node_memory_instance.json"))
    assert [s.placement.kv for s in specs] == ["cpu", "npu"] and specs[0].placement.kv_sharers == 1
    plans = [_plan(model, placement=s.placement) for s in specs]
    assert plans[0].num_blocks == 32_768
    with pytest.raises(JaxsimInputError, match=r"^x: 14\.96 GiB of weights and 64\.00 GiB of KV cache placed on node 0's "
                                               r"cpu, which holds 64 GiB"):
        planning.check_offload_capacity(plans, specs, model, "x")
    planning.check_offload_capacity(plans[:1], specs[:1], model, "x")  # alone it fits


def test_weight_loads_of_instances_sharing_a_device_queue():
    """Two instances starting together with 3 ms of loads each on one CXL device, another with 1 ms
    on a second device: the second waits 3 ms; a later start waits for the device to free up."""
    import jax.numpy as jnp
    from jaxsim.engine.cluster import weight_load_waits
    busy = jnp.asarray([[3_000_000, 0], [3_000_000, 0], [0, 1_000_000]], jnp.int64)
    now = jnp.asarray([100, 100, 100], jnp.int64)
    wait, free = weight_load_waits(busy, jnp.zeros(2, jnp.int64), now, jnp.ones(3, bool))
    assert wait.tolist() == [0, 3_000_000, 0] and free.tolist() == [6_000_100, 1_000_100]
    wait, free = weight_load_waits(busy, free, jnp.asarray([2_000_000] * 3, jnp.int64), jnp.asarray([True, False, True]))
    assert wait.tolist() == [4_000_100, 0, 0] and free.tolist() == [9_000_100, 3_000_000]
