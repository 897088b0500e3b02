"""Per-instance work over the instance axis of the cluster state."""

import jax
import jax.numpy as jnp


def per_instance(fn, in_axes=0):
    """``jax.vmap(fn)`` over the instance axis; called directly when there is one instance.

    Under ``vmap`` a ``while_loop`` with a batched predicate selects over its whole carry on every
    trip, so the common single-instance case skips the batching to keep the scheduler's loops cheap.
    """
    def call(*args):
        axes = in_axes if isinstance(in_axes, tuple) else (in_axes,) * len(args)
        leaves = [a for a, ax in zip(args, axes) if ax == 0]
        n = jax.tree.leaves(leaves)[0].shape[0]
        if n != 1:
            return jax.vmap(fn, in_axes=axes)(*args)
        squeezed = [jax.tree.map(lambda x: x[0], a) if ax == 0 else a for a, ax in zip(args, axes)]
        return jax.tree.map(lambda x: jnp.asarray(x)[None], fn(*squeezed))
    return call
