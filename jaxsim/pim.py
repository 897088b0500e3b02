"""PIM attention offload, host side (REFERENCE.md §1.11, §3.4): the device INI, the channel
geometry, and the PIM latency model.

**Device.** A PIM device is a DRAMSim3-style INI (``profiles/pim/<stem>.ini``, or a path): sections
flattened, ``#`` comments stripped, keys unique. :func:`load_device` reads it into a
:class:`PimDevice` with its geometry (§1.11)::

    devices      = bus_width / device_width
    page_B       = columns * device_width / 8
    MB_per_bank  = page_B * (rows / 1024) / 1024
    MB_per_rank  = MB_per_bank * bankgroups * banks_per_group * devices
    channel_GB   = max(channel_size, MB_per_rank) / 1024
    channel_bw   = bus_width / 8 * data_rate / 1000           GB/s
    read_latency = CL * tCK                                   ns
    num_ch       = floor(cpu_mem.mem_size / channel_GB)

and its idle and peak power (mW, for the power model). With PIM, the node's host memory *is* the
PIM memory: its aggregate bandwidth ``num_ch * channel_bw`` and ``read_latency`` replace
``cpu_mem.mem_bw`` / ``mem_latency`` (the token-id and sampled-id host operations of §2.1).

**Latency.** Decode attention of one request on one channel ("a placement") takes, as in the
reference simulator (§1.11)::

    t = (slope * g * L_ctx + intercept * q) / split          ns
    g = (n_head / n_kv_head) / 4,   q = n_head * head_dim / 4096,   split = min(num_ch, n_kv_head)

``slope`` (ns per context token) and ``intercept`` (ns) are the device's coefficients at the
geometry the reference fitted them on (Llama-3.1-8B: 32 query heads in groups of 4 per KV head,
head_dim 128, bf16 KV); ``g`` and ``q`` carry them to other models the reference's way. The
reference fits them per device, from simulations, and ships four fits: a new INI has none. jaxsim
derives them from the INI instead (:func:`derived_coefficients`), with three global constants
fitted jointly on the reference's four fits (``scripts/pim_fit.py`` prints the fit, its per-device
error and its leave-one-device-out error; README "PIM attention offload")::

    slope     = C_CLOCK * tCK + C_STREAM * kv_B / (channel_bw * banks)
    intercept = C_WRITE * CWL * tCK

* ``C_CLOCK * tCK``: a fixed number of DRAM clock cycles of in-bank compute per context token;
* ``kv_B / (channel_bw * banks)``: the token's K and V (``kv_B`` = 2 x 8 KV heads x 128 x KV bytes,
  4,096 at bf16) streamed at the channel's all-bank rate (``banks`` = bankgroups x banks_per_group
  banks working in parallel), ``C_STREAM`` times over;
* ``C_WRITE * CWL * tCK``: a fixed cost of write latencies (the query and the softmax's
  probabilities written into the PIM's buffers) per placement.

Explicit coefficients (``hardware.pim_slope_ns`` / ``pim_intercept_ns``) replace the derived ones,
e.g. the reference's own fits for reference-mode parity. Placement, timing and the sub-batch
schedule run on the device: :mod:`jaxsim.latency.pim`.
"""

import dataclasses
import math
from pathlib import Path

import numpy as np

from jaxsim.errors import JaxsimInputError

# Keys of the INI every use reads (REFERENCE.md §3.4), and those the derived latency model reads.
GEOMETRY_KEYS = ("bankgroups", "banks_per_group", "rows", "columns", "device_width", "bus_width", "channel_size",
                 "data_rate", "CL", "tCK", "idle_power", "peak_power")
DERIVED_KEYS = ("CWL",)

# The derived latency model's global constants, fitted jointly (relative least squares) on the
# reference's per-device fits of DDR4_8GB_3200, LPDDR4X_2GB_4266, LPDDR5_2GB_6400 and HBM2_1GB_2000
# (scripts/pim_fit.py; tests/test_pim.py checks that they are that fit's, rounded).
C_CLOCK = 146.29  # DRAM clock cycles of compute per context token
C_STREAM = 11.998  # passes over the token's KV at the channel's all-bank rate
C_WRITE = 3393.7  # write latencies per placement
REFERENCE_KV_BYTES = 4096  # K+V bytes of one token of one layer at the fitted geometry (8 x 128 x 2 x 2)


