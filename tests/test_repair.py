"""Properties of the pure repair planner `eep.placement.repair.plan_repair` and its topology."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from eep.errors import ConfigError
from eep.placement.backups import backup_masks
from eep.placement import repair
from eep.placement.eplb import plan_placement
from eep.placement.repair import Relocation, RepairPlan, plan_rejoin, plan_repair, schedule_transfers
from eep.placement.routing import (
    Placement,
    check_tables_only,
    placement_from_phy2log,
    spare_slots_for,
    with_spare_slots,
    without_slots,
)
from eep.placement.topology import Topology

GB = 10**9
# the hand-computed examples below use round figures, not the measured defaults
HAND = Topology(peer_bytes_per_s=5 * GB, backup_bytes_per_s=5 * GB, disk_bytes_per_s=GB, disk_open_s=0.0)


@st.composite
def scenarios(draw: st.DrawFn) -> dict:
    """A valid planner input: an EPLB placement, some slots dropped or emptied, dead ranks, a backup."""
    num_ranks = draw(st.integers(1, 6))
    per_rank = draw(st.integers(1, 5))
    slots = num_ranks * per_rank
    num_experts = draw(st.integers(max(1, slots - 2 * num_ranks), slots))
    num_layers = draw(st.integers(1, 3))
    load = draw(st.none() | st.lists(st.integers(0, 9), min_size=num_experts, max_size=num_experts))
    placement = plan_placement(
        num_experts, num_ranks, num_layers=num_layers, num_redundant=slots - num_experts,
        load=None if load is None else torch.tensor(load, dtype=torch.float64), max_replicas=slots,
    )
    # Per slot: k = keep, d = dropped from the tables (weights kept), o = dropped, holds another
    # expert, f = free (tables and weights empty).
    kinds = draw(st.sampled_from(["k", "kkkkkkdof"]))  # half the time straight from the planner
    status = draw(st.lists(st.sampled_from(kinds), min_size=num_layers * slots, max_size=num_layers * slots))
    status_grid = [status[i * slots:(i + 1) * slots] for i in range(num_layers)]
    unlisted = torch.tensor([[s != "k" for s in row] for row in status_grid])
    held = placement.physical_to_logical_map.clone()
    for layer, row in enumerate(status_grid):
        for slot, s in enumerate(row):
            if s == "f":
                held[layer, slot] = -1
            elif s == "o":
                held[layer, slot] = (slot + layer) % num_experts
    backup = draw(st.none() | st.lists(st.booleans(), min_size=num_layers * num_experts, max_size=num_layers * num_experts))
    rate = st.sampled_from([0.5 * GB, GB, 5 * GB])
    topology = Topology(
        peer_bytes_per_s=draw(rate), backup_bytes_per_s=draw(rate), disk_bytes_per_s=draw(rate),
        peer_concurrency=draw(st.integers(1, 3)), backup_concurrency=draw(st.integers(1, 3)),
        disk_concurrency=draw(st.integers(1, 3)), disk_open_s=draw(st.sampled_from([0.0, 0.5, 2.0])),
    )
    return dict(
        tables=without_slots(placement, unlisted),
        held=held,
        num_ranks=num_ranks,
        dead=draw(st.frozensets(st.integers(0, num_ranks - 1), min_size=min(1, num_ranks - 1), max_size=num_ranks)),
        expert_bytes=draw(st.sampled_from([1, 4096, 3 << 20, 2 * GB])),
        topology=topology,
        backup=None if backup is None else torch.tensor(backup).view(num_layers, num_experts),
    )


def run(sc: dict) -> RepairPlan:
    return plan_repair(
        sc["tables"], sc["held"], sc["num_ranks"], sc["dead"],
        expert_bytes=sc["expert_bytes"], topology=sc["topology"], backup=sc["backup"],
    )


def live_mask(sc: dict) -> torch.Tensor:
    """`[P]` bool: slot on a surviving rank."""
    num_physical = sc["held"].shape[1]
    per_rank = num_physical // sc["num_ranks"]
    return torch.tensor([p // per_rank not in sc["dead"] for p in range(num_physical)])


def expectations(sc: dict) -> list[dict]:
    """Per layer, what any correct plan must do, computed independently of the planner."""
    live = live_mask(sc)
    phy = sc["tables"].physical_to_logical_map
    out = []
    for layer in range(phy.shape[0]):
        row, held = phy[layer], sc["held"][layer]
        listed = set(row[live & (row >= 0)].tolist())
        spare = set(held[live & (row < 0) & (held >= 0)].tolist())
        on_dead = set(row[~live & (row >= 0)].tolist())
        touched = {e for e in range(sc["tables"].num_logical) if e in on_dead or e not in listed}
        reusable = touched & (listed | spare)
        out.append(dict(live_slots=int(live.sum()), listed=listed, touched=touched, reusable=reusable, lost=touched - reusable))
    return out


def all_fields(plan: RepairPlan) -> tuple:
    tensors = [plan.held_after]
    for p in (plan.placement, plan.interim):
        tensors += [p.physical_to_logical_map, p.logical_to_physical_map, p.logical_replica_count]
    return tuple(t.tolist() for t in tensors), plan.transfers, plan.tiers, plan.uncovered, plan.est_makespan_s


def as_loaded(held: torch.Tensor) -> Placement:
    """`held [L, P]` as a Placement, only to compare slot contents with `check_tables_only`."""
    return placement_from_phy2log(held, int(held.max().clamp(min=0)) + 1, held.shape[1])


@settings(max_examples=200, deadline=None)
@given(scenarios())
def test_no_dead_slot_is_used(sc: dict) -> None:
    plan = run(sc)
    dead_slots = (~live_mask(sc)).nonzero().flatten().tolist()
    for p in (plan.placement, plan.interim):
        assert (p.physical_to_logical_map[:, dead_slots] == -1).all()
        assert not set(dead_slots) & set(p.logical_to_physical_map.flatten().tolist())
    assert (plan.held_after[:, dead_slots] == -1).all()
    assert all(t.dst_slot not in dead_slots and t.dst_rank not in sc["dead"] for t in plan.transfers)


@settings(max_examples=200, deadline=None)
@given(scenarios())
def test_coverage_and_uncovered(sc: dict) -> None:
    plan = run(sc)
    count = plan.placement.logical_replica_count
    for layer, exp in enumerate(expectations(sc)):
        uncovered = [e for (l, e) in plan.uncovered if l == layer]
        relocated = [r.expert for r in plan.tiers if r.layer == layer and r.tier == 2]
        missing = (count[layer] == 0).nonzero().flatten().tolist()
        assert uncovered == missing  # exactly the experts without a replica, ascending
        assert set(missing) <= exp["lost"]  # nothing covered was given up for them
        assert set(relocated) | set(uncovered) == exp["lost"]
        if exp["live_slots"] >= sc["tables"].num_logical:
            assert not uncovered
        if uncovered:
            # Lost experts are relocated by ascending id until no slot can be had without
            # dropping an expert's last replica: every live slot is then listed, once per expert.
            assert max(relocated, default=-1) < min(uncovered)
            live_row = plan.placement.physical_to_logical_map[layer, live_mask(sc)]
            assert (live_row >= 0).all() and int(count[layer].max()) <= 1
    assert plan.covered_fraction == pytest.approx(1 - len(plan.uncovered) / count.numel())


@settings(max_examples=80, deadline=None)
@given(scenarios())
def test_deterministic(sc: dict) -> None:
    first = run(sc)
    again = dict(sc, tables=Placement(*(t.clone() for t in (
        sc["tables"].physical_to_logical_map, sc["tables"].logical_to_physical_map, sc["tables"].logical_replica_count
    ))), held=sc["held"].clone(), dead=frozenset(sorted(sc["dead"], reverse=True)))
    assert all_fields(first) == all_fields(run(again))


@settings(max_examples=200, deadline=None)
@given(scenarios())
def test_tiers_match_what_could_be_reused(sc: dict) -> None:
    plan = run(sc)
    expected = [(layer, e) for layer, exp in enumerate(expectations(sc)) for e in sorted(exp["touched"])]
    got = [(r.layer, r.expert) for r in plan.tiers]
    assert sorted(got + list(plan.uncovered)) == expected
    for layer, exp in enumerate(expectations(sc)):
        assert {r.expert for r in plan.tiers if r.layer == layer and r.tier == 1} == exp["reusable"]
    assert sorted((t.layer, t.expert) for t in plan.transfers) == [(r.layer, r.expert) for r in plan.tiers if r.tier == 2]
    if all(not exp["lost"] for exp in expectations(sc)):
        assert plan.transfers == () and plan.bytes_moved == 0 and plan.est_makespan_s == 0.0


@settings(max_examples=80, deadline=None)
@given(
    num_experts=st.integers(1, 12),
    num_ranks=st.integers(2, 6),
    num_layers=st.integers(1, 3),
    data=st.data(),
)
def test_enough_redundancy_is_tier_one_only(num_experts: int, num_ranks: int, num_layers: int, data: st.DataObject) -> None:
    slots = -(-2 * num_experts // num_ranks) * num_ranks  # >= 2 replicas of every expert
    tables = plan_placement(num_experts, num_ranks, num_layers=num_layers, num_redundant=slots - num_experts)
    dead = frozenset({data.draw(st.integers(0, num_ranks - 1))})
    dead_slots = torch.tensor([p // (slots // num_ranks) in dead for p in range(slots)]).expand(num_layers, slots)
    survivors = without_slots(tables, dead_slots)
    assume(bool((survivors.logical_replica_count > 0).all()))  # every expert has a replica elsewhere
    plan = plan_repair(tables, tables.physical_to_logical_map, num_ranks, dead, expert_bytes=GB, topology=HAND)
    assert plan.transfers == () and plan.bytes_moved == 0 and plan.uncovered == ()
    assert plan.tiers and all(r.tier == 1 for r in plan.tiers)
    expected = (survivors.physical_to_logical_map, survivors.logical_to_physical_map, survivors.logical_replica_count)
    assert list(all_fields(plan)[0][1:4]) == [t.tolist() for t in expected]


class _ScanEverySlot:
    """The target rule as the module docstring writes it, by scanning every slot for every
    copy: the oracle of the planner's heaps (`repair._Targets`)."""

    def __init__(self, state: Any, moves_layer: list[int], moves_total: list[int], *_: object) -> None:
        self.s, self.moves_layer, self.moves_total = state, moves_layer, moves_total  # the slot lists go unused

    def pick(self) -> int | None:
        s = self.s
        unlisted = [p for p, ok in enumerate(s.live) if ok and s.phy[p] < 0]
        for candidates in ([p for p in unlisted if s.hold[p] < 0], [p for p in unlisted if s.hold[p] >= 0]):
            if candidates:
                return self._spread(candidates)
        donors = [e for e, n in enumerate(s.count) if n >= 2]
        if not donors:
            return None
        donor = max(donors, key=lambda e: (s.count[e], -e))
        return self._spread([p for p, e in enumerate(s.phy) if e == donor])

    def _spread(self, candidates: list[int]) -> int:
        rank = self.s.rank
        slot = min(candidates, key=lambda p: (self.moves_layer[rank(p)], self.moves_total[rank(p)], p))
        self.moves_layer[rank(slot)] += 1  # the move counted on its rank
        self.moves_total[rank(slot)] += 1
        return slot


