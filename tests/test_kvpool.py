"""The paged KV block pool on its own (jaxsim/engine/kvpool.py): hand-computed cases on a tiny
pool, then a random sequence of operations against a plain-Python model of vLLM's BlockPool, in
both prefix-index modes (newest block per hash, as the reference; every copy, as vLLM).

Every case uses one pool shape (8 blocks, pop window 4, the simulator's ring capacity
2 * blocks + window, 8 hash ids) and one padded argument length, so each operation compiles once.
"""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsim.engine import kvpool

I32 = jnp.int32
N = 8  # blocks (capacity)
W = 4  # pop window
RING = 2 * N + W  # free-list buffer, as simulator.Dims.ring_cap
H = 8  # hash ids 0..7
NEVER_FREE = 1 << 30  # ref count of the blocks beyond a pool's size


# ----------------------------------------------------------------------------- jitted operations
@jax.jit
def _init(num_blocks):
    return kvpool.init_pool(N, RING, H, W, num_blocks)


def _collect(_, out, ids, first_k, n):
    """pop_blocks sink: popped ids land at out[first_k:first_k + n]."""
    pos = jnp.where(jnp.arange(W) < n, first_k + jnp.arange(W, dtype=I32), N)
    return out.at[pos].set(ids, mode="drop")


@jax.jit
def _pop(pool, count, all_copies=False):
    return kvpool.pop_blocks(pool, count, W, _collect, jnp.full(N, -1, I32), all_copies=all_copies)


_release = jax.jit(kvpool.release_blocks, static_argnames="ring_cap")
_touch = jax.jit(kvpool.touch_blocks)
_register = jax.jit(kvpool.register_blocks)
_lookup = jax.jit(kvpool.lookup_prefix)


def _pad(values, fill=0):
    assert len(values) <= N
    return jnp.asarray(list(values) + [fill] * (N - len(values)), I32)


def init(num_blocks=N):
    return _init(num_blocks)


def pop(pool, count, all_copies=False):
    """(pool, the popped block ids in order)."""
    before = int(pool.num_free)
    pool, out = _pop(pool, count, all_copies)
    return pool, np.asarray(out)[:before - int(pool.num_free)].tolist()


def release(pool, blocks):
    return _release(pool, _pad(blocks), len(blocks), ring_cap=RING)


def touch(pool, blocks):
    return _touch(pool, _pad(blocks), jnp.arange(N) < len(blocks))


def register(pool, blocks, hashes, all_copies=False):
    return _register(pool, _pad(blocks), _pad(hashes), jnp.arange(N) < len(blocks), jnp.arange(N, dtype=I32),
                     all_copies)


def lookup(pool, hashes, limit=None):
    """(matched count, the matched blocks); the entries after the match are -1."""
    matched, blocks = _lookup(pool, _pad(hashes, -1), len(hashes) if limit is None else limit)
    matched, blocks = int(matched), np.asarray(blocks).tolist()
    assert blocks[matched:] == [-1] * (N - matched)
    return matched, blocks[:matched]


def free_list(pool):
    """The free blocks in LRU order (tombstones skipped)."""
    p = jax.device_get(pool)
    return [int(b) for b in p.ring[int(p.head):int(p.tail)] if b >= 0]


def index(pool):
    """{hash id: block} of the prefix index."""
    entries = np.asarray(pool.hash_index)
    blocks = np.asarray(kvpool.indexed_block(pool.hash_index))
    return {h: int(blocks[h]) for h in range(H) if entries[h] >= 0}


def refs(pool):
    return np.asarray(pool.ref).tolist()


# ------------------------------------------------------------------------------ hand-computed
def test_init_frees_the_first_blocks_in_id_order():
    pool = init(6)
    assert free_list(pool) == [0, 1, 2, 3, 4, 5]
    assert int(pool.num_free) == 6 and (int(pool.head), int(pool.tail)) == (0, 6)
    assert refs(pool) == [0] * 6 + [NEVER_FREE] * 2  # blocks beyond the pool's size are never free
    assert pool.ring.shape == (RING + W,) and index(pool) == {}
    pool, got = pop(pool, 8)  # clipped to the free count: the beyond-size blocks never come out
    assert got == [0, 1, 2, 3, 4, 5] and int(pool.num_free) == 0


