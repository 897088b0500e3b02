"""Black-box baselines for the design search (issue 16, part 4): random search and CMA-ES.

    result = cmaes(SweepEvaluator(base), problem, seeds=(0, 1), budget=132)
    result.best.values, result.best.objective, result.best.feasible, result.simulations

Both optimise the same :class:`jaxsim.search.Problem` as :func:`jaxsim.search.search`, on the same
terms, so that a comparison at an equal simulation budget is fair:

- the same normalised box ``u in [0, 1]^D`` (:class:`jaxsim.search.Space`); integer variables are
  decoded with :meth:`Space.decode` (nearest integer);
- every design runs on all ``seeds`` and its metrics are pooled over them
  (:func:`jaxsim.search.pool_metrics`); one (design, seed) pair is one simulation, which is how
  :class:`jaxsim.search.SweepEvaluator` counts (``simulations += len(points)``);
- the points are evaluated in batches, one ``evaluate(points)`` call per batch (one vmapped sweep
  call with a :class:`SweepEvaluator`): a CMA-ES generation is one call, random search draws
  ``batch_size`` designs per call. When a variable can change the engine's array sizes
  (:attr:`Space.needs_anchor`) every call also carries the search's *anchor* point (all upper
  bounds, first seed), so that every call compiles to one program; it counts as a simulation, as in
  the search;
- the budget is exact: a run uses at most ``budget`` simulations, and the last call is cut to the
  designs that still fit (for CMA-ES, a cut generation is evaluated but not used for an update).
  A cut batch has another size, so a :class:`SweepEvaluator` compiles once more for it;
- the answer is the best design by the feasibility rule of Deb (2000), "An efficient constraint
  handling method for genetic algorithms", Comput. Methods Appl. Mech. Eng. 186: feasible designs
  first, by objective; then infeasible ones, by total violation ``sum_i max(0, g_i)`` (the
  normalised violations of :meth:`jaxsim.search.Constraint.violation`); designs with a failed run
  last. An infeasible design therefore never beats a feasible one, whatever its objective.
  (``search()``'s own answer ranks feasible designs the same way; when none is feasible it takes
  the lowest merit instead.)
"""

import dataclasses
import math
import time

import numpy as np

from jaxsim.errors import JaxsimInputError
from jaxsim.search import Evaluation, Problem, feasibility_key, pool_metrics, total_violation  # noqa: F401 (re-exported)


@dataclasses.dataclass
class BlackboxResult:
    """What a baseline returns.

    ``trajectory`` holds one dict per evaluated design, in evaluation order: ``call`` (index of the
    evaluate call), ``kind`` ("design"), ``u`` (the point in the box, a list of D floats),
    ``values`` (the decoded knob values), ``metrics`` (pooled over the seeds), ``objective``,
    ``violation`` (the total, ``sum max(0, g)``), ``feasible``, ``status_ok``; CMA-ES adds
    ``generation`` and ``sigma`` (the step size the design was drawn with, in ``u`` units).
    ``simulations`` counts (design, seed) pairs plus anchor points; ``calls`` counts evaluate calls.
    """

    method: str
    best: Evaluation
    trajectory: list
    simulations: int
    calls: int
    wall_s: float

    @property
    def evaluations(self) -> int:
        """Simulations, under the name :class:`jaxsim.search.SearchResult` uses."""
        return self.simulations


# ---------------------------------------------------------------------------------------------
# Shared bookkeeping: batches, budget, trajectory


