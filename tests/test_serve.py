"""`eep serve` as a user runs it (a real subprocess with real rank processes) and `eep.Client`:
exact outputs, concurrent clients, bad requests answered without harm, a clean SIGTERM."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import eep
from eep.config import EngineConfig
from eep.control.config import EPConfig
from eep.engine.engine import LLMEngine
from eep.engine.loop import EngineLoop
from eep.engine.request import RequestOutput
from eep.engine.sampling import SamplingParams
from eep.errors import EngineUnavailable, RequestError
from eep.llm import build_engine
from eep.model.default_model import init_model

MAX_MODEL_LEN = 96
START_TIMEOUT_S = 90.0
PROMPTS = [[5, 17, 300, 41, 9], [7], list(range(100, 160)), [250, 251, 252, 253, 254, 255, 256, 257, 258, 259, 3], [42, 43]]
PARAMS = [SamplingParams(max_tokens=m, ignore_eos=True) for m in (12, 5, 9, 16, 1)]


@dataclass
class Server:
    proc: subprocess.Popen[str]
    socket: Path
    log: Path

    def log_tail(self) -> str:
        return self.log.read_text()[-3000:] if self.log.exists() else "(no log)"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").exists() and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


def _segments(pid: int) -> set[str]:
    return {p.name for p in Path("/dev/shm").glob(f"eep-{pid}-*")}


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_model(tmp_path_factory.mktemp("serve") / "m", "qwen3_moe")


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> dict[tuple[int, ...], list[int]]:
    """Greedy outputs of the in-process single-process engine, by prompt."""
    engine = LLMEngine(EngineConfig(str(model_dir), dtype="float32", max_model_len=MAX_MODEL_LEN, progress=False))
    try:
        outs = engine.generate(PROMPTS, PARAMS)
    finally:
        engine.close()
    return {tuple(p): o.output_ids for p, o in zip(PROMPTS, outs)}


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    # pytest's tmp_path can exceed the 107 bytes a Unix socket path may have
    d = Path(tempfile.mkdtemp(prefix="eep-serve-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _start(model_dir: Path, tmp: Path) -> Server:
    sock, log = tmp / "run" / "eep.sock", tmp / "serve.log"
    cmd = [
        sys.executable, "-m", "eep", "serve", "--model-path", str(model_dir), "--ep-size", "2", "--dtype", "float32",
        "--max-model-len", str(MAX_MODEL_LEN), "--socket", str(sock),
    ]
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    server = Server(proc, sock, log)
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    try:
        line = lines.get(timeout=START_TIMEOUT_S)
    except queue.Empty:
        _stop(server)
        pytest.fail(f"eep serve printed nothing within {START_TIMEOUT_S} s; log:\n{server.log_tail()}")
    if line != f"eep serve: ready on unix:{sock} (2 ranks, shm)\n":
        _stop(server)
        pytest.fail(f"unexpected first stdout line {line!r}; log:\n{server.log_tail()}")
    return server


def _stop(server: Server) -> None:
    """Teardown that also works when a test failed half-way: SIGTERM, then force."""
    proc = server.proc
    ranks = _children(proc.pid)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    for pid in ranks:  # only if the server could not stop them itself
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    for name in _segments(proc.pid):
        Path("/dev/shm", name).unlink(missing_ok=True)


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[Server]:
    tmp = Path(tempfile.mkdtemp(prefix="eep-serve-", dir="/tmp"))
    srv = _start(model_dir, tmp)
    try:
        yield srv
    finally:
        _stop(srv)
        shutil.rmtree(tmp, ignore_errors=True)


def _check(outs: list[RequestOutput], prompts: list[list[int]], reference: dict) -> None:  # type: ignore[type-arg]
    assert [o.prompt_ids for o in outs] == prompts
    assert [o.output_ids for o in outs] == [reference[tuple(p)] for p in prompts]
    assert all(o.finish_reason == "length" and o.text for o in outs)


def test_generate_matches_single_process_engine(server: Server, reference: dict) -> None:  # type: ignore[type-arg]
    with eep.Client(f"unix:{server.socket}", timeout_s=60) as client:
        outs = client.generate(PROMPTS, PARAMS)
        _check(outs, PROMPTS, reference)
        # one parameter set for all, a plain path as address, a bare string prompt
    with eep.Client(str(server.socket), timeout_s=60) as client:
        one = client.generate([PROMPTS[0]], SamplingParams(max_tokens=12, ignore_eos=True))
        assert one[0].output_ids == reference[tuple(PROMPTS[0])]
        assert len(client.generate("a bare string is one prompt", SamplingParams(max_tokens=3))) == 1


def test_served_instance_survives_a_killed_rank_and_takes_it_back(
    model_dir: Path, short_tmp: Path, reference: dict  # type: ignore[type-arg]
) -> None:
    srv = _start(model_dir, short_tmp)
    try:
        with eep.Client(f"unix:{srv.socket}", timeout_s=60) as client:
            status = client.status()
            assert status["membership"]["view"]["active"] == [0, 1]
            os.kill(status["rank_pids"][1], signal.SIGKILL)
            _check(client.generate(PROMPTS, PARAMS), PROMPTS, reference)
            status = client.status()
            assert status["healthy"] and status["membership"]["view"]["active"] == [0]
            assert [e["kind"] for e in status["membership"]["events"]][:4] == ["view_committed", "fault_seen", "view_committed", "repair"]
            with pytest.raises(RequestError, match="only a failed rank"):
                client.rejoin(0)
            for rank in (-1, 2):  # -1 would have named the last rank
                with pytest.raises(RequestError, match="does not exist"):
                    client.rejoin(rank)
            client.rejoin(1)
            deadline = time.monotonic() + 60
            while client.status()["membership"]["view"]["active"] != [0, 1]:  # switched in while idle
                assert time.monotonic() < deadline, srv.log_tail()
                time.sleep(0.2)
            _check(client.generate(PROMPTS, PARAMS), PROMPTS, reference)
    finally:
        _stop(srv)


def test_two_concurrent_clients_get_their_exact_outputs(server: Server, reference: dict) -> None:  # type: ignore[type-arg]
    halves = [(PROMPTS[:3], PARAMS[:3]), (PROMPTS[3:], PARAMS[3:])]
    results: list[object] = [None, None]
    barrier = threading.Barrier(2, timeout=30)

    def run(i: int) -> None:
        try:
            with eep.Client(f"unix:{server.socket}", timeout_s=60) as client:
                barrier.wait()
                results[i] = client.generate(*halves[i])
        except BaseException as e:  # reported by the main thread
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert not any(t.is_alive() for t in threads), "a client did not finish"
    for (prompts, _), result in zip(halves, results):
        assert isinstance(result, list), result
        _check(result, prompts, reference)


def _raw(sock_path: Path, payload: bytes) -> dict:  # type: ignore[type-arg]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(sock_path))
        s.sendall(payload)
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            assert chunk, "the server closed the connection without a reply"
            buf += chunk
    return json.loads(buf)


def test_bad_requests_get_errors_and_the_server_keeps_serving(server: Server, reference: dict) -> None:  # type: ignore[type-arg]
    bad = {
        b"{not json\n": "not valid JSON",
        b'{"op": "generate", "prompts": [[1, 2]], "sampling_params": {"max_tokenz": 3}}\n': "max_tokenz",
        b'{"op": "generate", "prompts": [[1, 2]], "sampling_params": {"max_tokens": "3"}}\n': "max_tokens",
        b'{"op": "generate", "prompts": [[1, 2.5]]}\n': "prompt 0",
        b'{"op": "shutdown"}\n': "unknown op",
        b"[1, 2]\n": "JSON object",
    }
    for payload, fragment in bad.items():
        reply = _raw(server.socket, payload)
        assert reply["ok"] is False and reply["error"]["type"] == "RequestError", (payload, reply)
        assert fragment in reply["error"]["message"], (payload, reply)
    with eep.Client(f"unix:{server.socket}", timeout_s=60) as client:
        with pytest.raises(RequestError, match="max_model_len"):
            client.generate([[1] * 90], SamplingParams(max_tokens=10))
        with pytest.raises(RequestError, match="token ids"):
            client.generate([[10**9]], SamplingParams(max_tokens=2))
        # the same connection, and the whole batch, still serve
        _check(client.generate(PROMPTS, PARAMS), PROMPTS, reference)
        assert client.status()["healthy"] is True


def test_status_and_clean_shutdown_on_sigterm(model_dir: Path, short_tmp: Path) -> None:
    server = _start(model_dir, short_tmp)
    try:
        assert stat.S_IMODE(server.socket.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(server.socket.stat().st_mode) == 0o600
        with eep.Client(f"unix:{server.socket}", timeout_s=60) as client:
            status = client.status()
        assert status["ep_size"] == 2 and status["backend"] == "shm" and status["model_path"] == str(model_dir)
        pids = status["rank_pids"]
        assert len(pids) == 2 and server.proc.pid not in pids and all(_alive(p) for p in pids)
        assert _segments(server.proc.pid), "the shm data plane should have created a segment"
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=30) == 0, server.log_tail()
        assert not any(_alive(p) for p in pids)
        assert not server.socket.exists()
        assert not _segments(server.proc.pid)
        assert "shutting down" in server.log_tail()
    finally:
        _stop(server)


def test_engine_loop_close_fails_pending_requests(model_dir: Path) -> None:
    config = EngineConfig(str(model_dir), dtype="float32", max_model_len=MAX_MODEL_LEN, progress=False)
    loop = EngineLoop(LLMEngine(config))
    try:
        with pytest.raises(RequestError, match="max_model_len"):
            loop.submit([1] * 90, SamplingParams(max_tokens=10)).result(timeout=30)
        assert loop.healthy  # a bad request fails alone
        long = loop.submit([1, 2, 3], SamplingParams(max_tokens=80, ignore_eos=True))
    finally:
        loop.close(timeout_s=30)
    assert isinstance(long.exception(timeout=5), EngineUnavailable)
    assert isinstance(loop.submit([1], SamplingParams()).exception(timeout=1), EngineUnavailable)


def test_engine_loop_after_a_rank_dies(model_dir: Path, reference: dict) -> None:  # type: ignore[type-arg]
    """With fault_policy none (fixed membership) a dead rank ends the instance: the loop turns
    unhealthy and says why; with the default (repair) the loop serves on, exactly."""
    config = EngineConfig(str(model_dir), dtype="float32", max_model_len=MAX_MODEL_LEN, progress=False)
    loop = EngineLoop(build_engine(config, EPConfig(ep_size=2, timeout_s=1.5, fault_policy="none")))
    pids = loop.engine.executor.pids()  # type: ignore[attr-defined]
    try:
        assert loop.submit(PROMPTS[0], PARAMS[0]).result(timeout=60).output_ids == reference[tuple(PROMPTS[0])]
        os.kill(pids[1], signal.SIGKILL)
        error = loop.submit(PROMPTS[1], PARAMS[1]).exception(timeout=60)
        assert error is not None and error is loop.error and not loop.healthy
        later = loop.submit(PROMPTS[1], PARAMS[1]).exception(timeout=1)
        assert isinstance(later, EngineUnavailable) and "restart" in str(later)
        # a call (status, membership change) too fails at once: the loop's thread is gone
        assert isinstance(loop.call(lambda e: None).exception(timeout=1), EngineUnavailable)
    finally:
        loop.close(timeout_s=30)
    assert not any(_alive(p) for p in pids)

    loop = EngineLoop(build_engine(config, EPConfig(ep_size=2, timeout_s=5.0)))
    pids = loop.engine.executor.pids()  # type: ignore[attr-defined]
    try:
        os.kill(pids[1], signal.SIGKILL)
        for prompt, params in zip(PROMPTS, PARAMS):
            assert loop.submit(prompt, params).result(timeout=60).output_ids == reference[tuple(prompt)]
        assert loop.healthy
    finally:
        loop.close(timeout_s=30)
    assert not any(_alive(p) for p in pids)
