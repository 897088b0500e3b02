"""The validation figures the README states, re-measured: the regression guard's reference.

    python scripts/validation_figures.py [--write]

Simulates every development case in profiles/validation with the default engine costs and
prints its figures: Diff% of every latency statistic (per-request cases: TTFT / TPOT / E2E x
mean, median, P90, P95, P99; summary cases: vllm bench serve's keys) and the nMAE (x 100) of every
measured time-series column. ``--write`` stores them in tests/data/validation_figures.json, which
tests/test_validation_guard.py compares fresh runs against (0.5 percentage points): regenerate it,
and the README table it prints, whenever the engine changes a figure on purpose.
"""

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

FIGURES = ROOT / "tests" / "data" / "validation_figures.json"
CASES = ROOT / "profiles" / "validation"
# The cases the README table shows, and the columns it shows of each (figure keys).
README_KEYS = ("ttft_mean", "ttft_median", "ttft_p99", "tpot_mean", "tpot_p99", "e2e_mean",
               "ttft_mean_ms", "ttft_median_ms", "tpot_mean_ms", "itl_mean_ms", "ts_gen_throughput")


def figures(comparison: dict) -> dict:
    """``{figure: value}``: Diff% of the latency statistics and summary keys, the paired median
    |error| % (``paired_<metric>_median_abs``), nMAE x 100 of each time series (``ts_<column>``,
    cluster) — all in percentage points."""
    out = {}
    for section in ("stats", "summary"):
        for k, v in (comparison.get(section) or {}).items():
            if isinstance(v, dict) and v.get("diff_pct") is not None:
                out[k] = round(float(v["diff_pct"]), 3)
    for k, v in (comparison.get("paired") or {}).items():  # per-request cases: median |paired error| %
        if isinstance(v, dict) and v.get("median_abs_pct") is not None:
            out[f"paired_{k}_median_abs"] = round(float(v["median_abs_pct"]), 3)
    for k, v in (comparison.get("timeseries") or {}).items():
        if isinstance(v, dict) and v.get("nmae") is not None:
            out[f"ts_{k}"] = round(100 * float(v["nmae"]), 3)
    return out


def measure(case_dir: Path, calibration=None) -> dict:
    """The :func:`figures` of one case simulated with ``calibration`` (None: the default)."""
    import validate

    prof = ROOT / "profiles"
    return figures(validate.evaluate(case_dir, prof, prof / "models", prof / "workloads", calibration).comparison)


def readme_table(figs: dict) -> str:
    cols = [k for k in README_KEYS if any(k in f for f in figs.values())]
    lines = ["| case | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for case, f in figs.items():
        lines.append(f"| {case} | " + " | ".join(
            "—" if k not in f else f"{f[k]:.1f}" if k.startswith("ts_") else f"{f[k]:+.1f}" for k in cols) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true", help=f"store the figures in {FIGURES.relative_to(ROOT)}")
    args = ap.parse_args(argv)
    from jaxsim import compile_cache

    compile_cache.enable()
    figs = {}
    for d in sorted(p.parent.parent for p in CASES.glob("*/vllm/meta.json")):
        t = time.perf_counter()
        figs[d.name] = measure(d)
        print(f"{d.name}: {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    print(readme_table(figs))
    if args.write:
        FIGURES.write_text(json.dumps(figs, indent=1, sort_keys=True) + "\n")
        print(f"wrote {FIGURES}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
