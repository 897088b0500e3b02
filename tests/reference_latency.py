"""Test oracle: an obvious, scalar, plain-Python version of REFERENCE.md §2.1-§2.7.

Reads the CSVs straight into dicts of lists and evaluates one iteration with loops and ``if``s. It
shares no code with ``jaxsim.profiles`` / ``jaxsim.latency`` on purpose, so that the JAX version
can be checked against it for exact integer equality.

Conventions chosen here (and mirrored by jaxsim, see ``jaxsim/latency.py``):
  * duplicate keys in a table: the last row wins (jaxsim refuses them at load, so the shipped
    tables it is compared on have none);
  * a bracket on a key uses that key's value exactly; a table with a single key is constant;
  * the nearest-slice fallback breaks ties by the smallest (pc, nd);
  * TP AllReduce: ring, ``2(N-1)`` steps of ``link_latency + (T*H*fp/N)/link_bw``, floored to ns;
  * ``extrapolated[c]`` = 1 when any lookup of category c queried above its last key;
  * MoE with an expert popularity (a list of E probabilities; a uniform one is BALANCED): expert e
    on rank ``e*ep//E``; per rank ``local = round(T*(1-(1-P_r)**k))`` (at least 1) and
    ``act = round(Σ min(1, T*k*p_e))`` clamped to [1, |R_r|]; the block is the slowest rank's;
  * hybrid MoE: layer i has the sparse block when ``i not in mlp_only_layers`` and
    ``(i+1) % decoder_sparse_step == 0``, else the dense MLP (with its AllReduce).
"""

import csv
import math
import os
from collections import defaultdict

import yaml


def _us_to_ns(text):
    return max(1, round(float(text) * 1000))


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class RefBundle:
    def __init__(self, profiles_dir, hardware, model, tp=1, variant="bf16"):
        self.model = model
        self.tp = tp
        base = os.path.join(profiles_dir, hardware, model.name, variant)
        self.meta = yaml.safe_load(open(os.path.join(base, "meta.yaml")))
        arch = yaml.safe_load(open(os.path.join(profiles_dir, "architectures", model.model_type + ".yaml")))
        self.sequence = arch["sequence"]
        self.category = {}
        for cat, layers in arch["catalog"].items():
            for name in layers:
                self.category[name] = cat
        tpdir = os.path.join(base, f"tp{tp}")

        self.dense = defaultdict(dict)
        for r in _read_csv(os.path.join(tpdir, "dense.csv")):
            self.dense[r["layer"]][int(r["tokens"])] = _us_to_ns(r["time_us"])
        self.per_seq = defaultdict(dict)
        for r in _read_csv(os.path.join(tpdir, "per_sequence.csv")):
            self.per_seq[r["layer"]][int(r["sequences"])] = _us_to_ns(r["time_us"])
        # attention[(pc, nd)][kp][kvd] = ns
        self.attn = defaultdict(lambda: defaultdict(dict))
        for r in _read_csv(os.path.join(tpdir, "attention.csv")):
            key = (int(r["prefill_chunk"]), int(r["n_decode"]))
            self.attn[key][int(r["kv_prefill"])][int(r["kv_decode"])] = _us_to_ns(r["time_us"])
        self.pc_axis = sorted({k[0] for k in self.attn})
        self.nd_axis = sorted({k[1] for k in self.attn})

        self.moe = None
        moe_path = os.path.join(base, "tp1", "moe.csv")
        if os.path.exists(moe_path):
            self.moe = defaultdict(dict)  # moe[ae][tokens] = ns
            for r in _read_csv(moe_path):
                self.moe[int(r["activated_experts"])][int(r["tokens"])] = _us_to_ns(r["time_us"])

        fit = self.meta.get("skew_fit") or {}
        self.skew_enabled = bool(fit.get("enabled", False))
        self.alpha_default = 0.0
        self.alpha = {}
        if self.skew_enabled:
            axes = fit["bucket_axes"]
            self.axes = axes
            self.alpha_default = float(fit["per_tp"][tp]["alpha_default"])
            for r in _read_csv(os.path.join(tpdir, "skew_fit.csv")):
                key = f"pc={int(r['pc'])}|{r['n_label']}|{r['skew_rate_label']}|{r['kv_big_label']}|{r['kp_label']}"
                self.alpha[key] = float(r["alpha"])


