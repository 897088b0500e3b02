"""Shared test setup: the command-line scripts on ``sys.path`` and session fixtures for the
objects most test files load (the paths and the loaders behind them are in ``_shared.py``, so
module-level constants can use them too).

pytest imports this file before any test module of ``tests/``, having put ``tests/`` on
``sys.path`` (so ``reference_sim``, ``reference_latency`` and ``_shared`` import directly).
"""

import os
import sys

# The suite's cost is XLA compile time (each engine variant and shape compiles once per worker),
# not run time (small shapes): LLVM's backend optimisations cut it by ~1/6 and change no result
# (no fast-math: float semantics are the same). Set before JAX creates its CPU backend; inherited
# by the CLI and notebook subprocesses. Benchmarks and users keep the default.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

# The CLIs turn JAX's persistent compilation cache on (jaxsim/compile_cache.py); tests that drive
# them must not write into the user's cache folder (nor time their compiles against it).
os.environ.setdefault("JAXSIM_COMPILE_CACHE", "0")

import pytest  # noqa: E402

from _shared import SCRIPTS, load_model, load_trace  # noqa: E402

# scripts/validate.py, run.py, ... import as top-level modules in the tests that drive the CLIs.
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))


# pytest-xdist's loadfile hands whole files to idle workers in collection order, so a long file
# collected last leaves the other worker idle: the files that compile the most run first (their
# seconds in one suite run, `--durations=0` summed per file: sweep 198, cluster 150, engine 145,
# disagg 82, pipeline 67, leap 58, validation_guard ~55, vllm_scheduler ~50, sweep_hydra 55,
# notebooks 55, engine_interfaces 41; the rest under 32 each, in name order). Tests within a file
# keep their order.
HEAVY_FIRST = ("test_sweep.py", "test_cluster.py", "test_engine.py", "test_disagg.py", "test_pipeline.py",
               "test_leap.py", "test_validation_guard.py", "test_vllm_scheduler.py", "test_sweep_hydra.py",
               "test_notebooks.py", "test_engine_interfaces.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def llama():
    """The Llama-3.1-8B ModelConfig (profiles/models)."""
    return load_model()


@pytest.fixture(scope="session")
def sharegpt():
    """The default ShareGPT workload: all 300 requests of profiles/workloads/sharegpt-...jsonl."""
    return load_trace()


@pytest.fixture(scope="session")
def sharegpt16():
    """The first 16 requests of the default ShareGPT trace (the small cluster/pipeline/sweep trace)."""
    return load_trace(16)
