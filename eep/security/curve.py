"""ZeroMQ's doors under CURVE: the ranks' data addresses and the hosts' expert backups.

What this module promises:
- `CurveKeys.from_secret(secret)`: two key pairs derived from the cluster secret, the servers'
  (every socket that binds: a rank's data address, a backup server) and the clients' (every
  socket that connects). A peer without the secret can compute neither.
- `serve(sock, keys, door)` makes a socket a CURVE server: every connection to it is
  authenticated and encrypted (CurveZMQ: per-connection keys, nonces, so a captured frame
  cannot be replayed into any connection). The ZAP handler of its context (`DoorKeeper`, one
  thread per context) admits exactly the cluster's client key and refuses any other with one
  WARNING naming the peer's address; a handshake that fails before ZAP is asked (another
  cluster's server key, bytes that are not ZMTP) is logged from the socket's monitor, with the
  door's own address (libzmq does not report the peer's). A peer that has not finished its
  handshake within `HANDSHAKE_MS` is dropped. With the handler gone, libzmq refuses every
  connection (`ZAP_ENFORCE_DOMAIN`): it fails closed.
- `connect(sock, keys)` makes a socket a CURVE client of those servers.
"""

from __future__ import annotations

import itertools
import logging
import threading

import zmq
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from eep.security.rejections import Rejections
from eep.security.secret import ClusterSecret

logger = logging.getLogger(__name__)

HANDSHAKE_MS = 5000
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
_DOMAIN = b"eep"
_FAILED = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
_POLL_MS = 200
_ids = itertools.count()


class CurveKeys:
    """The cluster's CURVE key pairs (z85), derived from its secret."""

    __slots__ = ("server_public", "server_secret", "client_public", "client_secret", "client_public_raw")

    def __init__(self, server_secret: bytes, client_secret: bytes) -> None:
        self.server_secret, self.client_secret = server_secret, client_secret
        self.server_public = zmq.curve_public(server_secret)
        self.client_public = zmq.curve_public(client_secret)
        self.client_public_raw = z85.decode(self.client_public)  # as ZAP hands it over

    def __repr__(self) -> str:
        return "CurveKeys(<hidden>)"

    @classmethod
    def from_secret(cls, secret: ClusterSecret) -> CurveKeys:
        return cls(z85.encode(secret.key("curve server")), z85.encode(secret.key("curve client")))


def serve(sock: zmq.Socket, keys: CurveKeys, door: str) -> None:
    """Make `sock` (not yet bound) a CURVE server of the cluster, guarded by its context's
    `DoorKeeper` (started here if it is not yet)."""
    keeper = DoorKeeper.of(sock.context, keys)
    sock.curve_server = True
    sock.curve_secretkey = keys.server_secret
    sock.curve_publickey = keys.server_public
    sock.zap_domain = _DOMAIN
    try:
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    except (zmq.ZMQError, AttributeError):  # a libzmq without the option: the keeper is always there
        pass
    sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_MS)
    keeper.watch(sock, door)


def connect(sock: zmq.Socket, keys: CurveKeys) -> None:
    """Make `sock` (not yet connected) a CURVE client of the cluster's servers."""
    sock.curve_serverkey = keys.server_public
    sock.curve_publickey = keys.client_public
    sock.curve_secretkey = keys.client_secret
    sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_MS)


class DoorKeeper:
    """One context's ZAP handler and handshake-failure log, on a thread of its own."""

    _lock = threading.Lock()
    _by_context: dict[int, DoorKeeper] = {}

    @classmethod
    def of(cls, ctx: zmq.Context, keys: CurveKeys) -> DoorKeeper:
        with cls._lock:
            keeper = cls._by_context.get(id(ctx))
            if keeper is None or keeper.ctx is not ctx or keeper.stopped:
                keeper = cls._by_context[id(ctx)] = cls(ctx, keys)
            return keeper

    def __init__(self, ctx: zmq.Context, keys: CurveKeys) -> None:
        self.ctx, self.keys = ctx, keys
        self.rejections = Rejections("zeromq-curve")  # ZAP's refusals (of any socket of the context)
        self.admitted = 0
        self.stopped = False
        self._zap = ctx.socket(zmq.REP)
        self._zap.setsockopt(zmq.LINGER, 0)
        self._zap.bind(ZAP_ENDPOINT)  # before any server socket of the context binds
        self._new: list[tuple[str, str]] = []  # (monitor address, door) for the thread to take up
        self._new_lock = threading.Lock()
        self._doors: dict[str, Rejections] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="eep-door-keeper", daemon=True)
        self._thread.start()

    def watch(self, sock: zmq.Socket, door: str) -> None:
        """Log `sock`'s failed handshakes (called by the socket's owner, before it binds)."""
        addr = f"inproc://eep-monitor-{next(_ids)}"
        sock.monitor(addr, _FAILED)
        with self._new_lock:
            self._new.append((addr, door))

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._zap, zmq.POLLIN)
        monitors: dict[zmq.Socket, str] = {}
        try:
            while not self._stop.is_set():
                with self._new_lock:
                    new, self._new = self._new, []
                for addr, door in new:
                    mon = self.ctx.socket(zmq.PAIR)
                    mon.setsockopt(zmq.LINGER, 0)
                    mon.connect(addr)
                    poller.register(mon, zmq.POLLIN)
                    monitors[mon] = door
                for sock, _ in poller.poll(_POLL_MS):
                    if sock is self._zap:
                        self._authenticate(self._zap.recv_multipart())
                    else:
                        self._failed(monitors[sock], sock.recv_multipart())
        except zmq.ContextTerminated:
            pass
        except zmq.ZMQError as e:
            if not self._stop.is_set():
                logger.error("the ZeroMQ door keeper stopped: %s (every CURVE connection is now refused)", e)
        finally:
            for mon in monitors:
                mon.close(0)
            self._zap.close(0)
            self.stopped = True
            with DoorKeeper._lock:
                if DoorKeeper._by_context.get(id(self.ctx)) is self:
                    del DoorKeeper._by_context[id(self.ctx)]

    def _authenticate(self, frames: list[bytes]) -> None:
        # ZAP (RFC 27): version, request id, domain, address, identity, mechanism, credentials...
        if len(frames) < 6:
            return  # not a ZAP request: libzmq never sends one; nothing to answer
        version, request_id, domain, address, _identity, mechanism = frames[:6]
        credentials = frames[6:]
        ok = mechanism == b"CURVE" and domain == _DOMAIN and credentials == [self.keys.client_public_raw]
        if ok:
            self.admitted += 1
        else:
            self.rejections.reject(address.decode(errors="replace"),
                                   f"ZeroMQ {mechanism.decode(errors='replace')} peer without this cluster's key")
        self._zap.send_multipart([version, request_id, b"200" if ok else b"400",
                                  b"OK" if ok else b"not a member of this cluster", b"", b""])

    def _failed(self, door: str, frames: list[bytes]) -> None:
        try:
            parse_monitor_message(frames)
        except (ValueError, KeyError, IndexError):
            return
        # libzmq names the door's own endpoint, not the peer's
        self.rejections_of(door).reject("unknown", "a handshake that is not this cluster's CURVE (no key, another "
                                                   "cluster's key, or not ZeroMQ at all)")

    def rejections_of(self, door: str) -> Rejections:
        with self._new_lock:
            return self._doors.setdefault(door, Rejections(door))

    @property
    def refused(self) -> int:
        """Peers turned away so far, by ZAP and in failed handshakes."""
        with self._new_lock:
            return self.rejections.total + sum(r.total for r in self._doors.values())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2 * _POLL_MS / 1000 + 1.0)
