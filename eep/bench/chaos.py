"""The chaos soak: a seeded random fault schedule against a real `eep serve --http`, under load.

What `run_chaos_bench` promises. It starts `eep serve --http 127.0.0.1:0` (`--fault-policy
repair`, shm, `--rejoin manual`, `ep_size` ranks, `--failure-timeout failure_timeout_s`) with
the failure experiment's harness (`eep.bench.failure._Server`), warms it up (untimed), and keeps
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
"""

from __future__ import annotations

import asyncio
import bisect
import gc
import itertools
import json
import logging
import os
import random
import re
import signal
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eep.bench.failure import (
    SYSTEMS,
    BenchFailed,
    System,
    Trace,
    _complete,
    _provenance,
    _Record,
    _reference,
    _Server,
    _warm,
)
from eep.bench.steady import checkpoint_vocab
from eep.errors import ConfigError

logger = logging.getLogger(__name__)
logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise

FAULTS = ("kill", "double_kill", "stop", "kill_during_rejoin", "kill_paused", "drain", "down_to_one")
CHAOS = System("chaos", "eep (repair, shm, manual rejoin)",
               ("--ep-backend", "shm", "--fault-policy", "repair", "--rejoin", "manual"), kill=True, rejoin=True)
REFERENCE = next(s for s in SYSTEMS if s.name == "fixed")  # --fault-policy none, shm, no fault

_POLL_S = 0.1  # /membership polling period
_POLL_TIMEOUT_S = 2.0  # a poll the server does not answer in this keeps the last view
_TICK_S = 0.05  # the scheduler's period
_ADMIN_TIMEOUT_S = 70.0  # admin calls run on the engine loop (the server gives them 60 s)
_STOP_S = (1.5, 3.5)
_REJOIN_DELAY_S = (0.0, 4.0)
_RETRY_S = (0.5, 1.5)
_MAX_RETRIES = 60  # ~1 min of refusals: the rank never became failed (or active) -> give up, recorded
# Statuses of an admin call that are retried: a refusal by the instance's state now (400, or
# 409 where the server tells conflicts apart), an unavailable engine or no answer (0). Any other
# (401/403: a key problem, 404) will not change: recorded, not retried.
_RETRY_STATUSES = (0, 400, 409, 503)
_MAX_DRAIN_RETRIES = 5
_PAUSE_WAIT_S = 3.0
_JOINER_KILL_P = 0.3
_GRACE_S = 5.0
_ERROR_BACKOFF_S = 0.2  # a client whose request failed waits this long: never spin on a refusing server
_STREAM_EVERY = 4  # client k asks for whole completions when k % 4 == 3, streams otherwise
# Client k starts k * _RAMP_S / concurrency into the load, and the soak (faults, `stuck_s`)
# starts once every streaming client has had a token (within _STEADY_TIMEOUT_S): before that,
# every request is in its prefill and no token arrives for several steps (3 s with 16 clients
# started together on a busy 2-core host), which `stuck_s` would read as a stalled instance.
_RAMP_S = 2.0
_STEADY_TIMEOUT_S = 60.0
_PID_IN_DETAIL = re.compile(r"\bpid (\d+)")


@dataclass(slots=True)
class _Request:
    """One request as its client saw it (`box` holds the failure harness's record, filled as
    soon as the request starts, so a cancelled request keeps what it got)."""

    stream: bool
    box: list[_Record] = field(default_factory=list)
    end: float | None = None

    @property
    def rec(self) -> _Record:
        return self.box[0]

    @property
    def complete(self) -> bool:
        return self.end is not None and self.rec.complete


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

    def server(system: System) -> _Server:
        # `concurrency` per rank: one survivor can hold every request, so no figure reads a
        # request queued behind a full rank as a pause
        return _Server(model_path, system, ep_size=ep_size, concurrency=concurrency * (ep_size - 1), trace=trace,
                       failure_timeout_s=failure_timeout_s, dtype=dtype)

    def soak() -> _Chaos:
        chaos = _Chaos(server(CHAOS), trace, rng=random.Random(seed), concurrency=concurrency, seconds=seconds,
                       failure_timeout_s=failure_timeout_s, gap_s=gap_s, settle_timeout_s=settle_timeout_s,
                       drain_timeout_s=drain_timeout_s)
        try:
            with chaos.srv:
                try:
                    asyncio.run(chaos.run())
                finally:
                    chaos.server_exit_code = _shutdown(chaos.srv)
                    chaos.log_text = _read_log(chaos.srv)
        except BaseException:
            _keep_log(keep_log, chaos.log_text)
            _leftovers(chaos.pids_seen)  # nothing of a run that failed outlives it either
            raise
        return chaos

    logger.info("[1/2] chaos: %s, %d ranks, %d clients, %.0f s of faults, seed %d", CHAOS.label, ep_size,
                concurrency, seconds, seed)
    gc.collect()
    gc.freeze()  # a full collection over torch's objects stalls this client's clocks by ~50-80 ms
    try:
        chaos = soak()
    finally:
        gc.unfreeze()  # the caller's collector as it was (the test runs in the suite's process)
    leftovers = _leftovers(chaos.pids_seen)

    logger.info("[2/2] reference: %s, the %d completed requests", REFERENCE.label,
                sum(r.complete for r in chaos.requests))
    reference: dict[int, list[int]] = {}
    reference_error = None
    ref_pids: set[int] = set()
    try:
        with server(REFERENCE) as fixed:
            ref_pids = {fixed.proc.pid} if fixed.proc is not None else set()
            indices = sorted({r.rec.index for r in chaos.requests if r.complete})
            reference, more = asyncio.run(_serve_reference(fixed, trace, indices, concurrency))
            ref_pids |= more
    except BenchFailed as e:  # the chaos record is still worth writing; the comparison is void
        reference_error = str(e)
        logger.error("the fault-free reference failed: %s", e)
    ref_left = _leftovers(ref_pids)
    result = _result(chaos, reference, reference_error, leftovers, ref_left, config)
    if result["failed"]:
        result["server_log"] = _keep_log(keep_log, chaos.log_text)
        result["server_log_tail"] = chaos.log_text.splitlines()[-80:]
    return result


