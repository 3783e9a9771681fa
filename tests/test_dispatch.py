"""Dispatch -> local experts -> combine over N ranks reproduces the single-process MoE layer."""

from __future__ import annotations

import threading

import pytest
import torch

from eep.dataplane.dispatch import EPDispatcher, combine_pairs, plan_dispatch
from eep.dataplane.loopback import LoopbackHub
from eep.model.default_model import init_model
from eep.model.loader import load_model
from eep.model.moe import MoELayer, run_experts


@pytest.fixture(scope="module")
def moe_layer(tmp_path_factory: pytest.TempPathFactory) -> MoELayer:
    path = init_model(tmp_path_factory.mktemp("m") / "qwen3_moe", "qwen3_moe")
    return load_model(path, dtype=torch.float32, progress=False).moe_layers()[2]


def test_plan_dispatch_routes_each_pair_to_its_owner() -> None:
    slots = torch.tensor([[0, 5, -1], [7, 6, 1], [2, 3, 3]])
    tokens, local = plan_dispatch(slots, slots_per_rank=4, num_ranks=2)
    assert [t.tolist() for t in tokens] == [[0, 1, 2], [0, 1]]
    assert local[0].tolist() == [[0, -1, -1], [-1, -1, 1], [2, 3, 3]]
    assert local[1].tolist() == [[-1, 1, -1], [3, 2, -1]]


def _run_ranks(n: int, fn) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    out: list[torch.Tensor | BaseException | None] = [None] * n

    def target(r: int) -> None:
        try:
            out[r] = fn(r)
        except BaseException as e:  # reported below, never swallowed
            out[r] = e

    threads = [threading.Thread(target=target, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for r, o in enumerate(out):
        if not isinstance(o, torch.Tensor):
            raise AssertionError(f"rank {r} failed: {o!r}")
    return out  # type: ignore[return-value]


@pytest.mark.parametrize(
    ("num_ranks", "dtype"), [(1, "float32"), (2, "float32"), (4, "float32"), (8, "float32"), (4, "bfloat16")]
)
def test_ep_layer_matches_single_process(moe_layer: MoELayer, num_ranks: int, dtype: str) -> None:
    slots_total = moe_layer.w13.shape[0]
    spr = slots_total // num_ranks
    hub = LoopbackHub(num_ranks)
    g = torch.Generator().manual_seed(num_ranks)
    # ranks own different numbers of tokens, one owns none (it still takes part in every exchange)
    xs = [torch.randn((3 * r + 1) % 7, 256, generator=g) for r in range(num_ranks)]
    dt = getattr(torch, dtype)
    w13_all, w2_all = moe_layer.w13.to(dt), moe_layer.w2.to(dt)

    def rank_main(r: int) -> torch.Tensor:
        torch.set_num_threads(1)
        comm = EPDispatcher(hub.endpoint(r), spr, hidden=256, top_k=8, dtype=dt)
        slots, weights = moe_layer.route(xs[r])
        recv_x, recv_ids, recv_w, per_expert, handle = comm.dispatch(xs[r], slots, weights)
        assert int(per_expert.sum()) == int((recv_ids >= 0).sum())
        # this rank's experts only: slots [r*spr, (r+1)*spr) of the stacked weights
        w13, w2 = w13_all[r * spr : (r + 1) * spr], w2_all[r * spr : (r + 1) * spr]
        return comm.combine(run_experts(recv_x, recv_ids, recv_w, w13, w2), handle).float()

    outs = _run_ranks(num_ranks, rank_main)
    for r, x in enumerate(xs):
        slots, weights = moe_layer.route(x)
        ref = combine_pairs(run_experts(x.to(dt), slots, weights, w13_all, w2_all), slots >= 0, dt).float()
        # Every pair's output is summed at its token's owner in k order, so bf16 (whose matmuls
        # do not depend on the row count) is bitwise the single-process result; fp32 matmuls
        # take a gemv path for 1-3 rows per expert, which rounds differently (~1e-7).
        if dtype == "bfloat16":
            assert torch.equal(outs[r], ref)
        else:
            torch.testing.assert_close(outs[r], ref, atol=1e-5, rtol=1e-5)

