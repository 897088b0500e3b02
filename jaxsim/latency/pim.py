"""PIM attention offload and sub-batch interleaving on the device (REFERENCE.md §1.11, §1.12).

Pure, jittable, vmappable functions of one batch's slots; :mod:`jaxsim.latency.profile` calls
them when its tables compile PIM (``LatencyTables.pim``, a static flag: nothing here compiles
otherwise). The host side (INI, geometry, coefficients) is :mod:`jaxsim.pim`.

**Placement** (:func:`pim_layer_ns`). Each decode (a request scheduled for exactly 1 token) puts
its attention on ``split`` channels: ``split`` placements of ``a * L_ctx + b`` ns each (``a``, ``b``:
``PimPlan.placement_a`` / ``placement_b``), requests taken longest first, each placement on the
least-loaded channel; the channels run in parallel and a channel's placements back to back, so one
layer's PIM work takes the largest channel load, plus the device's read latency, floored to whole
ns (the reference's timing, to the ns). Placing k equal items greedily on loads ``l_c`` puts them on
the k smallest values of ``{l_c + j*w : j = 0, 1, ...}``, so one request is one ``top_k``; requests
are a loop over the batch's decodes only.

**Sub-batch interleaving** (:func:`split_sides`, :func:`interleaved_ns`): the batch splits in two
by scheduled tokens (largest first, each request to the lighter side, ties to A) and the two halves
are issued layer by layer, A then B, on one in-order NPU, each half's PIM attention overlapping the
other half's NPU layers.
"""

import jax
import jax.numpy as jnp

_F = jnp.float64
_I = jnp.int64


def pim_layer_ns(ctx, decode, a, b, lat, load0, j, split):
    """One layer's PIM attention time of the decodes ``decode`` (bool [slot]) with context lengths
    ``ctx`` (int [slot]), int64 ns (0 without decodes).

    Args:
      a, b: per placement ``a * ctx + b`` ns (f64 scalars).
      lat: the device's read latency, ns, added once per layer.
      load0: f64 [C] initial channel loads: 0 for the instance's channels, +inf for padding.
      j: f64 [K] 0, 1, ..., K-1 (K >= split: the most placements of one request on one channel).
      split: placements per request (int scalar, <= K and <= the instance's channels).
    """
    n = jnp.sum(decode.astype(jnp.int32))
    order = jnp.argsort(jnp.where(decode, -ctx.astype(_I), jnp.iinfo(_I).max), stable=True)  # longest first
    size = a * ctx[order].astype(_F) + b
    K = j.shape[0]
    on = jnp.arange(K) < split

    def place(i, loads):
        w = size[i]
        cand = jnp.where(on[None, :], loads[:, None] + j[None, :] * w, jnp.inf)  # [C, K]
        _, idx = jax.lax.top_k(-cand.reshape(-1), K)
        return loads.at[idx // K].add(jnp.where(on, w, 0.0))

    loads = jax.lax.fori_loop(0, n, place, load0)
    peak = jnp.max(jnp.where(jnp.isfinite(load0), loads, 0.0))
    return jnp.where(n > 0, jnp.floor(peak + lat).astype(_I), 0)


def split_sides(tokens, pos):
    """Sub-batch A's requests (bool [slot]): the scheduled requests (``tokens > 0``, int [slot])
    by tokens, largest first (ties in batch order ``pos``), each to the side with fewer tokens so
    far (ties to A). The others scheduled form B."""
    sched = tokens > 0
    order = jnp.lexsort((pos, jnp.where(sched, -tokens, 1)))
    n = jnp.sum(sched.astype(jnp.int32))

    def put(i, c):
        ta, tb, side_a = c
        s = order[i]
        to_a = ta <= tb
        t = tokens[s].astype(_I)
        return ta + jnp.where(to_a, t, 0), tb + jnp.where(to_a, 0, t), side_a.at[s].set(to_a)

    zero = jnp.zeros((), _I)
    _, _, side_a = jax.lax.fori_loop(0, n, put, (zero, zero, jnp.zeros(tokens.shape, bool)))
    return side_a & sched


def interleaved_ns(t_in, t_out, pro, pre, att, post, head, pim, num_layers, serial):
    """The time of an interleaved iteration (REFERENCE.md §1.12), int64 ns. Every argument after
    ``t_out`` is int64 [2] (sub-batch A, B): the prologue, one block's pre-attention layers, its
    NPU attention (the prefills'), its layers after the attention (o_proj to the MLP, collectives
    included), the head, and one layer's PIM attention (0: none).

    Emission order, on one in-order NPU: host op in; prologue + pre-attn(0) of A, then of B; per
    layer l, post-attn(l) + pre-attn(l+1) of A, then of B; the heads; host op out. A half's PIM work
    of layer l starts once its pre-attention (``serial``: and its NPU attention) is done, after the
    PIM's earlier work (one PIM: the halves' placements start from the same empty channels, so
    they would share channels; on the reference's outputs the two never overlap, so either choice
    reproduces them); its post-attention waits for it."""

    def issue(npu, pim_free, x):
        """NPU runs half x's pre-attention block (and attention); its PIM work is queued."""
        npu = npu + pre[x]
        start = npu + jnp.where(serial, att[x], 0)
        npu = npu + att[x]
        end = jnp.where(pim[x] > 0, jnp.maximum(start, pim_free) + pim[x], 0)
        return npu, jnp.maximum(pim_free, end), end

    npu, free = t_in + pro[0], jnp.zeros((), _I)
    npu, free, end_a = issue(npu, free, 0)
    npu = npu + pro[1]
    npu, free, end_b = issue(npu, free, 1)

    def layer(_, c):
        npu, free, end_a, end_b = c
        npu = jnp.maximum(npu, end_a) + post[0]
        npu, free, end_a = issue(npu, free, 0)
        npu = jnp.maximum(npu, end_b) + post[1]
        npu, free, end_b = issue(npu, free, 1)
        return npu, free, end_a, end_b

    npu, free, end_a, end_b = jax.lax.fori_loop(0, num_layers - 1, layer, (npu, free, end_a, end_b))
    npu = jnp.maximum(npu, end_a) + post[0]
    npu = jnp.maximum(npu, end_b) + post[1]
    return npu + head[0] + head[1] + t_out
