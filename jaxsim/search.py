"""Gradient-based design search over sweep knobs (issue 16, part 2).

    space = Space((Variable("peak_tflops", 100, 1000), Variable("mem_bw_gbs", 500, 3500)))
    problem = Problem(space, objective=linear_cost({"peak_tflops": 1.0, "mem_bw_gbs": 0.3}),
                      constraints=(Constraint("tpot_p99_ms", "<=", 25.0),))
    result = search(SweepEvaluator(base), problem, seeds=(0, 1), steps=12)

Why smoothed differences and not autodiff: the serving metrics are globally smooth but locally rough
in continuous knobs (a relative change of 2e-5 in iteration time moves a request into another batch),
and autodiff through the event loop with the event order frozen is biased (it ignores requests that
join an earlier or later batch; issue 16 measures 3.5-145x on mean TTFT). So the gradient here is
that of the Gaussian (or Rademacher) smoothing of the objective at a radius the user sets,

    grad f_r(u) ~= 1/K sum_k (f(u + r d_k) - f(u - r d_k)) / (2 r) d_k,

(Nesterov & Spokoiny 2017, "Random gradient-free minimization of convex functions", eq. 2.6 with the
antithetic pair; with Rademacher d_k it is Spall's SPSA), over K directions, in a normalised box
u in [0, 1]^D, with common random numbers: both points of a pair run the same trace seeds and the
same rounding draws of the integer variables, so the trace's noise cancels in the difference.
Directions may be ``orthogonal`` (a random orthonormal basis: exact for a linear function with
K = D). Constraints are handled by gradient projection on their smoothed gradients (or an augmented
Lagrangian), and a step is accepted by the feasibility rule. :func:`design_search` is the whole
procedure: search, measure the trace noise where the search got to and guard the constraints by it
(a design feasible on the search's seeds must stay feasible on other traces), search on, and
polish the integer variables exactly; categorical choices are enumerated (one search per option).

One step = ONE call of :func:`jaxsim.sweep.sweep`: the exact evaluation of the candidate (nearest
rounding, the fixed seeds) and the stencil around it, always the same number of points (plus, when a
variable can change the engine's array sizes, one *anchor* point at the upper bounds whose sizes cover
every other point's), so the whole search compiles once. A trust region accepts the candidate only
when the exact engine confirms that the merit (objective + augmented-Lagrangian terms) decreased; the
stencil around a rejected candidate is then wasted (the price of keeping one call per step).

Metrics are pooled over the seeds (P99 over all requests of all seeds; rates averaged over seeds):
see :func:`request_metrics` / :func:`pool_metrics`.
"""

import dataclasses
import itertools
import math
import time

import numpy as np
import optax

from jaxsim.errors import JaxsimInputError

KINDS = ("continuous", "integer")
# Knobs that change only values in the engine (never an array size): a space of these needs no anchor.
VALUE_ONLY_KNOBS = frozenset({"peak_tflops", "mem_bw_gbs", "compute_scale", "memory_scale", "link_scale",
                              "link_bw_gbps", "link_latency_ns", "arrival_rate_scale", "power_cap_w",
                              "npu_idle_power_w", "npu_standby_power_w", "npu_active_power_w",
                              "standby_duration_s", "kv_tier_bandwidth_gbps", "kv_tier_latency_ns"})


# ---------------------------------------------------------------------------------------------
# Decision variables


