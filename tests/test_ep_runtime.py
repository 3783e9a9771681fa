"""The expert-parallel instance with real rank processes: exact outputs, stable storage,
a stopped rank named within the timeout, and nothing left behind."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from eep.config import EngineConfig
from eep.control.config import EPConfig
from eep.control.executor import EPExecutor
from eep.engine.engine import LLMEngine
from eep.engine.sampling import SamplingParams
from eep.errors import ConfigError, RankFailed
from eep.model.default_model import init_model
from eep.placement.routing import Placement, placement_from_phy2log, without_slots
from eep.runtime.host_resources import spread_over_cores

SHM = Path("/dev/shm")
PARAMS = [SamplingParams(max_tokens=m, ignore_eos=True) for m in (10, 4, 12, 7, 9, 1)]


def _our_segments() -> set[str]:
    return {p.name for p in SHM.glob(f"eep-{os.getpid()}-*")}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_model(tmp_path_factory.mktemp("m") / "qwen3_moe", "qwen3_moe")


@pytest.fixture(scope="module")
def config(model_dir: Path) -> EngineConfig:
    return EngineConfig(str(model_dir), dtype="float32", max_num_seqs=4, max_model_len=96,
                        max_num_batched_tokens=128, progress=False)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 4096, (n,), generator=g).tolist() for n in (5, 23, 1, 40, 11, 17)]


@pytest.fixture(scope="module")
def reference(config: EngineConfig, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy outputs of the single-process engine (itself checked against transformers)."""
    return [o.output_ids for o in LLMEngine(config).generate(prompts, PARAMS)]


@pytest.fixture
def instance(config: EngineConfig):  # type: ignore[no-untyped-def]
    """Factory of EP engines; every rank process and segment is gone after the test, pass or fail."""
    engines: list[LLMEngine] = []
    pids: list[int] = []

    def make(**ep: object) -> LLMEngine:
        executor = EPExecutor(config, EPConfig(**ep))  # type: ignore[arg-type]
        pids.extend(executor.pids())
        engines.append(LLMEngine(config, executor))
        return engines[-1]

    before = _our_segments()
    try:
        yield make
    finally:
        for pid in pids:  # a stopped rank must be able to die
            if _alive(pid):
                os.kill(pid, signal.SIGCONT)
        for engine in engines:
            engine.close()
    assert not [pid for pid in pids if _alive(pid)], "rank processes left running"
    assert _our_segments() <= before, "shared-memory segments left behind"


@pytest.mark.parametrize("backend", ["shm", "gloo"])
@pytest.mark.parametrize(("ep_size", "redundant"), [(1, 0), (2, 0), (4, 0), (8, 0), (2, 8), (4, 8), (8, 8)])
def test_outputs_identical_to_single_process(
    instance, prompts: list[list[int]], reference: list[list[int]], backend: str, ep_size: int, redundant: int
) -> None:  # type: ignore[no-untyped-def]
    engine = instance(ep_size=ep_size, backend=backend, num_redundant_experts=redundant)
    assert [o.output_ids for o in engine.generate(prompts, PARAMS)] == reference


def _second_replicas(placement: Placement) -> torch.Tensor:
    """[L, P] bool: every slot that holds a second (or later) replica of its expert."""
    log2phy, count = placement.logical_to_physical_map, placement.logical_replica_count
    drop = torch.zeros_like(placement.physical_to_logical_map, dtype=torch.bool)
    for layer, expert in torch.nonzero(count > 1).tolist():
        drop[layer, log2phy[layer, expert, 1 : int(count[layer, expert])]] = True
    return drop


def test_storage_never_moves_across_steps_and_table_updates(
    instance, prompts: list[list[int]], reference: list[list[int]]
) -> None:  # type: ignore[no-untyped-def]
    engine = instance(ep_size=4, num_redundant_experts=8)
    executor: EPExecutor = engine.executor
    before = executor.storage_ptrs()
    layers = executor.placement.num_layers
    assert all(len(p) == 3 + 2 * layers + 4 * 2 * 2 for p in before)  # tables, expert slots, shm buffers
    assert [o.output_ids for o in engine.generate(prompts, PARAMS)] == reference
    assert executor.storage_ptrs() == before

    # Drop every redundant replica from the tables (what a reuse-only repair does): no weight
    # moves, the same tokens now reach the first replicas, outputs stay exact.
    full = executor.placement
    dropped = _second_replicas(full)
    assert int(dropped.sum()) == 8 * len(full.logical_replica_count)
    executor.update_routing(without_slots(full, dropped))
    assert [o.output_ids for o in engine.generate(prompts, PARAMS)] == reference
    executor.update_routing(full)  # and back
    assert [o.output_ids for o in engine.generate(prompts, PARAMS)] == reference
    assert executor.storage_ptrs() == before

    # Tables that would give a slot an expert it does not hold are refused before any rank applies them.
    swapped = full.physical_to_logical_map.clone()
    swapped[0, [0, 1]] = swapped[0, [1, 0]]
    with pytest.raises(ConfigError, match="relocate the weights first"):
        executor.update_routing(placement_from_phy2log(swapped, full.num_logical, full.max_replicas))
    assert [o.output_ids for o in engine.generate(prompts[:2], PARAMS[:2])] == reference[:2]


def test_stopped_rank_is_named_within_the_timeout(instance, prompts: list[list[int]]) -> None:  # type: ignore[no-untyped-def]
    """Fixed membership (fault_policy none): the data-plane wait itself names the silent peer."""
    engine = instance(ep_size=4, timeout_s=1.5, fault_policy="none")
    victim = 2
    os.kill(engine.executor.pids()[victim], signal.SIGSTOP)
    start = time.monotonic()
    with pytest.raises(RankFailed) as failed:
        engine.generate(prompts, PARAMS)
    assert failed.value.rank == victim, str(failed.value)
    assert time.monotonic() - start < 2 * 1.5 + 1.0


def test_ranks_spread_over_cores_evenly_and_stay_put_when_they_can() -> None:
    start = spread_over_cores((0, 1, 2, 3), [0, 1], {})
    assert start == {0: 0, 1: 1, 2: 0, 3: 1}
    # rank 1 died: the survivors (2 on core 0, 1 on core 1) are as even as 3 on 2 cores get
    assert spread_over_cores((0, 2, 3), [0, 1], {0: 0, 2: 0, 3: 1}) == {}
    # rank 3 died: core 0 holds two, core 1 one; no one moves either
    assert spread_over_cores((0, 1, 2), [0, 1], {0: 0, 1: 1, 2: 0}) == {}
    # rank 1 comes back: it takes the free place
    assert spread_over_cores((0, 1, 2, 3), [0, 1], {0: 0, 2: 0, 3: 1}) == {1: 1}
    # a crowded core gives its extra rank away; more cores than ranks: one each
    assert spread_over_cores((0, 1, 2), [0, 1], {0: 0, 1: 0, 2: 0}) == {2: 1}
    assert spread_over_cores((0, 1), [4, 5, 6], {0: 5, 1: 5}) == {1: 4}
