"""The other hosts of a multi-host instance, as the controller sees them.

What this module promises:
- `HostListener` listens on the instance's `--dist-init-addr`: the door to the instance from
  every other host. A connection must first prove that it holds the cluster secret
  (`eep.security.channel.server_handshake`, on a thread of its own, bounded in time and in
  number); one that does not is closed with one WARNING naming its address
  (`eep.security.rejections`) and nothing else happens. Then it introduces itself by its first
  message: an agent (`AgentHello`) becomes an `AgentLink`; a rank's own control connection
  (`RankConnect`) is handed, by its nonce, to the `spawn` that asked for it (an unknown nonce
  is refused); a standby head (`StandbyHello`) to `on_standby` (the journal's replication feed;
  refused where there is none).
- `AgentLink` reads its agent in a thread of its own: heartbeat ages (`Beats`), exits
  (`RankExited`, which also wakes the controller through `wake_fd`), and pings the agent with
  the committed epoch every heartbeat interval (`Announce`). `age_s(rank)` is an upper bound
  of the time since the rank's last heartbeat: the age the agent read plus the time since
  that report, so a host whose agent went silent (link down, host gone) ages as a whole.
- `RemoteProcess` gives a remote rank the surface of `subprocess.Popen` the executor uses
  (`pid`, `poll`, `kill`, `wait`): exit codes come from the agent; `wait` never blocks longer
  than asked, also when the host is unreachable.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Callable

from eep.errors import EepError
from eep.runtime import wire
from eep.security.channel import (
    HANDSHAKE_TIMEOUT_S,
    Channel,
    ProtocolError,
    server_handshake,
)
from eep.security.rejections import Rejections
from eep.security.secret import ClusterSecret

logger = logging.getLogger(__name__)

_MAX_HANDSHAKES = 32  # connections being authenticated at once; more are closed at once


class HostError(EepError):
    """A host agent is missing, or did not do what was asked in time."""


class AgentLink:
    def __init__(self, hello: wire.AgentHello, conn: Channel, interval_s: float, wake_w: int) -> None:
        self.node, self.address, self.pid = hello.node, hello.address, hello.pid
        self.ranks = dict(hello.ranks)  # rank -> pid: the running ranks it offered a head that took over
        self.conn, self.interval_s = conn, interval_s
        self.epoch = 0  # the controller's committed epoch, sent as the ping
        self.last_heard = time.monotonic()
        self.closed = False
        self.ready = threading.Event()  # its host is set up (its first Beats came)
        self._wake_w = wake_w
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._ages: dict[int, tuple[float, float]] = {}  # rank -> (reported age, monotonic at receipt)
        self._exits: dict[int, int | None] = {}  # pid -> exit code
        self._thread = threading.Thread(target=self._run, name=f"eep-agent-{self.node}", daemon=True)
        self._thread.start()

    def send(self, message: object) -> None:
        with self._send_lock:
            wire.send(self.conn, message)

    def _run(self) -> None:
        next_ping = time.monotonic()
        while not self.closed:
            try:
                if time.monotonic() >= next_ping:
                    self.send(wire.Announce(self.epoch))
                    next_ping = time.monotonic() + self.interval_s
                if not self.conn.poll(max(0.0, next_ping - time.monotonic())):
                    continue
                msg = wire.recv(self.conn, wire.FROM_AGENT)
            except (EOFError, OSError) as e:
                if not self.closed:
                    why = f" ({e})" if isinstance(e, ProtocolError) else ""
                    logger.warning("node %d: the agent's connection closed%s", self.node, why)
                break
            now = time.monotonic()
            self.last_heard = now
            if isinstance(msg, wire.Beats):
                with self._cond:
                    for r, age in msg.ages_s.items():
                        self._ages[r] = (age, now)
                self.ready.set()
            elif isinstance(msg, wire.RankExited):
                with self._cond:
                    self._exits[msg.pid] = msg.code
                    self._cond.notify_all()
                os.write(self._wake_w, b"x")
        self.closed = True
        with self._cond:
            self._cond.notify_all()

    def expect(self, rank: int) -> None:
        """A new process for `rank` is starting: it counts as beating from now on."""
        with self._cond:
            self._ages[rank] = (0.0, time.monotonic())

    def age_s(self, rank: int) -> float:
        with self._cond:
            age, at = self._ages.get(rank, (0.0, self.last_heard))
        return age + time.monotonic() - at

    def silent_s(self) -> float:
        return time.monotonic() - self.last_heard

    def exit_code(self, pid: int) -> tuple[bool, int | None]:
        with self._cond:
            return pid in self._exits, self._exits.get(pid)

    def wait_exit(self, pid: int, timeout_s: float) -> bool:
        """Wait for `pid`'s exit to be relayed; False after `timeout_s`, or at once if the agent is
        gone or has been silent for a second (its host is unreachable: nothing will be relayed)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while pid not in self._exits and not self.closed:
                left = deadline - time.monotonic()
                if left <= 0 or self.silent_s() > max(1.0, 5 * self.interval_s):
                    return False
                self._cond.wait(min(left, self.interval_s))
            return pid in self._exits

    def close(self) -> None:
        self.closed = True
        self._thread.join(2 * self.interval_s + 1.0)
        self.conn.close()


