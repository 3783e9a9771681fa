"""OpenAI-compatible HTTP frontend of `eep serve --http` (FastAPI on uvicorn).

Endpoints: `POST /v1/completions` (with `stream: true` as server-sent events), `GET /v1/models`,
`GET /health` (200 while serving; 503 with the reason while admission is paused or the engine
stopped), `GET /membership` (view, coverage, repairs and recent events of an expert-parallel
instance), `POST /admin/ranks/{rank}/rejoin` and `POST /admin/ranks/{rank}/drain` (graceful
removal at the next step boundary). With an API key every endpoint wants
`Authorization: Bearer KEY` and answers 401 without it. Errors have OpenAI's shape:
`{"error": {"message", "type", "param", "code"}}`, 4xx for the request's fault.

Everything that touches the engine goes through the `EngineLoop` (its own thread); a rank
failure is repaired under the loop and is seen by clients only as a pause.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from eep.engine.loop import EngineLoop, TokenEvent
from eep.engine.sampling import SamplingParams
from eep.errors import ConfigError, EngineUnavailable, RequestError

logger = logging.getLogger(__name__)

_CALL_TIMEOUT_S = 60.0


StrictInt = Annotated[int, Field(strict=True)]
Number = Annotated[float, Field(strict=True)]  # JSON ints and floats, never strings


class CompletionRequest(BaseModel):
    """The fields of OpenAI's completion request that eep honours; unknown fields are ignored,
    known ones must have their type."""

    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use

    model: str
    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]]
    max_tokens: StrictInt = 16
    temperature: Number = 1.0
    top_p: Number = 1.0
    seed: StrictInt | None = None
    stream: bool = False
    n: Literal[1] = 1
    stop: None = None  # stop strings are not supported yet: refused rather than ignored
    # vLLM's extensions: run to max_tokens past EOS; return the generated token ids (per chunk)
    ignore_eos: bool = False
    return_token_ids: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: StrictInt | None = None  # None: up to the context length
    max_completion_tokens: StrictInt | None = None
    temperature: Number = 1.0
    top_p: Number = 1.0
    seed: StrictInt | None = None
    stream: bool = False
    n: Literal[1] = 1
    stop: None = None


CHATML = ("<|im_start|>", "<|im_end|>")


def chat_prompt(messages: list[ChatMessage]) -> str:
    """ChatML (the default model's vocabulary has its markers): each message, then the
    assistant's turn opened. Generation stops at `<|im_end|>`."""
    start, end = CHATML
    turns = "".join(f"{start}{m.role}\n{m.content}{end}\n" for m in messages)
    return f"{turns}{start}assistant\n"


def create_app(loop: EngineLoop, *, model_name: str, api_key: str | None = None) -> Any:
    """The ASGI app serving `loop`'s engine as `model_name`."""

    def error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
              param: str | None = None) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)

    async def authorized(request: Request) -> None:
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            raise _Unauthorized()

    app = FastAPI(title="eep", dependencies=[Depends(authorized)])

    @app.exception_handler(_Unauthorized)
    async def _unauthorized(request: Request, exc: _Unauthorized) -> JSONResponse:
        return error(401, "missing or wrong API key: send Authorization: Bearer KEY", "authentication_error",
                     "invalid_api_key")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return error(400, f"{param or 'request'}: {first.get('msg')}", param=param)

    @app.exception_handler(RequestError)
    async def _bad(request: Request, exc: RequestError) -> JSONResponse:
        return error(400, str(exc))

    @app.exception_handler(EngineUnavailable)
    async def _unavailable(request: Request, exc: EngineUnavailable) -> JSONResponse:
        return error(503, str(exc), "server_error")

    async def on_loop(fn: Any) -> Any:
        return await asyncio.wait_for(asyncio.wrap_future(loop.call(fn)), _CALL_TIMEOUT_S)

    @app.get("/health")
    async def health() -> JSONResponse:
        if not loop.healthy:
            return JSONResponse({"status": "unavailable", "reason": str(loop.error or "the engine loop is closed")}, 503)
        paused = await on_loop(lambda e: e.paused_reason)
        if paused:
            return JSONResponse({"status": "paused", "reason": paused}, 503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "eep"}]}

    @app.get("/membership")
    async def membership() -> dict[str, Any]:
        status = await on_loop(lambda e: e.executor.status() if hasattr(e.executor, "status") else None)
        if status is None:
            return {"view": {"epoch": 0, "active": [0]}, "coverage": None, "events": []}
        return status  # type: ignore[no-any-return]

    async def admin(action: str, rank: int) -> dict[str, Any]:
        def run(e: Any) -> None:
            if not hasattr(e.executor, action):
                raise RequestError(f"{action} needs an expert-parallel instance (--ep-size > 1)")
            try:
                getattr(e.executor, action)(rank)
            except ConfigError as err:
                raise RequestError(str(err)) from None

        await on_loop(run)
        return {"ok": True, "rank": rank}

    @app.post("/admin/ranks/{rank}/rejoin")
    async def rejoin(rank: int) -> dict[str, Any]:
        return await admin("rejoin", rank)

    @app.post("/admin/ranks/{rank}/drain")
    async def drain(rank: int) -> dict[str, Any]:
        return await admin("drain", rank)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Any:
        if body.model != model_name:
            return error(404, f"model {body.model!r} does not exist; this server serves {model_name!r}",
                         code="model_not_found", param="model")
        prompts = _prompts(body.prompt)
        params = _params(body.max_tokens, body.temperature, body.top_p, body.seed, ignore_eos=body.ignore_eos)
        created, rid = int(time.time()), f"cmpl-{uuid.uuid4().hex}"
        ids = body.return_token_ids
        if not body.stream:
            futures = [loop.submit(p, params) for p in prompts]
            outs = [await asyncio.wrap_future(f) for f in futures]
            return {
                "id": rid, "object": "text_completion", "created": created, "model": model_name,
                "choices": [{"index": i, "text": o.text or "", "finish_reason": o.finish_reason, "logprobs": None,
                             **({"prompt_token_ids": o.prompt_ids, "token_ids": o.output_ids} if ids else {})}
                            for i, o in enumerate(outs)],
                "usage": _usage(sum(len(o.prompt_ids) for o in outs), sum(len(o.output_ids) for o in outs)),
            }
        queues = [_stream(loop, p, params) for p in prompts]
        first = [await q.__anext__() for q in queues]  # validation errors surface here as 4xx

        async def events() -> AsyncIterator[bytes]:
            try:
                for i, (q, ev) in enumerate(zip(queues, first)):
                    while True:
                        if ev.text or ev.finish_reason or (ids and ev.token_ids):
                            choice = {"index": i, "text": ev.text, "finish_reason": ev.finish_reason,
                                      "logprobs": None}
                            if ids:
                                choice["token_ids"] = list(ev.token_ids)
                            chunk = {"id": rid, "object": "text_completion", "created": created,
                                     "model": model_name, "choices": [choice]}
                            yield f"data: {json.dumps(chunk)}\n\n".encode()
                        if ev.finish_reason:
                            break
                        ev = await q.__anext__()
                yield b"data: [DONE]\n\n"
            finally:  # also when the client went away: abort what is still running
                for q in queues:
                    await q.aclose()

        return StreamingResponse(events(), media_type="text/event-stream")

    tokenizer = loop.engine.tokenizer  # immutable; encoding is thread-safe
    max_len = loop.engine.config.max_model_len

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest) -> Any:
        if body.model != model_name:
            return error(404, f"model {body.model!r} does not exist; this server serves {model_name!r}",
                         code="model_not_found", param="model")
        end_id = tokenizer.token_id(CHATML[1]) if tokenizer is not None else None
        if tokenizer is None or end_id is None or tokenizer.token_id(CHATML[0]) is None:
            return error(400, "this model has no chat template (no ChatML markers in its vocabulary); "
                              "use /v1/completions")
        ids = tokenizer.encode(chat_prompt(body.messages))
        limit = body.max_completion_tokens or body.max_tokens or max(1, max_len - len(ids))
        params = _params(limit, body.temperature, body.top_p, body.seed, stop_token_ids=[end_id])
        created, rid = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
        if not body.stream:
            out = await asyncio.wrap_future(loop.submit(ids, params))
            return {
                "id": rid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text or ""},
                             "finish_reason": out.finish_reason, "logprobs": None}],
                "usage": _usage(len(out.prompt_ids), len(out.output_ids)),
            }
        stream = _stream(loop, ids, params)
        first = await stream.__anext__()

        def chunk(delta: dict[str, str], finish: str | None) -> bytes:
            body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
            return f"data: {json.dumps(body)}\n\n".encode()

        async def events() -> AsyncIterator[bytes]:
            try:
                yield chunk({"role": "assistant", "content": ""}, None)
                ev = first
                while True:
                    if ev.text or ev.finish_reason:
                        yield chunk({"content": ev.text} if ev.text else {}, ev.finish_reason)
                    if ev.finish_reason:
                        break
                    ev = await stream.__anext__()
                yield b"data: [DONE]\n\n"
            finally:  # also when the client went away: abort the request
                await stream.aclose()

        return StreamingResponse(events(), media_type="text/event-stream")

    metrics = _Metrics(loop)

    @app.get("/metrics")
    async def prometheus() -> Any:
        from fastapi.responses import Response

        snapshot = await on_loop(_snapshot)
        return Response(metrics.render(snapshot, loop.queued), media_type="text/plain; version=0.0.4")

    return app


