"""The profile-table latency model: one engine iteration's latency in integer ns, traced.

:class:`LatencyTables` is the first implementation of :class:`jaxsim.latency.base.AbstractLatencyModel`:
an ``equinox.Module`` whose leaves are all JAX arrays (hardware knobs included), so that many
configurations can be stacked and ``vmap``-ed. :func:`iteration_time` and :func:`stage_times` are
pure, jittable, vmappable functions of the tables and one batch shape. The host-side builder that
turns CSV profile bundles into these tables is :mod:`jaxsim.latency.tables`; this module imports
no file readers, so the engine does not either. :func:`iteration_ns` is the same composition in
float64 ns with no time rounded, differentiable in the tables' continuous leaves (the table values,
the what-if scales, the link and host memory); :func:`total_ns_grad` is the gradient of a set of
batches' total time. The engine never calls it (a static flag of the private helpers: the integer
path compiles as before).
Composition (one NPU, pp = 1)::

    t = [in: cpu_lat + 2*fp*T/cpu_bw] + Σ_prologue + L*{pre_attn + attn + post_attn [+AR]}
        + L_dense*{dense MLP [+AR]} + L_moe*{AG + max_r moe(local_r, act_r) + RS} + head
        + [out: cpu_lat + 4*T/cpu_bw]

``L_moe`` / ``L_dense`` split the L blocks of a hybrid MoE model (``mlp_only_layers`` /
``decoder_sparse_step``, :attr:`jaxsim.model.ModelConfig.n_moe_layers`); a dense model has
``L_dense = L``, a plain MoE model ``L_moe = L``.

The ``[recall]`` term of §2.1 (lower-tier KV hits) is not part of this function; the caller adds it.
Off-NPU weights (§1.10) and an off-NPU KV cache (§1.16 ``kv_loc``) gate the blocks' start: the
iteration is then the critical path of :func:`_weight_loads` (``wload_*``, ``kvloc_*`` fields).

PIM attention offload (§1.11; ``LatencyTables.pim``, static): the decodes' attention runs on PIM
channels (:func:`jaxsim.latency.pim.pim_layer_ns`, from ``BatchShape.slots``), the NPU's attention
lookup keeps the prefills (nd = 0), and each attention layer takes ``max(NPU, PIM)`` (side by side)
or ``NPU + PIM`` (``pim_serial``: the reference's outputs). Sub-batch interleaving (§1.12;
``LatencyTables.interleave``, static) times the two halves' layers on one in-order NPU
(:func:`jaxsim.latency.pim.interleaved_ns`).

Choices where REFERENCE.md leaves room (the oracle ``tests/reference_latency.py`` makes the same):
  * 1-D lookups (§2.4) and every bracket of §2.5/§2.7: ``t = (q - x_lo)/(x_hi - x_lo)``, value
    ``v_lo + t*(v_hi - v_lo)``; a query on a key uses that key's value; a table with one key is
    constant (there are no two points to extrapolate from).
  * nd = 0: kvd = 0 (no division). No attention term when pc = nd = 0.
  * TP AllReduce (§1.8): a ring on one dimension, ``2(N-1)`` steps each costing
    ``link_latency + step_overhead + (T*H*fp/N)/link_bw`` (bytes as a real number, 1 GB/s = 1 B/ns),
    the total floored to whole ns, like the host memory operations. ``step_overhead`` defaults to 0;
    the reference back end's 10 ns endpoint delay can be put there. One AllReduce follows o_proj
    and one down_proj (dense MLP); MoE models have only the o_proj one.
  * MoE (§1.9 BALANCED, §2.7): ``activated = min(round(T*k/ep), E/ep)``,
    ``local = round(T*(1 - ((ep-1)/ep)**k))``; with ep > 1 the block adds a dispatch AllGather of
    ``max(1, T//ep)*(H+E)*fp`` bytes per rank ((ep-1) steps) and a combine ReduceScatter of
    ``T*H*fp`` bytes ((ep-1) steps of 1/ep of it), each floored, on the same link as TP. All ranks
    are identical under BALANCED, so ``max_r`` is one lookup.
  * MoE with an expert popularity ``p`` (length E, e.g. :func:`zipf_popularity`): expert e lives
    on rank ``floor(e*ep/E)``; rank r with experts R_r and ``P_r = Σ_{e∈R_r} p_e`` gets
    ``local_r = round(T*(1 - (1 - P_r)**k))`` tokens (at least 1) and
    ``act_r = clip(round(Σ_{e∈R_r} min(1, T*k*p_e)), 1, |R_r|)`` activated experts (an expert is
    active once its expected share of the T*k assignments reaches one token: BALANCED's "as many
    experts as there are assignments" rule, weighted by popularity); the block is
    ``max_r moe(local_r, act_r)`` (the slowest rank gates the combine, §1.8). The collectives are
    those of BALANCED. A uniform ``p`` reduces to BALANCED exactly (``local_r`` and ``act_r``
    both give the closed form), and the cost changes smoothly with the skew.
  * Skew labels: a value above the last bin edge gets the last label (§2.6), implemented by
    treating the last upper edge as +inf.
  * ``extrapolated[c]`` (c = dense, per_sequence, attention, moe) is 1 when any lookup of that
    category in this iteration queried above its last key (the skew ``t_max`` lookup counts only
    when the skew correction applies).
"""

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

from jaxsim.errors import JaxsimInputError
from jaxsim.latency import pim as pim_lib
from jaxsim.latency.base import AbstractLatencyModel, BatchShape

_F = jnp.float64
_I = jnp.int64


