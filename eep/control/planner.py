"""Repairs planned ahead: the coverage after the failure of each active rank, made on a thread
from the tables and weights in use, so that a failure finds its plan ready (measured: 4 ms per
plan alone, 15 ms inside a loaded server). `plan_coverage` is pure: the plan made ahead is the
plan the failure would make. A view change or table switch voids the plans; new ones are made
`PLAN_AFTER_STEPS` steps later (not during the step replayed after a failure, which would lose
a core to the planner)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from eep.errors import MembershipError
from eep.membership.view import MembershipView
from eep.placement.coverage import outside
from eep.placement.repair import RepairPlan
from eep.placement.routing import Placement
from eep.runtime.accounting import Ledger

PLAN_AFTER_STEPS = 20  # steps after a view change before the next repairs are planned ahead

Planned = tuple[Placement, torch.Tensor, RepairPlan]  # the tables and weights a plan was made from, and it
PlanFn = Callable[[MembershipView, Placement, torch.Tensor], RepairPlan]


class AheadPlanner:
    def __init__(self, plan: PlanFn, ledger: Ledger, enabled: bool) -> None:
        self._plan, self.ledger, self.enabled = plan, ledger, enabled
        self._plans: dict[frozenset[int], Planned] = {}  # dead set -> what it was made from, and the plan
        self._thread: threading.Thread | None = None
        self._at_step: int | None = None  # when to start (steps completed)

    @property
    def plans(self) -> dict[frozenset[int], Planned]:
        """The plans made so far (a copy)."""
        return dict(self._plans)

    @property
    def started(self) -> bool:
        return self._thread is not None

    def join(self, timeout_s: float) -> None:
        """Wait for the plans being made (tests, close)."""
        if self._thread is not None:
            self._thread.join(timeout_s)

    def void(self, steps: int) -> None:
        """The tables or weights changed: the plans made are void; plan again `PLAN_AFTER_STEPS` on."""
        self._plans = {}
        if self.enabled:
            self._at_step = steps + PLAN_AFTER_STEPS

    def after_step(self, steps: int, view: MembershipView, placement: Placement, held: torch.Tensor) -> None:
        """Once enough steps completed since the last change, start planning on a thread; it
        runs while the controller waits for the ranks."""
        if self._at_step is None or steps < self._at_step:
            return
        self._at_step = None
        held = held.clone()
        plans: dict[frozenset[int], Planned] = {}
        self._plans = plans

        def run() -> None:
            with self.ledger.charge("plan_ahead"):
                for r in view.active_ranks:
                    if self._plans is not plans:  # superseded
                        return
                    try:
                        after = view.fail({r})
                    except MembershipError:  # the last active rank: nothing would be left to plan for
                        continue
                    plans[outside(after)] = (placement, held, self._plan(after, placement, held))

        self._thread = threading.Thread(target=run, name="eep-repair-planner", daemon=True)
        self._thread.start()

    def take(self, view: MembershipView, placement: Placement, held: torch.Tensor) -> RepairPlan | None:
        """The plan made ahead for `view`, if it was made from these very tables and weights."""
        ready = self._plans.get(outside(view))
        if ready is not None and ready[0] is placement and torch.equal(ready[1], held):
            return ready[2]
        return None

    def close(self) -> None:
        self._plans = {}  # stops the thread after its current plan
        self.join(10.0)
