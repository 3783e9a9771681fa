"""The wire between the controller and the host agents of a multi-host instance.

What this module promises:
- Every message is a frozen dataclass and carries the epoch of its sender's view; a
  receiver ignores one from an epoch older than what it has already acted on (`stale`).
- Framing is `multiprocessing.connection` over TCP (length-prefixed), payloads are pickled:
  the peers are processes of the same eep installation inside one cluster; pickle is not
  a format to accept from anyone else.
- `connect` and `listen` make the sockets: TCP_NODELAY, keepalive (a peer that vanished with
  its host is also noticed by the kernel), and every connect bounded by a timeout.

Who sends what (agents):
    agent -> controller: AgentHello (first message of an agent's connection), Beats (every
                         heartbeat interval: the ages of its ranks' heartbeats), RankExited
    agent -> controller, on a rank's own connection: RankConnect (first message; then the
                         connection is the rank's control pipe, as the socketpair is on one host)
    controller -> agent: HostSetup (once, after AgentHello), SpawnRank, KillRank, Announce
                         (every committed epoch, and every heartbeat interval as a ping), Shutdown

Between the controller and a rank: the step order (`eep.runtime.rank.StepOrder`), `SetRouting`,
`Repair`, `QueryPtrs`, `Stop`, `Fence`; the rank answers `Ready` (once), `StepDone`,
`PeerSilent`, `StepAbandoned`, `RoutingSet`, `Repaired`, `Ptrs` or `Refused`, each with the
epoch of the request it answers.
"""

from __future__ import annotations

import os
import pickle
import socket
import struct
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from eep.dataplane.shm import ShmLayout


@dataclass(frozen=True, slots=True)
class AgentHello:
    epoch: int
    node: int
    address: str  # the host's address as the controller reaches it (data-plane sockets bind there)
    pid: int


@dataclass(frozen=True, slots=True)
class HostSetup:
    epoch: int
    layout: ShmLayout  # the host's data-plane segment (global rank numbering)
    num_ranks: int
    model_path: str
    dtype: str
    backup_masks: dict[int, Any] | None  # node -> [L, E] bool tensor: what its expert backup keeps (None: none)
    heartbeat_interval_s: float
    failure_timeout_s: float
    etcd_endpoints: tuple[str, ...] = ()  # where the agent keeps its host's lease (none: no lease)
    instance: str = "default"
    cpu_affinity: bool = True  # pin each rank to one of the host's cores, round-robin
    fork_server: bool = True  # fork the host's ranks from one interpreter (eep.runtime.fork_server)


@dataclass(frozen=True, slots=True)
class SpawnRank:
    epoch: int
    rank: int
    nonce: str  # names the rank's own connection back to the controller (RankConnect)


@dataclass(frozen=True, slots=True)
class RankConnect:
    epoch: int
    rank: int
    nonce: str
    pid: int
    host_local: dict[str, Any]  # the host's names the rank attaches to (segment, board, backup, notice)


@dataclass(frozen=True, slots=True)
class KillRank:
    epoch: int
    rank: int
    pid: int


@dataclass(frozen=True, slots=True)
class RankExited:
    epoch: int
    rank: int
    pid: int
    code: int | None  # None: seen dying (death notice), exit status not yet known


@dataclass(frozen=True, slots=True)
class Beats:
    epoch: int
    ages_s: dict[int, float]  # rank -> seconds since its last heartbeat, as the agent read them


@dataclass(frozen=True, slots=True)
class Announce:
    epoch: int  # the committed epoch: the agent announces it in its host's segment


@dataclass(frozen=True, slots=True)
class Shutdown:
    epoch: int
    reason: str


# -- controller <-> rank (the rank's control pipe: a socketpair on node 0, TCP elsewhere) ------
# The step order itself is `eep.runtime.rank.StepOrder` (epoch, active ranks, work).
@dataclass(frozen=True, slots=True)
class SetRouting:
    epoch: int
    placement: Any  # eep.placement.routing.Placement: switch the tables in place


