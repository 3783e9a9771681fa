"""What the chaos soak does to the instance's ranks, and its record of every act.

`RankActions` sends the signals (SIGKILL, SIGSTOP and the SIGCONT that ends a stop, each
through a pidfd: no reused pid can redirect it), asks failed ranks back (`POST
/admin/ranks/{r}/rejoin` after a seeded delay, retried while the instance's state refuses it)
and drains ranks (`POST /admin/ranks/{r}/drain`, retried the same way). It knows which ranks
are healthy: `active` in the view and not a process the soak has SIGKILLed, drained, or
SIGSTOPped (until the failure timeout + 0.5 s after its SIGCONT). Every act is one row of
`actions` (time, the fault it belongs to, the operation and its outcome).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
from typing import Any

from eep.bench.chaos_watch import ServerWatch

logger = logging.getLogger(__name__)

REJOIN_DELAY_S = (0.0, 4.0)
RETRY_S = (0.5, 1.5)
MAX_RETRIES = 60  # ~1 min of refusals: the rank never became failed (or active) -> give up, recorded
# Statuses of an admin call that are retried: a refusal by the instance's state now (400, or
# 409 where the server tells conflicts apart), an unavailable engine or no answer (0). Any other
# (401/403: a key problem, 404) will not change: recorded, not retried.
RETRY_STATUSES = (0, 400, 409, 503)
MAX_DRAIN_RETRIES = 5


class RankActions:
    """The soak's acts on ranks (one event loop), drawing its delays from the soak's `rng`."""

    def __init__(self, watch: ServerWatch, rng: random.Random, *, failure_timeout_s: float) -> None:
        self.watch, self.rng, self.failure_timeout_s = watch, rng, failure_timeout_s
        self.actions: list[dict[str, Any]] = []
        self.doomed: set[int] = set()  # pids SIGKILLed or drained by the bench: no longer healthy
        self.stopped: dict[int, float] = {}  # pid -> until when it counts as failing (inf while stopped)
        self.rejoins: dict[int, asyncio.Task[None]] = {}  # rank -> its pending rejoin
        self.side_tasks: list[asyncio.Task[None]] = []  # drain retries
        self.conts: dict[int, tuple[int, int, int]] = {}  # pid -> (pidfd, rank, group) of a stopped process
        self.cont_at: dict[int, float] = {}  # pid -> when its SIGCONT is due
        self.faulting = True

    def record(self, group: int | None, fault: str, op: str, **fields: Any) -> dict[str, Any]:
        rec = {"t": round(self.watch.now(), 4), "group": group, "fault": fault, "op": op, **fields}
        self.actions.append(rec)
        logger.info("  t=%5.1f s  %-18s %s %s", rec["t"], fault, op,
                    " ".join(f"{k}={v}" for k, v in fields.items() if k != "detail"))
        return rec

    def healthy(self) -> list[int]:
        """Ranks that serve and will go on serving as far as the bench knows (module docstring)."""
        now = self.watch.now()
        return [r for r, (s, pid) in enumerate(zip(self.watch.states, self.watch.pids))
                if s == "active" and pid and pid not in self.doomed and self.stopped.get(pid, -1.0) < now]

    # -- signals ------------------------------------------------------------------------------
    def signal(self, group: int, fault: str, rank: int, pid: int, sig: signal.Signals) -> bool:
        """Send `sig` to `pid` through a pidfd (no pid reuse can redirect it); False if gone."""
        if sig == signal.SIGKILL:
            self.doomed.add(pid)
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self.record(group, fault, sig.name, rank=rank, pid=pid, result="gone")
            return False
        try:
            signal.pidfd_send_signal(fd, sig)
            result = "sent"
        except ProcessLookupError:
            result = "gone"
        if sig == signal.SIGSTOP and result == "sent":
            self.stopped[pid] = float("inf")
            self.conts[pid] = (fd, rank, group)  # kept open for the SIGCONT
        else:
            os.close(fd)
        self.record(group, fault, sig.name, rank=rank, pid=pid, result=result)
        return result == "sent"

    def kill(self, group: int, fault: str, ranks: list[int]) -> None:
        """SIGKILL `ranks` back to back, then ask each back after a random delay."""
        for r in ranks:
            self.signal(group, fault, r, self.watch.pids[r], signal.SIGKILL)
        for r in ranks:
            self.rejoin_later(r, group, self.watch.pids[r])

    def cont(self, pid: int, why: str) -> None:
        fd, rank, group = self.conts.pop(pid)
        try:
            signal.pidfd_send_signal(fd, signal.SIGCONT)
            result = "sent"
        except ProcessLookupError:  # the server killed it (a rejoin reaps the fenced process)
            result = "gone"
        finally:
            os.close(fd)
        # it may still be failed for having been silent: not healthy until that is settled
        self.stopped[pid] = self.watch.now() + self.failure_timeout_s + 0.5
        self.record(group, "stop", "SIGCONT", rank=rank, pid=pid, result=result, why=why)

    def cont_due(self, now: float) -> None:
        """SIGCONT every stopped process whose stop is over."""
        for pid, due in list(self.cont_at.items()):
            if due <= now:
                del self.cont_at[pid]
                if pid in self.conts:
                    self.cont(pid, "after its stop")

    def cont_all(self, why: str) -> None:
        for pid in list(self.conts):
            self.cont(pid, why)

    # -- rejoins and drains -------------------------------------------------------------------
    def rejoin_later(self, rank: int, group: int | None, victim_pid: int | None, delay: float | None = None) -> None:
        if rank in self.rejoins and not self.rejoins[rank].done():
            return  # one pending rejoin per rank
        if delay is None:
            delay = self.rng.uniform(*REJOIN_DELAY_S)
        self.rejoins[rank] = asyncio.create_task(self._rejoin(rank, group, victim_pid, delay))

    async def _rejoin(self, rank: int, group: int | None, victim_pid: int | None, delay: float) -> None:
        """Ask for `rank` back after `delay`; a refusal for the state now (`RETRY_STATUSES`:
        the rank is not failed yet, ...) is retried, until the rank is joining or back under
        another pid than `victim_pid` (then there is nothing left to ask)."""
        await asyncio.sleep(delay)
        for attempt in range(MAX_RETRIES):
            if self.watch.server_gone():
                return
            await self.watch.refresh()
            state, pid = self.watch.states[rank], self.watch.pids[rank]
            if state == "joining" or (state == "active" and pid != victim_pid):
                return  # back, or on its way back, by another request (or a stale view asked)
            status, text = await self.watch.admin("rejoin", rank)
            self.record(group, "rejoin", "POST rejoin", rank=rank, status=status, attempt=attempt,
                        phase="faults" if self.faulting else "settle", **({"detail": text} if status != 200 else {}))
            if status == 200 or status not in RETRY_STATUSES:
                return
            await asyncio.sleep(self.rng.uniform(*RETRY_S))
        self.record(group, "rejoin", "gave up", rank=rank, attempts=MAX_RETRIES)

    def ask_back_failed(self) -> None:
        """Every failed rank without a pending rejoin is asked back (ranks the server failed on
        its own: a joiner that died, a heartbeat starved on the shared cores)."""
        for r in self.watch.in_state("failed"):
            self.rejoin_later(r, None, self.watch.pids[r], None if self.faulting else 0.0)

    async def drain(self, rank: int, group: int, attempt: int = 0) -> int:
        pid = self.watch.pids[rank]
        status, text = await self.watch.admin("drain", rank)
        self.record(group, "drain", "POST drain", rank=rank, pid=pid, status=status, attempt=attempt,
                    **({"detail": text} if status != 200 else {}))
        if status == 200:
            self.doomed.add(pid)
            self.rejoin_later(rank, group, pid)
        return status

    def drain_later(self, rank: int, pid: int, group: int) -> None:
        """Retry a drain the instance's state refused, in the background."""
        self.side_tasks.append(asyncio.create_task(self._drain_retry(rank, pid, group)))

    async def _drain_retry(self, rank: int, pid: int, group: int) -> None:
        for attempt in range(1, MAX_DRAIN_RETRIES + 1):
            await asyncio.sleep(self.rng.uniform(*RETRY_S))
            if not self.faulting:
                return
            await self.watch.refresh()
            if rank not in self.healthy() or self.watch.pids[rank] != pid or len(self.healthy()) < 2:
                self.record(group, "drain", "dropped", rank=rank, why="no longer a rank that may be drained")
                return
            if await self.drain(rank, group, attempt) not in RETRY_STATUSES:
                return

    # -- the end --------------------------------------------------------------------------------
    def stop_faulting(self) -> None:
        """No more faults: drain retries end, and a rejoin still waiting for its delay goes now
        (`ask_back_failed` asks again at once)."""
        self.faulting = False
        for t in self.side_tasks:
            t.cancel()
        self.cont_all("faults over")
        for rank, t in list(self.rejoins.items()):
            if not t.done():
                t.cancel()
                del self.rejoins[rank]

    def pending(self) -> list[asyncio.Task[None]]:
        return [*self.rejoins.values(), *self.side_tasks]
