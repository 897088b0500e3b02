"""Gradient-based design search from the Hydra config in conf/ (issue 16, part 3): the search
problem of ``conf/search/<problem>.yaml`` solved by :func:`jaxsim.search.search` (smoothed
antithetic gradients, one compiled sweep call per step, a trust region that accepts a step only
when the exact engine confirms it), the best design re-simulated on held-out trace seeds.

    python scripts/search.py search=accelerator_sizing             # problem A in small
    python scripts/search.py search=accelerator_sizing search.steps=4 search.radius=0.08
    python scripts/search.py search=accelerator_sizing 'search.constraints.tpot_p99_ms=<= 30'

The ``search`` section (validated by :func:`search_options`; an unknown key is an error naming it):

    variables:   {knob: {lo, hi, kind: continuous | integer}}   numeric knobs of jaxsim.sweep.KNOBS
    objective:   {metric: cost, prices: {knob: price per unit}}  (the linear price of the knob values)
               | {metric: <pooled metric>, sense: minimize | maximize}  (e.g. output_tok_s, maximize)
    constraints: {metric: "<= bound" | ">= bound"}             e.g. {tpot_p99_ms: "<= 25"}
    slo:         {ttft_ms, tpot_ms}      per-request SLO behind slo_attainment / goodput_rps
    seeds / heldout_seeds                trace seeds of the search / of the final re-simulation
    steps, directions (K antithetic pairs), direction_kind, radius (in the unit box), optimizer
    (adam | sgd), learning_rate, penalty (augmented-Lagrangian mu), trust_radius, seed, x0, plots
    design, choices, step, constraints_method, guard_z, noise_after, noise_seeds, polish_rounds
    exhaustive: true | false | null (every design instead of a search; null: when the all-integer
                 lattice costs no more simulations than the search's steps)

Metrics (:func:`jaxsim.search.pool_metrics`) pool the requests of all seeds: ``ttft_p99_ms`` is the
P99 over every request of every seed. Everything else (hardware, model, scheduler, workload, which
must be synthetic: the seeds regenerate it) comes from the composed config, as in scripts/sweep.py;
a problem file sets them with ``# @package _global_`` and ``override /group: option``.

Writes to the run folder (``outputs/<date>/<time>/`` or ``output_dir=...``):
``trajectory.csv`` (every exactly evaluated design, accepted or not: step, cumulative simulations,
knob values, objective, merit, feasibility, the pooled metrics), ``best.json`` (the best feasible
design, its metrics on the search seeds and its re-simulation on the held-out seeds with
feasibility, simulations, compiled calls, wall time), ``search.png`` (objective vs simulations; for
a 2-D problem also the path in the box) when matplotlib is installed and ``search.plots`` is true,
and the resolved ``config.yaml``.
"""

import csv
import dataclasses
import json
import logging
import math
import re
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import hydra
import numpy as np
import yaml
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxsim import config as config_lib  # noqa: E402  (registers the schema)
from jaxsim import search as S  # noqa: E402
from jaxsim.errors import CapacityOverflowError, JaxsimInputError, unknown_key_fix  # noqa: E402

# ------------------------------------------------------------------------------------------------
# Schema: the run schema plus a ``search`` section. conf/config.yaml (and jaxsim.config.RootSchema)
# have no ``search`` group, so this script composes the primary config ``search_config`` = conf's
# ``config`` + this schema + ``search: none`` (registered in Hydra's ConfigStore on import).
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SearchSloSchema:
    ttft_ms: Optional[float] = None  # per-request SLO of slo_attainment / goodput_rps (null = none)
    tpot_ms: Optional[float] = None


@dataclasses.dataclass
class ObjectiveSchema:
    metric: str = "cost"  # "cost" (the linear price of the knob values, by `prices`) or a pooled metric
    sense: str = "minimize"  # minimize | maximize
    prices: Dict[str, Any] = dataclasses.field(default_factory=dict)  # knob -> price per unit (metric=cost)


