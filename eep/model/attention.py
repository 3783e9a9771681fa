"""Attention over a slotted KV cache: GQA (Qwen3-MoE, Mixtral, OLMoE) and MLA (DeepSeek-V3).

KV cache layout (slotted, preallocated once): every running sequence owns one slot, a row of
`max_len` positions in each layer's cache tensors. GQA caches `k, v [S, KV, max_len, D]` (heads
outside positions, so a slot range is a batch of contiguous `[L, D]` matrices for matmul);
MLA caches the compressed latent `c [S, max_len, R]` (after `kv_a_layernorm`) and the shared
rotated key `k_rot [S, max_len, Dr]`, as transformers caches them. A slotted cache wastes the
tail of short sequences but needs no block tables: a sequence's history is one contiguous
slice, which keeps the CPU attention path to one gather + a few matmuls per step.

A step's flat tokens are described by `StepLayout`: sequences with one new token (decode,
and one-token prompts) are batched into one padded call; longer chunks (prefill, possibly
continuing from an earlier chunk) run one call each.

Row invariance: every query row goes through the same kernels (bf16/fp32 matmul for the
scores, fp32 softmax, matmul with V) whether it is decoded alone, batched with others, or
part of a prefill chunk; masked positions contribute exact zeros. So a token's keys, values
and logits are bitwise the same however its history was chunked. Failure recovery relies on
it: a request re-prefilled on a survivor continues with exactly the tokens it would have
produced (measured in bf16, 32 requests re-prefilled at random points: 12 diverged with
causal SDPA for prefill, 0 with this; it is also ~20% faster than SDPA for 512-token
prompts on CPU).
The length a row is reduced over is part of that: CPU matmuls round differently for
different key counts even when the extra keys are masked (measured: a request re-prefilled
while others decoded returned a different token when decode rows were padded to the batch's
longest sequence). So a query at position p always attends over `kv_span(p + 1)` keys, the
next multiple of `KV_BLOCK` (capped at the cache length), masked past p: decode rows are
grouped by span, prefill rows are cut at span boundaries.

Legend: T = tokens of the step, B = decode sequences, L = keys a row attends over (its span),
N = heads, KV = key/value heads, D = head dim, R = MLA latent rank, S = cache slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from eep.model.config import ModelConfig
from eep.model.layers import RMSNorm, RotaryTable, apply_rope


@dataclass(frozen=True, slots=True)
class PrefillChunk:
    token_start: int  # first token of the chunk in the step's flat token list
    slot: int
    ctx_len: int  # tokens of this sequence already in the cache before the step
    q_len: int  # new tokens


KV_BLOCK = 64  # the key counts a query row is reduced over are multiples of this (see "Row invariance")


def kv_span(length: int, max_len: int | None = None) -> int:
    """Keys a query row of a sequence of `length` tokens attends over (masked past its own),
    capped at the cache length `max_len`."""
    span = -(-length // KV_BLOCK) * KV_BLOCK
    return span if max_len is None else min(span, max_len)


@dataclass(frozen=True, slots=True)
class DecodeGroup:
    """Decode rows whose sequences have the same `kv_span`: one batched attention call."""

    tokens: torch.Tensor  # [B] int64: index in T of each sequence's token
    slots: torch.Tensor | slice  # [B] int64, or a slice when the slots are consecutive (no gather)
    span: int  # keys per row, before the cap at the cache length
    mask: torch.Tensor  # [B, 1, 1, span] bool, True = attend


@dataclass(frozen=True, slots=True)
class StepLayout:
    """How one step's flat tokens split into sequences; built once per step, read by every layer."""

    positions: torch.Tensor  # [T] int64
    token_slots: torch.Tensor  # [T] int64: cache slot written by each token
    decode: tuple[DecodeGroup, ...]
    prefill: tuple[PrefillChunk, ...]

    @classmethod
    def build(cls, slots: list[int], ctx_lens: list[int], q_lens: list[int]) -> StepLayout:
        positions: list[int] = []
        token_slots: list[int] = []
        groups: dict[int, tuple[list[int], list[int], list[int]]] = {}  # span -> tokens, slots, lengths
        prefill: list[PrefillChunk] = []
        for slot, ctx, q in zip(slots, ctx_lens, q_lens):
            start = len(positions)
            positions.extend(range(ctx, ctx + q))
            token_slots.extend([slot] * q)
            if q == 1:
                tok, sl, ln = groups.setdefault(kv_span(ctx + 1), ([], [], []))
                tok.append(start)
                sl.append(slot)
                ln.append(ctx + 1)
            else:
                prefill.append(PrefillChunk(start, slot, ctx, q))
        decode = []
        for span, (tok, sl, ln) in sorted(groups.items()):
            mask = torch.arange(span).unsqueeze(0) < torch.tensor(ln, dtype=torch.int64).unsqueeze(1)  # [B, span]
            decode.append(DecodeGroup(torch.tensor(tok, dtype=torch.int64),
                                      _as_slice(sl) or torch.tensor(sl, dtype=torch.int64), span, mask[:, None, None, :]))
        return cls(
            positions=torch.tensor(positions, dtype=torch.int64),
            token_slots=torch.tensor(token_slots, dtype=torch.int64),
            decode=tuple(decode),
            prefill=tuple(prefill),
        )

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[0]


