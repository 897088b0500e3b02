"""The roofline latency model: an engine iteration's time from a spec sheet, no profile tables.

:class:`RooflineModel` is an :class:`jaxsim.latency.base.AbstractLatencyModel` for hardware nobody
has profiled (issue 15): every operator of the iteration gets its FLOPs ``F`` and bytes ``B`` from
the model config and the batch shape (:mod:`jaxsim.operators`), and its time from the part's peak
FLOP/s and memory bandwidth (:mod:`jaxsim.specs`) through one efficiency curve per operator class::

    t_c = (F + f_half[c]) / (peak * e_max[c])        # compute; = F / (peak * eff(F)), eff(F) = e_max F/(F + f_half)
    t_m = (B + b_half[c]) / (mem_bw * b_max[c])      # memory;  = B / (mem_bw * beff(B)), the same curve in bytes
    t   = n_k*lat[c] + (t_c^p[c] + t_m^p[c])^(1/p[c])   # a p-norm: smooth everywhere, -> max(t_c, t_m) as p -> inf

``n_k`` is the operator's kernel count (:attr:`jaxsim.operators.Operator.kernels`: 1 for a fused
kernel, ~10 for the sampler's chain of small ones), so the latency floor multiplies with launches.
Where the sheet gives an L2 size ``l2`` (``l2_mib``), a kernel's bytes that fit in it move faster
than DRAM: ``mem_bw`` becomes ``mem_bw * (1 + l2_gain[c] / (1 + (B/l2)^4))`` (-> 1 + l2_gain for
B << l2, -> 1 for B >> l2). Only the ``memory`` class has a fitted gain (its inputs are the previous
kernel's outputs, L2-resident in serving as in the profiles; GEMM weights and the KV cache stream
from DRAM): without it the native element-wise layers measure up to 2-3x the DRAM bandwidth
(RMSNorm at 2048 tokens: 2.4 TB/s on the 1008 GB/s RTX 4090).

Classes (``CLASSES``): ``gemm`` (dense linear layers, lm_head), ``attn_prefill``, ``attn_decode``,
``memory`` (norms, rotary, activation, embedding, sampler) and ``moe`` (the fused expert block).
The 6 x 5 parameters (and the memory class's ``l2_gain``) are fitted jointly on every measured
table (``scripts/fit_roofline.py``, one parameter set for all hardware; hardware enters only through
its sheet) and stored in ``profiles/specs/roofline_calibration.yaml``.

Composition, one rank, like :mod:`jaxsim.latency.profile` (REFERENCE.md §2.1)::

    t = [in: cpu_lat + 2*act*T/cpu_bw] + Σ_prologue op(T) + L*{Σ_pre/post_attn op(T) + attn} + ar_count*AR
        + L_dense*Σ_mlp_dense op(T) + L_moe*{AG + moe + RS} + Σ_head op(T or S) + [out: cpu_lat + 4*T/cpu_bw]

* Operators ``op`` and their multiplicities come from the architecture YAML's sequence, with FLOPs
  and bytes from :func:`jaxsim.operators.layer_operators` at ``x = max(T, 1)`` (token-keyed) or
  ``max(S, 1)`` (lm_head, sampler).
* Attention (one layer): the merged prefill (``pc`` new tokens over ``kp`` history, causal: each
  query attends ``kp + (pc+1)/2`` keys on average) priced as class ``attn_prefill`` with
  ``F = 4*heads*head_dim*pc*(kp + (pc+1)/2)``, ``B = (kp + pc)*kv_tok + pc*(2*q_bytes + kv_tok)``
  (KV read, queries read and outputs written, new KV written); the decodes as ``attn_decode`` with
  ``F = 4*heads*head_dim*kvd_sum``, ``B = kvd_sum*kv_tok + nd*(2*q_bytes + kv_tok)``; the two added
  (absent parts are 0). A MIXED batch (both parts present) is one FlashAttention varlen kernel
  (vLLM's FlashAttention backend): one floor, class ``attn_prefill``, ``F = F_prefill +
  MIXED_QUERY_TILE * F_decode``, ``B = B_prefill + B_decode``: with prefill queries in the batch the
  decodes lose FA2's GQA "seqlen_q-ngroups swap" and split-KV path and each decode sequence fills a
  query tile of ``kBlockM = 64`` rows (flash-attention ``run_mha_fwd_splitkv_dispatch``, the paged-KV
  kernel vLLM calls) of which one is real, so its compute is 64x the useful FLOPs (native RTX PRO
  6000: 64 decodes at KV 16,384 + a 16-token chunk take 6.8 ms against 2.9 ms for the decodes
  alone). Per rank: heads / tp, ``kv_tok`` = :func:`jaxsim.operators.kv_bytes_per_token`.
* TP AllReduce: a ring of ``2(tp-1)`` steps of ``link_lat + (T*H*act/tp)/link_bw`` (LatencyTables'
  ring, no step overhead), after o_proj (L) and after a dense down_proj (L_dense).
* MoE block (BALANCED routing, §1.9): per EP rank ``A = T*k/ep`` expert assignments over
  ``ae = max(min(round(T*k/ep), E/ep), 1)`` activated experts; ``F = 2*A*(n1*k1 + n2*k2) + 2*T*H*E``
  (expert GEMMs, :func:`jaxsim.operators.moe_expert_shapes` at expert-TP 1, plus the router),
  ``B = ae*(n1*k1 + n2*k2)*w + A*(n1 + k1 + n2 + k2)*act + 2*T*H*act + H*E*w``; with ep > 1 the
  dispatch AllGather and combine ReduceScatter of LatencyTables (``max(1, T//ep)*(H+E)*act`` and
  ``T*H*act/ep`` bytes, ``ep - 1`` steps each).
* ``iteration_time`` is ``floor`` of the float time :func:`iteration_ns` (exactly differentiable in
  every float leaf: hardware and calibration); ``extrapolated`` is always zeros (no tables to leave).
* ``stage_times`` splits like :func:`jaxsim.latency.profile.stage_times`: stage 0 takes the host op in
  and the prologue, the last stage the head and the host op out, the blocks split in proportion to
  :func:`jaxsim.latency.profile.pp_layers` (floored, the last stage the rest), so stages sum to
  ``iteration_time``; ``p2p = floor(link_lat + T*H*act/link_bw)``.

Units: ``peak_flops`` TFLOP/s, ``mem_bw``/``link_bw``/``cpu_bw`` GB/s (= bytes/ns), ``link_lat``/
``cpu_lat``/``lat`` ns, ``f_half`` FLOPs, ``b_half``/``l2_bytes`` bytes; times ns.
"""

