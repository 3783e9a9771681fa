"""`eep serve --http`: the OpenAI-compatible API, driven by the official `openai` client and raw
HTTP; a rank killed while streams are open is invisible to clients except as a pause; clients
that go away free their requests without an error in the log; the admin endpoints want their own
key; schemathesis checks the server against its own /openapi.json."""

from __future__ import annotations

import asyncio
import http.client
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
ADMIN = "sk-test-admin-key"
ADMIN_HEADERS = {"authorization": f"Bearer {ADMIN}"}


@dataclass
class Http:
    proc: subprocess.Popen[str]
    url: str
    log: Path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_model(tmp_path_factory.mktemp("http") / "m", "qwen3_moe")


def _start(model_dir: Path, tmp: Path, *extra: str, ep_size: int = 2, max_model_len: int = 128,
           dtype: str = "bfloat16") -> Http:
    log = tmp / "serve.log"
    cmd = [
        sys.executable, "-m", "eep", "serve", "--model-path", str(model_dir), "--ep-size", str(ep_size),
        "--dtype", dtype, "--max-model-len", str(max_model_len), "--socket", str(tmp / "eep.sock"),
        "--http", "127.0.0.1:0", "--served-model-name", MODEL, *extra,
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
    srv = _start(model_dir, tmp, "--api-key", KEY, "--admin-api-key", ADMIN)
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


INFERENCE = [("GET", "/health"), ("GET", "/v1/models"), ("GET", "/membership"), ("POST", "/v1/completions"),
             ("GET", "/metrics"), ("POST", "/v1/chat/completions")]
ADMIN_ROUTES = [("POST", "/admin/ranks/0/rejoin"), ("POST", "/admin/ranks/0/drain")]


def test_every_endpoint_wants_the_api_key(server: Http) -> None:
    for method, path in INFERENCE + ADMIN_ROUTES:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": KEY}):
            reply = httpx.request(method, f"{server.url}{path}", json={}, headers=headers, timeout=30)
            assert reply.status_code == 401, (path, reply.text)
            assert reply.json()["error"]["code"] == "invalid_api_key"
            assert reply.headers["www-authenticate"] == "Bearer"


def test_the_admin_key_opens_the_admin_endpoints_and_nothing_else(server: Http) -> None:
    """The API key never opens /admin; the admin key opens only /admin."""
    for method, path in ADMIN_ROUTES:
        reply = httpx.request(method, f"{server.url}{path}", headers={"authorization": f"Bearer {KEY}"}, timeout=30)
        assert reply.status_code == 401 and "admin key" in reply.json()["error"]["message"], reply.text
    # past the key, changing nothing: rank 0 is active (no rejoin), there is no rank 2 (no drain)
    reply = httpx.post(f"{server.url}/admin/ranks/0/rejoin", headers=ADMIN_HEADERS, timeout=60)
    assert reply.status_code == 409 and reply.json()["error"]["code"] == "membership_conflict", reply.text
    reply = httpx.post(f"{server.url}/admin/ranks/2/drain", headers=ADMIN_HEADERS, timeout=60)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "rank", reply.text
    for method, path in INFERENCE:
        reply = httpx.request(method, f"{server.url}{path}", json={}, headers=ADMIN_HEADERS, timeout=30)
        assert reply.status_code == 401, (path, reply.text)
    assert httpx.get(f"{server.url}/v1/models", headers={"authorization": f"Bearer {KEY}"}).status_code == 200


def test_a_rank_killed_under_16_open_streams_is_only_a_pause(model_dir: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="eep-http-", dir="/tmp"))
    srv = _start(model_dir, tmp, "--failure-timeout", "0.5", "--admin-api-key", ADMIN)
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
        pids = httpx.get(f"{srv.url}/membership", timeout=30).json()["pids"]
        os.kill(pids[1], signal.SIGKILL)
        for t in threads:
            t.join(timeout=120)
        assert texts == reference
        view = httpx.get(f"{srv.url}/membership", timeout=30).json()["view"]
        assert view["active"] == [0]
        assert httpx.post(f"{srv.url}/admin/ranks/1/rejoin", headers=ADMIN_HEADERS, timeout=60).status_code == 200
        deadline = time.monotonic() + 60
        while httpx.get(f"{srv.url}/membership", timeout=30).json()["view"]["active"] != [0, 1]:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        # a graceful drain of the rank that came back; serving goes on without it
        assert httpx.post(f"{srv.url}/admin/ranks/1/drain", headers=ADMIN_HEADERS, timeout=60).status_code == 200
        while httpx.get(f"{srv.url}/membership", timeout=30).json()["view"]["active"] != [0]:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        again = client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=24, temperature=0)
        assert again.choices[0].text == reference[0]
        last = httpx.post(f"{srv.url}/admin/ranks/0/drain", headers=ADMIN_HEADERS, timeout=60)
        assert last.status_code == 409, last.text  # the last one: the state refuses it
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
    _client(server).completions.create(model=MODEL, prompt="count me", max_tokens=24, temperature=0)  # >= 2 load reports
    text = httpx.get(f"{server.url}/metrics", headers=headers, timeout=30).text
    families = {f.name for f in text_string_to_metric_families(text)}
    for name in ("eep_generated_tokens", "eep_running_requests", "eep_queued_requests", "eep_step_seconds",
                 "eep_membership_epoch", "eep_active_ranks", "eep_repaired_experts", "eep_recovery_pause_seconds",
                 "eep_rejoin_pause_seconds", "eep_bookkeeping_cpu_seconds", "eep_cpu_seconds",
                 "eep_expert_load_imbalance", "eep_rebalances", "eep_expert_moves"):
        assert name in families, name
    after = _samples(text)
    assert after["eep_generated_tokens_total"] >= before.get("eep_generated_tokens_total", 0) + 5
    assert after["eep_cpu_seconds_total"] > before.get("eep_cpu_seconds_total", 0)
    books = {s.labels["what"] for f in text_string_to_metric_families(text) for s in f.samples
             if s.name == "eep_bookkeeping_cpu_seconds_total"}
    assert books == {"rank_heartbeats", "heartbeat_looks", "step_boundary", "plan_ahead", "expert_load", "eplb"}
    assert after["eep_active_ranks"] == 2
    # the expert load of the tokens above, under the tables in use: one gauge per MoE layer, >= 1
    imbalance = [s for f in text_string_to_metric_families(text) for s in f.samples
                 if s.name == "eep_expert_load_imbalance"]
    assert sorted(int(s.labels["layer"]) for s in imbalance) == list(range(8))
    assert all(s.value >= 1.0 for s in imbalance) and any(s.value > 1.0 for s in imbalance)


