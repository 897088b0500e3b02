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
