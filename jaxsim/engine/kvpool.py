"""The paged KV block pool of one instance: a port of vLLM's ``BlockPool`` to fixed-shape arrays.

REFERENCE.md §1.3: the free list is doubly linked and LRU-ordered (allocation pops the head,
freeing appends to the tail, a prefix hit takes a block out of the middle); ref counts; one
prefix-index entry per hash. Here the free list is a linear buffer ``ring[head:tail]`` of block
ids in free order. Taking a block out of the middle leaves a tombstone (-1) that the head skips;
when appends reach the end of the buffer the live entries are compacted to the front (rare: the
buffer holds twice the block count). Every operation costs O(window) or O(blocks of one
request), never O(pool size), except compaction.

Hashes are dense integer ids (see ``jaxsim.prefix``), so the prefix index is a plain array.
"""

import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Int

from jaxsim.engine.kvtier import AbstractKVTier, NoLowerTier
from jaxsim.engine.loops import masked_while_loop
from jaxsim.engine.ops import leading_true, prefix_sum

I32 = jnp.int32


class KVPool(eqx.Module):
    ref: Int[Array, " block"]  # ref count; 0 = free (possibly still cached under its hash)
    # Hash id the block is registered under, -1 for none (cleared when the block is popped).
    blk_hash: Int[Array, " block"]
    ring_pos: Int[Array, " block"]  # index of the block in `ring` while it is free
    ring: Int[Array, " ring"]  # free list in LRU order between head and tail; -1 = tombstone
    head: Int[Array, ""]
    tail: Int[Array, ""]
    num_free: Int[Array, ""]  # blocks with ref 0 (cached-free blocks included, as in vLLM)
    num_cached_free: Int[Array, ""]  # blocks with ref 0 that carry a hash: a cached prefix
    # Prefix index: hash id -> (registration stamp << 32) | block, -1 for none. The stamp grows
    # with every registration, so a scatter-max keeps the newest block per hash even when one
    # hash is registered twice in the same step (the reference keeps the newest).
    hash_index: Int[Array, " hash"]
    num_registered: Int[Array, ""]  # registration stamp counter (int64)
    lower: Any = ()  # the state of the KV tier below this pool (engine/kvtier.py); () for none


def init_pool(num_blocks_cap: int, ring_cap: int, num_hashes: int, window: int, num_blocks,
              kv_tier: AbstractKVTier = NoLowerTier()) -> KVPool:
    """A pool of ``num_blocks`` (traced, <= num_blocks_cap) free blocks in id order."""
    ids = jnp.arange(num_blocks_cap, dtype=I32)
    ring = jnp.full(ring_cap + window, -1, I32)  # + window: dynamic_slice never clamps
    ring = ring.at[:num_blocks_cap].set(jnp.where(ids < num_blocks, ids, -1))
    return KVPool(
        ref=jnp.where(ids < num_blocks, 0, 1 << 30).astype(I32),  # blocks beyond capacity never free
        blk_hash=jnp.full(num_blocks_cap, -1, I32),
        ring_pos=ids,
        ring=ring,
        head=jnp.asarray(0, I32),
        tail=jnp.asarray(num_blocks, I32),
        num_free=jnp.asarray(num_blocks, I32),
        num_cached_free=jnp.asarray(0, I32),
        hash_index=jnp.full(max(num_hashes, 1), -1, jnp.int64),
        num_registered=jnp.asarray(0, jnp.int64),
        lower=kv_tier.init(num_hashes),
    )


def indexed_block(entry):
    """The block id of a prefix-index entry (meaningful where entry >= 0)."""
    return (entry & jnp.asarray(0xFFFFFFFF, jnp.int64)).astype(I32)


