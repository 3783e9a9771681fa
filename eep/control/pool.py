"""The rank processes of the instance: started (on this host or through another host's agent),
readied, fenced, stopped and reaped here. Each process has an incarnation id of its own, unique
within the instance, by which the view names it (pids of different hosts can be equal)."""

from __future__ import annotations

import itertools
import logging
import os
import signal
from collections.abc import Iterable
from multiprocessing.connection import wait

import torch

from eep.control.cluster import Cluster
from eep.control.process import RankProcess
from eep.errors import RankFailed
from eep.placement.routing import Placement
from eep.runtime import wire
from eep.runtime.hosts import HostError, RemoteProcess
from eep.runtime.local_host import renice

logger = logging.getLogger(__name__)


class RankPool:
    def __init__(self, cluster: Cluster, num_ranks: int) -> None:
        self.cluster = cluster
        self.num_ranks = num_ranks
        self._procs: list[RankProcess | None] = [None] * num_ranks
        self.fenced: list[RankProcess] = []  # failed processes that may still be alive (stopped)
        self._incarnations = itertools.count(1)

    def process(self, rank: int) -> RankProcess | None:
        """`rank`'s current process (None: it has none, e.g. failed and not rejoining)."""
        return self._procs[rank]

    def __getitem__(self, rank: int) -> RankProcess:
        p = self._procs[rank]
        if p is None:
            raise KeyError(f"rank {rank} has no process")
        return p

    def pids(self) -> list[int]:
        """The pid of each rank's current process (0 where there is none)."""
        return [p.pid if p is not None else 0 for p in self._procs]

    def incarnations(self) -> tuple[int, ...]:
        return tuple(p.incarnation if p is not None else 0 for p in self._procs)

    # -- start -----------------------------------------------------------------------------
    def spawn(self, rank: int, placement: Placement, held: torch.Tensor | None, epoch: int,
              wait_s: float = 0.0) -> RankProcess:
        """Start a process for `rank` and send it its spec. Ranks are forked from their host's
        fork server or are fresh interpreters (`python -m eep.runtime`), never multiprocessing
        children: nothing of the caller's __main__ is re-imported, and a replacement is started
        the same way at any time by its host's agent (this host's: `LocalHost`). A death is seen
        through its death notice (< 1 ms), its pidfd once the exit is complete; on another host
        through its agent and its connection. RankFailed if another host's agent cannot start it."""
        if self.cluster.ep.node_of(rank) == 0 and self.cluster.takeover is not None:
            raise RankFailed(rank, "node 0 is gone: this head took over from it, and no rank of it starts again")
        spec = self.cluster.spec(rank, placement, held, epoch)
        incarnation = next(self._incarnations)
        if self.cluster.ep.node_of(rank) != 0:
            try:
                conn, hello, link = self.cluster.start_remote(spec, epoch)
            except HostError as e:
                raise RankFailed(rank, str(e)) from None
            p = RankProcess(rank, incarnation, epoch, RemoteProcess(link, rank, hello.pid), None, conn, None,
                            wake=self.cluster.wake_handle)
        else:
            s = self.cluster.start_local(spec, wait_s)
            p = RankProcess(rank, incarnation, epoch, s.proc, s.pidfd, s.conn, s.notice)
        self._procs[rank] = p
        return p

    def adopt(self, rank: int, pid: int, incarnation: int, epoch: int) -> RankProcess:
        """A head that took over: `rank`'s running process `pid` (incarnation `incarnation`, as the
        committed view names it), reached over a new control connection its agent made."""
        try:
            conn, hello, link = self.cluster.adopt_remote(rank, pid, epoch)
        except HostError as e:
            raise RankFailed(rank, str(e)) from None
        p = RankProcess(rank, incarnation, epoch, RemoteProcess(link, rank, hello.pid), None, conn, None,
                        wake=self.cluster.wake_handle)
        self._procs[rank] = p
        return p

    def continue_incarnations(self, after: int) -> None:
        """New processes get incarnations above `after` (a head that took over goes on from the view's)."""
        self._incarnations = itertools.count(after + 1)

    def mark_ready(self, rank: int, warmup_s: float | None) -> None:
        p = self[rank]
        p.ready, p.warmup_s = True, warmup_s
        if p.notice is not None:  # it holds the mutex since before it said ready
            p.notice.watch(rank)

    def wait_any(self, ranks: Iterable[int], timeout_s: float) -> list[tuple[int, RankProcess, list[object]]]:
        """Wait up to `timeout_s` for a message or an exit of any of `ranks`; returns, in rank
        order, each rank with its process and what became ready (check `p.conn in ready` and
        `p.exited(ready)`)."""
        procs = {r: p for r in ranks if (p := self._procs[r]) is not None}
        handles = {h: None for p in procs.values() for h in p.handles}
        ready = wait(list(handles), timeout_s)
        self.cluster.drain_wake(ready)
        return [(r, p, ready) for r, p in sorted(procs.items())]

    def pin(self, active: tuple[int, ...]) -> None:
        """Pin this host's active ranks to its cores (`LocalHost.pin`); a loading joiner is not
        pinned. Every view change calls this again."""
        self.cluster.local.pin({r: p.pid for r in active if (p := self._procs[r]) is not None and not p.remote})

    # -- end -------------------------------------------------------------------------------
    def fence(self, ranks: Iterable[int], epoch: int) -> None:
        """Cut failed processes off: close their pipes (a stopped one finds it closed when it
        wakes, and exits as fenced) and keep them to reap.

        A process seen dying through its death notice is still being torn down by the kernel
        (15-25 ms of CPU for a rank, on the core of a survivor): it gets the lowest priority,
        so that the repair and the replayed step run first and the teardown fills idle time
        (measured: a task sharing the core got ~60% more CPU in the 100 ms after the kill)."""
        self._retire(ranks, wire.Fence(epoch, f"not in the view of epoch {epoch}"))

    def _retire(self, ranks: Iterable[int], message: wire.Fence | wire.Stop) -> None:
        """Take `ranks`' processes out of the pool: `message` sent to each still running, which
        gets the lowest priority, and kept to reap (`reap_exited`, `reap_fenced`, `close`)."""
        for r in sorted(ranks):
            p = self._procs[r]
            if p is None:
                continue
            self._procs[r] = None
            if p.proc.poll() is None:
                if not p.remote:
                    renice(p.pid, 19)
                try:
                    wire.send(p.conn, message)
                except OSError:
                    pass
            self.fenced.append(p)

    def reap_fenced(self, rank: int) -> list[int | None]:
        """Kill and reap `rank`'s fenced processes (before a new one takes its place); their exit codes."""
        codes = []
        for p in [p for p in self.fenced if p.rank == rank]:
            codes.append(p.close(kill=True))
            self.fenced.remove(p)
        return codes

    def stop_all(self, ranks: Iterable[int], epoch: int) -> None:
        """Ask the processes of `ranks` (out of the view: a drain, a scale-down) to stop, and
        wait for none of them: they exit side by side at the lowest priority while the others
        serve, and are reaped by `reap_exited` (or killed before a new process takes the rank,
        or at close). Waiting cost a drain ~60 ms per rank on two cores."""
        self._retire(ranks, wire.Stop(epoch))

    def reap_exited(self) -> list[tuple[int, int | None]]:
        """Reap the processes out of the view that have exited: (rank, exit code) of each."""
        done = [p for p in self.fenced if p.proc.poll() is not None]
        for p in done:
            self.fenced.remove(p)
        return [(p.rank, p.close(kill=False)) for p in done]

    def close(self, epoch: int) -> None:
        """Stop every rank (politely, then by force) and reap the fenced ones."""
        live = [p for p in self._procs if p is not None]
        for p in live:
            if p.proc.poll() is None:
                try:
                    wire.send(p.conn, wire.Stop(epoch))
                except OSError:
                    pass
        for p in live:
            p.close(kill=False)
        for p in self.fenced:
            if p.proc.poll() is None and not p.remote:
                os.kill(p.pid, signal.SIGKILL)  # also wakes and kills a stopped process
            p.close(kill=True)
        self._procs, self.fenced = [None] * self.num_ranks, []
