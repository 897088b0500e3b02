"""Prefix-cache keys: the vectorised ``hash_ids`` against the per-request chain."""

import numpy as np

from jaxsim.prefix import block_hash_chain, hash_ids


def test_hash_ids_match_per_request_chains():
    rng = np.random.default_rng(0)
    shared = list(rng.integers(0, 50_000, 40))
    seqs = [shared + list(rng.integers(0, 50_000, n)) for n in (0, 3, 17, 50)] + [None, list(rng.integers(0, 9, 5))]
    ids, count = hash_ids(seqs, 16)
    chains = [block_hash_chain(s, 16) for s in seqs]
    assert [len(i) for i in ids] == [len(c) for c in chains] == [2, 2, 3, 5, 0, 0]
    flat = np.concatenate(chains)
    assert count == len(np.unique(flat))
    # Same hash <=> same id, across requests.
    by_hash = {}
    for i, c in zip(ids, chains):
        for a, h in zip(i, c):
            assert by_hash.setdefault(int(h), int(a)) == int(a)
    assert len(set(by_hash.values())) == count
    # The 40 shared tokens fill 2 full blocks: every request with them starts with the same 2 ids.
    assert all(list(i[:2]) == list(ids[0][:2]) for i in ids[:4])
    assert ids[2][2] != ids[3][2]
