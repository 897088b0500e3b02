"""Many configurations in one compiled, vmapped call.

    base = SweepBase(workload, model, HardwareConfig(), SchedulerConfig())
    points = expand_grid({"max_num_seqs": [32, 64, 128], "arrival_rate_scale": [0.5, 1, 2]})
    result = sweep(base, points)          # 9 configurations, one compile
    result.write("sweep.csv")

Every knob in :data:`KNOBS` is numeric in the engine (a traced array), so configurations that
differ only in knobs share one compiled program: their states are padded to common sizes
(:class:`jaxsim.simulator.Dims`, which never changes a result) and stacked along a leading
configuration axis. What changes shapes or code (the block size, the number of requests) splits
the points into groups, one compile per group. A group runs in chunks of ``chunk_size``
configurations (bounded memory, a progress bar); each chunk is split across the local devices
with ``shard_map`` when there are several, each device running its share independently.

A configuration of a sweep gives exactly the result of its single run (``tests/test_sweep.py``):
:func:`point_inputs` is the one place that turns a point into the inputs of ``simulate``.

Clusters: with ``SweepBase.instances`` every point is a cluster (its knobs apply to each
instance; :func:`point_instances` gives the inputs of ``simulate_cluster``), and the ``cluster``
knob picks a design from ``SweepBase.cluster_options``; designs with fewer instances are padded
with instances that nothing is routed to (``tests/test_cluster.py`` checks the equality).
"""

import dataclasses
import functools
import itertools
import math
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from jaxsim import distributed, latency
from jaxsim import power as power_lib
from jaxsim import simulator
from jaxsim.engine import cluster
from jaxsim.engine.routing import Router
from jaxsim.engine.static import Static
from jaxsim.engine.status import Status
from jaxsim.errors import JaxsimInputError
from jaxsim.model import ModelConfig
from jaxsim.planning import tier_layout
from jaxsim.spec import (Calibration, HardwareConfig, InstanceSpec, KVTierConfig, LinkConfig, ModelRuntimeConfig, SchedulerConfig,
                         Workload)
from jaxsim.workload import synthetic_workload

if TYPE_CHECKING:
    from jaxsim.checkpoint import SweepCheckpoint

# knob -> what it sets. All of them vary per configuration inside one compiled call.
KNOBS = {
    "hardware": "a name in SweepBase.hardware_options: profile bundle, memory and links",
    "tp": "tensor-parallel degree (selects the profiles' tp<N> folder; never extrapolated)",
    "num_gpu_blocks": "KV capacity in blocks (overrides the memory model)",
    "mem_util": "gpu_memory_utilization of the memory model (KV capacity)",
    "weights_offload_fraction": "fraction of the transformer blocks (the last ones) whose weights sit off the GPU, "
                                "on hardware.weights_offload_device: more KV blocks, a weight read per iteration",
    "kv_offload_capacity_gb": "GiB of host / CXL memory holding the KV cache when hardware.kv_offload_device is set "
                              "(the KV block count: a value, points share one compile)",
    "kv_cache_dtype": "KV cache dtype (auto, fp8, ...): KV blocks, hand-off bytes, attention's KV-read time "
                      "(REFERENCE.md §1.14)",
    "kv_tier_capacity_gb": "GiB of the KV tier's device below the GPU (SweepBase.kv_tier; 0 holds nothing)",
    "kv_tier_bandwidth_gbps": "recall bandwidth of the KV tier's device, GB/s",
    "kv_tier_latency_ns": "recall latency of the KV tier's device, ns",
    "enable_prefix_sharing": "one KV-tier pool per node (cpu) / per cluster (cxl) instead of one per instance",
    "mem_size_gb": "accelerator memory, GiB (KV capacity through the memory model)",
    "peak_tflops": "peak TFLOP/s of a spec-sheet part (hardware spec/<sheet>, roofline-priced)",
    "mem_bw_gbs": "memory bandwidth of a spec-sheet part, GB/s (hardware spec/<sheet>, roofline-priced)",
    "link_bw_gbps": "TP/EP link bandwidth, GB/s",
    "link_latency_ns": "TP/EP link latency per ring step, ns",
    "block_size": "KV block size in tokens (a shape: one compile per value)",
    "max_num_seqs": "scheduler seat limit",
    "max_num_batched_tokens": "scheduler token budget per iteration",
    "long_prefill_token_threshold": "cap on one prefill chunk (0 = off)",
    "enable_prefix_caching": "prefix caching on/off",
    "enable_chunked_prefill": "chunked prefill on/off",
    "async_scheduling": "vLLM V1 async scheduling on/off",
    "compute_scale": "time multiplier of linear layers / MoE experts (0.8 = 20% faster compute)",
    "memory_scale": "time multiplier of attention (KV-read bound)",
    "link_scale": "time multiplier of collectives",
    "arrival_rate_scale": "request-rate multiplier: arrival times are divided by it",
    "seed": "seed of the synthetic workload (SweepBase.synthetic)",
    "cluster": "a name in SweepBase.cluster_options: the instances of a cluster design (designs are "
               "padded to the largest instance count with instances nothing is routed to)",
    "power_cap_w": "power cap of every NPU, W (SweepBase.power): slower compute below the active power "
                   "(jaxsim.power), the NPU's busy power capped",
    "npu_idle_power_w": "idle power of every NPU, W (SweepBase.power)",
    "npu_standby_power_w": "standby power of every NPU, W (SweepBase.power)",
    "npu_active_power_w": "active power of every NPU, W (SweepBase.power)",
    "standby_duration_s": "how long every NPU stays at standby power after work, s (SweepBase.power)",
}
_HARDWARE_KNOBS = ("tp", "num_gpu_blocks", "mem_util", "link_bw_gbps", "link_latency_ns", "weights_offload_fraction",
                   "kv_offload_capacity_gb", "mem_size_gb", "peak_tflops", "mem_bw_gbs")
