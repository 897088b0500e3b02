"""Host-side entry point: turn a description of one instance (or a cluster) and a trace into a
compiled run, and run it.

``simulate(...)`` / ``simulate_cluster(...)`` plan (:mod:`jaxsim.planning`: checks, KV sizing,
profile tables, prefix hashes), build the fixed-shape state (:mod:`jaxsim.building`), run the
jitted loop and convert the result to numpy (:mod:`jaxsim.results`). ``prepare(...)`` /
``prepare_cluster(...)`` stop before running, for benchmarks and sweeps. The names of the three
job modules that callers use most are re-exported here (``__all__``).
"""

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxsim.building import build, build_clusters
from jaxsim import power as power_lib
from jaxsim import progress
from jaxsim.engine import cluster, routing
from jaxsim.engine.static import Static
from jaxsim.errors import JaxsimInputError
from jaxsim.model import ModelConfig
from jaxsim.planning import (Dims, Plan, block_table_width, bucket, check_block_sizes, check_kv_holds_context,
                             check_offload_capacity, check_requests_fit, check_token_ids, check_workload, instance_runtime,
                             latency_tables, needs_dp_sync, needs_releases,
                             lower_tier, num_kv_blocks, place_instances, plan, workload_arrays, workload_hashes)
from jaxsim.results import IterationBufferFull, to_result
from jaxsim.spec import Calibration, HardwareConfig, InstanceSpec, KVTierConfig, LinkConfig, ModelRuntimeConfig, SchedulerConfig, SimResult, Workload


@dataclasses.dataclass
class Prepared:
    state: cluster.ClusterState
    params: cluster.EngineParams
    workload: cluster.WorkloadArrays
    static: Static  # the static argument of cluster.run (shapes, loop bounds, features)
    num_blocks: int
    block_size: int
    workload_host: Workload
    max_iters_bound: int  # the iteration buffer never needs more rows than this
    profile_outliers: tuple = ()  # of the profile bundles used (profiles.ProfileBundle.outliers)
    approximations: tuple = ()  # what the result estimates beyond the profiles (Plan.approximations)
    latency_sources: tuple = ()  # per instance, (source, hardware) of what priced it (Plan.latency_source)
    memory: dict = dataclasses.field(default_factory=dict)  # the memory series' constants (memory_layout)
    power: dict | None = None  # what pricing the run's energy needs (jaxsim.power.host_info); None: no power


def memory_layout(plans: "list[Plan]", pool_of) -> dict:
    """Per instance, what the memory series need besides the iteration rows: GPU bytes that do not
    vary (weights + activation reserve), GPU bytes of one KV block (all ranks; 0 when the KV cache
    sits off the GPU, ``kv_loc``), and the KV tier's storage, pool of each instance (``pool_of``,
    the built ``SchedulerParams.tier_pool``) and bytes of one chunk (all ranks)."""
    tier = plans[0].kv_tier
    return dict(gpu_static_bytes=np.array([pl.gpu_static_bytes for pl in plans], np.int64),
                num_blocks=np.array([pl.num_blocks for pl in plans], np.int64),
                kv_block_bytes=np.array([pl.block_size * pl.kv_token_bytes * pl.kv_on_gpu for pl in plans], np.int64),
                tier_storage=tier.storage if tier.enabled else None, tier_pool_of=np.asarray(pool_of),
                tier_chunk_bytes=np.array([tier.chunk_bytes(pl.block_size, pl.kv_token_bytes) for pl in plans],
                                          np.int64))