@dataclasses.dataclass
class SearchSchema:
    variables: Dict[str, Any] = dataclasses.field(default_factory=dict)  # knob -> {lo, hi, kind}
    objective: ObjectiveSchema = dataclasses.field(default_factory=ObjectiveSchema)
    constraints: Dict[str, Any] = dataclasses.field(default_factory=dict)  # metric -> "<= 25"
    slo: SearchSloSchema = dataclasses.field(default_factory=SearchSloSchema)
    seeds: List[int] = dataclasses.field(default_factory=lambda: [0, 1])
    heldout_seeds: List[int] = dataclasses.field(default_factory=lambda: [100, 101, 102])
    steps: int = 10  # evaluator calls (one compiled sweep call each)
    directions: int = 2  # K antithetic pairs per step
    direction_kind: str = "gaussian"  # gaussian | rademacher
    radius: float = 0.05  # smoothing radius in the unit box (box side = 1)
    optimizer: str = "adam"  # adam | sgd (optax)
    learning_rate: float = 0.05  # in unit-box units
    penalty: float = 100.0  # augmented-Lagrangian mu
    trust_radius: float = 0.2  # initial L-infinity trust radius in the unit box
    temperature: float = 0.05  # soft SLO attainment's sigmoid temperature (relative slack)
    seed: int = 0  # the search's own random draws (directions, stochastic rounding)
    x0: Dict[str, Any] = dataclasses.field(default_factory=dict)  # start; a missing knob starts mid-box
    plots: bool = True
    # variables that are not sweep knobs: "cluster_counts" = instance counts of hardware options
    # (the variables' names), a cluster design per point (jaxsim.designs.ClusterCounts)
    design: Optional[str] = None
    choices: Dict[str, Any] = dataclasses.field(default_factory=dict)  # categorical: name -> [options], enumerated
    constraints_method: str = "projection"  # projection (gradient projection) | lagrangian (merit descent)
    guard_z: float = 1.645  # guard band: P(feasible on other seeds) ~ Phi(z); 0 = no guard band
    noise_after: Optional[int] = None  # steps before the trace noise is measured (null: half of steps)
    noise_seeds: int = 0  # seeds of the noise measurement (0: as many as fill one call)
    polish_rounds: int = 3  # exact local search rounds on the integer lattice
    # every design instead of a search: null = when the space is all-integer and its whole lattice
    # costs no more simulations than the search's steps (then the grid is the better tool)
    exhaustive: Optional[bool] = None


@dataclasses.dataclass
class SearchRootSchema(config_lib.RootSchema):
    search: SearchSchema = dataclasses.field(default_factory=SearchSchema)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="jaxsim_search_schema", node=SearchRootSchema)
    cs.store(name="search_config", node={"defaults": ["config", "jaxsim_search_schema", {"search": "none"}, "_self_"]})


register_configs()

SEARCH_FIELDS = [f.name for f in dataclasses.fields(SearchSchema)]
VARIABLE_FIELDS = ("lo", "hi", "kind", "step")
DESIGNS = ("cluster_counts",)
_DUMMY_SEED = dict(ttft_ms=np.ones(1), tpot_ms=np.ones(1), done=np.ones(1, bool), ok=np.ones(1, bool),
                   soft=np.ones(1), throughput_rps=1.0, goodput_rps=1.0, soft_goodput_rps=1.0, output_tok_s=1.0)
METRICS = sorted(S.pool_metrics([_DUMMY_SEED]))  # the pooled metrics an objective / constraint may name


# ------------------------------------------------------------------------------------------------
# The validated search section
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SearchOptions:
    problem: S.Problem
    objective_desc: dict  # {"metric", "sense"[, "prices"]}
    start: dict  # knob -> start value
    seeds: tuple
    heldout_seeds: tuple
    slo_ttft_ms: float | None
    slo_tpot_ms: float | None
    steps: int
    directions: int
    direction_kind: str
    radius: float
    optimizer: str
    learning_rate: float
    penalty: float
    trust_radius: float
    temperature: float
    seed: int
    plots: bool
    design: str | None
    constraints_method: str
    guard_z: float
    noise_after: int | None
    noise_seeds: int
    polish_rounds: int
    exhaustive: bool | None = None


