"""Design mappings for the search (:attr:`jaxsim.search.Space.design`): decision variables that are
not sweep knobs, mapped to a sweep point.

:class:`ClusterCounts` (issue 16, problem C): the number of instances of each hardware option and
which hardware computes prefills (prefill/decode disaggregation, REFERENCE.md §1.7) -> a ``cluster``
design of :attr:`jaxsim.sweep.SweepBase.cluster_options` (registered on first use, so a search over
a large lattice never builds the designs it does not visit).
"""

import dataclasses

from jaxsim.errors import JaxsimInputError
from jaxsim.spec import Calibration, HardwareConfig, InstanceSpec, SchedulerConfig

COLOCATED = "colocated"


@dataclasses.dataclass(eq=False)
class ClusterCounts:
    """``{hardware: count, "roles": layout} -> {"cluster": name}``.

    ``hardware``: option name -> :class:`HardwareConfig` (e.g. ``conf/hardware/<name>.yaml`` through
    :func:`jaxsim.config.hardware_option`); each is a decision variable, the number of its instances.
    ``schedulers``: option name -> :class:`SchedulerConfig` (default: ``scheduler``).
    The ``roles`` choice (a categorical of the search, :attr:`jaxsim.search.Space.choices`) is
    ``"colocated"`` (every instance serves whole requests) or ``"<option>_prefill"``: that option's
    instances compute prompts and first tokens on node 0 and hand each request's KV to the other
    options' instances, which decode, on node 1 (the base's ``links`` carry the KV). A layout without
    an instance of each role, or a design with no instance, does not exist (None).

    ``base``: the :class:`jaxsim.sweep.SweepBase` whose ``cluster_options`` get the designs.
    """

    base: object
    hardware: dict
    scheduler: SchedulerConfig = SchedulerConfig()
    calibration: Calibration = Calibration()
    schedulers: dict = dataclasses.field(default_factory=dict)
    value_only = False  # instance counts change the engine's array sizes (the anchor covers them)

    def __post_init__(self):
        for name, hw in self.hardware.items():
            if not isinstance(hw, HardwareConfig):
                raise JaxsimInputError(f"search.design.hardware.{name}", "must be a HardwareConfig")
        for name in self.schedulers:
            if name not in self.hardware:
                raise JaxsimInputError(f"search.design.schedulers.{name}", "not a hardware option of the design",
                                       f"options: {sorted(self.hardware)}")

    @property
    def layouts(self) -> tuple:
        """The ``roles`` options: colocated, and each hardware option as the prefill side."""
        return (COLOCATED,) + tuple(f"{h}_prefill" for h in self.hardware)

    def instances(self, values: dict) -> "tuple | None":
        counts = {h: int(values.get(h, 0)) for h in self.hardware}
        layout = values.get("roles", COLOCATED)
        if layout not in self.layouts:
            raise JaxsimInputError("search.choices.roles", f"unknown layout {layout!r}", f"layouts: {list(self.layouts)}")
        if any(c < 0 for c in counts.values()) or sum(counts.values()) == 0:
            return None
        prefill = None if layout == COLOCATED else layout[: -len("_prefill")]
        if prefill is not None and (counts[prefill] == 0 or sum(counts.values()) == counts[prefill]):
            return None  # a P/D layout needs both a prefill and a decode instance
        out = []
        for h, n in counts.items():
            role = COLOCATED if prefill is None else ("prefill" if h == prefill else "decode")
            node = 0 if role != "decode" else 1
            spec = InstanceSpec(self.hardware[h], self.schedulers.get(h, self.scheduler), self.calibration,
                                role=role, node=node)
            out += [spec] * n
        return tuple(out)

    @staticmethod
    def name(values: dict, hardware) -> str:
        return "+".join(f"{int(values.get(h, 0))}x{h}" for h in hardware) + f"|{values.get('roles', COLOCATED)}"

    def __call__(self, values: dict) -> "dict | None":
        insts = self.instances(values)
        if insts is None:
            return None
        key = self.name(values, self.hardware)
        self.base.cluster_options.setdefault(key, insts)
        return {"cluster": key}
