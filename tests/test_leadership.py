"""The head's hold on the instance's leader key (eep.control.leadership), in a real etcd with
authentication on: one head holds it and renews it past its TTL, a second head is refused; a key
whose lease lapsed (an etcd outage) is taken back by its head, which goes on; a key another head
took deposes the head within one TTL: its engine loop stops serving with the reason, and its
controller can commit no view, even from the epoch that is still current."""

from __future__ import annotations

import base64
import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from eep.config import EngineConfig
from eep.control.config import EPConfig
from eep.control.executor import EPExecutor
from eep.control.leadership import Leadership
from eep.engine.engine import LLMEngine
from eep.engine.loop import EngineLoop
from eep.engine.sampling import SamplingParams
from eep.errors import EngineUnavailable, MembershipError
from eep.membership.store import EtcdStore, NotLeader
from eep.model.default_model import init_model
from eep.security.secret import ClusterSecret, init_secret_file
from eep.testbed.etcd import EtcdServer

TTL_S = 1.0


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdServer]:
    with EtcdServer() as server:
        yield server


@pytest.fixture(scope="module")
def secret_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_secret_file(tmp_path_factory.mktemp("secret") / "cluster.secret")


def _store(etcd: EtcdServer, instance: str, secret_file: Path) -> EtcdStore:
    secret = ClusterSecret.load(secret_file)
    return EtcdStore(etcd.endpoint, instance=instance, credentials=etcd.grant(instance, secret))


def _leader_key(store: EtcdStore) -> str:
    return base64.b64encode((store._prefix + "leader").encode()).decode()


def _take_over(store: EtcdStore, head: str) -> None:
    """What a standby does once the key is gone, with the key removed at once (as when the
    holder's lease ends): afterwards `head` holds it."""
    store._call("/v3/kv/deleterange", {"key": _leader_key(store)})
    store.campaign(head, {}, ttl_s=30.0)


def _wait(condition: object, timeout_s: float) -> float:
    start = time.monotonic()
    while not condition():  # type: ignore[operator]
        assert time.monotonic() - start < timeout_s, f"not within {timeout_s} s"
        time.sleep(0.02)
    return time.monotonic() - start


def test_one_head_holds_the_key_past_its_ttl_and_a_second_is_refused(etcd: EtcdServer, secret_file: Path) -> None:
    instance = f"l{uuid.uuid4().hex[:6]}"
    mine, other = _store(etcd, instance, secret_file), _store(etcd, instance, secret_file)
    head = Leadership(mine, "node0", {"control": "10.0.0.1:29500"}, TTL_S)
    try:
        time.sleep(3 * TTL_S)  # renewed from its thread
        assert other.leader() == {"head": "node0", "info": {"control": "10.0.0.1:29500"}}
        with pytest.raises(NotLeader, match="node0"):
            Leadership(other, "node1", {}, TTL_S)
        assert head.deposed is None and head.terms == 1
        head.close()  # gives the key up at once: a standby need not wait for the TTL
        assert other.leader() is None
    finally:
        head.close()
        mine.close()
        other.close()


def test_a_lapsed_key_is_taken_back_and_a_taken_key_deposes_the_head(etcd: EtcdServer, secret_file: Path) -> None:
    instance = f"l{uuid.uuid4().hex[:6]}"
    mine, other = _store(etcd, instance, secret_file), _store(etcd, instance, secret_file)
    reasons: list[str] = []
    head = Leadership(mine, "node0", {}, TTL_S, reasons.append)
    try:
        # the lease ends as in an etcd outage longer than the TTL: the key goes with it, nobody
        # else takes it, and the head takes it back
        kv = other._call("/v3/kv/range", {"key": _leader_key(other)})["kvs"][0]
        lease = json.loads(base64.b64decode(kv["value"]))["lease"]
        other._call("/v3/lease/revoke", {"ID": lease})
        _wait(lambda: head.terms == 2, 3 * TTL_S)
        assert head.deposed is None and not reasons and other.leader() is not None
        # now another head takes the key: this one is deposed within one TTL, once, and for good
        _take_over(other, "node1")
        taken = time.monotonic()
        _wait(lambda: reasons, 2 * TTL_S)
        assert time.monotonic() - taken <= TTL_S + 0.5
        assert len(reasons) == 1 and "node1" in reasons[0] and "no longer leads" in reasons[0], reasons
        assert head.reclaim() is False
        head.close()  # a deposed head gives nothing up: the key is node1's
        assert other.leader() == {"head": "node1", "info": {}}
    finally:
        head.close()
        mine.close()
        other.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "m"
    init_model(path)
    return path


def test_a_deposed_head_stops_serving_and_commits_nothing(etcd: EtcdServer, secret_file: Path,
                                                         model_dir: Path) -> None:
    instance = f"l{uuid.uuid4().hex[:6]}"
    _store(etcd, instance, secret_file).close()  # the operator's grant
    ep = EPConfig(ep_size=2, failure_timeout_s=1.0, etcd_endpoints=(etcd.endpoint,), instance=instance,
                  cluster_secret_file=str(secret_file), head_lease_ttl_s=TTL_S)
    config = EngineConfig(str(model_dir), dtype="float32", max_model_len=64, max_num_seqs=4)
    executor = EPExecutor(config, ep)
    other = _store(etcd, instance, secret_file)
    loop = EngineLoop(LLMEngine(config, executor=executor))
    try:
        with pytest.raises(NotLeader, match="node0"):  # a second head of the instance stops before any rank starts
            EPExecutor(config, ep)
        params = SamplingParams(max_tokens=4, temperature=0.0)
        assert len(loop.submit([1, 2, 3], params).result(timeout=120).output_ids) == 4
        committed = other.current()
        assert committed is not None and executor.view.epoch == committed.epoch
        running = [loop.submit([1, 2, 3, 4], SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True))
                   for _ in range(2)]
        _take_over(other, "node1")
        waited = _wait(lambda: not loop.healthy, 2 * TTL_S)
        assert waited <= TTL_S + 0.5, waited
        assert "no longer leads" in str(loop.error) and "node1" in str(loop.error)
        for f in running:  # what was in flight fails with the reason, as does every later request
            with pytest.raises(EngineUnavailable, match="no longer leads"):
                f.result(timeout=30)
        with pytest.raises(EngineUnavailable, match="no longer leads"):
            loop.submit([1, 2], params).result(timeout=5)
        # the old head's controller still believes its epoch is current, and it is: the store
        # refuses its commit all the same (a rank's failure, as after a partition)
        os.kill(executor.pool.pids()[1], signal.SIGKILL)
        with pytest.raises(MembershipError, match="node1"):
            executor.ctl.fail({1})
        assert other.current() == committed
        assert executor.deposed is not None
    finally:
        stopper = threading.Thread(target=loop.close)
        stopper.start()
        stopper.join(60)
        other.close()
