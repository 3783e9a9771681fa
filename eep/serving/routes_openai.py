"""The OpenAI endpoints of the HTTP API (`eep.serving.http`): `POST /v1/completions` and
`POST /v1/chat/completions` (with `stream: true` as server-sent events) and `GET /v1/models`.

Requests go to the engine through the `EngineLoop` (`submit`); a stream reads its tokens as the
loop commits them. A request whose client goes away (a stream closed early, or the connection
dropped while a non-streaming request runs) is aborted at the next step boundary and frees its
KV slot; that is one INFO line, never an error. A stream that fails after its 200 ends with one
`data: {"error": ...}` event; before it, errors are raised to the app's error mapper.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

from eep.engine.sampling import SamplingParams
from eep.errors import ConfigError, EepError, EngineUnavailable, RequestError
from eep.serving.deps import ApiError, Auth, Serving
from eep.serving.journal import Choice, Entry, StreamEvent, digest, parse_event_id
from eep.serving.schemas import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatMessage,
    ChatRequest,
    Completion,
    CompletionChunk,
    CompletionRequest,
    ModelList,
    errors,
    sse,
)

logger = logging.getLogger(__name__)

CHATML = ("<|im_start|>", "<|im_end|>")


def chat_prompt(messages: list[ChatMessage]) -> str:
    """ChatML (the default model's vocabulary has its markers): each message, then the
    assistant's turn opened. Generation stops at `<|im_end|>`."""
    start, end = CHATML
    turns = "".join(f"{start}{m.role}\n{m.content}{end}\n" for m in messages)
    return f"{turns}{start}assistant\n"


def router(serving: Serving, auth: Auth) -> APIRouter:
    """The routes of `/v1/...` for `serving`."""
    r = APIRouter(dependencies=auth.inference)
    generate_codes = (400, *auth.keyed, 404, 409, 413, 503)

    @r.get("/v1/models", response_model=None, responses={200: {"model": ModelList}, **errors(*auth.keyed)})
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": serving.model_name, "object": "model", "created": 0,
                                            "owned_by": "eep"}]}

    @r.post("/v1/completions", response_model=None, responses={
        200: {"model": Completion, "description": "The completion (`stream: false`) or its chunks as server-sent "
                                                  "events (`stream: true`)",
              "content": {"text/event-stream": sse(CompletionChunk)}},
        **errors(*generate_codes)})
    async def completions(body: CompletionRequest, request: Request, response: Response) -> Any:
        return await _completions(serving, body, request, response)

    @r.post("/v1/chat/completions", response_model=None, responses={
        200: {"model": ChatCompletion, "description": "The reply (`stream: false`) or its chunks as server-sent "
                                                      "events (`stream: true`)",
              "content": {"text/event-stream": sse(ChatCompletionChunk)}},
        **errors(*generate_codes)})
    async def chat(body: ChatRequest, request: Request, response: Response) -> Any:
        return await _chat(serving, body, request, response)

    return r


# -- completions ------------------------------------------------------------------------------
async def _completions(serving: Serving, body: CompletionRequest, request: Request, response: Response) -> Any:
    """The reply to a completion request: the completion, or its stream."""
    serving.check_model(body.model)
    serving.check_max_tokens(body, "max_tokens")
    params = _params(body.max_tokens, body.temperature, body.top_p, body.seed, ignore_eos=body.ignore_eos)
    entry, after = _admit(serving, request, "completion", body, [(p, params) for p in _prompts(body.prompt)])
    ids = body.return_token_ids
    if body.stream:
        return await _completion_stream(serving, entry, after, ids)
    response.headers["X-Request-Id"] = entry.rid
    if not await _finished(entry, request):
        return _gone()
    outs = [c.output for c in entry.choices]
    return {
        "id": entry.rid, "object": "text_completion", "created": entry.created, "model": serving.model_name,
        "choices": [{"index": i, "text": o.text or "", "finish_reason": o.finish_reason, "logprobs": None,
                     **({"prompt_token_ids": o.prompt_ids, "token_ids": o.output_ids} if ids else {})}
                    for i, o in enumerate(outs) if o is not None],
        "usage": _usage(sum(len(o.prompt_ids) for o in outs if o), sum(len(o.output_ids) for o in outs if o)),
    }


