"""Power and energy: the node ``power`` block, the power cap, and a run's joules and watts.

A node's power (REFERENCE.md §1.13, with jaxsim's corrections of §1.16) is the sum of

* **base**: ``base_node_power`` (fans, board, PSU losses), always on;
* **NPU**, per accelerator of the node's instances: ``idle_power`` always; ``active_power``
  while it computes (its share of an iteration's NPU time: every TP rank for the whole iteration,
  each pipeline stage for its own time, DP padding included; not its waits for PIM results); ``standby_power`` while it is in
  service but not computing (host time, a KV recall, another stage's turn) and for up to
  ``standby_duration`` seconds after its last work, then idle again (the measured A6000 holds
  ~90 W for ~17 s after each burst, then drops to ~33 W);
* **CPU**: ``idle_power + (active_power - idle_power) * util`` always, plus
  ``(active_power - idle_power) * max(busy_util - util, 0)`` while an engine iteration runs (the
  reference's 0.7 busy utilisation; per instance: one engine process each);
* **memory** (host DRAM): ``idle_power`` per DIMM (``cpu_mem.mem_size / dimm_size`` of them) and
  ``energy_per_bit`` (pJ) for every byte moved off the GPUs: weights read from host or CXL memory
  each iteration, KV recalled from and written through to the KV tier below, PIM I/O;
* **PIM** (with ``cpu_mem.pim_config``): the INI's ``peak - idle`` power while PIM attention
  runs (the reference's charge per PIM operation: the PIM's busy time, not per channel), and its
  channels as the node's DIMMs at the INI's idle power;
* **link**: ``idle_power`` per link, and ``energy_per_bit`` (pJ) for the bytes the collectives and
  KV hand-offs move (TP AllReduce rings ``2(N-1) S`` bytes over all ranks, MoE dispatch and
  combine, the pipeline's hidden states ``(pp-1) T H fp``, the P/D KV sent);
* **NIC**, **storage**: idle power per device.

Every node may have its own block (a cluster JSON node's ``power``; the Hydra ``power`` group gives
every node one); a node with none is *unmodelled*: it is named in the outputs and its watts are
missing (NaN), never zero. A component left out of a block (``cpu``, ``dram``, ``link``, ``nic``,
``storage``) is charged nothing and listed as unmodelled (``NodePower.unmodelled``); with PIM the
memory's idle power comes from the INI even without ``dram``.

**Power cap** (``npu.<hw>.power_cap``, W): below the accelerator's ``active_power`` the clock
drops until the dynamic power fits, ``f / f0 = ((cap - idle) / (active - idle)) ** (1 /
cap_power_exponent)`` (dynamic power ~ f V^2 with V ~ f: exponent 3, the classic DVFS law), and
the compute-bound operators (the profiles' dense, per-sequence and MoE layers: the latency
model's ``compute_scale``) take ``(f0 / f) ** cap_time_exponent`` longer (1: time ~ 1 / f);
attention, which reads the KV cache at HBM speed, keeps its time. The NPU then draws ``cap``
while it computes. ``profiled_power_cap``: the board limit the profiles were measured under, when
it bound (their clock is then already ``f(profiled_power_cap)``: the stretch is relative to it, a
cap at it changes nothing, and it is the limit in force when no ``power_cap`` is set). The measured A6000 trace ran at the card's default 300 W limit only, so it
checks the uncapped regime (its peak tick reads 299 W); the two exponents are literature values,
not fitted here.

Energy is linear in every parameter but the standby duration, so the loop meters activity
(:mod:`jaxsim.engine.power`) and this module prices it: :func:`energy` for a run's totals (sweeps
too), :func:`power_series` for 1-s ticks from the iteration rows.
"""

import dataclasses
import math

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from jaxsim.errors import JaxsimInputError

COMPONENTS = ("base", "npu", "cpu", "memory", "pim", "link", "nic", "storage")
NS = 1e-9
PJ = 1e-12


def _num(d: dict, key: str, where: str, lo: float = 0.0, hi: float | None = None, integer: bool = False):
    if key not in d:
        raise JaxsimInputError(f"{where}.{key}", "missing", f"give {key}")
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo \
            or (hi is not None and v > hi) or (integer and v != int(v)):
        rng = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise JaxsimInputError(f"{where}.{key}", f"must be {'an integer' if integer else 'a number'} {rng}, got {v!r}")
    return int(v) if integer else float(v)


