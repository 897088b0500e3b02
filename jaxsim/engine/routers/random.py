"""``random``: uniform over the routable instances (REFERENCE.md §1.6, RAND)."""

import jax
import jax.numpy as jnp

from jaxsim.engine.instance import I32
from jaxsim.engine.routers.base import AbstractRoutingPolicy, kth_routable


class Random(AbstractRoutingPolicy):
    """Uniform over the routable instances, keyed by ``(seed, pos)``: a request's draw depends on
    its arrival position only, not on what the loop did before, so a run is reproducible and a
    sweep point equals its single run. The reference seeds Python's RNG with 42; the sequence
    itself need not match it. The counter is left as it is."""

    seed: int = 42

    def pick(self, features, counter, pos, cached_blocks, prompt, routable):
        # The legacy uint32 key (jax.random.PRNGKey), kept so that existing runs draw the same.
        key = jax.random.fold_in(jax.random.PRNGKey(self.seed), pos)
        k = jax.random.randint(key, (), 0, jnp.sum(routable.astype(I32)), dtype=I32)
        return kth_routable(routable, k), counter
