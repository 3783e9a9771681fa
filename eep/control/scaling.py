"""Planned scale-up and scale-down (`POST /admin/scale {"ep_size": N}`) on the machinery of
rejoins, drains and rebalances, within the `--ep-max-size` ranks the instance is sized for.

An operation has an id the caller may choose (an orchestrator retries with the same id and gets
the same operation; the same id for another size is refused) and is driven at step boundaries,
one at a time, by looking at the view each time (so a failure in the middle changes the path,
not the goal: N ranks active, the others absent):
- too many members (ranks not absent): failed and joining ones are removed at once; for active
  ones, a rebalance onto the ranks that stay (`plan_rebalance(..., leaving=...)`: their experts
  copied while steps run, peer to peer, the leaving ranks serving until one table switch), then
  they leave as a drain does (requests moved to the others, epoch + 1) to absent;
- too few: absent ranks are started as joiners (loading, off the critical path, their share of a
  layout planned over all of them: `target`), failed members are rejoined, each switched in at a
  step boundary once ready; then one rebalance over all of them.
Ranks are taken in and out so that the hosts stay even: a scale-up takes the lowest absent rank
of the host with the fewest members, a scale-down the highest rank of the host with the most.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

from eep.control.config import EPConfig
from eep.control.controller import Controller
from eep.control.rebalance import Rebalancer
from eep.control.reintegration import Reintegration
from eep.errors import ConfigError
from eep.membership.view import RankState

logger = logging.getLogger(__name__)

KEPT = 100  # operations remembered for their status (and their ids for retries)
MAX_ATTEMPTS = 3  # rebalances or joiners given up before the operation fails


@dataclass(slots=True)
class ScaleOperation:
    operation_id: str
    ep_size: int  # the size asked for
    from_ep_size: int
    created: float  # time.time()
    state: str = "running"  # running | done | failed
    phase: str = "queued"  # queued | removing | moving | draining | joining | balancing | done
    detail: str = ""
    added: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    attempts: int = 0  # rebalances given up, joiners failed
    batch: int = 0  # the rebalance it waits for (0: none)
    balanced: bool = False
    finished: float | None = None

    def to_dict(self) -> dict[str, object]:
        end = self.finished if self.finished is not None else time.time()
        return {"operation_id": self.operation_id, "ep_size": self.ep_size, "from_ep_size": self.from_ep_size,
                "state": self.state, "phase": self.phase, "detail": self.detail, "added": list(self.added),
                "removed": list(self.removed), "created": self.created, "finished": self.finished,
                "duration_s": end - self.created}


class Scaler:
    def __init__(self, ep: EPConfig, controller: Controller, reintegration: Reintegration,
                 rebalancer: Rebalancer) -> None:
        self.ep, self.ctl, self.reintegration, self.rebalancer = ep, controller, reintegration, rebalancer
        self.ops: OrderedDict[str, ScaleOperation] = OrderedDict()
        self.current: ScaleOperation | None = None

    # -- what the HTTP admin calls ---------------------------------------------------------------
    def request(self, ep_size: int, operation_id: str | None = None) -> dict[str, object]:
        """Start moving to `ep_size` ranks, or (the same id) the operation that does already."""
        if operation_id is not None and operation_id in self.ops:
            op = self.ops[operation_id]
            if op.ep_size != ep_size:
                raise ConfigError(f"operation {operation_id!r} scales to {op.ep_size}, not {ep_size}: "
                                  f"a new size needs a new operation id")
            return op.to_dict()
        if not 1 <= ep_size <= self.ep.num_ranks:
            raise ConfigError(f"ep_size {ep_size} is outside 1..{self.ep.num_ranks} (--ep-max-size)")
        if ep_size % self.ep.nnodes:
            raise ConfigError(f"ep_size {ep_size} does not divide over the {self.ep.nnodes} hosts")
        ctl = self.ctl
        if ep_size * ctl.per_rank < ctl.placement.num_logical:
            raise ConfigError(f"{ep_size} ranks of {ctl.per_rank} slots cannot hold all "
                              f"{ctl.placement.num_logical} experts of a layer")
        if self.current is not None:
            raise ConfigError(f"scale operation {self.current.operation_id!r} (to {self.current.ep_size}) is in "
                              f"progress: wait for it (GET /admin/scale/{self.current.operation_id})")
        op = ScaleOperation(operation_id or uuid.uuid4().hex, ep_size, len(self._members()), time.time())
        self.ops[op.operation_id] = op
        while len(self.ops) > KEPT:
            self.ops.popitem(last=False)
        self.current = op
        ctl.event("scale_requested", None, f"operation {op.operation_id}: {op.from_ep_size} -> {ep_size} ranks")
        return op.to_dict()

    def status(self, operation_id: str) -> dict[str, object]:
        if operation_id not in self.ops:
            raise KeyError(operation_id)
        return self.ops[operation_id].to_dict()

    def pending(self) -> bool:
        return self.current is not None

    # -- at every step boundary ------------------------------------------------------------------
    def at_step_boundary(self) -> None:
        """Take the operation in progress one step on. May raise RanksFailed (ranks drained)."""
        op = self.current
        if op is None:
            return
        try:
            self._advance(op)
        except ConfigError as e:  # refused by the state (no room, a host gone): the instance stays as it is
            self._end(op, "failed", str(e))

    def _advance(self, op: ScaleOperation) -> None:
        ctl, view = self.ctl, self.ctl.view
        if op.batch:  # a rebalance of ours in flight
            outcome = self.rebalancer.outcome(op.batch)
            if outcome is None:
                return
            op.batch = 0
            if outcome != "switched":
                op.attempts += 1
                op.detail = f"rebalance {outcome}"
                if op.attempts >= MAX_ATTEMPTS:
                    return self._end(op, "failed", f"{MAX_ATTEMPTS} rebalances given up; last: {outcome}")
                return  # planned again from the live layout at the next boundary
            if op.phase == "moving":
                return self._drain(op)
            op.balanced = True
        members = self._members()
        if len(members) > op.ep_size:
            return self._shrink(op, members)
        if len(members) < op.ep_size or any(view.states[r] is not RankState.ACTIVE for r in members):
            return self._grow(op, members)
        if ctl.paused_reason is not None:
            return  # paused (experts lost): nothing to balance until coverage is back
        if op.balanced:
            return self._end(op, "done", f"{op.ep_size} ranks active: {list(view.active_ranks)}")
        if self.rebalancer.in_flight:  # one of EPLB's own: let it finish first
            return
        op.phase = "balancing"
        op.batch = self.rebalancer.start()
        op.balanced = op.batch == 0

    def _shrink(self, op: ScaleOperation, members: list[int]) -> None:
        ctl, view = self.ctl, self.ctl.view
        out = self._to_remove(members, len(members) - op.ep_size)
        idle = {r for r in out if view.states[r] is not RankState.ACTIVE}
        if idle:
            op.phase = "removing"
            self.reintegration.remove(idle)
            op.removed += sorted(idle)
        leaving = tuple(sorted(set(out) - idle))
        if not leaving or self.rebalancer.in_flight:
            return
        if ctl.paused_reason is not None or ctl.uncovered:
            op.detail = f"waiting: {ctl.paused_reason or 'experts uncovered'}"
            return
        op.phase = "moving"
        op.batch = self.rebalancer.start(leaving)
        if op.batch == 0:  # they list nothing: they can go now
            self._drain(op)

    def _drain(self, op: ScaleOperation) -> None:
        view = self.ctl.view
        members = self._members()
        leaving = {r for r in self._to_remove(members, len(members) - op.ep_size) if view.states[r] is RankState.ACTIVE}
        op.phase = "draining"
        op.removed += sorted(leaving)
        op.balanced = True  # the rebalance onto the ranks that stay was the balancing
        self.reintegration.remove(leaving)

    def _grow(self, op: ScaleOperation, members: list[int]) -> None:
        ctl, view = self.ctl, self.ctl.view
        op.phase = "joining"
        op.balanced = False
        failed = [r for r in members if view.states[r] is RankState.FAILED]
        new = self._to_add(members, op.ep_size - len(members))
        if new:
            self._plan_targets(new)
        for rank in failed + new:
            if rank in self.reintegration.pending_rejoin:
                continue  # auto rejoin starts it
            if rank in failed:
                op.attempts += 1  # a member that failed (a joiner of ours, or a rank meanwhile)
                if op.attempts > MAX_ATTEMPTS:
                    return self._end(op, "failed", f"rank {rank} failed again; {list(view.active_ranks)} active")
            self.reintegration.join(rank)
            if rank in new:
                op.added.append(rank)
        op.detail = f"joining: {list(ctl.view.ranks_in(RankState.JOINING))}"

    def _plan_targets(self, new: list[int]) -> None:
        """What the ranks about to be added load: their share of a layout balanced over all the
        ranks there will be (planned from the live layout; the old ranks' part of that plan is
        left to the rebalance once all are in)."""
        ctl = self.ctl
        plan = self.rebalancer.plan(active=tuple(sorted(set(ctl.view.active_ranks) | set(new))))
        for rank in new:
            ctl.target[:, ctl.slots_of(rank)] = plan.held_after[:, ctl.slots_of(rank)]

    def _end(self, op: ScaleOperation, state: str, detail: str) -> None:
        op.state, op.detail, op.finished = state, detail, time.time()
        op.phase = "done" if state == "done" else op.phase
        self.current = None
        self.ctl.event("scaled" if state == "done" else "scale_failed", None,
                       f"operation {op.operation_id}: {detail} ({op.finished - op.created:.2f} s)")
        (logger.info if state == "done" else logger.warning)("scale %s %s: %s", op.operation_id, state, detail)

    # -- which ranks -----------------------------------------------------------------------------
    def _members(self) -> list[int]:
        return [r for r, s in enumerate(self.ctl.view.states) if s is not RankState.ABSENT]

    def _to_remove(self, members: list[int], n: int) -> list[int]:
        """`n` members to take out: failed first, then joining, then active; within each, the
        highest rank of the host with the most members."""
        state_order = {RankState.FAILED: 0, RankState.JOINING: 1, RankState.ACTIVE: 2}
        count = {h: 0 for h in range(self.ep.nnodes)}
        for r in members:
            count[self.ep.node_of(r)] += 1
        out: list[int] = []
        left = list(members)
        for _ in range(max(n, 0)):
            pick = min(left, key=lambda r: (state_order[self.ctl.view.states[r]], -count[self.ep.node_of(r)], -r))
            left.remove(pick)
            count[self.ep.node_of(pick)] -= 1
            out.append(pick)
        return out

    def _to_add(self, members: list[int], n: int) -> list[int]:
        """`n` absent ranks to start: the lowest rank of the host with the fewest members whose
        agent is connected."""
        view, up = self.ctl.view, self.ctl.cluster.node_up
        count = {h: 0 for h in range(self.ep.nnodes)}
        for r in members:
            count[self.ep.node_of(r)] += 1
        absent = [r for r in view.ranks_in(RankState.ABSENT) if up(self.ep.node_of(r))]
        out: list[int] = []
        for _ in range(max(n, 0)):
            if not absent:
                raise ConfigError(f"no absent rank on a connected host to scale up with ({len(members) + len(out)} "
                                  f"members)")
            pick = min(absent, key=lambda r: (count[self.ep.node_of(r)], r))
            absent.remove(pick)
            count[self.ep.node_of(pick)] += 1
            out.append(pick)
        return out
