"""The controller's state and its one point of change.

`Controller` owns the committed membership view, the routing tables in use (`placement`),
what each slot holds (`held`), what a rank loads when it (re)joins (`target`), what is
uncovered and why the instance is paused, and the timeline of membership events. `commit(view, why)` is the one
point where a view changes: the view is stored (a compare-and-swap of the epoch in the
membership store, which is the authority across hosts), a new epoch is announced to every
host (every rank blocked in a step of an older one abandons it at once), and the change is
recorded as a structured event. It decides; the loops that talk to ranks are elsewhere."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

from eep.control.cluster import Cluster
from eep.control.config import EPConfig, Timeouts
from eep.control.leadership import Leadership
from eep.control.pool import RankPool
from eep.errors import MembershipError
from eep.membership.store import (
    Committed,
    EpochConflict,
    MembershipStore,
    NotLeader,
    StoreError,
)
from eep.membership.view import MembershipEvent, MembershipView
from eep.placement.routing import Placement

logger = logging.getLogger(__name__)

HISTORY = 1000  # events kept for status(): a long-lived server must not grow without bound


class Controller:
    def __init__(self, ep: EPConfig, timeouts: Timeouts, store: MembershipStore, cluster: Cluster, pool: RankPool,
                 target: Placement, leadership: Leadership | None = None) -> None:
        self.ep, self.timeouts, self.store, self.cluster, self.pool = ep, timeouts, store, cluster, pool
        self.leadership = leadership  # across hosts with etcd: this head's hold on the leader key
        # [L, P] what each rank's slots load when it (re)joins: the balanced start layout with spare
        # slots, and for a rank a scale-up adds, its share of the layout planned then
        self.target = target.physical_to_logical_map.clone()
        self.placement = target  # the routing tables in use
        self.held = target.physical_to_logical_map.clone()  # the expert each slot's weights are
        self.view = MembershipView.initial((0,) * ep.num_ranks)
        self.events: deque[MembershipEvent] = deque(maxlen=HISTORY)
        self.uncovered: tuple[tuple[int, int], ...] = ()
        self.paused_reason: str | None = None
        self.steps = 0  # steps run (the engine's step counter as the events record it)
        self.fault_time: float | None = None  # when the last failure was seen, until a step completes
        self.on_fail: list[Callable[[set[int]], None]] = []  # told of every rank failed (auto rejoin)
        self.on_view: list[Callable[[], None]] = []  # told of every view committed (a rebalance in flight)

    def start(self) -> None:
        """Commit the first view, of the processes the pool started: an instance restarted under
        the same name goes on from the epoch its store has."""
        committed = self.store.current()
        initial = MembershipView.initial(self.pool.incarnations(),
                                         set(range(self.ep.num_ranks)) - set(self.ep.initial_ranks))
        if committed is not None:
            initial = MembershipView(committed.epoch + 1, initial.states, initial.incarnations)
        self._store(committed.epoch if committed is not None else None, initial)
        self.view = initial
        self.event("view_committed", None, "started")

    def commit(self, view: MembershipView, why: str) -> None:
        """The one point where a membership view is committed: stored, then (a new epoch)
        announced on every host, then recorded as an event."""
        if view == self.view:
            return
        bumped = view.epoch != self.view.epoch
        self._store(self.view.epoch, view)
        self.view = view
        if bumped:
            self.cluster.announce(view.epoch)
        self.event("view_committed", None, why)
        for listener in self.on_view:
            listener()

    def fail(self, ranks: set[int], why: str = "") -> None:
        """Commit the failure of `ranks` and cut their processes off."""
        self.commit(self.view.fail(ranks), why or f"failed {sorted(ranks)}")
        self.pool.fence(ranks, self.view.epoch)
        for listener in self.on_fail:
            listener(ranks)

    def event(self, kind: str, rank: int | None = None, reason: str = "") -> None:
        """Record a structured membership event: what happened, to which rank, under which view."""
        v = self.view
        ev = MembershipEvent(time.time(), v.epoch, self.steps, kind, rank, reason, v.active_ranks,
                             tuple(self.pool.pids()))
        self.events.append(ev)
        logger.info("membership %s epoch=%d step=%d rank=%s active=%s %s", kind, ev.epoch, ev.step, rank,
                    list(ev.active), reason)

    def _store(self, expected: int | None, view: MembershipView) -> None:
        """Commit `view` in the membership store, by compare-and-swap of the epoch. A controller
        that finds another epoch there is not the instance's controller any more and stops. An
        unreachable store is retried (other endpoints first) for `store_patience_s`: meanwhile
        the instance waits (no view may serve uncommitted), then ends. A retry after an answer
        that was lost is safe (EtcdStore.commit knows its own commit again)."""
        record = Committed(view.epoch, {"view": view.to_dict(), "nodes": self.ep.nnodes, "pids": self.pool.pids()})
        deadline = time.monotonic() + self.timeouts.store_patience_s
        while True:
            try:
                self.store.commit(expected, record)
                return
            except NotLeader as e:  # the leader key lapsed (an outage): taken again if free, else deposed
                try:
                    if self.leadership is not None and self.leadership.reclaim():
                        continue
                except StoreError as again:
                    if time.monotonic() > deadline:
                        raise MembershipError(f"the membership store is unreachable: {again}") from None
                    time.sleep(0.05)
                    continue
                raise MembershipError(f"the membership store refused epoch {view.epoch}: {e}") from None
            except EpochConflict as e:
                raise MembershipError(f"the membership store refused epoch {view.epoch}: {e}; another controller "
                                      f"commits this instance's views") from None
            except StoreError as e:
                if self.leadership is not None and self.leadership.deposed is not None:  # no use waiting
                    raise MembershipError(f"epoch {view.epoch} not committed: {self.leadership.deposed}") from None
                if time.monotonic() > deadline:
                    raise MembershipError(f"the membership store is unreachable: {e}") from None
                logger.warning("membership store: %s; retrying epoch %d for %.0f s more", e, view.epoch,
                               deadline - time.monotonic())
                time.sleep(0.05)

    # -- the tables ----------------------------------------------------------------------------
    @property
    def per_rank(self) -> int:
        return self.placement.num_physical // self.ep.num_ranks

    def slots_of(self, rank: int) -> slice:
        return slice(rank * self.per_rank, (rank + 1) * self.per_rank)

    def held_placement(self, like: Placement) -> Placement:
        """`held` as a Placement (for `check_tables_only`); replica lists may overflow, so only
        the slot map is meaningful."""
        return Placement(self.held.clone(), like.logical_to_physical_map, like.logical_replica_count)

    def coverage(self) -> dict[str, int]:
        """(layer, expert) pairs with 0, 1 and >= 2 live replicas in the tables in use."""
        counts = self.placement.logical_replica_count
        return {"none": int((counts == 0).sum()), "one": int((counts == 1).sum()), "two_or_more": int((counts >= 2).sum())}