def _keys(d, allowed: tuple, where: str) -> dict:
    if not isinstance(d, dict):
        raise JaxsimInputError(where, f"must be an object, got {d!r}")
    for k in d:
        if k not in allowed:
            raise JaxsimInputError(f"{where}.{k}", "unknown field", f"fields: {', '.join(allowed)}")
    return d


@dataclasses.dataclass(frozen=True)
class NPUPower:
    """One accelerator's power states, W, and its standby duration, s; an optional power cap (W)
    with the frequency-scaling exponents of the module docstring."""

    idle_power: float
    standby_power: float
    active_power: float
    standby_duration: float  # seconds (REFERENCE.md §1.16: the reference documents ns, uses s)
    power_cap: float | None = None
    cap_power_exponent: float = 3.0
    cap_time_exponent: float = 1.0
    # The board limit the profiles were measured under (None: none binding): its clock is the
    # profiles' own, so a cap at it stretches nothing.
    profiled_power_cap: float | None = None
    where: str = dataclasses.field(default="power.npu", compare=False)  # for messages

    def __post_init__(self):
        """The checks of every way one is made (a block, a sweep knob's ``dataclasses.replace``)."""
        w = self.where
        for key in ("idle_power", "standby_power", "active_power", "standby_duration"):
            _num({key: getattr(self, key)}, key, w)
        if not self.idle_power <= self.standby_power <= self.active_power:
            raise JaxsimInputError(w, f"needs idle_power <= standby_power <= active_power, got {self.idle_power}, "
                                   f"{self.standby_power}, {self.active_power}", "fix the three powers (W)")
        for key in ("power_cap", "profiled_power_cap"):
            v = getattr(self, key)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > self.idle_power):
                raise JaxsimInputError(f"{w}.{key}", f"{v} W is not above the idle power ({self.idle_power} W)",
                                       "a cap must leave room for work")

    @property
    def cap(self) -> float | None:
        """The limit in force: ``power_cap``, else the profiles' own (None: none)."""
        return self.power_cap if self.power_cap is not None else self.profiled_power_cap

    @property
    def busy_power(self) -> float:
        """W while computing: the active power, or the limit below it."""
        return self.active_power if self.cap is None else min(self.active_power, self.cap)

    @property
    def standby_draw(self) -> float:
        """W at standby: the standby power, or the limit below it."""
        return self.standby_power if self.cap is None else min(self.standby_power, self.cap)

    def clock(self, cap: float | None) -> float:
        """``f / f0`` under ``cap`` (1 when it does not bind; the module docstring's DVFS law)."""
        if cap is None or cap >= self.active_power:
            return 1.0
        return ((cap - self.idle_power) / (self.active_power - self.idle_power)) ** (1 / self.cap_power_exponent)

    @property
    def compute_stretch(self) -> float:
        """How much longer the compute-bound operators take under the cap than in the profiles
        (1: uncapped, or capped at the profiles' own limit)."""
        if self.power_cap is None:
            return 1.0
        ratio = self.clock(self.profiled_power_cap) / self.clock(self.power_cap)  # > 1: slower than profiled
        return float(ratio ** self.cap_time_exponent)


@dataclasses.dataclass(frozen=True)
class NodePower:
    """A node's ``power`` block (see the module docstring; W, pJ/bit, GB). A component that is None
    is unmodelled."""

    base_node_power: float
    npu: dict  # hardware name -> NPUPower
    cpu: dict | None = None  # idle_power, active_power, util, busy_util
    dram: dict | None = None  # dimm_size (GB), idle_power (per DIMM), energy_per_bit (pJ)
    link: dict | None = None  # num_links, idle_power (per link), energy_per_bit (pJ)
    nic: dict | None = None  # num_nics, idle_power (per NIC)
    storage: dict | None = None  # num_devices, idle_power (per device)
    where: str = "power"  # where it was given, for messages

    def npu_of(self, hardware: str, where: str) -> NPUPower:
        if hardware not in self.npu:
            raise JaxsimInputError(f"{self.where}.npu", f"has no entry for {hardware!r}, the hardware of {where}",
                                   f"add npu.{hardware} (known: {', '.join(sorted(self.npu)) or 'none'})")
        return self.npu[hardware]

    @property
    def unmodelled(self) -> tuple:
        return tuple(c for c in ("cpu", "dram", "link", "nic", "storage") if getattr(self, c) is None)


