"""`eep serve --http`: the OpenAI-compatible API, driven by the official `openai` client and raw
HTTP; a rank killed while streams are open is invisible to clients except as a pause."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from eep.model.default_model import init_model

START_TIMEOUT_S = 180
MODEL = "eep-test"
KEY = "sk-test-key"


@dataclass
class Http:
    proc: subprocess.Popen[str]
    url: str
    log: Path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_model(tmp_path_factory.mktemp("http") / "m", "qwen3_moe")


def _start(model_dir: Path, tmp: Path, *extra: str) -> Http:
    log = tmp / "serve.log"
    cmd = [
        sys.executable, "-m", "eep", "serve", "--model-path", str(model_dir), "--ep-size", "2", "--dtype", "bfloat16",
        "--max-model-len", "128", "--socket", str(tmp / "eep.sock"), "--http", "127.0.0.1:0",
        "--served-model-name", MODEL, *extra,
    ]
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
    try:
        line = lines.get(timeout=START_TIMEOUT_S)
    except queue.Empty:
        proc.kill()
        pytest.fail(f"no ready line; log:\n{log.read_text()[-3000:]}")
    assert " http://127.0.0.1:" in line, line
    return Http(proc, line.rsplit(" ", 1)[1].strip(), log)


def _stop(srv: Http) -> None:
    if srv.proc.poll() is None:
        srv.proc.send_signal(signal.SIGTERM)
        try:
            srv.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            srv.proc.kill()
            srv.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[Http]:
    tmp = Path(tempfile.mkdtemp(prefix="eep-http-", dir="/tmp"))
    srv = _start(model_dir, tmp, "--api-key", KEY)
    try:
        yield srv
    finally:
        _stop(srv)
        shutil.rmtree(tmp, ignore_errors=True)


def _client(srv: Http) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key=KEY, timeout=120, max_retries=0)


def test_openai_client_completes_and_streams_the_same_text(server: Http) -> None:
    client = _client(server)
    assert [m.id for m in client.models.list().data] == [MODEL]
    done = client.completions.create(model=MODEL, prompt="Expert parallelism", max_tokens=12, temperature=0)
    assert done.choices[0].finish_reason in ("length", "stop") and done.usage.completion_tokens > 0
    streamed = "".join(
        c.choices[0].text for c in client.completions.create(
            model=MODEL, prompt="Expert parallelism", max_tokens=12, temperature=0, stream=True
        )
    )
    assert streamed == done.choices[0].text and streamed


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"{not json", 400),
        (json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 0}).encode(), 400),
        (json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 100000}).encode(), 400),
        (json.dumps({"model": MODEL, "prompt": "x", "temperature": -1}).encode(), 400),
        (json.dumps({"model": MODEL, "prompt": "x", "top_p": 1.5}).encode(), 400),
        (json.dumps({"model": MODEL, "prompt": "x", "max_tokens": "ten"}).encode(), 400),
        (json.dumps({"model": "gpt-5", "prompt": "x"}).encode(), 404),
        (json.dumps({"model": MODEL, "prompt": "word " * 500}).encode(), 400),
    ],
)
def test_bad_requests_get_openai_shaped_4xx_and_the_server_stays_healthy(server: Http, body: bytes, status: int) -> None:
    headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    reply = httpx.post(f"{server.url}/v1/completions", content=body, headers=headers, timeout=60)
    assert reply.status_code == status, reply.text
    err = reply.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert httpx.get(f"{server.url}/health", headers=headers, timeout=30).status_code == 200


def test_every_endpoint_wants_the_api_key(server: Http) -> None:
    for method, path in [("GET", "/health"), ("GET", "/v1/models"), ("GET", "/membership"),
                         ("POST", "/v1/completions"), ("POST", "/admin/ranks/1/rejoin"),
                         ("POST", "/admin/ranks/1/drain"), ("GET", "/metrics"), ("POST", "/v1/chat/completions")]:
        reply = httpx.request(method, f"{server.url}{path}", json={}, timeout=30)
        assert reply.status_code == 401, (path, reply.text)
        assert reply.json()["error"]["code"] == "invalid_api_key"


def test_a_rank_killed_under_16_open_streams_is_only_a_pause(model_dir: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="eep-http-", dir="/tmp"))
    srv = _start(model_dir, tmp, "--failure-timeout", "0.5")
    try:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", timeout=120, max_retries=0)
        prompts = [f"Request number {i} asks about expert parallelism" for i in range(16)]
        reference = [client.completions.create(model=MODEL, prompt=p, max_tokens=24, temperature=0).choices[0].text
                     for p in prompts]
        texts: list[str | BaseException] = [""] * 16
        started = threading.Barrier(17, timeout=60)

        def stream(i: int) -> None:
            try:
                chunks = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=24, temperature=0,
                                                   stream=True)
                started.wait()
                texts[i] = "".join(c.choices[0].text for c in chunks)
            except BaseException as e:
                texts[i] = e

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        started.wait()  # every stream is open and has its first tokens
        pids = httpx.get(f"{srv.url}/membership", timeout=30).json()["view"]["ranks"]
        os.kill(pids[1]["incarnation"], signal.SIGKILL)
        for t in threads:
            t.join(timeout=120)
        assert texts == reference
        view = httpx.get(f"{srv.url}/membership", timeout=30).json()["view"]
        assert view["active"] == [0]
        assert httpx.post(f"{srv.url}/admin/ranks/1/rejoin", timeout=60).status_code == 200
        deadline = time.monotonic() + 60
        while httpx.get(f"{srv.url}/membership", timeout=30).json()["view"]["active"] != [0, 1]:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        # a graceful drain of the rank that came back; serving goes on without it
        assert httpx.post(f"{srv.url}/admin/ranks/1/drain", timeout=60).status_code == 200
        while httpx.get(f"{srv.url}/membership", timeout=30).json()["view"]["active"] != [0]:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        again = client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=24, temperature=0)
        assert again.choices[0].text == reference[0]
        assert httpx.post(f"{srv.url}/admin/ranks/0/drain", timeout=60).status_code == 400  # the last one
    finally:
        _stop(srv)
        shutil.rmtree(tmp, ignore_errors=True)


def test_chat_completes_and_streams_with_the_chat_template(server: Http) -> None:
    client = _client(server)
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is a rank?"}]
    done = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)  # type: ignore[arg-type]
    assert done.choices[0].message.role == "assistant" and done.choices[0].finish_reason in ("length", "stop")
    assert done.usage.prompt_tokens > 10  # the template's markers and roles were added
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=10, temperature=0, stream=True  # type: ignore[arg-type]
    ))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == done.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == done.choices[0].finish_reason


def test_metrics_parse_and_count_tokens(server: Http) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    headers = {"authorization": f"Bearer {KEY}"}
    before = _samples(httpx.get(f"{server.url}/metrics", headers=headers, timeout=30).text)
    _client(server).completions.create(model=MODEL, prompt="count me", max_tokens=5, temperature=0)
    text = httpx.get(f"{server.url}/metrics", headers=headers, timeout=30).text
    families = {f.name for f in text_string_to_metric_families(text)}
    for name in ("eep_generated_tokens", "eep_running_requests", "eep_queued_requests", "eep_step_seconds",
                 "eep_membership_epoch", "eep_active_ranks", "eep_repaired_experts", "eep_recovery_pause_seconds",
                 "eep_rejoin_pause_seconds"):
        assert name in families, name
    after = _samples(text)
    assert after["eep_generated_tokens_total"] >= before.get("eep_generated_tokens_total", 0) + 5
    assert after["eep_active_ranks"] == 2


def _samples(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def test_health_is_503_with_the_reason_while_admission_is_paused(model_dir: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="eep-http-", dir="/tmp"))
    srv = _start(model_dir, tmp, "--ep-spare-slots", "0", "--failure-timeout", "0.5")
    try:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", timeout=120, max_retries=0)
        assert httpx.get(f"{srv.url}/health", timeout=30).status_code == 200
        pid = httpx.get(f"{srv.url}/membership", timeout=30).json()["view"]["ranks"][1]["incarnation"]
        os.kill(pid, signal.SIGKILL)
        result: list[object] = []
        waiter = threading.Thread(target=lambda: result.append(
            client.completions.create(model=MODEL, prompt="waits for the rejoin", max_tokens=8, temperature=0)))
        waiter.start()
        deadline = time.monotonic() + 30
        while (health := httpx.get(f"{srv.url}/health", timeout=30)).status_code == 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert health.status_code == 503 and "no live replica" in health.json()["reason"]
        assert httpx.post(f"{srv.url}/admin/ranks/1/rejoin", timeout=60).status_code == 200
        waiter.join(timeout=120)
        assert result and httpx.get(f"{srv.url}/health", timeout=30).status_code == 200
    finally:
        _stop(srv)
        shutil.rmtree(tmp, ignore_errors=True)


def test_a_client_that_hangs_up_mid_stream_frees_its_request(server: Http) -> None:
    """vLLM's behaviour: a stream whose client went away is aborted, not run to max_tokens."""
    headers = {"authorization": f"Bearer {KEY}"}
    body = {"model": MODEL, "prompt": [5, 6, 7, 8], "max_tokens": 120, "stream": True, "ignore_eos": True,
            "return_token_ids": True}
    before = _samples(httpx.get(f"{server.url}/metrics", headers=headers, timeout=30).text)
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers, timeout=30) as resp:
        assert resp.status_code == 200
        ids: list[int] = []
        for line in resp.iter_lines():  # a few tokens, then hang up
            if line.startswith("data: {"):
                ids += json.loads(line[6:])["choices"][0]["token_ids"]
            if len(ids) >= 3:
                break
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        running = _samples(httpx.get(f"{server.url}/metrics", headers=headers, timeout=30).text)
        if running["eep_running_requests"] == 0 and running["eep_queued_requests"] == 0:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the abandoned request still runs: {running}")
    generated = running["eep_generated_tokens_total"] - before.get("eep_generated_tokens_total", 0)
    assert generated < 120  # it did not run to the end
