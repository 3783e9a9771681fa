"""OpenAI-compatible HTTP frontend of `eep serve --http` (FastAPI on uvicorn).

Endpoints: `POST /v1/completions` and `POST /v1/chat/completions` (with `stream: true` as
server-sent events), `GET /v1/models`, `GET /health` (200 while serving; 503 with the reason
while admission is paused or the engine stopped), `GET /metrics` (Prometheus text),
`GET /membership` (view, coverage, repairs and recent events of an expert-parallel instance),
`POST /admin/ranks/{rank}/rejoin` and `POST /admin/ranks/{rank}/drain` (graceful removal at the
next step boundary).

Guarantees:
- Keys: with an API key (`--api-key`) every endpoint but the admin ones wants
  `Authorization: Bearer KEY` and answers 401 without it. The admin endpoints want the admin key
  (`--admin-api-key`) instead, and only it: 401 without it or with any other key (the API key
  included); with no admin key configured they are closed to everyone (403). Keys are compared
  in constant time. `/openapi.json` and `/docs` need no key.
- Errors have OpenAI's shape `{"error": {"message", "type", "param", "code"}}`: 400 an invalid
  request (never FastAPI's 422), 401/403 as above, 404 an unknown model or path, 405 a method
  the path does not have (with `Allow`), 409 a membership change the instance's state refuses,
  413 a body over `max_body_bytes` (refused by its Content-Length before it is read, else as it
  arrives, so no body larger than that is ever buffered), 503 the engine is unavailable (also
  for the requests of a step that failed); a 500 only for a bug (its traceback goes to the log).
  A stream that fails after its 200 ends with one `data: {"error": ...}` event.
- `/openapi.json` documents each of these statuses for every route that can answer it, the
  request limits of this instance (the served model's name, the vocabulary, the context length),
  `/metrics` as text/plain and streams as text/event-stream with their chunks' schemas
  (checked by schemathesis in tests/test_http.py).
- A request whose client goes away (a stream closed early, or the connection dropped while a
  non-streaming request runs) is aborted at the next step boundary and frees its KV slot; that
  is one INFO line, never an error.

Everything that touches the engine goes through the `EngineLoop` (its own thread); a rank
failure is repaired under the loop and is seen by clients only as a pause.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from eep.engine.loop import EngineLoop, TokenEvent
from eep.engine.request import RequestOutput
from eep.engine.sampling import SamplingParams
from eep.errors import ConfigError, EepError, EngineUnavailable, RequestError

logger = logging.getLogger(__name__)

_CALL_TIMEOUT_S = 60.0
DEFAULT_MAX_BODY_BYTES = 16 * 2**20


# -- requests ---------------------------------------------------------------------------------
def _valid_unicode(text: str) -> str:
    # JSON may carry lone surrogates ("\ud800"); the tokenizer cannot encode them
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("not valid Unicode text (a lone surrogate)") from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]
TokenId = Annotated[int, Field(strict=True, ge=0)]  # the upper bound (the vocabulary) is the instance's
Count = Annotated[int, Field(strict=True, ge=1)]
Seed = Annotated[int, Field(strict=True)]
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]  # JSON ints and floats, never strings
Flag = Annotated[bool, Field(strict=True)]  # true or false, never 0, 1 or "yes"


class CompletionRequest(BaseModel):
    """The fields of OpenAI's completion request that eep honours; unknown fields are ignored,
    known ones must have their type. The prompt's tokens plus `max_tokens` must fit the context
    length (400 otherwise: a limit in tokens, which no schema of the text can state)."""

    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use

    model: str
    prompt: (Annotated[Text, Field(min_length=1)] | Annotated[list[TokenId], Field(min_length=1)]
             | Annotated[list[Annotated[Text, Field(min_length=1)]], Field(min_length=1)]
             | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)])
    max_tokens: Count = 16
    temperature: Annotated[Number, Field(ge=0, le=100)] = 1.0
    top_p: Annotated[Number, Field(gt=0, le=1)] = 1.0
    seed: Seed | None = None
    stream: Flag = False
    n: Literal[1] = 1
    stop: None = None  # stop strings are not supported yet: refused rather than ignored
    # vLLM's extensions: run to max_tokens past EOS; return the generated token ids (per chunk)
    ignore_eos: Flag = False
    return_token_ids: Flag = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: Text


class ChatRequest(BaseModel):
    """OpenAI's chat request, as far as eep honours it (like `CompletionRequest`)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Count | None = None  # None: up to the context length
    max_completion_tokens: Count | None = None
    temperature: Annotated[Number, Field(ge=0, le=100)] = 1.0
    top_p: Annotated[Number, Field(gt=0, le=1)] = 1.0
    seed: Seed | None = None
    stream: Flag = False
    n: Literal[1] = 1
    stop: None = None