# -- the soak -----------------------------------------------------------------------------------
class _Chaos:
    """Clients, the /membership poller and the fault scheduler of one chaos run (one event loop)."""

    def __init__(self, srv: _Server, trace: Trace, *, rng: random.Random, concurrency: int, seconds: float,
                 failure_timeout_s: float, gap_s: tuple[float, float], settle_timeout_s: float,
                 drain_timeout_s: float) -> None:
        self.srv, self.trace, self.rng = srv, trace, rng
        self.concurrency, self.seconds, self.failure_timeout_s = concurrency, seconds, failure_timeout_s
        self.gap_s, self.settle_timeout_s, self.drain_timeout_s = gap_s, settle_timeout_s, drain_timeout_s
        self.clock = self.wall0 = 0.0
        self.requests: list[_Request] = []
        self.actions: list[dict[str, Any]] = []
        self.samples: list[tuple[float, bool]] = []  # (poll time, every rank active)
        self.view_changes: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []  # the server's, gathered as polled (it keeps the last 1000)
        self._event_keys: set[tuple[Any, ...]] = set()
        self.states: list[str] = []
        self.pids: list[int] = []
        self.paused: str | None = None
        self.pids_seen: set[int] = set()
        self.poll_failures = 0
        self.doomed: set[int] = set()  # pids SIGKILLed or drained by the bench: no longer healthy
        self.stopped: dict[int, float] = {}  # pid -> until when it counts as failing (inf while stopped)
        self.rejoins: dict[int, asyncio.Task[None]] = {}  # rank -> its pending rejoin
        self.side_tasks: list[asyncio.Task[None]] = []  # SIGCONTs, drain retries
        self.conts: dict[int, tuple[int, int, int]] = {}  # pid -> (pidfd, rank, group) of a stopped process
        self.cont_at: dict[int, float] = {}  # pid -> when its SIGCONT is due
        self.http: Any = None
        self._report_from = 0
        self.groups = itertools.count(1)
        self.faulting = True
        self.stopping = False
        self.times: dict[str, float] = {}
        self.healthy_at_end = False
        self.settled = False
        self.server_exit_code: int | None = None
        self.log_text = ""  # the server's log, read once it has stopped
        self.auth = {"Authorization": f"Bearer {srv.admin_key}"}  # the harness starts it with --admin-api-key

    def now(self) -> float:
        return time.monotonic() - self.clock

    def server_gone(self) -> bool:
        return self.srv.proc is None or self.srv.proc.poll() is not None

    # -- the run --------------------------------------------------------------------------
    async def run(self) -> None:
        import httpx

        self.http = httpx.AsyncClient(base_url=self.srv.url, timeout=httpx.Timeout(_ADMIN_TIMEOUT_S))
        async with self.http, self._load_client() as client:
            await _warm(client, self.srv, self.trace, self.concurrency)
            self.pids_seen.add(self.srv.proc.pid)  # type: ignore[union-attr]
            self.clock, self.wall0 = time.monotonic(), time.time()
            await self._refresh()
            counter = itertools.count()
            workers = [asyncio.create_task(self._worker(client, k, counter)) for k in range(self.concurrency)]
            poller = asyncio.create_task(self._poll())
            try:
                await self._await_steady()
                await self._faults()
                self.times["faults_end"] = self.now()
                await self._settle()
                self.times["settled"] = self.now()
                self.stopping = True
                self.times["load_stop"] = self.now()
                logger.info("  t=%5.1f s  stop starting requests; awaiting %d in flight", self.now(),
                            sum(r.end is None for r in self.requests))
                done, pending = await asyncio.wait(workers, timeout=self.drain_timeout_s)
                for t in pending:  # bounded: what is left is lost, and said so
                    t.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
                if pending:
                    logger.error("  %d requests still in flight %.0f s after the load stopped: cancelled",
                                 len(pending), self.drain_timeout_s)
                self.times["load_end"] = self.now()
                self.healthy_at_end = (await self._health())[0] == 200
                status = await self._get("/membership")
                if status is not None:
                    self._read_status(status)
            finally:
                self.stopping = True
                for t in [*workers, poller, *self.rejoins.values(), *self.side_tasks]:
                    t.cancel()
                await asyncio.gather(*workers, poller, *self.rejoins.values(), *self.side_tasks,
                                     return_exceptions=True)
                self._cont_all("end")

    def _load_client(self) -> Any:
        """The clients' HTTP client. No request may end by a timeout of its own before the
        bench's last wait for it (`drain_timeout_s` after the load stops): a request can take
        minutes here, moved and prefilled again at every fault and waiting out every pause
        (`failure._client`'s 300 s read timeout cut off a whole completion in a 300 s soak)."""
        import httpx

        bound = _STEADY_TIMEOUT_S + self.seconds + self.settle_timeout_s + self.drain_timeout_s + 60.0
        return httpx.AsyncClient(base_url=self.srv.url, timeout=httpx.Timeout(bound, connect=30.0),
                                 limits=httpx.Limits(max_connections=self.concurrency + 4,
                                                     max_keepalive_connections=self.concurrency + 4))

    async def _await_steady(self) -> None:
        """Wait (bounded) until every streaming client has had a token: the soak's figures and
        faults start from there, not from the ramp, whose prefills commit no token for steps."""
        deadline = time.monotonic() + _STEADY_TIMEOUT_S
        while time.monotonic() < deadline and not self.server_gone():
            streams = [r for r in self.requests if r.stream and r.box]
            if len(streams) >= sum(k % _STREAM_EVERY != _STREAM_EVERY - 1 for k in range(self.concurrency)) and all(
                    r.rec.chunks or r.end is not None for r in streams):
                break
            await asyncio.sleep(_TICK_S)
        else:
            logger.error("  the clients did not all get a token within %.0f s", _STEADY_TIMEOUT_S)
        self.times["steady"] = self.now()
        logger.info("  t=%5.1f s  every client is served: faults start", self.now())

    async def _worker(self, client: Any, k: int, counter: itertools.count[int]) -> None:
        stream = k % _STREAM_EVERY != _STREAM_EVERY - 1
        await asyncio.sleep(k * _RAMP_S / self.concurrency)
        while not self.stopping:
            req = _Request(stream)
            self.requests.append(req)
            complete = _complete if stream else _complete_whole
            try:
                # the record is in req.box before the first await: a cancelled request keeps it
                await complete(client, self.srv.model_name, self.trace, next(counter), self.clock, req.box)
            except asyncio.CancelledError:
                req.rec.error = req.rec.error or "cancelled: still in flight when the bench's wait ran out"
                raise
            finally:
                req.end = self.now()
            rec = req.rec
            if not rec.complete and rec.error is None:  # ended, but not cleanly: say how
                rec.error = (f"{len(rec.token_ids)} of {rec.max_tokens} tokens, "
                             f"{'[DONE]' if rec.done else 'no [DONE]'}")
            if rec.error is not None:
                await asyncio.sleep(_ERROR_BACKOFF_S)

    async def _poll(self) -> None:
        while True:
            status = await self._get("/membership", timeout=_POLL_TIMEOUT_S)
            if status is None:
                self.poll_failures += 1
            else:
                self._read_status(status)
            self.samples.append((self.now(), bool(self.states) and all(s == "active" for s in self.states)))
            await asyncio.sleep(_POLL_S)

    async def _refresh(self) -> None:
        """A fresh view before a decision (the poller's may be 0.1 s old)."""
        status = await self._get("/membership", timeout=_POLL_TIMEOUT_S)
        if status is not None:
            self._read_status(status)

    def _read_status(self, status: dict[str, Any]) -> None:
        ranks = status["view"]["ranks"]
        states = [r["state"] for r in ranks]
        pids = [int(p) for p in status.get("pids") or [r["incarnation"] for r in ranks]]
        self.pids_seen.update(p for p in pids if p)
        self.pids_seen.update(int(r["incarnation"]) for r in ranks if r.get("incarnation"))
        paused = status.get("paused")
        self._read_events(status.get("events") or [])
        if states != self.states or paused != self.paused or pids != self.pids:
            self.view_changes.append({"t": round(self.now(), 4), "epoch": status["view"].get("epoch"),
                                      "states": states, "pids": pids, "paused": paused})
        self.states, self.pids, self.paused = states, pids, paused

    def _read_events(self, events: list[dict[str, Any]]) -> None:
        """Keep the events not seen before (they come oldest first), and every pid they name:
        a joiner killed within a poll period shows only here."""
        last = self.events[-1]["time"] if self.events else float("-inf")
        new = []
        for e in reversed(events):
            if e.get("time", 0.0) < last:
                break
            key = (e.get("time"), e.get("kind"), e.get("rank"), e.get("epoch"), e.get("detail"))
            if key not in self._event_keys:
                self._event_keys.add(key)
                new.append({**e, "t": round(e.get("time", 0.0) - self.wall0, 4)})
        for e in reversed(new):
            self.events.append(e)
            if m := _PID_IN_DETAIL.search(str(e.get("detail", ""))):
                self.pids_seen.add(int(m.group(1)))

    async def _get(self, path: str, timeout: float = _POLL_TIMEOUT_S) -> dict[str, Any] | None:
        import httpx

        try:
            resp = await self.http.get(path, timeout=timeout)
            return resp.json() if resp.status_code == 200 else None  # type: ignore[no-any-return]
        except (httpx.HTTPError, ValueError):
            return None

    async def _health(self) -> tuple[int, str]:
        import httpx

        try:
            resp = await self.http.get("/health", timeout=_POLL_TIMEOUT_S)
            return resp.status_code, str(resp.json().get("status"))
        except (httpx.HTTPError, ValueError) as e:
            return 0, type(e).__name__

    # -- bookkeeping ------------------------------------------------------------------------
    def record(self, group: int | None, fault: str, op: str, **fields: Any) -> dict[str, Any]:
        rec = {"t": round(self.now(), 4), "group": group, "fault": fault, "op": op, **fields}
        self.actions.append(rec)
        logger.info("  t=%5.1f s  %-18s %s %s", rec["t"], fault, op,
                    " ".join(f"{k}={v}" for k, v in fields.items() if k != "detail"))
        return rec

    def healthy(self) -> list[int]:
        """Ranks that serve and will go on serving as far as the bench knows (module docstring)."""
        now = self.now()
        return [r for r, (s, pid) in enumerate(zip(self.states, self.pids))
                if s == "active" and pid and pid not in self.doomed and self.stopped.get(pid, -1.0) < now]

    def in_state(self, state: str) -> list[int]:
        return [r for r, s in enumerate(self.states) if s == state]

    def feasible(self, kind: str) -> bool:
        n = len(self.healthy())
        if kind in ("kill", "stop", "drain"):
            return n >= 2
        if kind in ("double_kill", "down_to_one"):
            return n >= 3
        if kind == "kill_paused":  # paused, or two ranks out (or on their way out) once it has killed
            return n >= 3 or (n >= 2 and (self.paused is not None or len(self.states) - n >= 2))
        if kind == "kill_during_rejoin":
            return n >= 2 and bool(self.in_state("joining") or self._rejoinable())
        raise AssertionError(kind)

    def _rejoinable(self) -> list[int]:
        return self.in_state("failed")

    def _signal(self, group: int, fault: str, rank: int, pid: int, sig: signal.Signals) -> bool:
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

    def _kill(self, group: int, fault: str, ranks: list[int]) -> None:
        """SIGKILL `ranks` back to back, then ask each back after a random delay."""
        for r in ranks:
            self._signal(group, fault, r, self.pids[r], signal.SIGKILL)
        for r in ranks:
            self._rejoin_later(r, group, self.pids[r])

    def _cont(self, pid: int, why: str) -> None:
        fd, rank, group = self.conts.pop(pid)
        try:
            signal.pidfd_send_signal(fd, signal.SIGCONT)
            result = "sent"
        except ProcessLookupError:  # the server killed it (a rejoin reaps the fenced process)
            result = "gone"
        finally:
            os.close(fd)
        # it may still be failed for having been silent: not healthy until that is settled
        self.stopped[pid] = self.now() + self.failure_timeout_s + 0.5
        self.record(group, "stop", "SIGCONT", rank=rank, pid=pid, result=result, why=why)

    def _cont_all(self, why: str) -> None:
        for pid in list(self.conts):
            self._cont(pid, why)

    # -- rejoins and drains -------------------------------------------------------------------
    def _rejoin_later(self, rank: int, group: int | None, victim_pid: int | None, delay: float | None = None) -> None:
        if rank in self.rejoins and not self.rejoins[rank].done():
            return  # one pending rejoin per rank
        if delay is None:
            delay = self.rng.uniform(*_REJOIN_DELAY_S)
        self.rejoins[rank] = asyncio.create_task(self._rejoin(rank, group, victim_pid, delay))

    async def _rejoin(self, rank: int, group: int | None, victim_pid: int | None, delay: float) -> None:
        """Ask for `rank` back after `delay`; a refusal for the state now (`_RETRY_STATUSES`:
        the rank is not failed yet, ...) is retried, until the rank is joining or back under
        another pid than `victim_pid` (then there is nothing left to ask)."""
        await asyncio.sleep(delay)
        for attempt in range(_MAX_RETRIES):
            if self.server_gone():
                return
            await self._refresh()
            state, pid = self.states[rank], self.pids[rank]
            if state == "joining" or (state == "active" and pid != victim_pid):
                return  # back, or on its way back, by another request (or a stale view asked)
            status, text = await self._admin("rejoin", rank)
            self.record(group, "rejoin", "POST rejoin", rank=rank, status=status, attempt=attempt,
                        phase="faults" if self.faulting else "settle", **({"detail": text} if status != 200 else {}))
            if status == 200 or status not in _RETRY_STATUSES:
                return
            await asyncio.sleep(self.rng.uniform(*_RETRY_S))
        self.record(group, "rejoin", "gave up", rank=rank, attempts=_MAX_RETRIES)

    async def _drain_retry(self, rank: int, pid: int, group: int) -> None:
        for attempt in range(1, _MAX_DRAIN_RETRIES + 1):
            await asyncio.sleep(self.rng.uniform(*_RETRY_S))
            if not self.faulting:
                return
            await self._refresh()
            if rank not in self.healthy() or self.pids[rank] != pid or len(self.healthy()) < 2:
                self.record(group, "drain", "dropped", rank=rank, why="no longer a rank that may be drained")
                return
            if await self._drain(rank, group, attempt) not in _RETRY_STATUSES:
                return

    async def _drain(self, rank: int, group: int, attempt: int = 0) -> int:
        pid = self.pids[rank]
        status, text = await self._admin("drain", rank)
        self.record(group, "drain", "POST drain", rank=rank, pid=pid, status=status, attempt=attempt,
                    **({"detail": text} if status != 200 else {}))
        if status == 200:
            self.doomed.add(pid)
            self._rejoin_later(rank, group, pid)
        return status

    async def _admin(self, action: str, rank: int) -> tuple[int, str]:
        import httpx

        try:
            resp = await self.http.post(f"/admin/ranks/{rank}/{action}", headers=self.auth)
            return resp.status_code, resp.text[:300]
        except httpx.HTTPError as e:
            return 0, f"{type(e).__name__}: {e}"

    def _ask_back_failed(self) -> None:
        """Every failed rank without a pending rejoin is asked back (ranks the server failed on
        its own: a joiner that died, a heartbeat starved on the shared cores)."""
        for r in self.in_state("failed"):
            self._rejoin_later(r, None, self.pids[r], None if self.faulting else 0.0)

    # -- faults ----------------------------------------------------------------------------
    async def _faults(self) -> None:
        deck: list[str] = []
        start = self.times["steady"]
        next_at = start + self.rng.uniform(*self.gap_s)
        next_report = 5.0
        while (now := self.now()) < start + self.seconds:
            if self.server_gone():
                self.record(None, "server", "exited", code=self.srv.proc.poll() if self.srv.proc else None)
                break
            for pid, due in list(self.cont_at.items()):
                if due <= now:
                    del self.cont_at[pid]
                    if pid in self.conts:
                        self._cont(pid, "after its stop")
            self._ask_back_failed()
            if now >= next_at:
                await self._refresh()
                if not deck:
                    deck = list(FAULTS)
                    self.rng.shuffle(deck)
                kind = next((k for k in deck if self.feasible(k)), None)
                if kind is None:
                    next_at = now + 0.25  # nothing possible now (rejoins pending): look again soon
                else:
                    deck.remove(kind)
                    await self._fault(kind, next(self.groups))
                    next_at = self.now() + self.rng.uniform(*self.gap_s)
            if now >= next_report:
                self._report(now)
                next_report += 5.0
            await asyncio.sleep(_TICK_S)

    def _report(self, now: float) -> None:
        # requests are appended as they start: skip those that ended before the window for good
        while (self._report_from < len(self.requests) and (end := self.requests[self._report_from].end) is not None
               and end < now - 5.0):
            self._report_from += 1
        tokens = sum(n for r in self.requests[self._report_from:] if r.box for t, n in r.rec.chunks
                     if now - 5.0 < t <= now)
        logger.info("  t=%5.1f s  %4.0f tok/s  states %s%s  %d requests done, %d actions", now, tokens / 5.0,
                    ",".join(self.states), " PAUSED" if self.paused else "",
                    sum(r.end is not None for r in self.requests), len(self.actions))

    async def _fault(self, kind: str, g: int) -> None:
        rng, healthy = self.rng, sorted(self.healthy())
        if kind == "kill":
            self._kill(g, kind, [rng.choice(healthy)])
        elif kind == "double_kill":
            self._kill(g, kind, rng.sample(healthy, 2))
        elif kind == "down_to_one":
            keep = rng.choice(healthy)
            for n, r in enumerate(r for r in healthy if r != keep):
                if n:
                    await asyncio.sleep(rng.uniform(0.0, 0.3))
                    await self._refresh()
                if r in self.healthy() and len(self.healthy()) >= 2:
                    self._kill(g, kind, [r])
        elif kind == "stop":
            r = rng.choice(healthy)
            pid = self.pids[r]
            if self._signal(g, kind, r, pid, signal.SIGSTOP):
                self.cont_at[pid] = self.now() + rng.uniform(*_STOP_S)
                self._rejoin_later(r, g, pid)  # often early: refused (400) until the server fails it
        elif kind == "drain":
            r = rng.choice(healthy)
            if await self._drain(r, g) in _RETRY_STATUSES:
                self.side_tasks.append(asyncio.create_task(self._drain_retry(r, self.pids[r], g)))
        elif kind == "kill_paused":
            await self._kill_paused(g)
        elif kind == "kill_during_rejoin":
            await self._kill_during_rejoin(g)

    async def _kill_paused(self, g: int) -> None:
        rng = self.rng
        code, health = await self._health()
        if health != "paused":
            healthy = sorted(self.healthy())
            self._kill(g, "kill_paused", rng.sample(healthy, len(healthy) - 2))  # two survivors lack slots
            deadline = time.monotonic() + _PAUSE_WAIT_S
            while time.monotonic() < deadline:
                code, health = await self._health()
                if health == "paused":
                    break
                await asyncio.sleep(0.1)
            if health != "paused":
                self.record(g, "kill_paused", "not paused", why=f"/health still {health!r} after {_PAUSE_WAIT_S} s")
                return
        await self._refresh()
        healthy = sorted(self.healthy())
        self.record(g, "kill_paused", "GET /health", status=code, health=health, healthy=healthy)
        if len(healthy) >= 2:
            self._kill(g, "kill_paused", [rng.choice(healthy)])

    async def _kill_during_rejoin(self, g: int) -> None:
        rng = self.rng
        joining = self.in_state("joining")
        if joining:
            j = rng.choice(joining)
        else:
            j = rng.choice(self._rejoinable())
            status, text = await self._admin("rejoin", j)
            self.record(g, "kill_during_rejoin", "POST rejoin", rank=j, status=status,
                        **({"detail": text} if status != 200 else {}))
            if status != 200:
                return
        await asyncio.sleep(rng.uniform(0.0, 1.0))  # well inside the load (seconds here)
        await self._refresh()
        loading = self.states[j] == "joining"
        healthy = sorted(self.healthy())
        n = 2 if len(healthy) >= 3 and rng.random() < 0.5 else 1
        if len(healthy) >= 2:
            self._kill(g, "kill_during_rejoin", rng.sample(healthy, n))
        if rng.random() < _JOINER_KILL_P and loading:
            self._kill(g, "kill_during_rejoin", [j])
        if not loading:
            self.record(g, "kill_during_rejoin", "note", rank=j, why=f"rank {j} was {self.states[j]}, not loading")

    async def _settle(self) -> None:
        """Stop faulting, resume every stopped rank, ask every failed rank back, and wait until
        every rank is active and /health answers 200 (bounded)."""
        self.faulting = False
        for t in self.side_tasks:
            t.cancel()
        self._cont_all("faults over")
        for rank, t in list(self.rejoins.items()):  # a rejoin still waiting for its delay goes now
            if not t.done():
                t.cancel()
                del self.rejoins[rank]
        deadline = time.monotonic() + self.settle_timeout_s
        while time.monotonic() < deadline and not self.server_gone():
            await self._refresh()
            self._ask_back_failed()
            if self.states and all(s == "active" for s in self.states) and (await self._health())[0] == 200:
                self.settled = True
                logger.info("  t=%5.1f s  every rank active and /health 200", self.now())
                return
            await asyncio.sleep(0.25)
        logger.error("  t=%5.1f s  not settled within %.0f s: states %s, paused %s", self.now(),
                     self.settle_timeout_s, self.states, self.paused)


