"""Run one simulation from the Hydra config in conf/ and print its summary.

    python scripts/run.py                                  # RTX PRO 6000 + Llama-3.1-8B, ShareGPT 300
    python scripts/run.py scheduler.max_num_seqs=64 hardware=rtxpro6000_tp2
    python scripts/run.py workload=synthetic_poisson workload.rate_rps=5
    python scripts/run.py cluster=pair cluster.routing=round_robin   # two instances, routed
    python scripts/run.py cluster=reference_json cluster.json=my_cluster.json
    python scripts/run.py cluster=pd                                  # prefill/decode disaggregation

Writes requests.parquet (requests.csv without pyarrow), summary.json, timeseries.csv and config.yaml
to the run's output folder (Hydra's outputs/<date>/<time>/ unless output_dir=... is given); see the
`output` section of conf/config.yaml for the ITL lists and the reference simulator's CSV.

A run that takes over 2 s shows a progress bar (finished requests, simulated time; sim.progress).
A trace of 100,000 requests or more runs without per-iteration rows and token times, in memory
that grows with its requests only (``long_trace_options``; README "Long traces").
"""

import logging
import sys
from pathlib import Path

import hydra
import jax
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxsim import config as config_lib  # noqa: E402  (registers the schema)
from jaxsim import compile_cache, metrics, simulator  # noqa: E402
from jaxsim.errors import CapacityOverflowError, JaxsimInputError  # noqa: E402


def simulate_spec(spec: config_lib.RunSpec, check_only: bool = False):
    """Simulate the run a validated config describes; with ``check_only``, stop after every check
    a run makes before it compiles (:func:`jaxsim.simulator.plan_run` / ``plan_cluster``) and
    return the plans (``tests/test_readme.py`` checks the README's commands this way)."""
    options = dict(profiles_dir=spec.paths.profiles, max_slots=spec.sim.max_slots,
                   record_token_times=spec.sim.record_token_times, max_iterations=spec.sim.max_iterations,
                   kv_tier=spec.kv_tier, power=spec.power)
    if spec.cluster is None:
        args = (spec.workload, spec.model_config, spec.hardware, spec.scheduler, spec.model, spec.calibration)
        if check_only:
            return [simulator.plan_run(*args, **options)]
        return simulator.simulate(*args, **{**options, **long_trace_options(spec)}, progress=spec.sim.progress)
    c = spec.cluster
    if check_only:
        return simulator.plan_cluster(spec.workload, spec.model_config, list(c.instances), spec.model, c.links,
                                      c.dp_sync, **options)
    return simulator.simulate_cluster(spec.workload, spec.model_config, list(c.instances), c.router, spec.model,
                                      c.links, c.dp_sync, **{**options, **long_trace_options(spec)},
                                      progress=spec.sim.progress)


# From this many requests a run keeps no per-iteration rows and no token times (unless
# sim.max_iterations sets the rows): with them its memory grows with the trace's iterations and
# tokens (automatic rows for 1,000,000 ShareGPT requests: ~170 M of 116 bytes, ~20 GB; token times:
# 8 bytes a token), without them with its requests only (README "Long traces").
LONG_TRACE = 100_000


def long_trace_options(spec: config_lib.RunSpec, log=lambda m: print(m, file=sys.stderr)) -> dict:
    """The options of a long trace's run (:data:`LONG_TRACE` requests or more, no
    ``sim.max_iterations``, no power meter: it prices the rows): no iteration rows, no token
    times, said on stderr (``log``). {} otherwise."""
    n = spec.workload.num_requests
    if n < LONG_TRACE or spec.sim.max_iterations or spec.power is not None:
        return {}
    log(f"note: a long trace ({n:,} requests): the run keeps no per-iteration rows and no token times, so "
        "its memory grows with its requests only; timeseries.csv and the ITL figures are empty "
        "(set sim.max_iterations=N to keep N iteration rows and token times as sim.record_token_times says)")
    return dict(record_iterations=False, record_token_times=False)


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # "no TPU" notices
    try:
        spec = config_lib.from_hydra(cfg)
        out = Path(spec.output_dir or "outputs/run")
        try:  # before the run, not after it
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise JaxsimInputError("output_dir", f"cannot create {out}: {e.strerror}", "give a writable folder") from None
        if spec.sim.compile_cache:
            compile_cache.enable(spec.sim.compile_cache_dir or None)
        result = simulate_spec(spec)
    except (JaxsimInputError, CapacityOverflowError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (MemoryError, jax.errors.JaxRuntimeError) as e:
        if not isinstance(e, MemoryError) and "RESOURCE_EXHAUSTED" not in str(e) and "Out of memory" not in str(e):
            raise
        print(f"error: out of memory ({str(e).splitlines()[0][:200]}): the run's arrays grow with the trace length, "
              "the number of instances, "
              "sim.max_slots, scheduler.max_num_seqs and max_num_batched_tokens; lower them or use a larger machine",
              file=sys.stderr)
        sys.exit(2)
    imported = spec.workload.import_stats
    summary = metrics.write_outputs(result, out, config_dict=spec.config, model_name=spec.model.name,
                                    extra={"workload_import": imported} if imported else None, options=spec.output)
    print(metrics.format_summary(summary))
    print(f"\noutputs written to {Path(out).resolve()}")


if __name__ == "__main__":
    try:
        config_lib.check_cli_overrides(sys.argv[1:])  # a typo named before Hydra's "use +" advice
    except JaxsimInputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    main()
