"""The chaos soak: a seeded random fault schedule against a real `eep serve --http`, under load.

What `run_chaos_bench` promises. It starts `eep serve --http 127.0.0.1:0` (`--fault-policy
repair`, shm, `--rejoin manual`, `ep_size` ranks, `--failure-timeout failure_timeout_s`) with
the benches' harness (`eep.bench.harness.LocalServer`), warms it up (untimed), and keeps
`concurrency` asynchronous clients busy in a closed loop on the failure experiment's trace
(request i: a seeded random token-id prompt and a seeded output length, greedy, EOS ignored,
`return_token_ids`): three clients in four stream (`stream: true`), the fourth asks for the
whole completion at once. The clients start one after the other over 2 s; the soak starts
once every streaming client has had a token (≤ 60 s; started together, or before that, every
request is in its chunked prefill and no token arrives for several steps, 1-4 s on a busy
2-core host, which is no fault's doing). From then on, for `seconds`, it injects faults drawn
by `random.Random(seed)`:
- `kill`: SIGKILL of one active rank; `double_kill`: SIGKILL of two at once;
- `stop`: SIGSTOP of one rank for 1.5-3.5 s, then SIGCONT (longer than the failure timeout:
  its heartbeat goes silent, the server fails it, and the woken process finds itself fenced);
- `kill_during_rejoin`: while a rank's rejoin is loading (one is started if none is), SIGKILL
  of one or two active ranks, and in 3 of 10 draws of the joining process itself too;
- `kill_paused`: SIGKILL of one more rank while the instance is paused (survivors lack slots
  for every expert: `/health` answers 503 with status "paused"); if it is not paused, ranks
  are killed first until two healthy ones are left and the pause is awaited (≤ 3 s);
- `drain`: `POST /admin/ranks/{r}/drain` of an active rank;
- `down_to_one`: SIGKILL of every active rank but one, one after the other (0-0.3 s apart).
The kinds come from a deck (every kind once, in a seeded order, then a new deck), so a short
run still meets each one; a kind that is not possible now (too few active ranks, no rejoin to
interfere with) waits in the deck. Each fault comes a seeded pause of `gap_s` (2-8 s) after
the start or the previous fault (a rejoin takes 4-10 s here: the instance spends much of the
run degraded or paused, and some of it whole). After each failure every failed rank is asked
back (`POST /admin/ranks/{r}/rejoin`) after a seeded delay of 0-4 s, so some rejoins land while
an earlier one is still loading; a rank the server failed on its own (a joiner that died, a
starved heartbeat) is asked back the same way. A rejoin or drain refused for the instance's
state now (400 or 409: the rank is not failed yet, ...; or 503, or no answer) is retried
0.5-1.5 s later; any other refusal is recorded, not retried. Admin calls carry
`Authorization: Bearer` the admin key the harness started the server with. No request has a
timeout of its own: each is awaited until the bench's last, bounded wait.
Never is the last healthy rank made to fail: a rank is healthy if the view says `active` and
its process is not one the bench has SIGKILLed, drained, or SIGSTOPped (until the failure
timeout + 0.5 s after its SIGCONT), and every fault leaves at least one healthy rank.
The same seed draws the same choices; which fault is possible when depends on timing (a rejoin
takes seconds here), so two runs of one seed part after the first such branch.

At the end: faulting stops (stopped ranks get SIGCONT), every failed rank is asked back, the
bench waits (≤ `settle_timeout_s`) until every rank is active and `/health` answers 200, the
clients stop starting requests, every request in flight is awaited (≤ `drain_timeout_s`, then
cancelled and counted lost), `/health` is read once more, and the server is stopped (SIGTERM).
Then every request that completed is served again on a fault-free server (`--fault-policy
none`, same model, ranks and trace) as the reference.

Every action is recorded (`actions`: time since the load started, the fault it belongs to,
the operation: SIGKILL / SIGSTOP / SIGCONT of a pid, or the admin call and its HTTP status);
`/membership` is polled every ~0.1 s (`view_changes` keeps every change of the rank states);
`tokens_per_second` is the tokens that arrived at the clients in each second of the load,
`requests` one row per request (`requests_fields` names the columns); `times.steady` is when
the soak started.

Figures (`summary`):
- `requests_completed`: requests that ended with exactly their `max_tokens` tokens and a clean
  end (`[DONE]` for a stream, `finish_reason` "length" for a whole completion);
- `requests_lost`: requests started that did not (the bench stops only the starting of
  requests, never a request: every one started is awaited);
- `outputs_differing`: completed requests whose token ids differ from the fault-free server's
  for the same trace index (greedy outputs are bitwise independent of batch and placement);
- `stuck_s`: the longest stretch, from the soak's start on, during which work was pending (a
  streaming request in flight: a whole completion shows its tokens only at its end), every
  rank was `active` in the server's committed view (from its `view_committed` events, which
  carry the commit time; the polled view if there are none) and no token arrived at any
  client. A stopped rank counts as active until the server fails it, failure timeout after
  its last heartbeat, which may come up to a step after the last token: a healthy server
  reads below the failure timeout + one step; a pause with every rank back is a bug;
- `normal_gap_s`: what such a stretch normally is, for scale: the median, over the 1 s windows
  inside those same stretches (work pending, every rank active), of each window's longest
  stretch without a token (a step's time as the clients see it; a host whose cores are taken
  by others shows it here first);
- `stuck_bound_s`: the failure timeout + `normal_gap_s` (one step), and `stuck_within_bound`:
  `stuck_s` is below it;
- `pause_s` (per action) and `max_pause_s`: the longest stretch without any token arriving at
  any client from the action's time until the next action's (the last: until the clients
  stop starting requests);
- `actions`: how many actions were recorded;
- `healthy_at_end`: `/health` answered 200 after the in-flight requests were awaited;
- `processes_left`: processes that the server or `/membership` ever showed (the server, every
  rank, every replacement rank, for both servers) still alive and not a zombie after the
  server was stopped and a grace of 5 s (checked every 0.1 s); they are then killed;
- `shm_left`: `/dev/shm` entries named `eep-{pid}-...` whose creator pid is one of those pids,
  read after the same grace; they are then removed.

The pieces: `chaos_watch` (the server's state, polled), `chaos_load` (the clients),
`chaos_actions` (signals, rejoins and drains, and their record), `chaos_faults` (the schedule
and each kind), `chaos_figures` (the figures and the record); `ChaosRun` here ties them to one
event loop.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from eep.bench import chaos_figures
from eep.bench.chaos_actions import RankActions
from eep.bench.chaos_faults import FAULTS, FaultSchedule
from eep.bench.chaos_load import STEADY_TIMEOUT_S, ChaosLoad
from eep.bench.chaos_watch import ServerWatch
from eep.bench.harness import (
    FIXED,
    BenchFailed,
    LocalServer,
    ServerHandle,
    System,
    Trace,
    frozen_gc,
    http_client,
    serve_reference,
    warm,
)
from eep.bench.steady import checkpoint_vocab
from eep.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["CHAOS", "FAULTS", "REFERENCE", "ChaosRun", "run_chaos_bench", "summary_line"]

CHAOS = System("chaos", "eep (repair, shm, manual rejoin)",
               ("--ep-backend", "shm", "--fault-policy", "repair", "--rejoin", "manual"), kill=True, rejoin=True)
REFERENCE = FIXED  # --fault-policy none, shm, no fault

_GRACE_S = 5.0


def run_chaos_bench(
    model_path: str,
    *,
    ep_size: int = 4,
    concurrency: int = 16,
    seconds: float = 600.0,
    seed: int = 7,
    failure_timeout_s: float = 1.0,
    prompt_len: int = 32,
    output_len: int = 32,
    gap_s: tuple[float, float] = (2.0, 8.0),
    settle_timeout_s: float = 120.0,
    drain_timeout_s: float = 120.0,
    dtype: str = "auto",
    keep_log: str | Path | None = None,
) -> dict[str, Any]:
    """Run the soak (module docstring) and return a JSON-able record: `summary`, `actions`,
    `view_changes`, `events`, `config` and provenance. If the run shows a failure (a lost or
    differing request, a stuck stretch of at least the failure timeout + 1 s, an unhealthy or
    exited server, anything left behind) the server's log is written to `keep_log`."""
    if ep_size < 2 or concurrency < 1 or seconds <= 0 or failure_timeout_s <= 0:
        raise ConfigError("need ep_size >= 2, concurrency >= 1, seconds > 0 and failure_timeout_s > 0")
    if not 0 < gap_s[0] <= gap_s[1]:
        raise ConfigError("need 0 < gap_s[0] <= gap_s[1]")
    trace = Trace(seed, checkpoint_vocab(model_path), prompt_len, output_len)
    config = {"model_path": model_path, "ep_size": ep_size, "concurrency": concurrency, "seconds": seconds,
              "seed": seed, "failure_timeout_s": failure_timeout_s, "prompt_len": prompt_len,
              "output_len": output_len, "gap_s": list(gap_s), "settle_timeout_s": settle_timeout_s,
              "drain_timeout_s": drain_timeout_s, "dtype": dtype, "max_model_len": trace.max_model_len}

    def server(system: System) -> LocalServer:
        # `concurrency` per rank: one survivor can hold every request, so no figure reads a
        # request queued behind a full rank as a pause
        return LocalServer(model_path, system, ep_size=ep_size, concurrency=concurrency * (ep_size - 1),
                           trace=trace, failure_timeout_s=failure_timeout_s, dtype=dtype)

    logger.info("[1/2] chaos: %s, %d ranks, %d clients, %.0f s of faults, seed %d", CHAOS.label, ep_size,
                concurrency, seconds, seed)
    chaos = ChaosRun(server(CHAOS), trace, rng=random.Random(seed), concurrency=concurrency, seconds=seconds,
                     failure_timeout_s=failure_timeout_s, gap_s=gap_s, settle_timeout_s=settle_timeout_s,
                     drain_timeout_s=drain_timeout_s)
    with frozen_gc():  # a full collection over torch's objects stalls this client's clocks by ~50-80 ms
        _soak(chaos, keep_log)
    leftovers = _leftovers(chaos.watch.pids_seen)
    logger.info("[2/2] reference: %s, the %d completed requests", REFERENCE.label,
                sum(r.complete for r in chaos.load.requests))
    reference, reference_error, ref_left = _reference(server, chaos, trace, concurrency)
    result = chaos_figures.result(chaos, reference, reference_error, leftovers, ref_left, config)
    if result["failed"]:
        result["server_log"] = _keep_log(keep_log, chaos.log_text)
        result["server_log_tail"] = chaos.log_text.splitlines()[-80:]
    return result


