"""Latency models of one engine iteration (REFERENCE.md §2).

``base``: the interface the engine calls (:class:`BatchShape`, :class:`AbstractLatencyModel`).
``profile``: the profile-table model, traced (:class:`LatencyTables`). ``tables``: its host-side
builder from CSV profile bundles (numpy; the engine never imports it).
"""

from jaxsim.latency.base import AbstractLatencyModel, BatchShape
from jaxsim.latency.profile import LatencyTables, _iteration, iteration_time, pp_layers, stage_times

_HOST = ("latency_tables", "pim_fields", "rank_popularity", "stack_tables", "table_extents", "zipf_popularity")


def __getattr__(name):
    # The host-side builder (and through it the CSV readers) loads only when asked for, so that
    # importing the engine never imports file readers.
    if name in _HOST:
        from jaxsim.latency import tables
        return getattr(tables, name)
    raise AttributeError(f"module 'jaxsim.latency' has no attribute {name!r}")

__all__ = ["AbstractLatencyModel", "BatchShape", "LatencyTables", "iteration_time", "latency_tables", "pim_fields",
           "pp_layers", "rank_popularity", "stack_tables", "stage_times", "table_extents", "zipf_popularity",
           "_iteration"]
