"""`eep serve`: one instance answering requests on a Unix-domain socket.

Guarantees:
- Only the user who started the server can connect: the socket file is 0600, and a parent
  directory the server creates is 0700. A path whose directory others may write to (without
  the sticky bit) is refused, and a live server's socket is never taken over.
- The wire format is newline-delimited JSON (`eep.serving.protocol`), never pickle. A bad
  message (not JSON, unknown op or field, wrong type, prompt too long) gets an error reply and
  the connection and the server keep serving.
- One thread per connection; every prompt of every connection goes to one `EngineLoop`, so
  concurrent clients share steps. A request that takes longer than `request_timeout_s`, or
  whose client hangs up, is aborted and frees its KV slot.
- `serve()` runs until SIGTERM or SIGINT, then stops accepting, fails what is pending with
  `EngineUnavailable`, stops the ranks, removes their shared memory and the socket file.
  Every wait in here has a timeout.
"""

from __future__ import annotations

import gc
import logging
import os
import select
import signal
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from eep.config import EngineConfig
from eep.control.config import EPConfig
from eep.control.executor import EPExecutor
from eep.engine.engine import LLMEngine
from eep.engine.loop import EngineLoop
from eep.engine.request import RequestOutput
from eep.errors import (
    ConfigError,
    EepError,
    EngineUnavailable,
    RequestError,
    RequestTimeout,
    ServerError,
)
from eep.serving import protocol
from eep.serving.journal import RequestJournal
from eep.serving.replication import JournalFeed

logger = logging.getLogger(__name__)

_SUN_PATH_MAX = 107  # bytes of a Unix socket path (108 with the terminating NUL)
_RECV_BYTES = 1 << 16


