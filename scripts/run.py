"""Run one simulation from the Hydra config in conf/ and print its summary.

    python scripts/run.py                                  # RTX PRO 6000 + Llama-3.1-8B, ShareGPT 300
    python scripts/run.py scheduler.max_num_seqs=64 hardware=rtxpro6000_tp2
    python scripts/run.py workload=synthetic_poisson workload.rate_rps=5
    python scripts/run.py cluster=pair cluster.routing=round_robin   # two instances, routed
    python scripts/run.py cluster=reference_json cluster.json=my_cluster.json
    python scripts/run.py cluster=pd                                  # prefill/decode disaggregation

Writes requests.csv, summary.json, timeseries.csv and config.yaml to the run's output folder
(Hydra's outputs/<date>/<time>/ unless output_dir=... is given).
"""

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxsim import config as config_lib  # noqa: E402  (registers the schema)
from jaxsim import metrics, simulator  # noqa: E402
from jaxsim.errors import CapacityOverflowError, JaxsimInputError  # noqa: E402


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # "no TPU" notices
    try:
        spec = config_lib.from_hydra(cfg)
        options = dict(profiles_dir=spec.paths.profiles, max_slots=spec.sim.max_slots,
                       record_token_times=spec.sim.record_token_times, max_iterations=spec.sim.max_iterations)
        if spec.cluster is None:
            result = simulator.simulate(spec.workload, spec.model_config, spec.hardware, spec.scheduler, spec.model,
                                        spec.calibration, **options)
        else:
            result = simulator.simulate_cluster(spec.workload, spec.model_config, list(spec.cluster.instances),
                                                spec.cluster.router, spec.model, spec.cluster.links,
                                                spec.cluster.dp_sync, **options)
    except (JaxsimInputError, CapacityOverflowError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    out = spec.output_dir or "outputs/run"
    imported = spec.workload.import_stats
    summary = metrics.write_outputs(result, out, config_dict=spec.config, model_name=spec.model.name,
                                    extra={"workload_import": imported} if imported else None)
    print(metrics.format_summary(summary))
    print(f"\noutputs written to {Path(out).resolve()}")


if __name__ == "__main__":
    main()
