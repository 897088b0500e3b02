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

``kv_loc`` other than ``npu`` (the KV cache itself in host or CXL memory) is refused, naming the
field: it is never ignored (§1.16). ``kv_evict_loc`` (where evicted KV goes: the lower KV tier) is
validated and kept on :class:`jaxsim.spec.InstanceSpec` for the tier.
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

    Returns ``{"prologue": ns, "blocks": int64 [L], "head": ns}``: the end of the embedding's load,
    of each block's, and the later of the final norm's and the lm_head's (0 for a layer on the NPU,
    unless ``placement.hbm`` sends it through HBM)."""
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
    return {"prologue": ends[0], "blocks": np.asarray(ends[1:-2], np.int64), "head": max(ends[-2], ends[-1])}


# ------------------------------------------------------------------------------------------------
# The Hydra description (HardwareConfig fields)
# ------------------------------------------------------------------------------------------------


def offload_block_count(fraction: float, num_layers: int) -> int:
    """Blocks whose weights sit off the NPU at ``weights_offload_fraction`` ``fraction``:
    ``floor(fraction * L + 0.5)`` (the nearest whole block, halves up)."""
    return int(math.floor(fraction * num_layers + 0.5))


def from_hardware(hw, num_layers: int) -> WeightPlacement:
    """The placement a :class:`jaxsim.spec.HardwareConfig` describes: the last
    :func:`offload_block_count` blocks on ``weights_offload_device`` (``cpu``: host memory, with
    ``cpu_mem_bw_gbps`` / ``cpu_mem_latency_ns`` unless ``offload_bw_gbps`` / ``offload_latency_ns``
    are set; ``cxl``: one CXL device, ``cxl:0``, at ``offload_bw_gbps`` / ``offload_latency_ns``)."""
    n = offload_block_count(hw.weights_offload_fraction, num_layers)
    if n == 0:
        return NPU_ONLY
    if hw.weights_offload_device == "cpu":
        dev = MemoryDevice("cpu", hw.offload_bw_gbps if hw.offload_bw_gbps is not None else hw.cpu_mem_bw_gbps,
                           hw.offload_latency_ns if hw.offload_latency_ns is not None else hw.cpu_mem_latency_ns)
    else:
        dev = MemoryDevice("cxl:0", hw.offload_bw_gbps, hw.offload_latency_ns or 0.0)
    return WeightPlacement(blocks=("npu",) * (num_layers - n) + (dev.name,) * n, devices=(dev,))


def resolve(placement: "WeightPlacement | None", hw, num_layers: int, where: str = "hardware") -> WeightPlacement:
    """The placement of one instance: an explicit one (a cluster JSON's), else the one ``hw``
    describes. Both at once is refused (``<where>.weights_offload_fraction``)."""
    if placement is None:
        return from_hardware(hw, num_layers)
    if hw.weights_offload_fraction > 0:
        raise JaxsimInputError(f"{where}.weights_offload_fraction", f"{hw.weights_offload_fraction:g}, but the instance "
                               "already has a weight placement (a cluster JSON's `placement`)",
                               "use one of them: set the fraction to 0 or remove the placement")
    if placement.blocks and len(placement.blocks) != num_layers:
        raise JaxsimInputError(f"{where}.placement", f"places {len(placement.blocks)} blocks, the model has {num_layers}")
    return placement


def check_capacity(plans: list, placements: list, nodes: list, key: str) -> None:
    """Off-NPU weights fit their devices (REFERENCE.md §1.16: charged to host/CXL capacity): the
    per-rank bytes times the TP ranks of every instance, summed per node for ``cpu`` and over the
    cluster for each ``cxl:<id>``, within the device's ``capacity_gb`` (when known).

    ``plans[i].offloaded`` is instance i's :func:`offloaded_bytes`; ``placements[i]`` its placement."""
    used: dict = {}
    caps: dict = {}
    for pl, wp, node in zip(plans, placements, nodes):
        for dev, nbytes in pl.offloaded.items():
            k = (node, dev) if dev == "cpu" else (None, dev)
            used[k] = used.get(k, 0) + nbytes * pl.tp
            cap = wp.device(dev).capacity_gb
            if cap is not None:
                caps[k] = cap
    for k, nbytes in used.items():
        if k in caps and nbytes > caps[k] * 2**30:
            dev = k[1] if k[0] is None else f"node {k[0]}'s cpu"
            raise JaxsimInputError(key, f"{nbytes / 2**30:.2f} GiB of weights placed on {dev}, which holds "
                                   f"{caps[k]:g} GiB", "place fewer layers there or use a larger device")


# ------------------------------------------------------------------------------------------------
# The cluster JSON (REFERENCE.md §3.1)
# ------------------------------------------------------------------------------------------------


def parse_cxl_mem(d, where: str) -> tuple:
    """The top-level ``cxl_mem{mem_size GB, mem_bw GB/s, mem_latency ns, num_devices}`` as
    ``num_devices`` :class:`MemoryDevice` ``cxl:0 ... cxl:n-1``: ``mem_size`` is the whole pool,
    split evenly over the devices (as the KV tier reads it, ``config.tier_from_cluster_json``);
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
    cpu). Raises :class:`JaxsimInputError` naming the JSON path of: an unknown key or layer name,
    a device other than ``npu``/``cpu``/``cxl:<id>`` with ``id < num_devices``, a bad or
    out-of-bounds block range, two ranges that overlap, a ``kv_loc`` other than ``npu`` (KV placed
    in host or CXL memory is not modelled), and ``kv_evict_loc`` values that differ between layers
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
    for src, vals in everything:
        if vals["kv_loc"] != "npu":
            raise JaxsimInputError(src["kv_loc"], f"{vals['kv_loc']!r}: a KV cache held in host or CXL memory is not "
                                   "modelled (jaxsim keeps the KV cache on the NPU; evicted KV goes to the lower tier, "
                                   "kv_evict_loc)", "use \"npu\"")
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
                         devices=tuple(devices[k] for k in sorted(devices)), hbm=hbm)
    if not wp.off_npu:
        wp = NPU_ONLY
    return wp, evict.pop()


def json_instance_placement(inst: dict, where: str, num_layers: int, *, cpu: MemoryDevice, cxl: tuple = ()) -> tuple:
    """``(WeightPlacement or None, kv_evict_loc)`` of a cluster JSON instance (REFERENCE.md §3.1):
    its ``placement`` (:func:`parse_placement`) and ``enable_local_offloading`` (a boolean; true
    sends the NPU-resident weights through HBM at ``npu_mem.mem_bw`` GB/s and ``mem_latency`` ns
    per load, §1.10). None: every weight on the NPU, read as profiled."""
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
    return (wp if wp.off_npu else None), evict
