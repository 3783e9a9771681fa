"""Model configuration: one frozen dataclass read from a Hugging Face `config.json`.

`ModelConfig.from_hf` accepts the config dicts of the architectures eep implements and
refuses every option it does not implement with `UnsupportedModel`, naming the option, so a
checkpoint is either run exactly as transformers would run it or not at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from eep.errors import UnsupportedModel

SUPPORTED_MODEL_TYPES = ("qwen3_moe", "deepseek_v3", "mixtral", "olmoe")
QK_NORMS = ("none", "head", "full")
# Architectures whose structure we know but have not implemented yet: a clear error beats a guess.
_KNOWN_UNSUPPORTED = {
    "qwen2_moe": "Qwen2-MoE is not implemented yet",
    "deepseek_v2": "DeepSeek-V2 is not implemented yet (DeepSeek-V3 is)",
}


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Everything the model code needs, with derived values as properties.

    Attention is GQA (`attention == "gqa"`: Qwen3-MoE, Mixtral, OLMoE) or MLA
    (`attention == "mla"`, DeepSeek-V3); routing is softmax top-k or DeepSeek's grouped
    sigmoid top-k. GQA q/k RMSNorm is `qk_norm`: "none" (Mixtral), "head" (per head, Qwen3)
    or "full" (over the whole q and k projections before the head split, OLMoE).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    # MLP / MoE
    intermediate_size: int  # dense MLP layers
    moe_intermediate_size: int
    num_experts: int
    top_k: int
    norm_topk_prob: bool
    moe_layer_mask: tuple[bool, ...]  # [num_layers]: True where the layer is MoE
    scoring: str  # "softmax" | "sigmoid"
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    n_shared_experts: int
    # GQA attention
    num_kv_heads: int
    head_dim: int
    qk_norm: str  # one of QK_NORMS
    clip_qkv: float | None  # clamp q, k, v to [-clip_qkv, clip_qkv] after the qk norm (OLMoE)
    attention_bias: bool
    # MLA attention
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    rope_scaling: dict[str, Any] = field(default_factory=dict, compare=False)  # rope_type "yarn" or empty

    def __post_init__(self) -> None:
        if len(self.moe_layer_mask) != self.num_layers:
            raise UnsupportedModel(
                f"moe_layer_mask has {len(self.moe_layer_mask)} entries for {self.num_layers} layers"
            )
        if self.num_experts and not 0 < self.top_k <= self.num_experts:
            raise UnsupportedModel(f"num_experts_per_tok={self.top_k} must be in 1..num_experts={self.num_experts}")
        if self.num_experts % self.n_group:
            raise UnsupportedModel(f"n_group={self.n_group} must divide num_experts={self.num_experts}")
        if not 0 < self.topk_group <= self.n_group:
            raise UnsupportedModel(f"topk_group={self.topk_group} must be in 1..n_group={self.n_group}")
        if self.qk_norm not in QK_NORMS:
            raise UnsupportedModel(f"qk_norm={self.qk_norm!r} must be one of {', '.join(QK_NORMS)}")
        if self.clip_qkv is not None and not self.clip_qkv > 0:
            raise UnsupportedModel(f"clip_qkv={self.clip_qkv} must be positive or null")
        if self.attention == "gqa" and self.num_heads % self.num_kv_heads:
            raise UnsupportedModel(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}"
            )

    @property
    def attention(self) -> str:
        return "mla" if self.model_type == "deepseek_v3" else "gqa"

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i, is_moe in enumerate(self.moe_layer_mask) if is_moe)

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def attn_scale(self) -> float:
        scale = (self.qk_head_dim if self.attention == "mla" else self.head_dim) ** -0.5
        mscale_all_dim = self.rope_scaling.get("mscale_all_dim")
        if self.attention == "mla" and mscale_all_dim:  # DeepSeek's YaRN: softmax scale times mscale^2
            scale *= yarn_mscale(float(self.rope_scaling["factor"]), float(mscale_all_dim)) ** 2
        return scale

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face config.json dict; raise UnsupportedModel on anything unimplemented."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            why = _KNOWN_UNSUPPORTED.get(str(model_type), "this model_type is unknown to eep")
            raise UnsupportedModel(
                f"unsupported model_type {model_type!r}: {why}; eep supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if hf.get("use_sliding_window"):
            raise UnsupportedModel("use_sliding_window=true is not supported (sliding-window attention)")
        if hf.get("hidden_act", "silu") != "silu":
            raise UnsupportedModel(f"hidden_act={hf.get('hidden_act')!r} is not supported (only 'silu')")
        return _BUILDERS[model_type](hf)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _rope_scaling(hf: dict[str, Any]) -> dict[str, Any]:
    """The RoPE scaling options, {} for plain RoPE; UnsupportedModel for anything but YaRN."""
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return {}
    if rope_type != "yarn":
        raise UnsupportedModel(f"rope_type {rope_type!r} is not supported (eep implements 'default' and 'yarn')")
    if "original_max_position_embeddings" not in rope:
        raise UnsupportedModel("yarn RoPE needs rope_parameters.original_max_position_embeddings")
    if rope.get("factor") is None:
        rope["factor"] = int(hf["max_position_embeddings"]) / int(rope["original_max_position_embeddings"])
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UnsupportedModel("partial_rotary_factor != 1 is not supported")
    return rope


def _rope_theta(hf: dict[str, Any], default: float = 10000.0) -> float:
    rope = hf.get("rope_parameters") or {}
    return float(rope.get("rope_theta", hf.get("rope_theta", default)))


def _eos(hf: dict[str, Any]) -> tuple[int, ...]:
    eos = hf.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _common(hf: dict[str, Any], default_theta: float = 10000.0) -> dict[str, Any]:
    return dict(
        model_type=hf["model_type"],
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=int(hf["num_attention_heads"]),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(hf, default_theta),
        rope_scaling=_rope_scaling(hf),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        top_k=int(hf["num_experts_per_tok"]),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        attention_bias=bool(hf.get("attention_bias", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos(hf),
    )


def _gqa(
    hf: dict[str, Any], qk_norm: str, head_dim: int | None = None, clip_qkv: float | None = None
) -> dict[str, Any]:
    """The GQA fields (and empty MLA fields) of a softmax-routed model with no shared experts."""
    num_heads = int(hf["num_attention_heads"])
    return dict(
        scoring="softmax",
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.0,
        n_shared_experts=0,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=head_dim or int(hf.get("head_dim") or int(hf["hidden_size"]) // num_heads),
        qk_norm=qk_norm,
        clip_qkv=clip_qkv,
        q_lora_rank=None,
        kv_lora_rank=0,
        qk_nope_head_dim=0,
        qk_rope_head_dim=0,
        v_head_dim=0,
        rope_interleave=False,
    )


def _from_qwen3_moe(hf: dict[str, Any]) -> ModelConfig:
    n_layers = int(hf["num_hidden_layers"])
    num_experts = int(hf.get("num_experts", hf.get("num_local_experts", 0)))
    sparse_step = int(hf.get("decoder_sparse_step", 1))
    mlp_only = set(hf.get("mlp_only_layers") or [])
    mask = tuple(
        i not in mlp_only and num_experts > 0 and (i + 1) % sparse_step == 0 for i in range(n_layers)
    )
    return ModelConfig(
        **_common(hf),
        **_gqa(hf, qk_norm="head"),
        intermediate_size=int(hf.get("intermediate_size", 0)),
        moe_intermediate_size=int(hf["moe_intermediate_size"]),
        num_experts=num_experts,
        moe_layer_mask=mask,
    )


def _from_mixtral(hf: dict[str, Any]) -> ModelConfig:
    """Every layer MoE; `intermediate_size` is the expert size; top-k weights always renormalised."""
    if hf.get("sliding_window") is not None:
        raise UnsupportedModel(
            f"sliding_window={hf['sliding_window']} is not supported (sliding-window attention); "
            "eep runs Mixtral checkpoints whose config has sliding_window: null"
        )
    common = {**_common(hf, default_theta=1e6), "norm_topk_prob": True, "attention_bias": False}
    return ModelConfig(
        **common,
        **_gqa(hf, qk_norm="none"),
        intermediate_size=0,
        moe_intermediate_size=int(hf["intermediate_size"]),
        num_experts=int(hf.get("num_local_experts", 8)),
        moe_layer_mask=(True,) * int(hf["num_hidden_layers"]),
    )


def _from_olmoe(hf: dict[str, Any]) -> ModelConfig:
    """Every layer MoE; q/k RMSNorm over the whole projection, then the optional clip."""
    clip = hf.get("clip_qkv")
    head_dim = int(hf["hidden_size"]) // int(hf["num_attention_heads"])  # as transformers sizes the q/k norms
    return ModelConfig(
        **_common(hf),
        **_gqa(hf, qk_norm="full", head_dim=head_dim, clip_qkv=None if clip is None else float(clip)),
        intermediate_size=0,
        moe_intermediate_size=int(hf["intermediate_size"]),
        num_experts=int(hf.get("num_experts", 64)),
        moe_layer_mask=(True,) * int(hf["num_hidden_layers"]),
    )


def _from_deepseek_v3(hf: dict[str, Any]) -> ModelConfig:
    n_layers = int(hf["num_hidden_layers"])
    first_dense = int(hf.get("first_k_dense_replace") or 0)
    moe_freq = int(hf.get("moe_layer_freq", 1))
    if hf.get("topk_method", "noaux_tc") != "noaux_tc" or hf.get("scoring_func", "sigmoid") != "sigmoid":
        raise UnsupportedModel("DeepSeek-V3 routing other than topk_method='noaux_tc' with sigmoid scores is not supported")
    num_heads = int(hf["num_attention_heads"])
    return ModelConfig(
        **_common(hf),
        intermediate_size=int(hf.get("intermediate_size", 0)),
        moe_intermediate_size=int(hf["moe_intermediate_size"]),
        num_experts=int(hf["n_routed_experts"]),
        moe_layer_mask=tuple(i >= first_dense and i % moe_freq == 0 for i in range(n_layers)),
        scoring="sigmoid",
        n_group=int(hf.get("n_group") or 1),
        topk_group=int(hf.get("topk_group") or 1),
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        n_shared_experts=int(hf.get("n_shared_experts") or 0),
        num_kv_heads=num_heads,
        head_dim=int(hf["qk_rope_head_dim"]),
        qk_norm="none",
        clip_qkv=None,
        q_lora_rank=None if hf.get("q_lora_rank") is None else int(hf["q_lora_rank"]),
        kv_lora_rank=int(hf["kv_lora_rank"]),
        qk_nope_head_dim=int(hf["qk_nope_head_dim"]),
        qk_rope_head_dim=int(hf["qk_rope_head_dim"]),
        v_head_dim=int(hf["v_head_dim"]),
        rope_interleave=bool(hf.get("rope_interleave", True)),
    )


_BUILDERS = {
    "qwen3_moe": _from_qwen3_moe,
    "deepseek_v3": _from_deepseek_v3,
    "mixtral": _from_mixtral,
    "olmoe": _from_olmoe,
}
