"""Weight placement and offloading (REFERENCE.md §1.10, §1.16 rows ``kv_loc`` and ``Off-NPU weights``).

An instance's weights sit layer by layer on the accelerator (``npu``), in its node's host memory
(``cpu``) or on a CXL memory device (``cxl:<id>``). Weights off the accelerator

* leave its weight ledger: ``W_gpu`` of REFERENCE.md §1.3 loses their per-rank bytes, so the KV
  cache gains ``bytes moved // bytes per block`` blocks (:func:`offloaded_bytes`, used by
  :func:`jaxsim.planning.num_kv_blocks`), and are charged to the device's capacity instead
  (:func:`check_capacity`);
* are read over their device every iteration (§1.10): at the iteration's start every off-NPU layer
  queues a load of its per-rank weight bytes on its device, a device serves its loads one after
  the other in layer order (``latency + bytes / bandwidth`` each, floored to whole ns, like every
  memory operation of §2.1), and a layer's compute waits for its own load. The iteration then
  takes the critical path over the compute chain and the load chains. The loads do not depend on
  the batch, so :func:`load_gates` computes, on the host, when each layer's weights are in place;
  :func:`jaxsim.latency.profile.iteration_time` takes the critical path (fields ``wload_*`` of
  :class:`~jaxsim.latency.profile.LatencyTables`, arrays: configurations of a sweep share a compile).

Granularity: a transformer block's weights are one load (its compute waits for all of them), and
so are the embedding (gating the prologue), the final norm and the lm_head (both gating the head).
Out of scope, stated: contention between instances on one node's host memory or one CXL device
(each instance's loads are serialised on its own view of the device), and the TP ranks' shards
(each rank loads its per-rank bytes over its own path, as the reference does). With
``enable_local_offloading`` (off by default; it double counts, §1.10) every NPU-resident layer
also loads its weights from HBM (``npu_mem.mem_bw`` / ``mem_latency``) as one more load chain.

Two ways to describe a placement:

* the cluster JSON's per-instance ``placement{default, blocks[], layers{}}`` (:func:`parse_placement`;
  ``weights``, ``kv_loc``, ``kv_evict_loc`` in ``npu | cpu | cxl:<id>``, precedence layer > block
  range > default; block ranges ``"0-3"``, ``"8,9,10"`` bounds-checked; unknown keys, devices and
  overlapping ranges are errors naming the JSON path);
* the Hydra fields of :class:`jaxsim.spec.HardwareConfig` (:func:`from_hardware`): the last
  ``round(weights_offload_fraction * L)`` blocks on ``weights_offload_device`` at
  ``offload_bw_gbps`` / ``offload_latency_ns``.

The KV cache itself off the accelerator (REFERENCE.md §1.16 row ``kv_loc``: "capacity from that
tier, per-step KV read time = bytes / tier bandwidth"; §1.3 for the block bytes): ``kv_loc`` ``cpu``
or ``cxl:<id>`` on every transformer block (or the Hydra field ``kv_offload_device``) keeps every
KV block in that device's memory:

* capacity (:func:`kv_device_blocks`, called by :func:`jaxsim.planning.num_kv_blocks`): the
  instance's share of the device, ``floor(capacity_gb * 2^30 / sharers)`` bytes less its own
  weights placed on the same device (all ranks), over the bytes of one block on all ranks
  (``block_size x K+V bytes per token per rank x tp x pp``). The device's capacity is the node's
  ``cpu_mem.mem_size`` for ``cpu`` and ``cxl_mem.mem_size / num_devices`` for ``cxl:<id>``; the
  sharers are the instances that keep their KV there (the node's instances for ``cpu``, the
  cluster's for a CXL device; :func:`kv_sharers`). No utilisation factor applies to the device.
  The GPU's leftover memory (``util x device - weights - reserve``, the KV share of §1.3) is then
  unused: the instance holds no KV on the GPU. An explicit ``hardware.num_gpu_blocks`` still wins.
  The device's capacity is checked with its weights (:func:`check_capacity`).
* time (:func:`kv_read_params` -> the ``kvloc_*`` fields of
  :class:`~jaxsim.latency.profile.LatencyTables`, values, so sweep points share a compile): every
  iteration each block reads, at its start, the KV of the tokens the batch attends over (the
  decodes' KV lengths plus the prefill chunks' histories, ``kvd_sum + kp`` of the
  :class:`~jaxsim.latency.base.BatchShape`) for its layer: ``floor(latency + tokens x K+V bytes
  per token per layer per rank / bandwidth)`` ns, the blocks' reads queued on the device one after
  the other from the iteration's start, and a block starts once its KV has arrived; the iteration
  takes the critical path with the compute chain exactly as the weight loads
  (:func:`jaxsim.latency.profile.kv_read_ns`, ``_weight_loads``). The KV of the new tokens is
  computed on the NPU and its write-back is not charged.

Limits, stated: every block keeps its KV on one device (``kv_loc`` differing between blocks is
refused, naming the JSON path of the first block that differs); the ``embedding``,
``final_layernorm`` and ``lm_head`` hold no KV, so an explicit ``layers.<name>.kv_loc`` other than
the blocks' device is refused; pp > 1 with an off-NPU KV cache is refused (``hardware.pp``); KV
reads and weight loads on one device are separate chains, and instances do not contend for a
device's bandwidth (as for the weights); a P/D hand-off or a KV-tier recall moves the KV as if it
were on the GPU; the run's ``gpu_mem_gib`` series still counts the KV blocks in use.

``kv_evict_loc`` (where evicted KV goes: the lower KV tier) is validated and kept on
:class:`jaxsim.spec.InstanceSpec` for the tier.
"""