from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import yaml

from jaxsim.errors import JaxsimInputError
from jaxsim.latency.base import AbstractLatencyModel, BatchShape
from jaxsim.latency.profile import split_stages
from jaxsim.model import ModelConfig
from jaxsim.operators import kv_bytes_per_token, layer_operators, moe_expert_shapes

_F = jnp.float64
_I = jnp.int64
_REPO = Path(__file__).resolve().parents[2]
CALIBRATION_FILE = _REPO / "profiles" / "specs" / "roofline_calibration.yaml"
CLASSES = ("gemm", "attn_prefill", "attn_decode", "memory", "moe")
GEMM, ATTN_PREFILL, ATTN_DECODE, MEMORY, MOE = range(len(CLASSES))
PARAMS = ("e_max", "f_half", "b_max", "b_half", "lat", "p")
OPTIONAL_PARAMS = ("l2_gain",)  # default 0 (no L2 speed-up); >= 0
# FA2's paged-KV (split-KV) forward kernel's query tile, rows (flash-attention
# csrc/flash_attn/src/flash_fwd_launch_template.h, run_mha_fwd_splitkv_dispatch: kBlockM = 64)
MIXED_QUERY_TILE = 64.0
# Uncalibrated starting point (and the fallback without a calibration file): 70% of peak FLOP/s
# and 80% of peak bandwidth (AIConfigurator's mem_bw_empirical_scaling_factor), half efficiency at
# 1 GFLOP / 1 MB, a 3 µs floor (its mem_empirical_constant_latency), p = 4.
DEFAULT_CALIBRATION = {c: {"e_max": 0.7, "f_half": 1e9, "b_max": 0.8, "b_half": 1e6, "lat": 3000.0, "p": 4.0,
                           "l2_gain": 1.0 if c == "memory" else 0.0} for c in CLASSES}


