"""Sweeps over many processes and hosts with ``jax.distributed`` (multi-controller JAX).

Every process runs the same program (the same command line, with its own process id): it
initialises ``jax.distributed``, plans every point (host work, identical in every process), and
the chunks of the sweep run over one global mesh of every process's devices. Each process builds
only its slice of a chunk's configurations (:func:`global_batch`); the configurations are
independent, so no data crosses processes while they run. The results are then gathered to
every process (:func:`gather`) and process 0 (the coordinator) writes the table and the
checkpoint; the others write nothing. Which chunks are already done (a restarted sweep) is
decided by process 0 and broadcast (:func:`agree`), so every process skips the same chunks and
the collective calls stay in step.

Launch lines (the same program everywhere; see README "Scaling out"):

    # N processes by hand (one per host, or several on one host with CPU devices)
    python scripts/sweep.py ... distributed.num_processes=2 distributed.process_id=0 \\
        distributed.coordinator=10.0.0.1:12355
    # SLURM: srun starts one task per node; JAX reads the SLURM variables
    srun python scripts/sweep.py ... distributed.auto=true
    # Kubernetes Indexed Job: the index is the process id
    python scripts/sweep.py ... distributed.num_processes=4 \\
        distributed.process_id=$JOB_COMPLETION_INDEX distributed.coordinator=sweep-0.sweep:12355
"""

import dataclasses
import socket
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxsim.errors import JaxsimInputError, unknown_key_fix


@dataclasses.dataclass(frozen=True)
class DistributedOptions:
    """The validated ``distributed`` section (:func:`distributed_options`).

    ``num_processes`` 1 (the default) is a plain single-process run. ``auto``: let
    ``jax.distributed.initialize()`` detect the cluster from its environment instead of the three
    explicit fields: SLURM and Open MPI variables, or a Kubernetes pod (JAX's detection of it needs
    the ``kubernetes`` package); the explicit fields work everywhere."""

    num_processes: int = 1
    process_id: int | None = None
    coordinator: str | None = None  # HOST:PORT of process 0
    auto: bool = False
    timeout_s: int = 300  # how long a process waits for the others to join

    @property
    def enabled(self) -> bool:
        return self.auto or self.num_processes > 1


def distributed_options(d: dict | None) -> DistributedOptions:
    """Validate a ``distributed`` section (a plain dict). Errors name the key, e.g.
    ``distributed.process_id: must be in [0, 1], got 2``."""
    p = "distributed"
    d = {} if d is None else dict(d)
    known = [f.name for f in dataclasses.fields(DistributedOptions)]
    for k in d:
        if k not in known:
            raise JaxsimInputError(f"{p}.{k}", "unknown field", unknown_key_fix(str(k), known))
    o = DistributedOptions(**d)
    if not isinstance(o.num_processes, int) or isinstance(o.num_processes, bool) or o.num_processes < 1:
        raise JaxsimInputError(f"{p}.num_processes", f"must be an integer >= 1, got {o.num_processes!r}")
    if not isinstance(o.auto, bool):
        raise JaxsimInputError(f"{p}.auto", f"must be true or false, got {o.auto!r}")
    if not isinstance(o.timeout_s, int) or o.timeout_s < 1:
        raise JaxsimInputError(f"{p}.timeout_s", f"must be an integer >= 1, got {o.timeout_s!r}")
    if o.num_processes == 1 and not o.auto:
        for k in ("process_id", "coordinator"):
            if getattr(o, k) is not None:  # a host that forgot num_processes would run the whole sweep alone
                raise JaxsimInputError(f"{p}.{k}", "set, but distributed.num_processes is 1",
                                       "set distributed.num_processes=<N> on every process, or drop this field")
    if o.num_processes > 1 and not o.auto:
        if not isinstance(o.process_id, int) or not 0 <= o.process_id < o.num_processes:
            raise JaxsimInputError(f"{p}.process_id", f"must be in [0, {o.num_processes - 1}], got {o.process_id!r}",
                                   "give each process its index, e.g. distributed.process_id=$SLURM_PROCID")
        host, _, port = (o.coordinator or "").rpartition(":") if isinstance(o.coordinator, str) else ("", "", "")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise JaxsimInputError(f"{p}.coordinator", f"must be HOST:PORT of process 0 (a port in 1-65535), got "
                                   f"{o.coordinator!r}", "e.g. distributed.coordinator=10.0.0.1:12355")
    return o


def _wait_for_coordinator(address: str, timeout_s: int) -> None:
    """Wait until process 0's coordinator accepts connections. JAX's own client aborts the whole
    process (a C++ check failure, no Python error) when it cannot register in time."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except OSError as e:
            if time.monotonic() > deadline:
                raise JaxsimInputError("distributed.coordinator", f"cannot reach {address} within {timeout_s} s ({e})",
                                       "start process 0 first (it serves the coordinator), check the address, "
                                       "or raise distributed.timeout_s") from None
            time.sleep(0.5)


def initialize(opts: DistributedOptions) -> None:
    """Join the process group (``jax.distributed.initialize``) when ``opts`` asks for several
    processes; a no-op otherwise or when already joined. Must run before anything touches a JAX
    device (the backend is created with the process group)."""
    if not opts.enabled or jax.distributed.is_initialized():
        return
    if opts.auto:
        jax.distributed.initialize(initialization_timeout=opts.timeout_s)
    else:
        if opts.process_id != 0:
            _wait_for_coordinator(opts.coordinator, opts.timeout_s)
        jax.distributed.initialize(opts.coordinator, opts.num_processes, opts.process_id,
                                   initialization_timeout=opts.timeout_s)


def process() -> tuple:
    """``(process index, process count)`` of this process (``(0, 1)`` without jax.distributed)."""
    return jax.process_index(), jax.process_count()


def global_batch(tree, devices: tuple, batched: bool = True):
    """This process's slice of a batch (leading axis: its share of the configurations, in the
    order of ``devices``) -> global arrays sharded over ``devices`` along that axis; with
    ``batched=False`` every process passes the whole tree and it is replicated."""
    mesh = Mesh(np.array(devices), ("config",))
    sharding = NamedSharding(mesh, PartitionSpec("config") if batched else PartitionSpec())
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def gather(tree):
    """Global arrays -> the whole arrays (numpy) on every process."""
    return multihost_utils.process_allgather(tree, tiled=True)


def agree(mask: np.ndarray) -> np.ndarray:
    """Process 0's ``mask`` on every process (a boolean array of the same shape everywhere)."""
    if jax.process_count() == 1:
        return mask
    return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(mask, np.int32))).astype(bool)


def same_everywhere(text: str) -> bool:
    """Whether every process passes the same ``text`` (e.g. a fingerprint of its sweep): processes
    running different sweeps would wait for each other's collectives for ever. Every process gets
    the same answer, so all of them stop together."""
    if jax.process_count() == 1:
        return True
    mine = np.frombuffer(text.encode().ljust(64, b"\0")[:64], np.uint8).astype(np.int32)
    every = np.asarray(multihost_utils.process_allgather(mine))
    return bool((every == every[:1]).all())
