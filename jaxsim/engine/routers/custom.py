"""``custom``: a user's scoring function, from Python (``Router("custom", score_fn=...)``)."""

from typing import Callable

from jaxsim.engine.routers.base import AbstractScoringPolicy


class Custom(AbstractScoringPolicy):
    """``score_fn(features) -> scores[inst]``, lowest wins (ties in scan order from the rotating
    counter). ``features`` is the router's per-instance dict (``base``) plus ``cached_blocks``
    (``int32[inst]``, this request's cached leading blocks) and ``prompt`` (an int32 scalar, tokens).
    ``score_fn`` is traced into the loop, so it must be written with ``jax.numpy``."""

    needs_prefix_lookup = True  # score_fn may read cached_blocks
    score_fn: Callable

    def scores(self, features, cached_blocks, prompt):
        return self.score_fn({**features, "cached_blocks": cached_blocks, "prompt": prompt})
