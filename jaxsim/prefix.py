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


def hash_ids(token_ids, block_size: int) -> tuple[list[np.ndarray], int]:
    """Per request, the dense ids (int32) of its full-block chain hashes; and the id count U.

    The same chains as :func:`block_hash_chain`, computed for all requests at once: the chain is
    sequential along a request, so the loop runs over block positions, each step for every
    request that has a block there (a Python loop over requests took ~0.2 s per 300-request trace).
    Memory is ragged, a few words per block of the trace: each request's token ids are read once
    (``token_ids`` may be a lazy sequence, :class:`jaxsim.traces.BlockTokenIds`) and reduced to one
    word per block, and the chains are computed in place (a dense requests x longest-request
    matrix took 17 GB for 200,000 Mooncake rows).
    """
    n = len(token_ids)
    lengths = np.array([0 if t is None else len(t) // block_size for t in token_ids], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat = np.zeros(int(offsets[-1]), np.uint64)  # block contents, then (in place) chain hashes
    pos = _mix64(np.arange(1, block_size + 1, dtype=np.uint64))
    for r in range(n):
        if lengths[r]:
            blocks = np.asarray(token_ids[r][: lengths[r] * block_size], np.int64).astype(np.uint64)
            with np.errstate(over="ignore"):
                flat[offsets[r]:offsets[r + 1]] = np.bitwise_xor.reduce(
                    _mix64(blocks.reshape(-1, block_size) + pos[None, :]), axis=1)
    # Requests by length, longest first: those with a block at position i are the first active[i].
    order = np.argsort(-lengths, kind="stable")
    starts = offsets[:-1][order]
    active = np.searchsorted(-lengths[order], -np.arange(1, int(lengths.max(initial=0)) + 1), side="right")
    h = np.full(n, _SEED, np.uint64)
    with np.errstate(over="ignore"):
        for i, m in enumerate(active):
            at = starts[:m] + i
            h[:m] = _mix64(h[:m] * np.uint64(31) + flat[at])
            flat[at] = h[:m]
    uniq, first, inverse = np.unique(flat, return_index=True, return_inverse=True)
    # Ids in order of first appearance in the trace (not of hash value): the requests in flight
    # at any time then use nearby ids, so the engine's per-id prefix index is accessed locally
    # (with a 100,000-request trace the index has millions of entries).
    rank = np.empty(len(uniq), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(uniq))
    ids = rank[inverse.reshape(-1)].astype(np.int32)
    return [ids[offsets[r]:offsets[r + 1]] for r in range(n)], int(len(uniq))
