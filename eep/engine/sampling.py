"""Sampling parameters and the sampler.

Reproducibility promise: the token sampled for a request at output index i is a pure function
of (its logits, its `SamplingParams`, i). The random draw comes from a generator seeded with
(seed, i), not from a stream consumed step after step, so a request re-run elsewhere (on
another rank after a failure, in another batch) samples the same tokens from the same logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from eep.errors import RequestError

_SEED_STRIDE = 1_000_003  # a prime: (seed, index) pairs map to distinct generator seeds


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request decoding settings; `temperature == 0` is greedy."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None  # None: drawn once when the request is admitted
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise RequestError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            raise RequestError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise RequestError(f"top_k must be >= 0 (0 = off), got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def sample(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], indices: list[int]) -> list[int]:
    """Pick one token per row: `logits [B, V]` float32; `seeds[b]`, `indices[b]` = output index."""
    out = logits.argmax(dim=-1).tolist()
    for b, p in enumerate(params):
        if not p.greedy:
            out[b] = _sample_row(logits[b], p, seeds[b], indices[b])
    return out


def _sample_row(logits: torch.Tensor, p: SamplingParams, seed: int, index: int) -> int:
    # shift first: a tiny temperature then sends every non-maximal logit to -inf, never to NaN
    scaled = (logits - logits.max()) / p.temperature  # [V]
    if p.top_k:
        kth = torch.topk(scaled, min(p.top_k, scaled.numel())).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        drop = sorted_probs.cumsum(0) - sorted_probs >= p.top_p
        drop[0] = False  # also for a top_p that float32 rounds to 0 (5e-324), which would drop them all
        probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
    if not bool(torch.isfinite(probs).all()):
        # a temperature that float32 rounds to 0 (5e-324) makes the top logit 0/0: its limit is greedy
        return int(logits.argmax())
    gen = torch.Generator().manual_seed((seed * _SEED_STRIDE + index) % (2**63))
    return int(torch.multinomial(probs, 1, generator=gen))
