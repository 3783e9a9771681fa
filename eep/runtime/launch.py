"""The first message a host sends the rank it starts, on the socketpair it started it with.

One frame in `Channel`'s framing (4-byte length, payload), optionally with one file descriptor
attached (`SCM_RIGHTS`): another host's agent hands the rank the control connection it opened
and authenticated for it (`wire.Handover`). Both ends are processes of one host and the
socketpair is the host's own: no network peer can write to it.
"""

from __future__ import annotations

import select
import socket
import struct
import time

from eep.security.channel import MAX_FRAME_BYTES, ProtocolError

_LEN = struct.Struct("!I")


def send_with_fd(sock: socket.socket, payload: bytes, fd: int | None = None) -> None:
    frame = _LEN.pack(len(payload)) + payload
    if fd is None:
        sock.sendall(frame)
        return
    sent = socket.send_fds(sock, [frame], [fd])
    if sent < len(frame):
        sock.sendall(frame[sent:])


def recv_launch(sock: socket.socket, timeout_s: float) -> tuple[bytes, list[int]]:
    """The frame's payload and the descriptors that came with it (EOFError: closed first).
    Reads exactly one frame: what the host sends next stays in the socket."""
    deadline = time.monotonic() + timeout_s
    fds: list[int] = []
    try:
        head = _read(sock, _LEN.size, deadline, fds)
        (n,) = _LEN.unpack(head)
        if n > MAX_FRAME_BYTES:
            raise ProtocolError(f"a launch of {n} bytes")
        return _read(sock, n, deadline, fds), fds
    except BaseException:
        for fd in fds:
            socket.close(fd)
        raise


def _read(sock: socket.socket, n: int, deadline: float, fds: list[int]) -> bytes:
    buf = b""
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([sock], [], [], left)[0]:
            raise ProtocolError("no launch from the host within the time allowed")
        chunk, more, _, _ = socket.recv_fds(sock, n - len(buf), 4)  # a descriptor comes with the first byte
        fds += more
        if not chunk:
            raise EOFError("the host closed the pipe before the launch") if not buf and not fds else \
                ProtocolError("the launch was cut short")
        buf += chunk
    return buf
