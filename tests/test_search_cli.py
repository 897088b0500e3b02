"""scripts/search.py and the ``search`` config group: composition and validation of every shipped
problem (host only, no simulation), the errors that name a key, and in the slow set one end-to-end
run of the shipped problem with very few steps."""

import csv
import importlib.util
import json
import math

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from jaxsim import config as jconfig
from jaxsim.errors import JaxsimInputError

from jaxsim import search as S
from _shared import CONF, SCRIPTS

PROBLEMS = sorted(p.stem for p in (CONF / "search").glob("*.yaml"))


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("jaxsim_search_script", SCRIPTS / "search.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # registers search_config in Hydra's ConfigStore
    return mod


def section(script, overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("search_config", overrides=list(overrides))
    return jconfig.to_container(cfg)


def test_shipped_problems_compose_and_validate(script):
    assert PROBLEMS == ["accelerator_sizing", "cheapest_cluster", "engine_knobs", "none"]
    d = section(script, ["search=accelerator_sizing"])
    assert (d["hardware"]["name"], d["hardware"]["mem_size_gb"]) == ("spec/h100", 80.0)
    assert d["workload"]["kind"] == "synthetic"
    assert (d["workload"]["num_requests"], d["scheduler"]["max_num_seqs"]) == (160, 32)
    o = script.search_options(d["search"])
    space = o.problem.space
    assert [(v.name, v.lo, v.hi, v.kind) for v in space.variables] == [
        ("peak_tflops", 100.0, 1000.0, "continuous"), ("mem_bw_gbs", 500.0, 3500.0, "continuous")]
    assert not space.needs_anchor  # value-only knobs: one batch shape, no anchor point
    assert S.batch_size(space, len(o.seeds), o.directions) == 3 * (2 * 2 + 1)
    # the cost is the linear price of the knobs: 800 TFLOP/s * 1 + 3000 GB/s * 0.25 = 1550
    assert o.problem.objective(o.start, {}) == pytest.approx(1550.0)
    c0, c = o.problem.constraints
    assert (c0.metric, c0.bound, c.metric, c.sense, c.bound) == ("ttft_p99_ms", 300.0, "tpot_p99_ms", "<=", 25.0)
    assert c.violation({"tpot_p99_ms": 30.0}) == pytest.approx(0.2) and c.margin == 0.0
    assert (o.seeds, o.heldout_seeds, o.slo_tpot_ms) == ((0, 1, 2), (100, 101, 102), 25.0)
    assert (o.direction_kind, o.guard_z, o.constraints_method) == ("orthogonal", 1.645, "projection")
    # problem B: ordered integers on a lattice; the gradient follows the smoothed goodput
    ob = script.search_options(section(script, ["search=engine_knobs"])["search"])
    v = {x.name: x for x in ob.problem.space.variables}
    assert (v["max_num_batched_tokens"].step, v["max_num_batched_tokens"].levels) == (512, 8)
    assert ob.problem.space.needs_anchor and ob.objective_desc["gradient_of"] == "soft_goodput_rps"
    assert ob.problem.surrogate({}, {"soft_goodput_rps": 2.5}) == -2.5
    # problem C: instance counts through the cluster_counts design, the roles enumerated
    oc = script.search_options(section(script, ["search=cheapest_cluster"])["search"])
    assert oc.design == "cluster_counts" and [a.fixed for a in oc.problem.space.arms()] == [
        {"roles": "colocated"}, {"roles": "rtxpro6000_prefill"}, {"roles": "rtx4090_prefill"}]
    # command-line overrides reach the section; a missing x0 starts mid-box
    o2 = script.search_options(section(script, ["search=accelerator_sizing", "search.steps=3",
                                                "~search.x0.mem_bw_gbs", "search.objective.metric=output_tok_s",
                                                "search.objective.sense=maximize"])["search"])
    assert o2.steps == 3 and o2.start == {"peak_tflops": 800.0, "mem_bw_gbs": 2000.0}
    assert o2.objective_desc == {"metric": "output_tok_s", "sense": "maximize"}
    assert o2.problem.objective({}, {"output_tok_s": 7.0}) == -7.0
    # the default problem is none: refused, with the fix
    with pytest.raises(JaxsimInputError, match=r"search.variables: no decision variables .*search=accelerator_sizing"):
        script.search_options(section(script)["search"])


def _problem(**changes):
    d = {"variables": {"peak_tflops": {"lo": 100, "hi": 1000}},
         "objective": {"metric": "cost", "prices": {"peak_tflops": 1.0}},
         "constraints": {"tpot_p99_ms": "<= 25"}}
    d.update(changes)
    return d


@pytest.mark.parametrize("changes, match", [
    ({"step": 3}, r"^search.step: unknown field \(did you mean 'steps'\?"),
    ({"variables": {"peak_tflops": {"lo": 100, "hii": 1000}}}, r"^search.variables.peak_tflops.hii: unknown field"),
    ({"objective": {"metric": "cost", "price": {}}}, r"^search.objective.price: unknown field \(did you mean 'prices'"),
    ({"objective": {"metric": "tpot_p99"}}, r"^search.objective.metric: unknown metric 'tpot_p99'"),
    ({"objective": {"metric": "output_tok_s", "sense": "max"}}, r"^search.objective.sense: must be 'minimize' or"),
    ({"constraints": {"tpot_p99": "<= 25"}},
     r"^search.constraints.tpot_p99: unknown metric 'tpot_p99' \(did you mean 'tpot_p99_ms'"),
    ({"constraints": {"tpot_p99_ms": "< 25"}}, r"^search.constraints.tpot_p99_ms: must be '<= bound' or '>= bound'"),
    ({"variables": {"max_num_seq": {"lo": 1, "hi": 8}}}, r"^search.variables.max_num_seq: not a numeric sweep knob"),
    ({"objective": {"prices": {"mem_bw_gbs": 1.0}}}, r"^search.objective.prices.mem_bw_gbs: not a decision variable"),
    ({"x0": {"peak_tflops": 5000}}, r"^search.x0.peak_tflops: 5000.0 is outside the bounds \[100.0, 1000.0\]"),
    ({"seeds": [0, 1], "heldout_seeds": [1, 2]}, r"^search.heldout_seeds: \[1\] are also search seeds"),
    ({"radius": 0}, r"^search.radius: must be > 0"),
    ({"steps": 2.5}, r"^search.steps: must be an integer"),
    ({"design": "clusters"}, r"^search.design: unknown design 'clusters'"),
    ({"choices": {"tp": [1, 2]}}, r"^search.choices.tp: not a categorical knob"),
    ({"direction_kind": "sobol"}, r"^search.direction_kind: must be one of \('gaussian', 'rademacher', 'orthogonal'\)"),
    ({"variables": {"max_num_seqs": {"lo": 8, "hi": 64, "kind": "integer", "step": 0}}},
     r"^search.variables.max_num_seqs.step: must be >= 1"),
])
def test_bad_sections_name_the_key(script, changes, match):
    with pytest.raises(JaxsimInputError, match=match):
        script.search_options(_problem(**changes))


def test_bad_bound_and_unknown_key_through_hydra(script):
    d = section(script, ["search=accelerator_sizing", "search.variables.peak_tflops.lo=2000"])
    with pytest.raises(JaxsimInputError, match=r"^search.variables.peak_tflops: bounds must be finite with lo < hi, "
                                               r"got \[2000.0, 1000.0\]"):
        script.search_options(d["search"])
    d = section(script, ["search=accelerator_sizing", "+search.learning_rat=0.1"])
    with pytest.raises(JaxsimInputError, match=r"^search.learning_rat: unknown field \(did you mean 'learning_rate'"):
        script.search_options(d["search"])
    # on the command line, before Hydra: a search key, and a run key (jaxsim.config's check)
    with pytest.raises(JaxsimInputError, match=r"^search.step: unknown field \(did you mean 'steps'"):
        script.check_cli_overrides(["search=accelerator_sizing", "search.step=3"])
    with pytest.raises(JaxsimInputError, match=r"^scheduler.max_num_seq: unknown field"):
        script.check_cli_overrides(["search=accelerator_sizing", "scheduler.max_num_seq=3"])
    script.check_cli_overrides(["search=accelerator_sizing", "search.steps=3", "hardware=roofline_h100", "-m"])


def test_padded_evaluation_keeps_the_batch_shape(script):
    """The held-out re-simulation runs in calls of the search's batch size (no new compile)."""
    from jaxsim import search as S

    calls = []

    def fake(points):
        calls.append(points)
        return [p["seed"] for p in points]

    space = S.Space((S.Variable("peak_tflops", 100, 1000),))
    pts = [{"peak_tflops": 500.0, "seed": s} for s in (10, 11, 12, 13, 14, 15, 16)]
    assert S.evaluate_fixed_size(fake, space, pts, 5) == [10, 11, 12, 13, 14, 15, 16]
    assert [len(c) for c in calls] == [5, 5]
    assert [p["seed"] for p in calls[1]] == [15, 16, 15, 15, 15]
    calls.clear()
    ispace = S.Space((S.Variable("max_num_seqs", 4, 64, "integer"),))  # sizes change: an anchor per call
    assert S.evaluate_fixed_size(fake, ispace, [{"max_num_seqs": 8, "seed": 3}], 4) == [3]
    assert calls == [[{"max_num_seqs": 8, "seed": 3}] * 3 + [{"max_num_seqs": 64, "seed": 3}]]


@pytest.mark.slow  # ~60 s on 2 cores (one compile: search, noise measurement and held-out calls share it)
def test_end_to_end_accelerator_sizing(script, tmp_path):
    from jaxsim.engine import cluster
    overrides = ["search=accelerator_sizing", "search.steps=4", "workload.num_requests=48",
                 "sim.progress=false", "sim.compile_cache=false", f"output_dir={tmp_path}"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("search_config", overrides=overrides)
    c0 = cluster.run_batch._cache_size()
    out = script.run_search(cfg, out_dir=tmp_path, echo=False)
    assert cluster.run_batch._cache_size() - c0 <= 1  # one batch shape for everything
    names = sorted(p.name for p in tmp_path.iterdir())
    assert {"trajectory.csv", "best.json", "config.yaml"} <= set(names)
    pytest.importorskip("matplotlib")
    assert (tmp_path / "search.png").stat().st_size > 10_000

    rows = list(csv.DictReader(open(tmp_path / "trajectory.csv")))
    assert [(r["phase"], int(r["step"])) for r in rows] == [("1", 0), ("1", 1), ("2", 2), ("2", 3)]
    # 15 points per call (3 seeds x (2 x 2 + 1)); the noise measurement (one call) comes before phase 2
    assert [int(r["simulations"]) for r in rows] == [15, 30, 60, 75]
    assert rows[0]["accepted"] == "True"
    assert (float(rows[0]["peak_tflops"]), float(rows[0]["mem_bw_gbs"])) == (800.0, 3000.0)  # x0
    best = json.loads((tmp_path / "best.json").read_text())
    guard = best["guard_band"]
    for r in rows:  # the objective is the price of the knobs; feasibility is judged with the guard band
        assert float(r["objective"]) == pytest.approx(float(r["peak_tflops"]) + 0.25 * float(r["mem_bw_gbs"]))
        assert (r["feasible"] == "True") == all(float(r[m]) <= g["target"] for m, g in guard.items())
    for m, bound in (("ttft_p99_ms", 300.0), ("tpot_p99_ms", 25.0)):
        g = guard[m]
        assert g["noise_std"] > 0 and g["margin"] == pytest.approx(1.645 * math.sqrt(2) * g["noise_std"] / bound)
        assert g["target"] == pytest.approx(bound * (1 - g["margin"]))

    assert best == {k: v for k, v in out.items() if k not in ("out_dir", "files")} | {"wall_s": best["wall_s"]}
    # + the noise measured again at the answer (one more call)
    assert (best["evaluations"], best["calls"], best["points_per_call"]) == (90, 6, 15)
    assert best["heldout_evaluations"] == 15  # the 3 held-out seeds padded to one 15-point call
    assert best["heldout"]["seeds"] == [100, 101, 102]
    feas = [r for r in rows if r["feasible"] == "True"]
    assert feas, "the start (800 TFLOP/s, 3000 GB/s) is feasible"
    assert best["best"]["objective"] == pytest.approx(min(float(r["objective"]) for r in feas))
    held = best["heldout"]
    assert held["feasible"] == (held["metrics"]["tpot_p99_ms"] <= 25.0 and held["metrics"]["ttft_p99_ms"] <= 300.0
                                and held["metrics"]["finished_fraction"] == 1)
    assert held["metrics"]["tpot_p99_ms"] != best["best"]["metrics"]["tpot_p99_ms"]  # other traces
    assert 0 < best["search_wall_s"] <= best["wall_s"] and math.isfinite(best["wall_s"])


def test_bench_grid_and_gap_on_a_fake_evaluator(script):
    """scripts/search_bench.py's grid: every lattice design on every seed, in equal calls; the gap."""
    spec = importlib.util.spec_from_file_location("jaxsim_search_bench", SCRIPTS / "search_bench.py")
    sb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sb)
    sizes = []

    def fake(points):
        sizes.append(len(points))
        return [dict(ttft_ms=np.ones(1), tpot_ms=np.full(1, 40.0 - p["max_num_seqs"]), done=np.ones(1, bool),
                     ok=np.ones(1, bool), soft=np.ones(1), throughput_rps=1.0, goodput_rps=1.0,
                     soft_goodput_rps=1.0, output_tok_s=1.0, status="ok") for p in points]

    space = S.Space((S.Variable("max_num_seqs", 4, 28, "integer", step=8),))  # 4, 12, 20, 28
    prob = S.Problem(space, S.linear_cost({"max_num_seqs": 1.0}), (S.Constraint("tpot_p99_ms", "<=", 25.0),))
    g, sims, _ = sb.grid(fake, prob, (0, 1, 2), levels=2, chunk=5)
    assert [v["max_num_seqs"] for v, _ in g] == [4, 12, 20, 28] and sims == 12 and sizes == [4, 4, 4]
    best = sb._best(e for _, e in g)
    assert best.values == {"max_num_seqs": 20} and best.metrics["tpot_p99_ms"] == 20.0  # 40 - 20 <= 25
    assert sb._gap(21.0, 20.0) == pytest.approx(5.0) and sb._gap(-1.7, -2.0) == pytest.approx(15.0)