def pop_blocks(pool: KVPool, count, window: int, sink, sink_state, sink_consts=(),
               kv_tier: AbstractKVTier = NoLowerTier()):
    """Pop ``count`` blocks from the head of the free list (the least recently freed first).

    Popping a block that still carries a hash evicts it from the prefix index unless the index
    already points at a newer block with that hash. Blocks are handed, in order, to
    ``sink(sink_consts, sink_state, ids[window], first_k, n) -> sink_state`` window by window,
    where only the first ``n`` ids are valid (``n`` is 0 on a trip that pops nothing, and the
    sink must then change nothing) and ``first_k`` is the rank of ids[0] among all popped blocks.
    The caller checks ``count <= pool.num_free``; the count is clipped all the same so that the
    loop terminates on any input (under ``vmap`` it also runs for configurations that pop nothing).
    ``kv_tier`` sees every eviction (:meth:`jaxsim.engine.kvtier.AbstractKVTier.on_evict`).
    """
    n_blocks = pool.ref.shape[0]
    n_hash = pool.hash_index.shape[0]

    count = jnp.minimum(count, pool.num_free)

    def cond(consts, c):
        return (c[2] < consts[0]) & (c[0].head < c[0].tail)

    def body(consts, c):  # a no-op once done == count (nothing is taken, the head stays)
        count, sink_consts = consts
        pool, sink_state, done = c
        pos = pool.head + jnp.arange(window, dtype=I32)
        ids = jax.lax.dynamic_slice(pool.ring, (pool.head,), (window,))
        live = (ids >= 0) & (pos < pool.tail)
        rank = prefix_sum(live.astype(I32)) - 1
        take = live & (rank < count - done)
        n_take = jnp.sum(take.astype(I32), dtype=I32)
        # Compact the taken ids to the front of the window, in free-list order.
        packed = jnp.full(window, -1, I32).at[jnp.where(take, rank, window)].set(ids, mode="drop")
        valid = jnp.arange(window) < n_take
        safe = jnp.where(valid, packed, n_blocks)
        h = pool.blk_hash.at[safe].get(mode="fill", fill_value=-1)
        entry = pool.hash_index.at[jnp.maximum(h, 0)].get()
        still_indexed = valid & (h >= 0) & (entry >= 0) & (indexed_block(entry) == packed)
        hash_index = pool.hash_index.at[jnp.where(still_indexed, h, n_hash)].set(-1, mode="drop")
        ref = pool.ref.at[safe].set(1, mode="drop")
        # Written as a function of the values read (min(h, -1) is -1 since h >= -1), so that XLA
        # orders the gather first and updates in place: a constant -1 let it copy the whole array
        # twice per trip (2.3x slower sweeps).
        blk_hash = pool.blk_hash.at[safe].set(jnp.minimum(h, -1), mode="drop")
        n_cached = jnp.sum((valid & (h >= 0)).astype(I32), dtype=I32)
        lower = kv_tier.on_evict(pool.lower, h, still_indexed)
        # New head: just past the last taken entry (or past the whole window if more are needed).
        last = jnp.max(jnp.where(take, jnp.arange(window, dtype=I32), -1))
        need_more = n_take < count - done
        head = jnp.where(need_more, jnp.minimum(pool.head + window, pool.tail), pool.head + last + 1)
        pool = eqx.tree_at(
            lambda p: (p.ref, p.blk_hash, p.hash_index, p.head, p.num_free, p.num_cached_free),
            pool, (ref, blk_hash, hash_index, head, pool.num_free - n_take, pool.num_cached_free - n_cached))
        pool = dataclasses.replace(pool, lower=lower)  # (tree_at cannot replace an empty subtree)
        sink_state = sink(sink_consts, sink_state, packed, done, n_take)
        return pool, sink_state, done + n_take

    pool, sink_state, _ = masked_while_loop(cond, body, (pool, sink_state, jnp.asarray(0, I32)),
                                            (count, sink_consts))
    return pool, sink_state


def _compact(pool: KVPool, needed) -> KVPool:
    """Move the live free-list entries to the front of the buffer (keeps their order), when
    ``needed`` (otherwise the pool is returned unchanged, as ``masked_while_loop`` requires)."""
    n_blocks = pool.ref.shape[0]
    size = pool.ring.shape[0]
    idx = jnp.arange(size, dtype=I32)
    live = (idx >= pool.head) & (idx < pool.tail) & (pool.ring >= 0)
    new_pos = prefix_sum(live.astype(I32)) - 1
    ring = jnp.full(size, -1, I32).at[jnp.where(live, new_pos, size)].set(pool.ring, mode="drop")
    ring_pos = pool.ring_pos.at[jnp.where(live, pool.ring, n_blocks)].set(new_pos, mode="drop")
    n_live = jnp.sum(live.astype(I32), dtype=I32)
    new = (ring, ring_pos, jnp.asarray(0, I32), n_live)
    old = (pool.ring, pool.ring_pos, pool.head, pool.tail)
    return eqx.tree_at(lambda p: (p.ring, p.ring_pos, p.head, p.tail), pool,
                       tuple(jnp.where(needed, a, b) for a, b in zip(new, old)))


