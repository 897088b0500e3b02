"""The latency-model interface: what the engine asks of any model of an iteration's time.

The engine describes a scheduled batch by a :class:`BatchShape` and asks an
:class:`AbstractLatencyModel` for the iteration's time (or, under pipeline parallelism, each
stage's). It never reads a model's internals: the parallel layout the loop itself needs (pipeline
degree, layer count, TP ranks of a KV transfer) lives in the engine's own parameters. A new model
(a roofline for hardware nobody has profiled, an analytic or learned one) is one file: a subclass
whose numeric parameters are JAX-array fields (so configurations stack and ``vmap``) and which
implements the two methods. The profile tables (:class:`jaxsim.latency.profile.LatencyTables`)
are the first implementation.
"""

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

I32 = jnp.int32


class BatchSlots(eqx.Module):
    """The batch request by request ([slot] int32 arrays, 0 where a slot is not scheduled): what
    a model that places requests needs beyond the summary (PIM attention, REFERENCE.md §1.11;
    sub-batch interleaving, §1.12). A decode is a request scheduled for exactly 1 token."""

    tokens: Int[Array, " slot"]  # tokens scheduled (vLLM's num_scheduled_tokens)
    computed: Int[Array, " slot"]  # tokens computed before this iteration: a decode's KV length
    prompt: Int[Array, " slot"]  # the request's prompt length
    pos: Int[Array, " slot"]  # its position in the batch (vLLM's scheduled order)


class BatchShape(eqx.Module):
    """The lookup arguments of REFERENCE.md §2.1 for one scheduled batch (int32 scalars).

    Chunked prefills are merged: ``prefill_tokens`` is the sum of the chunks' new tokens and
    ``prefill_history`` the sum of their already-computed tokens (prefix hits and earlier
    chunks); decodes are summarised by their count and KV-length sum, min and max. ``slots``: the
    requests one by one (the engine always gives them; a model reads them only if it needs them,
    :attr:`AbstractLatencyModel.needs_slots`, else they compile to nothing).
    """

    tokens: Int[Array, ""]  # T: tokens scheduled (DP padding included)
    seqs: Int[Array, ""]  # S: sequences scheduled
    prefill_tokens: Int[Array, ""]  # pc
    prefill_history: Int[Array, ""]  # kp
    decodes: Int[Array, ""]  # nd
    decode_kv_sum: Int[Array, ""]
    decode_kv_min: Int[Array, ""]  # 0 without decodes
    decode_kv_max: Int[Array, ""]
    slots: "BatchSlots | None" = None

    def args(self) -> tuple:
        """``(T, S, pc, kp, nd, kvd_sum, kvd_min, kvd_max)``, the order of REFERENCE.md §2.1."""
        return (self.tokens, self.seqs, self.prefill_tokens, self.prefill_history, self.decodes,
                self.decode_kv_sum, self.decode_kv_min, self.decode_kv_max)

    def padded(self, pad) -> "BatchShape":
        """The shape with ``pad`` dummy tokens, each a sequence of its own (a DP group's padding,
        REFERENCE.md §1.8: dense layers see the padded T, per-sequence layers S + pad)."""
        return eqx.tree_at(lambda b: (b.tokens, b.seqs), self, (self.tokens + pad, self.seqs + pad))

    @staticmethod
    def dummy_like(shape: "BatchShape") -> "BatchShape":
        """vLLM's dummy batch of an idle DP member: one token, one decode at KV length 1."""
        one, zero = jnp.ones_like(shape.tokens), jnp.zeros_like(shape.tokens)
        slots = None
        if shape.slots is not None:  # the dummy decode in the first slot
            t = shape.slots.tokens
            first = jnp.broadcast_to((jnp.arange(t.shape[-1]) == 0).astype(t.dtype), t.shape)
            slots = BatchSlots(tokens=first, computed=first, prompt=first, pos=jnp.zeros_like(first))
        return BatchShape(tokens=one, seqs=one, prefill_tokens=zero, prefill_history=zero, decodes=one,
                          decode_kv_sum=one, decode_kv_min=one, decode_kv_max=one, slots=slots)

    @staticmethod
    def where(cond, a: "BatchShape", b: "BatchShape") -> "BatchShape":
        cond = jnp.asarray(cond)

        def pick(x, y):  # cond over the leading axes ([inst]), broadcast over a leaf's own ([slot])
            return jnp.where(cond.reshape(cond.shape + (1,) * (jnp.ndim(x) - cond.ndim)), x, y)

        return jax.tree.map(pick, a, b)


class AbstractLatencyModel(eqx.Module):
    """An iteration's time from its batch shape. Implementations are ``equinox.Module`` s whose
    leaves are arrays (one configuration; the engine stacks and ``vmap`` s them) and must be pure
    and jittable. Times are int64 ns; ``extrapolated`` is int32 [4] (dense, per_sequence,
    attention, moe): 1 where the model left its data (a model without data returns zeros)."""

    @property
    def needs_slots(self) -> bool:
        """The model reads ``BatchShape.slots`` (static: decides what compiles). Default False."""
        return False

    def npu_time(self, shape: BatchShape) -> "Int[Array, '']":
        """The iteration's own NPU work, int64 ns: :meth:`iteration_time` less the time the NPU
        waits for work elsewhere (PIM attention results). The engine asks for it only when
        :attr:`needs_slots` (a model that offloads work); otherwise the iteration time is the NPU's."""
        return self.iteration_time(shape)[0]

    def pim_work(self, shape: BatchShape) -> "tuple[Int[Array, ''], Int[Array, '']]":
        """``(pim_ns, pim_io_bytes)`` of one iteration (int64): the time its attention keeps PIM
        channels busy (every layer's PIM work, both sub-batches), and the bytes its PIM operations
        move in and out (REFERENCE.md §1.13 DRAM row). A model without PIM returns zeros."""
        z = jnp.zeros((), jnp.int64)
        return z, z

    def iteration_ns(self, shape: BatchShape) -> "Float[Array, '']":
        """The iteration's time as float64 ns with no time rounded, differentiable in the model's
        continuous leaves (``jax.grad``; :func:`jaxsim.latency.profile.total_ns_grad`);
        :meth:`iteration_time` is it up to the roundings. Not used by the engine. A model without
        a float-time evaluation raises NotImplementedError."""
        raise NotImplementedError(f"{type(self).__name__} has no float-time evaluation (iteration_ns)")

    @abc.abstractmethod
    def iteration_time(self, shape: BatchShape) -> "tuple[Int[Array, ''], Int[Array, ' 4']]":
        """``(time_ns, extrapolated)`` of one engine iteration on one instance."""

    @abc.abstractmethod
    def stage_times(self, shape: BatchShape, max_pp: int) -> "tuple[Int[Array, ' P'], Int[Array, ' 4'], Int[Array, '']]":
        """Pipeline parallelism (REFERENCE.md §1.8): ``(times, extrapolated, p2p_ns)``: int64
        [max_pp] stage times (0 past the instance's pp; they sum to :meth:`iteration_time`), the
        flags, and the cost of sending the hidden state from one stage to the next."""
