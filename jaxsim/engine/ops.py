"""Small array primitives that XLA:CPU runs poorly in their ``jnp`` form.

``jnp.cumsum`` lowers to a ``reduce_window`` as long as the array (O(n^2) work on CPU); it
showed up as the largest item in a profile of a batched step. ``prefix_sum`` is O(n log n).
(Sorting is avoided altogether: ranking 160 slots per configuration and step took ~9% of a
batched step, so the scheduler keeps its running list in order instead.)
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



def expand_ranges(ends, first, window: int):
    """Entries ``first .. first+window-1`` of the concatenation of ranges whose inclusive ends are
    ``ends`` (the prefix sum of the range lengths, computed once outside the loops that walk the
    concatenation a window at a time): (owner range, offset in it, valid)."""
    e = first + jnp.arange(window, dtype=jnp.int32)
    # Unrolled binary search: a few gathers, no inner loop.
    owner = jnp.searchsorted(ends, e, side="right", method="scan_unrolled").astype(jnp.int32)
    owner = jnp.minimum(owner, ends.shape[0] - 1)
    start = jnp.where(owner > 0, ends[jnp.maximum(owner - 1, 0)], 0)
    return owner, e - start, e < ends[-1]