import dataclasses
import math
import re

import numpy as np

from jaxsim.errors import JaxsimInputError, unknown_key_fix

# The named (non-block) layers that hold weights, in the order of the iteration (§2.1): the
# embedding in the prologue, the final norm and the lm_head in the head.
NAMED_LAYERS = ("embedding", "final_layernorm", "lm_head")
ENTRY_KEYS = ("weights", "kv_loc", "kv_evict_loc")
DEFAULTS = {"weights": "npu", "kv_loc": "npu", "kv_evict_loc": "cpu"}  # REFERENCE.md §1.10
_DEVICE = re.compile(r"^(npu|cpu|cxl:(\d+))$")


@dataclasses.dataclass(frozen=True)
class MemoryDevice:
    """A memory weights are read from: ``name`` (``cpu``, ``cxl:<id>``, ``hbm``), bandwidth in GB/s
    (= bytes/ns), latency per load in ns, capacity in GiB (None: not checked)."""

    name: str
    bw_gbps: float
    latency_ns: float
    capacity_gb: float | None = None


@dataclasses.dataclass(frozen=True)
class WeightPlacement:
    """Where one instance's weight-bearing layers sit (``npu``, ``cpu`` or ``cxl:<id>``).

    ``blocks``: one device per transformer block (``()`` = all on the NPU); ``devices``: the
    parameters of every off-NPU device named; ``hbm``: the accelerator's memory, set when
    ``enable_local_offloading`` sends NPU-resident weights through it (§1.10)."""

    embedding: str = "npu"
    blocks: tuple = ()
    final_layernorm: str = "npu"
    lm_head: str = "npu"
    devices: tuple = ()  # of MemoryDevice
    hbm: MemoryDevice | None = None
    # The KV cache (REFERENCE.md §1.16 kv_loc): "npu", or the device every block keeps its KV in,
    # with its MemoryDevice (capacity_gb: the whole device), the instances whose KV shares the
    # device (its capacity split evenly; set by the cluster JSON loader, :func:`kv_sharers`; 0: a
    # device of this instance alone, Hydra's kv_offload_capacity_gb, not summed with others') and
    # the setting that placed it (for errors).
    kv: str = "npu"
    kv_device: MemoryDevice | None = None
    kv_sharers: int = 1
    kv_src: str = "hardware.kv_offload_device"

    def block(self, i: int) -> str:
        return self.blocks[i] if self.blocks else "npu"

    def layers(self, num_layers: int) -> list:
        """``(name, device)`` of every weight-bearing layer in iteration order."""
        return ([("embedding", self.embedding)] + [(f"block {i}", self.block(i)) for i in range(num_layers)]
                + [("final_layernorm", self.final_layernorm), ("lm_head", self.lm_head)])

    @property
    def off_npu(self) -> bool:
        """Whether any weights are off the accelerator (or read through HBM)."""
        return self.hbm is not None or any(d != "npu" for d in (self.embedding, self.final_layernorm, self.lm_head,
                                                               *self.blocks))

    @property
    def kv_off_npu(self) -> bool:
        """Whether the KV cache sits off the accelerator (``kv_loc`` cpu or cxl:<id>)."""
        return self.kv != "npu"

    @property
    def placed(self) -> bool:
        """Whether anything differs from everything on the NPU (weights, HBM reads or the KV)."""
        return self.off_npu or self.kv_off_npu

    def device(self, name: str) -> MemoryDevice:
        for d in self.devices:
            if d.name == name:
                return d
        raise KeyError(name)


