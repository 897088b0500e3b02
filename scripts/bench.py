"""Speed of the default case (RTX PRO 6000 + Llama-3.1-8B, the 300-request ShareGPT trace,
vLLM defaults): one compiled run, a batched sweep, and the per-step cost against trace length.

    python scripts/bench.py --json OUT                 # one run
    python scripts/bench.py --sweep 1000 --json OUT    # 1,000 configurations in one sweep
    python scripts/bench.py --steps --json OUT         # per-step cost: 300 vs 100,000 requests
    python scripts/bench.py --steps --long-requests 1000000    # ... 300 vs 1,000,000 requests
    python scripts/bench.py --long-trace synthetic --json OUT  # a whole 1,000,000-request run
    python scripts/bench.py --long-trace azure --json OUT      # a day of an Azure-format CSV
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

``--steps``: the cost of one engine step on a 100,000-request trace (``--long-requests N``: N,
e.g. 1000000) against the same trace cut to 300 requests (see :func:`bench_steps`). The default
stays 100,000: at 1,000,000 the host-side preparation alone (prefix hashes of 94 M blocks) takes
minutes and the process peaks at ~10 GiB.

``--long-trace synthetic|azure``: one whole run of a long trace in bounded memory, with the
progress bar (see :func:`bench_long_trace`): ``synthetic`` is ``--long-requests`` requests (default
1,000,000) of ShareGPT lengths at 4 requests/s; ``azure`` is a day of an Azure-format CSV
(synthesised into a temporary folder, then read by the ``azure`` importer). Reports wall and
simulated seconds, peak RSS, per-step cost, and the RSS after each stretch of the loop.

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
from collections.abc import Sequence
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

from jaxsim import progress, simulator  # noqa: E402
from jaxsim.engine import cluster  # noqa: E402
from jaxsim.model import load_model_config  # noqa: E402
from jaxsim.engine.routing import Router  # noqa: E402
from jaxsim.spec import GENERATED_TOKEN_IDS, HardwareConfig, InstanceSpec, SchedulerConfig, Workload  # noqa: E402
from jaxsim.workload import load_workload  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--sweep", type=int, default=0, metavar="N", help="run N configurations as one sweep")
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--steps", action="store_true", help="per-step cost: 300 vs --long-requests requests")
    ap.add_argument("--long-requests", type=int, default=None,
                    help="requests of the long trace (--steps: default 100,000; --long-trace synthetic: 1,000,000)")
    ap.add_argument("--long-trace", choices=("synthetic", "azure"),
                    help="one whole run of a long trace in bounded memory, with progress")
    ap.add_argument("--azure-rate", type=float, default=AZURE_RATE_RPS,
                    help="with --long-trace azure: mean requests/s of the synthesised day")
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
        return _emit(bench_steps(long_requests=args.long_requests or 100_000, repeats=args.repeats), args.json)
    if args.long_trace:
        return _emit(bench_long_trace(args.long_trace, args.long_requests or 1_000_000, args.azure_rate), args.json)
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

    A ``long_requests`` synthetic trace (:func:`long_synthetic`: lengths drawn from the ShareGPT
    trace, 10 requests/s) and the same trace cut to its first 300 requests run the same engine
    iterations on the same requests until the cut trace runs dry. Each runs ``steps // 3`` and
    ``steps`` steps; the difference of the two wall times over the difference of steps is the
    cost of one step. Each call donates a fresh copy of the input state, made before the clock
    starts (as the progress bar's stretches donate theirs, :func:`jaxsim.simulator.run_prepared`):
    a call that does not donate first copies the whole state into the loop, which is larger for the
    longer trace (its prefix index has an entry per distinct block hash; 0.4 s for 1,000,000
    requests) and whose jitter then swamps the difference of the two walls. That copy is reported
    separately (``state_copy_ms``). All runs are interleaved, ``repeats`` times each, and each
    reports its fastest (a shared VM has bursts of contention).
    """
    workload, model = _default_case()
    long = long_synthetic(long_requests, workload)
    short = dataclasses.replace(long, arrival_ns=long.arrival_ns[:short_requests],
                                input_toks=long.input_toks[:short_requests],
                                output_toks=long.output_toks[:short_requests],
                                token_ids=long.token_ids[:short_requests])
    names = {f"trace{short_requests}": short,
             f"trace{long_requests // 1000}k" if long_requests % 1000 == 0 else f"trace{long_requests}": long}
    donating = simulator.run_donating  # the progress bar's stretches' loop
    runs, prepared = {}, {}
    for name, w in names.items():
        t0 = time.perf_counter()
        p = simulator.prepare(w, model, HardwareConfig(), SchedulerConfig(), profiles_dir=ROOT / "profiles",
                              record_token_times=False, record_iterations=False)
        prepared[name] = (p, time.perf_counter() - t0)
        compiled = donating.lower(p.state, p.params, p.workload, p.static).compile()  # one per trace
        for n in (steps // 3, steps):
            st = dataclasses.replace(p.state, max_steps=jnp.asarray(n, jnp.int32))
            final = jax.block_until_ready(compiled(_copy(st), p.params, p.workload))  # warm-up
            if int(final.finished) == w.num_requests or int(final.steps) != n:
                raise RuntimeError(f"{name} ran dry before {n} steps: lower --steps")
            runs[name, n] = (st, p, compiled, int(final.finished), [])
            del final
    copies = {name: [] for name in names}
    for _ in range(repeats):
        for (name, _), (st, p, compiled, _, walls) in runs.items():
            t0 = time.perf_counter()
            fresh = _copy(st)
            copies[name].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            final = jax.block_until_ready(compiled(fresh, p.params, p.workload))
            walls.append(time.perf_counter() - t0)
            del final  # freed after the clock stops (a stretch hands it on): freeing 131 MB took ~10 ms
    out = {"steps": steps, "repeats": repeats}
    per_step = {}
    for name, w in names.items():
        (_, _, _, _, few), (st, p, _, finished, many) = runs[name, steps // 3], runs[name, steps]
        per_step[name] = (min(many) - min(few)) / (steps - steps // 3)
        out[f"{name}_requests"] = w.num_requests
        out[f"{name}_prepare_s"] = round(prepared[name][1], 1)
        out[f"{name}_finished_in_those_steps"] = finished
        out[f"{name}_us_per_step"] = round(per_step[name] * 1e6, 2)
        out[f"{name}_wall_ms"] = {steps // 3: [round(x * 1e3, 1) for x in few], steps: [round(x * 1e3, 1) for x in many]}
        out[f"{name}_state_copy_ms"] = round(min(copies[name]) * 1e3, 2)  # what a call without donation adds
        out[f"{name}_prefix_index_entries"] = int(st.inst.pool.hash_index.shape[-1])
        out[f"{name}_state_mib"] = round(tree_bytes(st) / 2**20, 1)
        out[f"{name}_workload_mib"] = round(tree_bytes(p.workload) / 2**20, 1)  # read only, never copied
    short_s, long_s = per_step.values()
    out["per_step_ratio_long_over_short"] = round(long_s / short_s, 3)
    out["peak_mem_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return out


def _copy(state):
    """A fresh device copy of ``state`` (a donated call consumes its input)."""
    return jax.block_until_ready(jax.tree.map(jnp.copy, state))


class RandomTokenIds(Sequence):
    """Random token ids per request in ``[0, GENERATED_TOKEN_IDS)``, made on access from
    ``(seed, request index)``: a list of arrays would hold 4 bytes per token (6 GB for 1,000,000
    requests of ShareGPT lengths). The ids are random as :func:`synthetic_workload`'s (no two
    requests share a block) but not the same numbers. A slice keeps each request's ids."""

    max_id = GENERATED_TOKEN_IDS - 1  # lets the vocabulary check pass without making them all

    def __init__(self, lengths: np.ndarray, seed: int, index: np.ndarray | None = None):
        self.lengths = np.asarray(lengths, np.int64)
        self.seed = seed
        self.index = np.arange(len(self.lengths)) if index is None else index

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return RandomTokenIds(self.lengths[i], self.seed, self.index[i])
        return np.random.default_rng((self.seed, int(self.index[i]))).integers(
            0, GENERATED_TOKEN_IDS, size=int(self.lengths[i]), dtype=np.int32)


def long_synthetic(n: int, lengths_from, rate_rps: float = 10.0, seed: int = 0) -> Workload:
    """``n`` requests arriving as a Poisson process of ``rate_rps``, their (input, output) lengths
    resampled jointly from the workload ``lengths_from`` (the ShareGPT trace), token ids random
    (:class:`RandomTokenIds`)."""
    rng = np.random.default_rng(seed)
    arrival = np.cumsum(rng.exponential(1e9 / rate_rps, n)).astype(np.int64)
    pick = rng.integers(0, lengths_from.num_requests, n)
    inp, out = lengths_from.input_toks[pick].astype(np.int32), lengths_from.output_toks[pick].astype(np.int32)
    return Workload(arrival_ns=arrival, input_toks=inp, output_toks=out,
                    token_ids=RandomTokenIds(inp.astype(np.int64) + out, seed),
                    source=f"long_synthetic(n={n}, rate={rate_rps}/s, lengths of {lengths_from.source})")


# The whole-run synthetic trace's rate: ~80% of what the default instance serves of ShareGPT
# lengths (~5 requests/s; at --steps' 10/s the queue, and every TTFT, grows without bound).
LONG_RATE_RPS = 4.0

# The Azure LLM inference trace 2023 (code and conversation CSVs) runs at a few requests/s: a day
# at this mean rate is 432,000 requests (a sine between 0.4x and 1.6x of it over the day, lowest at
# 04:00, so the day has a quiet night and a busy afternoon). Lengths: lognormal, about the
# conversation trace's means (context ~1,000 tokens, ~230 generated), clipped to 4,096 and 1,024.
AZURE_RATE_RPS = 5.0


def write_azure_day(path: Path, rate_rps: float = AZURE_RATE_RPS, seed: int = 0) -> int:
    """Write a day of an Azure-format CSV (``TIMESTAMP, ContextTokens, GeneratedTokens``, the
    published files' columns and datetime format with 7 fractional digits) at a mean of
    ``rate_rps`` requests/s (see :data:`AZURE_RATE_RPS`). Returns the number of rows."""
    rng = np.random.default_rng(seed)
    sec = np.arange(86_400)
    rate = rate_rps * (1 + 0.6 * np.sin(2 * np.pi * (sec / 86_400 - 10 / 24)))
    counts = rng.poisson(rate)
    t_ns = (np.repeat(sec, counts) * 10**9 + rng.integers(0, 10**9, counts.sum())).astype(np.int64)
    t_ns.sort()
    n = len(t_ns)
    ctx = np.clip(np.round(rng.lognormal(np.log(1000) - 0.5 * 0.9**2, 0.9, n)), 1, 4096).astype(np.int64)
    gen = np.clip(np.round(rng.lognormal(np.log(230) - 0.5 * 0.9**2, 0.9, n)), 1, 1024).astype(np.int64)
    stamps = np.datetime_as_string(np.datetime64("2023-11-16T00:00:00", "ns") + t_ns.astype("timedelta64[ns]"),
                                   unit="ns")
    with open(path, "w") as f:
        f.write("TIMESTAMP,ContextTokens,GeneratedTokens\n")
        f.writelines(f"{s[:10]} {s[11:27]},{c},{g}\n" for s, c, g in zip(stamps, ctx.tolist(), gen.tolist()))
    return n


def tree_bytes(tree) -> int:
    return sum(int(x.nbytes) for x in jax.tree.leaves(tree) if hasattr(x, "nbytes"))


def _rss_gib() -> float:
    """Resident memory of this process now (GiB)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def bench_long_trace(kind: str, num_requests: int = 1_000_000, azure_rate: float = AZURE_RATE_RPS) -> dict:
    """One whole run of a long trace with the default instance (RTX PRO 6000 + Llama-3.1-8B, vLLM
    defaults), as a user runs it: no iteration rows and no token times
    (``record_iterations=False, record_token_times=False``, so the run's memory grows with its
    requests only), the loop in stretches with the progress bar on stderr
    (:func:`jaxsim.simulator.run_prepared`).

    ``kind``: ``synthetic`` (:func:`long_synthetic`, ``num_requests`` at :data:`LONG_RATE_RPS`) or
    ``azure`` (:func:`write_azure_day` into a temporary folder, read by
    :func:`jaxsim.traces.load_trace` with format ``azure``). Reports the host preparation
    (``workload_s``: make or import the trace; ``prepare_s``: plan, prefix hashes, device arrays),
    ``run_s`` (the loop, compile included, as the bar sees it) and ``compile_and_first_stretch_s``,
    ``us_per_step`` (the later stretches' wall over their steps), ``sim_s``, ``peak_rss_gib`` and
    the RSS after the first and the last stretch (``rss_*_gib``), ``state_mib`` (the loop's
    state) and ``workload_mib`` (its read-only trace arrays)."""
    import tempfile

    from jaxsim.traces import TraceOptions, load_trace

    t0 = time.perf_counter()
    default, model = _default_case()
    extra = {}
    if kind == "synthetic":
        workload = long_synthetic(num_requests, default, rate_rps=LONG_RATE_RPS)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "azure_day.csv"
            rows = write_azure_day(path, azure_rate)
            extra = dict(azure_rows=rows, azure_rate_rps=azure_rate, azure_csv_mib=round(path.stat().st_size / 2**20, 1))
            t_csv = time.perf_counter()
            workload = load_trace(path, "azure", TraceOptions())
            extra["import_s"] = round(time.perf_counter() - t_csv, 1)
    workload_s = time.perf_counter() - t0
    print(f"{workload.num_requests:,} requests ready in {workload_s:.1f} s (RSS {_rss_gib():.2f} GiB)", flush=True)
    t0 = time.perf_counter()
    p = simulator.prepare(workload, model, HardwareConfig(), SchedulerConfig(), profiles_dir=ROOT / "profiles",
                          record_token_times=False, record_iterations=False)
    prepare_s = time.perf_counter() - t0
    rss_prepared = _rss_gib()
    print(f"prepared in {prepare_s:.1f} s (RSS {rss_prepared:.2f} GiB)", flush=True)
    marks = []  # (wall s, finished, RSS GiB) after each stretch

    class Bar(progress.Bar):
        def show(self, now_ns, finished):
            super().show(now_ns, finished)
            marks.append((time.perf_counter() - t0, finished, _rss_gib()))

    t0 = time.perf_counter()
    with Bar(workload.num_requests, delay_s=0.0, desc=kind) as bar:
        final = jax.block_until_ready(simulator.run_prepared(p, bar))
    run_s = time.perf_counter() - t0
    result = simulator.result_of(p, final)
    steps = int(final.steps)
    first_s, first_steps = marks[0][0], min(progress.FIRST_STRETCH, steps)  # the first stretch's steps
    sim_s = float(result.finish_ns.max() - result.arrival_ns.min()) / 1e9
    ttft = (result.first_token_ns - result.arrival_ns) / 1e6
    return dict(kind=kind, requests=workload.num_requests, **extra, workload_s=round(workload_s, 1),
                prepare_s=round(prepare_s, 1), run_s=round(run_s, 1), compile_and_first_stretch_s=round(first_s, 1),
                stretches=len(marks), steps=steps, iterations=int(result.stats["iterations"]),
                us_per_step=round((run_s - first_s) / max(steps - first_steps, 1) * 1e6, 2),
                sim_s=round(sim_s, 1), realtime_factor=round(sim_s / run_s, 1),
                finished=int(final.finished), ttft_ms_p50=round(float(np.median(ttft)), 1),
                ttft_ms_p99=round(float(np.percentile(ttft, 99)), 1),
                state_mib=round(tree_bytes(p.state) / 2**20, 1), workload_mib=round(tree_bytes(p.workload) / 2**20, 1),
                prefix_index_entries=int(p.state.inst.pool.hash_index.shape[-1]),
                rss_prepared_gib=round(rss_prepared, 2), rss_first_stretch_gib=round(marks[0][2], 2),
                rss_last_stretch_gib=round(marks[-1][2], 2),
                peak_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                device=str(jax.devices()[0]))


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