def _samples(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def test_health_is_503_with_the_reason_while_admission_is_paused(model_dir: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="eep-http-", dir="/tmp"))
    srv = _start(model_dir, tmp, "--ep-spare-slots", "0", "--failure-timeout", "0.5", "--admin-api-key", ADMIN)
    try:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", timeout=120, max_retries=0)
        assert httpx.get(f"{srv.url}/health", timeout=30).status_code == 200
        pid = httpx.get(f"{srv.url}/membership", timeout=30).json()["pids"][1]
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
        assert httpx.post(f"{srv.url}/admin/ranks/1/rejoin", headers=ADMIN_HEADERS, timeout=60).status_code == 200
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


def _events(resp: httpx.Response, limit: int | None = None) -> list[tuple[str | None, dict | str]]:  # type: ignore[type-arg]
    """The (id, data) of a stream's events, the first `limit` of them (then the client hangs up)."""
    out: list[tuple[str | None, dict | str]] = []  # type: ignore[type-arg]
    event_id: str | None = None
    for line in resp.iter_lines():
        if line.startswith("id: "):
            event_id = line[4:]
        elif line.startswith("data: "):
            data = line[6:]
            out.append((event_id, data if data == "[DONE]" else json.loads(data)))
            event_id = None
            if limit is not None and len(out) >= limit:
                break
    return out


