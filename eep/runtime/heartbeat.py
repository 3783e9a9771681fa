"""Heartbeats: how the controller tells a stopped or hung rank from a slow one.

Each rank runs a daemon thread that writes `time.monotonic_ns()` (one clock for every process
of the host) into its own 64-byte line of a controller-owned shared-memory file every
`interval_s`. The thread needs the GIL only for a moment, and torch releases it inside its
kernels, so a rank deep in a long step still beats; a SIGSTOPped, crashed or wedged process
does not. The controller reads the ages without any message: no lock, one writer per line.
"""

from __future__ import annotations

import ctypes
import threading
import time

from eep.dataplane.shmfile import ShmFile

_LINE = 64


class HeartbeatBoard:
    """Controller side: one line per rank; `age_s(rank)` is the time since its last beat."""

    def __init__(self, num_ranks: int) -> None:
        self.file = ShmFile.create("hb", num_ranks * _LINE)
        self.name = self.file.name
        self._words = [ctypes.c_uint64.from_buffer(self.file.mm, r * _LINE) for r in range(num_ranks)]

    def reset(self, rank: int) -> None:
        """A new process is starting as `rank`: it counts as beating from now on."""
        self._words[rank].value = time.monotonic_ns()

    def age_s(self, rank: int) -> float:
        return (time.monotonic_ns() - self._words[rank].value) / 1e9

    def close(self) -> None:
        self._words = []
        self.file.close()


class Heartbeat:
    """Rank side: beat into line `rank` of board `name` every `interval_s` until `stop()`."""

    def __init__(self, name: str, rank: int, interval_s: float) -> None:
        self._file = ShmFile.attach(name)
        self._word = ctypes.c_uint64.from_buffer(self._file.mm, rank * _LINE)
        self._interval_s = interval_s
        self._stop = threading.Event()
        self.cpu_ns = 0  # the beating thread's CPU time so far, as of its last beat
        self._word.value = time.monotonic_ns()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{rank}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._word.value = time.monotonic_ns()
            self.cpu_ns = time.thread_time_ns()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
