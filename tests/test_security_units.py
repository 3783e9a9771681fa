"""The pieces every door of a multi-host instance is made of, alone: the cluster secret file's
checks, the control connections' mutual handshake and per-frame tags (tampering, injection,
replay, reflection), the typed codec fuzzed with random and mutated bytes (only `ProtocolError`,
never anything else, never a pickle), ZeroMQ CURVE on a rank's data address (a stranger's frame
never arrives, a replayed capture neither), and the expert backup server's request checks."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eep.dataplane.network import _HEADER, DATA, ZmqLink, _sender, data_address
from eep.dataplane.shm import ShmLayout
from eep.engine.sampling import SamplingParams
from eep.engine.worker import SampleSpec, SeqWork
from eep.errors import ConfigError, PeerTimeout
from eep.placement.eplb import plan_placement
from eep.runtime import codec, wire
from eep.security import curve
from eep.security.channel import AuthError, Channel, ProtocolError, client_handshake, server_handshake
from eep.security.curve import CurveKeys
from eep.security.secret import ClusterSecret, init_secret_file

SECRET = ClusterSecret(secrets.token_bytes(32))
KEY = SECRET.key("control handshake")


# -- the secret file ----------------------------------------------------------------------------
def test_the_secret_file_must_be_private_long_enough_and_is_never_overwritten(tmp_path: Path) -> None:
    path = init_secret_file(tmp_path / "s")
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(ClusterSecret.load(path).raw) >= 32
    with pytest.raises(ConfigError, match="exists"):
        init_secret_file(path)
    assert "hidden" in repr(ClusterSecret.load(path)) and ClusterSecret.load(path).raw.decode() not in repr(
        ClusterSecret.load(path))
    os.chmod(path, 0o640)
    with pytest.raises(ConfigError, match="chmod 600"):
        ClusterSecret.load(path)
    os.chmod(path, 0o600)
    if os.geteuid() == 0:  # a file of another user
        os.chown(path, 65534, 65534)
        with pytest.raises(ConfigError, match="belongs to uid 65534"):
            ClusterSecret.load(path)
        os.chown(path, 0, 0)
    short = tmp_path / "short"
    short.write_bytes(b"x" * 31)
    short.chmod(0o600)
    with pytest.raises(ConfigError, match="fewer than 32"):
        ClusterSecret.load(short)
    with pytest.raises(ConfigError, match="eep secret init"):
        ClusterSecret.load(tmp_path / "missing")
    link = tmp_path / "link"
    link.symlink_to(path)
    with pytest.raises(ConfigError):
        ClusterSecret.load(link)
    a, b = ClusterSecret.load(path), ClusterSecret(secrets.token_bytes(32))
    assert a.key("x") != a.key("y") and a.key("x") != b.key("x") and len(a.key("x")) == 32


def test_serve_across_hosts_refuses_to_start_without_a_secret_and_says_how_to_make_one(tmp_path: Path) -> None:
    for node in ("0", "1"):
        done = subprocess.run([sys.executable, "-m", "eep", "serve", "--ep-size", "2", "--nnodes", "2", "--node-rank",
                               node, "--dist-init-addr", "127.0.0.1:1", "--model-path", str(tmp_path)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        assert "--cluster-secret-file" in done.stderr and "eep secret init" in done.stderr, done.stderr
    made = subprocess.run([sys.executable, "-m", "eep", "secret", "init", str(tmp_path / "c.secret")],
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0 and (tmp_path / "c.secret").stat().st_mode & 0o777 == 0o600, made.stderr


# -- the control connections ----------------------------------------------------------------------
def _pair(client_key: bytes = KEY, server_key: bytes = KEY) -> tuple[Channel, Channel]:
    a, b = socket.socketpair()
    out: dict[str, object] = {}

    def serve() -> None:
        try:
            out["server"] = server_handshake(b, server_key, peer="client")
        except AuthError as e:
            out["server"] = e

    t = threading.Thread(target=serve)
    t.start()
    try:
        client: Channel | AuthError = client_handshake(a, client_key, peer="server")
    except AuthError as e:
        client = e
        a.close()  # as every caller does: the server then reads the end of the connection
    t.join(10)
    return client, out["server"]  # type: ignore[return-value]


def test_the_handshake_admits_the_secrets_holder_and_refuses_any_other_on_both_sides() -> None:
    client, server = _pair()
    assert isinstance(client, Channel) and isinstance(server, Channel)
    client.send_bytes(b"hello")
    assert server.recv_bytes() == b"hello"
    server.send_bytes(b"back")
    assert client.recv_bytes() == b"back"
    client.close()
    server.close()
    other = ClusterSecret(secrets.token_bytes(32)).key("control handshake")
    client, server = _pair(client_key=other)
    assert isinstance(client, AuthError) and "did not prove" in str(client)
    assert isinstance(server, AuthError)


def test_a_silent_or_garbled_peer_is_refused_within_the_handshake_timeout() -> None:
    for send in (b"", b"GET / HTTP/1.1\r\n\r\n" + b"x" * 40, os.urandom(200)):
        a, b = socket.socketpair()
        a.sendall(send)
        start = time.monotonic()
        with pytest.raises(AuthError):
            server_handshake(b, KEY, timeout_s=0.5)
        assert time.monotonic() - start < 1.5
        a.close()
        b.close()


def _raw_frames(sock: socket.socket, n: int) -> list[bytes]:
    """Read n whole frames off the wire as bytes (length prefix included)."""
    out = []
    for _ in range(n):
        head = b""
        while len(head) < 4:
            head += sock.recv(4 - len(head))
        size = int.from_bytes(head, "big")
        body = b""
        while len(body) < size:
            body += sock.recv(size - len(body))
        out.append(head + body)
    return out


def test_a_frame_altered_injected_replayed_or_reflected_is_refused() -> None:
    """A man in the middle between two authenticated ends: whatever it changes, adds, repeats
    or sends back fails the receiver's integrity check; nothing of it is returned."""
    client, server = _pair()
    assert isinstance(client, Channel) and isinstance(server, Channel)
    client.send_bytes(b"step 1")
    (frame,) = _raw_frames(server.sock, 1)  # what the wire carried

    def deliver(raw: bytes) -> bytes:
        injector, victim = socket.socketpair()
        ch = Channel(victim, session=server._session, client=False, peer="relay")
        ch._received = server._received
        injector.sendall(raw)
        try:
            return ch.recv_bytes(1.0)
        finally:
            injector.close()
            victim.close()

    assert deliver(frame) == b"step 1"  # the frame itself, in sequence, verifies
    flipped = bytearray(frame)
    flipped[6] ^= 1
    with pytest.raises(ProtocolError, match="integrity"):
        deliver(bytes(flipped))  # altered
    forged = len(b"evil" + b"\0" * 32).to_bytes(4, "big") + b"evil" + b"\0" * 32
    with pytest.raises(ProtocolError, match="integrity"):
        deliver(forged)  # injected without the session key
    server._received += 1  # the real frame was taken: a second copy is a replay
    with pytest.raises(ProtocolError, match="integrity"):
        deliver(frame)
    server.send_bytes(b"to client")
    (back,) = _raw_frames(client.sock, 1)
    server._received -= 1
    with pytest.raises(ProtocolError, match="integrity"):
        deliver(back)  # the server's own frame reflected to it
    oversize = (2**31).to_bytes(4, "big")
    with pytest.raises(ProtocolError, match="over the"):
        deliver(oversize)
    client.close()
    server.close()


