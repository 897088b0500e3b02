"""Speed of the default case (RTX PRO 6000 + Llama-3.1-8B, the 300-request ShareGPT trace,
vLLM defaults): one compiled run, a batched sweep, and the per-step cost against trace length.

    python scripts/bench.py --json OUT                 # one run
    python scripts/bench.py --sweep 1000 --json OUT    # 1,000 configurations in one sweep
    python scripts/bench.py --steps --json OUT         # per-step cost: 300 vs 100,000 requests
    python scripts/bench.py --instances 1,4,16,64 --json OUT   # strong and weak scaling over clusters
    python scripts/bench.py --instances 4,16 --leap 1          # the same without decode leaps (9: with)
    python scripts/bench.py --pd                       # 3 colocated instances vs 1 prefill + 2 decode
    python scripts/bench.py --search --json OUT        # design search vs grid, random search, CMA-ES
                                                       # (problems A, B, C: scripts/search_bench.py)

``--sweep N``: N configurations of the default case (compute and memory scale in [0.8, 1.2],
arrival rate x [0.8, 1.2]; their step counts stay close to the default's), run with
:func:`jaxsim.sweep.sweep` over every local device (on a CPU each core is made a device unless
``XLA_FLAGS`` already sets ``--xla_force_host_platform_device_count``).
Reports ``compile_s`` (a first sweep of one chunk, minus that chunk's steady run time),
``wall_s`` (the timed sweep, compiled), ``aggregate_realtime_factor`` (sum of simulated seconds /
wall_s), ``per_config_s`` against ``single_run_s`` and ``peak_mem_gib`` (peak RSS of the process).

``--instances N1,N2,...``: clusters of N identical instances behind the least-loaded router, in
two series (``{"strong": {"<N>": {...}}, "weak": {"<N>": {...}}}``): *strong* scaling serves the
default trace with N instances; *weak* scaling serves the trace replicated N times at N times its
arrival rate (copy k shifted by k/N of the mean inter-arrival gap, its token ids offset so copies
never share prefix-cache blocks), so every instance sees the default load. Each entry has
``wall_s`` (fastest of --repeats compiled runs; one run when a run takes over 20 s), ``compile_s``,
``steps`` (loop trips), ``iterations`` (simulated engine iterations, all instances), ``sim_s``,
``wall_per_iteration_us`` and ``realtime_factor``.

``--steps``: the cost of one engine step on a 100,000-request trace against the same trace cut
to 300 requests (see :func:`bench_steps`).

With no flag, prints and writes: ``compile_s`` (trace + XLA compile of the whole run), ``wall_s`` (median wall
time of one compiled run, over --repeats), ``sim_s`` (simulated seconds: last finish - first
arrival) and ``realtime_factor`` = sim_s / wall_s, all measured in this one process (after one
untimed warm-up run). On a shared 2-core VM the figure varies between processes; run it twice.
"""

import argparse
import dataclasses
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

# A sweep spreads over every local device; on a CPU, make each core a device (unless the caller
# chose). It must be set before JAX starts.
if any(a.startswith("--sweep") for a in sys.argv[1:]) and "host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={os.cpu_count() or 1}").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxsim import sweep as jsweep  # noqa: E402

from jaxsim import simulator  # noqa: E402
from jaxsim.engine import cluster  # noqa: E402
from jaxsim.model import load_model_config  # noqa: E402
from jaxsim.engine.routing import Router  # noqa: E402
from jaxsim.spec import HardwareConfig, InstanceSpec, SchedulerConfig  # noqa: E402
from jaxsim.workload import load_workload, synthetic_workload  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--sweep", type=int, default=0, metavar="N", help="run N configurations as one sweep")
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--steps", action="store_true", help="per-step cost: 300 vs 100,000 requests")
    ap.add_argument("--instances", help="comma-separated cluster sizes, e.g. 1,4,16,64: strong and weak scaling")
    ap.add_argument("--series", default="strong,weak", help="with --instances: strong, weak or both")
    ap.add_argument("--leap", type=int, default=0,
                    help="with --instances: Static.leap for every size (1: no decode leaps; 0: the default)")
    ap.add_argument("--pd", action="store_true", help="3 colocated instances vs 1 prefill + 2 decode instances")
    ap.add_argument("--search", nargs="?", const="A,B,C", metavar="A,B,C",
                    help="design-search benchmarks (scripts/search_bench.py): gap to the exhaustive grid, "
                         "random search and CMA-ES at equal budget")
    ap.add_argument("--levels", type=int, default=None, help="with --search: grid values per continuous variable")
    args = ap.parse_args(argv)
    if args.search:
        import search_bench
        def save(out):
            if args.json:
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps(out, indent=2, default=search_bench.finite))
        search_bench.run(args.search.split(","), args.levels, log=lambda m: print(m, flush=True), save=save)
        return 0
    if args.pd:
        colocated = [InstanceSpec()] * 3
        pd = [InstanceSpec(role="prefill")] + [InstanceSpec(role="decode", node=1)] * 2
        return _emit(bench_clusters([3, 3], designs=[colocated, pd], names=["colocated3", "pd_1p2d"]), args.json)
    if args.sweep:
        return _emit(bench_sweep(args.sweep, args.chunk_size), args.json)
    if args.steps:
        return _emit(bench_steps(), args.json)
    if args.instances:
        sizes = [int(x) for x in args.instances.split(",")]
        return _emit(bench_scaling(sizes, args.series.split(","), repeats=min(args.repeats, 3), leap=args.leap),
                     args.json)

    workload, model = _default_case()
    p = simulator.prepare(workload, model, HardwareConfig(), SchedulerConfig(), profiles_dir=ROOT / "profiles")

    compiled, compile_s, final = _compile(p)
    walls = _timed(compiled, p, args.repeats)
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