class RemoteProcess:
    """A rank process on another host (the part of `subprocess.Popen` the executor uses)."""

    def __init__(self, link: AgentLink, rank: int, pid: int) -> None:
        self.link, self.rank, self.pid = link, rank, pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        exited, code = self.link.exit_code(self.pid)
        if exited:
            self.returncode = code if code is not None else -9
        return self.returncode

    def kill(self) -> None:
        if self.poll() is None and not self.link.closed:
            try:
                self.link.send(wire.KillRank(self.link.epoch, self.rank, self.pid))
            except OSError:
                pass

    def wait(self, timeout: float | None = None) -> int:
        if not self.link.wait_exit(self.pid, 30.0 if timeout is None else timeout):
            raise subprocess.TimeoutExpired(f"rank {self.rank} on node {self.link.node}", timeout or 30.0)
        return self.poll()  # type: ignore[return-value]


class HostListener:
    """Accepts agents and ranks' control connections on the instance's address."""

    def __init__(self, addr: str, interval_s: float, setup: wire.HostSetup, secret: ClusterSecret) -> None:
        self.addr, self.interval_s, self.setup = addr, interval_s, setup
        self._key = secret.key("control handshake")
        # an agent this long silent is not asked to start anything (a start would only wait for it)
        self.silent_after_s = min(setup.failure_timeout_s / 2, 5 * interval_s)
        self._sock = wire.listen(addr)
        self._sock.settimeout(0.2)
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.agents: dict[int, AgentLink] = {}
        self._ranks: dict[str, tuple[Channel, wire.RankConnect]] = {}
        self._expected: set[str] = set()  # nonces of the spawns waiting for their rank's connection
        self._cond = threading.Condition()
        self._closed = False
        self.rejections = Rejections("controller")
        self._handshakes = threading.BoundedSemaphore(_MAX_HANDSHAKES)
        self.epoch = setup.epoch  # the committed epoch (the controller keeps it current)
        # a standby head's connection goes here (the journal's replication feed), once there is one
        self.on_standby: Callable[[Channel, wire.StandbyHello], None] | None = None
        self._thread = threading.Thread(target=self._accept, name="eep-host-listener", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                sock, peer = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            if not self._handshakes.acquire(blocking=False):
                self.rejections.reject(peer, f"more than {_MAX_HANDSHAKES} connections are being authenticated")
                sock.close()
                continue
            threading.Thread(target=self._introduce, args=(sock, peer), name="eep-handshake", daemon=True).start()

    def _introduce(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        """Authenticate one connection and take its first message (on a thread of its own)."""
        try:
            try:
                wire.tune(sock, send_timeout_s=self.setup.failure_timeout_s)  # a cut-off peer never blocks us
                conn = server_handshake(sock, self._key, peer=f"{peer[0]}:{peer[1]}")
                first = wire.recv(conn, wire.INTRODUCTION, timeout_s=HANDSHAKE_TIMEOUT_S)
            except EOFError:
                self.rejections.reject(peer, "closed before it introduced itself")
                sock.close()
                return
            except OSError as e:  # AuthError, ProtocolError, a reset
                self.rejections.reject(peer, str(e))
                sock.close()
                return
            if self._closed:
                conn.close()
            elif isinstance(first, wire.AgentHello):
                self._add_agent(first, conn)
            elif isinstance(first, wire.StandbyHello):
                if self.on_standby is None:
                    self.rejections.reject(peer, "a standby head, but this head replicates to none (no --http)")
                    conn.close()
                else:
                    self.on_standby(conn, first)
            else:
                self._add_rank(first, conn, peer)
        finally:
            self._handshakes.release()

    def _add_agent(self, hello: wire.AgentHello, conn: Channel) -> None:
        try:
            wire.send(conn, dataclasses.replace(self.setup, epoch=self.epoch))
        except OSError:
            conn.close()
            return
        link = AgentLink(hello, conn, self.interval_s, self.wake_w)
        link.epoch = self.epoch
        with self._cond:
            old = self.agents.get(hello.node)
            self.agents[hello.node] = link
            self._cond.notify_all()
        if old is not None:
            old.close()
        logger.info("node %d: agent %s (pid %d) connected", hello.node, hello.address, hello.pid)

    def _add_rank(self, hello: wire.RankConnect, conn: Channel, peer: tuple[str, int]) -> None:
        with self._cond:
            if hello.nonce in self._expected:
                self._expected.discard(hello.nonce)
                self._ranks[hello.nonce] = (conn, hello)
                self._cond.notify_all()
                return
        self.rejections.reject(peer, f"a connection for rank {hello.rank} that no start asked for")
        conn.close()

    def wait_agents(self, nodes: range | list[int], timeout_s: float, *, some: bool = False) -> dict[int, AgentLink]:
        """Every node's agent, connected and its host set up (segment, board, backup made).
        `some`: those that came within `timeout_s` (at least one; a head that took over)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            if not self._cond.wait_for(lambda: all(n in self.agents for n in nodes), timeout_s):
                missing = [n for n in nodes if n not in self.agents]
                if not some or len(missing) == len(nodes):
                    raise HostError(f"no agent of node(s) {missing} connected to {self.addr} within {timeout_s:g} s: "
                                    f"start `eep serve --node-rank N --dist-init-addr {self.addr}` on each")
                logger.warning("node(s) %s did not follow within %.0f s: their ranks are lost", missing, timeout_s)
            agents = {n: self.agents[n] for n in nodes if n in self.agents}
        for n, link in agents.items():
            if not link.ready.wait(max(0.0, deadline - time.monotonic())):
                raise HostError(f"node {n}'s agent did not set its host up within {timeout_s:g} s")
        return agents

    def agent(self, node: int) -> AgentLink | None:
        """node's agent once its host is set up and while it talks (silent for half the failure
        timeout: its host is unreachable, and asking it to start a rank would only wait)."""
        link = self.agents.get(node)
        if link is None or link.closed or not link.ready.is_set() or link.silent_s() > self.silent_after_s:
            return None
        return link

    def spawn(self, node: int, rank: int, epoch: int, timeout_s: float = 5.0) -> tuple[Channel, wire.RankConnect]:
        """Ask node's agent to start `rank`; returns the rank's control connection to us."""
        return self._ask(node, rank, "start", lambda nonce: wire.SpawnRank(epoch, rank, nonce), timeout_s)

    def adopt(self, node: int, rank: int, pid: int, epoch: int,
              timeout_s: float = 5.0) -> tuple[Channel, wire.RankConnect]:
        """A head that took over: ask node's agent for a new control connection of its running
        `rank` (process `pid`); returns it (the rank's first message on it: `Adopted`)."""
        conn, hello = self._ask(node, rank, "hand over",
                                lambda nonce: wire.AdoptRank(epoch, rank, pid, nonce), timeout_s)
        if hello.pid != pid:
            conn.close()
            raise HostError(f"node {node} handed over pid {hello.pid} for rank {rank}, not {pid}")
        return conn, hello

    def _ask(self, node: int, rank: int, what: str, message: Callable[[str], object],
             timeout_s: float) -> tuple[Channel, wire.RankConnect]:
        link = self.agent(node)
        if link is None:
            raise HostError(f"node {node} has no agent: rank {rank} cannot {what}")
        nonce = secrets.token_hex(16)
        with self._cond:
            self._expected.add(nonce)
        try:
            link.send(message(nonce))
        except OSError as e:
            with self._cond:
                self._expected.discard(nonce)
            raise HostError(f"node {node}'s agent is unreachable ({e})") from None
        with self._cond:
            if not self._cond.wait_for(lambda: nonce in self._ranks, timeout_s):
                self._expected.discard(nonce)  # a connection that comes later is refused
                raise HostError(f"node {node} did not {what} rank {rank} within {timeout_s:g} s")
            conn, hello = self._ranks.pop(nonce)
        link.expect(rank)
        return conn, hello

    def drain_wake(self) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self, reason: str = "the instance stops") -> None:
        self._closed = True
        self._thread.join(1.0)
        self._sock.close()
        for link in list(self.agents.values()):
            if not link.closed:
                try:
                    link.send(wire.Shutdown(link.epoch, reason))
                except OSError:
                    pass
            link.close()
        self.agents = {}
        with self._cond:
            for conn, _ in self._ranks.values():
                conn.close()
            self._ranks = {}
        os.close(self.wake_r)
        os.close(self.wake_w)
