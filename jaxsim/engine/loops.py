"""A ``while_loop`` that stays cheap under ``vmap``.

``jax.vmap`` of ``lax.while_loop`` with a per-configuration predicate runs the body for every
configuration until the last one is done and then *selects* between the old and the new carry on
every trip. When the carry holds a KV pool or a block table, that select copies the whole state of
every configuration on every trip, which made a batched sweep ~20x slower per configuration than
a single run.

:func:`masked_while_loop` asks instead for a body that is already a no-op on a carry whose
predicate is false (every write is masked by it, which our scatter-based bodies do at no cost).
Its batching rule then runs ``while any(pred)`` over the vmapped body with no select at all,
so the per-trip cost is the body's own (in-place) work. Unbatched, it is a plain ``while_loop``.

Values the body reads must be passed through ``consts`` (a ``custom_vmap`` function may not
close over traced values).
"""

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap


def masked_while_loop(cond, body, init, consts=()):
    """``while cond(consts, c): c = body(consts, c)``.

    Contract: whenever ``cond(consts, c)`` is False, ``body(consts, c)`` must return ``c``
    unchanged in every part that is used after the loop (mask each write by the predicate).
    Breaking it gives wrong results only under ``vmap``; the sweep-vs-single equality tests
    (tests/test_sweep.py) catch that.
    """

    @custom_vmap
    def loop(consts, init):
        return jax.lax.while_loop(lambda c: cond(consts, c), lambda c: body(consts, c), init)

    @loop.def_vmap
    def _batched(axis_size, in_batched, consts, init):
        consts_batched, init_batched = in_batched
        init = jax.tree.map(
            lambda x, b: x if b else jnp.broadcast_to(x, (axis_size,) + jnp.shape(x)), init, init_batched)
        axes = (jax.tree.map(lambda b: 0 if b else None, consts_batched), 0)
        cond_v = jax.vmap(cond, in_axes=axes)
        body_v = jax.vmap(body, in_axes=axes)
        out = jax.lax.while_loop(lambda c: jnp.any(cond_v(consts, c)), lambda c: body_v(consts, c), init)
        return out, jax.tree.map(lambda _: True, out)

    return loop(consts, init)
