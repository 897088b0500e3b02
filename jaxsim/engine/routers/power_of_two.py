"""``power_of_two``: power-of-two-choices. Sample two distinct routable instances uniformly, send
the request to the less loaded of the two (Azar, Broder, Karlin and Upfal, "Balanced Allocations",
STOC 1994; Mitzenmacher, "The Power of Two Choices in Randomized Load Balancing", IEEE TPDS 12(10),
2001). For n requests thrown at n instances, a second probe brings the most loaded instance from
``Theta(log n / log log n)`` requests (one random choice) down to ``log log n / log 2 + O(1)``,
while a real balancer reads two loads per request instead of all n.
"""

import jax
import jax.numpy as jnp

from jaxsim.engine.instance import I32
from jaxsim.engine.routers.base import AbstractRoutingPolicy, kth_routable, load_score


class PowerOfTwo(AbstractRoutingPolicy):
    """Two distinct routable instances, drawn uniformly from a key ``fold_in(key(seed), pos)`` (so
    a request's draw depends only on its arrival position, as ``random``); the one with the lower
    ``base.load_score`` wins, the first drawn on ties. With one routable instance, that one. The
    rotating counter is left as it is."""

    seed: int = 42

    def pick(self, features, counter, pos, cached_blocks, prompt, routable):
        m = jnp.sum(routable.astype(I32), dtype=I32)  # routable instances
        key_a, key_b = jax.random.split(jax.random.fold_in(jax.random.key(self.seed), pos))
        a = jax.random.randint(key_a, (), 0, m, dtype=I32)
        # The b-th of the other m - 1: drawn in [0, m - 2], then shifted past a, so b != a and
        # b is uniform over the rest.
        b = jax.random.randint(key_b, (), 0, jnp.maximum(m - 1, 1), dtype=I32)
        b = b + (b >= a).astype(I32)
        first = kth_routable(routable, a)
        second = jnp.where(m > 1, kth_routable(routable, b), first)
        load = load_score(features)
        return jnp.where(load[second] < load[first], second, first), counter
