"""Validate jaxsim against real vLLM runs.

    python scripts/validate.py CASE_DIR [--json OUT]
    python scripts/validate.py --all DIR [--out REPORT_DIR]

CASE_DIR is laid out as profiles/validation/README.md describes (``config.json``, ``vllm/meta.json``
and any of ``vllm/requests.jsonl``, ``vllm/timeseries.csv``, ``vllm/timeseries.inst<k>.csv``,
``vllm/summary.json``). The hardware, model, parallelism, routing, scheduler knobs and workload come
from those files; what a case does not record is assumed and listed (``assumed``). Prints, for what
the case measured: the 15-statistic table (TTFT, TPOT, E2E x mean, median, P90, P95, P99: real,
simulated, Diff%) and the paired per-request errors; Diff% per summary.json key (simulated side
computed as `vllm bench serve` does); per time-series column (per instance and cluster) the nMAE
over busy ticks, correlation, totals, last active tick and final values of cumulative gauges;
the columns not simulated yet; and writes them as JSON.

``--all DIR`` runs every case folder under DIR and writes REPORT_DIR/report.md (a table of every
case x statistic, then per case its tables and plots of measured vs simulated series and, for
per-request cases, TTFT/TPOT/E2E CDFs) with each case's JSON and simulated series.
"""

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jaxsim import compile_cache, metrics, simulator, validation  # noqa: E402
from jaxsim.errors import CapacityOverflowError, JaxsimInputError  # noqa: E402
from jaxsim.planning import weight_and_kv_bytes  # noqa: E402
from jaxsim.spec import Calibration  # noqa: E402

GIB = 1 << 30


@dataclasses.dataclass
class Evaluation:
    """One case simulated and scored: what the report needs besides the JSON."""

    case: validation.Case
    comparison: dict
    table: dict  # metrics.request_table of the run
    series: dict  # the cluster's simulated time series (trace time)
    instance_series: dict  # k -> instance k's simulated series (multi-instance runs)
    wall_s: float
    result: object = None  # the SimResult (scripts/noise_floor.py re-bins its series)


def _instance_blocks(case, specs, rt, links, result, profiles) -> list:
    """Each instance's KV blocks (the result holds the cluster's total): an even share when the
    instances are alike, else each instance's plan."""
    if all(s.hw == specs[0].hw and s.sched == specs[0].sched for s in specs):
        return [int(result.num_blocks) // len(specs)] * len(specs)
    plans = simulator.plan_cluster(case.workload, case.model, specs, rt, links, profiles_dir=profiles)
    return [int(pl.num_blocks) for pl in plans]


def _with_gpu_mem(case, series: dict, specs, rt, num_blocks: int, instances: int) -> dict:
    """Add the simulated ``gpu_mem_gib`` (weights + KV usage x pool, as the case measures it)."""
    w, kv = weight_and_kv_bytes(case.model, rt)
    hw = specs[0].hw
    weights = case.model.weight_bytes_per_rank(w, tp=hw.tp, pp=hw.pp, ep=(hw.ep or hw.tp) if case.model.is_moe else 1)
    block = specs[0].sched.block_size * case.model.kv_bytes_per_token_per_rank(kv, tp=hw.tp, pp=hw.pp)
    mem = validation.gpu_mem_series(series, weights / GIB, block / GIB, num_blocks,
                                    counts_cached=bool(case.settings.get("kv_cache_pct_counts_cached")),
                                    instances=instances)
    return series if mem is None else {**series, "gpu_mem_gib": mem}


def evaluate(case_dir, profiles, models, workloads, calibration: Calibration | None = None) -> Evaluation:
    """Load, simulate and score one case."""
    t0 = time.perf_counter()
    case = validation.load_case(case_dir, models, workloads)
    calibration = calibration or Calibration()
    specs, rt, links = validation.case_to_cluster(case, profiles)
    specs = [dataclasses.replace(s, calib=calibration) for s in specs]
    assumed = list(case.assumed)
    for inst in {i["hardware"] for _, _, i in case.instances}:
        note = validation.profile_name(inst, profiles)[1]
        if note:
            assumed.append(note)
    assumed.append("engine costs: " + ("jaxsim's default calibration, fitted jointly on RTXPRO6000, RTX4090 (vLLM 0.19, "
                   "async) and A6000 pulse-SD+PC (vLLM 0.13, eager, sync) by scripts/fit_engine_costs.py"
                   if calibration == Calibration() else f"{calibration}")
                   + f"; the engine step's CPU time {'shows beyond the GPU time only' if case.settings['async_scheduling'] else 'adds in full'}"
                   f" (async_scheduling={case.settings['async_scheduling']}); enforce_eager is not modelled apart from it")
    power = validation.case_power(case)
    if power is not None:
        assumed.append("power: the node power block of the case's config.json (for the ISPASS power case, the "
                       "reference authors' parameters fitted to its logs; scripts/fit_power.py fits jaxsim's own)")
    if len(specs) == 1:
        result = simulator.simulate(case.workload, case.model, specs[0].hw, specs[0].sched, rt, calibration,
                                    profiles_dir=profiles, kv_tier=validation.case_kv_tier(case), power=power)
    else:
        result = simulator.simulate_cluster(case.workload, case.model, specs, validation.case_router(case), rt, links,
                                            profiles_dir=profiles, kv_tier=validation.case_kv_tier(case), power=power)
    if case.settings["num_gpu_blocks"] is None:
        per = int(result.num_blocks) // len(specs)
        assumed = [a + f" -> {per} blocks per instance in this run" if a.startswith("num_gpu_blocks=") else a
                   for a in assumed]
    table = metrics.request_table(result)
    until = None if case.real_timeseries is None else int(round(len(case.real_timeseries["t"]) * case.tick_s * 1e9))
    series = metrics.time_series(result, case.tick_s, origin_ns=0, until_ns=until)
    series.update(validation.power_columns(series, sum(s.hw.tp * s.hw.pp for s in specs)))
    measured_mem = case.real_timeseries is not None and "gpu_mem_gib" in case.real_timeseries
    if measured_mem:
        series = _with_gpu_mem(case, series, specs, rt, int(result.num_blocks), len(specs))
    inst_series = {}
    if len(specs) > 1:
        blocks = _instance_blocks(case, specs, rt, links, result, profiles)
        for k in range(len(specs)):
            s = metrics.time_series(result, case.tick_s, instance=k, origin_ns=0, num_blocks=blocks[k])
            inst_series[k] = _with_gpu_mem(case, s, specs, rt, blocks[k], 1) if measured_mem else s
    comparison = {"case": case.name, **validation.compare(case, table, series, inst_series or None)}
    comparison["assumed"] = assumed
    comparison["settings"] = case.settings
    comparison["sim_summary"] = metrics.summarize(result, table)
    return Evaluation(case, comparison, table, series, inst_series, time.perf_counter() - t0, result)


def run_case(case_dir, profiles, models, workloads, calibration: Calibration = Calibration()):
    """Simulate a validation case and compare it with the measurement; returns the JSON dict."""
    return evaluate(case_dir, profiles, models, workloads, calibration).comparison


def _write_json(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics._jsonable(obj), indent=2, allow_nan=False) + "\n")