async def _complete_whole(client: Any, model: str, trace: Trace, index: int, clock: float,
                          into: list[_Record]) -> _Record:
    """Request `index` of the trace as one non-streaming completion (its tokens are one chunk
    at its end); a failure, or an end other than `length`, is the record's error."""
    import httpx

    prompt, max_tokens = trace.request(index)
    rec = _Record(index, time.monotonic() - clock, max_tokens)
    into.append(rec)
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": False,
            "ignore_eos": True, "return_token_ids": True}
    try:
        resp = await client.post("/v1/completions", json=body)
        if resp.status_code != 200:
            rec.error = f"HTTP {resp.status_code}: {resp.text[:200]}"
            return rec
        choice = resp.json()["choices"][0]
        ids = list(choice.get("token_ids") or [])
        if ids:
            rec.chunks.append((time.monotonic() - clock, len(ids)))
            rec.token_ids = ids
        rec.done = choice.get("finish_reason") == "length"
        if not rec.done:
            rec.error = f"finish_reason {choice.get('finish_reason')!r}"
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as e:
        rec.error = f"{type(e).__name__}: {e}"
    return rec


async def _serve_reference(fixed: _Server, trace: Trace, indices: list[int],
                           concurrency: int) -> tuple[dict[int, list[int]], set[int]]:
    import httpx

    async with httpx.AsyncClient(base_url=fixed.url, timeout=httpx.Timeout(30.0)) as http:
        status = (await http.get("/membership")).json()
    pids = {int(p) for p in status.get("pids") or [] if p}
    return (await _reference(fixed, trace, indices, concurrency) if indices else {}), pids


