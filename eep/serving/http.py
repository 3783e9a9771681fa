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

This module assembles the app: the routers of `routes_openai`, `routes_health` and
`routes_admin`, the key checks and the error mapper they share (`deps`), the body limit, and
the document (`schemas.document`).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from eep.engine.loop import EngineLoop
from eep.serving import routes_admin, routes_health, routes_openai
from eep.serving.deps import Auth, ErrorMapper, Serving
from eep.serving.journal import RequestJournal
from eep.serving.replication import JournalFeed
from eep.serving.schemas import document

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 16 * 2**20


def create_app(loop: EngineLoop, *, model_name: str, api_key: str | None = None, admin_api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, journal: RequestJournal | None = None,
               feed: JournalFeed | None = None) -> Any:
    """The ASGI app serving `loop`'s engine as `model_name`; `journal`: the requests it admits (one
    of its own by default), replicated by `feed` to standby heads."""
    serving = Serving(loop, model_name, journal if journal is not None else RequestJournal(), feed)
    auth = Auth.of(api_key, admin_api_key)
    app = FastAPI(title="eep", version="1", description="OpenAI-compatible API of an elastic expert-parallel "
                  "MoE instance")
    app.add_middleware(_BodyLimit, max_bytes=max_body_bytes)
    ErrorMapper(max_body_bytes).install(app)
    for routes in (routes_openai, routes_health, routes_admin):
        app.include_router(routes.router(serving, auth))

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document(
                get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes),
                model_name=model_name, vocab=serving.vocab, max_len=serving.max_len,
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


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