async def _completion_stream(serving: Serving, entry: Entry, after: int | None, ids: bool) -> StreamingResponse:
    """The chunks of a completion, prompt after prompt, as server-sent events (with the token
    ids when `ids`), each with its id `<request id>:<tokens of the stream through it>`; from
    after token `after` when resumed. A new request's first events are awaited before the 200
    goes out, so that a request the engine refuses is still a 4xx."""
    await _started(entry)

    def chunk(i: int, ev: StreamEvent) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": i, "text": ev.text, "finish_reason": ev.finish_reason, "logprobs": None}
        if ids:
            choice["token_ids"] = list(ev.token_ids)
        return {"id": entry.rid, "object": "text_completion", "created": entry.created, "model": serving.model_name,
                "choices": [choice]}

    async def events() -> AsyncIterator[bytes]:
        async for i, ev, end in _follow(entry, after or 0):
            if ev.text or ev.finish_reason or (ids and ev.token_ids):
                yield _event(chunk(i, ev), f"{entry.rid}:{end}")

    return _EventStream(_ended(entry, events()), entry)


# -- chat -------------------------------------------------------------------------------------
async def _chat(serving: Serving, body: ChatRequest, request: Request, response: Response) -> Any:
    """The reply to a chat request: the assistant's message, or its stream."""
    serving.check_model(body.model)
    serving.check_max_tokens(body, "max_tokens", "max_completion_tokens")
    tokenizer = serving.tokenizer
    end_id = tokenizer.token_id(CHATML[1]) if tokenizer is not None else None
    if tokenizer is None or end_id is None or tokenizer.token_id(CHATML[0]) is None:
        raise RequestError("this model has no chat template (no ChatML markers in its vocabulary); "
                           "use /v1/completions")
    ids = tokenizer.encode(chat_prompt(body.messages))
    limit = body.max_completion_tokens or body.max_tokens or max(1, serving.max_len - len(ids))
    params = _params(limit, body.temperature, body.top_p, body.seed, stop_token_ids=[end_id])
    entry, after = _admit(serving, request, "chat", body, [(ids, params)])
    if body.stream:
        return await _chat_stream(serving, entry, after)
    response.headers["X-Request-Id"] = entry.rid
    if not await _finished(entry, request):
        return _gone()
    out = entry.choices[0].output
    assert out is not None
    return {
        "id": entry.rid, "object": "chat.completion", "created": entry.created, "model": serving.model_name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text or ""},
                     "finish_reason": out.finish_reason, "logprobs": None}],
        "usage": _usage(len(out.prompt_ids), len(out.output_ids)),
    }


async def _chat_stream(serving: Serving, entry: Entry, after: int | None) -> StreamingResponse:
    """The chunks of a chat reply as server-sent events: the role first (id `<request id>:0`),
    then the content (ids and the first token awaited as `_completion_stream`'s)."""
    await _started(entry)

    def chunk(delta: dict[str, str], finish: str | None, end: int) -> bytes:
        return _event({"id": entry.rid, "object": "chat.completion.chunk", "created": entry.created,
                       "model": serving.model_name,
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]},
                      f"{entry.rid}:{end}")

    async def events() -> AsyncIterator[bytes]:
        if after is None:  # a resumed stream had its role chunk (every event id is past it)
            yield chunk({"role": "assistant", "content": ""}, None, 0)
        async for _, ev, end in _follow(entry, after or 0):
            if ev.text or ev.finish_reason:
                yield chunk({"content": ev.text} if ev.text else {}, ev.finish_reason, end)

    return _EventStream(_ended(entry, events()), entry)


# -- admission: new, retried and resumed requests -----------------------------------------------
def _admit(serving: Serving, request: Request, kind: str, body: BaseModel,
           prompts: list[tuple[Any, SamplingParams]]) -> tuple[Entry, int | None]:
    """The journal's entry of this request and, for a stream resumed with `Last-Event-ID`, the
    token index to go on after. A request id (`X-Request-Id`, `Idempotency-Key` or the one in
    `Last-Event-ID`) that the journal knows gives its entry (the same body required: 409
    otherwise), admitted again from its committed tokens if it is not running (its client went
    away); an unknown one in `Last-Event-ID` is 404. Anything else is a new request."""
    resume = request.headers.get("last-event-id")
    after: int | None = None
    named = request.headers.get("x-request-id") or request.headers.get("idempotency-key")
    if resume is not None:
        parsed = parse_event_id(resume)
        if parsed is None:
            raise ApiError(400, f"Last-Event-ID: expected <request id>:<token index>, got {resume[:80]!r}")
        named, after = parsed
    if named is not None and not (0 < len(named) <= 128 and named.isprintable() and named.isascii()):
        raise ApiError(400, "a request id must be 1 to 128 printable ASCII characters")
    who = digest(body.model_dump(exclude={"stream"}))
    journal = serving.journal
    if named is not None and (entry := journal.get(named)) is not None:
        if entry.digest != who or entry.kind != kind:
            raise ApiError(409, f"request id {named!r} names another request (a different body)",
                           code="request_id_conflict")
        if entry.error is None:
            if entry.interrupted:
                entry.submit(serving.loop, resume=True)
            entry.clients += 1
            return entry, after
        journal.remove(entry)  # it failed here: a retry runs it again
    if resume is not None:
        raise ApiError(404, f"request {named!r} is not known here (finished long ago, or never admitted); send it "
                            "again without Last-Event-ID", code="request_not_found")
    rid = named or f"{'cmpl' if kind == 'completion' else 'chatcmpl'}-{uuid.uuid4().hex}"
    choices = [Choice(serving.encode(p), _seeded(params)) for p, params in prompts]
    entry = journal.add(Entry(rid, kind, who, int(time.time()), choices))
    if entry.choices is choices:
        entry.submit(serving.loop, resume=False)
    entry.clients += 1
    return entry, after


