"""`Leadership`: a head's hold on its instance's leader key (`MembershipStore.campaign`).

Only the holder of the key commits views: the store checks the key in the same transaction as
the epoch's compare-and-swap, so a head that lost the key can never commit again, whatever it
believes. This part keeps the hold from a thread of its own (renewed every third of the TTL, as
the agents' host leases are: an etcd call that stalls never delays a step) and says when it is
gone for good:

- The key is held by another head (found when renewing, when taking the key again, or by a
  refused commit): this head is *deposed*, for good. `on_deposed(reason)` is called once (the
  engine loop stops serving with that reason: HTTP 503).
- The lease ran out while etcd was out of reach (an outage, or this head cut off from it):
  - with a standby head following this one (`standby()` true at the last renewal), the head is
    deposed as soon as the lease can have run out by its own clock (the last renewal + the TTL),
    whether or not etcd answers: the standby may lead by then, and two heads must never serve
    the same requests;
  - with none, it serves on (nobody could take over its requests; etcd is on no liveness path)
    and, when etcd answers again and the key is free, takes it again. Nobody else can have
    committed meanwhile without the key, and a commit from a stale epoch is refused by the
    epoch's compare-and-swap anyway, so taking a free key back is safe.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from eep.membership.store import (
    HostLease,
    LeaseLost,
    MembershipStore,
    NotLeader,
    StoreError,
)

logger = logging.getLogger(__name__)


class Leadership:
    """Campaigns in the constructor (NotLeader: another head leads; StoreError: no store), then
    renews from a thread of its own until `close`."""

    def __init__(self, store: MembershipStore, head: str, info: dict[str, Any], ttl_s: float,
                 on_deposed: Callable[[str], None] | None = None) -> None:
        self.store, self.head, self.info, self.ttl_s = store, head, dict(info), ttl_s
        self.on_deposed = on_deposed
        self.standby: Callable[[], bool] = lambda: False  # a standby head follows this one (set by the server)
        self.terms = 1  # how often this head took the key (a free key taken back after an outage: +1)
        self._lock = threading.Lock()
        self._depose_lock = threading.Lock()
        self._lease: HostLease | None = store.campaign(head, self.info, ttl_s)
        self._renewed = time.monotonic()  # the last renewal's start: the lease lives at least a TTL from it
        self._strict = False  # a standby followed at the last renewal
        self._deposed: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"leader-{head}", daemon=True)
        self._thread.start()
        self._watch = threading.Thread(target=self._watchdog, name=f"leader-watch-{head}", daemon=True)
        self._watch.start()
        logger.info("head %s holds the leader key (lease %.1f s)", head, ttl_s)

    @property
    def deposed(self) -> str | None:
        """Why this head no longer leads (another head holds the key), or None."""
        return self._deposed

    def reclaim(self) -> bool:
        """After a refused commit (NotLeader): take the key again if it is free (True: commit
        again), else this head is deposed (False)."""
        with self._lock:
            if self._deposed is not None:
                return False
            return self._take_again("a commit was refused: the leader key had lapsed")

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop renewing and give the key up at once (where the store answers; else it lapses
        after its TTL), so a standby leads without waiting for it."""
        self._stop.set()
        self._thread.join(timeout_s)
        self._watch.join(timeout_s)
        with self._lock:
            lease, self._lease = self._lease, None
        if lease is not None and self._deposed is None and not self._thread.is_alive():
            try:
                lease.revoke()
            except (StoreError, LeaseLost, NotLeader):
                pass

    # -- the renewing thread ---------------------------------------------------------------
    def _run(self) -> None:
        wait = self.ttl_s / 3
        while not self._stop.wait(wait):
            wait = self.ttl_s / 3
            with self._lock:
                if self._deposed is not None:
                    return
                started, strict = time.monotonic(), self.standby()
                try:
                    if self._lease is None:
                        self._take_again("its lease ran out")
                    else:
                        self._lease.keep_alive()
                    if self._deposed is None:
                        self._renewed, self._strict = started, strict
                except NotLeader as e:
                    self._depose(str(e))
                except LeaseLost:
                    self._lease, wait = None, 0.0
                    logger.warning("head %s: the leader key's lease ran out; taking the key again", self.head)
                except StoreError as e:
                    logger.warning("head %s: leader key not renewed: %s", self.head, e)
                    wait = min(self.ttl_s / 6, 0.5)

    def _watchdog(self) -> None:
        """Deposes the head once its lease can have run out while a standby followed it (never
        held up by an etcd call: the renewing thread may be waiting on one)."""
        while not self._stop.wait(self.ttl_s / 10):
            if self._deposed is not None:
                return
            late = time.monotonic() - self._renewed
            if self._strict and late > self.ttl_s:
                self._depose(f"its lease on the leader key was not renewed for {late:.1f} s (etcd out of "
                             f"reach) while a standby head follows it: the standby may lead now")
                return

    def _take_again(self, why: str) -> bool:
        """The key is not ours any more (`why`): take it again if free, else be deposed. Holds
        the lock. StoreError propagates (the renewing thread tries again later)."""
        try:
            self._lease = self.store.campaign(self.head, self.info, self.ttl_s)
        except NotLeader as e:
            self._depose(str(e))
            return False
        self.terms += 1
        logger.warning("head %s took the leader key again (%s; term %d)", self.head, why, self.terms)
        return True

    def _depose(self, reason: str) -> None:
        with self._depose_lock:  # the renewing thread and the watchdog
            if self._deposed is not None:
                return
            self._deposed, self._lease = f"this head ({self.head}) no longer leads the instance: {reason}", None
        logger.error("%s", self._deposed)
        if self.on_deposed is not None:
            try:
                self.on_deposed(self._deposed)
            except Exception:  # the listener's fault: the head is deposed all the same
                logger.exception("a deposition listener failed")

