"""jaxsim: a vectorized, profile-driven simulator of LLM serving, in JAX."""

import jax

# Simulated time is int64 nanoseconds (exact over any horizon); every other array is explicitly
# typed, so enabling x64 changes nothing else.
jax.config.update("jax_enable_x64", True)

from jaxsim.engine.routing import Router  # noqa: E402
from jaxsim.simulator import (prepare, prepare_cluster, run_prepared, simulate, simulate_cluster,  # noqa: E402
                              to_result)
from jaxsim.spec import (Calibration, HardwareConfig, InstanceSpec, ModelRuntimeConfig,  # noqa: E402
                         SchedulerConfig, SimResult, Workload)

__all__ = ["simulate", "simulate_cluster", "prepare", "prepare_cluster", "run_prepared", "to_result", "Router",
           "Calibration", "HardwareConfig", "InstanceSpec", "ModelRuntimeConfig", "SchedulerConfig", "SimResult",
           "Workload"]
