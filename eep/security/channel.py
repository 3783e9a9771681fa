"""Framed control connections, authenticated across hosts.

What this module promises:
- `Channel` carries frames over a stream socket: a 4-byte big-endian length n, then n bytes.
  A frame longer than `max_frame_bytes` is refused from its length alone (nothing more of it
  is read); a frame cut short, or not complete within `timeout_s`, fails; every such failure
  is a `ProtocolError` (an `OSError`: callers treat it as a broken connection and close it).
- An authenticated channel (made by `client_handshake` / `server_handshake`) ends every
  frame with a 32-byte HMAC-SHA256 tag, under the session key, over its direction, its
  sequence number and its payload: a frame altered, injected, replayed, reordered or
  reflected back to its sender does not verify, and nothing of it is handed to the caller.
  Frames are not encrypted.
- The handshake is a mutual challenge-response with fresh 32-byte nonces both ways, of fixed
  sizes (no length field is read before the peer has proven it knows the key):
      client -> server: MAGIC, Nc
      server -> client: MAGIC, Ns, HMAC(K, "server" Nc Ns)
      client -> server: HMAC(K, "client" Nc Ns)
  and the session key is HMAC(K, "session" Nc Ns). Either side that finds the other's proof
  wrong, or does not get it within the timeout, raises `AuthError` and closes the socket.
- A local channel (a socketpair a host made itself) is the same framing without tags.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import select
import socket
import struct
import threading
import time

from eep.errors import EepError

MAGIC = b"EEPCTL01"
NONCE_BYTES = 32
TAG_BYTES = 32
MAX_FRAME_BYTES = 64 * 2**20  # a control message: a step's token ids, a rank's spec, a repair's tables
HANDSHAKE_TIMEOUT_S = 5.0
FRAME_TIMEOUT_S = 10.0  # a frame whose first byte arrived must be complete within this
_LEN = struct.Struct("!I")


class ProtocolError(EepError, ConnectionError):
    """A peer broke the framing or the message protocol: its connection is closed."""


class AuthError(ProtocolError):
    """A peer did not prove it holds the cluster secret (or we could not prove it to it)."""


def _label(client: bool) -> bytes:
    return b"c" if client else b"s"


class Channel:
    """One framed connection (see the module docstring); `session` None: a local channel."""

    def __init__(self, sock: socket.socket, *, session: bytes | None = None, client: bool = False,
                 peer: str = "", max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        sock.setblocking(True)
        self.sock, self.peer, self.max_frame_bytes = sock, peer or "local", max_frame_bytes
        self._session = session
        self._out_label, self._in_label = _label(client), _label(not client)
        self._sent = self._received = 0  # sequence numbers, one per direction
        self._send_lock = threading.Lock()
        self._broken: str | None = None
        self.closed = False

    def state(self) -> tuple[bytes, int, int]:
        """(session key, frames sent, frames received): to hand the channel to another process
        of this host (`resume`), which takes over the socket; this side must not use it again."""
        assert self._session is not None
        return self._session, self._sent, self._received

    @classmethod
    def resume(cls, sock: socket.socket, session: bytes, sent: int, received: int, *, client: bool,
               peer: str = "") -> Channel:
        """The channel another process of this host authenticated and handed over (`state`)."""
        ch = cls(sock, session=session, client=client, peer=peer)
        ch._sent, ch._received = sent, received
        return ch

    @classmethod
    def from_fd(cls, fd: int) -> Channel:
        """A local channel over an inherited socket fd (a rank's end of its host's socketpair)."""
        return cls(socket.socket(fileno=fd))

    @property
    def authenticated(self) -> bool:
        return self._session is not None

    def fileno(self) -> int:
        return self.sock.fileno()

    def poll(self, timeout_s: float | None = 0.0) -> bool:
        """Whether a frame (or its end: EOF) is waiting, after up to `timeout_s` (None: forever)."""
        if self.closed:
            raise OSError("the channel is closed")
        return bool(select.select([self.sock], [], [], timeout_s)[0])

    def _tag(self, label: bytes, seq: int, payload: bytes) -> bytes:
        assert self._session is not None
        return hmac.digest(self._session, label + seq.to_bytes(8, "big") + payload, hashlib.sha256)

    def send_bytes(self, payload: bytes) -> None:
        with self._send_lock:
            if self._broken is not None:
                raise ProtocolError(f"the connection to {self.peer} is broken ({self._broken})")
            tag = b""
            if self._session is not None:
                tag = self._tag(self._out_label, self._sent, payload)
                self._sent += 1
            n = len(payload) + len(tag)
            if n > self.max_frame_bytes:
                raise ProtocolError(f"a frame of {n} bytes exceeds the {self.max_frame_bytes}-byte limit")
            try:
                self.sock.sendall(_LEN.pack(n) + payload + tag)
            except OSError as e:  # maybe half sent (SO_SNDTIMEO): nothing more may follow on it
                self._broken = f"a send failed: {e.__class__.__name__}"
                raise

    def recv_bytes(self, timeout_s: float = FRAME_TIMEOUT_S) -> bytes:
        """The next frame's payload, within `timeout_s` (EOFError: the peer closed)."""
        deadline = time.monotonic() + timeout_s
        (n,) = _LEN.unpack(self._read(_LEN.size, deadline, first=True))
        if n > self.max_frame_bytes:
            raise ProtocolError(f"{self.peer} sent a frame of {n} bytes, over the {self.max_frame_bytes}-byte limit")
        body = self._read(n, deadline)
        if self._session is None:
            return body
        if n < TAG_BYTES:
            raise ProtocolError(f"{self.peer} sent a frame of {n} bytes, too short to carry its tag")
        payload, tag = body[:-TAG_BYTES], body[-TAG_BYTES:]
        if not hmac.compare_digest(tag, self._tag(self._in_label, self._received, payload)):
            raise ProtocolError(f"a frame from {self.peer} failed its integrity check (altered, injected or replayed)")
        self._received += 1
        return payload

    def _read(self, n: int, deadline: float, first: bool = False) -> bytes:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                raise ProtocolError(f"no complete frame from {self.peer} within the time allowed")
            k = self.sock.recv_into(view[got:], n - got)
            if k == 0:
                if first and got == 0:
                    raise EOFError(f"{self.peer} closed the connection")
                raise ProtocolError(f"{self.peer} closed the connection in the middle of a frame")
            got += k
        return bytes(buf)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()


