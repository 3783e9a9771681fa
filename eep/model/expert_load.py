"""Expert load statistics on the hot path: how many (token, k) pairs each MoE layer's router
sends to each logical expert.

`ExpertLoadCounter` keeps one preallocated `[L, E]` int64 tensor on the model's device. Each MoE
layer hands it its router's choice (`add`: a reference kept, nothing computed); at the end of
the step `flush` adds all of them with one `index_add_` into the flat counts (a preallocated
ones vector; no host sync), timed on the thread's CPU clock: what the statistics cost
(`cpu_ns`, the ledger's `expert_load`). `take()` hands the counts over and starts again from
zero. The counts are logical (the router's ids, before any table maps them to slots), so they
do not depend on the placement: the load a placement planner balances.
"""

from __future__ import annotations

import time

import torch


class ExpertLoadCounter:
    def __init__(self, num_layers: int, num_experts: int, max_pairs: int = 4096,
                 device: torch.device | str | None = None) -> None:
        self.num_experts = num_experts
        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.int64, device=device)  # [L, E]
        self._ones = torch.ones(max_pairs, dtype=torch.int64, device=device)
        self._pending: list[torch.Tensor] = []  # this step's choices, offset to their layer's row
        self.enabled = True
        self.cpu_ns = 0  # this thread's CPU time spent counting (what the statistics cost)

    def add(self, layer: int, topk_ids: torch.Tensor) -> None:
        """Keep the router's `topk_ids [T, K]` of MoE layer `layer` (row of the tables) for `flush`."""
        if self.enabled:
            self._pending.append(topk_ids.reshape(-1) + layer * self.num_experts)

    def flush(self) -> None:
        """Count the step's choices: one `index_add_` for all layers."""
        if not self._pending:
            return
        start = time.thread_time_ns()
        ids = torch.cat(self._pending) if len(self._pending) > 1 else self._pending[0]
        self._pending.clear()
        n = ids.numel()
        if n > self._ones.numel():  # a step larger than any before: grow once, to the next power of two
            self._ones = torch.ones(1 << (n - 1).bit_length(), dtype=torch.int64, device=self.counts.device)
        self.counts.view(-1).index_add_(0, ids, self._ones[:n])
        self.cpu_ns += time.thread_time_ns() - start

    def take(self) -> torch.Tensor:
        """The counts since the last `take` (a copy on the CPU), and start again from zero."""
        self.flush()
        out = self.counts.to("cpu", copy=True)
        self.counts.zero_()
        return out