def test_pop_takes_the_head_in_free_list_order():
    pool = init()
    pool, a = pop(pool, 3)
    assert a == [0, 1, 2]
    assert int(pool.num_free) == 5 and free_list(pool) == [3, 4, 5, 6, 7]
    assert refs(pool) == [1, 1, 1, 0, 0, 0, 0, 0]
    pool, b = pop(pool, 5)  # two windows of 4
    assert b == [3, 4, 5, 6, 7] and int(pool.num_free) == 0 and free_list(pool) == []
    pool, c = pop(pool, 0)
    assert c == [] and int(pool.head) == int(pool.tail) == 8


def test_release_appends_to_the_tail_last_block_first():
    pool, _ = pop(init(), 8)
    pool = release(pool, [2, 5, 1])  # a request's blocks: its last block is freed first
    assert free_list(pool) == [1, 5, 2] and int(pool.num_free) == 3
    pool = release(pool, [0, 3])
    assert free_list(pool) == [1, 5, 2, 3, 0] and int(pool.num_free) == 5
    pool = _release(pool, _pad([4, 6, 7]), 2, ring_cap=RING)  # only the first nblk = 2 blocks
    assert free_list(pool) == [1, 5, 2, 3, 0, 6, 4] and refs(pool)[7] == 1
    pool, got = pop(pool, 2)  # least recently freed first
    assert got == [1, 5] and free_list(pool) == [2, 3, 0, 6, 4] and int(pool.num_free) == 5


def test_touch_takes_a_free_block_out_of_the_middle():
    pool, _ = pop(init(), 4)
    pool = release(pool, [0, 1, 2, 3])
    assert free_list(pool) == [4, 5, 6, 7, 3, 2, 1, 0]
    pool = touch(pool, [6, 2])  # prefix hits on two free (cached) blocks
    assert free_list(pool) == [4, 5, 7, 3, 1, 0] and int(pool.num_free) == 6
    ring = np.asarray(pool.ring)
    assert ring[6] == -1 and ring[9] == -1  # tombstones where 6 and 2 were; the head skips them
    assert refs(pool) == [0, 0, 1, 0, 0, 0, 1, 0]
    pool, got = pop(pool, 5)
    assert got == [4, 5, 7, 3, 1] and free_list(pool) == [0] and int(pool.num_free) == 1


def test_ref_counts_of_a_shared_block():
    pool, a = pop(init(), 2)
    pool = touch(pool, [0])  # a second request hits block 0 while it is in use
    assert refs(pool)[:2] == [2, 1] and int(pool.num_free) == 6
    pool = release(pool, a)  # the first request ends: block 0 is still held
    assert refs(pool)[:2] == [1, 0] and free_list(pool) == [2, 3, 4, 5, 6, 7, 1]
    pool = release(pool, [0])
    assert refs(pool)[:2] == [0, 0] and free_list(pool) == [2, 3, 4, 5, 6, 7, 1, 0]
    assert int(pool.num_free) == 8


def test_register_then_lookup_stops_at_the_first_miss():
    pool, _ = pop(init(), 4)
    pool = register(pool, [0, 1, 2], [3, 5, 7])
    assert index(pool) == {3: 0, 5: 1, 7: 2}
    assert np.asarray(pool.blk_hash).tolist() == [3, 5, 7, -1, -1, -1, -1, -1]
    assert int(pool.num_registered) == 3
    assert lookup(pool, [3, 5, 7]) == (3, [0, 1, 2])
    assert lookup(pool, [3, 4, 7]) == (1, [0])  # 7 is indexed but comes after the miss
    assert lookup(pool, [4, 3]) == (0, [])
    assert lookup(pool, [3, 5, 7], limit=2) == (2, [0, 1])
    assert lookup(pool, [3, 5, 7], limit=0) == (0, [])
    assert lookup(pool, [3, -1, 7]) == (1, [0])  # -1: no hash (a partial block)
    assert lookup(pool, [5, 3]) == (2, [1, 0])