# -- stopping and what is left ------------------------------------------------------------------
def _shutdown(srv: _Server, timeout_s: float = 60.0) -> int | None:
    """SIGTERM the server and wait (bounded) for its exit code; `_Server`'s exit then only
    sweeps (its process group) and removes its temp dir."""
    proc = srv.proc
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            logger.error("eep serve did not stop within %.0f s of SIGTERM", timeout_s)
            return None
    return proc.returncode


def _read_log(srv: _Server) -> str:
    try:
        return srv.log_path.read_text(errors="replace")
    except OSError:
        return ""


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


# -- figures -------------------------------------------------------------------------------------
def eligible(samples: list[tuple[float, bool]], pending: list[tuple[float, float]],
             end: float) -> list[tuple[float, float]]:
    """The stretches during which some interval of `pending` is open and the latest sample (a
    poll: time, every rank active) says True; a sample holds until the next (the last until `end`)."""
    active: list[tuple[float, float]] = []
    for (t, ok), nxt in zip(samples, [s[0] for s in samples[1:]] + [end]):
        if ok and nxt > t:
            if active and active[-1][1] >= t:
                active[-1] = (active[-1][0], nxt)
            else:
                active.append((t, nxt))
    return _intersect(active, _union(pending))


_ACTIVE_IN_DETAIL = re.compile(r"active \[([0-9, ]*)\]$")