@settings(max_examples=200, deadline=None)
@given(scenarios())
def test_the_planners_heaps_choose_what_scanning_every_slot_chooses(sc: dict) -> None:
    fast = all_fields(run(sc))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(repair, "_Targets", _ScanEverySlot)
        assert all_fields(run(sc)) == fast


@pytest.mark.parametrize("seed", range(4))
def test_the_planners_heaps_choose_what_scanning_every_slot_chooses_across_many_layers(seed: int) -> None:
    """Wider instances than the drawn ones: many layers (copies spread by their moves in all
    layers), hosts with ring backups, spare slots, one host or scattered ranks lost."""
    gen = torch.Generator().manual_seed(seed)
    num_ranks, per_host = 16, 4
    tables = with_spare_slots(plan_placement(48, num_ranks, num_layers=12, num_redundant=16,
                                             load=torch.rand(12, 48, generator=gen)), num_ranks, 1 + seed % 2)
    hosts = [r // per_host for r in range(num_ranks)]
    dead = {0: set(range(4, 8)), 1: {1, 6, 11}, 2: set(range(0, 16, 2)), 3: set(range(8, 16))}[seed]
    kw = dict(expert_bytes=3 << 20, topology=Topology(peer_concurrency=2), backup=backup_masks(tables, hosts),
              host_of=hosts)
    fast = plan_repair(tables, tables.physical_to_logical_map, num_ranks, frozenset(dead), **kw)
    assert fast.transfers  # something to place
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(repair, "_Targets", _ScanEverySlot)
        assert all_fields(plan_repair(tables, tables.physical_to_logical_map, num_ranks, frozenset(dead), **kw)) \
            == all_fields(fast)


@settings(max_examples=200, deadline=None)
@given(scenarios())
def test_transfers_are_sound_and_fast(sc: dict) -> None:
    plan = run(sc)
    live = live_mask(sc)
    per_rank = sc["held"].shape[1] // sc["num_ranks"]
    topo, nbytes = sc["topology"], sc["expert_bytes"]
    targets = {(t.layer, t.dst_slot) for t in plan.transfers}
    assert len(targets) == len(plan.transfers)  # distinct destinations
    for t in plan.transfers:
        assert live[t.dst_slot] and t.dst_rank == t.dst_slot // per_rank
        assert int(plan.held_after[t.layer, t.dst_slot]) == t.expert
        assert int(plan.placement.physical_to_logical_map[t.layer, t.dst_slot]) == t.expert
        assert t.nbytes == nbytes and t.est_s == topo.transfer_s(t.source_kind, nbytes) and t.start_s >= 0
        if t.source_kind == "peer":
            sources = [p for p in range(t.source_rank * per_rank, (t.source_rank + 1) * per_rank)
                       if int(sc["held"][t.layer, p]) == t.expert and (t.layer, p) not in targets]
            assert t.source_rank not in sc["dead"] and sources
        elif t.source_kind == "backup":
            assert t.source_rank is None and bool(sc["backup"][t.layer, t.expert])
        else:
            assert t.source_kind == "disk" and t.source_rank is None
        # A source serves at most `concurrency` copies at once.
        same = [u for u in plan.transfers if (u.source_kind, u.source_rank) == (t.source_kind, t.source_rank)]
        assert sum(u.start_s <= t.start_s < u.finish_s for u in same) <= topo.concurrency(t.source_kind)
    # Only the copies change what a live slot holds.
    before = torch.where(live, sc["held"], -1)
    changed = {tuple(x) for x in (plan.held_after != before).nonzero().tolist()}
    assert changed <= targets
    n = len(plan.transfers)
    assert plan.est_makespan_s == max((t.finish_s for t in plan.transfers), default=0.0)
    assert plan.bytes_moved == n * nbytes
    opens = topo.disk_open_s * len({t.dst_rank for t in plan.transfers})  # each destination opens the disk once
    all_disk = math.ceil(n / topo.disk_concurrency) * topo.transfer_s("disk", nbytes) + opens
    assert plan.est_makespan_s <= all_disk * (1 + 1e-9)
    if sc["backup"] is not None and all(bool(sc["backup"][t.layer, t.expert]) for t in plan.transfers):
        all_backup = math.ceil(n / topo.backup_concurrency) * topo.transfer_s("backup", nbytes)
        assert plan.est_makespan_s <= all_backup * (1 + 1e-9)


@settings(max_examples=200, deadline=None)
@given(scenarios())
def test_tables_only_list_what_slots_hold(sc: dict) -> None:
    plan = run(sc)
    before = torch.where(live_mask(sc), sc["held"], -1)
    check_tables_only(as_loaded(plan.held_after), plan.placement)
    # The interim tables are valid both before and after the copies: serve with them meanwhile.
    check_tables_only(as_loaded(before), plan.interim)
    check_tables_only(as_loaded(plan.held_after), plan.interim)
    interim, final = plan.interim.physical_to_logical_map, plan.placement.physical_to_logical_map
    assert ((interim == final) | (interim == -1)).all()


@settings(max_examples=200, deadline=None)
@given(scenarios())
def test_tables_consistent_and_reclaim_keeps_one_replica(sc: dict) -> None:
    plan = run(sc)
    new = plan.placement
    tables = sc["tables"]
    assert new.logical_to_physical_map.shape == tables.logical_to_physical_map.shape
    assert new.physical_to_logical_map.shape == tables.physical_to_logical_map.shape
    phy, log2phy, count = new.physical_to_logical_map, new.logical_to_physical_map, new.logical_replica_count
    assert torch.equal(count.sum(dim=1), (phy >= 0).sum(dim=1))
    for layer in range(phy.shape[0]):
        assert torch.equal(torch.bincount(phy[layer][phy[layer] >= 0], minlength=tables.num_logical), count[layer])
        for e in range(tables.num_logical):
            assert (phy[layer, log2phy[layer, e, : int(count[layer, e])]] == e).all()
    # Counts only fall by reclaim, never below one; a lost expert gains at most one replica.
    dead_slots = (~live_mask(sc)).expand_as(phy)
    survivors = without_slots(tables, dead_slots).logical_replica_count
    assert (count <= survivors.clamp(min=1)).all()
    assert (count >= survivors.clamp(max=1)).all()
    for p in (plan.placement, plan.interim):
        assert (p.logical_replica_count >= survivors.clamp(max=1)).all()


# Hand-written examples. Uniform loads: 8 experts on 4 ranks without redundancy is the contiguous
# layout [0 1 | 2 3 | 4 5 | 6 7]; with 4 redundant slots experts 0..3 get a second replica and
# the layout is [0 2 4 | 0 2 5 | 1 3 6 | 1 3 7].

def plan_for(tables: Placement, dead: set[int], num_ranks: int, **kw: object) -> RepairPlan:
    kw.setdefault("held", tables.physical_to_logical_map)
    held = kw.pop("held")
    return plan_repair(tables, held, num_ranks, frozenset(dead), expert_bytes=GB, topology=HAND, **kw)


def rows(plan: RepairPlan) -> tuple[list[int], list[int], list[int]]:
    return (plan.placement.physical_to_logical_map[0].tolist(), plan.interim.physical_to_logical_map[0].tolist(),
            plan.held_after[0].tolist())


def summary(plan: RepairPlan) -> list[tuple]:
    return [(t.expert, t.dst_slot, t.dst_rank, t.source_kind, t.source_rank, t.start_s, t.est_s) for t in plan.transfers]


def test_no_redundancy_one_dead_rank_cannot_repair() -> None:
    tables = plan_placement(8, 4)
    plan = plan_for(tables, {1}, 4)
    assert rows(plan) == ([0, 1, -1, -1, 4, 5, 6, 7],) * 3
    assert plan.uncovered == ((0, 2), (0, 3))
    assert plan.transfers == () and plan.tiers == () and plan.covered_fraction == 0.75


def test_redundancy_one_dead_rank_reuses_and_reclaims() -> None:
    tables = plan_placement(8, 4, num_redundant=4)
    assert tables.physical_to_logical_map[0].tolist() == [0, 2, 4, 0, 2, 5, 1, 3, 6, 1, 3, 7]
    plan = plan_for(tables, {1}, 4)
    # 0 and 2 keep a replica (tier 1); 5 is lost and goes to a reclaimed replica of expert 1 (the
    # lowest id among the doubled 1 and 3), on slot 6 (rank 2, before slot 9 on rank 3), from disk.
    assert rows(plan) == (
        [0, 2, 4, -1, -1, -1, 5, 3, 6, 1, 3, 7],
        [0, 2, 4, -1, -1, -1, -1, 3, 6, 1, 3, 7],
        [0, 2, 4, -1, -1, -1, 5, 3, 6, 1, 3, 7],
    )
    assert [(r.expert, r.tier) for r in plan.tiers] == [(0, 1), (2, 1), (5, 2)]
    assert summary(plan) == [(5, 6, 2, "disk", None, 0.0, 1.0)]
    assert plan.uncovered == () and plan.bytes_moved == GB and plan.est_makespan_s == 1.0
    # With a host backup of every expert, the copy comes from there, five times faster.
    backed = plan_for(tables, {1}, 4, backup=torch.ones(1, 8, dtype=torch.bool))
    assert summary(backed) == [(5, 6, 2, "backup", None, 0.0, 0.2)]


def test_redundancy_one_dead_rank_is_free_when_all_survive() -> None:
    tables = plan_placement(8, 4, num_redundant=4)
    plan = plan_for(tables, {2}, 4)  # rank 2 holds 1, 3 and 6: 6 is lost
    assert rows(plan)[0] == [6, 2, 4, 0, 2, 5, -1, -1, -1, 1, 3, 7]  # reclaims expert 0 on slot 0
    tables_two = plan_placement(8, 4, num_redundant=8)  # every expert twice
    assert (tables_two.logical_replica_count == 2).all()
    for rank in range(4):
        free = plan_for(tables_two, {rank}, 4)
        assert free.transfers == () and {r.tier for r in free.tiers} == {1} and free.bytes_moved == 0


def test_two_dead_ranks() -> None:
    tables = plan_placement(8, 4, num_redundant=4)
    plan = plan_for(tables, {1, 2}, 4)
    # Six live slots for eight experts, none doubled any more: 5 and 6 stay uncovered.
    assert rows(plan)[0] == [0, 2, 4, -1, -1, -1, -1, -1, -1, 1, 3, 7]
    assert plan.uncovered == ((0, 5), (0, 6)) and plan.transfers == ()
    assert [(r.expert, r.tier) for r in plan.tiers] == [(0, 1), (1, 1), (2, 1), (3, 1)]
    # Every expert twice, [0 2 4 6 | 0 2 4 6 | 1 3 5 7 | 1 3 5 7], ranks 0 and 1 dead: the even
    # experts are lost and each takes a reclaimed second replica (donors 1, 3, 5, 7 in turn),
    # alternating between ranks 2 and 3. The backup holds 0..3 only, so 4 and 6 come from disk.
    tables = plan_placement(8, 4, num_redundant=8)
    assert tables.physical_to_logical_map[0].tolist() == [0, 2, 4, 6] * 2 + [1, 3, 5, 7] * 2
    plan = plan_for(tables, {0, 1}, 4, backup=torch.tensor([[True] * 4 + [False] * 4]))
    assert rows(plan)[0] == [-1] * 8 + [0, 3, 4, 7, 1, 2, 5, 6]
    assert rows(plan)[1] == [-1] * 8 + [-1, 3, -1, 7, 1, -1, 5, -1]
    assert summary(plan) == [
        (0, 8, 2, "backup", None, 0.0, 0.2), (2, 13, 3, "backup", None, 0.2, 0.2),
        (4, 10, 2, "disk", None, 0.0, 1.0), (6, 15, 3, "disk", None, 1.0, 1.0),
    ]
    assert plan.est_makespan_s == 2.0 and plan.uncovered == () and plan.bytes_moved == 4 * GB
    assert [(r.expert, r.tier) for r in plan.tiers] == [(0, 2), (2, 2), (4, 2), (6, 2)]
    # Ranks 0 and 2 dead: every expert keeps its replica on rank 1 or 3.
    plan = plan_for(tables, {0, 2}, 4)
    assert plan.transfers == () and [r.tier for r in plan.tiers] == [1] * 8


def test_uncoverable() -> None:
    tables = plan_placement(8, 2)  # [0 1 2 3 | 4 5 6 7]
    plan = plan_for(tables, {1}, 2)
    assert rows(plan)[0] == [0, 1, 2, 3, -1, -1, -1, -1]
    assert plan.uncovered == ((0, 4), (0, 5), (0, 6), (0, 7)) and plan.covered_fraction == 0.5
    # A doubled expert gives its second replica up to the lowest lost id; the rest stay uncovered.
    tables = placement_from_phy2log(torch.tensor([[0, 0, 1, 2, 3, 4, 5, 6]]), 8, 2)
    plan = plan_for(tables, {1}, 2)
    assert rows(plan)[0] == [3, 0, 1, 2, -1, -1, -1, -1]
    assert plan.uncovered == ((0, 4), (0, 5), (0, 6), (0, 7))  # 7 had no replica even before
    assert [(r.expert, r.tier) for r in plan.tiers] == [(3, 2)]


def test_dropped_copy_is_reused_and_free_slot_filled() -> None:
    # Slot 6 still holds expert 2 (dropped from the tables earlier); slot 7 is free.
    tables = placement_from_phy2log(torch.tensor([[0, 1, 2, 3, 4, 5, -1, -1]]), 6, 4)
    held = torch.tensor([[0, 1, 2, 3, 4, 5, 2, -1]])
    plan = plan_for(tables, {1}, 4, held=held, backup=torch.tensor([[False, False, False, True, False, False]]))
    assert rows(plan) == ([0, 1, -1, -1, 4, 5, 2, 3], [0, 1, -1, -1, 4, 5, 2, -1], [0, 1, -1, -1, 4, 5, 2, 3])
    assert [(r.expert, r.tier) for r in plan.tiers] == [(2, 1), (3, 2)]
    assert plan.tier_of(0, 2) == 1 and plan.tier_of(0, 3) == 2 and plan.tier_of(0, 0) is None
    assert summary(plan) == [(3, 7, 3, "backup", None, 0.0, 0.2)]


def test_copies_spread_over_ranks_and_layers() -> None:
    # Two layers, rank 3 dead, one free slot on each of ranks 0..2 per layer. Layer 0 loses 3 and 4,
    # layer 1 loses 3 (and never had 4). Each copy goes to the rank with the fewest copies in its
    # layer, then in all layers: ranks 0, 1 | 2, 0.
    phy = torch.tensor([[0, -1, 1, -1, 2, -1, 3, 4], [0, -1, 1, -1, 2, -1, 3, -1]])
    tables = placement_from_phy2log(phy, 5, 2)
    plan = plan_for(tables, {3}, 4)
    assert plan.placement.physical_to_logical_map.tolist() == [[0, 3, 1, 4, 2, -1, -1, -1], [0, 4, 1, -1, 2, 3, -1, -1]]
    assert [(t.layer, t.expert, t.dst_rank, t.start_s) for t in plan.transfers] == [
        (0, 3, 0, 0.0), (0, 4, 1, 1.0), (1, 3, 2, 2.0), (1, 4, 0, 3.0),
    ]  # one disk, one copy at a time
    assert [(r.layer, r.expert, r.tier) for r in plan.tiers] == [(0, 3, 2), (0, 4, 2), (1, 3, 2), (1, 4, 2)]


def test_schedule_splits_between_backup_and_disk() -> None:
    # Backup 4x faster than disk: four copies from the backup finish at 1.0 s like one from disk;
    # the fifth goes to the disk because the backup would only free up at 1.25 s.
    topo = Topology(backup_bytes_per_s=2.0**32, disk_bytes_per_s=2.0**30, disk_open_s=0.0)
    moves = [Relocation(0, e, e, e, (), True) for e in range(6)]
    out = schedule_transfers(moves, expert_bytes=2**30, topology=topo)
    assert [(t.source_kind, t.start_s, t.finish_s) for t in out] == [
        ("backup", 0.0, 0.25), ("backup", 0.25, 0.5), ("backup", 0.5, 0.75), ("backup", 0.75, 1.0),
        ("disk", 0.0, 1.0), ("backup", 1.0, 1.25),
    ]
    # Two lanes on the disk: copies start in pairs.
    disk2 = schedule_transfers([Relocation(0, e, e, e) for e in range(3)], expert_bytes=GB, topology=Topology(disk_bytes_per_s=GB, disk_concurrency=2, disk_open_s=0.0))
    assert [(t.source_kind, t.start_s) for t in disk2] == [("disk", 0.0), ("disk", 0.0), ("disk", 1.0)]


def test_schedule_opens_the_disk_only_when_it_pays() -> None:
    # The default model's repair of one rank of four: 128 experts of 96 KiB into 3 survivors,
    # all in the backup. A first disk read costs its open (15 ms) and the backup is done in
    # ~4 ms, so nothing comes from the disk (without the open cost in the model 22 copies did,
    # and each rank that read the disk paid ~15 ms for its open).
    topo, nbytes = Topology(), 3 * 256 * 64 * 2
    moves = [Relocation(e // 64, e % 64, 16 + e % 3, e % 3, (), True) for e in range(128)]
    out = schedule_transfers(moves, expert_bytes=nbytes, topology=topo)
    assert {t.source_kind for t in out} == {"backup"}
    # A repair a hundred times larger: the disk takes part, each destination's first disk copy
    # starting after its open.
    many = [Relocation(e // 64, e % 64, e, e % 3, (), True) for e in range(12800)]
    big = schedule_transfers(many, expert_bytes=nbytes, topology=topo)
    disk = [t for t in big if t.source_kind == "disk"]
    assert disk and min(t.start_s for t in disk) >= topo.disk_open_s
    assert max(t.finish_s for t in big) < len(many) * topo.transfer_s("backup", nbytes)


def test_schedule_prefers_peers_and_spreads_over_them() -> None:
    # Peer and backup equally fast: a tie goes to the peer (lowest rank first), and copies spread
    # over the peer queues; a copy with no peer may use the backup.
    topo = Topology(peer_bytes_per_s=2.0**32, backup_bytes_per_s=2.0**32, disk_bytes_per_s=2.0**30, disk_open_s=0.0)
    moves = [
        Relocation(0, 0, 0, 0, (3, 2), True),
        Relocation(0, 1, 1, 0, (2, 3), True),
        Relocation(0, 2, 4, 1, (2,), True),
        Relocation(0, 3, 5, 1, (), False),
    ]
    out = schedule_transfers(moves, expert_bytes=2**30, topology=topo)
    assert [(t.source_kind, t.source_rank, t.start_s) for t in out] == [
        ("peer", 2, 0.0), ("peer", 3, 0.0), ("backup", None, 0.0), ("disk", None, 0.0),
    ]


def test_deterministic_across_processes() -> None:
    script = (
        "import torch\n"
        "from eep.placement.eplb import plan_placement\n"
        "from eep.placement.repair import plan_repair\n"
        "from eep.placement.topology import Topology\n"
        "t = plan_placement(24, 6, num_layers=3, num_redundant=6, load=torch.linspace(0.0, 3.0, 24).pow(3).roll(5))\n"
        "b = torch.arange(72).view(3, 24) % 3 == 0\n"
        "p = plan_repair(t, t.physical_to_logical_map, 6, frozenset({4, 1}), expert_bytes=3 << 20,\n"
        "                topology=Topology(disk_concurrency=2), backup=b)\n"
        "print(p.placement.physical_to_logical_map.tolist(), p.held_after.tolist(), p.transfers, p.tiers,\n"
        "      p.uncovered, repr(p.est_makespan_s))\n"
    )
    here: dict = {}
    exec(script.replace("print(", "here['out'] = ("), {"here": here})  # noqa: S102 - same code, this process
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True, cwd=root)
    assert out.stdout.strip() == " ".join(str(x) for x in here["out"])
    assert "Transfer(" in out.stdout  # the example does relocate


def _bad(kw: dict) -> dict:
    tables = plan_placement(8, 4, num_redundant=4)
    base = dict(tables=tables, held=tables.physical_to_logical_map, num_ranks=4, dead=frozenset({1}),
                expert_bytes=GB, topology=HAND, backup=None)
    return {**base, **kw}


@pytest.mark.parametrize(
    ("kw", "names"),
    [
        (dict(num_ranks=5), "num_ranks=5"),
        (dict(num_ranks=0), "num_ranks=0"),
        (dict(dead=frozenset({4})), "dead rank 4"),
        (dict(dead=frozenset({-1})), "dead rank -1"),
        (dict(dead=3), "int"),
        (dict(expert_bytes=0), "expert_bytes=0"),
        (dict(expert_bytes=1.5), "expert_bytes=1.5"),
        (dict(held=torch.zeros(1, 8, dtype=torch.int64)), "[1, 8]"),
        (dict(held=torch.zeros(1, 12)), "float32"),
        (dict(held=torch.full((1, 12), 8)), "= 8"),
        (dict(held=torch.full((1, 12), -2)), "= -2"),
        (dict(held=torch.zeros(1, 12, dtype=torch.int64)), "slot 1"),  # slot 1 is listed with expert 2
        (dict(backup=torch.ones(1, 7, dtype=torch.bool)), "[1, 7]"),
        (dict(backup=torch.ones(1, 8)), "float32"),
        (dict(topology={"disk_bytes_per_s": 1e9}), "dict"),
        (dict(tables=torch.zeros(1, 12)), "Tensor"),
    ],
)
def test_bad_input_raises_config_error(kw: dict, names: str) -> None:
    args = _bad(kw)
    with pytest.raises(ConfigError) as info:
        plan_repair(args.pop("tables"), args.pop("held"), args.pop("num_ranks"), args.pop("dead"), **args)
    assert names in str(info.value)


def test_dead_slot_contents_are_ignored() -> None:
    tables = plan_placement(8, 4, num_redundant=4)
    held = tables.physical_to_logical_map.clone()
    held[0, 3:6] = -1  # a caller may already mark the dead rank's slots as holding nothing
    assert all_fields(plan_for(tables, {1}, 4, held=held)) == all_fields(plan_for(tables, {1}, 4))
    nothing = plan_for(tables, set(), 4)
    assert nothing.tiers == () and nothing.transfers == ()
    assert torch.equal(nothing.placement.physical_to_logical_map, tables.physical_to_logical_map)
    everyone = plan_for(tables, {0, 1, 2, 3}, 4)
    assert len(everyone.uncovered) == 8 and everyone.covered_fraction == 0.0


def test_topology_defaults_and_round_trip() -> None:
    topo = Topology()
    assert topo.transfer_s("peer", 5 * GB) == 1.0 and topo.transfer_s("disk", 6 * GB // 10) == 1.0
    assert topo.concurrency("backup") == 1
    custom = Topology.from_dict(json.loads(json.dumps(dict(disk_bytes_per_s=2 * GB, disk_concurrency=4))))
    assert custom.disk_bytes_per_s == 2e9 and isinstance(custom.disk_bytes_per_s, float)
    assert custom.peer_bytes_per_s == topo.peer_bytes_per_s
    assert Topology.from_dict(json.loads(json.dumps(custom.to_dict()))) == custom
    assert Topology(peer_bytes_per_s=5 * GB) == topo  # ints are stored as floats


@pytest.mark.parametrize(
    ("make", "names"),
    [
        (lambda: Topology(disk_bytes_per_s=0), "disk_bytes_per_s=0"),
        (lambda: Topology(peer_bytes_per_s=-1.0), "peer_bytes_per_s=-1.0"),
        (lambda: Topology(backup_bytes_per_s=float("inf")), "backup_bytes_per_s=inf"),
        (lambda: Topology(backup_bytes_per_s=float("nan")), "backup_bytes_per_s=nan"),
        (lambda: Topology(disk_bytes_per_s="1e9"), "disk_bytes_per_s='1e9'"),
        (lambda: Topology(disk_bytes_per_s=True), "disk_bytes_per_s=True"),
        (lambda: Topology(peer_concurrency=0), "peer_concurrency=0"),
        (lambda: Topology(disk_concurrency=1.5), "disk_concurrency=1.5"),
        (lambda: Topology(disk_open_s=-0.1), "disk_open_s=-0.1"),
        (lambda: Topology(disk_open_s=float("nan")), "disk_open_s=nan"),
        (lambda: Topology.from_dict({"disk_bw": 1}), "disk_bw"),
        (lambda: Topology.from_dict([1, 2]), "list"),
        (lambda: Topology().transfer_s("nfs", 1), "nfs"),
        (lambda: Topology().transfer_s("disk", -1), "nbytes=-1"),
    ],
)
def test_bad_topology_raises_config_error(make, names: str) -> None:
    with pytest.raises(ConfigError) as info:
        make()
    assert names in str(info.value)


@settings(max_examples=150, deadline=None)
@given(scenarios())
def test_rejoin_after_repair_lists_only_held_weights_and_restores_the_rank(sc: dict) -> None:
    """After a repair, each dead rank comes back with its slots of the original placement: the
    tables list only what slots hold, within the replica width, and the rank's slots again."""
    plan = run(sc)
    tables, held = plan.placement, plan.held_after
    target = sc["held"]  # what the ranks held before the failure
    per_rank = tables.num_physical // sc["num_ranks"]
    for rank in sorted(sc["dead"]):
        again, again_held = plan_rejoin(tables, held, sc["num_ranks"], rank, target)
        assert torch.equal(  # pure: the same input gives the same tables
            again.physical_to_logical_map, plan_rejoin(tables, held, sc["num_ranks"], rank, target)[0].physical_to_logical_map
        )
        cols = slice(rank * per_rank, (rank + 1) * per_rank)
        assert torch.equal(again_held[:, cols], target[:, cols].to(torch.int64))
        listed = again.physical_to_logical_map
        assert bool(((listed == again_held) | (listed == -1)).all())  # a slot lists what it holds, or nothing
        assert int(again.logical_replica_count.max()) <= again.max_replicas
        held_any = torch.zeros_like(again.logical_replica_count, dtype=torch.bool)
        for layer in range(listed.shape[0]):
            for expert in again_held[layer].tolist():
                if expert >= 0:
                    held_any[layer, expert] = True
        assert bool(((again.logical_replica_count > 0) == held_any).all())  # every held expert is served
        tables, held = again, again_held


@settings(max_examples=60, deadline=None)
@given(nnodes=st.integers(2, 4), ranks_per_host=st.integers(1, 3), per_rank=st.integers(1, 4),
       redundant=st.integers(0, 3), host=st.integers(0, 3), seed=st.integers(0, 99))
def test_spare_slots_for_a_host_rehome_all_its_slots(nnodes: int, ranks_per_host: int, per_rank: int,
                                                     redundant: int, host: int, seed: int) -> None:
    # the default spare room across hosts: one whole host's slots fit into the survivors' empty
    # ones, so its loss leaves every expert served and costs no other expert a replica
    num_ranks, host = nnodes * ranks_per_host, host % nnodes
    slots = num_ranks * per_rank
    assume(redundant < slots)
    load = torch.rand(slots - redundant, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    balanced = plan_placement(slots - redundant, num_ranks, num_layers=2, num_redundant=redundant, load=load,
                              max_replicas=slots)
    spare = spare_slots_for(per_rank, num_ranks, ranks_per_host)
    assert spare * (num_ranks - ranks_per_host) >= per_rank * ranks_per_host > (spare - 1) * (num_ranks - ranks_per_host)
    tables = with_spare_slots(balanced, num_ranks, spare, balanced.max_replicas + 1)
    dead = frozenset(range(host * ranks_per_host, (host + 1) * ranks_per_host))
    plan = plan_repair(tables, tables.physical_to_logical_map, num_ranks, dead, expert_bytes=GB, topology=HAND)
    assert plan.uncovered == ()
    before = tables.logical_replica_count
    after = plan.placement.logical_replica_count
    lost = torch.zeros_like(before)
    for layer, row in enumerate(tables.physical_to_logical_map.tolist()):
        for slot, expert in enumerate(row):
            if expert >= 0 and slot // (per_rank + spare) in dead:
                lost[layer, expert] += 1
    assert bool((after >= before - lost).all()) and bool((after >= 1).all())
    with pytest.raises(ConfigError):
        spare_slots_for(per_rank, num_ranks, num_ranks)


# -- across hosts: backups on another failure domain, copies over the inter-host link -------------
NET = Topology(peer_bytes_per_s=5 * GB, backup_bytes_per_s=5 * GB, disk_bytes_per_s=GB, disk_open_s=0.0,
               network_bytes_per_s=2 * GB)


def _two_hosts(rows: list[list[int]], num_experts: int) -> Placement:
    return placement_from_phy2log(torch.tensor(rows, dtype=torch.int64), num_experts, 2)


def test_backup_masks_keep_the_next_hosts_experts_and_their_own() -> None:
    tables = _two_hosts([[0, -1, 1, -1, 2, -1, 3, -1]], 4)  # 4 ranks x 2 slots, hosts [0, 0, 1, 1]
    masks = backup_masks(tables, [0, 0, 1, 1])
    assert masks[0].tolist() == [[True, True, True, True]] and masks[1].tolist() == [[True, True, True, True]]
    ring = backup_masks(tables, [0, 0, 1, 1], own=False)
    assert ring[0].tolist() == [[False, False, True, True]] and ring[1].tolist() == [[True, True, False, False]]
    three = backup_masks(placement_from_phy2log(torch.tensor([[0, 1, 2]]), 3, 1), [0, 1, 2], own=False)
    assert [m.tolist() for m in three.values()] == [[[False, True, False]], [[False, False, True]], [[True, False, False]]]
    assert backup_masks(tables, [0, 0, 0, 0])[0].all()  # one host: its own experts
    with pytest.raises(ConfigError):
        backup_masks(tables, [0, 0, 2, 2])


def test_a_lost_hosts_experts_come_from_the_backup_the_other_host_keeps() -> None:
    # host 1 (ranks 2, 3) lost: experts 2 and 3 go to the spare slots on host 0 and are copied
    # from host 0's backup, within the host (5 GB/s: 0.2 s each, one at a time); host 1's
    # backup is gone with it
    tables = _two_hosts([[0, -1, 1, -1, 2, -1, 3, -1]], 4)
    hosts = [0, 0, 1, 1]
    plan = plan_repair(tables, tables.physical_to_logical_map, 4, frozenset({2, 3}), expert_bytes=GB, topology=NET,
                       backup=backup_masks(tables, hosts), host_of=hosts)
    assert plan.uncovered == ()
    got = [(t.expert, t.dst_rank, t.source_kind, t.source_host, t.start_s, t.est_s) for t in plan.transfers]
    assert got == [(2, 0, "backup", 0, 0.0, 0.2), (3, 1, "backup", 0, 0.2, 0.2)]
    assert plan.est_makespan_s == pytest.approx(0.4)


def test_a_copy_across_hosts_runs_at_the_inter_host_link_and_loses_to_a_faster_local_disk() -> None:
    # rank 3 lost, host 1 lives: expert 5 goes to rank 2's free slot (host 1); only host 0's
    # backup holds it (the ring without own experts): over the 2 GB/s link 0.5 s, against
    # host 1's own disk 1 s; over a 0.5 GB/s link 2 s, and the disk wins
    tables = _two_hosts([[0, 1, 2, 3, 4, -1, 5, -1]], 6)
    hosts = [0, 0, 1, 1]
    backups = backup_masks(tables, hosts, own=False)
    assert backups[0][0, 5] and not backups[1][0, 5]

    def plan_with(topology: Topology) -> tuple:  # type: ignore[type-arg]
        plan = plan_repair(tables, tables.physical_to_logical_map, 4, frozenset({3}), expert_bytes=GB,
                           topology=topology, backup=backups, host_of=hosts)
        (t,) = plan.transfers
        return t.expert, t.dst_rank, t.source_kind, t.source_host, t.est_s

    assert plan_with(NET) == (5, 2, "backup", 0, 0.5)
    slow = Topology.from_dict({**NET.to_dict(), "network_bytes_per_s": GB / 2})
    assert plan_with(slow) == (5, 2, "disk", 1, 1.0)


def test_every_host_copies_from_its_own_backup_at_once() -> None:
    # a backup on every host (a whole copy each): the copies into host 0 and host 1 run in
    # parallel from two sources, not one after the other
    tables = _two_hosts([[0, -1, 1, -1, 2, -1, 3, -1]], 4)
    everywhere = torch.ones(1, 4, dtype=torch.bool)
    for hosts, makespan in (([0, 0, 1, 1], 0.2), ([0, 0, 0, 0], 0.4)):
        plan = plan_repair(tables, tables.physical_to_logical_map, 4, frozenset({1, 3}), expert_bytes=GB,
                           topology=NET, backup=everywhere, host_of=hosts)
        assert {(t.dst_rank, t.source_host) for t in plan.transfers} == ({(0, 0), (2, 1)} if hosts[2] else {(0, 0), (2, 0)})
        assert plan.est_makespan_s == pytest.approx(makespan)