def _snapshot(engine: Any) -> dict[str, Any]:
    """What /metrics reports, read on the loop thread between steps."""
    ex = engine.executor
    status = ex.status() if hasattr(ex, "status") else None
    return {
        "tokens": engine.tokens_committed,
        "running": sum(len(s.running) for s in engine.schedulers),
        "waiting": sum(len(s.waiting) for s in engine.schedulers),
        "epoch": status["view"]["epoch"] if status else 0,
        "active": len(status["view"]["active"]) if status else 1,
        "repairs": status["repairs"] if status else [],
    }


class _Metrics:
    """Prometheus metrics of one server (its own registry, not the process-global one)."""

    _PAUSE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

    def __init__(self, loop: EngineLoop) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.tokens = Counter("eep_generated_tokens", "Tokens committed", registry=r)
        self.running = Gauge("eep_running_requests", "Requests running (admitted, holding a KV slot)", registry=r)
        self.waiting = Gauge("eep_queued_requests", "Requests waiting for admission", registry=r)
        self.epoch = Gauge("eep_membership_epoch", "Committed membership epoch", registry=r)
        self.active = Gauge("eep_active_ranks", "Ranks in the view", registry=r)
        self.repaired = Counter("eep_repaired_experts", "Experts served again after a failure, by tier", ["tier"],
                                registry=r)
        self.step = Histogram("eep_step_seconds", "Wall time of one engine step", registry=r,
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0))
        self.recovery = Histogram("eep_recovery_pause_seconds", "Repair time after a failure (view change to "
                                  "new tables)", buckets=self._PAUSE_BUCKETS, registry=r)
        self.rejoin = Histogram("eep_rejoin_pause_seconds", "Time healthy ranks pause to switch a rank in",
                                buckets=self._PAUSE_BUCKETS, registry=r)
        self._seen_tokens = 0
        self._seen_repairs: set[tuple[int, str]] = set()
        loop.on_step = self.step.observe

    def render(self, snap: dict[str, Any], queued: int) -> bytes:
        from prometheus_client import generate_latest

        self.tokens.inc(max(0, snap["tokens"] - self._seen_tokens))
        self._seen_tokens = snap["tokens"]
        self.running.set(snap["running"])
        self.waiting.set(snap["waiting"] + queued)
        self.epoch.set(snap["epoch"])
        self.active.set(snap["active"])
        for rec in snap["repairs"]:
            key = (int(rec["epoch"]), "rejoin" if "rejoined" in rec else "repair")
            if key in self._seen_repairs:
                continue
            self._seen_repairs.add(key)
            if key[1] == "rejoin":
                self.rejoin.observe(float(rec["pause_s"]))
            else:
                self.recovery.observe(float(rec["total_s"]))
                self.repaired.labels(tier="1").inc(int(rec["tier1_experts"]))
                self.repaired.labels(tier="2").inc(int(rec["tier2_experts"]))
        return generate_latest(self.registry)


