"""The MoE layer: router -> routing tables (logical -> physical slot) -> expert slots -> combine.

Experts are stored stacked by *physical slot*, not by logical expert, and pre-transposed for
`x @ w`: `w13 [S, H, 2I]` (gate columns, then up columns) and `w2 [S, I, H]` hold the S slots
this process owns, slot ids
`slot_offset .. slot_offset + S - 1`. In one process every slot is local; the expert-parallel
runtime hands each rank a contiguous range and replaces `_run_local` by dispatch/combine.

Legend: T = tokens, K = experts per token, E = logical experts, S = local slots,
C = most tokens any local slot receives this step, H = hidden, I = expert intermediate size.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from eep.model.config import ModelConfig
from eep.model.expert_load import ExpertLoadCounter
from eep.model.layers import GatedMLP
from eep.dataplane.dispatch import EPDispatcher, combine_pairs
from eep.placement.routing import RoutingTables


class Router(nn.Module):
    """Logical top-k choice: softmax top-k (Qwen3-MoE, Mixtral, OLMoE) or DeepSeek-V3's grouped sigmoid."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size, dtype=dtype), requires_grad=False)
        self.sigmoid = cfg.scoring == "sigmoid"
        self.bias = (
            nn.Parameter(torch.zeros(cfg.num_experts, dtype=torch.float32), requires_grad=False) if self.sigmoid else None
        )
        self.top_k, self.norm_topk = cfg.top_k, cfg.norm_topk_prob
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.scaling = cfg.routed_scaling_factor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`x [T, H]` -> `(topk_ids [T, K] int64, topk_weights [T, K] float32)`."""
        if self.sigmoid:
            return self._grouped_sigmoid(F.linear(x.float(), self.weight.float()))
        logits = F.linear(x, self.weight)  # [T, E], model dtype as in transformers
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return ids, weights.to(logits.dtype).float()

    def _grouped_sigmoid(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t, e = logits.shape
        scores = logits.sigmoid()  # [T, E]
        choice = scores + self.bias
        if self.n_group > 1:
            group_scores = choice.view(t, self.n_group, e // self.n_group).topk(2, dim=-1)[0].sum(dim=-1)  # [T, G]
            group_idx = group_scores.topk(self.topk_group, dim=-1, sorted=False)[1]
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
            choice = choice.masked_fill(~keep.repeat_interleave(e // self.n_group, dim=1), float("-inf"))
        ids = choice.topk(self.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, ids)
        if self.norm_topk:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, weights * self.scaling


class MoELayer(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        layer_index: int,
        tables: RoutingTables,
        num_local_slots: int,
        slot_offset: int,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.router = Router(cfg, dtype)
        i, h = cfg.moe_intermediate_size, cfg.hidden_size
        self.w13 = nn.Parameter(torch.zeros(num_local_slots, h, 2 * i, dtype=dtype), requires_grad=False)
        self.w2 = nn.Parameter(torch.zeros(num_local_slots, i, h, dtype=dtype), requires_grad=False)
        self.shared = GatedMLP(h, i * cfg.n_shared_experts, dtype) if cfg.n_shared_experts else None
        self.tables = tables
        self.moe_index = layer_index  # row of the routing tables
        self.slot_offset = slot_offset
        self.dispatcher: EPDispatcher | None = None  # set by an expert-parallel rank
        self.load: ExpertLoadCounter | None = None  # set by an expert-parallel rank: the router's choices counted
        self.expert_s = 0.0  # an expert-parallel rank's CPU seconds in its expert compute (taken per step)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        slots, weights = self.route(x)
        if self.dispatcher is None:
            local = slots - self.slot_offset if self.slot_offset else slots
            out = combine_pairs(self.local_experts(x, local, weights), local >= 0, x.dtype)
        else:  # tokens travel to the ranks holding their slots, and the outputs come back
            recv_x, recv_slots, recv_weights, _, handle = self.dispatcher.dispatch(x, slots, weights)
            start = time.thread_time()  # this thread's CPU: the work, not the waits of a rank sharing a core
            local = self.local_experts(recv_x, recv_slots, recv_weights)
            self.expert_s += time.thread_time() - start
            out = self.dispatcher.combine(local, handle)
        return out + self.shared(x) if self.shared is not None else out

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`x [T, H]` -> physical slots `[T, K]` int64 and weights `[T, K]` float32."""
        topk_ids, topk_weights = self.router(x)
        if self.load is not None:
            self.load.add(self.moe_index, topk_ids)
        slots = self.tables.to_physical(self.moe_index, topk_ids)
        missing = slots < 0  # experts without a live replica: only in degraded mode
        if bool(missing.any()):
            # mask them and renormalise the rest to the original total (1, or DeepSeek's scaling)
            kept = topk_weights.masked_fill(missing, 0.0)
            total, left = topk_weights.sum(-1, keepdim=True), kept.sum(-1, keepdim=True)
            topk_weights = torch.where(left > 0, kept * (total / left.clamp(min=1e-30)), kept)
        return slots, topk_weights

    def local_experts(self, x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """This process's expert compute (between dispatch and combine); see `run_experts`."""
        return run_experts(x, slots, weights, self.w13, self.w2)


def run_experts(
    x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """Weighted output of every (row, k) pair whose slot is local.

    Args:
        x: `[T, H]` rows (tokens, or rows received by dispatch).
        slots: `[T, K]` int64 local slot ids into `w13`/`w2`; < 0 = not here, skipped.
        weights: `[T, K]` float32 router weights.
        w13, w2: `[S, H, 2I]`, `[S, I, H]` stacked, pre-transposed slot weights.
    Returns:
        `[P, H]`, one row per local pair (`slots >= 0`), in row-major (row, k) order: not summed
        per row. `combine_pairs` sums a token's pairs in k order wherever they were computed, so
        the result does not depend on which rank holds which expert (see `combine_pairs`).
    """
    k = slots.shape[1]
    local = torch.nonzero(slots.flatten() >= 0).squeeze(1)  # [P] pair ids, row-major
    slot_of_pair = slots.flatten()[local]
    order = torch.argsort(slot_of_pair, stable=True)  # grouped by slot for the packed matmuls
    out = torch.empty(local.numel(), x.shape[1], dtype=x.dtype)
    out[order] = _packed_experts(x[local[order] // k], slot_of_pair[order], w13, w2)
    return out * weights.flatten()[local].unsqueeze(1).to(x.dtype)


def _packed_experts(xs: torch.Tensor, slot_ids: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Apply slot `slot_ids[p]` to row `xs[p]`: `xs [P, H]`, `slot_ids [P]` sorted ascending -> `[P, H]`.

    Rows are packed per slot into a zero-padded `[S, C, H]` block so that the whole layer is
    two batched matmuls: on CPU this beats a loop over slots (~6x at decode sizes) and
    torch._grouped_mm (~3x), and the padding is at most the per-step load imbalance.
    Contiguous `[S, H, 2I]` weights make each bmm ~1.3x faster than a transposed view.
    """
    p = xs.shape[0]
    if p == 0:
        return xs.new_zeros(0, xs.shape[1])
    # Only the slots from the first to the last one used (views, no copy): empty slots at the
    # ends, such as unfilled spare slots kept for repairs, cost nothing.
    lo, hi = int(slot_ids[0]), int(slot_ids[-1]) + 1
    slot_ids = slot_ids - lo
    counts = torch.bincount(slot_ids, minlength=hi - lo)  # [S]
    cap = int(counts.max())
    starts = counts.cumsum(0) - counts
    rank_in_slot = torch.arange(p) - starts[slot_ids]  # [P]
    padded = xs.new_zeros(hi - lo, cap, xs.shape[1])  # [S, C, H]
    padded[slot_ids, rank_in_slot] = xs
    gate, up = torch.bmm(padded, w13[lo:hi]).chunk(2, dim=-1)  # [S, C, I] each
    down = torch.bmm(F.silu(gate) * up, w2[lo:hi])  # [S, C, H]
    return down[slot_ids, rank_in_slot]
