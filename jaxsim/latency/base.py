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
from jaxtyping import Array, Int

I32 = jnp.int32


class BatchShape(eqx.Module):
    """The lookup arguments of REFERENCE.md §2.1 for one scheduled batch (int32 scalars).

    Chunked prefills are merged: ``prefill_tokens`` is the sum of the chunks' new tokens and
    ``prefill_history`` the sum of their already-computed tokens (prefix hits and earlier
    chunks); decodes are summarised by their count and KV-length sum, min and max.
    """

    tokens: Int[Array, ""]  # T: tokens scheduled (DP padding included)
    seqs: Int[Array, ""]  # S: sequences scheduled
    prefill_tokens: Int[Array, ""]  # pc
    prefill_history: Int[Array, ""]  # kp
    decodes: Int[Array, ""]  # nd
    decode_kv_sum: Int[Array, ""]
    decode_kv_min: Int[Array, ""]  # 0 without decodes
    decode_kv_max: Int[Array, ""]

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
        return BatchShape(tokens=one, seqs=one, prefill_tokens=zero, prefill_history=zero, decodes=one,
                          decode_kv_sum=one, decode_kv_min=one, decode_kv_max=one)

    @staticmethod
    def where(cond, a: "BatchShape", b: "BatchShape") -> "BatchShape":
        return jax.tree.map(lambda x, y: jnp.where(cond, x, y), a, b)


class AbstractLatencyModel(eqx.Module):
    """An iteration's time from its batch shape. Implementations are ``equinox.Module`` s whose
    leaves are arrays (one configuration; the engine stacks and ``vmap`` s them) and must be pure
    and jittable. Times are int64 ns; ``extrapolated`` is int32 [4] (dense, per_sequence,
    attention, moe): 1 where the model left its data (a model without data returns zeros)."""

    @abc.abstractmethod
    def iteration_time(self, shape: BatchShape) -> "tuple[Int[Array, ''], Int[Array, ' 4']]":
        """``(time_ns, extrapolated)`` of one engine iteration on one instance."""

    @abc.abstractmethod
    def stage_times(self, shape: BatchShape, max_pp: int) -> "tuple[Int[Array, ' P'], Int[Array, ' 4'], Int[Array, '']]":
        """Pipeline parallelism (REFERENCE.md §1.8): ``(times, extrapolated, p2p_ns)``: int64
        [max_pp] stage times (0 past the instance's pp; they sum to :meth:`iteration_time`), the
        flags, and the cost of sending the hidden state from one stage to the next."""
