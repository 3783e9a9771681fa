"""The decoder-only MoE language model (Qwen3-MoE, Mixtral, OLMoE and DeepSeek-V3 share this skeleton).

`MoEModel.forward` runs one step over flat tokens described by a `StepLayout` and returns
hidden states; `compute_logits` applies the final norm and LM head only to the rows asked for,
so a decode step never computes logits for tokens whose output nobody samples.

Legend: T = tokens of the step, H = hidden size, V = vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from eep.model.attention import GQAAttention, KVCache, MLAAttention, StepLayout, make_rope_table
from eep.model.config import ModelConfig
from eep.model.layers import GatedMLP, RMSNorm
from eep.model.moe import MoELayer
from eep.placement.routing import RoutingTables


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int, mlp: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.index = index
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.attn = MLAAttention(cfg, dtype) if cfg.attention == "mla" else GQAAttention(cfg, dtype)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = mlp

    def forward(
        self, x: torch.Tensor, layout: StepLayout, rope: tuple[torch.Tensor, torch.Tensor], cache: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:  # [T, H] -> [T, H]
        x = x + self.attn(self.input_norm(x), layout, rope, cache)
        return x + self.mlp(self.post_attn_norm(x))


class MoEModel(nn.Module):
    """Weights of one process: dense/attention weights in full, experts for its local slots only."""

    def __init__(
        self,
        cfg: ModelConfig,
        tables: RoutingTables,
        slot_offset: int,
        num_local_slots: int,
        dtype: torch.dtype,
        max_len: int,
    ) -> None:
        super().__init__()
        self.cfg, self.dtype = cfg, dtype
        self.embed = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype), requires_grad=False)
        layers = []
        for i in range(cfg.num_layers):
            if cfg.moe_layer_mask[i]:
                moe_row = cfg.moe_layers.index(i)
                mlp: nn.Module = MoELayer(cfg, moe_row, tables, num_local_slots, slot_offset, dtype)
            else:
                mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, dtype)
            layers.append(DecoderLayer(cfg, i, mlp, dtype))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = (
            self.embed
            if cfg.tie_word_embeddings
            else nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype), requires_grad=False)
        )
        self.rope = make_rope_table(cfg, max_len)
        self.tables = tables

    def moe_layers(self) -> list[MoELayer]:
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, MoELayer)]

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, layout: StepLayout, kv: KVCache) -> torch.Tensor:
        """`input_ids [T]` int64 -> hidden states `[T, H]` (before the final norm)."""
        x = F.embedding(input_ids, self.embed)
        rope = self.rope.lookup(layout.positions, self.dtype)
        for layer, cache in zip(self.layers, kv.layers):
            x = layer(x, layout, rope, cache)
        return x

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """`hidden [N, H]` -> logits `[N, V]` float32."""
        return F.linear(self.norm(hidden), self.lm_head).float()