_SCHEDULER_KNOBS = ("block_size", "max_num_seqs", "max_num_batched_tokens", "long_prefill_token_threshold",
                    "enable_prefix_caching", "enable_chunked_prefill", "async_scheduling")
_SCALE_KNOBS = ("compute_scale", "memory_scale", "link_scale")
# knob -> the KVTierConfig field it sets (the tier itself, its storage and chunk size, is the base's)
_TIER_KNOBS = {"kv_tier_capacity_gb": "capacity_gb", "kv_tier_bandwidth_gbps": "bandwidth_gbps",
               "kv_tier_latency_ns": "latency_ns", "enable_prefix_sharing": "enable_prefix_sharing"}
# knob -> the NPUPower field it sets in every node's block (jaxsim.power)
_POWER_KNOBS = {"power_cap_w": "power_cap", "npu_idle_power_w": "idle_power", "npu_standby_power_w": "standby_power",
                "npu_active_power_w": "active_power", "standby_duration_s": "standby_duration"}


@dataclasses.dataclass(eq=False)  # hashed by identity (the trace cache is keyed by the base)
class SweepBase:
    """The configuration every point starts from; a point overrides some :data:`KNOBS`."""

    workload: Workload
    model: ModelConfig
    hardware: HardwareConfig = HardwareConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    runtime: ModelRuntimeConfig = ModelRuntimeConfig()
    calibration: Calibration = Calibration()
    profiles_dir: str | Path = "profiles"
    hardware_options: dict = dataclasses.field(default_factory=dict)  # name -> HardwareConfig
    synthetic: dict | None = None  # synthetic_workload(**synthetic, seed=...) for the "seed" knob
    slo_ttft_ms: float | None = None  # SLO attainment = TTFT and TPOT both within their SLO
    slo_tpot_ms: float | None = None
    max_slots: int = 0  # sim.max_slots (0 = auto)
    # A cluster instead of one instance: every point applies its knobs to each instance (the
    # ``hardware`` knob replaces each one's hardware). None: one instance of hardware+scheduler.
    instances: tuple | None = None  # of jaxsim.spec.InstanceSpec
    router: Router = Router()
    # The KV tier below the GPU (CPU / CXL): its knobs (_TIER_KNOBS) vary its pools per point; its
    # device fields must be set here (a cluster JSON's cpu_mem / cxl_mem: cluster_config.tier_from_cluster_json).
    kv_tier: KVTierConfig = KVTierConfig()
    cluster_options: dict = dataclasses.field(default_factory=dict)  # name -> tuple of InstanceSpec
    links: LinkConfig = LinkConfig()  # KV links between instances (P/D designs)
    dp_sync: str = "moe"  # which DP groups run wave-synchronised (simulator.place_instances)
    # The nodes' power blocks (jaxsim.power.PowerConfig): rows get energy columns, and the power
    # knobs (_POWER_KNOBS) vary them per point. None: no power metered.
    power: "power_lib.PowerConfig | None" = None


