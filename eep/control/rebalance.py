"""Online expert load balancing (EPLB) while serving: the load window, when to rebalance, the
moves in flight and the one table switch that turns a new layout on.

Every `report_steps` steps each active rank answers its step with the (layer, expert) load its
routers counted since its last report; `LoadWindow` keeps their sum over the last
`window_steps` steps. With `--enable-eplb`, every `rebalance_num_iterations` steps, or sooner
when the layout in use is more than `imbalance_threshold` out of balance under the window's
load (checked at every report), `plan_rebalance` plans a layout balanced on the active ranks
from the one in use, and:
- its moves go to their target ranks (`MoveExperts`): each writes them on a thread of its own
  into slots that no table lists, while steps run; nothing waits for them;
- at the first step boundary after every target rank reported the batch done, one table switch
  (`SetRouting` on every active rank, as any in-place table update) turns the new layout on.
Any view change (a failure, a drain, a rejoin) gives up a batch in flight: its targets' content
is forgotten (never listed), and the next rebalance plans from the live layout, so the instance
returns to balance on the survivors and again once a rank is back. A scale operation
(`eep.control.scaling`) asks for rebalances of its own (`start`, also without `--enable-eplb`):
onto the ranks that stay before a scale-down, over all of them after a scale-up.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from eep.control.config import EPConfig
from eep.control.controller import HISTORY, Controller
from eep.control.coverage import CoverageKeeper
from eep.control.hooks import FaultHooks
from eep.control.replies import ReplyCollector
from eep.errors import ConfigError
from eep.membership.view import RankState
from eep.placement.rebalance import RebalancePlan, layer_imbalance, plan_rebalance
from eep.runtime import wire
from eep.runtime.accounting import Ledger
from eep.runtime.wire import ExpertCopy, StepResult

logger = logging.getLogger(__name__)


class LoadWindow:
    """The instance's expert load `[L, E]` over (about) the last `window_steps` steps."""

    def __init__(self, num_layers: int, num_experts: int, window_steps: int) -> None:
        self.window_steps = window_steps
        self.total = torch.zeros(num_layers, num_experts, dtype=torch.int64)
        self.chunks: deque[tuple[int, torch.Tensor]] = deque()  # (step of the report, its load)
        self.first_step: int | None = None  # the oldest step the window covers

    def add(self, step: int, loads: list[torch.Tensor]) -> None:
        chunk = torch.stack([t.to(torch.int64) for t in loads]).sum(0)
        self.chunks.append((step, chunk))
        self.total += chunk
        while self.chunks and self.chunks[0][0] <= step - self.window_steps:
            self.total -= self.chunks.popleft()[1]
        if self.first_step is None:
            self.first_step = step
        self.first_step = max(self.first_step, step - self.window_steps)

    def steps(self, now: int) -> int:
        """How many steps the window covers now."""
        return 0 if self.first_step is None else now - self.first_step

    def load(self) -> torch.Tensor:
        return self.total.clone()


@dataclass(slots=True)
class _Batch:
    batch: int
    plan: RebalancePlan
    pending: set[int]  # target ranks not yet done
    started: float
    step: int
    failed: dict[int, str] = field(default_factory=dict)


