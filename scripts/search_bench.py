"""Design-search benchmarks (issue 16, part 4): the search against the exhaustive vmapped grid, random
search and CMA-ES at an equal simulation budget, on the problems of ``conf/search/``:

    python scripts/bench.py --search --json OUT            # problems A, B, C
    python scripts/bench.py --search A,B --json OUT        # some of them

- A ``accelerator_sizing``: peak TFLOP/s and memory bandwidth of a spec-sheet accelerator (continuous,
  2-D), minimum price under P99 TTFT and TPOT SLOs at a fixed load;
- B ``engine_knobs``: ``max_num_seqs``, ``max_num_batched_tokens``, ``long_prefill_token_threshold`` and
  the KV blocks of the KV-bound RTX 4090 (ordered integers, 4-D), maximum goodput;
- C ``cheapest_cluster``: RTX PRO 6000 and RTX 4090 instance counts (integers) and the prefill/decode
  layout (categorical: colocated, or one hardware computing prefills), minimum price per hour under SLOs.

Per problem, with everything measured in this one process:

1. the search (:func:`jaxsim.search.design_search` with the problem's settings): its best design, the
   simulations it spent (``evals``: every (design, trace seed) pair it simulated, the noise measurement,
   the polish and the anchor points included), wall time, and its re-simulation on the held-out seeds
   (``heldout_feasible``: every SLO met with the plain bounds, no guard band);
2. the exhaustive grid on the search's seeds (every lattice point of the integer variables, ``--levels``
   values of each continuous one, every categorical option), in sweep calls of 128 points: its best
   design under the SAME guarded constraints the search ended with (``gap_pct`` = how much worse the
   search's objective is, in % of the grid optimum's; negative: better, e.g. a continuous optimum
   between grid points), and also the grid's best under the plain bounds with its held-out check (what
   a grid without a guard band would have picked);
3. random search and CMA-ES (:mod:`jaxsim.blackbox`) at the search's budget on the same guarded
   problem (``random_gap_pct``, ``cmaes_gap_pct``; ``null`` when they found no feasible design), each
   with its held-out check. With categorical choices they run once per option, the budget split evenly.

The JSON holds per problem ``"A"``, ``"B"``, ``"C"``: ``gap_pct``, ``evals``, ``grid_evals``, ``wall_s``,
``heldout_feasible``, ``random_gap_pct``, ``cmaes_gap_pct`` and the details (designs, objectives,
guard bands, baselines' evals and walls, grid wall, and ``evals_to_best`` / ``<method>_evals_to_best``: the
simulations spent when each method first evaluated its final answer).
"""

import dataclasses
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from jaxsim import blackbox, search as S  # noqa: E402

PROBLEMS = {"A": "accelerator_sizing", "B": "engine_knobs", "C": "cheapest_cluster"}
GRID_LEVELS = {"A": 31}  # values per continuous variable (A: 31 x 31 = 961 designs)


def compose(problem: str, overrides=()):
    from hydra import compose as hcompose, initialize_config_dir
    import search as script  # scripts/search.py: registers the search_config primary config
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hcompose("search_config", overrides=[f"search={problem}", "sim.progress=false", *overrides])
    return script, cfg


def _gap(obj: float, ref: float) -> float:
    """How much worse ``obj`` is than ``ref`` (both minimised), in % of |ref|."""
    return 100.0 * (obj - ref) / abs(ref)


def _design(e) -> dict:
    return {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in e.values.items()}