def _num(v, key, lo=None, lo_open=False, integer=False):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not float(v).is_integer()):
        raise JaxsimInputError(key, f"must be {'an integer' if integer else 'a number'}, got {v!r}")
    v = int(v) if integer else float(v)
    if not math.isfinite(v):
        raise JaxsimInputError(key, f"must be finite, got {v}")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise JaxsimInputError(key, f"must be {'>' if lo_open else '>='} {lo}, got {v}")
    return v


def _mapping(v, key, example):
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise JaxsimInputError(key, f"must be a mapping, got {v!r}", f"e.g. {example}")
    return v


def _seeds(v, key):
    if not isinstance(v, (list, tuple)) or not v:
        raise JaxsimInputError(key, f"must be a non-empty list of seeds, got {v!r}", f"e.g. {key}=[0,1]")
    out = tuple(_num(s, f"{key}[{i}]", lo=0, integer=True) for i, s in enumerate(v))
    if len(set(out)) != len(out):
        raise JaxsimInputError(key, f"a seed appears twice: {list(out)}")
    return out


def _metric(name, key):
    if name not in METRICS:
        raise JaxsimInputError(key, f"unknown metric {name!r}", unknown_key_fix(str(name), METRICS))
    return name


_CONSTRAINT = re.compile(r"^\s*(<=|>=)\s*([-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)\s*$")


