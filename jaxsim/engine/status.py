"""How a run ended: one status, produced in the loop and interpreted once on the host.

The loop carries failure flags as values (a compiled run cannot raise); when it ends,
:func:`run_status` folds them into one :class:`Status` code (an int32 scalar, per configuration
under ``vmap``). Single runs (``simulator.to_result``), clusters and sweeps all read that code:
a single run raises the error of :func:`error_for`; a sweep writes ``Status(code).label`` in the
row's ``status`` column. The ranking (the first that applies wins) puts capacity errors of the
simulator itself before properties of the configuration.
"""

import enum

import jax.numpy as jnp


class Status(enum.IntEnum):
    OK = 0  # every request finished
    SLOT_OVERFLOW = 1  # a request could not enter a slot while none held a waiting request
    QUEUE_OVERFLOW = 2  # a routing queue was full
    ITERATION_BUFFER_FULL = 3  # the per-iteration record buffer filled up before the end
    STALLED = 4  # nothing runs, nothing arrives, requests are left: one can never be scheduled
    STEP_LIMIT = 5  # the loop's step limit was reached

    @property
    def label(self) -> str:
        return self.name.lower()

    @property
    def message(self) -> str:
        return _MESSAGES[self]


_MESSAGES = {
    Status.OK: "",
    Status.SLOT_OVERFLOW: "request slots overflowed: raise sim.max_slots",
    Status.QUEUE_OVERFLOW: "a routing queue overflowed",
    Status.ITERATION_BUFFER_FULL: "the iteration buffer filled up before the run ended: raise sim.max_iterations "
                                  "(0 = automatic)",
    Status.STALLED: "a request can never be scheduled: its KV blocks exceed the cache",
    Status.STEP_LIMIT: "the step limit was reached with requests unfinished",
}


def run_status(*, finished, num_requests: int, slot_overflow, queue_overflow, buffer_full, stalled):
    """The :class:`Status` code (int32 scalar) of a run that ended with these flags (traced)."""
    code = jnp.where(finished >= num_requests, Status.OK, Status.STEP_LIMIT)
    for flag, status in ((stalled, Status.STALLED), (buffer_full, Status.ITERATION_BUFFER_FULL),
                         (queue_overflow, Status.QUEUE_OVERFLOW), (slot_overflow, Status.SLOT_OVERFLOW)):
        code = jnp.where(flag, status, code)  # applied in reverse rank: the highest rank wins
    return code.astype(jnp.int32)
