"""Paths and cached loaders shared by the test files.

Module-level constants (specs, parametrize lists, a sweep base) need the model and the trace at
import time, where pytest fixtures can't reach, so the loaders live here and ``conftest.py``
exposes the same cached objects as session fixtures. ``tests/`` is not a package: pytest puts it
on ``sys.path`` (default "prepend" import mode), so test files ``from _shared import ...``.

The cache is per process (pytest-xdist workers each load once). Loaded objects are shared by
every test of a process: ``ModelConfig`` is frozen, and no test writes into a shared
``Workload`` (slicing and ``shift_workload``/``dataclasses.replace`` make new ones).
"""

import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
SCRIPTS = ROOT / "scripts"
CONF = ROOT / "conf"
PROFILES = ROOT / "profiles"
MODELS = PROFILES / "models"
WORKLOADS = PROFILES / "workloads"
CLUSTERS = PROFILES / "clusters"
LEGACY = PROFILES / "legacy"
CASE = PROFILES / "validation" / "RTXPRO6000-Llama-3.1-8B"  # the shipped validation case
TRACE = WORKLOADS / "sharegpt-llama-3.1-8b-300-sps10.jsonl"  # the default ShareGPT trace
LLAMA = "meta-llama/Llama-3.1-8B"


@functools.cache
def load_model(name: str = LLAMA):
    """``profiles/models/<name>.json`` as a ModelConfig (Llama-3.1-8B by default), loaded once."""
    from jaxsim.model import load_model_config

    return load_model_config(MODELS, name)


@functools.cache
def load_trace(num_requests: int = 0):
    """The default ShareGPT trace (300 requests), or its first ``num_requests``, loaded once."""
    from jaxsim.workload import load_workload

    return load_workload(TRACE, num_requests)


def runtime_for(num_blocks: int, block_size: int = 16, **kw):
    """A ``ModelRuntimeConfig`` whose ``max_model_len`` a KV cache of ``num_blocks`` blocks holds
    (``num_blocks * block_size`` tokens). vLLM refuses a cache smaller than one ``max_model_len``
    request at start-up, and so does jaxsim (``planning.check_kv_holds_context``): the tests' small
    caches (built to force preemption, eviction or a stall) keep their meaning with this context."""
    from jaxsim.spec import ModelRuntimeConfig

    return ModelRuntimeConfig(max_model_len=num_blocks * block_size, **kw)