class _Run:
    """Evaluates batches of designs on ``seeds`` within ``budget`` simulations."""

    def __init__(self, evaluate, problem: Problem, seeds, budget: int, anchor, method: str):
        if getattr(problem.space, "choices", None):
            raise JaxsimInputError(f"{method}.space.choices", "categorical choices are not searched by a baseline",
                                   "run one baseline per arm (Space.arms()), splitting the budget")
        self.seeds = [int(s) for s in seeds]
        if not self.seeds:
            raise JaxsimInputError(f"{method}.seeds", "no trace seeds", "give at least one seed")
        self.anchor = problem.space.needs_anchor if anchor is None else bool(anchor)
        first = len(self.seeds) + int(self.anchor)
        if int(budget) != budget or budget < first:
            raise JaxsimInputError(f"{method}.budget", f"must be an integer >= {first} (one design on "
                                   f"{len(self.seeds)} seed(s){' + the anchor' if self.anchor else ''}), "
                                   f"got {budget}")
        self.evaluate, self.problem, self.budget, self.method = evaluate, problem, int(budget), method
        self.simulations, self.calls, self.trajectory = 0, 0, []
        self.t0 = time.perf_counter()

    def designs_left(self) -> int:
        """How many designs one more call can evaluate (0: the budget is spent)."""
        return max(0, (self.budget - self.simulations - int(self.anchor)) // len(self.seeds))

    def __call__(self, us: np.ndarray, extra: dict | None = None) -> list:
        """Evaluate the designs ``us`` (shape ``(n, D)``, in the box) in ONE call; returns their
        :class:`Evaluation` s and appends them to the trajectory."""
        space, seeds = self.problem.space, self.seeds
        values = [space.decode(u) for u in us]
        points = [space.sweep_point(v, s) for v in values for s in seeds]
        if self.anchor:
            points.append({**space.anchor(), "seed": seeds[0]})
        assert self.simulations + len(points) <= self.budget
        results = self.evaluate(points)
        self.calls += 1
        self.simulations += len(points)
        out = []
        for i, (u, v) in enumerate(zip(us, values)):
            per_seed = results[i * len(seeds):(i + 1) * len(seeds)]
            m = pool_metrics(per_seed)
            ok = all(p.get("status", "ok") == "ok" for p in per_seed)
            e = Evaluation(np.array(u, np.float64), v, m, self.problem.objective(v, m),
                           [c.violation(m) for c in self.problem.constraints], ok)
            out.append(e)
            self.trajectory.append(dict(call=self.calls - 1, kind="design", u=e.u.tolist(), values=v, metrics=m,
                                        objective=e.objective, violation=total_violation(e.violations),
                                        feasible=e.feasible, status_ok=ok, **(extra or {})))
        return out

    def result(self, evaluations: list) -> BlackboxResult:
        best = min(evaluations, key=feasibility_key)  # (min keeps the first of equal keys)
        return BlackboxResult(self.method, best, self.trajectory, self.simulations, self.calls,
                              time.perf_counter() - self.t0)


def _rng(rng) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(0 if rng is None else rng)


# ---------------------------------------------------------------------------------------------
# Random search


def random_search(evaluate, problem: Problem, seeds, budget: int, batch_size: int = 16, rng=None, *,
                  anchor: bool | None = None) -> BlackboxResult:
    """Uniform random search in the box: ``batch_size`` designs ``u ~ U[0, 1]^D`` per evaluate call
    until ``budget`` simulations are spent (the last batch cut to what fits).

    Args:
      evaluate: ``points -> list of per-point metrics`` (a :class:`jaxsim.search.SweepEvaluator`).
      problem: the :class:`jaxsim.search.Problem`.
      seeds: trace seeds; every design runs all of them.
      budget: simulations, (design, seed) pairs plus one anchor per call when ``anchor``.
      batch_size: designs per call.
      rng: a ``numpy.random.Generator`` or an integer seed (None: 0).
      anchor: add the search's anchor point to every call (None: when the space needs it).
    Returns:
      :class:`BlackboxResult`; ``best`` by :func:`feasibility_key`.
    Raises:
      JaxsimInputError: no seeds, a budget below one design, ``batch_size < 1``.
    """
    if int(batch_size) != batch_size or batch_size < 1:
        raise JaxsimInputError("random_search.batch_size", f"must be an integer >= 1, got {batch_size}")
    run = _Run(evaluate, problem, seeds, budget, anchor, "random_search")
    rng, evals = _rng(rng), []
    while (n := min(int(batch_size), run.designs_left())) > 0:
        evals += run(rng.random((n, problem.space.dim)))
    return run.result(evals)


# ---------------------------------------------------------------------------------------------
# CMA-ES


@dataclasses.dataclass(frozen=True)
class CMAParams:
    """The default strategy parameters of Hansen, "The CMA Evolution Strategy: A Tutorial"
    (arXiv:1604.00772), Table 1, with positive recombination weights only (``w_i = 0`` for
    ``i > mu``: the rank-mu update without the active, negative-weight part). ``c_mu`` has the
    ``1/4 + mu_eff + 1/mu_eff - 2`` numerator of the tutorial's later revision (its first version:
    ``mu_eff - 2 + 1/mu_eff``, a smaller rank-mu rate at small populations)."""

    dim: int
    popsize: int
    mu: int
    weights: np.ndarray  # (mu,), sum 1, decreasing
    mueff: float
    cs: float  # cumulation for the step-size path
    ds: float  # step-size damping
    cc: float  # cumulation for the rank-one path
    c1: float  # rank-one learning rate
    cmu: float  # rank-mu learning rate
    chi_n: float  # E||N(0, I)||

    @classmethod
    def default(cls, dim: int, popsize: int | None = None) -> "CMAParams":
        n = dim
        lam = popsize if popsize is not None else 4 + int(math.floor(3 * math.log(n)))
        mu = lam // 2
        w = math.log((lam + 1) / 2) - np.log(np.arange(1, mu + 1))
        w = w / w.sum()
        mueff = 1.0 / float(np.sum(w ** 2))
        cs = (mueff + 2) / (n + mueff + 5)
        ds = 1 + 2 * max(0.0, math.sqrt((mueff - 1) / (n + 1)) - 1) + cs
        cc = (4 + mueff / n) / (n + 4 + 2 * mueff / n)
        c1 = 2 / ((n + 1.3) ** 2 + mueff)
        cmu = min(1 - c1, 2 * (0.25 + mueff + 1 / mueff - 2) / ((n + 2) ** 2 + mueff))
        chi_n = math.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n * n))
        return cls(n, lam, mu, w, mueff, cs, ds, cc, c1, cmu, chi_n)


