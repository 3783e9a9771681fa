"""A private etcd server: `EtcdServer` runs Debian's `etcd` (installed by scripts/setup.sh) on
free loopback ports with its data in a temporary directory, waits until it answers, and on
leaving stops it (SIGTERM, then SIGKILL) and removes the directory, also when the caller
failed. `EtcdCluster` runs a member on each of some namespace hosts (eep.testbed.netns), on
their private addresses. Tests and benches use them; a deployment runs its own etcd cluster.

etcd runs with `--heartbeat-interval 50 --election-timeout 500`: with its defaults (100 / 1000
ms) it grants a 1 s lease as 2 s, and a host's lease is how a lost host is seen.

Authentication is on (`auth=True`, the default): a `root` user with a random password
(`root_password`), and `grant(instance, secret)` makes an instance's user, as an operator does
with `eep secret etcd-grant` (`eep.membership.etcd_auth`). A client without credentials can
neither read nor write anything.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from eep.errors import ConfigError
from eep.security.secret import ClusterSecret
from eep.testbed.netns import NamespaceHosts, entered

logger = logging.getLogger(__name__)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EtcdServer:
    """One etcd member on `host` (a loopback or namespace address); `endpoint` is its client URL."""

    def __init__(self, host: str = "127.0.0.1", *, name: str = "eep-etcd", start_timeout_s: float = 20.0,
                 netns: str | None = None, cluster: dict[str, str] | None = None, data_dir: Path | None = None,
                 detach: bool = False, auth: bool = True) -> None:
        """`netns`: run in that namespace (then the ports are etcd's own, 2379 and 2380, on
        `host`); `cluster`: every member's name -> peer URL (a member of that cluster);
        `data_dir`: where its data goes (default: a new temporary directory); `detach`: leave
        it running and its data in place at exit (the command line's `up`)."""
        self.host, self.name, self.start_timeout_s = host, name, start_timeout_s
        self.netns, self.cluster, self.detach = netns, cluster, detach
        self.auth = auth
        self.root_password = secrets.token_hex(16)
        self.endpoint = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = data_dir

    def __enter__(self) -> EtcdServer:
        self.start()
        try:
            self.wait_ready()
            if self.auth:
                self.enable_auth()
        except BaseException:
            self.stop()
            raise
        return self

    def enable_auth(self) -> None:
        from eep.membership.etcd_auth import enable_auth

        with entered(self.netns) if self.netns else contextlib.nullcontext():
            enable_auth(self.endpoint, self.root_password)

    def grant(self, instance: str, secret: ClusterSecret) -> tuple[str, str]:
        """Make `instance`'s etcd user (as `eep secret etcd-grant`); its credentials."""
        from eep.membership.etcd_auth import grant_instance

        with entered(self.netns) if self.netns else contextlib.nullcontext():
            grant_instance(self.endpoint, self.root_password, instance, secret)
        return secret.etcd_credentials(instance)

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def log_path(self) -> Path | None:
        return None if self._dir is None else self._dir / "etcd.log"

    def start(self) -> None:
        exe = shutil.which("etcd") or "/usr/bin/etcd"
        if not Path(exe).exists():
            raise ConfigError("etcd is not installed: run scripts/setup.sh (it installs Debian's etcd-server)")
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="eep-etcd-"))
        self._dir.mkdir(parents=True, exist_ok=True)
        if self.netns is None:
            client = f"http://{self.host}:{_free_port(self.host)}"
            peer = f"http://{self.host}:{_free_port(self.host)}"
        else:
            client, peer = f"http://{self.host}:2379", f"http://{self.host}:2380"
        cluster = self.cluster or {self.name: peer}
        cmd = [
            exe, "--name", self.name, "--data-dir", str(self._dir / "data"),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", ",".join(f"{n}={u}" for n, u in cluster.items()), "--initial-cluster-state", "new",
            "--heartbeat-interval", "50", "--election-timeout", "500",
            "--logger", "zap", "--log-outputs", str(self.log_path),
        ]
        if self.netns is not None:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]  # `ip` execs etcd: the pid is etcd's
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.endpoint = client
        logger.info("etcd %s starting at %s (pid %d)", self.name, client, self.proc.pid)

    def wait_ready(self) -> None:
        """Until the member reports itself healthy (a member of a cluster: once a leader is
        elected, so start every member first)."""
        assert self.proc is not None
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if self.proc.poll() is not None:
                tail = self._log_tail()
                self.stop()
                raise ConfigError(f"etcd {self.name} exited with code {self.proc.returncode} at start: {tail}")
            if self.healthy():
                return
            if time.monotonic() > deadline:
                tail = self._log_tail()
                self.stop()
                raise ConfigError(f"etcd {self.name} did not answer within {self.start_timeout_s:g} s: {tail}")
            time.sleep(0.05)

    def healthy(self, timeout_s: float = 1.0) -> bool:
        with entered(self.netns) if self.netns else contextlib.nullcontext():
            try:
                return bool(httpx.get(f"{self.endpoint}/health", timeout=timeout_s).json().get("health") == "true")
            except (httpx.HTTPError, ValueError):
                return False

    def kill(self) -> None:
        """SIGKILL the member (a test's fault); `stop` still cleans up."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.detach:
            return
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def _log_tail(self, chars: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:] if self.log_path else ""
        except OSError:
            return ""


class EtcdCluster:
    """A member on each of `members` of namespace `hosts`, at their private addresses (client
    port 2379): `endpoints` for the clients that run on those hosts."""

    def __init__(self, hosts: NamespaceHosts, members: range | list[int] = range(3), *, detach: bool = False,
                 auth: bool = True) -> None:
        self.hosts, self.auth = hosts, auth
        self.members = list(members)
        self.detach = detach
        base = Path(tempfile.gettempdir()) / f"{hosts.prefix}-etcd" if detach else None
        peers = {f"m{i}": f"http://{hosts.addresses[i]}:2380" for i in self.members}
        self.servers = [EtcdServer(hosts.addresses[i], name=f"m{i}", netns=hosts.names[i], cluster=peers,
                                   data_dir=None if base is None else base / f"m{i}", detach=detach, auth=auth)
                        for i in self.members]
        self.root_password = self.servers[0].root_password

    @property
    def endpoints(self) -> list[str]:
        return [s.endpoint for s in self.servers]

    def __enter__(self) -> EtcdCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        try:
            for s in self.servers:
                s.start()
            for s in self.servers:
                s.wait_ready()
            if self.auth:  # cluster-wide: once, on one member
                self.servers[0].enable_auth()
        except BaseException:
            self.stop()
            raise

    def grant(self, instance: str, secret: ClusterSecret) -> tuple[str, str]:
        return self.servers[0].grant(instance, secret)

    def stop(self) -> None:
        for s in self.servers:
            s.stop()