def search_options(d: dict | None) -> SearchOptions:
    """Validate a ``search`` section (a plain dict, e.g. ``RunSpec.config["search"]``).

    Errors are :class:`JaxsimInputError` naming the key, e.g. ``search.step: unknown field (did you
    mean 'steps'?)``, ``search.variables.peak_tflops: bounds must be finite with lo < hi``,
    ``search.constraints.tpot_p99_ms: must be '<= bound' or '>= bound'``.
    """
    p = "search"
    d = _mapping(d, p, "search=accelerator_sizing")
    for k in d:
        if k not in SEARCH_FIELDS:
            raise JaxsimInputError(f"{p}.{k}", "unknown field", unknown_key_fix(str(k), SEARCH_FIELDS))
    dflt = SearchSchema()
    get = lambda k: d[k] if d.get(k) is not None else getattr(dflt, k)  # noqa: E731

    var_in = _mapping(d.get("variables"), f"{p}.variables", "{peak_tflops: {lo: 100, hi: 1000}}")
    if not var_in:
        raise JaxsimInputError(f"{p}.variables", "no decision variables",
                               "pick a problem: search=accelerator_sizing (conf/search/), or set search.variables")
    variables = []
    for name, spec in var_in.items():
        key = f"{p}.variables.{name}"
        spec = _mapping(spec, key, f"{key}={{lo: 1, hi: 10, kind: continuous}}")
        for k in spec:
            if k not in VARIABLE_FIELDS:
                raise JaxsimInputError(f"{key}.{k}", "unknown field", unknown_key_fix(str(k), VARIABLE_FIELDS))
        for k in ("lo", "hi"):
            if spec.get(k) is None:
                raise JaxsimInputError(f"{key}.{k}", "missing bound", f"set {key}.{k}")
        variables.append(S.Variable(str(name), _num(spec["lo"], f"{key}.lo"), _num(spec["hi"], f"{key}.hi"),
                                    spec.get("kind") or "continuous",
                                    _num(1 if spec.get("step") is None else spec["step"], f"{key}.step", 1, integer=True)))
    design = d.get("design")
    if design is not None and design not in DESIGNS:
        raise JaxsimInputError(f"{p}.design", f"unknown design {design!r}", f"designs: {list(DESIGNS)}")
    choices = {}
    for name, opts in _mapping(d.get("choices"), f"{p}.choices", "{roles: [colocated, rtxpro6000_prefill]}").items():
        if not isinstance(opts, (list, tuple)) or not opts:
            raise JaxsimInputError(f"{p}.choices.{name}", f"must be a non-empty list of options, got {opts!r}")
        if design is None and name not in ("hardware", "cluster"):
            raise JaxsimInputError(f"{p}.choices.{name}", "not a categorical knob", "choices: hardware, cluster "
                                   "(or roles with design: cluster_counts)")
        choices[str(name)] = tuple(opts)
    # (a design's variables are checked when the design is built from them: run_search)
    space = S.Space(tuple(variables), design=_PendingDesign(design) if design else None, choices=choices)

    okey = f"{p}.objective"
    obj_in = _mapping(d.get("objective"), okey, "{metric: cost, prices: {peak_tflops: 1.0}}")
    ofields = [f.name for f in dataclasses.fields(ObjectiveSchema)]
    for k in obj_in:
        if k not in ofields:
            raise JaxsimInputError(f"{okey}.{k}", "unknown field", unknown_key_fix(str(k), ofields))
    metric = obj_in.get("metric") or "cost"
    sense = obj_in.get("sense") or "minimize"
    if sense not in ("minimize", "maximize"):
        raise JaxsimInputError(f"{okey}.sense", f"must be 'minimize' or 'maximize', got {sense!r}")
    surrogate = None
    if metric == "cost":
        if sense != "minimize":
            raise JaxsimInputError(f"{okey}.sense", "a cost is minimised", f"set {okey}.sense=minimize")
        prices = _mapping(obj_in.get("prices"), f"{okey}.prices", "{peak_tflops: 1.0}")
        if not prices:
            raise JaxsimInputError(f"{okey}.prices", "no prices for the cost",
                                   f"give a price per unit of a variable, or a metric: {okey}.metric=output_tok_s")
        for k, w in prices.items():
            if k not in space.names:
                raise JaxsimInputError(f"{okey}.prices.{k}", "not a decision variable", f"variables: {space.names}")
            _num(w, f"{okey}.prices.{k}")
        prices = {k: float(w) for k, w in prices.items()}
        objective, desc = S.linear_cost(prices), {"metric": "cost", "sense": sense, "prices": prices}
    else:
        _metric(metric, f"{okey}.metric")
        objective = S.metric_objective(metric, maximise=sense == "maximize")
        desc = {"metric": metric, "sense": sense}
        if metric in S.SMOOTHED:  # the gradient follows the per-request smoothed metric
            surrogate = S.metric_objective(S.SMOOTHED[metric], maximise=sense == "maximize")
            desc["gradient_of"] = S.SMOOTHED[metric]

    constraints = []
    for metric, text in _mapping(d.get("constraints"), f"{p}.constraints", "{tpot_p99_ms: '<= 25'}").items():
        key = f"{p}.constraints.{metric}"
        _metric(metric, key)
        m = _CONSTRAINT.match(str(text))
        if not m:
            raise JaxsimInputError(key, f"must be '<= bound' or '>= bound', got {text!r}", f"e.g. {key}='<= 25'")
        constraints.append(S.Constraint(str(metric), m.group(1), float(m.group(2))))

    slo = _mapping(d.get("slo"), f"{p}.slo", "{ttft_ms: 500, tpot_ms: 25}")
    for k in slo:
        if k not in ("ttft_ms", "tpot_ms"):
            raise JaxsimInputError(f"{p}.slo.{k}", "unknown field", unknown_key_fix(str(k), ("ttft_ms", "tpot_ms")))
    slo_b = {k: None if slo.get(k) is None else _num(slo[k], f"{p}.slo.{k}", 0, lo_open=True)
             for k in ("ttft_ms", "tpot_ms")}

    x0 = _mapping(d.get("x0"), f"{p}.x0", "{peak_tflops: 800}")
    start = {}
    for v in space.variables:
        if x0.get(v.name) is None:
            start[v.name] = 0.5 * (v.lo + v.hi)
            continue
        x = _num(x0[v.name], f"{p}.x0.{v.name}")
        if not v.lo <= x <= v.hi:
            raise JaxsimInputError(f"{p}.x0.{v.name}", f"{x} is outside the bounds [{v.lo}, {v.hi}]")
        start[v.name] = x
    for k in x0:
        if k not in space.names:
            raise JaxsimInputError(f"{p}.x0.{k}", "not a decision variable", f"variables: {space.names}")

    seeds = _seeds(get("seeds"), f"{p}.seeds")
    heldout = _seeds(get("heldout_seeds"), f"{p}.heldout_seeds")
    if set(seeds) & set(heldout):
        raise JaxsimInputError(f"{p}.heldout_seeds", f"{sorted(set(seeds) & set(heldout))} are also search seeds",
                               "held-out seeds must be unseen by the search")
    for k, allowed in (("direction_kind", S.DIRECTION_KINDS), ("optimizer", ("adam", "sgd")),
                       ("constraints_method", ("projection", "lagrangian"))):
        if get(k) not in allowed:
            raise JaxsimInputError(f"{p}.{k}", f"must be one of {allowed}, got {get(k)!r}")
    radius = _num(get("radius"), f"{p}.radius", 0, lo_open=True)
    if radius > 0.5:
        raise JaxsimInputError(f"{p}.radius", f"{radius} is more than half the unit box", "e.g. 0.02 to 0.1")
    plots = get("plots")
    if not isinstance(plots, bool):
        raise JaxsimInputError(f"{p}.plots", f"must be true or false, got {plots!r}")
    return SearchOptions(
        problem=S.Problem(space, objective, tuple(constraints), surrogate=surrogate), objective_desc=desc, start=start,
        seeds=seeds, heldout_seeds=heldout, slo_ttft_ms=slo_b["ttft_ms"], slo_tpot_ms=slo_b["tpot_ms"],
        steps=_num(get("steps"), f"{p}.steps", 1, integer=True),
        directions=_num(get("directions"), f"{p}.directions", 1, integer=True),
        direction_kind=get("direction_kind"), radius=radius, optimizer=get("optimizer"),
        learning_rate=_num(get("learning_rate"), f"{p}.learning_rate", 0, lo_open=True),
        penalty=_num(get("penalty"), f"{p}.penalty", 0, lo_open=True),
        trust_radius=_num(get("trust_radius"), f"{p}.trust_radius", 0, lo_open=True),
        temperature=_num(get("temperature"), f"{p}.temperature", 0, lo_open=True),
        seed=_num(get("seed"), f"{p}.seed", 0, integer=True), plots=plots, design=design,
        constraints_method=get("constraints_method"), guard_z=_num(get("guard_z"), f"{p}.guard_z", 0),
        noise_after=None if d.get("noise_after") is None else _num(d["noise_after"], f"{p}.noise_after", 1, integer=True),
        noise_seeds=_num(get("noise_seeds"), f"{p}.noise_seeds", 0, integer=True),
        polish_rounds=_num(get("polish_rounds"), f"{p}.polish_rounds", 0, integer=True),
        exhaustive=_opt_bool(d.get("exhaustive"), f"{p}.exhaustive"))


