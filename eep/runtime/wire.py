"""The control plane's messages and connections: controller, host agents and ranks.

What this module promises:
- Every message is a frozen dataclass with typed fields and carries the epoch of its sender's
  view. Messages are encoded by `eep.runtime.codec` (MessagePack, never pickle) and a receiver
  decodes only the classes it expects at that point (`Protocol`s below): anything else drops
  the connection (`ProtocolError`).
- Connections are `eep.security.channel.Channel`s. Across hosts every one is authenticated
  before a byte of payload is read: the peer proves it holds the cluster secret
  (`eep.security.secret`) and every frame carries a tag under the session key. On one host a
  rank's control pipe is a socketpair its host made itself, the same framing without tags.
- `connect` and `listen` make the TCP sockets: TCP_NODELAY, keepalive (a peer that vanished
  with its host is also noticed by the kernel), and every connect bounded by a timeout.

Who sends what:
    agent -> controller: AgentHello (the first message of an agent's connection), Beats (every
                         heartbeat interval: the ages of its ranks' heartbeats), RankExited
    controller -> agent: HostSetup (once, after AgentHello), SpawnRank, AdoptRank (a new head
                         takes a running rank over), KillRank, Announce
                         (every committed epoch, and every heartbeat interval as a ping), Shutdown
    host -> rank, on the socketpair it starts the rank with: Launch (node 0: this socketpair is
                         the rank's control pipe) or Handover (another host: with it, the TCP
                         connection the agent opened to the controller for the rank,
                         authenticated and introduced by RankConnect, and its session state)
    host <-> fork server: Fork (with the rank's control pipe as a file descriptor) / ForkerReady,
                         Forked, ChildExited (local and of no view: these carry no epoch)
    head -> standby:     after StandbyHello, the journal of requests: a snapshot, then every
                         change (JournalAdmit, JournalTokens, JournalState; Announce as a ping)
    controller -> rank:  RankSpec (first), then StepOrder, SetRouting, Repair, MoveExperts, QueryPtrs,
                         Stop, Fence
    rank -> controller:  Ready (once; Adopted to a head that took it over), StepDone, PeerSilent, StepAbandoned, RoutingSet, Repaired,
                         MovesAccepted, Ptrs or Refused, each with the epoch of the request it answers: the
                         controller's reply loop drops an answer of an older epoch than the
                         request it waits on (`eep.control.replies`)
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from eep.dataplane.shm import ShmLayout
from eep.engine.sampling import SamplingParams
from eep.engine.worker import SeqWork
from eep.placement.routing import Placement
from eep.runtime.codec import Protocol, encode
from eep.security.channel import Channel

if TYPE_CHECKING:
    from eep.model.loader import SlotRange


# -- controller <-> agent ------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class AgentHello:
    epoch: int
    node: int
    address: str  # the host's address as the controller reaches it (data-plane sockets bind there)
    pid: int
    # rank -> pid of the ranks it runs: an agent that follows a new head (its ranks, adoptable)
    ranks: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class HostSetup:
    epoch: int
    layout: ShmLayout  # the host's data-plane segment (global rank numbering)
    num_ranks: int
    model_path: str
    dtype: str
    backup_masks: dict[int, torch.Tensor] | None  # node -> [L, E] bool: what its expert backup keeps (None: none)
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
class AdoptRank:
    """A new head takes the running `rank` (process `pid`) over: the agent opens and introduces
    the rank's new control connection (`RankConnect` with `nonce`) and hands it to the rank."""

    epoch: int
    rank: int
    pid: int
    nonce: str


@dataclass(frozen=True, slots=True)
class RankConnect:
    epoch: int
    rank: int
    nonce: str
    pid: int
    host_local: dict[str, str | None]  # the host's names the rank attaches to (segment, board, backup, notice)


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