def expand_grid(axes: dict) -> list:
    """The cartesian product of ``{knob: [values]}`` as a list of points (last knob fastest)."""
    for name, values in axes.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise JaxsimInputError(f"sweep.axes.{name}", f"must be a non-empty list, got {values!r}")
    names = list(axes)
    return [dict(zip(names, combo)) for combo in itertools.product(*(axes[n] for n in names))]


def scale_arrivals(workload: Workload, factor: float) -> Workload:
    """The trace at ``factor`` times its request rate: arrival times (from the first) / factor."""
    if not factor > 0:
        raise JaxsimInputError("sweep.arrival_rate_scale", f"must be > 0, got {factor}")
    if factor == 1:
        return workload
    t0 = int(workload.arrival_ns.min())
    arrival = t0 + np.floor((workload.arrival_ns - t0) / float(factor)).astype(np.int64)
    return dataclasses.replace(workload, arrival_ns=arrival)


def _check_point(point: dict, base: SweepBase, where: str) -> None:
    for name in point:
        if name not in KNOBS:
            raise JaxsimInputError(f"{where}.{name}", "unknown knob", f"knobs: {sorted(KNOBS)}; structural "
                                   "choices (model, block size, trace file) go in Hydra multirun (-m)")
    if "hardware" in point and point["hardware"] not in base.hardware_options:
        raise JaxsimInputError(f"{where}.hardware", f"unknown hardware {point['hardware']!r}",
                               f"known: {sorted(base.hardware_options)}")
    if "cluster" in point and point["cluster"] not in base.cluster_options:
        raise JaxsimInputError(f"{where}.cluster", f"unknown cluster design {point['cluster']!r}",
                               f"known: {sorted(base.cluster_options)}")
    tier_knobs = [k for k in point if k in _TIER_KNOBS]
    if tier_knobs and not base.kv_tier.enabled:
        raise JaxsimInputError(f"{where}.{tier_knobs[0]}", "the run has no KV tier below the GPU",
                               "set kv_tier=cpu (or cxl) for the sweep's base")
    power_knobs = [k for k in point if k in _POWER_KNOBS]
    if power_knobs and base.power is None:
        raise JaxsimInputError(f"{where}.{power_knobs[0]}", "the sweep has no power model",
                               "select one (power=<option>) or set SweepBase.power")
    if "seed" in point and base.synthetic is None:
        raise JaxsimInputError(f"{where}.seed", "the seed knob needs a synthetic workload",
                               "use workload=synthetic_poisson (or SweepBase.synthetic)")


def point_inputs(base: SweepBase, point: dict) -> dict:
    """The arguments of :func:`jaxsim.simulate` / :func:`jaxsim.simulator.plan` for one point
    (for a cluster base, the instance's ``hw``/``sched``/``calib`` are those of instance 0;
    :func:`point_instances` gives them all)."""
    return {**_shared_inputs(base, point), **_instance_inputs(base, point, _instances(base, point)[0])}


def point_instances(base: SweepBase, point: dict) -> list:
    """A cluster base's instances at this point (:class:`jaxsim.spec.InstanceSpec`), the
    arguments of :func:`jaxsim.simulator.simulate_cluster` for it."""
    return [dataclasses.replace(spec, **_instance_inputs(base, point, spec)) for spec in _instances(base, point)]


def _is_cluster(base: SweepBase) -> bool:
    return base.instances is not None or bool(base.cluster_options)


