"""How close two simulations that differ by almost nothing score against each other: the noise
floor of every validation figure.

    python scripts/noise_floor.py [--cases NAME,NAME] [--json OUT]

For each development case in profiles/validation, the case is simulated with the default engine
costs (the *baseline*) and again with the per-iteration overhead moved by ``--deltas`` (default
-1, +1 and +10 us: 0.005-0.05 % of an iteration, far below anything a measurement can resolve).
Each perturbed run is then scored against the baseline exactly as a simulation is scored against
the measurement (``jaxsim.validation.compare`` with the baseline in the measurement's place: the
same statistics, paired errors and time-series columns). The time series are also re-binned with
the tick boundaries moved by ``--shift`` seconds (default 0.3 s, within the ±0.5 s to which the
A6000 cases' logger ticks are aligned, see the validation README), the baseline against itself.

Prints, per case, the largest |figure| over the perturbations (``perturb``) and over the shifts
(``shift``), in the units of scripts/validation_figures.py (Diff % for statistics, median paired
|error| %, nMAE x 100 for series). A figure whose floor is near its target cannot meet that target
by modelling causes better: the remaining error is the system's sensitivity (a KV-bound run where
one iteration moved by a microsecond preempts a different request), or the alignment of the
measurement, not the model.
"""

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import validate  # noqa: E402
import validation_figures  # noqa: E402
from jaxsim import metrics, validation  # noqa: E402
from jaxsim.spec import Calibration  # noqa: E402

PROFILES = ROOT / "profiles"
CASES = PROFILES / "validation"


def as_measurement(ev: validate.Evaluation, series: dict) -> validation.Case:
    """The case with a simulation (``ev``'s table, and ``series``) in the measurement's place: the
    same kinds of measurement as the case has, and nothing else."""
    case = ev.case
    repl = {}
    if case.real is not None:
        sim = validation._sim_ms(ev.table)  # noqa: SLF001 - the same conversion the scoring uses
        n = case.workload.num_requests
        real = dict(case.real)
        for m in validation.METRICS:
            col = np.full(n, np.nan)
            col[sim["request_id"]] = sim[m]
            real[f"{m}_ms"] = col
        arrival = np.asarray(ev.table["arrival_ns"], np.int64)
        end = np.asarray(ev.table["end_ns"], np.int64)
        repl["real"] = real
        repl["real_makespan_s"] = float(end.max() - arrival.min()) / 1e9
    if case.real_summary is not None:
        repl["real_summary"] = validation.bench_summary(ev.table, case.real_summary)
    if case.real_timeseries is not None:
        cached = bool(case.settings.get("kv_cache_pct_counts_cached"))
        real_ts = {"t": series["t"]}
        for c in case.real_timeseries:
            sc = validation._sim_column(c, cached)  # noqa: SLF001
            if c != "t" and sc in series:
                real_ts[c] = series[sc]
        repl["real_timeseries"] = real_ts
        repl["real_timeseries_instances"] = None
    return dataclasses.replace(case, **repl)


def score(measured: validation.Case, table: dict, series: dict) -> dict:
    return validation_figures.figures(validation.compare(measured, table, series))


def floor(case_dir: Path, deltas_us, shift_s: float) -> dict:
    base = validate.evaluate(case_dir, PROFILES, PROFILES / "models", PROFILES / "workloads")
    cal = Calibration()
    out = {"perturb": {}, "shift": {}}
    measured = as_measurement(base, base.series)
    for d in deltas_us:
        c = dataclasses.replace(cal, iteration_overhead_ns=cal.iteration_overhead_ns + int(round(d * 1000)))
        ev = validate.evaluate(case_dir, PROFILES, PROFILES / "models", PROFILES / "workloads", c)
        for k, v in score(measured, ev.table, ev.series).items():
            out["perturb"][k] = max(out["perturb"].get(k, 0.0), abs(v))
    if base.case.real_timeseries is not None and base.result is not None:
        for s in (-shift_s, shift_s):
            shifted = metrics.time_series(base.result, base.case.tick_s, origin_ns=int(round(s * 1e9)))
            for k, v in score(measured, base.table, shifted).items():
                if k.startswith("ts_"):
                    out["shift"][k] = max(out["shift"].get(k, 0.0), abs(v))
    return out


def _floats(text: str) -> list:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--deltas", default=[-1.0, 1.0, 10.0], type=_floats, help="iteration-overhead changes, us (comma-separated)")
    ap.add_argument("--shift", type=float, default=0.3, help="tick-boundary shift, s")
    ap.add_argument("--json", default=None, help="write the floors here")
    args = ap.parse_args(argv)
    from jaxsim import compile_cache

    compile_cache.enable()
    names = list(dict.fromkeys(n for n in args.cases.split(",") if n))  # in order, once each
    every = sorted(p.parent.parent for p in CASES.glob("*/vllm/meta.json"))
    unknown = sorted(set(names) - {d.name for d in every})
    if unknown:
        print(f"error: --cases: no such case {', '.join(unknown)} in {CASES}; cases: "
              + ", ".join(d.name for d in every), file=sys.stderr)
        return 2
    dirs = [d for d in every if not names or d.name in names]
    deltas = args.deltas
    floors = {}
    for d in dirs:
        t = time.perf_counter()
        floors[d.name] = floor(d, deltas, args.shift)
        print(f"{d.name}: {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
        for kind in ("perturb", "shift"):
            f = floors[d.name][kind]
            if f:
                print(f"  {kind:8s} " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(f.items())), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(floors, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
