"""Hosts as network namespaces, made and removed by the project (root only).

`NamespaceHosts(n)` makes n namespaces `{prefix}-h{i}` ("hosts") and one `{prefix}-br` holding
a bridge; each host is joined to the bridge by a veth pair and gets the address 10.77.0.{i+1}/24
on its end (`eth0`), with loopback up. Those addresses exist only inside the namespaces: the
root namespace's addresses, links and routes are not touched, and nothing in a host can reach
anything but the other hosts. `cut(i)` takes host i's link down on the bridge's side (a
partition: no FIN or RST reaches anyone), `heal(i)` brings it back, `kill_all(i)` SIGKILLs
every process in host i. `down()` kills what runs in the namespaces and deletes them (their
veths go with them), also after a failed test.

`entered(name)` runs the calling *thread* inside a namespace (setns(2) is per thread), so a
test can open sockets on a host without a subprocess.

Command line (scripts/netns-hosts.sh): `python -m eep.testbed.netns up N [--etcd]` / `down`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from eep.errors import ConfigError

T = TypeVar("T")

logger = logging.getLogger(__name__)

SUBNET = "10.77.0"
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise ConfigError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done


def available() -> str | None:
    """Why namespace hosts cannot be made here, or None if they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    try:
        _ip("netns", "list")
    except (OSError, ConfigError) as e:
        return f"`ip netns` does not work here: {e}"
    return None


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def entered(name: str) -> Iterator[None]:
    """Run the calling thread in namespace `name` for the block (sockets made inside stay in it)."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)


def run_in(name: str, fn: Callable[[], T], timeout_s: float = 600.0) -> T:
    """`fn()` in a thread inside namespace `name` (its sockets are that host's); its result, or
    its exception raised here."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            with entered(name):
                box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 (handed to the caller)
            box["error"] = e

    t = threading.Thread(target=run, name=f"in-{name}", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise TimeoutError(f"{name}: still running after {timeout_s:g} s")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def pids_in(name: str) -> list[int]:
    done = _ip("netns", "pids", name, check=False)
    return [int(p) for p in done.stdout.split()] if done.returncode == 0 else []


class NamespaceHosts:
    """n hosts joined by a bridge; see the module docstring."""

    def __init__(self, n: int, prefix: str | None = None) -> None:
        if not 1 <= n <= 200:
            raise ConfigError(f"1 to 200 hosts, not {n}")
        self.n = n
        self.prefix = prefix or f"eep{os.getpid()}"
        self.bridge_ns = f"{self.prefix}-br"
        self.names = [f"{self.prefix}-h{i}" for i in range(n)]
        self.addresses = [f"{SUBNET}.{i + 1}" for i in range(n)]
        self._tag = f"{zlib.crc32(self.prefix.encode()) % 10**6:06d}"  # interface names: at most 15 characters

    def __enter__(self) -> NamespaceHosts:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def _bridge_port(self, i: int) -> str:
        return f"b{self._tag}h{i}"

    def up(self) -> None:
        try:
            _ip("netns", "add", self.bridge_ns)
            _ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.bridge_ns, "link", "set", "br0", "up")
            _ip("-n", self.bridge_ns, "link", "set", "lo", "up")
            for i, (name, addr) in enumerate(zip(self.names, self.addresses)):
                _ip("netns", "add", name)
                port, end = self._bridge_port(i), f"h{self._tag}h{i}"
                # made in the bridge's namespace, one end moved into the host: the root
                # namespace never holds either
                _ip("-n", self.bridge_ns, "link", "add", port, "type", "veth", "peer", "name", end)
                _ip("-n", self.bridge_ns, "link", "set", end, "netns", name)
                _ip("-n", self.bridge_ns, "link", "set", port, "master", "br0")
                _ip("-n", self.bridge_ns, "link", "set", port, "up")
                _ip("-n", name, "link", "set", end, "name", "eth0")
                _ip("-n", name, "addr", "add", f"{addr}/24", "dev", "eth0")
                _ip("-n", name, "link", "set", "eth0", "up")
                _ip("-n", name, "link", "set", "lo", "up")
        except BaseException:
            self.down()
            raise
        logger.info("namespace hosts up: %s", ", ".join(f"{n}={a}" for n, a in zip(self.names, self.addresses)))

    def cut(self, i: int) -> None:
        """Partition host i: its link goes down on the bridge's side."""
        _ip("-n", self.bridge_ns, "link", "set", self._bridge_port(i), "down")

    def heal(self, i: int) -> None:
        _ip("-n", self.bridge_ns, "link", "set", self._bridge_port(i), "up")

    def kill_all(self, i: int) -> list[int]:
        """SIGKILL every process in host i; returns their pids."""
        pids = pids_in(self.names[i])
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return pids

    def popen(self, i: int, cmd: Sequence[str], **kwargs: object) -> subprocess.Popen[str]:
        """Start `cmd` on host i."""
        return subprocess.Popen(["ip", "netns", "exec", self.names[i], *cmd], **kwargs)  # type: ignore[call-overload, no-any-return]

    def down(self) -> None:
        for name in [*self.names, self.bridge_ns]:
            if not Path(f"/run/netns/{name}").exists():
                continue
            for _ in range(50):  # its processes first: a namespace with processes outlives `ip netns del`
                pids = pids_in(name)
                if not pids:
                    break
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.05)
            _ip("netns", "del", name, check=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eep.testbed.netns", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="make N namespace hosts (and a 3-member etcd cluster on them with --etcd)")
    up.add_argument("n", type=int)
    up.add_argument("--prefix", default="eep-hosts")
    up.add_argument("--etcd", action="store_true")
    down = sub.add_parser("down", help="remove them and everything running in them")
    down.add_argument("--prefix", default="eep-hosts")
    down.add_argument("--n", type=int, default=200, help="how many hosts there may be")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per health check
    if (why := available()) is not None:
        print(why, file=sys.stderr)
        return 2
    if args.cmd == "up":
        hosts = NamespaceHosts(args.n, args.prefix)
        hosts.up()
        print(" ".join(f"{n}={a}" for n, a in zip(hosts.names, hosts.addresses)))
        if args.etcd:
            from eep.testbed.etcd import EtcdCluster

            cluster = EtcdCluster(hosts, members=range(min(3, args.n)), detach=True)
            cluster.start()
            print("etcd endpoints:", ",".join(cluster.endpoints))
            password = Path(tempfile.gettempdir()) / f"{args.prefix}-etcd" / "root.password"
            fd = os.open(password, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(cluster.root_password + "\n")
            print(f"etcd authentication on; root's password: {password} (grant an instance: "
                  f"eep secret etcd-grant --root-password-file {password} ...)")
        return 0
    existing = [n for n in _ip("netns", "list").stdout.split() if n.startswith(args.prefix + "-")]
    hosts = NamespaceHosts(1, args.prefix)
    hosts.names = [n for n in existing if n != hosts.bridge_ns]
    hosts.down()
    shutil.rmtree(Path(tempfile.gettempdir()) / f"{args.prefix}-etcd", ignore_errors=True)  # `up --etcd`'s data
    for n in existing:
        print("removed", n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