def _instances(base: SweepBase, point: dict) -> tuple:
    if "cluster" in point:
        return tuple(base.cluster_options[point["cluster"]])
    return base.instances or (InstanceSpec(base.hardware, base.scheduler, base.calibration),)


def _instance_inputs(base: SweepBase, point: dict, spec: InstanceSpec) -> dict:
    hw = base.hardware_options[point["hardware"]] if "hardware" in point else spec.hw
    try:  # a knob value the dataclass refuses (block_size=24, a token budget under max_num_seqs) names the point
        hw = dataclasses.replace(hw, **{k: point[k] for k in _HARDWARE_KNOBS if k in point})
        sched = dataclasses.replace(spec.sched, **{k: point[k] for k in _SCHEDULER_KNOBS if k in point})
    except JaxsimInputError as e:
        knobs = ", ".join(f"{k}={v}" for k, v in point.items())
        raise JaxsimInputError(f"sweep point ({knobs}): {e.where}", e.problem, e.fix) from None
    return dict(hw=hw, sched=sched, calib=spec.calib)


def _shared_inputs(base: SweepBase, point: dict) -> dict:
    workload = _workload(base, point.get("seed"), point.get("arrival_rate_scale", 1.0))
    rt = base.runtime
    if "kv_cache_dtype" in point:
        rt = _with_kv_dtype(rt, point)
    try:
        kv_tier = dataclasses.replace(base.kv_tier, **{f: point[k] for k, f in _TIER_KNOBS.items() if k in point})
    except JaxsimInputError as e:
        raise JaxsimInputError(f"sweep point ({', '.join(f'{k}={v}' for k, v in point.items())}): {e.where}",
                               e.problem, e.fix) from None
    return dict(workload=workload, model=base.model, rt=rt, profiles_dir=base.profiles_dir,
                max_slots=base.max_slots, scales={k: float(point.get(k, 1.0)) for k in _SCALE_KNOBS},
                kv_tier=kv_tier)


def _with_kv_dtype(rt: ModelRuntimeConfig, point: dict) -> ModelRuntimeConfig:
    """``rt`` with the point's ``kv_cache_dtype`` knob (which wins over an instance's own)."""
    if "kv_cache_dtype" not in point:
        return rt
    try:
        return dataclasses.replace(rt, kv_cache_dtype=point["kv_cache_dtype"])
    except JaxsimInputError as e:
        raise JaxsimInputError(f"sweep point (kv_cache_dtype={point['kv_cache_dtype']}): {e.where}", e.problem,
                               e.fix) from None


# base -> {(seed, scale): Workload}: the points of one base share trace objects (hence hashed
# arrays) by identity. Weak keys: a later base never sees another base's traces.
_WORKLOADS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _workload(base: SweepBase, seed, scale) -> Workload:
    cache = _WORKLOADS.setdefault(base, {})
    key = (seed, float(scale))
    if key not in cache:
        w = base.workload if seed is None else synthetic_workload(**{**base.synthetic, "seed": int(seed)})
        cache[key] = scale_arrivals(w, scale)
    return cache[key]


@dataclasses.dataclass
class SweepResult:
    rows: list  # one dict per point: its knobs, then metrics (see :func:`config_metrics`)
    requests: list | None  # per point, per-request arrays (``keep_requests=True``)
    num_groups: int
    wall_s: float
    sim_s: float  # sum over the configurations simulated in this call of simulated seconds
    restored: int = 0  # configurations read back from a checkpoint instead of simulated

    def write(self, path) -> Path:
        from jaxsim import report
        return report.write_table(self.rows, path)


_REQUEST_FIELDS = ("first_token", "finish", "first_scheduled", "prefix_hit", "num_preemptions", "recomputed",
                   "arrival", "prefill_instance", "prefill_end", "kv_ready")