def node_power(d: dict, where: str = "power", *, cap: float | None = None) -> NodePower:
    """Parse a node's ``power`` block (REFERENCE.md §3.1; the Hydra ``power`` section has the same
    fields). ``cap``: a power cap (W) for every NPU that sets none.

    Raises:
      JaxsimInputError: an unknown or missing field, a value out of range, naming ``where``.
    """
    _keys(d, ("base_node_power", "npu", "cpu", "dram", "link", "nic", "storage"), where)
    npu = {}
    for hw, e in _keys(d.get("npu") if d.get("npu") is not None else {}, tuple(d.get("npu") or ()), f"{where}.npu").items():
        w = f"{where}.npu.{hw}"
        _keys(e, ("idle_power", "standby_power", "active_power", "standby_duration", "standby_duration_s",
                  "power_cap", "cap_power_exponent", "cap_time_exponent", "profiled_power_cap"), w)
        if "standby_duration" in e and "standby_duration_s" in e:
            raise JaxsimInputError(f"{w}.standby_duration_s", "given together with standby_duration (both seconds)",
                                   "keep one")
        dur = _num({**e, "standby_duration": e.get("standby_duration", e.get("standby_duration_s"))}
                   if ("standby_duration" in e or "standby_duration_s" in e) else e, "standby_duration", w)
        p = NPUPower(idle_power=_num(e, "idle_power", w), standby_power=_num(e, "standby_power", w),
                     active_power=_num(e, "active_power", w), standby_duration=dur,
                     power_cap=_num(e, "power_cap", w) if e.get("power_cap") is not None else cap,
                     cap_power_exponent=_num(e, "cap_power_exponent", w, lo=0.5) if "cap_power_exponent" in e else 3.0,
                     cap_time_exponent=_num(e, "cap_time_exponent", w, hi=1.0) if "cap_time_exponent" in e else 1.0,
                     profiled_power_cap=_num(e, "profiled_power_cap", w) if e.get("profiled_power_cap") is not None
                     else None, where=w)
        npu[str(hw)] = p
    if not npu:
        raise JaxsimInputError(f"{where}.npu", "missing or empty", "give each accelerator's powers: npu.<hardware>")

    def part(key, fields, ints=(), his=None):
        if d.get(key) is None:
            return None
        e = _keys(d[key], fields, f"{where}.{key}")
        return {f: _num(e, f, f"{where}.{key}", integer=f in ints, hi=(his or {}).get(f)) if f in e or f != "busy_util"
                else 0.7 for f in fields}

    return NodePower(
        base_node_power=_num(d, "base_node_power", where), npu=npu,
        cpu=part("cpu", ("idle_power", "active_power", "util", "busy_util"), his={"util": 1.0, "busy_util": 1.0}),
        dram=_dram(part("dram", ("dimm_size", "idle_power", "energy_per_bit")), f"{where}.dram"),
        link=part("link", ("num_links", "idle_power", "energy_per_bit"), ints=("num_links",)),
        nic=part("nic", ("num_nics", "idle_power"), ints=("num_nics",)),
        storage=part("storage", ("num_devices", "idle_power"), ints=("num_devices",)), where=where)


def _dram(d: dict | None, where: str) -> dict | None:
    if d is not None and d["dimm_size"] <= 0:
        raise JaxsimInputError(f"{where}.dimm_size", f"must be > 0 GB, got {d['dimm_size']}", "give one DIMM's GB")
    return d


@dataclasses.dataclass(frozen=True)
class InstancePower:
    """What pricing one instance's activity needs (host side; :func:`attach`)."""

    node: int
    npu: NPUPower | None  # None: its node is unmodelled
    npus: int  # tp * pp
    tp: int
    link_token_bytes: float  # link bytes per scheduled token of an iteration (all ranks)
    dispatch_bytes: float  # link bytes per max(1, T // ep) (MoE dispatch AllGather, all ranks)
    wload_bytes: int  # weight bytes read from host / CXL memory per iteration (all ranks)
    ep: int = 1  # expert-parallel ranks (the dispatch AllGather's divisor)
    # PIM attention offload (Plan.pim): the INI's peak - idle power, W, drawn while PIM works, and the
    # node's PIM memory: its channels (one DIMM each) at the INI's idle power, W (0: no PIM)
    pim_dynamic_w: float = 0.0
    pim_dimms: int = 0
    pim_idle_w: float = 0.0


