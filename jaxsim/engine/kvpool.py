"""The paged KV block pool of one instance: a port of vLLM's ``BlockPool`` to fixed-shape arrays.

REFERENCE.md §1.3: the free list is doubly linked and LRU-ordered (allocation pops the head,
freeing appends to the tail, a prefix hit takes a block out of the middle); ref counts; a prefix
index from block hash to block. Here the free list is a linear buffer ``ring[head:tail]`` of block
ids in free order. Taking a block out of the middle leaves a tombstone (-1) that the head skips;
when appends reach the end of the buffer the live entries are compacted to the front (rare: the
buffer holds twice the block count). Every operation costs O(window) or O(blocks of one
request), never O(pool size), except compaction and the all-copies re-index below (both rare).

Hashes are dense integer ids (see ``jaxsim.prefix``), so the prefix index is a plain array.

Two index modes (``all_copies``, SchedulerConfig.prefix_index_all_copies; one mode per pool):

* newest only (the reference, LLMServingSim): one block per hash, the newest registration wins;
  evicting it removes the hash even if an older block still holds the same tokens.
* all copies (vLLM 0.19.0 ``vllm/v1/core/block_pool.py``, ``BlockHashToBlockMap``): a hash maps to
  every block registered under it; ``get_one_block`` returns the first inserted (oldest) copy
  still present, and popping a free block for reuse removes only that copy (``pop(hash,
  block_id)``), so the hash stays findable through another. Copies arise when two requests compute
  the same blocks at once (one admitted while the other still prefills the shared prefix) or when
  a chain broken by an eviction is recomputed. Here ``hash_index[h]`` holds the oldest live copy
  (its entry encoded so that the same scatter-max keeps the oldest), ``hash_copies[h]`` counts
  the live copies and ``blk_stamp`` orders them; when the indexed copy is evicted while others
  remain, the next oldest is found by a scan of the pool (rare: :func:`_reindex_oldest`).
"""


import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Int

from jaxsim.engine.loops import masked_while_loop
from jaxsim.engine.ops import leading_true, prefix_sum

I32 = jnp.int32
# Registration stamps stay below 2^31 (per instance and run), so either key of an index entry
# fits in its upper 32 bits and every entry is >= 0.
STAMP_LIMIT = 1 << 31


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
    # Prefix index: hash id -> (key << 32) | block, -1 for none, key = the registration stamp
    # (newest-only mode) or STAMP_LIMIT - stamp (all-copies mode). The stamp grows with every
    # registration, so a scatter-max keeps the newest (resp. oldest) block per hash, even when one
    # hash is registered twice in the same call.
    hash_index: Int[Array, " hash"]
    num_registered: Int[Array, ""]  # registration stamp counter (int64)
    # All-copies mode (also kept, unused, in newest-only mode): the stamp each block was
    # registered with (meaningful while blk_hash >= 0), and the live copies of each hash.
    blk_stamp: Int[Array, " block"]
    hash_copies: Int[Array, " hash"]


def init_pool(num_blocks_cap: int, ring_cap: int, num_hashes: int, window: int, num_blocks) -> KVPool:
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
        blk_stamp=jnp.zeros(num_blocks_cap, I32),
        hash_copies=jnp.zeros(max(num_hashes, 1), I32),
    )


def indexed_block(entry):
    """The block id of a prefix-index entry (meaningful where entry >= 0), in either mode."""
    return (entry & jnp.asarray(0xFFFFFFFF, jnp.int64)).astype(I32)


def _entry(stamp, block, all_copies):
    """The prefix-index entry of ``block`` registered with ``stamp``: the larger entry is the
    newer block (newest-only mode) or the older one (all-copies mode), for the scatter-max."""
    stamp = stamp.astype(jnp.int64)
    key = jnp.where(all_copies, STAMP_LIMIT - stamp, stamp)
    return (key << 32) | block.astype(jnp.int64)


def _reindex_oldest(hash_index, blk_hash, blk_stamp, h, todo):
    """Point ``hash_index[h[i]]`` at the oldest block still registered under it, for each ``i``
    with ``todo[i]`` (whose indexed copy was just evicted while other copies remain; distinct
    hashes). One hash per trip, each an O(blocks) scan: all-copies mode only, and rare (two live
    copies of a hash, the older one evicted first), so a loop that costs nothing when no
    configuration takes it, rather than a scan per eviction."""
    n_hash = hash_index.shape[0]
    lanes = jnp.arange(h.shape[0])

    def cond(_, c):
        return jnp.any(c[1])

    def body(consts, c):  # a no-op once todo is all False (masked_while_loop)
        blk_hash, blk_stamp, h = consts
        hash_index, todo = c
        lane = jnp.argmax(todo)
        hh = h[lane]
        stamps = jnp.where(blk_hash == hh, blk_stamp, STAMP_LIMIT - 1)
        b = jnp.argmin(stamps).astype(I32)  # stamps are distinct: the oldest copy
        # hash_index is only written in this loop (never read), so XLA updates it in place.
        hash_index = hash_index.at[jnp.where(todo[lane], hh, n_hash)].set(
            _entry(stamps[b], b, True), mode="drop")
        return hash_index, todo & (lanes != lane)

    return masked_while_loop(cond, body, (hash_index, todo), (blk_hash, blk_stamp, h))[0]


