"""The multi-host test bed (eep.testbed): hosts as network namespaces joined by a bridge, a
3-member etcd cluster on them (authentication on), and what the membership store does across them: a member's
loss is ridden out by failing over to another endpoint, and a partitioned host can neither
commit a view nor keep its lease. Root only (CI runs as root)."""

from __future__ import annotations

import base64
import secrets
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from eep.membership.store import Committed, EpochConflict, EtcdStore, LeaseLost, StoreError
from eep.security.secret import ClusterSecret, init_secret_file
from eep.testbed.etcd import EtcdCluster
from eep.testbed.netns import NamespaceHosts, available, run_in

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))

T = TypeVar("T")
SECRET = ClusterSecret(secrets.token_bytes(32))


def on_host(hosts: NamespaceHosts, i: int, fn: Callable[[], T], timeout_s: float = 60.0) -> T:
    """`fn()` inside host i's namespace."""
    return run_in(hosts.names[i], fn, timeout_s)


@pytest.fixture(scope="module")
def hosts() -> Iterator[NamespaceHosts]:
    with NamespaceHosts(3, prefix=f"eept{uuid.uuid4().hex[:6]}") as h:
        yield h


def _commit(store: EtcdStore, expected: int, committed: Committed, within_s: float = 10.0) -> float:
    """Commit, retrying while no member answers (an election; the store knows a retry's own
    commit that went through). Returns how long it took."""
    start = time.monotonic()
    while True:
        try:
            store.commit(expected, committed)
            return time.monotonic() - start
        except StoreError:
            assert time.monotonic() - start < within_s, f"no member took the commit of epoch {committed.epoch}"


def _routes() -> str:
    return subprocess.run(["ip", "route"], capture_output=True, text=True, timeout=10).stdout


def test_hosts_reach_each_other_on_private_addresses_only_and_leave_nothing() -> None:
    before = _routes()
    h = NamespaceHosts(2, prefix=f"eepr{uuid.uuid4().hex[:6]}")
    with h:
        assert _routes() == before  # the root namespace's routes are untouched
        server = on_host(h, 1, lambda: socket.create_server((h.addresses[1], 0)))
        port = server.getsockname()[1]
        accepted: list[bytes] = []
        acceptor = threading.Thread(target=lambda: accepted.append(server.accept()[0].recv(5)), daemon=True)
        acceptor.start()

        def hello() -> None:
            with socket.create_connection((h.addresses[1], port), timeout=5) as c:
                c.sendall(b"hello")

        on_host(h, 0, hello)
        acceptor.join(10)
        server.close()
        assert accepted == [b"hello"]
        h.cut(1)  # a partition: host 0 no longer reaches host 1

        def unreachable() -> None:
            with pytest.raises(OSError), socket.create_connection((h.addresses[1], port), timeout=0.5):
                pass

        on_host(h, 0, unreachable)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    assert h.prefix not in listed


def test_the_store_rides_out_the_loss_of_an_etcd_member(hosts: NamespaceHosts) -> None:
    """Commits from host 0 go on while etcd member 0 (host 0's own, and perhaps the leader) is
    SIGKILLed: the client fails over to another endpoint and each epoch is committed once."""
    with EtcdCluster(hosts) as cluster:
        instance = uuid.uuid4().hex
        credentials = cluster.grant(instance, SECRET)

        def run() -> tuple[int, float]:
            store = EtcdStore(cluster.endpoints, instance=instance, timeout_s=0.5, credentials=credentials)
            longest = 0.0
            try:
                store.commit(None, Committed(1, {"n": 1}))
                for epoch in range(1, 41):
                    if epoch == 10:
                        cluster.servers[0].kill()
                    longest = max(longest, _commit(store, epoch, Committed(epoch + 1, {"n": epoch + 1})))
                return store.current().epoch, longest  # type: ignore[union-attr]
            finally:
                store.close()

        epoch, longest = on_host(hosts, 0, run)
    assert epoch == 41
    assert longest < 3.0, f"a commit waited {longest:.2f} s across the member's loss"
    print(f"longest commit across the loss of a member: {longest:.3f} s")