def test_evicting_a_cached_block_removes_its_index_entry():
    pool, _ = pop(init(), 3)
    pool = register(pool, [0, 1, 2], [3, 5, 7])
    pool = release(pool, [0, 1, 2])
    assert free_list(pool) == [3, 4, 5, 6, 7, 2, 1, 0]
    assert lookup(pool, [3, 5, 7]) == (3, [0, 1, 2])  # free, still cached
    pool, got = pop(pool, 6)  # reaches block 2 (hash 7)
    assert got == [3, 4, 5, 6, 7, 2]
    assert index(pool) == {3: 0, 5: 1}
    assert lookup(pool, [7]) == (0, [])
    assert lookup(pool, [3, 5, 7]) == (2, [0, 1])
    pool, got = pop(pool, 1)  # block 1 (hash 5): the chain now stops after its first block
    assert got == [1] and lookup(pool, [3, 5, 7]) == (1, [0])


def test_registering_a_hash_twice_keeps_the_newest_block():
    pool, _ = pop(init(), 4)
    pool = register(pool, [0], [4])
    pool = register(pool, [1], [4])
    assert lookup(pool, [4]) == (1, [1])
    pool = register(pool, [2, 3], [6, 6])  # twice in one call: the later entry wins
    assert lookup(pool, [6]) == (1, [3])
    assert index(pool) == {4: 1, 6: 3}
    # Evicting the older block of a hash leaves the newer one indexed.
    pool = release(pool, [0])
    pool = release(pool, [2])
    assert free_list(pool) == [4, 5, 6, 7, 0, 2]
    pool, got = pop(pool, 6)
    assert got == [4, 5, 6, 7, 0, 2] and index(pool) == {4: 1, 6: 3}
    # Evicting the newer one removes the entry.
    pool = release(pool, [1, 3])
    pool, got = pop(pool, 2)
    assert got == [3, 1] and index(pool) == {}


def cached_free(pool):
    return int(pool.num_cached_free)


def test_all_copies_lookup_finds_the_oldest_and_eviction_keeps_the_others():
    """vLLM 0.19.0's BlockHashToBlockMap: every block registered under a hash is a copy, a lookup
    returns the oldest copy still present, and evicting one copy leaves the hash findable."""
    pool, _ = pop(init(), 4)  # blocks 0-3 held; free list 4-7
    pool = register(pool, [2], [5], True)  # the oldest copy of hash 5
    pool = register(pool, [0, 3], [5, 5], True)  # two more in one call: 0 before 3
    assert lookup(pool, [5]) == (1, [2])
    assert np.asarray(pool.hash_copies)[5] == 3 and cached_free(pool) == 0
    pool = release(release(pool, [2]), [3])
    assert free_list(pool) == [4, 5, 6, 7, 2, 3] and cached_free(pool) == 2
    pool, got = pop(pool, 5, True)  # evicts block 2, the indexed copy: the next oldest is 0
    assert got == [4, 5, 6, 7, 2]
    assert lookup(pool, [5]) == (1, [0]) and cached_free(pool) == 1
    pool, got = pop(pool, 1, True)  # evicts block 3, not the indexed copy
    assert got == [3] and lookup(pool, [5]) == (1, [0]) and cached_free(pool) == 0
    pool = release(pool, [0])
    assert cached_free(pool) == 1 and lookup(pool, [5]) == (1, [0])  # free, still cached
    pool, got = pop(pool, 1, True)  # the last copy: a miss from now on
    assert got == [0] and lookup(pool, [5]) == (0, []) and index(pool) == {}
    assert cached_free(pool) == 0 and not np.asarray(pool.hash_copies).any()