def _as_slice(slots: list[int]) -> slice | None:
    """`slots` as a slice if they are consecutive and ascending: the cache is then read as a view."""
    if slots and slots == list(range(slots[0], slots[0] + len(slots))):
        return slice(slots[0], slots[0] + len(slots))
    return None


def _decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """One query per sequence: `q [B, N, Dq]`, `k [B, KV, L, Dq]`, `v [B, KV, L, Dv]`, `mask [B, 1, 1, L]` -> `[B, N, Dv]`."""
    b, n, _ = q.shape
    kv = k.shape[1]
    out = _attention_rows(q.view(b, kv, n // kv, -1), k, v, mask, scale)  # [B, KV, G, Dv]
    return out.view(b, n, -1)


def _attention_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """`q [..., KV, M, Dq]` rows against `k [..., KV, L, Dq]`, `v [..., KV, L, Dv]`; `mask` broadcasts to
    `[..., KV, M, L]` (True = attend). Plain matmul + fp32 softmax: the one path of every query row
    (see "Row invariance"); with one query row the CPU flash kernel is also ~4-8x slower."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = scores.float().masked_fill_(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v)


_CHUNK_ROWS = 256  # query rows per call of a long chunk: bounds the fp32 scores to ~N x 256 x L


def _chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx_len: int, scale: float,
                     max_len: int) -> torch.Tensor:
    """One sequence: `q [N, Q, Dq]` against `k [KV, >= S, Dq]`, `v [KV, >= S, Dv]` -> `[Q, N, Dv]`, causal,
    where S = kv_span(C+Q). Rows are cut at span boundaries, so that each is reduced over its own
    span of keys, as it would be decoded (see "Row invariance")."""
    n, q_len, dq = q.shape
    kv = k.shape[0]
    g = n // kv
    q = q.reshape(kv, g, q_len, dq)  # heads are kv-major, as in decode
    out = q.new_empty(kv, g, q_len, v.shape[-1])
    start = 0
    while start < q_len:
        span = kv_span(ctx_len + start + 1, max_len)  # of the block's first row; the block ends where it changes
        stop = min(q_len, span - ctx_len if span < max_len else q_len, start + _CHUNK_ROWS)
        mask = torch.arange(span).unsqueeze(0) <= (ctx_len + torch.arange(start, stop)).unsqueeze(1)  # [M, span]
        rows = q[:, :, start:stop].reshape(kv, g * (stop - start), dq)
        res = _attention_rows(rows, k[:, :span], v[:, :span], mask.repeat(g, 1), scale)
        out[:, :, start:stop] = res.view(kv, g, stop - start, -1)
        start = stop
    return out.permute(2, 0, 1, 3).reshape(q_len, n, -1)


class GQAAttention(nn.Module):
    """Grouped-query attention with a fused qkv projection and optional q/k RMSNorm and clip.

    q/k RMSNorm per head (Qwen3), over the whole projection before the head split (OLMoE), or
    none (Mixtral); OLMoE's `clip_qkv` clamps q, k and v after that norm, before RoPE.
    """

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_heads, self.num_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_out, kv_out = self.num_heads * self.head_dim, self.num_kv * self.head_dim
        self.split = (q_out, kv_out, kv_out)
        self.wqkv = nn.Parameter(torch.empty(q_out + 2 * kv_out, cfg.hidden_size, dtype=dtype), requires_grad=False)
        self.bqkv = (
            nn.Parameter(torch.empty(q_out + 2 * kv_out, dtype=dtype), requires_grad=False)
            if cfg.attention_bias
            else None
        )
        self.wo = nn.Parameter(torch.empty(cfg.hidden_size, q_out, dtype=dtype), requires_grad=False)
        self.bo = nn.Parameter(torch.empty(cfg.hidden_size, dtype=dtype), requires_grad=False) if cfg.attention_bias else None
        self.norm_full = cfg.qk_norm == "full"
        q_dim, k_dim = (q_out, kv_out) if self.norm_full else (self.head_dim, self.head_dim)
        self.q_norm = RMSNorm(q_dim, cfg.rms_norm_eps, dtype) if cfg.qk_norm != "none" else None
        self.k_norm = RMSNorm(k_dim, cfg.rms_norm_eps, dtype) if cfg.qk_norm != "none" else None
        self.clip = cfg.clip_qkv
        self.scale = cfg.attn_scale

    def forward(
        self, x: torch.Tensor, layout: StepLayout, rope: tuple[torch.Tensor, torch.Tensor], cache: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:  # x [T, H] -> [T, H]
        k_cache, v_cache = cache  # [S, KV, max_len, D]
        t = x.shape[0]
        q, k, v = F.linear(x, self.wqkv, self.bqkv).split(self.split, dim=-1)  # [T, N*D], [T, KV*D] x2
        if self.norm_full:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip is not None:
            q, k, v = (y.clamp(-self.clip, self.clip) for y in (q, k, v))
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv, self.head_dim)
        v = v.view(t, self.num_kv, self.head_dim)
        if self.q_norm is not None and not self.norm_full:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, *rope, interleaved=False), apply_rope(k, *rope, interleaved=False)
        k_cache[layout.token_slots, :, layout.positions] = k  # [T, KV, D]
        v_cache[layout.token_slots, :, layout.positions] = v
        out = self._attend(q, layout, k_cache, v_cache)  # [T, N, D]
        return F.linear(out.reshape(t, self.num_heads * out.shape[-1]), self.wo, self.bo)

    def _attend(self, q: torch.Tensor, layout: StepLayout, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        out = q.new_empty(q.shape)
        max_len = k_cache.shape[2]
        for d in layout.decode:
            span = min(d.span, max_len)
            ks = k_cache[d.slots, :, :span]  # [B, KV, span, D]
            vs = v_cache[d.slots, :, :span]
            out[d.tokens] = _decode_attention(q[d.tokens], ks, vs, d.mask[..., :span], self.scale)
        for c in layout.prefill:
            span = kv_span(c.ctx_len + c.q_len, max_len)
            qs = q[c.token_start : c.token_start + c.q_len].transpose(0, 1)  # [N, Q, D]
            ks = k_cache[c.slot, :, :span]  # [KV, span, D]
            vs = v_cache[c.slot, :, :span]
            out[c.token_start : c.token_start + c.q_len] = _chunk_attention(qs, ks, vs, c.ctx_len, self.scale, max_len)
        return out


class MLAAttention(nn.Module):
    """DeepSeek multi-head latent attention; the cache holds the latent and the rotated shared key.

    The latent is expanded to per-head keys and values with `kv_b_proj` at attention time,
    exactly as transformers does, so logits match it in fp32.
    """

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.nope, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.rank = cfg.kv_lora_rank
        h, n, qk = cfg.hidden_size, cfg.num_heads, cfg.qk_head_dim
        self.interleaved = cfg.rope_interleave

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)

        if cfg.q_lora_rank is None:
            self.wq = param(n * qk, h)
        else:
            self.wq_a = param(cfg.q_lora_rank, h)
            self.q_a_norm = RMSNorm(cfg.q_lora_rank, 1e-6, dtype)  # transformers uses the default eps here
            self.wq_b = param(n * qk, cfg.q_lora_rank)
        self.q_lora = cfg.q_lora_rank is not None
        self.wkv_a = param(self.rank + self.rope_dim, h)
        self.kv_a_norm = RMSNorm(self.rank, 1e-6, dtype)
        self.wkv_b = param(n * (self.nope + self.v_dim), self.rank)
        self.wo = param(h, n * self.v_dim)
        self.scale = cfg.attn_scale

    def forward(
        self, x: torch.Tensor, layout: StepLayout, rope: tuple[torch.Tensor, torch.Tensor], cache: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:  # x [T, H] -> [T, H]
        c_cache, r_cache = cache  # [S, max_len, R], [S, max_len, Dr]
        t = x.shape[0]
        q = F.linear(self.q_a_norm(F.linear(x, self.wq_a)), self.wq_b) if self.q_lora else F.linear(x, self.wq)
        q = q.view(t, self.num_heads, self.nope + self.rope_dim)
        q_nope, q_rot = q.split((self.nope, self.rope_dim), dim=-1)
        latent, k_rot = F.linear(x, self.wkv_a).split((self.rank, self.rope_dim), dim=-1)
        latent = self.kv_a_norm(latent)  # [T, R]
        q_rot = apply_rope(q_rot, *rope, interleaved=self.interleaved)
        k_rot = apply_rope(k_rot.unsqueeze(1), *rope, interleaved=self.interleaved).squeeze(1)  # [T, Dr]
        c_cache[layout.token_slots, layout.positions] = latent
        r_cache[layout.token_slots, layout.positions] = k_rot
        q = torch.cat((q_nope, q_rot), dim=-1)  # [T, N, Dq]
        out = q.new_empty(t, self.num_heads, self.v_dim)
        max_len = c_cache.shape[1]
        for d in layout.decode:
            span = min(d.span, max_len)
            k, v = self._expand(c_cache[d.slots, :span], r_cache[d.slots, :span])
            out[d.tokens] = _decode_attention(q[d.tokens], k, v, d.mask[..., :span], self.scale)  # [B, N, Dv]
        for c in layout.prefill:
            span = kv_span(c.ctx_len + c.q_len, max_len)
            k, v = self._expand(c_cache[c.slot, :span], r_cache[c.slot, :span])  # [N, span, *]
            qs = q[c.token_start : c.token_start + c.q_len].transpose(0, 1)
            out[c.token_start : c.token_start + c.q_len] = _chunk_attention(qs, k, v, c.ctx_len, self.scale, max_len)
        return F.linear(out.reshape(t, self.num_heads * out.shape[-1]), self.wo)

    def _expand(self, latent: torch.Tensor, k_rot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`latent [..., L, R]`, `k_rot [..., L, Dr]` -> keys `[..., N, L, Dq]`, values `[..., N, L, Dv]`."""
        kv = F.linear(latent, self.wkv_b).unflatten(-1, (self.num_heads, self.nope + self.v_dim))  # [..., L, N, *]
        k_nope, v = kv.split((self.nope, self.v_dim), dim=-1)
        k_rot = k_rot.unsqueeze(-2).expand(*k_nope.shape[:-1], self.rope_dim)
        k = torch.cat((k_nope, k_rot), dim=-1)
        return k.transpose(-3, -2), v.transpose(-3, -2)



class KVCache:
    """Every layer's cache tensors, allocated once for `num_slots` sequences of `max_len` tokens."""

    def __init__(self, cfg: ModelConfig, num_slots: int, max_len: int, dtype: torch.dtype) -> None:
        if cfg.attention == "mla":
            shapes = [(num_slots, max_len, cfg.kv_lora_rank), (num_slots, max_len, cfg.qk_rope_head_dim)]
        else:
            shapes = [(num_slots, cfg.num_kv_heads, max_len, cfg.head_dim)] * 2
        self.layers = [tuple(torch.zeros(s, dtype=dtype) for s in shapes) for _ in range(cfg.num_layers)]
        self.num_slots, self.max_len = num_slots, max_len

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer)


def make_rope_table(cfg: ModelConfig, max_len: int) -> RotaryTable:
    return RotaryTable(cfg.rope_dim, cfg.rope_theta, max_len, cfg.rope_scaling)
