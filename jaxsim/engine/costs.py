"""Engine costs the operator profiles do not contain: the host side of one engine iteration.

The profiles time the GPU's kernels. A vLLM V1 engine step also spends CPU time the GPU may wait
for: scheduling, preparing the inputs, sampling and processing the outputs, which grows with the
batch's sequences (``Calibration.step_cpu_ns + seq_cpu_ns * S``). Without async scheduling that
time lies between two GPU iterations and adds to each; with async scheduling vLLM builds the next
batch while the GPU runs the current one, so only what exceeds the GPU time shows (REFERENCE.md
§2.9). ``iteration_overhead_ns`` is a constant added to every iteration either way. These are
properties of the engine and its configuration (async scheduling, the batch), fitted jointly on
the development cases (scripts/fit_engine_costs.py), never on one case.
"""

import jax.numpy as jnp

I64 = jnp.int64


def host_time_ns(gpu_ns, seqs, async_scheduling, iteration_overhead_ns, step_cpu_ns, seq_cpu_ns):
    """The time an iteration of ``gpu_ns`` GPU time (int64 ns) and ``seqs`` scheduled sequences
    lasts beyond its GPU time, int64 ns (all arguments broadcast; scalars per instance)."""
    cpu = step_cpu_ns + seq_cpu_ns * seqs.astype(I64)
    exposed = jnp.where(async_scheduling, jnp.maximum(cpu - gpu_ns.astype(I64), 0), cpu)
    return iteration_overhead_ns + exposed


def host_args(prm) -> tuple:
    """The per-instance arguments of :func:`host_time_ns` after the batch's, from
    :class:`jaxsim.engine.cluster.EngineParams` (one instance's, or stacked)."""
    return prm.sched.async_scheduling, prm.iteration_overhead_ns, prm.step_cpu_ns, prm.seq_cpu_ns