class Efficiency(eqx.Module):
    """The calibrated efficiency parameters, one value per operator class (f64 [5], ``CLASSES``
    order): peak fractions ``e_max``, ``b_max`` in (0, 1]; sizes at half efficiency ``f_half``
    (FLOPs), ``b_half`` (bytes); latency floor ``lat`` (ns per kernel); p-norm exponent ``p``
    (>= 1); ``l2_gain`` (>= 0): bandwidth gain of L2-resident bytes over DRAM (module docstring)."""

    e_max: jax.Array
    f_half: jax.Array
    b_max: jax.Array
    b_half: jax.Array
    lat: jax.Array
    p: jax.Array
    l2_gain: jax.Array

    @staticmethod
    def from_dict(cal: dict, where: str = "calibration") -> "Efficiency":
        """From ``{class: {param: value}}`` (every class and parameter of ``PARAMS`` required;
        ``OPTIONAL_PARAMS`` default to 0)."""
        vals = {k: [] for k in PARAMS + OPTIONAL_PARAMS}
        for c in CLASSES:
            row = cal.get(c) if isinstance(cal, dict) else None
            if not isinstance(row, dict):
                raise JaxsimInputError(f"{where}: {c}", "missing operator class", f"classes: {', '.join(CLASSES)}")
            for k in PARAMS:
                v = row.get(k)
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v <= 0:
                    raise JaxsimInputError(f"{where}: {c}.{k}", f"must be a finite number > 0, got {v!r}")
                vals[k].append(float(v))
            for k in OPTIONAL_PARAMS:
                v = row.get(k, 0.0)
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0:
                    raise JaxsimInputError(f"{where}: {c}.{k}", f"must be a finite number >= 0, got {v!r}")
                vals[k].append(float(v))
        return Efficiency(**{k: jnp.asarray(v, _F) for k, v in vals.items()})

    def to_dict(self) -> dict:
        a = {k: np.asarray(getattr(self, k), np.float64) for k in PARAMS + OPTIONAL_PARAMS}
        return {c: {k: float(a[k][i]) for k in PARAMS + OPTIONAL_PARAMS} for i, c in enumerate(CLASSES)}


def load_calibration(path=None) -> Efficiency:
    """The fitted :class:`Efficiency` from ``path`` (default ``profiles/specs/roofline_calibration.yaml``
    of the repository; its ``classes`` mapping). Falls back to ``DEFAULT_CALIBRATION`` only when the
    default file is absent; a given path that does not exist is an error."""
    p = Path(path) if path is not None else CALIBRATION_FILE
    if not p.is_file():
        if path is None:
            return Efficiency.from_dict(DEFAULT_CALIBRATION)
        raise JaxsimInputError(str(p), "no roofline calibration file", "run scripts/fit_roofline.py")
    raw = yaml.safe_load(p.read_text()) or {}
    return Efficiency.from_dict(raw.get("classes"), where=f"{p}: classes")


def pnorm(a, b, p):
    """``(a^p + b^p)^(1/p)`` for a, b > 0, scaled by the larger one (no overflow for large p;
    the gradient is exact: by homogeneity it does not depend on which branch ``max`` takes)."""
    m = jnp.maximum(a, b)
    return m * ((a / m) ** p + (b / m) ** p) ** (1.0 / p)


def kernel_ns(flops, nbytes, cls, eff: Efficiency, peak_flops, mem_bw, kernels=1.0, l2_bytes=0.0):
    """One operator's time in ns (float64, broadcasting) of class index ``cls`` (int array):
    ``kernels*lat + pnorm((F + f_half)/(peak*e_max), (B + b_half)/(bw_eff*b_max); p)`` with
    ``peak_flops`` in TFLOP/s (x1e3 = FLOP/ns), ``mem_bw`` in GB/s (= bytes/ns), ``kernels`` the
    operator's kernel launches and ``l2_bytes`` the L2 size in bytes (0: none given), ``bw_eff =
    mem_bw * (1 + l2_gain / (1 + (B/l2_bytes)^4))`` (module docstring)."""
    g = lambda x: jnp.take(x, cls)  # noqa: E731
    l2 = jnp.asarray(l2_bytes, _F)
    resident = jnp.where(l2 > 0, 1.0 / (1.0 + (nbytes / jnp.where(l2 > 0, l2, 1.0)) ** 4), 0.0)
    bw = mem_bw * (1.0 + g(eff.l2_gain) * resident)
    tc = (flops + g(eff.f_half)) / (peak_flops * 1e3 * g(eff.e_max))
    tm = (nbytes + g(eff.b_half)) / (bw * g(eff.b_max))
    return kernels * g(eff.lat) + pnorm(tc, tm, g(eff.p))


