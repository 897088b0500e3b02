"""Calibration by gradient (issue 16, part 5): fit the engine-cost constants to measured runs with
the design search's machinery, and report leave-one-case-out errors next to the in-sample ones.

    python scripts/calibrate.py [--cases A,B,...] [--steps 24] [--directions 4] [--seed 0]
                                [--json OUT] [--brief-json tests/data/calibrate.json]

The constants, the cases, the loss and the report are scripts/fit_engine_costs.py's (its
``Scorer``, ``calibration`` and ``GRID``, imported, not copied): four constants shared by every case
(``iteration_overhead_ns``, ``step_cpu_ns``, ``seq_cpu_ns``, the output-path delay), the loss of a
case the largest |Diff%| of its TTFT / TPOT / ITL / E2E statistics, the joint loss their mean over
the cases. Only the minimiser differs: instead of coordinate search on the grid, the smoothed
(antithetic central-difference) gradient of :mod:`jaxsim.search` in the normalised box
``u in [0, 1]^4`` spanned by the grid's extents, an optax optimiser (SGD; Adam with --optimizer),
and the trust region of :class:`jaxsim.search.TrustRegion`, which accepts a step only when the
*exact* joint loss of the candidate (the per-case validation path, fit_engine_costs.Scorer) is
lower than the incumbent's (``--objective rms`` minimises the root mean square of the Diff%
instead, exact and stencil alike; the figures reported are always the largest |Diff%|).

The loss is rough at every scale the search sees: on the A6000 pulse case 0.29 ms more CPU step
time (7% of its range) moves the TTFT P99 by 5 points (a burst's requests join another batch), so the
smoothing radius is large (0.2 of the box, K = 4 pairs), the trust region's floor is 2% of the
box, and the incumbent tends to be a point where that noise happened to be low. Prints and writes
(``--json``) the in-sample and leave-one-case-out statistics as scripts/fit_engine_costs.py does,
next to the grid fit's figures, with the simulations (sweep points + exact runs) and wall time.

One step on one case = ONE :func:`jaxsim.sweep.sweep` call. The constants of
:class:`jaxsim.spec.Calibration` are traced arrays in the engine (jaxsim/engine/costs.py reads
them from ``EngineParams``), but they are not sweep knobs; the sweep's ``cluster`` knob already
picks, per point, a design of ``InstanceSpec`` s, and each spec carries its ``calib``. So every
point of a step is the case's instances with that point's constants (``SweepBase.cluster_options``,
rewritten each step): no change to jaxsim/sweep.py, and one compile per case for the whole run.
The sweep gives per-request times but no per-token times, so the stencil's loss leaves out the ITL
statistics of ``summary.json`` cases (their TTFT / TPOT / E2E statistics are exact: each step's
sweep call also runs the candidate itself and ``max_stencil_vs_exact`` records the largest
difference from the validation path over the shared statistics, 0 in every run so far);
the exact loss that accepts or rejects a step has them all.

Compute / memory scales are not fitted: they are per-GPU corrections of the operator profiles,
each development case is a different GPU, so a shared scale has no meaning across cases and a
held-out case could not test one; the constants here are the engine's, shared by construction.
"""

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import optax

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import validation_figures  # noqa: E402
from fit_engine_costs import DEFAULT_CASES, GRID, LATENCY, Scorer, calibration  # noqa: E402
from jaxsim import compile_cache, sweep, validation  # noqa: E402
from jaxsim.errors import JaxsimInputError  # noqa: E402
from jaxsim.search import TrustRegion, directions, stencil, stencil_gradient  # noqa: E402

NAMES = tuple(GRID)  # the fitted constants, in fit_engine_costs's order (dict keys of its ``p``)
# The box: the grid's extents, so both methods search the same constants over the same ranges.
BOX = {n: (float(min(g)), float(max(g))) for n, g in GRID.items()}
# Start: a quarter of each range (175 us, 1 ms, 20 us, 5 ms): away from the grid fit's constants
# (0.5 ms, 2 ms, 40 us, 0) in every coordinate.
START_U = 0.25
# The trust region: a floor of 2% of the box (below it the statistics' jumps, not the constants,
# decide) and a gentler shrink than the design search's, for a loss this rough.
TRUST = TrustRegion(radius=0.3, min_radius=0.02, shrink=0.7)
# The grid fit's figures (README "Calibration", scripts/fit_engine_costs.py): largest |Diff%| per
# case in-sample and leave-one-case-out, its simulations and wall time. --grid-json replaces them.
GRID_FIGURES = {"in_sample": {"RTXPRO6000-Llama-3.1-8B": 4.4, "RTX4090-Llama-3.1-8B": 3.0,
                              "A6000-Llama-3.1-8B-pulse-SD+PC": 10.5},
                "loo": {"RTXPRO6000-Llama-3.1-8B": 8.1, "RTX4090-Llama-3.1-8B": 3.9,
                        "A6000-Llama-3.1-8B-pulse-SD+PC": 17.0},
                "evaluations": 277, "wall_s": 456.0, "source": "README (fit_engine_costs.py)"}


