"""CPU time of a server and every process below it (its ranks, its fork server), sampled.

A server's CPU seconds are user + system of each of its processes, read from each process's
CPU-time clock (`clock_getcpuclockid`'s: nanoseconds, every thread, those that exited
included, a running one up to date; `process_cpu_clock_ns`), or, on a kernel without such
clocks, from /proc/PID/stat's utime + stime (`proc_stat_ticks`: 10 ms ticks per process and
reading). `CpuMeter` samples the sum every `CPU_SAMPLE_S` on the event loop; `cpu_at`
interpolates the samples to any moment in between (the start and end of a token range).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path

CPU_SAMPLE_S = 0.005  # how often a slice reads its server's CPU clocks (~10 us a reading)

CpuReader = Callable[[int], float]


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) `pid` has used so far, all its threads, those that exited
    included: the process's CPU-time clock (clock_getcpuclockid, exact to the nanosecond and up
    to date for a thread running now). OSError once the process is gone."""
    return time.clock_gettime_ns(((~pid) << 3) | 2) / 1e9  # CPUCLOCK_SCHED of the whole process


def stat_cpu_s(pid: int) -> float:
    """The fallback: utime + stime of /proc/PID/stat, in clock ticks (10 ms)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_source(pid: int) -> tuple[str, CpuReader]:
    """The most precise reader of `pid`'s CPU time this host allows, and its name."""
    try:
        process_cpu_s(pid)
        return "process_cpu_clock_ns", process_cpu_s
    except OSError:  # no per-process CPU clocks (a sandboxed kernel): 10 ms ticks
        return "proc_stat_ticks", stat_cpu_s


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (the server, its fork server and its ranks), from /proc's parent links."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_bytes().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children.get(p, [])
    return sorted(found)


def cpu_at(samples: list[tuple[float, float]], t: float) -> float:
    """The CPU seconds at time `t`, linearly between the (time, CPU seconds) samples around it."""
    times = [s for s, _ in samples]
    i = bisect.bisect_left(times, t)
    if i == 0 or i == len(samples):
        return samples[min(i, len(samples) - 1)][1]
    (t0, c0), (t1, c1) = samples[i - 1], samples[i]
    return c0 + (c1 - c0) * (t - t0) / (t1 - t0) if t1 > t0 else c1


class CpuMeter:
    """(time since `clock`, CPU seconds of `pids` together) every `CPU_SAMPLE_S` while it runs
    (`start`, `stop`); no samples at all if a process ended meanwhile (no CPU figure then)."""

    def __init__(self, pids: list[int], read: CpuReader, clock: float) -> None:
        self.pids, self.read, self.clock = pids, read, clock
        self.samples: list[tuple[float, float]] = []
        self._task: asyncio.Task[None] | None = None

    def _sample(self) -> None:
        self.samples.append((time.monotonic() - self.clock, sum(self.read(p) for p in self.pids)))

    async def _run(self) -> None:
        while True:
            self._sample()
            await asyncio.sleep(CPU_SAMPLE_S)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """One last sample now, then the sampling ends."""
        assert self._task is not None
        self._task.cancel()
        try:
            self._sample()
        except OSError:  # a process of the server ended within the slice: no CPU figure
            self.samples.clear()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await self._task