# -- the codec --------------------------------------------------------------------------------------
def _samples() -> list[tuple[object, codec.Protocol]]:
    p = plan_placement(8, 4, num_layers=2, num_redundant=0)
    work = [SeqWork(0, 5, (1, 2, 3), SampleSpec(SamplingParams(max_tokens=4), 7, 0)), SeqWork(1, 0, (4,), None)]
    return [
        (wire.AgentHello(0, 1, "10.0.0.1", 5), wire.INTRODUCTION),
        (wire.RankConnect(1, 2, "ab", 7, {"backup": None, "heartbeat": "h"}), wire.INTRODUCTION),
        (wire.HostSetup(0, ShmLayout(4, 1024), 4, "/m", "float32", {1: torch.ones(2, 8, dtype=torch.bool)}, 0.1,
                        1.0), wire.TO_AGENT),
        (wire.Beats(3, {0: 0.1, 1: 0.2}), wire.FROM_AGENT),
        (wire.RankSpec(0, 4, "/m", "float32", 8, 96, p, "shm", "seg", 30.0, held=p.physical_to_logical_map),
         wire.RANK_SPEC),
        (wire.StepOrder(3, (0, 1), work), wire.TO_RANK),
        (wire.Repair(3, p, [wire.ExpertCopy(0, 1, 2, "backup", 1)], p), wire.TO_RANK),
        (wire.StepDone(3, wire.StepResult([1, 2], 0.1, (0.01, 0.02), 5, 6)), wire.FROM_RANK),
    ]


