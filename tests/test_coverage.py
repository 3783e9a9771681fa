"""Coverage follows the committed view, whatever sequence of membership changes led to it.

A property test drives random sequences of fail / double fail / begin-join / join-fails /
activate / drain / a repair cut short, through `MembershipView` and `plan_coverage` exactly as
the controller (`EPExecutor`) calls them, and checks after every change: the instance is paused
exactly when its active ranks have too few slots for every expert; whenever it is not paused
every expert has a live replica (or, in degraded mode, exactly the uncovered ones are masked);
the tables never list a slot outside the view nor one that does not hold the listed expert.
"""

from __future__ import annotations

import math

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from eep.placement.coverage import coverable, outside, pause_reason, plan_coverage
from eep.membership.view import MembershipView, RankState
from eep.placement.eplb import plan_placement
from eep.placement.repair import RepairPlan
from eep.placement.routing import Placement, with_spare_slots
from eep.placement.topology import Topology

TOPOLOGY = Topology()


def _target(num_ranks: int, num_experts: int, num_layers: int, redundant: int, spare: int | None) -> Placement:
    """The layout `EPExecutor` starts from: balanced placement plus spare slots per rank."""
    balanced = plan_placement(num_experts, num_ranks, num_layers=num_layers, num_redundant=redundant)
    if spare is None:  # the executor's default: room to re-home one rank's experts on the others
        spare = math.ceil(balanced.num_physical // num_ranks / (num_ranks - 1))
    return with_spare_slots(balanced, num_ranks, spare, balanced.max_replicas + 1)


class Controller:
    """The controller's coverage bookkeeping, reduced to its pure decisions: every view change
    is followed by `plan_coverage` from the committed view, as in `EPExecutor._reconcile`."""

    def __init__(self, target: Placement, num_ranks: int, on_uncoverable: str) -> None:
        self.target, self.on_uncoverable = target, on_uncoverable
        self.view = MembershipView.initial(tuple(range(1, num_ranks + 1)))
        self.tables, self.held = target, target.physical_to_logical_map.clone()
        self.plan: RepairPlan | None = None
        self.paused: str | None = None
        self.next_incarnation = 100

    def _cover(self, joined: tuple[int, ...] = (), cut_short: bool = False) -> None:
        plan = plan_coverage(self.view, self.tables, self.held, expert_bytes=1000, topology=TOPOLOGY,
                             joined=joined, target=self.target.physical_to_logical_map)
        if cut_short and plan.transfers:
            # a rank died while the copies ran: the tables in use stay, the copy targets' content
            # is unknown, the dead slots hold nothing, the joiners hold what they loaded
            for r in joined:
                self.held[:, self._slots(r)] = self.target.physical_to_logical_map[:, self._slots(r)]
            for t in plan.transfers:
                self.held[t.layer, t.dst_slot] = -1
            return
        self.tables, self.held, self.plan = plan.placement, plan.held_after.clone(), plan
        self.paused = pause_reason(plan, self.on_uncoverable)

    def _slots(self, rank: int) -> slice:
        per_rank = self.tables.num_physical // self.view.num_ranks
        return slice(rank * per_rank, (rank + 1) * per_rank)

    def apply(self, op: str, pick: int) -> None:
        view = self.view
        active, failed, joining = view.active_ranks, view.ranks_in(RankState.FAILED), view.ranks_in(RankState.JOINING)
        if op in ("fail", "drain", "cut_short") and len(active) > 1:
            self.view = view.fail({active[pick % len(active)]})
            self._cover()
            if op == "cut_short" and len(self.view.active_ranks) > 1:  # a second death during the copies
                self._cover(cut_short=True)
                self.view = self.view.fail({self.view.active_ranks[pick % len(self.view.active_ranks)]})
                self._cover()
        elif op == "double_fail" and len(active) > 2:
            a = active[pick % len(active)]
            b = active[(pick + 1) % len(active)]
            self.view = view.fail({a, b})
            self._cover()
        elif op == "begin_join" and failed:
            self.view = view.begin_join(failed[pick % len(failed)], self.next_incarnation)
            self.next_incarnation += 1
        elif op == "join_fails" and joining:
            self.view = view.fail({joining[pick % len(joining)]})
            self._cover()
        elif op == "activate" and joining:
            rank = joining[pick % len(joining)]
            self.view = view.activate(rank)
            self._cover(joined=(rank,))

    def check(self) -> None:
        phy = self.tables.physical_to_logical_map
        counts = self.tables.logical_replica_count
        per_rank = phy.shape[1] // self.view.num_ranks
        gone = outside(self.view)
        can = coverable(self.view, phy.shape[1], self.tables.num_logical)
        uncovered = set(self.plan.uncovered) if self.plan is not None else set()
        assert (self.paused is not None) == (self.on_uncoverable == "pause" and not can), (self.view, self.paused)
        assert bool(uncovered) == (not can)
        zero = {(int(layer), int(e)) for layer, e in torch.nonzero(counts == 0).tolist()}
        assert zero == uncovered  # every expert has a live replica, except exactly the masked ones
        for slot in range(phy.shape[1]):
            listed = phy[:, slot]
            if slot // per_rank in gone:
                assert bool((listed == -1).all()), f"slot {slot} of a rank outside the view is listed"
                assert bool((self.held[:, slot] == -1).all())
            else:
                ok = (listed == -1) | (listed == self.held[:, slot])
                assert bool(ok.all()), f"slot {slot} is listed with an expert it does not hold"


class CoverageMachine(RuleBasedStateMachine):
    """Random sequences of membership changes; only changes the view allows are drawn."""

    def __init__(self) -> None:
        super().__init__()
        self.ctl: Controller | None = None

    @initialize(num_ranks=st.integers(2, 5), num_experts=st.sampled_from([6, 8, 12]), redundant=st.integers(0, 2),
                spare=st.one_of(st.none(), st.integers(0, 3)), on_uncoverable=st.sampled_from(["pause", "degrade"]))
    def start(self, num_ranks: int, num_experts: int, redundant: int, spare: int | None, on_uncoverable: str) -> None:
        redundant = (-num_experts) % num_ranks + num_ranks * redundant  # whole slots per rank
        self.ctl = Controller(_target(num_ranks, num_experts, 2, redundant, spare), num_ranks, on_uncoverable)

    def _can(self, state: RankState, at_least: int = 1) -> bool:
        return self.ctl is not None and len(self.ctl.view.ranks_in(state)) >= at_least

    @precondition(lambda self: self._can(RankState.ACTIVE, 2))
    @rule(op=st.sampled_from(["fail", "drain", "cut_short"]), pick=st.integers(0, 7))
    def fail(self, op: str, pick: int) -> None:
        self.ctl.apply(op, pick)  # type: ignore[union-attr]

    @precondition(lambda self: self._can(RankState.ACTIVE, 3))
    @rule(pick=st.integers(0, 7))
    def double_fail(self, pick: int) -> None:
        self.ctl.apply("double_fail", pick)  # type: ignore[union-attr]

    @precondition(lambda self: self._can(RankState.FAILED))
    @rule(pick=st.integers(0, 7))
    def begin_join(self, pick: int) -> None:
        self.ctl.apply("begin_join", pick)  # type: ignore[union-attr]

    @precondition(lambda self: self._can(RankState.JOINING))
    @rule(op=st.sampled_from(["activate", "activate", "join_fails"]), pick=st.integers(0, 7))
    def joiner(self, op: str, pick: int) -> None:
        self.ctl.apply(op, pick)  # type: ignore[union-attr]

    @invariant()
    def coverage_follows_the_view(self) -> None:
        if self.ctl is not None:
            self.ctl.check()


CoverageMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)
test_coverage_follows_the_committed_view_under_any_sequence = CoverageMachine.TestCase


