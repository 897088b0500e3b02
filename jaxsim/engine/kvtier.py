"""The KV lower-tier interface: a CPU or CXL KV tier below the GPU's paged pool (REFERENCE.md §1.5).

A tier holds *pools* of KV chunks (``P`` of them: one per instance when private, one per node or
one for the cluster when shared); each instance reads and writes the pool ``EngineParams.tier_pool``
names. The engine calls a tier at four points:

* **lookup** (inside an instance's scheduler, at a request's admission, after the GPU prefix hits):
  how many further leading prompt blocks the instance's pool holds. Those tokens count as computed
  and get fresh GPU blocks; the lookup is read-only (the state as of the start of the step).
* **write** (once per step, for the whole cluster): the chunks that the step's GPU blocks now fully
  cover are copied down (write-through), a hit refreshes its chunk's LRU age, and a pool over its
  capacity evicts.
* **recall** (when batches start): the time to bring the admitted requests' chunks back before the
  batch's first layer, each pool's bandwidth shared by the recalls in flight.
* **stats**: what the iteration records show (resident chunks and chunks written per pool).

The tier's state is a pytree in ``ClusterState.tier`` (numeric knobs such as a pool's capacity and
bandwidth belong in it, so that they can vary per configuration); the tier object itself is
static (``Static.kv_tier``: hashable, its fields fixed at compile time). A new tier is one file: a
subclass of :class:`AbstractKVTier`. :class:`NoLowerTier`, the default, compiles to nothing; the
LMCache-style LRU chunk pool is :class:`jaxsim.engine.chunk_tier.ChunkTier`.
"""

import abc

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int


class AbstractKVTier(eqx.Module):
    """A KV tier below the GPU pools of a cluster. Methods are pure and jittable."""

    enabled = False  # a class attribute: False compiles no tier code at all
    chunk_blocks = 1  # GPU blocks per chunk (the unit of writes and recalls)

    def chunk_bytes(self, kv_token_bytes, block_size: int):
        """Bytes of one chunk: its tokens x ``kv_token_bytes`` (K+V, all layers and ranks)."""
        return kv_token_bytes * block_size * self.chunk_blocks

    @abc.abstractmethod
    def lookup(self, state, pool: Int[Array, ""], chunks: Int[Array, " mc"], matched: Int[Array, ""],
               limit: Int[Array, ""], now: Int[Array, ""]) -> "tuple[Int[Array, ''], Int[Array, '']]":
        """At admission: ``(gained, read)``: the further prompt blocks (int32) that pool ``pool``
        holds after the request's ``matched`` GPU-hit blocks, at most ``limit - matched`` (``limit``:
        the blocks a lookup may cover, ``(reached - 1) // block_size``), and the chunks read to
        recall them. ``chunks``: the request's chunk ids (``WorkloadArrays.chunks`` row, -1 padded);
        ``now``: the instance's time (ns)."""

    @abc.abstractmethod
    def write(self, state, pool: Int[Array, " n"], chunk: Int[Array, " n"], valid: Bool[Array, " n"],
              now: Int[Array, " n"]):
        """``state`` with chunk ids ``chunk`` written to (or, when resident, touched in) pools
        ``pool`` at times ``now`` where ``valid``; no capacity check (see :meth:`settle`)."""

    @abc.abstractmethod
    def settle(self, state):
        """``state`` after each pool over its capacity evicted down to it, and its statistics
        updated (called once per step, after the step's writes)."""

    @abc.abstractmethod
    def recall(self, state, pool: Int[Array, " inst"], chunks: Int[Array, " inst"],
               chunk_bytes: Int[Array, " inst"], now: Int[Array, " inst"], start: Bool[Array, " inst"]):
        """``(delay, state)``: per instance starting a batch (``start``), the time (int64 ns) to
        recall ``chunks`` chunks of ``chunk_bytes`` bytes from its pool before layer 0; the pool's
        channel stays busy for it."""

    @abc.abstractmethod
    def pool_stats(self, state, pool: Int[Array, " inst"]) -> "tuple[Int[Array, ' inst'], Int[Array, ' inst']]":
        """``(resident, written)`` of each instance's pool: chunks held now, and chunks written
        since the start (cumulative)."""


class NoLowerTier(AbstractKVTier):
    """No tier below the GPU: nothing is written, lookups find nothing, recalls are free."""

    def lookup(self, state, pool, chunks, matched, limit, now):
        z = jnp.zeros((), jnp.int32)
        return z, z

    def write(self, state, pool, chunk, valid, now):
        return state

    def settle(self, state):
        return state

    def recall(self, state, pool, chunks, chunk_bytes, now, start):
        return jnp.zeros(pool.shape, jnp.int64), state

    def pool_stats(self, state, pool):
        return jnp.zeros(pool.shape, jnp.int32), jnp.zeros(pool.shape, jnp.int64)