CHATML = ("<|im_start|>", "<|im_end|>")


def chat_prompt(messages: list[ChatMessage]) -> str:
    """ChatML (the default model's vocabulary has its markers): each message, then the
    assistant's turn opened. Generation stops at `<|im_end|>`."""
    start, end = CHATML
    turns = "".join(f"{start}{m.role}\n{m.content}{end}\n" for m in messages)
    return f"{turns}{start}assistant\n"


# -- replies (what /openapi.json documents; the handlers build the same shapes as dicts) -------
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error shape."""

    error: ErrorDetail


FinishReason = Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason
    logprobs: None
    prompt_token_ids: list[int] | None = None  # with return_token_ids
    token_ids: list[int] | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: None
    token_ids: list[int] | None = None  # with return_token_ids


class CompletionChunk(BaseModel):
    """One `data:` event of a completion stream (`data: [DONE]` ends it)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None  # the first chunk only
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: FinishReason | None
    logprobs: None


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a chat stream (`data: [DONE]` ends it)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "paused", "unavailable"]
    reason: str | None = None  # why not "ok"


class MembershipView(BaseModel):
    model_config = ConfigDict(extra="allow")

    epoch: int
    active: list[int]


class Membership(BaseModel):
    """The executor's status (`EPExecutor.status()`); its fields beyond `view` are documented in
    docs/failure-handling.md."""

    model_config = ConfigDict(extra="allow")

    view: MembershipView


class AdminReply(BaseModel):
    ok: Literal[True]
    rank: int


_DESCRIPTIONS = {
    400: "Invalid request (wrong type, out of range, too long for the context)",
    401: "Missing or wrong key",
    403: "The admin endpoints are closed: the server has no --admin-api-key",
    404: "The model does not exist",
    409: "The instance's membership state refuses this change now",
    413: "The request body is larger than the server's limit",
    503: "The engine is unavailable (stopped after a failed step, shutting down, or not answering)",
}
_BEARER_CHALLENGE = {"WWW-Authenticate": {"description": "Bearer", "required": True, "schema": {"type": "string"}}}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries of error statuses, all in OpenAI's error shape."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        # the content spelled out: a `model` would take the route's media type (text/plain on /metrics)
        out[code] = {"description": _DESCRIPTIONS[code],
                     "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
        if code == 401:
            out[code]["headers"] = _BEARER_CHALLENGE
    return out


def _sse(chunk: type[BaseModel]) -> dict[str, Any]:
    """The text/event-stream entry of a streaming reply: each event's data is one JSON `chunk`,
    an error (after which the stream ends) or, last, `[DONE]`."""
    return {"schema": {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"anyOf": [
            {"const": "[DONE]"},
            {"type": "string", "contentMediaType": "application/json",
             "contentSchema": {"anyOf": [{"$ref": f"#/components/schemas/{chunk.__name__}"},
                                         {"$ref": "#/components/schemas/ErrorResponse"}]}},
        ]}},
    }}


