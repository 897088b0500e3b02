"""Building: the device arrays of a compiled run from host-side plans (:mod:`jaxsim.planning`).

:func:`build` stacks one or more single-instance plans (a sweep's configurations) into the
engine's state, parameters and workload arrays; :func:`build_clusters` does the same for cluster
designs (instance axis inside the configuration axis); :func:`init_cluster` is a fresh state.
"""

import dataclasses
import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from jaxsim import latency
from jaxsim import power as power_lib
from jaxsim.engine import cluster
from jaxsim.engine import instance as inst_lib
from jaxsim.engine.chunk_tier import init_pools
from jaxsim.planning import POP_WINDOW, Dims, Plan, needs_releases, tier_layout
from jaxsim.spec import ROLES, Calibration


def _pad_workload(arrays: dict, dims: Dims) -> dict:
    a = {k: v for k, v in arrays.items() if k not in ("num_hashes", "num_chunks")}
    for key, width in (("hashes", dims.max_blocks), ("chunks", dims.max_chunks)):
        if a[key].shape[1] < width:
            a[key] = np.pad(a[key], ((0, 0), (0, width - a[key].shape[1])), constant_values=-1)
    return a


def build(plans: "list[Plan]", dims: Dims, *, batched: bool, workload_batched: bool | None = None,
          max_steps: int | None = None, pad_like: "dict | None" = None):
    """Device arrays for ``plans`` at the shared ``dims``: (state, params, workload, workload_batched).

    With ``batched``, every leaf gets a leading configuration axis (the workload only when the
    plans' traces differ, e.g. scaled arrivals or other seeds, or when ``workload_batched``);
    otherwise ``plans`` has one entry. ``max_steps``: the step limit (default
    :meth:`Dims.max_steps`). ``pad_like``: the :func:`jaxsim.latency.table_extents` the latency
    tables must cover (a sweep's whole group: every chunk then has one shape, hence one compile).
    """
    state, params, wl, wl_batched = build_clusters([[p] for p in plans], dims,  # one instance each
                                                   workload_batched=workload_batched if batched else False,
                                                   max_steps=max_steps, pad_like=pad_like)
    if not batched:
        state, params = jax.tree.map(lambda x: x[0], (state, params))
    return state, params, wl, wl_batched


def build_clusters(clusters: "list[list[Plan]]", dims: Dims, *, workload_batched: bool | None = None,
                   max_steps: int | None = None, pad_like: "dict | None" = None):
    """:func:`build` for a batch of cluster designs (``clusters[c][i]``: the plan of instance i of
    configuration c; the instances of a configuration share its trace). Designs with fewer
    instances than the largest are padded with copies of their last instance that are never
    routed to (``EngineParams.routable``), which leaves their results unchanged."""
    n = max(len(c) for c in clusters)
    routable = np.array([[i < len(c) for i in range(n)] for c in clusters])
    clusters = [list(c) + [c[-1]] * (n - len(c)) for c in clusters]
    flat = [pl for c in clusters for pl in c]
    params = jax.tree.map(lambda x: x.reshape((len(clusters), n) + x.shape[1:]), stacked_params(flat, pad_like))
    layouts = [tier_layout(c, c[0].kv_tier) for c in clusters]
    params = eqx.tree_at(lambda p: (p.routable, p.sched.tier_pool), params,
                         (jnp.asarray(routable), jnp.asarray(np.stack([t.pool_of for t in layouts]))))
    num_blocks = jnp.asarray([[pl.num_blocks for pl in c] for c in clusters], jnp.int32)
    steps = jnp.full(len(clusters), dims.max_steps(n) if max_steps is None else max_steps, jnp.int32)
    tier = None
    if flat[0].kv_tier.enabled:
        tier = tuple(jnp.asarray(np.stack([getattr(t, f) for t in layouts])) for f in ("capacity", "bw", "latency"))
    state = jax.vmap(functools.partial(init_cluster, dims=dims, releases=needs_releases(flat)))(num_blocks, steps, tier)
    wl, wl_batched = workload_for([c[0] for c in clusters], dims, True, workload_batched)
    return state, params, wl, wl_batched


