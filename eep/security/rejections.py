"""One WARNING per peer turned away at a door, bounded so that a flood cannot fill a disk.

Every door of eep (the controller's TCP listener, a rank's data address, an expert backup
server) reports a refused peer here. Each refusal is logged as one WARNING line of the form
`rejected door=NAME peer=ADDRESS: REASON` (no traceback), up to `burst` lines per `window_s`;
beyond that the refusals are counted and summed up in one line when the window ends (a timer
writes it, so the end of a flood is logged too). The
counts (`total`) are what a test or bench reads, never the log's wording.
"""

from __future__ import annotations

import logging
import threading
import time

logger = logging.getLogger(__name__)


class Rejections:
    def __init__(self, door: str, *, burst: int = 20, window_s: float = 10.0) -> None:
        self.door, self.burst, self.window_s = door, burst, window_s
        self.total = 0
        self._lock = threading.Lock()
        self._window_start = time.monotonic()
        self._in_window = 0
        self._suppressed = 0

    def reject(self, peer: object, reason: str) -> None:
        now = time.monotonic()
        with self._lock:
            self.total += 1
            if now - self._window_start >= self.window_s:
                self._flush_locked()
                self._window_start, self._in_window = now, 0
            if self._in_window >= self.burst:
                self._suppressed += 1
                if self._suppressed == 1:  # the window's summary is written when it ends
                    timer = threading.Timer(self._window_start + self.window_s - now, self._flush)
                    timer.daemon = True
                    timer.start()
                return
            self._in_window += 1
        logger.warning("rejected door=%s peer=%s: %s", self.door, _address(peer), reason)

    def _flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if self._suppressed:
            logger.warning("rejected door=%s: %d more peers in the last %g s (not logged one by one)",
                           self.door, self._suppressed, self.window_s)
            self._suppressed = 0


def _address(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)
