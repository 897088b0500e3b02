"""One-command profiler: time a model's operators on the local JAX device and write a profile bundle.

:func:`profile_model` measures, with jitted microbenchmarks on ``jax.devices()[0]`` (CPU here; a GPU
or TPU where JAX has one), every layer a profile bundle holds (REFERENCE.md §2.2) and writes
``<out>/<hardware>/<org>/<name>/<variant>/`` in the native format, which
:func:`jaxsim.profiles.load_profile_bundle` loads and the simulator runs like any other bundle:

* ``tp<N>/dense.csv`` (``layer,tokens,time_us``): every dense layer of the architecture sequence at
  its per-rank shape from :func:`jaxsim.operators.layer_operators` (the same shapes the operator-DB
  converter and the roofline model price): the GEMMs ``qkv_proj``, ``o_proj``, ``gate_up_proj``,
  ``down_proj`` as ``[T, k] @ [k, n]`` at the bundle dtype; ``layernorm`` / ``final_layernorm`` as
  vLLM's fused residual-add RMSNorm (float32 inside); ``rotary_emb`` as the neox rotation of q and
  k with a cos/sin cache gathered by position; ``act_fn`` as SiLU-and-mul; ``embedding`` as a row
  gather of the vocabulary shard (masked outside the shard when tp > 1); ``qk_norm`` (Qwen3) as
  the per-head RMSNorm of q and k.
* ``tp<N>/per_sequence.csv`` (``layer,sequences,time_us``): ``lm_head`` (``[S, H] @ [H, V/tp]``)
  and ``sampler`` over the full float32 logits: temperature, top-k mask (k = 50), softmax and an
  exponential-race sample (vLLM V1's ``probs / q`` argmax, with the noise as an input), plus
  the greedy argmax.
* ``tp<N>/attention.csv`` (``prefill_chunk,kv_prefill,n_decode,kv_decode,time_us``): one call
  holding one prefill chunk of ``pc`` tokens over ``kp`` cached tokens (causal within the chunk)
  and ``nd`` decodes each over ``kvd`` cached tokens (§2.5). It is a plain JAX attention on
  padded, contiguous arrays (grouped-query einsums, float32 scores and softmax, outputs in the
  bundle dtype), not a paged FlashAttention kernel: it has no block-table gather and it
  materialises the ``[heads, pc, kp + pc]`` score matrix, so on a GPU it is slower than vLLM's
  kernel at long contexts. ``pc = nd = 0`` is never timed (no attention term, §2.5).
* ``tp1/moe.csv`` (``tokens,activated_experts,time_us``, MoE models only): the sparse block on one
  rank: router GEMM and top-k, then ``activated_experts`` experts each taking an equal share of
  the ``tokens x experts_per_token`` routed rows (gathered, gate/up GEMM, SiLU-and-mul, down GEMM,
  weighted scatter-add back), with the weights of the activated experts only.
* ``tp<N>/spread.csv`` (a side file the loader does not read): per point the median (the
  ``time_us`` of the table), p10, p90, min and max of the timed runs, in µs;
  columns ``table,layer,key,time_us,p10_us,p90_us,min_us,max_us`` (``key``: tokens or sequences;
  ``pc/kp/nd/kvd`` for attention; ``tokens/activated_experts`` for MoE).
* ``meta.yaml``: provenance (device kind and platform, jax/jaxlib versions, XLA_FLAGS, date, grid,
  repeats, warm-up, width reduction as ``engine_effective.hf_overrides``, total wall time), the
  ``engine_effective`` limits (largest tokens and sequences profiled) and ``skew_fit.enabled:
  false`` (no skew correction, α = 0, §2.6).

Measurement (each point): the function is jitted and compiled once for the point's shapes,
run ``warmup`` times, then ``repeats`` times, each run timed on the host with
``time.perf_counter`` around the call and ``jax.block_until_ready``; ``time_us`` is the median.
A host timing includes the dispatch of one compiled call (tens of µs on CPU), which vLLM's
layerwise profiler, timing CUDA events, does not.

"Reduced width" (``width`` > 1): hidden size, intermediate sizes, attention and KV heads and
vocabulary are divided by ``width`` (head_dim and the number of experts kept), as the native
profiler emulates TP through ``hf_overrides``; the bundle is then the model's bundle at that
width, recorded in ``meta.yaml`` (``width``, ``engine_effective.hf_overrides``). Its times are a
smaller model's, not the model's: use ``width = 1`` for a bundle of the model itself.

A bundle written outside the project's ``profiles/`` needs ``architectures/`` and ``models/`` in
the same folder (the loader and the config read ``<profiles_dir>/architectures/<model_type>.yaml``
and ``<profiles_dir>/models/<org>/<name>.json``): :func:`profile_model` copies the project's two
folders there when they are missing, and links ``workloads/`` to the project's (so that
``paths.profiles=<out>`` alone is enough for ``scripts/run.py``).
"""

import csv
import dataclasses
import datetime
import hashlib
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import yaml

from jaxsim.errors import JaxsimInputError
from jaxsim.model import ModelConfig
from jaxsim.operators import layer_operators
from jaxsim.profiles import load_architecture