def _opt_bool(v, key):
    if v is not None and not isinstance(v, bool):
        raise JaxsimInputError(key, f"must be true, false or null, got {v!r}")
    return v


class _PendingDesign:
    """A design named in the config, built by :func:`build_design` once the sweep base exists."""

    value_only = False

    def __init__(self, name):
        self.name = name

    def __call__(self, values):
        raise RuntimeError(f"design {self.name!r} not built (scripts/search.py build_design)")


def build_design(opts: SearchOptions, spec, base) -> SearchOptions:
    """``opts`` with its pending design built on ``base``: ``cluster_counts`` loads each variable's
    hardware option (``conf/hardware/<variable>.yaml``) and registers a cluster design per point."""
    space = opts.problem.space
    for name, options in space.choices.items() if opts.design is None else ():
        for i, o in enumerate(options):  # categorical knobs: their options join the base
            key = f"search.choices.{name}[{i}]"
            if name == "hardware":
                base.hardware_options.setdefault(o, config_lib.hardware_option(o, spec.paths.profiles, spec.model.name,
                                                                               key=key))
            else:
                base.cluster_options.setdefault(o, config_lib.cluster_option(o, spec, key=key))
    if opts.design is None:
        return opts
    from jaxsim.designs import ClusterCounts
    hw = {v.name: config_lib.hardware_option(v.name, spec.paths.profiles, spec.model.name,
                                             key=f"search.variables.{v.name}") for v in space.variables}
    design = ClusterCounts(base, hw, spec.scheduler, spec.calibration)
    for name, options in space.choices.items():
        if name != "roles":
            raise JaxsimInputError(f"search.choices.{name}", "the cluster_counts design has one choice: roles")
        for o in options:
            if o not in design.layouts:
                raise JaxsimInputError(f"search.choices.roles", f"unknown layout {o!r}", f"layouts: {list(design.layouts)}")
    problem = dataclasses.replace(opts.problem, space=dataclasses.replace(space, design=design))
    return dataclasses.replace(opts, problem=problem)