@dataclasses.dataclass(frozen=True)
class PimDevice:
    """One PIM device (an INI) and its geometry (REFERENCE.md §1.11). Sizes in MB (2^20 bytes),
    GB as the reference reads them (MB / 1024), times in ns, power in mW."""

    name: str  # the INI's stem
    path: str
    params: dict  # the flattened INI (key -> value string)
    bankgroups: int
    banks_per_group: int
    rows: int
    columns: int
    device_width: int
    bus_width: int
    channel_size_mb: float
    data_rate: float  # MT/s
    cl: float  # cycles
    tck_ns: float
    idle_power_mw: float
    peak_power_mw: float
    cwl: float | None = None  # cycles (the derived latency model's write latency; None: not given)

    @property
    def devices(self) -> int:
        return self.bus_width // self.device_width

    @property
    def page_bytes(self) -> float:
        return self.columns * self.device_width / 8

    @property
    def mb_per_bank(self) -> float:
        return self.page_bytes * (self.rows / 1024) / 1024

    @property
    def mb_per_rank(self) -> float:
        return self.mb_per_bank * self.bankgroups * self.banks_per_group * self.devices

    @property
    def channel_gb(self) -> float:
        return max(self.channel_size_mb, self.mb_per_rank) / 1024

    @property
    def channel_bw_gbps(self) -> float:
        return self.bus_width / 8 * self.data_rate / 1000

    @property
    def read_latency_ns(self) -> float:
        return self.cl * self.tck_ns

    @property
    def banks(self) -> int:
        return self.bankgroups * self.banks_per_group

    def num_channels(self, mem_size_gb: float) -> int:
        """PIM channels in ``mem_size_gb`` of host memory (the node's ``cpu_mem.mem_size``)."""
        return int(math.floor(mem_size_gb / self.channel_gb + 1e-9))


