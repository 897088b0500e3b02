"""Progress of a single run while its compiled loop runs.

A run is one ``lax.while_loop``: the host sees nothing until it returns, and a 200,000-request
trace took ~4 minutes in silence. A callback from inside the loop (``jax.debug.callback``) would
report, but JAX does not store executables with host callbacks in the persistent compilation
cache (:mod:`jaxsim.compile_cache`), so every run would pay the compile again. Instead the loop
runs in *stretches*: its step limit (``ClusterState.max_steps``, a traced value) is set a number
of steps ahead, the loop returns, the bar is updated, and the loop is called again on the
returned state with the next limit. A stopped loop has written everything it holds (the early
ends of decode leaps are flushed when it returns), so the stretches give the same result as one
call (``tests/test_outputs.py``, ``tests/test_long_trace.py``) and the same compiled executable
serves every stretch. A run shorter than the first stretch is one call, as without a bar.
:func:`jaxsim.simulator.run_prepared` donates each stretch's state to the next (no copy of the
state per call), so a long trace's stretches cost what its steps cost.
"""

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxsim.engine.status import Status

FIRST_STRETCH = 4096  # steps of the first call (the default 300-request run takes ~2,400)
TARGET_S = 0.5  # later stretches are sized to take about this long
MAX_STRETCH = 1 << 22


class Bar:
    """A tqdm bar of finished requests with the simulated clock, shown once the run has taken
    ``delay_s`` (short runs print nothing). A context manager; ``enabled=False`` shows nothing.
    ``callback(finished, now_ns)``, when given, is called at every update too (requests finished
    so far, simulated ns since the trace's time 0: for a notebook or a log instead of a bar)."""

    def __init__(self, total: int, enabled: bool = True, delay_s: float = 2.0, desc: str = "simulate",
                 callback=None):
        from tqdm.auto import tqdm

        self.tqdm = tqdm(total=total, unit="req", desc=desc, delay=delay_s, disable=not enabled, dynamic_ncols=True)
        self.callback = callback

    def show(self, now_ns: int, finished: int) -> None:
        self.tqdm.set_postfix_str(f"simulated {now_ns / 1e9:,.1f} s", refresh=False)
        self.tqdm.update(finished - self.tqdm.n)
        if self.callback is not None:
            self.callback(finished, now_ns)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.tqdm.close()


def run_in_stretches(run, state, bar: Bar, first: int = FIRST_STRETCH):
    """``run(state)`` (a compiled loop that stops at ``state.max_steps``) called on stretches of
    steps up to the state's own step limit, updating ``bar`` after each. Returns the final state,
    with its original ``max_steps``.

    Args:
      run: the loop, ``ClusterState -> ClusterState`` (:func:`jaxsim.engine.cluster.run` with
        the other arguments bound).
      state: the initial state (one configuration: scalar ``steps``/``max_steps``).
      first: steps of the first stretch; later ones aim at :data:`TARGET_S` of wall time each.
    """
    limit = int(state.max_steps)
    stretch = max(1, int(first))
    st = state
    while True:
        t0 = time.perf_counter()
        end = min(int(st.steps) + stretch, limit)
        st = jax.block_until_ready(run(_with_limit(st, end)))
        now = int(st.now)  # past the last event the clock reads "never": show the last completion
        bar.show(now if now < 2**62 else int(np.max(np.asarray(st.finish))), int(st.finished))
        if int(st.status) != Status.STEP_LIMIT or end >= limit:
            return _with_limit(st, limit)
        took = max(time.perf_counter() - t0, 1e-3)
        stretch = int(np.clip(stretch * TARGET_S / took, stretch // 2 or 1, min(8 * stretch, MAX_STRETCH)))


def _with_limit(st, limit: int):
    return dataclasses.replace(st, max_steps=jnp.asarray(limit, jnp.int32))