def sweep(base: SweepBase, points: list, *, chunk_size: int = 128, progress: bool = True, devices=None,
          keep_requests: bool = False, checkpoint: "SweepCheckpoint | None" = None) -> SweepResult:
    """Run every point; see the module docstring. ``devices`` defaults to ``jax.local_devices()``,
    and to every process's devices (``jax.devices()``) in a multi-process run
    (:mod:`jaxsim.distributed`: each process builds its slice of each chunk, the rows are gathered
    to every process). ``checkpoint`` (:class:`jaxsim.checkpoint.SweepCheckpoint`): chunks it
    lists as finished are not run again (their rows are read back; in a multi-process run process
    0's checkpoint decides, and the other processes' rows of those chunks are None), and every
    chunk run is recorded in it."""
    t_start = time.perf_counter()
    if not points:
        raise JaxsimInputError("sweep.axes", "no configurations to run")
    for i, p in enumerate(points):
        _check_point(p, base, f"sweep point {i}")
    pid, nproc = distributed.process()
    # (every process's devices in one block per process: process p builds the p-th slice of a chunk)
    devices = list(devices or (sorted(jax.devices(), key=lambda d: (d.process_index, d.id)) if nproc > 1
                               else jax.local_devices()))
    chunk_size = min(chunk_size, len(points))  # a small sweep is not padded to a full chunk
    chunk_size = max(len(devices), -(-chunk_size // len(devices)) * len(devices))

    # Host side: one plan per point; traces hashed once per distinct trace.
    arrays_cache: dict = {}
    hashes_cache: dict = {}  # rate-scaled traces share their token ids, hence their hashes
    vocab_checked: set = set()  # (token ids, vocab_size) pairs checked: once per trace and model
    plans = []
    for p in points:
        shared = _shared_inputs(base, p)
        w = shared["workload"]
        insts = []  # this point's plan of each instance
        specs = _instances(base, p)
        for spec in specs:
            kw = {**shared, **_instance_inputs(base, p, spec), "model": spec.model or base.model,
                  "rt": _with_kv_dtype(simulator.instance_runtime(shared["rt"], spec), p),
                  "placement": spec.placement}
            sched = kw["sched"]
            max_blocks = simulator.block_table_width(w, sched.block_size)
            f = kw["kv_tier"].chunk_blocks(sched.block_size)
            key = (id(w), sched.block_size, max_blocks, f)
            if key not in arrays_cache:  # hashes are computed for every point: prefix caching is a knob
                hkey = (id(w.token_ids), sched.block_size, max_blocks)
                if hkey not in hashes_cache:
                    hashes_cache[hkey] = simulator.workload_hashes(w, sched.block_size, True, max_blocks)
                arrays_cache[key] = simulator.workload_arrays(w, sched.block_size, True, max_blocks,
                                                              hashes=hashes_cache[hkey], chunk_blocks=f)
            insts.append(simulator.plan(**kw, record_token_times=False, arrays=arrays_cache[key]))
        insts = simulator.place_instances(insts, specs, base.links, base.model, base.dp_sync,
                                          key=f"sweep point {len(plans)}: instances")
        insts = power_lib.attach(insts, _point_power(base, p), [_instance_inputs(base, p, s)["hw"].name for s in specs],
                                 [f"sweep point {len(plans)}: instance {i}" for i in range(len(specs))])
        # (the point's instances: their hardware carries the point's offload knobs)
        simulator.check_offload_capacity(insts, point_instances(base, p), base.model,
                                         f"sweep point {len(plans)}: instances")
        k = len(plans)
        simulator.check_block_sizes(insts, f"sweep point {k}")
        # A point whose KV cache cannot hold one max_model_len request (the num_gpu_blocks and
        # mem_util knobs vary it) is refused with vLLM's reason, naming the point and its knobs.
        named = f"sweep point {k} ({', '.join(f'{n}={v}' for n, v in p.items()) or 'the base'})"
        simulator.check_kv_holds_context(insts, [named if len(insts) == 1 else f"{named}: instance {i}"
                                                 for i in range(len(insts))])
        for spec in specs:
            m = spec.model or base.model
            if (id(w.token_ids), m.vocab_size) not in vocab_checked:  # (the traces live as long as the sweep)
                simulator.check_token_ids(w, m, named)
                vocab_checked.add((id(w.token_ids), m.vocab_size))
        simulator.check_requests_fit(insts, f"sweep point {k}")
        plans.append(insts)

    groups: dict = {}
    for i, insts in enumerate(plans):
        key = (insts[0].block_size, insts[0].dims.num_requests, simulator.needs_releases(insts),
               simulator.needs_dp_sync(insts), simulator.lower_tier(insts[0].kv_tier, insts[0].block_size))
        groups.setdefault(key, []).append(i)

    rows: list = [None] * len(points)
    requests: list | None = [None] * len(points) if keep_requests else None
    sim_s = 0.0
    done = checkpoint.finished() if checkpoint is not None else {}
    skip = distributed.agree(np.array([i in done for i in range(len(points))]))  # process 0 decides
    restored, chunk_id = 0, -1
    bar = _progress(len(points), progress and pid == 0)
    for (block_size, _, releases, dp_sync, _), members in groups.items():
        # A chunk loops until its slowest configuration is done, so chunks gather configurations
        # of similar length: longest trace (arrival span) first, ties in point order.
        members = sorted(members, key=lambda i: -_arrival_span(plans[i][0].workload))
        # sizes rounded up to a few per octave (larger sizes never change a result), so that calls of
        # similar points (a search's steps, its held-out traces) share one compile
        dims = simulator.Dims.merge([pl.dims for i in members for pl in plans[i]]).bucketed()
        n_inst = max(len(plans[i]) for i in members)
        static = dims.static(block_size, record_iterations=False, num_instances=n_inst, releases=releases,
                             dp_sync=dp_sync, kv_tier=plans[members[0]][0].kv_tier,
                             **({"router": base.router} if _is_cluster(base) else {}))
        max_steps = dims.max_steps(n_inst)  # the step limit follows the iterations a run may take
        # No per-iteration records in a sweep (one row per configuration): a 1-row buffer.
        dims = dataclasses.replace(dims, max_iters=1)
        # Every chunk of a group has the same shapes (hence one compile), the workload axis included.
        wl_axis = len({id(plans[i][0].workload_arrays) for i in members}) > 1
        # latency tables padded to the whole group's shapes (computed once per group, not per chunk)
        group_ext = latency.table_extents([pl.tables for i in members for pl in plans[i]])
        for lo in range(0, len(members), chunk_size):
            idx = members[lo:lo + chunk_size]
            chunk_id += 1  # (the same chunks in the same order on every process and every restart)
            if skip[idx].all():  # finished before a restart
                for i in idx:
                    rows[i] = done.get(i)
                restored += len(idx)
                bar.update(len(idx))
                continue
            padded = idx + [idx[-1]] * (chunk_size - len(idx))  # one shape per group: one compile
            mine = padded[pid * (chunk_size // nproc):(pid + 1) * (chunk_size // nproc)]  # this process's slice
            if not _is_cluster(base):
                state, params, wl, wl_batched = simulator.build([plans[i][0] for i in mine], dims, batched=True,
                                                                workload_batched=wl_axis, max_steps=max_steps,
                                                                pad_like=group_ext)
            else:
                state, params, wl, wl_batched = simulator.build_clusters([plans[i] for i in mine], dims,
                                                                         workload_batched=wl_axis,
                                                                         max_steps=max_steps, pad_like=group_ext)
            if nproc > 1:  # one global batch over every process's devices
                state, params = distributed.global_batch((state, params), tuple(devices))
                wl = distributed.global_batch(wl, tuple(devices), batched=wl_batched)
            final = _run_chunk(state, params, wl, wl_batched, static, tuple(devices))
            host = (jax.device_get if nproc == 1 else distributed.gather)(dict(
                **{f: getattr(final, f) for f in _REQUEST_FIELDS}, steps=final.steps, finished=final.finished,
                status=final.status, n_iters=final.inst.n_iters.sum(axis=1),
                preemptions=final.inst.counters.preemptions.sum(axis=1),
                tier_served=final.inst.counters.tier_served.sum(axis=1),
                **({} if final.power is None else dict(
                    power={k: getattr(final.power, k) for k in power_lib.ACTIVITY_FIELDS},
                    tier_recalled=final.inst.counters.tier_recalled, written=final.tier.written
                    if base.kv_tier.enabled else None, kv_bytes=final.kv_bytes))))
            chunk_sim = 0.0
            for k, i in enumerate(idx):
                one = jax.tree.map(lambda v: v[k], host)
                row, sim = config_metrics(plans[i][0].workload, one, base.slo_ttft_ms, base.slo_tpot_ms)
                if base.kv_tier.enabled:
                    row[f"{base.kv_tier.storage}_hit_tokens"] = int(one["tier_served"])  # served to admitted requests
                if "power" in one:
                    row.update(_energy_columns(plans[i], _point_power(base, points[i]), one, plans[i][0].workload))
                # which source priced the point's iterations (profiles.SOURCES keys; several: joined by +)
                src = "+".join(dict.fromkeys(pl.latency_source[0] for pl in plans[i]))
                rows[i] = {"config": i, **points[i], **row, "latency_model": src}
                chunk_sim += sim
                if keep_requests:
                    requests[i] = {f: one[f] for f in _REQUEST_FIELDS}
            sim_s += chunk_sim
            if checkpoint is not None:
                checkpoint.record(chunk_id, [rows[i] for i in idx], chunk_sim)
            bar.update(len(idx))
    bar.close()
    return SweepResult(rows, requests, len(groups), time.perf_counter() - t_start, sim_s, restored)


def _point_power(base: SweepBase, point: dict) -> "power_lib.PowerConfig | None":
    """The point's power blocks: the base's with its power knobs."""
    if base.power is None:
        return None
    fields = {f: point[k] for k, f in _POWER_KNOBS.items() if k in point}
    try:
        return base.power.with_npu(**fields) if fields else base.power
    except JaxsimInputError as e:
        raise JaxsimInputError(f"sweep point ({', '.join(f'{k}={v}' for k, v in point.items())}): {e.where}",
                               e.problem, e.fix) from None


def _energy_columns(plans: list, cfg: "power_lib.PowerConfig", one: dict, workload: Workload) -> dict:
    """A point's energy over its makespan (first arrival to last completion; jaxsim.power.energy):
    ``energy_j``, ``avg_power_w``, ``j_per_output_token``, ``output_tokens_per_j``,
    ``npu_energy_j`` (the modelled nodes'; with an unmodelled node the per-token ratios are NaN)."""
    n = len(plans)  # the design's own instances (a padded design's copies ran nothing)
    info = power_lib.host_info(plans, cfg)
    mem = simulator.memory_layout(plans, np.asarray([0] * n))
    chunk = mem["tier_chunk_bytes"]
    written = {}
    if one.get("written") is not None:
        pool_of = [int(x) for x in tier_layout(plans, plans[0].kv_tier).pool_of]
        written = {pool_of.index(pool): int(one["written"][pool]) for pool in sorted(set(pool_of))}
    pre, sent = np.asarray(one["prefill_instance"]), np.asarray(one["kv_bytes"], np.float64)
    info = power_lib.run_info(info, {k: np.asarray(v)[:n] for k, v in one["power"].items()},
                              np.asarray(one["tier_recalled"])[:n], written, chunk,
                              [sent[pre == i].sum() for i in range(n)])
    finish = np.asarray(one["finish"], np.int64)
    done = finish >= 0
    if not done.any():
        return {}
    e = power_lib.energy(info, int(np.asarray(workload.arrival_ns).min()), int(finish[done].max()))
    tokens = int(workload.output_toks[done].sum())
    per = math.nan if e["unmodelled_nodes"] else e["total_j"]  # the modelled nodes' joules, all nodes' tokens
    return {"energy_j": e["total_j"], "avg_power_w": e["average_w"], "npu_energy_j": e["joules"]["npu"],
            "j_per_output_token": per / tokens if tokens else math.nan,
            "output_tokens_per_j": tokens / per if per > 0 else math.nan}


def _arrival_span(workload: Workload) -> int:
    return int(workload.arrival_ns.max() - workload.arrival_ns.min())


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, disable=not enabled, unit="config", desc="sweep")


def _run_chunk(state, params, wl, wl_batched: bool, static: Static, devices: tuple):
    if len(devices) == 1:
        return cluster.run_batch(state, params, wl, static, workload_batched=wl_batched)
    return _sharded_runner(devices, wl_batched, static)(state, params, wl)


@functools.lru_cache(maxsize=16)
def _sharded_runner(devices: tuple, wl_batched: bool, static: Static):
    """``run_batch`` split over ``devices`` along the configuration axis. Each device loops over
    its own configurations (no cross-device synchronisation per step)."""
    mesh = Mesh(np.array(devices), ("config",))
    cfg, rep = PartitionSpec("config"), PartitionSpec()
    fn = functools.partial(cluster.simulate_until_done, static=static)

    def local(st, prm, wl):
        return jax.vmap(fn, in_axes=(0, 0, 0 if wl_batched else None))(st, prm, wl)

    sharded = jax.shard_map(local, mesh=mesh, in_specs=(cfg, cfg, cfg if wl_batched else rep), out_specs=cfg,
                            check_vma=False)
    return jax.jit(sharded)


def config_metrics(workload: Workload, out: dict, slo_ttft_ms, slo_tpot_ms):
    """One row of metrics from a configuration's per-request times (definitions as in
    :func:`jaxsim.metrics.request_table`: TPOT = (e2e - ttft) // (output - 1), 0 for one token).

    Returns ``(row, simulated seconds)``. ``status`` is the run's
    :class:`jaxsim.engine.status.Status` label: ``ok`` unless the run did not complete (for
    example ``stalled``: a request never fits the KV cache; ``slot_overflow``: raise max_slots;
    ``step_limit``); the metrics then cover the finished requests only.
    """
    finish = np.asarray(out["finish"], np.int64)
    done = finish >= 0
    # agentic sub-requests arrive when the engine releases them
    arrival = np.where(workload.released, np.asarray(out["arrival"], np.int64), workload.arrival_ns.astype(np.int64))
    output = workload.output_toks.astype(np.int64)
    ttft = (np.asarray(out["first_token"], np.int64) - arrival)[done]
    e2e = (finish - arrival)[done]
    out_done = output[done]
    tpot = np.where(out_done > 1, (e2e - ttft) // np.maximum(out_done - 1, 1), 0)
    makespan = float(finish[done].max() - arrival.min()) / 1e9 if done.any() else math.nan
    span = float(arrival.max() - arrival.min()) / 1e9
    row = {"status": Status(int(out["status"])).label, "finished": int(done.sum())}
    for name, v in (("ttft", ttft), ("tpot", tpot), ("e2e", e2e)):
        ms = v / 1e6
        row[f"{name}_mean_ms"] = float(ms.mean()) if ms.size else math.nan
        for q in (50, 90, 99):
            row[f"{name}_p{q}_ms"] = float(np.percentile(ms, q)) if ms.size else math.nan
    row["offered_rate_rps"] = (len(arrival) - 1) / span if span > 0 else math.inf
    row["throughput_rps"] = float(done.sum() / makespan) if makespan > 0 else math.nan
    row["output_tok_s"] = float(out_done.sum() / makespan) if makespan > 0 else math.nan
    row["makespan_s"] = makespan
    handed = np.asarray(out["prefill_instance"]) >= 0
    if handed.any():  # P/D: the wait for the KV transfer after the prefill
        wait_ms = (np.asarray(out["kv_ready"], np.int64) - np.asarray(out["prefill_end"], np.int64))[handed] / 1e6
        row["kv_wait_mean_ms"] = float(wait_ms.mean())
        row["kv_wait_p99_ms"] = float(np.percentile(wait_ms, 99))
    row["preemptions"] = int(out["preemptions"])
    row["iterations"] = int(out["n_iters"])
    if slo_ttft_ms is not None or slo_tpot_ms is not None:
        ok = np.ones(ttft.shape, bool)
        if slo_ttft_ms is not None:
            ok &= ttft / 1e6 <= slo_ttft_ms
        if slo_tpot_ms is not None:
            ok &= tpot / 1e6 <= slo_tpot_ms
        row["slo_attainment"] = float(ok.sum() / len(arrival))  # unfinished requests miss the SLO
        row["goodput_rps"] = float(ok.sum() / makespan) if makespan > 0 else math.nan
    return row, (0.0 if math.isnan(makespan) else makespan)