def _seeded(params: SamplingParams) -> SamplingParams:
    """`params` with a seed (one drawn now if the client gave none): part of the durable state, so
    that the request goes on identically wherever it is admitted again."""
    return params if params.seed is not None else replace(params, seed=random.SystemRandom().randrange(2**31))


# -- following an entry: streams, waits, disconnects ----------------------------------------------
async def _started(entry: Entry) -> None:
    """Until every choice sent its first event (a new request's validation error is raised here,
    before the 200), or ended."""
    try:
        for i in range(len(entry.choices)):
            stream = entry.follow(i)
            try:
                async for _ in stream:
                    break
            finally:
                await stream.aclose()
    except BaseException:
        _release(entry)
        raise


async def _follow(entry: Entry, after: int) -> AsyncIterator[tuple[int, StreamEvent, int]]:
    """Every choice's events in stream order (choice after choice) with the stream's tokens
    through each, from after token `after`."""
    base = 0
    for i, choice in enumerate(entry.choices):
        async for ev in entry.follow(i):
            if base + ev.end > after:
                yield i, ev, base + ev.end
        if not choice.finished:  # it stopped running unfinished (the server stops): no [DONE]
            return
        base += len(choice.output_ids)


async def _ended(entry: Entry, events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """`events`, then `[DONE]` once every choice finished, or the error as the last event."""
    try:
        async for ev in events:
            yield ev
    except EepError as e:  # the 200 went out: the error can only be an event
        yield _error_event(e)
        return
    except Exception as e:  # a failed step's error
        yield _error_event(_as_eep_error(e))  # type: ignore[arg-type]
        return
    if entry.finished:
        yield b"data: [DONE]\n\n"


def _release(entry: Entry) -> None:
    """One client of `entry` is gone; with the last one, what still runs of it is aborted (a
    stream closed early, a client that hung up): it can be resumed from its committed tokens."""
    entry.clients -= 1
    if entry.clients > 0:
        return
    aborted = sum(c.future.cancel() for c in entry.choices if c.future is not None and c.running)
    if aborted:
        logger.info("%s: the client went away; aborted %d unfinished request(s)", entry.rid, aborted)


class _EventStream(StreamingResponse):
    """Server-sent events of `entry`. However the response ends (done, the client went away,
    the server stops), this client is released then, not when the generator is collected."""

    def __init__(self, events: AsyncIterator[bytes], entry: Entry) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Request-Id": entry.rid})
        self._entry = entry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            _release(self._entry)


async def _finished(entry: Entry, request: Request) -> bool:
    """Until `entry` finished (True; its error raised), or the client went away first (False)."""
    waiting = asyncio.ensure_future(entry.wait())
    gone = asyncio.ensure_future(_disconnected(request.receive))
    for w in (waiting, gone):  # an error nobody awaits any more is not "never retrieved" (an ERROR log)
        w.add_done_callback(_retrieve)
    try:
        done, _ = await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
        if waiting in done:
            waiting.result()
        if (error := entry.error) is not None:
            raise _as_eep_error(error)
        return waiting in done and entry.finished
    finally:
        gone.cancel()
        waiting.cancel()
        _release(entry)


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


def _as_eep_error(e: BaseException) -> BaseException:
    """A request's error as the client may see it: its own (`EepError`), or a failed step's
    (anything else), which stopped the engine: 503, not a 500 with the step's traceback."""
    if isinstance(e, EepError) or not isinstance(e, Exception):
        return e
    return EngineUnavailable(f"the engine stopped after a failed step ({e}); restart the instance to serve again")


def _event(payload: dict[str, Any], event_id: str | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}data: {json.dumps(payload)}\n\n".encode()


def _error_event(e: EepError) -> bytes:
    kind = "server_error" if isinstance(e, EngineUnavailable) else "invalid_request_error"
    logger.info("a stream ended with an error after its 200: %s", e)
    return _event({"error": {"message": str(e), "type": kind, "param": None, "code": None}})


# -- requests to the engine -------------------------------------------------------------------
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