def _stream(srv: Http, path: str, body: dict, limit: int | None = None,  # type: ignore[type-arg]
            **headers: str) -> tuple[int, list[tuple[str | None, dict | str]]]:  # type: ignore[type-arg]
    h = {"authorization": f"Bearer {KEY}", **{k.replace("_", "-"): v for k, v in headers.items()}}
    with httpx.stream("POST", f"{srv.url}{path}", json=body, headers=h, timeout=60) as resp:
        if resp.status_code != 200:
            resp.read()
            return resp.status_code, [(None, resp.json())]
        return 200, _events(resp, limit)


def _pieces(events: list) -> tuple[list[int], str, list[str]]:  # type: ignore[type-arg]
    """A completion stream's token ids, text and event ids (the [DONE] left out)."""
    ids: list[int] = []
    text, eids = "", []
    for eid, data in events:
        if isinstance(data, dict):
            choice = data["choices"][0]
            ids += choice.get("token_ids", [])
            text += choice.get("text") or (choice.get("delta") or {}).get("content", "")
            eids.append(eid)
    return ids, text, eids


@pytest.mark.parametrize("body", [
    {"prompt": [5, 6, 7, 8], "max_tokens": 24, "temperature": 0, "ignore_eos": True},
    {"prompt": "Expert parallelism", "max_tokens": 24, "temperature": 1.0, "seed": 7, "ignore_eos": True},
    {"prompt": [[5, 6, 7], [9, 10, 11, 12]], "max_tokens": 10, "temperature": 0, "ignore_eos": True},
], ids=["greedy", "seeded", "two-prompts"])
def test_a_broken_stream_resumes_with_last_event_id_and_changes_no_token(server: Http, body: dict) -> None:  # type: ignore[type-arg]
    """Every event carries `id: <request id>:<tokens through it>`; the client hangs up after a few
    (the request is aborted: its KV slot freed) and sends the same request again with
    Last-Event-ID: it gets exactly the events after it, then [DONE]; the tokens and text, joined,
    are those of an uninterrupted stream."""
    body = {"model": MODEL, "stream": True, "return_token_ids": True, **body}
    status, whole = _stream(server, "/v1/completions", body)
    assert status == 200 and whole[-1] == (None, "[DONE]")
    ids, text, eids = _pieces(whole)
    rid = whole[0][1]["id"]  # type: ignore[index]
    assert all(e is not None and e.rsplit(":", 1)[0] == rid for e in eids)
    ends = [int(e.rsplit(":", 1)[1]) for e in eids]
    assert ends == sorted(ends) and ends[-1] == len(ids)  # the stream's tokens through each event
    for cut in (1, 4, len(eids) - 1):
        status, first = _stream(server, "/v1/completions", body, limit=cut)
        assert status == 200
        last = first[-1][0]
        assert last is not None
        _idle(server, {"authorization": f"Bearer {KEY}"})  # aborted when its client went away
        status, rest = _stream(server, "/v1/completions", body, **{"last_event_id": last})
        assert status == 200 and rest[-1] == (None, "[DONE]"), rest[-2:]
        a, b = _pieces(first), _pieces(rest)
        assert a[0] + b[0] == ids and a[1] + b[1] == text, (cut, a, b)
        assert int(b[2][0].rsplit(":", 1)[1]) > int(last.rsplit(":", 1)[1])


def test_a_chat_stream_resumes_after_its_role_chunk(server: Http) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16, "temperature": 0,
            "stream": True}
    status, whole = _stream(server, "/v1/chat/completions", body)
    assert status == 200 and whole[0][0] is not None and whole[0][0].endswith(":0")
    _, text, _ = _pieces(whole)
    status, first = _stream(server, "/v1/chat/completions", body, limit=3)
    last = first[-1][0]
    assert last is not None
    status, rest = _stream(server, "/v1/chat/completions", body, **{"last_event_id": last})
    assert status == 200 and rest[-1] == (None, "[DONE]")
    assert all("role" not in d["choices"][0]["delta"] for _, d in rest if isinstance(d, dict))
    assert _pieces(first)[1] + _pieces(rest)[1] == text