def plan_run(workload: Workload, model: ModelConfig, hw: HardwareConfig, sched: SchedulerConfig,
             rt: ModelRuntimeConfig = ModelRuntimeConfig(), calib: Calibration = Calibration(), **kwargs) -> Plan:
    """The host-side plan of one instance after every check a run makes before it compiles (the
    profiles, the configurations vLLM refuses at start-up, token ids, requests that can never
    fit). No JAX array is built: cheap, for validating a configuration without running it.

    Raises:
      JaxsimInputError: the first problem, naming the setting or trace line.
    """
    power = kwargs.pop("power", None)
    pl = plan(workload, model, hw, sched, rt, calib, **kwargs)
    check_kv_holds_context([pl], ["model.max_model_len"])
    check_token_ids(workload, model)
    check_requests_fit([pl])
    return power_lib.attach([pl], power, [hw.name], ["hardware"])[0]


def plan_cluster(workload: Workload, model: ModelConfig, instances: "list[InstanceSpec]",
                 rt: ModelRuntimeConfig = ModelRuntimeConfig(), links: LinkConfig = LinkConfig(), dp_sync: str = "moe",
                 **kwargs) -> "list[Plan]":
    """:func:`plan_run` for a cluster: one checked plan per instance, placed (roles, nodes, DP
    groups, links), each instance checked as vLLM checks its own engine."""
    if not instances:
        raise JaxsimInputError("cluster.instances", "a cluster needs at least one instance")
    power = kwargs.pop("power", None)
    # The trace's arrays (prefix hashes included) once per block size and prefix-caching setting,
    # not once per instance (100,000 instances took minutes hashing the same trace).
    arrays: dict = {}
    plans = []
    for spec in instances:
        bs = spec.sched.block_size
        kv_tier = kwargs.get("kv_tier")
        f = (kv_tier or KVTierConfig()).chunk_blocks(bs)
        key = (bs, spec.sched.enable_prefix_caching, f)
        if key not in arrays:
            check_workload(workload)
            arrays[key] = workload_arrays(workload, bs, spec.sched.enable_prefix_caching, block_table_width(workload, bs),
                                          chunk_blocks=f)
        plans.append(plan(workload, spec.model or model, spec.hw, spec.sched, instance_runtime(rt, spec), spec.calib,
                          **kwargs, arrays=arrays[key], placement=spec.placement))
    plans = place_instances(plans, instances, links, model, dp_sync)
    plans = power_lib.attach(plans, power, [spec.hw.name for spec in instances],
                             [f"cluster.instances[{i}]" for i in range(len(plans))])
    check_evict_locations(instances, kwargs.get("kv_tier") or KVTierConfig())
    check_offload_capacity(plans, instances, model, "cluster.instances")
    check_block_sizes(plans, "cluster.instances[*].scheduler.block_size")
    check_kv_holds_context(plans, [f"cluster.instances[{i}]" for i in range(len(plans))])
    for m in {id(spec.model or model): spec.model or model for spec in instances}.values():
        check_token_ids(workload, m, "" if m is model else f"the model of an instance, {m.name}")
    check_requests_fit(plans, "cluster.instances")
    return plans


def check_evict_locations(instances: "list[InstanceSpec]", kv_tier: KVTierConfig) -> None:
    """A cluster JSON instance's ``kv_evict_loc`` (where KV evicted from the GPU goes, REFERENCE.md
    §1.10) names the run's KV tier: a value other than the default ``cpu`` must be that tier's
    storage (``cxl:<id>`` for ``kv_tier=cxl``), and needs a tier. With the default, the run's
    ``kv_tier`` decides (the reference's ``--prefix-storage``)."""
    for i, spec in enumerate(instances):
        loc = spec.kv_evict_loc
        if loc == "cpu":
            continue
        kind = "cxl" if loc.startswith("cxl:") else loc
        if not kv_tier.enabled or kind != kv_tier.storage:
            have = f"the run's KV tier is {kv_tier.storage!r}" if kv_tier.enabled else "the run has no KV tier"
            raise JaxsimInputError(f"instances[{i}].kv_evict_loc", f"{loc!r}, but {have}",
                                   f"set kv_tier={kind}" if kind in ("cpu", "cxl") else "use \"cpu\" or \"cxl:<id>\"")


