"""Properties of the pure placement planner `eep.placement.eplb.plan_placement`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eep.errors import ConfigError
from eep.placement.eplb import plan_placement, rank_loads
from eep.placement.routing import RoutingTables


@st.composite
def problems(draw: st.DrawFn) -> dict:
    """A valid planner input: sizes, redundancy and a per-layer load (often skewed or with ties)."""
    num_ranks = draw(st.integers(1, 8))
    per_rank = draw(st.integers(1, 6))
    slots = num_ranks * per_rank
    num_experts = draw(st.integers(max(1, slots - 2 * num_ranks), slots))
    num_layers = draw(st.integers(1, 3))
    kind = draw(st.sampled_from(["none", "ints", "floats", "skewed"]))
    shape = draw(st.sampled_from([(num_experts,), (num_layers, num_experts)]))
    count = int(torch.Size(shape).numel())
    if kind == "none":
        load = None
    elif kind == "ints":  # many exact ties
        load = torch.tensor(draw(st.lists(st.integers(0, 5), min_size=count, max_size=count)), dtype=torch.float32)
    elif kind == "floats":
        values = draw(st.lists(st.floats(0, 100, allow_nan=False), min_size=count, max_size=count))
        load = torch.tensor(values, dtype=torch.float64)
    else:  # a few very hot experts
        values = draw(st.lists(st.sampled_from([0.0, 1.0, 1.0, 2.0, 50.0, 400.0]), min_size=count, max_size=count))
        load = torch.tensor(values, dtype=torch.float64)
    if load is not None:
        load = load.view(shape)
    return dict(
        num_experts=num_experts,
        num_ranks=num_ranks,
        num_layers=num_layers,
        num_redundant=slots - num_experts,
        load=load,
        max_replicas=slots,  # large enough for any plan; the default is checked separately
    )


def effective_load(problem: dict) -> torch.Tensor:
    """The `[L, E]` load the planner balances (uniform where none is given or a layer is all zero)."""
    num_layers, num_experts = problem["num_layers"], problem["num_experts"]
    load = problem["load"]
    if load is None:
        return torch.ones(num_layers, num_experts, dtype=torch.float64)
    load = load.to(torch.float64).expand(num_layers, num_experts).clone()
    load[(load == 0).all(dim=1)] = 1.0
    return load


@settings(max_examples=150, deadline=None)
@given(problems())
def test_tables_are_complete_and_consistent(problem: dict) -> None:
    placement = plan_placement(**problem)
    phy2log = placement.physical_to_logical_map
    log2phy = placement.logical_to_physical_map
    count = placement.logical_replica_count
    num_layers, num_experts = problem["num_layers"], problem["num_experts"]
    slots = num_experts + problem["num_redundant"]
    per_rank = slots // problem["num_ranks"]
    assert phy2log.shape == (num_layers, slots) and phy2log.dtype == torch.int64
    assert log2phy.shape == (num_layers, num_experts, problem["max_replicas"]) and log2phy.dtype == torch.int64
    assert count.shape == (num_layers, num_experts) and count.dtype == torch.int64
    # Every slot holds a real expert, every expert has a replica, the counts add up to P.
    assert ((phy2log >= 0) & (phy2log < num_experts)).all()
    assert (count >= 1).all()
    assert (count.sum(dim=1) == slots).all()
    for layer in range(num_layers):
        assert torch.equal(torch.bincount(phy2log[layer], minlength=num_experts), count[layer])
        for expert in range(num_experts):
            n = int(count[layer, expert])
            live, pad = log2phy[layer, expert, :n], log2phy[layer, expert, n:]
            assert (phy2log[layer, live] == expert).all()
            assert len(set(live.tolist())) == n
            assert (pad == -1).all()
        # Within a rank, slots are ordered by expert id (slot budgets hold by construction of [L, P]).
        by_rank = phy2log[layer].view(problem["num_ranks"], per_rank)
        assert (by_rank[:, 1:] >= by_rank[:, :-1]).all()
    # The planner's output drops straight into the routing state.
    RoutingTables.from_placement(placement)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(problems())
def test_no_expert_twice_on_a_rank_when_avoidable(problem: dict) -> None:
    # A dup-free layout exists iff no expert has more replicas than there are ranks. The greedy
    # does not prove it always finds one: this is a fixed-seed regression check (the same property
    # held on ~600k random and exhaustive small cases while the planner was written).
    placement = plan_placement(**problem)
    num_ranks = problem["num_ranks"]
    by_rank = placement.physical_to_logical_map.view(problem["num_layers"], num_ranks, -1)
    for layer in range(problem["num_layers"]):
        if int(placement.logical_replica_count[layer].max()) > num_ranks:
            continue
        for rank in range(num_ranks):
            experts = by_rank[layer, rank].tolist()
            assert len(set(experts)) == len(experts), f"layer {layer} rank {rank} holds {experts}"


@settings(max_examples=150, deadline=None, derandomize=True)  # bound not proven for the slot-limited greedy
@given(problems())
def test_rank_load_within_greedy_bound(problem: dict) -> None:
    placement = plan_placement(**problem)
    load = effective_load(problem)
    loads = rank_loads(placement, load, problem["num_ranks"])  # [L, N]
    assert loads.shape == (problem["num_layers"], problem["num_ranks"])
    assert torch.allclose(loads.sum(dim=1), load.sum(dim=1))
    heaviest_replica = (load / placement.logical_replica_count).max(dim=1).values  # [L]
    bound = loads.mean(dim=1) + heaviest_replica
    assert (loads.max(dim=1).values <= bound * (1 + 1e-9)).all(), (loads, bound)


@settings(max_examples=150, deadline=None)
@given(problems())
def test_redundant_replicas_follow_load(problem: dict) -> None:
    placement = plan_placement(**problem)
    load = effective_load(problem)
    count = placement.logical_replica_count
    per_replica = load / count
    # Greedy replication: every expert with an extra replica was, when it got its last one, at least
    # as hot per replica as every other expert is now.
    for layer in range(problem["num_layers"]):
        for expert in (count[layer] > 1).nonzero().flatten().tolist():
            before = load[layer, expert] / (count[layer, expert] - 1)
            assert (before >= per_replica[layer]).all()


@settings(max_examples=150, deadline=None)
@given(problems())
def test_deterministic(problem: dict) -> None:
    first, second = plan_placement(**problem), plan_placement(**problem)
    for a, b in zip(
        (first.physical_to_logical_map, first.logical_to_physical_map, first.logical_replica_count),
        (second.physical_to_logical_map, second.logical_to_physical_map, second.logical_replica_count),
    ):
        assert torch.equal(a, b)


def test_deterministic_across_processes() -> None:
    script = (
        "import torch\n"
        "from eep.placement.eplb import plan_placement\n"
        "load = torch.linspace(0.0, 3.0, 24).pow(3).roll(7)\n"
        "p = plan_placement(24, 4, num_layers=2, num_redundant=4, load=load)\n"
        "print(p.physical_to_logical_map.tolist())\n"
    )
    here = {}
    exec(script.replace("print(", "here['out'] = ("), {"here": here})  # noqa: S102 - same code, this process
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True, cwd=root)
    assert out.stdout.strip() == str(here["out"])


def test_hottest_expert_gets_the_extra_replicas() -> None:
    load = torch.ones(8)
    load[5] = 10.0
    placement = plan_placement(8, 6, num_redundant=4, load=load)
    count = placement.logical_replica_count[0]
    # 10/4 = 2.5 > 1 still, so expert 5 takes all four extra replicas, each on its own rank.
    assert count.tolist() == [1, 1, 1, 1, 1, 5, 1, 1]
    live = placement.logical_to_physical_map[0, 5, :5]
    assert len(set((live // 2).tolist())) == 5
    # With a second hot expert the extras split between them by load per replica.
    load[2] = 6.0
    count = plan_placement(8, 6, num_redundant=4, load=load).logical_replica_count[0]
    # 10 -> e5 (5), 6 -> e2 (3), 5 -> e5 (3.33), 3.33 -> e5 (2.5).
    assert count.tolist() == [1, 1, 2, 1, 1, 4, 1, 1]
    # Equal loads per replica go to the lower expert id first.
    load[5] = 6.0
    count = plan_placement(8, 6, num_redundant=4, load=load).logical_replica_count[0]
    assert count.tolist() == [1, 1, 3, 1, 1, 3, 1, 1]


def test_per_layer_load() -> None:
    load = torch.ones(2, 6)
    load[0, 1] = 9.0
    load[1, 4] = 9.0
    count = plan_placement(6, 2, num_layers=2, num_redundant=2, load=load, max_replicas=3).logical_replica_count
    assert count.tolist() == [[1, 3, 1, 1, 1, 1], [1, 1, 1, 1, 3, 1]]


@pytest.mark.parametrize("num_ranks", [1, 2, 4, 8, 16])
def test_uniform_load_gives_contiguous_layout(num_ranks: int) -> None:
    placement = plan_placement(16, num_ranks, num_layers=3)
    expected = torch.arange(16).repeat(3, 1)  # rank r holds experts r*16/N .. (r+1)*16/N - 1
    assert torch.equal(placement.physical_to_logical_map, expected)
    assert placement.max_replicas == num_ranks
    assert (placement.logical_replica_count == 1).all()


def test_default_max_replicas_and_large_case_is_fast() -> None:
    import time

    load = torch.rand(61, 256, generator=torch.Generator().manual_seed(0)) ** 3
    start = time.perf_counter()
    placement = plan_placement(256, 32, num_layers=61, num_redundant=32, load=load)
    elapsed = time.perf_counter() - start
    assert placement.logical_to_physical_map.shape == (61, 256, 32)
    assert elapsed < 1.0, f"plan_placement took {elapsed:.2f} s"


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        (dict(num_experts=10, num_ranks=4), "num_ranks=4"),
        (dict(num_experts=8, num_ranks=0), "num_ranks=0"),
        (dict(num_experts=0, num_ranks=1), "num_experts=0"),
        (dict(num_experts=8, num_ranks=2, num_layers=0), "num_layers=0"),
        (dict(num_experts=8, num_ranks=2, num_redundant=-2), "num_redundant=-2"),
        (dict(num_experts=8, num_ranks=2, load=torch.ones(7)), "[7]"),
        (dict(num_experts=8, num_ranks=2, num_layers=2, load=torch.ones(3, 8)), "[3, 8]"),
        (dict(num_experts=4, num_ranks=2, load=torch.tensor([1.0, -0.5, 1.0, 1.0])), "-0.5"),
        (dict(num_experts=4, num_ranks=2, load=torch.tensor([1.0, float("nan"), 1.0, 1.0])), "nan"),
        (dict(num_experts=4, num_ranks=2, load=torch.tensor([1.0, float("inf"), 1.0, 1.0])), "inf"),
        (dict(num_experts=4, num_ranks=2, load=[1.0, 1.0, 1.0, 1.0]), "list"),
        (dict(num_experts=4, num_ranks=2, num_redundant=2, load=torch.tensor([9.0, 1, 1, 1]), max_replicas=2), "max_replicas=2"),
        (dict(num_experts=2, num_ranks=2, num_redundant=4, load=torch.tensor([9.0, 1])), "max_replicas=2"),
    ],
)
def test_bad_input_raises_config_error(kwargs: dict, names: str) -> None:
    with pytest.raises(ConfigError) as info:
        plan_placement(**kwargs)
    assert names in str(info.value)


def test_routing_tables_update_in_place_keeps_storage() -> None:
    from eep.placement.routing import RoutingTables

    first = plan_placement(64, 4, num_layers=3, num_redundant=8)
    skewed = plan_placement(64, 4, num_layers=3, num_redundant=8, load=torch.arange(64, dtype=torch.float32))
    tables = RoutingTables.from_placement(first)
    ptrs = tables.data_ptrs()
    tables.update_(skewed)
    assert tables.data_ptrs() == ptrs
    assert torch.equal(tables.physical_to_logical_map, skewed.physical_to_logical_map)
    assert not torch.equal(skewed.physical_to_logical_map, first.physical_to_logical_map)
