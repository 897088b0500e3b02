"""Shared test setup: the command-line scripts on ``sys.path`` and session fixtures for the
objects most test files load (the paths and the loaders behind them are in ``_shared.py``, so
module-level constants can use them too).

pytest imports this file before any test module of ``tests/``, having put ``tests/`` on
``sys.path`` (so ``reference_sim``, ``reference_latency`` and ``_shared`` import directly).
"""

import sys

import pytest

from _shared import SCRIPTS, load_model, load_trace

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
