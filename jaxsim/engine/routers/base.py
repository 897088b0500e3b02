"""The routing-policy interface (REFERENCE.md §1.6) and the registry from names to policies.

A policy decides, for one request, which instance serves it. ``engine/routing.py`` calls it once per
routed request (and once more for the decode instance under P/D), inside the compiled loop, with
``features``, a dict of per-instance ``int32[inst]`` arrays built by ``routing._features``:

``waiting``       requests queued or slotted-but-waiting on the instance (+ P/D hand-offs inbound)
``running``       requests in the running list
``free_blocks``   free KV blocks; ``num_blocks`` the pool size
``max_num_seqs``  the scheduler's cap on running requests (0 = unlimited)

A policy is an ``eqx.Module`` (abstract/final, as Diffrax's solvers): its fields are its
parameters, filled by name from the ``routing.Router`` that selects it (``seed``, ``score_fn``), so
a new parameter is one field on ``Router`` and one on the policy. ``Router`` stays the hashable,
static description; the policy object exists only while the loop is traced.

The registry maps the Hydra/JSON string (``cluster.routing``) to the policy class, as gymnax's
``registration.register``; ``routing.Router`` accepts any registered name.
"""

import abc
import dataclasses
from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from jaxsim.engine.instance import I32
from jaxsim.engine.ops import prefix_sum


def load_score(features: dict) -> Float[Array, " inst"]:
    """The load of each instance, ``(4 * waiting + running) / max_num_seqs`` (float64, ``[inst]``):
    vLLM's data-parallel load-balancer score (``waiting * 4 + running``, vLLM V1 ``DPLBAsyncMPClient``),
    divided by the instance's cap so that unequal instances compare (REFERENCE.md §1.6); the raw
    score when ``max_num_seqs`` is 0 (unlimited)."""
    load = (4 * features["waiting"] + features["running"]).astype(jnp.float64)
    return jnp.where(features["max_num_seqs"] > 0, load / jnp.maximum(features["max_num_seqs"], 1), load)


def first_best(scores: Float[Array, " inst"], counter: Int[Array, ""]) -> Int[Array, ""]:
    """Index of the lowest score, scanning from ``counter`` (wrapping); the first on ties, so that
    equal instances take turns as the counter rotates."""
    n = scores.shape[0]
    scan = (counter + jnp.arange(n, dtype=I32)) % n
    k = jnp.argmin(scores[scan])  # argmin returns the first minimum
    return scan[k].astype(I32)


def kth_routable(routable: Bool[Array, " inst"], k: Int[Array, ""]) -> Int[Array, ""]:
    """Index of the ``k``-th (0-based) routable instance, in index order (0 when there is none)."""
    return jnp.argmax(prefix_sum(routable.astype(I32)) > k).astype(I32)


class AbstractRoutingPolicy(eqx.Module):
    """A routing policy: ``pick`` chooses the instance of one request.

    ``needs_prefix_lookup``: whether ``pick`` reads ``cached_blocks``; only then does the router
    look the request's prompt up in every instance's prefix index (a while loop per instance, so
    the other policies skip it and get zeros)."""

    needs_prefix_lookup: ClassVar[bool] = False

    @abc.abstractmethod
    def pick(self, features: dict, counter: Int[Array, ""], pos: Int[Array, ""],
             cached_blocks: Int[Array, " inst"], prompt: Int[Array, ""],
             routable: Bool[Array, " inst"]) -> tuple[Int[Array, ""], Int[Array, ""]]:
        """The instance for one request, and the new rotating counter.

        ``features``: the per-instance ``int32[inst]`` dict above. ``counter``: the role's rotating
        scan start (``RouterState.counter`` / ``decode_counter``). ``pos``: the request's key for
        randomness, its arrival position (``n_req + k`` for the k-th release, ``+ 2**30`` for the
        decode pick). ``cached_blocks``: leading prompt blocks already cached per instance (zeros
        unless ``needs_prefix_lookup``). ``prompt``: the prompt length in tokens. ``routable``: the
        instances this request may go to (not padding, and of the right P/D role); a policy must
        never return another one while any is routable.

        Returns ``(instance, counter)``, both int32 scalars."""


class AbstractScoringPolicy(AbstractRoutingPolicy):
    """A policy that scores every instance: the lowest routable score wins, scanning from the
    rotating counter (the first on ties), then ``counter = best + 1`` (REFERENCE.md §1.6, LOAD)."""

    @abc.abstractmethod
    def scores(self, features: dict, cached_blocks: Int[Array, " inst"],
               prompt: Int[Array, ""]) -> Float[Array, " inst"]:
        """Per-instance scores (any real dtype; compared as float64), lowest first."""

    def pick(self, features, counter, pos, cached_blocks, prompt, routable):
        scores = jnp.asarray(self.scores(features, cached_blocks, prompt), jnp.float64)
        best = first_best(jnp.where(routable, scores, jnp.inf), counter)
        return best, (best + 1).astype(I32)


_REGISTRY: dict[str, type[AbstractRoutingPolicy]] = {}


def register(name: str, cls: type[AbstractRoutingPolicy]) -> None:
    """Make ``cls`` the policy named ``name`` (``Router(name)``, ``cluster.routing: name``)."""
    if not (isinstance(cls, type) and issubclass(cls, AbstractRoutingPolicy)):
        raise TypeError(f"routing policy {name!r}: {cls!r} is not an AbstractRoutingPolicy subclass")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"routing policy {name!r} is already registered ({_REGISTRY[name].__name__})")
    _REGISTRY[name] = cls


def get(name: str) -> type[AbstractRoutingPolicy]:
    """The policy class registered as ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"routing policy {name!r}: expected one of {names()}")
    return _REGISTRY[name]


def names() -> tuple[str, ...]:
    """The registered policy names, in registration order."""
    return tuple(_REGISTRY)


def params(name: str) -> tuple[str, ...]:
    """The parameters of policy ``name``: its fields, filled from the same-named ``Router`` fields."""
    return tuple(f.name for f in dataclasses.fields(get(name)))


def build(router) -> AbstractRoutingPolicy:
    """The policy object a ``routing.Router`` selects, with its parameters taken from the router."""
    return get(router.policy)(**{p: getattr(router, p) for p in params(router.policy)})