@dataclass(frozen=True, slots=True)
class ServeConfig:
    engine: EngineConfig
    socket_path: str
    ep: EPConfig = field(default_factory=EPConfig)  # ep_size 1: the model runs in the server
    request_timeout_s: float = 300.0  # a generate request running longer is aborted
    io_timeout_s: float = 30.0  # a reply the client does not take within this drops the connection
    max_message_bytes: int = 16 * 2**20  # a longer request line is refused (and its connection closed)
    max_connections: int = 64
    shutdown_timeout_s: float = 30.0  # each stage of shutdown (engine loop, connection threads)
    poll_s: float = 0.5  # how often blocked server threads look for shutdown or a hung-up client
    http: str | None = None  # "HOST:PORT" of the OpenAI-compatible HTTP API (port 0: any free one)
    api_key: str | None = None  # wanted by every HTTP endpoint but /admin as "Authorization: Bearer KEY"
    admin_api_key: str | None = None  # wanted by the /admin endpoints instead (None: they answer 403)
    served_model_name: str | None = None  # the model id of the HTTP API (default: the model folder's name)

    def __post_init__(self) -> None:
        if self.http is not None:
            host, _, port = self.http.rpartition(":")
            if not host or not port.isdigit() or int(port) > 65535:
                raise ConfigError(f"--http must be HOST:PORT, got {self.http!r}")
        for name in ("api_key", "admin_api_key"):
            if getattr(self, name) == "":
                raise ConfigError(f"{name} is empty: pass a key, or none")
        if self.admin_api_key is not None and self.admin_api_key == self.api_key:
            raise ConfigError("--admin-api-key must differ from --api-key: the API key must never open /admin")
        if not self.socket_path:
            raise ConfigError("the socket path is empty: pass --socket PATH")
        if len(os.fsencode(self.socket_path)) > _SUN_PATH_MAX:
            raise ConfigError(
                f"socket path {self.socket_path!r} is longer than the {_SUN_PATH_MAX} bytes a Unix socket "
                f"allows: choose a shorter --socket"
            )
        for name in ("request_timeout_s", "io_timeout_s", "shutdown_timeout_s", "poll_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_message_bytes < 1024:
            raise ConfigError(f"max_message_bytes must be >= 1024, got {self.max_message_bytes}")
        if self.max_connections < 1:
            raise ConfigError(f"max_connections must be >= 1, got {self.max_connections}")


def default_socket_path(runtime_dir: str | None) -> str:
    """`$XDG_RUNTIME_DIR/eep/eep.sock` (pass its value), else a per-user directory in the temp dir."""
    if runtime_dir:
        return str(Path(runtime_dir) / "eep" / "eep.sock")
    return str(Path(tempfile.gettempdir()) / f"eep-{os.getuid()}" / "eep.sock")


_STATUS_TIMEOUT_S = 60.0  # a status or rejoin waits for the step in progress to end


def describe(engine: LLMEngine, loop: EngineLoop, ep: EPConfig) -> dict[str, Any]:
    """The status reply's fields (without "ok"), read on the loop's thread between two steps
    (the engine is not thread-safe); an expert-parallel instance adds its membership status."""

    def read(e: LLMEngine) -> dict[str, Any]:
        if isinstance(e.executor, EPExecutor):
            backend, pids, membership = ep.backend, e.executor.pids(), e.executor.status()
        else:
            backend, pids, membership = "local", [os.getpid()], None
        return {
            "ep_size": e.executor.num_ranks, "backend": backend, "rank_pids": pids,
            "model_path": e.config.model_path, "membership": membership,
        }

    try:
        fields = loop.call(read).result(timeout=_STATUS_TIMEOUT_S)
    except EngineUnavailable:
        fields = {"ep_size": engine.executor.num_ranks, "model_path": engine.config.model_path}
    return {**fields, "healthy": loop.healthy}


def rejoin(loop: EngineLoop, rank: object) -> None:
    """Start a replacement for failed `rank` (on the loop's thread); it is switched in at a
    later step boundary once it has loaded."""
    if not isinstance(rank, int) or isinstance(rank, bool):
        raise RequestError(f"rejoin needs an integer 'rank', got {rank!r}")

    def start(e: LLMEngine) -> None:
        if not isinstance(e.executor, EPExecutor):
            raise RequestError("rejoin needs an expert-parallel instance (--ep-size > 1)")
        if not 0 <= rank < e.executor.num_ranks:  # the executor would index its view with it (-1: the last)
            raise RequestError(f"rank {rank} does not exist: this instance has ranks 0..{e.executor.num_ranks - 1}")
        try:
            e.executor.rejoin(rank)
        except ConfigError as err:
            raise RequestError(str(err)) from None

    loop.call(start).result(timeout=_STATUS_TIMEOUT_S)


class SocketServer:
    """The listener: `bind()` claims the socket path, `start()` accepts, `close()` undoes both."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.path = config.socket_path
        self._listener: socket.socket | None = None
        self._inode: int | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._conns: dict[socket.socket, threading.Thread] = {}  # guarded by _lock
        self._accept_thread: threading.Thread | None = None
        self._loop: EngineLoop | None = None
        self._describe: Callable[[], dict[str, Any]] = dict

    def bind(self) -> None:
        """Create the socket file (0600) and listen; clients that connect now wait for `start()`."""
        parent = Path(self.path).parent
        if not parent.exists():
            parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(parent, 0o700)
        mode = parent.stat().st_mode
        if mode & 0o022 and not mode & stat.S_ISVTX:
            raise ServerError(
                f"{parent} is writable by other users, who could replace the socket: choose a --socket in a "
                f"private directory"
            )
        self._remove_stale()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the file is never, even briefly, connectable by others
        try:
            listener.bind(self.path)
        except OSError as e:
            listener.close()
            raise ServerError(f"cannot create the socket {self.path}: {e}") from None
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        listener.listen(self.config.max_connections)
        self._listener, self._inode = listener, os.stat(self.path).st_ino

    def _remove_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ServerError(f"{self.path} exists and is not a socket: remove it or choose another --socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(2.0)
        try:
            probe.connect(self.path)
        except (ConnectionRefusedError, FileNotFoundError):
            logger.info("removing the stale socket %s (no server listens on it)", self.path)
            os.unlink(self.path)
            return
        except TimeoutError:
            pass  # a backlog full of clients: certainly a live server
        finally:
            probe.close()
        raise ServerError(f"another server is listening on {self.path}: stop it or choose another --socket")

    def start(self, loop: EngineLoop, describe: Callable[[], dict[str, Any]]) -> None:
        if self._listener is None:
            raise RuntimeError("bind() before start()")
        self._loop, self._describe = loop, describe
        self._listener.settimeout(self.config.poll_s)
        self._accept_thread = threading.Thread(target=self._accept, name="eep-serve-accept", daemon=True)
        self._accept_thread.start()

    def stop_accepting(self) -> None:
        """Refuse new connections and remove the socket file; open connections finish their request."""
        self._stopping.set()
        if self._accept_thread is not None:
            self._accept_thread.join(self.config.shutdown_timeout_s)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._inode is not None:
            try:
                if os.stat(self.path).st_ino == self._inode:  # never remove a successor's socket
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
            self._inode = None

    def close(self) -> None:
        """`stop_accepting()`, then wait for the connection threads (close the engine loop first,
        so that requests still waiting on it are answered)."""
        self.stop_accepting()
        deadline = time.monotonic() + self.config.shutdown_timeout_s
        with self._lock:
            threads = list(self._conns.items())
        for conn, thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                logger.warning("a connection thread did not finish; shutting its socket down")
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    # -- accepting --------------------------------------------------------------------------
    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as e:
                if not self._stopping.is_set():
                    logger.error("accept failed, no longer accepting connections: %s", e)
                return
            conn.settimeout(self.config.poll_s)
            with self._lock:
                full = len(self._conns) >= self.config.max_connections
                if not full:
                    thread = threading.Thread(target=self._serve_conn, args=(conn,), name="eep-serve-conn", daemon=True)
                    self._conns[conn] = thread
            if full:
                self._send(conn, protocol.error_reply(ServerError(
                    f"the server already has {self.config.max_connections} connections: close one, or retry later"
                )))
                conn.close()
            else:
                thread.start()

    # -- one connection ---------------------------------------------------------------------
    def _serve_conn(self, conn: socket.socket) -> None:
        reader = _LineReader(conn, self.config.max_message_bytes)
        try:
            while not self._stopping.is_set():
                try:
                    line = reader.next_line(self._stopping)
                except RequestError as e:  # a line too long: the stream cannot be resynchronised
                    self._send(conn, protocol.error_reply(e))
                    return
                if line is None:
                    return
                reply = self._reply(line, conn)
                if reply is None or not self._send(conn, reply):
                    return
        except OSError as e:
            logger.debug("connection dropped: %s", e)
        finally:
            with self._lock:
                self._conns.pop(conn, None)
            conn.close()

    def _reply(self, line: bytes, conn: socket.socket) -> dict[str, Any] | None:
        """The reply to one message; None if the client hung up before it was ready."""
        try:
            message = protocol.decode(line)
            op = message.get("op")
            if op == "generate":
                return self._generate(message, conn)
            if op == "status":
                return {"ok": True, **self._describe()}
            if op == "rejoin":
                rejoin(self._loop, message.get("rank"))
                return {"ok": True}
            raise RequestError(f"unknown op {op!r}: send one of {list(protocol.OPS)}")
        except EepError as e:
            return protocol.error_reply(e)
        except Exception as e:  # a bug: this request fails, the server keeps serving
            logger.exception("internal error while answering a request")
            return protocol.error_reply(e)

    def _generate(self, message: dict[str, Any], conn: socket.socket) -> dict[str, Any] | None:
        assert self._loop is not None
        prompts, params = protocol.parse_generate(message)
        futures = [self._loop.submit(p, sp) for p, sp in zip(prompts, params)]
        try:
            error = self._wait(futures, conn)
            if error is _HUNG_UP:
                return None
            if error is not None:
                return protocol.error_reply(error)
            return protocol.outputs_reply([f.result(timeout=0) for f in futures])
        finally:
            for f in futures:
                f.cancel()  # aborts what is still running (an error, timeout or hang-up)

    def _wait(self, futures: list[Future[RequestOutput]], conn: socket.socket) -> BaseException | None:
        """Wait until all futures are done; the first error, a `RequestTimeout` or `_HUNG_UP`."""
        timeout = self.config.request_timeout_s
        deadline = time.monotonic() + timeout
        pending: set[Future[RequestOutput]] = set(futures)
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                return RequestTimeout(
                    f"{len(pending)} of {len(futures)} prompts did not finish within the request timeout "
                    f"({timeout:g} s) and were aborted: send fewer or shorter prompts, or raise --request-timeout"
                )
            done, pending = wait(pending, timeout=min(self.config.poll_s, left), return_when=FIRST_EXCEPTION)
            for f in done:
                if f.exception(timeout=0) is not None:
                    return f.exception(timeout=0)
            if pending and _hung_up(conn):
                logger.info("client hung up: aborting its %d unfinished requests", len(pending))
                return _HUNG_UP
        return None

    def _send(self, conn: socket.socket, reply: dict[str, Any]) -> bool:
        try:
            conn.settimeout(self.config.io_timeout_s)
            conn.sendall(protocol.encode(reply))
            conn.settimeout(self.config.poll_s)
            return True
        except (OSError, ValueError) as e:  # hung up, or never read its reply
            logger.info("could not send a reply, dropping the connection: %s", e)
            return False


class _HungUp(Exception):
    """Marker: the client closed its connection while its request ran."""


_HUNG_UP = _HungUp()


def _hung_up(conn: socket.socket) -> bool:
    """True if the peer closed its end (readable, and a peek reads end-of-stream)."""
    readable, _, _ = select.select([conn], [], [], 0)
    if not readable:
        return False
    try:
        return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


class _LineReader:
    """Newline-delimited messages from a socket with a poll timeout (so shutdown is seen)."""

    def __init__(self, conn: socket.socket, max_bytes: int) -> None:
        self.conn, self.max_bytes = conn, max_bytes
        self.buf = bytearray()
        self.scanned = 0  # bytes of buf known to hold no newline

    def next_line(self, stopping: threading.Event) -> bytes | None:
        """The next line without its newline; None at end of stream or once `stopping` is set."""
        while True:
            i = self.buf.find(b"\n", self.scanned)
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[: i + 1]
                self.scanned = 0
                return line
            self.scanned = len(self.buf)
            if len(self.buf) > self.max_bytes:
                raise RequestError(
                    f"a message is longer than the server's limit of {self.max_bytes} bytes: send fewer prompts "
                    f"per request"
                )
            if stopping.is_set():
                return None
            try:
                chunk = self.conn.recv(_RECV_BYTES)
            except TimeoutError:
                continue
            if not chunk:
                return None
            self.buf += chunk


# -- the process ------------------------------------------------------------------------------
class _Interrupted(BaseException):
    """SIGTERM or SIGINT arrived during start-up: unwinds it (like KeyboardInterrupt)."""


class _StopSignals:
    """SIGTERM and SIGINT handlers: during start-up they raise `_Interrupted`; afterwards they
    only record the signal and wake `wait()` through a pipe (no locks in a signal handler)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.raising = True
        self._r, self._w = os.pipe()
        os.set_blocking(self._w, False)
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            logger.info("received %s again: already shutting down", signal.Signals(signum).name)
            return
        self.signum = signum
        try:
            os.write(self._w, b"x")
        except BlockingIOError:
            pass
        if self.raising:
            self.raising = False
            raise _Interrupted(signum)

    @contextmanager
    def installed(self) -> Iterator[_StopSignals]:
        """Must run in the main thread (Python delivers signals only there)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            for sig, old in self._old.items():
                signal.signal(sig, old)
            os.close(self._r)
            os.close(self._w)

    def wait(self, poll_s: float = 60.0) -> int:
        """Block until a signal arrived; return its number."""
        self.raising = False
        while self.signum is None:
            select.select([self._r], [], [], poll_s)
        return self.signum


def serve(config: ServeConfig, on_ready: Callable[[dict[str, Any]], None] | None = None) -> int:
    """Run one instance until SIGTERM or SIGINT; return 0 once it has shut down cleanly.

    Must be called from the main thread. `on_ready(status)` is called once requests are
    answered, with the status reply's fields plus "socket" (the `eep serve` command prints its
    one ready line from it: this module prints nothing). A signal during start-up (loading can
    take minutes) stops it just as cleanly.
    """
    signals = _StopSignals()
    with signals.installed():
        server = SocketServer(config)
        engine: LLMEngine | None = None
        loop: EngineLoop | None = None
        http: _HttpServer | None = None
        try:
            server.bind()
            logger.info("listening on unix:%s; loading %s", config.socket_path, config.engine.model_path)
            from eep.llm import build_engine

            engine = build_engine(config.engine, config.ep)
            loop = EngineLoop(engine)
            ready_engine, ready_loop = engine, loop
            server.start(loop, lambda: describe(ready_engine, ready_loop, config.ep))
            http_url = None
            if config.http is not None:
                journal = RequestJournal()
                feed = _feed(engine, journal)
                http = _HttpServer(config, loop, journal, feed)
                http_url = http.start()
            # Everything built so far (torch, the model's modules, the web stack) lives as long
            # as the server: out of the collector's sight, a full collection scans only what
            # requests create (measured: 15-70 ms pauses of the engine thread without it)
            gc.collect()
            gc.freeze()
            if on_ready is not None:
                on_ready({**describe(engine, loop, config.ep), "socket": config.socket_path, "http": http_url})
            signum = signals.wait()
            logger.info("received %s: shutting down", signal.Signals(signum).name)
        except _Interrupted as e:
            logger.info("received %s during start-up: shutting down", signal.Signals(e.args[0]).name)
        finally:
            signals.raising = False
            if http is not None:
                http.stop(config.shutdown_timeout_s)
            server.stop_accepting()
            if loop is not None:
                loop.close(config.shutdown_timeout_s)  # pending requests fail; ranks stop; shm removed
            elif engine is not None:
                engine.close()
            server.close()
            logger.info("stopped")
    return 0


def _feed(engine: LLMEngine, journal: RequestJournal) -> JournalFeed | None:
    """Across hosts, the journal's replication to standby heads (through the controller's door)."""
    elastic = engine.executor.elastic
    if elastic is None:
        return None
    feed = JournalFeed(journal, lambda: elastic.view.epoch)
    if elastic.standby_door(feed.subscribe, feed.attached):
        # deposed: stop replicating before the engine fails what is in flight (the standby goes on with it)
        elastic.on_deposed.insert(0, lambda _: feed.close())
        return feed
    feed.close()
    return None


class _HttpServer:
    """uvicorn serving the OpenAI-compatible app (`eep.serving.http`) on a thread of its own;
    the main thread keeps the signal handling of `serve`."""

    def __init__(self, config: ServeConfig, loop: EngineLoop, journal: RequestJournal,
                 feed: JournalFeed | None) -> None:
        import uvicorn

        from eep.serving.http import create_app

        assert config.http is not None
        host, _, port = config.http.rpartition(":")
        name = config.served_model_name or Path(config.engine.model_path).name
        app = create_app(loop, model_name=name, api_key=config.api_key, admin_api_key=config.admin_api_key,
                         max_body_bytes=config.max_message_bytes, journal=journal, feed=feed)
        self.feed = feed
        self._server = uvicorn.Server(uvicorn.Config(app, host=host, port=int(port), log_level="warning",
                                                     lifespan="off", timeout_graceful_shutdown=5))
        self._thread = threading.Thread(target=self._server.run, name="eep-http", daemon=True)

    def start(self, timeout_s: float = 30.0) -> str:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ServerError("the HTTP server did not start (is the port taken?)")
            time.sleep(0.02)
        host, port = self._server.servers[0].sockets[0].getsockname()[:2]
        url = f"http://{host}:{port}"
        logger.info("OpenAI-compatible API on %s", url)
        return url

    def stop(self, timeout_s: float) -> None:
        self._server.should_exit = True
        self._thread.join(timeout_s)
        if self.feed is not None:
            self.feed.close()