@dataclasses.dataclass
class CMAState:
    """The search distribution ``N(mean, sigma^2 C)`` with ``C = B diag(d^2) B^T``, and the paths."""

    mean: np.ndarray  # (D,)
    sigma: float
    C: np.ndarray  # (D, D)
    B: np.ndarray  # (D, D), eigenvectors of C (columns)
    d: np.ndarray  # (D,), square roots of C's eigenvalues
    ps: np.ndarray  # (D,), step-size (conjugate) evolution path
    pc: np.ndarray  # (D,), rank-one evolution path
    generation: int = 0

    @classmethod
    def start(cls, mean, sigma: float) -> "CMAState":
        n = len(mean)
        return cls(np.array(mean, np.float64), float(sigma), np.eye(n), np.eye(n), np.ones(n),
                   np.zeros(n), np.zeros(n))


def sample_in_box(state: CMAState, n: int, rng: np.random.Generator, max_draws: int = 100):
    """``n`` steps ``y ~ N(0, C)`` whose points ``mean + sigma y`` lie in ``[0, 1]^D``, by resampling
    (each step redrawn until its point is inside, up to ``max_draws`` times; a step still outside
    after that is shortened onto the box, ``y = (clip(x) - mean) / sigma``, and is what enters the
    update). Returns ``(x (n, D), y (n, D))``."""
    dim = len(state.mean)
    y = np.empty((n, dim))
    todo = np.arange(n)
    for _ in range(max_draws):
        y[todo] = (rng.standard_normal((len(todo), dim)) * state.d) @ state.B.T
        x = state.mean + state.sigma * y[todo]
        todo = todo[~np.all((x >= 0.0) & (x <= 1.0), axis=1)]
        if not len(todo):
            break
    if len(todo):
        y[todo] = (np.clip(state.mean + state.sigma * y[todo], 0.0, 1.0) - state.mean) / state.sigma
    return np.clip(state.mean + state.sigma * y, 0.0, 1.0), y


