"""A fork server: rank processes started by fork(2) from one interpreter that imported torch once.

Importing torch is 2.4-2.8 s of CPU here, paid by every fresh interpreter: four ranks starting
at once on two cores wait ~6 s for their imports alone, and a rejoin or a restart pays it again.
A `ForkServer` is one `python -m eep.runtime.fork_server FD` started by the host (with the
controller, on node 0), which imports torch and the rank's code and then only waits: asked for
a rank, it forks, and the child serves the control pipe it was handed (`SCM_RIGHTS`) exactly as
a rank started with `python -m eep.runtime FD` would (`eep.runtime.rank.main`).

What it promises:
- The server never runs a tensor operation, starts no thread and never touches a GPU (CUDA is
  initialised by each rank for itself after the fork), so a child starts from a clean state:
  only imported modules, shared copy-on-write.
- A child is a process of its own: its own session (a terminal's Ctrl-C reaches the controller,
  which stops the ranks in order), default signal handlers, and it watches the controller (the
  server's parent), not the server: the server's death ends no rank.
- The server reaps its children and reports each exit code back; a `ForkedProcess` is the part
  of `subprocess.Popen` the executor uses (`pid`, `poll`, `wait`, `kill`), over a pidfd (a
  signal never reaches a recycled pid). If the server itself died, a child's end is still seen
  (its pidfd), its code then unknown (-9, as an agent's lost rank).
- The server exits when its host closes the pipe or dies; every wait is bounded.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback

from eep.runtime import wire
from eep.runtime.codec import encode
from eep.security.channel import ProtocolError

logger = logging.getLogger(__name__)

_MAX_MESSAGE = 256  # every message of the fork server's protocol is a few dozen bytes
_UNKNOWN_EXIT = -9  # the server died before it could report a child's exit


class ForkServerGone(OSError):
    """The fork server is not running (killed, or closed): start another one."""


class ForkServer:
    """The host's side of one fork server process."""

    def __init__(self, start_timeout_s: float = 120.0) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            # a session of its own (no terminal signal reaches it) at the host's priority: it is
            # on the path of every start
            self.proc = subprocess.Popen([sys.executable, "-m", "eep.runtime.fork_server", str(theirs.fileno())],
                                         pass_fds=[theirs.fileno()], start_new_session=True)
        self._sock = ours
        self.start_timeout_s = start_timeout_s
        self._cond = threading.Condition()
        self._pids: list[int] = []  # answers to fork requests, in order
        self._codes: dict[int, int] = {}  # exit codes reported, by pid
        self._gone = False
        self._ready = False  # its imports are done: a fork takes milliseconds
        self._lock = threading.Lock()  # one fork request at a time
        self._reader = threading.Thread(target=self._read, name="eep-fork-server", daemon=True)
        self._reader.start()

    @property
    def alive(self) -> bool:
        return not self._gone and self.proc.poll() is None

    def wait_ready(self, timeout_s: float) -> bool:
        """Whether its imports are done, waiting up to `timeout_s` for them."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not self._ready and not self._gone:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.5))
            return self._ready and not self._gone

    def fork(self, conn_fd: int) -> ForkedProcess:
        """A new rank process serving the control pipe `conn_fd` (this process keeps its copy).
        Waits for the server's imports if they are not done (bounded by `start_timeout_s`)."""
        with self._lock:
            try:
                socket.send_fds(self._sock, [encode(wire.Fork())], [conn_fd])
            except OSError as e:
                raise ForkServerGone(f"the fork server (pid {self.proc.pid}) is gone: {e}") from e
            deadline = time.monotonic() + self.start_timeout_s
            with self._cond:
                while not self._pids:
                    if self._gone:
                        raise ForkServerGone(f"the fork server (pid {self.proc.pid}) exited before it forked")
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise ForkServerGone(f"the fork server (pid {self.proc.pid}) did not fork within "
                                             f"{self.start_timeout_s:.0f} s")
                    self._cond.wait(min(left, 0.5))
                pid = self._pids.pop(0)
        return ForkedProcess(pid, self)

    def _read(self) -> None:
        """Answers (pids of new children) and exit reports, until the server's end closes."""
        try:
            while True:
                data = self._sock.recv(_MAX_MESSAGE)
                if not data:
                    break
                msg = wire.FROM_FORK_SERVER.decode(data)
                with self._cond:
                    if isinstance(msg, wire.Forked):
                        self._pids.append(msg.pid)
                    elif isinstance(msg, wire.ForkerReady):
                        self._ready = True
                    else:
                        self._codes[msg.pid] = msg.code
                    self._cond.notify_all()
        except ProtocolError as e:  # not ours to serve any more: start another one
            logger.error("the fork server (pid %d) sent %s: closing it", self.proc.pid, e)
        except OSError:
            pass
        with self._cond:
            self._gone = True
            self._cond.notify_all()

    def exit_code(self, pid: int) -> int | None:
        with self._cond:
            return self._codes.get(pid)

    def wait_exit(self, pid: int, pidfd: int, timeout_s: float) -> int | None:
        """`pid`'s exit code once reported (None: still running after `timeout_s`). A child whose
        server is gone is known dead by its pidfd only: its code is unknown (-9)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while pid not in self._codes:
                if self._gone and select.select([pidfd], [], [], 0)[0]:
                    return _UNKNOWN_EXIT
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(min(left, 0.05 if self._gone else 0.5))
            return self._codes[pid]

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the server (its children, stopped by the controller before, are all reaped by
        then: their codes have been reported). Idempotent."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # the server reads EOF; our reader wakes
        except OSError:
            pass
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("the fork server (pid %d) did not exit within %.0f s: killed", self.proc.pid, timeout_s)
            self.proc.kill()
            self.proc.wait(timeout=5)
        self._reader.join(timeout_s)
        self._sock.close()


class ForkedProcess:
    """A rank forked by a `ForkServer`: the part of `subprocess.Popen` the executor uses."""

    def __init__(self, pid: int, server: ForkServer) -> None:
        self.pid, self._server = pid, server
        self.returncode: int | None = None
        self._pidfd: int | None = os.pidfd_open(pid)  # closed once the exit code is known

    def poll(self) -> int | None:
        return self._wait(0.0)

    def wait(self, timeout: float | None = None) -> int:
        code = self._wait(30.0 if timeout is None else timeout)
        if code is None:
            raise subprocess.TimeoutExpired(f"rank process {self.pid}", timeout or 30.0)
        return code

    def _wait(self, timeout_s: float) -> int | None:
        if self.returncode is None and self._pidfd is not None:
            self.returncode = self._server.wait_exit(self.pid, self._pidfd, timeout_s)
            if self.returncode is not None:
                os.close(self._pidfd)
                self._pidfd = None
        return self.returncode

    def kill(self) -> None:
        if self.poll() is None and self._pidfd is not None:
            try:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            except ProcessLookupError:  # exited meanwhile
                pass

    def __del__(self) -> None:  # never waited for (its controller gave up on it)
        if getattr(self, "_pidfd", None) is not None:
            os.close(self._pidfd)  # type: ignore[arg-type]


def start_rank(server: ForkServer | None, conn_fd: int,
               wait_s: float = 0.0) -> tuple[ForkServer | None, subprocess.Popen[bytes] | ForkedProcess]:
    """Start a rank process serving the control pipe `conn_fd` (the caller keeps its copy):
    forked from `server` if its imports are done within `wait_s`, else a fresh `python -m
    eep.runtime FD` (no one waits seconds for imports on a path that serves: a rejoin, an agent
    that must keep beating). A server that is gone (killed, out of memory) is replaced by a new
    one, whose imports begin at once, for the next start. Returns the server to use from now on
    and the rank's process. The fresh interpreter is a session of its own, as a forked rank: a
    terminal's Ctrl-C reaches the controller, which stops the ranks in order."""
    if server is not None:
        if server.alive and server.wait_ready(wait_s):
            try:
                return server, server.fork(conn_fd)
            except ForkServerGone as e:
                logger.warning("%s: starting another one", e)
                server.close()
                server = ForkServer(server.start_timeout_s)
        elif not server.alive:
            logger.warning("the fork server (pid %d) is gone (code %s): starting another one",
                           server.proc.pid, server.proc.poll())
            server.close()
            server = ForkServer(server.start_timeout_s)
    fresh = subprocess.Popen([sys.executable, "-m", "eep.runtime", str(conn_fd)], pass_fds=[conn_fd],
                             start_new_session=True)
    return server, fresh