def _soak(chaos: ChaosRun, keep_log: str | Path | None) -> None:
    """The soak on its server, then the server stopped (its exit code and log kept); if the
    soak fails, the log is kept and nothing of the run outlives it either."""
    srv = chaos.srv
    try:
        with srv:
            try:
                asyncio.run(chaos.run())
            finally:
                chaos.server_exit_code = srv.terminate()
                chaos.log_text = srv.log_text()
    except BaseException:
        _keep_log(keep_log, chaos.log_text)
        _leftovers(chaos.watch.pids_seen)
        raise


def _reference(server: Callable[[System], LocalServer], chaos: ChaosRun, trace: Trace,
               concurrency: int) -> tuple[dict[int, list[int]], str | None, dict[str, list[Any]]]:
    """Every completed request served again on a fault-free server: (outputs, the error that
    voided the comparison or None, what that server left behind)."""
    reference: dict[int, list[int]] = {}
    reference_error = None
    ref_pids: set[int] = set()
    try:
        with server(REFERENCE) as fixed:
            ref_pids = {fixed.proc.pid} if fixed.proc is not None else set()
            indices = sorted({r.rec.index for r in chaos.load.requests if r.complete})
            reference, more = asyncio.run(_serve_reference(fixed, trace, indices, concurrency))
            ref_pids |= more
    except BenchFailed as e:  # the chaos record is still worth writing; the comparison is void
        reference_error = str(e)
        logger.error("the fault-free reference failed: %s", e)
    return reference, reference_error, _leftovers(ref_pids)


