"""The power meter: what a run's accelerators, links and memories did, accumulated in the loop.

Energy is linear in the power parameters (watts, joules per bit) once a run's *activity* is known,
so the loop accumulates activity, per instance, and :mod:`jaxsim.power` turns it into joules and
watts on the host (a sweep's configurations may then differ in every power parameter without a
recompile). Only what is not linear lives here as a value: each NPU's standby duration (a gap
between iterations counts as standby up to it) and, for the per-request energy, the NPU's dynamic
power (``active - idle``, W per rank), which weighs iterations of instances with different hardware.

Per instance (REFERENCE.md §1.13, with jaxsim's corrections of §1.16):

* ``busy_ns``: the iterations' NPU time (the latency model's; summed over the stages under
  pipeline parallelism, each stage's ``tp`` ranks busy for its own time). A DP member's padding
  and its dummy batches are NPU work too (vLLM runs them).
* ``in_service_ns``: the time some iteration of the instance was in flight (the union of the
  iterations' intervals). While in service an NPU that is not computing (host time, a KV
  recall, a wait for weights, another stage's turn) draws its standby power.
* ``standby_ns``: per gap between the instance's iterations, ``min(gap, standby_duration)``; the
  gap after the last iteration is added on the host (it depends on when the run is measured to).
* ``tokens``, ``dispatch``: the scheduled tokens summed over the iterations (DP padding included)
  and ``max(1, T // ep)`` summed: the collectives' bytes are linear in these (:mod:`jaxsim.power`).
* ``pim_ns``, ``pim_io``: PIM attention time and the bytes its operations move (0 without PIM;
  the latency model's ``pim_work``).

The meter sees the iterations as :class:`jaxsim.engine.meters.IterationEnd` rows, in time order
per instance (an instance's rows of one step are contiguous iterations: a decode leap's).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxsim.engine.meters import AbstractMeter, IterationEnd

I64 = jnp.int64
F64 = jnp.float64


class PowerParams(eqx.Module):
    """Per-instance values of the power model the loop needs ([inst] leaves; see the module
    docstring). Built by :func:`jaxsim.power.engine_power_params`."""

    standby_duration_ns: Int[Array, " inst"]  # an NPU stays at standby power this long after work
    npu_dynamic_w: Float[Array, " inst"]  # active - idle power of one NPU, W (0: unmodelled)
    ep: Int[Array, " inst"]  # expert-parallel ranks (the dispatch AllGather's divisor)


class Activity(eqx.Module):
    """The power meter's accumulator ([inst] leaves, int64 ns / counts)."""

    iterations: Int[Array, " inst"]
    busy_ns: Int[Array, " inst"]
    in_service_ns: Int[Array, " inst"]
    standby_ns: Int[Array, " inst"]
    last_end: Int[Array, " inst"]  # end of the latest iteration seen (-1: none yet)
    tokens: Int[Array, " inst"]
    dispatch: Int[Array, " inst"]
    pim_ns: Int[Array, " inst"]
    pim_io: Int[Array, " inst"]


class PowerMeter(AbstractMeter):
    """Folds iteration rows into :class:`Activity` (see the module docstring)."""

    params: PowerParams

    def init(self, num_instances: int, max_iters: int = 0) -> Activity:
        z = jnp.zeros(num_instances, I64)
        return Activity(iterations=z, busy_ns=z, in_service_ns=z, standby_ns=z, last_end=z - 1, tokens=z, dispatch=z,
                        pim_ns=z, pim_io=z)

    def update(self, acc: Activity, it: IterationEnd) -> Activity:
        """``it``: rows [inst] or [inst, k] (k in time order; rows not ``ending`` are skipped)."""
        rows = jax.tree.map(lambda x: x.reshape(x.shape[:1] + (-1,)), it)  # [inst, k]
        dur, ep = self.params.standby_duration_ns, self.params.ep

        def one(acc, row):  # one row of every instance
            on = row.ending
            start, end = row.start.astype(I64), row.end.astype(I64)
            seen = acc.last_end >= 0
            gap = jnp.where(seen, jnp.maximum(start - acc.last_end, 0), 0)
            # the union of the intervals: pipelined batches overlap, ends come in order
            fresh = jnp.maximum(end - jnp.maximum(start, acc.last_end), 0)
            tok = row.num_tokens.astype(I64)

            def add(a, v):
                return a + jnp.where(on, v, 0)

            acc = Activity(iterations=add(acc.iterations, 1), busy_ns=add(acc.busy_ns, row.busy_ns.astype(I64)),
                           in_service_ns=add(acc.in_service_ns, fresh),
                           standby_ns=add(acc.standby_ns, jnp.minimum(gap, dur)),
                           last_end=jnp.where(on, jnp.maximum(acc.last_end, end), acc.last_end),
                           tokens=add(acc.tokens, tok), dispatch=add(acc.dispatch, jnp.maximum(1, tok // ep)),
                           pim_ns=add(acc.pim_ns, row.pim_ns.astype(I64)),
                           pim_io=add(acc.pim_io, row.pim_io_bytes.astype(I64)))
            return acc, None

        acc, _ = jax.lax.scan(one, acc, jax.tree.map(lambda x: jnp.moveaxis(x, 1, 0), rows))
        return acc


def request_npu_joules(params: PowerParams, tp, ending, sched_n, batch_tokens, batch_busy):
    """Each scheduled request's share of its iteration's dynamic NPU energy, J ([inst, slot]):
    ``(active - idle) W x tp ranks x NPU time x its tokens / the batch's tokens`` (the padding of
    a DP member, which belongs to no request, keeps its share). ``tp``, ``ending``,
    ``batch_tokens``, ``batch_busy``: [inst]; ``sched_n``: [inst, slot]."""
    rank_s = (params.npu_dynamic_w * tp.astype(F64) * batch_busy.astype(F64) * 1e-9)[:, None]
    share = sched_n.astype(F64) / jnp.maximum(batch_tokens, 1).astype(F64)[:, None]
    return jnp.where(ending[:, None] & (sched_n > 0), rank_s * share, 0.0)
