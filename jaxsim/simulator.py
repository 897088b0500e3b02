"""Host-side entry point: turn a description of one instance and a trace into a compiled run.

``simulate(...)`` loads the profile bundle, sizes the KV cache, hashes the trace's blocks,
builds the fixed-shape state, runs the jitted loop and converts the result to numpy
(``jaxsim.spec.SimResult``). ``prepare(...)`` stops before running, for benchmarks and sweeps.
"""

import dataclasses
import functools
import math
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from jaxsim import latency, profiles
from jaxsim.engine import cluster
from jaxsim.engine import instance as inst_lib
from jaxsim.engine import routing
from jaxsim.engine.static import Static
from jaxsim.engine.status import Status
from jaxsim.errors import CapacityOverflowError, JaxsimInputError
from jaxsim.model import ModelConfig, dtype_bytes
from jaxsim.prefix import hash_ids
from jaxsim.spec import (ROLES, Calibration, HardwareConfig, InstanceSpec, LinkConfig, ModelRuntimeConfig,
                         SchedulerConfig, SimResult, Workload)

GIB = 2**30
POP_WINDOW = 64  # free-list entries (and registrations) handled per loop trip; any value is correct
SLOT_HEADROOM = 32  # waiting-request slots beyond max_num_seqs when sim.max_slots is auto


class IterationBufferFull(CapacityOverflowError):
    """The per-iteration record buffer filled up before every request finished."""


def weight_and_kv_bytes(model: ModelConfig, rt: ModelRuntimeConfig) -> tuple[int, int]:
    """Bytes per weight and per KV element (REFERENCE.md §1.14: KV follows the activation dtype)."""
    w = dtype_bytes(model.torch_dtype if rt.dtype == "auto" else rt.dtype, "model.dtype")
    act = dtype_bytes(model.torch_dtype, "model.torch_dtype")
    kv = act if rt.kv_cache_dtype == "auto" else dtype_bytes(rt.kv_cache_dtype, "model.kv_cache_dtype")
    return w, kv


def num_kv_blocks(model: ModelConfig, hw: HardwareConfig, sched: SchedulerConfig,
                  rt: ModelRuntimeConfig) -> int:
    """KV blocks per instance: an explicit count, or the memory model of REFERENCE.md §1.3
    (``util * device bytes - weights - activation reserve``, per rank, over bytes per block)."""
    if hw.num_gpu_blocks is not None:
        if hw.num_gpu_blocks <= 0:
            raise JaxsimInputError("hardware.num_gpu_blocks", f"must be > 0, got {hw.num_gpu_blocks}")
        return int(hw.num_gpu_blocks)
    w, kv = weight_and_kv_bytes(model, rt)
    # Experts are split over the ranks either way: by expert (EP, ep ranks) or TP-sharded (tp ranks).
    weights = model.weight_bytes_per_rank(w, tp=hw.tp, pp=hw.pp, ep=(hw.ep or hw.tp) if model.is_moe else 1)
    usable = math.floor(hw.mem_size_gb * GIB * hw.mem_util) - weights - int(hw.activation_reserve_gb * GIB)
    per_block = sched.block_size * model.kv_bytes_per_token_per_rank(kv, tp=hw.tp, pp=hw.pp)
    blocks = usable // per_block
    if blocks <= 0:
        raise JaxsimInputError(
            "hardware.mem_size_gb", f"{hw.mem_size_gb} GiB x util {hw.mem_util} leaves no room for KV "
            f"after {weights / GIB:.2f} GiB of weights per rank", "use more memory, a higher TP, or num_gpu_blocks")
    return int(blocks)


