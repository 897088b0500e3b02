"""jaxsim: a vectorized, profile-driven simulator of LLM serving, in JAX."""

import jax

# Simulated time is int64 nanoseconds (exact over any horizon); every other array is explicitly
# typed, so enabling x64 changes nothing else.
jax.config.update("jax_enable_x64", True)

from jaxsim.simulator import prepare, run_prepared, simulate, to_result  # noqa: E402
from jaxsim.spec import (Calibration, HardwareConfig, ModelRuntimeConfig, SchedulerConfig,  # noqa: E402
                         SimResult, Workload)

__all__ = ["simulate", "prepare", "run_prepared", "to_result", "Calibration", "HardwareConfig",
           "ModelRuntimeConfig", "SchedulerConfig", "SimResult", "Workload"]