@dataclasses.dataclass(frozen=True)
class Variable:
    """One decision variable: a sweep knob (:data:`jaxsim.sweep.KNOBS`) on ``[lo, hi]`` (its units).

    ``kind="integer"``: the knob takes the values ``lo + k * step`` (``k`` integer, up to ``hi``);
    inside the stencil it is rounded stochastically on that lattice (:func:`stochastic_round`,
    unbiased), at an exact evaluation to the nearest lattice point. ``step`` (default 1) lets a
    token budget move by 256 tokens, a KV-block count by 512 blocks: the lattice of the exhaustive
    grid, and the neighbours of :func:`polish`.
    """

    name: str
    lo: float
    hi: float
    kind: str = "continuous"
    step: float = 1.0

    def __post_init__(self):
        where = f"search.variables.{self.name}"
        if self.kind not in KINDS:
            raise JaxsimInputError(f"{where}.kind", f"must be one of {KINDS}, got {self.kind!r}")
        if not (math.isfinite(self.lo) and math.isfinite(self.hi) and self.lo < self.hi):
            raise JaxsimInputError(where, f"bounds must be finite with lo < hi, got [{self.lo}, {self.hi}]")
        if self.kind == "integer" and not (self.step >= 1 and float(self.step).is_integer()
                                           and float(self.lo).is_integer()):
            raise JaxsimInputError(where, f"an integer variable needs an integer lo and step >= 1, got lo={self.lo}, "
                                   f"step={self.step}")

    @property
    def levels(self) -> int:
        """Lattice points of an integer variable (``lo, lo + step, ... <= hi``)."""
        return int((self.hi - self.lo) // self.step) + 1


@dataclasses.dataclass(frozen=True)
class Space:
    """The box of decision variables, optimised in normalised coordinates ``u in [0, 1]^D``.

    Each variable is a numeric sweep knob (:data:`jaxsim.sweep.KNOBS`), unless ``design`` maps the
    variables' values to a sweep point: ``design(values) -> {knob: value}`` (e.g.
    :class:`jaxsim.designs.ClusterCounts`: instance counts -> a ``cluster`` design). ``design.value_only``
    (optional, default False) says that its points never change the engine's array sizes.

    ``choices``: categorical choices ``{name: (option, ...)}`` (a ``hardware`` or ``cluster`` name, a
    role layout of ``design``, ...). They are not relaxed: :func:`design_search` enumerates them, one
    search per combination (an *arm*, :meth:`arms`), all arms sharing one compiled call. ``fixed``: the
    choices of one arm, merged into every decoded design."""

    variables: tuple
    design: object = None
    choices: dict = dataclasses.field(default_factory=dict)
    fixed: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        from jaxsim.sweep import KNOBS
        names = [v.name for v in self.variables]
        if not names:
            raise JaxsimInputError("search.variables", "no decision variables")
        if len(set(names)) != len(names):
            raise JaxsimInputError("search.variables", f"a knob appears twice: {names}")
        numeric = sorted(k for k in KNOBS if k not in ("hardware", "cluster", "seed", "kv_cache_dtype"))
        for n in names if self.design is None else ():
            if n not in numeric:
                raise JaxsimInputError(f"search.variables.{n}", "not a numeric sweep knob", f"numeric knobs: {numeric}")
        for n, opts in self.choices.items():
            if n in names or not isinstance(opts, (tuple, list)) or not opts:
                raise JaxsimInputError(f"search.choices.{n}", "must be a non-empty list of options that is not "
                                       "also a variable", f"got {opts!r}")

    def arms(self) -> list:
        """One space per combination of the choices (``fixed`` set); ``[self]`` without choices."""
        if not self.choices:
            return [self]
        names = list(self.choices)
        return [dataclasses.replace(self, choices={}, fixed=dict(zip(names, combo)))
                for combo in itertools.product(*(self.choices[n] for n in names))]

    @property
    def dim(self) -> int:
        return len(self.variables)

    @property
    def names(self) -> list:
        return [v.name for v in self.variables]

    @property
    def integer_mask(self) -> np.ndarray:
        return np.array([v.kind == "integer" for v in self.variables])

    def to_unit(self, values: dict) -> np.ndarray:
        """Knob values -> ``u`` (shape ``(D,)``)."""
        missing = [v.name for v in self.variables if v.name not in values]
        if missing:
            raise JaxsimInputError("search.start", f"no value for {missing}", "give every variable a start value")
        return np.array([(values[v.name] - v.lo) / (v.hi - v.lo) for v in self.variables], np.float64)

    def real(self, u) -> np.ndarray:
        """``u`` (clipped to the box) -> knob values before rounding, shape ``(D,)``."""
        lo = np.array([v.lo for v in self.variables])
        hi = np.array([v.hi for v in self.variables])
        return lo + np.clip(np.asarray(u, np.float64), 0.0, 1.0) * (hi - lo)

    def decode(self, u, xi=None) -> dict:
        """``u`` -> the variables' values ``{name: value}``. Integers: stochastic rounding on their
        lattice with the uniform draws ``xi`` (shape ``(D,)``; only the integer entries are read),
        nearest when ``xi`` is None."""
        x = self.real(u)
        out = {}
        for i, v in enumerate(self.variables):
            if v.kind == "integer":
                k = (x[i] - v.lo) / v.step
                r = stochastic_round(k, xi[i]) if xi is not None else math.floor(k + 0.5)
                out[v.name] = int(v.lo + v.step * min(max(r, 0), v.levels - 1))
            else:
                out[v.name] = float(x[i])
        return {**self.fixed, **out}

    def point(self, values: dict) -> "dict | None":
        """The sweep point of the variables' ``values`` (through ``design`` when set; None for a
        design that does not exist, e.g. a P/D split without decode instances)."""
        if self.design is None:
            return dict(values)
        p = self.design(values)
        return None if p is None else dict(p)

    @property
    def needs_anchor(self) -> bool:
        """Whether a variable can change the engine's array sizes (KV blocks, seats, instances, ...)."""
        if self.design is not None:
            return not getattr(self.design, "value_only", False)
        return any(v.name not in VALUE_ONLY_KNOBS for v in self.variables)

    def anchor(self) -> dict:
        """The sweep point at every upper bound: the largest sizes of the box (KV blocks, seats,
        token budgets and instance counts grow with their variables), so that a batch's merged
        sizes never change."""
        p = self.point(self.decode(np.ones(self.dim)))
        if p is None:
            raise JaxsimInputError("search.variables", "the design at every upper bound does not exist",
                                   "the upper bounds must give the largest valid design")
        return p

    def sweep_point(self, values: dict, seed: int) -> dict:
        """``values`` on trace ``seed`` as a sweep point; ``{"invalid": True, "seed": seed}`` for a
        design that does not exist (:class:`SweepEvaluator` does not simulate it: it is infinitely bad)."""
        p = self.point(values)
        return {"invalid": True, "seed": int(seed)} if p is None else {**p, "seed": int(seed)}

    def designs(self) -> "list | None":
        """Every design of an all-integer space (each lattice point, every arm), without the
        designs that do not exist (:meth:`point` None); None when a variable is continuous."""
        if any(v.kind != "integer" for v in self.variables):
            return None
        return [v for v in self.grid(2) if self.point(v) is not None]

    def grid(self, levels: int) -> list:
        """The exhaustive grid: every lattice point of the integer variables, ``levels`` evenly
        spaced values of each continuous one (bounds included); a list of values dicts."""
        axes = []
        for v in self.variables:
            if v.kind == "integer":
                axes.append([int(v.lo + k * v.step) for k in range(v.levels)])
            else:
                axes.append([float(x) for x in np.linspace(v.lo, v.hi, levels)])
        choice = [dict(zip(self.choices, c)) for c in itertools.product(*self.choices.values())] or [{}]
        return [{**self.fixed, **ch, **dict(zip(self.names, combo))}
                for ch in choice for combo in itertools.product(*axes)]


def stochastic_round(x, xi):
    """``floor(x) + (xi < frac(x))``: unbiased (``E = x`` for ``xi ~ U[0, 1)``), and a + / - pair
    that shares ``xi`` rounds both its points with the same draw (common random numbers)."""
    f = np.floor(x)
    return (f + (np.asarray(xi) < (x - f))).astype(np.int64) if np.ndim(x) else int(f + (xi < x - f))


# ---------------------------------------------------------------------------------------------
# Stencil


DIRECTION_KINDS = ("gaussian", "rademacher", "orthogonal")


def directions(rng: np.random.Generator, num: int, dim: int, kind: str = "gaussian") -> np.ndarray:
    """``num`` random directions, shape ``(num, dim)``: standard normal, Rademacher (+-1), or
    ``orthogonal``: rows of random orthogonal matrices (Haar, by QR of a Gaussian matrix with the
    sign fix of Mezzadri 2007) scaled by ``sqrt(dim)``, a fresh matrix per ``dim`` rows. Like the
    Gaussian ones, ``E[d d^T] = I`` (the estimate is unbiased); with ``num = dim`` the stencil
    gradient of a linear function is exact (a central difference along each axis of a random
    basis), where ``dim`` Gaussian directions leave an error of the gradient's own size."""
    if kind == "gaussian":
        return rng.standard_normal((num, dim))
    if kind == "rademacher":
        return rng.choice(np.array([-1.0, 1.0]), size=(num, dim))
    if kind == "orthogonal":
        rows = []
        while len(rows) < num:
            q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
            q = q * np.sign(np.diag(r))  # (Haar measure)
            rows.extend(math.sqrt(dim) * q.T)
        return np.array(rows[:num])
    raise JaxsimInputError("search.direction_kind", f"must be one of {DIRECTION_KINDS}, got {kind!r}")


def stencil(u, dirs: np.ndarray, radius: float) -> np.ndarray:
    """The antithetic stencil, shape ``(2K, D)``: row ``2k`` is ``u + radius d_k``, row ``2k + 1``
    is ``u - radius d_k`` (not clipped: :meth:`Space.decode` clips, i.e. the objective is extended
    outside the box by its value at the nearest box point)."""
    u = np.asarray(u, np.float64)
    out = np.empty((2 * len(dirs), u.size))
    out[0::2] = u + radius * dirs
    out[1::2] = u - radius * dirs
    return out


def stencil_gradient(f_plus, f_minus, dirs: np.ndarray, radius: float) -> np.ndarray:
    """``1/K sum_k (f+_k - f-_k) / (2 radius) d_k`` over the pairs whose two values are finite
    (a pair with a failed run carries no slope); shape ``(D,)``, zero when no pair is finite."""
    f_plus, f_minus = np.asarray(f_plus, np.float64), np.asarray(f_minus, np.float64)
    ok = np.isfinite(f_plus) & np.isfinite(f_minus)
    if not ok.any():
        return np.zeros(dirs.shape[1])
    slope = (f_plus[ok] - f_minus[ok]) / (2.0 * radius)
    return (slope[:, None] * dirs[ok]).mean(axis=0)


# ---------------------------------------------------------------------------------------------
# Metrics


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, np.float64)))  # (no overflow for large |z|)


def soft_attainment(ttft_ms, tpot_ms, finished, slo_ttft_ms, slo_tpot_ms, temperature: float) -> np.ndarray:
    """Per-request smoothed SLO attainment, shape ``(N,)``:
    ``sigmoid(s_ttft / T) * sigmoid(s_tpot / T)`` with the relative slacks
    ``s = (SLO - value) / SLO`` and temperature ``T`` (dimensionless; ``T -> 0`` gives the hard
    indicator, 1/2 at zero slack); an unfinished request attains 0; a missing SLO (None) is no factor."""
    if not temperature > 0:
        raise JaxsimInputError("search.temperature", f"must be > 0, got {temperature}")
    finished = np.asarray(finished, bool)
    p = finished.astype(np.float64)
    for value, slo in ((ttft_ms, slo_ttft_ms), (tpot_ms, slo_tpot_ms)):
        if slo is not None:
            v = np.where(finished, np.asarray(value, np.float64), 0.0)
            p = p * _sigmoid((slo - v) / slo / temperature)
    return p


