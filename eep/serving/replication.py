"""The journal of requests replicated from the head to its standby heads.

- `JournalFeed` (the head): a standby head that connected through the controller's door
  (authenticated as every connection between hosts is, introduced by `StandbyHello`) gets a
  snapshot of the head's journal, then every change as it happens (`JournalAdmit`,
  `JournalTokens`, `JournalState`), from a sender thread of its own. The engine loop only
  queues: a slow or cut-off standby never delays a step. Its queue is bounded
  (`max_queued` messages): one that falls that far behind is dropped and starts again from a
  snapshot when it reconnects. An `Announce` every `ping_s` tells an idle standby the head is
  alive.
- `JournalReplica` (the standby): applies what the feed sends to a journal of its own, so
  that after a takeover the requests the head was running can be admitted again from their
  committed tokens and every client's `Last-Event-ID` / `X-Request-Id` finds its request.
- `StandbyLink` (the standby): the connection to the head, made again (with a new snapshot)
  whenever it breaks.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from eep.engine.request import RequestOutput
from eep.errors import EngineUnavailable
from eep.runtime import wire
from eep.security.channel import Channel, client_handshake
from eep.security.secret import ClusterSecret
from eep.serving.journal import Choice, Entry, RequestJournal, StreamEvent

logger = logging.getLogger(__name__)

MAX_QUEUED = 100_000
PING_S = 0.5


def admit_message(epoch: int, entry: Entry) -> wire.JournalAdmit:
    return wire.JournalAdmit(epoch, entry.rid, entry.kind, entry.digest, entry.created,
                             tuple(wire.JournalChoice(tuple(c.prompt_ids), c.params) for c in entry.choices))


class _Standby:
    """One connected standby: its queue and its sender thread."""

    def __init__(self, feed: JournalFeed, conn: Channel, hello: wire.StandbyHello, first: list[Any]) -> None:
        self.feed, self.conn, self.hello = feed, conn, hello
        self.queue: deque[Any] = deque(first)
        self.cond = threading.Condition()
        self.sent = 0
        self.since = time.time()
        self.closed = False
        self.thread = threading.Thread(target=self._run, name=f"eep-standby-{hello.node}", daemon=True)

    def put(self, message: Any) -> bool:
        with self.cond:
            if self.closed or len(self.queue) >= self.feed.max_queued:
                return False
            self.queue.append(message)
            self.cond.notify()
            return True

    def _run(self) -> None:
        try:
            while True:
                with self.cond:
                    if not self.queue and not self.closed:
                        self.cond.wait(self.feed.ping_s)
                    if self.closed:
                        return
                    batch = list(self.queue) or [wire.Announce(self.feed.epoch())]
                    self.queue.clear()
                for message in batch:
                    wire.send(self.conn, message)
                    self.sent += 1
        except OSError as e:
            logger.warning("standby node %d (pid %d): replication stopped: %s", self.hello.node, self.hello.pid,
                           e or "closed")
        finally:
            self.close()
            self.feed._gone(self)

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.conn.close()


class JournalFeed:
    """The head's side; the journal's listener (`RequestJournal.listener`)."""

    def __init__(self, journal: RequestJournal, epoch: Callable[[], int], *, max_queued: int = MAX_QUEUED,
                 ping_s: float = PING_S) -> None:
        self.journal, self.epoch, self.max_queued, self.ping_s = journal, epoch, max_queued, ping_s
        self._standbys: list[_Standby] = []
        self._lock = threading.Lock()
        self.closed = False
        self.dropped = 0  # standbys dropped for falling behind
        self.last_attached = 0.0  # monotonic: the last moment a standby was connected
        journal.listener = self

    # -- the controller's door (a thread of the HostListener) ------------------------------------
    def subscribe(self, conn: Channel, hello: wire.StandbyHello) -> None:
        """A standby connected: the journal as it is now, then every change."""
        if self.closed:
            conn.close()
            return
        with self.journal.changes:  # no change between the snapshot and the subscription
            epoch = self.epoch()
            first: list[Any] = []
            for entry in self.journal.entries():
                first.append(admit_message(epoch, entry))
                for i, c in enumerate(entry.choices):
                    first += [wire.JournalTokens(epoch, entry.rid, i, ev.token_ids, ev.text, ev.finish_reason)
                              for ev in c.events]
                    if not c.finished and not c.running:
                        first.append(wire.JournalState(epoch, entry.rid, i, "failed" if c.error else "interrupted",
                                                       str(c.error or "")))
            standby = _Standby(self, conn, hello, first)
            with self._lock:
                self._standbys.append(standby)
                self.last_attached = time.monotonic()
        standby.thread.start()
        logger.info("standby node %d (pid %d) follows the journal (%d messages of snapshot)", hello.node, hello.pid,
                    len(first))

    def _gone(self, standby: _Standby) -> None:
        with self._lock:
            if standby in self._standbys:
                self._standbys.remove(standby)
                self.last_attached = time.monotonic()

    # -- the journal's listener (called with journal.changes held) -------------------------------
    def admitted(self, entry: Entry) -> None:
        self._publish(admit_message(self.epoch(), entry))

    def tokens(self, entry: Entry, i: int, ev: StreamEvent) -> None:
        self._publish(wire.JournalTokens(self.epoch(), entry.rid, i, ev.token_ids, ev.text, ev.finish_reason))

    def state(self, entry: Entry, i: int, state: str, detail: str = "") -> None:
        self._publish(wire.JournalState(self.epoch(), entry.rid, i, state, detail))

    def _publish(self, message: Any) -> None:
        with self._lock:
            standbys = list(self._standbys)
        for standby in standbys:
            if not standby.put(message):
                logger.warning("standby node %d fell %d messages behind: dropped (it starts again from a snapshot)",
                               standby.hello.node, self.max_queued)
                self.dropped += 1
                standby.close()

    # -- status --------------------------------------------------------------------------------
    def attached(self) -> bool:
        """A standby follows the journal now."""
        with self._lock:
            return bool(self._standbys)

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"standbys": [{"node": s.hello.node, "pid": s.hello.pid, "since": s.since, "sent": s.sent,
                                  "queued": len(s.queue)} for s in self._standbys],
                    "dropped": self.dropped}

    def close(self) -> None:
        """Replicate no more (the server stops, or this head was deposed: what fails on it then
        is no news for the standby, which goes on with those requests)."""
        with self.journal.changes:
            self.closed = True
            self.journal.listener = None
        with self._lock:
            standbys, self._standbys = list(self._standbys), []
        for s in standbys:
            s.close()


class JournalReplica:
    """The standby's journal, as the head's feed describes it. `running` are the requests the head
    was running (not finished, failed or interrupted there): a new head admits them again."""

    def __init__(self, journal: RequestJournal) -> None:
        self.journal = journal
        self.applied = 0
        self.epoch = 0  # the head's view epoch, as its last message said

    def reset(self) -> None:
        """Before a new snapshot."""
        self.journal.clear()

    def apply(self, message: Any) -> None:
        self.applied += 1
        self.epoch = max(self.epoch, message.epoch)
        if isinstance(message, wire.Announce):
            return
        if isinstance(message, wire.JournalAdmit):
            choices = [Choice(list(c.prompt_ids), c.params) for c in message.choices]
            self.journal.put(Entry(message.rid, message.kind, message.digest, message.created, choices))
            return
        entry = self.journal.get(message.rid)
        if entry is None or not 0 <= message.choice < len(entry.choices):
            logger.warning("journal: %s for a request the snapshot did not have (%s)", type(message).__name__,
                           message.rid)
            return
        choice = entry.choices[message.choice]
        if isinstance(message, wire.JournalTokens):
            end = (choice.events[-1].end if choice.events else 0) + len(message.token_ids)
            choice.events.append(StreamEvent(message.token_ids, message.text, message.finish_reason, end))
            if message.finish_reason is not None:
                choice.output = RequestOutput("", choice.prompt_ids, choice.output_ids, message.finish_reason,
                                              choice.text)
                entry.ended_at = time.monotonic()
        elif message.state == "failed":
            choice.error = EngineUnavailable(message.detail or "failed on the head")
            entry.ended_at = time.monotonic()
        elif message.state == "interrupted":
            choice.remote_running = False
            entry.ended_at = time.monotonic()
        elif message.state == "running":
            choice.remote_running = True
            entry.ended_at = None

    def running(self) -> list[Entry]:
        """The requests that were running on the head."""
        return [e for e in self.journal.entries()
                if e.error is None and any(not c.finished and c.remote_running for c in e.choices)]


class StandbyLink:
    """The standby's connection to the head at `head` (its `--dist-init-addr`), on a thread of its
    own: StandbyHello, then the journal into `replica`; made again after `retry_s` whenever it
    breaks (a new snapshot each time), until `close`."""

    def __init__(self, head: str, node: int, secret: ClusterSecret, replica: JournalReplica, *,
                 retry_s: float = 0.5, silent_s: float = 2.0) -> None:
        self.head, self.node, self.secret, self.replica = head, node, secret, replica
        self.retry_s, self.silent_s = retry_s, silent_s
        self.connected = threading.Event()
        self.connections = 0
        self.address: str | None = None  # this host's address as the head saw it (where a new head listens)
        self.last_heard = 0.0  # monotonic
        self._stop = threading.Event()
        self._conn: Channel | None = None
        self._thread = threading.Thread(target=self._run, name="eep-standby-link", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._follow()
            except OSError as e:
                if self.connected.is_set():
                    logger.warning("standby: the head's journal at %s stopped: %s", self.head, e or "closed")
            finally:
                self.connected.clear()
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None
            self._stop.wait(self.retry_s)

    def _follow(self) -> None:
        sock = wire.connect(self.head, timeout_s=2.0)
        self.address = sock.getsockname()[0]
        try:
            conn = client_handshake(wire.tune(sock), self.secret.key("control handshake"), peer=self.head)
        except OSError:
            sock.close()
            raise
        self._conn = conn
        wire.send(conn, wire.StandbyHello(0, self.node, os.getpid()))
        self.replica.reset()
        self.connections += 1
        self.connected.set()
        logger.info("standby: following the head's journal at %s", self.head)
        while not self._stop.is_set():
            if not conn.poll(self.silent_s):
                raise OSError(f"nothing from the head for {self.silent_s:g} s")
            try:
                message = wire.recv(conn, wire.TO_STANDBY)
            except EOFError:
                raise OSError("the head closed the connection") from None
            self.last_heard = time.monotonic()
            self.replica.apply(message)

    def close(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        conn = self._conn
        if conn is not None:
            conn.close()
        self._thread.join(timeout_s)
