"""Routing policies behind one interface, by name (REFERENCE.md §1.6).

``base`` declares ``AbstractRoutingPolicy`` (``pick(features, counter, pos, cached_blocks, prompt,
routable) -> (instance, counter)``) and ``AbstractScoringPolicy`` (lowest score wins), and the
registry; each other module is one policy. ``engine/routing.py`` builds the policy a
``Router(policy, seed, score_fn)`` names and calls it per request.

A new policy is one file here plus one ``register`` line below (README.md, "Extending jaxsim: a
routing policy"); code outside jaxsim can call ``register`` itself.
"""

import importlib

from jaxsim.engine.routers.base import (AbstractRoutingPolicy, AbstractScoringPolicy, build, first_best, get,
                                        kth_routable, load_score, names, params, register)


def _load(module: str, cls: str) -> type:
    """Class ``cls`` of ``routers/<module>.py``, imported here so that registering a built-in
    policy takes one line."""
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


# The built-in policies, in the order routing.POLICIES and error messages list them.
register("round_robin", _load("round_robin", "RoundRobin"))
register("random", _load("random", "Random"))
register("least_loaded", _load("least_loaded", "LeastLoaded"))
register("kv_aware", _load("kv_aware", "KVAware"))
register("prefix_affinity", _load("prefix_affinity", "PrefixAffinity"))
register("custom", _load("custom", "Custom"))
register("power_of_two", _load("power_of_two", "PowerOfTwo"))

__all__ = ["AbstractRoutingPolicy", "AbstractScoringPolicy", "build", "first_best", "get", "kth_routable",
           "load_score", "names", "params", "register"]
