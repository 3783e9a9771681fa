"""`RequestJournal`: the HTTP requests a head admitted, by request id, with each one's durable
state, so that a client can get its request back instead of running it again.

A request's durable state is what is needed to go on with it anywhere: per choice the prompt's
token ids, the sampling parameters with the seed fixed at admission, the tokens committed so far
and the text they decoded to, as the events the stream sent (`StreamEvent`). With it:

- a stream that broke is resumed: the client sends the same request again with the standard
  `Last-Event-ID` header (every event carries `id: <request id>:<token index>`, the stream's
  tokens through that event) and gets the events after it, then the rest live;
- a non-streaming request retried with the same `X-Request-Id` (or `Idempotency-Key`) gets the
  finished completion, or waits for the one still running, instead of a second run;
- a request whose client went away was aborted (its KV slot freed at once); a reconnect admits
  it again from its committed tokens (a prefill of prompt + output, then decoding on from the
  same token index with the same seed: the same tokens as an uninterrupted run).

The same body is required for the same id (409 otherwise). Requests that stopped running here
(finished, failed, or interrupted and not resumed) are kept for `retention_s` after, and at most
`max_finished` of them (the oldest go first); running ones always. Events are appended on the engine loop's thread and read by the HTTP event
loop: appends are single list operations, and readers are woken through their event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

from eep.engine.loop import EngineLoop, TokenEvent
from eep.engine.request import RequestOutput
from eep.engine.sampling import SamplingParams

logger = logging.getLogger(__name__)

RETENTION_S = 600.0
MAX_FINISHED = 4096


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """What one step committed of one choice, as the stream sends it."""

    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None
    end: int  # the choice's tokens through this event


@dataclass(slots=True)
class Choice:
    """One prompt of a request: its durable state and, while it runs here, its engine future."""

    prompt_ids: list[int]
    params: SamplingParams  # the seed fixed at admission
    events: list[StreamEvent] = field(default_factory=list)
    output: RequestOutput | None = None  # once finished
    error: BaseException | None = None
    future: Future[RequestOutput] | None = None
    submission: int = 0  # how often it was submitted here: what an older submission still reports is dropped
    remote_running: bool = True  # a standby's copy: whether the head was running it, as its feed said

    @property
    def output_ids(self) -> list[int]:
        return [t for ev in self.events for t in ev.token_ids]

    @property
    def text(self) -> str:
        return "".join(ev.text for ev in self.events)

    @property
    def finished(self) -> bool:
        return self.output is not None

    @property
    def running(self) -> bool:
        """Submitted here and not ended (set by the future's callback only: no window in which
        the future is done but its outcome not yet recorded)."""
        return self.future is not None and self.output is None and self.error is None


class Entry:
    """One request: `kind` ("completion" or "chat"), its body's digest, its choices."""

    def __init__(self, rid: str, kind: str, digest: str, created: int, choices: list[Choice]) -> None:
        self.rid, self.kind, self.digest, self.created, self.choices = rid, kind, digest, created, choices
        self.ended_at: float | None = None  # when it last stopped running here (finished, failed, interrupted)
        self.clients = 0  # responses following it (the HTTP event loop only); the last one gone aborts it
        self.journal: RequestJournal | None = None  # set when added: its listener hears of every change
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self._lock = threading.Lock()

    @property
    def finished(self) -> bool:
        return all(c.finished for c in self.choices)

    @property
    def error(self) -> BaseException | None:
        return next((c.error for c in self.choices if c.error is not None), None)

    @property
    def interrupted(self) -> bool:
        """Not finished and not running here (its client went away, or it came from another head)."""
        return not self.finished and self.error is None and not any(c.running for c in self.choices)

    def submit(self, loop: EngineLoop, *, resume: bool) -> None:
        """Submit every choice that is neither finished nor running here; with `resume`, from its
        committed tokens (a client that came back, a head that took over)."""
        for i, c in enumerate(self.choices):
            if c.finished or c.running:
                continue
            done = (c.output_ids, c.text) if resume and c.events else None
            c.submission += 1
            self.ended_at = None
            if resume:
                self.told(i, "running")
            c.future = loop.submit(c.prompt_ids, c.params, on_tokens=self.on_tokens(i), resume=done)
            c.future.add_done_callback(self.on_done(i))
        if resume:
            logger.info("%s: admitted again from %d committed tokens", self.rid,
                        sum(len(c.output_ids) for c in self.choices))

    # -- the engine loop's thread ------------------------------------------------------------
    def on_tokens(self, i: int) -> Callable[[TokenEvent], None]:
        """The streaming callback of choice `i`'s current submission. A submission cancelled in
        the middle of a step still reports that step's tokens: kept, unless the choice was
        submitted again meanwhile (from the tokens before: the new one commits them itself)."""
        submission = self.choices[i].submission

        def record(ev: TokenEvent) -> None:
            choice = self.choices[i]
            if choice.submission != submission:
                return
            with self._changing() as listener:
                end = (choice.events[-1].end if choice.events else 0) + len(ev.token_ids)
                event = StreamEvent(ev.token_ids, ev.text, ev.finish_reason, end)
                choice.events.append(event)
                if ev.finish_reason is not None:  # finished, whatever becomes of the future (a cancel that came late)
                    self._finish(choice, RequestOutput("", choice.prompt_ids, choice.output_ids, ev.finish_reason,
                                                       choice.text))
                if listener is not None:
                    listener.tokens(self, i, event)
            self._wake()
        return record

    def _changing(self) -> contextlib.AbstractContextManager[JournalListener | None]:
        """Held while this entry changes and its change is told: the journal's lock, so that a
        standby's snapshot falls between two changes, never inside one."""
        journal = self.journal
        if journal is None:
            return contextlib.nullcontext(None)
        return _Held(journal.changes, journal.listener)

    def told(self, i: int, state: str, detail: str = "") -> None:
        """Tell the listener that choice `i` runs again, or stopped running unfinished."""
        with self._changing() as listener:
            if listener is not None:
                listener.state(self, i, state, detail)

    def on_done(self, i: int) -> Callable[[Future[RequestOutput]], None]:
        submission = self.choices[i].submission

        def done(f: Future[RequestOutput]) -> None:
            choice = self.choices[i]
            if choice.submission != submission:
                return
            if f.cancelled():  # its client went away: it can be admitted again from its events
                choice.future = None
                if not choice.finished:
                    self.told(i, "interrupted")
            elif (error := f.exception()) is not None:
                choice.error = error
                self.told(i, "failed", str(error))
            else:
                choice.output = f.result()
            self._ended()
            self._wake()
        return done

    def _finish(self, choice: Choice, output: RequestOutput) -> None:
        choice.output = output
        self._ended()

    def _ended(self) -> None:
        if not any(c.running for c in self.choices):
            self.ended_at = time.monotonic()

    def _wake(self) -> None:
        with self._lock:
            waiters = list(self._waiters)
        for aio, event in waiters:
            try:
                aio.call_soon_threadsafe(event.set)
            except RuntimeError:  # that event loop closed: nobody waits there any more
                pass

    # -- the HTTP event loop -------------------------------------------------------------------
    async def follow(self, i: int) -> AsyncIterator[StreamEvent]:
        """Choice `i`'s events, those committed already and then the others as they are,
        until it finished; raises its error; returns early if it stops running unfinished."""
        event = asyncio.Event()
        waiter = (asyncio.get_running_loop(), event)
        with self._lock:
            self._waiters.add(waiter)
        try:
            sent = 0
            choice = self.choices[i]
            while True:
                event.clear()
                while sent < len(choice.events):
                    yield choice.events[sent]
                    sent += 1
                if choice.error is not None:
                    raise choice.error
                if choice.finished or not choice.running:
                    if sent == len(choice.events):
                        return
                    continue
                await event.wait()
        finally:
            with self._lock:
                self._waiters.discard(waiter)

    async def wait(self) -> None:
        """Until every choice finished, failed or stopped running."""
        for i in range(len(self.choices)):
            async for _ in self.follow(i):
                pass


