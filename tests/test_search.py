"""Gradient-based design search (jaxsim.search): the antithetic stencil and its gradient, common random
numbers in a step's batch, stochastic rounding, the smoothed SLO attainment by hand, the augmented
Lagrangian, the trust region on a fake evaluator (host only, no simulation), and, in the slow set,
problem A in miniature against an exhaustive grid (one compile for the whole search).
"""

import math
import time

import numpy as np
import pytest

from jaxsim import search as S
from jaxsim.errors import JaxsimInputError
from jaxsim.spec import Workload


def _sig(z):
    return 1.0 / (1.0 + math.exp(-z))


# --- stencil ------------------------------------------------------------------------------------


def test_stencil_rows_are_antithetic_pairs():
    u = np.array([0.4, 0.7])
    d = np.array([[1.0, -2.0], [0.5, 0.25]])
    st = S.stencil(u, d, 0.1)
    np.testing.assert_allclose(st, [[0.5, 0.5], [0.3, 0.9], [0.45, 0.725], [0.35, 0.675]])


def test_antithetic_difference_is_exact_for_a_quadratic_at_any_radius():
    # f = c.u + u'Au: (f(u+rd) - f(u-rd)) / 2r = c.d + 2 u'A d, no r left: the radius only smooths
    # what is rougher than quadratic.
    c, A = np.array([1.0, -3.0, 0.5]), np.array([[2.0, 0.3, 0.0], [0.3, 1.0, -0.4], [0.0, -0.4, 0.5]])
    f = lambda x: c @ x + x @ A @ x  # noqa: E731
    u = np.array([0.2, 0.5, 0.9])
    d = S.directions(np.random.default_rng(1), 4, 3, "gaussian")
    grads = []
    for r in (0.01, 0.3):
        st = S.stencil(u, d, r)
        grads.append(S.stencil_gradient([f(x) for x in st[0::2]], [f(x) for x in st[1::2]], d, r))
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-10)
    true = c + 2 * A @ u
    np.testing.assert_allclose(grads[0], ((d @ true)[:, None] * d).mean(axis=0), rtol=1e-10)
    # Rademacher directions in one dimension (SPSA): the exact derivative from one pair
    d1 = S.directions(np.random.default_rng(0), 1, 1, "rademacher")
    assert abs(d1[0, 0]) == 1
    st = S.stencil([0.3], d1, 0.05)
    g = S.stencil_gradient([st[0, 0] ** 2], [st[1, 0] ** 2], d1, 0.05)
    assert g[0] == pytest.approx(0.6, rel=1e-12)


def test_stencil_gradient_drops_a_pair_with_a_failed_run():
    d = np.array([[1.0], [-1.0]])
    g = S.stencil_gradient([2.0, math.inf], [1.0, 0.0], d, 0.5)
    assert g[0] == pytest.approx(1.0)  # the first pair only: (2 - 1) / 1 * 1
    assert S.stencil_gradient([math.nan], [1.0], d[:1], 0.5)[0] == 0.0


def test_stochastic_rounding_is_unbiased_and_pairs_share_draws():
    xi = np.random.default_rng(3).random(200_000)
    r = S.stochastic_round(np.full(xi.size, 3.3), xi)
    assert set(np.unique(r)) == {3, 4}
    assert r.mean() == pytest.approx(3.3, abs=0.005)  # std of the mean: 0.46 / sqrt(2e5) = 0.001
    assert S.stochastic_round(-1.25, 0.7) == -1 and S.stochastic_round(-1.25, 0.8) == -2  # frac(-1.25) = 0.75
    # The same draw for both points of a pair: rounding never reverses their order (independent
    # draws would, for about a third of these close pairs).
    x = np.random.default_rng(4).uniform(0, 50, 5000)
    dx = np.random.default_rng(5).uniform(0, 0.6, 5000)
    assert np.all(S.stochastic_round(x + dx, xi[:5000]) >= S.stochastic_round(x - dx, xi[:5000]))


SPACE = S.Space((S.Variable("peak_tflops", 100, 1000), S.Variable("max_num_seqs", 8, 64, "integer")))


