"""One timed run of the closed loop with a rank SIGKILLed and asked back, and its figures.

The failure experiment's timed run (`eep.bench.failure`), also the hosts bench's kill on one
host: `drive_fault_run` warms the server up (untimed), starts `concurrency` streaming clients
in a closed loop, SIGKILLs rank `victim` `fault_at_s` in (if the system injects the fault),
asks for it back `rejoin_after_s` later (`POST /admin/ranks/{victim}/rejoin`, if the system
rejoins), and stops starting requests `tail_s` after that, or `tail_s` after the rank is back
if that is later; every request in flight is awaited. `analyse_fault_run` reads the figures
off the token timeline (`eep.bench.harness.timeline`): the normal gap, the longest gap after
the kill and the pause it adds, the time back to 95% of the pre-fault rate, the
reintegration pause around the server's `rejoined` event (from /membership's structured
events, never their text).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

from eep.bench.harness import timeline as tl
from eep.bench.harness.clients import (
    ClosedLoop,
    RequestRecord,
    Trace,
    http_client,
    membership,
    warm,
)
from eep.bench.harness.server import BenchFailed, ServerHandle, System

logger = logging.getLogger(__name__)

REJOIN_TIMEOUT_S = 120.0
SAMPLE_S = 0.25  # how often a run's sampler is called
_TICK_S = 0.02
_REJOIN_POLL_S = 0.25


Sampler = Callable[[Any, float], Awaitable[None]]  # (the run's HTTP client, the run's clock now)


class _Schedule:
    """The kill, the rejoin request and the wait for the rank to be back, on the run's clock."""

    def __init__(self, client: Any, server: ServerHandle, system: System, load: ClosedLoop, pids: list[int], *,
                 victim: int, fault_at_s: float, rejoin_after_s: float, tail_s: float,
                 sampler: Sampler | None = None) -> None:
        self.client, self.server, self.system, self.load, self.pids = client, server, system, load, pids
        self.sampler = sampler
        self.victim, self.fault_at_s, self.rejoin_after_s, self.tail_s = victim, fault_at_s, rejoin_after_s, tail_s
        self.end = fault_at_s + rejoin_after_s + tail_s  # pushed back while a requested rejoin is not done
        self.times: dict[str, float] = {}

    def now(self) -> float:
        return time.monotonic() - self.load.clock

    async def run(self) -> None:
        next_report, next_poll, next_sample = 1.0, 0.0, 0.0
        while (now := self.now()) < self.end:
            if now >= next_report:
                self._report(now)
                next_report += 1.0
            if self.sampler is not None and now >= next_sample:
                next_sample = now + SAMPLE_S
                await self.sampler(self.client, now)
            if self.system.kill and "kill" not in self.times and now >= self.fault_at_s:
                self._kill()
            if self.system.rejoin and "rejoin_requested" not in self.times \
                    and now >= self.fault_at_s + self.rejoin_after_s:
                await self._request_rejoin()
            if "rejoin_requested" in self.times and "rejoin_done" not in self.times and now >= next_poll:
                next_poll = now + _REJOIN_POLL_S
                await self._poll_rejoin()
            await asyncio.sleep(_TICK_S)

    def _report(self, now: float) -> None:
        records = self.load.records
        tokens = sum(n for r in records for t, n in r.chunks if now - 1.0 < t <= now)
        logger.info("  t=%4.1f s  %5d tok/s  %d requests done", now, tokens, sum(r.done for r in records))

    def _kill(self) -> None:
        # the time the signal is sent: the death notice can reach the server in 0.1-0.2 ms,
        # before os.kill has even returned here
        self.times["kill"] = self.now()
        os.kill(self.pids[self.victim], signal.SIGKILL)
        logger.info("  t=%4.1f s  SIGKILL rank %d (pid %d)", self.times["kill"], self.victim, self.pids[self.victim])

    async def _request_rejoin(self) -> None:
        resp = await self.client.post(f"/admin/ranks/{self.victim}/rejoin",
                                      headers={"Authorization": f"Bearer {self.server.admin_key}"})
        self.times["rejoin_requested"] = self.now()
        logger.info("  t=%4.1f s  rejoin rank %d requested (HTTP %d)", self.times["rejoin_requested"], self.victim,
                    resp.status_code)
        if resp.status_code != 200:
            raise BenchFailed(f"rejoin refused: {resp.text}")

    async def _poll_rejoin(self) -> None:
        view = (await membership(self.client))["view"]
        now = self.now()  # the GET can take over a second on a loaded host
        if self.victim in view["active"]:  # switched in: serve `tail_s` more with it
            self.times["rejoin_done"] = now
            self.end = max(self.end, now + self.tail_s)
            logger.info("  t=%4.1f s  rank %d is back", now, self.victim)
        elif now > self.times["rejoin_requested"] + REJOIN_TIMEOUT_S:
            raise BenchFailed(f"rank {self.victim} did not rejoin within {REJOIN_TIMEOUT_S:.0f} s; the server's "
                              f"log ends:\n{self.server.log_tail()}")
        else:
            self.end = max(self.end, now + 1.0)