def cma_update(state: CMAState, p: CMAParams, y_sorted: np.ndarray, flat: bool = False) -> None:
    """One generation's update from the steps ``y`` of the ``mu`` best points, best first (shape
    ``(mu, D)``), in place. Hansen's tutorial (arXiv:1604.00772), Fig. 6 / eqs. (41)-(47):

      y_w   = sum_i w_i y_i,                      mean += sigma y_w      (c_m = 1)
      p_s   = (1 - c_s) p_s + sqrt(c_s (2 - c_s) mu_eff) C^{-1/2} y_w
      sigma *= exp(c_s / d_s (|p_s| / E|N(0, I)| - 1))
      h_s   = [|p_s| / sqrt(1 - (1 - c_s)^{2(g+1)}) < (1.4 + 2 / (n + 1)) E|N(0, I)|]
      p_c   = (1 - c_c) p_c + h_s sqrt(c_c (2 - c_c) mu_eff) y_w
      C     = (1 + c_1 (1 - h_s) c_c (2 - c_c) - c_1 - c_mu) C + c_1 p_c p_c^T + c_mu sum_i w_i y_i y_i^T

    ``flat``: the best and the ceil(0.7 lambda)-th point are equally good (a plateau, e.g. every point
    rounds to the same integer design): sigma is also multiplied by ``exp(0.2 + c_s / d_s)`` (the
    tutorial's Appendix B and reference code, "escape flat fitness"), since a plateau gives no ranking to learn from.
    """
    yw = p.weights @ y_sorted
    state.mean = state.mean + state.sigma * yw
    inv_sqrt_c = state.B @ np.diag(1.0 / state.d) @ state.B.T
    state.ps = (1 - p.cs) * state.ps + math.sqrt(p.cs * (2 - p.cs) * p.mueff) * (inv_sqrt_c @ yw)
    norm_ps = float(np.linalg.norm(state.ps))
    state.generation += 1
    hs = norm_ps / math.sqrt(1 - (1 - p.cs) ** (2 * state.generation)) < (1.4 + 2 / (p.dim + 1)) * p.chi_n
    state.pc = (1 - p.cc) * state.pc + hs * math.sqrt(p.cc * (2 - p.cc) * p.mueff) * yw
    rank_mu = (y_sorted.T * p.weights) @ y_sorted
    c = ((1 + p.c1 * (1 - hs) * p.cc * (2 - p.cc) - p.c1 - p.cmu) * state.C
         + p.c1 * np.outer(state.pc, state.pc) + p.cmu * rank_mu)
    state.C = 0.5 * (c + c.T)
    state.sigma *= math.exp(p.cs / p.ds * (norm_ps / p.chi_n - 1))
    if flat:
        state.sigma *= math.exp(0.2 + p.cs / p.ds)
    # C = B diag(d^2) B^T; eigenvalues floored so that C^{-1/2} stays finite (D is small: every generation)
    ev, state.B = np.linalg.eigh(state.C)
    state.d = np.sqrt(np.maximum(ev, 1e-300))


