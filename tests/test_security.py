"""The doors of a live multi-host instance (on loopback: one head, then one agent): the
proof-of-concept attack of the issue, and every way a stranger or a broken peer can knock.

The PoC: one TCP connection to node 0's `--dist-init-addr` carrying one
`multiprocessing.connection` frame with a pickled object whose `__reduce__` runs a shell
command. Before eep authenticated its doors the command ran, as root, before the connection was
even looked at. Now: no canary file, one WARNING naming the peer's address, nothing else. Then a
silent peer, random bytes, another cluster's secret, and a peer with the right secret that sends
an oversize frame, a truncated one, an unknown message, a wrong-typed one and a rank connection
nobody asked for: each closed with one WARNING. The head's open files are what they were, and the
real agent then joins and the instance serves exactly the tokens of the single-process engine."""

from __future__ import annotations

import os
import pickle
import re
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

import eep
from eep.config import EngineConfig
from eep.engine.engine import LLMEngine
from eep.engine.sampling import SamplingParams
from eep.model.default_model import init_model
from eep.runtime import codec, wire
from eep.security.channel import HANDSHAKE_TIMEOUT_S, client_handshake
from eep.security.secret import ClusterSecret, init_secret_file

pytestmark = pytest.mark.slow

PROMPTS = [[5, 17, 300, 41, 9], [7, 8, 9]]
PARAMS = [SamplingParams(max_tokens=8, ignore_eos=True), SamplingParams(max_tokens=5, ignore_eos=True)]


class _Payload:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (self.command,)


def _free_base(n: int) -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n < 65000:
            try:
                for i in range(n):
                    with socket.socket() as p:
                        p.bind(("127.0.0.1", base + i))
                return base
            except OSError:
                continue
    raise RuntimeError("no free port range")


def _closed_by_server(sock: socket.socket, within_s: float) -> float:
    """Seconds until the server closed `sock` (it sends nothing we would take)."""
    start = time.monotonic()
    sock.settimeout(within_s)
    try:
        while sock.recv(4096):
            pass
    except (ConnectionResetError, TimeoutError):
        pass
    return time.monotonic() - start


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rejections(log: Path) -> list[str]:
    return [line for line in log.read_text(errors="replace").splitlines() if "rejected door=controller" in line]


def test_the_pickle_poc_and_every_bad_peer_are_turned_away_and_the_instance_serves_exactly(tmp_path: Path) -> None:
    model = init_model(tmp_path / "m", "qwen3_moe")
    engine = LLMEngine(EngineConfig(str(model), dtype="float32", max_model_len=96, progress=False))
    try:
        reference = [o.output_ids for o in engine.generate(PROMPTS, PARAMS)]
    finally:
        engine.close()
    secret_file = init_secret_file(tmp_path / "cluster.secret")
    key = ClusterSecret.load(secret_file).key("control handshake")
    port = _free_base(8)
    canary = tmp_path / "pwned"
    log = tmp_path / "head.log"
    common = [sys.executable, "-m", "eep", "serve", "--model-path", str(model), "--ep-size", "2", "--nnodes", "2",
              "--dist-init-addr", f"127.0.0.1:{port}", "--cluster-secret-file", str(secret_file),
              "--dtype", "float32", "--max-model-len", "96"]
    with log.open("w") as err:
        head = subprocess.Popen([*common, "--node-rank", "0", "--socket", str(tmp_path / "s.sock")],
                                stdout=subprocess.PIPE, stderr=err, text=True)
    agent = None
    try:
        deadline = time.monotonic() + 120
        while True:  # the PoC is the first connection the listener takes
            try:
                poc = socket.create_connection(("127.0.0.1", port), timeout=2)
                break
            except OSError:
                assert head.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
        payload = pickle.dumps(_Payload(f"id > {canary}"))
        poc.sendall(struct.pack("!i", len(payload)) + payload)
        assert _closed_by_server(poc, HANDSHAKE_TIMEOUT_S + 2) < HANDSHAKE_TIMEOUT_S + 1
        poc_port = poc.getsockname()[1]
        poc.close()
        time.sleep(0.5)
        assert not canary.exists(), "the pickled payload ran"
        lines = _rejections(log)
        assert len(lines) == 1 and f"peer=127.0.0.1:{poc_port}" in lines[0], lines
        assert "Traceback" not in log.read_text()
        baseline_fds = _fds(head.pid)

        def connect() -> socket.socket:
            return socket.create_connection(("127.0.0.1", port), timeout=5)

        def authenticated() -> wire.Channel:  # type: ignore[name-defined]
            return client_handshake(connect(), key)

        knocks = {}
        silent = connect()
        start = time.monotonic()
        knocks["silent"] = silent
        garbage = connect()
        garbage.sendall(os.urandom(300))
        knocks["garbage"] = garbage
        other = ClusterSecret(os.urandom(32)).key("control handshake")
        with pytest.raises(OSError, match="did not prove"):
            client_handshake(connect(), other)
        for name, frame in (
            ("oversize", struct.pack("!I", 2**31)),
            ("truncated", struct.pack("!I", 1000) + b"x" * 10),
            ("unknown", codec.encode(wire.Stop(0))),  # not a first message
            ("wrong_type", msgspec.msgpack.encode(["AgentHello", {"epoch": 0, "node": "one", "address": "a",
                                                                  "pid": 1}])),
            ("unasked_rank", codec.encode(wire.RankConnect(0, 1, "0" * 32, 1, {}))),
        ):
            ch = authenticated()
            if name in ("oversize", "truncated"):
                ch.sock.sendall(frame)  # raw: the framing itself is what is wrong
            else:
                ch.send_bytes(frame)
            knocks[name] = ch.sock
        for name, sock in knocks.items():
            waited = _closed_by_server(sock, FRAME := HANDSHAKE_TIMEOUT_S + 12)
            assert waited < FRAME - 1, f"{name}: not closed by the server"
            sock.close()
        assert time.monotonic() - start < HANDSHAKE_TIMEOUT_S + 12
        time.sleep(0.5)
        lines = _rejections(log)
        assert len(lines) == 1 + 8, "\n".join(lines)  # one per peer: the PoC, 2 strangers, a wrong secret, 5 bad
        assert all(re.search(r"peer=127\.0\.0\.1:\d+: ", line) for line in lines), lines
        assert not canary.exists() and head.poll() is None
        assert _fds(head.pid) == baseline_fds, "a refused connection left an open file in the head"

        with (tmp_path / "agent.log").open("w") as err:  # the real agent, with the real secret
            agent = subprocess.Popen([*common, "--node-rank", "1"], stdout=subprocess.DEVNULL, stderr=err, text=True)
        assert head.stdout is not None
        line = head.stdout.readline()
        assert line.startswith("eep serve: ready"), log.read_text()[-3000:]
        with eep.Client(f"unix:{tmp_path / 's.sock'}", timeout_s=120) as client:
            assert [o.output_ids for o in client.generate(PROMPTS, PARAMS)] == reference
            assert client.status()["membership"]["view"]["active"] == [0, 1]
    finally:
        head.terminate()
        head.wait(timeout=60)
        if agent is not None:
            agent.wait(timeout=30)
        if head.stdout is not None:
            head.stdout.close()
    assert not canary.exists()