def pop_blocks(pool: KVPool, count, window: int, sink, sink_state, sink_consts=(), all_copies=False):
    """Pop ``count`` blocks from the head of the free list (the least recently freed first).

    Popping a block that still carries a hash evicts it from the prefix index. Newest-only mode:
    the hash leaves the index unless the index already points at a newer block with that hash.
    All-copies mode (``all_copies``, vLLM's ``BlockHashToBlockMap.pop(hash, block_id)``): only this
    copy leaves; if it was the indexed (oldest) one and others remain, the index moves to the
    oldest remaining copy. Blocks are handed, in order, to
    ``sink(sink_consts, sink_state, ids[window], first_k, n) -> sink_state`` window by window,
    where only the first ``n`` ids are valid (``n`` is 0 on a trip that pops nothing, and the
    sink must then change nothing) and ``first_k`` is the rank of ids[0] among all popped blocks.
    The caller checks ``count <= pool.num_free``; the count is clipped all the same so that the
    loop terminates on any input (under ``vmap`` it also runs for configurations that pop nothing).
    """
    n_blocks = pool.ref.shape[0]
    n_hash = pool.hash_index.shape[0]

    count = jnp.minimum(count, pool.num_free)

    def cond(consts, c):
        return (c[2] < consts[0]) & (c[0].head < c[0].tail)

    def body(consts, c):  # a no-op once done == count (nothing is taken, the head stays)
        count, sink_consts, all_copies = consts
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
        # Live copies of each popped block's hash once this window's copies are gone. The array
        # is read only after this scatter (never before it), so XLA updates it in place.
        hash_copies = pool.hash_copies.at[jnp.where(valid & (h >= 0), h, n_hash)].add(-1, mode="drop")
        reindex = all_copies & still_indexed & (hash_copies.at[jnp.maximum(h, 0)].get() > 0)
        gone = still_indexed & ~reindex  # the hash leaves the index
        hash_index = pool.hash_index.at[jnp.where(gone, h, n_hash)].set(-1, mode="drop")
        ref = pool.ref.at[safe].set(1, mode="drop")
        # Written as a function of the values read (min(h, -1) is -1 since h >= -1), so that XLA
        # orders the gather first and updates in place: a constant -1 let it copy the whole array
        # twice per trip (2.3x slower sweeps).
        blk_hash = pool.blk_hash.at[safe].set(jnp.minimum(h, -1), mode="drop")
        # After the popped copies lost their hash: they are not candidates.
        hash_index = _reindex_oldest(hash_index, blk_hash, pool.blk_stamp, h, reindex)
        n_cached = jnp.sum((valid & (h >= 0)).astype(I32), dtype=I32)
        # New head: just past the last taken entry (or past the whole window if more are needed).
        last = jnp.max(jnp.where(take, jnp.arange(window, dtype=I32), -1))
        need_more = n_take < count - done
        head = jnp.where(need_more, jnp.minimum(pool.head + window, pool.tail), pool.head + last + 1)
        pool = eqx.tree_at(
            lambda p: (p.ref, p.blk_hash, p.hash_index, p.hash_copies, p.head, p.num_free, p.num_cached_free),
            pool, (ref, blk_hash, hash_index, hash_copies, head, pool.num_free - n_take,
                   pool.num_cached_free - n_cached))
        sink_state = sink(sink_consts, sink_state, packed, done, n_take)
        return pool, sink_state, done + n_take

    pool, sink_state, _ = masked_while_loop(cond, body, (pool, sink_state, jnp.asarray(0, I32)),
                                            (count, sink_consts, jnp.asarray(all_copies)))
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


def register_blocks(pool: KVPool, blocks, hashes, mask, rank, all_copies=False) -> KVPool:
    """Index full blocks (not yet registered) under their hashes, in array order.

    Newest-only mode: when one hash appears twice, the later entry (the newest block) wins, as in
    the reference's one-block-per-hash index. All-copies mode (``all_copies``, vLLM's
    ``BlockHashToBlockMap.insert``): every block becomes a copy of its hash and the index keeps
    pointing at the oldest. ``rank``: each masked entry's position among the masked entries
    (0-based, in array order; the callers' masks are contiguous ranges, so this is an offset
    rather than a prefix sum)."""
    n_blocks = pool.ref.shape[0]
    n_hash = pool.hash_index.shape[0]
    stamp = pool.num_registered + 1 + rank.astype(jnp.int64)
    at_hash = jnp.where(mask, hashes, n_hash)
    at_block = jnp.where(mask, blocks, n_blocks)
    # None of these arrays is read here: the scatters update in place.
    hash_index = pool.hash_index.at[at_hash].max(_entry(stamp, blocks, all_copies), mode="drop")
    hash_copies = pool.hash_copies.at[at_hash].add(1, mode="drop")
    blk_hash = pool.blk_hash.at[at_block].set(hashes, mode="drop")
    blk_stamp = pool.blk_stamp.at[at_block].set(stamp.astype(I32), mode="drop")
    return eqx.tree_at(lambda p: (p.hash_index, p.hash_copies, p.blk_hash, p.blk_stamp, p.num_registered), pool,
                       (hash_index, hash_copies, blk_hash, blk_stamp,
                        pool.num_registered + jnp.sum(mask.astype(jnp.int64))))


def lookup_prefix(pool: KVPool, hashes, limit):
    """Longest run of leading hashes (at most ``limit``) that are indexed: (count, their blocks:
    the newest block of each hash, or in all-copies mode the oldest, vLLM's ``get_one_block``)."""
    n = hashes.shape[0]
    entry = pool.hash_index.at[jnp.maximum(hashes, 0)].get()
    hit = (hashes >= 0) & (entry >= 0) & (jnp.arange(n) < limit)
    matched = leading_true(hit)
    return matched, jnp.where(jnp.arange(n) < matched, indexed_block(entry), -1)
