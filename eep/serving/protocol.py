"""The wire format of `eep serve`: one JSON object per line, each way (never pickle).

Requests and their replies, in order, on one connection:

    {"op": "generate", "prompts": [str | [int, ...], ...], "sampling_params": {...} | [{...}, ...]}
      -> {"ok": true, "outputs": [{"request_id", "prompt_ids", "output_ids", "finish_reason", "text"}, ...]}
    {"op": "status"}
      -> {"ok": true, "ep_size": N, "backend": "shm" | "gloo" | "local", "rank_pids": [...],
          "model_path": ..., "healthy": bool, "membership": {view, coverage, paused, degraded,
          repairs, events} | null}
    {"op": "rejoin", "rank": R}     (start a replacement for failed rank R)
      -> {"ok": true}
    anything that fails
      -> {"ok": false, "error": {"type": "RequestError", "message": "..."}}

`sampling_params` is optional (defaults), one object for every prompt, or one per prompt; its
keys are `SamplingParams` field names with JSON values of the field's type. Everything here is
pure (bytes and dicts in, dicts and exceptions out), shared by the server and `eep.Client`.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Sequence
from typing import Any

import eep.errors
from eep.engine.engine import Prompt
from eep.engine.request import RequestOutput
from eep.engine.sampling import SamplingParams
from eep.errors import ClientError, EepError, RequestError

OPS = ("generate", "status", "rejoin")
_GENERATE_KEYS = {"op", "prompts", "sampling_params"}
_PARAM_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}
_PARAM_HINTS = typing.get_type_hints(SamplingParams)


def encode(message: dict[str, Any]) -> bytes:
    """One message as a line: JSON escapes every newline inside strings, so `\\n` ends it."""
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    """A received line as a message object; `RequestError` if it is not a JSON object."""
    try:
        message = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"the message is not valid JSON ({e}); send one JSON object per line") from None
    if not isinstance(message, dict):
        raise RequestError(f"a message must be a JSON object, got {type(message).__name__}")
    return message


# -- requests -------------------------------------------------------------------------------
def generate_request(
    prompts: Sequence[Prompt], sampling_params: SamplingParams | Sequence[SamplingParams] | None
) -> dict[str, Any]:
    """The generate message for prompts and parameters given as to `eep.LLM.generate`."""
    message: dict[str, Any] = {"op": "generate", "prompts": [p if isinstance(p, str) else [int(t) for t in p] for p in prompts]}
    if isinstance(sampling_params, SamplingParams):
        message["sampling_params"] = dataclasses.asdict(sampling_params)
    elif sampling_params is not None:
        message["sampling_params"] = [dataclasses.asdict(sp) for sp in sampling_params]
    return message


def parse_generate(message: dict[str, Any]) -> tuple[list[Prompt], list[SamplingParams]]:
    """Prompts and one `SamplingParams` per prompt; `RequestError` naming the bad field."""
    unknown = sorted(set(message) - _GENERATE_KEYS)
    if unknown:
        raise RequestError(f"unknown field(s) {unknown} in a generate request; known: {sorted(_GENERATE_KEYS)}")
    prompts = message.get("prompts")
    if not isinstance(prompts, list):
        raise RequestError("'prompts' must be a list of prompts (strings or lists of token ids)")
    checked: list[Prompt] = [_prompt(i, p) for i, p in enumerate(prompts)]
    raw = message.get("sampling_params")
    if raw is None:
        params = [SamplingParams()] * len(checked)
    elif isinstance(raw, dict):
        params = [params_from_dict(raw)] * len(checked)
    elif isinstance(raw, list):
        if len(raw) != len(checked):
            raise RequestError(f"{len(checked)} prompts but {len(raw)} sampling parameter sets")
        params = [params_from_dict(d) for d in raw]
    else:
        raise RequestError("'sampling_params' must be an object or a list of objects, one per prompt")
    return checked, params


def _prompt(i: int, p: object) -> Prompt:
    if isinstance(p, str):
        return p
    if isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        return p
    raise RequestError(f"prompt {i} must be a string or a list of integer token ids, got {json.dumps(p)[:80]}")


def params_from_dict(d: object) -> SamplingParams:
    """`SamplingParams` from a JSON object, checking every name and value type."""
    if not isinstance(d, dict):
        raise RequestError(f"sampling parameters must be an object, got {type(d).__name__}")
    unknown = sorted(set(d) - _PARAM_FIELDS)
    if unknown:
        raise RequestError(f"unknown sampling parameter(s) {unknown}; known: {sorted(_PARAM_FIELDS)}")
    return SamplingParams(**{k: _typed(k, v, _PARAM_HINTS[k]) for k, v in d.items()})


def _typed(name: str, value: object, hint: object) -> object:
    """`value` as the field type `hint` (int, float, bool, X | None, tuple[X, ...]), or RequestError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _typed(name, value, inner)
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if origin is tuple and isinstance(value, list):
        return tuple(_typed(name, v, args[0]) for v in value)
    want = getattr(hint, "__name__", str(hint)) if origin is None else str(hint)
    raise RequestError(f"sampling parameter {name!r} must be {want}, got {json.dumps(value)[:80]}")


# -- replies --------------------------------------------------------------------------------
def outputs_reply(outputs: Sequence[RequestOutput]) -> dict[str, Any]:
    return {"ok": True, "outputs": [dataclasses.asdict(o) for o in outputs]}


def error_reply(error: BaseException) -> dict[str, Any]:
    return {"ok": False, "error": {"type": type(error).__name__, "message": str(error)}}


def parse_reply(message: dict[str, Any]) -> dict[str, Any]:
    """A successful reply as is; an error reply raised as its eep exception type."""
    if message.get("ok") is True:
        return message
    error = message.get("error")
    if message.get("ok") is not False or not isinstance(error, dict):
        raise ClientError(f"the server sent a malformed reply: {json.dumps(message)[:200]}")
    raise exception_from(str(error.get("type")), str(error.get("message")))


def exception_from(type_name: str, message: str) -> EepError:
    """The `eep.errors` exception named `type_name`, else a `ClientError` that names it."""
    cls = getattr(eep.errors, type_name, None)
    if isinstance(cls, type) and issubclass(cls, EepError):
        try:
            return cls(message)
        except TypeError:  # an exception with structured arguments (PeerTimeout, ...)
            pass
    return ClientError(f"server error {type_name}: {message}")


def outputs_from(message: dict[str, Any]) -> list[RequestOutput]:
    try:
        return [
            RequestOutput(o["request_id"], list(o["prompt_ids"]), list(o["output_ids"]), o["finish_reason"], o.get("text"))
            for o in message["outputs"]
        ]
    except (KeyError, TypeError) as e:
        raise ClientError(f"the server sent a malformed generate reply ({e!r})") from None