PROFILER_VERSION = "jaxsim-profiler 1"
PROJECT_PROFILES = Path(__file__).resolve().parents[1] / "profiles"
SAMPLER_TOP_K = 50  # vLLM's sampler applies the request's top-k; 50 is a common setting
ROPE_CACHE_ROWS = 4096  # rows of the cos/sin cache (the gather's cost does not depend on it)
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


# -------------------------------------------------------------------------------------- grids
@dataclasses.dataclass(frozen=True)
class Grid:
    """The points a profile measures. Attention cells are the product ``pc x kp x nd x kvd`` with
    ``kp = 0`` only when ``pc = 0`` and ``kvd = 0`` only when ``nd = 0``, less ``pc = nd = 0``
    (:meth:`attention_points`). MoE: ``activated_experts`` runs over ``moe_experts`` clipped to
    ``[experts_per_token, min(num_experts, experts_per_token * tokens)]``."""

    name: str
    tokens: tuple
    sequences: tuple
    prefill_chunks: tuple  # pc (0 = no prefill in the batch)
    kv_prefill: tuple  # kp for pc > 0
    n_decode: tuple  # nd (0 = no decode)
    kv_decode: tuple  # kvd for nd > 0
    moe_tokens: tuple
    moe_experts: tuple

    def attention_points(self) -> list:
        """``[(pc, kp, nd, kvd)]`` in measuring order."""
        pts = []
        for nd in self.n_decode:
            for kvd in (self.kv_decode if nd else (0,)):
                for pc in self.prefill_chunks:
                    if pc == 0 and nd == 0:
                        continue
                    for kp in (self.kv_prefill if pc else (0,)):
                        pts.append((pc, kp, nd, kvd))
        return pts

    def moe_points(self, model: ModelConfig) -> list:
        """``[(tokens, activated_experts)]`` (empty for a dense model)."""
        if not model.is_moe:
            return []
        k, e = model.experts_per_token, model.num_experts
        pts = []
        for t in self.moe_tokens:
            top = min(e, k * t)
            aes = sorted({min(max(a, k), top) for a in self.moe_experts})
            pts += [(t, a) for a in aes]
        return pts

    def as_dict(self) -> dict:
        return {f.name: list(getattr(self, f.name)) if isinstance(getattr(self, f.name), tuple)
                else getattr(self, f.name) for f in dataclasses.fields(self)}


GRIDS = {
    # seconds: a test's grid
    "tiny": Grid("tiny", tokens=(1, 16), sequences=(1, 4), prefill_chunks=(0, 16), kv_prefill=(0, 16),
                 n_decode=(0, 2), kv_decode=(16, 32), moe_tokens=(1, 8), moe_experts=(1, 4, 8)),
    # the default: doubling grids up to the native bundles' limits (tokens 2048, sequences 256),
    # attention coarse (every cell is one prefill plus the decodes, so its cost is the product of the
    # axes; time is linear in kp and kvd, so between and beyond these points the linear lookups of
    # §2.4-2.5 hold) so that Llama-3.1-8B at width 4 takes under 10 minutes on 2 CPU cores
    "default": Grid("default", tokens=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048),
                    sequences=(1, 2, 4, 8, 16, 32, 64, 128, 256),
                    prefill_chunks=(0, 16, 128, 512, 2048), kv_prefill=(0, 512),
                    n_decode=(0, 1, 16, 256), kv_decode=(16, 2048),
                    moe_tokens=(1, 4, 16, 64, 256, 1024, 2048), moe_experts=(8, 16, 32, 64, 128)),
}