async def drive_fault_run(server: ServerHandle, system: System, trace: Trace, *, concurrency: int, victim: int,
                          fault_at_s: float, rejoin_after_s: float, tail_s: float,
                          sampler: Sampler | None = None) -> tuple[dict[str, Any], list[RequestRecord]]:
    """The timed run (module docstring): its figures (`analyse_fault_run`) and every request's
    record. `sampler`, if given, is called every `SAMPLE_S` of the run (on the run's clock)."""
    async with http_client(server, concurrency) as client:
        await warm(client, server, trace, concurrency)
        pids = (await membership(client))["pids"]
        clock, wall0 = time.monotonic(), time.time()
        load = ClosedLoop(client, server, trace, clock=clock)
        schedule = _Schedule(client, server, system, load, pids, victim=victim, fault_at_s=fault_at_s,
                             rejoin_after_s=rejoin_after_s, tail_s=tail_s, sampler=sampler)
        load.keep_going = lambda: schedule.now() < schedule.end
        load.start(concurrency)
        await schedule.run()
        logger.info("  waiting for the %d requests in flight", load.in_flight())
        await load.join()
        status = await membership(client)
    events = [{**e, "t": e["time"] - wall0} for e in status.get("events", [])]
    times = schedule.times
    times["load_end"] = schedule.end
    return analyse_fault_run(system, load.records, times, events), load.records


def analyse_fault_run(system: System, records: list[RequestRecord], times: dict[str, float],
                      events: list[dict[str, Any]]) -> dict[str, Any]:
    """A timed run's figures: `tokens_per_s_steady` over [`STEADY_FROM_S`, kill) (to the load's
    end without a kill); `normal_gap_s`; after a kill `longest_gap_after_kill_s` (until the
    rejoin request), `pause_after_kill_s` (that less the normal gap, never below 0),
    `pre_fault_tokens_per_s` (`timeline.pre_fault_rate` over the same stretch), `time_to_95_s`
    and `reached_95` (`timeline.time_to_95`); with a `rejoined` event, `reintegration_pause_s`."""
    end = times["load_end"]
    arrivals = tl.arrivals(records)
    last = max(arrivals, default=end)
    bins = tl.token_bins(records, last)
    kill = times.get("kill")
    steady_to = kill if kill is not None else end
    run: dict[str, Any] = {
        "label": system.label,
        "tokens_per_s_steady": tl.rate(bins, tl.STEADY_FROM_S, steady_to),
        "requests": len(records),
        "requests_completed": sum(r.complete for r in records),
        "requests_lost": sum(not r.complete for r in records),
        "errors": sorted({r.error for r in records if r.error})[:5],
        "times": times,
        "events": events,
        "tokens_per_bin": bins,
    }
    run["normal_gap_s"] = normal = tl.normal_gap(arrivals, tl.STEADY_FROM_S, steady_to)
    if kill is not None:
        chunks = tl.chunks(records)
        until = times.get("rejoin_requested", last)
        run["longest_gap_after_kill_s"] = gap = tl.longest_gap(arrivals, kill, until)
        run["pause_after_kill_s"] = max(0.0, gap - normal)
        run["pre_fault_tokens_per_s"] = before = tl.pre_fault_rate(chunks, tl.STEADY_FROM_S, kill)
        run["time_to_95_s"], run["reached_95"] = tl.time_to_95(chunks, kill, before)
    rejoined = next((e["t"] for e in events if e["kind"] == "rejoined"), None)
    if kill is not None and rejoined is not None:
        run["times"]["rejoined"] = rejoined
        run["reintegration_pause_s"] = max(0.0, tl.longest_gap(arrivals, rejoined - 1.0, rejoined + 1.0) - normal)
    return run
