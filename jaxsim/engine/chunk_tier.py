"""An LMCache-style KV tier: LRU pools of fixed-size chunks in CPU or CXL memory (REFERENCE.md §1.5).

A chunk is ``chunk_blocks`` consecutive GPU blocks of one request's token sequence (LMCache's
256 tokens: 16 blocks of 16). Its key is the prefix hash of its last block, which identifies the
whole prefix before it (the hash chain is cumulative), so requests with a common prefix share
chunks: ``WorkloadArrays.chunks[r, j]`` is the dense id of request r's j-th chunk key (computed on
the host, :func:`jaxsim.planning.chunk_ids`).

State (:class:`ChunkPools`): per pool and chunk id, when it became resident (``NEVER``: absent)
and when it was last used (the LRU key); per pool its capacity (chunks), bandwidth, latency and
when its channel is next free. The arrays are indexed by chunk id, so a pool can never overflow
its state: the capacity is enforced by evicting the least recently used chunks (:meth:`settle`).

* **Write-through, inclusive** (the reference's and LMCache's store): every chunk the GPU blocks of
  a request cover once they are indexed is copied down; writing a resident chunk refreshes its
  LRU age. It costs no latency (it overlaps compute; REFERENCE.md §1.5). A chunk becomes visible
  to lookups at the end of the iteration that computes it.
* **Lookup**: after the GPU hits, the consecutive resident chunks from the one holding the first
  missing block, up to the lookup limit (``(reached - 1) // block_size`` blocks: one token is
  always computed, and the GPU and tier hits are capped together; §1.16). ``min_gain_chunk``:
  use a hit only if it gains a whole chunk (the reference) rather than one block (vLLM + LMCache).
* **Recall**: ``latency + bytes / bandwidth`` of the pool that served the hit, whole chunks read
  (the one straddling the GPU-hit boundary included), before the batch's first layer; the recalls
  of one pool are served one after the other (its bandwidth is shared).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxsim.engine.kvtier import AbstractKVTier

I32 = jnp.int32
I64 = jnp.int64
NEVER = jnp.iinfo(jnp.int64).max


class ChunkPools(eqx.Module):
    """The pools of a :class:`ChunkTier` ([P] per pool, [P, C] per pool and chunk id)."""

    written_at: Int[Array, "P C"]  # ns the chunk became resident (NEVER: not resident)
    last_use: Int[Array, "P C"]  # ns of its last write or hit (the LRU key)
    capacity: Int[Array, " P"]  # chunks the pool holds
    bw: Float[Array, " P"]  # recall bandwidth, bytes/ns (= GB/s)
    latency: Int[Array, " P"]  # ns per recall
    free_at: Int[Array, " P"]  # when the pool's channel is next free, ns
    resident: Int[Array, " P"]  # chunks held (after the last settle)
    written: Int[Array, " P"]  # chunks copied down since the start (cumulative)
    evicted: Int[Array, " P"]  # chunks evicted since the start (cumulative)


def init_pools(num_chunks: int, capacity, bw, latency) -> ChunkPools:
    """Empty pools: ``capacity`` (chunks), ``bw`` (bytes/ns), ``latency`` (ns) are [P] arrays;
    ``num_chunks``: distinct chunk keys of the trace (the state's width)."""
    capacity = jnp.asarray(capacity, I32)
    p = capacity.shape[0]
    z = jnp.zeros(p, I64)
    return ChunkPools(written_at=jnp.full((p, max(num_chunks, 1)), NEVER, I64),
                      last_use=jnp.zeros((p, max(num_chunks, 1)), I64), capacity=capacity,
                      bw=jnp.asarray(bw, jnp.float64), latency=jnp.asarray(latency, I64), free_at=z,
                      resident=jnp.zeros(p, I32), written=z, evicted=z)


class ChunkTier(AbstractKVTier):
    """LRU chunk pools below the GPU (see the module docstring). Static: hashable."""

    chunk_blocks: int = eqx.field(static=True)  # GPU blocks per chunk
    min_gain_chunk: bool = eqx.field(static=True, default=False)
    evict_window: int = eqx.field(static=True, default=64)  # chunks evicted per pool per loop trip

    enabled = True

    def lookup(self, state: ChunkPools, pool, chunks, matched, limit, now):
        f = self.chunk_blocks
        mc = chunks.shape[0]
        j = jnp.arange(mc, dtype=I32)
        start = matched // f  # the chunk holding the first block the GPU missed
        held = (chunks >= 0) & (state.written_at[pool, jnp.maximum(chunks, 0)] <= now) & (j * f < limit)
        end = jnp.min(jnp.where((j >= start) & ~held, j, mc)).astype(I32)  # first chunk missing from start
        gained = jnp.maximum(jnp.minimum(end * f, limit) - matched, 0)
        use = gained >= (f if self.min_gain_chunk else 1)
        return jnp.where(use, gained, 0).astype(I32), jnp.where(use, end - start, 0).astype(I32)

    def write(self, state: ChunkPools, pool, chunk, valid, now):
        p = jnp.where(valid, pool, state.capacity.shape[0])  # out of range: dropped
        c = jnp.maximum(chunk, 0)
        return eqx.tree_at(lambda s: (s.written_at, s.last_use), state,
                           (state.written_at.at[p, c].min(now, mode="drop"),
                            state.last_use.at[p, c].max(now, mode="drop")))

    def settle(self, state: ChunkPools) -> ChunkPools:
        resident = jnp.sum((state.written_at < NEVER).astype(I32), axis=1, dtype=I32)
        written = state.written + (resident - state.resident)  # chunks new since the last settle
        state = eqx.tree_at(lambda s: (s.resident, s.written), state, (resident, written))
        n_pools, n_chunks = state.written_at.shape
        k = min(self.evict_window, n_chunks)
        rows = jnp.arange(n_pools)[:, None]

        def over(st):
            return jnp.any(st.resident > st.capacity)

        def evict(st):  # the least recently used first; ties in chunk-id order (insertion order)
            present = st.written_at < NEVER
            _, idx = jax.lax.top_k(jnp.where(present, -st.last_use, -NEVER), k)  # [P, k]
            excess = jnp.maximum(st.resident - st.capacity, 0)
            out = (jnp.arange(k)[None, :] < excess[:, None]) & present[rows, idx]
            n = jnp.sum(out.astype(I32), axis=1, dtype=I32)
            wa = st.written_at.at[rows, jnp.where(out, idx, n_chunks)].max(NEVER, mode="drop")
            return eqx.tree_at(lambda s: (s.written_at, s.resident, s.evicted), st,
                               (wa, st.resident - n, st.evicted + n))

        return jax.lax.while_loop(over, evict, state)

    def recall(self, state: ChunkPools, pool, chunks, chunk_bytes, now, start):
        n_pools = state.capacity.shape[0]
        go = start & (chunks > 0)
        nbytes = jnp.where(go, chunks.astype(I64) * chunk_bytes, 0).astype(jnp.float64)
        mine = (pool[:, None] == jnp.arange(n_pools)[None, :]) & go[:, None]  # [inst, P]
        # Recalls of one pool in this step are served in instance order: each waits for the earlier.
        queued = jnp.cumsum(jnp.where(mine, nbytes[:, None], 0.0), axis=0)[jnp.arange(pool.shape[0]), pool]
        begin = jnp.maximum(now, state.free_at[pool])
        end = begin + state.latency[pool] + jnp.ceil(queued / state.bw[pool]).astype(I64)
        free_at = state.free_at.at[jnp.where(go, pool, n_pools)].max(end, mode="drop")
        return jnp.where(go, end - now, 0), eqx.tree_at(lambda s: s.free_at, state, free_at)

    def pool_stats(self, state: ChunkPools, pool):
        return state.resident[pool], state.written[pool]
