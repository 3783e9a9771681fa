"""The chaos soak's load: `concurrency` closed-loop clients, three in four streaming.

Client k streams its requests (`stream: true`) unless k % 4 == 3, which asks for each whole
completion at once (`eep.bench.harness.complete_whole`); the trace is the failure
experiment's (`eep.bench.harness.Trace`). Client k starts k * 2 s / concurrency into the load,
and `await_steady` waits (bounded) until every streaming client has had a token: before that,
every request is in its prefill and no token arrives for several steps (3 s with 16 clients
started together on a busy 2-core host), which `stuck_s` would read as a stalled instance. No
request has a timeout of its own: each is awaited until the soak's last, bounded wait.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from eep.bench.chaos_watch import ServerWatch
from eep.bench.harness import (
    RequestRecord,
    Trace,
    complete,
    complete_whole,
    http_client,
)

logger = logging.getLogger(__name__)

STREAM_EVERY = 4  # client k asks for whole completions when k % 4 == 3, streams otherwise
RAMP_S = 2.0
STEADY_TIMEOUT_S = 60.0
_TICK_S = 0.05
_ERROR_BACKOFF_S = 0.2  # a client whose request failed waits this long: never spin on a refusing server


@dataclass(slots=True)
class ChaosRequest:
    """One request as its client saw it (`box` holds the harness's record, filled as soon as
    the request starts, so a cancelled request keeps what it got)."""

    stream: bool
    box: list[RequestRecord] = field(default_factory=list)
    end: float | None = None

    @property
    def rec(self) -> RequestRecord:
        return self.box[0]

    @property
    def complete(self) -> bool:
        return self.end is not None and self.rec.complete


class ChaosLoad:
    """The clients of one soak, on the watch's clock."""

    def __init__(self, watch: ServerWatch, trace: Trace, *, concurrency: int, timeout_s: float) -> None:
        self.watch, self.trace, self.concurrency, self.timeout_s = watch, trace, concurrency, timeout_s
        self.requests: list[ChaosRequest] = []
        self.stopping = False
        self._report_from = 0

    def client(self) -> Any:
        """The clients' HTTP client. No request may end by a timeout of its own before the
        soak's last wait for it (`timeout_s`, the longest a soak can run): a request can take
        minutes here, moved and prefilled again at every fault and waiting out every pause
        (the harness's default 300 s read timeout cut off a whole completion in a 300 s soak)."""
        return http_client(self.watch.srv, self.concurrency, timeout_s=self.timeout_s, connect_timeout_s=30.0)

    def start(self, client: Any) -> list[asyncio.Task[None]]:
        counter = itertools.count()
        return [asyncio.create_task(self._worker(client, k, counter)) for k in range(self.concurrency)]

    async def _worker(self, client: Any, k: int, counter: itertools.count[int]) -> None:
        stream = k % STREAM_EVERY != STREAM_EVERY - 1
        await asyncio.sleep(k * RAMP_S / self.concurrency)
        while not self.stopping:
            req = ChaosRequest(stream)
            self.requests.append(req)
            run = complete if stream else complete_whole
            try:
                # the record is in req.box before the first await: a cancelled request keeps it
                await run(client, self.watch.srv.model_name, self.trace, next(counter), self.watch.clock, req.box)
            except asyncio.CancelledError:
                req.rec.error = req.rec.error or "cancelled: still in flight when the bench's wait ran out"
                raise
            finally:
                req.end = self.watch.now()
            rec = req.rec
            if not rec.complete and rec.error is None:  # ended, but not cleanly: say how
                rec.error = (f"{len(rec.token_ids)} of {rec.max_tokens} tokens, "
                             f"{'[DONE]' if rec.done else 'no [DONE]'}")
            if rec.error is not None:
                await asyncio.sleep(_ERROR_BACKOFF_S)

    async def await_steady(self) -> None:
        """Wait (bounded) until every streaming client has had a token: the soak's figures and
        faults start from there, not from the ramp, whose prefills commit no token for steps."""
        streaming = sum(k % STREAM_EVERY != STREAM_EVERY - 1 for k in range(self.concurrency))
        deadline = time.monotonic() + STEADY_TIMEOUT_S
        while time.monotonic() < deadline and not self.watch.server_gone():
            streams = [r for r in self.requests if r.stream and r.box]
            if len(streams) >= streaming and all(r.rec.chunks or r.end is not None for r in streams):
                return
            await asyncio.sleep(_TICK_S)
        logger.error("  the clients did not all get a token within %.0f s", STEADY_TIMEOUT_S)

    def in_flight(self) -> int:
        return sum(r.end is None for r in self.requests)

    def done(self) -> int:
        return sum(r.end is not None for r in self.requests)

    def tokens_per_s(self, now: float, span_s: float = 5.0) -> float:
        """Tokens that arrived in the last `span_s`, per second."""
        # requests are appended as they start: skip those that ended before the window for good
        while (self._report_from < len(self.requests) and (end := self.requests[self._report_from].end) is not None
               and end < now - span_s):
            self._report_from += 1
        tokens = sum(n for r in self.requests[self._report_from:] if r.box for t, n in r.rec.chunks
                     if now - span_s < t <= now)
        return tokens / span_s
