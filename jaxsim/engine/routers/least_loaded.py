"""``least_loaded`` (the default): the lowest vLLM DP load score (REFERENCE.md §1.6, LOAD)."""

from jaxsim.engine.routers.base import AbstractScoringPolicy, load_score


class LeastLoaded(AbstractScoringPolicy):
    """The lowest ``(4 * waiting + running) / max_num_seqs`` (``base.load_score``); ties go to the
    first in scan order from the rotating counter."""

    def scores(self, features, cached_blocks, prompt):
        return load_score(features)