def attention_ns(pc, nd, f_p, b_p, f_d, b_d, eff: Efficiency, peak_flops, mem_bw):
    """One attention layer's time in ns from :func:`attention_work`'s parts: the prefill kernel
    (``pc > 0``) plus the decode kernel (``nd > 0``), or for a mixed batch (both) ONE kernel of class
    ``attn_prefill`` over ``F_p + MIXED_QUERY_TILE * F_d`` FLOPs and ``B_p + B_d`` bytes (module
    docstring); 0 for an empty batch."""
    pc, nd = jnp.asarray(pc), jnp.asarray(nd)
    t_p = kernel_ns(f_p, b_p, ATTN_PREFILL, eff, peak_flops, mem_bw)
    t_d = kernel_ns(f_d, b_d, ATTN_DECODE, eff, peak_flops, mem_bw)
    t_mix = kernel_ns(f_p + MIXED_QUERY_TILE * f_d, b_p + b_d, ATTN_PREFILL, eff, peak_flops, mem_bw)
    return jnp.where((pc > 0) & (nd > 0), t_mix, jnp.where(pc > 0, t_p, 0.0) + jnp.where(nd > 0, t_d, 0.0))


def attention_work(q_heads_dim, kv_tok, q_bytes, pc, kp, nd, kvd_sum):
    """``(F_prefill, B_prefill, F_decode, B_decode)`` of one attention layer on one rank (module
    docstring): ``q_heads_dim`` = query heads x head_dim per rank, ``kv_tok`` K+V bytes per token,
    ``q_bytes`` bytes of one token's queries (= its output)."""
    pc, kp, nd, kvd_sum = (jnp.asarray(x).astype(_F) for x in (pc, kp, nd, kvd_sum))
    f_p = 4.0 * q_heads_dim * pc * (kp + (pc + 1.0) / 2.0)
    b_p = (kp + pc) * kv_tok + pc * (2.0 * q_bytes + kv_tok)
    f_d = 4.0 * q_heads_dim * kvd_sum
    b_d = kvd_sum * kv_tok + nd * (2.0 * q_bytes + kv_tok)
    return f_p, b_p, f_d, b_d


def moe_work(tokens, assignments, activated, hidden, experts, expert_nk, act_bytes, weight_bytes):
    """``(F, B)`` of one fused MoE block on one rank: ``tokens`` routed by the (replicated) router,
    ``assignments`` token-expert pairs computed here over ``activated`` experts; ``expert_nk`` =
    ``n1*k1 + n2*k2`` (weights per expert), plus ``n1 + k1 + n2 + k2`` as the per-assignment
    activation elements (passed as a pair ``(nk, rows)``)."""
    nk, rows = expert_nk
    f = 2.0 * assignments * nk + 2.0 * tokens * hidden * experts
    b = (activated * nk * weight_bytes + assignments * rows * act_bytes + 2.0 * tokens * hidden * act_bytes
         + hidden * experts * weight_bytes)
    return f, b