# ---------------------------------------------------------------------------------------- lookups
def bracket(keys, q):
    """(lo, hi, t, above) on a sorted key list; REFERENCE.md §2.4/§2.5 step 1."""
    n = len(keys)
    if q <= keys[0] or n == 1:
        return 0, 0, 0.0, q > keys[-1]
    if q > keys[-1]:
        lo, hi = n - 2, n - 1
        return lo, hi, (q - keys[lo]) / (keys[hi] - keys[lo]), True
    for i in range(n):
        if keys[i] == q:
            return i, i, 0.0, False
        if keys[i] > q:
            lo, hi = i - 1, i
            return lo, hi, (q - keys[lo]) / (keys[hi] - keys[lo]), False
    raise AssertionError


def lookup_1d(table, q):
    """Float value (not yet truncated) and whether q is above the last key."""
    keys = sorted(table)
    lo, hi, t, above = bracket(keys, q)
    a, b = float(table[keys[lo]]), float(table[keys[hi]])
    return a + t * (b - a), above


def trunc(v):
    return max(1, int(v))


def attn_float(bundle, pc, kp, nd, kvd):
    """Unrounded 4-D attention value, §2.5."""
    pcl, pch, tpc, a1 = bracket(bundle.pc_axis, pc)
    ndl, ndh, tnd, a2 = bracket(bundle.nd_axis, nd)
    above = a1 or a2

    def corner(pi, ni):
        key = (bundle.pc_axis[pi], bundle.nd_axis[ni])
        if key not in bundle.attn:
            best = None
            for k in sorted(bundle.attn):
                d = (k[0] - key[0]) ** 2 + (k[1] - key[1]) ** 2
                if best is None or d < best[0]:
                    best = (d, k)
            key = best[1]
        sl = bundle.attn[key]
        kps = sorted(sl)
        lo, hi, t, ab = bracket(kps, kp)
        rows = []
        for kpi in (lo, hi):
            v, ab2 = lookup_1d(sl[kps[kpi]], kvd)
            rows.append(v)
            ab = ab or ab2
        return rows[0] + t * (rows[1] - rows[0]), ab

    c00, b00 = corner(pcl, ndl)
    c01, b01 = corner(pcl, ndh)
    c10, b10 = corner(pch, ndl)
    c11, b11 = corner(pch, ndh)
    v0 = c00 + tnd * (c01 - c00)
    v1 = c10 + tnd * (c11 - c10)
    out = v0 + tpc * (v1 - v0)
    return out, above or b00 or b01 or b10 or b11


def attn(bundle, pc, kp, nd, kvd):
    v, above = attn_float(bundle, pc, kp, nd, kvd)
    return trunc(v), above


def label(bins, labels, value):
    for i in range(len(labels)):
        if value <= bins[i + 1]:
            return labels[i]
    return labels[-1]


def attention_term(bundle, pc, kp, nd, kvd_sum, kvd_min, kvd_max):
    """§2.5 + §2.6: the attention time of one layer, and the 'above grid' flag."""
    if pc == 0 and nd == 0:
        return 0, False
    kvd = kvd_sum // nd if nd > 0 else 0
    t_mean, above = attn(bundle, pc, kp, nd, kvd)
    if not (nd > 1 and kvd_max != kvd):
        return t_mean, above
    alpha = 0.0
    if bundle.skew_enabled:
        ax = bundle.axes
        sr = (kvd - kvd_min) / (kvd_max - kvd_min) if kvd_max != kvd_min else 0.0
        sr = min(1.0, max(0.0, sr))
        key = "pc={}|{}|{}|{}|{}".format(
            pc,
            label(ax["n_bins"], ax["n_labels"], nd),
            label(ax["skew_rate_bins"], ax["skew_rate_labels"], sr),
            label(ax["kv_big_bins"], ax["kv_big_labels"], kvd_max),
            label(ax["kp_bins"], ax["kp_labels"], kp),
        )
        on_grid = pc % 16 == 0 and 0 <= pc <= 2048
        alpha = bundle.alpha.get(key, bundle.alpha_default) if on_grid else bundle.alpha_default
    t_max, above2 = attn(bundle, pc, kp, nd, kvd_max)
    above = above or above2
    if alpha == 0 or t_max <= t_mean:
        return t_mean, above
    return round(t_mean + alpha * (t_max - t_mean)), above


def moe_lookup(bundle, tokens, ae):
    tokens, ae = max(tokens, 1), max(ae, 1)
    axis = sorted(bundle.moe)
    lo, hi, t, above = bracket(axis, ae)
    va, a1 = lookup_1d(bundle.moe[axis[lo]], tokens)
    vb, a2 = lookup_1d(bundle.moe[axis[hi]], tokens)
    return trunc(va + t * (vb - va)), above or a1 or a2