def release_blocks(pool: KVPool, blocks, nblk, ring_cap: int) -> KVPool:
    """Drop one reference to each of a request's first ``nblk`` blocks, last block first.

    Blocks whose count reaches 0 are appended to the free-list tail in that (reversed) order, so
    under pressure the end of a sequence is evicted before its shared prefix. Hashes are kept.
    """
    n_blocks = pool.ref.shape[0]
    mb = blocks.shape[0]
    rev = jnp.flip(blocks)  # last block first
    valid = jnp.flip(jnp.arange(mb) < nblk)
    safe = jnp.where(valid, rev, n_blocks)
    ref = pool.ref.at[safe].add(-1, mode="drop")
    freed = valid & (ref.at[safe].get(mode="fill", fill_value=1) == 0)
    n_freed = jnp.sum(freed.astype(I32), dtype=I32)
    hashed = freed & (pool.blk_hash.at[safe].get(mode="fill", fill_value=-1) >= 0)
    n_cached = jnp.sum(hashed.astype(I32), dtype=I32)
    # Rare path: compact the buffer when the appends would run past its end. A loop with at most
    # one trip costs nothing when not taken, even under vmap (unlike lax.cond).
    pool = eqx.tree_at(lambda p: p.ref, pool, ref)

    def overflows(n_freed, p):
        return p.tail + n_freed > ring_cap

    pool = masked_while_loop(overflows, lambda n, p: _compact(p, overflows(n, p)), pool, n_freed)
    slot = pool.tail + prefix_sum(freed.astype(I32)) - 1
    ring = pool.ring.at[jnp.where(freed, slot, pool.ring.shape[0])].set(rev, mode="drop")
    ring_pos = pool.ring_pos.at[jnp.where(freed, rev, n_blocks)].set(slot, mode="drop")
    return eqx.tree_at(lambda p: (p.ring, p.ring_pos, p.tail, p.num_free, p.num_cached_free), pool,
                       (ring, ring_pos, pool.tail + n_freed, pool.num_free + n_freed, pool.num_cached_free + n_cached))


def touch_blocks(pool: KVPool, blocks, mask) -> KVPool:
    """Take a reference on prefix-hit blocks; free ones leave the middle of the free list."""
    n_blocks = pool.ref.shape[0]
    safe = jnp.where(mask, blocks, n_blocks)
    old_ref = pool.ref.at[safe].get(mode="fill", fill_value=1)
    was_free = mask & (old_ref == 0)
    pos = pool.ring_pos.at[jnp.where(was_free, blocks, n_blocks)].get(mode="fill", fill_value=-1)
    ring = pool.ring.at[jnp.where(was_free, pos, pool.ring.shape[0])].set(-1, mode="drop")
    # Written from the values read (not `.add`), so that XLA orders the read first and updates
    # in place; an unordered read forces a copy of the whole array.
    ref = pool.ref.at[safe].set(old_ref + 1, mode="drop")
    cached = was_free & (pool.blk_hash.at[safe].get(mode="fill", fill_value=-1) >= 0)  # a hit: always
    return eqx.tree_at(lambda p: (p.ring, p.ref, p.num_free, p.num_cached_free), pool,
                       (ring, ref, pool.num_free - jnp.sum(was_free.astype(I32), dtype=I32),
                        pool.num_cached_free - jnp.sum(cached.astype(I32), dtype=I32)))


def register_blocks(pool: KVPool, blocks, hashes, mask, rank) -> KVPool:
    """Index full blocks under their hashes, in array order: when one hash appears twice, the
    later entry (the newest block) wins, as in the reference's one-block-per-hash index.
    ``rank``: each masked entry's position among the masked entries (0-based, in array order;
    the callers' masks are contiguous ranges, so this is an offset rather than a prefix sum)."""
    n_blocks = pool.ref.shape[0]
    n_hash = pool.hash_index.shape[0]
    stamp = pool.num_registered + 1 + rank.astype(jnp.int64)
    entry = (stamp << 32) | blocks.astype(jnp.int64)
    hash_index = pool.hash_index.at[jnp.where(mask, hashes, n_hash)].max(entry, mode="drop")
    blk_hash = pool.blk_hash.at[jnp.where(mask, blocks, n_blocks)].set(hashes, mode="drop")
    return eqx.tree_at(lambda p: (p.hash_index, p.blk_hash, p.num_registered), pool,
                       (hash_index, blk_hash, pool.num_registered + jnp.sum(mask.astype(jnp.int64))))


def lookup_prefix(pool: KVPool, hashes, limit):
    """Longest run of leading hashes (at most ``limit``) that are indexed: (count, their blocks)."""
    n = hashes.shape[0]
    entry = pool.hash_index.at[jnp.maximum(hashes, 0)].get()
    hit = (hashes >= 0) & (entry >= 0) & (jnp.arange(n) < limit)
    matched = leading_true(hit)
    return matched, jnp.where(jnp.arange(n) < matched, indexed_block(entry), -1)