class _Unauthorized(Exception):
    pass


def _prompts(prompt: Any) -> list[Any]:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and isinstance(prompt[0], int):
        return [list(prompt)]
    if not prompt:
        raise RequestError("prompt: must not be empty")
    return list(prompt)


def _params(
    max_tokens: int, temperature: float, top_p: float, seed: int | None, stop_token_ids: list[int] | None = None,
    ignore_eos: bool = False,
) -> SamplingParams:
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                              stop_token_ids=tuple(stop_token_ids or ()), ignore_eos=ignore_eos)
    except (ValueError, RequestError, ConfigError) as e:
        raise RequestError(str(e)) from None


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _stream(loop: EngineLoop, prompt: Any, params: SamplingParams) -> AsyncIterator[TokenEvent]:
    """The request's text deltas as they are committed; raises its validation error first."""
    aio = asyncio.get_running_loop()
    queue: asyncio.Queue[TokenEvent | BaseException] = asyncio.Queue()
    future = loop.submit(prompt, params, on_tokens=lambda ev: aio.call_soon_threadsafe(queue.put_nowait, ev))
    future.add_done_callback(
        lambda f: aio.call_soon_threadsafe(queue.put_nowait, f.exception()) if f.exception() is not None else None
    )
    try:
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason:
                return
    finally:
        future.cancel()  # closed before its end (the client went away): the loop aborts the request