def traffic_coefficients(tables, pp: int) -> tuple:
    """``(link bytes per token, bytes per dispatch unit)`` of one instance's iterations, from its
    latency tables' layout (``tp``, ``ep``, hidden size, experts, activation bytes, collectives per
    iteration): ring AllReduce ``2 (tp-1) T H fp`` per AllReduce over all ranks; MoE combine
    ``(ep-1) T H fp`` and dispatch ``ep (ep-1) max(1, T//ep) (H+E) fp`` per MoE block; the pipeline's
    hidden state ``(pp-1) T H fp``."""
    tp, ep = int(np.asarray(tables.tp)), int(np.asarray(tables.ep))
    H, E, fp = int(np.asarray(tables.hidden)), int(np.asarray(tables.moe_experts)), int(np.asarray(tables.weight_bytes))
    ar, moe = int(np.asarray(tables.ar_count)), int(np.asarray(tables.moe_blocks))
    per_token = ar * 2 * (tp - 1) * H * fp + moe * (ep - 1) * H * fp + (pp - 1) * H * fp
    return float(per_token), float(moe * ep * (ep - 1) * (H + E) * fp)


@dataclasses.dataclass(frozen=True)
class PowerConfig:
    """The power blocks of a run's nodes: ``nodes`` (node index -> block, e.g. a cluster JSON's),
    else ``default`` (the Hydra ``power`` section) for every other node; ``cpu_mem_gb``: each
    node's host memory, GB (its DIMM count)."""

    nodes: dict = dataclasses.field(default_factory=dict)
    default: NodePower | None = None
    cpu_mem_gb: dict = dataclasses.field(default_factory=dict)
    default_cpu_mem_gb: float = 0.0  # host memory of a node missing from cpu_mem_gb

    def __post_init__(self):
        for n, b in self.nodes.items():
            if isinstance(n, bool) or not isinstance(n, int) or not (b is None or isinstance(b, NodePower)):
                raise JaxsimInputError(f"PowerConfig.nodes[{n!r}]", "must map a node index (int) to a NodePower",
                                       "parse blocks with jaxsim.power.node_power")
        if self.default is not None and not isinstance(self.default, NodePower):
            raise JaxsimInputError("PowerConfig.default", f"must be a NodePower, got {type(self.default).__name__}",
                                   "parse it with jaxsim.power.node_power")

    def block(self, node: int) -> "NodePower | None":
        return self.nodes.get(node, self.default)

    def with_npu(self, **fields) -> "PowerConfig":
        """Every NPU entry of every block with ``fields`` replaced (the sweep's power knobs)."""
        def one(b):
            return None if b is None else dataclasses.replace(
                b, npu={k: dataclasses.replace(v, **fields) for k, v in b.npu.items()})
        return dataclasses.replace(self, nodes={n: one(b) for n, b in self.nodes.items()}, default=one(self.default))


def hardware_key(name: str) -> str:
    """The ``npu`` key of a hardware name: its last path part (``legacy/A6000`` -> ``A6000``)."""
    return name.split("/")[-1]


