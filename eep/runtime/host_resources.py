"""What a host owns for its ranks, on every host alike: node 0's agent in the controller's
process (`eep.runtime.local_host.LocalHost`) and every other host's agent
(`eep.runtime.agent.HostAgent`) build it with this one piece.

A `HostResources` holds what must outlive any rank: the fork server (started first: its
imports run while the rest is built), the data-plane segment (shm; gloo on one host has none),
the heartbeat board, the host-memory expert backup and, across hosts, its server; and it pins
the host's ranks to its cores (`CorePinner`). It starts no rank and decides nothing."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess

import torch

from eep.dataplane.shm import ShmLayout, ShmSegment, sweep_orphans
from eep.runtime.fork_server import ForkedProcess, ForkServer, start_rank
from eep.runtime.heartbeat import HeartbeatBoard
from eep.security.secret import ClusterSecret

logger = logging.getLogger(__name__)


class HostResources:
    def __init__(self, num_ranks: int, *, layout: ShmLayout | None, heartbeats: bool,
                 backup_mask: torch.Tensor | None, model_path: str, dtype: str, cpu_affinity: bool,
                 fork_server: bool, start_timeout_s: float = 120.0, secret: ClusterSecret | None = None) -> None:
        """Make the host's fork server (if `fork_server`), segment (with `layout`; None: none),
        heartbeat board (if `heartbeats`) and expert backup (the experts of `backup_mask`;
        None: none). `secret`: the cluster's, for the backup's server (`serve_backup`)."""
        self.secret = secret
        self.forks: ForkServer | None = None
        self.segment: ShmSegment | None = None
        self.board: HeartbeatBoard | None = None
        self.backup = None
        self._backup_server = None
        self.cores = CorePinner(cpu_affinity)
        try:
            if fork_server:
                self.forks = ForkServer(start_timeout_s)
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
        """What a rank of this host attaches to: its segment, heartbeat board and backup."""
        return {"rendezvous": self.segment.name if self.segment is not None else None,
                "heartbeat": self.board.name if self.board is not None else None,
                "backup": self.backup.name if self.backup is not None else None}

    def serve_backup(self, address: str) -> None:
        """Across hosts: answer other hosts' ranks' requests for this host's backup."""
        if self.backup is not None and self._backup_server is None:
            from eep.runtime.backup_server import BackupServer

            assert self.secret is not None
            self._backup_server = BackupServer(self.backup, address, self.secret)

    def start_process(self, conn_fd: int, wait_s: float = 0.0) -> subprocess.Popen[bytes] | ForkedProcess:
        """A rank process serving the control pipe `conn_fd`: forked if the fork server's imports
        are done within `wait_s`, else a fresh interpreter (`start_rank`)."""
        self.forks, proc = start_rank(self.forks, conn_fd, wait_s)
        return proc

    def announce_epoch(self, epoch: int) -> None:
        """Every rank of this host blocked in a step of an older epoch abandons it at once."""
        if self.segment is not None:
            self.segment.announce_epoch(epoch)

    def close(self) -> None:
        """Stop the fork server, remove the segment, the board and the backup (the ranks are
        stopped first). Idempotent."""
        if self.forks is not None:
            self.forks.close()
            self.forks = None
        for res in (self._backup_server, self.board, self.backup):
            if res is not None:
                res.close()
        self._backup_server = self.board = self.backup = None
        if self.segment is not None:
            self.segment.close()
            self.segment.unlink()
            self.segment = None


class CorePinner:
    """Each rank of a host on one of the host's cores (one torch thread each), so that ranks
    never migrate between cores mid-step (measured here: 4 ranks on 2 cores served ~10% more
    tokens/s, run-to-run spread down from ~15% to ~4%). No core holds more than its share; ranks
    stay where they are while the spread is even (a rank moved starts its next step with cold
    caches): only ranks on crowded cores, and new ones, move."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._core_of: dict[int, int] = {}  # the core each pinned rank is on

    def spread(self, pids: dict[int, int]) -> None:
        """Pin the ranks of `pids` (rank -> pid): the set that should share the cores now (node
        0: the active ranks, at every view change). Ranks not in it are forgotten."""
        if not self.enabled:
            return
        cores = sorted(os.sched_getaffinity(0))
        self._core_of = {r: c for r, c in self._core_of.items() if r in pids and c in cores}
        moved = spread_over_cores(tuple(sorted(pids)), cores, self._core_of)
        self._core_of.update(moved)
        for r, core in moved.items():
            _pin(pids[r], core)

    def place(self, rank: int, pid: int, others: list[int]) -> None:
        """Pin a rank just started (before it makes its threads: they inherit the core) beside
        the host's running `others`, on the least-loaded core."""
        if not self.enabled:
            return
        cores = sorted(os.sched_getaffinity(0))
        kept = {r: c for r, c in self._core_of.items() if r in others and c in cores}
        core = spread_over_cores((*sorted(kept), rank), cores, kept).get(rank, cores[0])
        self._core_of = {**kept, rank: core}
        _pin(pid, core)


def _pin(pid: int, core: int) -> None:
    with contextlib.suppress(OSError):  # exited meanwhile: the failure path sees it
        for tid in os.listdir(f"/proc/{pid}/task"):  # every thread (heartbeat, torch): affinity is per thread
            os.sched_setaffinity(int(tid), {core})


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
