"""Contracts of the engine's declared interfaces: the latency model (``latency.base``), the
run status (``engine.status``), the per-iteration meters (``engine.meters``) and the static
feature set (``engine.static``)."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from _shared import PROFILES
from jaxsim import simulator
from jaxsim.engine import meters
from jaxsim.engine.kvtier import AbstractKVTier
from jaxsim.engine.static import Static
from jaxsim.engine.status import Status, run_status
from jaxsim.latency import AbstractLatencyModel, BatchShape, LatencyTables, iteration_time
from jaxsim.spec import HardwareConfig, SchedulerConfig


def _shape(T, S, pc, kp, nd, kvd_sum, kvd_min, kvd_max):
    return BatchShape(*(jnp.asarray(x, jnp.int32) for x in (T, S, pc, kp, nd, kvd_sum, kvd_min, kvd_max)))


def test_latency_model_contract(sharegpt16, llama):
    """The profile tables implement the interface: the method equals the traced function, the
    pipeline stages sum to the iteration, and a model must implement both methods."""
    tables = simulator.plan(sharegpt16, llama, HardwareConfig(), SchedulerConfig(), profiles_dir=PROFILES).tables
    assert isinstance(tables, AbstractLatencyModel) and isinstance(tables, LatencyTables)
    for args in ((300, 3, 280, 16, 2, 900, 400, 500), (1, 1, 0, 0, 1, 1, 1, 1), (4096, 1, 4096, 0, 0, 0, 0, 0)):
        t, ext = tables.iteration_time(_shape(*args))
        t2, ext2 = iteration_time(tables, *args)
        assert int(t) == int(t2) > 0 and np.array_equal(ext, ext2) and t.dtype == jnp.int64 and ext.shape == (4,)
        stages, _, p2p = tables.stage_times(_shape(*args), 3)  # pp = 1: one stage holds everything
        assert stages.tolist() == [int(t), 0, 0] and int(p2p) >= 0

    class Incomplete(AbstractLatencyModel):
        def iteration_time(self, shape):
            return jnp.asarray(1, jnp.int64), jnp.zeros(4, jnp.int32)

    with pytest.raises(TypeError):
        Incomplete()


def test_batch_shape_padding_and_dummy():
    s = _shape(10, 2, 8, 4, 1, 30, 30, 30)
    p = s.padded(jnp.asarray(3, jnp.int32))
    assert (int(p.tokens), int(p.seqs), int(p.prefill_tokens), int(p.decodes)) == (13, 5, 8, 1)
    d = BatchShape.dummy_like(s)
    assert [int(x) for x in d.args()] == [1, 1, 0, 0, 1, 1, 1, 1]  # vLLM's idle-DP-member dummy batch
    w = BatchShape.where(jnp.asarray(False), d, s)
    assert [int(x) for x in w.args()] == [int(x) for x in s.args()]


@pytest.mark.parametrize("flags, expected", [
    (dict(finished=5), Status.OK),
    (dict(finished=3), Status.STEP_LIMIT),
    (dict(finished=3, stalled=True), Status.STALLED),
    (dict(finished=3, stalled=True, buffer_full=True), Status.ITERATION_BUFFER_FULL),
    (dict(finished=3, buffer_full=True, queue_overflow=True), Status.QUEUE_OVERFLOW),
    (dict(finished=5, queue_overflow=True, slot_overflow=True), Status.SLOT_OVERFLOW),  # even when finished
])
def test_run_status_ranking(flags, expected):
    kw = {**dict(slot_overflow=False, queue_overflow=False, buffer_full=False, stalled=False), **flags}
    kw = {k: jnp.asarray(v) for k, v in kw.items()}
    assert Status(int(run_status(num_requests=5, **kw))) == expected
    assert expected.label == expected.name.lower() and (expected == Status.OK) == (expected.message == "")


def test_iteration_records_meter_writes_only_ending_rows():
    m = meters.IterationRecords()
    acc = m.init(num_instances=3, max_iters=4)
    fields = {f: jnp.asarray([7, 8, 9]) for f in meters.ROW_FIELDS}
    it = meters.IterationEnd(ending=jnp.asarray([True, False, True]), index=jnp.asarray([0, 0, 3]), **fields)
    acc = m.update(acc, it)
    assert acc.start[:, 0].tolist() == [7, 0, 0] and acc.start[2, 3] == 9 and acc.kv_used.sum() == 16
    it = dataclasses.replace(it, index=jnp.asarray([4, 4, 4]))  # past the buffer: dropped, never an error
    assert np.array_equal(m.update(acc, it).start, acc.start)


def test_static_features():
    base = Static(block_size=16, window=64, ring_cap=256)
    assert base.lone and not base.pipelined and hash(base) == hash(base.replace())
    assert not base.replace(num_instances=2).lone and not base.replace(releases=True).lone
    with pytest.raises(NotImplementedError):
        base.replace(max_pp=2, dp_sync=True)


# --------------------------------------------------------------------------- the KV lower-tier hook
class _HoldsEverything(AbstractKVTier):
    """A test tier that holds every prompt block (a lookup returns all that is asked for, one
    chunk per block) and takes one second per recalled chunk; it counts its writes."""

    enabled = True

    def lookup(self, state, pool, chunks, matched, limit, now):
        gained = jnp.maximum(limit - matched, 0).astype(jnp.int32)
        return gained, gained

    def write(self, state, pool, chunk, valid, now):
        return state + jnp.sum(valid.astype(jnp.int32), dtype=jnp.int32)

    def settle(self, state):
        return state

    def recall(self, state, pool, chunks, chunk_bytes, now, start):
        return jnp.where(start, chunks.astype(jnp.int64) * 1_000_000_000, 0), state

    def pool_stats(self, state, pool):
        return jnp.zeros(pool.shape, jnp.int32), jnp.broadcast_to(state, pool.shape).astype(jnp.int64)


def test_kv_tier_lookup_and_recall_reach_the_scheduler(sharegpt16, llama):
    """With a tier that holds every prompt block, each request's first admission finds its whole
    prefix (limited as vLLM's lookup is), the batches that recall pay the tier's time, and the
    tier's hits are counted apart from the GPU's."""
    import dataclasses as dc
    from jaxsim.engine import cluster
    tier = _HoldsEverything()
    p = simulator.prepare(sharegpt16, llama, HardwareConfig(), SchedulerConfig(), profiles_dir=PROFILES,
                          record_token_times=False)
    base = simulator.to_result(p, simulator.run_prepared(p))
    state = dc.replace(p.state, tier=jnp.zeros((), jnp.int32))
    final = cluster.run(state, p.params, p.workload, p.static.replace(kv_tier=tier))
    res = simulator.to_result(p, final)
    bs = 16
    order = np.asarray(p.workload.order)
    limit = np.minimum((sharegpt16.input_toks - 1) // bs, np.asarray(p.workload.n_hashes)[:16]) * bs
    assert res.prefix_hit_tokens.tolist() == limit.tolist() and (res.prefix_hit_tokens >= base.prefix_hit_tokens).all()
    first = np.argmin(res.iter_start_ns)
    assert res.iter_end_ns[first] - res.iter_start_ns[first] >= 1_000_000_000 * int(limit[order[0]] // bs) > 0
    # this trace shares no prefix: every hit is the tier's, and every hit block was recalled
    assert int(final.inst.counters.prefix_hits[0]) == 0
    assert int(final.inst.counters.tier_recalled[0]) == int(limit.sum()) // bs