def attach(plans: list, cfg: "PowerConfig | None", hardware: list, where: list) -> list:
    """The plans with their power (``Plan.power``: :class:`InstancePower`) and the power cap's
    slower compute in their latency tables; unchanged without ``cfg``. ``hardware``: each plan's
    hardware name; ``where``: how to name each instance in an error."""
    if cfg is None:
        return plans
    if not isinstance(cfg, PowerConfig):
        raise JaxsimInputError("power", f"must be a jaxsim.power.PowerConfig, got {type(cfg).__name__}",
                               "build one: PowerConfig(default=node_power({...}), default_cpu_mem_gb=...)")
    out = []
    for pl, hw, w in zip(plans, hardware, where):
        block = cfg.block(pl.node)
        npu = None if block is None else block.npu_of(hardware_key(hw), w)
        link, disp = traffic_coefficients(pl.tables, pl.pp)
        pim = getattr(pl, "pim", None)
        ip = InstancePower(node=pl.node, npu=npu, npus=pl.tp * pl.pp, tp=pl.tp, link_token_bytes=link,
                           dispatch_bytes=disp, wload_bytes=sum(pl.offloaded.values()) * pl.tp,
                           ep=int(np.asarray(pl.tables.ep)),
                           **({} if pim is None else dict(
                               pim_dynamic_w=(pim.device.peak_power_mw - pim.device.idle_power_mw) / 1000,
                               pim_dimms=pim.num_channels, pim_idle_w=pim.device.idle_power_mw / 1000)))
        out.append(dataclasses.replace(pl, tables=capped_tables(pl.tables, npu), power=ip))
    return out


def host_info(plans: list, cfg: PowerConfig) -> dict:
    """What pricing a run needs besides its activity (``Prepared.power``)."""
    nodes = sorted({pl.node for pl in plans})
    mem = {n: cfg.cpu_mem_gb.get(n, cfg.default_cpu_mem_gb) for n in nodes}
    for n in nodes:
        b = cfg.block(n)
        if b is not None and b.dram and mem[n] <= 0:
            raise JaxsimInputError(f"{b.where}.dram", f"node {n}'s host memory size is unknown: its DIMMs cannot be "
                                   "counted", "give the node's cpu_mem.mem_size (cluster JSON) or power.cpu_mem_size (GB)")
    return dict(instances=[pl.power for pl in plans], nodes={n: cfg.block(n) for n in nodes},
                cpu_mem_gb=mem)


def engine_params(insts: "list[InstancePower]"):
    """The loop's :class:`jaxsim.engine.power.PowerParams` of the plans' instances ([inst] leaves;
    every plan of a run has one, :func:`attach`); an instance on an unmodelled node meters nothing
    per request."""
    from jaxsim.engine.power import PowerParams
    modelled = [p if p.npu is not None else None for p in insts]
    return PowerParams(
        standby_duration_ns=jnp.asarray([int(round(p.npu.standby_duration * 1e9)) if p else 0 for p in modelled],
                                        jnp.int64),
        npu_dynamic_w=jnp.asarray([p.npu.busy_power - p.npu.idle_power if p else 0.0 for p in modelled], jnp.float64),
        ep=jnp.asarray([p.ep for p in insts], jnp.int64))


def capped_tables(tables, npu: NPUPower | None):
    """The latency tables with the power cap's slower compute (``compute_scale`` x the stretch)."""
    if npu is None or npu.compute_stretch == 1.0:
        return tables
    return eqx.tree_at(lambda t: t.compute_scale, tables, tables.compute_scale * npu.compute_stretch)


# ------------------------------------------------------------------------------------------------
# Pricing
# ------------------------------------------------------------------------------------------------


def _node_constant_w(block: NodePower, npus: "list[InstancePower]", cpu_mem_gb: float) -> dict:
    """A node's always-on watts by component (the NPUs' idle power included)."""
    w = {c: 0.0 for c in COMPONENTS}
    w["base"] = block.base_node_power
    w["npu"] = sum(p.npu.idle_power * p.npus for p in npus)
    if block.cpu:
        w["cpu"] = block.cpu["idle_power"] + (block.cpu["active_power"] - block.cpu["idle_power"]) * block.cpu["util"]
    pim = [p for p in npus if p.pim_dimms]
    if pim:  # PIM memory: its channels are the DIMMs, at the INI's idle power (REFERENCE.md §1.13)
        w["memory"] = pim[0].pim_idle_w * pim[0].pim_dimms
    elif block.dram:
        w["memory"] = block.dram["idle_power"] * math.floor(cpu_mem_gb / block.dram["dimm_size"]) \
            if block.dram["dimm_size"] > 0 else 0.0
    if block.link:
        w["link"] = block.link["idle_power"] * block.link["num_links"]
    if block.nic:
        w["nic"] = block.nic["idle_power"] * block.nic["num_nics"]
    if block.storage:
        w["storage"] = block.storage["idle_power"] * block.storage["num_devices"]
    return w