def _compile(p, **static) -> tuple:
    """``cluster.run`` compiled for ``p`` (``static`` overrides ``p.static``): (compiled, compile
    seconds, the final state of one untimed warm-up run, which also first-touches the buffers)."""
    t0 = time.perf_counter()
    compiled = cluster.run.lower(p.state, p.params, p.workload, p.static.replace(**static)).compile()
    compile_s = time.perf_counter() - t0
    return compiled, compile_s, jax.block_until_ready(compiled(p.state, p.params, p.workload))


def _timed(compiled, p, repeats: int) -> list:
    """Wall seconds of ``repeats`` compiled runs."""
    walls = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(p.state, p.params, p.workload))
        walls.append(time.perf_counter() - t0)
    return walls


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
    single_s = statistics.median(_timed(_compile(p)[0], p, 3))
    ok = sum(r["status"] == "ok" for r in result.rows)
    return dict(n_configs=n, chunk_size=chunk, devices=len(jax.local_devices()), compile_s=round(compile_s, 2),
                wall_s=round(result.wall_s, 2), sim_s=round(result.sim_s, 1),
                aggregate_realtime_factor=round(result.sim_s / result.wall_s, 1),
                per_config_s=round(result.wall_s / n, 4), single_run_s=round(single_s, 4),
                speedup_vs_single_runs=round(single_s / (result.wall_s / n), 2),
                peak_mem_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                configs_ok=ok, warmup_configs=len(warm.rows))