def test_batch_pairs_share_seed_and_rounding_and_keep_one_size():
    sizes = set()
    for step, u in enumerate(([0.5, 0.5], [0.0, 1.0], [0.93, 0.11])):
        rng = np.random.default_rng(step)
        dirs = S.directions(rng, 3, 2)
        state = rng.bit_generator.state
        b = S.make_batch(SPACE, np.array(u), dirs, 0.05, (7, 9), rng)
        rng.bit_generator.state = state
        xi = rng.random((3, 2, 2))  # the draws make_batch took, pair k, seed j
        sizes.add(len(b.points))
        st = S.stencil(u, dirs, 0.05)
        for i, s in zip(b.exact, (7, 9)):
            assert b.points[i] == {**SPACE.decode(u), "seed": s}
            assert b.points[i]["max_num_seqs"] == int(np.floor(8 + np.clip(u[1], 0, 1) * 56 + 0.5))
        for k in range(3):
            for j, s in enumerate((7, 9)):
                p, m = b.points[b.plus[k][j]], b.points[b.minus[k][j]]
                assert p["seed"] == m["seed"] == s
                assert p == {**SPACE.decode(st[2 * k], xi[k, j]), "seed": s}
                assert m == {**SPACE.decode(st[2 * k + 1], xi[k, j]), "seed": s}
        # max_num_seqs changes the seats (array sizes): the anchor at the upper bounds fixes them
        assert b.points[b.anchor] == {"peak_tflops": 1000.0, "max_num_seqs": 64, "seed": 7}
    assert sizes == {2 * (2 * 3 + 1) + 1}
    cont = S.Space((S.Variable("peak_tflops", 100, 1000), S.Variable("mem_bw_gbs", 500, 3500)))
    assert not cont.needs_anchor
    assert S.make_batch(cont, np.array([0.5, 0.5]), np.ones((2, 2)), 0.1, (0,), np.random.default_rng(0)).anchor is None


def test_bad_variables_are_refused_with_the_field():
    with pytest.raises(JaxsimInputError, match="search.variables.peak_tflop: not a numeric sweep knob"):
        S.Space((S.Variable("peak_tflop", 1, 2),))
    with pytest.raises(JaxsimInputError, match="integer lo and step >= 1"):
        S.Variable("max_num_batched_tokens", 256, 8192, "integer", step=0.5)
    with pytest.raises(JaxsimInputError, match="lo < hi"):
        S.Variable("peak_tflops", 2, 1)
    with pytest.raises(JaxsimInputError, match="kind"):
        S.Variable("max_num_seqs", 1, 2, "ordinal")
    with pytest.raises(JaxsimInputError, match="appears twice"):
        S.Space((S.Variable("peak_tflops", 1, 2), S.Variable("peak_tflops", 1, 3)))
    with pytest.raises(JaxsimInputError, match="'<=' or '>='"):
        S.Constraint("tpot_p99_ms", "<", 1.0)


# --- metrics ------------------------------------------------------------------------------------


def test_soft_attainment_by_hand():
    ttft = np.array([100.0, 600.0, 500.0, np.nan])
    tpot = np.array([10.0, 20.0, 30.0, np.nan])
    done = np.array([True, True, True, False])
    p = S.soft_attainment(ttft, tpot, done, 500.0, 30.0, 0.1)
    want = [_sig(0.8 / 0.1) * _sig((20 / 30) / 0.1), _sig(-0.2 / 0.1) * _sig((10 / 30) / 0.1), 0.5 * 0.5, 0.0]
    np.testing.assert_allclose(p, want, rtol=1e-12)
    # only a TPOT SLO: the TTFT is no factor; a small temperature tends to the hard indicator
    np.testing.assert_allclose(S.soft_attainment(ttft, tpot, done, None, 30.0, 1e-4), [1, 1, 0.5, 0], atol=1e-12)
    with pytest.raises(JaxsimInputError, match="temperature"):
        S.soft_attainment(ttft, tpot, done, 500.0, 30.0, 0.0)


def _hand_workload():
    # 4 requests arriving at 0, 1, 2, 3 s; 1, 11, 5, 3 output tokens
    return Workload(arrival_ns=np.array([0, 1, 2, 3], np.int64) * 10**9, input_toks=np.full(4, 100, np.int32),
                    output_toks=np.array([1, 11, 5, 3], np.int32), token_ids=[None] * 4)


