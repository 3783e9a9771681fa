"""One eep instance over namespace hosts, launched as a user launches it on real ones:
`eep serve --nnodes N --node-rank 0 ...` on host 0 (frontend, controller, its ranks) and
`eep serve --node-rank i ...` on every other host (an agent and its ranks).

The frontend answers on a Unix socket in a temporary directory: a path in the file system is
reachable from every network namespace, so a client in the root namespace talks to it without
any address of its own on the bridge. The instance's cluster secret (`secret_file`, made by
`eep secret init`'s own function, 0600) lies in the same directory and is passed to every
node; grant its etcd user (`EtcdCluster.grant(instance, inst.secret)`) before `start`.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

from eep.errors import EepError
from eep.security.secret import ClusterSecret, init_secret_file
from eep.testbed.netns import NamespaceHosts

logger = logging.getLogger(__name__)

PORT = 29500  # node 0's --dist-init-addr port; rank r's data plane listens on PORT + 1 + r


class InstanceError(EepError):
    """The instance did not come up."""


class HostsInstance:
    def __init__(self, hosts: NamespaceHosts, model_path: str, *, ep_size: int, args: Sequence[str] = (),
                 nnodes: int | None = None, port: int = PORT, env: dict[str, str] | None = None,
                 start_timeout_s: float = 120.0, node_args: dict[int, Sequence[str]] | None = None) -> None:
        self.hosts, self.model_path, self.ep_size = hosts, model_path, ep_size
        self.nnodes = hosts.n if nnodes is None else nnodes  # on hosts 0 .. nnodes-1
        self.args = list(args)
        # what one host's processes get besides (later flags win: e.g. its own etcd member first)
        self.node_args = {n: list(a) for n, a in (node_args or {}).items()}
        self.start_timeout_s = start_timeout_s
        self.port = port
        self.env = {**os.environ, **(env or {})}
        self.ready_line = ""
        self.dir = Path(tempfile.mkdtemp(prefix="eep-hosts-", dir="/tmp"))  # short: a socket path has 107 bytes
        self.socket = self.dir / "eep.sock"
        self.secret_file = init_secret_file(self.dir / "cluster.secret")
        self.secret = ClusterSecret.load(self.secret_file)
        self.head: subprocess.Popen[str] | None = None
        self.agents: dict[int, subprocess.Popen[str]] = {}
        self.standbys: dict[int, subprocess.Popen[str]] = {}

    @property
    def dist_init_addr(self) -> str:
        return f"{self.hosts.addresses[0]}:{self.port}"

    def _cmd(self, node: int) -> list[str]:
        return [sys.executable, "-m", "eep", "serve", "--model-path", self.model_path, "--ep-size", str(self.ep_size),
                "--nnodes", str(self.nnodes), "--node-rank", str(node), "--dist-init-addr", self.dist_init_addr,
                "--cluster-secret-file", str(self.secret_file), *self.args, *self.node_args.get(node, [])]

    def log(self, node: int) -> Path:
        return self.dir / f"node{node}.log"

    def log_tail(self, node: int = 0, chars: int = 4000) -> str:
        path = self.log(node)
        return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"

    def start(self) -> HostsInstance:
        try:
            with self.log(0).open("a") as err:
                self.head = self.hosts.popen(0, [*self._cmd(0), "--socket", str(self.socket)],
                                             stdout=subprocess.PIPE, stderr=err, text=True, env=self.env)
            for node in range(1, self.nnodes):
                self.start_agent(node)
            self.ready_line = line = self._first_line()
            if not line.startswith("eep serve: ready"):
                raise InstanceError(f"node 0 printed {line!r} instead of its ready line; log:\n{self.log_tail(0)}")
        except BaseException:
            self.stop()
            raise
        return self

    def _first_line(self) -> str:
        assert self.head is not None and self.head.stdout is not None
        lines: queue.Queue[str] = queue.Queue()
        out = self.head.stdout
        threading.Thread(target=lambda: lines.put(out.readline()), daemon=True).start()
        try:
            return lines.get(timeout=self.start_timeout_s)
        except queue.Empty:
            raise InstanceError(f"not ready within {self.start_timeout_s:g} s; log:\n{self.log_tail(0)}") from None

    def start_agent(self, node: int) -> subprocess.Popen[str]:
        """(Re)start node's agent: a host that returns."""
        with self.log(node).open("a") as err:
            proc = self.hosts.popen(node, self._cmd(node), stdout=subprocess.DEVNULL, stderr=err, text=True,
                                    env=self.env)
        self.agents[node] = proc
        return proc

    def start_standby(self, node: int, http: str, args: Sequence[str] = ()) -> str:
        """`eep serve --standby` on host `node` with the head's flags (and `args`, which override
        them), its HTTP on `http`; returns its URL once it stands by."""
        with (self.dir / f"standby{node}.log").open("a") as err:
            proc = self.hosts.popen(node, [*self._cmd(node), "--standby", "--http", http, *args],
                                    stdout=subprocess.PIPE, stderr=err, text=True, env=self.env)
        self.standbys[node] = proc
        lines: queue.Queue[str] = queue.Queue()
        out = proc.stdout
        assert out is not None
        threading.Thread(target=lambda: lines.put(out.readline()), daemon=True).start()
        try:
            line = lines.get(timeout=self.start_timeout_s)
        except queue.Empty:
            raise InstanceError(f"the standby on node {node} did not start; log:\n{self.standby_log(node)}") from None
        if "standby on http://" not in line:
            raise InstanceError(f"the standby on node {node} printed {line!r}; log:\n{self.standby_log(node)}")
        return line.split(" on ", 1)[1].split(" ", 1)[0]

    def standby_log(self, node: int, chars: int = 4000) -> str:
        path = self.dir / f"standby{node}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"

    def __enter__(self) -> HostsInstance:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM the head (it stops every rank and tells the agents to go), wait for the agents;
        whatever is left is killed with its namespace by the hosts' `down`."""
        procs = ([self.head] if self.head is not None else []) + list(self.standbys.values()) + list(self.agents.values())
        for p in ([self.head] if self.head is not None else []) + list(self.standbys.values()):
            if p.poll() is None:  # a standby that took over is the head now: it stops the instance
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=timeout_s if p is self.head or p in self.standbys.values() else 10.0)
            except subprocess.TimeoutExpired:  # an agent still waiting for a head that never came
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=10.0)
                except subprocess.TimeoutExpired:
                    logger.warning("pid %d did not stop: killed", p.pid)
                    p.kill()
                    p.wait(timeout=10)
            if p.stdout is not None:
                p.stdout.close()
        self.head, self.agents, self.standbys = None, {}, {}

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
