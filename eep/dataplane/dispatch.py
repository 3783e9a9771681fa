"""Expert-parallel dispatch / combine with the argument shapes of DeepEP and pplx-kernels.

`EPDispatcher.dispatch` sends each of this rank's tokens once to every rank that holds at
least one of its top-k physical slots, together with its top-k ids rewritten to *local* slot
ids (-1 where the slot lives elsewhere) and its top-k weights; `combine` returns the output of
every (token, k) pair to the token's owner, which sums a token's pairs in k order
(`combine_pairs`). Unlike DeepEP, a rank does not pre-sum its pairs per token: that sum would
depend on which experts share a rank, and a token's output would change when a repair moves an
expert. Here it is bitwise the same for every placement.
The transport is any `Exchange` (an all-to-all of byte tensors): shared memory, gloo, or the
in-process loopback used by tests. Each direction is one exchange: rows, ids and weights of a
destination travel packed in one payload.

Legend: T = tokens of this rank, K = top-k, H = hidden, R = rows received, N = ranks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import torch


class Exchange(Protocol):
    """All-to-all of variable-size byte payloads among the active ranks, in rank order."""

    rank: int
    num_ranks: int

    def all_to_all(self, send: list[torch.Tensor]) -> list[torch.Tensor]:
        """`send[d]` (uint8, 1-D) goes to rank d; returns `recv[s]`, what rank s sent here.

        The returned tensors may be views into the transport's buffers, valid only until the
        next call: read them before exchanging again.
        """
        ...


@dataclass(frozen=True, slots=True)
class DispatchHandle:
    """What `combine` needs: which local tokens went where, and how many rows came from whom."""

    send_tokens: tuple[torch.Tensor, ...]  # per destination rank: int64 [n_d] indices into x
    send_present: tuple[torch.Tensor, ...]  # per destination rank: bool [n_d, K], pairs computed there
    recv_counts: tuple[int, ...]  # per source rank: rows received from it
    recv_pairs: tuple[int, ...]  # per source rank: local pairs in those rows
    present: torch.Tensor  # bool [T, K]: pairs with a slot (False only for masked experts)


def plan_dispatch(
    topk_slots: torch.Tensor, slots_per_rank: int, num_ranks: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Pure routing of one rank's tokens: `topk_slots [T, K]` int64 physical slots (-1 = none).

    Returns, per destination rank d, the token indices sent to d (ascending) and their top-k ids
    as d-local slot ids `[n_d, K]` (-1 where the slot is not on d).
    """
    owner = torch.where(topk_slots >= 0, topk_slots // slots_per_rank, -1)  # [T, K]
    tokens, local = [], []
    for d in range(num_ranks):
        on_d = owner == d  # [T, K]
        rows = torch.nonzero(on_d.any(dim=1)).squeeze(1)
        tokens.append(rows)
        local.append(torch.where(on_d, topk_slots - d * slots_per_rank, -1)[rows])
    return tokens, local


def _pack(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.contiguous().view(-1).view(torch.uint8) for p in parts])