def test_all_copies_evicting_two_copies_in_one_window_finds_the_third():
    pool, _ = pop(init(), 3)
    pool = register(pool, [0, 1, 2], [6, 6, 6], True)
    pool = release(pool, [1, 0])  # free list 3-7, 0, 1: 0 and 1 come out in the same pop window
    pool, got = pop(pool, 7, True)
    assert got == [3, 4, 5, 6, 7, 0, 1] and lookup(pool, [6]) == (1, [2]) and cached_free(pool) == 0
    # the newest-only index (the reference) points at block 2 all along
    pool, _ = pop(init(), 3)
    pool = register(pool, [0, 1, 2], [6, 6, 6])
    assert lookup(pool, [6]) == (1, [2])
    pool, got = pop(release(pool, [2]), 6)  # evicting it drops the hash though 0 and 1 hold it
    assert got[-1] == 2 and lookup(pool, [6]) == (0, [])


def test_ring_compaction_keeps_the_free_order():
    pool, _ = pop(init(), 8)  # head = tail = 8
    pool = release(pool, [7, 6, 5, 4, 3, 2, 1, 0])  # appended 0..7 at 8..15
    pool, got = pop(pool, 8)
    assert got == list(range(8)) and (int(pool.head), int(pool.tail)) == (16, 16)
    pool = release(pool, [3, 2, 1, 0])  # tail 16 + 4 = RING: fits, no compaction
    assert (int(pool.head), int(pool.tail)) == (16, RING)
    pool = touch(pool, [1])  # a tombstone at 17
    pool = release(pool, [7, 6, 5, 4])  # 20 + 4 > RING: compact [0, -, 2, 3] to the front first
    assert (int(pool.head), int(pool.tail)) == (0, 7)
    assert np.asarray(pool.ring)[:7].tolist() == [0, 2, 3, 4, 5, 6, 7]
    assert free_list(pool) == [0, 2, 3, 4, 5, 6, 7] and int(pool.num_free) == 7
    pos = np.asarray(pool.ring_pos)
    assert [int(pos[b]) for b in free_list(pool)] == list(range(7))  # positions moved with them
    pool = touch(pool, [5])  # uses the new position
    assert free_list(pool) == [0, 2, 3, 4, 6, 7] and np.asarray(pool.ring)[4] == -1
    pool, got = pop(pool, 6)
    assert got == [0, 2, 3, 4, 6, 7] and int(pool.num_free) == 0


def test_batched_pop_equals_single_pops():
    """Under vmap, pop_blocks' loop runs until every pool is done (masked_while_loop), so each trip
    must change nothing in a pool that pops fewer blocks, or none: each ends as it would alone."""
    a, _ = pop(init(), 6)
    a = touch(release(a, [5, 0, 3]), [0])  # free list 6, 7, 3, (tombstone), 5: two trips for 4
    b = init(5)
    c, _ = pop(init(), 3)  # all copies: evicting block 0, the oldest copy of hash 2, re-indexes it
    c = release(register(c, [0, 1, 2], [2, 2, 3], True), [0])
    pools, counts, modes = [a, b, b, c], [4, 1, 0, 6], [False, False, False, True]
    got, out = jax.jit(jax.vmap(_pop))(jax.tree.map(lambda *x: jnp.stack(x), *pools), jnp.asarray(counts, I32),
                                       jnp.asarray(modes))
    assert lookup(jax.tree.map(lambda x: x[3], got), [2]) == (1, [1])
    for i, (pool, count) in enumerate(zip(pools, counts)):
        want, want_out = _pop(pool, count, modes[i])
        for x, y in zip(jax.tree.leaves(jax.tree.map(lambda x: x[i], got)), jax.tree.leaves(want)):
            np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(out[i], want_out)
    assert np.asarray(out[0])[:4].tolist() == [6, 7, 3, 5] and np.asarray(out[2]).tolist() == [-1] * N


