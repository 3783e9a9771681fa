"""The data plane across hosts: ZeroMQ over TCP between hosts, shared memory within a host,
combined in one all-to-all (as DeepEP splits its intranode and internode paths).

What this module promises:
- `ZmqLink` is one rank's network side: a PULL socket bound at its data address, on which
  every remote peer's messages and the controller's aborts arrive, and one PUSH socket per
  remote peer. Every message carries (kind, source, epoch, step); a receiver files what
  arrives by source and takes exactly the (epoch, step) it waits for: older messages are
  dropped, a newer epoch raises `StaleEpoch`, a later step of the same epoch `OutOfStep`.
- Every wait is bounded: nothing from a peer within `timeout_s` raises `PeerTimeout` naming
  it; a send that cannot be queued within `timeout_s` (the peer's queue is full) too.
- The controller aborts a blocked wait at once by pushing an ABORT of a newer epoch to the
  rank's address (`AbortPusher`); waits also look at the host segment's announced epoch at
  least every 50 ms (the agent announces every committed epoch there), so an abort is seen
  even if the push was lost.
- With the cluster's CURVE keys (`eep.security.curve`, the default of a multi-host instance)
  every connection to a rank's data address is authenticated and encrypted, and only a holder
  of the cluster secret gets a frame in: a stranger's frame never reaches a combine. A frame
  larger than the largest message of a step is refused by libzmq (`MAXMSGSIZE`: its sender is
  disconnected), and one that is not (header, payload) of a known kind is dropped and counted.
- `HybridExchange` is the `Exchange` a rank of a multi-host instance uses: peers on its own
  host through the shm `Endpoint`, the others through its `ZmqLink`, in one call. A single-host
  instance never builds one (it keeps `ShmExchange` and its speed).

A rank's sockets live in one context per process (`data_context`) whose I/O thread never
preempts the rank. Sockets: `LINGER 0` (a closing rank never blocks on a dead peer),
`RECONNECT_IVL` 50 ms (a replacement at the same address is reached quickly), and on every
sending socket ZeroMQ heartbeats (200 ms, dropped after 1 s) with a 1 s connect timeout: not as
a failure detector (liveness is the controller's: heartbeats through the agents, and
`PeerTimeout`) but so that a connection to a host that vanished without a FIN or RST is dropped
and made again, and the first message to a replacement never goes into a dead connection.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence

import torch
import zmq

from eep.dataplane.shm import check_view, peer_order
from eep.errors import DataPlaneError, OutOfStep, PayloadTooLarge, PeerTimeout, StaleEpoch, StepAborted
from eep.security import curve
from eep.security.curve import CurveKeys
from eep.security.rejections import Rejections

logger = logging.getLogger(__name__)

DATA, ABORT = 1, 2
_HEADER = struct.Struct("<BIQQ")  # kind, source rank, epoch, step
_ABORT_CHECK_S = 0.05  # a wait looks at the announced epoch at least this often


_context: zmq.Context | None = None


def data_context() -> zmq.Context:
    """This process's ZeroMQ context for the data plane (made once).

    Its I/O thread runs under `SCHED_BATCH`: a batch thread that wakes does not preempt the
    thread running on its CPU. Every send to a peer whose pipe was idle wakes the I/O thread; a
    normal thread would preempt the rank at once, and on a CPU shared by more ranks than cores
    the rank then often waits a whole time slice behind another rank before its next send. As a
    batch thread it runs when the rank next blocks (its receives) or on an idle core.
    `scripts/hosts-profile.py io-policy` measures it (2 hosts x 2 ranks on 2 cores, one instance,
    the I/O threads' policy switched every 3 s): 53 ms per cross-host decode step as batch
    against 61 ms as normal threads.
    """
    global _context
    if _context is None or _context.closed:
        ctx = zmq.Context(io_threads=1)
        ctx.set(zmq.THREAD_SCHED_POLICY, os.SCHED_BATCH)
        _context = ctx
    return _context


def _sender(ctx: zmq.Context, hwm: int) -> zmq.Socket:
    s = ctx.socket(zmq.PUSH)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDHWM, hwm)
    s.setsockopt(zmq.RECONNECT_IVL, 50)
    s.setsockopt(zmq.CONNECT_TIMEOUT, 1000)
    s.setsockopt(zmq.HEARTBEAT_IVL, 200)
    s.setsockopt(zmq.HEARTBEAT_TIMEOUT, 1000)
    return s


def data_address(host: str, base_port: int, rank: int) -> str:
    """The ZeroMQ address rank `rank` binds on `host`: one port per rank, `base_port + rank`."""
    return f"tcp://{host}:{base_port + rank}"


class AbortPusher:
    """The controller's standing PUSH sockets to every rank's data address, for ABORTs (one
    connection each, kept: an abort must not wait for a TCP handshake)."""

    def __init__(self, addresses: Sequence[str], keys: CurveKeys | None = None) -> None:
        self.ctx = zmq.Context.instance()  # the controller's: an abort goes out at once
        self._socks: list[zmq.Socket] = []
        for addr in addresses:
            s = _sender(self.ctx, 16)
            if keys is not None:
                curve.connect(s, keys)
            s.connect(addr)
            self._socks.append(s)

    def abort(self, epoch: int) -> None:
        msg = _HEADER.pack(ABORT, 0, epoch, 0)
        for s in self._socks:
            try:
                s.send(msg, zmq.NOBLOCK)
            except zmq.Again:  # that rank is not connected (dead, loading): nothing waits there
                pass

    def close(self) -> None:
        for s in self._socks:
            s.close(0)
        self._socks = []


class ZmqLink:
    """Rank `rank`'s network side: receive on `addresses[rank]`, send to the ranks in `remote`."""

    def __init__(self, rank: int, addresses: Sequence[str], remote: Iterable[int], *, timeout_s: float,
                 announced: Callable[[], int] | None = None, keys: CurveKeys | None = None,
                 max_message_bytes: int | None = None) -> None:
        """`keys`: the cluster's CURVE keys (None: plain TCP, for a network that is trusted);
        `max_message_bytes`: the largest payload of one message (None: unbounded)."""
        self.rank, self.timeout_s = rank, timeout_s
        self.max_message_bytes = max_message_bytes
        self.ctx = data_context()
        self._announced = announced or (lambda: 0)
        self._pull = self.ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._pull.setsockopt(zmq.RCVHWM, 0)
        if max_message_bytes is not None:
            self._pull.setsockopt(zmq.MAXMSGSIZE, max(max_message_bytes, _HEADER.size))
        if keys is not None:
            curve.serve(self._pull, keys, door=f"rank{rank}-data@{addresses[rank].removeprefix('tcp://')}")
        self._bind(addresses[rank])
        self._push: dict[int, zmq.Socket] = {}
        for r in remote:
            s = _sender(self.ctx, 64)
            s.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
            if keys is not None:
                curve.connect(s, keys)
            s.connect(addresses[r])
            self._push[r] = s
        self._inbox: dict[int, deque[tuple[int, int, zmq.Frame]]] = {r: deque() for r in self._push}
        self._aborted = 0  # the newest epoch an ABORT named
        self._poller = zmq.Poller()
        self._poller.register(self._pull, zmq.POLLIN)
        self.dropped = 0  # frames not taken: stale, or malformed (these also in `malformed`)
        self.malformed = Rejections(f"rank{rank}-data@{addresses[rank].removeprefix('tcp://')}")

    def _bind(self, address: str, timeout_s: float = 5.0) -> None:
        """Bind, waiting (bounded) while the address is still held: the rank this process replaces
        may be a moment from releasing it (a killed process's sockets go with its teardown; a
        closed ZeroMQ socket unbinds in the background)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._pull.bind(address)
                return
            except zmq.ZMQError as e:
                if e.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                    self._pull.close(0)
                    raise DataPlaneError(f"rank {self.rank} cannot listen on {address}: {e}") from None
                time.sleep(0.02)

    def send(self, dst: int, data: torch.Tensor, *, epoch: int, step: int) -> None:
        nbytes = data.numel() * data.element_size()
        if self.max_message_bytes is not None and nbytes > self.max_message_bytes:
            raise PayloadTooLarge(f"a message of {nbytes} bytes to rank {dst} exceeds the "
                                  f"{self.max_message_bytes}-byte bound of one step's message")
        try:
            self._push[dst].send_multipart([_HEADER.pack(DATA, self.rank, epoch, step), memoryview(data.numpy())])
        except zmq.Again:
            raise PeerTimeout(peer=dst, rank=self.rank, epoch=epoch, step=step, waited_s=self.timeout_s,
                              op="send") from None

    def _drain(self) -> None:
        """File everything that arrived, without waiting."""
        while True:
            try:
                parts = self._pull.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if len(parts[0]) == _HEADER.size:
                kind, src, epoch, step = _HEADER.unpack(parts[0].bytes)
                if kind == ABORT and len(parts) == 1:
                    self._aborted = max(self._aborted, epoch)
                    continue
                if kind == DATA and src in self._inbox and len(parts) == 2:
                    self._inbox[src].append((epoch, step, parts[1]))
                    continue
            self.dropped += 1
            self.malformed.reject("a peer", f"a frame of {len(parts)} parts that is not one of the data plane's")

    def discard_older(self, epoch: int) -> None:
        """A new epoch starts: forget whatever older messages were filed."""
        self._drain()
        for box in self._inbox.values():
            while box and box[0][0] < epoch:
                box.popleft()
                self.dropped += 1

    def recv(self, src: int, *, epoch: int, step: int) -> torch.Tensor:
        """`src`'s message of exactly (epoch, step), as a uint8 tensor it owns."""
        box = self._inbox[src]
        start = time.monotonic()
        deadline = start + self.timeout_s
        while True:
            while box:
                e, s, frame = box[0]
                if e < epoch or (e == epoch and s < step):
                    box.popleft()
                    self.dropped += 1
                    continue
                if e > epoch:
                    raise StaleEpoch(rank=self.rank, peer=src, epoch=epoch, seen_epoch=e)
                if s > step:
                    raise OutOfStep(f"rank {self.rank} waits for step {step} of epoch {epoch} but rank {src} "
                                    f"already sent step {s}: the ranks left lockstep; abort the step")
                box.popleft()
                if not len(frame.buffer):
                    return torch.empty(0, dtype=torch.uint8)
                return torch.frombuffer(bytearray(frame.buffer), dtype=torch.uint8)
            announced = max(self._aborted, self._announced())
            if announced > epoch:
                raise StepAborted(rank=self.rank, epoch=epoch, step=step, peer=src, announced=announced)
            left = deadline - time.monotonic()
            if left <= 0:
                raise PeerTimeout(peer=src, rank=self.rank, epoch=epoch, step=step, waited_s=time.monotonic() - start)
            if self._poller.poll(int(min(left, _ABORT_CHECK_S) * 1000) + 1):
                self._drain()

    def close(self) -> None:
        for s in self._push.values():
            s.close(0)
        self._pull.close(0)
        self._push = {}


class HybridExchange:
    """An `Exchange` over shared memory for the ranks of this host and ZeroMQ for the others.

    Lockstep as `ShmExchange`: every active rank makes the same sequence of calls; each call is
    one step of the exchange counter within the epoch. All sends go out first (network sends
    first, so their transfer overlaps the shm copies), then the receives.
    """

    def __init__(self, endpoint: object, link: ZmqLink, num_ranks: int, host_of: Sequence[int]) -> None:
        self.endpoint, self.link = endpoint, link
        self.rank, self.num_ranks = link.rank, num_ranks
        self.host_of = tuple(host_of)
        self.epoch, self.step = 0, 0
        self._local: list[int] = []
        self._remote: list[int] = []
        self.set_peers(range(num_ranks))
        self._empty = torch.empty(0, dtype=torch.uint8)

    def set_peers(self, active: Iterable[int]) -> None:
        me = self.host_of[self.rank]
        peers = peer_order(self.rank, self.num_ranks, active)
        self._local = [p for p in peers if self.host_of[p] == me]
        self._remote = [p for p in peers if self.host_of[p] != me]

    def set_view(self, epoch: int, active: Sequence[int]) -> None:
        check_view(self.rank, self.epoch, epoch, active)
        if epoch != self.epoch:
            self.epoch, self.step = epoch, 0
            for src in range(self.num_ranks):
                if src != self.rank and self.host_of[src] == self.host_of[self.rank]:
                    self.endpoint.discard_older(src, epoch)  # type: ignore[attr-defined]
            self.link.discard_older(epoch)
        self.set_peers(active)

    def all_to_all(self, send: list[torch.Tensor]) -> list[torch.Tensor]:
        step, epoch = self.step, self.epoch
        for d in self._remote:
            self.link.send(d, send[d], epoch=epoch, step=step)
        for d in self._local:
            self.endpoint.send(d, send[d], epoch=epoch, step=step)  # type: ignore[attr-defined]
        recv: list[torch.Tensor] = [self._empty] * self.num_ranks
        recv[self.rank] = send[self.rank]
        for s in self._local:
            recv[s] = self.endpoint.recv(s, epoch=epoch, step=step)  # type: ignore[attr-defined]
        for s in self._remote:
            recv[s] = self.link.recv(s, epoch=epoch, step=step)
        self.step += 1
        return recv

    def close(self) -> None:
        self.link.close()