def test_a_retry_with_the_same_request_id_gets_the_same_completion_and_runs_nothing_twice(server: Http) -> None:
    headers = {"authorization": f"Bearer {KEY}"}
    url = f"{server.url}/v1/completions"
    body = {"model": MODEL, "prompt": [3, 4, 5], "max_tokens": 20, "temperature": 0.8, "ignore_eos": True,
            "return_token_ids": True}  # sampled without a seed: only the journal can give the same tokens back
    first = httpx.post(url, json=body, headers={**headers, "X-Request-Id": "retry-1"}, timeout=60)
    assert first.status_code == 200 and first.headers["x-request-id"] == "retry-1"
    assert first.json()["id"] == "retry-1"
    before = _idle(server, headers)["eep_generated_tokens_total"]
    again = httpx.post(url, json=body, headers={**headers, "X-Request-Id": "retry-1"}, timeout=60)
    assert again.status_code == 200 and again.json() == first.json()
    key = httpx.post(url, json=body, headers={**headers, "Idempotency-Key": "retry-1"}, timeout=60)
    assert key.json() == first.json()
    assert _idle(server, headers)["eep_generated_tokens_total"] == before  # nothing ran again
    other = httpx.post(url, json={**body, "max_tokens": 5}, headers={**headers, "X-Request-Id": "retry-1"}, timeout=60)
    assert other.status_code == 409 and other.json()["error"]["code"] == "request_id_conflict"
    # a client that gives up while its request runs, then retries: it goes on from what it had
    long = {**body, "max_tokens": 100, "temperature": 0, "prompt": [8, 9]}
    reference = httpx.post(url, json=long, headers=headers, timeout=60).json()["choices"][0]["token_ids"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url, json=long, headers={**headers, "X-Request-Id": "retry-2"}, timeout=0.3)
    _idle(server, headers)
    done = httpx.post(url, json=long, headers={**headers, "X-Request-Id": "retry-2"}, timeout=60).json()
    assert done["choices"][0]["token_ids"] == reference


def test_last_event_id_of_an_unknown_request_is_404_and_a_malformed_one_400(server: Http) -> None:
    body = {"model": MODEL, "prompt": [5, 6], "max_tokens": 4, "stream": True}
    status, reply = _stream(server, "/v1/completions", body, **{"last_event_id": "cmpl-nobody:3"})
    assert status == 404 and reply[0][1]["error"]["code"] == "request_not_found"  # type: ignore[index]
    for bad in ("no-index", "x:-1", "x:1e3"):
        status, _ = _stream(server, "/v1/completions", body, **{"last_event_id": bad})
        assert status == 400, bad
    for bad in ("x" * 129, "tab\there"):
        status, _ = _stream(server, "/v1/completions", body, **{"x_request_id": bad})
        assert status == 400, bad