class LatencyTables(AbstractLatencyModel):
    """Profile tables and hardware knobs of one configuration; every leaf is a JAX array.

    Lookups are organised in three dependent levels so that each level is one vectorized
    bracket over a padded key matrix (keys padded with +inf; ``*_last`` = index of the last key):

    1. ``l1``: rows 0, 1 are the attention ``pc`` and ``nd`` axes; rows 2... are the dense (by T)
       and per-sequence (by S) layers. The MoE activated-experts axis (``moe_ae``) is bracketed
       once per EP rank.
    2. the ``kp`` keys of the four attention corner slices; the token keys of the two MoE rows of
       each rank.
    3. the ``kvd`` keys of the eight attention ``kp`` rows (for ``kvd_mean`` and ``kvd_max``).

    Missing ``(pc, nd)`` slices hold a copy of their nearest-slice fallback (§2.5). Use
    :func:`stack_tables` to stack several configurations (it pads every axis) for ``vmap``.
    """

    # level 1: 2 axis rows + R layer rows
    l1_keys: jax.Array  # f64 [2 + R, W1]
    l1_last: jax.Array  # i32 [2 + R]
    lin_vals: jax.Array  # f64 [R, W1] ns
    lin_by_seq: jax.Array  # bool [R] keyed by S (per_sequence) instead of T (dense)
    lin_mult: jax.Array  # i64 [R] occurrences per iteration (L per block use, layernorm 2L; dense MLP
    #                      layers L_dense; prologue and head once)
    lin_prologue: jax.Array  # i64 [R] occurrences in the prologue (pipeline stage 0)
    lin_head: jax.Array  # i64 [R] occurrences in the head (the last pipeline stage)
    lin_pre: jax.Array  # i64 [R] occurrences in one block's pre-attention group (sub-batch interleaving)
    # attention, P pc values x D nd values
    att_kp: jax.Array  # f64 [P, D, W2] kp keys of each slice
    att_kp_last: jax.Array  # i32 [P, D]
    att_kvd: jax.Array  # f64 [P, D, KP, KV] kvd keys of each kp row
    att_kvd_last: jax.Array  # i32 [P, D, KP]
    att_vals: jax.Array  # f64 [P, D, KP, KV] ns
    att_per_block: jax.Array  # i64 [] attention layers per block (times L)
    # skew fit: alpha per (pc slot, n, sr, kv_big, kp); slot 0 holds alpha_default
    skew_slot: jax.Array  # i32 [129] slot of pc = 16*i (0 where that pc has no bucket)
    skew_alpha: jax.Array  # f64 [1 + G, nN, nSR, nKVB, nKP] (missing buckets = alpha_default; disabled = 0)
    skew_n_hi: jax.Array  # f64 [nN] upper bin edges bins[1:], the last one +inf
    skew_sr_hi: jax.Array  # f64 [nSR]
    skew_kvb_hi: jax.Array  # f64 [nKVB]
    skew_kp_hi: jax.Array  # f64 [nKP]
    # MoE rows (a dummy 1x1 table with moe_blocks = 0 for dense models)
    moe_ae: jax.Array  # f64 [A] activated-experts axis
    moe_ae_last: jax.Array  # i32 []
    moe_tok: jax.Array  # f64 [A, WM] token keys per activated-experts row
    moe_tok_last: jax.Array  # i32 [A]
    moe_vals: jax.Array  # f64 [A, WM] ns
    moe_blocks: jax.Array  # i64 [] sparse MoE blocks per iteration (L_moe)
    moe_k: jax.Array  # i64 [] experts per token
    moe_experts: jax.Array  # i64 [] E
    ep: jax.Array  # i64 []
    # expert popularity per EP rank (REFERENCE.md §1.9 extension). BALANCED: one row, unused.
    moe_skewed: jax.Array  # bool [] False = BALANCED closed form
    moe_pop: jax.Array  # f64 [ranks, experts per rank] p_e of each rank's experts, 0-padded
    moe_rank_experts: jax.Array  # i64 [ranks] |R_r|; 0 marks a padded rank (never used)
    # model and hardware knobs
    num_layers: jax.Array  # i64 [] L
    hidden: jax.Array  # i64 [] H
    weight_bytes: jax.Array  # i64 [] fp
    tp: jax.Array  # i64 []
    pp: jax.Array  # i64 [] pipeline stages (REFERENCE.md §1.8; :func:`stage_times`)
    ar_count: jax.Array  # i64 [] TP AllReduces per iteration (L after o_proj, L_dense after down_proj)
    link_bw: jax.Array  # f64 [] bytes/ns
    link_lat: jax.Array  # f64 [] ns per ring step
    link_step_overhead: jax.Array  # f64 [] extra ns per ring step
    cpu_bw: jax.Array  # f64 [] bytes/ns
    cpu_lat: jax.Array  # f64 [] ns
    # What-if time multipliers (1.0 = as profiled; 0.8 = 20% faster). The profiles measure whole
    # operators, not a compute/memory split, so the split is by operator kind: ``compute_scale``
    # multiplies the linear layers (GEMMs, norms, activations, MoE experts), ``memory_scale`` the
    # attention (dominated by KV reads), ``link_scale`` the collectives (TP AllReduce, EP).
    compute_scale: jax.Array  # f64 []
    memory_scale: jax.Array  # f64 []
    link_scale: jax.Array  # f64 []
    # FP8 KV without a ``-kvfp8`` profile variant (REFERENCE.md §1.14): decode attention is close to
    # ``a + b*nd*kvd`` (KV-read bound); the tables are bf16, so the KV-read term ``b*kvd_sum`` is
    # scaled by ``kv_read_scale`` = KV bytes / activation bytes (1.0 = as profiled: the profile's
    # own KV dtype). ``kv_read_b``: the fitted b, ns per decode KV token (tables.decode_kv_fit).
    kv_read_scale: jax.Array  # f64 []
    kv_read_b: jax.Array  # f64 []
    # Off-NPU weights (REFERENCE.md §1.10, jaxsim/placement.py): when each part's weights are in
    # place, ns after the iteration's start (load_gates; 0 = on the NPU): the prologue, each block
    # (0-padded past L), the head.
    wload_pro: jax.Array  # i64 []
    wload_blocks: jax.Array  # i64 [L]
    wload_head: jax.Array  # i64 []
    # KV cache off the NPU (REFERENCE.md §1.16 kv_loc, jaxsim/placement.py): each block's attention
    # reads the KV of the tokens the batch attends over (kvd_sum + kp) from the device, one read per
    # block of ``floor(kvloc_lat + tokens * kvloc_bytes / kvloc_bw)`` ns; ``kvloc_bytes`` = K+V
    # bytes of one token of one layer on one rank (0 = KV on the NPU: no reads).
    kvloc_lat: jax.Array  # f64 [] ns per read
    kvloc_bw: jax.Array  # f64 [] bytes/ns
    kvloc_bytes: jax.Array  # f64 [] bytes per token, layer and rank
    # PIM attention offload (REFERENCE.md §1.11; jaxsim/pim.py, jaxsim/latency/pim.py): decode
    # attention on the host memory's PIM channels, the NPU's attention lookup then at nd = 0. One
    # placement (a request's attention on one channel) takes pim_a * context + pim_b ns; a layer's
    # PIM work the largest channel load + pim_lat, floored.
    pim_on: jax.Array  # bool [] this configuration offloads (False: every pim_* field unused)
    pim_a: jax.Array  # f64 [] ns per context token and placement (slope * g / split)
    pim_b: jax.Array  # f64 [] ns per placement (intercept * q / split)
    pim_lat: jax.Array  # f64 [] the device's read latency CL * tCK, ns, once per layer
    pim_load0: jax.Array  # f64 [C] channel loads at a layer's start: 0, +inf past the instance's channels
    pim_j: jax.Array  # f64 [K] 0..K-1, K >= pim_split (one request's placements on one channel)
    pim_split: jax.Array  # i64 [] channels per request: min(channels, KV heads)
    pim_prompt_ctx: jax.Array  # bool [] context = the prompt's length (the reference) instead of the
    #                            request's computed tokens (hardware.pim_context)
    pim_serial: jax.Array  # bool [] PIM after the NPU's prefill attention (the reference's outputs)
    #                        instead of side by side, the layer taking the longer (hardware.pim_overlap)
    pim_io: jax.Array  # i64 [] bytes one decode's PIM operation moves in one layer (q, k, v in; output out)
    sub_batch_on: jax.Array  # bool [] sub-batch interleaving (REFERENCE.md §1.12; needs pim_on, pp = 1)
    # Static: which of the optional paths above compile (each costs ~20-45 us per iteration on
    # XLA:CPU; off, they leave the time unchanged): the FP8 KV-read scaling (kv_read_scale != 1),
    # the weight-load / KV-read critical path (weights or KV off the NPU), PIM attention and
    # sub-batch interleaving. stack_tables ORs them.
    kv_scaled: bool = eqx.field(static=True, default=False)
    offload: bool = eqx.field(static=True, default=False)
    pim: bool = eqx.field(static=True, default=False)
    interleave: bool = eqx.field(static=True, default=False)

    # The AbstractLatencyModel interface (the engine calls only these).
    def iteration_time(self, shape: BatchShape):
        return iteration_time(self, *shape.args(), slots=shape.slots if self.pim else None)

    def stage_times(self, shape: BatchShape, max_pp: int):
        return stage_times(self, max_pp, *shape.args(), slots=shape.slots if self.pim else None)

    def iteration_ns(self, shape: BatchShape):
        return iteration_ns(self, shape)

    @property
    def needs_slots(self) -> bool:
        return self.pim

    def pim_work(self, shape: BatchShape):
        return pim_work(self, shape.slots)

    def npu_time(self, shape: BatchShape):
        if not self.pim:
            return self.iteration_time(shape)[0]
        return _iteration(self, *shape.args(), parts=False, slots=shape.slots, npu_only=True)[0]


