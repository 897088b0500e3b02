"""Float-time latency (issue 16 part 1): :func:`jaxsim.latency.profile.iteration_ns` against the
integer path (they differ only by the roundings), its exact gradients (``jax.grad`` /
``total_ns_grad``) against central finite differences and hand-derived values, on a profiled
bundle (RTXPRO6000 Llama-3.1-8B TP 2 and Qwen3-30B-A3B TP 2 EP 2), a converted operator-db bundle
(rtxpro6000_opdb) and the roofline model; vmapped over stacked configurations.

The time is linear in the table values and in the scales, and smooth (1/x) in the bandwidths;
the finite differences are Richardson-extrapolated central differences (:func:`_fd`, truncation
error O(h^4)), whose step of 1% keeps the float64 cancellation of a ~1e8 ns total small next to
the small derivatives (the host ops' bandwidth: ~0.3 ns per GB/s). The checked points are not on a
kink (``kv_read_scale`` 0.5, not 1.0; no ``max`` switches within the step). Derivatives with
respect to table keys or batch shapes are piecewise and not checked."""

import dataclasses
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import jaxsim  # noqa: F401  (x64)
from jaxsim.errors import JaxsimInputError
from jaxsim.latency import latency_tables, stack_tables
from jaxsim.latency.base import BatchShape
from jaxsim.latency.profile import iteration_ns, stack_shapes, total_ns, total_ns_grad
from jaxsim.latency.roofline import RooflineModel
from jaxsim.profiles import load_profile_bundle
from jaxsim.spec import HardwareConfig

from _shared import LLAMA, PROFILES, load_model

QWEN_MOE = "Qwen/Qwen3-30B-A3B-Instruct-2507"
# (T, S, pc, kp, nd, kvd_sum, kvd_min, kvd_max): a 2048-token prefill (on every table's keys), a
# mixed batch with skewed decodes, a decode batch, one decode
SHAPES = [(2048, 1, 2048, 0, 0, 0, 0, 0), (300, 45, 256, 1024, 44, 44 * 700, 300, 1500),
          (65, 64, 1, 0, 64, 64 * 900, 100, 3000), (1, 1, 0, 0, 1, 513, 513, 513)]
BATCH = stack_shapes([BatchShape(*(jnp.asarray(x, jnp.int64) for x in s)) for s in SHAPES])
N = len(SHAPES)
LLAMA_KV = 2 * 8 * 128 * 2 // 2  # K+V bytes of one token, layer and TP-2 rank (8 KV heads, head_dim 128, bf16)

# the scalar continuous leaves checked against finite differences
LEAVES = ("compute_scale", "memory_scale", "link_scale", "link_bw", "link_lat", "link_step_overhead", "cpu_bw",
          "cpu_lat", "kv_read_scale", "kvloc_bw", "kvloc_lat")

# compiled once (one table shape: the stack); vmapped over configurations
_INT = jax.jit(jax.vmap(jax.vmap(lambda tb, s: tb.iteration_time(s)[0], (None, 0)), (0, None)))
_FLOAT = jax.jit(jax.vmap(jax.vmap(iteration_ns, (None, 0)), (0, None)))
_GRAD = eqx.filter_jit(jax.vmap(total_ns_grad, (0, None)))


