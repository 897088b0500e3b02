"""Accelerator spec sheets: what a datasheet says about a part, for the roofline latency model.

A spec sheet is a small YAML file under ``profiles/specs/`` (or anywhere, given by path) with the
unit in every key name::

    name: H100-SXM                       # required
    source: NVIDIA H100 datasheet ...    # required: where the numbers come from
    peak_tflops: {bf16: 989, fp8: 1979}  # required: dense (no sparsity) peak TFLOP/s per dtype; bf16 required
    mem_bw_gbs: 3350                     # required: device-memory bandwidth, GB/s (1 GB/s = 1 byte/ns)
    mem_gib: 80                          # required: device-memory capacity, GiB
    link_bw_gbs: 450                     # required: intra-node link bandwidth per GPU, one direction, GB/s
    link_latency_us: 10                  # required: per-message link latency, µs
    mem_latency_us: 3                    # optional: memory / kernel latency floor, µs
    l2_mib: 50                           # optional: last-level (L2) cache size, MiB
    tdp_w: 700                           # optional: board power (TDP), W
    idle_w: 60                           # optional: idle power, W
    notes: ...                           # optional: free text

Every number must be a finite number > 0; an unknown key, a missing required key or a bad value
is a :class:`jaxsim.errors.JaxsimInputError` naming the file and the key. The roofline model
(:mod:`jaxsim.latency.roofline`) reads ``peak_tflops[dtype]``, ``mem_bw_gbs``, ``link_bw_gbs`` and
``link_latency_us`` (and ``l2_mib`` when given); the rest is carried for capacity and power planning.
"""

import dataclasses
import math
from pathlib import Path

import yaml

from jaxsim.errors import JaxsimInputError, unknown_key_fix

DEFAULT_SPECS_DIR = "profiles/specs"
REQUIRED = ("name", "source", "peak_tflops", "mem_bw_gbs", "mem_gib", "link_bw_gbs", "link_latency_us")
OPTIONAL = ("mem_latency_us", "l2_mib", "tdp_w", "idle_w", "notes")
DTYPES = ("fp32", "tf32", "bf16", "fp16", "fp8", "int8", "fp6", "fp4", "int4")


@dataclasses.dataclass(frozen=True)
class SpecSheet:
    """One accelerator's datasheet numbers (units in the field names; see the module docstring)."""

    name: str
    source: str
    peak_tflops: dict  # dtype -> dense peak TFLOP/s (bf16 always present)
    mem_bw_gbs: float  # GB/s = bytes/ns
    mem_gib: float
    link_bw_gbs: float  # GB/s, one direction, per GPU
    link_latency_us: float
    mem_latency_us: "float | None" = None
    l2_mib: "float | None" = None
    tdp_w: "float | None" = None
    idle_w: "float | None" = None
    notes: str = ""
    path: str = ""  # the file it was read from ("" when built in code)

    def peak(self, dtype: str = "bf16") -> float:
        """Peak dense TFLOP/s for ``dtype``; a :class:`JaxsimInputError` naming the sheet when the
        sheet does not give that dtype."""
        try:
            return float(self.peak_tflops[dtype])
        except KeyError:
            raise JaxsimInputError(f"{self.path or self.name}: peak_tflops", f"no peak for dtype {dtype!r}",
                                   f"add peak_tflops.{dtype} or use one of {sorted(self.peak_tflops)}") from None


def _number(path, key, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise JaxsimInputError(f"{path}: {key}", f"must be a finite number > 0, got {v!r}")
    return float(v)


def spec_names(specs_dir=DEFAULT_SPECS_DIR) -> list:
    """The spec sheets shipped in ``specs_dir`` (file stems, the calibration file excluded)."""
    return sorted(p.stem for p in Path(specs_dir).glob("*.yaml") if p.stem != "roofline_calibration")


def load_spec(name_or_path, specs_dir=DEFAULT_SPECS_DIR) -> SpecSheet:
    """Read a spec sheet by name (``<specs_dir>/<name>.yaml``) or by path (anything ending in
    ``.yaml``/``.yml`` or naming an existing file).

    Raises:
        JaxsimInputError: unknown name (listing the known ones), unreadable YAML, an unknown key
            (with the nearest known ones), a missing required key, or a value that is not a finite
            number > 0 (each naming the file and the key).
    """
    p = Path(str(name_or_path))
    if not (p.suffix in (".yaml", ".yml") or p.is_file()):
        p = Path(specs_dir) / f"{name_or_path}.yaml"
    if not p.is_file():
        raise JaxsimInputError(str(p), f"no spec sheet {name_or_path!r}",
                               f"known spec sheets in {specs_dir}: {spec_names(specs_dir)}")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise JaxsimInputError(str(p), f"not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise JaxsimInputError(str(p), "a spec sheet is a YAML mapping", f"keys: {', '.join(REQUIRED)}")
    known = REQUIRED + OPTIONAL
    for k in raw:
        if k not in known:
            raise JaxsimInputError(f"{p}: {k}", "unknown key", unknown_key_fix(k, known))
    for k in REQUIRED:
        if k not in raw or raw[k] is None:
            raise JaxsimInputError(f"{p}: {k}", "missing required key", f"required keys: {', '.join(REQUIRED)}")
    peaks = raw["peak_tflops"]
    if not isinstance(peaks, dict) or not peaks:
        raise JaxsimInputError(f"{p}: peak_tflops", "must map dtypes to TFLOP/s, e.g. {bf16: 989, fp8: 1979}")
    for d in peaks:
        if d not in DTYPES:
            raise JaxsimInputError(f"{p}: peak_tflops.{d}", "unknown dtype", unknown_key_fix(d, DTYPES))
    if "bf16" not in peaks:
        raise JaxsimInputError(f"{p}: peak_tflops.bf16", "missing required key", "every sheet gives the bf16 peak")
    peak_tflops = {str(d): _number(p, f"peak_tflops.{d}", v) for d, v in peaks.items()}
    nums = {k: _number(p, k, raw[k]) for k in ("mem_bw_gbs", "mem_gib", "link_bw_gbs", "link_latency_us")}
    opt = {k: _number(p, k, raw[k]) for k in ("mem_latency_us", "l2_mib", "tdp_w", "idle_w") if raw.get(k) is not None}
    return SpecSheet(name=str(raw["name"]), source=str(raw["source"]), peak_tflops=peak_tflops,
                     notes=str(raw.get("notes") or ""), path=str(p), **nums, **opt)