def _read_exact(sock: socket.socket, n: int, deadline: float, peer: str) -> bytes:
    buf = b""
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([sock], [], [], left)[0]:
            raise AuthError(f"{peer} did not complete the handshake within {HANDSHAKE_TIMEOUT_S:g} s")
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise AuthError(f"{peer} closed the connection during the handshake")
        buf += chunk
    return buf


def _proof(key: bytes, who: bytes, nc: bytes, ns: bytes) -> bytes:
    return hmac.digest(key, who + nc + ns, hashlib.sha256)


def client_handshake(sock: socket.socket, key: bytes, *, peer: str = "",
                     timeout_s: float = HANDSHAKE_TIMEOUT_S) -> Channel:
    """Authenticate to the server at the other end of `sock` (and it to us); the channel."""
    peer = peer or _peer_name(sock)
    deadline = time.monotonic() + timeout_s
    sock.setblocking(True)
    nc = os.urandom(NONCE_BYTES)
    try:
        sock.sendall(MAGIC + nc)
        reply = _read_exact(sock, len(MAGIC) + NONCE_BYTES + TAG_BYTES, deadline, peer)
        if reply[: len(MAGIC)] != MAGIC:
            raise AuthError(f"{peer} does not speak eep's control protocol")
        ns, proof = reply[len(MAGIC) : len(MAGIC) + NONCE_BYTES], reply[len(MAGIC) + NONCE_BYTES :]
        if not hmac.compare_digest(proof, _proof(key, b"server", nc, ns)):
            raise AuthError(f"{peer} did not prove it holds this cluster's secret (another --cluster-secret-file?)")
        sock.sendall(_proof(key, b"client", nc, ns))
    except OSError as e:
        if isinstance(e, AuthError):
            raise
        raise AuthError(f"the handshake with {peer} failed: {e}") from None
    return Channel(sock, session=_proof(key, b"session", nc, ns), client=True, peer=peer)


def server_handshake(sock: socket.socket, key: bytes, *, peer: str = "",
                     timeout_s: float = HANDSHAKE_TIMEOUT_S) -> Channel:
    """Authenticate the client at the other end of `sock` (and us to it); the channel. Nothing
    the client sends is parsed but fixed-size fields, before it has proven it holds `key`."""
    peer = peer or _peer_name(sock)
    deadline = time.monotonic() + timeout_s
    sock.setblocking(True)
    try:
        hello = _read_exact(sock, len(MAGIC) + NONCE_BYTES, deadline, peer)
        if hello[: len(MAGIC)] != MAGIC:
            raise AuthError("not eep's control protocol")
        nc, ns = hello[len(MAGIC) :], os.urandom(NONCE_BYTES)
        sock.sendall(MAGIC + ns + _proof(key, b"server", nc, ns))
        answer = _read_exact(sock, TAG_BYTES, deadline, peer)
        if not hmac.compare_digest(answer, _proof(key, b"client", nc, ns)):
            raise AuthError("it does not hold this cluster's secret")
    except OSError as e:
        if isinstance(e, AuthError):
            raise
        raise AuthError(f"the handshake failed: {e}") from None
    return Channel(sock, session=_proof(key, b"session", nc, ns), client=False, peer=peer)


def _peer_name(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
        return f"{host}:{port}"
    except (OSError, ValueError):
        return "a peer"