def digest(body: dict[str, Any]) -> str:
    """A request body's identity: the same request sent again has the same digest."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def parse_event_id(value: str) -> tuple[str, int] | None:
    """`<request id>:<token index>` (a request id may itself hold colons), or None."""
    rid, sep, index = value.strip().rpartition(":")
    if not sep or not rid or not index.isdigit() or len(index) > 9:
        return None
    return rid, int(index)


class JournalListener(Protocol):
    """Told of every change, with the journal's `changes` lock held (it must only queue)."""

    def admitted(self, entry: Entry) -> None: ...

    def tokens(self, entry: Entry, i: int, ev: StreamEvent) -> None: ...

    def state(self, entry: Entry, i: int, state: str, detail: str = "") -> None: ...


class _Held:
    def __init__(self, lock: threading.Lock, listener: JournalListener | None) -> None:
        self.lock, self.listener = lock, listener

    def __enter__(self) -> JournalListener | None:
        self.lock.acquire()
        return self.listener

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


class RequestJournal:
    """The table of requests by id (thread-safe). `listener` (a head's replication feed) is told
    of every change."""

    def __init__(self, retention_s: float = RETENTION_S, max_finished: int = MAX_FINISHED) -> None:
        self.retention_s, self.max_finished = retention_s, max_finished
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.changes = threading.Lock()  # held while an entry changes and the listener is told
        self.listener: JournalListener | None = None

    def entries(self) -> list[Entry]:
        with self._lock:
            return list(self._entries.values())

    def put(self, entry: Entry) -> None:
        """`entry` under its id, replacing what was there (a standby's copy of the head's)."""
        with self._lock:
            self._expire()
            self._entries.pop(entry.rid, None)
            self._entries[entry.rid] = entry
            entry.journal = self

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def get(self, rid: str) -> Entry | None:
        with self._lock:
            self._expire()
            return self._entries.get(rid)

    def add(self, entry: Entry) -> Entry:
        """`entry`, or the one already there under its id (the same request sent twice at once)."""
        with self.changes, self._lock:
            self._expire()
            found = self._entries.setdefault(entry.rid, entry)
            if found is entry:
                entry.journal = self
                if self.listener is not None:
                    self.listener.admitted(entry)
            return found

    def remove(self, entry: Entry) -> None:
        with self._lock:
            if self._entries.get(entry.rid) is entry:
                del self._entries[entry.rid]

    def _expire(self) -> None:
        now = time.monotonic()
        ended = [e for e in self._entries.values()
                 if e.ended_at is not None and not any(c.running for c in e.choices)]
        over = len(ended) - self.max_finished
        for e in ended:  # in admission order: the oldest first
            if over > 0 or now - (e.ended_at or 0.0) > self.retention_s:
                del self._entries[e.rid]
                over -= 1