def _record_iterations(kwargs: dict) -> bool:
    """Pop ``record_iterations`` from a run's keyword arguments (default True), refusing the
    settings that need the iteration rows."""
    rows = bool(kwargs.pop("record_iterations", True))
    if not rows and kwargs.get("power") is not None:
        raise JaxsimInputError("record_iterations", "False, but the power meter prices energy from the iteration rows",
                               "keep the iteration rows (record_iterations=True) or run without power")
    return rows


def _one_row(dims: Dims, num_instances: int) -> "tuple[Dims, int]":
    """``dims`` with a 1-row iteration buffer (rows are not recorded: ``Static.record_iterations``
    False ignores it, as a sweep does), and the step limit the full buffer would have allowed (the
    limit follows the iterations a run may take, :meth:`Dims.max_steps`)."""
    return dataclasses.replace(dims, max_iters=1), dims.max_steps(num_instances)


def prepare(workload: Workload, model: ModelConfig, hw: HardwareConfig, sched: SchedulerConfig,
            rt: ModelRuntimeConfig = ModelRuntimeConfig(), calib: Calibration = Calibration(), **kwargs) -> Prepared:
    """Everything :func:`cluster.run` needs for one configuration (:func:`plan_run` + ``build``).
    ``power``: a :class:`jaxsim.power.PowerConfig` (meter power and energy; None: none).
    ``record_iterations=False``: keep no iteration rows (:func:`simulate`)."""
    power = kwargs.get("power")
    rows = _record_iterations(kwargs)
    pl = plan_run(workload, model, hw, sched, rt, calib, **kwargs)
    # Size classes let separate runs of similar traces share a compile (a sweep compiles once per
    # group anyway, so it keeps exact sizes and the memory they save).
    dims = pl.dims.bucketed(exact_iters=bool(kwargs.get("max_iterations")))
    dims, max_steps = (dims, None) if rows else _one_row(dims, 1)
    state, params, wl, _ = build([pl], dims, batched=False, max_steps=max_steps)
    static = dims.static(pl.block_size, record_iterations=rows, releases=needs_releases([pl]), kv_tier=pl.kv_tier)
    return Prepared(state, params, wl, static, pl.num_blocks, pl.block_size, workload, pl.max_iters_bound,
                    pl.profile_outliers, pl.approximations, (pl.latency_source,),
                    memory_layout([pl], params.sched.tier_pool[None]),
                    power_lib.host_info([pl], power) if power is not None else None)