async def _serve_reference(fixed: ServerHandle, trace: Trace, indices: list[int],
                           concurrency: int) -> tuple[dict[int, list[int]], set[int]]:
    async with http_client(fixed, 1, timeout_s=30.0) as http:
        status = (await http.get("/membership")).json()
    pids = {int(p) for p in status.get("pids") or [] if p}
    return (await serve_reference(fixed, trace, indices, concurrency) if indices else {}), pids


# -- the soak -----------------------------------------------------------------------------------
class ChaosRun:
    """One soak on one event loop: the server watched (`ServerWatch`), the clients (`ChaosLoad`),
    the acts on ranks (`RankActions`) and the fault schedule (`FaultSchedule`)."""

    def __init__(self, srv: LocalServer, trace: Trace, *, rng: random.Random, concurrency: int, seconds: float,
                 failure_timeout_s: float, gap_s: tuple[float, float], settle_timeout_s: float,
                 drain_timeout_s: float) -> None:
        self.srv, self.trace = srv, trace
        self.failure_timeout_s, self.drain_timeout_s = failure_timeout_s, drain_timeout_s
        self.watch = ServerWatch(srv)
        self.acts = RankActions(self.watch, rng, failure_timeout_s=failure_timeout_s)
        bound = STEADY_TIMEOUT_S + seconds + settle_timeout_s + drain_timeout_s + 60.0
        self.load = ChaosLoad(self.watch, trace, concurrency=concurrency, timeout_s=bound)
        self.schedule = FaultSchedule(self.watch, self.acts, self.load, rng, seconds=seconds, gap_s=gap_s,
                                      settle_timeout_s=settle_timeout_s)
        self.times: dict[str, float] = {}
        self.healthy_at_end = False
        self.server_exit_code: int | None = None
        self.log_text = ""  # the server's log, read once it has stopped

    @property
    def settled(self) -> bool:
        return self.schedule.settled

    async def run(self) -> None:
        async with self.watch.open(), self.load.client() as client:
            await warm(client, self.srv, self.trace, self.load.concurrency)
            self.watch.pids_seen.add(self.srv.proc.pid)  # type: ignore[union-attr]
            self.watch.start_clock()
            await self.watch.refresh()
            workers = self.load.start(client)
            poller = asyncio.create_task(self.watch.poll_forever())
            try:
                await self._soak()
                await self._end(workers)
            finally:
                self.load.stopping = True
                tasks = [*workers, poller, *self.acts.pending()]
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                self.acts.cont_all("end")

    async def _soak(self) -> None:
        """From the steady point: the faults, then the settling."""
        await self.load.await_steady()
        self.times["steady"] = self.watch.now()
        logger.info("  t=%5.1f s  every client is served: faults start", self.watch.now())
        await self.schedule.run(self.times["steady"])
        self.times["faults_end"] = self.watch.now()
        await self.schedule.settle()
        self.times["settled"] = self.watch.now()

    async def _end(self, workers: list[asyncio.Task[None]]) -> None:
        """No more requests started; those in flight awaited (bounded), then the last health and view."""
        self.load.stopping = True
        self.times["load_stop"] = self.watch.now()
        logger.info("  t=%5.1f s  stop starting requests; awaiting %d in flight", self.watch.now(),
                    self.load.in_flight())
        _, pending = await asyncio.wait(workers, timeout=self.drain_timeout_s)
        for t in pending:  # bounded: what is left is lost, and said so
            t.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        if pending:
            logger.error("  %d requests still in flight %.0f s after the load stopped: cancelled",
                         len(pending), self.drain_timeout_s)
        self.times["load_end"] = self.watch.now()
        self.healthy_at_end = (await self.watch.health())[0] == 200
        status = await self.watch.get("/membership")
        if status is not None:
            self.watch.read_status(status)


