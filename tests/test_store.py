"""The membership store (eep.membership.store): the same contract in memory and in a real etcd
(started by the project, eep.testbed.etcd, with authentication on): one commit wins per epoch,
watchers wake on a commit, a host is listed while its lease is renewed and drops out when its
holder dies; a client without the instance's credentials can neither read nor write its keys."""

from __future__ import annotations

import base64
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from eep.errors import MembershipError
from eep.membership.store import (
    Committed,
    EpochConflict,
    EtcdStore,
    LeaseLost,
    MembershipStore,
    MemoryStore,
    NotLeader,
    StoreError,
)
from eep.security.secret import ClusterSecret
from eep.testbed.etcd import EtcdServer

SECRET = ClusterSecret(secrets.token_bytes(32))


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdServer]:
    with EtcdServer() as server:
        yield server


@pytest.fixture(params=["memory", "etcd"])
def store(request: pytest.FixtureRequest, etcd: EtcdServer) -> Iterator[MembershipStore]:
    # etcd is asked for by every case: a module fixture started inside a test would count as
    # a process that test left behind (conftest)
    if request.param == "memory":
        s: MembershipStore = MemoryStore()
    else:
        s = _etcd_store(etcd, uuid.uuid4().hex)
    yield s
    s.close()


def _etcd_store(etcd: EtcdServer, instance: str, endpoints: list[str] | None = None, **kw: float) -> EtcdStore:
    """A store of `instance` with its own etcd user (granted as an operator grants it)."""
    return EtcdStore(endpoints or etcd.endpoint, instance=instance, credentials=etcd.grant(instance, SECRET), **kw)


def _view(epoch: int) -> Committed:
    return Committed(epoch, {"epoch": epoch, "states": ["active"] * 4, "placement": [[0, 1], [2, 3]]})


def test_commits_chain_by_epoch_and_a_stale_one_is_refused(store: MembershipStore) -> None:
    assert store.current() is None
    store.commit(None, _view(1))
    with pytest.raises(EpochConflict) as e:
        store.commit(None, _view(2))  # "nothing committed yet" is no longer true
    assert e.value.found == 1
    store.commit(1, _view(2))
    with pytest.raises(EpochConflict):
        store.commit(1, _view(3))  # from epoch 1 again: refused, epoch 2 stays
    assert store.current() == _view(2)


def test_a_view_changed_within_its_epoch_is_stored_and_only_over_the_writers_own_record(
    store: MembershipStore, etcd: EtcdServer
) -> None:
    """A joiner that starts loading (or fails) changes the view, not the epoch: that view is
    stored too, by the store that committed the epoch; another writer cannot overwrite it."""
    store.commit(None, _view(1))
    joining = Committed(1, {"epoch": 1, "states": ["active"] * 3 + ["joining"]})
    store.commit(1, joining)
    assert store.current() == joining
    with pytest.raises(MembershipError, match="older"):
        store.commit(1, _view(0))
    if isinstance(store, EtcdStore):  # another controller of the same instance, at the same epoch
        other = EtcdStore(etcd.endpoint, instance=store._prefix.split("/")[2],
                          credentials=store._credentials)  # type: ignore[arg-type]
        try:
            with pytest.raises(EpochConflict):
                other.commit(1, Committed(1, {"by": "other"}))
        finally:
            other.close()
    assert store.current() == joining
    store.commit(1, _view(2))
    assert store.current() == _view(2)


