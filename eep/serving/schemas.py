"""The request and reply models of the OpenAI-compatible API (`eep.serving.http`), and what
its /openapi.json says beyond them.

The request models are what the handlers validate (400 for anything they refuse). The reply
models are documentation only: the handlers build the same shapes as dicts, and schemathesis
(tests/test_http.py) checks that the two agree. A model's docstring is its schema's description
in the document. `document` makes FastAPI's generated document true to this server: no 422,
the chunks of the streams, the limits of this instance, the models' public names.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

logger = logging.getLogger(__name__)


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


# The `view` of /membership: named apart from `eep.membership.view.MembershipView` (the view
# itself) in Python; /openapi.json still calls it `MembershipView` (see `document`). No
# docstring: it would become the schema's description.
class MembershipViewModel(BaseModel):
    model_config = ConfigDict(extra="allow", title="MembershipView")

    epoch: int
    active: list[int]


class Membership(BaseModel):
    """The executor's status (`EPExecutor.status()`); its fields beyond `view` are documented in
    docs/failure-handling.md."""

    model_config = ConfigDict(extra="allow")

    view: MembershipViewModel


class AdminReply(BaseModel):
    ok: Literal[True]
    rank: int


class ScaleRequest(BaseModel):
    """`POST /admin/scale`: the number of active ranks to move to, within `--ep-max-size`. Send an
    `operation_id` of your own to retry safely: the same id gives the same operation."""

    model_config = ConfigDict(extra="forbid")

    ep_size: int = Field(ge=1, le=4096)
    operation_id: Text | None = Field(default=None, min_length=1, max_length=128)


class ScaleOperation(BaseModel):
    """A scale operation (`eep.control.scaling.ScaleOperation`): `state` running, done or failed;
    `phase` what it does now; `added` and `removed` the ranks it took in and out."""

    operation_id: str
    ep_size: int
    from_ep_size: int
    state: Literal["running", "done", "failed"]
    phase: str
    detail: str
    added: list[int]
    removed: list[int]
    created: float
    finished: float | None
    duration_s: float


# -- what /openapi.json says beyond the models -------------------------------------------------
_DESCRIPTIONS = {
    400: "Invalid request (wrong type, out of range, too long for the context)",
    401: "Missing or wrong key",
    403: "The admin endpoints are closed: the server has no --admin-api-key",
    404: "The model (or the scale operation) does not exist",
    409: "The instance's membership state refuses this change now",
    413: "The request body is larger than the server's limit",
    503: "The engine is unavailable (stopped after a failed step, shutting down, or not answering)",
}
_BEARER_CHALLENGE = {"WWW-Authenticate": {"description": "Bearer", "required": True, "schema": {"type": "string"}}}
# the Python name of a model -> its name in the document (where the two differ)
_PUBLIC_NAMES = {MembershipViewModel.__name__: "MembershipView"}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries of error statuses, all in OpenAI's error shape."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        # the content spelled out: a `model` would take the route's media type (text/plain on /metrics)
        out[code] = {"description": _DESCRIPTIONS[code],
                     "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
        if code == 401:
            out[code]["headers"] = _BEARER_CHALLENGE
    return out


def sse(chunk: type[BaseModel]) -> dict[str, Any]:
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


def document(schema: dict[str, Any], *, model_name: str, vocab: int, max_len: int) -> dict[str, Any]:
    """FastAPI's document made true to this server: no 422 (validation errors are 400 here), the
    chunks of the streams, the limits of this instance in the request schemas, and the models
    under their public names."""
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
    schema["components"]["schemas"] = {_PUBLIC_NAMES.get(k, k): v for k, v in components.items()}
    _rename_refs(schema, {f"#/components/schemas/{k}": f"#/components/schemas/{v}" for k, v in _PUBLIC_NAMES.items()})
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


def _rename_refs(node: Any, renamed: dict[str, str]) -> None:
    """Point every `$ref` under `node` that `renamed` names at its new target."""
    if isinstance(node, dict):
        if isinstance(ref := node.get("$ref"), str) and ref in renamed:
            node["$ref"] = renamed[ref]
        for child in node.values():
            _rename_refs(child, renamed)
    elif isinstance(node, list):
        for child in node:
            _rename_refs(child, renamed)