def _idle(srv: Http, headers: dict[str, str], timeout_s: float = 60) -> dict[str, float]:
    """/metrics once no request runs or waits (fails after `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = _samples(httpx.get(f"{srv.url}/metrics", headers=headers, timeout=30).text)
        if samples["eep_running_requests"] == 0 and samples["eep_queued_requests"] == 0:
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"requests still run {timeout_s:g} s after their clients went away: {samples}")
        time.sleep(0.2)


async def _go_away(url: str, headers: dict[str, str]) -> int:
    """16 completion streams and 4 chat streams at once, each read a few chunks in, then all
    closed together; and one non-streaming request given up by its client. Returns the number
    of chunks read."""
    read, everyone_read, close = [0], asyncio.Event(), asyncio.Event()
    streams = [("/v1/completions", {"model": MODEL, "prompt": [5, 6, 7, 8 + i], "max_tokens": 120, "stream": True,
                                    "ignore_eos": True, "return_token_ids": True}) for i in range(16)]
    streams += [("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": f"Count to {i}"}],
                                          "max_tokens": 100, "stream": True}) for i in range(4)]
    ready = [0]

    def arrived() -> None:  # also on an error: the gather below then raises it
        ready[0] += 1
        if ready[0] >= len(streams):
            everyone_read.set()

    async def stream(client: httpx.AsyncClient, path: str, body: dict[str, object]) -> None:
        try:
            async with client.stream("POST", path, json=body) as resp:
                assert resp.status_code == 200, await resp.aread()
                chunks = 0
                async for line in resp.aiter_lines():
                    chunks += line.startswith("data: {")
                    if chunks == 3:
                        break
                read[0] += chunks
                arrived()
                await asyncio.wait_for(close.wait(), 120)
            # leaving the block mid-stream closes the connection
        except BaseException:
            arrived()
            raise

    async def gives_up(client: httpx.AsyncClient) -> None:
        body = {"model": MODEL, "prompt": [9, 10, 11], "max_tokens": 120, "ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):
            await client.post("/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.5))

    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as client:
        tasks = [asyncio.create_task(stream(client, p, b)) for p, b in streams]
        await gives_up(client)
        await asyncio.wait_for(everyone_read.wait(), 120)
        close.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
    return read[0]


@pytest.mark.slow
def test_clients_that_go_away_free_their_requests_without_an_error(server: Http) -> None:
    """Issue 12: a client that goes away aborts its request (the KV slot is freed) and the log
    has at most an INFO line about it, never an ERROR or a traceback."""
    headers = {"authorization": f"Bearer {KEY}"}
    log_from = server.log.stat().st_size
    before = _samples(httpx.get(f"{server.url}/metrics", headers=headers, timeout=30).text)
    assert asyncio.run(_go_away(server.url, headers)) >= 16 * 3
    after = _idle(server, headers)
    generated = after["eep_generated_tokens_total"] - before.get("eep_generated_tokens_total", 0)
    assert generated < 16 * 120 + 120  # the completions did not run to their end
    log = server.log.read_bytes()[log_from:].decode(errors="replace")
    assert "ERROR" not in log and "Traceback" not in log, log[-4000:]
    assert "the client went away" in log, log[-4000:]
    again = _client(server).completions.create(model=MODEL, prompt="still serving", max_tokens=4, temperature=0)
    assert again.choices[0].finish_reason in ("length", "stop")


def test_a_body_over_the_limit_is_refused_with_413(server: Http) -> None:
    """A body over max_message_bytes (16 MiB) is refused, in OpenAI's error shape: by its
    Content-Length before it is read, or as it arrives when it has none (chunked)."""
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.putrequest("POST", "/v1/completions")
        for name, value in [("Authorization", f"Bearer {KEY}"), ("Content-Type", "application/json"),
                            ("Content-Length", str(17 * 2**20))]:
            conn.putheader(name, value)
        conn.endheaders()  # the headers only: the server must answer without the body
        reply = conn.getresponse()
        assert reply.status == 413
        assert json.loads(reply.read())["error"]["code"] == "request_too_large"
    finally:
        conn.close()

    def body() -> Iterator[bytes]:
        yield b'{"model": "' + MODEL.encode() + b'", "prompt": "'
        for _ in range(17):
            yield b"x" * 2**20
        yield b'"}'

    reply = httpx.post(f"{server.url}/v1/completions", content=body(), timeout=60,
                       headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "request_too_large", reply.text
    assert httpx.get(f"{server.url}/health", headers={"authorization": f"Bearer {KEY}"}).status_code == 200


@pytest.fixture(scope="module")
def keyed_no_admin(model_dir: Path) -> Iterator[Http]:
    """One rank, an API key and no admin key: the admin endpoints are closed."""
    tmp = Path(tempfile.mkdtemp(prefix="eep-http-", dir="/tmp"))
    srv = _start(model_dir, tmp, "--api-key", KEY, ep_size=1, max_model_len=32, dtype="float32")
    try:
        yield srv
    finally:
        _stop(srv)
        shutil.rmtree(tmp, ignore_errors=True)


def test_without_an_admin_key_the_admin_endpoints_are_closed(keyed_no_admin: Http) -> None:
    for method, path in ADMIN_ROUTES:
        for headers in ({}, {"authorization": f"Bearer {KEY}"}, ADMIN_HEADERS):
            reply = httpx.request(method, f"{keyed_no_admin.url}{path}", headers=headers, timeout=30)
            assert reply.status_code == 403, reply.text
            err = reply.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and "--admin-api-key" in err["message"]


# Statuses schemathesis accepts for schema-valid generation requests: 400 as well, since the
# prompt's tokens plus max_tokens must fit the context, a limit in tokens that no JSON Schema of
# the text can state (/openapi.json says so; every other limit is in the schema).
_GENERATION_OPS = '''
[[operations]]
include-path-regex = "^/v1/(chat/)?completions$"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "409", "429", "5xx"]
'''
SCHEMATHESIS_TIMEOUT_S = 240  # the bound of one run: about 40 s on two cores busy with other work


def _schemathesis(srv: Http, tmp: Path, config: str, *args: str) -> None:
    """`st run --checks all` against the server's /openapi.json, a bounded number of examples
    per operation; fails the test with schemathesis's report if it finds anything."""
    (tmp / "schemathesis.toml").write_text(config)
    cmd = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(tmp / "schemathesis.toml"), "run",
           f"{srv.url}/openapi.json", "--checks", "all", "--max-examples", "5", "--seed", "1",
           # one worker: CPython 3.11's ast constructor is not thread-safe, and hypothesis compiles
           # in each worker ("SystemError: AST constructor recursion depth mismatch", now and then)
           "--generation-database", "none", "--workers", "1", "--no-color",
           # two busy cores: slow is not wrong here, neither the server's generation (a hang still
           # fails) nor hypothesis's own data generation (its too_slow health check is timing)
           "--request-timeout", "60", "--max-response-time", "60", "--suppress-health-check", "too_slow", *args]
    try:
        run = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=SCHEMATHESIS_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"schemathesis ran past {SCHEMATHESIS_TIMEOUT_S} s:\n{out[-6000:]}")
    report = run.stdout + run.stderr
    summary = report.strip().splitlines()[-1]  # "===== No issues found in 9.1s =====", "===== 2 failures, ..."
    assert run.returncode == 0 and "failure" not in summary and "error" not in summary, report[-12000:]
    log = srv.log.read_text()
    assert "ERROR" not in log and "Traceback" not in log, log[-4000:]