def _dynamic_j(p: InstancePower, block: NodePower, busy_ns, service_ns, standby_ns, tokens, dispatch,
               dram_bytes, link_bytes, pim_ns) -> dict:
    """An instance's energy above the always-on watts, J, by component. Every argument is a number
    or an array of the same shape (one iteration each, or the run's totals): the formulas are
    linear in them. ``standby_ns``: NPU time at standby outside iterations (per NPU);
    ``dram_bytes``/``link_bytes``: bytes besides the weight loads and the collectives."""
    npu = p.npu
    busy_rank_s = np.asarray(busy_ns, np.float64) * p.tp * NS
    idle_in_service_s = np.asarray(service_ns, np.float64) * p.npus * NS - busy_rank_s
    e = {c: 0.0 for c in COMPONENTS}
    e["npu"] = ((npu.busy_power - npu.idle_power) * busy_rank_s + (npu.standby_draw - npu.idle_power)
                * (idle_in_service_s + np.asarray(standby_ns, np.float64) * p.npus * NS))
    if block.cpu:
        c = block.cpu
        e["cpu"] = (c["active_power"] - c["idle_power"]) * max(c["busy_util"] - c["util"], 0.0) \
            * np.asarray(service_ns, np.float64) * NS
    moved = np.asarray(dram_bytes, np.float64)
    if block.dram:
        e["memory"] = block.dram["energy_per_bit"] * 8 * PJ * moved
    links = (np.asarray(tokens, np.float64) * p.link_token_bytes + np.asarray(dispatch, np.float64) * p.dispatch_bytes
             + np.asarray(link_bytes, np.float64))
    if block.link:
        e["link"] = block.link["energy_per_bit"] * 8 * PJ * links
    e["pim"] = p.pim_dynamic_w * np.asarray(pim_ns, np.float64) * NS
    return e


ACTIVITY_FIELDS = ("iterations", "busy_ns", "in_service_ns", "standby_ns", "last_end", "tokens", "dispatch", "pim_ns",
                   "pim_io")


def run_info(info: dict, activity: dict, recalled, written: dict, chunk_bytes, kv_sent) -> dict:
    """``info`` (:func:`host_info`) with a run's metered ``activity`` ({field: [inst]}) and the
    bytes it moved besides the collectives: per instance the weights read off the GPU each
    iteration, the KV chunks it recalled (``recalled`` [inst]) and, charged to a pool's first
    instance, the chunks written through to each pool (``written``: {first instance: chunks});
    ``chunk_bytes`` [inst]; ``kv_sent`` [inst]: P/D KV bytes each instance sent."""
    act = {k: np.asarray(activity[k]) for k in ACTIVITY_FIELDS}
    wload = np.array([ip.wload_bytes for ip in info["instances"]], np.float64)
    dram = (wload * act["iterations"] + np.asarray(recalled, np.float64) * np.asarray(chunk_bytes, np.float64)
            + act["pim_io"])
    for first, chunks in written.items():
        dram[first] += chunks * float(np.asarray(chunk_bytes)[first])
    return {**info, "activity": act, "dram_bytes": dram, "link_bytes": np.asarray(kv_sent, np.float64)}