@dataclass(frozen=True, slots=True)
class Repair:
    epoch: int
    interim: Any  # Placement: the tables while the copies are written (their targets unlisted)
    copies: list[Any]  # eep.runtime.rank.ExpertCopy for this rank
    placement: Any  # Placement: the tables once they are written


@dataclass(frozen=True, slots=True)
class QueryPtrs:
    epoch: int


@dataclass(frozen=True, slots=True)
class Stop:
    epoch: int


@dataclass(frozen=True, slots=True)
class Fence:
    epoch: int
    reason: str  # the view moved on without this process: it exits (code 3)


@dataclass(frozen=True, slots=True)
class Ready:
    epoch: int  # the epoch the rank was started in
    pid: int
    warmup_s: float | None  # a replacement's isolated warm-up


@dataclass(frozen=True, slots=True)
class StepDone:
    epoch: int
    result: Any  # eep.runtime.rank.StepResult


@dataclass(frozen=True, slots=True)
class PeerSilent:
    epoch: int
    peer: int  # the rank that sent nothing within the data-plane timeout


@dataclass(frozen=True, slots=True)
class StepAbandoned:
    epoch: int
    reason: str  # aborted by a newer epoch, or out of step: nothing of it is committed


@dataclass(frozen=True, slots=True)
class RoutingSet:
    epoch: int


@dataclass(frozen=True, slots=True)
class Repaired:
    epoch: int
    seconds: list[float]  # each copy's


@dataclass(frozen=True, slots=True)
class Ptrs:
    epoch: int
    ptrs: list[int]


@dataclass(frozen=True, slots=True)
class Refused:
    epoch: int
    reason: str  # a control request the rank cannot carry out (ConfigError)


def send(conn: Connection, message: object) -> None:
    """One message of this module (or a `StepOrder`); every one carries the epoch it is of."""
    if not isinstance(getattr(message, "epoch", None), int):
        raise TypeError(f"{type(message).__name__} carries no epoch: not a message of the wire")
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def recv(conn: Connection) -> Any:
    return pickle.loads(conn.recv_bytes())


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


def bound_sends(conn: Connection | socket.socket, timeout_s: float) -> None:
    """Make a send on this connection that cannot go on for `timeout_s` fail with OSError
    instead of blocking for ever (SO_SNDTIMEO). A peer on a host that vanished without a FIN, or
    behind a cut link, stops taking bytes: once the kernel's buffer is full a plain send would
    hang its caller (the controller in a view change, an agent in its beat loop). A message may
    be left half sent: the caller must treat the connection as broken and close it."""
    sec = int(timeout_s)
    timeval = struct.pack("ll", sec, max(1 if sec == 0 else 0, int((timeout_s - sec) * 1e6)))
    sock = socket.socket(fileno=os.dup(conn.fileno()))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
    finally:
        sock.close()


def split_addr(addr: str) -> tuple[str, int]:
    """'HOST:PORT' -> (host, port)."""
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {addr!r}")
    return host, int(port)


def connect(addr: str, timeout_s: float) -> socket.socket:
    """A blocking TCP connection to 'HOST:PORT', made within `timeout_s`."""
    sock = socket.create_connection(split_addr(addr), timeout=timeout_s)
    sock.settimeout(None)
    _tune(sock)
    return sock


def listen(addr: str) -> socket.socket:
    host, port = split_addr(addr)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(64)
    return sock


def accepted(sock: socket.socket, send_timeout_s: float | None = None) -> Connection:
    """The `Connection` of a socket from `accept` or `connect` (the Connection takes over its
    fd); with `send_timeout_s`, its sends are bounded (`bound_sends`)."""
    _tune(sock)
    if send_timeout_s is not None:
        bound_sends(sock, send_timeout_s)
    with sock:
        return Connection(sock.detach())
