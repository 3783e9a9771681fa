"""Online expert load balancing on real rank processes: the load statistics are what the
routers chose (a count by hand, and every token pair of a run counted once), a rebalance under
load moves experts peer to peer while steps run and changes no token (bf16 and fp32, greedy and
seeded), a rank killed while moves are in flight loses nothing, and after a repair and after a
rejoin the next rebalance starts from the live layout."""

from __future__ import annotations

import os
import random
import signal
from collections import Counter
from pathlib import Path

import pytest
import torch

from eep.config import EngineConfig
from eep.control.config import EPConfig
from eep.control.executor import EPExecutor
from eep.engine.engine import LLMEngine
from eep.engine.sampling import SamplingParams
from eep.model.default_model import init_model
from eep.model.expert_load import ExpertLoadCounter
from eep.model.loader import load_model

GREEDY = SamplingParams(max_tokens=16, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=16, ignore_eos=True, temperature=0.9, top_p=0.95, seed=5)
# rebalance early and often: a run of a few dozen steps sees several
QUICK = {"enable_eplb": True, "eplb_report_steps": 2, "eplb_min_window_steps": 6, "eplb_rebalance_num_iterations": 8,
         "eplb_imbalance_threshold": 1.02, "num_redundant_experts": 4, "failure_timeout_s": 0.5, "timeout_s": 10.0}


def _prompts(seed: int, n: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 4000) for _ in range(rng.randrange(6, 30))] for _ in range(n)]