def test_every_message_round_trips_and_nothing_outside_its_protocol_is_taken() -> None:
    samples = _samples()
    for message, protocol in samples:
        assert repr(protocol.decode(codec.encode(message))) == repr(message)
        for other, _ in samples:
            if type(other).__name__ not in protocol.classes:
                with pytest.raises(ProtocolError, match="unexpected message type"):
                    protocol.decode(codec.encode(other))


def test_wrong_types_tensors_and_shapes_are_refused() -> None:
    enc = msgspec.msgpack.encode
    good = ["int64", [2, 3], bytes(48)]
    cases = [
        ["AgentHello", {"epoch": "0", "node": 1, "address": "a", "pid": 1}],  # a str for an int
        ["AgentHello", {"epoch": 0, "node": 1, "address": "a"}],  # a field missing
        ["Bogus", {}],  # no such message
        ["SetRouting", {"epoch": 1, "placement": {"physical_to_logical_map": ["float64", [2, 3], bytes(48)],
                                                   "logical_to_physical_map": good, "logical_replica_count": good}}],
        ["SetRouting", {"epoch": 1, "placement": {"physical_to_logical_map": ["int64", [2, 3], bytes(40)],
                                                   "logical_to_physical_map": good, "logical_replica_count": good}}],
        ["SetRouting", {"epoch": 1, "placement": {"physical_to_logical_map": good,  # l2p must be 3-d
                                                   "logical_to_physical_map": good, "logical_replica_count": good}}],
        ["StepOrder", {"epoch": 1, "active": [0], "work": [{"slot": 0, "ctx_len": 0, "token_ids": [1],
                                                            "sample": {"params": {"max_tokens": 0}, "seed": 1,
                                                                       "index": 0}}]}],  # max_tokens < 1
        ["StepOrder", {"epoch": 1, "active": [0], "work": [[[[[[[]]]]]]]}],
    ]
    for case in cases:
        with pytest.raises(ProtocolError):
            wire.TO_RANK.decode(enc(case)) if case[0] != "AgentHello" else wire.INTRODUCTION.decode(enc(case))
    deep = b"\x92\xa9StepOrder" + b"\x91" * 200_000 + b"\x00"
    with pytest.raises(ProtocolError):
        wire.TO_RANK.decode(deep)
    with pytest.raises(ProtocolError):  # an array that claims 2**32-1 entries and holds none
        wire.TO_RANK.decode(b"\x92\xa9StepOrder\xdd\xff\xff\xff\xff")


@settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=512), index=st.integers(0, 7), flips=st.lists(st.tuples(st.integers(0, 10**6),
                                                                                           st.integers(1, 255)),
                                                                                 max_size=4))
def test_random_and_mutated_bytes_raise_only_protocol_errors(data: bytes, index: int,
                                                              flips: list[tuple[int, int]]) -> None:
    message, protocol = _samples()[index]
    for proto in (protocol, wire.LAUNCH, wire.FROM_RANK):
        for blob in (data, _mutate(codec.encode(message), flips)):
            try:
                decoded = proto.decode(blob)
            except ProtocolError:
                continue
            assert type(decoded).__name__ in proto.classes  # whatever decodes is one of the expected


def _mutate(blob: bytes, flips: list[tuple[int, int]]) -> bytes:
    b = bytearray(blob)
    for at, x in flips:
        b[at % len(b)] ^= x
    return bytes(b)