def test_request_metrics_and_pooling_by_hand():
    w = _hand_workload()
    ms = 10**6
    req = {"first_token": np.array([200, 1300, 2100, -1]) * ms + np.array([0, 0, 0, 0]),
           "finish": np.array([200, 1300 + 10 * 50, 2100 + 4 * 20, -1]) * ms,
           "arrival": np.zeros(4, np.int64)}
    req["first_token"][3] = -1
    req["finish"][3] = -1
    m = S.request_metrics(w, req, slo_ttft_ms=250.0, slo_tpot_ms=30.0, temperature=0.1)
    np.testing.assert_allclose(m["ttft_ms"][:3], [200, 300, 100])
    np.testing.assert_allclose(m["tpot_ms"][:3], [0, 50, 20])  # one token: TPOT 0 (config_metrics' rule)
    assert np.isnan(m["ttft_ms"][3]) and not m["done"][3]
    np.testing.assert_array_equal(m["ok"], [True, False, True, False])
    assert m["makespan_s"] == pytest.approx(2.18)  # first arrival (0) to the last finish (2.18 s)
    assert m["throughput_rps"] == pytest.approx(3 / 2.18)
    assert m["goodput_rps"] == pytest.approx(2 / 2.18)
    soft = [_sig(0.2 / 0.1) * _sig(1 / 0.1), _sig(-0.2 / 0.1) * _sig((-20 / 30) / 0.1),
            _sig(0.6 / 0.1) * _sig((10 / 30) / 0.1), 0.0]
    np.testing.assert_allclose(m["soft"], soft, rtol=1e-12)
    assert m["soft_goodput_rps"] == pytest.approx(sum(soft) / 2.18)
    # pooled over two seeds: a design with an unfinished request has an infinite P99
    done_all = dict(m, done=np.ones(4, bool), ttft_ms=np.array([1.0, 2, 3, 4]), tpot_ms=np.array([5.0, 6, 7, 8]))
    pooled = S.pool_metrics([done_all, dict(done_all, ttft_ms=np.array([5.0, 6, 7, 8]))])
    assert pooled["ttft_p50_ms"] == pytest.approx(np.percentile([1, 2, 3, 4, 5, 6, 7, 8], 50))
    assert pooled["tpot_p99_ms"] == pytest.approx(np.percentile([5, 6, 7, 8] * 2, 99))
    assert pooled["slo_attainment"] == 0.5 and pooled["goodput_rps"] == pytest.approx(2 / 2.18)
    assert S.pool_metrics([m, done_all])["tpot_p99_ms"] == math.inf


def test_constraint_violation_and_augmented_lagrangian_by_hand():
    c = S.Constraint("tpot_p99_ms", "<=", 25.0)
    assert c.violation({"tpot_p99_ms": 30.0}) == pytest.approx(0.2)
    assert S.Constraint("slo_attainment", ">=", 0.9).violation({"slo_attainment": 0.99}) == pytest.approx(-0.1)
    assert c.violation({"tpot_p99_ms": math.inf}) == math.inf
    with pytest.raises(JaxsimInputError, match="unknown metric"):
        S.Constraint("tpot_p98_ms", "<=", 1.0).violation({"tpot_p99_ms": 1.0})
    assert S.merit(1.0, [0.1], None, 100.0) == pytest.approx(1.5)  # 1 + 50 * 0.1^2
    assert S.merit(1.0, [0.1], [2.0], 100.0) == pytest.approx(1 + 50 * 0.12 ** 2 - 4 / 200)
    assert S.merit(1.0, [-0.5], [2.0], 100.0) == pytest.approx(1 - 4 / 200)  # inactive: -lam^2/2mu
    assert S.merit(1.0, [math.inf], None, 100.0) == math.inf


# --- trust region -------------------------------------------------------------------------------


def test_trust_region_accept_reject_and_radius():
    tr = S.TrustRegion(radius=0.2, shrink=0.5, grow=1.5, eta_good=0.5, max_radius=0.25)
    assert not tr.decide(1.0, 1.0, 0.1, 0.08)  # no decrease: reject, radius = 0.5 * the step
    assert tr.radius == pytest.approx(0.04)
    assert not tr.decide(1.0, math.inf, 0.1, 0.04)
    assert tr.radius == pytest.approx(0.02)
    assert tr.decide(1.0, 0.99, 0.1, 0.02) and tr.radius == pytest.approx(0.02)  # 10% of the prediction: keep
    assert tr.decide(1.0, 0.9, 0.1, 0.02) and tr.radius == pytest.approx(0.03)  # as predicted: grow
    np.testing.assert_allclose(tr.clip(np.array([0.06, -0.015])), [0.03, -0.0075])
    np.testing.assert_allclose(tr.clip(np.array([0.01, 0.0])), [0.01, 0.0])


