"""`eep.Client`: the Python API of a running `eep serve` instance.

    import eep
    with eep.Client("unix:/run/user/1000/eep/eep.sock") as client:
        outs = client.generate(["Expert parallelism is"], eep.SamplingParams(max_tokens=32))

Same argument conventions as `eep.LLM.generate`. One request at a time per client (calls
from several threads are serialised; use one client per thread for concurrency: the server
batches concurrent clients together). Every socket operation has a timeout; a call that times
out closes the connection (a late reply would be read as the answer to the next call), and
the next call reconnects. Errors the server reports are raised as the matching `eep.errors`
exception (`RequestError`, ...), anything else as `ClientError`.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

from eep.engine.request import Prompt, RequestOutput, as_batch
from eep.engine.sampling import SamplingParams
from eep.errors import ClientError, RequestError
from eep.serving import protocol

logger = logging.getLogger(__name__)

_RECV_BYTES = 1 << 16


def socket_path(address: str) -> str:
    """The socket path of "unix:/path" or a plain path."""
    path = address.removeprefix("unix:")
    if not path:
        raise ClientError(f"no socket path in address {address!r}: pass 'unix:/path/to/eep.sock'")
    return path


class Client:
    def __init__(self, address: str, timeout_s: float = 300.0) -> None:
        if not timeout_s > 0:
            raise ClientError(f"timeout_s must be > 0, got {timeout_s}")
        self.path = socket_path(address)
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._connect()

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout_s)
        try:
            sock.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            sock.close()
            raise ClientError(
                f"no eep server listens on unix:{self.path} ({e.strerror}): start one with `eep serve --socket {self.path}`"
            ) from None
        except OSError as e:
            sock.close()
            raise ClientError(f"cannot connect to unix:{self.path}: {e}") from None
        self._sock, self._buf = sock, bytearray()
        return sock

    def generate(
        self, prompts: Prompt | Sequence[Prompt], sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        """Run every prompt to completion on the server; outputs in prompt order.

        A bare string is one prompt; a token-id prompt is a list of ints inside `prompts`.
        """
        batch, params = as_batch(prompts, sampling_params)
        reply = self._call(protocol.generate_request(batch, params))
        return protocol.outputs_from(reply)

    def status(self) -> dict[str, Any]:
        """The server's status: ep_size, backend, rank_pids, model_path, healthy, and for an
        expert-parallel instance its membership (view, coverage, paused, repairs, events)."""
        reply = self._call({"op": "status"})
        return {k: v for k, v in reply.items() if k != "ok"}

    def rejoin(self, rank: int) -> None:
        """Ask the server to start a replacement for failed `rank` (rejoin "manual"); it is
        switched in once it has loaded. Raises RequestError if the rank is not failed."""
        self._call({"op": "rejoin", "rank": rank})

    def _call(self, message: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            sock = self._sock or self._connect()
            deadline = time.monotonic() + self.timeout_s
            try:
                sock.settimeout(self.timeout_s)
                sock.sendall(protocol.encode(message))
                line = self._read_line(sock, deadline)
            except TimeoutError:
                self._drop()
                raise ClientError(
                    f"no reply from unix:{self.path} within {self.timeout_s:g} s; the connection was closed "
                    f"(raise timeout_s for long generations)"
                ) from None
            except OSError as e:
                self._drop()
                raise ClientError(f"lost the connection to unix:{self.path}: {e}") from None
        try:
            reply = protocol.decode(line)
        except RequestError as e:
            raise ClientError(f"the server sent a malformed reply: {e}") from None
        return protocol.parse_reply(reply)

    def _read_line(self, sock: socket.socket, deadline: float) -> bytes:
        scanned = 0
        while True:
            i = self._buf.find(b"\n", scanned)
            if i >= 0:
                line = bytes(self._buf[:i])
                del self._buf[: i + 1]
                return line
            scanned = len(self._buf)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            sock.settimeout(left)
            chunk = sock.recv(_RECV_BYTES)
            if not chunk:
                raise ConnectionResetError("the server closed the connection (it may be shutting down)")
            self._buf += chunk

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock, self._buf = None, bytearray()

    def close(self) -> None:
        with self._lock:
            self._drop()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