def weight_load_devices(plans: "list[Plan]") -> np.ndarray:
    """``[plan, device]`` ns each shared memory device is busy with one iteration's weight loads of
    each plan (``Plan.wload_busy``): devices are a node's host memory (``cpu`` of the plan's node)
    and each CXL device, in order of first appearance; ``[plan, 0]`` when no weights sit off a GPU."""
    keys: dict = {}
    for pl in plans:
        for name in pl.wload_busy:
            keys.setdefault(("cpu", pl.node) if name == "cpu" else ("cxl", name), len(keys))
    out = np.zeros((len(plans), len(keys)), np.int64)
    for i, pl in enumerate(plans):
        for name, ns in pl.wload_busy.items():
            out[i, keys[("cpu", pl.node) if name == "cpu" else ("cxl", name)]] = ns
    return out


def stacked_params(plans: "list[Plan]", pad_like: "dict | None" = None) -> cluster.EngineParams:
    """The plans' engine parameters stacked along a leading axis (latency tables padded to cover
    the extents ``pad_like`` too, :func:`jaxsim.latency.stack_tables`)."""
    sched = {k: jnp.asarray(np.stack([p.sched[k] for p in plans])) for k in plans[0].sched}
    calib = {k: jnp.asarray(np.array([getattr(p.calibration, k) for p in plans], np.int64))
             for k in (f.name for f in dataclasses.fields(Calibration))}
    links = [p.links for p in plans]
    return cluster.EngineParams(
        sched=inst_lib.SchedulerParams(**sched), latency=latency.stack_tables([p.tables for p in plans], pad_like),
        pp=jnp.asarray([p.pp for p in plans], jnp.int64), tp=jnp.asarray([p.tp for p in plans], jnp.int64),
        num_layers=jnp.asarray([p.num_layers for p in plans], jnp.int64),
        routable=jnp.ones(len(plans), bool), role=jnp.asarray([ROLES.index(p.role) for p in plans], jnp.int32),
        node=jnp.asarray([p.node for p in plans], jnp.int32),
        kv_token_bytes=jnp.asarray([p.kv_token_bytes for p in plans], jnp.int64),
        kv_link_bw=jnp.asarray([[k.intra_node_bw_gbps, k.inter_node_bw_gbps] for k in links], jnp.float64),
        kv_link_latency=jnp.asarray([[k.intra_node_latency_ns, k.inter_node_latency_ns] for k in links], jnp.float64),
        kv_layerwise=jnp.asarray([k.kv_transfer == "layerwise" for k in links]),
        dp_group=jnp.asarray([p.dp_group for p in plans], jnp.int32), wload_busy=jnp.asarray(weight_load_devices(plans)),
        power=power_lib.engine_params([p.power for p in plans]) if plans[0].power is not None else None,
        **calib)


def workload_for(plans: "list[Plan]", dims: Dims, batched: bool, workload_batched: bool | None):
    distinct = {id(p.workload_arrays): p.workload_arrays for p in plans}
    wl_batched = batched and (len(distinct) > 1 if workload_batched is None else workload_batched)
    if wl_batched:
        padded = [_pad_workload(p.workload_arrays, dims) for p in plans]
        wl = cluster.WorkloadArrays(**{k: jnp.asarray(np.stack([a[k] for a in padded])) for k in padded[0]})
    else:
        wl = cluster.WorkloadArrays(**{k: jnp.asarray(v) for k, v in _pad_workload(plans[0].workload_arrays, dims).items()})
    return wl, wl_batched


@functools.partial(jax.jit, static_argnames=("dims", "releases"))
def init_cluster(num_blocks, max_steps, tier=None, *, dims: Dims, releases: bool = False):
    """A fresh state with one instance per entry of ``num_blocks`` (its KV capacity) and the step
    limit ``max_steps`` (a value: runs with different limits share a compile). ``tier``: the KV
    tier's pools ``(capacity, bw, latency)`` ([P] arrays, :class:`jaxsim.planning.TierLayout`),
    None for no tier."""
    inst = jax.vmap(lambda nb: inst_lib.init_instance(dims.num_slots, dims.max_blocks, dims.num_blocks_cap,
                                                      dims.ring_cap, dims.num_hashes, POP_WINDOW, nb,
                                                      max_pp=dims.max_pp))(num_blocks)
    tier_state = () if tier is None else init_pools(dims.num_chunks, *tier)
    return cluster.init_state(inst, dims.num_requests, dims.num_tokens, dims.max_iters, releases, max_steps,
                              tier=tier_state)