def _ns(t, float_time: bool):
    """A time in ns: floored to int64 (the engine's clock), or, with ``float_time``, kept as the
    float64 it is (:func:`iteration_ns`: the same composition, differentiable)."""
    return t if float_time else jnp.floor(t).astype(_I)


def _scaled(t, scale, float_time: bool = False):
    """``floor(t * scale)`` for int64 ns (exact when scale == 1); ``t * scale`` with ``float_time``."""
    return _ns(t.astype(_F) * scale, float_time)


# ----------------------------------------------------------------------------------- lookups
def _take2(a, lo, hi):
    """``a[..., lo]`` and ``a[..., hi]`` with one gather."""
    both = jnp.take_along_axis(a, jnp.stack([lo, hi], axis=-1), axis=-1, mode="promise_in_bounds")
    return both[..., 0], both[..., 1]


def _bracket(keys, last, q):
    """Bracket ``q`` on sorted, +inf-padded ``keys [..., K]`` (``last`` = index of the last key).

    Returns ``(lo, hi, t, above)``: at or below the first key ``(0, 0, 0)`` (clamp); on key i
    ``(i, i, 0)``; between keys the bracketing pair with ``0 < t < 1``; above the last key the top
    two keys with ``t > 1`` (extrapolate); a single-key table is constant.
    """
    # one reduction counts both keys <= q (low 16 bits) and keys < q (high bits); K < 65536
    qq = q[..., None]
    c = jnp.sum(jnp.where(keys < qq, 65537, jnp.where(keys == qq, 1, 0)), axis=-1, dtype=jnp.int32)
    c_le, c_lt = c & 0xFFFF, c >> 16
    above = c_lt > last
    on_key = c_le > c_lt
    lo = jnp.where(above, jnp.maximum(last - 1, 0), jnp.maximum(c_le - 1, 0))
    # on a key the pair collapses to that key, so that a neighbour that gets zero weight is never
    # looked at (its extrapolation flag must not count)
    hi = jnp.where(above, last, jnp.where(on_key, lo, jnp.minimum(c_le, last)))
    klo, khi = _take2(keys, lo, hi)
    span = hi > lo
    t = jnp.where(span, (q - klo) / jnp.where(span, khi - klo, 1.0), 0.0)
    return lo, hi, t, above


def _lerp(a, b, t):
    return a + t * (b - a)


def _trunc(v, float_time: bool = False):
    """``max(1, int(v))``: truncation toward zero, then at least 1 ns; ``max(1, v)`` with
    ``float_time`` (the 1 ns floor is a clamp of the value, not a rounding: kept)."""
    if float_time:
        return jnp.maximum(v, 1.0)
    return jnp.maximum(jnp.trunc(v).astype(_I), 1)


