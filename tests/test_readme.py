"""The README matches the program: every documented ``scripts/run.py`` and ``scripts/sweep.py``
command line composes and passes every check a run makes before simulating, and the documented
output files and columns are the ones written.

Running every documented command would cost a compile each (minutes); everything up to the
simulation is checked instead (Hydra composition, ``config.from_hydra``: workload loading,
model, profiles, cluster; then ``scripts/run.py``'s ``simulate_spec(check_only=True)``: the
profiles, the configurations vLLM refuses at start-up, token ids, requests that can never fit;
for sweeps the axes). A trace the README
names as a file the user downloads (Azure, BurstGPT, ...) is replaced by the excerpt of its format
in ``tests/data/traces``.
"""

import re
import shlex

import pytest
from _shared import CONF, ROOT, TESTS
from hydra import compose, initialize_config_dir
from test_metrics import tiny_result

import run as run_script  # scripts/run.py (tests/conftest.py puts scripts/ on sys.path)
from jaxsim import config as jconfig
from jaxsim.metrics import PD_COLUMNS, REQUEST_COLUMNS, TIMESERIES_COLUMNS, OutputOptions, write_outputs

README = (ROOT / "README.md").read_text()
EXCERPTS = TESTS / "data" / "traces"
# the excerpt standing in for a downloaded trace of each format
STAND_IN = {"azure": "azure_2023_code.csv", "burstgpt": "burstgpt.csv", "mooncake": "mooncake.jsonl",
            "vidur": "vidur.csv", "splitwise": "azure_2023_code.csv"}
# Hydra launcher options (multirun over a cluster scheduler): not part of the run's config.
LAUNCHER = re.compile(r"^(-m|--multirun|hydra/launcher=.*)$")


def _commands(script: str) -> list:
    """The argument lists of the README's ``python scripts/<script>`` lines (comments dropped)."""
    found = []
    text = re.sub(r"\\\n\s*", " ", README)  # continued lines (a trailing backslash) joined
    for m in re.finditer(rf"^\s+(?:.*&& )?python scripts/{script}\b(.*)$", text, flags=re.M):
        found.append(shlex.split(m.group(1), comments=True))
    inline = re.findall(rf"`python scripts/{script}\b([^`]*)`", README)
    return found + [shlex.split(x) for x in inline]


def _overrides(args: list) -> list:
    """A command's overrides as one run: launcher options dropped, a multirun list's first value,
    downloaded traces replaced by their excerpt (a few rows: its time window, if any, dropped)."""
    fmt = next((a.split("=", 1)[1] for a in args if a.startswith("workload.format=")), None)
    stand_in = any(a.startswith("workload.path=") and not (ROOT / a.split("=", 1)[1]).exists() for a in args)
    out = []
    for a in args:
        key, _, value = a.partition("=")
        if LAUNCHER.match(a) or (stand_in and key in ("workload.start", "workload.duration")):
            continue
        if "," in value and not value.startswith("["):  # multirun: a,b
            value = value.split(",")[0]
        if key == "workload.path" and not (ROOT / value).exists():
            assert fmt in STAND_IN, f"README names a trace {value!r} that is neither shipped nor an excerpt format"
            value = str(EXCERPTS / STAND_IN[fmt])
        out.append(f"{key}={value}")
    return out + ["output_dir=/tmp/unused"]


def _spec(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return jconfig.from_hydra(compose(config_name="config", overrides=overrides))


RUNS = _commands("run.py")
SWEEPS = _commands("sweep.py")


def test_readme_documents_commands():
    assert len(RUNS) >= 20 and len(SWEEPS) >= 4  # the parsing found them


@pytest.mark.parametrize("args", RUNS, ids=[" ".join(a) or "(defaults)" for a in RUNS])
def test_run_command_is_valid(args):
    spec = _spec(_overrides(args))
    plans = run_script.simulate_spec(spec, check_only=True)  # every check before the compile
    assert len(plans) == (1 if spec.cluster is None else len(spec.cluster.instances))


@pytest.mark.parametrize("args", SWEEPS, ids=[" ".join(a) for a in SWEEPS])
def test_sweep_command_is_valid(args):
    spec = _spec(_overrides(args))
    opts = jconfig.sweep_options(spec.config.get("sweep"))
    assert len(opts.points()) >= 1


def test_documented_outputs_are_written(tmp_path):
    """The README's table of output files and columns is what ``write_outputs`` writes."""
    section = README[README.index("Each run writes to its output folder"):README.index("From Python (")]
    files = re.findall(r"^\| `([a-z_]+\.[a-z]+)` \|", section, flags=re.M)
    assert files == ["requests.parquet", "summary.json", "timeseries.csv", "config.yaml", "requests_reference.csv"]
    summary = write_outputs(tiny_result(), tmp_path, config_dict={}, model_name="m",
                            options=OutputOptions(reference_csv=True, itl_lists=True))
    assert sorted(summary["outputs"]) == sorted(files)
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([a-z_.]+)` \| (.*) \|$", section, flags=re.M)}
    named = re.findall(r"`([a-z_0-9]+)`", rows["requests.parquet"])
    assert [c for c in named if c in REQUEST_COLUMNS or c in PD_COLUMNS] == [
        *REQUEST_COLUMNS[:-1], *PD_COLUMNS, "itl_ns"]
    named = re.findall(r"`([a-z_]+)`", rows["timeseries.csv"])
    assert [c for c in named if c in TIMESERIES_COLUMNS] == list(TIMESERIES_COLUMNS)
