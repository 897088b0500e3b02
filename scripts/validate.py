"""Validate jaxsim against a real vLLM run.

    python scripts/validate.py CASE_DIR --profiles DIR --models DIR --workloads DIR --json OUT

CASE_DIR is laid out like profiles/validation/RTXPRO6000-Llama-3.1-8B/: ``config.json`` (the
reference simulator's cluster format), ``vllm/meta.json`` and ``vllm/requests.jsonl``
(``vllm/timeseries.csv`` optional). The hardware, model, TP degree, scheduler knobs and
workload come from those files; nothing is specific to one case. Prints the 15-statistic table
(TTFT, TPOT, E2E x mean, median, P90, P95, P99: real, simulated, Diff%) and the paired
per-request errors, and writes them as JSON.
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jaxsim import compile_cache, metrics, simulator, validation  # noqa: E402
from jaxsim.engine.routing import Router  # noqa: E402
from jaxsim.errors import JaxsimInputError  # noqa: E402
from jaxsim.spec import Calibration  # noqa: E402


def run_case(case_dir, profiles, models, workloads, calibration: Calibration = Calibration()):
    """Simulate a validation case and compare it with the measurement; returns the JSON dict."""
    case = validation.load_case(case_dir, models, workloads)
    specs, rt, links = validation.case_to_cluster(case)
    specs = [dataclasses.replace(s, calib=calibration) for s in specs]
    if len(specs) == 1:
        result = simulator.simulate(case.workload, case.model, specs[0].hw, specs[0].sched, rt, calibration,
                                    profiles_dir=profiles)
    else:  # DP ranks or several engines behind vLLM's DP load balancer (least loaded)
        result = simulator.simulate_cluster(case.workload, case.model, specs, Router("least_loaded"), rt, links,
                                            profiles_dir=profiles)
    table = metrics.request_table(result)
    comparison = validation.compare(case, table, metrics.time_series(result))
    comparison["case"] = case.name
    comparison["sim_summary"] = metrics.summarize(result, table)
    return comparison


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("case_dir")
    ap.add_argument("--profiles", default=str(ROOT / "profiles"))
    ap.add_argument("--models", default=str(ROOT / "profiles" / "models"))
    ap.add_argument("--workloads", default=str(ROOT / "profiles" / "workloads"))
    ap.add_argument("--json", help="write the comparison here")
    ap.add_argument("--no-compile-cache", action="store_true",
                    help="do not use JAX's persistent compilation cache (jaxsim/compile_cache.py)")
    args = ap.parse_args(argv)
    if not args.no_compile_cache:
        compile_cache.enable()
    try:
        comparison = run_case(args.case_dir, args.profiles, args.models, args.workloads)
    except JaxsimInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(validation.format_comparison(comparison))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(comparison, indent=2, default=float))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