def reduced_model(model: ModelConfig, width: int) -> tuple:
    """``(model at 1/width width, hf_overrides)``: hidden, intermediate (dense and MoE), attention
    and KV heads and vocabulary divided by ``width``; head_dim and experts kept.

    Raises JaxsimInputError when ``width`` does not divide the head counts (grouped-query
    attention needs whole KV heads)."""
    width = int(width)
    if width < 1:
        raise JaxsimInputError("width", f"must be a whole number >= 1, got {width}")
    if width == 1:
        return model, {}
    for field, v in (("num_attention_heads", model.num_heads), ("num_key_value_heads", model.num_kv_heads)):
        if v % width:
            raise JaxsimInputError("width", f"{width} does not divide {model.name}'s {field} = {v}",
                                   "pick a width dividing both head counts")
    over = {"hidden_size": model.hidden_size // width, "num_attention_heads": model.num_heads // width,
            "num_key_value_heads": model.num_kv_heads // width, "head_dim": model.head_dim,
            "vocab_size": model.vocab_size // width}
    if model.intermediate_size:
        over["intermediate_size"] = model.intermediate_size // width
    if model.is_moe:
        over["moe_intermediate_size"] = model.moe_intermediate_size // width
    small = dataclasses.replace(model, hidden_size=over["hidden_size"], num_heads=over["num_attention_heads"],
                                num_kv_heads=over["num_key_value_heads"], vocab_size=over["vocab_size"],
                                intermediate_size=over.get("intermediate_size", 0),
                                moe_intermediate_size=over.get("moe_intermediate_size", 0))
    return small, over


# --------------------------------------------------------------------------------- timing
@dataclasses.dataclass(frozen=True)
class Timing:
    """Host wall times of the timed runs of one point, µs."""

    median: float
    p10: float
    p90: float
    min: float
    max: float


def time_call(fn, args: tuple, warmup: int, repeats: int) -> Timing:
    """Compile ``fn`` for ``args`` once, run it ``warmup`` times, then time ``repeats`` runs
    (``time.perf_counter`` around the call and ``jax.block_until_ready``); percentiles by numpy's
    linear interpolation, so ``p10 <= median <= p90``."""
    import jax

    compiled = jax.jit(fn).lower(*args).compile()
    for _ in range(warmup):
        jax.block_until_ready(compiled(*args))
    runs = np.empty(repeats)
    for i in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        runs[i] = (time.perf_counter() - t0) * 1e6
    p10, med, p90 = np.percentile(runs, [10, 50, 90])
    return Timing(float(med), float(p10), float(p90), float(runs.min()), float(runs.max()))


class _Inputs:
    """Inputs for the microbenchmarks, cached by (name, shape, dtype): a pool of normal values
    (scale 0.5, fixed seed) tiled to the shape on the host and put on the device (no per-shape
    random kernel to compile; the values only need to be finite and not all alike)."""

    def __init__(self, seed: int = 0):
        self._pool = np.random.default_rng(seed).standard_normal(1 << 16 | 17).astype(np.float32) * 0.5
        self._pools: dict = {}  # the pool in each dtype (converting a big array element-wise is slow)
        self._cache: dict = {}

    def get(self, name, shape, dtype, keep=True):
        import jax
        import jax.numpy as jnp

        k = (name, tuple(shape), str(dtype))
        if k in self._cache:
            return self._cache[k]
        dt = jnp.dtype(dtype)
        pool = self._pools.setdefault(str(dt), self._pool.astype(dt))
        a = jax.device_put(np.resize(pool, (int(np.prod(shape)),)).reshape(shape))
        if keep:
            self._cache[k] = a
        return a

    def drop(self, name):
        for k in [k for k in self._cache if k[0] == name]:
            del self._cache[k]


# ------------------------------------------------------------------------------ operators
def _rms(x, w, eps=1e-5):
    import jax.numpy as jnp

    x = x.astype(jnp.float32)
    return x * jnp.reciprocal(jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)) * w.astype(jnp.float32)


def dense_layer(name: str, model: ModelConfig, tp: int, tokens: int, dt, inputs: _Inputs) -> tuple:
    """``(fn, args)`` of one dense layer at ``tokens`` rows on one TP rank (shapes from
    :func:`jaxsim.operators.layer_operators`)."""
    import jax
    import jax.numpy as jnp

    op = layer_operators(model, tp)[name]
    h, hd, T = model.hidden_size, model.head_dim, int(tokens)
    nh, nkv = model.num_heads // tp, model.num_kv_heads // tp
    if op.kind == "gemm":
        return (lambda x, w: jnp.dot(x, w, preferred_element_type=dt)), (
            inputs.get(("x", name), (T, op.k), dt), inputs.get(("w", name), (op.k, op.n), dt))
    if name in ("layernorm", "final_layernorm"):
        def fn(x, res, w):
            s = x.astype(jnp.float32) + res.astype(jnp.float32)
            return _rms(s, w).astype(dt), s.astype(dt)
        return fn, (inputs.get("x", (T, h), dt), inputs.get("res", (T, h), dt), inputs.get("wn", (h,), dt))
    if name == "qk_norm":
        def fn(q, k, wq, wk):
            return (_rms(q.reshape(T, nh, hd), wq).astype(dt).reshape(T, nh * hd),
                    _rms(k.reshape(T, nkv, hd), wk).astype(dt).reshape(T, nkv * hd))
        return fn, (inputs.get("q", (T, nh * hd), dt), inputs.get("k", (T, nkv * hd), dt),
                    inputs.get("wq", (hd,), dt), inputs.get("wk", (hd,), dt))
    if name == "rotary_emb":
        def fn(pos, q, k, cache):
            cs = cache[pos].astype(jnp.float32)  # [T, hd]: cos | sin halves
            cos, sin = cs[:, None, : hd // 2], cs[:, None, hd // 2:]

            def rot(x, n):
                x = x.reshape(T, n, hd).astype(jnp.float32)
                x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
                return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(dt).reshape(T, n * hd)
            return rot(q, nh), rot(k, nkv)
        pos = jnp.arange(T, dtype=jnp.int32) % ROPE_CACHE_ROWS
        return fn, (pos, inputs.get("q", (T, nh * hd), dt), inputs.get("k", (T, nkv * hd), dt),
                    inputs.get("rope", (ROPE_CACHE_ROWS, hd), jnp.float32))
    if name == "act_fn":
        inter = model.intermediate_size // tp

        def fn(x):
            g, u = x[:, :inter].astype(jnp.float32), x[:, inter:].astype(jnp.float32)
            return (jax.nn.silu(g) * u).astype(dt)
        return fn, (inputs.get(("x", name), (T, 2 * inter), dt),)
    if name == "embedding":
        vshard = model.vocab_size // tp

        def fn(ids, table):
            if tp == 1:
                return table[ids]
            ok = ids < vshard  # rank 0's shard [0, vshard): other ids read nothing (all-reduced later)
            return jnp.where(ok[:, None], table[jnp.where(ok, ids, 0)], 0).astype(dt)
        ids = (jnp.arange(T, dtype=jnp.int32) * 7919) % (model.vocab_size)
        return fn, (ids, inputs.get("emb", (vshard, h), dt))
    raise JaxsimInputError("profiler", f"no microbenchmark for dense layer {name!r}",
                           "add one to jaxsim/profiler.py::dense_layer")


def per_sequence_layer(name: str, model: ModelConfig, tp: int, seqs: int, dt, inputs: _Inputs) -> tuple:
    """``(fn, args)`` of ``lm_head`` or ``sampler`` at ``seqs`` sequences."""
    import jax
    import jax.numpy as jnp

    S = int(seqs)
    if name == "lm_head":
        op = layer_operators(model, tp)["lm_head"]
        return (lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32)), (
            inputs.get(("x", name), (S, op.k), dt), inputs.get(("w", name), (op.k, op.n), dt))
    if name == "sampler":
        V = model.vocab_size
        k = min(SAMPLER_TOP_K, V)

        def fn(logits, temp, q):
            x = logits / temp[:, None]
            kth = jax.lax.top_k(x, k)[0][:, -1:]
            x = jnp.where(x >= kth, x, -jnp.inf)
            probs = jax.nn.softmax(x, axis=-1)
            return jnp.argmax(probs / q, axis=-1), jnp.argmax(logits, axis=-1)
        q = jnp.abs(inputs.get("q_noise", (S, V), jnp.float32)) + 1e-3  # stands for Exp(1) noise
        return fn, (inputs.get("logits", (S, V), jnp.float32), jnp.full((S,), 0.8, jnp.float32), q)
    raise JaxsimInputError("profiler", f"no microbenchmark for per-sequence layer {name!r}",
                           "add one to jaxsim/profiler.py::per_sequence_layer")