def energy(info: dict, t0_ns: int, t_end_ns: int) -> dict:
    """A run's energy over ``[t0_ns, t_end_ns]`` (its iterations all lie in it) from its metered
    activity (``SimResult.power``, :func:`run_info`): ``{"nodes": [{node, modelled, unmodelled,
    joules: {component: J}, ...}], "joules": {component: J}, "total_j", "average_w", ...}``; an
    unmodelled node's joules are NaN and it is left out of the totals, which say so
    (``unmodelled_nodes``; NaN when no node is modelled).

    Raises:
      ValueError: the window ends before it starts."""
    if t_end_ns < t0_ns:
        raise ValueError(f"energy: the window ends ({t_end_ns} ns) before it starts ({t0_ns} ns)")
    insts, blocks, act = info["instances"], info["nodes"], info["activity"]
    per_node = []
    for n in sorted(blocks):
        block = blocks[n]
        mine = [i for i, p in enumerate(insts) if p.node == n]
        if block is None:
            per_node.append(dict(node=n, modelled=False, joules={c: math.nan for c in COMPONENTS}))
            continue
        const = _node_constant_w(block, [insts[i] for i in mine], info["cpu_mem_gb"].get(n, 0.0))
        j = {c: const[c] * (t_end_ns - t0_ns) * NS for c in COMPONENTS}
        for i in mine:
            p = insts[i]
            tail = _tail_ns(p, act["last_end"][i], t_end_ns)
            d = _dynamic_j(p, block, act["busy_ns"][i], act["in_service_ns"][i], act["standby_ns"][i] + tail,
                           act["tokens"][i], act["dispatch"][i], info["dram_bytes"][i], info["link_bytes"][i],
                           act["pim_ns"][i])
            for c in COMPONENTS:
                j[c] += float(d[c])
        per_node.append(dict(node=n, modelled=True, unmodelled=list(block.unmodelled), joules=j,
                             always_on_w=const))
    modelled = [d for d in per_node if d["modelled"]]
    total = {c: sum(d["joules"][c] for d in modelled) if modelled else math.nan for c in COMPONENTS}
    t = (t_end_ns - t0_ns) * NS
    return dict(nodes=per_node, joules=total, total_j=sum(total.values()),
                average_w=sum(total.values()) / t if t > 0 else math.nan,
                unmodelled_nodes=[d["node"] for d in per_node if not d["modelled"]], duration_s=t)


def _tail_ns(p: InstancePower, last_end, t_end_ns: int):
    """Standby after an instance's last iteration, up to ``t_end_ns``."""
    if p.npu is None or last_end < 0:
        return 0
    return int(min(max(t_end_ns - last_end, 0), round(p.npu.standby_duration * 1e9)))


def _spread(start, end, joules, t0: int, interval_ns: int, nbins: int, t1: int | None = None) -> np.ndarray:
    """Energy ``joules`` of intervals ``[start, end)`` (ns) spread evenly over them into bins of
    ``interval_ns`` from ``t0``; an empty interval falls in the bin of its start. Only what lies
    in ``[t0, t1)`` is counted (``t1``: the end of the last bin by default)."""
    t1 = t0 + nbins * interval_ns if t1 is None else min(t1, t0 + nbins * interval_ns)
    start, end = np.asarray(start, np.int64), np.asarray(end, np.int64)
    joules = np.broadcast_to(np.asarray(joules, np.float64), start.shape)
    # an interval straddling t0 or t1 keeps its part inside
    lo, hi = np.clip(start, t0, t1), np.clip(end, t0, t1)
    dur = end - start
    inside = (start >= t0) & (start < t1)
    joules = joules * np.where(dur > 0, np.maximum(hi - lo, 0) / np.maximum(dur, 1), inside.astype(float))
    start, end = lo, np.maximum(hi, lo)
    out = np.zeros(nbins, np.float64)
    b0 = (start - t0) // interval_ns
    b1 = (np.maximum(end, start + 1) - 1 - t0) // interval_ns
    one = b0 == b1
    keep = one & (b0 < nbins)
    np.add.at(out, b0[keep], joules[keep])
    many = np.nonzero(~one)[0]
    if many.size:
        counts = (b1 - b0 + 1)[many]
        idx = np.repeat(many, counts)
        b = b0[idx] + (np.arange(idx.size) - np.repeat(np.cumsum(counts) - counts, counts))
        lo = np.maximum(start[idx], t0 + b * interval_ns)
        hi = np.minimum(end[idx], t0 + (b + 1) * interval_ns)
        frac = (hi - lo) / (end[idx] - start[idx])
        ok = b < nbins
        np.add.at(out, b[ok], joules[idx][ok] * frac[ok])
    return out