def case_dirs(root: Path) -> list:
    """The case folders under ``root`` (those holding vllm/meta.json), in name order."""
    return sorted(p.parent.parent for p in Path(root).glob("*/vllm/meta.json"))


def run_all(root, out_dir, profiles, models, workloads, command: str = "") -> int:
    from jaxsim import validation_report

    dirs = case_dirs(root)
    if not dirs:
        print(f"error: {root}: no case folders (DIR/<case>/vllm/meta.json)", file=sys.stderr)
        return 2
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    evaluations, failures = [], {}
    for d in dirs:
        print(f"== {d.name}", flush=True)
        try:
            ev = evaluate(d, profiles, models, workloads)
        except Exception as e:  # noqa: BLE001 - one failing case must not lose the others' report
            print(f"   failed: {type(e).__name__}: {e}", file=sys.stderr)
            failures[d.name] = f"{type(e).__name__}: {e}"
            continue
        evaluations.append(ev)
        _write_json(ev.comparison, out / f"{d.name}.json")
        print(f"   {ev.wall_s:.1f} s", flush=True)
    report = validation_report.write_report(evaluations, failures, out, command=command)
    print(f"\nwrote {report}")
    return 0 if not failures else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("case_dir", nargs="?", help="one case folder")
    ap.add_argument("--all", metavar="DIR", help="run every case folder under DIR and write a report")
    ap.add_argument("--out", default="outputs/validation", help="report folder of --all (default %(default)s)")
    ap.add_argument("--profiles", default=str(ROOT / "profiles"))
    ap.add_argument("--models", default=str(ROOT / "profiles" / "models"))
    ap.add_argument("--workloads", default=str(ROOT / "profiles" / "workloads"))
    ap.add_argument("--json", help="write the comparison here")
    ap.add_argument("--no-compile-cache", action="store_true",
                    help="do not use JAX's persistent compilation cache (jaxsim/compile_cache.py)")
    args = ap.parse_args(argv)
    if (args.case_dir is None) == (args.all is None):
        ap.error("give one CASE_DIR or --all DIR")
    if not args.no_compile_cache:
        compile_cache.enable()
    if args.all:
        command = "python scripts/validate.py " + " ".join(argv if argv is not None else sys.argv[1:])
        return run_all(args.all, args.out, args.profiles, args.models, args.workloads, command)
    try:
        comparison = run_case(args.case_dir, args.profiles, args.models, args.workloads)
    except (JaxsimInputError, CapacityOverflowError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(validation.format_comparison(comparison))
    if args.json:
        _write_json(comparison, Path(args.json))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
