"""Routing policies behind one interface (engine/routers/, engine/routing.choose): the contract of
every registered policy, power-of-two-choices by hand, the registry, the config path, and one
small power_of_two cluster run.

Compile budget: one jit of ``choose`` per registered policy (small), and one 2-instance cluster
loop (~15 s on CPU). The rest is eager on 3-5 instances.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsim import simulator
from jaxsim.engine import routers, routing
from jaxsim.engine.routers import base
from jaxsim.errors import JaxsimInputError
from jaxsim.spec import HardwareConfig, InstanceSpec, SchedulerConfig

from _shared import PROFILES, runtime_for
from test_config import spec  # Hydra compose + from_hydra

N_INST = 5
# The small instance of the cluster tests (tests/test_cluster.py), with KV for the 16 requests of
# sharegpt16 on one instance, so that nothing is preempted (the replay below needs that).
PRO = InstanceSpec(HardwareConfig(num_gpu_blocks=2000), SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=1024))


def _score(f):
    """A score for the policies that take one (custom): fewest running, then most cached."""
    return 8 * f["running"] - f["cached_blocks"]


def _router(name, seed=7):
    """``Router(name)`` with the parameters the policy takes (routers.params)."""
    kw = {"seed": seed}
    if "score_fn" in routers.params(name):
        kw["score_fn"] = _score
    return routing.Router(name, **kw)


def _features(n=N_INST, **kw):
    """A ``routing._features`` dict by hand: ``int32[n]`` per key (all zero, max_num_seqs 4)."""
    f = dict(waiting=[0] * n, running=[0] * n, free_blocks=[0] * n, num_blocks=[64] * n, max_num_seqs=[4] * n)
    f.update(kw)
    return {k: jnp.asarray(v, jnp.int32) for k, v in f.items()}


def _random_inputs(rng, n=N_INST):
    """One random routing situation: features, counter, pos, cached blocks, prompt, routable (>= 1)."""
    f = _features(n, waiting=rng.integers(0, 12, n), running=rng.integers(0, 8, n),
                  free_blocks=rng.integers(0, 64, n), max_num_seqs=rng.choice([0, 2, 4, 8], n))
    routable = rng.random(n) < 0.6
    routable[rng.integers(n)] = True
    return (f, jnp.int32(rng.integers(0, 3 * n)), jnp.int32(rng.integers(0, 10_000)),
            jnp.asarray(rng.integers(0, 5, n), jnp.int32), jnp.int32(rng.integers(1, 2000)), jnp.asarray(routable))


@pytest.mark.parametrize("name", routers.names())
def test_every_policy_keeps_the_contract(name):
    """Any registered policy: an int32 scalar instance that is routable, an int32 scalar counter,
    the same answer for the same inputs (eager and jitted), over 50 random situations."""
    router = _router(name)
    jitted = jax.jit(functools.partial(routing.choose, router))
    rng = np.random.default_rng(0)
    for draw in range(50):
        args = _random_inputs(rng)
        best, counter = jitted(*args)
        for x in (best, counter):
            assert isinstance(x, jax.Array) and x.shape == () and x.dtype == jnp.int32, (draw, x)
        assert bool(args[-1][best]), f"draw {draw}: non-routable instance {int(best)}"
        again = jitted(*args)
        assert (int(again[0]), int(again[1])) == (int(best), int(counter))
        if draw < 3:  # eager (as traced inside the loop) == jitted
            eager = routing.choose(router, *args)
            assert (int(eager[0]), int(eager[1])) == (int(best), int(counter))
    # routable=None: every instance may be chosen.
    best, _ = routing.choose(router, _features(), jnp.int32(0), jnp.int32(0), jnp.zeros(N_INST, jnp.int32),
                             jnp.int32(100))
    assert 0 <= int(best) < N_INST


@pytest.mark.parametrize("name", routers.names())
def test_every_policy_picks_the_only_routable_instance(name):
    """All instances but one non-routable (padding, or the other P/D role): every policy picks it,
    even when it is the most loaded, fullest and coldest."""
    router = _router(name)
    rng = np.random.default_rng(1)
    for k in range(N_INST):
        for _ in range(3):
            f, counter, pos, cached, prompt, _ = _random_inputs(rng)
            f = {**f, "waiting": f["waiting"].at[k].set(50), "free_blocks": f["free_blocks"].at[k].set(0)}
            cached = cached.at[k].set(0)
            best, _ = routing.choose(router, f, counter, pos, cached, prompt, jnp.arange(N_INST) == k)
            assert int(best) == k


def _two_samples(seed, pos, routable):
    """The two instances power_of_two draws: the same jax.random calls as routers/power_of_two.py."""
    idx = np.flatnonzero(np.asarray(routable))
    m = len(idx)
    key_a, key_b = jax.random.split(jax.random.fold_in(jax.random.key(seed), pos))
    a = int(jax.random.randint(key_a, (), 0, m, dtype=jnp.int32))
    b = int(jax.random.randint(key_b, (), 0, max(m - 1, 1), dtype=jnp.int32))
    b += b >= a
    return idx[a], idx[b]


def test_power_of_two_by_hand():
    """The less loaded of the two draws wins; the first drawn on ties; the counter stays."""
    seed, n = 11, 4
    routable = np.array([True, False, True, True])  # instance 1 is padding
    router = routing.Router("power_of_two", seed)
    zeros = jnp.zeros(n, jnp.int32)
    seen = set()
    for pos in range(40):
        first, second = _two_samples(seed, pos, routable)
        assert first != second and routable[first] and routable[second]
        seen.add((first, second))

        def pick(waiting, running=(0,) * n, max_num_seqs=(4,) * n):
            f = _features(n, waiting=waiting, running=running, max_num_seqs=max_num_seqs)
            best, counter = routing.choose(router, f, jnp.int32(3), jnp.int32(pos), zeros, jnp.int32(9),
                                           jnp.asarray(routable))
            assert int(counter) == 3
            return int(best)

        w = np.zeros(n, int)
        assert pick(w) == first  # tie: the first drawn
        w[second] = 1
        assert pick(w) == first  # LOAD 4/4 vs 0
        w[:] = 0
        w[first] = 1
        assert pick(w) == second
        # The vLLM score: (4 * 1 + 0) / 8 = 0.5 on the first beats (4 * 0 + 3) / 4 = 0.75 on the second.
        w[:] = 0
        w[first], run, seqs = 1, np.zeros(n, int), np.full(n, 4)
        run[second], seqs[first] = 3, 8
        assert pick(w, run, seqs) == first
        # The unlimited cap (0) compares the raw score: 4 > 3 / 4.
        seqs[first] = 0
        assert pick(w, run, seqs) == second
    # Uniform over ordered pairs of distinct routable instances: 40 draws reach all 6.
    assert seen == {(a, b) for a in (0, 2, 3) for b in (0, 2, 3) if a != b}


def test_power_of_two_never_picks_the_most_loaded():
    """Whatever the draws, the strictly most loaded of >= 2 routable instances never wins, and
    the least loaded wins whenever it is drawn, in 2/m of the pairs."""
    router = routing.Router("power_of_two", 3)
    f = _features(waiting=[4, 0, 2, 9, 1])  # instance 3 the most, 1 the least loaded
    picks = [int(routing.choose(router, f, jnp.int32(0), jnp.int32(p), jnp.zeros(N_INST, jnp.int32),
                                jnp.int32(9))[0]) for p in range(200)]
    assert 3 not in picks
    assert 0.25 < picks.count(1) / 200 < 0.55  # 2/5 = 0.4


def test_registry():
    assert routing.POLICIES == routers.names()
    assert routers.names()[:6] == ("round_robin", "random", "least_loaded", "kv_aware", "prefix_affinity", "custom")
    assert "power_of_two" in routers.names()
    assert routers.get("power_of_two").__name__ == "PowerOfTwo"
    assert routers.params("power_of_two") == ("seed",) and routers.params("custom") == ("score_fn",)
    assert [n for n in routers.names() if routers.get(n).needs_prefix_lookup] == ["prefix_affinity", "custom"]
    assert routers.build(routing.Router("power_of_two", 5)).seed == 5
    with pytest.raises(ValueError, match="policy 'nearest'"):
        routers.get("nearest")
    with pytest.raises(TypeError):
        routers.register("bad", object)
    with pytest.raises(ValueError, match="already registered"):
        routers.register("random", routers.get("least_loaded"))
    # Router stays a hashable static description.
    assert hash(routing.Router("power_of_two", 1)) == hash(routing.Router("power_of_two", 1))
    with pytest.raises(ValueError, match="score_fn needs routing policy 'custom'"):
        routing.Router("power_of_two", score_fn=_score)


def test_a_policy_registered_from_outside(monkeypatch):
    """A policy written outside jaxsim: subclass, register, route by name."""
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))  # undone after the test

    class MostRunning(base.AbstractScoringPolicy):
        def scores(self, features, cached_blocks, prompt):
            return -features["running"]

    routers.register("most_running", MostRunning)
    f = _features(running=[1, 5, 2, 5, 0])
    best, counter = routing.choose(routing.Router("most_running"), f, jnp.int32(2), jnp.int32(0),
                                   jnp.zeros(N_INST, jnp.int32), jnp.int32(9))
    assert (int(best), int(counter)) == (3, 4)  # 1 and 3 tie; the scan starts at 2


def test_config_accepts_power_of_two():
    r = spec(["cluster=pair", "cluster.routing=power_of_two", "cluster.routing_seed=7"])
    assert r.cluster.router == routing.Router("power_of_two", 7)
    ref = spec(["cluster=reference_json", "cluster.routing=power_of_two"]).cluster  # the JSON importer
    assert len(ref.instances) == 2 and ref.router == routing.Router("power_of_two", 42)
    with pytest.raises(JaxsimInputError) as e:
        spec(["cluster=pair", "cluster.routing=custom"])
    assert str(e.value).startswith("cluster.routing") and "power_of_two" in str(e.value)


def test_power_of_two_cluster_run(sharegpt16, llama):
    """2 instances, 16 requests: all finish, both instances serve, and each decision replays on
    the host (the loads at an arrival rebuilt from the per-request times, as in test_cluster)."""
    w = sharegpt16
    router = routing.Router("power_of_two", 5)
    res = simulator.simulate_cluster(w, llama, [PRO, PRO], router, runtime_for(2000), profiles_dir=PROFILES,
                                     max_slots=12, record_token_times=False)
    n = w.num_requests
    assert np.all(res.finish_ns > res.first_token_ns) and np.all(res.first_token_ns >= res.arrival_ns)
    assert sum(res.stats["requests_per_instance"]) == n and min(res.stats["requests_per_instance"]) > 0
    assert res.stats["preemptions"] == 0  # else the replay below would not hold
    order = np.lexsort((np.arange(n), w.arrival_ns))
    for j, r in enumerate(order):
        t, before = w.arrival_ns[r], order[:j]
        waiting = [np.sum((res.instance[before] == k) & (res.first_scheduled_ns[before] > t)) for k in range(2)]
        running = [np.sum((res.instance[before] == k) & (res.first_scheduled_ns[before] <= t)
                          & (res.finish_ns[before] > t)) for k in range(2)]
        f = _features(2, waiting=waiting, running=running, max_num_seqs=[PRO.sched.max_num_seqs] * 2)
        best, _ = routing.choose(router, f, jnp.int32(0), jnp.int32(j), jnp.zeros(2, jnp.int32), jnp.int32(1))
        assert res.instance[r] == int(best), f"arrival {j}"