# -- CURVE on a rank's data address -------------------------------------------------------------------
def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Recorder:
    """A TCP relay that records what its client sends (to replay a real connection's bytes)."""

    def __init__(self, upstream: int) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.upstream, self.recorded = upstream, b""
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        client, _ = self.server.accept()
        up = socket.create_connection(("127.0.0.1", self.upstream))

        def pump(src: socket.socket, dst: socket.socket, record: bool) -> None:
            try:
                while chunk := src.recv(65536):
                    if record:
                        self.recorded += chunk
                    dst.sendall(chunk)
            except OSError:
                pass

        threading.Thread(target=pump, args=(up, client, False), daemon=True).start()
        pump(client, up, True)


def test_only_the_clusters_key_gets_a_frame_into_a_data_address_and_a_replayed_capture_does_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    keys = CurveKeys.from_secret(SECRET)
    stranger_keys = CurveKeys.from_secret(ClusterSecret(secrets.token_bytes(32)))
    port = _port()
    addresses = [data_address("127.0.0.1", port, 0), data_address("127.0.0.1", port, 1)]
    ctx = zmq.Context()
    caplog.set_level(logging.WARNING, logger="eep.security.rejections")
    receiver = ZmqLink(0, addresses, [1], timeout_s=0.8, keys=keys, max_message_bytes=1024)
    socks = []
    try:
        def pusher(k: CurveKeys | None, target: str = addresses[0]) -> zmq.Socket:
            s = _sender(ctx, 16)
            if k is not None:
                curve.connect(s, k)
            s.connect(target)
            socks.append(s)
            return s

        def frame(epoch: int, step: int, payload: bytes) -> list[bytes]:
            return [_HEADER.pack(DATA, 1, epoch, step), payload]

        for k in (None, stranger_keys):  # no CURVE; another cluster's keys
            s = pusher(k)
            try:
                s.send_multipart(frame(1, 0, b"evil"), zmq.NOBLOCK)
            except zmq.Again:
                pass  # never even connected: fine, nothing arrives either way
        with pytest.raises(PeerTimeout):
            receiver.recv(1, epoch=1, step=0)
        # the real peer, through a relay that records its bytes
        relay = _Recorder(port)
        real = pusher(keys, f"tcp://127.0.0.1:{relay.port}")
        real.send_multipart(frame(1, 0, b"good"))
        assert bytes(receiver.recv(1, epoch=1, step=0)) == b"good"
        # an authenticated peer that repeats an old frame: dropped by its (epoch, step)
        real.send_multipart(frame(1, 0, b"good"))
        real.send_multipart(frame(1, 1, b"next"))
        assert bytes(receiver.recv(1, epoch=1, step=1)) == b"next" and receiver.dropped >= 1
        # the captured TCP bytes of that connection, replayed in a new one: the CURVE handshake fails
        time.sleep(0.2)
        captured = relay.recorded
        assert b"good" not in captured, "CURVE frames travel encrypted"
        replay = socket.create_connection(("127.0.0.1", port))
        replay.sendall(captured)
        time.sleep(0.5)
        replay.close()
        real.send_multipart(frame(1, 2, b"after"))
        assert bytes(receiver.recv(1, epoch=1, step=2)) == b"after"  # only the real one's
        with pytest.raises(PeerTimeout):
            receiver.recv(1, epoch=1, step=3)  # nothing of the replay got in
    finally:
        for s in socks:
            s.close(0)
        receiver.close()
        ctx.term()
    rejected = [r for r in caplog.records if r.getMessage().startswith("rejected door=")]
    assert rejected, "no refusal was logged"
    assert any("127.0.0.1" in r.getMessage() for r in rejected), [r.getMessage() for r in rejected]


def test_a_flood_of_refusals_is_logged_as_a_burst_and_one_line_that_counts_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from eep.security.rejections import Rejections

    caplog.set_level(logging.WARNING, logger="eep.security.rejections")
    door = Rejections("test-door", burst=3, window_s=0.3)
    for i in range(50):
        door.reject(("10.0.0.9", 1000 + i), "not a member")
    time.sleep(0.6)  # the window ends: its summary is written without any further refusal
    lines = [r.getMessage() for r in caplog.records]
    assert door.total == 50
    assert lines[:3] == [f"rejected door=test-door peer=10.0.0.9:{1000 + i}: not a member" for i in range(3)]
    assert lines[3:] == ["rejected door=test-door: 47 more peers in the last 0.3 s (not logged one by one)"]
