"""``prefix_affinity``: the instance caching the longest prefix of the prompt, then the least loaded."""

import jax.numpy as jnp

from jaxsim.engine.routers.base import AbstractScoringPolicy, load_score


class PrefixAffinity(AbstractScoringPolicy):
    """Most leading prompt blocks already cached on the instance (the blocks its admission would
    find, ``(prompt - 1) // block_size`` at most, as vLLM looks them up); ties go to the least
    loaded (``base.load_score``), then to the scan order from the rotating counter."""

    needs_prefix_lookup = True

    def scores(self, features, cached_blocks, prompt):
        # Lexicographic (most cached blocks, then least load): load < 2**40 for any real state. At
        # equal cached counts, loads closer than the float64 spacing at cached * 2**40 (about
        # cached * 2**-12) tie and fall to the scan order.
        return -cached_blocks.astype(jnp.float64) * 2.0**40 + load_score(features)