def power_series(result, interval_s: float, origin_ns: int, nbins: int, end_ns: int | None = None) -> dict:
    """Watts per interval ``[origin + (k-1) dt, origin + k dt)`` for k = 1..nbins, from the
    iteration rows: ``power_w`` (the modelled nodes), ``<component>_power_w``, and per node
    ``node<n>_power_w`` / ``node<n>_<component>_power_w`` when the cluster has several nodes (NaN
    for an unmodelled node). Each iteration's energy is spread evenly over its interval; standby
    after each stretch of work lasts its duration or until the next work. ``end_ns``: the run's
    window ends there (e.g. its last completion, as :func:`energy`'s): a bin that it cuts is the
    mean power over its part inside, a bin past it 0; the bins' watts x their covered seconds then
    sum to :func:`energy` over ``[origin_ns, end_ns]``."""
    if not (interval_s > 0 and math.isfinite(interval_s)):
        raise ValueError(f"power_series: interval_s must be a positive number of seconds, got {interval_s!r}")
    info = result.power
    dt_ns = int(round(interval_s * 1e9))
    n_rows = np.asarray(result.iter_end_ns).shape[0]
    inst_of = np.zeros(n_rows, np.int64) if result.iter_instance is None else np.asarray(result.iter_instance)
    start, end = np.asarray(result.iter_start_ns, np.int64), np.asarray(result.iter_end_ns, np.int64)
    busy, tokens = np.asarray(result.iter_busy_ns, np.int64), np.asarray(result.iter_num_tokens, np.int64)
    pim = np.asarray(result.iter_pim_ns, np.int64)
    row_dram = info["row_dram_bytes"]  # [rows]
    horizon = origin_ns + nbins * dt_ns if end_ns is None else min(int(end_ns), origin_ns + nbins * dt_ns)
    # the seconds of each bin inside the window
    covered = np.clip(horizon - (origin_ns + np.arange(nbins) * dt_ns), 0, dt_ns) / 1e9
    span = np.where(covered > 0, covered, 1.0)  # joules -> mean watts over the covered part

    def spread(s, e, j):
        return _spread(s, e, j, origin_ns, dt_ns, nbins, horizon) / span

    out: dict = {}
    totals = {c: np.zeros(nbins) for c in COMPONENTS}
    modelled_any = False
    for n in sorted(info["nodes"]):
        block = info["nodes"][n]
        cols = {c: np.full(nbins, math.nan) for c in COMPONENTS}
        if block is not None:
            modelled_any = True
            mine = [i for i, p in enumerate(info["instances"]) if p.node == n]
            const = _node_constant_w(block, [info["instances"][i] for i in mine], info["cpu_mem_gb"].get(n, 0.0))
            cols = {c: np.where(covered > 0, const[c], 0.0) for c in COMPONENTS}
            for i in mine:
                p = info["instances"][i]
                r = np.nonzero(inst_of == i)[0]
                r = r[np.argsort(end[r], kind="stable")]
                s, e = start[r], end[r]
                prev = np.concatenate([[-1], np.maximum.accumulate(e)[:-1]])
                fresh = np.maximum(e - np.maximum(s, prev), 0)
                dispatch = np.maximum(1, tokens[r] // max(p.ep, 1))
                d = _dynamic_j(p, block, busy[r], fresh, 0, tokens[r], dispatch, row_dram[r], 0, pim[r])
                # standby after each stretch of work: until the next work, at most the duration
                reach = np.maximum.accumulate(e) if e.size else e
                nxt = np.concatenate([s[1:], [horizon]])
                dur = int(round(p.npu.standby_duration * 1e9))
                gap_end = np.minimum(np.maximum(nxt, reach), reach + dur)
                gap = nxt > reach
                sb_w = (p.npu.standby_draw - p.npu.idle_power) * p.npus
                for c in COMPONENTS:
                    if np.ndim(d[c]):
                        cols[c] += spread(s, e, d[c])
                cols["npu"] += spread(reach[gap], gap_end[gap], sb_w * (gap_end[gap] - reach[gap]) * NS)
            for at, nbytes in info["link_events"].get(n, ()):  # P/D KV sent by the node's instances
                if block.link:
                    cols["link"] += spread(at, at, block.link["energy_per_bit"] * 8 * PJ * nbytes)
            for at, nbytes in info["write_events"].get(n, ()):  # KV written through to the tier below
                if block.dram:
                    cols["memory"] += spread(at, at, block.dram["energy_per_bit"] * 8 * PJ * nbytes)
            for c in COMPONENTS:
                totals[c] += cols[c]
        if len(info["nodes"]) > 1:
            out[f"node{n}_power_w"] = sum(cols.values())
            out.update({f"node{n}_{c}_power_w": cols[c] for c in COMPONENTS})
    if modelled_any:
        out["power_w"] = sum(totals.values())
        out.update({f"{c}_power_w": totals[c] for c in COMPONENTS})
    return out
