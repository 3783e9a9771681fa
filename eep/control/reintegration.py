"""Ranks coming back and going out gracefully: `rejoin` starts a new process for a failed rank
(it loads its slots while the others serve), the first step boundary after it is ready switches
it in (epoch + 1, one in-place table update on every rank, missing experts copied in the same
round trip); a joiner that dies or hangs while loading fails without touching a step; `drain`
takes an active rank out at the next step boundary (its requests move, its experts are covered
as after a failure, its process stops). A scale-up (`eep.control.scaling`) starts absent ranks
with `join`; a scale-down takes ranks out to absent with `remove` (a drain that leaves nothing
to restart)."""

from __future__ import annotations

import logging
import time

from eep.control.config import EPConfig, Timeouts
from eep.control.controller import Controller
from eep.control.coverage import CoverageKeeper
from eep.control.hooks import FaultHooks
from eep.control.replies import ReplyCollector
from eep.errors import ConfigError, RankFailed, RanksFailed
from eep.membership.view import RankState
from eep.placement.repair import plan_rejoin
from eep.runtime import wire

logger = logging.getLogger(__name__)


class Reintegration:
    def __init__(self, ep: EPConfig, timeouts: Timeouts, controller: Controller, coverage: CoverageKeeper,
                 replies: ReplyCollector, hooks: FaultHooks) -> None:
        self.ep, self.timeouts, self.ctl, self.coverage, self.replies, self.hooks = (
            ep, timeouts, controller, coverage, replies, hooks)
        self.pending_rejoin: set[int] = set()
        self.pending_drain: set[int] = set()
        self.pending_remove: set[int] = set()  # active ranks a scale-down takes out at the next boundary
        if ep.rejoin == "auto":
            controller.on_fail.append(self.pending_rejoin.update)

    def pending(self) -> bool:
        """A rank is to be restarted, loading or to be drained: `at_step_boundary` has work to do.
        A rank waiting for its host to come back is not (the idle loop looks again within its
        idle wait, a second, instead of every 50 ms for as long as the host is gone)."""
        up = self.ctl.cluster.node_up
        return bool(any(up(self.ep.node_of(r)) for r in self.pending_rejoin) or self.pending_drain
                    or self.pending_remove or self.ctl.view.ranks_in(RankState.JOINING))

    def request_drain(self, rank: int) -> None:
        view = self.ctl.view
        if not 0 <= rank < self.ep.num_ranks or view.states[rank] is not RankState.ACTIVE:
            raise ConfigError(f"rank {rank} is not active: only an active rank can be drained")
        if len(view.active_ranks) - len(self.pending_drain - {rank}) <= 1:
            raise ConfigError("the last active rank cannot be drained")
        self.pending_drain.add(rank)

    def rejoin(self, rank: int) -> None:
        """Start a new process for failed `rank`; it loads while the others serve and is switched
        in at the first step boundary after it is ready."""
        if not 0 <= rank < self.ep.num_ranks:  # -1 would index the last rank
            raise ConfigError(f"rank {rank} does not exist: this instance has ranks 0..{self.ep.num_ranks - 1}")
        if self.ctl.view.states[rank] is RankState.ABSENT:
            raise ConfigError(f"rank {rank} is absent (the instance is scaled down): scale up to bring it in")
        if self.ctl.view.states[rank] is not RankState.FAILED:
            raise ConfigError(f"rank {rank} is {self.ctl.view.states[rank].value}: only a failed rank can rejoin")
        self.join(rank)

    def join(self, rank: int) -> None:
        """Start a process for failed or absent `rank`, loading its slots of `target`."""
        ctl = self.ctl
        node = self.ep.node_of(rank)
        if not ctl.cluster.node_up(node):
            raise ConfigError(f"rank {rank} lives on node {node}, whose agent is not connected: start "
                              f"`eep serve --node-rank {node} --dist-init-addr {self.ep.dist_init_addr}` there first")
        for code in ctl.pool.reap_fenced(rank):  # the old process must be gone first
            ctl.event("reaped", rank, f"old process exited with code {code}")
        # The joiner loads its slots of the balanced target placement and starts with the tables
        # in use (its own slots unlisted); the tables that list them are made when it is ready.
        _, held_after = plan_rejoin(ctl.placement, ctl.held, self.ep.num_ranks, rank, ctl.target)
        try:
            p = ctl.pool.spawn(rank, ctl.placement, held_after, ctl.view.epoch)
        except RankFailed as e:  # its host's agent did not start it
            ctl.event("rejoin_failed", rank, str(e))
            raise ConfigError(f"rank {rank} could not be started: {e}") from None
        ctl.commit(ctl.view.begin_join(rank, p.incarnation), f"rank {rank} joining (pid {p.pid})")
        ctl.event("rejoin_started", rank, f"pid {p.pid}")

    def remove(self, ranks: set[int]) -> None:
        """Take `ranks` out of the instance (scale-down): failed and joining ones now (a joiner,
        which never served, is killed: it may be busy loading; no step changes), active ones at
        the next step boundary, as a drain."""
        ctl = self.ctl
        now = {r for r in ranks if ctl.view.states[r] in (RankState.FAILED, RankState.JOINING)}
        self.pending_rejoin -= ranks
        if now:
            joining = {r for r in now if ctl.view.states[r] is RankState.JOINING}
            ctl.commit(ctl.view.remove(now), f"removed {sorted(now)} (scale-down)")
            ctl.pool.fence(joining, ctl.view.epoch)
            for rank in sorted(joining):
                ctl.event("removed", rank, f"killed while joining; exit code {ctl.pool.reap_fenced(rank)}")
        self.pending_remove |= {r for r in ranks if ctl.view.states[r] is RankState.ACTIVE}

    def at_step_boundary(self) -> tuple[int, ...]:
        """Drain what is to be drained, start the replacements due, switch in every joiner that
        has finished loading. Returns the ranks switched in."""
        for rank, code in self.ctl.pool.reap_exited():
            self.ctl.event("reaped", rank, f"old process exited with code {code}")
        if self.pending_drain or self.pending_remove:
            self._drain_now()
        for rank in sorted(self.pending_rejoin):
            if not self.ctl.cluster.node_up(self.ep.node_of(rank)):
                continue  # its host is gone: it rejoins once the host's agent is back
            self.pending_rejoin.discard(rank)
            try:
                self.rejoin(rank)
            except ConfigError as e:  # its host went away again meanwhile: try once it is back
                logger.warning("rank %d: %s", rank, e)
                self.pending_rejoin.add(rank)
        switched = []
        for rank in self.ctl.view.ranks_in(RankState.JOINING):
            if self._loaded(rank):
                self._activate(rank)
                switched.append(rank)
        return tuple(switched)

    def _loaded(self, rank: int) -> bool:
        """The joiner said it is ready (read now if it has); a joiner that died, refused or hangs
        past the start timeout fails here."""
        p = self.ctl.pool[rank]
        if not p.ready and (p.conn.poll(0) or p.proc.poll() is not None):
            try:
                ready = self.replies.collect([rank], (wire.Ready,), p.epoch, self.timeouts.joiner_ready_s,
                                             heartbeats=False)
                ready.raise_first("Ready")
                self.ctl.pool.mark_ready(rank, ready.replies[rank].warmup_s)  # type: ignore[attr-defined]
            except (RankFailed, ConfigError) as e:
                self._joiner_failed(rank, str(e))
                return False
        elif not p.ready and time.monotonic() - p.started > self.ep.start_timeout_s:
            # a joiner that hangs (stopped, wedged on I/O) must not stay "joining" forever
            self._joiner_failed(rank, f"not ready within {self.ep.start_timeout_s:g} s")
            return False
        return p.ready

    def _joiner_failed(self, rank: int, why: str) -> None:
        """A joiner died or refused while loading: it was never in a step, so the epoch stays; the
        coverage of the view is judged again all the same (it cannot have grown worse)."""
        self.ctl.event("rejoin_failed", rank, why)
        self.ctl.fail({rank}, f"joiner {rank} failed")
        failed = self.coverage.reconcile(time.perf_counter())
        if failed:
            raise RanksFailed(frozenset(failed), self.ctl.view.epoch)

    def _activate(self, rank: int) -> None:
        """Switch the ready joiner in at this step boundary: epoch + 1, tables listing its
        slots written in place on every active rank (healthy ranks do nothing else). If
        coverage is still incomplete and the active ranks now have room, the missing experts are
        copied in the same round trip (into the joiner's spare slots first)."""
        self.hooks.switching_in(rank)
        t0 = time.perf_counter()
        self.ctl.commit(self.ctl.view.activate(rank), f"rank {rank} switched in")
        failed = self.coverage.reconcile(t0, joined=(rank,))  # a death while switching is a failure like any other
        if failed:
            raise RanksFailed(frozenset(failed), self.ctl.view.epoch)
        pause = time.perf_counter() - t0
        warmup_s = self.ctl.pool[rank].warmup_s
        self.coverage.repairs.append({"epoch": self.ctl.view.epoch, "rejoined": rank, "pause_s": pause,
                                      "warmup_s": warmup_s, **self.coverage.last_copies})
        self.ctl.event("rejoined", rank, f"warmed up in {warmup_s or 0:.3f} s alone; switched in, tables updated "
                                         f"in {pause * 1e3:.1f} ms")

    def _drain_now(self) -> None:
        """Drained ranks leave as failed (they may rejoin), removed ones as absent; both in one
        view change, their requests moved by the engine (RanksFailed)."""
        ctl = self.ctl
        t0 = time.perf_counter()
        drained, self.pending_drain = set(self.pending_drain), set()
        removed, self.pending_remove = set(self.pending_remove) - drained, set()
        ranks = {r for r in drained | removed if ctl.view.states[r] is RankState.ACTIVE}
        if not ranks:
            return
        what = "; ".join(f"{w} {sorted(rs & ranks)}" for w, rs in (("drained", drained), ("removed", removed)) if rs & ranks)
        ctl.commit(ctl.view.fail(drained & ranks).remove(removed & ranks), what)
        ctl.pool.stop_all(ranks, ctl.view.epoch)
        for rank in sorted(ranks):
            ctl.event("drained" if rank in drained else "removed", rank, "left the view; its process is stopping")
        failed = self.coverage.reconcile(t0)
        raise RanksFailed(frozenset(ranks | failed), ctl.view.epoch)
