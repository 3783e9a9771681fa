"""The shared-memory transport between real rank processes: bytes, timeouts, deaths, rejoin.

Rank processes are started with the spawn method and stopped / killed with real signals.
Results come back over one Pipe per process (single writer: a killed process cannot leave a
lock held, unlike multiprocessing.Queue).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import stat
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch

from eep.dataplane.shm import Endpoint, ShmLayout, ShmSegment, sweep_orphans
from eep.errors import (
    OutOfStep,
    PayloadTooLarge,
    PeerTimeout,
    RankFenced,
    SegmentError,
    StaleEpoch,
)

CTX = mp.get_context("spawn")
SHM = Path("/dev/shm")
JOIN_S = 30.0  # spawn + `import torch` on two loaded cores


def _eep_files() -> set[str]:
    return {p.name for p in SHM.glob("eep-*")}


class Procs:
    """The child processes of one test; the fixture kills whatever is left."""

    def __init__(self) -> None:
        self.started: list[mp.process.BaseProcess] = []

    def start(
        self, target: Callable[..., None], *args: Any
    ) -> tuple[mp.process.BaseProcess, Connection]:
        parent, child = CTX.Pipe(duplex=True)
        p = CTX.Process(target=_run_child, args=(target, child, *args), daemon=True)
        p.start()
        child.close()
        self.started.append(p)
        return p, parent


@pytest.fixture(autouse=True)
def procs() -> Iterator[Procs]:
    """Yields a process registry; afterwards asserts that no child and no eep-* segment file
    created during the test survives (killing and removing stragglers first, so that a
    failing test still cleans up)."""
    before = _eep_files()
    reg = Procs()
    try:
        yield reg
    finally:
        stragglers = []
        for p in reg.started:
            if p.is_alive():
                stragglers.append(p.pid)
                try:
                    os.kill(p.pid, signal.SIGCONT)  # type: ignore[arg-type]
                except ProcessLookupError:
                    pass
                p.kill()
            p.join(5)
        left = _eep_files() - before
        for name in left:
            (SHM / name).unlink(missing_ok=True)
        alive = [p.pid for p in reg.started if p.is_alive()]
        assert not alive, f"child processes still alive: {alive}"
        assert not stragglers, f"children had to be killed by the fixture: {stragglers}"
        assert not left, f"segment files left behind: {sorted(left)}"


def _run_child(target: Callable[..., None], conn: Connection, *args: Any) -> None:
    torch.set_num_threads(1)
    try:
        target(conn, *args)
    except Exception as e:  # report the error's type and fields to the test
        conn.send({"error": type(e).__name__, "msg": str(e), "peer": getattr(e, "peer", None),
                   "rank": getattr(e, "rank", None), "waited_s": getattr(e, "waited_s", None),
                   "at": time.monotonic()})
    finally:
        conn.close()


def _msg(src: int, dst: int, epoch: int, rnd: int) -> torch.Tensor:
    """A payload unique to (src, dst, epoch, round), of varying length and dtype."""
    n = 1 + (src * 7919 + dst * 104729 + rnd * 31 + epoch * 5) % 3000
    base = torch.arange(n, dtype=torch.int32)
    return ((base * (2 * src + 3) + dst * 131 + rnd * 17 + epoch * 1009) % 65521).to(torch.int16)


def _round(
    ep: Endpoint, peers: list[int], epoch: int, rnd: int, timeout_s: float | None = None
) -> None:
    """One lockstep all-to-all: send to every peer, then receive from every peer and check."""
    for d in peers:
        ep.send(d, _msg(ep.rank, d, epoch, rnd), epoch=epoch, step=rnd, timeout_s=timeout_s)
    for s in peers:
        got = ep.recv(s, epoch=epoch, step=rnd, timeout_s=timeout_s)
        want = _msg(s, ep.rank, epoch, rnd)
        if not torch.equal(got.view(torch.int16), want):
            raise AssertionError(f"rank {ep.rank} got wrong bytes from {s} in round {rnd}")


# ---- child bodies ---------------------------------------------------------------------------


def _all_to_all_child(conn: Connection, name: str, rank: int, rounds: int) -> None:
    seg = ShmSegment.attach(name)
    ep = Endpoint(seg, rank, timeout_s=20.0)
    peers = list(range(seg.layout.num_ranks))  # including itself: the diagonal region
    for r in range(rounds):
        _round(ep, peers, epoch=1, rnd=r)
    conn.send({"rounds": rounds, "dropped": ep.dropped})


def _latency_child(conn: Connection, name: str, rank: int, rounds: int, warmup: int) -> None:
    seg = ShmSegment.attach(name)
    ep = Endpoint(seg, rank, timeout_s=20.0)
    n = seg.layout.num_ranks
    peers = [(rank + i) % n for i in range(1, n)]  # staggered: no convoy on rank 0
    x = torch.full((8, 2048), float(rank), dtype=torch.bfloat16)  # 32 KiB per peer
    for r in range(warmup + rounds):
        if r == warmup:
            t0 = time.perf_counter()
        for d in peers:
            ep.send(d, x, epoch=1, step=r)
        for s in peers:
            got = ep.recv(s, epoch=1, step=r).view(torch.bfloat16)
            if got[0].item() != float(s):
                raise AssertionError("wrong payload")
    conn.send({"mean_ms": (time.perf_counter() - t0) / rounds * 1e3})


def _loop_until_error_child(conn: Connection, name: str, rank: int, timeout_s: float) -> None:
    """Exchange with the other rank until something fails; say once when 20 rounds are done."""
    ep = Endpoint(ShmSegment.attach(name), rank, timeout_s=timeout_s)
    peer = 1 - rank
    for r in range(10**7):
        _round(ep, [peer], epoch=1, rnd=r)
        if r == 20:
            conn.send({"progress": r})


def _victim_child(conn: Connection, name: str, rounds: int) -> None:
    ep = Endpoint(ShmSegment.attach(name), 1, timeout_s=20.0)
    for r in range(rounds):
        _round(ep, [0], epoch=1, rnd=r)
    conn.send({"ready": rounds})
    time.sleep(60)  # killed here, holding its last received message


def _survivor_child(
    conn: Connection, name: str, rounds: int, timeout_s: float, new_rounds: int
) -> None:
    ep = Endpoint(ShmSegment.attach(name), 0, timeout_s=timeout_s)
    for r in range(rounds):
        _round(ep, [1], epoch=1, rnd=r)
    # Round `rounds`: our message to rank 1 is published, then rank 1 never answers.
    ep.send(1, _msg(0, 1, 1, rounds), epoch=1, step=rounds)
    try:
        ep.recv(1, epoch=1, step=rounds)
    except PeerTimeout as e:
        conn.send({"timeout_peer": e.peer, "waited_s": e.waited_s, "msg": str(e)})
    if not conn.poll(JOIN_S):
        raise AssertionError("no go for epoch 2")
    epoch = conn.recv()["epoch"]
    for r in range(new_rounds):
        _round(ep, [1], epoch=epoch, rnd=r, timeout_s=20.0)
    conn.send({"done": new_rounds})


def _replacement_child(conn: Connection, name: str, epoch: int, new_rounds: int) -> None:
    ep = Endpoint(ShmSegment.attach(name), 1, timeout_s=20.0)
    conn.send({"attached": os.getpid()})
    for r in range(new_rounds):
        _round(ep, [0], epoch=epoch, rnd=r)
    conn.send({"done": new_rounds, "dropped": ep.dropped})


def _creator_child(conn: Connection, how: str) -> None:
    seg = ShmSegment.create(ShmLayout(2, 1024))
    conn.send({"name": seg.name})
    if how == "crash":
        time.sleep(60)  # SIGKILLed by the test
    # how == "exit": return without unlink; the creator's exit hook must remove the file


def _recv(conn: Connection, timeout_s: float = JOIN_S) -> dict[str, Any]:
    assert conn.poll(timeout_s), f"no message from child within {timeout_s} s"
    return conn.recv()


def _join_ok(p: mp.process.BaseProcess) -> None:
    p.join(JOIN_S)
    assert p.exitcode == 0, f"child {p.pid} exited with {p.exitcode}"


# ---- tests ----------------------------------------------------------------------------------


def test_four_ranks_all_to_all_200_rounds_every_byte(procs: Procs) -> None:
    with ShmSegment.create(ShmLayout(4, 6000)) as seg:
        kids = [procs.start(_all_to_all_child, seg.name, r, 200) for r in range(4)]
        results = [_recv(c) for _, c in kids]
        for p, _ in kids:
            _join_ok(p)
    assert results == [{"rounds": 200, "dropped": 0}] * 4


def test_exchange_latency_four_ranks_32k(procs: Procs) -> None:
    with ShmSegment.create(ShmLayout(4, 32 * 1024)) as seg:
        kids = [procs.start(_latency_child, seg.name, r, 300, 30) for r in range(4)]
        means = [_recv(c)["mean_ms"] for _, c in kids]
        for p, _ in kids:
            _join_ok(p)
    print(f"\nshm exchange, 4 ranks x 32 KiB per peer: mean {max(means):.3f} ms per round")
    assert max(means) < 50.0  # a missed wake-up or a spin would cost far more


def test_sigstopped_peer_raises_peer_timeout_naming_it(procs: Procs) -> None:
    timeout_s = 1.0
    with ShmSegment.create(ShmLayout(2, 8192)) as seg:
        p0, c0 = procs.start(_loop_until_error_child, seg.name, 0, timeout_s)
        p1, c1 = procs.start(_loop_until_error_child, seg.name, 1, timeout_s)
        assert "progress" in _recv(c0)
        os.kill(p1.pid, signal.SIGSTOP)  # type: ignore[arg-type]
        stopped_at = time.monotonic()
        try:
            err = _recv(c0, timeout_s + 5)
        finally:
            os.kill(p1.pid, signal.SIGCONT)  # type: ignore[arg-type]
        assert err["error"] == "PeerTimeout" and err["peer"] == 1 and err["rank"] == 0, err
        assert "rank 1 is silent" in err["msg"]
        assert err["at"] - stopped_at < timeout_s + 1.0
        # Once continued, rank 1 finds rank 0 gone silent in turn and reports it.
        assert "progress" in _recv(c1)
        err1 = _recv(c1, timeout_s + 10)
        assert err1["error"] == "PeerTimeout" and err1["peer"] == 0, err1
        for p in (p0, p1):
            _join_ok(p)


def test_sigkilled_peer_replaced_by_new_process_resumes_at_higher_epoch(procs: Procs) -> None:
    timeout_s, rounds, new_rounds = 1.0, 20, 50
    with ShmSegment.create(ShmLayout(2, 8192)) as seg:
        survivor, cs = procs.start(_survivor_child, seg.name, rounds, timeout_s, new_rounds)
        victim, cv = procs.start(_victim_child, seg.name, rounds)
        assert _recv(cv) == {"ready": rounds}
        victim.kill()  # SIGKILL while rank 0 waits on it
        victim.join(5)
        assert victim.exitcode == -signal.SIGKILL
        t = _recv(cs)
        assert t["timeout_peer"] == 1 and t["waited_s"] < timeout_s + 1.0, t
        # The segment outlived the rank: its published counters are still there.
        assert Path(seg.path).exists()
        assert seg._seq[1][0].value == rounds and seg._seq[0][1].value == rounds + 1
        # A new process attaches by name as rank 1; the controller moves everyone to epoch 2.
        repl, cr = procs.start(_replacement_child, seg.name, 2, new_rounds)
        assert "attached" in _recv(cr)
        cs.send({"epoch": 2})
        assert _recv(cs) == {"done": new_rounds}
        # The two old-epoch messages in region (0, 1), the one the victim still held and the
        # one it never read, were dropped; everything of epoch 2 arrived intact.
        assert _recv(cr) == {"done": new_rounds, "dropped": 2}
        for p in (survivor, repl):
            _join_ok(p)


def test_crashed_creator_segment_is_swept_and_exiting_creator_removes_its_own(procs: Procs) -> None:
    p, c = procs.start(_creator_child, "exit")
    name = _recv(c)["name"]
    _join_ok(p)
    assert not (SHM / name).exists()
    p, c = procs.start(_creator_child, "crash")
    name = _recv(c)["name"]
    assert (SHM / name).exists()
    p.kill()
    p.join(5)
    assert (SHM / name).exists()  # nothing could run in a SIGKILLed process
    assert name in sweep_orphans()
    assert not (SHM / name).exists()


def test_segment_file_mode_unlink_and_stable_views() -> None:
    lay = ShmLayout(2, 4096)
    seg = ShmSegment.create(lay)
    try:
        assert stat.S_IMODE(os.stat(seg.path).st_mode) == 0o600
        peer_seg = ShmSegment.attach(seg.name, lay)
        a, b = Endpoint(seg, 0, timeout_s=1.0), Endpoint(peer_seg, 1, timeout_s=1.0)
        ptrs = [seg.payload(0, 1, k).data_ptr() for k in (0, 1)]
        recv_ptrs = set()
        for i in range(100):
            a.send(1, torch.full((100,), i, dtype=torch.int64), epoch=1, step=i)
            got = b.recv(0, epoch=1, step=i)
            assert got.view(torch.int64).eq(i).all() and got.numel() == 800
            recv_ptrs.add(got.data_ptr())
        assert [seg.payload(0, 1, k).data_ptr() for k in (0, 1)] == ptrs
        assert recv_ptrs == {peer_seg.payload(0, 1, k).data_ptr() for k in (0, 1)}
        # zero copy: write into the outgoing buffer, then publish it without a copy
        out = a.outgoing(1)
        out[:5].copy_(torch.tensor(list(b"abcde"), dtype=torch.uint8))
        a.send(1, out[:5], epoch=1, step=100)
        assert bytes(b.recv(0, epoch=1, step=100).tolist()) == b"abcde"
        b.close()
        peer_seg.close()
    finally:
        seg.close()
        seg.unlink()
    assert not Path(seg.path).exists()
    with pytest.raises(SegmentError, match="no shm segment"):
        ShmSegment.attach(seg.name)


def test_epochs_steps_sizes_and_fencing_in_one_process() -> None:
    with ShmSegment.create(ShmLayout(2, 256)) as seg:
        a, b = Endpoint(seg, 0, timeout_s=0.3), Endpoint(seg, 1, timeout_s=0.3)
        with pytest.raises(PayloadTooLarge, match="larger region_bytes"):
            a.send(1, torch.zeros(257, dtype=torch.uint8), epoch=1, step=0)
        a.send(1, b"old", epoch=1, step=0)
        a.send(1, b"new", epoch=2, step=0)
        assert bytes(b.recv(0, epoch=2, step=0)) == b"new"  # the epoch-1 message is dropped
        assert b.dropped == 1
        a.send(1, b"ahead", epoch=3, step=0)
        with pytest.raises(StaleEpoch, match="must rejoin"):
            b.recv(0, epoch=2, step=1)
        assert bytes(b.recv(0, epoch=3, step=0)) == b"ahead"  # still there once caught up
        a.send(1, b"s5", epoch=3, step=5)
        with pytest.raises(OutOfStep):
            b.recv(0, epoch=3, step=4)
        t0 = time.monotonic()
        with pytest.raises(PeerTimeout, match="rank 1 is silent") as ei:
            b.recv(1, epoch=3, step=0, timeout_s=0.2)  # nothing ever sent on (1, 1)
        assert ei.value.peer == 1 and 0.2 <= time.monotonic() - t0 < 1.0
        # A second process claiming rank 0 fences the first one out.
        a2 = Endpoint(ShmSegment.attach(seg.name), 0, timeout_s=0.3)
        with pytest.raises(RankFenced):
            a.send(1, b"zombie", epoch=3, step=6)
        assert a2.rank == 0
        a2.segment.close()


def test_sweep_leaves_live_creators_alone(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f"eep-{dead.pid}-dead").write_bytes(b"")
    (tmp_path / f"eep-{os.getpid()}-live").write_bytes(b"")
    assert sweep_orphans(tmp_path) == [f"eep-{dead.pid}-dead"]
    assert [p.name for p in tmp_path.iterdir()] == [f"eep-{os.getpid()}-live"]


def test_exchange_among_the_active_ranks_of_a_view_drops_older_epochs() -> None:
    """Threads as ranks (futex waits work across threads too): after rank 2 leaves the view,
    the other three exchange without it, and what rank 2 left in flight is never used."""
    import threading

    from eep.dataplane.shm import ShmExchange

    with ShmSegment.create(ShmLayout(4, 64)) as seg:
        exchanges = [ShmExchange(Endpoint(seg, r, timeout_s=5.0), 4) for r in range(4)]
        got: dict[int, list[bytes]] = {}

        def run(r: int, active: list[int]) -> None:
            out = exchanges[r].all_to_all([torch.tensor([r, d], dtype=torch.uint8) for d in range(4)])
            got[r] = [bytes(t) for t in out]

        def round_(active: list[int]) -> None:
            threads = [threading.Thread(target=run, args=(r, active)) for r in active]
            for t in threads:
                t.start()
            for t in threads:
                t.join(10)
            assert not any(t.is_alive() for t in threads)

        round_([0, 1, 2, 3])
        assert got[1] == [bytes([s, 1]) for s in range(4)]
        # rank 2 "dies" after sending its next message to rank 0 only
        exchanges[2].endpoint.send(0, torch.tensor([2, 0], dtype=torch.uint8), epoch=0, step=1)
        for r in (0, 1, 3):
            exchanges[r].set_view(1, [0, 1, 3])
        got.clear()
        round_([0, 1, 3])
        for r in (0, 1, 3):
            assert got[r] == [bytes([s, r]) if s != 2 else b"" for s in range(4)]
        # the new epoch began by discarding what the aborted one left unread (rank 2's message)
        assert exchanges[0].endpoint.dropped == 1
        with pytest.raises(StaleEpoch):
            exchanges[1].set_view(0, [0, 1, 3])
        with pytest.raises(RankFenced, match="must rejoin"):
            exchanges[2].set_view(1, [0, 1, 3])
        for ex in exchanges:
            ex.endpoint.close()


def test_announced_epoch_aborts_a_blocked_wait_at_once() -> None:
    """A rank blocked on a peer that will never send is released by the controller's
    announcement long before its own timeout."""
    import threading

    from eep.errors import StepAborted

    with ShmSegment.create(ShmLayout(2, 64)) as seg:
        waiter = Endpoint(seg, 0, timeout_s=10.0)
        seen: list[BaseException] = []

        def wait() -> None:
            try:
                waiter.recv(1, epoch=3, step=0)
            except BaseException as e:  # noqa: BLE001 - handed to the test thread
                seen.append(e)

        t = threading.Thread(target=wait)
        t.start()
        time.sleep(0.2)
        assert t.is_alive()  # blocked on rank 1
        announced = time.monotonic()
        seg.announce_epoch(4)
        t.join(5)
        assert not t.is_alive() and time.monotonic() - announced < 0.2
        assert isinstance(seen[0], StepAborted) and seen[0].announced == 4 and seen[0].peer == 1
        assert seg.control_epoch == 4
        with pytest.raises(SegmentError, match="older"):
            seg.announce_epoch(3)
        with pytest.raises(PeerTimeout):  # a wait in the announced epoch is a normal wait
            waiter.recv(1, epoch=4, step=0, timeout_s=0.1)