def _label(hi_edges, v):
    """First label i with ``v <= bins[i+1]`` (the last edge is +inf), §2.6 step 2."""
    return jnp.sum(hi_edges < v, dtype=jnp.int32)


def _ring(steps, tb: LatencyTables, msg_bytes, float_time: bool = False):
    """``floor(steps * (latency + overhead + msg/bw))`` ns: a ring collective on one dimension
    (not floored with ``float_time``)."""
    cost = steps.astype(_F) * ((tb.link_lat + tb.link_step_overhead) + msg_bytes / tb.link_bw)
    return _ns(cost * tb.link_scale, float_time)


def iteration_time(tb: LatencyTables, T, S, pc, kp, nd, kvd_sum, kvd_min, kvd_max, *, slots=None):
    """Latency of one engine iteration (REFERENCE.md §2.1), one NPU, pp = 1.

    Args:
      tb: the configuration's tables.
      T, S: tokens and sequences scheduled (DP padding included).
      pc, kp: merged prefill chunk tokens and their summed histories.
      nd: decodes; kvd_sum, kvd_min, kvd_max: sum, min and max of their KV lengths.
      slots: the batch's requests (:class:`jaxsim.latency.base.BatchSlots`), needed by tables
        with PIM attention (``tb.pim``): their decodes are placed on PIM channels.

    Returns:
      ``(time_ns, extrapolated)``: an int64 scalar, and int32 [4] flags (dense, per_sequence,
      attention, moe) set when a lookup of that category went above its grid.
    """
    total, extrapolated, _ = _iteration(tb, T, S, pc, kp, nd, kvd_sum, kvd_min, kvd_max, parts=False, slots=slots)
    return total, extrapolated


def iteration_ns(tb: LatencyTables, shape: BatchShape):
    """The iteration's time as a float64 scalar, ns: :func:`iteration_time`'s composition with
    every rounding of a time left out (the lookups' ``int()`` truncations, the floors of the scaled
    terms, the host memory operations, the ring collectives and the KV reads, the skew
    correction's rounding), so that it is differentiable (``jax.grad``, ``eqx.filter_grad``) in
    the continuous leaves: the table values (``lin_vals``, ``att_vals``, ``moe_vals``; exactly
    linear: a lookup is a fixed weighting of at most two keys per axis), the what-if scales
    (``compute_scale``, ``memory_scale``, ``link_scale``, ``kv_read_scale``), the link
    (``link_bw``, ``link_lat``, ``link_step_overhead``), the host memory (``cpu_bw``, ``cpu_lat``)
    and an off-NPU KV cache (``kvloc_*``). What is not a time stays discrete: the bracket
    indices (which keys a shape falls between), the MoE activated experts and local tokens, the
    decodes' mean KV length, the skew labels; a derivative with respect to a table key or a batch
    shape is therefore piecewise (kinks on the keys). Kinks in the continuous leaves: ``max``
    terms (``kv_read_scale``'s floor at ``kv_read_scale * t_att``: a kink at 1.0, where the
    gradient is the mean of the one-sided ones; the weight-load / KV-read critical path) and the
    1 ns floor of a looked-up value. ``kv_read_scale`` enters only tables that compile its term
    (``kv_scaled``, static: :func:`jaxsim.latency.tables.latency_tables` sets it when the scale is
    not 1; ``dataclasses.replace(tb, kv_scaled=True)`` to differentiate at 1.0), else its
    gradient is 0.

    ``iteration_time(shape)[0]`` differs from it only by those roundings: at most about one ns
    per rounded term and occurrence (``sum(lin_mult) + L*att_per_block*(2 + kv_scaled) + ...``;
    measured in ``tests/test_latency_grad.py``). It is a separate compiled path (a static flag
    of the private helpers): the engine's integer path is unchanged and pays nothing.

    Args:
      tb: one configuration's tables (``vmap`` over :func:`jaxsim.latency.tables.stack_tables`
        for several).
      shape: one batch (:class:`jaxsim.latency.base.BatchShape`, int scalars).

    Returns:
      float64 [] ns.

    Raises:
      JaxsimInputError: tables that compile PIM attention or sub-batch interleaving
        (``tb.pim``, ``tb.interleave``): those schedules floor inside
        :mod:`jaxsim.latency.pim` and are not modelled in float time.

    Example (the gradient of a set of batches' total time, :func:`total_ns_grad`)::

        shapes = stack_shapes([BatchShape(*(jnp.asarray(x) for x in s)) for s in
                               [(2048, 1, 2048, 0, 0, 0, 0, 0), (65, 64, 1, 0, 64, 64 * 900, 100, 3000)]])
        total, g = total_ns_grad(tb, shapes)
        g.compute_scale, g.link_bw, g.lin_vals  # d total / d leaf, ns per unit of the leaf
    """
    total, _, _ = _iteration(tb, *shape.args(), parts=False, slots=shape.slots if tb.pim else None,
                             float_time=True)
    return total


def stack_shapes(shapes) -> BatchShape:
    """Batch shapes (a list of :class:`BatchShape` without ``slots``) stacked on a leading axis [n]."""
    return jax.tree.map(lambda *x: jnp.stack([jnp.asarray(v) for v in x]), *shapes)


def total_ns(model: AbstractLatencyModel, shapes: BatchShape):
    """The summed float64 time (ns) of a set of batches: ``Σ_i model.iteration_ns(shapes[i])``,
    ``shapes`` a :class:`BatchShape` with leaves [n] (:func:`stack_shapes`). Any model with a
    float-time evaluation: :class:`LatencyTables`, :class:`jaxsim.latency.roofline.RooflineModel`."""
    return jnp.sum(jax.vmap(model.iteration_ns)(shapes))