class FakeEvaluator:
    """Per-request arrays from a closed form of the point: every request's TPOT is
    ``10 + 40 (1 - x)^2`` ms (x = peak_tflops / 1000), so ``tpot <= 20`` means x >= 1 - 0.5."""

    def __init__(self):
        self.sizes = []

    def __call__(self, points):
        self.sizes.append(len(points))
        out = []
        for p in points:
            x = p["peak_tflops"] / 1000
            n = 8
            tpot = np.full(n, 10 + 40 * (1 - x) ** 2)
            out.append(dict(ttft_ms=np.full(n, 100.0), tpot_ms=tpot, done=np.ones(n, bool), ok=tpot <= 20,
                            soft=np.ones(n), throughput_rps=1.0, goodput_rps=1.0, soft_goodput_rps=1.0,
                            output_tok_s=1.0, status="ok"))
        return out


def test_smoothed_gradient_in_one_call():
    space = S.Space((S.Variable("peak_tflops", 0, 1000),))
    prob = S.Problem(space, S.linear_cost({"peak_tflops": 1.0}), (S.Constraint("tpot_p99_ms", "<=", 20.0),))
    ev = FakeEvaluator()
    # feasible with margin at u = 0.9 (TPOT 10.4 ms): the merit is the cost, linear, so each pair
    # gives 1000 d_k^2 exactly
    g, center, batch = S.smoothed_gradient(ev, prob, np.array([0.9]), (0, 1), radius=0.02, num_directions=3,
                                           rng=np.random.default_rng(2))
    assert ev.sizes == [2 * (2 * 3 + 1)]
    assert g[0] == pytest.approx(1000 * np.mean(batch.dirs[:, 0] ** 2), rel=1e-9)
    assert center.values == {"peak_tflops": 900.0} and center.feasible
    # infeasible at u = 0.3 (TPOT 29.6 ms): the penalty's slope (more FLOP/s, less TPOT) dominates
    g, center, _ = S.smoothed_gradient(ev, prob, np.array([0.3]), (0,), radius=0.02, num_directions=2,
                                       rng=np.random.default_rng(2), mu=100.0, scale=1000.0)
    assert not center.feasible and center.violations[0] == pytest.approx((29.6 - 20) / 20)
    assert g[0] < 0


def test_search_on_a_fake_evaluator_accepts_only_improvements():
    space = S.Space((S.Variable("peak_tflops", 0, 1000),))
    prob = S.Problem(space, S.linear_cost({"peak_tflops": 1.0}), (S.Constraint("tpot_p99_ms", "<=", 20.0),))
    for method in ("projection", "lagrangian"):
        ev = FakeEvaluator()
        # a large learning rate: the candidates overshoot into the infeasible side and get rejected
        res = S.search(ev, prob, {"peak_tflops": 950}, seeds=(0, 1), steps=14, num_directions=2, radius=0.02,
                       optimizer="sgd", learning_rate=0.3, mu=1000.0, constraints=method)
        assert set(ev.sizes) == {2 * (2 * 2 + 1)} and len(ev.sizes) == 14 and res.evaluations == 14 * 10
        exact = [e for e in res.trajectory if e["kind"] == "exact"]
        incumbent, rejected = exact[0], 0
        assert incumbent["feasible"]
        for e in exact[1:]:  # the feasibility rule: from a feasible incumbent, only cheaper feasible designs
            if e["accepted"]:
                assert e["feasible"] and e["objective"] < incumbent["objective"]
                incumbent = e
            else:
                rejected += 1
                assert not e["feasible"] or e["objective"] >= incumbent["objective"]
        assert rejected >= 1, method
        # the optimum is x = 0.5 (cost 500); the best feasible point found is close above it
        assert res.best.values["peak_tflops"] >= 500 - 1e-6 and res.best.objective < 560, method
        assert res.best.metrics["tpot_p99_ms"] <= 20.0