def ring_cost(steps, link_lat, msg_bytes, link_bw):
    return int(math.floor(steps * (link_lat + msg_bytes / link_bw)))


def is_uniform(popularity):
    E = len(popularity)
    return all(abs(p - 1 / E) <= 1e-9 * (1 / E) for p in popularity)


def moe_routing(T, k, E, ep, popularity=None):
    """Per EP rank ``(local_tokens, activated)`` before the lookup's ``max(·, 1)`` (§1.9)."""
    if popularity is None or is_uniform(popularity):
        activated = min(round(T * k / ep), E / ep)  # BALANCED, the same on every rank
        local = round(T * (1 - ((ep - 1) / ep) ** k))
        return [(local, activated)] * ep
    ranks = [[] for _ in range(ep)]
    for e in range(E):
        ranks[e * ep // E].append(popularity[e])
    out = []
    for pr in ranks:
        P = sum(pr)
        local = round(T * (1 - (1 - P) ** k))
        act = round(sum(min(1.0, T * k * p) for p in pr))
        out.append((local, min(max(act, 1), len(pr))))
    return out


def moe_compute(bundle, T, ep, popularity=None):
    """``max_r moe(local_r, act_r)`` and the 'above grid' flag of any rank (§2.7)."""
    m = bundle.model
    best, above = 0, False
    for local, act in moe_routing(T, m.experts_per_token, m.num_experts, ep, popularity):
        v, a = moe_lookup(bundle, local, act)
        best, above = max(best, v), above or a
    return best, above


def n_moe_layers(model):
    if model.num_experts == 0:
        return 0
    n = 0
    for i in range(model.num_layers):
        if i not in model.mlp_only_layers and (i + 1) % model.decoder_sparse_step == 0:
            n += 1
    return n


def iteration_time(bundle, T, S, pc, kp, nd, kvd_sum, kvd_min, kvd_max, *, cpu_bw=256.0, cpu_lat=0.0,
                   link_bw=16.0, link_lat=20000.0, fp=2, hardware="RTXPRO6000", host_ops=True, ep=1,
                   popularity=None):
    """Total ns and extrapolation flags [dense, per_sequence, attention, moe] (0/1)."""
    m = bundle.model
    L, H, tp = m.num_layers, m.hidden_size, bundle.tp
    flags = [0, 0, 0, 0]
    total = 0
    if host_ops:
        total += int(math.floor(cpu_lat + 2 * fp * T / cpu_bw))
        total += int(math.floor(cpu_lat + 4 * T / cpu_bw))

    def layer_time(name):
        if name == "rotary_emb" and "TPU" in hardware:
            return 0
        cat = bundle.category[name]
        if cat == "dense":
            table = bundle.dense.get(name)
            if not table:
                return 0
            v, above = lookup_1d(table, max(T, 1))
            flags[0] |= above
            return trunc(v)
        if cat == "per_sequence":
            table = bundle.per_seq.get(name)
            if not table:
                return 0
            v, above = lookup_1d(table, max(S, 1))
            flags[1] |= above
            return trunc(v)
        if cat == "attention":
            v, above = attention_term(bundle, pc, kp, nd, kvd_sum, kvd_min, kvd_max)
            flags[2] |= above
            return v
        if cat == "moe":
            E = m.num_experts
            v, above = moe_compute(bundle, T, ep, popularity)
            flags[3] |= above
            if ep > 1:
                v += ring_cost(ep - 1, link_lat, max(1, T // ep) * (H + E) * fp, link_bw)  # dispatch AllGather
                v += ring_cost(ep - 1, link_lat, T * H * fp / ep, link_bw)  # combine ReduceScatter
            return v
        raise AssertionError(cat)

    ar = ring_cost(2 * (tp - 1), link_lat, T * H * fp / tp, link_bw) if tp > 1 else 0
    seq = bundle.sequence
    for name in seq["prologue"]:
        total += layer_time(name)
    block = 0
    for name in seq["pre_attn"]:
        block += layer_time(name)
    for name in seq["post_attn"]:
        block += layer_time(name)
        if name == "o_proj":
            block += ar
    dense_mlp = 0
    for name in seq.get("mlp_dense") or []:
        dense_mlp += layer_time(name)
        if name == "down_proj":
            dense_mlp += ar
    moe_mlp = 0
    for name in seq.get("mlp_moe") or []:
        moe_mlp += layer_time(name)
    L_moe = n_moe_layers(m) if seq.get("mlp_moe") else 0
    total += L * block + (L - L_moe) * dense_mlp + L_moe * moe_mlp
    for name in seq["head"]:
        total += layer_time(name)
    return total, [int(f) for f in flags]
