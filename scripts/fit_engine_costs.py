"""Fit the engine-cost model (jaxsim/engine/costs.py, ``Calibration``) jointly on the development
cases, and report leave-one-case-out errors next to the in-sample ones.

    python scripts/fit_engine_costs.py [--cases A,B,...] [--json OUT]

The model has four constants, the same for every case: ``iteration_overhead_ns`` (a constant
per iteration), ``step_cpu_ns`` + ``seq_cpu_ns`` x sequences (the engine step's CPU time: all of
it shows without async scheduling, only what exceeds the GPU time with it) and the output-path
delay (``first_token_delay_ns`` = ``token_output_delay_ns``). What differs between cases is the
engine configuration each records (async scheduling, the batch shapes), never a constant.

The fitted cases are those with latency statistics (per-request ``requests.jsonl`` or
``summary.json``): by default the two vLLM 0.19 runs (RTX PRO 6000, RTX 4090; CUDA graphs, async
scheduling) and the vLLM 0.13 eager run (A6000 pulse-SD+PC; no async scheduling). The loss of a
case is the largest |Diff%| of its TTFT / TPOT / ITL / E2E statistics; the fit minimises the mean
over the cases by coordinate search on a grid from several starting points (the loss is not
convex: a request joining another batch moves a percentile), each evaluation one simulation per
case. A constant the fitted cases cannot see (the CPU step time when every fitted case hides it
behind the GPU under async scheduling) walks down to 0: no evidence, no cost.
Leave-one-case-out: fit on all cases but one, score the one left out with those constants.
"""

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import validation_figures  # noqa: E402
from jaxsim import compile_cache  # noqa: E402
from jaxsim.spec import Calibration  # noqa: E402

DEFAULT_CASES = ("RTXPRO6000-Llama-3.1-8B", "RTX4090-Llama-3.1-8B", "A6000-Llama-3.1-8B-pulse-SD+PC")
# Search grid per constant (ns); the search moves one constant at a time to a better neighbour.
GRID = {
    "iteration_overhead_ns": [0, 100_000, 200_000, 300_000, 400_000, 500_000, 700_000],
    "step_cpu_ns": [0, 500_000, 1_000_000, 1_500_000, 2_000_000, 2_500_000, 3_000_000, 4_000_000],
    "seq_cpu_ns": [0, 10_000, 20_000, 30_000, 40_000, 50_000, 60_000, 80_000],
    "output_delay_ns": [0, 2_500_000, 5_000_000, 10_000_000, 15_000_000, 20_000_000],
}
STARTS = [{"iteration_overhead_ns": o, "step_cpu_ns": 1_500_000, "seq_cpu_ns": 40_000, "output_delay_ns": 2_500_000}
          for o in (0, 300_000, 500_000)]
LATENCY = ("ttft", "tpot", "itl", "e2e")


def calibration(p: dict) -> Calibration:
    return Calibration(iteration_overhead_ns=p["iteration_overhead_ns"], step_cpu_ns=p["step_cpu_ns"],
                       seq_cpu_ns=p["seq_cpu_ns"], first_token_delay_ns=p["output_delay_ns"],
                       token_output_delay_ns=p["output_delay_ns"])


class Scorer:
    """Simulates a case with given constants (cached) and returns its latency Diff% statistics."""

    def __init__(self, case_root: Path):
        self.root = case_root
        self.cache = {}
        self.evaluations = 0

    def stats(self, case: str, p: dict) -> dict:
        key = (case, tuple(sorted(p.items())))
        if key not in self.cache:
            figures = validation_figures.measure(self.root / case, calibration(p))
            self.cache[key] = {k: v for k, v in figures.items() if k.startswith(LATENCY)}
            self.evaluations += 1
        return self.cache[key]

    def loss(self, cases, p: dict) -> float:
        return sum(max(abs(x) for x in self.stats(c, p).values()) for c in cases) / len(cases)


def fit(scorer: Scorer, cases, starts=STARTS) -> dict:
    """The best of :func:`descend` from each of ``starts``."""
    return min((descend(scorer, cases, s) for s in starts), key=lambda p: scorer.loss(cases, p))


def descend(scorer: Scorer, cases, start: dict, max_rounds: int = 6) -> dict:
    """Coordinate search on GRID from ``start``: each round tries every grid neighbour of each
    constant and keeps the best; stops when a round improves nothing. Ties keep the smaller value
    (a constant the cases cannot see walks down to 0)."""
    p = dict(start)
    best = scorer.loss(cases, p)
    for _ in range(max_rounds):
        improved = False
        for name, grid in GRID.items():
            i = grid.index(p[name])
            for j in (i - 1, i + 1):
                if 0 <= j < len(grid):
                    q = {**p, name: grid[j]}
                    loss = scorer.loss(cases, q)
                    if loss < best - 1e-9 or (abs(loss - best) <= 1e-9 and grid[j] < p[name]):
                        p, best, improved = q, loss, True
        if not improved:
            break
    return p


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=",".join(DEFAULT_CASES))
    ap.add_argument("--case-root", default=str(ROOT / "profiles" / "validation"))
    ap.add_argument("--json", default=str(ROOT / "outputs" / "engine_costs_fit.json"))
    args = ap.parse_args(argv)
    compile_cache.enable()
    cases = args.cases.split(",")
    scorer = Scorer(Path(args.case_root))
    t0 = time.perf_counter()
    full = fit(scorer, cases)
    report = {"cases": cases, "fitted": full, "in_sample": {c: scorer.stats(c, full) for c in cases}, "loo": {}}
    for held in cases:
        rest = [c for c in cases if c != held]
        p = fit(scorer, rest)
        report["loo"][held] = {"fitted_on": rest, "constants": p, "stats": scorer.stats(held, p)}
    report["evaluations"] = scorer.evaluations
    report["wall_s"] = round(time.perf_counter() - t0, 1)

    print(f"fitted on {', '.join(cases)}: " + ", ".join(f"{k}={v}" for k, v in full.items()))
    print(f"\n{'case':34s} {'in-sample max|Diff%|':>22s} {'LOO max|Diff%|':>16s}  worst LOO statistic")
    for c in cases:
        ins = report["in_sample"][c]
        loo = report["loo"][c]["stats"]
        worst = max(loo, key=lambda k: abs(loo[k]))
        print(f"{c:34s} {max(abs(v) for v in ins.values()):22.2f} {max(abs(v) for v in loo.values()):16.2f}  "
              f"{worst} {loo[worst]:+.2f}")
    print(f"\n{scorer.evaluations} simulations, {report['wall_s']} s")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