def test_projected_step_by_hand():
    # one constraint g + G s <= 0 with g = -0.1, G = (1, 0): an update (0.3, 0.2) would end at +0.2, so
    # it is projected onto g + G s = 0: s = (0.1, 0.2) (the tangential part kept)
    np.testing.assert_allclose(S.projected_step([0.3, 0.2], [-0.1], [[1.0, 0.0]]), [0.1, 0.2])
    # an update that keeps the constraint satisfied is unchanged
    np.testing.assert_allclose(S.projected_step([-0.3, 0.2], [-0.1], [[1.0, 0.0]]), [-0.3, 0.2])
    # a violated constraint (g = 0.2) is restored even by a zero update: s = -g G / |G|^2
    np.testing.assert_allclose(S.projected_step([0.0, 0.0], [0.2], [[1.0, 1.0]]), [-0.1, -0.1])
    # two active constraints: both linearisations end at 0
    s = S.projected_step([0.5, 0.5], [0.0, -0.1], [[1.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(s, [0.0, 0.1])


def test_orthogonal_directions_give_the_exact_gradient_of_a_linear_function():
    rng = np.random.default_rng(0)
    d = S.directions(rng, 3, 3, "orthogonal")
    np.testing.assert_allclose(d @ d.T, 3 * np.eye(3), atol=1e-12)  # orthogonal rows of length sqrt(D)
    w = np.array([1.0, -2.0, 0.5])
    f = lambda u: float(w @ u)  # noqa: E731
    st = S.stencil(np.zeros(3), d, 0.1)
    g = S.stencil_gradient([f(st[2 * k]) for k in range(3)], [f(st[2 * k + 1]) for k in range(3)], d, 0.1)
    np.testing.assert_allclose(g, w, atol=1e-12)
    assert S.directions(rng, 5, 2, "orthogonal").shape == (5, 2)  # more directions than D: new matrices


def test_integer_lattice_grid_and_polish():
    space = S.Space((S.Variable("max_num_seqs", 8, 60, "integer", step=16),
                     S.Variable("compute_scale", 0.5, 1.5)))
    assert space.variables[0].levels == 4  # 8, 24, 40, 56
    assert space.decode([1.0, 0.0]) == {"max_num_seqs": 56, "compute_scale": 0.5}
    assert space.decode([0.3, 0.0])["max_num_seqs"] == 24  # 8 + 0.3 * 52 = 23.6 -> lattice point 24
    assert len(space.grid(3)) == 4 * 3 and space.grid(3)[-1] == {"max_num_seqs": 56, "compute_scale": 1.5}

    class Quad:  # objective (seats - 40)^2 through a fake metric; no constraint
        calls = 0

        def __call__(self, points):
            Quad.calls += 1
            return [dict(ttft_ms=np.ones(1), tpot_ms=np.ones(1), done=np.ones(1, bool), ok=np.ones(1, bool),
                         soft=np.ones(1), throughput_rps=float((p["max_num_seqs"] - 40) ** 2), goodput_rps=1.0,
                         soft_goodput_rps=1.0, output_tok_s=1.0, status="ok") for p in points]

    prob = S.Problem(space, S.metric_objective("throughput_rps"))
    start = S.evaluate_design(Quad(), prob, {"max_num_seqs": 8, "compute_scale": 1.0}, (0,), 5)
    best, evaluated, sims, calls = S.polish(Quad(), prob, start, (0,), 5, max_rounds=5)
    assert best.values["max_num_seqs"] == 40 and best.objective == 0.0
    # rounds: from 8 {24} -> from 24 {40} -> from 40 {56}: no better, stop (4 points fit one call each)
    assert [e.values["max_num_seqs"] for e in evaluated] == [24, 40, 56] and (sims, calls) == (15, 3)


def test_polish_crosses_arms_and_reuses_known_designs():
    # a categorical choice (hardware a / b) as a polish neighbour: the objective (seats - 40)^2 + 100 on
    # "a" is only minimised (0) at 40 seats on "b", a design no integer step from the start (8, "a") reaches
    space = S.Space((S.Variable("max_num_seqs", 8, 60, "integer", step=16),), choices={"hardware": ("a", "b")})

    class Fake:
        def __call__(self, points):
            return [dict(ttft_ms=np.ones(1), tpot_ms=np.ones(1), done=np.ones(1, bool), ok=np.ones(1, bool),
                         soft=np.ones(1), throughput_rps=float((p["max_num_seqs"] - 40) ** 2
                                                               + (100 if p["hardware"] == "a" else 0)),
                         goodput_rps=1.0, soft_goodput_rps=1.0, output_tok_s=1.0, status="ok") for p in points]

    arm_a = S.Problem(space.arms()[0], S.metric_objective("throughput_rps"))
    start = S.evaluate_design(Fake(), arm_a, {"max_num_seqs": 8, "hardware": "a"}, (0,), 5)
    assert start.objective == 32 ** 2 + 100
    best, evaluated, sims, calls = S.polish(Fake(), arm_a, start, (0,), 5, max_rounds=6, choices=space.choices)
    assert (best.values, best.objective) == ({"hardware": "b", "max_num_seqs": 40}, 0.0)
    # rounds: {24a 356, 8b 1024} -> 24a; {40a 100, 24b 256} -> 40a; {56a 356, 40b 0} -> 40b; {56b 256}: stop
    assert [(e.values["max_num_seqs"], e.values["hardware"]) for e in evaluated] == [
        (24, "a"), (8, "b"), (40, "a"), (24, "b"), (56, "a"), (40, "b"), (56, "b")] and calls == 4
    # designs already evaluated are not simulated again, and still chosen
    known = {S._key(e.values): e for e in evaluated if e.values["hardware"] == "b"}
    best2, evaluated2, _, calls2 = S.polish(Fake(), arm_a, start, (0,), 5, max_rounds=6, choices=space.choices,
                                            known=known)
    assert best2.values == best.values and all(e.values["hardware"] == "a" for e in evaluated2) and calls2 == 3


def test_polish_restores_feasibility_along_whole_lattice_lines():
    # TPOT meets its 20 ms bound only at 56 seats: from 8 seats, the next lattice point (24) is no
    # less infeasible, so one-step moves would stop; restoration scans the whole line, then descends
    space = S.Space((S.Variable("max_num_seqs", 8, 60, "integer", step=16),))

    class Fake:
        def __call__(self, points):
            return [dict(ttft_ms=np.ones(4), tpot_ms=np.full(4, 10.0 if p["max_num_seqs"] == 56 else 30.0),
                         done=np.ones(4, bool), ok=np.ones(4, bool), soft=np.ones(4), throughput_rps=1.0,
                         goodput_rps=1.0, soft_goodput_rps=1.0, output_tok_s=1.0, status="ok") for p in points]

    prob = S.Problem(space, S.linear_cost({"max_num_seqs": 1.0}), (S.Constraint("tpot_p99_ms", "<=", 20.0),))
    start = S.evaluate_design(Fake(), prob, {"max_num_seqs": 8}, (0,), 5)
    assert not start.feasible
    best, evaluated, _, calls = S.polish(Fake(), prob, start, (0,), 5, max_rounds=4)
    assert best.values == {"max_num_seqs": 56} and best.feasible and best.objective == 56
    # round 1 (infeasible): the line {24, 40, 56}; round 2 (feasible): 40 was seen, 72 is off the box
    assert [e.values["max_num_seqs"] for e in evaluated] == [24, 40, 56] and calls == 1


def test_design_search_enumerates_a_small_integer_space():
    # 4 seat limits x 2 hardware = 8 designs on 2 seeds (16 simulations) cost less than 4 search steps
    # of 7 points per arm: every design is evaluated, then guarded as the search would be
    space = S.Space((S.Variable("max_num_seqs", 8, 60, "integer", step=16),), choices={"hardware": ("a", "b")})

    class Fake:
        sizes = []

        def __call__(self, points):
            Fake.sizes.append(len(points))
            return [dict(ttft_ms=np.ones(4), done=np.ones(4, bool), ok=np.ones(4, bool), soft=np.ones(4),
                         tpot_ms=np.full(4, 40 - p["max_num_seqs"] / 2 + (5 if p["hardware"] == "a" else 0)
                                         + (1.0 if p["seed"] % 2 else -1.0)),
                         throughput_rps=1.0, goodput_rps=1.0, soft_goodput_rps=1.0, output_tok_s=1.0, status="ok")
                    for p in points]

    prob = S.Problem(space, S.linear_cost({"max_num_seqs": 1.0}), (S.Constraint("tpot_p99_ms", "<=", 25.0),))
    r = S.design_search(Fake(), prob, {"max_num_seqs": 56}, (0, 1), steps=4, num_directions=1)
    # TPOT P99 (seeds 0 and 1 pooled): b 40 -> 21 ms, b 24 -> 29, a 56 -> 18, a 40 -> 26: (40, b) is cheapest
    assert r.best.values == {"hardware": "b", "max_num_seqs": 40} and r.best.feasible
    (c,) = r.problem.constraints
    assert 0 < c.margin < 0.15 and r.best.metrics["tpot_p99_ms"] <= c.target
    assert len(r.rows) == 8 and {row["phase"] for row in r.rows} == {"grid"} and r.trajectory == []
    assert [row["accepted"] for row in r.rows].count(True) == 1
    # 16 points in calls of 7 (6 + the anchor): 3 calls; the two noise measurements: 1 call each
    assert Fake.sizes == [7] * 5 and (r.calls, r.evaluations) == (5, 35)


# --- problem A in miniature ---------------------------------------------------------------------


@pytest.mark.slow  # ~100 s on 2 cores (two compiles: the search's batch and the grid's)
def test_problem_a_in_miniature_against_the_grid():
    import sys
    from jaxsim import sweep
    from jaxsim.engine import cluster
    from jaxsim.spec import HardwareConfig, SchedulerConfig
    from jaxsim.workload import synthetic_workload
    from _shared import PROFILES, load_model

    syn = dict(num_requests=48, rate_rps=8.0, input_len={"kind": "uniform", "min": 200, "max": 800},
               output_len={"kind": "uniform", "min": 32, "max": 128})
    hw = HardwareConfig(name="spec/h100", mem_size_gb=80, link_bw_gbps=450, link_latency_ns=10000)
    base = sweep.SweepBase(synthetic_workload(**syn, seed=0), load_model(), hw, SchedulerConfig(max_num_seqs=32),
                           profiles_dir=PROFILES, synthetic=syn, slo_tpot_ms=25)
    space = S.Space((S.Variable("peak_tflops", 100, 1000), S.Variable("mem_bw_gbs", 500, 3500)))
    prob = S.Problem(space, S.linear_cost({"peak_tflops": 1.0, "mem_bw_gbs": 0.25}),
                     (S.Constraint("tpot_p99_ms", "<=", 25.0),))
    seeds = (0, 1)
    ev = S.SweepEvaluator(base)
    c0, t0 = cluster.run_batch._cache_size(), time.perf_counter()
    res = S.search(ev, prob, {"peak_tflops": 800, "mem_bw_gbs": 3000}, seeds, steps=12, num_directions=2,
                   radius=0.05, learning_rate=0.08)
    search_wall, search_compiles = time.perf_counter() - t0, cluster.run_batch._cache_size() - c0

    c0, t0 = cluster.run_batch._cache_size(), time.perf_counter()
    g = np.linspace(0, 1, 9)
    designs = [space.decode([a, b]) for a in g for b in g]
    out = ev([{**p, "seed": s} for p in designs for s in seeds])  # the 9x9 grid in one call
    grid = [S._evaluation(prob, None, p, out[len(seeds) * i:len(seeds) * (i + 1)]) for i, p in enumerate(designs)]
    grid_best = min((e for e in grid if e.feasible), key=lambda e: e.objective)
    grid_wall, grid_compiles = time.perf_counter() - t0, cluster.run_batch._cache_size() - c0
    gap = 100 * (res.best.objective / grid_best.objective - 1)
    print(f"\nproblem A mini: search {res.best.values} cost {res.best.objective:.1f} tpot_p99 "
          f"{res.best.metrics['tpot_p99_ms']:.2f} ms, {res.evaluations} sims, {res.calls} calls, "
          f"{search_compiles} compiles, {search_wall:.1f} s | grid {grid_best.values} cost {grid_best.objective:.1f}, "
          f"{len(out)} sims, {grid_compiles} compiles, {grid_wall:.1f} s | gap {gap:+.2f}%", file=sys.stderr)
    assert search_compiles <= 1  # one batch shape for the whole search (0 when already compiled)
    assert res.best.metrics["tpot_p99_ms"] <= 25.0
    assert gap <= 2.0
    assert res.evaluations < len(out)


def test_design_search_guards_the_constraint_by_the_measured_noise():
    """design_search on a fake evaluator whose TPOT has seed noise: phase 1, the noise measured at the
    design reached (resampled groups of the search's seed count), the guard band, phase 2, polish."""
    class Noisy(FakeEvaluator):
        def __call__(self, points):
            out = super().__call__(points)
            for p, m in zip(points, out):  # +-1 ms per seed, deterministic
                m["tpot_ms"] = m["tpot_ms"] + (1.0 if p["seed"] % 2 else -1.0)
            return out

    space = S.Space((S.Variable("peak_tflops", 0, 1000),))
    prob = S.Problem(space, S.linear_cost({"peak_tflops": 1.0}), (S.Constraint("tpot_p99_ms", "<=", 20.0),))
    ev = Noisy()
    r = S.design_search(ev, prob, {"peak_tflops": 950}, (0, 1), steps=8, num_directions=1, radius=0.02,
                        noise_seeds=range(10, 16), z=1.645, learning_rate=0.3)
    (c,) = r.problem.constraints
    std = r.noise["tpot_p99_ms"]["std"]
    assert std > 0 and c.margin == pytest.approx(1.645 * np.sqrt(2) * std / 20.0)
    assert r.best.feasible and r.best.metrics["tpot_p99_ms"] <= c.target < 20.0
    assert set(ev.sizes) == {2 * 3} and r.evaluations == 6 * len(ev.sizes) and r.calls == len(ev.sizes)
    assert [row["phase"] for row in r.rows][:4] == [1, 1, 1, 1] and r.rows[4]["phase"] == 2
    # no constraint: no noise measurement, nothing guarded
    ev2 = FakeEvaluator()
    r2 = S.design_search(ev2, S.Problem(space, S.metric_objective("tpot_p99_ms")), {"peak_tflops": 500}, (0,),
                         steps=4, num_directions=1, radius=0.02)
    assert r2.noise == {} and r2.calls == 4 and r2.best.values["peak_tflops"] > 500


def test_cluster_counts_design():
    from jaxsim.designs import ClusterCounts
    from jaxsim.spec import HardwareConfig

    class Base:
        cluster_options = {}

    base = Base()
    d = ClusterCounts(base, {"a": HardwareConfig(name="A"), "b": HardwareConfig(name="B")})
    assert d.layouts == ("colocated", "a_prefill", "b_prefill")
    assert d({"a": 0, "b": 0, "roles": "colocated"}) is None  # no instance
    assert d({"a": 2, "b": 0, "roles": "a_prefill"}) is None  # no decode instance
    p = d({"a": 1, "b": 2, "roles": "a_prefill"})
    insts = base.cluster_options[p["cluster"]]
    assert [(i.hw.name, i.role, i.node) for i in insts] == [("A", "prefill", 0), ("B", "decode", 1), ("B", "decode", 1)]
    assert [i.role for i in base.cluster_options[d({"a": 1, "b": 1, "roles": "colocated"})["cluster"]]] == ["colocated"] * 2
    space = S.Space((S.Variable("a", 0, 2, "integer"), S.Variable("b", 0, 3, "integer")), design=d,
                    choices={"roles": ("colocated", "b_prefill")})
    assert space.needs_anchor and len(space.arms()) == 2 and len(space.grid(2)) == 2 * 3 * 4
    assert space.arms()[1].anchor() == {"cluster": "2xa+3xb|b_prefill"}
    assert space.sweep_point({"a": 0, "b": 0, "roles": "colocated"}, 7) == {"invalid": True, "seed": 7}


def test_per_gpu_and_energy_metrics_pool():
    one = dict(ttft_ms=np.ones(2), tpot_ms=np.ones(2), done=np.ones(2, bool), ok=np.ones(2, bool), soft=np.ones(2),
               throughput_rps=1.0, goodput_rps=1.0, soft_goodput_rps=1.0, output_tok_s=300.0, gpus=4,
               energy_j=100.0, j_per_output_token=0.5)
    two = {**one, "output_tok_s": 500.0, "energy_j": 300.0, "j_per_output_token": 1.5}
    m = S.pool_metrics([one, two])
    assert (m["gpus"], m["output_tok_s_per_gpu"], m["energy_j"], m["j_per_output_token"]) == (4.0, 100.0, 200.0, 1.0)
    bare = {k: v for k, v in one.items() if k not in ("gpus", "energy_j", "j_per_output_token")}
    assert math.isnan(S.pool_metrics([bare])["output_tok_s_per_gpu"]) and math.isnan(S.pool_metrics([bare])["energy_j"])