# -- what is left -------------------------------------------------------------------------------
def _keep_log(path: str | Path | None, text: str) -> str | None:
    if path is None or not text:
        return None
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)
    logger.info("the server's log is kept at %s", path)
    return str(path)


def _alive(pid: int) -> bool:
    """A live, non-zombie eep process (the cmdline check keeps a reused pid out)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z" and b"eep" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, IndexError):
        return False


def _segments_of(pids: set[int]) -> list[str]:
    found = []
    for p in Path("/dev/shm").glob("eep-*-*"):
        creator = p.name.split("-")[1]
        if creator.isdigit() and int(creator) in pids:
            found.append(p.name)
    return sorted(found)


def _leftovers(pids: set[int], grace_s: float = _GRACE_S) -> dict[str, list[Any]]:
    """Processes of `pids` alive and segments created by them, after a bounded grace; then
    both are cleaned up (the figure has been read), so one leak does not spoil what follows."""
    deadline = time.monotonic() + grace_s
    while (alive := sorted(p for p in pids if _alive(p))) and time.monotonic() < deadline:
        time.sleep(0.1)
    segments = _segments_of(pids)
    for pid in alive:
        logger.error("process %d outlived its server: killing it", pid)
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        finally:
            os.close(fd)
    for name in segments:
        logger.error("/dev/shm/%s outlived its creator's server: removing it", name)
        Path("/dev/shm", name).unlink(missing_ok=True)
    return {"processes": alive, "shm": segments}


def summary_line(result: dict[str, Any]) -> str:
    """What `eep bench chaos` prints: the summary, one JSON object."""
    return json.dumps(result["summary"])
