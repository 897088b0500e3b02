"""Small array primitives that XLA:CPU runs poorly in their ``jnp`` form.

``jnp.cumsum`` lowers to a ``reduce_window`` as long as the array (O(n^2) work on CPU) and
``jnp.argsort`` to a comparator sort called through a function pointer; both showed up as the
largest items in a profile of a batched step. These replacements are O(n log n) or O(n^2) with
vector instructions, and exact.
"""

import jax
import jax.numpy as jnp


def prefix_sum(x):
    """Inclusive prefix sum along the last axis (same dtype)."""
    return jax.lax.associative_scan(jnp.add, x, axis=x.ndim - 1)


def leading_true(mask):
    """Number of leading True entries of a 1-D boolean array."""
    n = mask.shape[-1]
    return jnp.where(jnp.all(mask), n, jnp.argmin(mask)).astype(jnp.int32)


def stable_argsort(keys):
    """``jnp.argsort(keys, stable=True)`` for a short 1-D array, by counting ranks: entry i goes
    to position #{j: k_j < k_i} + #{j < i: k_j == k_i}."""
    n = keys.shape[0]
    idx = jnp.arange(n)
    before = (keys[None, :] < keys[:, None]) | ((keys[None, :] == keys[:, None]) & (idx[None, :] < idx[:, None]))
    rank = jnp.sum(before, axis=1, dtype=jnp.int32)
    return jnp.zeros(n, jnp.int32).at[rank].set(idx.astype(jnp.int32), unique_indices=True)
