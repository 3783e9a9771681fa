"""The host agent: one per host of a multi-host instance, beside that host's rank processes.

What this module promises:
- The agent owns what must live on its host: the host's data-plane segment (created here, so a
  rank's death leaves it intact, as the controller does on one host), the heartbeat board of
  its ranks, the host-memory expert backup. It starts rank processes when the controller asks
  (`SpawnRank`; forked from the host's `ForkServer`, unless `HostSetup.fork_server` is off),
  kills them when asked (`KillRank`), and announces every committed epoch in its segment
  (`Announce`), so a rank blocked on a dead peer of its own host gives up at once.
- It reports, every heartbeat interval, the heartbeat ages of its ranks (`Beats`): the
  controller fails a stopped rank from them, and a whole host whose agent fell silent (its
  link down, the host gone) after `failure_timeout_s`. A rank's exit is relayed at once
  (`RankExited`, from the pidfd), besides the controller seeing the rank's own TCP connection
  close.
- With etcd, it keeps its host listed (`hosts/node{i}`) under a lease renewed every third of
  its TTL on a thread of its own (`HostRegistration`): the record of live hosts for operators
  and a standby head. An etcd outage never delays a heartbeat report, and a lease that ran
  out meanwhile is taken again: etcd is not this host's liveness signal.
- Every connection to the controller is authenticated with the cluster secret
  (`eep.security.channel`): the agent's own, and each rank's, which the agent opens,
  authenticates and introduces (`RankConnect`) the moment it is asked, then hands to the rank
  (`Handover`, with the descriptor, on the socketpair the rank is started with; the controller
  never waits for a rank's imports): steps never pass through the agent.
- The agent follows the controller: no message (`Announce` comes every heartbeat interval as
  a ping) for `controller_timeout_s`, or its connection closed, and the agent kills its ranks,
  removes what it created and exits. Nothing is left behind on a host whose head is gone.

Run as `eep serve --nnodes N --node-rank i --dist-init-addr HOST:PORT --cluster-secret-file F`
(i >= 1).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from multiprocessing.connection import wait

from eep.errors import EepError
from eep.runtime import wire
from eep.runtime.codec import encode
from eep.runtime.fork_server import ForkedProcess
from eep.runtime.host_resources import HostResources
from eep.runtime.launch import send_with_fd
from eep.security.channel import Channel, client_handshake
from eep.security.secret import ClusterSecret

logger = logging.getLogger(__name__)


class AgentError(EepError):
    """The agent cannot reach its controller or set its host up."""


@dataclass(slots=True)
class _Rank:
    rank: int
    proc: subprocess.Popen[bytes] | ForkedProcess
    pidfd: int
    pipe: socket.socket | None = None  # our end of its socketpair: a new head's connection is handed on it


class HostAgent:
    def __init__(self, node: int, controller: str, secret: ClusterSecret, *, start_timeout_s: float = 120.0,
                 controller_timeout_s: float | None = None) -> None:
        self.node, self.controller, self.secret = node, controller, secret
        self.start_timeout_s = start_timeout_s
        self.controller_timeout_s = controller_timeout_s
        self.epoch = 0
        self._ranks: dict[int, _Rank] = {}
        self._host: HostResources | None = None  # segment, board, backup (and its server), fork server, cores
        self._conn: Channel | None = None
        self._store = None  # etcd, when the instance keeps its membership there
        self._registration = None  # this host's listing in it
        self._clean = False  # the controller shut the instance down (its ranks were stopped)
        self._setup: wire.HostSetup | None = None

    # -- life ----------------------------------------------------------------------------------
    def run(self) -> int:
        """Serve the controller until it shuts the instance down (0) or is lost (1): with etcd,
        lost only once no new head leads within `follow_s` (`_follow`)."""
        try:
            setup = self._join()
            while True:
                code = self._serve(setup)
                if code == 0 or not self._follow(setup):
                    return code
        finally:
            self.close()

    def _follow(self, setup: wire.HostSetup) -> bool:
        """The controller is gone: wait for a new head in etcd's leader key (a standby that took
        over), for up to max(10 s, 6 x the failure timeout); connect to it and offer it this
        host's running ranks (`AgentHello.ranks`). False: none came, or it did not set us up."""
        if self._store is None:
            return False
        deadline = time.monotonic() + max(10.0, 6 * setup.failure_timeout_s)
        gone = self.controller
        logger.warning("node %d: the head at %s is gone; looking for a new one in etcd (ranks %s kept)", self.node,
                       gone, sorted(self._ranks))
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        while time.monotonic() < deadline:
            try:
                leader = self._store.leader()
            except EepError as e:
                logger.warning("node %d: etcd: %s", self.node, e)
                leader = None
            control = (leader or {}).get("info", {}).get("control")
            if isinstance(control, str) and control != gone:
                try:
                    self._connect(control, {r.rank: r.proc.pid for r in self._ranks.values()})
                    logger.info("node %d: following the new head %s at %s", self.node, leader["head"], control)
                    return True
                except (AgentError, OSError) as e:
                    logger.warning("node %d: the new head at %s: %s", self.node, control, e)
            time.sleep(0.2)
        logger.error("node %d: no new head within the wait; stopping this host's ranks", self.node)
        return False

    def _connect(self, controller: str, ranks: dict[int, int]) -> None:
        """Connect to the head at `controller` as this host's agent and take its HostSetup (a new
        head's: this host keeps what it has)."""
        sock = wire.connect(controller, timeout_s=2.0)
        try:
            conn = client_handshake(wire.tune(sock), self.secret.key("control handshake"), peer=controller)
        except OSError:
            sock.close()
            raise
        address = sock.getsockname()[0]
        wire.send(conn, wire.AgentHello(self.epoch, self.node, address, os.getpid(), ranks))
        deadline = time.monotonic() + self.start_timeout_s
        setup = None
        while not isinstance(setup, wire.HostSetup):
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                conn.close()
                raise AgentError(f"node {self.node}: no host set-up from {controller}")
            try:
                setup = wire.recv(conn, wire.TO_AGENT)
            except (EOFError, OSError) as e:
                conn.close()
                raise AgentError(f"node {self.node}: {controller} closed before the host set-up ({e})") from None
        self.epoch = max(self.epoch, setup.epoch)
        wire.bound_sends(conn, setup.failure_timeout_s)
        self.controller, self._conn = controller, conn

    def _join(self) -> wire.HostSetup:
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            try:
                sock = wire.connect(self.controller, timeout_s=2.0)
                break
            except OSError as e:
                if time.monotonic() > deadline:
                    raise AgentError(f"node {self.node}: no controller at {self.controller} within "
                                     f"{self.start_timeout_s:g} s ({e})") from None
                time.sleep(0.2)
        address = sock.getsockname()[0]  # the interface that reaches the controller
        try:
            self._conn = client_handshake(wire.tune(sock), self.secret.key("control handshake"), peer=self.controller)
        except OSError as e:
            sock.close()
            raise AgentError(f"node {self.node}: {e}") from None
        wire.send(self._conn, wire.AgentHello(0, self.node, address, os.getpid()))
        setup = None
        while not isinstance(setup, wire.HostSetup):  # pings (Announce) may come first
            if not self._conn.poll(max(0.0, deadline - time.monotonic())):
                raise AgentError(f"node {self.node}: the controller sent no host set-up within {self.start_timeout_s:g} s")
            try:
                setup = wire.recv(self._conn, wire.TO_AGENT)
            except (EOFError, OSError) as e:
                raise AgentError(f"node {self.node}: the controller's connection ended before the host set-up "
                                 f"({e or 'closed'})") from None
        self.epoch = setup.epoch
        self._setup = setup
        wire.bound_sends(self._conn, setup.failure_timeout_s)  # a vanished controller never blocks a beat
        if self.controller_timeout_s is None:
            self.controller_timeout_s = 2 * setup.failure_timeout_s
        if setup.backup_masks is not None:
            import torch

            torch.set_num_threads(1)  # a host that returns builds its backup while its peers serve: one core at most
        self._host = HostResources(
            setup.num_ranks, layout=setup.layout, heartbeats=True,
            backup_mask=setup.backup_masks[self.node] if setup.backup_masks is not None else None,
            model_path=setup.model_path, dtype=setup.dtype, cpu_affinity=setup.cpu_affinity,
            fork_server=setup.fork_server, start_timeout_s=self.start_timeout_s, secret=self.secret)
        if setup.backup_masks is not None:
            from eep.runtime.backup_server import backup_address

            port = wire.split_addr(self.controller)[1]
            self._host.serve_backup(backup_address(address, port, setup.num_ranks, self.node))
        if setup.etcd_endpoints:
            self._register(setup, address)
        logger.info("node %d: joined controller %s as %s (segment %s)", self.node, self.controller, address,
                    self._host.names()["rendezvous"])
        return setup

    def _register(self, setup: wire.HostSetup, address: str) -> None:
        """List this host in etcd under a lease it keeps alive (`hosts()` of the store): the slow,
        authoritative record of which hosts are up, for operators and a standby head."""
        from eep.membership.store import EtcdStore, HostRegistration

        self._store = EtcdStore(list(setup.etcd_endpoints), setup.instance, timeout_s=setup.failure_timeout_s,
                                credentials=self.secret.etcd_credentials(setup.instance))
        self._registration = HostRegistration(self._store, f"node{self.node}", {"address": address, "pid": os.getpid()},
                                              ttl_s=max(2.0, 2 * setup.failure_timeout_s))

    def _serve(self, setup: wire.HostSetup) -> int:
        assert self._conn is not None and self._host is not None and self._host.board is not None
        board = self._host.board
        interval = setup.heartbeat_interval_s
        last_heard = time.monotonic()
        next_beat = time.monotonic()
        while True:
            now = time.monotonic()
            if now - last_heard > self.controller_timeout_s:  # type: ignore[operator]
                logger.error("node %d: nothing from the controller for %.2f s: it is gone", self.node, now - last_heard)
                return 1
            if now >= next_beat:
                ages = {r: board.age_s(r) for r in self._ranks}
                try:
                    wire.send(self._conn, wire.Beats(self.epoch, ages))
                except OSError:
                    logger.error("node %d: the controller's connection is closed", self.node)
                    return 1
                next_beat = now + interval
            handles: list[object] = [self._conn, *(r.pidfd for r in self._ranks.values())]
            ready = wait(handles, max(0.0, next_beat - time.monotonic()))  # type: ignore[arg-type]
            for r in [r for r in self._ranks.values() if r.pidfd in ready]:
                self._reap(r)
            if self._conn in ready:
                try:
                    msg = wire.recv(self._conn, wire.TO_AGENT)
                except (EOFError, OSError) as e:
                    logger.error("node %d: the controller's connection ended (%s)", self.node, e or "closed")
                    return 1
                last_heard = time.monotonic()
                if isinstance(msg, wire.Shutdown):
                    logger.info("node %d: shutdown (%s)", self.node, msg.reason)
                    self._clean = True
                    return 0
                self._handle(msg)

    def _handle(self, msg: object) -> None:
        assert self._host is not None
        if isinstance(msg, wire.Announce):
            if msg.epoch > self.epoch:
                self.epoch = msg.epoch
                self._host.announce_epoch(msg.epoch)
        elif isinstance(msg, wire.SpawnRank):
            self._spawn(msg)
        elif isinstance(msg, wire.AdoptRank):
            self._adopt(msg)
        elif isinstance(msg, wire.KillRank):
            r = self._ranks.get(msg.rank)
            if r is not None and r.proc.pid == msg.pid and r.proc.poll() is None:
                r.proc.kill()
        else:
            logger.warning("node %d: ignored %s from the controller (sent once, at the start)", self.node,
                           type(msg).__name__)

    # -- ranks ---------------------------------------------------------------------------------
    def _spawn(self, msg: wire.SpawnRank) -> None:
        assert self._host is not None and self._host.board is not None and self._conn is not None
        old = self._ranks.get(msg.rank)
        if old is not None:  # the controller reaps before it replaces; make sure
            old.proc.kill()
            self._reap(old)
        self._host.board.reset(msg.rank)
        host_local: dict[str, str | None] = {**self._host.names(), "death_notice": None}
        assert self._setup is not None
        # the rank's own control connection, opened and authenticated here at once (no wait for
        # the rank's start: the controller waits for this RankConnect), then handed to the rank
        try:
            sock = wire.tune(wire.connect(self.controller, timeout_s=5.0),
                             send_timeout_s=self._setup.failure_timeout_s)  # the rank's sends: bounded as well
        except OSError as e:
            logger.warning("node %d: cannot reach the controller for rank %d: %s", self.node, msg.rank, e)
            return
        with sock:
            try:
                conn = client_handshake(sock, self.secret.key("control handshake"), peer=self.controller)
            except OSError as e:
                logger.warning("node %d: rank %d's connection was refused: %s", self.node, msg.rank, e)
                return
            ours, theirs = socket.socketpair()
            with theirs:
                # never waits for a fork server's imports: this loop must keep beating
                proc = self._host.start_process(theirs.fileno())
                try:
                    wire.send(conn, wire.RankConnect(self.epoch, msg.rank, msg.nonce, proc.pid, host_local))
                    self._hand_over(ours, msg.rank, conn, sock)
                except OSError as e:
                    logger.warning("node %d: rank %d (pid %d) could not be handed its connection: %s", self.node,
                                   msg.rank, proc.pid, e)
        # on the least-loaded core beside this host's running ranks, as node 0 spreads its own;
        # set as early as can be, so the threads it makes next (torch, ZeroMQ) inherit it
        self._host.cores.place(msg.rank, proc.pid, [r for r in self._ranks if r != msg.rank])
        self._ranks[msg.rank] = _Rank(msg.rank, proc, os.pidfd_open(proc.pid), ours)
        logger.info("node %d: started rank %d (pid %d)", self.node, msg.rank, proc.pid)

    def _hand_over(self, pipe: socket.socket, rank: int, conn: Channel, sock: socket.socket) -> None:
        """Give `rank` its control connection `conn` (over `sock`) with its session state."""
        session, sent, received = conn.state()
        handover = wire.Handover(self.epoch, rank, self.controller, self.secret.raw, session, sent, received)
        send_with_fd(pipe, encode(handover), sock.fileno())

    def _adopt(self, msg: wire.AdoptRank) -> None:
        """A new head takes a running rank over: its new control connection, opened and
        introduced here, handed to it on its socketpair (its weights, KV cache and data plane
        stay as they are)."""
        r = self._ranks.get(msg.rank)
        if r is None or r.proc.pid != msg.pid or r.proc.poll() is not None or r.pipe is None:
            logger.warning("node %d: asked to hand rank %d (pid %d) over, which does not run here", self.node,
                           msg.rank, msg.pid)
            return
        assert self._host is not None and self._setup is not None
        host_local: dict[str, str | None] = {**self._host.names(), "death_notice": None}
        try:
            sock = wire.tune(wire.connect(self.controller, timeout_s=5.0), send_timeout_s=self._setup.failure_timeout_s)
        except OSError as e:
            logger.warning("node %d: cannot reach the new head for rank %d: %s", self.node, msg.rank, e)
            return
        with sock:
            try:
                conn = client_handshake(sock, self.secret.key("control handshake"), peer=self.controller)
                wire.send(conn, wire.RankConnect(self.epoch, msg.rank, msg.nonce, msg.pid, host_local))
                self._hand_over(r.pipe, msg.rank, conn, sock)
            except OSError as e:
                logger.warning("node %d: rank %d could not be handed over: %s", self.node, msg.rank, e)
                return
        logger.info("node %d: rank %d (pid %d) handed to the head at %s", self.node, msg.rank, msg.pid, self.controller)

    def _reap(self, r: _Rank) -> None:
        try:
            code = r.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            r.proc.kill()
            code = r.proc.wait(timeout=5)
        os.close(r.pidfd)
        if r.pipe is not None:
            r.pipe.close()
        if self._ranks.get(r.rank) is r:
            del self._ranks[r.rank]
        logger.info("node %d: rank %d (pid %d) exited with code %s", self.node, r.rank, r.proc.pid, code)
        if self._conn is not None:
            try:
                wire.send(self._conn, wire.RankExited(self.epoch, r.rank, r.proc.pid, code))
            except OSError:
                pass

    def close(self) -> None:
        """Stop every rank (they were told to stop by the controller, or it is gone), remove the
        segment, the board and the backup. Idempotent."""
        # After a Shutdown the controller has stopped the ranks already; once it is lost nobody
        # will: a rank blocked in a step would wait out its data-plane timeout.
        deadline = time.monotonic() + (2.0 if self._clean else 0.0)
        for r in list(self._ranks.values()):
            try:
                r.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.kill(r.proc.pid, signal.SIGKILL)  # also ends a stopped one
                r.proc.wait(timeout=5)
            os.close(r.pidfd)
            if r.pipe is not None:
                r.pipe.close()
        self._ranks = {}
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._registration is not None:
            self._registration.close()  # etcd unreachable: the lease ends at its TTL anyway
            self._registration = None
        if self._store is not None:
            self._store.close()
            self._store = None
        if self._host is not None:
            self._host.close()
            self._host = None


def main(node: int, controller: str, secret: ClusterSecret) -> int:
    agent = HostAgent(node, controller, secret)
    try:
        return agent.run()
    except AgentError as e:
        logger.error("%s", e)
        return 2
