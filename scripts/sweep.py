"""Run a batched sweep from the Hydra config in conf/: every point of ``sweep.axes`` in one
compiled, vmapped call (``jaxsim.sweep``), then a results table, plots and a summary.

    python scripts/sweep.py sweep=load                       # 6 loads x 4 seat limits, SLO goodput
    python scripts/sweep.py sweep=capacity                   # KV blocks x token budget heat map
    python scripts/sweep.py sweep=whatif hardware=rtxpro6000_tp2   # compute x memory x link scales
    python scripts/sweep.py sweep=hardware                   # TP 1 vs TP 2 over load
    python scripts/sweep.py sweep=seeds workload=synthetic_poisson # seed variance (needs a generator)

Axes on the command line (``++`` adds a knob or replaces its values; ``~`` drops one):

    python scripts/sweep.py '++sweep.axes.max_num_seqs=[64,128,256]' \\
        '++sweep.axes.arrival_rate_scale=[0.5,1,2]'
    python scripts/sweep.py sweep=load '~sweep.axes.max_num_seqs' sweep.slo.ttft_ms=500

Knobs are those of ``jaxsim.sweep.KNOBS`` (scheduler limits, KV capacity and block size, TP
degree, link bandwidth, what-if scales, load, seed, and ``hardware`` = options of the hardware
group); points that differ only in knobs share one compiled program (``block_size`` and the
number of requests are shapes: one compile per value). Everything else (the base hardware,
model, scheduler, workload, calibration, sim) comes from the composed config, as in
``scripts/run.py``.

Choices that are not knobs (model, workload file, a hardware option with another model's profiles,
calibration, ...) go through Hydra multirun, one batched sweep (and table) per job:

    python scripts/sweep.py -m sweep=load hardware=rtxpro6000,rtx4090
    python scripts/sweep.py -m sweep=load model=llama3_8b,qwen3_32b hardware=rtxpro6000_tp2

Jobs run one after another in this process (Hydra's basic launcher; same-shaped jobs reuse the
compiled program). A Hydra launcher plugin spreads them instead: over local processes with
hydra-joblib-launcher (in the ``test`` extra; ``tests/test_launcher.py`` checks its tables against
plain runs), over a SLURM cluster with ``pip install hydra-submitit-launcher`` (one job per
allocation; not a dependency of jaxsim):

    python scripts/sweep.py -m hydra/launcher=joblib hydra.launcher.n_jobs=2 \\
        sweep=load hardware=rtxpro6000,rtx4090
    python scripts/sweep.py -m hydra/launcher=submitit_slurm hydra.launcher.partition=gpu \\
        hydra.launcher.gpus_per_node=1 hydra.launcher.timeout_min=60 \\
        sweep=load model=llama3_8b,qwen3_32b hardware=rtxpro6000_tp2

One sweep over several processes or hosts (``jaxsim.distributed``; the same command everywhere,
each process with its id; process 0 writes the outputs):

    python scripts/sweep.py sweep=load distributed.num_processes=2 distributed.process_id=0 \
        distributed.coordinator=10.0.0.1:12355      # and process_id=1 on the other host
    srun python scripts/sweep.py sweep=load distributed.auto=true     # SLURM sets the rest

A long sweep checkpoints its finished chunks (``jaxsim.checkpoint``); killed, the same command
resumes it, skipping what is done:

    python scripts/sweep.py sweep=load sweep.checkpoint=ckpt/load

Writes to the run's output folder (``outputs/<date>/<time>/``, in multirun
``multirun/<date>/<time>/<job>/``, or ``output_dir=...``): the table (``sweep.table``, default
``sweep.csv``; ``.parquet`` needs pyarrow), the plots of ``jaxsim.report.default_plots`` (unless
``sweep.plots=false``), ``sweep.json`` (``n_configs``, ``num_groups``, ``wall_s``, ``sim_s``,
``aggregate_realtime_factor``, ``axes``, ``choices``, ``restored_from_checkpoint``, ``processes``,
...) and the resolved ``config.yaml``.
"""

import collections
import hashlib
import json
import logging
import sys
from pathlib import Path

import hydra
import yaml
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxsim import config as config_lib  # noqa: E402  (registers the schema)
from jaxsim import compile_cache, report  # noqa: E402
from jaxsim import distributed as distributed_lib  # noqa: E402
from jaxsim import sweep as sweep_lib  # noqa: E402
from jaxsim.checkpoint import SweepCheckpoint  # noqa: E402
from jaxsim.errors import CapacityOverflowError, JaxsimInputError  # noqa: E402


