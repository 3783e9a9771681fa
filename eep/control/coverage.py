"""Coverage kept fitted to the committed view: after every view change (a failure, a drain, a
joiner switched in or failed) `reconcile` plans coverage for the view (`plan_coverage`, or the
plan made ahead for it), carries the plan out on every active rank in one round trip (tier 1:
slots outside the view dropped from the tables; tier 2: lost experts copied from a backup or
the disk into free or reclaimed slots), then commits tables, held weights and the pause state.
A rank that fails meanwhile leaves the view and coverage is planned again from what is known
to be held."""

from __future__ import annotations

import logging
import time
from collections import deque

import torch

from eep.control.config import EPConfig
from eep.control.controller import HISTORY, Controller
from eep.control.hooks import FaultHooks
from eep.control.planner import AheadPlanner
from eep.control.replies import ReplyCollector
from eep.errors import EepError, RankFailed
from eep.membership.view import MembershipView
from eep.placement.coverage import outside, pause_reason, plan_coverage
from eep.placement.repair import RepairPlan
from eep.placement.routing import Placement, check_tables_only
from eep.runtime import wire
from eep.runtime.accounting import Ledger
from eep.runtime.wire import ExpertCopy

logger = logging.getLogger(__name__)


class CoverageKeeper:
    def __init__(self, ep: EPConfig, controller: Controller, replies: ReplyCollector, ledger: Ledger,
                 expert_bytes: int, backup_masks: dict[int, torch.Tensor] | None, hooks: FaultHooks) -> None:
        self.ep, self.ctl, self.replies, self.hooks = ep, controller, replies, hooks
        self.expert_bytes, self.backup_masks = expert_bytes, backup_masks
        self.planner = AheadPlanner(self.plan, ledger, enabled=ep.elastic)
        self.repairs: deque[dict[str, object]] = deque(maxlen=HISTORY)  # per repair / rejoin: tiers, bytes, times
        self.last_copies: dict[str, int] = {}  # what the last switch-in copied (tier2_experts, bytes_moved)

    def plan(self, view: MembershipView, placement: Placement, held: torch.Tensor,
             joined: tuple[int, ...] = ()) -> RepairPlan:
        return plan_coverage(
            view, placement, held, expert_bytes=self.expert_bytes, topology=self.ep.topology,
            backup=self.backup_masks, host_of=[self.ep.node_of(r) for r in range(self.ep.num_ranks)],
            joined=joined, target=self.ctl.target,
        )

    def settle(self) -> None:
        """After every view change: spread the ranks over the cores, plan the next repairs soon."""
        self.ctl.pool.pin(self.ctl.view.active_ranks)
        self.planner.void(self.ctl.steps)

    def reconcile(self, t0: float, joined: tuple[int, ...] = ()) -> set[int]:
        """Fit coverage to the committed view, whatever was in flight when it began
        (`plan_coverage` judges from the view alone). Returns the ranks that failed meanwhile."""
        failed: set[int] = set()
        while True:
            try:
                self._reconcile_once(t0, joined)
                self.settle()
                return failed
            except RankFailed as e:
                self.ctl.event("fault_seen", e.rank, f"while coverage was repaired: {e}")
                self.ctl.fault_time = self.ctl.fault_time or time.time()
                self.ctl.fail({e.rank})
                failed.add(e.rank)
                joined = tuple(r for r in joined if r in self.ctl.view.active_ranks)

    def _reconcile_once(self, t0: float, joined: tuple[int, ...]) -> None:
        self.hooks.repairing(self.ctl.view)
        ctl = self.ctl
        t_start = time.perf_counter()  # t0..t_start: the view committed, the survivors stopped
        dead = outside(ctl.view)
        ready = None if joined else self.planner.take(ctl.view, ctl.placement, ctl.held)
        plan = ready or self.plan(ctl.view, ctl.placement, ctl.held, joined)
        for r in joined:  # the joiners hold their slots of the target (they loaded them)
            ctl.held[:, ctl.slots_of(r)] = ctl.target[:, ctl.slots_of(r)]
        ctl.held[:, [s for s in range(ctl.placement.num_physical) if s // ctl.per_rank in dead]] = -1
        copies = _copies(plan)
        t_plan = time.perf_counter()
        experts: list[dict[str, object]] = [
            {"layer": r.layer, "expert": r.expert, "tier": 1, "source": None, "seconds": 0.0}
            for r in plan.tiers if r.tier == 1
        ]
        if copies:
            experts += self._copy(plan, copies)
        elif not torch.equal(plan.placement.physical_to_logical_map, ctl.placement.physical_to_logical_map):
            self.update_routing_on(ctl.view.active_ranks, plan.placement)
        ctl.placement = plan.placement
        ctl.held = plan.held_after.clone()
        t_done = time.perf_counter()
        if joined or not (plan.tiers or plan.uncovered):  # a switch-in, or a change that touched no expert
            self.last_copies = {"tier2_experts": len(plan.transfers), "bytes_moved": plan.bytes_moved}
        else:
            self._record(plan, dead, ready is not None, experts, (t0, t_start, t_plan, t_done))
        self._commit_coverage(plan)

    def _copy(self, plan: RepairPlan, copies: dict[int, list[ExpertCopy]]) -> list[dict[str, object]]:
        """One message per active rank, one round trip in all (no step runs meanwhile): each
        switches to the interim tables (the targets unlisted: they never list a reclaimed slot),
        writes its copies, then switches to the new tables. The targets' content is forgotten
        until their rank answers: a copy cut short leaves a slot with no known content, and
        coverage is planned again from what is known to be held."""
        ctl = self.ctl
        check_tables_only(ctl.held_placement(plan.interim), plan.interim)
        for rank_copies in copies.values():
            for c in rank_copies:
                ctl.held[c.layer, c.slot] = -1
        check_tables_only(Placement(plan.held_after, plan.placement.logical_to_physical_map,
                                    plan.placement.logical_replica_count), plan.placement)
        orders = {r: wire.Repair(ctl.view.epoch, plan.interim, copies.get(r, []), plan.placement)
                  for r in ctl.view.active_ranks}
        done = self.replies.request(orders, wire.Repaired, self.ep.timeout_s, heartbeats=ctl.cluster.heartbeats)
        experts: list[dict[str, object]] = []
        for rank, reply in done.items():
            for c, sec in zip(copies.get(rank, []), reply.seconds):  # type: ignore[attr-defined]
                ctl.held[c.layer, c.slot] = c.expert
                experts.append({"layer": c.layer, "expert": c.expert, "tier": 2, "source": c.source,
                                "host": c.source_host, "rank": rank, "seconds": sec})
        return experts

    def _record(self, plan: RepairPlan, dead: frozenset[int], cached: bool, experts: list[dict[str, object]],
                times: tuple[float, float, float, float]) -> None:
        t0, t_start, t_plan, t_done = times
        tiers = {1: sum(r.tier == 1 for r in plan.tiers), 2: sum(r.tier == 2 for r in plan.tiers)}
        self.repairs.append({
            "epoch": self.ctl.view.epoch, "dead": sorted(dead), "tier1_experts": tiers[1], "tier2_experts": tiers[2],
            "bytes_moved": plan.bytes_moved, "uncovered": len(plan.uncovered), "plan_ready": cached,
            "settle_s": t_start - t0, "plan_s": t_plan - t_start, "copy_s": t_done - t_plan, "total_s": t_done - t0,
            "sources": sorted({t.source_kind for t in plan.transfers}),
            "experts": experts,  # per repaired (layer, expert): tier, source, seconds
        })
        self.ctl.event("repair", None, f"tier1={tiers[1]} tier2={tiers[2]} bytes={plan.bytes_moved} "
                       f"uncovered={len(plan.uncovered)} in {t_done - t0:.3f} s (survivors stopped in "
                       f"{(t_start - t0) * 1e3:.0f} ms, plan {(t_plan - t_start) * 1e3:.0f} ms"
                       f"{' (made ahead)' if cached else ''}, copies and tables {(t_done - t_plan) * 1e3:.0f} ms)")

    def _commit_coverage(self, plan: RepairPlan) -> None:
        """Record what `plan` left uncovered and pause, degrade or resume accordingly."""
        ctl = self.ctl
        ctl.uncovered = plan.uncovered
        reason = pause_reason(plan, self.ep.on_uncoverable)
        if reason is not None and reason != ctl.paused_reason:
            ctl.event("paused", None, reason)
        elif reason is None and ctl.paused_reason is not None:
            ctl.event("resumed", None, "full coverage" if not plan.uncovered else "degraded")
        ctl.paused_reason = reason
        if plan.uncovered and reason is None:
            logger.warning("DEGRADED: %d (layer, expert) pairs have no live replica; serving with them masked "
                           "and the remaining top-k weights renormalised", len(plan.uncovered))
            ctl.event("degraded", None, f"{len(plan.uncovered)} (layer, expert) pairs masked")

    def update_routing_on(self, ranks: tuple[int, ...], placement: Placement) -> None:
        """Switch `ranks`' tables to `placement` in place (checked to move no weights first)."""
        check_tables_only(self.ctl.held_placement(placement), placement)
        self.replies.request({r: wire.SetRouting(self.ctl.view.epoch, placement) for r in ranks}, wire.RoutingSet,
                             self.ep.timeout_s, heartbeats=self.ctl.cluster.heartbeats)


def _copies(plan: RepairPlan) -> dict[int, list[ExpertCopy]]:
    """The plan's transfers as each target rank's copy orders."""
    copies: dict[int, list[ExpertCopy]] = {}
    for t in plan.transfers:
        if t.source_kind == "peer":
            raise EepError(f"repair chose a peer copy for layer {t.layer} expert {t.expert}: not supported")
        copies.setdefault(t.dst_rank, []).append(ExpertCopy(
            t.layer, t.dst_slot, t.expert, t.source_kind, t.source_host if t.source_kind == "backup" else None))
    return copies
