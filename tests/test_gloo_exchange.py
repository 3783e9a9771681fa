"""The gloo baseline transport with real processes: byte-exact all-to-all and EP dispatch/combine."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest
import torch

from eep.dataplane.dispatch import EPDispatcher
from eep.model.moe import run_experts

N, T, H, K, S, I = 4, 5, 32, 4, 16, 8  # ranks, tokens per rank, hidden, top-k, slots, expert size


def _problem() -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(T + r, H, generator=g) for r in range(N)]  # different token counts per rank
    slots = [torch.stack([torch.randperm(S, generator=g)[:K] for _ in range(T + r)]) for r in range(N)]
    weights = [torch.rand(T + r, K, generator=g) for r in range(N)]
    return xs, slots, weights, torch.randn(S, H, 2 * I, generator=g), torch.randn(S, I, H, generator=g)


def _payload(src: int, dst: int, round_: int) -> torch.Tensor:
    n = 17 * (src + 1) + 3 * dst + round_  # every pair and round has its own size and bytes
    return torch.arange(n, dtype=torch.int64).mul(src * 31 + dst * 7 + round_).remainder(251).to(torch.uint8)


def _rank_main(rank: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    from eep.dataplane.gloo import GlooExchange

    ex = GlooExchange(rank, N, store, timeout_s=60)
    try:
        for round_ in range(5):
            recv = ex.all_to_all([_payload(rank, d, round_) for d in range(N)])
            for src, got in enumerate(recv):
                assert torch.equal(got, _payload(src, rank, round_)), (src, rank, round_)
        xs, slots, weights, w13, w2 = _problem()
        spr = S // N
        comm = EPDispatcher(ex, spr, hidden=H, top_k=K, dtype=torch.float32)
        rx, ri, rw, _, handle = comm.dispatch(xs[rank], slots[rank], weights[rank])
        out = comm.combine(run_experts(rx, ri, rw, w13[rank * spr : (rank + 1) * spr], w2[rank * spr : (rank + 1) * spr]), handle)
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        ex.close()


def test_gloo_exchange_and_ep_dispatch(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    store = f"file://{tmp_path / 'store'}"
    procs = [ctx.Process(target=_rank_main, args=(r, store, str(tmp_path))) for r in range(N)]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
        assert [p.exitcode for p in procs] == [0] * N
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    xs, slots, weights, w13, w2 = _problem()
    for r in range(N):
        ref = run_experts(xs[r], slots[r], weights[r], w13, w2)
        torch.testing.assert_close(torch.load(tmp_path / f"rank{r}.pt"), ref, atol=1e-4, rtol=1e-5)
