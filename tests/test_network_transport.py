"""The network side of the data plane (eep.dataplane.network), on loopback: what arrives is
filed by source and taken by (epoch, step); stale messages are dropped; a newer epoch, a later
step, a silent peer and a controller's ABORT each end a wait as their own error; a replacement
rank at the same address is reached. The hybrid exchange over shm + ZeroMQ across namespace
hosts is exercised end to end by tests/test_hosts.py."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from eep.dataplane.network import AbortPusher, HybridExchange, ZmqLink, data_address
from eep.dataplane.shm import Endpoint, ShmLayout, ShmSegment
from eep.errors import OutOfStep, PeerTimeout, StaleEpoch, StepAborted
from eep.runtime import wire
from eep.security.channel import Channel


def _base_port(n: int) -> int:
    """A port p with p .. p + n - 1 free on loopback (probed, then released)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n >= 65535:
            continue
        try:
            probes = []
            for i in range(n):
                p = socket.socket()
                p.bind(("127.0.0.1", base + i))
                probes.append(p)
            for p in probes:
                p.close()
            return base
        except OSError:
            for p in probes:
                p.close()
    raise RuntimeError("no free port range")


@pytest.fixture
def addresses() -> list[str]:
    base = _base_port(3)
    return [data_address("127.0.0.1", base, r) for r in range(3)]


def _bytes(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8)


def test_messages_are_taken_by_source_epoch_and_step_and_stale_ones_dropped(addresses: list[str]) -> None:
    a = ZmqLink(0, addresses, [1, 2], timeout_s=5.0)
    b = ZmqLink(1, addresses, [0], timeout_s=5.0)
    c = ZmqLink(2, addresses, [0], timeout_s=5.0)
    try:
        b.send(0, _bytes(9), epoch=0, step=0)  # stale by the time rank 0 waits in epoch 1
        b.send(0, _bytes(1, 2), epoch=1, step=0)
        c.send(0, _bytes(3), epoch=1, step=0)
        b.send(0, _bytes(4), epoch=1, step=1)
        assert a.recv(2, epoch=1, step=0).tolist() == [3]  # another source's message waits its turn
        assert a.recv(1, epoch=1, step=0).tolist() == [1, 2]
        assert a.recv(1, epoch=1, step=1).tolist() == [4]
        assert a.dropped == 1
        b.send(0, torch.empty(0, dtype=torch.uint8), epoch=1, step=2)
        assert a.recv(1, epoch=1, step=2).numel() == 0
        c.send(0, _bytes(5), epoch=2, step=0)
        with pytest.raises(StaleEpoch):
            a.recv(2, epoch=1, step=1)
        b.send(0, _bytes(6), epoch=1, step=5)
        with pytest.raises(OutOfStep):
            a.recv(1, epoch=1, step=3)
    finally:
        for link in (a, b, c):
            link.close()


def test_a_silent_peer_is_named_and_an_abort_ends_the_wait_at_once(addresses: list[str]) -> None:
    a = ZmqLink(0, addresses, [1], timeout_s=0.3)
    pusher = AbortPusher(addresses[:1])
    try:
        start = time.monotonic()
        with pytest.raises(PeerTimeout) as err:
            a.recv(1, epoch=0, step=0)
        assert err.value.peer == 1 and 0.25 < time.monotonic() - start < 2.0
        a.timeout_s = 30.0
        threading.Timer(0.2, pusher.abort, args=(3,)).start()
        start = time.monotonic()
        with pytest.raises(StepAborted) as aborted:
            a.recv(1, epoch=2, step=0)
        assert aborted.value.announced == 3 and time.monotonic() - start < 5.0
    finally:
        pusher.close()
        a.close()


def test_a_wait_also_ends_when_the_host_segment_announces_a_newer_epoch(addresses: list[str]) -> None:
    announced = {"epoch": 0}
    a = ZmqLink(0, addresses, [1], timeout_s=30.0, announced=lambda: announced["epoch"])
    try:
        threading.Timer(0.1, lambda: announced.update(epoch=5)).start()
        start = time.monotonic()
        with pytest.raises(StepAborted):
            a.recv(1, epoch=4, step=0)
        assert time.monotonic() - start < 5.0
    finally:
        a.close()


