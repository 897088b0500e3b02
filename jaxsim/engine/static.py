"""The static part of a compiled run: the shapes and the features its loop compiles.

Everything here is a Python value fixed at trace time (a change recompiles); every number that may
vary between configurations of one compiled call is an array in ``EngineParams`` instead. A reader
sees from one ``Static`` which code a configuration compiles: ``lone`` (one instance, one clock),
``releases`` (P/D hand-offs, agentic sessions), ``dp_sync`` (wave-synchronised DP groups),
``max_pp > 1`` (pipelines), the routing policy and the KV tier below the GPU pool.
"""

import dataclasses

from jaxsim.engine.kvtier import AbstractKVTier, NoLowerTier
from jaxsim.engine.routing import Router


@dataclasses.dataclass(frozen=True)
class Static:
    """Hashable: a static argument of :func:`jaxsim.engine.cluster.run`."""

    block_size: int  # tokens per KV block
    window: int  # free-list entries (and registrations) handled per loop trip; any value is correct
    ring_cap: int  # free-list buffer length of a KV pool
    # (The step limit, a guard against a run that never ends, is ClusterState.max_steps: a value,
    # so that runs of different lengths share one compiled loop.)
    num_instances: int = 1
    record_iterations: bool = True  # False: the iteration buffer's size is ignored (sweeps)
    router: Router = Router()
    releases: bool = False  # requests enter queues during the run (P/D hand-offs, agentic sessions)
    dp_sync: bool = False  # some instances form wave-synchronised DP groups
    max_pp: int = 1  # largest pipeline degree; 1 compiles no pipeline
    kv_tier: AbstractKVTier = NoLowerTier()  # the KV tier below each GPU pool (engine/kvtier.py)
    # Most batch ends an instance runs within one loop step when its batch is steady decode
    # (engine/leap.py); 1 runs every batch end in a step of its own. Results are identical.
    leap: int = 1

    def __post_init__(self):
        if self.max_pp > 1 and self.dp_sync:
            raise NotImplementedError("wave-synchronised DP groups with pipeline parallelism")

    @property
    def lone(self) -> bool:
        """One instance and no releases: arrivals wait outside the slots and the instance sees
        them at its batch ends, its only decision points (no router, one clock)."""
        return self.num_instances == 1 and not self.releases

    @property
    def pipelined(self) -> bool:
        return self.max_pp > 1

    @property
    def leaps(self) -> bool:
        """Decode leaps compile (not for pipelines or wave-synchronised DP groups)."""
        return self.leap > 1 and not self.pipelined and not self.dp_sync

    def replace(self, **changes) -> "Static":
        return dataclasses.replace(self, **changes)
