"""Per-iteration meters: what a run accumulates about its iterations for the report.

At every step the loop describes the iterations that ended (one :class:`IterationEnd`, per
instance, gauges read after routing) and hands it to each meter, which folds it into its own
accumulator (a pytree in the loop state). A meter is one file: a subclass of
:class:`AbstractMeter` with ``init`` and ``update``; power/energy and memory-tier meters are added
the same way. :class:`IterationRecords` (one row per iteration: vLLM's per-step statistics, from
which the 1-s time series is built) is the first implementation.
"""

import abc

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int

I32 = jnp.int32
I64 = jnp.int64


class IterationEnd(eqx.Module):
    """The iterations that ended in one step, per instance ([inst] arrays; [inst, k] for up to k
    iterations of each instance, as a decode leap ends, engine/leap.py)."""

    ending: Bool[Array, " inst"]  # an iteration of the instance ended in this step
    index: Int[Array, " inst"]  # its number on its instance (0, 1, ...)
    start: Int[Array, " inst"]  # ns
    end: Int[Array, " inst"]  # ns
    prompt_tokens: Int[Array, " inst"]  # prompt tokens computed (prefix hits counted at the first token)
    gen_tokens: Int[Array, " inst"]  # tokens emitted
    num_tokens: Int[Array, " inst"]  # tokens scheduled (DP padding included)
    num_seqs: Int[Array, " inst"]
    busy_ns: Int[Array, " inst"]  # NPU time of the iteration (InstanceState.batch_busy; int64)
    pim_ns: Int[Array, " inst"]  # its attention time on PIM channels (int64; 0 without PIM)
    pim_io_bytes: Int[Array, " inst"]  # bytes its PIM operations move in and out (int64; 0 without PIM)
    running: Int[Array, " inst"]  # gauges after the step's routing
    waiting: Int[Array, " inst"]
    kv_used: Int[Array, " inst"]  # KV blocks in use
    kv_cached: Int[Array, " inst"]  # KV blocks free but still holding a cached prefix
    prefix_queried: Int[Array, " inst"]  # cumulative prefix-cache queried tokens (int64)
    prefix_hits: Int[Array, " inst"]  # cumulative prefix-cache hit tokens (int64)
    # The KV tier below the GPU (engine/kvtier.py; 0 without one): cumulative prompt tokens it
    # served and chunks recalled by the instance (int64); its pool's resident chunks and
    # cumulative chunks written (int64), as of the step's start.
    tier_hits: Int[Array, " inst"]
    tier_recalled: Int[Array, " inst"]
    tier_resident: Int[Array, " inst"]
    tier_written: Int[Array, " inst"]


class AbstractMeter(eqx.Module):
    """Accumulates what a run reports about its iterations. Pure and jittable; its accumulator
    has a leading instance axis where it is per instance."""

    @abc.abstractmethod
    def init(self, num_instances: int, max_iters: int):
        """The empty accumulator."""

    @abc.abstractmethod
    def update(self, acc, it: IterationEnd):
        """``acc`` with the iterations of ``it`` folded in (a no-op where ``it.ending`` is False)."""


class Records(eqx.Module):
    """One row per engine iteration [inst, it] (a fixed-size buffer; rows past the instance's
    iteration count are unused)."""

    start: Int[Array, "inst it"]
    end: Int[Array, "inst it"]
    prompt_tokens: Int[Array, "inst it"]
    gen_tokens: Int[Array, "inst it"]
    num_tokens: Int[Array, "inst it"]
    num_seqs: Int[Array, "inst it"]
    busy_ns: Int[Array, "inst it"]
    pim_ns: Int[Array, "inst it"]
    pim_io_bytes: Int[Array, "inst it"]
    running: Int[Array, "inst it"]
    waiting: Int[Array, "inst it"]
    kv_used: Int[Array, "inst it"]
    kv_cached: Int[Array, "inst it"]
    prefix_queried: Int[Array, "inst it"]
    prefix_hits: Int[Array, "inst it"]
    tier_hits: Int[Array, "inst it"]
    tier_recalled: Int[Array, "inst it"]
    tier_resident: Int[Array, "inst it"]
    tier_written: Int[Array, "inst it"]


ROW_FIELDS = tuple(f for f in Records.__annotations__)  # the columns, in order
INT64_FIELDS = ("start", "end", "busy_ns", "pim_ns", "pim_io_bytes", "prefix_queried", "prefix_hits", "tier_hits", "tier_recalled", "tier_written")  # the others are int32


class IterationRecords(AbstractMeter):
    """The iteration rows of every instance (``SimResult.iter_*``). A row past the buffer is
    dropped; the loop stops before that happens when ``Static.record_iterations``."""

    def init(self, num_instances: int, max_iters: int) -> Records:
        return Records(**{f: jnp.zeros((num_instances, max_iters), I64 if f in INT64_FIELDS else I32)
                          for f in ROW_FIELDS})

    def update(self, acc: Records, it: IterationEnd) -> Records:
        n_inst, max_iters = acc.start.shape
        inst = jnp.arange(n_inst).reshape((n_inst,) + (1,) * (it.index.ndim - 1))  # rows [inst] or [inst, k]
        row = jnp.where(it.ending, it.index, max_iters)  # out of range: not written
        return Records(**{f: getattr(acc, f).at[inst, row].set(getattr(it, f).astype(getattr(acc, f).dtype),
                                                               mode="drop") for f in ROW_FIELDS})