# ---------------------------------------------------------------------------------------------
# Cases


def case_loss(stats: dict | None) -> float:
    """A case's loss: the largest |Diff%| of its statistics (inf for a failed run)."""
    return max(abs(v) for v in stats.values()) if stats else math.inf


def case_rms(stats: dict | None) -> float:
    """A smooth surrogate of :func:`case_loss`: the root mean square of the case's Diff% (inf for
    a failed run). Every statistic weighs in, so one jumpy percentile moves it less."""
    return math.sqrt(sum(v * v for v in stats.values()) / len(stats)) if stats else math.inf


OBJECTIVES = {"max": case_loss, "rms": case_rms}


def joint_loss(per_case: list, of=case_loss) -> float:
    """The mean over the cases of ``of`` (:func:`case_loss`: fit_engine_costs.Scorer.loss's definition)."""
    return sum(of(s) for s in per_case) / len(per_case)


def request_table(workload, req: dict) -> dict:
    """The finished requests of a sweep point (``keep_requests=True``) as the columns of
    :func:`jaxsim.metrics.request_table` that :func:`jaxsim.validation.compare` reads (times in
    int64 ns; ``itl_ns`` empty: a sweep records no per-token times)."""
    finish = np.asarray(req["finish"], np.int64)
    done = np.nonzero(finish >= 0)[0]
    # agentic sub-requests arrive when the engine releases them (jaxsim.sweep.config_metrics)
    arrival = np.where(workload.released, np.asarray(req["arrival"], np.int64),
                       workload.arrival_ns.astype(np.int64))[done]
    first, end = np.asarray(req["first_token"], np.int64)[done], finish[done]
    out = workload.output_toks.astype(np.int64)[done]
    ttft, e2e = first - arrival, end - arrival
    return dict(request_id=done.astype(np.int64), input=workload.input_toks.astype(np.int64)[done], output=out,
                arrival_ns=arrival, first_token_ns=first, end_ns=end, ttft_ns=ttft, e2e_ns=e2e,
                tpot_ns=np.where(out > 1, (e2e - ttft) // np.maximum(out - 1, 1), 0), itl_ns=[])


class SweepCase:
    """A case as the calibration sees it: ``run(ps)`` simulates the case's instances under each
    constant set ``p`` (fit_engine_costs's dict) in ONE :func:`jaxsim.sweep.sweep` call and returns
    each point's ``{statistic: Diff%}`` (None for a run whose status is not ``ok``).

    Args:
      name: the case's name (reports).
      base: a :class:`jaxsim.sweep.SweepBase` of the case (workload, model, runtime, router, tier,
        power); its ``cluster_options`` are overwritten by every call.
      specs: the case's instances (``InstanceSpec``); each point replaces their ``calib``.
      stats: ``(workload, request arrays, sweep row) -> {statistic: Diff%}``.
      exact: ``p -> {statistic: Diff%}`` for the trust region's decision, or None: the sweep's own
        value at the candidate (a case whose statistics the sweep gives in full).
    """

    def __init__(self, name: str, base, specs, stats, exact=None):
        self.name, self.base, self.specs, self.stats, self.exact = name, base, tuple(specs), stats, exact
        self.calls = 0
        self.points = 0

    def run(self, ps: list) -> list:
        self.base.cluster_options.clear()
        self.base.cluster_options.update({f"p{i}": tuple(dataclasses.replace(s, calib=calibration(p))
                                                         for s in self.specs) for i, p in enumerate(ps)})
        res = sweep.sweep(self.base, [{"cluster": f"p{i}"} for i in range(len(ps))], chunk_size=len(ps),
                          progress=False, keep_requests=True)
        self.calls += 1
        self.points += len(ps)
        w = self.base.workload
        return [self.stats(w, req, row) if row["status"] == "ok" else None for row, req in zip(res.rows, res.requests)]


def validation_case(case_root: Path, name: str, scorer: Scorer, profiles: Path = ROOT / "profiles") -> SweepCase:
    """A development case (``case_root/name``) set up as scripts/validate.py simulates it; the
    exact statistics come from ``scorer`` (the validation path, with ITL)."""
    case = validation.load_case(case_root / name, profiles / "models", profiles / "workloads")
    specs, rt, links = validation.case_to_cluster(case, profiles)
    base = sweep.SweepBase(case.workload, case.model, runtime=rt, profiles_dir=profiles, links=links,
                           router=validation.case_router(case), kv_tier=validation.case_kv_tier(case),
                           power=validation.case_power(case))

    def stats(workload, req, row):
        figs = validation_figures.figures({"case": name, **validation.compare(case, request_table(workload, req))})
        return {k: v for k, v in figs.items() if k.startswith(LATENCY)}

    return SweepCase(name, base, specs, stats, exact=lambda p: scorer.stats(name, p))


# ---------------------------------------------------------------------------------------------
# The fit


def to_unit(p: dict, names=NAMES) -> np.ndarray:
    return np.array([(p[n] - BOX[n][0]) / (BOX[n][1] - BOX[n][0]) for n in names], np.float64)


def decode(u, names=NAMES, fixed: dict | None = None) -> dict:
    """``u`` (clipped to the box) -> the constants (int ns; ``fixed`` supplies the others)."""
    u = np.clip(np.asarray(u, np.float64), 0.0, 1.0)
    p = dict(fixed or {})
    for n, x in zip(names, u):
        lo, hi = BOX[n]
        p[n] = int(round(lo + x * (hi - lo)))
    return p


@dataclasses.dataclass
class FitResult:
    constants: dict  # the incumbent: the lowest exact joint loss seen
    loss: float
    trajectory: list  # per step: candidate constants, exact loss per case and joint, accepted, trust radius
    sweep_calls: int
    sweep_points: int
    exact_sims: int  # simulations of the validation path (cache misses of the scorer)
    wall_s: float
    max_stencil_vs_exact: float  # largest |sweep - exact| over shared statistics at the candidates


def fit(cases: list, start: dict, names=NAMES, *, steps: int = 24, num_directions: int = 4, radius: float = 0.2,
        optimizer: str = "sgd", learning_rate: float = 0.15, kind: str = "gaussian", seed: int = 0,
        trust: TrustRegion | None = None, objective: str = "max", scorer: Scorer | None = None,
        log=None) -> FitResult:
    """Minimise the joint loss over ``cases`` (:class:`SweepCase` s) in the constants ``names`` from
    ``start`` (fit_engine_costs's ``p``; the constants not in ``names`` stay at its values).

    Each of the ``steps`` steps makes ONE sweep call per case, running the candidate and its
    antithetic stencil (``2 num_directions`` points at ``radius`` in the unit box, common to every
    case), and evaluates the candidate exactly (``case.exact``, else the sweep's own value). The loop
    is :func:`jaxsim.search.search`'s: the trust region (default :data:`TRUST`)
    accepts the candidate only when its exact joint loss is lower than the incumbent's; the optax
    optimiser (``sgd`` or ``adam`` at ``learning_rate``, unit-box units) steps from the incumbent's
    smoothed gradient, clipped by the trust region. The ``objective`` is the joint loss of
    :func:`case_loss` (``max``, fit_engine_costs's) or of :func:`case_rms` (``rms``), in both the
    exact evaluation and the stencil. Two departures, both for a loss as rough as
    these statistics (a percentile moves when a request joins another batch): a rejected candidate's
    stencil is pooled into the incumbent's gradient (the pairs lie within the trust radius) instead
    of being wasted, and the optimiser's state restarts on a reject (see below). At the trust
    region's floor the fit goes on: each reject adds a stencil to the pooled gradient, so the next
    candidate differs.

    Returns: a :class:`FitResult` (the incumbent: the lowest exact joint loss evaluated).
    Raises: JaxsimInputError naming ``calibrate.<field>`` for a bad argument.
    """
    t0 = time.perf_counter()
    if steps < 1:
        raise JaxsimInputError("calibrate.steps", f"must be >= 1, got {steps}")
    if not cases:
        raise JaxsimInputError("calibrate.cases", "no cases to fit")
    if objective not in OBJECTIVES:
        raise JaxsimInputError("calibrate.objective", f"must be one of {sorted(OBJECTIVES)}, got {objective!r}")
    of = OBJECTIVES[objective]
    if optimizer not in ("adam", "sgd"):
        raise JaxsimInputError("calibrate.optimizer", f"must be 'adam' or 'sgd', got {optimizer!r}")
    unknown = [n for n in names if n not in BOX]
    if unknown:
        raise JaxsimInputError("calibrate.names", f"unknown constants {unknown}", f"fit some of {list(BOX)}")
    calls0 = [(c.calls, c.points) for c in cases]
    sims0 = scorer.evaluations if scorer is not None else 0
    rng = np.random.default_rng(seed)
    trust = trust or dataclasses.replace(TRUST)
    opt = optax.adam(learning_rate) if optimizer == "adam" else optax.sgd(learning_rate)
    fixed = {k: v for k, v in start.items() if k not in names}
    u_c = np.clip(to_unit(start, names), 0.0, 1.0)
    opt_state = opt.init(np.zeros(len(names)))
    candidate, pending, predicted = u_c, None, 0.0
    inc_loss, inc_p, grads = None, None, []
    trajectory, worst_check = [], 0.0

    for step in range(steps):
        dirs = directions(rng, num_directions, len(names), kind)
        st = stencil(candidate, dirs, radius)
        ps = [decode(candidate, names, fixed)] + [decode(row, names, fixed) for row in st]
        runs = [c.run(ps) for c in cases]  # one sweep call per case
        exact = []
        for c, r in zip(cases, runs):
            if c.exact is None:
                exact.append(r[0])
                continue
            e = c.exact(ps[0])
            if r[0] is not None and e is not None:
                worst_check = max([worst_check] + [abs(r[0][k] - e[k]) for k in r[0] if k in e])
            exact.append(e)
        loss = joint_loss(exact, of)
        f = [joint_loss([r[1 + j] for r in runs], of) for j in range(len(st))]
        grad = stencil_gradient(f[0::2], f[1::2], dirs, radius)
        accepted = inc_loss is None or trust.decide(inc_loss, loss, predicted, float(np.max(np.abs(candidate - u_c))))
        trajectory.append(dict(step=step, constants=ps[0], loss=loss, accepted=accepted,
                               case_loss={c.name: of(e) for c, e in zip(cases, exact)},
                               gradient=grad.tolist(), trust_radius=trust.radius))
        if log:
            log(f"  step {step:2d}  loss {loss:7.3f}  {'accept' if accepted else 'reject'}  "
                + " ".join(f"{n}={ps[0][n]}" for n in names))
        if accepted:
            if pending is not None:
                opt_state = pending
            inc_loss, u_c, inc_p, grads = loss, candidate, ps[0], [grad]
        else:
            grads.append(grad)
            # A fresh optimiser state: the next step follows the incumbent's (pooled) gradient. Keeping
            # the state, as jaxsim.search.search does, repeats the rejected step's direction, only
            # shorter, so momentum that overshot a minimum can never turn back.
            opt_state = opt.init(np.zeros(len(names)))
        g = np.mean(grads, axis=0)
        updates, pending = opt.update(g, opt_state, u_c)
        step_u = trust.clip(np.asarray(updates, np.float64))
        predicted = float(-g @ step_u)
        candidate = np.clip(u_c + step_u, 0.0, 1.0)

    return FitResult(inc_p, inc_loss, trajectory,
                     sum(c.calls - a for c, (a, _) in zip(cases, calls0)),
                     sum(c.points - b for c, (_, b) in zip(cases, calls0)),
                     (scorer.evaluations - sims0) if scorer is not None else 0,
                     time.perf_counter() - t0, worst_check)


# ---------------------------------------------------------------------------------------------
# Command line


def _grid_figures(path: str | None) -> dict:
    if not path:
        return GRID_FIGURES
    rep = json.loads(Path(path).read_text())
    worst = lambda s: max(abs(v) for v in s.values())  # noqa: E731
    return {"in_sample": {c: worst(s) for c, s in rep["in_sample"].items()},
            "loo": {c: worst(v["stats"]) for c, v in rep["loo"].items()},
            "evaluations": rep["evaluations"], "wall_s": rep["wall_s"], "source": path}


def _brief(report: dict) -> dict:
    """The report without trajectories (tests/data/calibrate.json)."""
    out = {k: v for k, v in report.items() if k != "fit"}
    out["fit"] = {k: v for k, v in report["fit"].items() if k != "trajectory"}
    out["loo"] = {c: {k: v for k, v in r.items() if k != "trajectory"} for c, r in report["loo"].items()}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=",".join(DEFAULT_CASES))
    ap.add_argument("--case-root", default=str(ROOT / "profiles" / "validation"))
    ap.add_argument("--steps", type=int, default=24, help="steps (one sweep call per case each) per fit")
    ap.add_argument("--directions", type=int, default=4, help="antithetic pairs per step")
    ap.add_argument("--radius", type=float, default=0.2, help="smoothing radius in the unit box")
    ap.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    ap.add_argument("--lr", type=float, default=0.15, help="learning rate (unit-box units)")
    ap.add_argument("--objective", choices=sorted(OBJECTIVES), default="max",
                    help="max: fit_engine_costs's loss; rms: root mean square of the Diff%% (figures: max)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random directions")
    ap.add_argument("--no-loo", action="store_true", help="only the joint fit on every case")
    ap.add_argument("--grid-json", help="a scripts/fit_engine_costs.py --json output to compare with "
                                        "(default: its README figures)")
    ap.add_argument("--json", default=str(ROOT / "outputs" / "calibrate.json"))
    ap.add_argument("--brief-json", help="also write the report without trajectories here")
    args = ap.parse_args(argv)
    compile_cache.enable()
    names = args.cases.split(",")
    root = Path(args.case_root)
    scorer = Scorer(root)
    t0 = time.perf_counter()
    cases = {n: validation_case(root, n, scorer) for n in names}
    start = decode(np.full(len(NAMES), START_U))
    kw = dict(steps=args.steps, num_directions=args.directions, radius=args.radius, optimizer=args.optimizer,
              learning_rate=args.lr, objective=args.objective, seed=args.seed, scorer=scorer,
              log=lambda s: print(s, flush=True))

    def run_fit(on):
        print(f"fit on {', '.join(on)}", flush=True)
        r = fit([cases[n] for n in on], start, **kw)
        return r, {"fitted_on": on, "constants": r.constants, "loss": r.loss, "sweep_calls": r.sweep_calls,
                   "sweep_points": r.sweep_points, "exact_sims": r.exact_sims, "wall_s": round(r.wall_s, 1),
                   "max_stencil_vs_exact": r.max_stencil_vs_exact, "trajectory": r.trajectory}

    full, full_rep = run_fit(names)
    report = {"command": "python scripts/calibrate.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "method": {"steps": args.steps, "directions": args.directions, "radius": args.radius,
                         "optimizer": args.optimizer, "learning_rate": args.lr, "objective": args.objective,
                         "trust": dataclasses.asdict(TRUST), "seed": args.seed, "box": BOX, "start": start},
              "cases": names, "fitted": full.constants, "fit": full_rep,
              "in_sample": {c: scorer.stats(c, full.constants) for c in names}, "loo": {}}
    fits = [full]
    if not args.no_loo:
        for held in names:
            r, rep = run_fit([c for c in names if c != held])
            fits.append(r)
            report["loo"][held] = {**rep, "stats": scorer.stats(held, r.constants)}
    report["sweep_calls"] = sum(r.sweep_calls for r in fits)
    report["sweep_points"] = sum(r.sweep_points for r in fits)
    report["exact_sims"] = scorer.evaluations
    report["evaluations"] = report["sweep_points"] + scorer.evaluations
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    grid = _grid_figures(args.grid_json)
    report["grid"] = grid

    print(f"\nfitted on {', '.join(names)}: " + ", ".join(f"{k}={v}" for k, v in full.constants.items()))
    print(f"\n{'case':34s} {'in-sample':>10s} {'LOO':>8s} {'grid in':>8s} {'grid LOO':>9s}  worst LOO statistic")
    for c in names:
        ins = case_loss(report["in_sample"][c])
        loo = report["loo"].get(c, {}).get("stats")
        worst = max(loo, key=lambda k: abs(loo[k])) if loo else None
        g_in, g_loo = grid["in_sample"].get(c, math.nan), grid["loo"].get(c, math.nan)
        print(f"{c:34s} {ins:10.2f} {case_loss(loo) if loo else math.nan:8.2f} {g_in:8.1f} {g_loo:9.1f}  "
              + (f"{worst} {loo[worst]:+.2f}" if loo else ""))
    print(f"\n{report['evaluations']} simulations ({report['sweep_points']} sweep points in {report['sweep_calls']} "
          f"calls + {scorer.evaluations} exact), {report['wall_s']} s; grid fit: {grid['evaluations']} simulations, "
          f"{grid['wall_s']} s ({grid['source']})")
    for path, rep in ((args.json, report), (args.brief_json, _brief(report) if args.brief_json else None)):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(json.dumps(rep, indent=2) + "\n")
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
