"""What elastic membership costs while nothing fails: CPU time spent in its bookkeeping.

A fixed-membership instance and an elastic one run the same step code (the same scheduler,
model, dispatch and shared-memory exchange); the elastic one does a little more while serving:

- `rank_heartbeats`: each rank's heartbeat thread (a write every 0.1 s), on that thread's CPU
  clock, reported with every step;
- `heartbeat_looks`: the controller reading the heartbeat board while it waits for a step or a
  control reply (`FailureDetector.look_s`, `FailureDetector.silent`), every failure_timeout_s / 20 at most;
- `step_boundary`: the controller's membership work between two steps (`at_step_boundary`:
  pending rejoins, drains and joiners; checks while paused);
- `plan_ahead`: the thread that plans the repair of each further single failure after every
  view change (its whole run).

Each is charged on the CPU clock of the thread that does it (`time.thread_time_ns`, 1 ns
resolution, the thread's own user + system time, so a thread that waits or is preempted is
not charged), and `cpu_s` is every CPU second of the controller process and of every rank
process over the same time. `1 - bookkeeping / cpu` is then the share of the instance's work
that serves tokens, measured directly rather than as the difference of two noisy speeds: on a
2-core host where the speed of two identical servers differs by several percent from one
slice to the next, a difference of 1% between two systems cannot be read from their speeds.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

BOOKKEEPING = ("rank_heartbeats", "heartbeat_looks", "step_boundary", "plan_ahead", "expert_load", "eplb")


class Ledger:
    """CPU nanoseconds of elastic bookkeeping, by what (`BOOKKEEPING`), and of all the work of
    the controller and its ranks. Thread-safe: the planner thread charges it too."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._charging = threading.local()  # a charge inside a charge is the outer one's
        self._ns = dict.fromkeys(BOOKKEEPING, 0)
        self._rank_cpu_ns = 0  # every rank process's CPU, summed over incarnations
        self._seen: dict[int, tuple[int, int, int, int]] = {}  # rank -> (pid, cpu, heartbeat, load ns) last reported
        self._own0 = time.process_time_ns()  # the controller process's CPU before the ranks existed

    @contextlib.contextmanager
    def charge(self, what: str) -> Iterator[None]:
        """Charge the calling thread's CPU time inside the block to `what` (to the outer `what`
        only, if this thread is already charging: nothing is counted twice)."""
        if getattr(self._charging, "on", False):
            yield
            return
        self._charging.on = True
        start = time.thread_time_ns()
        try:
            yield
        finally:
            self.add(what, time.thread_time_ns() - start)
            self._charging.on = False

    def add(self, what: str, ns: int) -> None:
        with self._lock:
            self._ns[what] += ns

    def rank_report(self, rank: int, pid: int, cpu_ns: int, heartbeat_ns: int, load_ns: int = 0) -> None:
        """A rank's cumulative process CPU, heartbeat-thread CPU and expert-load counting CPU, as
        of its last step: the growth since its previous report is charged (a new process starts
        from zero)."""
        with self._lock:
            last_pid, last_cpu, last_hb, last_load = self._seen.get(rank, (pid, 0, 0, 0))
            if last_pid != pid:
                last_cpu = last_hb = last_load = 0
            self._rank_cpu_ns += max(0, cpu_ns - last_cpu)
            self._ns["rank_heartbeats"] += max(0, heartbeat_ns - last_hb)
            self._ns["expert_load"] += max(0, load_ns - last_load)
            self._seen[rank] = (pid, cpu_ns, heartbeat_ns, load_ns)

    def snapshot(self) -> dict[str, object]:
        """Seconds so far: `bookkeeping_cpu_s` by what, and `cpu_s` (the controller process
        since the ledger began + every rank as of its last step)."""
        with self._lock:
            own = time.process_time_ns() - self._own0
            return {"bookkeeping_cpu_s": {k: v / 1e9 for k, v in self._ns.items()},
                    "cpu_s": (own + self._rank_cpu_ns) / 1e9}