def prepare_cluster(workload: Workload, model: ModelConfig, instances: "list[InstanceSpec]",
                    router: routing.Router = routing.Router(), rt: ModelRuntimeConfig = ModelRuntimeConfig(),
                    links: LinkConfig = LinkConfig(), dp_sync: str = "moe", **kwargs) -> Prepared:
    """A cluster of instances of one model (hardware, scheduler knobs, engine costs and roles may
    differ per instance) serving ``workload``, with arrivals routed by ``router`` and KV handed
    from prefill to decode instances over ``links``."""
    power = kwargs.get("power")
    rows = _record_iterations(kwargs)
    plans = plan_cluster(workload, model, instances, rt, links, dp_sync, **kwargs)
    kwargs.pop("power", None)
    dims = Dims.merge([pl.dims for pl in plans]).bucketed(exact_iters=bool(kwargs.get("max_iterations")))
    max_steps = None
    if not rows:
        dims, max_steps = _one_row(dims, len(plans))
    elif not kwargs.get("max_iterations") and len(plans) > 1:
        # Each instance records only its own iterations, so an automatic buffer starts from twice
        # an even share of the trace's guess (a buffer of the whole guess per instance grows with
        # instances x trace: 64 instances of a 19,200-request trace did not fit in 24 GiB). A run
        # that fills it is rerun with twice the rows (simulate_cluster), never silently cut.
        share = min(dims.max_iters, -(-2 * dims.max_iters // len(plans)) + 1024)
        dims = dataclasses.replace(dims, max_iters=bucket(share))
    # one design of the batched builder, its configuration axis dropped (the plans' axis is the instance axis)
    state, params, wl, _ = build_clusters([plans], dims, workload_batched=False, max_steps=max_steps)
    state, params = jax.tree.map(lambda x: x[0], (state, params))
    static = dims.static(plans[0].block_size, record_iterations=rows, num_instances=len(plans),
                         releases=needs_releases(plans), router=router,
                         dp_sync=needs_dp_sync(plans), kv_tier=plans[0].kv_tier)
    return Prepared(state, params, wl, static, sum(pl.num_blocks for pl in plans), plans[0].block_size, workload,
                    max(pl.max_iters_bound for pl in plans),
                    tuple(dict.fromkeys(o for pl in plans for o in pl.profile_outliers)),
                    tuple(dict.fromkeys(a for pl in plans for a in pl.approximations)),
                    tuple(pl.latency_source for pl in plans), memory_layout(plans, params.sched.tier_pool),
                    power_lib.host_info(plans, power) if power is not None else None)


def simulate_cluster(workload: Workload, model: ModelConfig, instances: "list[InstanceSpec]",
                     router: routing.Router = routing.Router(), rt: ModelRuntimeConfig = ModelRuntimeConfig(),
                     links: LinkConfig = LinkConfig(), dp_sync: str = "moe", **kwargs) -> SimResult:
    """Simulate a cluster (see :func:`prepare_cluster`); per-request results carry the instance
    that finished each request, and the iteration rows of every instance (``iter_instance``);
    P/D runs add the prefill instance, KV transfer times and bytes of every request. Keyword
    arguments as :func:`simulate`'s (``progress``, ``record_iterations``, ...)."""
    return _run_growing_buffer(
        lambda **kw: prepare_cluster(workload, model, instances, router, rt, links, dp_sync, **kw), kwargs)


# The stretches of a run with progress (jaxsim.progress) hand each stretch's final state to the
# next. Donated, the loop runs in the state's own buffers; otherwise XLA copies the whole state into
# the loop first, on every call: with a 1,000,000-request trace that state (its prefix index with an
# entry per distinct block hash, mostly) is 1.25 GB, 0.4 s per stretch of ~0.5 s.
run_donating = jax.jit(cluster.simulate_until_done, static_argnames="static", donate_argnames="st")


def run_prepared(p: Prepared, bar: "progress.Bar | None" = None, first: int = progress.FIRST_STRETCH
                 ) -> cluster.ClusterState:
    """Run the compiled loop to the end. With a ``bar``, the loop runs in stretches of steps
    (:func:`jaxsim.progress.run_in_stretches`, the first of ``first`` steps) and the bar shows
    simulated time and finished requests between them; the result is the same
    (``tests/test_long_trace.py``). ``p.state`` is left as it was (the stretches work on a copy)."""
    if bar is None:
        return cluster.run(p.state, p.params, p.workload, p.static)
    state = jax.tree.map(jnp.copy, p.state)  # one copy: the stretches donate their state
    return progress.run_in_stretches(lambda st: run_donating(st, p.params, p.workload, p.static), state, bar,
                                     first)


def result_of(p: Prepared, final: cluster.ClusterState, wall_s: float | None = None) -> SimResult:
    """:func:`jaxsim.results.to_result` of a run; a run that kept no iteration rows
    (``record_iterations=False``) gets empty ``iter_*`` arrays, and its ``stats`` still count
    the iterations it ran (``iterations``, per instance and per latency source) and say
    ``iteration_rows: "not recorded"``."""
    if p.static.record_iterations:
        return to_result(p, final, wall_s=wall_s)
    counts = [int(c) for c in np.asarray(final.inst.n_iters)]
    r = to_result(p, dataclasses.replace(final, inst=dataclasses.replace(final.inst, n_iters=jnp.zeros_like(
        final.inst.n_iters))), wall_s=wall_s)
    stats = dict(r.stats, iterations=sum(counts), iteration_rows="not recorded")
    if "iterations_per_instance" in stats:
        stats["iterations_per_instance"] = counts
    for source, d in stats.get("latency_model", {}).items():
        d["iterations"] = sum(c for (src, _), c in zip(p.latency_sources, counts) if src == source)
    return dataclasses.replace(r, stats=stats)


def simulate(workload: Workload, model: ModelConfig, hw: HardwareConfig, sched: SchedulerConfig,
             rt: ModelRuntimeConfig = ModelRuntimeConfig(), calib: Calibration = Calibration(),
             **kwargs) -> SimResult:
    """Simulate one instance serving ``workload``; returns per-request and per-iteration results.

    With an automatic iteration buffer (``max_iterations=0``), a run that fills it is rerun with
    twice the rows (a recompile), up to the proven bound. The other keyword arguments are
    :func:`jaxsim.planning.plan`'s, and:

    - ``progress``: ``True`` shows a tqdm bar (simulated time, finished requests) once the run
      has taken 2 s; a callable ``fn(finished: int, now_ns: int)`` is called instead, after each
      stretch of the loop (:mod:`jaxsim.progress`). Either way the result is the one-call run's.
    - ``record_iterations=False`` keeps no per-iteration rows: the result's ``iter_*`` arrays are
      empty (``stats["iterations"]`` still counts them). With ``record_token_times=False`` too,
      the run's memory grows with its requests only, not with its iterations and tokens, and
      stays flat while it runs: per request ~100 bytes of state and its prefix-hash ids padded
      to the longest request (~2 KB for ShareGPT lengths), and 12 bytes per distinct block hash
      of the trace (the prefix index): 3.2 GB of arrays for 1,000,000 ShareGPT requests (README
      "Long traces"). Not with ``power`` (it prices the rows).

    Raises:
      JaxsimInputError: a bad setting or trace line (see :func:`plan_run`).
      CapacityOverflowError: the run hit a capacity it was built with (iteration rows set by
        ``max_iterations``, slots, the step limit).
    """
    return _run_growing_buffer(lambda **kw: prepare(workload, model, hw, sched, rt, calib, **kw), kwargs)


def _run_growing_buffer(prepare_fn, kwargs: dict) -> SimResult:
    """Run ``prepare_fn(**kwargs)``; with an automatic iteration buffer (``max_iterations=0``),
    a run that fills it is rerun with twice the rows (a recompile), up to the proven bound."""
    t0 = time.perf_counter()
    kwargs = dict(kwargs)
    show = kwargs.pop("progress", False)
    p = prepare_fn(**kwargs)
    with progress.Bar(p.workload_host.num_requests, enabled=bool(show) and not callable(show),
                      callback=show if callable(show) else None) as bar:
        while True:
            final = jax.block_until_ready(run_prepared(p, bar if show else None))
            try:
                return result_of(p, final, wall_s=time.perf_counter() - t0)
            except IterationBufferFull:
                rows = p.state.records.start.shape[-1]
                if kwargs.get("max_iterations") or rows >= p.max_iters_bound:
                    raise
                p = prepare_fn(**{**kwargs, "max_iterations": min(2 * rows, p.max_iters_bound)})


__all__ = [  # this module's entry points, then the job modules' names most callers use
    "Prepared", "plan_run", "plan_cluster", "prepare", "prepare_cluster", "run_prepared", "result_of", "simulate",
    "simulate_cluster",
    "Dims", "Plan", "plan", "place_instances", "instance_runtime", "check_offload_capacity", "needs_dp_sync", "needs_releases", "num_kv_blocks", "latency_tables",
    "block_table_width", "lower_tier", "check_block_sizes", "check_kv_holds_context", "check_requests_fit", "check_token_ids",
    "workload_arrays", "workload_hashes",
    "build", "build_clusters", "IterationBufferFull", "to_result",
]
