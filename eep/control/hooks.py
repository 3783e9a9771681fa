"""Points where a test can act inside the controller's work (kill a rank in the middle of a
repair, of a switch-in, or while a rebalance's moves are written), instead of patching
private methods."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from eep.membership.view import MembershipView


@dataclass(slots=True)
class FaultHooks:
    before_repair: Callable[[MembershipView], None] | None = None  # each repair round, before its plan
    before_switch_in: Callable[[int], None] | None = None  # a ready joiner, before its view is committed
    moves_sent: Callable[[tuple[int, ...]], None] | None = None  # a rebalance's target ranks, their moves accepted

    def repairing(self, view: MembershipView) -> None:
        if self.before_repair is not None:
            self.before_repair(view)

    def switching_in(self, rank: int) -> None:
        if self.before_switch_in is not None:
            self.before_switch_in(rank)

    def moving(self, ranks: tuple[int, ...]) -> None:
        if self.moves_sent is not None:
            self.moves_sent(ranks)
