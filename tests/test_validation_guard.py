"""Regression guard (issue 12, part 5): the development cases re-simulated must stay within 0.5
percentage points of the figures the README states (tests/data/validation_figures.json, written
by ``python scripts/validation_figures.py --write``, which also prints the README table).

The three cases the engine costs are fitted on run in the fast suite; the five time-series cases
(one compile each, ~15 s) run with ``python -m pytest -m slow``.
"""

import json

import pytest

import validation_figures as vf
from _shared import ROOT

FAST = ("RTXPRO6000-Llama-3.1-8B", "RTX4090-Llama-3.1-8B", "A6000-Llama-3.1-8B-pulse-SD+PC")
STORED = json.loads(vf.FIGURES.read_text())
TOLERANCE_PP = 0.5


def _check(case, tmp_path) -> dict:
    """Run ``scripts/validate.py CASE --json`` (the CLI a user runs) and compare its figures."""
    import validate

    out = tmp_path / "cmp.json"
    assert validate.main([str(vf.CASES / case), "--json", str(out), "--no-compile-cache"]) == 0
    comparison = json.loads(out.read_text())
    assert comparison["case"] == case
    got, want = vf.figures(comparison), STORED[case]
    assert set(got) == set(want), "figures appeared or vanished: regenerate with scripts/validation_figures.py"
    drift = {k: (want[k], got[k]) for k in want if abs(got[k] - want[k]) > TOLERANCE_PP}
    assert not drift, f"{case}: figures drifted more than {TOLERANCE_PP} pp (stored, now): {drift}"
    return comparison


@pytest.mark.parametrize("case", FAST)
def test_fitted_case_has_not_drifted(case, tmp_path):
    _check(case, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(set(STORED) - set(FAST)))
def test_time_series_case_has_not_drifted(case, tmp_path):
    _check(case, tmp_path)


def test_readme_states_the_stored_figures():
    """The README's validation table is the one the stored figures give (to 0.1)."""
    readme = (ROOT / "README.md").read_text()
    table = vf.readme_table(STORED)
    assert table in readme, "README's validation figures are stale: paste scripts/validation_figures.py's table"
    assert set(STORED) == {p.parent.parent.name for p in vf.CASES.glob("*/vllm/meta.json")}  # every case


@pytest.mark.slow
def test_noise_floor_of_a_simulation_scored_against_itself():
    """scripts/noise_floor.py: a run scored against itself (in the measurement's place) scores 0 on
    every figure; moving the tick boundaries by 0.3 s changes the bursty power case's generation
    series (its pulses straddle the ticks), a microsecond per iteration barely does."""
    import noise_floor as nf

    case = vf.CASES / "A6000-Llama-3.1-8B-power-TP1"
    base = nf.validate.evaluate(case, nf.PROFILES, nf.PROFILES / "models", nf.PROFILES / "workloads")
    measured = nf.as_measurement(base, base.series)
    itself = nf.score(measured, base.table, base.series)
    assert itself and all(v == 0 for v in itself.values())
    floors = nf.floor(case, [1.0], 0.3)
    assert 0 < floors["shift"]["ts_gen_throughput"] and floors["perturb"]["ts_gen_throughput"] < 1.0