# -- controller <-> rank ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RankSpec:
    """Everything a rank process needs to start."""

    rank: int
    num_ranks: int
    model_path: str
    dtype: str
    max_num_seqs: int
    max_model_len: int
    placement: Placement
    backend: str  # "shm" | "gloo"
    rendezvous: str  # shm: segment name; gloo: init_method (file://...)
    timeout_s: float  # every data-plane wait
    poll_s: float = 1.0  # how often an idle rank checks that its supervisor is alive
    heartbeat: str | None = None  # the controller's heartbeat board (shm file name)
    heartbeat_interval_s: float = 0.1
    backup: str | None = None  # the host expert backup (shm file name), a repair source
    death_notice: str | None = None  # the mutex this process holds for life (eep.runtime.death_notice)
    held: torch.Tensor | None = None  # [L, P] experts to load into the slots (default: placement's)
    epoch: int = 0  # the controller's epoch when it started this process (its `Ready` carries it)
    data_addresses: tuple[str, ...] | None = None  # multi-host: every rank's ZeroMQ address
    node_of: tuple[int, ...] | None = None  # multi-host: every rank's node (shm within one, ZeroMQ across)
    backup_addresses: tuple[str, ...] | None = None  # multi-host: each node's expert backup server
    backup_timeout_s: float = 2.0  # the longest wait for another host's backup (then: the disk)
    data_plane_curve: bool = True  # multi-host: the data addresses authenticate and encrypt (CURVE)
    peer_addresses: tuple[str, ...] | None = None  # every rank's expert row server (a rebalance's peer source)
    count_expert_load: bool = False  # count the router's choices (elastic membership only: eep.model.expert_load)

    @property
    def slots(self) -> SlotRange:
        from eep.model.loader import SlotRange

        per_rank = self.placement.num_physical // self.num_ranks
        return SlotRange(self.rank * per_rank, per_rank)


@dataclass(frozen=True, slots=True)
class StepOrder:
    """The executor's order to run one step: under which view, and this rank's share of it."""

    epoch: int
    active: tuple[int, ...]  # ranks exchanging in this step, ascending
    work: list[SeqWork]
    report_load: bool = False  # answer with the expert load counted since the last report


@dataclass(frozen=True, slots=True)
class StepResult:
    """A rank's answer to one step."""

    tokens: list[int]  # one per chunk that samples, in the order of the step's work
    compute_s: float  # wall time of the whole step on this rank
    exchange_s: tuple[float, ...]  # of which each dispatch and combine call, in order (lockstep:
    # the same sequence of calls on every rank)
    cpu_ns: int = 0  # this process's CPU time so far (every thread, user + system)
    heartbeat_ns: int = 0  # of which its heartbeat thread's (eep.runtime.accounting)
    load: torch.Tensor | None = None  # [L, E] int32: (token, k) pairs its routers sent to each expert since
    # the last report (only when the order asked: `report_load`)
    expert_s: float = 0.0  # CPU seconds of its expert compute (the slots' matmuls, between dispatch and combine)
    load_ns: int = 0  # its CPU time spent counting the expert load so far (eep.model.expert_load)
    moves_done: int = 0  # the last batch of moves (MoveExperts) this rank finished writing (0: none)
    moves_failed: str = ""  # why that batch did not finish ("": it did)

    @property
    def exchange_total_s(self) -> float:
        return sum(self.exchange_s)


@dataclass(frozen=True, slots=True)
class ExpertCopy:
    """A repair's or a rebalance's order to a rank: write `expert` of MoE layer `layer` into global
    slot `slot`, reading it from `source` ("peer", "backup" or "disk"): rank `source_rank`'s
    slots, or a backup on node `source_host` (None: this rank's own host)."""

    layer: int
    slot: int
    expert: int
    source: str
    source_host: int | None = None
    source_rank: int | None = None  # "peer": the rank whose slot holds it


@dataclass(frozen=True, slots=True)
class SetRouting:
    epoch: int
    placement: Placement  # switch the tables in place


@dataclass(frozen=True, slots=True)
class Repair:
    epoch: int
    interim: Placement  # the tables while the copies are written (their targets unlisted)
    copies: list[ExpertCopy]  # for this rank
    placement: Placement  # the tables once they are written


@dataclass(frozen=True, slots=True)
class MoveExperts:
    """A rebalance's copies for this rank, written on a thread of its own while steps run (their
    targets are slots no table lists); each later StepResult says when `batch` is done."""

    epoch: int
    batch: int
    copies: list[ExpertCopy]


@dataclass(frozen=True, slots=True)
class MovesAccepted:
    epoch: int
    batch: int


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
class Adopted:
    """A running rank's first message to the head that adopted it: what it holds and routes by."""

    epoch: int
    pid: int
    held: torch.Tensor  # [L, P] the expert each of its slots holds (-1 elsewhere)
    placement: Placement  # the routing tables it serves with


@dataclass(frozen=True, slots=True)
class StepDone:
    epoch: int
    result: StepResult


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


# -- host <-> its fork server, on the socketpair the host made (never a network path; no view) ---
@dataclass(frozen=True, slots=True)
class ForkerReady:
    """The fork server's imports are done: a fork takes milliseconds."""


@dataclass(frozen=True, slots=True)
class Fork:
    """Fork a rank serving the control pipe whose file descriptor comes with this message."""


@dataclass(frozen=True, slots=True)
class Forked:
    pid: int  # the new rank's


@dataclass(frozen=True, slots=True)
class ChildExited:
    pid: int
    code: int  # as subprocess reports it (negative: killed by that signal)


