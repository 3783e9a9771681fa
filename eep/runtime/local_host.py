"""Node 0's host agent, inside the controller's process.

Every other host runs `eep.runtime.agent.HostAgent` in a process of its own; on the
controller's host the same job is done here, in the controller's process (no hop for the host
that matters most, and nothing more to lose: the controller's host is the instance). A
`LocalHost` owns what belongs to the host and must outlive any rank: the data-plane segment
(shm; gloo has none), the heartbeat board, the expert backup and, across hosts, its server. It
starts its ranks as fresh interpreters (`python -m eep.runtime`) with a socketpair each as the
control pipe, a death notice and a pidfd (the fast and the sure sign of a death), and pins the
active ones to cores. With `warm_spare` it keeps one interpreter started ahead, torch already
imported (2.4-2.8 s of a rank's start here), waiting for the spec of whichever rank comes next:
a rejoin then costs the load of the rank's slots and its warm-up, not an interpreter's start.
Where its priority can be given back (root, or RLIMIT_NICE), the spare starts at nice 19, so its
import takes only the cores' idle time, and gets the controller's priority when it is taken.
What the ranks do, and when a view changes, is the controller's (`eep.runtime.executor`); this
class never decides membership.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import resource
import socket
import subprocess
import sys
from multiprocessing.connection import Connection

import torch

from eep.dataplane.shm import ShmLayout, ShmSegment, sweep_orphans
from eep.runtime.death_notice import DeathNotice
from eep.runtime.heartbeat import HeartbeatBoard
from eep.runtime.rank import RankSpec, send

logger = logging.getLogger(__name__)


@dataclasses.dataclass(slots=True)
class _Interpreter:
    """`python -m eep.runtime` started, waiting for its `RankSpec` on `conn`."""

    proc: subprocess.Popen[bytes]
    pidfd: int
    conn: Connection
    niced: bool = False

    def discard(self) -> None:
        """Kill it: it holds nothing yet (no rank, no shared memory), and may still be importing."""
        self.proc.kill()
        self.proc.wait(timeout=10)
        self.conn.close()
        os.close(self.pidfd)


@dataclasses.dataclass(slots=True)
class Started:
    """A rank process just started: its Popen, pidfd, control pipe and death notice."""

    proc: subprocess.Popen[bytes]
    pidfd: int
    conn: Connection
    notice: DeathNotice


class LocalHost:
    def __init__(self, num_ranks: int, *, layout: ShmLayout | None, heartbeats: bool,
                 backup_mask: torch.Tensor | None, model_path: str, dtype: str, cpu_affinity: bool,
                 warm_spare: bool = False) -> None:
        """Make the host's segment (with `layout`; None: none, as on gloo), heartbeat board
        (if `heartbeats`) and expert backup (the experts of `backup_mask`; None: none)."""
        self.cpu_affinity, self.warm_spare = cpu_affinity, warm_spare
        self._spare: _Interpreter | None = None
        self.segment: ShmSegment | None = None
        self.board: HeartbeatBoard | None = None
        self.backup = None
        self._backup_server = None
        self._core_of: dict[int, int] = {}  # the core each active rank is pinned to
        try:
            if layout is not None:
                sweep_orphans()  # segments of controllers that were SIGKILLed (they could not remove them)
                self.segment = ShmSegment.create(layout)
            if heartbeats:
                self.board = HeartbeatBoard(num_ranks)
            if backup_mask is not None:
                from eep.runtime.expert_backup import ExpertBackup

                self.backup = ExpertBackup.build(model_path, dtype, backup_mask)
        except BaseException:
            self.close()
            raise

    def names(self) -> dict[str, str | None]:
        """What a rank of this host attaches to (the `RankSpec` fields an agent fills for its own)."""
        return {"heartbeat": self.board.name if self.board is not None else None,
                "backup": self.backup.name if self.backup is not None else None}

    def serve_backup(self, address: str) -> None:
        """Across hosts: answer other hosts' ranks' requests for this host's backup."""
        if self.backup is not None and self._backup_server is None:
            from eep.runtime.backup_server import BackupServer

            self._backup_server = BackupServer(self.backup, address)

    def start(self, spec: RankSpec) -> Started:
        """Start rank `spec.rank` here (in the warm spare if there is one) and hand it `spec`
        (with its death notice filled in); then start the next spare (`warm_spare`)."""
        notice = DeathNotice.create()
        if self.board is not None:
            self.board.reset(spec.rank)
        spec = dataclasses.replace(spec, death_notice=notice.name)
        try:
            it, self._spare = self._spare, None
            if it is not None:
                try:
                    if it.niced:
                        renice(it.proc.pid, os.getpriority(os.PRIO_PROCESS, 0))
                    send(it.conn, spec)
                except OSError as e:  # it died meanwhile (killed, out of memory): start a fresh one
                    logger.warning("the warm spare interpreter (pid %d) is gone (%s): starting a fresh one",
                                   it.proc.pid, e)
                    it.discard()
                    it = None
            if it is None:
                it = _interpreter()
                try:
                    send(it.conn, spec)
                except OSError:
                    it.discard()
                    raise
        except BaseException:
            notice.close()
            raise
        started = Started(it.proc, it.pidfd, it.conn, notice)
        if self.warm_spare:
            self._spare = _interpreter(nice=_can_renice())
        return started

    def age_s(self, rank: int) -> float:
        """Seconds since `rank`'s last heartbeat."""
        assert self.board is not None
        return self.board.age_s(rank)

    def announce_epoch(self, epoch: int) -> None:
        """Every rank of this host blocked in a step of an older epoch abandons it at once."""
        if self.segment is not None:
            self.segment.announce_epoch(epoch)

    def pin(self, pids: dict[int, int]) -> None:
        """Pin each active rank of this host (`pids`: rank -> pid; one torch thread each) to one
        of this process's cores, so that ranks never migrate between cores mid-step (measured
        here: 4 ranks on 2 cores served ~10% more tokens/s, run-to-run spread down from ~15% to
        ~4%). Called at every view change: the survivors of a failure share the cores evenly, a
        rank switched back in gets its own again. Ranks stay where they are while the spread is
        even (a survivor moved to another core starts the replayed step with cold caches): only
        ranks on crowded cores, and new ones, move."""
        if not self.cpu_affinity:
            return
        cores = sorted(os.sched_getaffinity(0))
        active = tuple(sorted(pids))
        self._core_of = {r: c for r, c in self._core_of.items() if r in pids and c in cores}
        moved = spread_over_cores(active, cores, self._core_of)
        self._core_of.update(moved)
        for r, core in moved.items():
            try:  # every thread of it (the heartbeat's, torch's): setaffinity is per thread
                for tid in os.listdir(f"/proc/{pids[r]}/task"):
                    os.sched_setaffinity(int(tid), {core})
            except OSError:  # exited meanwhile: the failure path sees it
                pass

    def close(self) -> None:
        """Remove the segment, the board and the backup (the ranks are stopped first, by the
        controller). Idempotent."""
        if self._spare is not None:
            self._spare.discard()
            self._spare = None
        if self.segment is not None:
            self.segment.close()
            self.segment.unlink()
            self.segment = None
        if self.board is not None:
            self.board.close()
            self.board = None
        if self._backup_server is not None:
            self._backup_server.close()
            self._backup_server = None
        if self.backup is not None:
            self.backup.close()
            self.backup = None