def view_timeline(samples: list[tuple[float, bool]], events: list[dict[str, Any]],
                  num_ranks: int) -> list[tuple[float, bool]]:
    """(time, every rank active) at each view the server committed, from its own
    `view_committed` events (exact times; a poll sees a change up to a poll period late), after
    the first poll's state; the polled `samples` themselves if the events name no view."""
    views = []
    for e in events:
        m = _ACTIVE_IN_DETAIL.search(str(e.get("detail", ""))) if e.get("kind") == "view_committed" else None
        if m is not None:
            views.append((float(e["t"]), len([x for x in m.group(1).split(",") if x.strip()]) == num_ranks))
    if not views or not samples:
        return samples
    first = samples[0]
    return [first, *sorted(v for v in views if v[0] > first[0])]


def stuck_stretch(samples: list[tuple[float, bool]], pending: list[tuple[float, float]], arrivals: list[float],
                  end: float) -> tuple[float, float, float]:
    """(length, start, stop) of the longest stretch within `eligible(samples, pending, end)` in
    which no time of `arrivals` falls."""
    arrivals = sorted(arrivals)
    best = (0.0, 0.0, 0.0)
    for a, b in eligible(samples, pending, end):
        inside = arrivals[bisect.bisect_right(arrivals, a):bisect.bisect_left(arrivals, b)]
        points = [a, *inside, b]
        for x, y in zip(points, points[1:]):
            if y - x > best[0]:
                best = (y - x, x, y)
    return best