# -- host -> rank, on the socketpair the rank was started with (never a network path) ----------
@dataclass(frozen=True, slots=True)
class Launch:
    """Node 0: serve the controller on this socketpair; `spec` is the rank's."""

    epoch: int
    spec: RankSpec
    secret: bytes | None  # the cluster secret (multi-host: the data plane's CURVE keys derive from it)


@dataclass(frozen=True, slots=True)
class Handover:
    """Another host: the control connection to the controller that the agent opened and
    authenticated for this rank (and introduced by RankConnect) comes with this message, as a
    file descriptor; `session`, `sent` and `received` are its authentication state. The rank
    takes its RankSpec from it and serves it from then on."""

    epoch: int
    rank: int
    peer: str  # the controller's address
    secret: bytes  # the cluster secret (the data plane's CURVE keys derive from it)
    session: bytes
    sent: int
    received: int


# -- head -> standby head: the journal of requests (eep.serving.replication) --------------------
@dataclass(frozen=True, slots=True)
class StandbyHello:
    """The first message of a standby head's connection: it follows the journal from now on."""

    epoch: int
    node: int
    pid: int


@dataclass(frozen=True, slots=True)
class JournalChoice:
    prompt_ids: tuple[int, ...]
    params: SamplingParams  # the seed fixed


@dataclass(frozen=True, slots=True)
class JournalAdmit:
    """A request admitted (or, in the snapshot a standby starts from, one the journal holds)."""

    epoch: int
    rid: str
    kind: str  # "completion" | "chat"
    digest: str
    created: int
    choices: tuple[JournalChoice, ...]


@dataclass(frozen=True, slots=True)
class JournalTokens:
    """One stream event of one choice: the tokens a step committed and the text they added."""

    epoch: int
    rid: str
    choice: int
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None


@dataclass(frozen=True, slots=True)
class JournalState:
    """A choice stopped running on the head without finishing, or runs again there."""

    epoch: int
    rid: str
    choice: int
    state: str  # "running" | "interrupted" | "failed"
    detail: str = ""


INTRODUCTION = Protocol("the first message on the controller's port", (AgentHello, RankConnect, StandbyHello))
TO_STANDBY = Protocol("head to standby head", (JournalAdmit, JournalTokens, JournalState, Announce))
FROM_AGENT = Protocol("agent to controller", (Beats, RankExited))
TO_AGENT = Protocol("controller to agent", (HostSetup, Announce, SpawnRank, AdoptRank, KillRank, Shutdown))
RANK_SPEC = Protocol("the controller's first message to a rank", (RankSpec,))
TO_RANK = Protocol("controller to rank", (StepOrder, SetRouting, Repair, MoveExperts, QueryPtrs, Stop, Fence))
FROM_RANK = Protocol("rank to controller", (Ready, Adopted, StepDone, PeerSilent, StepAbandoned, RoutingSet, Repaired,
                                            MovesAccepted, Ptrs, Refused))
LAUNCH = Protocol("a host to the rank it starts", (Launch, Handover))
TO_FORK_SERVER = Protocol("a host to its fork server", (Fork,))
FROM_FORK_SERVER = Protocol("a fork server to its host", (ForkerReady, Forked, ChildExited))


def send(channel: Channel, message: object) -> None:
    """One message of this module; every one carries the epoch it is of."""
    if not isinstance(getattr(message, "epoch", None), int):
        raise TypeError(f"{type(message).__name__} carries no epoch: not a message of the wire")
    channel.send_bytes(encode(message))


def recv(channel: Channel, protocol: Protocol, timeout_s: float | None = None) -> Any:
    """The next message, one of `protocol`'s classes (ProtocolError otherwise; EOFError: closed)."""
    data = channel.recv_bytes() if timeout_s is None else channel.recv_bytes(timeout_s)
    return protocol.decode(data)


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


def bound_sends(conn: Channel | socket.socket, timeout_s: float) -> None:
    """Make a send on this connection that cannot go on for `timeout_s` fail with OSError
    instead of blocking for ever (SO_SNDTIMEO). A peer on a host that vanished without a FIN, or
    behind a cut link, stops taking bytes: once the kernel's buffer is full a plain send would
    hang its caller (the controller in a view change, an agent in its beat loop). A message may
    be left half sent: the channel then refuses further sends (the caller closes it)."""
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


def tune(sock: socket.socket, send_timeout_s: float | None = None) -> socket.socket:
    """TCP_NODELAY and keepalive on an accepted or connected socket; with `send_timeout_s`, its
    sends are bounded (`bound_sends`)."""
    _tune(sock)
    if send_timeout_s is not None:
        bound_sends(sock, send_timeout_s)
    return sock
