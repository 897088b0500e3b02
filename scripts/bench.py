"""Speed of the default case (RTX PRO 6000 + Llama-3.1-8B, the 300-request ShareGPT trace,
vLLM defaults): one compiled run, a batched sweep, and the per-step cost against trace length.

    python scripts/bench.py --json OUT                 # one run
    python scripts/bench.py --sweep 1000 --json OUT    # 1,000 configurations in one sweep
    python scripts/bench.py --steps --json OUT         # per-step cost: 300 vs 100,000 requests

``--sweep N``: N configurations of the default case (compute and memory scale in [0.8, 1.2],
arrival rate x [0.8, 1.2]; their step counts stay close to the default's), run with
:func:`jaxsim.sweep.sweep` over every local device (set
``XLA_FLAGS=--xla_force_host_platform_device_count=2`` to use both cores of a 2-core CPU).
Reports ``compile_s`` (a first sweep of one chunk, minus that chunk's steady run time),
``wall_s`` (the timed sweep, compiled), ``aggregate_realtime_factor`` (sum of simulated seconds /
wall_s), ``per_config_s`` against ``single_run_s`` and ``peak_mem_gib`` (peak RSS of the process).

Prints and writes: ``compile_s`` (trace + XLA compile of the whole run), ``wall_s`` (median wall
time of one compiled run, over --repeats), ``sim_s`` (simulated seconds: last finish - first
arrival) and ``realtime_factor`` = sim_s / wall_s, all measured in this one process (after one
untimed warm-up run). On a shared 2-core VM the figure varies between processes; run it twice.
"""

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxsim import sweep as jsweep  # noqa: E402

from jaxsim import simulator  # noqa: E402
from jaxsim.engine import cluster  # noqa: E402
from jaxsim.model import load_model_config  # noqa: E402
from jaxsim.spec import HardwareConfig, SchedulerConfig  # noqa: E402
from jaxsim.workload import load_workload, synthetic_workload  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--sweep", type=int, default=0, metavar="N", help="run N configurations as one sweep")
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--steps", action="store_true", help="per-step cost: 300 vs 100,000 requests")
    args = ap.parse_args(argv)
    if args.sweep:
        return _emit(bench_sweep(args.sweep, args.chunk_size), args.json)
    if args.steps:
        return _emit(bench_steps(), args.json)

    workload, model = _default_case()
    p = simulator.prepare(workload, model, HardwareConfig(), SchedulerConfig(), profiles_dir=ROOT / "profiles")

    t0 = time.perf_counter()
    compiled = cluster.run.lower(p.state, p.params, p.workload, **p.static).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(p.state, p.params, p.workload))  # warm-up: first-touch of buffers

    walls = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        final = jax.block_until_ready(compiled(p.state, p.params, p.workload))
        walls.append(time.perf_counter() - t0)
    result = simulator.to_result(p, final)
    sim_s = float(result.finish_ns.max() - result.arrival_ns.min()) / 1e9
    wall_s = statistics.median(walls)
    out = dict(compile_s=round(compile_s, 3), wall_s=round(wall_s, 4), sim_s=round(sim_s, 3),
               realtime_factor=round(sim_s / wall_s, 1), iterations=int(result.stats["iterations"]),
               us_per_iteration=round(wall_s / result.stats["iterations"] * 1e6, 1),
               wall_s_all=[round(w, 4) for w in walls], device=str(jax.devices()[0]))
    return _emit(out, args.json)


def _emit(out: dict, path) -> int:
    for k, v in out.items():
        print(f"{k:>26}: {v}")
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(out, indent=2))
    return 0


def _default_case():
    workload = load_workload(ROOT / "profiles/workloads/sharegpt-llama-3.1-8b-300-sps10.jsonl")
    model = load_model_config(ROOT / "profiles/models", "meta-llama/Llama-3.1-8B")
    return workload, model


def _timed_single(p, repeats=3) -> tuple[float, object]:
    compiled = cluster.run.lower(p.state, p.params, p.workload, **p.static).compile()
    final = jax.block_until_ready(compiled(p.state, p.params, p.workload))
    walls = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        final = jax.block_until_ready(compiled(p.state, p.params, p.workload))
        walls.append(time.perf_counter() - t0)
    return statistics.median(walls), final


def bench_sweep(n: int, chunk_size: int) -> dict:
    workload, model = _default_case()
    base = jsweep.SweepBase(workload, model, profiles_dir=ROOT / "profiles")
    rng = np.random.default_rng(0)
    points = [{"compute_scale": float(a), "memory_scale": float(b), "arrival_rate_scale": float(c)}
              for a, b, c in rng.uniform(0.8, 1.2, size=(n, 3))]
    chunk = min(chunk_size, n)
    t0 = time.perf_counter()
    warm = jsweep.sweep(base, points[:chunk], chunk_size=chunk, progress=False)  # compiles
    first_s = time.perf_counter() - t0
    result = jsweep.sweep(base, points, chunk_size=chunk, progress=True)
    chunks = -(-n // chunk)
    compile_s = max(first_s - result.wall_s / chunks, 0.0)
    p = simulator.prepare(workload, model, HardwareConfig(), SchedulerConfig(), profiles_dir=ROOT / "profiles",
                          record_token_times=False)
    single_s, _ = _timed_single(p)
    ok = sum(r["status"] == "ok" for r in result.rows)
    return dict(n_configs=n, chunk_size=chunk, devices=len(jax.local_devices()), compile_s=round(compile_s, 2),
                wall_s=round(result.wall_s, 2), sim_s=round(result.sim_s, 1),
                aggregate_realtime_factor=round(result.sim_s / result.wall_s, 1),
                per_config_s=round(result.wall_s / n, 4), single_run_s=round(single_s, 4),
                speedup_vs_single_runs=round(single_s / (result.wall_s / n), 2),
                peak_mem_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                configs_ok=ok, warmup_configs=len(warm.rows))


def bench_steps(long_requests: int = 100_000, steps: int = 20_000) -> dict:
    """Wall time per engine step on the 300-request trace and on a 100,000-request synthetic
    trace with the same length distribution and rate (the first ``steps`` steps of it)."""
    workload, model = _default_case()
    out = {}
    long = synthetic_workload(num_requests=long_requests, rate_rps=10.0,
                              input_len={"kind": "trace", "path": str(workload.source)},
                              output_len={"kind": "trace", "path": str(workload.source)}, seed=0)
    for name, w, max_steps in (("trace300", workload, 10**6), ("synthetic100k", long, steps)):
        p = simulator.prepare(w, model, HardwareConfig(), SchedulerConfig(), profiles_dir=ROOT / "profiles",
                              record_token_times=False, max_iterations=1)
        p.static = dict(p.static, record_iterations=False, max_steps=max_steps)  # no iteration records
        wall, final = _timed_single(p)
        n_steps = int(final.steps)
        out[f"{name}_requests"] = w.num_requests
        out[f"{name}_steps"] = n_steps
        out[f"{name}_us_per_step"] = round(wall / n_steps * 1e6, 2)
    out["per_step_ratio_100k_over_300"] = round(out["synthetic100k_us_per_step"] / out["trace300_us_per_step"], 3)
    out["peak_mem_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return out


if __name__ == "__main__":
    sys.exit(main())
