"""The membership view: explicit, immutable runtime state that only the controller changes.

What this module promises:
- A `MembershipView` is a frozen value: `(epoch, per-rank state, incarnation ids)`. Every
  transition returns a new view; none mutates one. The epoch only grows: every transition
  that changes who exchanges data (a rank leaves the active set or enters it) bumps it, so
  a data-plane message stamped with an older epoch can always be recognised and dropped.
- States: ACTIVE (serves and exchanges), FAILED (out of the active set; its slots are gone),
  JOINING (a new incarnation is loading and warming up; not in the active set until
  `activate`), ABSENT (a rank the instance is sized for but does not run: not started yet, or
  scaled down; no process, nothing to restart; `begin_join` brings it in, `remove` takes a rank
  out to it). Observations (a silent heartbeat, a peer's report) are not states: the
  detector (`eep.control.detector`) confirms a failure, and only `fail` and `activate` change
  who takes part in a step.
- `MembershipEvent` is the structured record of a change (epoch, rank, step, what, why, and
  the active ranks and processes after it) from which a failure timeline is read back.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, replace

from eep.errors import MembershipError


class RankState(enum.Enum):
    ACTIVE = "active"
    FAILED = "failed"
    JOINING = "joining"
    ABSENT = "absent"


_IN_STEP = (RankState.ACTIVE,)


@dataclass(frozen=True, slots=True)
class MembershipView:
    epoch: int
    states: tuple[RankState, ...]
    incarnations: tuple[int, ...]  # id of the process that holds each rank (0 = none yet)

    def __post_init__(self) -> None:
        if self.epoch < 0:
            raise MembershipError(f"epoch must be >= 0, got {self.epoch}")
        if len(self.states) != len(self.incarnations) or not self.states:
            raise MembershipError(
                f"need one state and one incarnation per rank, got {len(self.states)} and {len(self.incarnations)}"
            )

    @classmethod
    def initial(cls, incarnations: tuple[int, ...], absent: Iterable[int] = ()) -> MembershipView:
        """Epoch 0: every rank active, held by the given incarnations, but those `absent` (not
        started: room to scale up to)."""
        out = set(absent)
        if len(out & set(range(len(incarnations)))) == len(incarnations):
            raise MembershipError("an instance needs at least one rank that is not absent")
        return cls(0, tuple(RankState.ABSENT if r in out else RankState.ACTIVE for r in range(len(incarnations))),
                   tuple(incarnations))

    @property
    def num_ranks(self) -> int:
        return len(self.states)

    @property
    def active_ranks(self) -> tuple[int, ...]:
        """Ranks that take part in every step of this epoch, ascending."""
        return tuple(r for r, s in enumerate(self.states) if s in _IN_STEP)

    @property
    def active_mask(self) -> tuple[bool, ...]:
        return tuple(s in _IN_STEP for s in self.states)

    def ranks_in(self, state: RankState) -> tuple[int, ...]:
        return tuple(r for r, s in enumerate(self.states) if s is state)

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.num_ranks:
            raise MembershipError(f"rank {rank} outside 0..{self.num_ranks - 1}")

    def _with(self, epoch: int, changes: dict[int, RankState], incarnations: dict[int, int] | None = None) -> MembershipView:
        states = list(self.states)
        incs = list(self.incarnations)
        for r, s in changes.items():
            states[r] = s
        for r, i in (incarnations or {}).items():
            incs[r] = i
        return replace(self, epoch=epoch, states=tuple(states), incarnations=tuple(incs))

    def fail(self, ranks: frozenset[int] | set[int]) -> MembershipView:
        """Commit the failure of `ranks` (active or joining): epoch + 1 if any of them
        was in the step. Failing a rank that already failed, or an absent one, changes nothing."""
        return self._leave(ranks, RankState.FAILED)

    def remove(self, ranks: frozenset[int] | set[int]) -> MembershipView:
        """Take `ranks` (any state) out of the instance (scale-down): absent, nothing to restart;
        epoch + 1 if any of them was in the step."""
        return self._leave(ranks, RankState.ABSENT)

    def _leave(self, ranks: frozenset[int] | set[int], state: RankState) -> MembershipView:
        for r in ranks:
            self._check_rank(r)
        changes = {r: state for r in ranks if self.states[r] not in (state, RankState.ABSENT)}
        if not changes:
            return self
        leaves_step = any(self.states[r] in _IN_STEP for r in changes)
        if leaves_step and len(self.active_ranks) == sum(self.states[r] in _IN_STEP for r in changes):
            raise MembershipError("every active rank would fail: nothing is left to serve")
        return self._with(self.epoch + 1 if leaves_step else self.epoch, changes)

    def begin_join(self, rank: int, incarnation: int) -> MembershipView:
        """A new process (`incarnation`) takes the failed or absent `rank`'s place and starts
        loading. Not yet in the step: the epoch stays."""
        self._check_rank(rank)
        if self.states[rank] not in (RankState.FAILED, RankState.ABSENT):
            raise MembershipError(f"rank {rank} is {self.states[rank].value}: only a failed or absent rank can join")
        if incarnation in self.incarnations:
            raise MembershipError(f"incarnation {incarnation} was already used; every process needs a fresh one")
        return self._with(self.epoch, {rank: RankState.JOINING}, {rank: incarnation})

    def activate(self, rank: int) -> MembershipView:
        """Switch the joining `rank` into the step: epoch + 1."""
        self._check_rank(rank)
        if self.states[rank] is not RankState.JOINING:
            raise MembershipError(f"rank {rank} is {self.states[rank].value}: only a joining rank can be activated")
        return self._with(self.epoch + 1, {rank: RankState.ACTIVE})

    def bump(self) -> MembershipView:
        """The same membership under epoch + 1: abandons a broken step on every rank."""
        return replace(self, epoch=self.epoch + 1)

    def to_dict(self) -> dict[str, object]:
        return {
            "epoch": self.epoch,
            "ranks": [
                {"rank": r, "state": s.value, "incarnation": i}
                for r, (s, i) in enumerate(zip(self.states, self.incarnations))
            ],
            "active": list(self.active_ranks),
        }


@dataclass(frozen=True, slots=True)
class MembershipEvent:
    """One entry of the failure timeline."""

    time: float  # time.time() when it happened
    epoch: int  # the committed epoch after the event
    step: int  # engine step counter when it happened
    kind: str  # "fault_seen" | "view_committed" | "repair" | "resume" | "rejoin_started" | ...
    rank: int | None = None
    detail: str = ""  # why, in words (for people: read `active` and `pids`, never this text)
    active: tuple[int, ...] = ()  # the active ranks of the view after the event
    pids: tuple[int, ...] = ()  # each rank's process after the event (0: none)

    def to_dict(self) -> dict[str, object]:
        return {"time": self.time, "epoch": self.epoch, "step": self.step, "kind": self.kind,
                "rank": self.rank, "detail": self.detail, "active": list(self.active), "pids": list(self.pids)}