def run_sweep(cfg: DictConfig, out_dir: str | Path | None = None, echo: bool = True) -> dict:
    """Run the sweep of a composed config and write its outputs; return the summary.

    ``out_dir`` defaults to Hydra's run folder (``output_dir``), else ``outputs/sweep``. The
    returned dict is the content of ``sweep.json`` plus ``rows`` (the table) and ``out_dir``.
    Raises :class:`JaxsimInputError` for bad config values, naming the key.

    With ``distributed.num_processes`` > 1 (or ``distributed.auto``), this process joins the
    process group first; every process runs its share of each chunk, and process 0 alone writes
    the outputs and the checkpoint (the others return the summary with ``"written": False``).
    """
    dist = distributed_lib.distributed_options(config_lib.to_container(cfg).get("distributed"))
    distributed_lib.initialize(dist)  # before anything touches a device
    pid, nproc = distributed_lib.process()
    spec = config_lib.from_hydra(cfg)
    if spec.sim.compile_cache:
        compile_cache.enable(spec.sim.compile_cache_dir or None)
    opts = config_lib.sweep_options(spec.config.get("sweep"))
    base = config_lib.sweep_base(spec, opts)
    points = opts.points()
    out = Path(out_dir or spec.output_dir or "outputs/sweep")
    name = fingerprint(spec.config, points)
    if not distributed_lib.same_everywhere(name):
        raise JaxsimInputError("distributed", f"the {nproc} processes were not given the same sweep (this one: "
                               f"{len(points)} points, fingerprint {name!r})",
                               "start every process with the same command, only process_id differing")
    ckpt = SweepCheckpoint(opts.checkpoint, name, len(points), writer=pid == 0) if opts.checkpoint else None
    result = sweep_lib.sweep(base, points, chunk_size=opts.chunk_size, progress=opts.progress, checkpoint=ckpt)
    rows = result.rows
    if pid != 0:  # process 0 writes the table
        return {"n_configs": len(rows), "process": pid, "processes": nproc, "written": False}

    out.mkdir(parents=True, exist_ok=True)
    table = report.write_table(rows, out / opts.table)
    plots = (report.default_plots(rows, out, knobs=list(opts.axes), slo=opts.slo)
             if opts.plots else [])
    choices = dict(spec.choices)
    summary = {
        "n_configs": len(rows),
        "num_groups": result.num_groups,
        "wall_s": result.wall_s,
        "sim_s": result.sim_s,
        "aggregate_realtime_factor": result.sim_s / result.wall_s if result.wall_s > 0 else None,
        "axes": opts.axes,
        "chunk_size": opts.chunk_size,
        "choices": choices,
        "slo": opts.slo,
        "status": dict(collections.Counter(r["status"] for r in rows)),
        "restored_from_checkpoint": result.restored,
        "processes": nproc,
        "table": str(table),
        "plots": [str(p) for p in plots],
    }
    (out / "sweep.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "config.yaml").write_text(yaml.safe_dump(spec.config, sort_keys=False))

    if echo:
        key = "goodput_rps" if opts.slo else "output_tok_s"
        print(f"best by {key}:")
        print(report.format_table(report.best_rows(rows, key=key)))
        print(summary_line(summary, out))
    return {**summary, "rows": rows, "out_dir": str(out)}


def fingerprint(config: dict, points: list) -> str:
    """A name of the sweep for its checkpoint: the configuration and the points, without what
    does not change a row (where outputs go, progress, plots, the table format, chunking, the
    process layout)."""
    keep = {k: v for k, v in config.items() if k not in ("output_dir", "distributed", "hydra", "output")}
    keep["sweep"] = {k: v for k, v in (config.get("sweep") or {}).items()
                     if k not in ("progress", "plots", "table", "checkpoint", "chunk_size")}
    text = json.dumps([keep, points], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def summary_line(summary: dict, out: Path) -> str:
    rf = summary["aggregate_realtime_factor"]
    line = (f"{summary['n_configs']} configurations in {summary['num_groups']} compiled group(s): "
            f"{summary['wall_s']:.1f} s wall for {summary['sim_s']:.1f} simulated s")
    if rf is not None:
        line += f" ({rf:.0f}x real time)"
    if summary.get("restored_from_checkpoint"):  # (their simulated time is not in this run's)
        line += f"; {summary['restored_from_checkpoint']} configurations restored from the checkpoint"
    bad = {k: v for k, v in summary["status"].items() if k != "ok"}
    if bad:
        line += f"; NOT OK: {bad} (see the status column)"
    return line + f"; outputs in {Path(out).resolve()}"


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # "no TPU" notices
    try:
        run_sweep(cfg)
    except (JaxsimInputError, CapacityOverflowError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    try:
        config_lib.check_cli_overrides(sys.argv[1:])  # a typo named before Hydra's "use +" advice
    except JaxsimInputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    main()
