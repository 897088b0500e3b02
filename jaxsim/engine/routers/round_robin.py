"""``round_robin``: arrivals in turn, ``idx = counter % n; counter = idx + 1`` (REFERENCE.md §1.6, RR)."""

import jax.numpy as jnp

from jaxsim.engine.routers.base import AbstractScoringPolicy


class RoundRobin(AbstractScoringPolicy):
    """Every instance scores the same, so the first routable one from the counter on wins (with
    non-routable instances skipped, which plain ``counter % n`` would not do)."""

    def scores(self, features, cached_blocks, prompt):
        return jnp.zeros(features["waiting"].shape[0])
