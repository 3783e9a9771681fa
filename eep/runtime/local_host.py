"""Node 0's host agent, inside the controller's process.

Every other host runs `eep.runtime.agent.HostAgent` in a process of its own; on the
controller's host the same job is done here, in the controller's process (no hop for the host
that matters most, and nothing more to lose: the controller's host is the instance). A
`LocalHost` owns what belongs to the host and must outlive any rank: the data-plane segment
(shm; gloo has none), the heartbeat board, the expert backup and, across hosts, its server. It
starts its ranks with a socketpair each as the control pipe, a death notice and a pidfd (the
fast and the sure sign of a death), and pins the active ones to cores. With `fork_server` (the
default) a rank is forked from the host's `ForkServer`, an interpreter that imported torch once
(2.4-2.8 s of CPU per fresh interpreter here): a start, a rejoin or a restart costs the load of
the rank's slots and its warm-up, not an interpreter's start; a fork server that died is
replaced at the next start. Without it every rank is a fresh `python -m eep.runtime`.
What the ranks do, and when a view changes, is the controller's (`eep.runtime.executor`); this
class never decides membership.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import subprocess

import torch

from eep.dataplane.shm import ShmLayout, ShmSegment, sweep_orphans
from eep.runtime.death_notice import DeathNotice
from eep.runtime.fork_server import ForkedProcess, ForkServer, start_rank
from eep.runtime.heartbeat import HeartbeatBoard
from eep.runtime import wire
from eep.runtime.wire import RankSpec
from eep.security.channel import Channel
from eep.security.secret import ClusterSecret

logger = logging.getLogger(__name__)


@dataclasses.dataclass(slots=True)
class Started:
    """A rank process just started: its Popen, pidfd, control pipe and death notice."""

    proc: subprocess.Popen[bytes] | ForkedProcess
    pidfd: int
    conn: Channel
    notice: DeathNotice


class LocalHost:
    def __init__(self, num_ranks: int, *, layout: ShmLayout | None, heartbeats: bool,
                 backup_mask: torch.Tensor | None, model_path: str, dtype: str, cpu_affinity: bool,
                 fork_server: bool = True, secret: ClusterSecret | None = None) -> None:
        """Make the host's segment (with `layout`; None: none, as on gloo), heartbeat board
        (if `heartbeats`), expert backup (the experts of `backup_mask`; None: none) and fork
        server (its imports run while the rest is built). `secret`: the cluster's (multi-host),
        handed to each rank over its socketpair and to the backup server."""
        self.cpu_affinity = cpu_affinity
        self.secret = secret
        self.forks: ForkServer | None = None
        self.segment: ShmSegment | None = None
        self.board: HeartbeatBoard | None = None
        self.backup = None
        self._backup_server = None
        self._core_of: dict[int, int] = {}  # the core each active rank is pinned to
        try:
            if fork_server:
                self.forks = ForkServer()
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

            self._backup_server = BackupServer(self.backup, address, self.secret)

    def start(self, spec: RankSpec, wait_s: float = 0.0) -> Started:
        """Start rank `spec.rank` here and hand it `spec` (with its death notice filled in):
        forked from the fork server if there is one and its imports are done within `wait_s`
        (the instance's start waits for them; a rejoin does not), else a fresh interpreter."""
        notice = DeathNotice.create()
        if self.board is not None:
            self.board.reset(spec.rank)
        spec = dataclasses.replace(spec, death_notice=notice.name)
        try:
            ours, theirs = socket.socketpair()
            with ours, theirs:
                self.forks, proc = start_rank(self.forks, theirs.fileno(), wait_s)
                conn = Channel(socket.socket(fileno=os.dup(ours.fileno())))
            pidfd = os.pidfd_open(proc.pid)
            try:
                wire.send(conn, wire.Launch(spec.epoch, spec, self.secret.raw if self.secret is not None else None))
            except OSError:
                proc.kill()
                proc.wait(timeout=10)
                conn.close()
                os.close(pidfd)
                raise
        except BaseException:
            notice.close()
            raise
        return Started(proc, pidfd, conn, notice)


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
        controller), and stop the fork server. Idempotent."""
        if self.forks is not None:
            self.forks.close()
            self.forks = None
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
