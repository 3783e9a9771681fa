"""Expert rows served over ZeroMQ: a host's expert backup to the ranks of other hosts, and a
rank's own expert slots to its peers (a rebalance's "peer" source).

When a whole host is lost, the experts it alone listed survive in the backup of one other host
(`eep.placement.backups`); the repair may put them into slots on a third host, whose rank then
fetches them from that host's memory over the network instead of reading its own disk. Each
host's agent (node 0: the controller) runs one `BackupServer` on
`backup_address(its address, dist port, num_ranks, node)`; a rank asks with `fetch_rows`.

The protocol is one request and one reply on a fresh DEALER socket: the request is the
(layer, expert) pairs as int32; the reply is one byte per pair (1: kept) and then one frame per
kept pair, the expert's row as the backup stores it (`w13` then `w2`, the model's dtype), sent
without a copy out of the shared-memory file. Every wait is bounded: a silent or dead host makes
`fetch_rows` raise `BackupUnavailable` within its timeout, and the caller reads its disk.

Both ends are CURVE (`eep.security.curve`): only a holder of the cluster secret is answered,
and the weights travel encrypted. A request that is not one frame of whole (layer, expert)
pairs, at most one per expert of the model, is answered with nothing and logged; a reply whose
frames do not match what was asked raises `BackupUnavailable`.
"""

from __future__ import annotations

import array
import logging
import threading
import time
from typing import Protocol

import zmq

from eep.errors import EepError
from eep.runtime.expert_backup import ExpertBackup
from eep.security import curve
from eep.security.curve import CurveKeys
from eep.security.rejections import Rejections
from eep.security.secret import ClusterSecret

logger = logging.getLogger(__name__)

_POLL_MS = 200  # how often the server's thread looks at its stop flag
_CANCEL_POLL_MS = 20  # how often a cancellable fetch looks at its cancel flag


class BackupUnavailable(EepError):
    """A remote backup did not answer, or does not keep what was asked."""


def backup_address(host: str, dist_port: int, num_ranks: int, node: int) -> str:
    """Node `node`'s backup server: after node 0's port, the ranks' data ports and gloo's store."""
    return f"tcp://{host}:{dist_port + 2 + num_ranks + node}"


def peer_address(host: str, dist_port: int, num_ranks: int, nnodes: int, rank: int) -> str:
    """Rank `rank`'s expert row server (a rebalance's peer source), after the backup servers' ports."""
    return f"tcp://{host}:{dist_port + 2 + num_ranks + nnodes + rank}"


class RowSource(Protocol):
    """What a `RowServer` serves: expert rows (`w13` then `w2`, the model's dtype) by (layer, expert)."""

    num_layers: int
    num_experts: int

    def keeps(self, layer: int, expert: int) -> bool: ...

    def raw(self, layer: int, expert: int) -> memoryview | bytes | None: ...  # None: not kept any more


class RowServer:
    """Answers `fetch_rows` requests for `source` on `address`, on a thread of its own."""

    def __init__(self, source: RowSource, address: str, secret: ClusterSecret, what: str = "backup") -> None:
        self.source, self.address = source, address
        self._max_pairs = source.num_layers * source.num_experts
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, 8 * self._max_pairs + 64)  # the largest request
        door = f"{what}@{address.removeprefix('tcp://')}"
        curve.serve(self._sock, CurveKeys.from_secret(secret), door=door)
        self.refused = Rejections(door)  # malformed requests
        try:
            self._sock.bind(address)
        except zmq.ZMQError as e:
            self._sock.close()
            self._ctx.term()
            raise BackupUnavailable(f"cannot serve the expert {what} on {address}: {e}") from None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"eep-{what}-server", daemon=True)
        self._thread.start()
        logger.info("serving expert %s on %s", what, address)

    def _serve(self) -> None:
        try:
            while not self._stop.is_set():
                if not self._sock.poll(_POLL_MS):
                    continue
                frames = self._sock.recv_multipart()
                asked = self._request(frames)
                if asked is None:
                    continue
                ident = frames[0]
                kept = bytes(int(self.source.keeps(layer, expert)) for layer, expert in asked)
                rows = [self.source.raw(layer, expert) for (layer, expert), k in zip(asked, kept) if k]
                if any(row is None for row in rows):  # the source gave one up meanwhile (a slot rewritten)
                    kept, rows = bytes(len(asked)), []
                self._sock.send_multipart([ident, b"", kept, *rows], copy=False)
        except zmq.ZMQError as e:
            if not self._stop.is_set():
                logger.error("expert backup server on %s stopped: %s", self.address, e)
        finally:
            self._sock.close()

    def _request(self, frames: list[bytes]) -> list[tuple[int, int]] | None:
        """The (layer, expert) pairs of a well-formed request; None (logged) for anything else."""
        ok = len(frames) == 3 and frames[1] == b"" and len(frames[2]) % 8 == 0 \
            and 0 < len(frames[2]) // 8 <= self._max_pairs
        if not ok:
            self.refused.reject("a peer", f"a malformed request of {len(frames)} frames, not answered")
            return None
        pairs = array.array("i", frames[2])
        return list(zip(pairs[0::2], pairs[1::2]))

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=5 * _POLL_MS / 1000)
        self._ctx.term()


class BackupServer(RowServer):
    """A host's expert backup served to the ranks of other hosts."""

    def __init__(self, backup: ExpertBackup, address: str, secret: ClusterSecret) -> None:
        super().__init__(backup, address, secret, "backup")


def fetch_rows(address: str, pairs: list[tuple[int, int]], timeout_s: float, keys: CurveKeys,
               row_bytes: int, cancel: threading.Event | None = None) -> list[memoryview]:
    """The rows of `pairs` ((layer, expert)) from the backup served at `address`, in order, each
    of `row_bytes` bytes.

    Raises BackupUnavailable if no answer comes within `timeout_s` (or `cancel` is set while
    waiting), a pair is not kept there or the reply does not have the shape asked for."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.CONNECT_TIMEOUT, max(1, int(timeout_s * 1000)))
    curve.connect(sock, keys)
    try:
        sock.connect(address)
        sock.send_multipart([b"", array.array("i", [v for pair in pairs for v in pair]).tobytes()])
        deadline = time.monotonic() + timeout_s
        while not sock.poll(_CANCEL_POLL_MS if cancel is not None else int(timeout_s * 1000)):
            if cancel is not None and cancel.is_set():
                raise BackupUnavailable(f"the fetch from {address} was cancelled")
            if cancel is None or time.monotonic() >= deadline:
                raise BackupUnavailable(f"the expert source at {address} did not answer within {timeout_s:g} s")
        frames = sock.recv_multipart(copy=False)
    finally:
        sock.close()
    if len(frames) < 2 or frames[0].bytes != b"":
        raise BackupUnavailable(f"the expert backup at {address} answered out of its protocol")
    kept, rows = frames[1].bytes, frames[2:]
    if len(kept) != len(pairs) or not all(kept):
        missing = [p for p, k in zip(pairs, kept) if not k]
        raise BackupUnavailable(f"the expert backup at {address} does not keep {missing[:4]}")
    if len(rows) != len(pairs) or any(len(f) != row_bytes for f in rows):
        raise BackupUnavailable(f"the expert backup at {address} sent rows of another shape than asked "
                                f"(another model or dtype?)")
    return [f.buffer for f in rows]