@dataclasses.dataclass(frozen=True)
class Dims:
    """The static sizes of one compiled run. Configurations batched together share one ``Dims``
    (the elementwise max of theirs, :meth:`merge`); larger sizes never change a result."""

    num_slots: int  # request slots (running + head of the waiting queue)
    max_blocks: int  # block-table width: blocks of the longest request, + 1
    num_hashes: int  # prefix-index entries (distinct full-block hashes of the trace)
    num_blocks_cap: int  # KV-pool capacity in blocks (each configuration uses num_blocks of it)
    max_iters: int  # rows of the per-iteration record buffer
    num_tokens: int  # token-time buffer (0 = token times not recorded)
    num_requests: int
    max_pp: int = 1  # largest pipeline degree of an instance (static: pp = 1 compiles no pipeline)

    @staticmethod
    def merge(dims: "list[Dims]") -> "Dims":
        return Dims(**{f.name: max(getattr(d, f.name) for d in dims) for f in dataclasses.fields(Dims)})

    @property
    def ring_cap(self) -> int:
        return 2 * self.num_blocks_cap + POP_WINDOW

    def static(self, block_size: int, record_iterations: bool = True, num_instances: int = 1,
               releases: bool = False, router: routing.Router = routing.Router(), dp_sync: bool = False) -> Static:
        """The static part of :func:`cluster.run` / :func:`cluster.run_batch`. The step limit
        (a guard against a run that never ends) covers every instance's iterations (``max_iters``
        each) and a stop at every arrival and release."""
        return Static(block_size=block_size, window=POP_WINDOW, ring_cap=self.ring_cap,
                      max_steps=(3 + self.max_pp) * num_instances * self.max_iters + 4 * self.num_requests + 16,
                      num_instances=num_instances, record_iterations=record_iterations, router=router,
                      releases=releases, dp_sync=dp_sync, max_pp=self.max_pp)


@dataclasses.dataclass
class Plan:
    """One configuration on the host, before any device array: what ``prepare`` builds from."""

    workload: Workload
    workload_arrays: dict  # numpy fields of cluster.WorkloadArrays
    tables: latency.LatencyTables
    sched: dict  # numpy fields of inst_lib.SchedulerParams (num_blocks included)
    calibration: Calibration
    num_blocks: int
    block_size: int
    dims: Dims
    max_iters_bound: int  # the iteration buffer never needs more rows than this
    kv_token_bytes: int  # K+V bytes of one token (all layers and ranks): what a P/D hand-off sends
    # The parallel layout the engine loop needs (EngineParams.pp / tp / num_layers).
    pp: int = 1
    tp: int = 1
    num_layers: int = 1
    # Its place in a cluster (set by prepare_cluster / the sweep; a lone instance keeps these).
    role: str = "colocated"
    node: int = 0
    links: LinkConfig = LinkConfig()
    dp_group: int = -1  # wave-synchronised DP group: the index of its first instance; -1 none


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


def check_scheduler(sched: SchedulerConfig) -> None:
    if sched.block_size <= 0:
        raise JaxsimInputError("scheduler.block_size", f"must be > 0, got {sched.block_size}")
    for field in ("max_num_seqs", "max_num_batched_tokens", "long_prefill_token_threshold"):
        if getattr(sched, field) < 0:
            raise JaxsimInputError(f"scheduler.{field}", f"must be >= 0 (0 = unlimited/off), got {getattr(sched, field)}")


def check_workload_fits(workload: Workload, model: ModelConfig) -> None:
    target = workload.input_toks.astype(np.int64) + workload.output_toks
    ctx = model.max_position_embeddings
    too_long = np.nonzero(target > ctx)[0]
    if len(too_long):
        i = int(too_long[0])
        line = int(workload.line_numbers[i]) if workload.line_numbers is not None else i + 1
        raise JaxsimInputError(
            f"{workload.source}:{line}",
            f"request {i} (line {line}): input {int(workload.input_toks[i])} + output {int(workload.output_toks[i])} tokens exceed the "
            f"context of {model.name} ({ctx})", "drop or truncate the request")


