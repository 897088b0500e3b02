"""Host-side prefix-cache keys (REFERENCE.md §1.4).

vLLM hashes every *full* block of a request's token sequence with a chain,
``h_0 = H(seed, tokens[0:bs])``, ``h_i = H(h_{i-1}, tokens[i*bs:(i+1)*bs])``, so one hash names a
whole prefix. The engine never needs the hash values themselves, only whether two blocks carry the
same one, so we compute 64-bit chain hashes with numpy on the host and replace them by dense
integer ids ``0..U-1``: a per-hash table of size U then serves as the cache index in JAX.
"""

import numpy as np

_SEED = np.uint64(0x9E3779B97F4A7C15)  # fixed chain seed: results are reproducible run to run
_MIX = np.uint64(0xBF58476D1CE4E5B9)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a cheap, well-spread 64-bit permutation (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * _MIX
        x = x ^ (x >> np.uint64(27))
        x = x * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def block_hash_chain(token_ids: np.ndarray | None, block_size: int) -> np.ndarray:
    """uint64 chain hashes of the full blocks of one token sequence (empty if no ids)."""
    if token_ids is None:
        return np.zeros(0, np.uint64)
    n_full = len(token_ids) // block_size
    if n_full == 0:
        return np.zeros(0, np.uint64)
    blocks = np.asarray(token_ids[: n_full * block_size], np.int64).astype(np.uint64).reshape(n_full, block_size)
    # A position-dependent mix of the block's tokens, then chained through the previous hash.
    with np.errstate(over="ignore"):
        pos = _mix64(np.arange(1, block_size + 1, dtype=np.uint64))
        content = np.bitwise_xor.reduce(_mix64(blocks + pos[None, :]), axis=1)
        out = np.empty(n_full, np.uint64)
        h = _SEED
        for i in range(n_full):
            h = _mix64(h * np.uint64(31) + content[i])
            out[i] = h
    return out


def hash_ids(token_ids: list, block_size: int) -> tuple[list[np.ndarray], int]:
    """Per request, the dense ids (int32) of its full-block chain hashes; and the id count U."""
    chains = [block_hash_chain(t, block_size) for t in token_ids]
    lengths = [len(c) for c in chains]
    flat = np.concatenate(chains) if chains and sum(lengths) else np.zeros(0, np.uint64)
    uniq, inverse = np.unique(flat, return_inverse=True)
    splits = np.cumsum(lengths)[:-1]
    return [a.astype(np.int32) for a in np.split(inverse, splits)], int(len(uniq))
