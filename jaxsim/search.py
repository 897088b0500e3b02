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

    ``kind="integer"``: the knob takes integer values; inside the stencil it is rounded stochastically
    (:func:`stochastic_round`, unbiased), at an exact evaluation to the nearest integer.
    """

    name: str
    lo: float
    hi: float
    kind: str = "continuous"

    def __post_init__(self):
        from jaxsim.sweep import KNOBS
        where = f"search.variables.{self.name}"
        if self.name not in KNOBS or self.name in ("hardware", "cluster", "seed", "kv_cache_dtype"):
            raise JaxsimInputError(where, "not a numeric sweep knob", f"numeric knobs: "
                                   f"{sorted(k for k in KNOBS if k not in ('hardware', 'cluster', 'seed'))}")
        if self.kind not in KINDS:
            raise JaxsimInputError(f"{where}.kind", f"must be one of {KINDS}, got {self.kind!r}")
        if not (math.isfinite(self.lo) and math.isfinite(self.hi) and self.lo < self.hi):
            raise JaxsimInputError(where, f"bounds must be finite with lo < hi, got [{self.lo}, {self.hi}]")


@dataclasses.dataclass(frozen=True)
class Space:
    """The box of decision variables, optimised in normalised coordinates ``u in [0, 1]^D``."""

    variables: tuple

    def __post_init__(self):
        names = [v.name for v in self.variables]
        if not names:
            raise JaxsimInputError("search.variables", "no decision variables")
        if len(set(names)) != len(names):
            raise JaxsimInputError("search.variables", f"a knob appears twice: {names}")

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
        """``u`` -> a sweep point ``{knob: value}``. Integers: stochastic rounding with the uniform
        draws ``xi`` (shape ``(D,)``; only the integer entries are read), nearest when ``xi`` is None."""
        x = self.real(u)
        out = {}
        for i, v in enumerate(self.variables):
            if v.kind == "integer":
                r = stochastic_round(x[i], xi[i]) if xi is not None else math.floor(x[i] + 0.5)
                out[v.name] = int(min(max(r, math.ceil(v.lo)), math.floor(v.hi)))
            else:
                out[v.name] = float(x[i])
        return out

    @property
    def needs_anchor(self) -> bool:
        """Whether a variable can change the engine's array sizes (KV blocks, seats, ...)."""
        return any(v.name not in VALUE_ONLY_KNOBS for v in self.variables)

    def anchor(self) -> dict:
        """The point at every upper bound: the largest sizes of the box (KV blocks, seats and token
        budgets grow with their knobs), so that the batch's merged sizes never change."""
        return self.decode(np.ones(self.dim))


def stochastic_round(x, xi):
    """``floor(x) + (xi < frac(x))``: unbiased (``E = x`` for ``xi ~ U[0, 1)``), and a + / - pair
    that shares ``xi`` rounds both its points with the same draw (common random numbers)."""
    f = np.floor(x)
    return (f + (np.asarray(xi) < (x - f))).astype(np.int64) if np.ndim(x) else int(f + (xi < x - f))


# ---------------------------------------------------------------------------------------------
# Stencil


def directions(rng: np.random.Generator, num: int, dim: int, kind: str = "gaussian") -> np.ndarray:
    """``num`` random directions, shape ``(num, dim)``: standard normal, or Rademacher (+-1)."""
    if kind == "gaussian":
        return rng.standard_normal((num, dim))
    if kind == "rademacher":
        return rng.choice(np.array([-1.0, 1.0]), size=(num, dim))
    raise JaxsimInputError("search.directions", f"must be 'gaussian' or 'rademacher', got {kind!r}")


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
        res = sweep.sweep(self.base, points, chunk_size=len(points), progress=False, keep_requests=True)
        self.calls += 1
        self.simulations += len(points)
        out = []
        for p, row, req in zip(points, res.rows, res.requests):
            w = sweep.point_inputs(self.base, p)["workload"]  # (cached per seed: the sweep's own trace)
            m = request_metrics(w, req, self.base.slo_ttft_ms, self.base.slo_tpot_ms, self.temperature)
            m["status"] = row["status"]
            out.append(m)
        return out


# ---------------------------------------------------------------------------------------------
# Problem


@dataclasses.dataclass(frozen=True)
class Constraint:
    """``metric sense bound`` on a pooled metric (:func:`pool_metrics`), e.g. ``tpot_p99_ms <= 25``.
    Its normalised violation ``g`` is ``(metric - bound) / |bound|`` for ``<=`` (feasible: ``g <= 0``)."""

    metric: str
    sense: str
    bound: float

    def __post_init__(self):
        if self.sense not in ("<=", ">="):
            raise JaxsimInputError(f"search.constraints.{self.metric}.sense",
                                   f"must be '<=' or '>=', got {self.sense!r}")
        if not (math.isfinite(self.bound) and self.bound != 0):
            raise JaxsimInputError(f"search.constraints.{self.metric}.bound",
                                   f"must be finite and non-zero, got {self.bound}")

    def violation(self, metrics: dict) -> float:
        if self.metric not in metrics:
            raise JaxsimInputError(f"search.constraints.{self.metric}", "unknown metric", f"known: {sorted(metrics)}")
        v = metrics[self.metric]
        g = (v - self.bound) if self.sense == "<=" else (self.bound - v)
        return g / abs(self.bound) if math.isfinite(g) else math.inf