def check_cli_overrides(args: list) -> None:
    """:func:`jaxsim.config.check_cli_overrides` for the run's keys, and the ``search.*`` keys
    against :class:`SearchSchema` (``search.step=3`` -> ``search.step: unknown field (did you mean
    'steps'?)``); ``search=<problem>`` picks the group option."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    rest = []
    for arg in args:
        try:
            (o,) = parser.parse_overrides([arg]) if not arg.startswith("-") else ()
        except Exception:
            rest.append(arg)
            continue
        parts = o.key_or_group.split(".")
        if parts[0] != "search":
            rest.append(arg)
            continue
        if len(parts) > 1 and not o.is_delete() and parts[1] not in SEARCH_FIELDS:
            raise JaxsimInputError(".".join(parts[:2]), "unknown field", unknown_key_fix(parts[1], SEARCH_FIELDS))
    config_lib.check_cli_overrides(rest)


# ------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------


def _finite(x):
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def _arm_name(arm: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in arm.items())


def write_trajectory(path: Path, result: S.DesignResult, space: S.Space) -> Path:
    """One row per exactly evaluated design (accepted or not, polish included): phase (1: plain
    constraints, 2: guarded, polish), arm (the categorical choices), step, simulations so far,
    variable values, objective, feasible (under the guarded constraints), accepted, the pooled metrics."""
    cols = ["phase", "arm", "step", "simulations", *space.names, "objective", "feasible", "accepted"] + METRICS
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in result.rows:
            w.writerow([r["phase"], _arm_name(r["arm"]), "" if r["step"] is None else r["step"], r["simulations"],
                        *(r["values"][n] for n in space.names), r["objective"], r["feasible"], r["accepted"],
                        *(r["metrics"][m] for m in METRICS)])
    return path


def plot_search(path: Path, result: S.DesignResult, space: S.Space, best_values: dict):
    """Objective vs simulations (feasible / infeasible exact evaluations, best feasible so far) and,
    for a 2-D problem, the path of the exact evaluations in the box. None without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    rows = result.rows
    n = [r["simulations"] for r in rows]
    fig = Figure(figsize=(11 if space.dim == 2 else 6, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2 if space.dim == 2 else 1, 1)
    feas = [r["feasible"] for r in rows]
    obj = [r["objective"] for r in rows]
    ax.scatter([x for x, f in zip(n, feas) if f], [o for o, f in zip(obj, feas) if f], c="tab:green",
               label="feasible", zorder=3)
    ax.scatter([x for x, f in zip(n, feas) if not f], [o for o, f in zip(obj, feas) if not f], c="tab:red",
               marker="x", label="infeasible", zorder=3)
    best, run = math.inf, []
    for o, f in zip(obj, feas):
        best = min(best, o) if f else best
        run.append(best if math.isfinite(best) else np.nan)
    ax.step(n, run, where="post", c="k", label="best feasible so far")
    ax.set_xlabel("simulations")
    ax.set_ylabel("objective")
    ax.legend()
    ax.grid(alpha=0.3)
    if space.dim == 2:
        a, b = space.variables
        ax2 = fig.add_subplot(1, 2, 2)
        acc = [r for r in rows if r["accepted"]]
        ax2.plot([r["values"][a.name] for r in acc], [r["values"][b.name] for r in acc], "-", c="tab:blue",
                 label="accepted path")
        for r in rows:
            ax2.scatter(r["values"][a.name], r["values"][b.name], c="tab:green" if r["feasible"] else "tab:red",
                        marker="o" if r["accepted"] else "x", zorder=3)
        ax2.scatter(rows[0]["values"][a.name], rows[0]["values"][b.name], s=120, facecolors="none",
                    edgecolors="k", label="start")
        ax2.scatter(best_values[a.name], best_values[b.name], s=200, marker="*", c="gold", edgecolors="k",
                    label="best", zorder=4)
        ax2.set_xlim(a.lo, a.hi)
        ax2.set_ylim(b.lo, b.hi)
        ax2.set_xlabel(a.name)
        ax2.set_ylabel(b.name)
        ax2.set_title("o accepted, x rejected; green feasible")
        ax2.legend(fontsize=8)
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def prepare(cfg: DictConfig):
    """The run spec, validated search options (design built) and sweep base of a composed config."""
    spec = config_lib.from_hydra(cfg)
    opts = search_options(spec.config.get("search"))
    if spec.sim.compile_cache:
        from jaxsim import compile_cache
        compile_cache.enable(spec.sim.compile_cache_dir or None)
    if (spec.config.get("workload") or {}).get("kind") != "synthetic":
        raise JaxsimInputError("workload.kind", "the search draws trace seeds: it needs a synthetic workload",
                               "e.g. workload=synthetic_poisson")
    base = config_lib.sweep_base(spec, {"slo": {"ttft_ms": opts.slo_ttft_ms, "tpot_ms": opts.slo_tpot_ms}})
    return spec, build_design(opts, spec, base), base


def run_design_search(opts: SearchOptions, evaluate) -> S.DesignResult:
    """:func:`jaxsim.search.design_search` with the options of a search section."""
    return S.design_search(evaluate, opts.problem, opts.start, opts.seeds, steps=opts.steps,
                           noise_after=opts.noise_after,
                           noise_seeds=(range(max(opts.seeds) + 1000, max(opts.seeds) + 1000 + opts.noise_seeds)
                                        if opts.noise_seeds else None),
                           z=opts.guard_z, polish_rounds=opts.polish_rounds, exhaustive=opts.exhaustive,
                           radius=opts.radius,
                           num_directions=opts.directions, kind=opts.direction_kind, optimizer=opts.optimizer,
                           learning_rate=opts.learning_rate, mu=opts.penalty,
                           trust=S.TrustRegion(radius=opts.trust_radius), seed=opts.seed,
                           constraints=opts.constraints_method)


def heldout(evaluate, opts: SearchOptions, problem: S.Problem, values: dict) -> dict:
    """``values`` re-simulated on the held-out seeds (in calls of the search's size: no new
    compile): the metrics, and feasibility against the plain bounds (no guard band)."""
    size = S.batch_size(problem.space, len(opts.seeds), opts.directions)  # (problem: the best arm's)
    ev = S.evaluate_design(evaluate, problem, values, opts.heldout_seeds, size)
    return {"seeds": list(opts.heldout_seeds), "objective": ev.objective, "status_ok": ev.status_ok,
            "feasible": ev.status_ok and all(c.holds(ev.metrics) for c in problem.constraints),
            "metrics": {k: _finite(v) for k, v in ev.metrics.items()}}


def run_search(cfg: DictConfig, out_dir: str | Path | None = None, echo: bool = True) -> dict:
    """Run the search of a composed config (``search_config``) and write its outputs; return the
    content of ``best.json`` plus ``out_dir`` and ``files``.

    Raises :class:`JaxsimInputError` for bad config values, naming the key.
    """
    t0 = time.perf_counter()
    spec, opts, base = prepare(cfg)
    evaluate = S.SweepEvaluator(base, temperature=opts.temperature)
    space = opts.problem.space
    result = run_design_search(opts, evaluate)
    best = result.best
    th = time.perf_counter()
    held = heldout(evaluate, opts, result.problem, best.values)
    held["wall_s"] = time.perf_counter() - th

    out = Path(out_dir or spec.output_dir or "outputs/search")
    out.mkdir(parents=True, exist_ok=True)
    files = [write_trajectory(out / "trajectory.csv", result, space)]
    summary = {
        "problem": spec.choices.get("search"),
        "variables": {v.name: {"lo": v.lo, "hi": v.hi, "kind": v.kind, "step": v.step} for v in space.variables},
        "choices": {k: list(v) for k, v in space.choices.items()},
        "objective": opts.objective_desc,
        "constraints": [f"{c.metric} {c.sense} {c.bound:g}" for c in opts.problem.constraints],
        "guard_band": {c.metric: {"margin": c.margin, "target": c.target, "noise_std": result.noise[c.metric]["std"],
                                  "z": opts.guard_z} for c in result.problem.constraints},
        "start": opts.start,
        "best": {
            "values": best.values, "objective": best.objective, "feasible": best.feasible,
            "violations": best.violations, "seeds": list(opts.seeds),
            "metrics": {k: _finite(v) for k, v in best.metrics.items()},
        },
        "heldout": held,
        "found_feasible": any(r["feasible"] for r in result.rows),
        "evaluations": result.evaluations,  # simulations of the search (sweep points), noise and polish included
        "calls": result.calls,  # compiled sweep calls of the search
        "heldout_evaluations": evaluate.simulations - result.evaluations,
        "steps": opts.steps, "points_per_call": S.batch_size(space.arms()[0], len(opts.seeds), opts.directions),
        "search_wall_s": result.wall_s,
        "wall_s": time.perf_counter() - t0,
        "config_choices": dict(spec.choices),
    }
    (out / "best.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    files.append(out / "best.json")
    if opts.plots:
        png = plot_search(out / "search.png", result, space, best.values)
        if png is not None:
            files.append(png)
    (out / "config.yaml").write_text(yaml.safe_dump(spec.config, sort_keys=False))
    if echo:
        vals = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.values.items())
        guards = ", ".join(f"{c.metric} <= {c.target:.4g}" if c.sense == "<=" else f"{c.metric} >= {c.target:.4g}"
                           for c in result.problem.constraints)
        held_txt = ", ".join(f"{c.metric} {held['metrics'][c.metric]:.4g}" for c in opts.problem.constraints)
        print(f"best {'feasible ' if best.feasible else '(NO feasible design found) '}design: {vals}; "
              f"objective {best.objective:.4g} (guarded: {guards}); held-out seeds {list(opts.heldout_seeds)}: "
              f"{'feasible' if held['feasible'] else 'INFEASIBLE'} "
              f"({held_txt})")
        print(f"{result.evaluations} simulations in {result.calls} compiled calls, search {result.wall_s:.1f} s, "
              f"total {summary['wall_s']:.1f} s; outputs in {out.resolve()}")
    return {**summary, "out_dir": str(out), "files": [str(f) for f in files]}


@hydra.main(config_path="../conf", config_name="search_config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # "no TPU" notices
    try:
        run_search(cfg)
    except (JaxsimInputError, CapacityOverflowError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    try:
        check_cli_overrides(sys.argv[1:])  # a typo named before Hydra's "use +" advice
    except JaxsimInputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    main()
