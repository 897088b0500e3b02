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
    """Per request, the dense ids (int32) of its full-block chain hashes; and the id count U.

    The same chains as :func:`block_hash_chain`, computed for all requests at once: the chain is
    sequential along a request, so the loop runs over block positions, each step for every
    request that has a block there (a Python loop over requests took ~0.2 s per 300-request trace).
    """
    lengths = np.array([0 if t is None else len(t) // block_size for t in token_ids], np.int64)
    n_max = int(lengths.max()) if len(lengths) else 0
    content = np.zeros((len(token_ids), n_max), np.uint64)
    pos = _mix64(np.arange(1, block_size + 1, dtype=np.uint64))
    for r, t in enumerate(token_ids):
        if lengths[r]:
            blocks = np.asarray(t[: lengths[r] * block_size], np.int64).astype(np.uint64)
            with np.errstate(over="ignore"):
                content[r, : lengths[r]] = np.bitwise_xor.reduce(
                    _mix64(blocks.reshape(-1, block_size) + pos[None, :]), axis=1)
    chains = np.zeros_like(content)
    h = np.full(len(token_ids), _SEED, np.uint64)
    with np.errstate(over="ignore"):
        for i in range(n_max):
            h = _mix64(h * np.uint64(31) + content[:, i])
            chains[:, i] = h
    valid = np.arange(n_max)[None, :] < lengths[:, None]
    uniq, first, inverse = np.unique(chains[valid], return_index=True, return_inverse=True)
    # Ids in order of first appearance in the trace (not of hash value): the requests in flight
    # at any time then use nearby ids, so the engine's per-id prefix index is accessed locally
    # (with a 100,000-request trace the index has millions of entries).
    rank = np.empty(len(uniq), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(uniq))
    ids = np.full(chains.shape, -1, np.int64)
    ids[valid] = rank[inverse]
    return [ids[r, : lengths[r]].astype(np.int32) for r in range(len(token_ids))], int(len(uniq))