NPU_ONLY = WeightPlacement()


# ------------------------------------------------------------------------------------------------
# Bytes per layer (REFERENCE.md §1.3)
# ------------------------------------------------------------------------------------------------


def layer_weight_bytes(model, weight_bytes: int, tp: int = 1, ep: int = 1) -> dict:
    """Per-rank weight bytes of each weight-bearing layer (REFERENCE.md §1.3's ``W_gpu`` term by
    term, pp = 1): ``{"embedding": (V/tp)·H·fp, "blocks": [W_block of block i], "final_layernorm":
    H·fp, "lm_head": H·(V/tp)·fp}``; a hybrid MoE model's blocks differ (dense or sparse MLP). The
    sum equals :meth:`jaxsim.model.ModelConfig.weight_bytes_per_rank` at pp = 1."""
    h, v, fp = model.hidden_size, model.vocab_size, weight_bytes
    common = 2 * h * fp + h * ((model.q_dim + 2 * model.kv_dim) // tp) * fp + (model.q_dim // tp) * h * fp
    dense = 3 * h * (model.intermediate_size // tp) * fp
    moe = (h * model.num_experts * fp + (model.num_experts // ep) * 3 * h * model.moe_intermediate_size * fp
           if model.is_moe else 0)
    skip = set(model.mlp_only_layers)
    blocks = [common + (moe if model.is_moe and i not in skip and (i + 1) % model.decoder_sparse_step == 0 else dense)
              for i in range(model.num_layers)]
    return {"embedding": (v // tp) * h * fp, "blocks": blocks, "final_layernorm": h * fp, "lm_head": h * (v // tp) * fp}


def _bytes_in_order(model, weight_bytes: int, tp: int, ep: int) -> list:
    b = layer_weight_bytes(model, weight_bytes, tp, ep)
    return [b["embedding"], *b["blocks"], b["final_layernorm"], b["lm_head"]]


def offloaded_bytes(placement: WeightPlacement, model, weight_bytes: int, tp: int = 1, ep: int = 1) -> dict:
    """Per-rank weight bytes on each off-NPU device: ``{device name: bytes}`` (empty: all on the
    NPU). Their sum leaves the NPU weight ledger (REFERENCE.md §1.16, ``Off-NPU weights``)."""
    out: dict = {}
    for (_, dev), nbytes in zip(placement.layers(model.num_layers), _bytes_in_order(model, weight_bytes, tp, ep)):
        if dev != "npu":
            out[dev] = out.get(dev, 0) + nbytes
    return out


def load_gates(placement: WeightPlacement, model, weight_bytes: int, tp: int = 1, ep: int = 1) -> dict:
    """When each part of the iteration may start, in integer ns after the iteration's start, as
    fixed by the weight loads (REFERENCE.md §1.10): every off-NPU layer's load is queued on its
    device at the start, in layer order, and takes ``floor(latency + bytes / bandwidth)``; a load
    ends when the loads before it on its device and itself are done (the cumulative load chain).

    Returns ``{"prologue": ns, "blocks": int64 [L], "head": ns, "busy": {device: ns}}``: the end of
    the embedding's load, of each block's, and the later of the final norm's and the lm_head's (0
    for a layer on the NPU, unless ``placement.hbm`` sends it through HBM), and how long each shared
    device (cpu, cxl:<id>; not the instance's own HBM) is busy with one iteration's loads."""
    done = {}
    ends = []
    for (_, dev), nbytes in zip(placement.layers(model.num_layers), _bytes_in_order(model, weight_bytes, tp, ep)):
        d = placement.device(dev) if dev != "npu" else placement.hbm
        if d is None:
            ends.append(0)
            continue
        t = done.get(d.name, 0) + int(math.floor(d.latency_ns + nbytes / d.bw_gbps))
        done[d.name] = t
        ends.append(t)
    return {"prologue": ends[0], "blocks": np.asarray(ends[1:-2], np.int64), "head": max(ends[-2], ends[-1]),
            "busy": {name: t for name, t in done.items() if name != "hbm"}}


def kv_device_blocks(placement: WeightPlacement, model, block_size: int, kv_bytes: int, weight_bytes: int,
                     tp: int = 1, pp: int = 1, ep: int = 1) -> int:
    """KV blocks of an instance whose KV cache sits on ``placement.kv_device`` (REFERENCE.md §1.16
    kv_loc, §1.3 block bytes)::

        share  = floor(capacity_gb * 2^30 / max(kv_sharers, 1)) - weights of this instance on the device x tp
        blocks = share // (block_size * kv_bytes_per_token_per_rank * tp * pp)

    Raises :class:`JaxsimInputError` at ``placement.kv_src`` when the share holds no block."""
    dev = placement.kv_device
    share = math.floor(dev.capacity_gb * 2**30 / max(placement.kv_sharers, 1))
    own = offloaded_bytes(placement, model, weight_bytes, tp, ep).get(dev.name, 0) * tp
    per_block = block_size * model.kv_bytes_per_token_per_rank(kv_bytes, tp=tp, pp=pp) * tp * pp
    blocks = (share - own) // per_block
    if blocks <= 0:
        who = f"shared by {placement.kv_sharers} instances" if placement.kv_sharers > 1 else "for this instance"
        raise JaxsimInputError(placement.kv_src, f"{placement.kv!r}: the KV cache on {dev.name} ({dev.capacity_gb:g} GiB "
                               f"{who}, less {own / 2**30:.2f} GiB of this instance's weights there) holds no block "
                               f"of {per_block} bytes", "use a larger device, fewer instances on it, or kv_loc npu")
    return int(blocks)


def kv_read_params(placement: WeightPlacement, model, kv_bytes: int, tp: int = 1) -> dict:
    """The ``kvloc_*`` fields of :class:`jaxsim.latency.profile.LatencyTables` for an off-NPU KV
    cache (REFERENCE.md §1.16 kv_loc): the device's latency (ns per read) and bandwidth (bytes/ns),
    and the K+V bytes of one token of one layer on one rank, ``2 * kv_dim * kv_bytes / tp``
    (:meth:`jaxsim.model.ModelConfig.kv_bytes_per_token_per_rank` over L). Zero bytes (no reads)
    when the KV is on the NPU."""
    if not placement.kv_off_npu:
        return {"kvloc_lat": 0.0, "kvloc_bw": 1.0, "kvloc_bytes": 0.0}
    dev = placement.kv_device
    return {"kvloc_lat": float(dev.latency_ns), "kvloc_bw": float(dev.bw_gbps),
            "kvloc_bytes": model.kv_bytes_per_token_per_rank(kv_bytes, tp=tp) / model.num_layers}


def kv_sharers(placements: list, nodes: list) -> list:
    """Per instance, how many instances keep their KV cache on its KV device (REFERENCE.md §1.16
    kv_loc, §3.1): a node's host memory (``cpu``) is shared by that node's instances placing their
    KV there, a CXL device ``cxl:<id>`` by the cluster's. 1 for an instance with its KV on the NPU
    (or no placement)."""
    keys = [None if wp is None or not wp.kv_off_npu else ((node, wp.kv) if wp.kv == "cpu" else (None, wp.kv))
            for wp, node in zip(placements, nodes)]
    return [1 if k is None else keys.count(k) for k in keys]


# ------------------------------------------------------------------------------------------------
# The Hydra description (HardwareConfig fields)
# ------------------------------------------------------------------------------------------------


def offload_block_count(fraction: float, num_layers: int) -> int:
    """Blocks whose weights sit off the NPU at ``weights_offload_fraction`` ``fraction``:
    ``floor(fraction * L + 0.5)`` (the nearest whole block, halves up)."""
    return int(math.floor(fraction * num_layers + 0.5))


def _hw_device(hw, kind: str, capacity_gb=None) -> MemoryDevice:
    if kind == "cpu":
        return MemoryDevice("cpu", hw.offload_bw_gbps if hw.offload_bw_gbps is not None else hw.cpu_mem_bw_gbps,
                            hw.offload_latency_ns if hw.offload_latency_ns is not None else hw.cpu_mem_latency_ns,
                            capacity_gb)
    return MemoryDevice("cxl:0", hw.offload_bw_gbps, hw.offload_latency_ns or 0.0, capacity_gb)


def from_hardware(hw, num_layers: int) -> WeightPlacement:
    """The placement a :class:`jaxsim.spec.HardwareConfig` describes: the last
    :func:`offload_block_count` blocks on ``weights_offload_device`` (``cpu``: host memory, with
    ``cpu_mem_bw_gbps`` / ``cpu_mem_latency_ns`` unless ``offload_bw_gbps`` / ``offload_latency_ns``
    are set; ``cxl``: one CXL device, ``cxl:0``, at ``offload_bw_gbps`` / ``offload_latency_ns``),
    and the KV cache on ``kv_offload_device`` (``none``: the NPU; ``cpu`` / ``cxl`` as for the
    weights, with ``kv_offload_capacity_gb`` GiB for this instance's KV: a Hydra instance's device
    is its own, ``kv_sharers`` 0, and its weights' device has no capacity to check)."""
    n = offload_block_count(hw.weights_offload_fraction, num_layers)
    kv = getattr(hw, "kv_offload_device", "none")
    if n == 0 and kv == "none":
        return NPU_ONLY
    out = WeightPlacement()
    if n:
        dev = _hw_device(hw, hw.weights_offload_device)
        out = WeightPlacement(blocks=("npu",) * (num_layers - n) + (dev.name,) * n, devices=(dev,))
    if kv != "none":
        kdev = _hw_device(hw, kv, hw.kv_offload_capacity_gb)
        out = dataclasses.replace(out, kv=kdev.name, kv_device=kdev, kv_sharers=0,
                                  kv_src="hardware.kv_offload_device")
    return out


def resolve(placement: "WeightPlacement | None", hw, num_layers: int, where: str = "hardware") -> WeightPlacement:
    """The placement of one instance: an explicit one (a cluster JSON's), else the one ``hw``
    describes. Both at once is refused (``<where>.weights_offload_fraction``)."""
    if placement is None:
        return from_hardware(hw, num_layers)
    if getattr(hw, "kv_offload_device", "none") != "none":
        raise JaxsimInputError(f"{where}.kv_offload_device", f"{hw.kv_offload_device!r}, but the instance already has "
                               "a placement (a cluster JSON's `placement`, whose kv_loc places its KV cache)",
                               "use one of them: set kv_offload_device to none, or place the KV with kv_loc")
    if hw.weights_offload_fraction > 0:
        raise JaxsimInputError(f"{where}.weights_offload_fraction", f"{hw.weights_offload_fraction:g}, but the instance "
                               "already has a weight placement (a cluster JSON's `placement`)",
                               "use one of them: set the fraction to 0 or remove the placement")
    if placement.blocks and len(placement.blocks) != num_layers:
        raise JaxsimInputError(f"{where}.placement", f"places {len(placement.blocks)} blocks, the model has {num_layers}")
    return placement


def check_capacity(plans: list, placements: list, nodes: list, key: str) -> None:
    """Off-NPU weights and KV caches fit their devices (REFERENCE.md §1.16: charged to host/CXL
    capacity): the per-rank weight bytes times the TP ranks of every instance, plus the KV blocks
    of every instance whose KV cache sits on a shared device (``kv_sharers`` >= 1: ``(num_blocks +
    null block) x block_size x K+V bytes per token per rank x tp x pp``), summed per node for
    ``cpu`` and over the cluster for each ``cxl:<id>``, within the device's ``capacity_gb`` (when
    known). (Each KV share is sized to fit with its instance's own weights; this catches weights of
    other instances on the device.)

    ``plans[i].offloaded`` is instance i's :func:`offloaded_bytes`; ``placements[i]`` its placement."""
    used: dict = {}
    kv_used: dict = {}
    caps: dict = {}
    for pl, wp, node in zip(plans, placements, nodes):
        for dev, nbytes in pl.offloaded.items():
            k = (node, dev) if dev == "cpu" else (None, dev)
            used[k] = used.get(k, 0) + nbytes * pl.tp
            cap = wp.device(dev).capacity_gb
            if cap is not None:
                caps[k] = cap
        if wp.kv_off_npu and wp.kv_sharers >= 1 and wp.kv_device.capacity_gb is not None:
            k = (node, wp.kv) if wp.kv == "cpu" else (None, wp.kv)
            nbytes = (pl.num_blocks + pl.null_block) * pl.block_size * pl.kv_rank_token_bytes * pl.tp * pl.pp
            used[k] = used.get(k, 0) + nbytes
            kv_used[k] = kv_used.get(k, 0) + nbytes
            caps[k] = wp.kv_device.capacity_gb
    for k, nbytes in used.items():
        if k in caps and nbytes > caps[k] * 2**30:
            dev = k[1] if k[0] is None else f"node {k[0]}'s cpu"
            kv = kv_used.get(k, 0)
            what = (f"{(nbytes - kv) / 2**30:.2f} GiB of weights and {kv / 2**30:.2f} GiB of KV cache" if kv
                    else f"{nbytes / 2**30:.2f} GiB of weights")
            size = ("cxl_mem.mem_size / num_devices" if k[0] is None
                    else f"nodes[{k[0]}].cpu_mem.mem_size (or hardware.kv_offload_capacity_gb)")
            raise JaxsimInputError(key, f"{what} placed on {dev}, which holds {caps[k]:g} GiB ({size})",
                                   "place fewer layers there or use a larger device")


# ------------------------------------------------------------------------------------------------
# The cluster JSON (REFERENCE.md §3.1)
# ------------------------------------------------------------------------------------------------


def parse_cxl_mem(d, where: str) -> tuple:
    """The top-level ``cxl_mem{mem_size GB, mem_bw GB/s, mem_latency ns, num_devices}`` as
    ``num_devices`` :class:`MemoryDevice` ``cxl:0 ... cxl:n-1``: ``mem_size`` is the whole pool,
    split evenly over the devices (as the KV tier reads it, ``cluster_config.tier_from_cluster_json``);
    ``mem_bw`` and ``mem_latency`` are each device's."""
    if d is None:
        return ()
    if not isinstance(d, dict):
        raise JaxsimInputError(where, f"must be a JSON object, got {d!r}")
    keys = ("mem_size", "mem_bw", "mem_latency", "num_devices")
    for k in d:
        if k not in keys:
            raise JaxsimInputError(f"{where}.{k}", "unknown cxl_mem field", unknown_key_fix(k, keys))
    vals = {}
    for k in keys:
        if k not in d:
            raise JaxsimInputError(where, f"missing required field {k!r}")
        v = d[k]
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if k == "num_devices":
            ok = ok and isinstance(v, int) and v >= 1
        elif k == "mem_latency":
            ok = ok and v >= 0
        else:
            ok = ok and v > 0
        if not ok:
            need = "an integer >= 1" if k == "num_devices" else ("a number >= 0" if k == "mem_latency" else "a number > 0")
            raise JaxsimInputError(f"{where}.{k}", f"must be {need}, got {v!r}")
        vals[k] = v
    size = float(vals["mem_size"]) / vals["num_devices"]
    return tuple(MemoryDevice(f"cxl:{i}", float(vals["mem_bw"]), float(vals["mem_latency"]), size)
                 for i in range(vals["num_devices"]))


def parse_block_range(spec, num_layers: int, where: str) -> list:
    """Block indices of a range string such as ``"0-3"``, ``"8,9,10"`` or ``"0-3,8"`` (an integer
    is one block), each within ``[0, num_layers)``; errors name ``where``."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        spec = str(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise JaxsimInputError(where, f"must be a block range such as \"0-3\" or \"8,9,10\", got {spec!r}")
    out = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise JaxsimInputError(where, f"bad block range {spec!r} (at {part.strip()!r})",
                                   "use \"a-b\" or comma-separated block numbers, e.g. \"0-3\" or \"8,9,10\"")
        a, b = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
        if a > b:
            raise JaxsimInputError(where, f"bad block range {spec!r}: {a}-{b} runs backwards")
        if b >= num_layers:
            raise JaxsimInputError(where, f"block {b} of range {spec!r} is out of bounds: the model has "
                                   f"{num_layers} blocks (0-{num_layers - 1})")
        out += range(a, b + 1)
    return out


def _check_device(v, where: str, cxl: tuple) -> str:
    m = _DEVICE.match(v) if isinstance(v, str) else None
    if not m:
        raise JaxsimInputError(where, f"unknown device {v!r}", "use npu, cpu or cxl:<id>")
    if m.group(2) is not None and int(m.group(2)) >= len(cxl):
        have = (f"cxl_mem has num_devices {len(cxl)} (cxl:0-cxl:{len(cxl) - 1})" if cxl
                else "the cluster has no cxl_mem section")
        raise JaxsimInputError(where, f"unknown device {v!r}: {have}",
                               "name an existing device, or add/enlarge the top-level cxl_mem")
    return v


def _entry(e, where: str, cxl: tuple, extra=()) -> dict:
    if not isinstance(e, dict):
        raise JaxsimInputError(where, f"must be a JSON object, got {e!r}")
    keys = (*extra, *ENTRY_KEYS)
    for k in e:
        if k not in keys:
            raise JaxsimInputError(f"{where}.{k}", "unknown placement field", unknown_key_fix(k, keys))
    return {k: _check_device(e[k], f"{where}.{k}", cxl) for k in ENTRY_KEYS if k in e}


def parse_placement(d, where: str, num_layers: int, *, cpu: MemoryDevice, cxl: tuple = (),
                    hbm: MemoryDevice | None = None) -> tuple:
    """A JSON instance's ``placement`` (REFERENCE.md §1.10) -> ``(WeightPlacement, kv_evict_loc)``.

    Args:
      d: the ``placement`` object (None or ``{}``: everything on the NPU, evictions to ``cpu``).
      where: its JSON path, for errors (``<file>: nodes[0].instances[1].placement``).
      num_layers: the model's transformer blocks (range bounds).
      cpu: the node's host memory (``cpu_mem``); cxl: the ``cxl_mem`` devices (:func:`parse_cxl_mem`).
      hbm: the accelerator's memory when ``enable_local_offloading`` is set (None: off).

    Each of ``weights``, ``kv_loc``, ``kv_evict_loc`` of a layer comes from its ``layers`` entry,
    else the block range that holds it, else ``default``, else the reference's defaults (npu, npu,
    cpu). The blocks' ``kv_loc`` places the KV cache (module docstring: ``cpu`` / ``cxl:<id>``
    keep it in that device's memory). Raises :class:`JaxsimInputError` naming the JSON path of: an
    unknown key or layer name, a device other than ``npu``/``cpu``/``cxl:<id>`` with ``id <
    num_devices``, a bad or out-of-bounds block range, two ranges that overlap, a ``kv_loc`` that
    differs between blocks (the first block that differs from block 0), an explicit
    ``layers.<name>.kv_loc`` other than the blocks' (those layers hold no KV), ``kv_loc: cpu``
    on a node without ``cpu_mem.mem_size``, and ``kv_evict_loc`` values that differ between layers
    (the lower KV tier is one per instance).
    """
    d = {} if d is None else d
    if not isinstance(d, dict):
        raise JaxsimInputError(where, f"must be a JSON object, got {d!r}")
    for k in d:
        if k not in ("default", "blocks", "layers"):
            raise JaxsimInputError(f"{where}.{k}", "unknown placement field",
                                   unknown_key_fix(k, ("default", "blocks", "layers")))
    default = {**DEFAULTS, **_entry(d.get("default") or {}, f"{where}.default", cxl)}
    src_default = {k: f"{where}.default.{k}" if k in (d.get("default") or {}) else f"{where}.default" for k in ENTRY_KEYS}
    # per block: values and the JSON path each came from
    block_vals = [dict(default) for _ in range(num_layers)]
    block_src = [dict(src_default) for _ in range(num_layers)]
    owner: dict = {}
    ranges = d.get("blocks") or []
    if not isinstance(ranges, list):
        raise JaxsimInputError(f"{where}.blocks", f"must be a list, got {ranges!r}")
    for r, e in enumerate(ranges):
        w = f"{where}.blocks[{r}]"
        vals = _entry(e, w, cxl, extra=("blocks",))
        if "blocks" not in e:
            raise JaxsimInputError(w, "missing required field 'blocks' (the block range, e.g. \"0-3\")")
        for b in parse_block_range(e["blocks"], num_layers, f"{w}.blocks"):
            if b in owner:
                raise JaxsimInputError(f"{w}.blocks", f"block {b} is also in {owner[b]}", "ranges must not overlap")
            owner[b] = f"{where}.blocks[{r}].blocks"
            block_vals[b].update(vals)
            block_src[b].update({k: f"{w}.{k}" for k in vals})
    layers = d.get("layers") or {}
    if not isinstance(layers, dict):
        raise JaxsimInputError(f"{where}.layers", f"must be a JSON object, got {layers!r}")
    named, named_src = {}, {}
    for name in layers:
        if name not in NAMED_LAYERS:
            raise JaxsimInputError(f"{where}.layers.{name}", "unknown layer (placeable layers outside the blocks: "
                                   f"{', '.join(NAMED_LAYERS)}; blocks are placed with `blocks`)",
                                   unknown_key_fix(name, NAMED_LAYERS))
    for name in NAMED_LAYERS:
        vals = _entry(layers.get(name) or {}, f"{where}.layers.{name}", cxl)
        named[name] = {**default, **vals}
        named_src[name] = {**src_default, **{k: f"{where}.layers.{name}.{k}" for k in vals}}
    everything = [(named_src["embedding"], named["embedding"]), *zip(block_src, block_vals),
                  *((named_src[n], named[n]) for n in NAMED_LAYERS[1:])]
    kv = block_vals[0]["kv_loc"]
    for b, (src, vals) in enumerate(zip(block_src, block_vals)):
        if vals["kv_loc"] != kv:
            raise JaxsimInputError(src["kv_loc"], f"{vals['kv_loc']!r} for block {b} but {kv!r} for block 0 "
                                   f"({block_src[0]['kv_loc']}): a KV cache split over devices is not modelled",
                                   "give every block the same kv_loc")
    for name in NAMED_LAYERS:
        explicit = (layers.get(name) or {}).get("kv_loc")
        if explicit is not None and explicit != kv:
            raise JaxsimInputError(f"{where}.layers.{name}.kv_loc", f"{explicit!r}, but the {name} holds no KV cache and "
                                   f"the blocks keep theirs on {kv!r}", f'leave it out or use "{kv}"')
    kv_device = None
    if kv == "cpu":
        if cpu.capacity_gb is None:
            raise JaxsimInputError(block_src[0]["kv_loc"], "'cpu': a KV cache in the node's host memory needs its "
                                   "capacity, and the node has no cpu_mem.mem_size", "give the node's cpu_mem.mem_size (GB)")
        kv_device = cpu
    elif kv.startswith("cxl:"):
        kv_device = cxl[int(kv[4:])]
    evict = {vals["kv_evict_loc"] for _, vals in everything}
    if len(evict) > 1:
        src = next(s["kv_evict_loc"] for s, v in everything if v["kv_evict_loc"] != default["kv_evict_loc"])
        raise JaxsimInputError(src, f"kv_evict_loc differs between layers ({sorted(evict)}): an instance has one lower "
                               "KV tier", "give every layer the same kv_evict_loc")
    devices = {}
    for _, vals in everything:
        dev = vals["weights"]
        if dev == "cpu":
            devices[dev] = cpu
        elif dev.startswith("cxl:"):
            devices[dev] = cxl[int(dev[4:])]
    wp = WeightPlacement(embedding=named["embedding"]["weights"], blocks=tuple(v["weights"] for v in block_vals),
                         final_layernorm=named["final_layernorm"]["weights"], lm_head=named["lm_head"]["weights"],
                         devices=tuple(devices[k] for k in sorted(devices)), hbm=hbm,
                         kv=kv, kv_device=kv_device, kv_src=block_src[0]["kv_loc"])
    if not wp.placed:
        wp = NPU_ONLY
    return wp, evict.pop()


def json_instance_placement(inst: dict, where: str, num_layers: int, *, cpu: MemoryDevice, cxl: tuple = ()) -> tuple:
    """``(WeightPlacement or None, kv_evict_loc)`` of a cluster JSON instance (REFERENCE.md §3.1):
    its ``placement`` (:func:`parse_placement`) and ``enable_local_offloading`` (a boolean; true
    sends the NPU-resident weights through HBM at ``npu_mem.mem_bw`` GB/s and ``mem_latency`` ns
    per load, §1.10). None: every weight and the KV cache on the NPU, read as profiled."""
    local = inst.get("enable_local_offloading", False)
    if not isinstance(local, bool):
        raise JaxsimInputError(f"{where}.enable_local_offloading", f"must be true or false, got {local!r}")
    hbm = None
    if local:
        mem = inst.get("npu_mem") or {}
        bw, lat = mem.get("mem_bw"), mem.get("mem_latency", 0)
        for k, v, lo in (("mem_bw", bw, 0), ("mem_latency", lat, None)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (
                    v <= 0 if lo is not None else v < 0):
                raise JaxsimInputError(f"{where}.npu_mem.{k}", f"must be a number {'> 0' if lo is not None else '>= 0'} "
                                       f"(enable_local_offloading reads the weights at this rate), got {v!r}")
        hbm = MemoryDevice("hbm", float(bw), float(lat))
    wp, evict = parse_placement(inst.get("placement"), f"{where}.placement", num_layers, cpu=cpu, cxl=cxl, hbm=hbm)
    return (wp if wp.placed else None), evict
