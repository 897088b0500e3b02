"""Model configuration: the dimensions of a Hugging Face config that the simulator needs.

REFERENCE.md §3.2 lists the fields read. Sizes derived here (weight bytes, KV bytes per token)
feed the KV-capacity memory model (§1.3) and the collective costs (§1.8).
"""

import dataclasses
import json
from pathlib import Path

from jaxsim.errors import JaxsimInputError, unknown_key_fix

DTYPE_BYTES = {
    "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "half": 2,
    "float32": 4, "fp32": 4, "float": 4,
    "fp8": 1, "float8": 1, "float8_e4m3fn": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "int8": 1,
}


def dtype_bytes(name: str, where: str) -> int:
    """Bytes per element of a dtype name such as ``bfloat16``; a clear error for unknown names."""
    try:
        return DTYPE_BYTES[str(name).lower()]
    except KeyError:
        raise JaxsimInputError(
            where, f"unknown dtype {name!r}", f"use one of {sorted(DTYPE_BYTES)}"
        ) from None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str  # "org/name", e.g. "meta-llama/Llama-3.1-8B"
    model_type: str  # selects profiles/architectures/<model_type>.yaml
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    torch_dtype: str
    num_experts: int = 0  # 0 for dense models
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    # Hybrid MoE (REFERENCE.md §1.9, vLLM's Qwen MoE rule): layer i has a dense MLP when it is
    # listed in ``mlp_only_layers`` or ``(i + 1) % decoder_sparse_step != 0``; else a sparse block.
    mlp_only_layers: tuple = ()
    decoder_sparse_step: int = 1

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def n_moe_layers(self) -> int:
        """Layers whose MLP is the sparse MoE block (0 for a dense model)."""
        if not self.is_moe:
            return 0
        skip = set(self.mlp_only_layers)
        return sum(1 for i in range(self.num_layers) if i not in skip and (i + 1) % self.decoder_sparse_step == 0)

    @property
    def n_dense_mlp_layers(self) -> int:
        """Layers with a dense MLP (all of them for a dense model)."""
        return self.num_layers - self.n_moe_layers

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def weight_bytes_per_rank(self, weight_bytes: int, tp: int = 1, pp: int = 1, ep: int = 1) -> int:
        """Per-rank weight bytes, REFERENCE.md §1.3 (embedding, blocks, final norm, lm_head)."""
        h, v, fp = self.hidden_size, self.vocab_size, weight_bytes
        block = 2 * h * fp + h * ((self.q_dim + 2 * self.kv_dim) // tp) * fp + (self.q_dim // tp) * h * fp
        dense_mlp = 3 * h * (self.intermediate_size // tp) * fp
        if self.is_moe:
            e = self.num_experts
            moe_mlp = h * e * fp + (e // ep) * 3 * h * self.moe_intermediate_size * fp
            n_dense = self.n_dense_mlp_layers
            if n_dense:  # hybrid: dense MLPs on some layers
                blocks = (self.num_layers // pp) * block + (self.n_moe_layers * moe_mlp + n_dense * dense_mlp) // pp
                return (v // tp) * h * fp + blocks + h * fp + h * (v // tp) * fp
            block += moe_mlp
        else:
            block += dense_mlp
        return (v // tp) * h * fp + (self.num_layers // pp) * block + h * fp + h * (v // tp) * fp

    def kv_bytes_per_token_per_rank(self, kv_bytes: int, tp: int = 1, pp: int = 1) -> int:
        """K and V bytes one token occupies on one rank (each rank holds a 1/(tp*pp) shard)."""
        return 2 * self.kv_dim * self.num_layers * kv_bytes // (tp * pp)


_REQUIRED = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
             "max_position_embeddings")


def _count(raw: dict, field: str, path, default=None) -> int:
    """``raw[field]`` as a whole number >= 1 (``default`` when absent or null; required when the
    default is None)."""
    v = raw.get(field)
    if v is None:
        if default is None:
            raise JaxsimInputError(f"{path}: {field}", "missing", "a Hugging Face config.json must define it")
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or v < 1:
        raise JaxsimInputError(f"{path}: {field}", f"must be a whole number >= 1, got {v!r}")
    return int(v)


def _experts_per_token(raw: dict, experts: int, path) -> int:
    if not experts:
        return 0
    k = _count(raw, "num_experts_per_tok", path)
    if k > experts:
        raise JaxsimInputError(f"{path}: num_experts_per_tok", f"{k} exceeds the {experts} experts")
    return k


def load_model_config(models_dir: str | Path, name: str) -> ModelConfig:
    """Read ``<models_dir>/<org>/<name>.json`` (a raw HF config), checking every field the
    simulator reads: head counts and dimensions are whole numbers >= 1, the KV heads divide the
    attention heads (grouped-query attention), a dense MLP has its ``intermediate_size`` and a MoE
    model its experts per token.

    Raises:
        JaxsimInputError: naming the file and field.
    """
    path = Path(models_dir) / f"{name}.json"
    if not path.is_file():
        known = sorted(str(p.relative_to(models_dir))[:-5] for p in Path(models_dir).glob("*/*.json"))
        raise JaxsimInputError(str(path), f"unknown model {name!r}",
                               f"{unknown_key_fix(name, known)} (configs in {models_dir})")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise JaxsimInputError(f"{path}:{e.lineno}", f"invalid JSON: {e.msg}") from None
    for field in _REQUIRED:
        if field not in raw:
            raise JaxsimInputError(str(path), f"missing required field {field!r}",
                                   "a Hugging Face config.json must define it")
    heads = _count(raw, "num_attention_heads", path)
    hidden = _count(raw, "hidden_size", path)
    expert_key = "num_local_experts" if "num_local_experts" in raw else "num_experts"
    experts = _count(raw, expert_key, path, default=0) if raw.get(expert_key) not in (None, 0) else 0
    layers = _count(raw, "num_hidden_layers", path)
    kv_heads = _count(raw, "num_key_value_heads", path, default=heads)
    if heads % kv_heads:
        raise JaxsimInputError(f"{path}: num_key_value_heads", f"{kv_heads} does not divide num_attention_heads "
                               f"({heads})", "grouped-query attention shares each KV head among whole groups")
    # A dense MLP needs its width; a MoE model's experts may have their own (moe_intermediate_size).
    intermediate = _count(raw, "intermediate_size", path, default=None if not experts else 0)
    if experts and not (intermediate or raw.get("moe_intermediate_size")):
        raise JaxsimInputError(f"{path}: moe_intermediate_size", "missing (and no intermediate_size)",
                               "a MoE config must give its experts' width")
    only = (raw.get("mlp_only_layers") or []) if experts else []  # hybrid MoE (§1.9); dense models ignore it
    if not isinstance(only, list) or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < layers
                                         for i in only):
        raise JaxsimInputError(str(path), f"mlp_only_layers must be a list of layer indices in [0, {layers}), "
                               f"got {only!r}")
    step = raw.get("decoder_sparse_step") if experts else None
    step = 1 if step is None else step
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise JaxsimInputError(str(path), f"decoder_sparse_step must be an integer >= 1, got {step!r}")
    return ModelConfig(
        name=name,
        model_type=str(raw["model_type"]),
        num_layers=layers,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=_count(raw, "head_dim", path, default=hidden // heads),
        intermediate_size=intermediate,
        vocab_size=_count(raw, "vocab_size", path),
        max_position_embeddings=_count(raw, "max_position_embeddings", path),
        torch_dtype=str(raw.get("torch_dtype", "bfloat16")),
        num_experts=experts,
        experts_per_token=_experts_per_token(raw, experts, path),
        moe_intermediate_size=_count(raw, "moe_intermediate_size", path, default=intermediate) if experts else 0,
        mlp_only_layers=tuple(sorted(set(only))),
        decoder_sparse_step=step,
    )