def _interpreter(nice: bool = False) -> _Interpreter:
    """A fresh `python -m eep.runtime`, with a socketpair as its control pipe. A session of its
    own: a terminal's Ctrl-C reaches the controller, which stops the ranks in order, and not
    every rank at once. `nice`: at nice 19 (set at once, before it starts any thread: they
    inherit it)."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        proc = subprocess.Popen([sys.executable, "-m", "eep.runtime", str(theirs.fileno())],
                                pass_fds=[theirs.fileno()], start_new_session=True)
        conn = Connection(os.dup(ours.fileno()))
    if nice:
        renice(proc.pid, 19)
    return _Interpreter(proc, os.pidfd_open(proc.pid), conn, nice)


def _can_renice() -> bool:
    """Whether a process of ours put at nice 19 can be given our priority back."""
    soft = resource.getrlimit(resource.RLIMIT_NICE)[0]
    return os.geteuid() == 0 or soft == resource.RLIM_INFINITY or 20 - soft <= os.getpriority(os.PRIO_PROCESS, 0)


def renice(pid: int, nice: int) -> None:
    """`nice` for every thread of `pid` (nice is per thread on Linux); gone threads are skipped."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return
    for tid in tids:
        try:
            os.setpriority(os.PRIO_PROCESS, int(tid), nice)
        except ProcessLookupError:  # the thread ended meanwhile
            pass
        except OSError as e:
            logger.warning("could not set nice %d for thread %s of pid %d: %s", nice, tid, pid, e)


def spread_over_cores(ranks: tuple[int, ...], cores: list[int], pinned: dict[int, int]) -> dict[int, int]:
    """The ranks to (re)pin and their cores, so that no core holds more than ceil(len(ranks) /
    len(cores)) ranks, moving as few as possible: a rank stays on its `pinned` core unless that
    core is crowded; movers and new ranks go to the least-loaded core (lowest first). Pure."""
    cap = -(-len(ranks) // len(cores))
    load = {c: 0 for c in cores}
    keep, moves = {}, {}
    for r in ranks:
        c = pinned.get(r)
        if c in load and load[c] < cap:
            keep[r] = c
            load[c] += 1
    for r in ranks:
        if r not in keep:
            c = min(cores, key=lambda k: (load[k], k))
            moves[r] = c
            load[c] += 1
    return moves
