"""The KV lower-tier hook: where a CPU or CXL KV tier sits below the GPU's paged pool.

The engine calls a tier at three points (REFERENCE.md §1.4, §1.5, the ``[recall]`` term of §2.1):

* **eviction**: when the GPU pool reuses a free block that is still in its prefix index
  (``kvpool.pop_blocks``), the tier sees the evicted block's hash (write-through or demotion);
* **lookup**: at admission, after the GPU prefix hits, the tier says how many further leading
  prompt blocks it holds; those tokens count as computed (prefix hits) and get fresh GPU blocks;
* **recall**: the batch that admitted them pays the tier's time to bring them back before layer 0.

A tier is one file: a subclass of :class:`AbstractKVTier` (an ``equinox.Module``, hashable: it
is part of the run's static ``Static``) whose state, from :meth:`AbstractKVTier.init`, lives in
each instance's ``KVPool.lower`` (numeric knobs belong in that state, so that they can vary per
configuration). :class:`NoLowerTier`, the default, changes nothing (and compiles to nothing).
"""

import abc

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int


class AbstractKVTier(eqx.Module):
    """A KV tier below the GPU pool. Methods are pure and jittable; ``state`` is the tier's
    pytree in ``KVPool.lower`` (one instance's)."""

    @abc.abstractmethod
    def init(self, num_hashes: int):
        """The empty state for a trace with ``num_hashes`` distinct block hashes."""

    @abc.abstractmethod
    def on_evict(self, state, hashes: Int[Array, " w"], evicted: Bool[Array, " w"]):
        """``state`` after the GPU pool evicted the blocks of ``hashes`` where ``evicted``."""

    @abc.abstractmethod
    def lookup(self, state, hashes: Int[Array, " mb"], first, limit) -> Int[Array, ""]:
        """How many consecutive blocks ``hashes[first:limit]`` the tier holds (int32 scalar):
        the prompt's blocks after its ``first`` GPU hits, at most ``limit - first``."""

    @abc.abstractmethod
    def recall_ns(self, state, blocks) -> Int[Array, ""]:
        """Time (int64 ns) to bring ``blocks`` blocks back to the GPU before a batch's layer 0."""


class NoLowerTier(AbstractKVTier):
    """No tier below the GPU: evictions are forgotten, lookups find nothing, recalls are free."""

    def init(self, num_hashes: int):
        return ()

    def on_evict(self, state, hashes, evicted):
        return state

    def lookup(self, state, hashes, first, limit):
        return jnp.zeros((), jnp.int32)

    def recall_ns(self, state, blocks):
        return jnp.zeros((), jnp.int64)