class EPDispatcher:
    """DeepEP-shaped dispatch/combine over an `Exchange`, for one MoE layer shape."""

    def __init__(
        self, exchange: Exchange, slots_per_rank: int, hidden: int, top_k: int, dtype: torch.dtype,
        timings: list[float] | None = None,
    ) -> None:
        self.exchange = exchange
        self.slots_per_rank = slots_per_rank
        self.hidden, self.top_k, self.dtype = hidden, top_k, dtype
        itemsize = torch.empty(0, dtype=dtype).element_size()
        self._x_bytes = hidden * itemsize
        # Packed as ids (int64), weights (float32), rows (dtype): each section stays aligned.
        self._row_bytes = top_k * 8 + top_k * 4 + self._x_bytes
        # Wall time of each dispatch and each combine call (packing, transport, waiting on peers),
        # appended in call order; a list shared by the layers of a rank gives the step's sequence.
        self.timings: list[float] = [] if timings is None else timings

    def dispatch(
        self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, DispatchHandle]:
        """Send tokens to the ranks that hold their experts.

        Args:
            x: `[T, H]` this rank's hidden states (model dtype).
            topk_idx: `[T, K]` int64 physical slot ids, -1 = none.
            topk_weights: `[T, K]` float32 router weights.
        Returns:
            recv_x `[R, H]`, recv_topk_idx `[R, K]` int64 local slot ids (-1 = not on this rank),
            recv_topk_weights `[R, K]` float32, num_recv_tokens_per_expert `[slots_per_rank]` int64,
            and the handle for `combine`. Rows are ordered by source rank, then token index.
        """
        start = time.perf_counter()
        n = self.exchange.num_ranks
        tokens, local = plan_dispatch(topk_idx, self.slots_per_rank, n)
        weights = topk_weights.float()
        send = [_pack([ids, weights[t], x[t].to(self.dtype)]) for t, ids in zip(tokens, local)]
        recv = self.exchange.all_to_all(send)
        counts = tuple(r.numel() // self._row_bytes for r in recv)
        recv_x, recv_ids, recv_w = self._unpack(recv, counts)
        per_expert = torch.bincount(recv_ids[recv_ids >= 0], minlength=self.slots_per_rank)
        pairs = tuple(int(block.sum()) for block in (recv_ids >= 0).split(list(counts)))
        handle = DispatchHandle(tuple(tokens), tuple(ids >= 0 for ids in local), counts, pairs, topk_idx >= 0)
        self.timings.append(time.perf_counter() - start)
        return recv_x, recv_ids, recv_w, per_expert, handle

    def _unpack(self, recv: list[torch.Tensor], counts: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
        rows = sum(counts)
        h, k = self.hidden, self.top_k
        out_x = torch.empty(rows, h, dtype=self.dtype)
        out_ids = torch.empty(rows, k, dtype=torch.int64)
        out_w = torch.empty(rows, k, dtype=torch.float32)
        row = 0
        for payload, c in zip(recv, counts):
            ib, wb = c * k * 8, c * k * 4
            out_ids[row : row + c] = payload[:ib].view(torch.int64).view(c, k)
            out_w[row : row + c] = payload[ib : ib + wb].view(torch.float32).view(c, k)
            out_x[row : row + c] = payload[ib + wb :].view(self.dtype).view(c, h)
            row += c
        return out_x, out_ids, out_w

    def combine(self, expert_out: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """Return pair outputs to their tokens' owners and sum each token's pairs in k order.

        Args:
            expert_out: `[P, H]` this rank's weighted output of each local (row, k) pair of the
                received rows, in row-major order (what `run_experts` returns).
            handle: from the matching `dispatch`.
        Returns:
            `[T, H]` the combined MoE output of this rank's tokens.
        """
        start = time.perf_counter()
        send = [_pack([part]) for part in expert_out.to(self.dtype).split(list(handle.recv_pairs))]
        recv = self.exchange.all_to_all(send)
        t, k = handle.present.shape
        flat = torch.empty(t * k, self.hidden, dtype=self.dtype)  # pair (t, k) at row t*K + k
        for tokens, present, payload in zip(handle.send_tokens, handle.send_present, recv):
            if tokens.numel():
                at = (tokens.unsqueeze(1) * k + torch.arange(k))[present]  # row-major, as sent
                flat[at] = payload.view(self.dtype).view(-1, self.hidden)
        out = combine_pairs(flat[handle.present.flatten()], handle.present, self.dtype)
        self.timings.append(time.perf_counter() - start)
        return out


def combine_pairs(pairs: torch.Tensor, present: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Sum each token's top-k pair outputs: `pairs [P, H]` in row-major order of the True
    entries of `present [T, K]` -> `[T, H]` in `dtype`.

    The one reduction of every MoE output, in one fixed order (k = 0, 1, ... in fp32, then
    rounded once): a token's output is bitwise the same whichever ranks computed its pairs, so
    moving experts between ranks (repair, rejoin, rebalancing) never changes a token. Absent
    pairs (experts masked in degraded mode) add nothing.
    """
    t, k = present.shape
    full = torch.zeros(t, k, pairs.shape[-1], dtype=pairs.dtype)
    full[present] = pairs
    acc = full[:, 0].float()
    for j in range(1, k):
        acc += full[:, j]
    return acc.to(dtype)
