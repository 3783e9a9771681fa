"""Both process transports (gloo baseline, shared memory) with real rank processes: byte-exact
all-to-all and EP dispatch/combine equal to the single-process expert computation."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest
import torch

from eep.dataplane.dispatch import EPDispatcher, combine_pairs
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


def _make_exchange(backend: str, rank: int, where: str):  # type: ignore[no-untyped-def]
    if backend == "gloo":
        from eep.dataplane.gloo import GlooExchange

        return GlooExchange(rank, N, where, timeout_s=60)
    from eep.dataplane.shm import Endpoint, ShmExchange, ShmSegment

    return ShmExchange(Endpoint(ShmSegment.attach(where), rank, timeout_s=60), N)


def _rank_main(backend: str, rank: int, where: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    ex = _make_exchange(backend, rank, where)
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
        if backend == "gloo":
            ex.close()
        else:
            ex.endpoint.close()
            ex.endpoint.segment.close()


@pytest.mark.parametrize("backend", ["gloo", "shm"])
def test_exchange_and_ep_dispatch(tmp_path: Path, backend: str) -> None:
    ctx = mp.get_context("spawn")
    segment = None
    if backend == "gloo":
        where = f"file://{tmp_path / 'store'}"
    else:
        from eep.dataplane.shm import ShmLayout, ShmSegment

        segment = ShmSegment.create(ShmLayout(num_ranks=N, region_bytes=1 << 16))  # by the "controller"
        where = segment.name
    procs = [ctx.Process(target=_rank_main, args=(backend, r, where, str(tmp_path))) for r in range(N)]
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
        if segment is not None:
            segment.close()
            segment.unlink()
    xs, slots, weights, w13, w2 = _problem()
    for r in range(N):
        ref = combine_pairs(run_experts(xs[r], slots[r], weights[r], w13, w2), slots[r] >= 0, torch.float32)
        # fp32: exact up to MKL's gemv path for 1-3 rows per expert (bf16 is bitwise: test_dispatch)
        torch.testing.assert_close(torch.load(tmp_path / f"rank{r}.pt"), ref, atol=1e-5, rtol=1e-5)
