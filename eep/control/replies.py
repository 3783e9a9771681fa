"""The controller's one reply loop: the answers of a set of ranks to what it sent them.

`ReplyCollector.collect` reads, for each rank, its answer of the expected kinds. A rank fails
when it exits, closes its pipe, answers out of turn, is named by a peer as silent on the data
plane (`PeerSilent`), goes silent on its heartbeat, or gives no answer by the deadline; the
answer's sender says so with `StepAbandoned` (the step is broken without a failure) or
`Refused` (the request was wrong). A reply of an older epoch than the request it should answer
is a leftover of an earlier one: dropped (and counted), never taken for the answer."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from eep.control.detector import FailureDetector
from eep.control.pool import RankPool
from eep.errors import ConfigError, RankFailed
from eep.runtime import wire

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Answers:
    """What `collect` found."""

    replies: dict[int, object] = field(default_factory=dict)  # rank -> its answer of a wanted kind
    failed: dict[int, str] = field(default_factory=dict)  # rank -> why it failed (silent peers included)
    abandoned: dict[int, str] = field(default_factory=dict)  # rank -> why it abandoned the step
    refused: dict[int, str] = field(default_factory=dict)  # rank -> why it refused the request
    pending: set[int] = field(default_factory=set)  # not answered when a stop_early collect returned
    stale: int = 0  # replies to older requests, dropped

    def raise_first(self, what: str) -> None:
        """Outside a step: the first failure as RankFailed, else a refusal as ConfigError."""
        if self.failed:
            rank = min(self.failed)
            raise RankFailed(rank, self.failed[rank])
        if self.refused:
            raise ConfigError("; ".join(f"rank {r} refused the request for {what}: {why}"
                                        for r, why in sorted(self.refused.items())))


class ReplyCollector:
    def __init__(self, pool: RankPool, detector: FailureDetector, seen: Callable[[int, str], None]) -> None:
        """`seen(rank, reason)` is told of every failure found (the fault_seen event)."""
        self.pool, self.detector, self._seen = pool, detector, seen
        self.stale_dropped = 0  # in all

    def collect(self, ranks: Iterable[int], want: tuple[type, ...], epoch: int | Mapping[int, int],
                timeout_s: float, *, heartbeats: bool, stop_early: bool = False) -> Answers:
        """Each of `ranks`' answer of a kind in `want`, to a request of `epoch` (per rank, or
        one for all). Every rank's answer is read unless `stop_early`: then the first failure
        or abandoned step ends the wait, and the ranks not heard from are `pending` (their
        answers are still to be read). At `timeout_s` the ranks pending fail (with
        `stop_early`: the first of them). With `heartbeats`, a rank silent on its heartbeat for
        failure_timeout_s fails (a stopped rank must not hold a step, a switch-in or a repair
        for timeout_s)."""
        out = Answers()
        pending = set(ranks)
        deadline = time.monotonic() + timeout_s
        while pending and not (stop_early and (out.failed or out.abandoned)):
            left = deadline - time.monotonic()
            if left <= 0:
                late = [min(pending)] if stop_early else sorted(pending)
                for r in late:
                    self._fail(out, pending, r, f"no {_names(want)} reply within {timeout_s:.1f} s")
                break
            wait_s = min(left, self.detector.look_s(pending)) if heartbeats else left
            for r, p, ready in self.pool.wait_any(pending, wait_s):
                if p.conn in ready:
                    self._read(out, pending, r, want, epoch if isinstance(epoch, int) else epoch[r])
                elif p.exited(ready):
                    self._fail(out, pending, r, p.exit_reason())
            if heartbeats:
                for r, why in self.detector.silent(pending).items():
                    self._fail(out, pending, r, why)
        out.pending = pending
        self.stale_dropped += out.stale
        return out

    def _read(self, out: Answers, pending: set[int], r: int, want: tuple[type, ...], epoch: int) -> None:
        try:
            msg = wire.recv(self.pool[r].conn, wire.FROM_RANK)
        except (EOFError, OSError):
            self._fail(out, pending, r, "its pipe closed")
            return
        if msg.epoch < epoch:  # the answer to an earlier request: never this one's
            logger.warning("rank %d: dropped a stale %s of epoch %d (expected %d)", r, type(msg).__name__,
                           msg.epoch, epoch)
            out.stale += 1
            return
        pending.discard(r)
        if isinstance(msg, want):
            out.replies[r] = msg
        elif isinstance(msg, wire.PeerSilent):  # a live peer silent for timeout_s: it is broken
            timeout_s = self.detector.timeouts.data_plane_s
            self._fail(out, pending, msg.peer, f"silent on the data plane for {timeout_s:g} s (rank {r})")
        elif isinstance(msg, wire.StepAbandoned):
            out.abandoned[r] = msg.reason
        elif isinstance(msg, wire.Refused):
            out.refused[r] = msg.reason
        else:
            self._fail(out, pending, r, f"answered {type(msg).__name__} instead of {_names(want)}")

    def _fail(self, out: Answers, pending: set[int], rank: int, why: str) -> None:
        pending.discard(rank)
        if rank not in out.failed:
            out.failed[rank] = why
            self._seen(rank, why)

    def request(self, messages: Mapping[int, Any], reply: type, timeout_s: float, *, heartbeats: bool) -> dict[int, object]:
        """Send each rank its control message and read every rank's reply (of type `reply`).
        RankFailed for the first rank that failed (a pipe closed, no reply, ...), but only after
        every reply was read, so that no answer is left in a pipe; ConfigError if one refused."""
        sent, broken = [], {}
        epoch = max((m.epoch for m in messages.values()), default=0)  # one request: one epoch
        for r, message in messages.items():
            try:
                wire.send(self.pool[r].conn, message)
                sent.append(r)
            except OSError as e:
                broken[r] = f"its pipe is closed ({e.__class__.__name__})"
        answers = self.collect(sent, (reply,), epoch, timeout_s, heartbeats=heartbeats)
        for r, why in broken.items():
            self._fail(answers, set(), r, why)
        answers.raise_first(reply.__name__)
        return answers.replies


def _names(kinds: tuple[type, ...]) -> str:
    return "/".join(k.__name__ for k in kinds)
