"""Speed of one compiled simulation of the default case (RTX PRO 6000 + Llama-3.1-8B, the
300-request ShareGPT trace, vLLM defaults).

    python scripts/bench.py --json OUT

Prints and writes: ``compile_s`` (trace + XLA compile of the whole run), ``wall_s`` (median wall
time of one compiled run, over --repeats), ``sim_s`` (simulated seconds: last finish - first
arrival) and ``realtime_factor`` = sim_s / wall_s, all measured in this one process (after one
untimed warm-up run). On a shared 2-core VM the figure varies between processes; run it twice.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

from jaxsim import simulator  # noqa: E402
from jaxsim.engine import cluster  # noqa: E402
from jaxsim.model import load_model_config  # noqa: E402
from jaxsim.spec import HardwareConfig, SchedulerConfig  # noqa: E402
from jaxsim.workload import load_workload  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args(argv)

    workload = load_workload(ROOT / "profiles/workloads/sharegpt-llama-3.1-8b-300-sps10.jsonl")
    model = load_model_config(ROOT / "profiles/models", "meta-llama/Llama-3.1-8B")
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
    for k, v in out.items():
        print(f"{k:>18}: {v}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