@pytest.fixture(scope="module")
def skewed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default DeepSeek-V3 model with Zipf-like routers (`eep model init --router-skew 1`)."""
    return init_model(tmp_path_factory.mktemp("m") / "skewed", "deepseek_v3", router_skew=1.0)


def _config(model: Path, dtype: str = "bfloat16") -> EngineConfig:
    return EngineConfig(str(model), dtype=dtype, max_num_seqs=16, max_model_len=96, progress=False)


def _instance(model: Path, dtype: str = "bfloat16", **ep: object) -> LLMEngine:
    return LLMEngine(_config(model, dtype), EPExecutor(_config(model, dtype), EPConfig(**({"ep_size": 4} | ep))))  # type: ignore[arg-type]


def _reference(model: Path, prompts: list[list[int]], params: list[SamplingParams], dtype: str = "bfloat16") -> list[list[int]]:
    engine = LLMEngine(_config(model, dtype))
    try:
        return [o.output_ids for o in engine.generate(prompts, params)]
    finally:
        engine.close()


def test_the_load_counter_equals_a_count_by_hand(skewed: Path) -> None:
    model = load_model(str(skewed), dtype="float32", max_len=64, progress=False)
    layer = model.moe_layers()[2]
    counter = ExpertLoadCounter(len(model.moe_layers()), model.cfg.num_experts)
    layer.load = counter
    x = torch.randn(7, model.cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    layer.route(x)
    counts = counter.take()
    # by hand: DeepSeek-V3's router, token by token in plain Python (fp32: no ties)
    router = layer.router
    hand: Counter[int] = Counter()
    group = model.cfg.num_experts // router.n_group
    for t in range(x.shape[0]):
        scores = torch.sigmoid(x[t] @ router.weight.float().T).tolist()
        choice = [s + float(b) for s, b in zip(scores, router.bias)]
        groups = sorted(range(router.n_group), key=lambda g: -sum(sorted(choice[g * group:(g + 1) * group])[-2:]))
        allowed = [e for g in groups[:router.topk_group] for e in range(g * group, (g + 1) * group)]
        hand.update(sorted(allowed, key=lambda e: -choice[e])[:router.top_k])
    assert counts[2].tolist() == [hand[e] for e in range(model.cfg.num_experts)]
    assert counts.sum() == 7 * router.top_k and counts[[0, 1, 3]].sum() == 0  # only the layer that ran
    assert counter.take().sum() == 0  # taken: counting starts again


def test_the_window_counts_every_token_pair_of_a_run_once(skewed: Path) -> None:
    prompts = _prompts(1, 8)
    engine = _instance(skewed, ep_size=2, eplb_report_steps=1)
    try:
        outs = engine.generate(prompts, [GREEDY] * len(prompts))
        status = engine.executor.elastic.status()  # type: ignore[union-attr]
    finally:
        engine.close()
    # every token forwarded (the prompt, then each sampled token but the last) passes every MoE
    # layer's router once, which sends it to top_k experts
    forwarded = sum(len(p) + len(o.output_ids) - 1 for p, o in zip(prompts, outs))
    eplb = status["eplb"]
    assert eplb["load_total"] == forwarded * 8 * len(eplb["imbalance"])
    assert eplb["imbalance_max"] > 1.05  # the skewed model on the start layout: unbalanced


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_a_rebalance_under_load_changes_no_token(skewed: Path, dtype: str) -> None:
    prompts = _prompts(2, 24)
    params = [SEEDED if i % 3 == 2 else GREEDY for i in range(len(prompts))]
    want = _reference(skewed, prompts, params, dtype)
    engine = _instance(skewed, dtype, **QUICK)
    try:
        got = [o.output_ids for o in engine.generate(prompts, params)]
        eplb = engine.executor.elastic.status()["eplb"]  # type: ignore[union-attr]
        again = [o.output_ids for o in engine.generate(prompts, params)]  # on the new layout from the start
        eplb_after = engine.executor.elastic.status()["eplb"]  # type: ignore[union-attr]
    finally:
        engine.close()
    assert got == want and again == want
    switched = [r for r in eplb_after["rebalances"] if r["outcome"] == "switched"]
    assert switched and eplb["switched"] >= 1, eplb["rebalances"]
    assert sum(r["moves"] for r in switched) > 0 and eplb_after["moves"]["peer"] > 0  # rank to rank
    assert switched[0]["imbalance_after"] < switched[0]["imbalance_before"]
    assert all(r["switch_s"] < 1.0 for r in switched)


def test_a_rank_killed_while_moves_are_in_flight_loses_nothing_and_balance_returns(skewed: Path) -> None:
    """A target rank SIGKILLed right after its moves were accepted: the batch is given up with
    the view change, the step is replayed, nothing differs; the next rebalance plans from the
    survivors' live layout; after the rank rejoins, again."""
    prompts = _prompts(3, 24)
    params = [SEEDED if i % 3 == 2 else GREEDY for i in range(len(prompts))]
    want = _reference(skewed, prompts, params)
    engine = _instance(skewed, **QUICK)
    ex = engine.executor.elastic
    killed: list[int] = []

    def kill_one(ranks: tuple[int, ...]) -> None:
        if not killed:
            victim = max(ranks)
            killed.append(victim)
            os.kill(ex.pids()[victim], signal.SIGKILL)  # type: ignore[union-attr]

    ex.hooks.moves_sent = kill_one  # type: ignore[union-attr]
    try:
        got = [o.output_ids for o in engine.generate(prompts, params)]
        assert killed, "no rebalance sent moves"
        epoch_after_failure = ex.view.epoch  # type: ignore[union-attr]
        ex.hooks.moves_sent = None  # type: ignore[union-attr]
        survivors = [o.output_ids for o in engine.generate(prompts, params)]
        ex.rejoin(killed[0])  # type: ignore[union-attr]
        rejoined = [o.output_ids for o in engine.generate(prompts * 2, params * 2)]
        status = ex.status()  # type: ignore[union-attr]
    finally:
        engine.close()
    assert got == want and survivors == want and rejoined == want * 2
    records = status["eplb"]["rebalances"]
    assert any(r["outcome"] == "given up: the view changed" for r in records), records
    on_survivors = [r for r in records if r["outcome"] == "switched" and r["epoch"] == epoch_after_failure]
    assert on_survivors, records  # balanced again on 3 ranks
    after_rejoin = [r for r in records if r["outcome"] == "switched" and r["epoch"] > epoch_after_failure]
    assert after_rejoin, records  # and again on 4
    assert status["view"]["active"] == [0, 1, 2, 3]
