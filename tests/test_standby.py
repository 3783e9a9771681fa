"""A standby head beside a two-host instance (network namespaces): `eep serve --standby` on host 1
follows the head's journal of requests over the controller's door, answers /health 503
"standby" and sends nothing to the engine; its copy holds every request the head admitted with
exactly the tokens the clients got; a client that went away is a request the head no longer
runs, there too. Lost (SIGKILL), the head goes on and reports no standby; started again, it
starts from a snapshot. Root only."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from eep.bench.harness.server import start_namespace_server
from eep.model.default_model import init_model
from eep.serving.standby import tokens_digest
from eep.testbed.etcd import EtcdCluster
from eep.testbed.instance import HostsInstance
from eep.testbed.netns import NamespaceHosts, available, entered

pytestmark = [pytest.mark.skipif(available() is not None, reason=str(available())), pytest.mark.slow]

ARGS = ["--dtype", "float32", "--max-model-len", "96", "--failure-timeout", "1.0"]
PORT, HTTP_PORT, STANDBY_PORT = 29600, 8200, 8201


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_model(tmp_path_factory.mktemp("standby") / "m", "qwen3_moe")


@pytest.fixture
def hosts() -> Iterator[NamespaceHosts]:
    with NamespaceHosts(2, prefix=f"eeps{uuid.uuid4().hex[:6]}") as h:
        yield h


def _get(hosts: NamespaceHosts, url: str) -> httpx.Response:
    with entered(hosts.names[0]):
        return httpx.get(url, timeout=30)


def _wait(condition: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def _streams(hosts: NamespaceHosts, url: str, model: str, n: int, hang_up_after: int | None = None
             ) -> dict[str, list[int]]:
    """`n` streaming completions at once from host 0's namespace: each request id and its tokens
    (with `hang_up_after`, each client goes away after that many events)."""
    got: dict[str, list[int]] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        body = {"model": model, "prompt": [5 + i, 17, 300], "max_tokens": 24, "temperature": 0, "ignore_eos": True,
                "stream": True, "return_token_ids": True}
        try:
            with entered(hosts.names[0]), httpx.stream("POST", f"{url}/v1/completions", json=body,
                                                       timeout=120) as resp:
                assert resp.status_code == 200
                ids: list[int] = []
                rid = ""
                for line in resp.iter_lines():
                    if line.startswith("data: {"):
                        data = json.loads(line[6:])
                        rid = data["id"]
                        ids += data["choices"][0]["token_ids"]
                        if hang_up_after is not None and len(ids) >= hang_up_after:
                            break
                got[rid] = ids
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors
    return got


def test_a_standby_follows_the_journal_answers_as_a_standby_and_its_loss_leaves_the_head_serving(
        hosts: NamespaceHosts, model_dir: Path) -> None:
    server = start_namespace_server(hosts, str(model_dir), nnodes=2, ep_size=4, port=PORT, http_port=HTTP_PORT,
                                    args=ARGS)
    inst = server.inst
    try:
        url = inst.start_standby(1, f"{hosts.addresses[1]}:{STANDBY_PORT}")
        health = _get(hosts, f"{url}/health")
        assert health.status_code == 503 and health.json()["status"] == "standby", health.text
        refused = _get(hosts, f"{url}/v1/models")
        assert refused.status_code == 503 and inst.dist_init_addr in refused.json()["error"]["message"]

        def follows() -> list[dict]:  # type: ignore[type-arg]
            return _get(hosts, f"{server.url}/membership").json()["replication"]["standbys"]

        _wait(lambda: len(follows()) == 1, 20, "the head reports no standby")
        assert follows()[0]["node"] == 1

        def journal() -> dict:  # type: ignore[type-arg]
            return _get(hosts, f"{url}/membership").json()["journal"]

        done = _streams(hosts, server.url, server.model_name, 6)
        tokens = sum(len(v) for v in done.values())
        _wait(lambda: journal()["tokens"] == tokens and journal()["requests"] == 6, 20,
              f"the standby's journal {journal()} is not the clients' ({tokens} tokens)")
        assert journal()["running"] == 0
        assert journal()["digest"] == tokens_digest(done)  # every request with exactly the clients' tokens
        # clients that went away: requests the head no longer runs, on the standby too
        left = _streams(hosts, server.url, server.model_name, 3, hang_up_after=4)
        assert len(left) == 3
        _wait(lambda: journal()["requests"] == 9 and journal()["running"] == 0, 20,
              f"the standby still believes the head runs them: {journal()}")
        # the standby lost: the head serves on and says so
        inst.standbys[1].kill()
        inst.standbys[1].wait(timeout=10)
        _wait(lambda: follows() == [], 10, "the head still reports its lost standby")
        assert len(_streams(hosts, server.url, server.model_name, 2)) == 2
        assert _get(hosts, f"{server.url}/health").status_code == 200
        # started again: from a snapshot of the head's journal
        url = inst.start_standby(1, f"{hosts.addresses[1]}:{STANDBY_PORT}")
        _wait(lambda: journal()["requests"] == 11, 20, f"no snapshot: {journal()}")
    finally:
        server.stop()


def test_a_head_followed_by_a_standby_stops_serving_once_its_leader_key_can_have_lapsed(
        hosts: NamespaceHosts, model_dir: Path) -> None:
    """etcd out of reach (its member SIGSTOPped): a head that a standby follows cannot renew its
    leader key, and by its own clock the key may be gone after one TTL, the standby leading: it
    stops serving then (503 with the reason), whether or not etcd ever answers again. (Without a
    standby it serves on: tests/test_hosts.py, the etcd outage.)"""
    with EtcdCluster(hosts, members=[0]) as cluster:
        instance = f"s{uuid.uuid4().hex[:6]}"
        inst = HostsInstance(hosts, str(model_dir), ep_size=4, port=PORT, args=[
            *ARGS, "--etcd-endpoints", cluster.endpoints[0], "--instance", instance, "--head-lease-ttl", "2",
            "--http", f"{hosts.addresses[0]}:{HTTP_PORT}"])
        cluster.grant(instance, inst.secret)
        etcd_pid = cluster.servers[0].proc.pid  # type: ignore[union-attr]
        try:
            inst.start()
            url = inst.ready_line.rsplit(" http ", 1)[1].strip()
            # without etcd of its own: it must not take over when the head's key lapses at the end
            inst.start_standby(1, f"{hosts.addresses[1]}:{STANDBY_PORT}", ["--etcd-endpoints", ""])
            _wait(lambda: len(_get(hosts, f"{url}/membership").json()["replication"]["standbys"]) == 1, 20,
                  "the head reports no standby")
            time.sleep(1.0)  # a renewal with the standby following
            assert _get(hosts, f"{url}/health").status_code == 200
            os.kill(etcd_pid, signal.SIGSTOP)
            stopped = time.monotonic()
            _wait(lambda: _get(hosts, f"{url}/health").status_code == 503, 10, "the head still serves")
            waited = time.monotonic() - stopped
            assert waited <= 2.0 + 1.0, waited  # one TTL after the last renewal, at most
            reason = _get(hosts, f"{url}/health").json()["reason"]
            assert "no longer leads" in reason and "standby" in reason, reason
            refused = _streams_status(hosts, url)
            assert refused == 503
        finally:
            os.kill(etcd_pid, signal.SIGCONT)
            inst.stop()
            inst.remove()


def _streams_status(hosts: NamespaceHosts, url: str) -> int:
    with entered(hosts.names[0]):
        return httpx.post(f"{url}/v1/completions", json={"model": "m", "prompt": [1, 2], "max_tokens": 2},
                          timeout=30).status_code