class _AnswerDropper:
    """A TCP proxy in front of one etcd member that passes each request on and, once the member
    has begun to answer, closes the client's connection instead: a connection lost between a
    request's arrival and its answer. Its thread and sockets live in the namespace of the thread
    that makes it."""

    def __init__(self, address: str, upstream: str) -> None:
        self.upstream = upstream.removeprefix("http://").rsplit(":", 1)
        self.server = socket.create_server((address, 0))
        self.server.settimeout(0.2)
        self.endpoint = f"http://{address}:{self.server.getsockname()[1]}"
        self.dropped = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.server.accept()
            except TimeoutError:
                continue
            with client, socket.create_connection((self.upstream[0], int(self.upstream[1])), timeout=5) as member:
                client.settimeout(5)
                request = b""
                while b"\r\n\r\n" not in request:
                    request += client.recv(65536)
                head, _, body = request.partition(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                while len(body) < length:
                    body += client.recv(65536)
                member.sendall(head + b"\r\n\r\n" + body)
                if member.recv(65536):  # the member answers: it has applied the request
                    self.dropped += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.server.close()


def test_a_commit_whose_answer_is_lost_is_made_once_and_known_as_made(hosts: NamespaceHosts) -> None:
    """The controller's connection to the member it commits through is lost after the member
    applied the commit: the store goes on to another endpoint, finds its own commit there (not
    a conflict: the controller would stop) and the epoch advanced once; another writer from
    the same epoch is still refused."""
    with EtcdCluster(hosts) as cluster:
        instance = uuid.uuid4().hex
        credentials = cluster.grant(instance, SECRET)

        def run() -> tuple[int, list[int], type]:
            proxy = _AnswerDropper(hosts.addresses[0], cluster.endpoints[0])
            store = EtcdStore([proxy.endpoint, *cluster.endpoints[1:]], instance=instance, timeout_s=1.0,
                              credentials=credentials)
            other = EtcdStore(cluster.endpoints[::-1], instance=instance, timeout_s=1.0, credentials=credentials)
            try:
                store.commit(None, Committed(0, {"n": 0}))  # through the proxy: applied, answer lost
                store._good = 0  # back to the proxy for the next one too
                store.commit(0, Committed(1, {"n": 1}))
                reply = other._call("/v3/kv/range", {"key": base64.b64encode(f"/eep/{instance}/epoch".encode()).decode()})
                with pytest.raises(EpochConflict) as refused:
                    other.commit(0, Committed(1, {"n": "other"}))
                versions = [int(kv["version"]) for kv in reply["kvs"]]
                return proxy.dropped, versions, refused.type
            finally:
                proxy.close()
                store.close()
                other.close()

        dropped, versions, _ = on_host(hosts, 0, run)
    assert dropped == 2, "each commit's answer must have been dropped once"
    assert versions == [2], f"the epoch key was written {versions} times for two commits"


def test_a_partitioned_host_can_neither_commit_nor_keep_its_lease(hosts: NamespaceHosts) -> None:
    """Host 2 is cut off: its store cannot commit (its etcd member has no quorum) and its lease
    lapses for the others, who commit on; healed, its commit from the old epoch is refused and
    it learns the newer view by watching."""
    with EtcdCluster(hosts) as cluster:
        instance = uuid.uuid4().hex
        credentials = cluster.grant(instance, SECRET)
        stores = {i: on_host(hosts, i, lambda: EtcdStore(cluster.endpoints[i:i + 1], instance=instance,
                                                         timeout_s=0.5, credentials=credentials)) for i in (0, 2)}
        try:
            on_host(hosts, 0, lambda: stores[0].commit(None, Committed(1, {"by": 0})))  # every member up
            lease = on_host(hosts, 2, lambda: stores[2].register_host("h2", {"ranks": [4, 5]}, ttl_s=1.0))
            assert "h2" in on_host(hosts, 0, stores[0].hosts)
            hosts.cut(2)
            with pytest.raises(StoreError):  # no quorum on its side: nothing commits
                on_host(hosts, 2, lambda: stores[2].commit(1, Committed(2, {"by": 2})))
            on_host(hosts, 0, lambda: _commit(stores[0], 1, Committed(2, {"by": 0})))
            deadline = time.monotonic() + 5.0

            def lapsed() -> bool:
                return "h2" not in stores[0].hosts()

            while not on_host(hosts, 0, lapsed):
                assert time.monotonic() < deadline, "the cut-off host is still listed"
                time.sleep(0.1)
            hosts.heal(2)

            def after_heal() -> Committed | None:
                end = time.monotonic() + 10
                while True:  # its member catches up with the cluster first
                    try:
                        with pytest.raises(EpochConflict):
                            stores[2].commit(1, Committed(2, {"by": 2}))
                        return stores[2].wait_newer(1, 5.0)
                    except StoreError:
                        assert time.monotonic() < end, "host 2's member did not rejoin the cluster"
                        time.sleep(0.1)

            assert on_host(hosts, 2, after_heal) == Committed(2, {"by": 0})
            with pytest.raises((LeaseLost, StoreError)):
                on_host(hosts, 2, lease.keep_alive)
        finally:
            hosts.heal(2)
            for s in stores.values():
                s.close()


def test_the_script_makes_hosts_with_an_etcd_cluster_and_removes_everything() -> None:
    prefix = f"eeps{uuid.uuid4().hex[:6]}"
    script = [str(Path(__file__).resolve().parents[1] / "scripts" / "netns-hosts.sh")]
    try:
        up = subprocess.run([*script, "up", "3", "--etcd", "--prefix", prefix], capture_output=True, text=True,
                            timeout=120)
        assert up.returncode == 0, up.stderr
        assert f"{prefix}-h0=10.77.0.1" in up.stdout and "etcd endpoints: http://10.77.0.1:2379" in up.stdout
        password = Path(up.stdout.split("root's password: ")[1].split()[0])
        assert password.stat().st_mode & 0o077 == 0
        secret_file = init_secret_file(Path(password.parent) / "cluster.secret")
        endpoints = "http://10.77.0.1:2379,http://10.77.0.2:2379,http://10.77.0.3:2379"
        grant = subprocess.run(  # as an operator grants an instance its etcd user
            ["ip", "netns", "exec", f"{prefix}-h1", sys.executable, "-m", "eep", "secret", "etcd-grant",
             "--etcd-endpoints", endpoints, "--cluster-secret-file", str(secret_file),
             "--root-password-file", str(password)], capture_output=True, text=True, timeout=60)
        assert grant.returncode == 0 and "etcd user eep-default" in grant.stdout, grant.stderr
        probe = subprocess.run(  # a client on host 1 commits through the cluster, with the instance's user
            ["ip", "netns", "exec", f"{prefix}-h1", sys.executable, "-c",
             "import sys\n"
             "from eep.membership.store import EtcdStore, Committed\n"
             "from eep.security.secret import ClusterSecret\n"
             f"s = EtcdStore('{endpoints}', credentials=ClusterSecret.load(sys.argv[1]).etcd_credentials('default'))\n"
             "s.commit(None, Committed(1, {'ok': True})); print(s.current().record)\n"
             f"anon = EtcdStore('{endpoints}')\n"
             "try:\n    anon.current()\nexcept Exception as e:\n    print('anonymous refused:', type(e).__name__)\n",
             str(secret_file)], capture_output=True, text=True, timeout=60)
        assert probe.returncode == 0 and "{'ok': True}" in probe.stdout, probe.stderr
        assert "anonymous refused: StoreError" in probe.stdout, probe.stdout
    finally:
        down = subprocess.run([*script, "down", "--prefix", prefix], capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    assert prefix not in listed
    running = subprocess.run(["pgrep", "-f", f"{prefix}-etcd"], capture_output=True, text=True, timeout=10).stdout
    assert not running.strip(), f"etcd members left running: {running}"