def total_ns_grad(model: AbstractLatencyModel, shapes: BatchShape):
    """``(total, grads)``: :func:`total_ns` and its gradient with respect to every float leaf of
    ``model`` (``equinox.filter_value_and_grad``: ``grads`` is a model-shaped tree whose float
    leaves hold d total / d leaf in ns per unit of that leaf and whose other leaves are None).
    Jit it with ``equinox.filter_jit``. Example: :func:`iteration_ns`. (Plain ``jax.grad`` of
    :func:`total_ns` over the whole model needs ``allow_int=True``: a model holds int and bool
    leaves, whose cotangents are then float0.)"""
    return eqx.filter_value_and_grad(total_ns)(model, shapes)


def pp_layers(num_layers, pp, max_pp: int):
    """Transformer blocks per pipeline stage, vLLM's ``get_pp_indices`` (REFERENCE.md §1.8): each
    stage gets ``L // pp``, and the remainder ``r`` adds one block to each of the r stages just
    before the last. Returns int64 [max_pp] (0 for stages >= pp)."""
    L, pp = jnp.asarray(num_layers, _I), jnp.asarray(pp, _I)
    s = jnp.arange(max_pp, dtype=_I)
    r = L % pp
    extra = ((s >= pp - 1 - r) & (s < pp - 1)).astype(_I)
    return jnp.where(s < pp, L // pp + extra, 0)


def split_stages(total, t_pro, t_head, L, pp, max_pp: int):
    """int64 [max_pp] stage times of an iteration of ``total`` ns: stage 0 takes the prologue
    ``t_pro``, the last stage the head ``t_head`` and the rounding remainder, the blocks split in
    proportion to :func:`pp_layers` (floored); 0 past ``pp``. They sum to ``total``."""
    layers = pp_layers(L, pp, max_pp)
    blocks = total - t_pro - t_head
    s = jnp.arange(max_pp, dtype=_I)
    st = blocks * layers // L + jnp.where(s == 0, t_pro, 0)
    last = total - jnp.sum(jnp.where(s < pp - 1, st, 0))
    return jnp.where(s == pp - 1, last, jnp.where(s < pp, st, 0))


def stage_times(tb: LatencyTables, max_pp: int, T, S, pc, kp, nd, kvd_sum, kvd_min, kvd_max, *, slots=None):
    """Per-stage latencies of one batch under pipeline parallelism (``tb.pp`` stages, REFERENCE.md §1.8).

    Stage s takes ``[s = 0: in-host-op + prologue] + L_s x block + [s = pp-1: head + out-host-op]``
    with ``L_s`` from :func:`pp_layers`. The blocks' total (everything of :func:`iteration_time`
    but the host ops, prologue and head) is split in proportion to ``L_s`` (floored), and the last
    stage takes what is left, so the stages always sum to :func:`iteration_time` exactly (with
    pp = 1 the one stage *is* it). For a model whose L blocks are identical (not a hybrid MoE with
    dense-MLP layers) and unit ``compute_scale``, ``L_s x block`` is exact.

    Returns ``(times, extrapolated, p2p)``: int64 [max_pp] stage times (0 for stages >= pp), the
    flags of :func:`iteration_time`, and the int64 cost of sending the hidden state (``T*H*fp``
    bytes) from one stage to the next: ``floor((link_latency + step_overhead + bytes/link_bw) *
    link_scale)`` on the instance's TP link (one step of :func:`_ring`).
    """
    total, extrapolated, (t_pro, t_head) = _iteration(tb, T, S, pc, kp, nd, kvd_sum, kvd_min, kvd_max, parts=True,
                                                      slots=slots)
    st = split_stages(total, t_pro, t_head, tb.num_layers, tb.pp, max_pp)
    T = jnp.asarray(T).astype(_I)
    p2p = _ring(jnp.asarray(1, _I), tb, (T * tb.hidden * tb.weight_bytes).astype(_F))
    return st, extrapolated, p2p


class _Parts(NamedTuple):
    """One batch shape's looked-up pieces (int64 ns; :func:`_components`)."""

    t_in: jax.Array  # host op in (token ids)
    t_out: jax.Array  # host op out (sampled ids)
    t_lin: jax.Array  # every dense / per-sequence layer of the iteration
    t_att: jax.Array  # one attention layer
    t_moe_block: jax.Array  # one MoE block, collectives included
    ar: jax.Array  # one TP AllReduce
    c_pro: jax.Array  # the prologue layers
    c_head: jax.Array  # the head layers
    c_pre: jax.Array  # one block's pre-attention dense layers (lin_pre)
    extrapolated: jax.Array  # int32 [4]


def _iteration(tb: LatencyTables, T, S, pc, kp, nd, kvd_sum, kvd_min, kvd_max, *, parts: bool, slots=None,
               npu_only: bool = False, float_time: bool = False):
    """:func:`iteration_time`; with ``parts``, also ``(stage-0 part, last-stage part)``: the host
    op in + the prologue layers, and the head layers + the host op out. ``slots``: the batch's
    requests (``BatchShape.slots``), read when the tables compile PIM (``tb.pim``). ``npu_only``:
    the NPU's own work, its waits for PIM results left out (the PIM work taken as 0 ns).
    ``float_time`` (static): float64 ns, no time floored (:func:`iteration_ns`)."""
    T, S, pc, kp, nd, kvd_sum, kvd_min, kvd_max = (
        jnp.asarray(x).astype(_I) for x in (T, S, pc, kp, nd, kvd_sum, kvd_min, kvd_max))
    if float_time and (tb.pim or tb.interleave):
        # the PIM placement and the interleaved schedule (jaxsim.latency.pim) floor inside; their
        # gradients would be silently 0
        raise JaxsimInputError("LatencyTables.pim / interleave", "the float-time evaluation (iteration_ns) does "
                               "not model PIM attention or sub-batch interleaving",
                               "use iteration_time (int64 ns), or tables built without PIM")
    pim_t = None
    if tb.pim:  # decode attention on PIM channels: the NPU's attention lookup keeps the prefills (§1.11)
        if slots is None:
            raise ValueError("tables with PIM attention need the batch's requests (BatchShape.slots)")
        pim_t = jnp.zeros((), _I) if npu_only else _pim_layer(tb, slots.tokens == 1, slots)
        nd, kvd_sum, kvd_min, kvd_max = (jnp.where(tb.pim_on, 0, x) for x in (nd, kvd_sum, kvd_min, kvd_max))
    c = _components(tb, T, S, pc, kp, nd, kvd_sum, kvd_min, kvd_max, float_time=float_time)
    L = tb.num_layers
    t_att = c.t_att
    if tb.pim:
        t_att = jnp.where(pim_t > 0, jnp.where(tb.pim_serial, t_att + pim_t, jnp.maximum(t_att, pim_t)), t_att)
    total = c.t_in + c.t_out + c.t_lin + L * tb.att_per_block * t_att + tb.moe_blocks * c.t_moe_block + tb.ar_count * c.ar
    extrapolated = c.extrapolated
    if tb.interleave:
        both, inter, ext = _interleaved(tb, slots, c, npu_only)
        total = jnp.where(both, inter, total)
        extrapolated = jnp.where(both, ext, extrapolated)
    if tb.offload:
        total = _weight_loads(tb, total, c.t_in, c.t_out, c.c_pro, c.c_head,
                              kv_read_ns(tb, kp, kvd_sum, float_time=float_time), float_time)
    if not parts:
        return total, extrapolated, None
    return total, extrapolated, (c.t_in + c.c_pro, c.t_out + c.c_head)


def _pim_layer(tb: LatencyTables, decode, slots):
    """One layer's PIM attention time of the decodes ``decode`` (bool [slot]), int64 ns (0 when
    the configuration has no PIM): :func:`jaxsim.latency.pim.pim_layer_ns` with each request's
    current context (its computed tokens) or, in reference mode, its prompt length."""
    ctx = jnp.where(tb.pim_prompt_ctx, slots.prompt, slots.computed)
    t = pim_lib.pim_layer_ns(ctx, decode, tb.pim_a, tb.pim_b, tb.pim_lat, tb.pim_load0, tb.pim_j, tb.pim_split)
    return jnp.where(tb.pim_on, t, 0)


def _interleaved(tb: LatencyTables, slots, whole: _Parts, npu_only: bool = False):
    """Sub-batch interleaving (REFERENCE.md §1.12): ``(applies, time, extrapolated)``. It applies
    when the configuration asks for it and both halves hold a request (else the normal schedule).
    Each half is looked up on its own (its decodes on PIM, the NPU attention its prefills'); the
    host ops are the whole batch's."""
    n = slots.tokens
    side_a = pim_lib.split_sides(n, slots.pos)
    sides = jnp.stack([side_a, (n > 0) & ~side_a])  # [2, slot]
    prefill = n > 1

    def total(x):
        return jnp.sum(jnp.where(sides & x, n, 0), axis=1)

    T, S = total(n > 0), jnp.sum((sides & (n > 0)).astype(_I), axis=1)
    pc, kp = total(prefill), jnp.sum(jnp.where(sides & prefill, slots.computed, 0), axis=1)
    z = jnp.zeros(2, _I)
    c = jax.vmap(lambda *a: _components(tb, *a))(T, S, pc, kp, z, z, z, z)
    pim = jnp.zeros(2, _I) if npu_only else jax.vmap(lambda d: _pim_layer(tb, d, slots))(sides & (n == 1))
    L = tb.num_layers
    block = (c.t_lin - c.c_pro - c.c_head) // L + (tb.moe_blocks * c.t_moe_block + tb.ar_count * c.ar) // L
    att = tb.att_per_block * c.t_att
    post = block - c.c_pre
    t = pim_lib.interleaved_ns(whole.t_in, whole.t_out, c.c_pro, c.c_pre, att, post, c.c_head, pim, L, tb.pim_serial)
    ext = jnp.max(c.extrapolated, axis=0)
    return tb.sub_batch_on & jnp.all(S > 0), t, ext


def pim_work(tb: LatencyTables, slots):
    """``(pim_ns, pim_io_bytes)`` of one iteration (int64; zeros without PIM): every layer's PIM
    attention time (both halves under sub-batch interleaving) and the bytes its PIM operations move
    (per decode and layer ``pim_io``: q, k, v in, the output out)."""
    if not tb.pim:
        z = jnp.zeros((), _I)
        return z, z
    n = slots.tokens
    layers = tb.num_layers * tb.att_per_block
    whole = _pim_layer(tb, n == 1, slots)
    if tb.interleave:
        side_a = pim_lib.split_sides(n, slots.pos)
        halves = _pim_layer(tb, side_a & (n == 1), slots) + _pim_layer(tb, ~side_a & (n == 1), slots)
        both = tb.sub_batch_on & jnp.any(side_a) & jnp.any(~side_a & (n > 0))
        whole = jnp.where(both, halves, whole)
    decodes = jnp.sum((n == 1).astype(_I))
    return layers * whole, jnp.where(tb.pim_on, layers * decodes * tb.pim_io, 0)


def _components(tb: LatencyTables, T, S, pc, kp, nd, kvd_sum, kvd_min, kvd_max, *,
                float_time: bool = False) -> _Parts:
    """The lookups of one batch shape (REFERENCE.md §2.1-2.7), int64 scalars; float64 with
    ``float_time`` (static: every time kept unfloored; the counts, MoE routing, bracket indices,
    ``kvd_mean`` and skew labels stay discrete, they are not times)."""
    ft = float_time
    T, S, pc, kp, nd, kvd_sum, kvd_min, kvd_max = (
        jnp.asarray(x).astype(_I) for x in (T, S, pc, kp, nd, kvd_sum, kvd_min, kvd_max))
    L, H, E, fp = tb.num_layers, tb.hidden, tb.moe_experts, tb.weight_bytes
    Tf = T.astype(_F)
    epf = tb.ep.astype(_F)

    # MoE routing per EP rank (§1.9): BALANCED closed form (identical on every rank), or the
    # expectation under the expert popularity of each rank
    kf = tb.moe_k.astype(_F)
    ae_bal = jnp.maximum(jnp.minimum(jnp.round(Tf * kf / epf), E.astype(_F) / epf), 1.0)
    tok_bal = jnp.maximum(jnp.round(Tf * (1.0 - jnp.power((epf - 1.0) / epf, kf))), 1.0)
    p_rank = jnp.sum(tb.moe_pop, axis=-1)  # [ranks]
    tok_pop = jnp.maximum(jnp.round(Tf * (1.0 - jnp.power(1.0 - p_rank, kf))), 1.0)
    ae_pop = jnp.round(jnp.sum(jnp.minimum(1.0, Tf * kf * tb.moe_pop), axis=-1))
    ae_pop = jnp.minimum(jnp.maximum(ae_pop, 1.0), tb.moe_rank_experts.astype(_F))
    ae = jnp.where(tb.moe_skewed, ae_pop, ae_bal)  # [ranks]
    tokens = jnp.where(tb.moe_skewed, tok_pop, tok_bal)
    rank_on = tb.moe_rank_experts > 0

    # level 1: pc axis, nd axis, then every dense / per-sequence layer
    q_lin = jnp.where(tb.lin_by_seq, jnp.maximum(S, 1), jnp.maximum(T, 1)).astype(_F)
    q1 = jnp.concatenate([jnp.stack([pc.astype(_F), nd.astype(_F)]), q_lin])
    lo1, hi1, t1, ab1 = _bracket(tb.l1_keys, tb.l1_last, q1)
    v = _trunc(_lerp(*_take2(tb.lin_vals, lo1[2:], hi1[2:]), t1[2:]), ft)
    mult = tb.lin_mult
    t_lin = _scaled(jnp.sum(mult * v), tb.compute_scale, ft)
    used = mult > 0
    ext_dense = jnp.any(ab1[2:] & used & ~tb.lin_by_seq)
    ext_seq = jnp.any(ab1[2:] & used & tb.lin_by_seq)

    # level 2: kp keys of the 4 corners (00 01 10 11 over pc x nd)
    pi = jnp.stack([lo1[0], lo1[0], hi1[0], hi1[0]])
    ni = jnp.stack([lo1[1], hi1[1], lo1[1], hi1[1]])
    lo2, hi2, t2, ab2 = _bracket(tb.att_kp[pi, ni], tb.att_kp_last[pi, ni], jnp.broadcast_to(kp.astype(_F), (4,)))

    # MoE block (§2.7), per rank: bracket ae, interpolate the two rows on their own token keys,
    # then across ae; the slowest rank gates the combine
    R = ae.shape[0]
    lo_a, hi_a, t_a, ab_a = _bracket(jnp.broadcast_to(tb.moe_ae, (R,) + tb.moe_ae.shape),
                                     jnp.broadcast_to(tb.moe_ae_last, (R,)), ae)
    mrows = jnp.stack([lo_a, hi_a], axis=-1)  # [R, 2]
    lo_m, hi_m, t_m, ab_m = _bracket(tb.moe_tok[mrows], tb.moe_tok_last[mrows],
                                     jnp.broadcast_to(tokens[:, None], (R, 2)))
    mr = _lerp(*_take2(tb.moe_vals[mrows], lo_m, hi_m), t_m)  # [R, 2]
    t_rank = _trunc(_lerp(mr[:, 0], mr[:, 1], t_a), ft)
    t_moe = _scaled(jnp.max(jnp.where(rank_on, t_rank, 0)), tb.compute_scale, ft)
    ep_steps = tb.ep - 1
    ag = _ring(ep_steps, tb, (jnp.maximum(1, T // tb.ep) * (H + E) * fp).astype(_F), ft)  # dispatch
    rs = _ring(ep_steps, tb, (T * H * fp).astype(_F) / epf, ft)  # combine
    t_moe_block = t_moe + jnp.where(tb.ep > 1, ag + rs, 0)
    ext_moe = (tb.moe_blocks > 0) & jnp.any(rank_on & (ab_a | ab_m[:, 0] | ab_m[:, 1]))

    # level 3: kvd keys of the 8 kp rows, for kvd_mean and kvd_max (§2.5 steps 2-3)
    kvd_mean = jnp.where(nd > 0, kvd_sum // jnp.maximum(nd, 1), 0)
    rows = jnp.stack([lo2[:4], hi2[:4]], axis=-1)  # [4, 2]
    pi2, ni2 = pi[:, None], ni[:, None]
    keys3 = tb.att_kvd[pi2, ni2, rows]  # [4, 2, KV]
    last3 = tb.att_kvd_last[pi2, ni2, rows]
    vals3 = tb.att_vals[pi2, ni2, rows]
    shape = (2, 4, 2)
    q3 = jnp.broadcast_to(jnp.stack([kvd_mean, kvd_max]).astype(_F)[:, None, None], shape)
    lo3, hi3, t3, ab3 = _bracket(jnp.broadcast_to(keys3, shape + keys3.shape[-1:]), jnp.broadcast_to(last3, shape), q3)
    vals3 = jnp.broadcast_to(vals3, shape + vals3.shape[-1:])
    r = _lerp(*_take2(vals3, lo3, hi3), t3)  # [2, 4, 2]: per kp row
    c = _lerp(r[..., 0], r[..., 1], t2[:4])  # [2, 4]: per corner
    v0 = _lerp(c[:, 0], c[:, 1], t1[1])
    v1 = _lerp(c[:, 2], c[:, 3], t1[1])
    tt = _trunc(_lerp(v0, v1, t1[0]), ft)
    t_mean, t_max = tt[0], tt[1]
    a_att = ab1[0] | ab1[1] | jnp.any(ab2[:4]) | jnp.any(ab3, axis=(1, 2))  # [2]

    # skew correction (§2.6)
    skew_on = (nd > 1) & (kvd_max != kvd_mean)
    span = kvd_max - kvd_min
    sr = jnp.where(span != 0, (kvd_mean - kvd_min).astype(_F) / jnp.where(span != 0, span, 1).astype(_F), 0.0)
    sr = jnp.clip(sr, 0.0, 1.0)
    on_grid = (pc % 16 == 0) & (pc >= 0) & (pc <= 2048)
    slot = jnp.where(on_grid, tb.skew_slot[jnp.clip(pc // 16, 0, tb.skew_slot.shape[0] - 1)], 0)
    alpha = tb.skew_alpha[slot, _label(tb.skew_n_hi, nd.astype(_F)), _label(tb.skew_sr_hi, sr),
                          _label(tb.skew_kvb_hi, kvd_max.astype(_F)), _label(tb.skew_kp_hi, kp.astype(_F))]
    skewed = t_mean.astype(_F) + alpha * (t_max - t_mean).astype(_F)
    if not ft:
        skewed = jnp.round(skewed).astype(_I)
    t_att = jnp.where(skew_on & (alpha != 0) & (t_max > t_mean), skewed, t_mean)
    # FP8 KV from bf16 tables (§1.14): the KV-read term b*kvd_sum scaled by kv_read_scale; the
    # result is kept at or above kv_read_scale * t_att (at most the whole time is KV reads)
    if tb.kv_scaled:
        s_kv = tb.kv_read_scale
        cut = _ns((1.0 - s_kv) * tb.kv_read_b * kvd_sum.astype(_F), ft)
        kv_scaled = jnp.maximum(t_att - cut, _ns(s_kv * t_att.astype(_F), ft))
        if ft:  # continuous at 1.0 (both sides t_att): no switch, whose gradient there would be 0
            t_att = jnp.maximum(kv_scaled, 1.0)
        else:
            t_att = jnp.where(s_kv != 1.0, jnp.maximum(kv_scaled, 1), t_att)
    has_att = (pc > 0) | (nd > 0)
    t_att = jnp.where(has_att, _scaled(t_att, tb.memory_scale, ft), 0)
    ext_att = has_att & (a_att[0] | (skew_on & a_att[1]))

    # host memory ops (token ids in, sampled ids out, each floored) and the TP AllReduce (ring)
    t_in = _ns(tb.cpu_lat + (2 * fp * T).astype(_F) / tb.cpu_bw, ft)
    t_out = _ns(tb.cpu_lat + (4 * T).astype(_F) / tb.cpu_bw, ft)
    ar = _ring(2 * (tb.tp - 1), tb, (T * H * fp).astype(_F) / tb.tp.astype(_F), ft)

    extrapolated = jnp.stack([ext_dense, ext_seq, ext_att, ext_moe]).astype(jnp.int32)
    c_pro = _scaled(jnp.sum(tb.lin_prologue * v), tb.compute_scale, ft)
    c_head = _scaled(jnp.sum(tb.lin_head * v), tb.compute_scale, ft)
    c_pre = _scaled(jnp.sum(tb.lin_pre * v), tb.compute_scale, ft)
    return _Parts(t_in, t_out, t_lin, t_att, t_moe_block, ar, c_pro, c_head, c_pre, extrapolated)


def kv_read_ns(tb: LatencyTables, kp, kvd_sum, *, float_time: bool = False):
    """One block's KV read from an off-NPU KV cache (REFERENCE.md §1.16 kv_loc), int64 ns:
    ``floor(kvloc_lat + (kvd_sum + kp) * kvloc_bytes / kvloc_bw)`` (the decodes' KV lengths plus
    the prefill chunks' histories: every token the batch attends over that was computed before
    this iteration; the new tokens' K/V are computed on the NPU). 0 without tokens to read or
    with the KV on the NPU (``kvloc_bytes`` 0). ``float_time``: float64, not floored."""
    tokens = (jnp.asarray(kvd_sum).astype(_I) + jnp.asarray(kp).astype(_I)).astype(_F)
    t = _ns(tb.kvloc_lat + tokens * tb.kvloc_bytes / tb.kvloc_bw, float_time)
    return jnp.where((tb.kvloc_bytes > 0) & (tokens > 0), t, 0)


def _weight_loads(tb: LatencyTables, total, t_in, t_out, c_pro, c_head, kv_read=0, float_time: bool = False):
    """The iteration's time with off-NPU weights (REFERENCE.md §1.10) or an off-NPU KV cache
    (§1.16 kv_loc): the critical path over the compute chain (host op in, prologue, L blocks, head,
    host op out), the weight loads and the KV reads, each part starting once its weights and KV are
    in place (``tb.wload_*``, :func:`jaxsim.placement.load_gates`; block i's KV read ends at
    ``(i+1) * kv_read``, the reads queued on the KV device in layer order at the iteration's
    start, :func:`kv_read_ns`)::

        t = t_out + max(t_in + C, g_pro + C, max_i(g_i + B - floor(i*B/L) + c_head), g_head + c_head)
        g_i = max(wload_i, (i+1) * kv_read)

    with ``C = c_pro + B + c_head`` the compute chain and ``B`` the blocks' total (block i starts
    ``floor(i*B/L)`` into it: exact for identical blocks; a hybrid MoE model's blocks are taken at
    their mean). A block waits for its whole KV before it starts (its attention cannot finish
    before: the pre-attention layers are not overlapped, a bound on the error of one block's
    pre-attention part). The KV reads and the weight loads are separate chains, even on one device.
    With every gate 0 it is ``total`` unchanged. ``float_time``: float64 times, ``i*B/L`` not floored."""
    L = tb.num_layers
    B = total - t_in - t_out - c_pro - c_head
    i = jnp.arange(tb.wload_blocks.shape[0], dtype=_I)
    start = i * B / jnp.maximum(L, 1) if float_time else (i * B) // jnp.maximum(L, 1)
    suffix = B - start + c_head
    gate = jnp.maximum(tb.wload_blocks, (i + 1) * kv_read)
    gated = jnp.where(i < L, gate + suffix, 0)
    chain = c_pro + B + c_head
    crit = jnp.maximum(jnp.maximum(t_in + chain, tb.wload_pro + chain),
                       jnp.maximum(jnp.max(gated), tb.wload_head + c_head)) + t_out
    off = (tb.wload_pro > 0) | (tb.wload_head > 0) | jnp.any(tb.wload_blocks > 0) | (kv_read > 0)
    return jnp.where(off, crit, total)
