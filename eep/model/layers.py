"""Small building blocks shared by the architectures: RMSNorm, RoPE tables, the gated MLP.

Legend for shape comments: T = tokens of the step, H = hidden size, I = MLP intermediate size.
Numerics follow transformers' implementations operation for operation where it matters for
fp32 parity (RoPE in fp32 from the same `position * inv_freq` products, SiLU-gated MLP).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from eep.model.config import yarn_mscale


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Lower precision: normalise in fp32 and scale after casting back, as transformers does.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_frequencies(rot_dim: int, theta: float, scaling: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """Inverse frequencies `[D/2]` and the cos/sin factor, for plain RoPE or YaRN (as transformers)."""
    pos_freqs = theta ** (torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim)
    if not scaling:
        return 1.0 / pos_freqs, 1.0
    factor = float(scaling["factor"])
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    original = int(scaling["original_max_position_embeddings"])

    def correction_dim(rotations: float) -> float:
        return (rot_dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(scaling.get("beta_fast") or 32), correction_dim(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rot_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(rot_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


class RotaryTable:
    """Precomputed cos/sin of every position: `cos, sin [max_pos, D/2]` in fp32."""

    def __init__(self, rot_dim: int, theta: float, max_positions: int, scaling: dict[str, Any] | None = None) -> None:
        inv_freq, attention_factor = rope_frequencies(rot_dim, theta, scaling or {})
        freqs = torch.arange(max_positions, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
        self.cos = freqs.cos() * attention_factor
        self.sin = freqs.sin() * attention_factor
        self.max_positions = max_positions

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """`positions [T]` -> `(cos, sin) [T, 1, D/2]` ready to broadcast over heads."""
        return self.cos[positions].to(dtype).unsqueeze(1), self.sin[positions].to(dtype).unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate `x [T, heads, D]` by `cos, sin [T, 1, D/2]`.

    Non-interleaved (Llama/Qwen) pairs dimension i with i + D/2; interleaved (DeepSeek) pairs
    2i with 2i+1 and returns the pairs de-interleaved (first halves, then second halves), as
    transformers does: q and k get the same permutation, so their dot products are unchanged.
    """
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class GatedMLP(nn.Module):
    """SiLU-gated MLP with gate and up projections fused into one weight `w13 [2I, H]`."""

    def __init__(self, hidden: int, intermediate: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.w13 = nn.Parameter(torch.empty(2 * intermediate, hidden, dtype=dtype), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(hidden, intermediate, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        gate, up = F.linear(x, self.w13).chunk(2, dim=-1)  # [T, I] each
        return F.linear(F.silu(gate) * up, self.w2)