def test_of_controllers_racing_from_the_same_epoch_exactly_one_commits(store: MembershipStore) -> None:
    store.commit(None, _view(1))
    for epoch in range(1, 11):
        won: list[int] = []
        barrier = threading.Barrier(4)

        def contend(k: int, epoch: int = epoch) -> None:
            barrier.wait(timeout=10)
            try:
                store.commit(epoch, Committed(epoch + 1, {"by": k}))
                won.append(k)
            except EpochConflict:
                pass

        threads = [threading.Thread(target=contend, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert len(won) == 1, won
        assert store.current() == Committed(epoch + 1, {"by": won[0]})


def test_a_watcher_wakes_at_the_commit_and_times_out_without_one(store: MembershipStore) -> None:
    store.commit(None, _view(1))
    start = time.monotonic()
    assert store.wait_newer(1, 0.3) is None
    assert 0.25 <= time.monotonic() - start < 2.0
    timer = threading.Timer(0.3, lambda: store.commit(1, _view(2)))
    timer.start()
    try:
        start = time.monotonic()
        assert store.wait_newer(1, 10.0) == _view(2)
        assert time.monotonic() - start < 2.0
    finally:
        timer.join()
    assert store.wait_newer(0, 0.1) == _view(2)  # already newer: at once


def test_a_host_is_listed_while_its_lease_is_renewed(store: MembershipStore) -> None:
    lease = store.register_host("h1", {"agent": "10.0.0.1:7000", "ranks": [0, 1]}, ttl_s=1.0)
    store.register_host("h2", {"agent": "10.0.0.2:7000", "ranks": [2, 3]}, ttl_s=1.0).revoke()
    assert store.hosts() == {"h1": {"agent": "10.0.0.1:7000", "ranks": [0, 1]}}
    for _ in range(8):  # 2.4 s: more than two TTLs
        time.sleep(0.3)
        lease.keep_alive()
    assert "h1" in store.hosts()
    deadline = time.monotonic() + 5.0  # not renewed: gone after the TTL (etcd: up to ~1.3 s)
    while "h1" in store.hosts():
        assert time.monotonic() < deadline, "the lapsed host is still listed"
        time.sleep(0.05)
    with pytest.raises(LeaseLost):
        lease.keep_alive()


def _same_instance(store: MembershipStore) -> MembershipStore:
    """Another head's store of the same instance (the memory store is one process's: itself)."""
    if isinstance(store, EtcdStore):
        return EtcdStore(store.endpoints, instance=store._prefix.split("/")[2], credentials=store._credentials)
    return store


def test_one_head_holds_the_leader_key_and_another_gets_it_only_once_it_is_gone(store: MembershipStore) -> None:
    assert store.leader() is None
    lease = store.campaign("node0", {"http": "10.0.0.1:8000"}, ttl_s=1.0)
    assert store.leader() == {"head": "node0", "info": {"http": "10.0.0.1:8000"}}
    other = _same_instance(store)
    try:
        with pytest.raises(NotLeader, match="node0"):
            other.campaign("node1", {}, ttl_s=1.0)
        for _ in range(5):  # 1.5 s: past its TTL, renewed
            time.sleep(0.3)
            lease.keep_alive()
        with pytest.raises(NotLeader):
            other.campaign("node1", {}, ttl_s=1.0)
        lease.revoke()  # a clean hand-over
        other.campaign("node1", {}, ttl_s=1.0)
        assert store.leader() == {"head": "node1", "info": {}}
        assert "\0leader" not in store.hosts() and "leader" not in store.hosts()
    finally:
        if other is not store:
            other.close()


def test_a_head_whose_lease_ran_out_never_commits_again_even_from_the_current_epoch(etcd: EtcdServer) -> None:
    """The old head, cut off but alive, still believes epoch 1 is current, and it is: the epoch
    CAS alone would let it commit. The leader key's check in the same transaction refuses it."""
    old = _etcd_store(etcd, uuid.uuid4().hex)
    new = _same_instance(old)
    try:
        lease = old.campaign("node0", {}, ttl_s=1.0)
        old.commit(None, _view(1))
        deadline = time.monotonic() + 10.0
        while True:  # not renewed: the key goes with the lease (about a TTL)
            try:
                new.campaign("node1", {}, ttl_s=5.0)
                break
            except NotLeader:
                assert time.monotonic() < deadline, "the lapsed head still holds the key"
                time.sleep(0.1)
        with pytest.raises(LeaseLost):
            lease.keep_alive()
        with pytest.raises(NotLeader, match="node1"):
            old.commit(1, _view(2))
        assert old.current() == _view(1)
        new.commit(1, _view(2))  # the new head goes on from the committed view
        assert new.current() == _view(2)
        racing = [_same_instance(old) for _ in range(3)]  # and heads racing for a free key: one wins
        try:
            won: list[int] = []
            barrier = threading.Barrier(3)

            def run(k: int) -> None:
                barrier.wait(timeout=10)
                try:
                    racing[k].campaign(f"standby{k}", {}, ttl_s=5.0)
                    won.append(k)
                except NotLeader:
                    pass

            assert new.leader() == {"head": "node1", "info": {}}
            # the key gone as when its lease ends (here at once, by deleting it)
            new._call("/v3/kv/deleterange", {"key": base64.b64encode(new._prefix.encode() + b"leader").decode()})
            threads = [threading.Thread(target=run, args=(k,)) for k in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=30)
            assert len(won) == 1, won
            with pytest.raises(NotLeader):  # and the head whose key went no longer commits
                new.commit(2, _view(3))
        finally:
            for s in racing:
                s.close()
    finally:
        old.close()
        new.close()


_HOLDER = """
import sys, time
from eep.membership.store import EtcdStore
store = EtcdStore(sys.argv[1], instance=sys.argv[2], credentials=(sys.argv[3], sys.argv[4]))
lease = store.register_host("h9", {"pid": 0}, ttl_s=1.0)
print("registered", flush=True)
while True:
    time.sleep(0.25)
    lease.keep_alive()
"""


def test_the_host_of_a_sigkilled_agent_drops_out_of_etcd_within_about_its_ttl(etcd: EtcdServer) -> None:
    instance = uuid.uuid4().hex
    store = _etcd_store(etcd, instance)
    user, password = SECRET.etcd_credentials(instance)
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, etcd.endpoint, instance, user, password],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "registered"
        time.sleep(1.5)  # renewed past its first TTL
        assert "h9" in store.hosts()
        os.kill(holder.pid, signal.SIGKILL)
        killed = time.monotonic()
        while "h9" in store.hosts():
            assert time.monotonic() - killed < 4.0, "the dead agent's host is still listed"
            time.sleep(0.02)
        print(f"host gone {time.monotonic() - killed:.2f} s after SIGKILL")
    finally:
        holder.kill()
        holder.wait(timeout=10)
        store.close()


def test_a_dead_endpoint_is_skipped_and_none_left_raises(etcd: EtcdServer) -> None:
    dead = "http://127.0.0.1:9"  # discard port: nothing listens
    store = _etcd_store(etcd, uuid.uuid4().hex, [dead, etcd.endpoint], timeout_s=1.0)
    try:
        store.commit(None, _view(1))
        assert store.current() == _view(1)
    finally:
        store.close()
    alone = EtcdStore([dead], instance="x", timeout_s=0.5)
    try:
        with pytest.raises(StoreError, match="no etcd endpoint answered"):
            alone.current()
    finally:
        alone.close()


def test_without_the_instances_credentials_no_client_reads_or_writes_its_keys(etcd: EtcdServer) -> None:
    instance = uuid.uuid4().hex
    owner = _etcd_store(etcd, instance)
    anonymous = EtcdStore(etcd.endpoint, instance=instance)
    other_instance = _etcd_store(etcd, uuid.uuid4().hex)  # a real user, of another instance
    wrong = EtcdStore(etcd.endpoint, instance=instance,
                      credentials=ClusterSecret(secrets.token_bytes(32)).etcd_credentials(instance))
    try:
        owner.commit(None, _view(1))
        owner.register_host("h1", {"pid": 1}, ttl_s=5.0)
        for stranger, why in ((anonymous, "user name is empty"), (wrong, "refused user")):
            with pytest.raises(StoreError, match=why):
                stranger.current()
            with pytest.raises(StoreError, match=why):
                stranger.commit(1, _view(2))
        # the other instance's user, pointed at this instance's keys: permission denied
        other_instance._prefix = owner._prefix
        for attempt in (other_instance.current, lambda: other_instance.commit(1, _view(2)), other_instance.hosts):
            with pytest.raises(StoreError, match="permission denied"):
                attempt()
        # and below the store, the raw gateway: no read, no write, no delete without a token
        key = base64.b64encode(f"/eep/{instance}/view".encode()).decode()
        for path, body in (("/v3/kv/range", {"key": key}), ("/v3/kv/put", {"key": key, "value": "eA=="}),
                           ("/v3/kv/deleterange", {"key": key})):
            resp = httpx.post(etcd.endpoint + path, json=body, timeout=5)
            assert resp.status_code != 200 and "user name is empty" in resp.text, (path, resp.text)
        assert owner.current() == _view(1) and "h1" in owner.hosts()  # untouched by all of it
    finally:
        for s in (owner, anonymous, other_instance, wrong):
            s.close()