def bench_steps(long_requests: int = 100_000, short_requests: int = 300, steps: int = 1_500,
                repeats: int = 5) -> dict:
    """Wall time per engine step against the length of the trace.

    A 100,000-request synthetic trace (lengths drawn from the ShareGPT trace, 10 requests/s) and
    the same trace cut to its first 300 requests run the same engine iterations on the same
    requests until the cut trace runs dry. Each runs ``steps // 3`` and ``steps`` steps; the
    difference of the two wall times over the difference of steps is the cost of one step
    (a call also copies its input state once, which is larger for the longer trace: its prefix
    index has an entry per distinct block hash of the trace; that is reported separately). All
    runs are interleaved, ``repeats`` times each, and each reports its fastest (a shared VM has
    bursts of contention).
    """
    workload, model = _default_case()
    long = synthetic_workload(num_requests=long_requests, rate_rps=10.0,
                              input_len={"kind": "trace", "path": str(workload.source)},
                              output_len={"kind": "trace", "path": str(workload.source)}, seed=0)
    short = dataclasses.replace(long, arrival_ns=long.arrival_ns[:short_requests],
                                input_toks=long.input_toks[:short_requests],
                                output_toks=long.output_toks[:short_requests],
                                token_ids=long.token_ids[:short_requests])
    runs = {}
    for name, w in ((f"trace{short_requests}", short), (f"trace{long_requests // 1000}k", long)):
        p = simulator.prepare(w, model, HardwareConfig(), SchedulerConfig(), profiles_dir=ROOT / "profiles",
                              record_token_times=False, max_iterations=1)
        for n in (steps // 3, steps):
            p = dataclasses.replace(p, state=dataclasses.replace(p.state, max_steps=jnp.asarray(n, jnp.int32)))
            compiled, _, final = _compile(p, record_iterations=False)  # no iteration records
            if int(final.finished) == w.num_requests or int(final.steps) != n:
                raise RuntimeError(f"{name} ran dry before {n} steps: lower --steps")
            runs[name, n] = (p, compiled, int(final.finished), [])
    for _ in range(repeats):
        for p, compiled, _, walls in runs.values():
            walls += _timed(compiled, p, 1)
    out = {"steps": steps}
    per_step = {}
    for name, w in ((f"trace{short_requests}", short), (f"trace{long_requests // 1000}k", long)):
        (_, _, _, few), (_, _, finished, many) = runs[name, steps // 3], runs[name, steps]
        per_step[name] = (min(many) - min(few)) / (steps - steps // 3)
        out[f"{name}_requests"] = w.num_requests
        out[f"{name}_finished_in_those_steps"] = finished
        out[f"{name}_us_per_step"] = round(per_step[name] * 1e6, 2)
        out[f"{name}_call_overhead_ms"] = round((min(many) - steps * per_step[name]) * 1e3, 2)
        out[f"{name}_prefix_index_entries"] = int(runs[name, steps][0].state.inst.pool.hash_index.shape[-1])
    short_s, long_s = per_step.values()
    out["per_step_ratio_long_over_short"] = round(long_s / short_s, 3)
    out["peak_mem_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return out


def replicate(workload, n: int):
    """``workload`` replicated ``n`` times at ``n`` times its arrival rate: copy k arrives
    ``k / n`` of the mean inter-arrival gap after the original, with token ids offset so that
    copies never share prefix-cache blocks."""
    if n == 1:
        return workload
    arr = workload.arrival_ns.astype(np.int64)
    gap = int((arr.max() - arr.min()) // max(len(arr) - 1, 1))
    span = 1 + max(int(np.max(t)) for t in workload.token_ids if t is not None and len(t))
    ids = [[None if t is None else np.asarray(t) + k * span for t in workload.token_ids] for k in range(n)]
    return dataclasses.replace(
        workload, arrival_ns=np.concatenate([arr + k * gap // n for k in range(n)]),
        input_toks=np.tile(workload.input_toks, n), output_toks=np.tile(workload.output_toks, n),
        token_ids=sum(ids, []), line_numbers=None, source=f"{workload.source} x{n}")


def bench_scaling(sizes: list, series: list, repeats: int = 3, leap: int = 0) -> dict:
    """Strong and weak scaling of clusters of ``sizes`` identical instances (see the module
    docstring); ``leap`` > 0 overrides ``Static.leap`` (decode leaps, engine/leap.py)."""
    workload, model = _default_case()
    out = {}
    for kind in series:
        out[kind] = {}
        for n in sizes:
            w = workload if kind == "strong" else replicate(workload, n)
            out[kind][str(n)] = _bench_cluster(w, model, [InstanceSpec()] * n, repeats, leap)
            print(kind, n, out[kind][str(n)], flush=True)
    return out


def _bench_cluster(workload, model, specs, repeats: int, leap: int = 0) -> dict:
    rows = 0  # automatic iteration buffer; doubled (a recompile) when a run fills it, as simulate_cluster does
    while True:
        p = simulator.prepare_cluster(workload, model, specs, Router("least_loaded"), profiles_dir=ROOT / "profiles",
                                      record_token_times=False, max_iterations=rows)
        if leap:
            p = dataclasses.replace(p, static=p.static.replace(leap=leap))
        compiled, compile_s, final = _compile(p)
        try:
            result = simulator.to_result(p, final)
            break
        except simulator.IterationBufferFull:
            rows = min(2 * p.state.records.start.shape[-1], p.max_iters_bound)
    walls = _timed(compiled, p, 1)
    if walls[0] < 20:
        walls += _timed(compiled, p, repeats - 1)
    sim_s = float(result.finish_ns.max() - result.arrival_ns.min()) / 1e9
    iters = int(result.stats["iterations"])
    return dict(wall_s=round(min(walls), 4), compile_s=round(compile_s, 2), steps=int(final.steps), iterations=iters,
                sim_s=round(sim_s, 2), wall_per_iteration_us=round(min(walls) / iters * 1e6, 2),
                realtime_factor=round(sim_s / min(walls), 1))


def bench_clusters(sizes: list, repeats: int = 3, designs: list | None = None, names: list | None = None) -> dict:
    """The default case served by clusters of ``sizes`` identical instances (or the given
    ``designs``: lists of InstanceSpec) behind the least-loaded router: compile time, and the
    fastest of ``repeats`` compiled runs."""
    workload, model = _default_case()
    out = {}
    for k, n in enumerate(sizes):
        specs = designs[k] if designs else [InstanceSpec()] * n
        p = simulator.prepare_cluster(workload, model, specs, Router("least_loaded"),
                                      profiles_dir=ROOT / "profiles", record_token_times=False)
        compiled, compile_s, final = _compile(p)
        walls = _timed(compiled, p, repeats)
        result = simulator.to_result(p, final)
        sim_s = float(result.finish_ns.max() - result.arrival_ns.min()) / 1e9
        out[names[k] if names else f"instances{n}"] = dict(compile_s=round(compile_s, 2), wall_s=round(min(walls), 4), steps=int(final.steps),
                                    sim_s=round(sim_s, 2), realtime_factor=round(sim_s / min(walls), 1),
                                    requests_per_instance=result.stats.get("requests_per_instance",
                                                                           [workload.num_requests]))
    return out


if __name__ == "__main__":
    sys.exit(main())
