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
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import Future
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from eep.engine.loop import EngineLoop, TokenEvent
from eep.engine.request import RequestOutput
from eep.engine.sampling import SamplingParams
from eep.errors import ConfigError, EepError, EngineUnavailable, RequestError
from eep.serving.deps import Auth, Serving
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
    generate_codes = (400, *auth.keyed, 404, 413, 503)

    @r.get("/v1/models", response_model=None, responses={200: {"model": ModelList}, **errors(*auth.keyed)})
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": serving.model_name, "object": "model", "created": 0,
                                            "owned_by": "eep"}]}

    @r.post("/v1/completions", response_model=None, responses={
        200: {"model": Completion, "description": "The completion (`stream: false`) or its chunks as server-sent "
                                                  "events (`stream: true`)",
              "content": {"text/event-stream": sse(CompletionChunk)}},
        **errors(*generate_codes)})
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await _completions(serving, body, request)

    @r.post("/v1/chat/completions", response_model=None, responses={
        200: {"model": ChatCompletion, "description": "The reply (`stream: false`) or its chunks as server-sent "
                                                      "events (`stream: true`)",
              "content": {"text/event-stream": sse(ChatCompletionChunk)}},
        **errors(*generate_codes)})
    async def chat(body: ChatRequest, request: Request) -> Any:
        return await _chat(serving, body, request)

    return r


# -- completions ------------------------------------------------------------------------------
async def _completions(serving: Serving, body: CompletionRequest, request: Request) -> Any:
    """The reply to a completion request: the completion, or its stream."""
    serving.check_model(body.model)
    serving.check_max_tokens(body, "max_tokens")
    prompts = _prompts(body.prompt)
    params = _params(body.max_tokens, body.temperature, body.top_p, body.seed, ignore_eos=body.ignore_eos)
    created, rid = int(time.time()), f"cmpl-{uuid.uuid4().hex}"
    ids = body.return_token_ids
    if body.stream:
        return await _completion_stream(serving, prompts, params, created, rid, ids)
    outs = await _results([serving.loop.submit(p, params) for p in prompts], request, rid)
    if outs is None:
        return _gone()
    return {
        "id": rid, "object": "text_completion", "created": created, "model": serving.model_name,
        "choices": [{"index": i, "text": o.text or "", "finish_reason": o.finish_reason, "logprobs": None,
                     **({"prompt_token_ids": o.prompt_ids, "token_ids": o.output_ids} if ids else {})}
                    for i, o in enumerate(outs)],
        "usage": _usage(sum(len(o.prompt_ids) for o in outs), sum(len(o.output_ids) for o in outs)),
    }


async def _completion_stream(serving: Serving, prompts: list[Any], params: SamplingParams, created: int, rid: str,
                             ids: bool) -> StreamingResponse:
    """The chunks of a completion, prompt after prompt, as server-sent events (with the token
    ids when `ids`). The first event of each prompt is awaited before the 200 goes out, so
    that a request the engine refuses is still a 4xx."""
    streams = [_TokenStream(serving.loop, p, params) for p in prompts]
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
                                      "model": serving.model_name, "choices": [choice]})
                    if ev.finish_reason:
                        break
                    ev = await s.next()
        except EepError as e:  # the 200 went out: the error can only be an event
            yield _error_event(e)
            return
        yield b"data: [DONE]\n\n"

    return _EventStream(events(), streams, rid)


# -- chat -------------------------------------------------------------------------------------
async def _chat(serving: Serving, body: ChatRequest, request: Request) -> Any:
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
    created, rid = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
    if body.stream:
        return await _chat_stream(serving, ids, params, created, rid)
    outs = await _results([serving.loop.submit(ids, params)], request, rid)
    if outs is None:
        return _gone()
    out = outs[0]
    return {
        "id": rid, "object": "chat.completion", "created": created, "model": serving.model_name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text or ""},
                     "finish_reason": out.finish_reason, "logprobs": None}],
        "usage": _usage(len(out.prompt_ids), len(out.output_ids)),
    }


async def _chat_stream(serving: Serving, ids: list[int], params: SamplingParams, created: int,
                       rid: str) -> StreamingResponse:
    """The chunks of a chat reply as server-sent events: the role first, then the content (the
    first token awaited before the 200, like `_completion_stream`)."""
    stream = _TokenStream(serving.loop, ids, params)
    try:
        first = await stream.next()
    except BaseException:
        _close([stream], rid)
        raise

    def chunk(delta: dict[str, str], finish: str | None) -> bytes:
        return _event({"id": rid, "object": "chat.completion.chunk", "created": created, "model": serving.model_name,
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


# -- streams, disconnects -----------------------------------------------------------------------
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