def test_a_replacement_at_the_same_address_is_reached(addresses: list[str]) -> None:
    a = ZmqLink(0, addresses, [1], timeout_s=5.0)
    b = ZmqLink(1, addresses, [0], timeout_s=5.0)
    try:
        a.send(1, _bytes(1), epoch=0, step=0)
        assert b.recv(0, epoch=0, step=0).tolist() == [1]
        b.close()  # rank 1 dies; a new process binds its address
        # a replacement starts seconds after the death, long after rank 0's sender saw the old
        # connection close (here the same process rebinds at once: give the sender that moment)
        time.sleep(0.5)
        b = ZmqLink(1, addresses, [0], timeout_s=5.0)
        a.send(1, _bytes(2), epoch=1, step=0)
        assert b.recv(0, epoch=1, step=0).tolist() == [2]
    finally:
        a.close()
        b.close()


def test_the_hybrid_exchange_sends_to_its_host_through_shm_and_elsewhere_through_zeromq(addresses: list[str]) -> None:
    """Ranks 0 and 1 on one host (a segment), rank 2 on another: one all-to-all among the three,
    each rank in a thread; every rank gets exactly what each peer sent it."""
    host_of = (0, 0, 1)
    with ShmSegment.create(ShmLayout(num_ranks=3, region_bytes=4096)) as seg0, \
            ShmSegment.create(ShmLayout(num_ranks=3, region_bytes=4096)) as seg1:
        segs = (seg0, seg0, seg1)
        exchanges = []
        for r in range(3):
            link = ZmqLink(r, addresses, [q for q in range(3) if host_of[q] != host_of[r]], timeout_s=10.0)
            exchanges.append(HybridExchange(Endpoint(segs[r], r, timeout_s=10.0), link, 3, host_of))
        got: dict[int, list[list[int]]] = {}

        def run(r: int) -> None:
            for step in range(3):
                out = exchanges[r].all_to_all([_bytes(10 * r + d, step) for d in range(3)])
                got.setdefault(r, []).append([int(t[0]) for t in out])
                assert all(int(t[1]) == step for t in out)

        threads = [threading.Thread(target=run, args=(r,)) for r in range(3)]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert got == {r: [[10 * s + r for s in range(3)]] * 3 for r in range(3)}
        finally:
            for x in exchanges:
                x.endpoint.close()
                x.close()


def test_a_bounded_control_send_to_a_peer_that_takes_nothing_fails_instead_of_hanging() -> None:
    # a control connection whose peer stopped taking bytes (its host gone without a FIN, a cut
    # link): once the kernel's buffers are full a plain send would block the controller in a
    # view change for good; a bounded one fails with OSError and the peer is treated as gone
    server = wire.listen("127.0.0.1:0")
    conn = Channel(wire.tune(wire.connect(f"127.0.0.1:{server.getsockname()[1]}", 2.0), send_timeout_s=0.3))
    peer, _ = server.accept()  # never reads
    outcome: dict[str, object] = {}

    def flood() -> None:
        start = time.monotonic()
        try:
            for _ in range(1000):  # up to 1 GB: far more than any socket buffer
                wire.send(conn, wire.Refused(1, "x" * 2**20))
            outcome["error"] = None
        except OSError as e:
            outcome["error"] = e
        outcome["seconds"] = time.monotonic() - start

    t = threading.Thread(target=flood, daemon=True)
    t.start()
    t.join(30)
    try:
        assert not t.is_alive(), "the send blocked past its bound"
        assert isinstance(outcome["error"], OSError), outcome
        assert outcome["seconds"] < 10  # type: ignore[operator]
    finally:
        peer.close()
        conn.close()
        server.close()
        t.join(5)


def test_the_data_planes_zeromq_io_thread_never_preempts_its_rank() -> None:
    """The data plane's I/O thread runs as SCHED_BATCH (a send that wakes it does not hand the
    rank's core to it), in a fresh process so no other ZeroMQ context's thread is counted."""
    code = (
        "import os, time, zmq\n"
        "from eep.dataplane.network import data_context\n"
        "s = data_context().socket(zmq.PUSH)\n"
        "deadline = time.monotonic() + 10\n"
        "while time.monotonic() < deadline:\n"
        "    io = [int(t) for t in os.listdir('/proc/self/task')\n"
        "          if open(f'/proc/self/task/{t}/comm').read().startswith('ZMQbg/IO')]\n"
        "    if io:\n"
        "        break\n"
        "    time.sleep(0.01)\n"
        "print([os.sched_getscheduler(t) == os.SCHED_BATCH for t in io])\n"
        "s.close(0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[True]", out