def request_metrics(workload, req: dict, slo_ttft_ms=None, slo_tpot_ms=None, temperature: float = 0.05) -> dict:
    """One seed's per-request arrays and rates from a sweep point's ``requests`` entry
    (``keep_requests=True``): TTFT and TPOT as :func:`jaxsim.sweep.config_metrics` defines them
    (TPOT = (e2e - ttft) // (output - 1), 0 for one token), ``ok`` (hard SLO), ``soft`` (:func:`soft_attainment`),
    the makespan (s, first arrival to last finish) and ``throughput_rps`` / ``goodput_rps`` /
    ``soft_goodput_rps`` / ``output_tok_s``."""
    finish = np.asarray(req["finish"], np.int64)
    done = finish >= 0
    arrival = np.where(workload.released, np.asarray(req["arrival"], np.int64), workload.arrival_ns.astype(np.int64))
    output = workload.output_toks.astype(np.int64)
    ttft = np.asarray(req["first_token"], np.int64) - arrival
    e2e = finish - arrival
    tpot = np.where(output > 1, (e2e - ttft) // np.maximum(output - 1, 1), 0)
    ttft_ms, tpot_ms = np.where(done, ttft / 1e6, np.nan), np.where(done, tpot / 1e6, np.nan)
    ok = done.copy()
    if slo_ttft_ms is not None:
        ok &= np.nan_to_num(ttft_ms, nan=np.inf) <= slo_ttft_ms
    if slo_tpot_ms is not None:
        ok &= np.nan_to_num(tpot_ms, nan=np.inf) <= slo_tpot_ms
    soft = soft_attainment(ttft_ms, tpot_ms, done, slo_ttft_ms, slo_tpot_ms, temperature)
    makespan = float(finish[done].max() - arrival.min()) / 1e9 if done.any() else math.nan
    rate = (lambda n: n / makespan) if makespan > 0 else (lambda n: math.nan)
    return dict(ttft_ms=ttft_ms, tpot_ms=tpot_ms, done=done, ok=ok, soft=soft, makespan_s=makespan,
                throughput_rps=rate(done.sum()), goodput_rps=rate(ok.sum()), soft_goodput_rps=rate(soft.sum()),
                output_tok_s=rate(output[done].sum()))


def pool_metrics(per_seed: list) -> dict:
    """A design's metrics over its seeds: percentiles and means over the pooled requests of all
    seeds (one 300-request trace is too short for a P99 near capacity; issue 16); rates averaged over
    the seeds. A design where some request did not finish has infinite latency percentiles."""
    cat = lambda k: np.concatenate([m[k] for m in per_seed])  # noqa: E731
    done, ok, soft = cat("done"), cat("ok"), cat("soft")
    out = {"finished_fraction": float(done.mean()), "slo_attainment": float(ok.mean()),
           "soft_attainment": float(soft.mean())}
    for name in ("ttft", "tpot"):
        v = cat(f"{name}_ms")
        out[f"{name}_mean_ms"] = float(np.nanmean(v)) if done.all() else math.inf
        for q in (50, 90, 99):
            out[f"{name}_p{q}_ms"] = float(np.percentile(v, q)) if done.all() else math.inf
    for k in ("throughput_rps", "goodput_rps", "soft_goodput_rps", "output_tok_s"):
        out[k] = float(np.mean([m[k] for m in per_seed]))
    # per accelerator, and energy (NaN without a power model: SweepBase.power); a fake evaluator's
    # metrics may lack them
    gpus = per_seed[0].get("gpus", math.nan)
    out["gpus"] = float(gpus)
    out["output_tok_s_per_gpu"] = out["output_tok_s"] / gpus if gpus and math.isfinite(gpus) else math.nan
    for k in ("energy_j", "j_per_output_token"):
        out[k] = float(np.mean([m.get(k, math.nan) for m in per_seed]))
    return out


class SweepEvaluator:
    """Runs a list of sweep points (each with its ``seed``) in ONE :func:`jaxsim.sweep.sweep` call and
    returns each point's :func:`request_metrics`. ``base.synthetic`` must be set (the seed knob);
    the SLOs are the base's (``slo_ttft_ms`` / ``slo_tpot_ms``)."""

    def __init__(self, base, temperature: float = 0.05):
        if base.synthetic is None:
            raise JaxsimInputError("search.base.synthetic", "the search draws trace seeds",
                                   "set SweepBase.synthetic (a synthetic workload's arguments)")
        self.base, self.temperature = base, temperature
        self.calls = 0
        self.simulations = 0

    def __call__(self, points: list) -> list:
        from jaxsim import sweep
        valid = [p for p in points if not p.get("invalid")]
        if not valid:
            return [INVALID] * len(points)
        # a design that does not exist is not simulated: a valid point runs in its place (the call
        # keeps its size, hence its compile) and its result is INVALID
        run = [p if not p.get("invalid") else valid[0] for p in points]
        res = sweep.sweep(self.base, run, chunk_size=len(run), progress=False, keep_requests=True)
        self.calls += 1
        self.simulations += len(points)
        out = []
        for p, row, req in zip(points, res.rows, res.requests):
            if p.get("invalid"):
                out.append(INVALID)
                continue
            w = sweep.point_inputs(self.base, p)["workload"]  # (cached per seed: the sweep's own trace)
            m = request_metrics(w, req, self.base.slo_ttft_ms, self.base.slo_tpot_ms, self.temperature)
            m["status"] = row["status"]
            # the design's accelerators (instances x TP x PP) and, with a power model, its energy
            m["gpus"] = sum(i.hw.tp * i.hw.pp for i in sweep.point_instances(self.base, p))
            m["energy_j"] = float(row.get("energy_j", math.nan))
            m["j_per_output_token"] = float(row.get("j_per_output_token", math.nan))
            out.append(m)
        return out


# The metrics of a design that does not exist (no request served; status "invalid": merit +inf).
INVALID = dict(ttft_ms=np.full(1, np.nan), tpot_ms=np.full(1, np.nan), done=np.zeros(1, bool), ok=np.zeros(1, bool),
               soft=np.zeros(1), makespan_s=math.nan, throughput_rps=0.0, goodput_rps=0.0, soft_goodput_rps=0.0,
               output_tok_s=0.0, gpus=math.nan, energy_j=math.nan, j_per_output_token=math.nan, status="invalid")


# ---------------------------------------------------------------------------------------------
# Problem


@dataclasses.dataclass(frozen=True)
class Constraint:
    """``metric sense bound`` on a pooled metric (:func:`pool_metrics`), e.g. ``tpot_p99_ms <= 25``.
    Its normalised violation ``g`` is ``(metric - bound') / |bound|`` for ``<=`` (feasible: ``g <= 0``),
    with ``bound' = bound (1 - margin)`` (``>=``: ``bound (1 + margin)``): a guard band against the
    trace's noise, so that a design feasible on the search's seeds stays feasible on other traces
    (:func:`seed_noise`, :func:`guard_band`)."""

    metric: str
    sense: str
    bound: float
    margin: float = 0.0

    def __post_init__(self):
        if self.sense not in ("<=", ">="):
            raise JaxsimInputError(f"search.constraints.{self.metric}.sense",
                                   f"must be '<=' or '>=', got {self.sense!r}")
        if not (math.isfinite(self.bound) and self.bound != 0):
            raise JaxsimInputError(f"search.constraints.{self.metric}.bound",
                                   f"must be finite and non-zero, got {self.bound}")
        if not 0 <= self.margin < 1:
            raise JaxsimInputError(f"search.constraints.{self.metric}.margin", f"must be in [0, 1), got {self.margin}")

    @property
    def target(self) -> float:
        """The bound the search enforces (the guard band applied)."""
        return self.bound * (1 - self.margin) if self.sense == "<=" else self.bound * (1 + self.margin)

    def violation(self, metrics: dict) -> float:
        if self.metric not in metrics:
            raise JaxsimInputError(f"search.constraints.{self.metric}", "unknown metric", f"known: {sorted(metrics)}")
        v = metrics[self.metric]
        g = (v - self.target) if self.sense == "<=" else (self.target - v)
        return g / abs(self.bound) if math.isfinite(g) else math.inf

    def holds(self, metrics: dict) -> bool:
        """Whether the metric meets the plain bound (no guard band): the held-out check."""
        v = metrics[self.metric]
        return bool(v <= self.bound) if self.sense == "<=" else bool(v >= self.bound)


def linear_cost(weights: dict):
    """Objective ``sum_k w_k x_k`` of the knob values (e.g. a price per TFLOP/s and per GB/s)."""
    def cost(values: dict, metrics: dict) -> float:
        return float(sum(w * values[k] for k, w in weights.items()))
    return cost


# the per-request smoothed counterpart of a metric (the sigmoid of each request's SLO slack)
SMOOTHED = {"goodput_rps": "soft_goodput_rps", "slo_attainment": "soft_attainment"}


def metric_objective(metric: str, maximise: bool = False):
    """Objective: a pooled metric (negated when maximised: the search minimises)."""
    def obj(values: dict, metrics: dict) -> float:
        v = metrics[metric]
        return -v if maximise else v
    return obj


@dataclasses.dataclass(frozen=True)
class Problem:
    """Minimise ``objective(values, metrics)`` over ``space`` subject to ``constraints``.
    ``objective_scale`` divides the objective in the merit (None: its magnitude at the start, so that
    the penalty weight is relative to the objective's size)."""

    space: Space
    objective: object
    constraints: tuple = ()
    objective_scale: float | None = None
    # what the stencil differentiates instead of the objective (None: the objective itself), e.g.
    # the smoothed goodput (soft_goodput_rps) for the goodput: a step function of each request's
    # latency has no useful slope; designs are still compared by the objective
    surrogate: object = None


def merit(f: float, g: list, lam, mu: float) -> float:
    """The augmented Lagrangian of inequality constraints ``g_i <= 0`` (Powell-Hestenes-Rockafellar;
    Nocedal & Wright, Numerical Optimization, 2nd ed., eq. 17.65):
    ``f + sum_i (mu/2) max(0, g_i + lam_i/mu)^2 - lam_i^2 / (2 mu)``; ``lam = 0`` is the quadratic penalty."""
    if not math.isfinite(f) or not all(math.isfinite(x) for x in g):
        return math.inf
    lam = np.zeros(len(g)) if lam is None else np.asarray(lam, np.float64)
    g = np.asarray(g, np.float64)
    return float(f + np.sum(0.5 * mu * np.maximum(0.0, g + lam / mu) ** 2 - lam ** 2 / (2 * mu)))


# ---------------------------------------------------------------------------------------------
# Trust region


@dataclasses.dataclass
class TrustRegion:
    """Accept a candidate only when the exact evaluation lowers the merit; on a reject the radius
    (an L-infinity bound on the step in ``u``) becomes ``shrink`` times the rejected step's length
    (so the next candidate is closer whatever bound the optimiser's step had), on an accept whose decrease
    is at least ``eta_good`` of the gradient's prediction it grows by ``grow`` (up to ``max_radius``)."""

    radius: float = 0.2
    min_radius: float = 1e-3
    max_radius: float = 0.5
    shrink: float = 0.5
    grow: float = 1.5
    eta_good: float = 0.5

    def clip(self, step: np.ndarray) -> np.ndarray:
        m = np.max(np.abs(step)) if step.size else 0.0
        return step if m <= self.radius else step * (self.radius / m)

    def decide(self, merit_old: float, merit_new: float, predicted_decrease: float, step_length: float,
               accept: bool | None = None) -> bool:
        """Whether to accept the step of L-infinity length ``step_length`` (by default: when the merit
        decreased; ``accept`` overrides the rule, e.g. :func:`better`); updates the radius."""
        if accept is None:
            accept = math.isfinite(merit_new) and merit_new < merit_old
        if not accept:
            self.radius = max(self.min_radius, min(self.radius, step_length) * self.shrink)
        elif predicted_decrease > 0 and (merit_old - merit_new) >= self.eta_good * predicted_decrease:
            self.radius = min(self.max_radius, self.radius * self.grow)
        return accept


# ---------------------------------------------------------------------------------------------
# One step's batch


@dataclasses.dataclass
class Batch:
    """The sweep points of one step: ``exact`` (the candidate on each seed, nearest rounding), the
    stencil (pair k, side +/-, seed s, rounding draws shared by a pair), and the anchor."""

    points: list  # sweep points (with "seed")
    values: list  # the variables' values of each point (the anchor's: None)
    exact: list  # indices in points, one per seed
    plus: list  # [k][s] indices
    minus: list
    dirs: np.ndarray
    radius: float
    anchor: int | None


def make_batch(space: Space, u, dirs: np.ndarray, radius: float, seeds, rng: np.random.Generator) -> Batch:
    """The points of one step around ``u`` (see :class:`Batch`): ``S (2K + 1)`` points, + 1 anchor
    when :attr:`Space.needs_anchor`; the same count at every step."""
    seeds = [int(s) for s in seeds]
    pts, vals, exact, plus, minus = [], [], [], [], []

    def add(values, seed):
        vals.append(values)
        pts.append(space.sweep_point(values, seed))
        return len(pts) - 1

    for s in seeds:
        exact.append(add(space.decode(u), s))
    st = stencil(u, dirs, radius)
    xi = rng.random((len(dirs), len(seeds), space.dim))  # common to a + / - pair
    for k in range(len(dirs)):
        plus.append([add(space.decode(st[2 * k], xi[k, j]), s) for j, s in enumerate(seeds)])
        minus.append([add(space.decode(st[2 * k + 1], xi[k, j]), s) for j, s in enumerate(seeds)])
    anchor = None
    if space.needs_anchor:
        anchor = len(pts)
        pts.append({**space.anchor(), "seed": seeds[0]})
        vals.append(None)
    return Batch(pts, vals, exact, plus, minus, dirs, float(radius), anchor)


@dataclasses.dataclass
class Evaluation:
    """A design evaluated on the fixed seeds: its knob values, pooled metrics, objective, violations."""

    u: np.ndarray
    values: dict
    metrics: dict
    objective: float
    violations: list
    status_ok: bool

    def merit(self, lam, mu, scale) -> float:
        return merit(self.objective / scale, self.violations, lam, mu) if self.status_ok else math.inf

    @property
    def feasible(self) -> bool:
        return self.status_ok and all(g <= 0 for g in self.violations)


def _evaluation(problem: Problem, u, values: dict, per_seed: list) -> Evaluation:
    m = pool_metrics(per_seed)
    ok = all(p["status"] == "ok" for p in per_seed)
    return Evaluation(np.asarray(u, np.float64), values, m, problem.objective(values, m),
                      [c.violation(m) for c in problem.constraints], ok)


def smoothed_gradient(evaluate, problem: Problem, u, seeds, *, radius: float = 0.05, num_directions: int = 2,
                      kind: str = "gaussian", rng: np.random.Generator | None = None, lam=None, mu: float = 100.0,
                      scale: float = 1.0):
    """The smoothed gradient of the merit at ``u`` in ONE evaluator call (see the module docstring).

    Args:
      evaluate: ``points -> list of per-point metrics`` (a :class:`SweepEvaluator`).
      u: the point in the normalised box, shape ``(D,)``.
      seeds: trace seeds (each stencil point runs every one; a + / - pair shares them).
      radius: the smoothing radius in ``u`` units (box side = 1).
      num_directions: K, the antithetic pairs.
    Returns:
      ``(gradient (D,), Evaluation at u (nearest rounding), Batch)``.
    """
    rng = rng or np.random.default_rng(0)
    dirs = directions(rng, num_directions, problem.space.dim, kind)
    batch = make_batch(problem.space, u, dirs, radius, seeds, rng)
    results = evaluate(batch.points)
    grad, center = _read_batch(problem, batch, results, u, lam, mu, scale)
    return grad, center, batch


def _read_batch(problem, batch: Batch, results, u, lam, mu, scale):
    """The smoothed gradient of the merit, and the Evaluation at ``u``."""
    grads, center = _read_gradients(problem, batch, results, u, lam, mu, scale)
    return grads["merit"], center


def _read_gradients(problem, batch: Batch, results, u, lam, mu, scale):
    """Smoothed gradients from one batch: ``{"merit": (D,), "objective": (D,) (objective / scale),
    "constraints": (m, D)}`` (each from the same stencil pairs), and the Evaluation at ``u``."""
    center = _evaluation(problem, u, batch.values[batch.exact[0]], [results[i] for i in batch.exact])
    smooth = problem if problem.surrogate is None else dataclasses.replace(problem, objective=problem.surrogate)
    sides = ([], [])
    for pk, mk in zip(batch.plus, batch.minus):
        for idx, out in ((pk, sides[0]), (mk, sides[1])):
            # the design of a stencil point differs per seed only by its rounding: pooled over seeds
            vals = {k: np.mean([batch.values[i][k] for i in idx]) for k in problem.space.names}
            e = _evaluation(smooth, None, vals, [results[i] for i in idx])
            ok = e.status_ok and all(math.isfinite(g) for g in e.violations)
            out.append([e.merit(lam, mu, scale)] + [e.objective / scale if ok else math.inf]
                       + [g if ok else math.inf for g in e.violations])
    fp, fm = np.array(sides[0]).reshape(len(batch.plus), -1), np.array(sides[1]).reshape(len(batch.plus), -1)
    cols = [stencil_gradient(fp[:, j], fm[:, j], batch.dirs, batch.radius) for j in range(fp.shape[1])]
    return {"merit": cols[0], "objective": cols[1],
            "constraints": np.array(cols[2:]).reshape(len(problem.constraints), len(batch.dirs[0]))}, center


def projected_step(update, g, G, max_active: int | None = None) -> np.ndarray:
    """The optimiser's ``update`` (shape ``(D,)``) projected so that no linearised constraint is
    violated after the step: the closest ``s`` to ``update`` with ``g_i + G_i s = 0`` for every
    constraint ``i`` that ``update`` would leave violated (``g_i + G_i update > 0``; added one at a
    time until none is), i.e. ``s = update - A^T (A A^T)^+ (A update + g_A)``. A violated constraint
    is restored to its linearised boundary; an active one is slid along (gradient projection,
    Rosen 1960; Nocedal & Wright ch. 16.7). ``g``: normalised violations (m,), ``G``: their smoothed
    gradients (m, D)."""
    update = np.asarray(update, np.float64)
    g, G = np.asarray(g, np.float64), np.asarray(G, np.float64).reshape(len(g), update.size)
    ok = np.isfinite(g) & np.all(np.isfinite(G), axis=1) & (np.abs(G).sum(axis=1) > 0)
    active: list = []
    s = update
    for _ in range(min(len(g), max_active or len(g))):
        cand = [i for i in range(len(g)) if ok[i] and i not in active and g[i] + G[i] @ s > 1e-12]
        if not cand:
            break
        active.append(max(cand, key=lambda i: g[i] + G[i] @ s))  # the most violated first
        A, b = G[active], g[active]
        s = update - A.T @ (np.linalg.pinv(A @ A.T) @ (A @ update + b))
    return s


# ---------------------------------------------------------------------------------------------
# The search loop


@dataclasses.dataclass
class SearchResult:
    best: Evaluation  # the best feasible exact evaluation (else the lowest merit)
    trajectory: list  # dicts: step, kind (exact / stencil / anchor), u, values, metrics, objective, merit, accepted
    evaluations: int  # simulations run (sweep points)
    calls: int  # evaluator calls (compiled sweep calls)
    wall_s: float


def search(evaluate, problem: Problem, start: dict, seeds=(0, 1), *, steps: int = 10, radius: float = 0.05,
           num_directions: int = 2, kind: str = "gaussian", optimizer: str = "adam", learning_rate: float = 0.05,
           mu: float = 100.0, multipliers: bool = True, trust: TrustRegion | None = None, seed: int = 0,
           keep_stencil: bool = False, constraints: str = "projection") -> SearchResult:
    """Minimise ``problem`` from ``start`` (``{knob: value}``) with ``steps`` evaluator calls.

    Each call evaluates the candidate exactly (nearest rounding, on ``seeds``) and the stencil around
    it (:func:`smoothed_gradient`). The trust region accepts the candidate when it is :func:`better`
    than the incumbent (the feasibility rule: a feasible incumbent is only replaced by a cheaper
    feasible design). The incumbent's smoothed gradients drive the optax optimiser (``adam`` or
    ``sgd`` at ``learning_rate``, in ``u`` units), whose step the trust region clips. On a reject the
    optimiser state is kept and the next candidate comes from the incumbent's gradient with the
    smaller radius. ``constraints``:

    * ``"projection"`` (default): the optimiser steps on the objective's gradient (``problem.surrogate``'s
      when set), and the step is projected so that no linearised constraint (value and smoothed
      gradient from the same stencil) is violated after it (:func:`projected_step`): it restores a
      violated constraint and slides along an active one;
    * ``"lagrangian"``: the optimiser steps on the gradient of the augmented Lagrangian
      (:func:`merit`); multipliers (``multipliers=True``) update at every exact evaluation,
      ``lam <- max(0, lam + mu g)``; else ``mu`` is a plain quadratic penalty weight.

    The trajectory holds every evaluated design (the exact ones, and with ``keep_stencil`` the stencil
    points pooled over seeds).
    """
    t0 = time.perf_counter()
    if optimizer not in ("adam", "sgd"):
        raise JaxsimInputError("search.optimizer", f"must be 'adam' or 'sgd', got {optimizer!r}")
    if constraints not in ("projection", "lagrangian"):
        raise JaxsimInputError("search.constraints_method", f"must be 'projection' or 'lagrangian', got {constraints!r}")
    if steps < 1:
        raise JaxsimInputError("search.steps", f"must be >= 1, got {steps}")
    space = problem.space
    rng = np.random.default_rng(seed)
    trust = trust or TrustRegion()
    opt = optax.adam(learning_rate) if optimizer == "adam" else optax.sgd(learning_rate)
    lam = np.zeros(len(problem.constraints))
    u_c = np.clip(space.to_unit(start), 0.0, 1.0)
    opt_state = opt.init(np.zeros(space.dim))
    candidate, pending_state, predicted = u_c, None, 0.0
    inc: Evaluation | None = None
    inc_grad = None
    scale = problem.objective_scale
    trajectory, calls, sims = [], 0, 0

    for step in range(steps):
        dirs = directions(rng, num_directions, space.dim, kind)
        batch = make_batch(space, candidate, dirs, radius, seeds, rng)
        results = evaluate(batch.points)
        calls, sims = calls + 1, sims + len(batch.points)
        center = _evaluation(problem, candidate, batch.values[batch.exact[0]], [results[i] for i in batch.exact])
        if scale is None:
            scale = abs(center.objective) or 1.0
        if inc is None:
            accepted = True
        else:  # the feasibility rule: a feasible incumbent is never traded for an infeasible candidate
            accepted = trust.decide(inc.merit(lam, mu, scale), center.merit(lam, mu, scale), predicted,
                                    float(np.max(np.abs(candidate - u_c))), accept=better(center, inc))
        trajectory.append(dict(step=step, kind="exact", u=candidate.tolist(), values=center.values,
                               metrics=center.metrics, objective=center.objective,
                               merit=center.merit(lam, mu, scale), feasible=center.feasible,
                               accepted=accepted, trust_radius=trust.radius))
        if keep_stencil:
            st = stencil(candidate, dirs, radius)
            for k in range(len(dirs)):
                for side, idx in ((0, batch.plus[k]), (1, batch.minus[k])):
                    trajectory.append(dict(step=step, kind="stencil", u=st[2 * k + side].tolist(),
                                           values=[batch.values[i] for i in idx],
                                           metrics=pool_metrics([results[i] for i in idx])))
        if accepted:
            if pending_state is not None:
                opt_state = pending_state
            inc, u_c, inc_batch = center, candidate, (batch, results)
        if multipliers and center.status_ok:
            # first-order multiplier update at every exact evaluation (Nocedal & Wright eq. 17.39): a
            # rejected infeasible candidate says which constraint is active, and the multiplier's term
            # is what lets the next steps slide along the constraint instead of into it
            lam = np.maximum(0.0, lam + mu * np.asarray([min(g, 1e6) for g in center.violations]))
        grads, _ = _read_gradients(problem, *inc_batch, u_c, lam, mu, scale)  # (at the current multipliers)
        # the next candidate: the optimiser's step from the incumbent's gradient, clipped by the trust region
        if constraints == "projection":
            inc_grad = grads["objective"]
            updates, pending_state = opt.update(inc_grad, opt_state, u_c)
            step_u = trust.clip(projected_step(updates, inc.violations, grads["constraints"]))
        else:
            inc_grad = grads["merit"]
            updates, pending_state = opt.update(inc_grad, opt_state, u_c)
            step_u = trust.clip(np.asarray(updates, np.float64))
        predicted = float(-inc_grad @ step_u)
        candidate = np.clip(u_c + step_u, 0.0, 1.0)

    best_pool = [e for e in _exacts(trajectory)]
    feas = [e for e in best_pool if e["feasible"]]
    pick = min(feas, key=lambda e: e["objective"]) if feas else min(best_pool, key=lambda e: e["merit"])
    best = Evaluation(np.asarray(pick["u"]), pick["values"], pick["metrics"], pick["objective"],
                      [c.violation(pick["metrics"]) for c in problem.constraints], True)
    return SearchResult(best, trajectory, sims, calls, time.perf_counter() - t0)


def _exacts(trajectory):
    return [e for e in trajectory if e["kind"] == "exact" and math.isfinite(e["merit"])]


# ---------------------------------------------------------------------------------------------
# Fixed-size calls, the trace noise, and the exact local polish


def evaluate_fixed_size(evaluate, space: Space, points: list, size: int) -> list:
    """Run sweep ``points`` in evaluator calls of exactly ``size`` points (a search's batch size,
    :func:`batch_size`), so that they reuse the search's compiled call: the last call padded with
    copies of its first point, plus the anchor when the space needs one. Returns the per-point
    metrics of ``points`` only."""
    out = []
    room = size - (1 if space.needs_anchor else 0)
    if room < 1:
        raise JaxsimInputError("search.batch_size", f"{size} points leave no room beside the anchor")
    for i in range(0, len(points), room):
        chunk = points[i:i + room]
        batch = chunk + [chunk[0]] * (room - len(chunk))
        if space.needs_anchor:
            batch.append({**space.anchor(), "seed": chunk[0]["seed"]})
        out.extend(evaluate(batch)[:len(chunk)])
    return out


def batch_size(space: Space, num_seeds: int, num_directions: int) -> int:
    """Points of one search step (:func:`make_batch`): ``S (2K + 1)`` (+ 1 anchor)."""
    return num_seeds * (2 * num_directions + 1) + (1 if space.needs_anchor else 0)


def evaluate_design(evaluate, problem: Problem, values: dict, seeds, size: int) -> Evaluation:
    """One design's exact :class:`Evaluation` on ``seeds`` (in calls of ``size`` points)."""
    space = problem.space
    per_seed = evaluate_fixed_size(evaluate, space, [space.sweep_point(values, s) for s in seeds], size)
    return _evaluation(problem, space.to_unit(values), dict(values), per_seed)


def seed_noise(evaluate, problem: Problem, values: dict, seeds, group: int, size: int, *,
               draws: int = 2000, rng: np.random.Generator | None = None) -> dict:
    """The spread of each constraint's pooled metric over trace seeds at one design.

    Runs ``values`` on every seed of ``seeds`` (N of them, in calls of ``size`` points), then draws
    ``draws`` subsets of ``group`` seeds without replacement (``group`` = the search's seed count)
    and pools each (:func:`pool_metrics`): the standard deviation of a constraint's metric over the
    subsets is the noise of the search's estimate at this design (a percentile of pooled requests is
    not a mean of per-seed values, so it is resampled rather than divided by sqrt(group)).
    Returns ``{metric: {"std", "mean", "seeds"}}``."""
    rng = rng or np.random.default_rng(0)
    seeds = [int(s) for s in seeds]
    if len(seeds) <= group:
        raise JaxsimInputError("search.noise_seeds", f"needs more than {group} seeds, got {len(seeds)}")
    space = problem.space
    per = evaluate_fixed_size(evaluate, space, [space.sweep_point(values, s) for s in seeds], size)
    out = {}
    for c in problem.constraints:
        vals = np.array([pool_metrics([per[i] for i in rng.choice(len(seeds), group, replace=False)])[c.metric]
                         for _ in range(draws)])
        vals = vals[np.isfinite(vals)]
        out[c.metric] = {"std": float(vals.std(ddof=1)) if vals.size > 1 else math.inf,
                         "mean": float(vals.mean()) if vals.size else math.inf, "seeds": len(seeds)}
    return out


def guard_band(problem: Problem, noise: dict, z: float = 1.645) -> Problem:
    """``problem`` with each constraint's margin set so that a design that meets the guarded bound on
    the search's seeds meets the plain bound on another set of as many seeds with probability about
    ``Phi(z)`` (0.95 at the default): the two estimates are independent with the standard deviation
    ``std`` of :func:`seed_noise`, so their difference has ``sqrt(2) std``; ``margin = z sqrt(2) std / |bound|``
    (a normal approximation, capped below 0.5)."""
    cons = []
    for c in problem.constraints:
        std = noise.get(c.metric, {}).get("std", 0.0)
        margin = min(0.5, z * math.sqrt(2.0) * std / abs(c.bound)) if math.isfinite(std) else 0.5
        cons.append(dataclasses.replace(c, margin=margin))
    return dataclasses.replace(problem, constraints=tuple(cons))


def total_violation(violations) -> float:
    """``sum_i max(0, g_i)`` over normalised violations ``g_i`` (feasible: 0); inf if one is inf."""
    return float(sum(max(0.0, g) for g in violations))


def feasibility_key(e: Evaluation) -> tuple:
    """The feasibility rule (Deb 2000, "An efficient constraint handling method for genetic
    algorithms", Comput. Methods Appl. Mech. Eng. 186) as a sort key, smaller is better:
    ``(0, objective)`` for a feasible design with a finite objective, ``(1, total violation)`` for an
    infeasible one, ``(2, 0)`` for a design whose run failed or whose objective is not finite."""
    if e.status_ok and math.isfinite(e.objective):
        v = total_violation(e.violations)
        return (0, e.objective) if v == 0 else (1, v)
    return (2, 0.0)


def better(a: Evaluation, b: "Evaluation | None") -> bool:
    """Whether ``a`` beats ``b`` (None: always) by the feasibility rule (:func:`feasibility_key`): a
    feasible design beats an infeasible one; two feasible ones compare by objective, two infeasible
    ones by total violation."""
    return b is None or feasibility_key(a) < feasibility_key(b)


def polish(evaluate, problem: Problem, start: Evaluation, seeds, size: int, *, max_rounds: int = 4,
           choices: "dict | None" = None, known: "dict | None" = None):
    """Exact local search from ``start``: each round evaluates every neighbour (one lattice step
    away in one integer variable, or, with ``choices`` ``{name: options}``, the same values with one
    categorical choice switched to another option) on ``seeds``, in calls of ``size`` points, and
    moves to the best by :func:`better`; stops when no neighbour is better or after ``max_rounds``.
    Relaxed integers (stochastic rounding) find the basin; this settles the rounding exactly. By the
    feasibility rule an infeasible design first walks toward feasibility (smaller total violation),
    across arms too, and its neighbours are then every lattice value of one integer variable (not
    only the next ones): the searches can all end infeasible under a guard band set at the end,
    with the feasible designs at a corner several steps away.
    The designs of other arms are judged by ``problem`` (the arms share objective and constraints).
    ``known``: ``{_key(values): Evaluation}`` of designs already evaluated on ``seeds`` under
    ``problem``'s constraints; they are not simulated again (nor returned in the evaluated list).
    Returns ``(best Evaluation, evaluated list, simulations, calls)``."""
    space = problem.space
    ints = [v for v in space.variables if v.kind == "integer"]
    choices = {n: tuple(o) for n, o in (choices or {}).items() if len(o) > 1}
    known = known or {}
    best, seen, sims, calls, evaluated = start, {_key(start.values)}, 0, 0, []
    for _ in range(max_rounds if ints or choices else 0):
        nbrs = []
        # Feasibility restoration: from an infeasible design the neighbourhood is each integer
        # variable's whole lattice line (the others held), since the feasible designs can be a few
        # steps away in several variables at once; once feasible, one lattice step.
        restore = feasibility_key(best)[0] > 0
        for v in ints:
            line = [v.lo + k * v.step for k in range(v.levels)] if restore else \
                [best.values[v.name] - v.step, best.values[v.name] + v.step]
            for x in line:
                cand = {**best.values, v.name: int(x)}
                if v.lo <= x <= v.hi and _key(cand) not in seen:
                    seen.add(_key(cand))
                    nbrs.append(cand)
        for n, opts in choices.items():
            for o in opts:
                cand = {**best.values, n: o}
                if _key(cand) not in seen:
                    seen.add(_key(cand))
                    nbrs.append(cand)
        if not nbrs:
            break
        new = [c for c in nbrs if _key(c) not in known]
        evs = []
        if new:
            pts = [space.sweep_point(c, s) for c in new for s in seeds]
            per = evaluate_fixed_size(evaluate, space, pts, size)
            room = size - (1 if space.needs_anchor else 0)
            sims, calls = sims + size * -(-len(pts) // room), calls + -(-len(pts) // room)
            n = len(seeds)
            evs = [_evaluation(problem, space.to_unit(c), c, per[n * i:n * (i + 1)]) for i, c in enumerate(new)]
            evaluated.extend(evs)
        top = None
        for e in evs + [known[_key(c)] for c in nbrs if _key(c) in known]:
            top = e if better(e, top) else top
        if not better(top, best):
            break
        best = top
    return best, evaluated, sims, calls


def _key(values: dict) -> tuple:
    return tuple(sorted((k, round(float(v), 9) if isinstance(v, (int, float, np.number)) else v)
                        for k, v in values.items()))


# ---------------------------------------------------------------------------------------------
# The whole procedure: search, measure the trace noise where the search ended, guard, search on, polish


@dataclasses.dataclass
class DesignResult:
    """The outcome of :func:`design_search`: the best design under the guarded problem, the
    guarded problem itself, the measured noise, and every exactly evaluated design (``exacts``:
    :class:`Evaluation`, in order), with the simulations and compiled calls spent."""

    best: Evaluation
    problem: Problem  # with the guard bands
    noise: dict
    exacts: list
    trajectory: list  # the search phases' trajectories (dicts, see SearchResult), phase-tagged
    rows: list  # every exact evaluation in order: phase (1, 2, "polish"), arm, step, simulations so far,
    #             values, objective, feasible (guarded), accepted, metrics
    evaluations: int
    calls: int
    wall_s: float


def design_search(evaluate, problem: Problem, start: dict, seeds=(0, 1, 2), *, steps: int = 12,
                  noise_after: int | None = None, noise_seeds=None, z: float = 1.645, polish_rounds: int = 3,
                  exhaustive: bool | None = None, **search_kw) -> DesignResult:
    """Search, then guard the constraints against trace noise, search on, and polish the integers.

    ``exhaustive``: evaluate every design instead (:func:`_exhaustive`, the same guard band). None
    (the default) does so when every variable is an integer and the whole lattice, all arms, costs
    no more simulations than the searches' steps would: a gradient cannot beat the grid there.

    1. :func:`search` for ``noise_after`` steps (default half of ``steps``) on the plain constraints,
       once per arm of the space's categorical choices (:meth:`Space.arms`);
    2. :func:`seed_noise` at the cheapest design of phase 1 that meets the plain bounds (else the best
       reached), on ``noise_seeds`` (default: as many fresh seeds
       as fill one call), and :func:`guard_band` with ``z``: the constraints get margins;
    3. :func:`search` for the remaining steps from each arm's best, on the guarded problem;
    4. with constraints: :func:`seed_noise` again at the best design under the mid-way band (the
       noise grows toward the boundary, where phase 2 ends; other fresh seeds; skipped, ``std_end``
       NaN, when that design misses the plain bounds), and the guard band set by the larger of the two measurements
       (``noise[metric]["std_mid"]``, ``["std_end"]``);
    5. :func:`polish` the best design (``polish_rounds``): its integer variables and its categorical
       choices (another arm's design with the same values is a neighbour).
    The best design is the best exact evaluation of all phases and arms under the final guarded
    constraints (every design re-scored from its metrics), by :func:`better`. Every call has the same
    number of points (one compile). ``search_kw`` go to :func:`search` (radius, num_directions, ...).
    """
    t0 = time.perf_counter()
    seeds = tuple(int(s) for s in seeds)
    arms = [dataclasses.replace(problem, space=a) for a in problem.space.arms()]
    size = batch_size(arms[0].space, len(seeds), search_kw.get("num_directions", 2))
    room = size - (1 if arms[0].space.needs_anchor else 0)
    n1 = steps // 2 if noise_after is None else noise_after
    if not 0 < n1 < steps:
        raise JaxsimInputError("search.noise_after", f"must be in [1, steps - 1] = [1, {steps - 1}], got {n1}")
    if noise_seeds is None:
        start_seed = max(seeds) + 1000  # fresh traces: neither the search's nor (by convention) held-out ones
        noise_seeds = range(start_seed, start_seed + max(room, len(seeds) + 2))
    noise_seeds = [int(s) for s in noise_seeds] if problem.constraints else []  # nothing to guard
    designs = problem.space.designs() if exhaustive is not False else None
    if exhaustive is None:
        exhaustive = designs is not None and len(designs) * len(seeds) <= steps * size * len(arms)
    if exhaustive:
        return _exhaustive(evaluate, problem, designs, arms, seeds, size, noise_seeds, z, t0)
    sims = calls = 0
    rows: list = []

    def log(phase, arm, entries, problem_, offset=0):
        for e in entries:  # (e["step"]: the step within its own search call)
            ev = _rescored(problem_, e)
            rows.append(dict(phase=phase, arm=arm, step=e["step"] + offset, simulations=sims + (e["step"] + 1) * size,
                             values=e["values"], objective=ev.objective, feasible=ev.feasible,
                             accepted=e["accepted"], metrics=e["metrics"]))

    first = []
    for p in arms:
        first.append(search(evaluate, p, start, seeds, steps=n1, **search_kw))
        log(1, dict(p.space.fixed), _exacts(first[-1].trajectory), p)
        sims, calls = sims + first[-1].evaluations, calls + first[-1].calls
    lead = None
    for i, r in enumerate(first):
        lead = i if lead is None or better(_plain(arms[i], r.best), _plain(arms[lead], first[lead].best)) else lead
    # measured at the cheapest design of phase 1 that meets the plain bounds (else the best reached):
    # an overloaded design's noise would inflate the band for nothing
    at_i, at = lead, _plain(arms[lead], first[lead].best)
    for i, r in enumerate(first):
        for e in _exacts(r.trajectory):
            ev = _rescored(arms[i], e)
            if ev.feasible and better(ev, at):
                at_i, at = i, ev
    noise = seed_noise(evaluate, arms[at_i], at.values, noise_seeds, len(seeds), size) if noise_seeds else {}
    n_calls = -(-len(noise_seeds) // room)
    sims, calls = sims + n_calls * size, calls + n_calls
    guarded = [guard_band(p, noise, z) for p in arms]
    exacts, traj, best, best_arm = [], [], None, 0  # exacts: (arm index, trajectory entry)
    for i, (p, r1) in enumerate(zip(guarded, first)):
        r2 = search(evaluate, p, r1.best.values, seeds, steps=steps - n1,
                    **{**search_kw, "seed": 1 + search_kw.get("seed", 0)})
        arm = dict(p.space.fixed)
        log(2, arm, _exacts(r2.trajectory), p, offset=n1)
        sims, calls = sims + r2.evaluations, calls + r2.calls
        traj += [{**e, "phase": 1, "arm": arm} for e in r1.trajectory]
        traj += [{**e, "phase": 2, "arm": arm, "step": e["step"] + n1} for e in r2.trajectory]
        exacts += [(i, e) for e in _exacts(r1.trajectory) + _exacts(r2.trajectory)]
    if noise:
        # The noise grows toward the constraint's boundary, where phase 2 ends: measure it again at the
        # best design (fresh seeds) and guard by the larger of the two; the answer is then re-picked
        # among the evaluated designs under the final guard band (no step is taken on a stale one).
        # It is measured at the best design under the mid-way band, when that design meets the plain
        # bounds: an overloaded infeasible design's noise would inflate the band for nothing. (Measured at
        # the cheapest design meeting the plain bounds instead, the band is right at the boundary but
        # phase 2's designs are then re-judged by a band none of them was searched under: the notebook's
        # answer cost 19% more than the grid's.)
        best_i, best_e = None, None
        for i, e in exacts:
            ev = _rescored(guarded[i], e)
            if better(ev, best_e):
                best_i, best_e = i, ev
        noise2 = None  # no design meets the plain bounds: nothing to measure at the boundary
        if best_e is not None and _plain(arms[best_i], best_e).feasible:
            again = [s + len(noise_seeds) for s in noise_seeds]
            noise2 = seed_noise(evaluate, arms[best_i], best_e.values, again, len(seeds), size)
            sims, calls = sims + n_calls * size, calls + n_calls
        noise = _merge_noise(noise, noise2)
        guarded = [guard_band(p, noise, z) for p in arms]
    rescored = []
    for i, e in exacts:
        ev = _rescored(guarded[i], e)
        rescored.append(ev)
        if better(ev, best):
            best, best_arm = ev, i
    exacts = rescored
    known = {_key(e.values): e for e in exacts}  # evaluated on the same seeds: not simulated again
    pol, extra, psims, pcalls = polish(evaluate, guarded[best_arm], best, seeds, size, max_rounds=polish_rounds,
                                       choices=problem.space.choices, known=known)
    exacts += extra
    for r in rows:  # phase-1 designs judged by the guarded constraints too
        g = next(p for p in guarded if dict(p.space.fixed) == r["arm"])
        r["feasible"] = all(c.violation(r["metrics"]) <= 0 for c in g.constraints) and math.isfinite(r["objective"])
    for e in extra:
        rows.append(dict(phase="polish", arm=dict(_arm_of(guarded, e.values).space.fixed), step=None,
                         simulations=sims + psims, values=e.values, objective=e.objective, feasible=e.feasible,
                         accepted=e is pol, metrics=e.metrics))
    return DesignResult(pol, _arm_of(guarded, pol.values), noise, exacts, traj, rows, sims + psims, calls + pcalls,
                        time.perf_counter() - t0)


def _exhaustive(evaluate, problem: Problem, designs: "list | None", arms: list, seeds: tuple, size: int,
                noise_seeds: list, z: float, t0: float) -> DesignResult:
    """Every design of an all-integer space (``designs``: :meth:`Space.designs`) on ``seeds``, in calls of
    ``size`` points, and the guard band of :func:`design_search` (the noise measured at the cheapest
    design meeting the plain bounds, then at the best one under that band); the answer is the best
    design under the final band. Rows are phase ``"grid"``."""
    if designs is None:
        raise JaxsimInputError("search.exhaustive", "a continuous variable has no finite set of designs",
                               "set search.exhaustive=false, or make every variable an integer")
    space = arms[0].space  # (its anchor pads every call: the search's call shape)
    per = evaluate_fixed_size(evaluate, space, [space.sweep_point(v, s) for v in designs for s in seeds], size)
    room = size - (1 if space.needs_anchor else 0)
    calls = -(-len(designs) * len(seeds) // room)
    n = len(seeds)
    evs = [_evaluation(problem, problem.space.to_unit(v), v, per[n * i:n * (i + 1)]) for i, v in enumerate(designs)]

    def best_under(p):
        b = None
        for e in evs:
            e = _plain(p, e)
            b = e if better(e, b) else b
        return b

    noise = {}
    if noise_seeds:
        n_calls = -(-len(noise_seeds) // room)
        at = best_under(problem)  # the cheapest design meeting the plain bounds (else the least violating)
        noise = seed_noise(evaluate, _arm_of(arms, at.values), at.values, noise_seeds, n, size)
        calls += n_calls
        mid = best_under(guard_band(problem, noise, z))
        noise2 = None
        if _plain(problem, mid).feasible:  # the noise grows toward the boundary: measure it there too
            again = [s + len(noise_seeds) for s in noise_seeds]
            noise2 = seed_noise(evaluate, _arm_of(arms, mid.values), mid.values, again, n, size)
            calls += n_calls
        noise = _merge_noise(noise, noise2)
    guarded = guard_band(problem, noise, z)
    evs = [_plain(guarded, e) for e in evs]
    best = None
    for e in evs:
        best = e if better(e, best) else best
    rows = [dict(phase="grid", arm={k: e.values[k] for k in problem.space.choices}, step=None,
                 simulations=size * -(-(i + 1) * n // room), values=e.values, objective=e.objective,
                 feasible=e.feasible, accepted=e is best, metrics=e.metrics) for i, e in enumerate(evs)]
    return DesignResult(best, guard_band(_arm_of(arms, best.values), noise, z), noise, evs, [], rows, calls * size, calls,
                        time.perf_counter() - t0)


def _arm_of(problems: list, values: dict) -> Problem:
    """The problem of ``problems`` (one per arm) whose categorical choices ``values`` has."""
    return next(p for p in problems if all(values.get(k) == o for k, o in p.space.fixed.items()))


def _merge_noise(mid: dict, end: "dict | None") -> dict:
    """The two noise measurements of :func:`design_search` as one: ``std`` the larger (the mid-way
    one when there is no end measurement), with ``std_mid`` and ``std_end`` (NaN: not measured)."""
    return {m: {**v, "std": v["std"] if end is None else max(v["std"], end[m]["std"]), "std_mid": v["std"],
                "std_end": math.nan if end is None else end[m]["std"]} for m, v in mid.items()}


def _plain(problem: Problem, e: Evaluation) -> Evaluation:
    return dataclasses.replace(e, violations=[c.violation(e.metrics) for c in problem.constraints])


def _rescored(problem: Problem, e: dict) -> Evaluation:
    """A trajectory entry as an :class:`Evaluation` under ``problem``'s constraints."""
    m = e["metrics"]
    ok = math.isfinite(e["merit"])
    return Evaluation(np.asarray(e["u"]), e["values"], m, problem.objective(e["values"], m),
                      [c.violation(m) for c in problem.constraints], ok)
