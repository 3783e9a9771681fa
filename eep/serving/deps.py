"""What every router of the HTTP API (`eep.serving.http`) shares: the instance they serve
(`Serving`), the key checks (`Auth`) and the one mapping of errors to OpenAI's error shape
(`ErrorMapper`).

The key checks are FastAPI dependencies, so /openapi.json declares them as security schemes;
the error mapper is the app's exception handlers, so a route raises (`ApiError`, `RequestError`,
`EngineUnavailable`, ...) and never builds an error reply itself.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from eep.engine.loop import EngineLoop
from eep.errors import EngineUnavailable, RequestError
from eep.serving.journal import RequestJournal

logger = logging.getLogger(__name__)

CALL_TIMEOUT_S = 60.0


# -- errors -----------------------------------------------------------------------------------
class ApiError(Exception):
    """An error reply of the handlers' own (the error mapper renders it)."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param
        self.headers = headers


def error_reply(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                param: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    """A reply in OpenAI's error shape `{"error": {"message", "type", "param", "code"}}`."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status,
                        headers=headers)


class ErrorMapper:
    """The app's exception handlers: every error any router raises, and routing's own (404,
    405, the body limit's 413), as OpenAI's error shape with its status."""

    def __init__(self, max_body_bytes: int) -> None:
        self.max_body_bytes = max_body_bytes

    def install(self, app: FastAPI) -> None:
        """The handlers on `app` (they are the app's: a router cannot have exception handlers)."""
        app.exception_handler(ApiError)(self.api_error)
        app.exception_handler(StarletteHTTPException)(self.http_error)
        app.exception_handler(RequestValidationError)(self.invalid)
        app.exception_handler(RequestError)(self.bad)
        app.exception_handler(EngineUnavailable)(self.unavailable)
        app.exception_handler(TimeoutError)(self.busy)
        app.exception_handler(Exception)(self.bug)

    async def api_error(self, request: Request, exc: ApiError) -> JSONResponse:
        return error_reply(exc.status, exc.message, exc.kind, exc.code, exc.param, exc.headers)

    async def http_error(self, request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # routing's 404 and 405 (with Allow), the body limit's 413: in OpenAI's shape too
        if exc.status_code == 404:
            message, code = f"no endpoint {request.url.path}: see /openapi.json", "not_found"
        elif exc.status_code == 405:
            allow = (exc.headers or {}).get("Allow", "")
            message = f"{request.method} is not allowed on {request.url.path}; allowed: {allow}"
            code = "method_not_allowed"
        elif exc.status_code == 413:
            message, code = f"the request body is larger than {self.max_body_bytes} bytes", "request_too_large"
        else:
            message, code = str(exc.detail), None
        return error_reply(exc.status_code, message, code=code, headers=exc.headers)

    async def invalid(self, request: Request, exc: RequestValidationError) -> JSONResponse:
        # 400, never FastAPI's 422
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return error_reply(400, f"{param or 'request'}: {first.get('msg')}", param=param)

    async def bad(self, request: Request, exc: RequestError) -> JSONResponse:
        return error_reply(400, str(exc))

    async def unavailable(self, request: Request, exc: EngineUnavailable) -> JSONResponse:
        return error_reply(503, str(exc), "server_error")

    async def busy(self, request: Request, exc: TimeoutError) -> JSONResponse:
        return error_reply(503, f"the engine did not answer within {CALL_TIMEOUT_S:g} s", "server_error")

    async def bug(self, request: Request, exc: Exception) -> JSONResponse:
        # a bug (undocumented: no route promises a 500): the client gets the error shape, the
        # traceback still goes to the log (Starlette re-raises to uvicorn after this reply)
        return error_reply(500, "internal server error: see the server's log", "server_error")


# -- keys -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Auth:
    """The key checks of the routers, as route dependencies: `inference` for every endpoint but
    /admin (empty without an API key), `admin` for /admin (the admin key only, or closed with
    403 when there is none). `keyed` and `admin_codes` are the statuses they add to a route's
    documentation."""

    inference: list[Any]
    admin: list[Any]
    keyed: tuple[int, ...]
    admin_codes: tuple[int, ...]

    @classmethod
    def of(cls, api_key: str | None, admin_api_key: str | None) -> Auth:
        if api_key is not None:
            inference = [Depends(_bearer(api_key, "ApiKey", "--api-key: every endpoint but /admin",
                                         "missing or wrong API key: send Authorization: Bearer KEY"))]
        else:
            inference = []
        keyed = (401,) if api_key is not None else ()
        if admin_api_key is None:
            return cls(inference, [Depends(_admin_closed)], keyed, (403,))
        admin = [Depends(_bearer(admin_api_key, "AdminKey", "--admin-api-key: the /admin endpoints",
                                 "missing or wrong admin key: send Authorization: Bearer ADMIN_KEY (the "
                                 "--admin-api-key of the server; the API key does not open /admin)"))]
        return cls(inference, admin, keyed, (400, 401, 409, 503))


def _bearer(key: str, scheme: str, description: str, message: str) -> Callable[..., Any]:
    """A dependency that wants `Authorization: Bearer key` (declared as security scheme `scheme`),
    compared in constant time."""
    bearer = HTTPBearer(auto_error=False, scheme_name=scheme, description=description)
    wanted = key.encode()

    async def check(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        if credentials is None or not hmac.compare_digest(credentials.credentials.encode(), wanted):
            raise ApiError(401, message, "authentication_error", "invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    return check


async def _admin_closed() -> None:
    raise ApiError(403, "the admin endpoints are disabled: start the server with --admin-api-key KEY (or "
                        "EEP_ADMIN_API_KEY) and send Authorization: Bearer KEY", "permission_error",
                   "admin_api_disabled")


# -- the instance -----------------------------------------------------------------------------
class Serving:
    """The engine the routers serve, as `model_name`, and its fixed limits. Everything that
    touches the engine goes through `on_loop` (the `EngineLoop`'s thread)."""

    def __init__(self, loop: EngineLoop, model_name: str, journal: RequestJournal | None = None,
                 feed: Any = None) -> None:
        self.loop, self.model_name = loop, model_name
        self.feed = feed  # the journal's replication to standby heads (eep.serving.replication), if any
        self.tokenizer = loop.engine.tokenizer  # immutable; encoding is thread-safe
        self.max_len = loop.engine.config.max_model_len
        self.vocab = loop.engine.model_config.vocab_size
        self.num_ranks = loop.engine.executor.num_ranks  # fixed for the instance's life
        self.journal = journal if journal is not None else RequestJournal()  # the requests admitted, by id (retries, resumed streams)

    def encode(self, prompt: str | list[int]) -> list[int]:
        """A prompt's token ids (text through the model's tokenizer)."""
        if not isinstance(prompt, str):
            return [int(t) for t in prompt]
        if self.tokenizer is None:
            raise RequestError(f"{self.loop.engine.config.model_path} has no tokenizer.json: pass token ids, not text")
        return self.tokenizer.encode(prompt)

    async def on_loop(self, fn: Any) -> Any:
        """`fn(engine)` run on the loop thread between steps (TimeoutError: it did not answer)."""
        return await asyncio.wait_for(asyncio.wrap_future(self.loop.call(fn)), CALL_TIMEOUT_S)

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise ApiError(404, f"model {name!r} does not exist; this server serves {self.model_name!r}",
                           code="model_not_found", param="model")

    def check_max_tokens(self, body: BaseModel, *names: str) -> None:
        # the bound /openapi.json states; checked for each field given, used or not
        for name in names:
            value = getattr(body, name)
            if value is not None and value > self.max_len - 1:
                raise ApiError(400, f"{name}: must be at most {self.max_len - 1} (the context length "
                                    f"{self.max_len} less one prompt token), got {value}", param=name)
