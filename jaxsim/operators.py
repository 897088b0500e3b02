"""The operators of one transformer layer, per TP rank: GEMM shapes, FLOPs and bytes.

Shared by everything that prices a layer without a measured profile of it: the operator-database
converter (:mod:`jaxsim.operator_db`: a GEMM table lookup at the layer's ``(n, k)``, a bandwidth
model for the rest), the roofline latency model (:mod:`jaxsim.latency.roofline`: FLOPs against
peak FLOP/s, bytes against memory bandwidth) and the profiler (:mod:`jaxsim.profiler`: the shapes
it times). Layer names are the architecture YAMLs' (``profiles/architectures/*.yaml``: vLLM's
attribute names), so an operator here is a row of a profile bundle's ``dense.csv`` or
``per_sequence.csv``.

Sizes follow vLLM's tensor-parallel sharding (Megatron layout): QKV and gate/up are column
parallel (output dimension / tp), o_proj and down_proj row parallel (input dimension / tp), the
vocabulary of ``lm_head`` and ``embedding`` split by tp; norms, rotary and the sampler see the
full hidden size (the sampler the full vocabulary: logits are gathered before sampling).

Byte counts of the memory-bound operators are what the kernel must read and write once
(activations at ``act_bytes``, weights at ``weight_bytes``, logits as float32); launch costs and
cache effects are the pricing model's business, not this module's.
"""

import dataclasses

from jaxsim.model import ModelConfig

LOGIT_BYTES = 4  # vLLM computes logits and samples in float32
SAMPLER_KERNELS = 10  # kernel launches of vLLM's V1 sampler (estimate; see layer_operators)


@dataclasses.dataclass(frozen=True)
class Operator:
    """One layer of the architecture sequence on one TP rank, for a batch of ``x`` rows
    (tokens for ``keyed_by == "tokens"``, sequences for ``"sequences"``).

    ``kind``: ``"gemm"`` (a ``[x, k] @ [k, n]`` matrix product, ``n``/``k`` set) or ``"memory"``
    (an element-wise / gather / reduction kernel). FLOPs are ``flops_per_row * x``; bytes moved are
    ``bytes_per_row * x + fixed_bytes`` (a GEMM's weights, a norm's weight vector). ``kernels``: the
    GPU kernels the layer launches (each pays a launch / latency floor in a pricing model; 1 for a
    fused kernel, more for a layer that is a chain of small ones such as the sampler).
    """

    name: str
    kind: str  # "gemm" | "memory"
    keyed_by: str  # "tokens" | "sequences"
    n: int = 0
    k: int = 0
    flops_per_row: float = 0.0
    bytes_per_row: float = 0.0
    fixed_bytes: float = 0.0
    kernels: int = 1

    def flops(self, x):
        return self.flops_per_row * x

    def bytes(self, x):
        return self.bytes_per_row * x + self.fixed_bytes


def _gemm(name, n, k, act, w, keyed_by="tokens") -> Operator:
    # [x, k] @ [k, n]: 2nk FLOPs per row; reads the row (k) and writes it (n), reads the weights once.
    return Operator(name, "gemm", keyed_by, n=int(n), k=int(k), flops_per_row=2.0 * n * k,
                    bytes_per_row=float((n + k) * act), fixed_bytes=float(n * k * w))


def _mem(name, bytes_per_row, fixed=0.0, flops_per_row=0.0, keyed_by="tokens", kernels=1) -> Operator:
    return Operator(name, "memory", keyed_by, flops_per_row=float(flops_per_row),
                    bytes_per_row=float(bytes_per_row), fixed_bytes=float(fixed), kernels=int(kernels))


def layer_operators(model: ModelConfig, tp: int = 1, act_bytes: int = 2, weight_bytes: int = 2) -> dict:
    """``{layer name: Operator}`` for every dense and per-sequence layer the architectures name
    (attention and MoE are priced from their own tables or formulas, not here).

    ``tp``: tensor-parallel degree (heads, intermediate size and vocabulary are divided by it;
    integer division, as vLLM shards). Raises nothing: a layer a model does not use (``qk_norm``
    on Llama) is simply never looked up.
    """
    h, a, w = model.hidden_size, act_bytes, weight_bytes
    q, kv = model.q_dim // tp, model.kv_dim // tp
    inter = model.intermediate_size // tp
    vocab = model.vocab_size // tp
    return {
        # a gather of one row of the (vocab-sharded) table per token, written out
        "embedding": _mem("embedding", 2 * h * a),
        # vLLM's fused residual-add RMSNorm: reads x and the residual, writes both (4 rows of H)
        "layernorm": _mem("layernorm", 4 * h * a, fixed=h * w, flops_per_row=4 * h),
        "final_layernorm": _mem("final_layernorm", 4 * h * a, fixed=h * w, flops_per_row=4 * h),
        "qkv_proj": _gemm("qkv_proj", q + 2 * kv, h, a, w),
        # per-head RMSNorm of q and k (Qwen3): read and write both
        "qk_norm": _mem("qk_norm", 2 * (q + kv) * a, fixed=2 * model.head_dim * w, flops_per_row=4 * (q + kv)),
        # rotary embedding of q and k in place, reading the cos/sin cache row (head_dim values)
        "rotary_emb": _mem("rotary_emb", (2 * (q + kv) + model.head_dim) * a, flops_per_row=3 * (q + kv)),
        "o_proj": _gemm("o_proj", h, q, a, w),
        "gate_up_proj": _gemm("gate_up_proj", 2 * inter, h, a, w),
        # SiluAndMul: reads gate and up, writes their product
        "act_fn": _mem("act_fn", 3 * inter * a, flops_per_row=4 * inter),
        "down_proj": _gemm("down_proj", h, inter, a, w),
        # per sequence: the last token's hidden state times the vocabulary shard
        "lm_head": _gemm("lm_head", vocab, h, a, w, keyed_by="sequences"),
        # softmax / top-k / sampling over the full float32 logits (read, written once). Kernels: vLLM's V1
        # Sampler on its random path is a chain of small torch ops (float32 cast, greedy argmax, temperature
        # divide, softmax, exponential draw, divide, argmax, where on temperature, int casts): ~10 launches,
        # an estimate from its forward, not a count from a trace.
        "sampler": _mem("sampler", 2 * model.vocab_size * LOGIT_BYTES, flops_per_row=5 * model.vocab_size,
                        keyed_by="sequences", kernels=SAMPLER_KERNELS),
    }


def attention_flops(model: ModelConfig, tp: int, q_tokens, kv_tokens):
    """FLOPs of one attention layer on one rank: ``q_tokens`` queries each attending over
    ``kv_tokens`` keys on average (QK^T and PV: ``4 * heads * head_dim`` per query-key pair)."""
    return 4.0 * (model.num_heads // tp) * model.head_dim * q_tokens * kv_tokens


def kv_bytes_per_token(model: ModelConfig, tp: int, kv_bytes: int = 2) -> int:
    """K and V bytes of one token in one layer on one rank (what attention reads per key)."""
    return 2 * (model.kv_dim // tp) * kv_bytes


def moe_expert_shapes(model: ModelConfig, tp: int = 1) -> tuple:
    """``(n, k)`` of an expert's fused gate/up GEMM and of its down GEMM under expert tensor
    parallelism ``tp`` (the MoE intermediate size split by it): ``((2I/tp, H), (H, I/tp))``."""
    inter = model.moe_intermediate_size // tp
    return (2 * inter, model.hidden_size), (model.hidden_size, inter)