def attention_call(model: ModelConfig, tp: int, pc: int, kp: int, nd: int, kvd: int, dt, inputs: _Inputs) -> tuple:
    """``(fn, args)`` of one attention call: a prefill chunk of ``pc`` tokens over ``kp`` cached
    tokens (causal within the chunk) and ``nd`` decodes over ``kvd`` cached tokens each, on
    padded contiguous arrays (see the module docstring)."""
    import jax
    import jax.numpy as jnp

    nh, nkv, hd = model.num_heads // tp, max(1, model.num_kv_heads // tp), model.head_dim
    g = nh // nkv
    scale = hd ** -0.5

    def prefill(q, k, v):  # q [pc, nh, hd]; k, v [kp + pc, nkv, hd]
        s = jnp.einsum("qhgd,khd->hgqk", q.reshape(pc, nkv, g, hd), k, preferred_element_type=jnp.float32) * scale
        mask = jnp.arange(kp + pc)[None, :] <= kp + jnp.arange(pc)[:, None]
        p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1).astype(dt)
        return jnp.einsum("hgqk,khd->qhgd", p, v, preferred_element_type=dt).reshape(pc, nh * hd)

    def decode(q, k, v):  # q [nd, nh, hd]; k, v [nd, kvd, nkv, hd]
        s = jnp.einsum("bhgd,bkhd->bhgk", q.reshape(nd, nkv, g, hd), k, preferred_element_type=jnp.float32) * scale
        p = jax.nn.softmax(s, axis=-1).astype(dt)
        return jnp.einsum("bhgk,bkhd->bhgd", p, v, preferred_element_type=dt).reshape(nd, nh * hd)

    def fn(q, kp_, vp_, kd_, vd_):
        outs = []
        if pc:
            outs.append(prefill(q[:pc], kp_, vp_))
        if nd:
            outs.append(decode(q[pc:], kd_, vd_))
        return jnp.concatenate(outs, 0) if len(outs) > 1 else outs[0]

    q = inputs.get("q_attn", (pc + nd, nh, hd), dt, keep=False)
    kpre = inputs.get("k_pre", (kp + pc, nkv, hd), dt) if pc else jnp.zeros((0,), dt)
    vpre = inputs.get("v_pre", (kp + pc, nkv, hd), dt) if pc else jnp.zeros((0,), dt)
    kdec = inputs.get("k_dec", (nd, kvd, nkv, hd), dt) if nd else jnp.zeros((0,), dt)
    vdec = inputs.get("v_dec", (nd, kvd, nkv, hd), dt) if nd else jnp.zeros((0,), dt)
    return fn, (q, kpre, vpre, kdec, vdec)