def _bundle(hw, model, tp):
    m = load_model(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the converted bundle lists its dropped outliers
        return m, load_profile_bundle(PROFILES, hw, m, tp=tp)


@pytest.fixture(scope="module")
def configs():
    """(tables, stacked): 0 profiled Llama TP 2 as profiled; 1 profiled Qwen3-30B-A3B TP 2 EP 2,
    compute 0.8x, link 1.1x, 200 ns per ring step; 2 converted (operator-db) Llama TP 1 with an
    FP8 KV cache from bf16 tables (kv_read_scale 0.5), memory 0.9x; 3 config 0 with the KV cache
    in host memory (64 GB/s, 1 us per read)."""
    m, b = _bundle("RTXPRO6000", LLAMA, 2)
    mq, bq = _bundle("RTXPRO6000", QWEN_MOE, 2)
    mo, bo = _bundle("rtxpro6000_opdb", LLAMA, 1)
    hw = HardwareConfig(name="RTXPRO6000", tp=2, cpu_mem_latency_ns=700.0)
    t0 = latency_tables(b, m, hw)
    t1 = latency_tables(bq, mq, dataclasses.replace(hw, ep=2), compute_scale=0.8, link_scale=1.1,
                        link_step_overhead_ns=200.0)
    t2 = latency_tables(bo, mo, HardwareConfig(name="rtxpro6000_opdb", tp=1), memory_scale=0.9, kv_read_scale=0.5)
    t3 = dataclasses.replace(t0, kvloc_bytes=jnp.asarray(float(LLAMA_KV)), kvloc_bw=jnp.asarray(64.0),
                             kvloc_lat=jnp.asarray(1000.0), offload=True)
    tabs = [t0, t1, t2, t3]
    assert (t1.moe_blocks, t1.ep, t2.kv_scaled, t0.kv_scaled) == (48, 2, True, False)
    return tabs, stack_tables(tabs)


def _bound(tb) -> float:
    """The most the roundings can move one iteration, ns: < 1 per truncated lookup and occurrence
    (scaled), 1 per floor of a scaled sum, per attention layer the lookup's truncation, the skew
    rounding and the two FP8-KV floors, per MoE block the rank's truncation and the two EP
    collectives, 1 per AllReduce and host op, and with the KV off the NPU 1 per block's read (the
    reads queue) and the block start."""
    L, cs, ms = int(tb.num_layers), float(tb.compute_scale), float(tb.memory_scale)
    lin = int(np.sum(tb.lin_mult)) * cs + 4  # t_lin and c_pro / c_head / c_pre floors
    att = L * int(tb.att_per_block) * (4 * ms + 1)
    moe = int(tb.moe_blocks) * (cs + 1 + 2)
    off = (L + 2) if float(tb.kvloc_bytes) > 0 else 0
    return lin + att + moe + int(tb.ar_count) + 2 + off


def test_float_time_agrees_with_int_time(configs):
    tabs, st = configs
    ti, tf = np.asarray(_INT(st, BATCH)), np.asarray(_FLOAT(st, BATCH))
    assert tf.dtype == np.float64 and ti.dtype == np.int64
    for c, tb in enumerate(tabs):
        bound = _bound(tb)
        assert 150 < bound < 1000  # a few hundred ns on iterations of 1-100 ms
        for i in range(N):
            assert abs(tf[c, i] - ti[c, i]) <= bound, (c, SHAPES[i], tf[c, i] - ti[c, i], bound)
    # the 2048-token prefill is on every key of the profiled tables, whose values are whole ns, and
    # its host ops (700 + 2*2*2048/256 ns, 700 + 4*2048/256 ns) and AllReduce (2 x (20,000 + 2048*4096*2/2/16))
    # are whole ns: nothing to round
    assert tf[0, 0] == ti[0, 0]
    # and the offloaded KV reads move the time the same way in both
    assert tf[3, 1] - tf[0, 1] == pytest.approx(ti[3, 1] - ti[0, 1], abs=_bound(tabs[3]))
    assert ti[3, 1] > ti[0, 1] + 32 * 1000  # at least the 32 reads' latency


def test_stacked_float_path_matches_one_configuration(configs):
    tabs, st = configs
    one = jax.jit(jax.vmap(lambda s: tabs[2].iteration_ns(s)))(BATCH)  # the converted bundle alone, unpadded
    assert np.asarray(one) == pytest.approx(np.asarray(_FLOAT(st, BATCH))[2], rel=1e-13)


def _bump(st, name, h):
    return eqx.tree_at(lambda t: getattr(t, name), st, getattr(st, name) + h)


def _fd(f, h):
    """d f / d x at x from ``f(delta)`` = f(x + delta): Richardson's combination of the central
    differences at h and h/2 (error O(h^4))."""
    d1 = (f(h) - f(-h)) / (2 * h)
    d2 = (f(h / 2) - f(-h / 2)) / h
    return (4 * d2 - d1) / 3


def _noise(total, h):
    """The rounding error of a difference quotient of a float64 total at step h: a few ulps of the
    total over h (~1e-6 ns for a 1e8 ns total at h = 0.01): below it a finite difference cannot
    resolve a derivative, whatever its accuracy."""
    return 16 * np.finfo(np.float64).eps * np.abs(total) / h


def _total(st):
    return np.asarray(_FLOAT(st, BATCH)).sum(axis=1)


def test_gradients_match_finite_differences(configs):
    tabs, st = configs
    total, g = _GRAD(st, BATCH)
    assert np.allclose(_total(st), np.asarray(total), rtol=1e-13, atol=0)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g))
    for name in LEAVES:
        x = np.asarray(getattr(st, name))
        h = 1e-2 * np.maximum(np.abs(x), 1.0)
        fd = _fd(lambda d, name=name: _total(_bump(st, name, d)), h)
        gn = np.asarray(getattr(g, name))
        assert np.all(np.abs(gn - fd) <= 1e-6 * np.abs(fd) + _noise(total, h)), (name, gn, fd)
    # the inputs each configuration depends on, with their signs; the others are exactly 0
    assert np.all(np.asarray(g.link_bw)[[0, 1, 3]] < 0) and float(g.link_bw[2]) == 0.0  # config 2: TP 1
    # kv_read_scale: config 2 at 0.5; the others at 1.0 (the stack compiles the FP8-KV term for
    # all), the kink, where the gradient and a central difference are both the one-sided slopes' mean
    assert np.all(np.asarray(g.kv_read_scale) > 0)
    assert float(g.kvloc_bw[3]) < 0 and np.all(np.asarray(g.kvloc_bw)[:3] == 0.0)
    assert np.all(np.asarray(g.compute_scale) > 0) and np.all(np.asarray(g.memory_scale) > 0)

    # table values: linear, so one central difference of 1 ns per entry, at the entry with the
    # largest gradient of each configuration
    for name in ("lin_vals", "att_vals", "moe_vals"):
        gv = np.asarray(getattr(g, name))
        for c in range(len(tabs)) if name != "moe_vals" else [1]:
            idx = (c,) + np.unravel_index(np.argmax(np.abs(gv[c])), gv[c].shape)
            e = jnp.zeros(gv.shape).at[idx].set(1.0)
            fd = (_total(_bump(st, name, e))[c] - _total(_bump(st, name, -e))[c]) / 2
            assert float(fd) == pytest.approx(gv[idx], rel=1e-6), (name, c)
            assert abs(gv[idx]) >= 1