def cmaes(evaluate, problem: Problem, seeds, budget: int, popsize: int | None = None, sigma0: float = 0.3,
          x0: dict | None = None, rng=None, *, anchor: bool | None = None, tol_x: float = 1e-12) -> BlackboxResult:
    """CMA-ES (Hansen, "The CMA Evolution Strategy: A Tutorial", arXiv:1604.00772) in the box
    ``u in [0, 1]^D``: weighted recombination, cumulative step-size adaptation, rank-one and
    rank-mu covariance updates, default population ``4 + floor(3 ln D)`` (see :class:`CMAParams`,
    :func:`cma_update`). One generation = one evaluate call of ``popsize`` designs.

    Box: by **resampling** (:func:`sample_in_box`): a step whose point falls outside the box is
    redrawn, so every evaluated point is a sample inside the box and the mean, a convex combination
    of them, stays inside too; no penalty weight to tune against the objective's units. Integer
    variables: CMA-ES works on the continuous ``u``, each point is decoded to the nearest integer
    (:meth:`Space.decode`); once an integer coordinate's spread is well below one lattice step it
    stays on one value (there is no margin on its variance, as in CMA-ES with margin, Hamano et al.
    2022), and a generation that rounds to one design is a plateau (see ``flat`` in
    :func:`cma_update`). Ranking: :func:`feasibility_key` (Deb's rule) on the decoded designs.
    Points of equal key keep their sampling order.

    Args:
      evaluate: ``points -> list of per-point metrics`` (a :class:`jaxsim.search.SweepEvaluator`).
      problem: the :class:`jaxsim.search.Problem`.
      seeds: trace seeds; every design runs all of them.
      budget: simulations, (design, seed) pairs plus one anchor per call when ``anchor``.
      popsize: lambda, designs per generation (None: ``4 + floor(3 ln D)``).
      sigma0: the initial step size in ``u`` units (box side 1).
      x0: the start mean as knob values ``{knob: value}`` (None: the box's centre).
      rng: a ``numpy.random.Generator`` or an integer seed (None: 0).
      anchor: add the search's anchor point to every call (None: when the space needs it).
      tol_x: stop early, the budget unspent, once the distribution has collapsed (:func:`stopped`).
    Returns:
      :class:`BlackboxResult` (trajectory entries carry ``generation`` and ``sigma``); its
      ``simulations`` is below ``budget`` when :func:`stopped` ended the run.
    Raises:
      JaxsimInputError: no seeds, a budget below one design, ``popsize < 2``, ``sigma0 <= 0``.
    """
    space = problem.space
    if popsize is not None and (int(popsize) != popsize or popsize < 2):
        raise JaxsimInputError("cmaes.popsize", f"must be an integer >= 2, got {popsize}")
    if not (math.isfinite(sigma0) and sigma0 > 0):
        raise JaxsimInputError("cmaes.sigma0", f"must be > 0 (u units, box side 1), got {sigma0}")
    run = _Run(evaluate, problem, seeds, budget, anchor, "cmaes")
    params = CMAParams.default(space.dim, None if popsize is None else int(popsize))
    mean = np.full(space.dim, 0.5) if x0 is None else np.clip(space.to_unit(x0), 0.0, 1.0)
    state, rng, evals = CMAState.start(mean, sigma0), _rng(rng), []
    while (n := min(params.popsize, run.designs_left())) > 0:
        x, y = sample_in_box(state, params.popsize, rng)
        gen = run(x[:n], dict(generation=state.generation, sigma=state.sigma))
        evals += gen
        if n < params.popsize:
            break  # the budget's last, cut generation: evaluated, too small to update from
        keys = [feasibility_key(e) for e in gen]
        order = sorted(range(n), key=lambda i: keys[i])
        flat = keys[order[0]] == keys[order[math.ceil(0.7 * n) - 1]]  # (the tutorial's arfitness(ceil(0.7 lambda)))
        cma_update(state, params, y[order[:params.mu]], flat)
        if stopped(state, tol_x):
            break
    return run.result(evals)


def stopped(state: CMAState, tol_x: float = 1e-12, max_condition: float = 1e14) -> bool:
    """The tutorial's termination criteria TolX and ConditionCov (arXiv:1604.00772, Appendix B):
    every standard deviation ``sigma d_i`` below ``tol_x`` (u units: the distribution has collapsed
    to the float resolution of the box, far below any knob's resolution), or ``cond(C) > 1e14``
    (the update would work on rounding noise), or a non-finite state."""
    if not (math.isfinite(state.sigma) and np.all(np.isfinite(state.C))):
        return True
    return state.sigma * float(state.d.max()) < tol_x or (state.d.max() / state.d.min()) ** 2 > max_condition