def normal_gap(arrivals: list[float], stretches: list[tuple[float, float]], window: float = 1.0) -> float | None:
    """The median, over the `window`-second windows that fit in `stretches`, of each one's
    longest stretch without an arrival (the step cadence as the clients see it); None if no
    window fits."""
    gaps = [gap_within(arrivals, a + k * window, a + (k + 1) * window)
            for a, b in stretches for k in range(int((b - a) / window))]
    return statistics.median(gaps) if gaps else None


def gap_within(arrivals: list[float], start: float, stop: float) -> float:
    """The longest stretch in [start, stop] without a time of `arrivals` (sorted) inside."""
    if stop <= start:
        return 0.0
    inside = arrivals[bisect.bisect_right(arrivals, start):bisect.bisect_left(arrivals, stop)]
    points = [start, *inside, stop]
    return max(y - x for x, y in zip(points, points[1:]))


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(i for i in intervals if i[1] > i[0]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _intersect(xs: list[tuple[float, float]], ys: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out, i, j = [], 0, 0
    while i < len(xs) and j < len(ys):
        a, b = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        if a < b:
            out.append((a, b))
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return out


def _result(chaos: _Chaos, reference: dict[int, list[int]], reference_error: str | None,
            left: dict[str, list[Any]], ref_left: dict[str, list[Any]], config: dict[str, Any]) -> dict[str, Any]:
    reqs = [r for r in chaos.requests if r.box]
    load_stop = chaos.times.get("load_stop", chaos.now())
    load_end = chaos.times.get("load_end", max((r.end or 0.0 for r in reqs), default=load_stop))
    arrivals = sorted(t for r in reqs for t, _ in r.rec.chunks)
    pending = [(r.rec.start, r.end if r.end is not None else load_end) for r in reqs if r.stream]
    # from the point every client was served on (the ramp's prefills commit no token for steps)
    steady = chaos.times.get("steady", 0.0)
    pending = [(max(a, steady), b) for a, b in pending]
    views = view_timeline(chaos.samples, chaos.events, config["ep_size"])
    stuck, stuck_from, stuck_to = stuck_stretch(views, pending, arrivals, load_end)
    normal = normal_gap(arrivals, eligible(views, pending, load_end))
    bound = None if normal is None else chaos.failure_timeout_s + normal
    actions = sorted(chaos.actions, key=lambda a: a["t"])
    for a, nxt in zip(actions, [a["t"] for a in actions[1:]] + [load_stop]):
        a["pause_s"] = round(gap_within(arrivals, a["t"], max(nxt, a["t"])), 4)
    completed = [r for r in reqs if r.complete]
    lost = [r for r in reqs if not r.complete]
    differing = ([r for r in completed if reference.get(r.rec.index) != r.rec.token_ids]
                 if reference_error is None else [])
    series = [0] * (int(load_end) + 1)  # tokens that arrived in each second of the load
    for r in reqs:
        for t, n in r.rec.chunks:
            series[min(int(t), len(series) - 1)] += n
    kinds: dict[str, int] = {}
    for a in actions:
        kinds[a["fault"]] = kinds.get(a["fault"], 0) + 1
    summary = {
        "requests_started": len(reqs),
        "requests_completed": len(completed),
        "requests_lost": len(lost),
        "outputs_differing": len(differing) if reference_error is None else None,
        "stuck_s": round(stuck, 4),
        "normal_gap_s": None if normal is None else round(normal, 4),
        "stuck_bound_s": None if bound is None else round(bound, 4),
        "stuck_within_bound": None if bound is None else stuck < bound,
        "max_pause_s": max((a["pause_s"] for a in actions), default=0.0),
        "actions": len(actions),
        "healthy_at_end": chaos.healthy_at_end,
        "processes_left": len(left["processes"]) + len(ref_left["processes"]),
        "shm_left": len(left["shm"]) + len(ref_left["shm"]),
        "tokens": sum(len(r.rec.token_ids) for r in reqs),
        "actions_by_fault": kinds,
        "settled": chaos.settled,
        "seed": config["seed"],
    }
    failed = bool(summary["requests_lost"] or summary["outputs_differing"] or reference_error
                  or stuck >= chaos.failure_timeout_s + 1.0 or not chaos.healthy_at_end or not chaos.settled
                  or summary["processes_left"] or summary["shm_left"] or chaos.server_exit_code not in (0, None))

    def brief(r: _Request) -> dict[str, Any]:
        ref = reference.get(r.rec.index)
        first = next((k for k, (a, b) in enumerate(zip(r.rec.token_ids, ref or [])) if a != b), None)
        return {"index": r.rec.index, "stream": r.stream, "start": round(r.rec.start, 4),
                "end": None if r.end is None else round(r.end, 4), "tokens": len(r.rec.token_ids),
                "max_tokens": r.rec.max_tokens, "error": r.rec.error, "first_difference_at": first}

    return {
        "summary": summary,
        "failed": failed,
        "stuck": {"s": round(stuck, 4), "from": round(stuck_from, 4), "to": round(stuck_to, 4)},
        "actions": actions,
        "lost": [brief(r) for r in lost[:50]],
        "differing": [brief(r) for r in differing[:50]],
        "reference_error": reference_error,
        "times": {k: round(v, 4) for k, v in chaos.times.items()},
        "server_exit_code": chaos.server_exit_code,
        "poll_failures": chaos.poll_failures,
        "tokens_per_second": series,
        "requests_fields": ["index", "stream", "start", "first_token", "end", "tokens", "complete"],
        "requests": [[r.rec.index, r.stream, round(r.rec.start, 3),
                      round(r.rec.chunks[0][0], 3) if r.rec.chunks else None,
                      None if r.end is None else round(r.end, 3), len(r.rec.token_ids), r.complete] for r in reqs],
        "view_changes": chaos.view_changes,
        "events": chaos.events,
        "leftovers": {"chaos": left, "reference": ref_left},
        "config": config,
        "server_log": None,
        **_provenance(),
    }


def summary_line(result: dict[str, Any]) -> str:
    """What `eep bench chaos` prints: the summary, one JSON object."""
    return json.dumps(result["summary"])