def test_finding_1_all_ranks_back_after_a_pause_that_began_during_a_rejoin() -> None:
    """The sequence of issue 12's finding 1: rank 2's rejoin starts; while it loads ranks 1 and 0
    die (one survivor: paused); rank 2 is switched in, then 0 and 1 rejoin and are switched in.
    Coverage resumes as soon as the active ranks can hold every expert (here at three ranks)."""
    target = _target(4, 64, 8, 0, None)
    ctl = Controller(target, 4, "pause")
    for op, pick in [("fail", 2), ("begin_join", 0)]:
        ctl.apply(op, pick)
    ctl.view = ctl.view.fail({0, 1})
    ctl._cover()
    ctl.check()
    assert ctl.paused is not None and ctl.view.active_ranks == (3,)
    ctl.apply("activate", 0)
    ctl.check()
    assert ctl.paused is not None  # two ranks, 44 slots a layer for 64 experts: still uncoverable
    for rank in (0, 1):
        ctl.view = ctl.view.begin_join(rank, ctl.next_incarnation + rank)
    ctl.view = ctl.view.activate(0)
    ctl._cover(joined=(0,))
    ctl.check()
    assert ctl.paused is None and int((ctl.tables.logical_replica_count == 0).sum()) == 0
    ctl.view = ctl.view.activate(1)
    ctl._cover(joined=(1,))
    ctl.check()
    assert ctl.view.active_ranks == (0, 1, 2, 3) and ctl.paused is None