class RooflineModel(AbstractLatencyModel):
    """A spec sheet, the calibration and one model's shape constants; every leaf is a JAX array
    (float64 unless noted), so configurations stack (:func:`stack_rooflines`) and ``vmap``.
    Build with :meth:`from_spec`; change the hardware with :func:`with_hardware`."""

    # hardware (units: module docstring)
    peak_flops: jax.Array  # TFLOP/s at the model's compute dtype
    mem_bw: jax.Array  # GB/s
    link_bw: jax.Array  # GB/s
    link_lat: jax.Array  # ns per ring step
    cpu_bw: jax.Array  # GB/s, host memory (token ids in, sampled ids out)
    cpu_lat: jax.Array  # ns
    l2_bytes: jax.Array  # L2 size, bytes (0: the sheet gives none)
    eff: Efficiency
    # dense / per-sequence operators, R rows (zero-padded by stack_rooflines)
    op_flops: jax.Array  # [R] FLOPs per row
    op_bytes: jax.Array  # [R] bytes per row
    op_fixed: jax.Array  # [R] bytes per call (weights)
    op_cls: jax.Array  # i32 [R] class index
    op_kern: jax.Array  # [R] kernel launches per call
    op_by_seq: jax.Array  # bool [R] keyed by sequences
    op_mult: jax.Array  # [R] occurrences per iteration
    op_pro: jax.Array  # [R] occurrences in the prologue (pipeline stage 0)
    op_head: jax.Array  # [R] occurrences in the head (last stage)
    # attention
    att_per_block: jax.Array
    q_heads_dim: jax.Array  # query heads per rank x head_dim
    q_bytes: jax.Array  # bytes of one token's queries on one rank
    kv_tok: jax.Array  # K+V bytes per token, layer and rank
    # layers, parallelism, collectives
    num_layers: jax.Array  # i64 L
    l_moe: jax.Array  # MoE blocks (L_moe)
    hidden: jax.Array
    act_bytes: jax.Array
    weight_bytes: jax.Array
    tp: jax.Array  # i64
    pp: jax.Array  # i64
    ep: jax.Array  # i64
    ar_count: jax.Array  # TP AllReduces per iteration
    # MoE
    moe_k: jax.Array
    moe_experts: jax.Array
    moe_nk: jax.Array  # n1*k1 + n2*k2 of one expert
    moe_rows: jax.Array  # n1 + k1 + n2 + k2

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_spec(cls, spec, model: ModelConfig, *, tp: int = 1, pp: int = 1, ep: int = 1, act_bytes: int = 2,
                  weight_bytes: int = 2, kv_bytes: int = 2, calibration=None, dtype: "str | None" = None,
                  cpu_bw_gbs: float = 256.0, cpu_lat_ns: float = 0.0, profiles_dir=None) -> "RooflineModel":
        """One configuration from a :class:`jaxsim.specs.SpecSheet` (or a sheet name / path for
        :func:`jaxsim.specs.load_spec`) and a model.

        Args:
          tp, pp, ep: tensor, pipeline and expert parallel degrees (ep is 1 for a dense model).
          act_bytes, weight_bytes, kv_bytes: bytes per activation, weight and KV element.
          calibration: an :class:`Efficiency`, a ``{class: {param: value}}`` dict, a calibration
            YAML path, or None (``profiles/specs/roofline_calibration.yaml``).
          dtype: the compute dtype whose peak is used (default bf16, or fp8 for 1-byte weights).
          cpu_bw_gbs, cpu_lat_ns: host memory, as ``HardwareConfig.cpu_mem_*`` (the sheet has none).
          profiles_dir: where ``architectures/<model_type>.yaml`` is (default the repository's).

        Raises:
          JaxsimInputError: the sheet lacks the dtype's peak, the architecture YAML is missing, or
            ep does not divide into the model's experts.
        """
        from jaxsim.profiles import load_architecture
        from jaxsim.specs import SpecSheet, load_spec

        if not isinstance(spec, SpecSheet):
            spec = load_spec(spec)
        if isinstance(calibration, Efficiency):
            eff = calibration
        elif isinstance(calibration, dict):
            eff = Efficiency.from_dict(calibration)
        else:
            eff = load_calibration(calibration)
        dtype = dtype or ("bf16" if weight_bytes >= 2 else "fp8")
        seq, cat, _ = load_architecture(profiles_dir or _REPO / "profiles", model.model_type)
        ops = layer_operators(model, tp, act_bytes, weight_bytes)
        has_moe = any(cat[n] == "moe" for g in ("pre_attn", "post_attn", "mlp_dense", "mlp_moe") for n in seq[g])
        L = model.num_layers
        L_moe = model.n_moe_layers if has_moe else 0
        L_dense = L - L_moe
        if not has_moe:
            ep = 1
        elif not (1 <= ep <= model.num_experts):
            raise JaxsimInputError("roofline ep", f"must be in [1, {model.num_experts}], got {ep}")
        names = []
        for g in ("prologue", "pre_attn", "post_attn", "mlp_dense", "mlp_moe", "head"):
            names += [n for n in seq[g] if cat[n] in ("dense", "per_sequence") and n not in names]
        missing = [n for n in names if n not in ops]
        if missing:
            raise JaxsimInputError(f"architectures/{model.model_type}.yaml", f"layers {missing} have no operator "
                                   "model in jaxsim.operators", "add them to jaxsim.operators.layer_operators")
        cnt = lambda g, n: seq[g].count(n)  # noqa: E731
        mult = [L * (cnt("pre_attn", n) + cnt("post_attn", n)) + L_dense * cnt("mlp_dense", n)
                + L_moe * cnt("mlp_moe", n) + cnt("prologue", n) + cnt("head", n) for n in names]
        o = [ops[n] for n in names]
        (n1, k1), (n2, k2) = moe_expert_shapes(model, 1) if has_moe else ((0, 0), (0, 0))
        f = lambda x: jnp.asarray(x, _F)  # noqa: E731
        i = lambda x: jnp.asarray(x, _I)  # noqa: E731
        qhd = (model.num_heads // tp) * model.head_dim
        return cls(
            peak_flops=f(spec.peak(dtype)), mem_bw=f(spec.mem_bw_gbs), link_bw=f(spec.link_bw_gbs),
            link_lat=f(spec.link_latency_us * 1e3), cpu_bw=f(cpu_bw_gbs), cpu_lat=f(cpu_lat_ns),
            l2_bytes=f((spec.l2_mib or 0.0) * 2.0 ** 20), eff=eff,
            op_flops=f([x.flops_per_row for x in o]), op_bytes=f([x.bytes_per_row for x in o]),
            op_fixed=f([x.fixed_bytes for x in o]),
            op_cls=jnp.asarray([GEMM if x.kind == "gemm" else MEMORY for x in o], jnp.int32),
            op_kern=f([x.kernels for x in o]),
            op_by_seq=jnp.asarray([x.keyed_by == "sequences" for x in o], bool), op_mult=f(mult),
            op_pro=f([cnt("prologue", n) for n in names]), op_head=f([cnt("head", n) for n in names]),
            att_per_block=f(sum(1 for g in ("pre_attn", "post_attn") for n in seq[g] if cat[n] == "attention")),
            q_heads_dim=f(qhd), q_bytes=f(qhd * act_bytes), kv_tok=f(kv_bytes_per_token(model, tp, kv_bytes)),
            num_layers=i(L), l_moe=f(L_moe), hidden=f(model.hidden_size), act_bytes=f(act_bytes),
            weight_bytes=f(weight_bytes), tp=i(tp), pp=i(pp), ep=i(ep),
            ar_count=f(L * cnt("post_attn", "o_proj") + L_dense * cnt("mlp_dense", "down_proj")),
            moe_k=f(model.experts_per_token), moe_experts=f(model.num_experts),
            moe_nk=f(n1 * k1 + n2 * k2), moe_rows=f(n1 + k1 + n2 + k2),
        )

    # ------------------------------------------------------------------ interface
    def iteration_time(self, shape: BatchShape):
        return jnp.floor(iteration_ns(self, shape)).astype(_I), jnp.zeros(4, jnp.int32)

    def iteration_ns(self, shape: BatchShape):
        return iteration_ns(self, shape)

    def stage_times(self, shape: BatchShape, max_pp: int):
        pro, blocks, head = _parts(self, shape)
        total = jnp.floor(pro + blocks + head).astype(_I)
        t_pro, t_head = jnp.floor(pro).astype(_I), jnp.floor(head).astype(_I)
        st = split_stages(total, t_pro, t_head, self.num_layers, self.pp, max_pp)
        T = jnp.asarray(shape.tokens).astype(_F)
        p2p = jnp.floor(self.link_lat + T * self.hidden * self.act_bytes / self.link_bw).astype(_I)
        return st, jnp.zeros(4, jnp.int32), p2p


def _ring(m: RooflineModel, steps, msg_bytes):
    return steps * (m.link_lat + msg_bytes / m.link_bw)


def _parts(m: RooflineModel, shape: BatchShape):
    """``(stage-0 part, blocks, last-stage part)`` of one iteration, float64 ns."""
    T, S, pc, kp, nd, kvd_sum, _, _ = (jnp.asarray(x).astype(_F) for x in shape.args())
    e = m.eff
    # dense and per-sequence operators
    x = jnp.where(m.op_by_seq, jnp.maximum(S, 1.0), jnp.maximum(T, 1.0))
    t_op = kernel_ns(m.op_flops * x, m.op_bytes * x + m.op_fixed, m.op_cls, e, m.peak_flops, m.mem_bw, m.op_kern,
                     m.l2_bytes)
    t_lin = jnp.sum(m.op_mult * t_op)
    t_pro = jnp.sum(m.op_pro * t_op)
    t_head = jnp.sum(m.op_head * t_op)
    # attention, one layer
    f_p, b_p, f_d, b_d = attention_work(m.q_heads_dim, m.kv_tok, m.q_bytes, pc, kp, nd, kvd_sum)
    t_att = attention_ns(pc, nd, f_p, b_p, f_d, b_d, e, m.peak_flops, m.mem_bw)
    # TP AllReduce (ring)
    tpf = m.tp.astype(_F)
    ar = _ring(m, 2.0 * (tpf - 1.0), T * m.hidden * m.act_bytes / tpf)
    # MoE block per EP rank (BALANCED)
    epf = m.ep.astype(_F)
    assign = T * m.moe_k / epf
    ae = jnp.maximum(jnp.minimum(jnp.round(assign), m.moe_experts / epf), 1.0)
    f_m, b_m = moe_work(T, assign, ae, m.hidden, m.moe_experts, (m.moe_nk, m.moe_rows), m.act_bytes, m.weight_bytes)
    t_moe = kernel_ns(f_m, b_m, MOE, e, m.peak_flops, m.mem_bw)
    ag = _ring(m, epf - 1.0, jnp.maximum(1.0, jnp.floor(T / epf)) * (m.hidden + m.moe_experts) * m.act_bytes)
    rs = _ring(m, epf - 1.0, T * m.hidden * m.act_bytes / epf)
    moe_block = t_moe + jnp.where(m.ep > 1, ag + rs, 0.0)
    # host memory ops
    t_in = m.cpu_lat + 2.0 * m.act_bytes * T / m.cpu_bw
    t_out = m.cpu_lat + 4.0 * T / m.cpu_bw
    blocks = (t_lin - t_pro - t_head) + m.num_layers.astype(_F) * m.att_per_block * t_att + m.ar_count * ar \
        + m.l_moe * moe_block
    return t_in + t_pro, blocks, t_head + t_out


def iteration_ns(m: RooflineModel, shape: BatchShape):
    """The iteration's time in float64 ns (differentiable in every float leaf of ``m``);
    :meth:`RooflineModel.iteration_time` is its floor."""
    pro, blocks, head = _parts(m, shape)
    return pro + blocks + head


def with_hardware(m: RooflineModel, *, peak_flops=None, mem_bw=None, link_bw=None, link_lat=None, cpu_bw=None,
                  cpu_lat=None, l2_bytes=None) -> RooflineModel:
    """A copy of ``m`` with the given hardware parameters replaced (units as the fields: TFLOP/s,
    GB/s, ns, bytes; scalars or arrays broadcastable to the field's shape, e.g. a stacked model's [n])."""
    new = {k: v for k, v in dict(peak_flops=peak_flops, mem_bw=mem_bw, link_bw=link_bw, link_lat=link_lat,
                                 cpu_bw=cpu_bw, cpu_lat=cpu_lat, l2_bytes=l2_bytes).items() if v is not None}
    for k, v in new.items():
        try:
            a = np.asarray(v, np.float64)
        except Exception:  # a traced value (a sweep knob inside jit): the caller's to check
            continue
        if not np.all(np.isfinite(a)) or not np.all(a >= 0 if k in ("link_lat", "cpu_lat", "l2_bytes") else a > 0):
            raise JaxsimInputError(f"with_hardware {k}", f"must be finite and > 0 (>= 0 for latencies), got {v!r}")
    names = tuple(new)
    if not names:
        return m
    return eqx.tree_at(lambda r: tuple(getattr(r, k) for k in names), m,
                       tuple(jnp.broadcast_to(jnp.asarray(new[k], _F), jnp.shape(getattr(m, k))) for k in names))


def stack_rooflines(models: list) -> RooflineModel:
    """Stack configurations on a leading axis for ``vmap``: the operator rows are zero-padded to
    the longest (a padded row has multiplicity 0 and costs nothing)."""
    if not models:
        raise ValueError("stack_rooflines needs at least one model")
    R = max(int(m.op_flops.shape[0]) for m in models)

    def pad(m):
        r = R - int(m.op_flops.shape[0])
        if not r:
            return m
        names = ("op_flops", "op_bytes", "op_fixed", "op_cls", "op_kern", "op_by_seq", "op_mult", "op_pro", "op_head")
        return eqx.tree_at(lambda x: tuple(getattr(x, k) for k in names), m,
                           tuple(jnp.pad(getattr(m, k), (0, r)) for k in names))

    padded = [pad(m) for m in models]
    defs = {jax.tree.structure(m) for m in padded}
    if len(defs) != 1:
        raise ValueError("stack_rooflines: the models' static fields differ")
    return jax.tree.map(lambda *xs: jnp.stack(xs), *padded)
