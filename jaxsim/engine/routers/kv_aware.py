"""``kv_aware``: the instance with the most free KV blocks."""

import jax.numpy as jnp

from jaxsim.engine.routers.base import AbstractScoringPolicy


class KVAware(AbstractScoringPolicy):
    """The most free KV blocks (an absolute count, so a bigger pool attracts more); ties go to the
    first in scan order from the rotating counter."""

    def scores(self, features, cached_blocks, prompt):
        return -features["free_blocks"].astype(jnp.float64)