def test_gradients_by_hand(configs):
    """Derivatives read off the composition: d/d link_lat = Σ steps x link_scale (TP AllReduce:
    ar_count x 2(tp-1) steps; EP: 2 x (ep-1) per MoE block); d/d cpu_lat = 2 per iteration (host
    op in and out); a lookup's weights sum to 1, so Σ d/d lin_vals = N x Σ lin_mult x compute_scale
    and Σ d/d att_vals = N x L x memory_scale (every shape has attention; no FP8-KV scaling)."""
    tabs, st = configs
    _, g = _GRAD(st, BATCH)
    assert float(g.link_lat[0]) == N * 64 * 2  # Llama: 32 o_proj + 32 down_proj AllReduces, 2 steps each
    assert float(g.link_lat[1]) == pytest.approx(N * (48 * 2 + 48 * 2) * 1.1, rel=1e-12)  # Qwen3 MoE: 48 o_proj
    assert float(g.link_step_overhead[1]) == float(g.link_lat[1])
    assert float(g.link_lat[2]) == 0.0  # TP 1
    assert np.asarray(g.cpu_lat)[:3].tolist() == [2.0 * N] * 3
    # host ops (2*fp + 4)*T bytes at cpu_bw: -(2*2 + 4)*ΣT / cpu_bw^2
    assert float(g.cpu_bw[0]) == pytest.approx(-8 * sum(s[0] for s in SHAPES) / 256.0 ** 2, rel=1e-12)
    for c in (0, 1, 2):
        tb = tabs[c]
        want = N * int(np.sum(tb.lin_mult)) * float(tb.compute_scale)
        assert float(jnp.sum(g.lin_vals[c])) == pytest.approx(want, rel=1e-12), c
    for c in (0, 1):
        assert float(jnp.sum(g.att_vals[c])) == pytest.approx(N * int(tabs[c].num_layers), rel=1e-12), c


def test_pim_tables_have_no_float_time(configs):
    tabs, _ = configs
    with pytest.raises(JaxsimInputError, match="does not model PIM attention"):
        iteration_ns(dataclasses.replace(tabs[0], pim=True), BatchShape(*(jnp.asarray(x) for x in SHAPES[0])))


@pytest.mark.slow  # ~5 s, the gradient's XLA compile; tests/test_roofline.py checks peak_flops, mem_bw, e_max fast
def test_roofline_gradients_match_finite_differences():
    """Every float leaf of a roofline model (hardware, the calibrated efficiency of each operator
    class, the model's shape constants: 132 values) through total_ns_grad against Richardson
    central differences, all perturbed points in one vmapped call."""
    m = RooflineModel.from_spec("rtxpro6000", load_model(LLAMA), tp=2, cpu_lat_ns=700.0)
    total, g = eqx.filter_jit(total_ns_grad)(m, BATCH)
    params, static = eqx.partition(m, eqx.is_inexact_array)
    x, unravel = ravel_pytree(params)
    gx, _ = ravel_pytree(g)  # the same float leaves, in the same order
    n = x.shape[0]
    h = 1e-2 * jnp.maximum(jnp.abs(x), 1.0)
    steps = jnp.asarray([1.0, -1.0, 0.5, -0.5])[:, None, None] * jnp.diag(h)[None]  # [4, n, n]
    f = jax.jit(jax.vmap(lambda v: total_ns(eqx.combine(unravel(v), static), BATCH)))
    fp = np.asarray(f(x[None] + steps.reshape(4 * n, n))).reshape(4, n)
    h = np.asarray(h)
    fd = (4 * (fp[2] - fp[3]) / h - (fp[0] - fp[1]) / (2 * h)) / 3  # _fd's combination
    noise = _noise(float(total), h)
    assert np.all(np.abs(np.asarray(gx) - fd) <= 1e-6 * np.abs(fd) + noise)
    assert np.sum(1e-6 * np.abs(fd) > noise) >= 75  # resolved to 1e-6: 82 of 132 (the rest barely move the time)
    assert float(g.peak_flops) < 0 and float(g.mem_bw) < 0 and float(g.link_bw) < 0
    assert float(g.cpu_lat) == 2.0 * N and float(g.link_lat) == 64 * 2 * N
    assert float(m.iteration_ns(BatchShape(*(jnp.asarray(v) for v in SHAPES[1])))) == pytest.approx(
        float(jax.vmap(m.iteration_ns)(BATCH)[1]), rel=1e-15)  # the interface method is the module function
