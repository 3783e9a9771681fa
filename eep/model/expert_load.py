"""Expert load statistics on the hot path: how many (token, k) pairs each MoE layer's router
sends to each logical expert.

`ExpertLoadCounter` keeps one preallocated `[L, E]` int64 tensor on the model's device. Each MoE
layer adds its router's choice with one `index_add_` into its row (a preallocated ones vector:
no allocation, no host sync); `take()` hands the counts over and starts again from zero. The
counts are logical (the router's ids, before any table maps them to slots), so they do not
depend on the placement: the load a placement planner balances.
"""

from __future__ import annotations

import time

import torch


class ExpertLoadCounter:
    def __init__(self, num_layers: int, num_experts: int, max_pairs: int = 4096,
                 device: torch.device | str | None = None) -> None:
        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.int64, device=device)  # [L, E]
        self._rows = list(self.counts.unbind(0))  # one view per layer, made once
        self._ones = torch.ones(max_pairs, dtype=torch.int64, device=device)
        self.enabled = True
        self.cpu_ns = 0  # this thread's CPU time spent counting (what the statistics cost)

    def add(self, layer: int, topk_ids: torch.Tensor) -> None:
        """Count the router's `topk_ids [T, K]` of MoE layer `layer` (row of the tables)."""
        if not self.enabled:
            return
        start = time.thread_time_ns()
        ids = topk_ids.reshape(-1)
        n = ids.numel()
        if n > self._ones.numel():  # a step larger than any before: grow once, to the next power of two
            self._ones = torch.ones(1 << (n - 1).bit_length(), dtype=torch.int64, device=self.counts.device)
        self._rows[layer].index_add_(0, ids, self._ones[:n])
        self.cpu_ns += time.thread_time_ns() - start

    def take(self) -> torch.Tensor:
        """The counts since the last `take` (a copy on the CPU), and start again from zero."""
        out = self.counts.to("cpu", copy=True)
        self.counts.zero_()
        return out
