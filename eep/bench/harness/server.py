"""The servers a bench drives: `eep serve --http` started, watched and stopped, behind one interface.

Two kinds, one `ServerHandle` protocol (what the clients, the interleaving and the fault runs
use): `LocalServer` is `eep serve --http 127.0.0.1:0` as a child process of the bench in its
own session, its log in a temp dir (the failure, recovery-over-HTTP and chaos benches);
`NamespaceServer` is an instance on namespace hosts (`eep.testbed.instance.HostsInstance`, the
hosts and fuzz benches), whose head answers HTTP on host 0. Both start with an admin key (the
/admin endpoints want it as a Bearer token) and read their URL from the server's ready line on
stdout (its start-up protocol, not its log). Every wait is bounded; a server that does not
start, or exits while starting, is `BenchFailed` with its log's tail.
"""

from __future__ import annotations

import logging
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from eep.errors import EepError

if TYPE_CHECKING:
    from eep.bench.harness.clients import Trace
    from eep.testbed.instance import HostsInstance
    from eep.testbed.netns import NamespaceHosts

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0


class BenchFailed(EepError):
    """A system under test misbehaved (did not start, did not answer): the run is void."""


@dataclass(frozen=True, slots=True)
class System:
    """A configuration of `eep serve` under test: its flags, and what the timed run does to it."""

    name: str
    label: str
    serve_args: tuple[str, ...]
    kill: bool  # inject the fault
    rejoin: bool  # ask for the rank back


# --fault-policy none on the shm data plane, every elastic check off: the steady-state reference
# of the failure experiment and the fault-free server of the chaos soak's reference outputs
FIXED = System("fixed", "fixed membership (shm, no fault)", ("--ep-backend", "shm", "--fault-policy", "none"),
               kill=False, rejoin=False)


class ServerHandle(Protocol):
    """What a bench's clients need of a running server."""

    url: str  # http://host:port
    model_name: str  # the `model` of a completion request
    admin_key: str  # the Bearer token of /admin
    warmed: bool  # `clients.warm` has run on it

    @property
    def proc(self) -> subprocess.Popen[Any] | None:
        """The server's (head's) process while it runs; its pid roots the CPU sampling."""
        ...

    def log_tail(self, lines: int = 30) -> str:
        """The last `lines` lines of its log, for an error message."""
        ...


class LocalServer:
    """`eep serve --http 127.0.0.1:0` in its own session; stopped (SIGTERM, then SIGKILL of the
    whole process group) and its temp dir removed on exit, also when the run fails."""

    def __init__(self, model_path: str, system: System, *, ep_size: int, concurrency: int, trace: Trace,
                 failure_timeout_s: float, dtype: str) -> None:
        per_rank = -(-concurrency // (ep_size - 1))  # survivors must hold every running request
        self.tmp = Path(tempfile.mkdtemp(prefix="eep-bench-"))
        self.log_path = self.tmp / "serve.log"
        self.model_name = Path(model_path).name
        self.admin_key = secrets.token_hex(16)
        self.cmd = [
            sys.executable, "-m", "eep", "serve", "--model-path", model_path, "--ep-size", str(ep_size),
            "--http", "127.0.0.1:0", "--socket", str(self.tmp / "eep.sock"), "--max-num-seqs", str(per_rank),
            "--max-model-len", str(trace.max_model_len), "--failure-timeout", str(failure_timeout_s),
            "--dtype", dtype, "--admin-api-key", self.admin_key, *system.serve_args,
        ]
        self._proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.warmed = False

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self._proc

    def __enter__(self) -> LocalServer:
        try:
            self._start()
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()

    def _start(self) -> None:
        logger.info("  starting eep serve %s", " ".join(self.cmd[self.cmd.index("serve") + 1:]))
        start = time.monotonic()
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                                          start_new_session=True)
        ready = self._ready_line(start)
        if " http " not in ready:
            raise BenchFailed(f"unexpected ready line from eep serve: {ready!r}")
        self.url = ready.rsplit(" http ", 1)[1].strip()
        logger.info("  ready in %.1f s at %s", time.monotonic() - start, self.url)

    def _ready_line(self, start: float) -> str:
        """The first line on the server's stdout (bounded by `START_TIMEOUT_S` from `start`)."""
        assert self._proc is not None and self._proc.stdout is not None
        line = b""
        with selectors.DefaultSelector() as sel:
            sel.register(self._proc.stdout, selectors.EVENT_READ)
            while not line.endswith(b"\n"):
                left = START_TIMEOUT_S - (time.monotonic() - start)
                if left <= 0:
                    raise BenchFailed(f"eep serve did not start within {START_TIMEOUT_S:.0f} s; its log ends:\n"
                                      f"{self.log_tail()}")
                if not sel.select(timeout=min(left, 1.0)) and self._proc.poll() is None:
                    continue
                chunk = os.read(self._proc.stdout.fileno(), 4096)
                if not chunk:  # stdout closed: the server exited
                    raise BenchFailed(f"eep serve exited with code {self._proc.wait(STOP_TIMEOUT_S)} during "
                                      f"start-up; its log ends:\n{self.log_tail()}")
                line += chunk
        return line.decode().strip()

    def terminate(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM the server and wait (bounded) for its exit code (None: it did not exit); the
        exit then only sweeps its process group and removes its temp dir."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                logger.error("eep serve did not stop within %.0f s of SIGTERM", timeout_s)
                return None
        return proc.returncode

    def _stop(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGTERM)
                try:
                    self._proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    logger.warning("eep serve did not stop within %.0f s: killing it", STOP_TIMEOUT_S)
            try:  # ranks left behind by a server that did not stop cleanly
                os.killpg(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._proc.wait(STOP_TIMEOUT_S)
            if self._proc.stdout is not None:
                self._proc.stdout.close()
            self._proc = None
        shutil.rmtree(self.tmp, ignore_errors=True)

    def log_text(self) -> str:
        """The whole log ("" if there is none); read it before the exit removes it."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_text()
        return "\n".join(text.splitlines()[-lines:]) if text else "(no log)"


@dataclass
class NamespaceServer:
    """A `HostsInstance` started by `start_namespace_server`, as a `ServerHandle`."""

    inst: HostsInstance
    url: str
    model_name: str
    admin_key: str
    warmed: bool = False

    @property
    def proc(self) -> subprocess.Popen[Any] | None:
        return self.inst.head

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.inst.log_tail(0).splitlines()[-lines:])

    def stop(self) -> None:
        """Stop every process of the instance and remove its files (a second stop is a no-op)."""
        self.inst.stop()
        self.inst.remove()


def start_namespace_server(hosts: NamespaceHosts, model_path: str, *, nnodes: int, ep_size: int, port: int,
                           http_port: int, args: list[str], env: dict[str, str] | None = None) -> NamespaceServer:
    """An instance of `ep_size` ranks on the first `nnodes` of `hosts` (controller `port`), its
    HTTP frontend on host 0's address at `http_port`, started (ready) with its own admin key."""
    from eep.testbed.instance import HostsInstance

    admin = uuid.uuid4().hex
    inst = HostsInstance(hosts, model_path, ep_size=ep_size, nnodes=nnodes, port=port, env=env, args=[
        *args, "--http", f"{hosts.addresses[0]}:{http_port}", "--admin-api-key", admin])
    inst.start()
    url = inst.ready_line.rsplit(" http ", 1)[1].strip()
    logger.info("  ready: %s", inst.ready_line.strip())
    return NamespaceServer(inst, url, Path(model_path).name, admin)
