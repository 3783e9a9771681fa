"""An in-process `Exchange` for N ranks running as threads: the reference transport of tests.

Every all-to-all is two barrier phases (post, then collect), each with a timeout, so a rank
that never arrives turns into `threading.BrokenBarrierError` instead of a hang.
"""

from __future__ import annotations

import threading

import torch


class LoopbackHub:
    def __init__(self, num_ranks: int, timeout_s: float = 30.0) -> None:
        self.num_ranks = num_ranks
        self._barrier = threading.Barrier(num_ranks, timeout=timeout_s)
        self._posted: list[list[torch.Tensor] | None] = [None] * num_ranks

    def endpoint(self, rank: int) -> LoopbackExchange:
        return LoopbackExchange(self, rank)


class LoopbackExchange:
    def __init__(self, hub: LoopbackHub, rank: int) -> None:
        self.hub, self.rank, self.num_ranks = hub, rank, hub.num_ranks

    def all_to_all(self, send: list[torch.Tensor]) -> list[torch.Tensor]:
        hub = self.hub
        hub._posted[self.rank] = [t.clone() for t in send]
        hub._barrier.wait()  # everyone posted
        recv = [hub._posted[src][self.rank] for src in range(self.num_ranks)]  # type: ignore[index]
        hub._barrier.wait()  # everyone collected: the posts may be replaced
        return recv