# ----------------------------------------------------------------- random operations vs a model
class VllmBlockPool:
    """vLLM's BlockPool in plain Python (as tests/reference_sim.py): an LRU free queue (pop the
    head, append at the tail, remove from the middle), ref counts, one indexed block per hash
    (the newest) or with ``all_copies`` every copy in insertion order, the oldest found; a
    block's hash is dropped when it is popped."""

    def __init__(self, num_blocks, all_copies=False):
        self.free = collections.deque(range(num_blocks))
        self.ref = [0] * num_blocks + [NEVER_FREE] * (N - num_blocks)
        self.hash = [None] * N
        self.all_copies = all_copies
        self.copies = collections.defaultdict(list)  # hash -> its blocks, oldest first

    @property
    def index(self):
        return {h: (c[0] if self.all_copies else c[-1]) for h, c in self.copies.items() if c}

    def pop(self, count):
        out = [self.free.popleft() for _ in range(count)]
        for b in out:
            h = self.hash[b]
            copies = self.copies[h] if h is not None else []
            if b in copies:  # (newest-only: a cleared entry forgot its older blocks)
                if self.all_copies or copies[-1] != b:
                    copies.remove(b)
                else:  # the indexed (newest) block: the older ones are not findable either
                    copies.clear()
            self.hash[b] = None
            self.ref[b] = 1
        return out

    def touch(self, blocks):
        for b in blocks:
            if self.ref[b] == 0:
                self.free.remove(b)
            self.ref[b] += 1

    def release(self, blocks):
        for b in blocks:
            self.ref[b] -= 1
        self.free.extend(b for b in reversed(blocks) if self.ref[b] == 0)

    def register(self, blocks, hashes):
        for b, h in zip(blocks, hashes):
            self.hash[b] = h
            self.copies[h].append(b)

    def lookup(self, hashes, limit):
        out, index = [], self.index
        for h in hashes[:limit]:
            if h not in index:
                break
            out.append(index[h])
        return out


def _check(pool, model):
    p = jax.device_get(pool)
    assert free_list(p) == list(model.free)
    assert int(p.num_free) == len(model.free) == sum(r == 0 for r in model.ref)
    assert p.ref.tolist() == model.ref
    assert index(p) == model.index
    assert int(p.num_cached_free) == sum(model.hash[b] is not None for b in model.free)
    for b in model.free:  # each free block knows its slot in the ring
        assert p.ring[p.ring_pos[b]] == b
    assert 0 <= p.head <= p.tail <= RING


@pytest.mark.parametrize("num_blocks, seed, all_copies", [(8, 0, False), (8, 1, False), (6, 2, False),
                                                         (8, 3, True), (6, 4, True)])
def test_random_operations_match_the_vllm_model(num_blocks, seed, all_copies):
    rng = np.random.default_rng(seed)
    pool, model = init(num_blocks), VllmBlockPool(num_blocks, all_copies)
    held = []  # the block lists of live requests, one reference on each block
    compactions = 0
    for _ in range(300):
        op = rng.choice(["alloc", "hit", "release", "register"], p=[0.3, 0.25, 0.3, 0.15])
        if op == "alloc":
            count = int(rng.integers(0, min(len(model.free), 4) + 1))
            pool, got = pop(pool, count, all_copies)
            assert got == model.pop(count)
            held += [got] if got else []
        elif op == "hit":  # a prefix lookup (distinct hashes, as a hash chain) and a hit on the matched blocks
            hashes = rng.choice(H, size=int(rng.integers(1, 5)), replace=False).tolist()
            limit = int(rng.integers(0, len(hashes) + 1))
            matched, blocks = lookup(pool, hashes, limit)
            assert blocks == model.lookup(hashes, limit) and matched == len(blocks)
            pool = touch(pool, blocks)
            model.touch(blocks)
            held += [blocks] if blocks else []
        elif op == "release" and held:
            blocks = held.pop(int(rng.integers(len(held))))
            tail = int(pool.tail)
            pool = release(pool, blocks)
            model.release(blocks)
            compactions += int(pool.tail) < tail
        elif op == "register":  # allocated blocks not yet cached, some hashes shared
            fresh = [b for b in range(N) if 0 < model.ref[b] < NEVER_FREE and model.hash[b] is None]
            blocks = rng.permutation(fresh)[:3].tolist()
            hashes = rng.integers(0, H, len(blocks)).tolist()
            pool = register(pool, blocks, hashes, all_copies)
            model.register(blocks, hashes)
        _check(pool, model)
    assert compactions > 0  # the ring wrapped at least once