# -- the app ----------------------------------------------------------------------------------
class _ApiError(Exception):
    """An error reply of the handlers' own (the exception handler renders it)."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param
        self.headers = headers


def _error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
           param: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status,
                        headers=headers)


def _bearer(key: str, scheme: str, description: str, message: str) -> Callable[..., Any]:
    """A dependency that wants `Authorization: Bearer key` (declared as security scheme `scheme`)."""
    bearer = HTTPBearer(auto_error=False, scheme_name=scheme, description=description)
    wanted = key.encode()

    async def check(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if credentials is None or not hmac.compare_digest(credentials.credentials.encode(), wanted):
            raise _ApiError(401, message, "authentication_error", "invalid_api_key",
                            headers={"WWW-Authenticate": "Bearer"})

    return check


async def _admin_closed() -> None:
    raise _ApiError(403, "the admin endpoints are disabled: start the server with --admin-api-key KEY (or "
                         "EEP_ADMIN_API_KEY) and send Authorization: Bearer KEY", "permission_error",
                    "admin_api_disabled")


def create_app(loop: EngineLoop, *, model_name: str, api_key: str | None = None, admin_api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> Any:
    """The ASGI app serving `loop`'s engine as `model_name`."""
    tokenizer = loop.engine.tokenizer  # immutable; encoding is thread-safe
    max_len = loop.engine.config.max_model_len
    vocab = loop.engine.model_config.vocab_size
    num_ranks = loop.engine.executor.num_ranks  # fixed for the instance's life

    if api_key is not None:
        inference = [Depends(_bearer(api_key, "ApiKey", "--api-key: every endpoint but /admin",
                                     "missing or wrong API key: send Authorization: Bearer KEY"))]
    else:
        inference = []
    keyed = (401,) if api_key is not None else ()
    if admin_api_key is not None:
        admin_auth = [Depends(_bearer(admin_api_key, "AdminKey", "--admin-api-key: the /admin endpoints",
                                      "missing or wrong admin key: send Authorization: Bearer ADMIN_KEY (the "
                                      "--admin-api-key of the server; the API key does not open /admin)"))]
        admin_codes: tuple[int, ...] = (400, 401, 409, 503)
    else:
        admin_auth, admin_codes = [Depends(_admin_closed)], (403,)

    app = FastAPI(title="eep", version="1", description="OpenAI-compatible API of an elastic expert-parallel "
                  "MoE instance")
    app.add_middleware(_BodyLimit, max_bytes=max_body_bytes)

    @app.exception_handler(_ApiError)
    async def _api_error(request: Request, exc: _ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.kind, exc.code, exc.param, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # routing's 404 and 405 (with Allow), the body limit's 413: in OpenAI's shape too
        if exc.status_code == 404:
            message, code = f"no endpoint {request.url.path}: see /openapi.json", "not_found"
        elif exc.status_code == 405:
            allow = (exc.headers or {}).get("Allow", "")
            message = f"{request.method} is not allowed on {request.url.path}; allowed: {allow}"
            code = "method_not_allowed"
        elif exc.status_code == 413:
            message, code = f"the request body is larger than {max_body_bytes} bytes", "request_too_large"
        else:
            message, code = str(exc.detail), None
        return _error(exc.status_code, message, code=code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return _error(400, f"{param or 'request'}: {first.get('msg')}", param=param)

    @app.exception_handler(RequestError)
    async def _bad(request: Request, exc: RequestError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(EngineUnavailable)
    async def _unavailable(request: Request, exc: EngineUnavailable) -> JSONResponse:
        return _error(503, str(exc), "server_error")

    @app.exception_handler(TimeoutError)
    async def _busy(request: Request, exc: TimeoutError) -> JSONResponse:
        return _error(503, f"the engine did not answer within {_CALL_TIMEOUT_S:g} s", "server_error")

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        # a bug (undocumented: no route promises a 500): the client gets the error shape, the
        # traceback still goes to the log (Starlette re-raises to uvicorn after this reply)
        return _error(500, "internal server error: see the server's log", "server_error")

    async def on_loop(fn: Any) -> Any:
        return await asyncio.wait_for(asyncio.wrap_future(loop.call(fn)), _CALL_TIMEOUT_S)

    def check_model(name: str) -> None:
        if name != model_name:
            raise _ApiError(404, f"model {name!r} does not exist; this server serves {model_name!r}",
                            code="model_not_found", param="model")

    def check_max_tokens(body: BaseModel, *names: str) -> None:
        # the bound /openapi.json states; checked for each field given, used or not
        for name in names:
            value = getattr(body, name)
            if value is not None and value > max_len - 1:
                raise _ApiError(400, f"{name}: must be at most {max_len - 1} (the context length {max_len} less "
                                     f"one prompt token), got {value}", param=name)

    @app.get("/health", response_model=None, dependencies=inference, responses={
        200: {"model": Health, "description": "Serving"},
        503: {"model": Health, "description": "Not serving: admission paused (e.g. experts without a live "
                                              "replica) or the engine stopped; `reason` says why"},
        **_errors(*keyed)})
    async def health() -> JSONResponse:
        if not loop.healthy:
            reason = str(loop.error or "the engine loop is closed")
            return JSONResponse({"status": "unavailable", "reason": reason}, 503)
        try:
            paused = await on_loop(lambda e: e.paused_reason)
        except (EngineUnavailable, TimeoutError) as e:
            return JSONResponse({"status": "unavailable", "reason": str(e) or "the engine did not answer"}, 503)
        if paused:
            return JSONResponse({"status": "paused", "reason": paused}, 503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models", response_model=None, dependencies=inference,
             responses={200: {"model": ModelList}, **_errors(*keyed)})
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "eep"}]}

    @app.get("/membership", response_model=None, dependencies=inference,
             responses={200: {"model": Membership}, **_errors(*keyed, 503)})
    async def membership() -> dict[str, Any]:
        status = await on_loop(lambda e: e.executor.status() if hasattr(e.executor, "status") else None)
        if status is None:
            return {"view": {"epoch": 0, "active": [0]}, "coverage": None, "events": []}
        return status  # type: ignore[no-any-return]

    async def admin(action: str, rank: int) -> dict[str, Any]:
        def run(e: Any) -> None:
            if not hasattr(e.executor, action):
                raise _ApiError(409, f"{action} needs an expert-parallel instance (--ep-size > 1)",
                                code="membership_conflict")
            try:
                getattr(e.executor, action)(rank)
            except ConfigError as err:  # the state refuses it now (not failed, the last rank, ...)
                raise _ApiError(409, str(err), code="membership_conflict") from None

        await on_loop(run)
        return {"ok": True, "rank": rank}

    rank_param = Path(ge=0, le=num_ranks - 1, description=f"a rank of this instance (0..{num_ranks - 1})")
    admin_responses: dict[int | str, dict[str, Any]] = {200: {"model": AdminReply}, **_errors(*admin_codes)}

    @app.post("/admin/ranks/{rank}/rejoin", response_model=None, dependencies=admin_auth, responses=admin_responses,
              summary="Start a replacement for a failed rank (switched in once it has loaded)")
    async def rejoin(rank: int = rank_param) -> dict[str, Any]:
        return await admin("rejoin", rank)

    @app.post("/admin/ranks/{rank}/drain", response_model=None, dependencies=admin_auth, responses=admin_responses,
              summary="Take an active rank out gracefully at the next step boundary")
    async def drain(rank: int = rank_param) -> dict[str, Any]:
        return await admin("drain", rank)

    generate_codes = (400, *keyed, 404, 413, 503)

    @app.post("/v1/completions", response_model=None, dependencies=inference, responses={
        200: {"model": Completion, "description": "The completion (`stream: false`) or its chunks as server-sent "
                                                  "events (`stream: true`)",
              "content": {"text/event-stream": _sse(CompletionChunk)}},
        **_errors(*generate_codes)})
    async def completions(body: CompletionRequest, request: Request) -> Any:
        check_model(body.model)
        check_max_tokens(body, "max_tokens")
        prompts = _prompts(body.prompt)
        params = _params(body.max_tokens, body.temperature, body.top_p, body.seed, ignore_eos=body.ignore_eos)
        created, rid = int(time.time()), f"cmpl-{uuid.uuid4().hex}"
        ids = body.return_token_ids
        if not body.stream:
            outs = await _results([loop.submit(p, params) for p in prompts], request, rid)
            if outs is None:
                return _gone()
            return {
                "id": rid, "object": "text_completion", "created": created, "model": model_name,
                "choices": [{"index": i, "text": o.text or "", "finish_reason": o.finish_reason, "logprobs": None,
                             **({"prompt_token_ids": o.prompt_ids, "token_ids": o.output_ids} if ids else {})}
                            for i, o in enumerate(outs)],
                "usage": _usage(sum(len(o.prompt_ids) for o in outs), sum(len(o.output_ids) for o in outs)),
            }
        streams = [_TokenStream(loop, p, params) for p in prompts]
        try:
            first = [await s.next() for s in streams]  # validation errors surface here as 4xx
        except BaseException:
            _close(streams, rid)
            raise

        async def events() -> AsyncIterator[bytes]:
            try:
                for i, (s, ev) in enumerate(zip(streams, first)):
                    while True:
                        if ev.text or ev.finish_reason or (ids and ev.token_ids):
                            choice: dict[str, Any] = {"index": i, "text": ev.text, "finish_reason": ev.finish_reason,
                                                      "logprobs": None}
                            if ids:
                                choice["token_ids"] = list(ev.token_ids)
                            yield _event({"id": rid, "object": "text_completion", "created": created,
                                          "model": model_name, "choices": [choice]})
                        if ev.finish_reason:
                            break
                        ev = await s.next()
            except EepError as e:  # the 200 went out: the error can only be an event
                yield _error_event(e)
                return
            yield b"data: [DONE]\n\n"

        return _EventStream(events(), streams, rid)

    @app.post("/v1/chat/completions", response_model=None, dependencies=inference, responses={
        200: {"model": ChatCompletion, "description": "The reply (`stream: false`) or its chunks as server-sent "
                                                      "events (`stream: true`)",
              "content": {"text/event-stream": _sse(ChatCompletionChunk)}},
        **_errors(*generate_codes)})
    async def chat(body: ChatRequest, request: Request) -> Any:
        check_model(body.model)
        check_max_tokens(body, "max_tokens", "max_completion_tokens")
        end_id = tokenizer.token_id(CHATML[1]) if tokenizer is not None else None
        if tokenizer is None or end_id is None or tokenizer.token_id(CHATML[0]) is None:
            raise RequestError("this model has no chat template (no ChatML markers in its vocabulary); "
                               "use /v1/completions")
        ids = tokenizer.encode(chat_prompt(body.messages))
        limit = body.max_completion_tokens or body.max_tokens or max(1, max_len - len(ids))
        params = _params(limit, body.temperature, body.top_p, body.seed, stop_token_ids=[end_id])
        created, rid = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
        if not body.stream:
            outs = await _results([loop.submit(ids, params)], request, rid)
            if outs is None:
                return _gone()
            out = outs[0]
            return {
                "id": rid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text or ""},
                             "finish_reason": out.finish_reason, "logprobs": None}],
                "usage": _usage(len(out.prompt_ids), len(out.output_ids)),
            }
        stream = _TokenStream(loop, ids, params)
        try:
            first = await stream.next()
        except BaseException:
            _close([stream], rid)
            raise

        def chunk(delta: dict[str, str], finish: str | None) -> bytes:
            return _event({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                           "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]})

        async def events() -> AsyncIterator[bytes]:
            try:
                yield chunk({"role": "assistant", "content": ""}, None)
                ev = first
                while True:
                    if ev.text or ev.finish_reason:
                        yield chunk({"content": ev.text} if ev.text else {}, ev.finish_reason)
                    if ev.finish_reason:
                        break
                    ev = await stream.next()
            except EepError as e:
                yield _error_event(e)
                return
            yield b"data: [DONE]\n\n"

        return _EventStream(events(), [stream], rid)

    metrics = _Metrics(loop)

    @app.get("/metrics", dependencies=inference, response_class=PlainTextResponse, responses={
        200: {"description": "Prometheus text exposition format",
              "content": {"text/plain": {"schema": {"type": "string"}}}},
        **_errors(*keyed, 503)})
    async def prometheus() -> Response:
        snapshot = await on_loop(_snapshot)
        return Response(metrics.render(snapshot, loop.queued), media_type="text/plain; version=0.0.4")

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _document(
                get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes),
                model_name=model_name, vocab=vocab, max_len=max_len,
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _document(schema: dict[str, Any], *, model_name: str, vocab: int, max_len: int) -> dict[str, Any]:
    """FastAPI's document made true to this server: no 422 (validation errors are 400 here), the
    chunks of the streams, and the limits of this instance in the request schemas."""
    for path in schema["paths"].values():
        for operation in path.values():
            operation["responses"].pop("422", None)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    for model in (CompletionChunk, ChatCompletionChunk, ErrorResponse):
        js = model.model_json_schema(ref_template="#/components/schemas/{model}", mode="serialization")
        components.update(js.pop("$defs", {}))
        components[model.__name__] = js
    for name in ("CompletionRequest", "ChatRequest"):
        props = components[name]["properties"]
        props["model"]["enum"] = [model_name]
        props["model"]["description"] = "the served model (GET /v1/models); another one is 404"
        for field in ("max_tokens", "max_completion_tokens"):
            if field in props:
                _set_int_bound(props[field], "minimum", 1, "maximum", max_len - 1)
    _set_int_bound(components["CompletionRequest"]["properties"]["prompt"], "minimum", 0, "maximum", vocab - 1)
    return schema


def _set_int_bound(node: Any, have: str, value: int, bound: str, limit: int) -> None:
    """Give every integer schema under `node` whose `have` is `value` the bound `bound: limit`."""
    if isinstance(node, dict):
        if node.get("type") == "integer" and node.get(have) == value:
            node[bound] = limit
        for child in node.values():
            _set_int_bound(child, have, value, bound, limit)
    elif isinstance(node, list):
        for child in node:
            _set_int_bound(child, have, value, bound, limit)


# -- streams, disconnects, the body limit -------------------------------------------------------
class _TokenStream:
    """One streaming request: its `TokenEvent`s in order. `close()` aborts it unless it ended
    (synchronous and idempotent, so any way out of a response can call it)."""

    def __init__(self, loop: EngineLoop, prompt: Any, params: SamplingParams) -> None:
        self._aio = asyncio.get_running_loop()
        self._queue: asyncio.Queue[TokenEvent | BaseException] = asyncio.Queue()
        self.ended = False
        self.future = loop.submit(prompt, params, on_tokens=self._post)
        self.future.add_done_callback(self._done)

    def _post(self, item: TokenEvent | BaseException) -> None:  # any thread
        try:
            self._aio.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed (the server stopped): nobody reads any more
            pass

    def _done(self, f: Future[RequestOutput]) -> None:
        # Also runs when close() cancels the future: a cancelled future has no error to hand on
        # (asking it for one would raise CancelledError inside this callback)
        if not f.cancelled() and (error := f.exception()) is not None:
            self._post(error)

    async def next(self) -> TokenEvent:
        """The next event; raises the request's error (the first event: its validation error)."""
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.ended = True
            raise _as_eep_error(item)
        if item.finish_reason:
            self.ended = True
        return item

    def close(self) -> bool:
        """Abort the request unless it ended; True if it was still running."""
        if self.ended:
            return False
        self.ended = True
        return self.future.cancel()


def _close(streams: list[_TokenStream], rid: str) -> None:
    aborted = sum(s.close() for s in streams)
    if aborted:
        logger.info("%s: the client went away; aborted %d unfinished request(s)", rid, aborted)


class _EventStream(StreamingResponse):
    """Server-sent events of `streams`. However the response ends (done, the client went away,
    the server stops), what still runs of them is aborted then, not when the generator is
    collected."""

    def __init__(self, events: AsyncIterator[bytes], streams: list[_TokenStream], rid: str) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._streams, self._rid = streams, rid

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            _close(self._streams, self._rid)


async def _results(futures: list[Future[RequestOutput]], request: Request, rid: str) -> list[RequestOutput] | None:
    """The outputs of `futures`, or None if the client went away first. However this ends, what
    still runs is aborted (the client hung up, another prompt failed, the server stops)."""
    wrapped = [asyncio.wrap_future(f) for f in futures]
    gone = asyncio.ensure_future(_disconnected(request.receive))
    for w in (*wrapped, gone):  # an error nobody awaits any more is not "never retrieved" (an ERROR log)
        w.add_done_callback(_retrieve)
    waiting = set(wrapped)
    try:
        while waiting:
            done, _ = await asyncio.wait({*waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
            if gone in done:
                aborted = sum(f.cancel() for f in futures)
                logger.info("%s: the client went away; aborted %d unfinished request(s)", rid, aborted)
                return None
            for w in done:
                waiting.discard(w)
                if (error := w.exception()) is not None:
                    raise _as_eep_error(error)
        return [w.result() for w in wrapped]
    finally:
        gone.cancel()
        for f in futures:
            f.cancel()


def _retrieve(f: asyncio.Future[Any]) -> None:
    if not f.cancelled():
        f.exception()


def _gone() -> Response:
    """The reply to a client that went away: nobody receives it (nginx's "client closed request")."""
    return Response(status_code=499)


async def _disconnected(receive: Receive) -> None:
    """Returns once the client closed the connection (the body has been read: nothing else comes)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class _BodyLimit:
    """ASGI middleware: a request body over `max_bytes` is refused with 413 when the app reads it:
    at once if its Content-Length says so, else as soon as the bytes received pass the limit.
    Endpoints without a body never read one, so they never answer 413."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        received = 0

        async def limited() -> Message:
            nonlocal received
            if declared is not None and received == 0 and declared.isdigit() and int(declared) > self.max_bytes:
                raise StarletteHTTPException(413)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise StarletteHTTPException(413)
            return message

        await self.app(scope, limited, send)


def _as_eep_error(e: BaseException) -> BaseException:
    """A request's error as the client may see it: its own (`EepError`), or a failed step's
    (anything else), which stopped the engine: 503, not a 500 with the step's traceback."""
    if isinstance(e, EepError) or not isinstance(e, Exception):
        return e
    return EngineUnavailable(f"the engine stopped after a failed step ({e}); restart the instance to serve again")


def _event(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


def _error_event(e: EepError) -> bytes:
    kind = "server_error" if isinstance(e, EngineUnavailable) else "invalid_request_error"
    logger.info("a stream ended with an error after its 200: %s", e)
    return _event({"error": {"message": str(e), "type": kind, "param": None, "code": None}})


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
        "accounting": status.get("accounting") if status else None,
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
        # eep.runtime.accounting: what elastic membership costs while serving, against all the work
        self.bookkeeping = Counter("eep_bookkeeping_cpu_seconds", "CPU time of elastic-membership bookkeeping "
                                   "(heartbeats, their checks, step-boundary membership work, repair planning)",
                                   ["what"], registry=r)
        self.cpu = Counter("eep_cpu_seconds", "CPU time of the controller process and every rank process",
                           registry=r)
        self._seen_cpu: dict[str, float] = {}
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
        if (acct := snap.get("accounting")) is not None:
            for what, seconds in [*acct["bookkeeping_cpu_s"].items(), ("", acct["cpu_s"])]:
                grew = seconds - self._seen_cpu.get(what, 0.0)
                self._seen_cpu[what] = seconds
                (self.bookkeeping.labels(what=what) if what else self.cpu).inc(max(0.0, grew))
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
