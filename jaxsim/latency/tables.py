"""Host side of the profile latency model: CSV profile bundles -> :class:`LatencyTables`.

:func:`latency_tables` turns a host-side :class:`jaxsim.profiles.ProfileBundle` into the
:class:`jaxsim.latency.profile.LatencyTables` of one configuration; :func:`stack_tables` pads and
stacks configurations for ``vmap``. Numpy only until the final ``jnp.asarray``.
"""

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from jaxsim.errors import JaxsimInputError
from jaxsim.latency.profile import LatencyTables
from jaxsim.model import ModelConfig
from jaxsim.profiles import ProfileBundle
from jaxsim.spec import HardwareConfig

_F = jnp.float64
_I = jnp.int64


def _pad_rows(rows, width, fill):
    out = np.full((len(rows), width), fill, dtype=np.float64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def _inf_pad(keys, n, axis_len):
    """Float keys with entries at positions >= n (broadcast over leading axes) set to +inf."""
    out = keys.astype(np.float64)
    out[np.arange(axis_len) >= n[..., None]] = np.inf
    return out


def _hi_edges(bins):
    hi = np.asarray(bins, np.float64)[1:].copy()
    hi[-1] = np.inf  # a value above every bin gets the last label (§2.6 step 2)
    return hi


def zipf_popularity(num_experts: int, s: float, seed: int | None = None) -> np.ndarray:
    """Zipf(s) popularity over ``num_experts`` experts: ``p ∝ 1/rank**s``, summing to 1.

    ``s = 0`` is uniform. Without a seed (or with a negative one) expert 0 is the hottest, so the
    hottest experts are packed on EP rank 0 (the worst case); a seed permutes the ranks over the
    experts, spreading the hot experts over the EP ranks.
    """
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if not (s >= 0 and math.isfinite(s)):
        raise ValueError(f"the Zipf exponent must be a finite number >= 0, got {s}")
    w = 1.0 / np.arange(1, num_experts + 1, dtype=np.float64) ** s
    p = w / w.sum()
    if seed is not None and seed >= 0:
        p = p[np.random.default_rng(seed).permutation(num_experts)]
    return p


def rank_popularity(popularity, ep: int) -> list:
    """The popularity of each EP rank's experts (expert e on rank ``floor(e*ep/E)``, §1.8)."""
    p = np.asarray(popularity, np.float64)
    owner = (np.arange(len(p)) * ep) // len(p)
    return [p[owner == r] for r in range(ep)]


def _check_popularity(p, num_experts: int) -> np.ndarray:
    where = "expert_popularity"
    try:
        p = np.asarray(p, np.float64)
    except (TypeError, ValueError):
        raise JaxsimInputError(where, "must be an array of numbers") from None
    if p.shape != (num_experts,):
        raise JaxsimInputError(where, f"must have one entry per expert ({num_experts}), got shape {p.shape}")
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise JaxsimInputError(where, "entries must be finite and >= 0")
    if abs(p.sum() - 1.0) > 1e-6:
        raise JaxsimInputError(where, f"must sum to 1, got {p.sum():.9g}")
    return p


def latency_tables(bundle: ProfileBundle, model: ModelConfig, hw: HardwareConfig, weight_bytes: int = 2,
                   *, ep: int | None = None, expert_popularity: np.ndarray | None = None,
                   link_step_overhead_ns: float = 0.0, compute_scale: float = 1.0,
                   memory_scale: float = 1.0, link_scale: float = 1.0, kv_read_scale: float = 1.0) -> LatencyTables:
    """Build the device-side tables of one configuration.

    Args:
      bundle: a bundle loaded at ``tp = hw.tp``.
      model: the model config (L, H, experts, hybrid dense MLP layers).
      hw: hardware knobs (TP link, host memory, ``ep``).
      weight_bytes: fp, bytes per weight / activation element.
      ep: expert-parallel degree of a MoE model (default: ``hw.ep``, or ``hw.tp`` when that is 0,
        REFERENCE.md §1.8; ignored for dense models).
      expert_popularity: length-E routing probabilities of a MoE model (sum 1); None = BALANCED
        (§1.9). A uniform popularity is BALANCED.
      link_step_overhead_ns: fixed extra cost per ring step of a collective (0 by default).
      kv_read_scale: KV bytes / the profile's KV bytes (0.5: an FP8 KV cache priced from bf16
        tables, REFERENCE.md §1.14; 1.0: as profiled).

    The weight-load gates (``wload_*``) start at 0 (every weight on the NPU) and the off-NPU KV
    reads (``kvloc_*``) at none (the KV cache on the NPU); the planner sets them from the
    instance's placement (:func:`jaxsim.placement.load_gates`, :func:`jaxsim.placement.kv_read_params`).
    """
    if bundle.tp != hw.tp:
        raise ValueError(f"the bundle was loaded at tp={bundle.tp} but the hardware has tp={hw.tp}")
    seq, cat = bundle.sequence, bundle.category
    attn_groups = ("pre_attn", "post_attn")
    block_groups = (*attn_groups, "mlp_dense", "mlp_moe")
    once_groups = ("prologue", "head")

    # --- MoE
    n_moe = sum(1 for g in block_groups for n in seq[g] if cat[n] == "moe")
    if n_moe and bundle.moe is not None:
        mo = bundle.moe
        moe_ae = mo.ae_axis.astype(np.float64)
        moe_tok = _inf_pad(mo.token_keys, mo.n_tokens, mo.token_keys.shape[1])
        moe_vals = mo.values_ns.astype(np.float64)
        moe_tok_last = (mo.n_tokens - 1).astype(np.int32)
    else:
        moe_ae, moe_tok, moe_vals = np.ones(1), np.ones((1, 1)), np.ones((1, 1))
        moe_tok_last = np.zeros(1, np.int32)
        n_moe = 0
    if not n_moe:
        ep = 1
    else:
        ep = ep if ep is not None else (hw.ep or hw.tp)
        if not 1 <= ep <= model.num_experts:
            raise JaxsimInputError("hardware.ep", f"must be in [1, {model.num_experts}] ({model.name}'s experts), "
                                   f"got {ep}")

    # --- layer counts: L blocks; a hybrid MoE model has dense MLPs on L_dense of them
    L = model.num_layers
    L_moe = model.n_moe_layers if n_moe else 0
    L_dense = L - L_moe
    if n_moe and L_dense and not seq["mlp_dense"]:
        raise JaxsimInputError(
            bundle.path, f"{model.name} has {L_dense} dense MLP layer(s) of {L} (mlp_only_layers="
            f"{list(model.mlp_only_layers)}, decoder_sparse_step={model.decoder_sparse_step}) but the profile "
            f"bundle has no dense MLP layers to price them (sequence.mlp_dense of {model.model_type}.yaml is empty "
            "or its rows are missing)", "profile the dense MLP (gate_up_proj, act_fn, down_proj) of this model")

    # --- expert popularity per EP rank
    skewed = False
    pop, rank_experts = np.zeros((1, 1)), np.ones(1, np.int64)
    if n_moe and expert_popularity is not None:
        p = _check_popularity(expert_popularity, model.num_experts)
        if not np.allclose(p, 1.0 / len(p), rtol=1e-9, atol=0.0):  # uniform = BALANCED (module docstring)
            skewed = True
            ranks = rank_popularity(p, ep)
            rank_experts = np.array([len(r) for r in ranks], np.int64)
            pop = _pad_rows(ranks, int(rank_experts.max()), 0.0)

    # --- 1-D layers: one row per distinct name
    names = []
    for group in ("prologue", *block_groups, "head"):
        for n in seq[group]:
            if cat[n] in ("dense", "per_sequence") and n not in names:
                names.append(n)
    mult = [L * sum(seq[g].count(n) for g in attn_groups) + L_dense * seq["mlp_dense"].count(n)
            + L_moe * seq["mlp_moe"].count(n) + sum(seq[g].count(n) for g in once_groups) for n in names]
    by_seq = [cat[n] == "per_sequence" for n in names]
    pro_mult = [seq["prologue"].count(n) for n in names]
    head_mult = [seq["head"].count(n) for n in names]
    pre_mult = [seq["pre_attn"].count(n) for n in names]  # one block's pre-attention group
    tabs = [(bundle.per_sequence if s else bundle.dense)[n] for n, s in zip(names, by_seq)]

    # --- attention, fallback slices copied into the missing corners
    at = bundle.attention
    fi, fj = at.fallback[..., 0], at.fallback[..., 1]
    KP, KV = at.kvd_keys.shape[2:]
    n_kp = at.n_kp[fi, fj]
    n_kvd = at.n_kvd[fi, fj]
    att_kp = _inf_pad(at.kp_keys[fi, fj], n_kp, KP)
    att_kvd = _inf_pad(at.kvd_keys[fi, fj], n_kvd, KV)
    att_vals = at.values_ns[fi, fj].astype(np.float64)
    n_att = sum(1 for g in block_groups for n in seq[g] if cat[n] == "attention")

    # --- level-1 matrix: pc axis, nd axis, then the layers
    l1_rows = [at.pc_axis, at.nd_axis] + [t.keys for t in tabs]
    w1 = max(len(r) for r in l1_rows)
    l1_keys = _pad_rows(l1_rows, w1, np.inf)
    l1_last = np.array([len(r) - 1 for r in l1_rows], np.int32)
    lin_vals = _pad_rows([t.values_ns for t in tabs], w1, 0.0)

    # --- skew fit: slot 0 = alpha_default, then the pc values that have buckets
    sk = bundle.skew
    present = np.flatnonzero(sk.has_alpha.reshape(len(sk.pc_grid), -1).any(axis=1))
    slot = np.zeros(len(sk.pc_grid), np.int32)
    slot[present] = np.arange(1, len(present) + 1, dtype=np.int32)
    alpha_default = sk.alpha_default if sk.enabled else 0.0
    alpha = np.full((1 + len(present), *sk.alpha.shape[1:]), alpha_default, np.float64)
    alpha[1:] = np.where(sk.has_alpha[present], sk.alpha[present], alpha_default)
    if not sk.enabled:
        alpha[:] = 0.0  # §2.6 step 3

    ar_count = L * seq["post_attn"].count("o_proj") + L_dense * seq["mlp_dense"].count("down_proj")

    f = lambda x: jnp.asarray(x, _F)  # noqa: E731
    i = lambda x: jnp.asarray(x, _I)  # noqa: E731
    i32 = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
    return LatencyTables(
        l1_keys=f(l1_keys), l1_last=i32(l1_last), lin_vals=f(lin_vals), lin_by_seq=jnp.asarray(by_seq, bool),
        lin_mult=i(mult), lin_prologue=i(pro_mult), lin_head=i(head_mult), lin_pre=i(pre_mult),
        att_kp=f(att_kp), att_kp_last=i32(n_kp - 1), att_kvd=f(att_kvd), att_kvd_last=i32(np.maximum(n_kvd - 1, 0)),
        att_vals=f(att_vals), att_per_block=i(n_att),
        skew_slot=i32(slot), skew_alpha=f(alpha), skew_n_hi=f(_hi_edges(sk.n_bins)),
        skew_sr_hi=f(_hi_edges(sk.sr_bins)), skew_kvb_hi=f(_hi_edges(sk.kvb_bins)), skew_kp_hi=f(_hi_edges(sk.kp_bins)),
        moe_ae=f(moe_ae), moe_ae_last=i32(len(moe_ae) - 1),
        moe_tok=f(moe_tok), moe_tok_last=i32(moe_tok_last), moe_vals=f(moe_vals), moe_blocks=i(L_moe * n_moe),
        moe_k=i(model.experts_per_token), moe_experts=i(model.num_experts), ep=i(ep),
        moe_skewed=jnp.asarray(skewed, bool), moe_pop=f(pop), moe_rank_experts=i(rank_experts),
        num_layers=i(L), hidden=i(model.hidden_size), weight_bytes=i(weight_bytes),
        tp=i(hw.tp), pp=i(hw.pp), ar_count=i(ar_count), link_bw=f(hw.link_bw_gbps), link_lat=f(hw.link_latency_ns),
        link_step_overhead=f(link_step_overhead_ns), cpu_bw=f(hw.cpu_mem_bw_gbps), cpu_lat=f(hw.cpu_mem_latency_ns),
        compute_scale=f(compute_scale), memory_scale=f(memory_scale), link_scale=f(link_scale),
        kv_read_scale=f(kv_read_scale), kv_read_b=f(decode_kv_fit(at)[1]), kv_scaled=kv_read_scale != 1.0,
        wload_pro=i(0), wload_blocks=i(np.zeros(L, np.int64)), wload_head=i(0),
        kvloc_lat=f(0.0), kvloc_bw=f(1.0), kvloc_bytes=f(0.0), **pim_fields(None),
    )


def pim_fields(pim_plan, hw: HardwareConfig | None = None) -> dict:
    """The :class:`LatencyTables` PIM fields (REFERENCE.md §1.11) of a
    :class:`jaxsim.pim.PimPlan` with the instance's hardware knobs ``hw`` (``pim_context``,
    ``pim_overlap``, ``enable_sub_batch_interleaving``), or, for None, of a configuration without
    PIM (the static flags off: nothing compiles)."""
    f = lambda x: jnp.asarray(x, _F)  # noqa: E731
    b = lambda x: jnp.asarray(x, bool)  # noqa: E731
    if pim_plan is None:
        return dict(pim_on=b(False), pim_a=f(0.0), pim_b=f(0.0), pim_lat=f(0.0), pim_load0=f(np.zeros(1)),
                    pim_j=f(np.zeros(1)), pim_split=jnp.asarray(1, _I), pim_prompt_ctx=b(False), pim_serial=b(False),
                    pim_io=jnp.asarray(0, _I), sub_batch_on=b(False))
    p = pim_plan
    return dict(pim_on=b(True), pim_a=f(p.placement_a), pim_b=f(p.placement_b), pim_lat=f(p.device.read_latency_ns),
                pim_load0=f(np.zeros(p.num_channels)), pim_j=f(np.arange(p.split)), pim_split=jnp.asarray(p.split, _I),
                pim_prompt_ctx=b(hw.pim_context == "prompt"), pim_serial=b(not hw.pim_overlap),
                pim_io=jnp.asarray(p.io_bytes_per_decode, _I), sub_batch_on=b(hw.enable_sub_batch_interleaving),
                pim=True, interleave=hw.enable_sub_batch_interleaving)


def decode_kv_fit(at) -> tuple:
    """``(a, b)``: decode attention fitted as ``a + b * nd * kvd`` ns (REFERENCE.md §1.14, §2.5:
    the profiled grids are close to linear in ``nd * kvd``), by least squares over every
    decode-only point of the table (``pc = 0``, ``kp = 0``, ``nd > 0``). ``b`` is the KV-read time
    per decode KV token; ``(0, 0)`` when the table has no decode-only points."""
    x, y = [], []
    for i in np.flatnonzero(at.pc_axis == 0):
        for j in np.flatnonzero(at.nd_axis > 0):
            if not at.has_slice[i, j]:
                continue
            for r in range(at.n_kp[i, j]):
                if at.kp_keys[i, j, r] != 0:
                    continue
                n = at.n_kvd[i, j, r]
                x += list(at.nd_axis[j] * at.kvd_keys[i, j, r, :n].astype(np.float64))
                y += list(at.values_ns[i, j, r, :n].astype(np.float64))
    if len(x) < 2:
        return 0.0, 0.0
    x, y = np.asarray(x), np.asarray(y)
    b, a = np.polyfit(x, y, 1)
    return float(a), float(max(b, 0.0))


_INF_PADDED = {"l1_keys", "att_kp", "att_kvd", "moe_ae", "moe_tok", "skew_n_hi", "skew_sr_hi", "skew_kvb_hi",
               "skew_kp_hi", "pim_load0"}


_STATIC = ("kv_scaled", "offload", "pim", "interleave")  # compiled paths: on for all when any configuration needs them


def table_extents(tables: list) -> dict:
    """What a stack of ``tables`` must cover: per array field its largest shape, per static flag
    whether any table sets it. A sweep computes it once for a whole group and passes it to
    :func:`stack_tables` for each chunk, so that every chunk has one shape (one compile)."""
    out = {n: any(getattr(t, n) for t in tables) for n in _STATIC}
    for f in dataclasses.fields(LatencyTables):
        if f.name not in _STATIC:
            shapes = [np.shape(getattr(t, f.name)) for t in tables]
            out[f.name] = tuple(max(s[d] for s in shapes) for d in range(len(shapes[0])))
    return out


def stack_tables(tables: list, like: "dict | None" = None) -> LatencyTables:
    """Stack configurations along a new leading axis (for ``vmap``), padding every axis.

    Keys pad with +inf and everything else with 0; every count is explicit (``*_last``,
    multiplicities, ``moe_rank_experts``), so padded rows, slices, labels and EP ranks are never
    used. ``like``: a :func:`table_extents` the result must also cover (a sweep's whole group), on
    top of ``tables``' own.
    """
    ext = table_extents(tables)
    if like is not None:
        ext = {n: (ext[n] or like[n]) if n in _STATIC else tuple(map(max, ext[n], like[n])) for n in ext}

    def stack(name, *leaves):
        leaves = [np.asarray(x) for x in leaves]  # on the host: one transfer per field
        shape = ext[name]
        fill = np.inf if name in _INF_PADDED else 0
        out = []
        for x in leaves:
            pad = [(0, shape[d] - x.shape[d]) for d in range(x.ndim)]
            out.append(np.pad(x, pad, constant_values=fill) if any(p[1] for p in pad) else x)
        return jnp.asarray(np.stack(out))

    fields = [f.name for f in dataclasses.fields(LatencyTables) if f.name not in _STATIC]
    return LatencyTables(**{n: stack(n, *(getattr(t, n) for t in tables)) for n in fields},
                         **{n: ext[n] for n in _STATIC})