def linear_cost(weights: dict):
    """Objective ``sum_k w_k x_k`` of the knob values (e.g. a price per TFLOP/s and per GB/s)."""
    def cost(values: dict, metrics: dict) -> float:
        return float(sum(w * values[k] for k, w in weights.items()))
    return cost


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

    def decide(self, merit_old: float, merit_new: float, predicted_decrease: float, step_length: float) -> bool:
        """Whether to accept the step of L-infinity length ``step_length``; updates the radius."""
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

    points: list
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
    pts, exact, plus, minus = [], [], [], []
    for s in seeds:
        exact.append(len(pts))
        pts.append({**space.decode(u), "seed": s})
    st = stencil(u, dirs, radius)
    xi = rng.random((len(dirs), len(seeds), space.dim))  # common to a + / - pair
    for k in range(len(dirs)):
        pk, mk = [], []
        for j, s in enumerate(seeds):
            pk.append(len(pts))
            pts.append({**space.decode(st[2 * k], xi[k, j]), "seed": s})
            mk.append(len(pts))
            pts.append({**space.decode(st[2 * k + 1], xi[k, j]), "seed": s})
        plus.append(pk)
        minus.append(mk)
    anchor = None
    if space.needs_anchor:
        anchor = len(pts)
        pts.append({**space.anchor(), "seed": seeds[0]})
    return Batch(pts, exact, plus, minus, dirs, float(radius), anchor)


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
    center = _evaluation(problem, u, {k: v for k, v in batch.points[batch.exact[0]].items() if k != "seed"},
                         [results[i] for i in batch.exact])
    fp, fm = [], []
    for pk, mk in zip(batch.plus, batch.minus):
        for idx, out in ((pk, fp), (mk, fm)):
            # the design of a stencil point differs per seed only by its rounding: pooled over seeds
            vals = {k: np.mean([batch.points[i][k] for i in idx]) for k in problem.space.names}
            out.append(_evaluation(problem, None, vals, [results[i] for i in idx]).merit(lam, mu, scale))
    return stencil_gradient(fp, fm, batch.dirs, batch.radius), center


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
           keep_stencil: bool = False) -> SearchResult:
    """Minimise ``problem`` from ``start`` (``{knob: value}``) with ``steps`` evaluator calls.

    Each call evaluates the candidate exactly (nearest rounding, on ``seeds``) and the stencil around
    it (:func:`smoothed_gradient`): the candidate is accepted by the trust region when its merit is
    below the incumbent's; the gradient of the accepted point drives the optax optimiser
    (``adam`` or ``sgd`` at ``learning_rate``, in ``u`` units), whose step the trust region clips. On
    a reject the optimiser state is kept and the next candidate comes from the incumbent's gradient
    with the smaller radius. Augmented-Lagrangian multipliers (``multipliers=True``) update at
    each accept, ``lam <- max(0, lam + mu g)``; else ``mu`` is a plain quadratic penalty weight.

    The trajectory holds every evaluated design (the exact ones, and with ``keep_stencil`` the stencil
    points pooled over seeds).
    """
    t0 = time.perf_counter()
    if optimizer not in ("adam", "sgd"):
        raise JaxsimInputError("search.optimizer", f"must be 'adam' or 'sgd', got {optimizer!r}")
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
        center = _evaluation(problem, candidate, {k: v for k, v in batch.points[batch.exact[0]].items()
                                                  if k != "seed"}, [results[i] for i in batch.exact])
        if scale is None:
            scale = abs(center.objective) or 1.0
        if inc is None:
            accepted = True
        else:
            accepted = trust.decide(inc.merit(lam, mu, scale), center.merit(lam, mu, scale), predicted,
                                    float(np.max(np.abs(candidate - u_c))))
        trajectory.append(dict(step=step, kind="exact", u=candidate.tolist(), values=center.values,
                               metrics=center.metrics, objective=center.objective,
                               merit=center.merit(lam, mu, scale), feasible=center.feasible,
                               accepted=accepted, trust_radius=trust.radius))
        if keep_stencil:
            st = stencil(candidate, dirs, radius)
            for k in range(len(dirs)):
                for side, idx in ((0, batch.plus[k]), (1, batch.minus[k])):
                    trajectory.append(dict(step=step, kind="stencil", u=st[2 * k + side].tolist(),
                                           values=[{n: batch.points[i][n] for n in space.names} for i in idx],
                                           metrics=pool_metrics([results[i] for i in idx])))
        if accepted:
            if pending_state is not None:
                opt_state = pending_state
            inc, u_c = center, candidate
            if multipliers:
                lam = np.maximum(0.0, lam + mu * np.asarray([min(g, 1e6) for g in inc.violations]))
            inc_grad, _ = _read_batch(problem, batch, results, candidate, lam, mu, scale)  # (at the new multipliers)
        # the next candidate: the optimiser's step from the incumbent's gradient, clipped by the trust region
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