@pytest.mark.slow
def test_schemathesis_finds_nothing_with_an_api_key(keyed_no_admin: Http, tmp_path: Path) -> None:
    """With --api-key: the security schemes, 401s and the closed admin endpoints (403; schemathesis
    warns that they answered nothing else, as they should). The generation endpoints are left to
    the run without a key (their answers do not depend on it)."""
    _schemathesis(keyed_no_admin, tmp_path, f'[auth.openapi.ApiKey]\nbearer = "{KEY}"\n',
                  "--exclude-path-regex", "^/v1/(chat/)?completions$")


@pytest.mark.slow
def test_schemathesis_finds_nothing_without_an_api_key(model_dir: Path, tmp_path: Path) -> None:
    """No API key, an admin key: every operation, generation included (streams too: each
    event's data is checked against its chunk schema)."""
    tmp = Path(tempfile.mkdtemp(prefix="eep-http-", dir="/tmp"))
    # float32: about 1.5x the tokens/s of bfloat16 on CPUs; a short context: short generations
    srv = _start(model_dir, tmp, "--admin-api-key", ADMIN, ep_size=1, max_model_len=32, dtype="float32")
    try:
        _schemathesis(srv, tmp_path, f'[auth.openapi.AdminKey]\nbearer = "{ADMIN}"\n' + _GENERATION_OPS)
    finally:
        _stop(srv)
        shutil.rmtree(tmp, ignore_errors=True)