def read_ini(path) -> dict:
    """The flattened INI at ``path``: ``{key: value}`` (strings), sections dropped and ``#``
    comments stripped. A key given twice (in any sections) or a line that is not ``key = value``
    is an error naming the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise JaxsimInputError(str(path), f"cannot read the PIM INI: {e}") from None
    out, line_of = {}, {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line or (line.startswith("[") and line.endswith("]")):
            continue
        key, eq, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key:
            raise JaxsimInputError(f"{path}:{n}", f"not a 'key = value' line: {raw.strip()!r}")
        if key in out:
            raise JaxsimInputError(f"{path}:{n}", f"key {key!r} given twice (first on line {line_of[key]}); sections "
                                   "are flattened, so keys must be unique", "remove one of them")
        out[key], line_of[key] = value, n
    return out


def _number(params: dict, key: str, path, *, integer=False, required=True):
    if key not in params:
        if not required:
            return None
        raise JaxsimInputError(f"{path}: {key}", "missing: the PIM geometry and latency need it",
                               f"add '{key} = <value>' (REFERENCE.md §3.4)")
    try:
        v = float(params[key])
    except ValueError:
        raise JaxsimInputError(f"{path}: {key}", f"must be a number, got {params[key]!r}") from None
    if not (math.isfinite(v) and v > 0) or (integer and v != int(v)):
        raise JaxsimInputError(f"{path}: {key}", f"must be a {'whole ' if integer else ''}number > 0, got "
                               f"{params[key]!r}")
    return int(v) if integer else v


def shipped_devices(pim_dir) -> list:
    """The INI stems in ``pim_dir`` (``profiles/pim``)."""
    return sorted(p.stem for p in Path(pim_dir).glob("*.ini"))


def load_device(name: str, pim_dir="profiles/pim", where: str = "hardware.pim_config") -> PimDevice:
    """The PIM device ``name``: an INI stem in ``pim_dir`` (``cpu_mem.pim_config``, e.g.
    ``DDR4_8GB_3200_pim``) or a path to an ``.ini`` file. ``where`` names the setting in errors.

    Raises:
        JaxsimInputError: an unknown stem (listing the shipped ones), a missing, duplicate or
        non-numeric key (naming the file and key), a bus width that is not a multiple of the
        device width.
    """
    if not isinstance(name, str) or not name:
        raise JaxsimInputError(where, f"must be a PIM INI stem or path, got {name!r}",
                               f"one of {shipped_devices(pim_dir)}")
    path = Path(name) if name.endswith(".ini") else Path(pim_dir) / f"{name}.ini"
    if not path.is_file():
        raise JaxsimInputError(where, f"unknown PIM device {name!r} (no {path})",
                               f"one of {shipped_devices(pim_dir)}, or a path to an .ini file")
    p = read_ini(path)
    num = {k: _number(p, k, path, integer=k in ("bankgroups", "banks_per_group", "rows", "columns", "device_width",
                                                   "bus_width")) for k in GEOMETRY_KEYS}
    if num["bus_width"] % num["device_width"]:
        raise JaxsimInputError(f"{path}: bus_width", f"{num['bus_width']} is not a multiple of device_width "
                               f"{num['device_width']} (devices per rank = bus_width / device_width)")
    return PimDevice(name=path.stem, path=str(path), params=p, bankgroups=num["bankgroups"],
                     banks_per_group=num["banks_per_group"], rows=num["rows"], columns=num["columns"],
                     device_width=num["device_width"], bus_width=num["bus_width"],
                     channel_size_mb=num["channel_size"], data_rate=num["data_rate"], cl=num["CL"],
                     tck_ns=num["tCK"], idle_power_mw=num["idle_power"], peak_power_mw=num["peak_power"],
                     cwl=_number(p, "CWL", path, required=False))


# ------------------------------------------------------------------------- the latency model
def model_features(dev: PimDevice, kv_bytes: float = REFERENCE_KV_BYTES) -> tuple:
    """The derived model's terms of ``dev`` (ns): ``((tCK, kv_B / (channel_bw * banks)), CWL * tCK)``
    (``kv_B``: K+V bytes of one token, 4,096 at the fitted geometry). ``CWL * tCK`` is None when
    the INI has no CWL."""
    stream = kv_bytes / (dev.channel_bw_gbps * dev.banks)
    return (dev.tck_ns, stream), (None if dev.cwl is None else dev.cwl * dev.tck_ns)


def derived_coefficients(dev: PimDevice, kv_element_bytes: int = 2, constants=None) -> tuple:
    """``(slope ns per context token, intercept ns)`` of ``dev`` at the fitted geometry (module
    docstring), with the KV's element size ``kv_element_bytes`` (2: bf16; the stream term scales
    with it). ``constants``: ``(C_CLOCK, C_STREAM, C_WRITE)``, default the module's.

    Raises:
        JaxsimInputError: the INI has no ``CWL`` (give explicit coefficients instead).
    """
    c_clock, c_stream, c_write = constants or (C_CLOCK, C_STREAM, C_WRITE)
    (tck, stream), write = model_features(dev, REFERENCE_KV_BYTES * kv_element_bytes / 2)
    if write is None:
        raise JaxsimInputError(f"{dev.path}: CWL", "missing: the derived PIM latency model reads the write latency",
                               "add 'CWL = <cycles>', or give hardware.pim_slope_ns and pim_intercept_ns")
    return c_clock * tck + c_stream * stream, c_write * write


def fit_constants(devices: dict, fits: dict) -> tuple:
    """Fit ``(C_CLOCK, C_STREAM)`` and ``C_WRITE`` jointly over ``devices`` (name -> PimDevice) to
    ``fits`` (name -> (slope, intercept), e.g. the reference's), minimising the relative squared
    error of each coefficient. Returns ``(constants, errors)`` with ``errors[name] = (slope error,
    intercept error)``, each ``derived / fit - 1``."""
    names = sorted(fits)
    feats = {n: model_features(devices[n]) for n in names}
    s = np.array([fits[n][0] for n in names], np.float64)
    i = np.array([fits[n][1] for n in names], np.float64)
    xs = np.array([feats[n][0] for n in names], np.float64)
    xw = np.array([feats[n][1] for n in names], np.float64)
    (c_clock, c_stream), *_ = np.linalg.lstsq(xs / s[:, None], np.ones_like(s), rcond=None)
    c_write = float(np.sum(xw / i) / np.sum((xw / i) ** 2))
    constants = (float(c_clock), float(c_stream), c_write)
    errors = {}
    for n in names:
        slope, intercept = derived_coefficients(devices[n], constants=constants)
        errors[n] = (slope / fits[n][0] - 1, intercept / fits[n][1] - 1)
    return constants, errors


def leave_one_out(devices: dict, fits: dict) -> dict:
    """Per device, ``(slope error, intercept error)`` of the model fitted on the *other* devices."""
    out = {}
    for n in sorted(fits):
        constants, _ = fit_constants(devices, {k: v for k, v in fits.items() if k != n})
        slope, intercept = derived_coefficients(devices[n], constants=constants)
        out[n] = (slope / fits[n][0] - 1, intercept / fits[n][1] - 1)
    return out


# --------------------------------------------------------------------- per-instance values
@dataclasses.dataclass(frozen=True)
class PimPlan:
    """What one instance's PIM offload runs on (host side; ``Plan.pim``), for the latency tables
    and the power model."""

    device: PimDevice
    num_channels: int
    split: int  # channels each request's attention is split over: min(num_ch, n_kv_head)
    slope_ns: float  # ns per context token at the fitted geometry (derived or explicit)
    intercept_ns: float
    derived: bool  # the coefficients come from the derived model (else hardware.pim_*_ns)
    placement_a: float  # ns per context token per placement: slope * g / split
    placement_b: float  # ns per placement: intercept * q / split
    io_bytes_per_decode: int  # PIM I/O of one decode in one layer: q, k, v in + the output out

    @property
    def bandwidth_gbps(self) -> float:
        """The host memory's aggregate bandwidth (every channel)."""
        return self.num_channels * self.device.channel_bw_gbps


def pim_plan(hw, model, kv_element_bytes: int, act_bytes: int, pim_dir) -> PimPlan:
    """The PIM offload of an instance with hardware ``hw`` (``enable_attn_offloading``,
    ``pim_config``, ``pim_mem_size_gb``, the optional explicit coefficients) serving ``model``.

    Raises:
        JaxsimInputError: an unknown or bad INI; host memory smaller than one channel.
    """
    if hw.pim_config is None:
        raise JaxsimInputError("hardware.pim_config", "attention offloading needs a PIM device",
                               f"one of {shipped_devices(pim_dir)} (profiles/pim), or a path to an .ini")
    if hw.pim_mem_size_gb is None:
        raise JaxsimInputError("hardware.pim_mem_size_gb", "attention offloading needs the size of the host memory "
                               "that holds the PIM channels", "set it (GB; a cluster JSON's cpu_mem.mem_size)")
    dev = load_device(hw.pim_config, pim_dir)
    num_ch = dev.num_channels(hw.pim_mem_size_gb)
    if num_ch < 1:
        raise JaxsimInputError("hardware.pim_mem_size_gb", f"{hw.pim_mem_size_gb:g} GB of host memory holds no "
                               f"{dev.name} channel of {dev.channel_gb:g} GB",
                               f"give at least {dev.channel_gb:g} GB (the node's cpu_mem.mem_size)")
    if hw.pim_slope_ns is not None:
        slope, intercept, derived = hw.pim_slope_ns, hw.pim_intercept_ns, False
    else:
        (slope, intercept), derived = derived_coefficients(dev, kv_element_bytes), True
    h, kv, hd = model.num_heads, model.num_kv_heads, model.head_dim
    split = min(num_ch, kv)
    g, q = (h / kv) / 4, (h * hd) / 4096
    io = (2 * h + 2 * kv) * hd * act_bytes  # q, k, v of the new token in; the attention output out
    return PimPlan(device=dev, num_channels=num_ch, split=split, slope_ns=float(slope), intercept_ns=float(intercept),
                   derived=derived, placement_a=slope * g / split, placement_b=intercept * q / split,
                   io_bytes_per_decode=int(io))