def block_table_width(workload: Workload, block_size: int) -> int:
    """Blocks of the longest request (prompt + output), + 1: the block table's width."""
    target = workload.input_toks.astype(np.int64) + workload.output_toks
    return int(-(-target.max() // block_size)) + 1


def workload_hashes(workload: Workload, block_size: int, prefix_caching: bool, max_blocks: int) -> dict:
    """The prefix-cache keys of the trace: dense hash ids of each request's full blocks, padded to
    the block table (``hashes``, ``n_hashes``), and the id count. They depend only on the token
    ids, so traces that differ in arrival times only (a sweep's rate scaling) share them."""
    n = workload.num_requests
    hashes = np.full((n, max_blocks), -1, np.int32)
    n_hashes = np.zeros(n, np.int32)
    num_hashes = 1
    if prefix_caching:
        ids, num_hashes = hash_ids(workload.token_ids, block_size)
        for i, h in enumerate(ids):
            h = h[:max_blocks]
            hashes[i, : len(h)] = h
            n_hashes[i] = len(h)
    return dict(hashes=hashes, n_hashes=n_hashes, num_hashes=num_hashes)


def workload_arrays(workload: Workload, block_size: int, prefix_caching: bool, max_blocks: int,
                    hashes: dict | None = None) -> dict:
    """The trace as the engine's numpy arrays (``cluster.WorkloadArrays`` fields) + hash count
    (``hashes``: :func:`workload_hashes` of the same token ids, when already computed)."""
    if hashes is None:
        hashes = workload_hashes(workload, block_size, prefix_caching, max_blocks)
    n = workload.num_requests
    # Agentic sub-requests after the first arrive when their predecessor finishes: they sort last,
    # at a time that never comes (the engine releases them).
    arrival = np.where(workload.released, np.iinfo(np.int64).max, np.asarray(workload.arrival_ns, np.int64))
    order = np.lexsort((np.arange(n), arrival)).astype(np.int32)
    out = workload.output_toks.astype(np.int64)
    token_offset = np.concatenate([[0], np.cumsum(out)[:-1]]).astype(np.int32)
    nxt = workload.next_in_session if workload.next_in_session is not None else np.full(n, -1)
    tool = workload.tool_ns if workload.tool_ns is not None else np.zeros(n)
    return dict(arrival_sorted=arrival[order], order=order,
                prompt=np.asarray(workload.input_toks, np.int32), output=np.asarray(workload.output_toks, np.int32),
                token_offset=token_offset, next_in_session=np.asarray(nxt, np.int32),
                tool_ns=np.asarray(tool, np.int64), **hashes)


@functools.lru_cache(maxsize=64)
def _bundle(profiles_dir: str, hardware: str, model: ModelConfig, variant: str, tp: int):
    return profiles.load_profile_bundle(profiles_dir, hardware, model, variant=variant, tp=tp)


@functools.lru_cache(maxsize=64)
def _tables(profiles_dir: str, hw: HardwareConfig, model: ModelConfig, variant: str, w_bytes: int,
            rt: ModelRuntimeConfig = ModelRuntimeConfig()):
    bundle = _bundle(profiles_dir, hw.name, model, variant, hw.tp)
    if rt.expert_routing not in ("balanced", "zipf"):
        raise JaxsimInputError("model.expert_routing", f"unknown routing {rt.expert_routing!r}",
                               "use 'balanced' or 'zipf'")
    pop = None  # BALANCED expert routing (REFERENCE.md §1.9)
    if model.is_moe and rt.expert_routing == "zipf":
        pop = latency.zipf_popularity(model.num_experts, rt.expert_zipf_s, seed=rt.expert_seed)
    return latency.latency_tables(bundle, model, hw, weight_bytes=w_bytes, ep=hw.ep or None, expert_popularity=pop)


def plan(workload: Workload, model: ModelConfig, hw: HardwareConfig, sched: SchedulerConfig,
         rt: ModelRuntimeConfig = ModelRuntimeConfig(), calib: Calibration = Calibration(), *,
         profiles_dir="profiles", max_slots: int = 0, record_token_times: bool = True,
         max_iterations: int = 0, variant: str | None = None, scales: dict | None = None,
         arrays: dict | None = None) -> Plan:
    """Check one configuration and compute everything host-side (``arrays``: precomputed
    :func:`workload_arrays` of this workload, reused across a sweep)."""
    bs = sched.block_size
    n = workload.num_requests
    if n == 0:
        raise JaxsimInputError(workload.source, "the workload has no requests")
    check_scheduler(sched)
    # Slots hold the running requests and the head of the waiting queue; with one instance, the
    # rest of the queue waits in arrival order outside the state, which schedules identically.
    if max_slots == 0:
        max_slots = sched.max_num_seqs + SLOT_HEADROOM if sched.max_num_seqs else n + 1
    elif sched.max_num_seqs and max_slots <= sched.max_num_seqs:
        raise JaxsimInputError(
            "sim.max_slots", f"must exceed scheduler.max_num_seqs ({sched.max_num_seqs}); got {max_slots}",
            "raise sim.max_slots or set it to 0 (auto): each slot holds one running or waiting request")
    check_workload_fits(workload, model)
    if not 1 <= hw.pp <= model.num_layers:
        raise JaxsimInputError("hardware.pp", f"must be in [1, {model.num_layers}] ({model.name}'s layers), got {hw.pp}")
    ctx = model.max_position_embeddings

    w_bytes, kv_bytes = weight_and_kv_bytes(model, rt)
    variant = variant or {1: "fp8", 2: "bf16", 4: "fp32"}.get(w_bytes, "bf16")
    bundle = _bundle(str(profiles_dir), hw.name, model, variant, hw.tp)
    tables = _tables(str(profiles_dir), hw, model, variant, w_bytes, rt)
    if scales:
        f64 = lambda x: jnp.asarray(x, jnp.float64)  # noqa: E731
        tables = dataclasses.replace(tables, **{k: f64(v) for k, v in scales.items()})
    profiles.check_engine_limits(bundle, sched.max_num_batched_tokens, sched.max_num_seqs)
    num_blocks = num_kv_blocks(model, hw, sched, rt)

    # Prefix-cache keys: dense hash ids of each request's full blocks, padded to the block table.
    if arrays is None:
        arrays = workload_arrays(workload, bs, sched.enable_prefix_caching, block_table_width(workload, bs))
    out = workload.output_toks.astype(np.int64)

    mnbt = sched.max_num_batched_tokens or ctx
    mnbt = min(mnbt, ctx)  # vLLM clamps the budget to the context length
    # Iteration buffer. Every iteration emits a token or advances prefill chunks that fill the
    # token budget (a chunk smaller than the budget and the threshold completes its prefill and
    # emits), which bounds the count (doubled as headroom for recomputation after preemptions).
    # That bound is large and mostly unused, so the buffer starts from a guess for a batched
    # engine; ``simulate`` doubles it and reruns when it fills (overflow is detected, never silent).
    chunk = min(mnbt, sched.long_prefill_token_threshold or mnbt)
    chunks = -(-int(workload.input_toks.sum()) // chunk)
    bound = int(2 * (out.sum() + chunks) + 64)
    max_iters = max_iterations or min(bound, int(out.sum()) // 4 + 4 * chunks + 8 * n + 1024)
    sp = dict(max_num_seqs=np.int32(sched.max_num_seqs), max_num_batched_tokens=np.int32(mnbt),
              long_prefill_threshold=np.int32(sched.long_prefill_token_threshold),
              chunked_prefill=np.bool_(sched.enable_chunked_prefill), reserve_full_isl=np.bool_(sched.reserve_full_isl),
              prefix_caching=np.bool_(sched.enable_prefix_caching), async_scheduling=np.bool_(sched.async_scheduling),
              num_blocks=np.int32(num_blocks))
    dims = Dims(num_slots=max_slots, max_blocks=arrays["hashes"].shape[1], num_hashes=arrays["num_hashes"],
                num_blocks_cap=num_blocks, max_iters=max_iters,
                num_tokens=int(out.sum()) if record_token_times else 0, num_requests=n, max_pp=hw.pp)
    return Plan(workload, arrays, tables, sp, calib, num_blocks, bs, dims, bound,
                model.kv_bytes_per_token_per_rank(kv_bytes), pp=hw.pp, tp=hw.tp, num_layers=model.num_layers)


def needs_dp_sync(plans: "list[Plan]") -> bool:
    return any(p.dp_group >= 0 for p in plans)


def needs_releases(plans: "list[Plan]") -> bool:
    """Whether requests enter queues during the run: P/D hand-offs or agentic sessions."""
    return any(p.role != "colocated" or p.workload.has_sessions for p in plans)


def place_instances(plans: "list[Plan]", instances: "list[InstanceSpec]", links: LinkConfig, model: ModelConfig,
                    dp_sync: str = "moe", key: str = "cluster.instances") -> "list[Plan]":
    """The plans with their instances' roles, nodes, DP groups and the cluster's links.

    Checks that a disaggregated cluster has both prefill and decode instances of one model (the
    KV they hand over), and that the members of a DP group share a role, a model and tp/ep
    degrees (``model``: the cluster's model, for instances that do not name one). ``dp_sync``
    says which DP groups run
    wave-synchronised rounds: ``moe`` (MoE models only: vLLM lock-steps DP ranks for the expert
    collectives, while dense DP members are independent engines behind the load balancer),
    ``always`` or ``never``."""
    if dp_sync not in ("moe", "always", "never"):
        raise JaxsimInputError("cluster.dp_sync", f"unknown value {dp_sync!r}", "one of moe, always, never")
    roles = [spec.role for spec in instances]
    if ("prefill" in roles) != ("decode" in roles):
        have = "prefill" if "prefill" in roles else "decode"
        raise JaxsimInputError(f"{key}[*].role", f"a disaggregated cluster needs prefill and decode instances; "
                               f"it has {have} instances only", "add the other role, or make them colocated")
    models = [spec.model or model for spec in instances]
    pd_models = {m.name for m, r in zip(models, roles) if r != "colocated"}
    if len(pd_models) > 1:
        raise JaxsimInputError(f"{key}[*].model", f"prefill and decode instances serve different models "
                               f"{sorted(pd_models)}", "the KV handed over must be the same model's")
    first = {}
    groups = []
    for i, spec in enumerate(instances):
        if spec.dp_group is None or dp_sync == "never":
            groups.append(-1)
            continue
        if not (dp_sync == "always" or models[i].is_moe):
            groups.append(-1)
            continue
        lead = first.setdefault(spec.dp_group, i)
        a = instances[lead]
        if (a.role, a.hw.tp, a.hw.ep, models[lead].name) != (spec.role, spec.hw.tp, spec.hw.ep, models[i].name):
            raise JaxsimInputError(f"{key}[{i}].dp_group", f"DP group {spec.dp_group!r} mixes roles, models or tp/ep "
                                   "degrees", "members of a DP group have equal role, model, tp and ep")
        if spec.hw.pp != 1:
            raise JaxsimInputError(f"{key}[{i}].dp_group", "wave-synchronised DP groups with pipeline parallelism "
                                   f"(pp = {spec.hw.pp}) are not modelled", "use pp 1, or dp_sync never")
        groups.append(lead)
    return [dataclasses.replace(pl, role=spec.role, node=spec.node, links=links, dp_group=g)
            for pl, spec, g in zip(plans, instances, groups)]


def check_block_sizes(plans: "list[Plan]", key: str) -> None:
    """The instances of one cluster share a block size (a compiled shape)."""
    sizes = {pl.block_size for pl in plans}
    if len(sizes) > 1:
        raise JaxsimInputError(key, f"instances of one cluster share a block size, got {sorted(sizes)}")


def _pad_workload(arrays: dict, dims: Dims) -> dict:
    a = {k: v for k, v in arrays.items() if k != "num_hashes"}
    h = a["hashes"]
    if h.shape[1] < dims.max_blocks:
        a["hashes"] = np.pad(h, ((0, 0), (0, dims.max_blocks - h.shape[1])), constant_values=-1)
    return a


def build(plans: "list[Plan]", dims: Dims, *, batched: bool, workload_batched: bool | None = None):
    """Device arrays for ``plans`` at the shared ``dims``: (state, params, workload, workload_batched).

    With ``batched``, every leaf gets a leading configuration axis (the workload only when the
    plans' traces differ, e.g. scaled arrivals or other seeds, or when ``workload_batched``);
    otherwise ``plans`` has one entry.
    """
    state, params, wl, wl_batched = build_clusters([[p] for p in plans], dims,  # one instance each
                                                   workload_batched=workload_batched if batched else False)
    if not batched:
        state, params = jax.tree.map(lambda x: x[0], (state, params))
    return state, params, wl, wl_batched


def build_clusters(clusters: "list[list[Plan]]", dims: Dims, *, workload_batched: bool | None = None):
    """:func:`build` for a batch of cluster designs (``clusters[c][i]``: the plan of instance i of
    configuration c; the instances of a configuration share its trace). Designs with fewer
    instances than the largest are padded with copies of their last instance that are never
    routed to (``EngineParams.routable``), which leaves their results unchanged."""
    n = max(len(c) for c in clusters)
    routable = np.array([[i < len(c) for i in range(n)] for c in clusters])
    clusters = [list(c) + [c[-1]] * (n - len(c)) for c in clusters]
    flat = [pl for c in clusters for pl in c]
    params = jax.tree.map(lambda x: x.reshape((len(clusters), n) + x.shape[1:]), _stacked_params(flat))
    params = eqx.tree_at(lambda p: p.routable, params, jnp.asarray(routable))
    num_blocks = jnp.asarray([[pl.num_blocks for pl in c] for c in clusters], jnp.int32)
    state = jax.vmap(functools.partial(_init_cluster, dims=dims, releases=needs_releases(flat)))(num_blocks)
    wl, wl_batched = _workload_for([c[0] for c in clusters], dims, True, workload_batched)
    return state, params, wl, wl_batched


def _stacked_params(plans: "list[Plan]") -> cluster.EngineParams:
    """The plans' engine parameters stacked along a leading axis."""
    sched = {k: jnp.asarray(np.stack([p.sched[k] for p in plans])) for k in plans[0].sched}
    calib = {k: jnp.asarray(np.array([getattr(p.calibration, k) for p in plans], np.int64))
             for k in ("iteration_overhead_ns", "first_token_delay_ns", "token_output_delay_ns")}
    links = [p.links for p in plans]
    return cluster.EngineParams(
        sched=inst_lib.SchedulerParams(**sched), latency=latency.stack_tables([p.tables for p in plans]),
        pp=jnp.asarray([p.pp for p in plans], jnp.int64), tp=jnp.asarray([p.tp for p in plans], jnp.int64),
        num_layers=jnp.asarray([p.num_layers for p in plans], jnp.int64),
        routable=jnp.ones(len(plans), bool), role=jnp.asarray([ROLES.index(p.role) for p in plans], jnp.int32),
        node=jnp.asarray([p.node for p in plans], jnp.int32),
        kv_token_bytes=jnp.asarray([p.kv_token_bytes for p in plans], jnp.int64),
        kv_link_bw=jnp.asarray([[k.intra_node_bw_gbps, k.inter_node_bw_gbps] for k in links], jnp.float64),
        kv_link_latency=jnp.asarray([[k.intra_node_latency_ns, k.inter_node_latency_ns] for k in links], jnp.float64),
        kv_layerwise=jnp.asarray([k.kv_transfer == "layerwise" for k in links]),
        dp_group=jnp.asarray([p.dp_group for p in plans], jnp.int32), **calib)


def _workload_for(plans: "list[Plan]", dims: Dims, batched: bool, workload_batched: bool | None):
    distinct = {id(p.workload_arrays): p.workload_arrays for p in plans}
    wl_batched = batched and (len(distinct) > 1 if workload_batched is None else workload_batched)
    if wl_batched:
        padded = [_pad_workload(p.workload_arrays, dims) for p in plans]
        wl = cluster.WorkloadArrays(**{k: jnp.asarray(np.stack([a[k] for a in padded])) for k in padded[0]})
    else:
        wl = cluster.WorkloadArrays(**{k: jnp.asarray(v) for k, v in _pad_workload(plans[0].workload_arrays, dims).items()})
    return wl, wl_batched


def prepare(workload: Workload, model: ModelConfig, hw: HardwareConfig, sched: SchedulerConfig,
            rt: ModelRuntimeConfig = ModelRuntimeConfig(), calib: Calibration = Calibration(), **kwargs) -> Prepared:
    """Everything :func:`cluster.run` needs for one configuration (``plan`` + ``build``)."""
    pl = plan(workload, model, hw, sched, rt, calib, **kwargs)
    state, params, wl, _ = build([pl], pl.dims, batched=False)
    static = pl.dims.static(pl.block_size, releases=needs_releases([pl]))
    return Prepared(state, params, wl, static, pl.num_blocks, pl.block_size, workload, pl.max_iters_bound)


def prepare_cluster(workload: Workload, model: ModelConfig, instances: "list[InstanceSpec]",
                    router: routing.Router = routing.Router(), rt: ModelRuntimeConfig = ModelRuntimeConfig(),
                    links: LinkConfig = LinkConfig(), dp_sync: str = "moe", **kwargs) -> Prepared:
    """A cluster of instances of one model (hardware, scheduler knobs, engine costs and roles may
    differ per instance) serving ``workload``, with arrivals routed by ``router`` and KV handed
    from prefill to decode instances over ``links``."""
    if not instances:
        raise JaxsimInputError("cluster.instances", "a cluster needs at least one instance")
    plans = [plan(workload, spec.model or model, spec.hw, spec.sched, rt, spec.calib, **kwargs) for spec in instances]
    plans = place_instances(plans, instances, links, model, dp_sync)
    check_block_sizes(plans, "cluster.instances[*].scheduler.block_size")
    dims = Dims.merge([pl.dims for pl in plans])
    if not kwargs.get("max_iterations") and len(plans) > 1:
        # Each instance records only its own iterations, so an automatic buffer starts from twice
        # an even share of the trace's guess (a buffer of the whole guess per instance grows with
        # instances x trace: 64 instances of a 19,200-request trace did not fit in 24 GiB). A run
        # that fills it is rerun with twice the rows (simulate_cluster), never silently cut.
        dims = dataclasses.replace(dims, max_iters=min(dims.max_iters, -(-2 * dims.max_iters // len(plans)) + 1024))
    params = _stacked_params(plans)  # the plans' axis is the instance axis
    wl, _ = _workload_for(plans, dims, False, False)
    releases = needs_releases(plans)
    state = _init_cluster(jnp.asarray([pl.num_blocks for pl in plans], jnp.int32), dims=dims, releases=releases)
    static = dims.static(plans[0].block_size, num_instances=len(plans), releases=releases, router=router,
                         dp_sync=needs_dp_sync(plans))
    return Prepared(state, params, wl, static, sum(pl.num_blocks for pl in plans), plans[0].block_size, workload,
                    max(pl.max_iters_bound for pl in plans))


@functools.partial(jax.jit, static_argnames=("dims", "releases"))
def _init_cluster(num_blocks, *, dims: Dims, releases: bool = False):
    """A fresh state with one instance per entry of ``num_blocks`` (its KV capacity)."""
    inst = jax.vmap(lambda nb: inst_lib.init_instance(dims.num_slots, dims.max_blocks, dims.num_blocks_cap,
                                                      dims.ring_cap, dims.num_hashes, POP_WINDOW, nb,
                                                      max_pp=dims.max_pp))(num_blocks)
    return cluster.init_state(inst, dims.num_requests, dims.num_tokens, dims.max_iters, releases)


def simulate_cluster(workload: Workload, model: ModelConfig, instances: "list[InstanceSpec]",
                     router: routing.Router = routing.Router(), rt: ModelRuntimeConfig = ModelRuntimeConfig(),
                     links: LinkConfig = LinkConfig(), dp_sync: str = "moe", **kwargs) -> SimResult:
    """Simulate a cluster (see :func:`prepare_cluster`); per-request results carry the instance
    that finished each request, and the iteration rows of every instance (``iter_instance``);
    P/D runs add the prefill instance, KV transfer times and bytes of every request."""
    return _run_growing_buffer(
        lambda **kw: prepare_cluster(workload, model, instances, router, rt, links, dp_sync, **kw), kwargs)


def run_prepared(p: Prepared) -> cluster.ClusterState:
    return cluster.run(p.state, p.params, p.workload, p.static)


def to_result(p: Prepared, final: cluster.ClusterState, wall_s: float | None = None) -> SimResult:
    """Check the run's flags and convert its state to numpy."""
    f = jax.device_get(final)
    w = p.workload_host
    n = w.num_requests
    n_inst = f.inst.busy.shape[0]
    counts = [int(x) for x in f.inst.n_iters]
    status = Status(int(f.status))
    if status == Status.ITERATION_BUFFER_FULL:
        raise IterationBufferFull(f"the iteration buffer ({f.records.start.shape[-1]} rows) filled up before the run "
                                  "ended: raise sim.max_iterations (0 = automatic)")
    if status == Status.STALLED:
        left = np.nonzero(f.finish < 0)[0]
        raise JaxsimInputError(
            f"{w.source}: request {int(left[0])}", "can never be scheduled: its KV blocks exceed the cache "
            f"({p.num_blocks} blocks of {p.block_size} tokens)", "raise KV capacity or shorten the request")
    if status != Status.OK:
        raise CapacityOverflowError(status.message + (f" ({n - int(f.finished)} requests unfinished)"
                                                      if status == Status.STEP_LIMIT else ""))
    if int(np.sum(f.finish >= 0)) != int(f.finished):
        raise AssertionError(f"internal: {int(f.finished)} finishes counted, {int(np.sum(f.finish >= 0))} recorded")
    out = w.output_toks.astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(out)])
    ctr = jax.tree.map(lambda x: np.asarray(x).sum(axis=0), f.inst.counters)  # summed over instances
    # Iteration rows of every instance, in order of end time (then instance).
    rows = {name: np.concatenate([getattr(f.records, name)[i, :counts[i]] for i in range(n_inst)])
            for name in ("start", "end", "prompt_tokens", "gen_tokens", "num_tokens", "num_seqs", "running",
                         "waiting", "kv_used")}
    row_inst = np.concatenate([np.full(c, i, np.int32) for i, c in enumerate(counts)])
    by_end = np.lexsort((row_inst, rows["end"]))
    rows = {k: v[by_end] for k, v in rows.items()}
    stats = dict(
        iterations=sum(counts), steps=int(f.steps), preemptions=int(ctr.preemptions),
        prefix_requested_tokens=int(ctr.prefix_requested), prefix_hit_tokens=int(ctr.prefix_hits),
        recomputed_tokens=int(ctr.recomputed),
        extrapolated_iterations=dict(zip(("dense", "per_sequence", "attention", "moe"),
                                         (int(x) for x in ctr.extrapolated))))
    if n_inst > 1:
        stats["iterations_per_instance"] = counts
        stats["requests_per_instance"] = np.bincount(np.asarray(f.instance), minlength=n_inst).tolist()
    handed = np.asarray(f.prefill_instance) >= 0
    pd = bool(np.any(np.asarray(p.params.role) != 0))
    if pd:
        stats["prefills_per_instance"] = np.bincount(np.asarray(f.prefill_instance)[handed], minlength=n_inst).tolist()
        stats["kv_transfer_bytes"] = int(np.sum(f.kv_bytes))
        wait = (np.asarray(f.kv_ready) - np.asarray(f.prefill_end))[handed]
        stats["kv_transfer_wait_ms"] = ({"mean": float(wait.mean()) / 1e6, "p50": float(np.percentile(wait, 50)) / 1e6,
                                         "p99": float(np.percentile(wait, 99)) / 1e6, "max": float(wait.max()) / 1e6}
                                        if wait.size else {})
    released = w.released
    arrival = np.where(released, np.asarray(f.arrival), np.asarray(w.arrival_ns, np.int64))
    if wall_s is not None:
        stats["wall_s_with_compile"] = wall_s
    return SimResult(
        arrival_ns=arrival, first_scheduled_ns=np.asarray(f.first_scheduled),
        first_token_ns=np.asarray(f.first_token), finish_ns=np.asarray(f.finish),
        input_toks=np.asarray(w.input_toks), output_toks=np.asarray(w.output_toks),
        prefix_hit_tokens=np.asarray(f.prefix_hit), num_preemptions=np.asarray(f.num_preemptions),
        recomputed_tokens=np.asarray(f.recomputed), instance=np.asarray(f.instance),
        token_times_ns=np.asarray(f.token_times) if f.token_times.shape[0] == offsets[-1] else np.zeros(0, np.int64),
        token_offsets=offsets,
        iter_start_ns=rows["start"], iter_end_ns=rows["end"], iter_prompt_tokens=rows["prompt_tokens"],
        iter_gen_tokens=rows["gen_tokens"], iter_num_tokens=rows["num_tokens"], iter_num_seqs=rows["num_seqs"],
        iter_running=rows["running"], iter_waiting=rows["waiting"], iter_kv_blocks_used=rows["kv_used"],
        num_blocks=p.num_blocks, block_size=p.block_size, stats=stats,
        iter_instance=row_inst[by_end] if n_inst > 1 else None,
        prefill_instance=np.asarray(f.prefill_instance) if pd else None,
        prefill_end_ns=np.asarray(f.prefill_end) if pd else None,
        kv_ready_ns=np.asarray(f.kv_ready) if pd else None,
        kv_transfer_bytes=np.asarray(f.kv_bytes) if pd else None)


def simulate(workload: Workload, model: ModelConfig, hw: HardwareConfig, sched: SchedulerConfig,
             rt: ModelRuntimeConfig = ModelRuntimeConfig(), calib: Calibration = Calibration(),
             **kwargs) -> SimResult:
    """Simulate one instance serving ``workload``; returns per-request and per-iteration results.

    With an automatic iteration buffer (``max_iterations=0``), a run that fills it is rerun with
    twice the rows (a recompile), up to the proven bound.
    """
    return _run_growing_buffer(lambda **kw: prepare(workload, model, hw, sched, rt, calib, **kw), kwargs)


def _run_growing_buffer(prepare_fn, kwargs: dict) -> SimResult:
    """Run ``prepare_fn(**kwargs)``; with an automatic iteration buffer (``max_iterations=0``),
    a run that fills it is rerun with twice the rows (a recompile), up to the proven bound."""
    t0 = time.perf_counter()
    p = prepare_fn(**kwargs)
    while True:
        final = jax.block_until_ready(run_prepared(p))
        try:
            return to_result(p, final, wall_s=time.perf_counter() - t0)
        except IterationBufferFull:
            rows = p.state.records.start.shape[-1]
            if kwargs.get("max_iterations") or rows >= p.max_iters_bound:
                raise
            p = prepare_fn(**{**kwargs, "max_iterations": min(2 * rows, p.max_iters_bound)})