class Rebalancer:
    def __init__(self, ep: EPConfig, controller: Controller, coverage: CoverageKeeper, replies: ReplyCollector,
                 ledger: Ledger, expert_bytes: int, backup_masks: dict[int, torch.Tensor] | None,
                 hooks: FaultHooks) -> None:
        self.ep, self.ctl, self.coverage, self.replies, self.ledger = ep, controller, coverage, replies, ledger
        self.hooks = hooks
        self.expert_bytes, self.backup_masks = expert_bytes, backup_masks
        p = controller.placement
        self.window = LoadWindow(p.num_layers, p.num_logical, ep.eplb_window_steps)
        self.records: deque[dict[str, object]] = deque(maxlen=HISTORY)  # one per rebalance switched (or given up)
        self._batch = 0
        self._inflight: _Batch | None = None
        self._last = 0  # the step of the last rebalance planned
        self._check = False  # a report arrived: look at the imbalance at the next step boundary
        self.moves = {"peer": 0, "backup": 0, "disk": 0}  # experts copied by switched rebalances, by source
        self.switched = 0  # rebalances switched in
        self.peer_moves_across_hosts = 0  # of the peer moves, those from a rank on another host (over ZeroMQ)
        controller.on_view.append(self.void)

    # -- every step ------------------------------------------------------------------------------
    def report_due(self, step: int) -> bool:
        """Whether the step about to run (number `step`, from 1) asks the ranks for their load."""
        return step % self.ep.eplb_report_steps == 0

    def after_step(self, step: int, results: dict[int, StepResult]) -> None:
        """The books of a completed step: the load reported, the moves finished."""
        with self.ledger.charge("eplb"):
            loads = [r.load for r in results.values() if r.load is not None]
            if loads:
                self.window.add(step, loads)
                self._check = True
            b = self._inflight
            if b is not None:
                for r in list(b.pending):
                    if r in results and results[r].moves_done == b.batch:
                        b.pending.discard(r)
                        if results[r].moves_failed:
                            b.failed[r] = results[r].moves_failed

    @property
    def in_flight(self) -> bool:
        """A batch of moves is being written: only steps' answers say when it is done."""
        return self._inflight is not None

    def at_step_boundary(self, start_new: bool = True) -> None:
        """Switch a batch whose moves are all written; with `start_new` (no scale operation
        running) and `--enable-eplb`, start one when due."""
        with self.ledger.charge("eplb"):
            b = self._inflight
            if b is not None:
                if not b.pending:
                    self._finish(b)
                elif time.perf_counter() - b.started > self.ep.timeout_s:  # a rank that never says done
                    self._inflight = None
                    self._record(b, f"given up: ranks {sorted(b.pending)} not done within {self.ep.timeout_s:g} s", 0.0)
                return
            if self.ep.enable_eplb and self._check and start_new:
                self._check = False
                if self._due():
                    self._start()

    def start(self, leaving: tuple[int, ...] = ()) -> int:
        """A rebalance asked for now (a scale operation), due or not, with or without
        `--enable-eplb`: its batch number, or 0 when the layout is as planned already.
        ConfigError if `leaving` cannot go (the others lack slots) or a batch is in flight."""
        if self._inflight is not None:
            raise ConfigError(f"rebalance {self._inflight.batch} is in flight")
        with self.ledger.charge("eplb"):
            return self._start(leaving)

    def outcome(self, batch: int) -> str | None:
        """What became of `batch`: "switched", "given up: ...", or None while in flight."""
        if self._inflight is not None and self._inflight.batch == batch:
            return None
        return next((str(r["outcome"]) for r in reversed(self.records) if r["batch"] == batch), "given up: forgotten")

    def void(self) -> None:
        """A view change: a batch in flight is given up (its targets stay unknown: never listed)."""
        if self._inflight is not None:
            b = self._inflight
            self._inflight = None
            self._record(b, "given up: the view changed", 0.0)

    # -- a rebalance -----------------------------------------------------------------------------
    def imbalance(self) -> torch.Tensor:
        """`[L]` the layout in use under the window's load (1.0 where a layer has no load yet)."""
        ctl = self.ctl
        return layer_imbalance(ctl.placement, self.window.total, ctl.view.active_ranks, self.ep.num_ranks)

    def _due(self) -> bool:
        ctl, ep = self.ctl, self.ep
        if ctl.paused_reason is not None or ctl.uncovered or ctl.view.ranks_in(RankState.JOINING):
            return False
        if self.window.steps(ctl.steps) < min(ep.eplb_window_steps, ep.eplb_min_window_steps):
            return False
        if ctl.steps - self._last >= ep.eplb_rebalance_num_iterations:
            return True
        return bool(self.imbalance().max() > ep.eplb_imbalance_threshold)

    def plan(self, active: tuple[int, ...] | None = None, leaving: tuple[int, ...] = ()) -> RebalancePlan:
        """A plan from the live layout under the window's load (even, before any load is counted)
        over `active` (default: the view's active ranks), without `leaving`'s slots."""
        ctl = self.ctl
        load = self.window.load()
        if not load.any():
            load = torch.ones_like(load)
        return plan_rebalance(
            ctl.placement, ctl.held, load, active if active is not None else ctl.view.active_ranks,
            self.ep.num_ranks, num_redundant=self.ep.num_redundant_experts, expert_bytes=self.expert_bytes,
            topology=self.ep.topology, host_of=[self.ep.node_of(r) for r in range(self.ep.num_ranks)],
            backup=self.backup_masks, leaving=leaving,
        )

    def _start(self, leaving: tuple[int, ...] = ()) -> int:
        ctl = self.ctl
        self._last = ctl.steps
        t0 = time.perf_counter()
        plan = self.plan(leaving=leaving)
        plan_s = time.perf_counter() - t0
        if not plan.switches:
            return 0
        self._batch += 1
        b = _Batch(self._batch, plan, set(), time.perf_counter(), ctl.steps)
        if not torch.equal(plan.interim.physical_to_logical_map, ctl.placement.physical_to_logical_map):
            # the replicas that moves overwrite stop serving first (in place, between two steps)
            self.coverage.update_routing_on(ctl.view.active_ranks, plan.interim)
            ctl.placement = plan.interim
            self.coverage.planner.void(ctl.steps)
        copies: dict[int, list[ExpertCopy]] = {}
        for m in plan.moves:
            copies.setdefault(m.dst_rank, []).append(ExpertCopy(
                m.layer, m.dst_slot, m.expert, m.source_kind, m.source_host if m.source_kind == "backup" else None,
                m.source_rank))
            ctl.held[m.layer, m.dst_slot] = -1  # unknown until its rank says the batch is written
        logger.info("rebalance %d planned in %.1f ms: %d moves (%d from peers) on ranks %s, imbalance %.3f -> %.3f",
                    b.batch, plan_s * 1e3, len(plan.moves), plan.moves_from_peers, sorted(copies),
                    float(plan.imbalance_before.mean()), float(plan.imbalance_after.mean()))
        if copies:
            try:
                self.replies.request({r: wire.MoveExperts(ctl.view.epoch, b.batch, c) for r, c in copies.items()},
                                     wire.MovesAccepted, self.ep.timeout_s, heartbeats=ctl.cluster.heartbeats)
            except ConfigError as e:  # refused: the targets stay unknown (never listed)
                self._record(b, f"given up: {e}", 0.0)
                return b.batch
        b.pending = set(copies)
        self._inflight = b
        if copies:
            self.hooks.moving(tuple(sorted(copies)))
        else:  # the tables alone change: switch now
            self._finish(b)
        return b.batch

    def _finish(self, b: _Batch) -> None:
        """Every target rank is done: one table switch on every active rank."""
        ctl = self.ctl
        self._inflight = None
        if b.failed:
            rank = min(b.failed)
            self._record(b, f"given up: rank {rank}: {b.failed[rank]}", 0.0)
            return
        t0 = time.perf_counter()
        before, held_before = ctl.placement, ctl.held
        ctl.held = b.plan.held_after.clone()
        try:
            self.coverage.update_routing_on(ctl.view.active_ranks, b.plan.placement)
        except ConfigError as e:  # a rank refused (it holds other weights than planned): all back as they were
            ctl.held = held_before
            for m in b.plan.moves:
                ctl.held[m.layer, m.dst_slot] = -1
            self.coverage.update_routing_on(ctl.view.active_ranks, before)
            self._record(b, f"given up: {e}", 0.0)
            return
        ctl.placement = b.plan.placement
        self.coverage.planner.void(ctl.steps)
        switch_s = time.perf_counter() - t0
        for m in b.plan.moves:
            self.moves[m.source_kind] += 1
            self.peer_moves_across_hosts += m.source_kind == "peer" and m.source_host != self.ep.node_of(m.dst_rank)
        self.switched += 1
        self._record(b, "switched", switch_s)
        ctl.event("rebalanced", None, f"{len(b.plan.moves)} moves ({b.plan.moves_from_peers} from peers, "
                  f"{b.plan.bytes_moved} bytes) in {time.perf_counter() - b.started:.3f} s while serving; imbalance "
                  f"{float(b.plan.imbalance_before.mean()):.3f} -> {float(b.plan.imbalance_after.mean()):.3f}; "
                  f"tables switched in {switch_s * 1e3:.1f} ms")

    def _record(self, b: _Batch, outcome: str, switch_s: float) -> None:
        p = b.plan
        self.records.append({
            "batch": b.batch, "epoch": self.ctl.view.epoch, "planned_at_step": b.step, "switched_at_step": self.ctl.steps,
            "outcome": outcome, "moves": len(p.moves), "moves_from_peers": p.moves_from_peers,
            "bytes_moved": p.bytes_moved, "moves_s": time.perf_counter() - b.started, "switch_s": switch_s,
            "imbalance_before": float(p.imbalance_before.mean()), "imbalance_after": float(p.imbalance_after.mean()),
            "replicas_per_layer": p.replicas.tolist(),
        })
        if outcome != "switched":
            logger.warning("rebalance %d %s", b.batch, outcome)

    def status(self) -> dict[str, object]:
        imbalance = self.imbalance()
        counts = self.ctl.placement.logical_replica_count
        return {
            "enabled": self.ep.enable_eplb, "window_steps": self.window.steps(self.ctl.steps),
            "load_total": int(self.window.total.sum()),
            "imbalance": imbalance.tolist(), "imbalance_mean": float(imbalance.mean()),
            "imbalance_max": float(imbalance.max()),
            "replicas_per_layer": (counts.sum(1) - counts.shape[1]).clamp(min=0).tolist(),
            "moves_in_flight": len(self._inflight.plan.moves) if self._inflight is not None else 0,
            "moves": dict(self.moves), "peer_moves_across_hosts": self.peer_moves_across_hosts,
            "switched": self.switched, "rebalances": list(self.records),
        }