def moe_block(model: ModelConfig, tokens: int, activated: int, dt, inputs: _Inputs) -> tuple:
    """``(fn, args)`` of the sparse-MoE block on one rank (tp1 expert shapes): router GEMM and
    top-k, ``activated`` experts each taking ``ceil(tokens * k / activated)`` routed rows."""
    import jax
    import jax.numpy as jnp

    T, k, E = int(tokens), model.experts_per_token, model.num_experts
    h, inter, A = model.hidden_size, model.moe_intermediate_size, int(activated)
    C = -(-T * k // A)  # rows per activated expert (balanced)
    # row r of expert a is the routed pair a*C + r -> token (a*C + r) // k (wrapped): a fixed assignment
    rows = (np.arange(A * C) // k) % T

    def fn(x, router, w1, w2, rows):
        logits = jnp.dot(x, router, preferred_element_type=jnp.float32)
        weights, _ = jax.lax.top_k(jax.nn.softmax(logits, -1), k)  # the routing itself (its ids are replaced
        xe = x[rows].reshape(A, C, h)                              # by the balanced assignment `rows`)
        gu = jnp.einsum("ach,ahn->acn", xe, w1, preferred_element_type=jnp.float32)
        act = (jax.nn.silu(gu[..., :inter]) * gu[..., inter:]).astype(dt)
        y = jnp.einsum("aci,aih->ach", act, w2, preferred_element_type=jnp.float32).reshape(A * C, h)
        wrow = weights.reshape(-1)[jnp.arange(A * C) % (T * k)]
        return jnp.zeros((T, h), jnp.float32).at[rows].add(y * wrow[:, None]).astype(dt)

    return fn, (inputs.get(("x", "moe"), (T, h), dt), inputs.get("router", (h, E), dt),
                inputs.get("w1", (A, h, 2 * inter), dt), inputs.get("w2", (A, inter, h), dt),
                jnp.asarray(rows, jnp.int32))


# ------------------------------------------------------------------------------- the run
def _fmt(us: float) -> str:
    return f"{us:.3f}"


def _provenance() -> dict:
    import jax
    import jaxlib

    d = jax.devices()[0]
    return {"device_kind": str(d.device_kind), "platform": str(d.platform), "device_count": jax.device_count(),
            "jax_version": jax.__version__, "jaxlib_version": jaxlib.__version__,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "host": platform.machine(), "cpu_count": os.cpu_count(),
            "python": platform.python_version()}


def _support_dirs(out: Path, source: Path) -> list:
    """Copy ``architectures/`` and ``models/`` from ``source`` into ``out`` when missing, and link
    ``workloads/``; returns what was added."""
    added = []
    if out.resolve() == source.resolve():
        return added
    for sub in ("architectures", "models"):
        if not (out / sub).exists() and (source / sub).is_dir():
            shutil.copytree(source / sub, out / sub)
            added.append(sub)
    if not (out / "workloads").exists() and (source / "workloads").is_dir():
        try:
            (out / "workloads").symlink_to((source / "workloads").resolve(), target_is_directory=True)
            added.append("workloads (link)")
        except OSError:
            pass  # no links here: give paths.workloads=profiles/workloads instead
    return added


def profile_model(model: ModelConfig, hardware: str, out, tp: int = 1, width: int = 1, grid="default",
                  repeats: int = 3, warmup: int = 1, variant: str = "bf16", profiles_src=None,
                  log=print) -> Path:
    """Measure ``model``'s operators on the local JAX device and write its bundle under ``out``.

    ``model``: the full model (as :func:`jaxsim.model.load_model_config` reads it); ``width``:
    the width reduction (:func:`reduced_model`); ``grid``: a name of :data:`GRIDS` or a
    :class:`Grid`; ``variant``: bf16 | fp16 | fp32 (the activation and weight dtype of every
    operator); ``profiles_src``: where ``architectures/`` and ``models/`` come from (the project's
    ``profiles/`` by default). ``log``: a print-like callable for progress (None: silent).

    Returns the bundle folder ``out/hardware/<org>/<name>/<variant>``. Raises JaxsimInputError for an
    unknown grid or variant, a width that does not divide the heads, tp that does not divide the
    heads, repeats < 1 or warmup < 0. An existing ``tp<N>`` folder of the same bundle is replaced;
    other TP folders are kept and listed in ``meta.yaml``'s ``tp_degrees``.
    """
    import jax.numpy as jnp

    t_start = time.perf_counter()
    log = log or (lambda *a, **k: None)
    if isinstance(grid, str):
        if grid not in GRIDS:
            raise JaxsimInputError("grid", f"unknown grid {grid!r}", f"use one of {sorted(GRIDS)}")
        grid = GRIDS[grid]
    if variant not in DTYPES:
        raise JaxsimInputError("variant", f"unknown variant {variant!r}", f"use one of {sorted(DTYPES)}")
    if int(repeats) < 1 or int(warmup) < 0:
        raise JaxsimInputError("repeats" if int(repeats) < 1 else "warmup",
                               f"repeats must be >= 1 and warmup >= 0 (got {repeats}, {warmup})")
    tp, repeats, warmup = int(tp), int(repeats), int(warmup)
    small, overrides = reduced_model(model, width)
    if tp < 1 or small.num_heads % tp or small.num_kv_heads % tp:
        raise JaxsimInputError("tp", f"tp = {tp} does not divide the heads ({small.num_heads} attention, "
                               f"{small.num_kv_heads} KV at width {width})", "pick a tp dividing both")
    dt = jnp.dtype(DTYPES[variant])
    src = Path(profiles_src) if profiles_src is not None else PROJECT_PROFILES
    sequence, category, _ = load_architecture(src, model.model_type)
    layers = [n for g in sequence.values() for n in g]
    dense_layers = list(dict.fromkeys(n for n in layers if category[n] == "dense"))
    seq_layers = list(dict.fromkeys(n for n in layers if category[n] == "per_sequence"))
    needs_moe = any(category[n] == "moe" for n in layers)

    out = Path(out)
    base = out / hardware / model.name / variant
    tpdir = base / f"tp{tp}"
    if tpdir.exists():
        shutil.rmtree(tpdir)
    tpdir.mkdir(parents=True)
    inputs = _Inputs()
    spread: list = []

    def measure(table, layer, key, fn, args):
        t = time_call(fn, args, warmup, repeats)
        spread.append((table, layer, key, t))
        return t

    stage_s = {}
    t0 = time.perf_counter()
    dense_rows = []
    for name in dense_layers:
        for T in grid.tokens:
            t = measure("dense", name, str(T), *dense_layer(name, small, tp, T, dt, inputs))
            dense_rows.append((name, T, t.median))
        inputs.drop(("x", name))
        inputs.drop(("w", name))
        log(f"  dense {name}: {len(grid.tokens)} points, {time.perf_counter() - t0:.1f} s so far")
    stage_s["dense"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    seq_rows = []
    for name in seq_layers:
        for S in grid.sequences:
            t = measure("per_sequence", name, str(S), *per_sequence_layer(name, small, tp, S, dt, inputs))
            seq_rows.append((name, S, t.median))
    stage_s["per_sequence"] = time.perf_counter() - t0
    log(f"  per_sequence: {len(seq_rows)} points, {stage_s['per_sequence']:.1f} s")

    t0 = time.perf_counter()
    attn_rows = []
    last_dec = None
    points = grid.attention_points()
    for i, (pc, kp, nd, kvd) in enumerate(points):
        if i and i % 40 == 0:
            log(f"  attention: {i}/{len(points)} points, {time.perf_counter() - t0:.1f} s so far")
        if (nd, kvd) != last_dec:  # decode caches are big: keep only the current one
            inputs.drop("k_dec")
            inputs.drop("v_dec")
            last_dec = (nd, kvd)
        t = measure("attention", "attention", f"{pc}/{kp}/{nd}/{kvd}",
                    *attention_call(small, tp, pc, kp, nd, kvd, dt, inputs))
        attn_rows.append((pc, kp, nd, kvd, t.median))
    inputs.drop("k_dec")
    inputs.drop("v_dec")
    stage_s["attention"] = time.perf_counter() - t0
    log(f"  attention: {len(attn_rows)} points, {stage_s['attention']:.1f} s")

    moe_rows = []
    if needs_moe:
        t0 = time.perf_counter()
        for T, a in grid.moe_points(small):
            t = measure("moe", "moe", f"{T}/{a}", *moe_block(small, T, a, dt, inputs))
            moe_rows.append((T, a, t.median))
            inputs.drop("w1")
            inputs.drop("w2")
        stage_s["moe"] = time.perf_counter() - t0
        log(f"  moe: {len(moe_rows)} points, {stage_s['moe']:.1f} s")

    def write(path, header, rows):
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            for r in rows:
                w.writerow([_fmt(x) if isinstance(x, float) else x for x in r])

    write(tpdir / "dense.csv", ["layer", "tokens", "time_us"], dense_rows)
    write(tpdir / "per_sequence.csv", ["layer", "sequences", "time_us"], seq_rows)
    write(tpdir / "attention.csv", ["prefill_chunk", "kv_prefill", "n_decode", "kv_decode", "time_us"], attn_rows)
    if needs_moe:
        (base / "tp1").mkdir(exist_ok=True)  # always read from tp1 (REFERENCE.md §2.2)
        write(base / "tp1" / "moe.csv", ["tokens", "activated_experts", "time_us"], moe_rows)
    write(tpdir / "spread.csv", ["table", "layer", "key", "time_us", "p10_us", "p90_us", "min_us", "max_us"],
          [(tb, ly, k, t.median, t.p10, t.p90, t.min, t.max) for tb, ly, k, t in spread])

    wall = time.perf_counter() - t_start
    arch_path = src / "architectures" / f"{model.model_type}.yaml"
    run = {"profiled_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "grid": grid.as_dict(), "attention_points": len(attn_rows), "moe_points": len(moe_rows),
           "repeats": repeats, "warmup": warmup, "statistic": "median of the timed runs (spread: spread.csv)",
           "timer": "host time.perf_counter around the compiled call + jax.block_until_ready",
           "stage_wall_s": {k: round(v, 2) for k, v in stage_s.items()}, "wall_s": round(wall, 2)}
    meta_path = base / "meta.yaml"
    old = {}
    if meta_path.is_file():
        try:
            old = yaml.safe_load(meta_path.read_text()) or {}
        except yaml.YAMLError:
            old = {}
    per_tp = dict(old.get("per_tp") or {}) if old.get("profiler_version") == PROFILER_VERSION else {}
    per_tp[tp] = run
    tps = sorted(int(p.name[2:]) for p in base.glob("tp*") if p.is_dir() and p.name[2:].isdigit()
                 and (p / "dense.csv").is_file())
    meta = {
        "profiler_version": PROFILER_VERSION,
        **_provenance(),
        "hardware": hardware,
        "profiled_at": run["profiled_at"],
        "architecture": model.model_type,
        "architecture_sha256": hashlib.sha256(arch_path.read_bytes()).hexdigest(),
        "model": model.name,
        "variant": variant,
        "dtype": DTYPES[variant],
        "tp_degrees": tps,
        "width": int(width),
        "engine_effective": {
            "tensor_parallel_size": tp,
            "max_num_batched_tokens": int(max(grid.tokens)),
            "max_num_seqs": int(max(grid.sequences)),
            "hf_overrides": {"num_hidden_layers": 1, **overrides},
        },
        "grid": grid.name,
        "attention_grid": {"chunks": list(grid.prefill_chunks), "kv_prefill": list(grid.kv_prefill),
                           "n_decode": list(grid.n_decode), "kv_decode": list(grid.kv_decode),
                           "kernel": "plain JAX attention on padded contiguous arrays (jaxsim/profiler.py)"},
        "measurement": {"repeats": repeats, "warmup": warmup, "statistic": "median",
                        "spread_table": "tp<N>/spread.csv (p10, p90, min, max; µs)"},
        "per_tp": per_tp,
        "wall_s": round(wall, 2),
        "skew_fit": {"enabled": False},
    }
    meta_path.write_text(yaml.safe_dump(meta, sort_keys=False))
    added = _support_dirs(out, src)
    if added:
        log(f"  added to {out}: {', '.join(added)}")
    log(f"wrote {base} (tp{tp}) in {wall:.1f} s")
    return base


def read_spread(tpdir) -> list:
    """Rows of ``tp<N>/spread.csv`` as dicts (floats for the time columns)."""
    with open(Path(tpdir) / "spread.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for c in ("time_us", "p10_us", "p90_us", "min_us", "max_us"):
            r[c] = float(r[c])
    return rows


# --------------------------------------------------------------------- operator-DB comparison
OPDB_RAW = PROJECT_PROFILES.parents[1] / "shared" / "data" / "operator-db" / "aiconfigurator" / "data"
_OPDB_TABLES = {"gemm": "gemm/vllm/0.19.0/gemm_perf", "context_attention": "attention/vllm/0.19.0/context_attention_perf",
                "generation_attention": "attention/vllm/0.19.0/generation_attention_perf"}


def _read_opdb_table(system: str, table: str, csv_root=None, raw_root=None) -> tuple:
    """``(rows, source path)`` of one operator-DB table (``gemm``, ``context_attention``,
    ``generation_attention``), rows as dicts with a ``time_us`` field, bfloat16 GEMMs and
    bfloat16 attention with a bfloat16 KV cache only.

    Read from the project's converted copy ``<csv_root>/<system>/<table>.csv[.gz]``
    (``profiles/operator-db/``, written by ``scripts/import_operator_db.py``: µs, one kernel per KV
    dtype) when present, else from the raw AIConfigurator parquet under ``raw_root``
    (milliseconds; attention rows of the ``vllm_flash_attn`` kernel when the system has it, else
    of the one it has)."""
    import gzip

    csv_root = Path(csv_root) if csv_root is not None else PROJECT_PROFILES / "operator-db"
    rows = None
    for cand in (csv_root / system / f"{table}.csv.gz", csv_root / system / f"{table}.csv"):
        if cand.is_file():
            with (gzip.open(cand, "rt", newline="") if cand.suffix == ".gz" else open(cand, newline="")) as f:
                rows, src = list(csv.DictReader(f)), cand
            for r in rows:
                r["time_us"] = float(r["time_us"])
            break
    if rows is None:
        src = (Path(raw_root) if raw_root is not None else OPDB_RAW) / system / f"{_OPDB_TABLES[table]}.parquet"
        if not src.is_file():
            where = src.parents[4]
            known = sorted(p.name for p in where.iterdir()) if where.is_dir() else []
            raise JaxsimInputError(str(src), f"no operator-DB table {table!r} for system {system!r}",
                                   f"known systems: {known} (or converted copies in {csv_root})")
        import pyarrow.parquet as pq

        cols = pq.read_table(src).to_pydict()
        n = len(cols["latency"])
        rows = [{c: cols[c][i] for c in cols} for i in range(n)]
        for r in rows:
            r["time_us"] = float(r["latency"]) * 1000.0
        if table != "gemm":
            rows = [r for r in rows if r.get("attn_dtype") == "bfloat16"]
            kernels = {r.get("kernel_source") for r in rows}
            keep = "vllm_flash_attn" if "vllm_flash_attn" in kernels else sorted(kernels, key=str)[0] if kernels else None
            rows = [r for r in rows if r.get("kernel_source") == keep]
    if table == "gemm":
        rows = [r for r in rows if r["gemm_dtype"] == "bfloat16"]
    else:
        rows = [r for r in rows if r["kv_cache_dtype"] == "bfloat16"]
    return rows, src


def _interp(xs, ys, x):
    """Linear interpolation inside ``xs`` (sorted); None outside (no extrapolation in a comparison)."""
    if not len(xs) or x < xs[0] or x > xs[-1]:
        return None
    return float(np.interp(x, xs, ys))


def _stats(errs) -> dict:
    e = np.abs(np.asarray(errs, float))
    if not len(e):
        return {"n": 0}
    return {"n": int(len(e)), "median_rel_err": float(np.median(e)), "p90_rel_err": float(np.percentile(e, 90))}


def compare_with_operator_db(bundle, system: str, model: ModelConfig, tp: int = 1, csv_root=None,
                             raw_root=None) -> dict:
    """Relative error of a profiled bundle's GEMM and attention rows against the operator database
    of ``system`` (AIConfigurator's vLLM 0.19.0 tables, milliseconds), as
    ``{"gemm": {n, median_rel_err, p90_rel_err}, "context_attention": ..., "generation_attention":
    ..., "sources": [...], "skipped": {...}}``. ``rel_err = measured / database - 1``; the
    tables are read by :func:`_read_opdb_table` (converted CSVs, else the raw parquet).

    ``bundle``: the bundle folder (``.../<variant>``); ``model``: the model *as profiled* (the
    reduced-width one, :func:`reduced_model`, when the bundle was written with width > 1).
    GEMM rows (dense GEMMs by tokens, ``lm_head`` by sequences) match the database's bfloat16
    rows at the same ``(n, k)`` and interpolate linearly in ``m``; pure prefills
    (``nd = 0, kp = 0``) match ``context_attention`` at batch 1, ``isl = pc``; pure decodes
    (``pc = 0``) match ``generation_attention`` at batch ``nd``, context ``isl + step = kvd``,
    interpolated linearly in the context; both at the per-rank head counts and head_dim, bfloat16
    KV. Points outside the database's range are skipped (counted)."""
    base = Path(bundle)
    tpdir = base / f"tp{tp}"
    ops = layer_operators(model, tp)
    out = {"sources": [], "skipped": {}}

    gemm, src = _read_opdb_table(system, "gemm", csv_root, raw_root)
    out["sources"].append(str(src))
    by_nk: dict = {}
    for r in gemm:
        by_nk.setdefault((int(r["n"]), int(r["k"])), {})[int(float(r["m"]))] = r["time_us"]
    errs, skipped = [], 0
    for fname, key in (("dense.csv", "tokens"), ("per_sequence.csv", "sequences")):
        with open(tpdir / fname, newline="") as f:
            for r in csv.DictReader(f):
                op = ops.get(r["layer"])
                if op is None or op.kind != "gemm":
                    continue
                tab = by_nk.get((op.n, op.k))
                ref = None
                if tab:
                    ms = sorted(tab)
                    ref = _interp(ms, [tab[m] for m in ms], int(r[key]))
                if ref is None or ref <= 0:
                    skipped += 1
                    continue
                errs.append(float(r["time_us"]) / ref - 1.0)
    out["gemm"] = _stats(errs)
    out["skipped"]["gemm"] = skipped

    nh, nkv, hd = model.num_heads // tp, max(1, model.num_kv_heads // tp), model.head_dim
    with open(tpdir / "attention.csv", newline="") as f:
        attn = [(int(r["prefill_chunk"]), int(r["kv_prefill"]), int(r["n_decode"]), int(r["kv_decode"]),
                 float(r["time_us"])) for r in csv.DictReader(f)]
    for label in ("context_attention", "generation_attention"):
        table = label.split("_")[0]
        db, src = _read_opdb_table(system, label, csv_root, raw_root)
        out["sources"].append(str(src))
        curves: dict = {}
        for r in db:
            if int(r["num_heads"]) != nh or int(r["num_key_value_heads"]) != nkv or int(r["head_dim"]) != hd:
                continue
            ctx = int(r["isl"]) + (int(r["step"]) if table == "generation" else 0)
            curves.setdefault(int(r["batch_size"]), {})[ctx] = r["time_us"]
        errs, skipped = [], 0
        for pc, kp, nd, kvd, us in attn:
            if table == "context" and not (nd == 0 and kp == 0 and pc > 0):
                continue
            if table == "generation" and not (pc == 0 and nd > 0):
                continue
            batch, ctx = (1, pc) if table == "context" else (nd, kvd)
            c = curves.get(batch)
            ref = _interp(sorted(c), [c[x] for x in sorted(c)], ctx) if c else None
            if ref is None or ref <= 0:
                skipped += 1
                continue
            errs.append(us / ref - 1.0)
        out[label] = _stats(errs)
        out["skipped"][label] = skipped
    return out


def format_comparison(cmp: dict, system: str) -> str:
    lines = [f"measured vs operator DB {system} (rel_err = measured / database - 1):"]
    for k in ("gemm", "context_attention", "generation_attention"):
        s = cmp.get(k, {"n": 0})
        if s["n"]:
            lines.append(f"  {k:22s} n={s['n']:4d}  median |err| {s['median_rel_err']:.3g}  "
                         f"p90 |err| {s['p90_rel_err']:.3g}  (skipped {cmp['skipped'].get(k, 0)})")
        else:
            lines.append(f"  {k:22s} no matching points (skipped {cmp['skipped'].get(k, 0)})")
    lines.append("  sources: " + ", ".join(cmp["sources"]))
    return "\n".join(lines)