# ------------------------------------------------------------------------------------------
# The server process.


def serve(fd: int) -> None:
    """`python -m eep.runtime.fork_server FD`: fork a rank for every request on FD; report every
    child's exit; return when FD closes."""
    import torch  # noqa: F401  (what every rank needs, imported once)

    import eep.runtime.rank  # noqa: F401

    sock = socket.socket(fileno=fd)
    sock.send(encode(wire.ForkerReady()))
    parent = os.getppid()
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake the select below
    try:
        while True:
            ready = select.select([sock, wake_r], [], [], 1.0)[0]
            if wake_r in ready:
                while True:
                    try:
                        os.read(wake_r, 512)
                    except BlockingIOError:
                        break
            _reap(sock)
            if sock in ready:
                data, fds, _, _ = socket.recv_fds(sock, _MAX_MESSAGE, 1)
                if not data:  # the host closed its end, or died
                    break
                wire.TO_FORK_SERVER.decode(data)  # a Fork, or ProtocolError: the host is not ours
                if fds:
                    pid = os.fork()
                    if pid == 0:
                        _child(fds[0], sock, (wake_r, wake_w), parent)
                    os.close(fds[0])
                    sock.send(encode(wire.Forked(pid)))
            if os.getppid() != parent:  # the host died without closing (not expected: its end closes)
                break
    except (OSError, KeyboardInterrupt, ProtocolError):
        pass
    # children still running are reparented when this process ends; each watches its controller


def _reap(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        try:
            sock.send(encode(wire.ChildExited(pid, os.waitstatus_to_exitcode(status))))
        except OSError:
            pass


def _child(fd: int, sock: socket.socket, wake: tuple[int, int], supervisor: int) -> None:
    """In the forked child: become a rank process of its own, serve `fd`, never return."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        sock.close()
        for w in wake:
            os.close(w)
        os.setsid()
        from eep.runtime import rank

        rank.main(["eep.runtime", str(fd)], supervisor=supervisor)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


if __name__ == "__main__":
    serve(int(sys.argv[1]))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # nothing to clean up: skip the interpreter's (and torch's) slow finalisation