def grid(evaluate, problem: S.Problem, seeds, levels: int, chunk: int = 128):
    """Every design of the exhaustive grid on ``seeds``: ``[(values, Evaluation)]`` (invalid designs
    of a design mapping are skipped), the simulations, the wall time."""
    space = problem.space
    designs = [v for v in space.grid(levels) if space.point(v) is not None]
    pts = [space.sweep_point(v, s) for v in designs for s in seeds]
    t0, out = time.perf_counter(), []
    chunk = -(-len(pts) // -(-len(pts) // chunk))  # equal calls: a last call is padded to the call size
    for i in range(0, len(pts), chunk):
        out.extend(evaluate(pts[i:i + chunk]))
    n = len(seeds)
    evs = [S._evaluation(problem, None, v, out[n * i:n * (i + 1)]) for i, v in enumerate(designs)]
    return list(zip(designs, evs)), len(pts), time.perf_counter() - t0


def _best(evs) -> "S.Evaluation | None":
    best = None
    for e in evs:
        best = e if S.better(e, best) else best
    return best if best is not None and best.feasible else None


def _arm_problem(problem: S.Problem, values: dict) -> S.Problem:
    """``problem`` (with its choices) restricted to the arm of ``values``."""
    fixed = {k: values[k] for k in problem.space.choices}
    return dataclasses.replace(problem, space=dataclasses.replace(problem.space, choices={}, fixed=fixed))


def baseline(method: str, evaluate, problem: S.Problem, seeds, budget: int, per_call: int, start: dict, seed: int):
    """Random search or CMA-ES (one run per categorical arm, the budget split) on ``problem``."""
    arms = problem.space.arms()
    runs, t0 = [], time.perf_counter()
    for k, arm in enumerate(arms):
        p = dataclasses.replace(problem, space=arm)
        b = budget // len(arms)
        rng = np.random.default_rng(seed + k)
        if method == "random":
            runs.append(blackbox.random_search(evaluate, p, seeds, b, batch_size=per_call, rng=rng))
        else:
            runs.append(blackbox.cmaes(evaluate, p, seeds, b, popsize=max(per_call, 2), x0=start, rng=rng))
    best, to_best = None, None
    size = per_call * len(seeds) + (1 if problem.space.needs_anchor else 0)
    for k, r in enumerate(runs):
        if S.better(r.best, best):
            first = next(e["call"] for e in r.trajectory if e["values"] == r.best.values)
            best, to_best = r.best, k * (budget // len(arms)) + min(r.simulations, (first + 1) * size)
    return best, sum(r.simulations for r in runs), time.perf_counter() - t0, to_best


def run_problem(key: str, levels: int | None = None, overrides=(), log=print) -> dict:
    script, cfg = compose(PROBLEMS[key], overrides)
    spec, opts, base = script.prepare(cfg)
    evaluate = S.SweepEvaluator(base, temperature=opts.temperature)
    t0 = time.perf_counter()
    res = script.run_design_search(opts, evaluate)
    wall = time.perf_counter() - t0
    guarded = res.problem
    held = script.heldout(evaluate, opts, guarded, res.best.values)
    log(f"[{key}] search: {_design(res.best)} objective {res.best.objective:.5g} feasible {res.best.feasible}, "
        f"{res.evaluations} sims, {res.calls} calls, {wall:.1f} s; held-out feasible {held['feasible']}")

    # the grid, judged by the search's guarded constraints and by the plain ones (per design its arm)
    full = dataclasses.replace(guarded, space=dataclasses.replace(guarded.space, choices=opts.problem.space.choices,
                                                                  fixed={}))
    g, grid_sims, grid_wall = grid(evaluate, full, opts.seeds, levels or GRID_LEVELS.get(key, 2))
    g_guard = _best(e for _, e in g)
    plain = [dataclasses.replace(e, violations=[c.violation(e.metrics) for c in opts.problem.constraints])
             for _, e in g]
    g_plain = _best(plain)
    log(f"[{key}] grid: {grid_sims} sims, {grid_wall:.1f} s; guarded best {g_guard and _design(g_guard)} "
        f"{g_guard and round(g_guard.objective, 5)}; plain best {g_plain and _design(g_plain)}")

    def check(e):
        # (each design in its own arm: a grid or baseline answer may have another layout than the search's)
        return None if e is None else script.heldout(evaluate, opts, _arm_problem(full, e.values), e.values)

    out = {"problem": PROBLEMS[key], "evals": res.evaluations, "calls": res.calls, "wall_s": wall,
           "best": _design(res.best), "objective": res.best.objective, "feasible": res.best.feasible,
           "heldout_feasible": held["feasible"],
           "heldout": {c.metric: held["metrics"][c.metric] for c in opts.problem.constraints},
           "guard_band": {c.metric: {"margin": c.margin, "target": c.target} for c in guarded.constraints},
           "grid_evals": grid_sims, "grid_wall_s": grid_wall, "grid_designs": len(g),
           "grid_best": g_guard and _design(g_guard), "grid_objective": g_guard and g_guard.objective,
           # an answer that is not feasible has no gap: it is a miss
           "gap_pct": None if g_guard is None or not res.best.feasible else _gap(res.best.objective, g_guard.objective),
           "grid_plain_best": g_plain and _design(g_plain), "grid_plain_objective": g_plain and g_plain.objective,
           "grid_plain_heldout_feasible": (check(g_plain) or {}).get("feasible"),
           "grid_guarded_heldout_feasible": (check(g_guard) or {}).get("feasible"),
           "evals_ratio": grid_sims / res.evaluations,
           # simulations spent when the answer was first evaluated (the rest confirmed it)
           "evals_to_best": next(r["simulations"] for r in res.rows if r["values"] == res.best.values),
           "noise": res.noise}
    per_call = (S.batch_size(guarded.space, len(opts.seeds), opts.directions)
                - (1 if guarded.space.needs_anchor else 0)) // len(opts.seeds)
    for method in ("random", "cmaes"):
        best, sims, bwall, to_best = baseline(method, evaluate, full, opts.seeds, res.evaluations, per_call, opts.start,
                                     opts.seed)
        feasible = best is not None and best.feasible
        gap = _gap(best.objective, g_guard.objective) if feasible and g_guard is not None else None
        hb = check(best) if feasible else None
        out.update({f"{method}_gap_pct": gap, f"{method}_evals": sims, f"{method}_wall_s": bwall,
                    f"{method}_best": best and _design(best), f"{method}_objective": best and best.objective,
                    f"{method}_heldout_feasible": hb and hb["feasible"], f"{method}_evals_to_best": to_best})
        log(f"[{key}] {method}: {best and _design(best)} objective {best and best.objective} feasible {feasible}, "
            f"gap {gap}, {sims} sims, {bwall:.1f} s")
    return out


def run(keys, levels=None, log=print, save=None) -> dict:
    """Run the problems ``keys``; ``save(out)`` after each one (a long run keeps what it measured)."""
    out = {}
    for k in keys:
        if k not in PROBLEMS:
            raise SystemExit(f"--search: unknown problem {k!r}; problems: {','.join(PROBLEMS)}")
    for k in keys:
        out[k] = run_problem(k, levels, log=log)
        if save:
            save(out)
        log(f"[{k}] gap {out[k]['gap_pct']}% with {out[k]['evals']} of the grid's {out[k]['grid_evals']} simulations "
            f"({out[k]['evals_ratio']:.1f}x fewer); random {out[k]['random_gap_pct']}%, CMA-ES {out[k]['cmaes_gap_pct']}%")
    return out


def finite(x):
    return None if isinstance(x, float) and not math.isfinite(x) else x
