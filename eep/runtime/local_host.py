"""Node 0's host agent, inside the controller's process.

Every other host runs `eep.runtime.agent.HostAgent` in a process of its own; on the
controller's host the same job is done here, in the controller's process (no hop for the host
that matters most, and nothing more to lose: the controller's host is the instance). A
`LocalHost` owns what belongs to the host and must outlive any rank, built as every agent
builds it (`eep.runtime.host_resources.HostResources`): the data-plane segment (shm; gloo has
none), the heartbeat board, the expert backup and, across hosts, its server. It starts its
ranks with a socketpair each as the control pipe, a death notice and a pidfd (the fast and the
sure sign of a death), and pins the active ones to cores. With `fork_server` (the
default) a rank is forked from the host's `ForkServer`, an interpreter that imported torch once
(2.4-2.8 s of CPU per fresh interpreter here): a start, a rejoin or a restart costs the load of
the rank's slots and its warm-up, not an interpreter's start; a fork server that died is
replaced at the next start. Without it every rank is a fresh `python -m eep.runtime`.
What the ranks do, and when a view changes, is the controller's (`eep.control`); this
class never decides membership.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import subprocess

import torch

from eep.dataplane.shm import ShmLayout, ShmSegment
from eep.runtime import wire
from eep.runtime.death_notice import DeathNotice
from eep.runtime.fork_server import ForkedProcess
from eep.runtime.heartbeat import HeartbeatBoard
from eep.runtime.host_resources import HostResources
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
        """Build the host's resources (`HostResources`: segment with `layout`, heartbeat board
        if `heartbeats`, expert backup of `backup_mask`, fork server). `secret`: the
        cluster's (multi-host), handed to each rank over its socketpair and to the backup
        server."""
        self.secret = secret
        self.resources = HostResources(num_ranks, layout=layout, heartbeats=heartbeats, backup_mask=backup_mask,
                                       model_path=model_path, dtype=dtype, cpu_affinity=cpu_affinity,
                                       fork_server=fork_server, secret=secret)

    @property
    def segment(self) -> ShmSegment | None:
        return self.resources.segment

    @property
    def board(self) -> HeartbeatBoard | None:
        return self.resources.board

    def names(self) -> dict[str, str | None]:
        """What a rank of this host attaches to (the `RankSpec` fields an agent fills for its own)."""
        names = self.resources.names()
        return {"heartbeat": names["heartbeat"], "backup": names["backup"]}

    def serve_backup(self, address: str) -> None:
        """Across hosts: answer other hosts' ranks' requests for this host's backup."""
        self.resources.serve_backup(address)

    def start(self, spec: RankSpec, wait_s: float = 0.0) -> Started:
        """Start rank `spec.rank` here and hand it `spec` (with its death notice filled in):
        forked from the fork server if there is one and its imports are done within `wait_s`
        (the instance's start waits for them; a rejoin does not), else a fresh interpreter."""
        notice = DeathNotice.create()
        if self.resources.board is not None:
            self.resources.board.reset(spec.rank)
        spec = dataclasses.replace(spec, death_notice=notice.name)
        try:
            ours, theirs = socket.socketpair()
            with ours, theirs:
                proc = self.resources.start_process(theirs.fileno(), wait_s)
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
        assert self.resources.board is not None
        return self.resources.board.age_s(rank)

    def announce_epoch(self, epoch: int) -> None:
        """Every rank of this host blocked in a step of an older epoch abandons it at once."""
        self.resources.announce_epoch(epoch)

    def pin(self, pids: dict[int, int]) -> None:
        """Pin each active rank of this host (`pids`: rank -> pid) to one of this process's
        cores (`CorePinner.spread`). Called at every view change: the survivors of a failure
        share the cores evenly, a rank switched back in gets its own again."""
        self.resources.cores.spread(pids)

    def close(self) -> None:
        """Remove the segment, the board and the backup (the ranks are stopped first, by the
        controller), and stop the fork server. Idempotent."""
        self.resources.close()


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
