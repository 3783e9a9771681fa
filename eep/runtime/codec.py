"""Typed control messages: msgspec's MessagePack, decoded into exactly the expected types.

What this module promises:
- `encode(message)` writes one message (a dataclass of this package's wire: every field
  typed) as the array `[its class name, its fields]`. No pickle anywhere: nothing a peer sends
  can name a class to build or code to run.
- `decode(data, protocol)` accepts only the classes of `protocol` (what one kind of peer may
  send at that point of a conversation). An unknown or unexpected class, a missing field or one
  of the wrong type, a tensor whose bytes do not fit its dtype and shape or of a dtype not
  allowed, a value a dataclass's own checks refuse (`__post_init__`: a `Placement`'s shapes, a
  `SamplingParams`' ranges), nesting too deep or data cut short: each raises `ProtocolError`,
  whose message names what was wrong.
- Tensors travel as `[dtype, shape, raw bytes]` (CPU, contiguous) and are decoded into new,
  writable CPU tensors; the receiver moves them where it computes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import msgspec
import torch

from eep.errors import EepError
from eep.security.channel import ProtocolError

_DTYPES = {name: getattr(torch, name) for name in ("bool", "uint8", "int32", "int64", "float16", "bfloat16", "float32")}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_MAX_DIMS = 8
_envelope = msgspec.msgpack.Decoder(tuple[str, msgspec.Raw])


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        if t.dtype not in _NAMES:
            raise TypeError(f"tensors of dtype {t.dtype} are not sent on the control plane")
        return [_NAMES[t.dtype], list(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes()]
    raise NotImplementedError(f"{type(obj).__name__} is not a wire type")


def _dec_hook(typ: type, obj: Any) -> Any:
    if typ is torch.Tensor:
        return _tensor(obj)
    raise NotImplementedError(f"{typ.__name__} is not a wire type")


def _tensor(obj: Any) -> torch.Tensor:
    if not (isinstance(obj, (list, tuple)) and len(obj) == 3):
        raise ValueError("a tensor is [dtype, shape, bytes]")
    name, shape, data = obj
    if name not in _DTYPES:
        raise ValueError(f"tensor dtype {name!r} is not allowed")
    if not (isinstance(shape, (list, tuple)) and len(shape) <= _MAX_DIMS
            and all(type(d) is int and d >= 0 for d in shape)):
        raise ValueError(f"a tensor's shape must be at most {_MAX_DIMS} non-negative ints")
    if not isinstance(data, bytes):
        raise ValueError("a tensor's data must be bytes")
    dtype = _DTYPES[name]
    numel = math.prod(shape)
    if numel * dtype.itemsize != len(data):
        raise ValueError(f"a {name} tensor of shape {list(shape)} needs {numel * dtype.itemsize} bytes, "
                         f"got {len(data)}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)


class Protocol:
    """The message classes one kind of peer may send at one point of a conversation."""

    def __init__(self, name: str, classes: Iterable[type]) -> None:
        self.name = name
        self.classes = {cls.__name__: cls for cls in classes}
        self._decoders = {tag: msgspec.msgpack.Decoder(cls, dec_hook=_dec_hook) for tag, cls in self.classes.items()}

    def __repr__(self) -> str:
        return f"Protocol({self.name}: {', '.join(self.classes)})"

    def decode(self, data: bytes) -> Any:
        try:
            tag, body = _envelope.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as e:
            raise ProtocolError(f"{self.name}: not a message ({_why(e)})") from None
        decoder = self._decoders.get(tag)
        if decoder is None:
            raise ProtocolError(f"{self.name}: unexpected message type {tag[:64]!r} (expected one of "
                                f"{', '.join(self.classes)})")
        try:
            return decoder.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, ValueError, TypeError, EepError) as e:
            raise ProtocolError(f"{self.name}: a malformed {tag}: {_why(e)}") from None


def _why(e: BaseException) -> str:
    return str(e)[:300] or type(e).__name__


def encode(message: object) -> bytes:
    return msgspec.msgpack.encode((type(message).__name__, message), enc_hook=_enc_hook)


def decode(data: bytes, protocol: Protocol) -> Any:
    return protocol.decode(data)
