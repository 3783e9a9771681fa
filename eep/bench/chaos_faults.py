"""The chaos soak's fault schedule: which fault when, each kind's injection, and the settling.

`FaultSchedule.run` draws the kinds from a deck (every kind of `FAULTS` once, in a seeded
order, then a new deck); a kind that is not possible now (`feasible`: too few healthy ranks, no
rejoin to interfere with) waits in the deck. Each fault comes a seeded pause of `gap_s` after
the start or the previous fault. Never is the last healthy rank made to fail: every kind
leaves at least one. `settle` ends the faults: stopped ranks resumed, every failed rank asked
back, and a bounded wait until every rank is active and `/health` answers 200.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import signal
import time

from eep.bench.chaos_actions import RETRY_STATUSES, RankActions
from eep.bench.chaos_load import ChaosLoad
from eep.bench.chaos_watch import ServerWatch

logger = logging.getLogger(__name__)

FAULTS = ("kill", "double_kill", "stop", "kill_during_rejoin", "kill_paused", "drain", "down_to_one")
_TICK_S = 0.05  # the scheduler's period
_STOP_S = (1.5, 3.5)
_PAUSE_WAIT_S = 3.0
_JOINER_KILL_P = 0.3
_REPORT_S = 5.0


class FaultSchedule:
    """The faults of one soak (one event loop), drawn from the soak's `rng`."""

    def __init__(self, watch: ServerWatch, acts: RankActions, load: ChaosLoad, rng: random.Random, *,
                 seconds: float, gap_s: tuple[float, float], settle_timeout_s: float) -> None:
        self.watch, self.acts, self.load, self.rng = watch, acts, load, rng
        self.seconds, self.gap_s, self.settle_timeout_s = seconds, gap_s, settle_timeout_s
        self.groups = itertools.count(1)
        self.settled = False

    def feasible(self, kind: str) -> bool:
        n = len(self.acts.healthy())
        if kind in ("kill", "stop", "drain"):
            return n >= 2
        if kind in ("double_kill", "down_to_one"):
            return n >= 3
        if kind == "kill_paused":  # paused, or two ranks out (or on their way out) once it has killed
            return n >= 3 or (n >= 2 and (self.watch.paused is not None or len(self.watch.states) - n >= 2))
        if kind == "kill_during_rejoin":
            return n >= 2 and bool(self.watch.in_state("joining") or self.watch.in_state("failed"))
        raise AssertionError(kind)

    async def run(self, start: float) -> None:
        """Faults from `start` (the soak's steady point) for `seconds`."""
        deck: list[str] = []
        next_at = start + self.rng.uniform(*self.gap_s)
        next_report = _REPORT_S
        while (now := self.watch.now()) < start + self.seconds:
            if self.watch.server_gone():
                proc = self.watch.srv.proc
                self.acts.record(None, "server", "exited", code=proc.poll() if proc else None)
                break
            self.acts.cont_due(now)
            self.acts.ask_back_failed()
            if now >= next_at:
                await self.watch.refresh()
                if not deck:
                    deck = list(FAULTS)
                    self.rng.shuffle(deck)
                kind = next((k for k in deck if self.feasible(k)), None)
                if kind is None:
                    next_at = now + 0.25  # nothing possible now (rejoins pending): look again soon
                else:
                    deck.remove(kind)
                    await self._fault(kind, next(self.groups))
                    next_at = self.watch.now() + self.rng.uniform(*self.gap_s)
            if now >= next_report:
                self._report(now)
                next_report += _REPORT_S
            await asyncio.sleep(_TICK_S)

    def _report(self, now: float) -> None:
        logger.info("  t=%5.1f s  %4.0f tok/s  states %s%s  %d requests done, %d actions", now,
                    self.load.tokens_per_s(now, _REPORT_S), ",".join(self.watch.states),
                    " PAUSED" if self.watch.paused else "", self.load.done(), len(self.acts.actions))

    async def _fault(self, kind: str, g: int) -> None:
        rng, healthy = self.rng, sorted(self.acts.healthy())
        if kind == "kill":
            self.acts.kill(g, kind, [rng.choice(healthy)])
        elif kind == "double_kill":
            self.acts.kill(g, kind, rng.sample(healthy, 2))
        elif kind == "down_to_one":
            await self._down_to_one(g, healthy)
        elif kind == "stop":
            r = rng.choice(healthy)
            pid = self.watch.pids[r]
            if self.acts.signal(g, kind, r, pid, signal.SIGSTOP):
                self.acts.cont_at[pid] = self.watch.now() + rng.uniform(*_STOP_S)
                self.acts.rejoin_later(r, g, pid)  # often early: refused (400) until the server fails it
        elif kind == "drain":
            r = rng.choice(healthy)
            if await self.acts.drain(r, g) in RETRY_STATUSES:
                self.acts.drain_later(r, self.watch.pids[r], g)
        elif kind == "kill_paused":
            await self._kill_paused(g)
        elif kind == "kill_during_rejoin":
            await self._kill_during_rejoin(g)

    async def _down_to_one(self, g: int, healthy: list[int]) -> None:
        keep = self.rng.choice(healthy)
        for n, r in enumerate(r for r in healthy if r != keep):
            if n:
                await asyncio.sleep(self.rng.uniform(0.0, 0.3))
                await self.watch.refresh()
            if r in self.acts.healthy() and len(self.acts.healthy()) >= 2:
                self.acts.kill(g, "down_to_one", [r])

    async def _kill_paused(self, g: int) -> None:
        rng = self.rng
        code, health = await self.watch.health()
        if health != "paused":
            healthy = sorted(self.acts.healthy())
            self.acts.kill(g, "kill_paused", rng.sample(healthy, len(healthy) - 2))  # two survivors lack slots
            deadline = time.monotonic() + _PAUSE_WAIT_S
            while time.monotonic() < deadline:
                code, health = await self.watch.health()
                if health == "paused":
                    break
                await asyncio.sleep(0.1)
            if health != "paused":
                self.acts.record(g, "kill_paused", "not paused",
                                 why=f"/health still {health!r} after {_PAUSE_WAIT_S} s")
                return
        await self.watch.refresh()
        healthy = sorted(self.acts.healthy())
        self.acts.record(g, "kill_paused", "GET /health", status=code, health=health, healthy=healthy)
        if len(healthy) >= 2:
            self.acts.kill(g, "kill_paused", [rng.choice(healthy)])

    async def _kill_during_rejoin(self, g: int) -> None:
        rng, watch = self.rng, self.watch
        joining = watch.in_state("joining")
        if joining:
            j = rng.choice(joining)
        else:
            j = rng.choice(watch.in_state("failed"))
            status, text = await watch.admin("rejoin", j)
            self.acts.record(g, "kill_during_rejoin", "POST rejoin", rank=j, status=status,
                             **({"detail": text} if status != 200 else {}))
            if status != 200:
                return
        await asyncio.sleep(rng.uniform(0.0, 1.0))  # well inside the load (seconds here)
        await watch.refresh()
        loading = watch.states[j] == "joining"
        healthy = sorted(self.acts.healthy())
        n = 2 if len(healthy) >= 3 and rng.random() < 0.5 else 1
        if len(healthy) >= 2:
            self.acts.kill(g, "kill_during_rejoin", rng.sample(healthy, n))
        if rng.random() < _JOINER_KILL_P and loading:
            self.acts.kill(g, "kill_during_rejoin", [j])
        if not loading:
            self.acts.record(g, "kill_during_rejoin", "note", rank=j, why=f"rank {j} was {watch.states[j]}, not loading")

    async def settle(self) -> None:
        """Stop faulting, resume every stopped rank, ask every failed rank back, and wait until
        every rank is active and /health answers 200 (bounded)."""
        self.acts.stop_faulting()
        deadline = time.monotonic() + self.settle_timeout_s
        while time.monotonic() < deadline and not self.watch.server_gone():
            await self.watch.refresh()
            self.acts.ask_back_failed()
            if self.watch.all_active() and (await self.watch.health())[0] == 200:
                self.settled = True
                logger.info("  t=%5.1f s  every rank active and /health 200", self.watch.now())
                return
            await asyncio.sleep(0.25)
        logger.error("  t=%5.1f s  not settled within %.0f s: states %s, paused %s", self.watch.now(),
                     self.settle_timeout_s, self.watch.states, self.watch.paused)
