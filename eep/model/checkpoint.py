"""Validated, memory-mapped read access to a Hugging Face safetensors checkpoint directory.

What this module promises:

* Everything that can be checked without reading tensor data is checked when a
  `CheckpointReader` is built: the directory, `config.json`, the shard index, every shard's
  header (parsed here, not by safetensors), each tensor's byte length against its shape and
  dtype, and every file's size against its header (a truncated download is caught before a
  single weight is read).
* Every problem surfaces as a subclass of `eep.errors.CheckpointError` whose message names
  the file and the tensor at fault and says what was expected and what was found.
* Tensors are read through `safetensors.safe_open`, so they are memory-mapped and a file is
  opened at most once (lazily) until `close()`.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from eep.errors import CheckpointCorrupt, CheckpointFileMissing, TensorMismatch

logger = logging.getLogger(__name__)

FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)

CONFIG_NAME = "config.json"
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# safetensors dtype tag -> (bits per element, torch dtype attribute or None where torch has none)
_DTYPES: dict[str, tuple[int, str | None]] = {
    "BOOL": (8, "bool"), "U8": (8, "uint8"), "I8": (8, "int8"),
    "F8_E4M3": (8, "float8_e4m3fn"), "F8_E5M2": (8, "float8_e5m2"),
    "F8_E8M0": (8, "float8_e8m0fnu"),
    "F4": (4, None), "F6_E2M3": (6, None), "F6_E3M2": (6, None),
    "I16": (16, "int16"), "U16": (16, "uint16"), "F16": (16, "float16"), "BF16": (16, "bfloat16"),
    "I32": (32, "int32"), "U32": (32, "uint32"), "F32": (32, "float32"),
    "I64": (64, "int64"), "U64": (64, "uint64"), "F64": (64, "float64"), "C64": (64, "complex64"),
}  # fmt: skip

@dataclass(frozen=True, slots=True)
class _TensorInfo:
    """Where a tensor lives and what its shard header says about it."""

    file: Path
    dtype: str  # safetensors tag, e.g. "BF16"
    shape: tuple[int, ...]


def _torch_dtype(tag: str) -> torch.dtype | None:
    attr = _DTYPES[tag][1]
    return getattr(torch, attr, None) if attr else None


def _load_json(path: Path, what: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointFileMissing(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointCorrupt(f"cannot read {what} {path}: {exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointCorrupt(
            f"{what} {path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from exc


def _check_entry(path: Path, name: str, entry: Any) -> tuple[_TensorInfo, int]:
    """Validate one header entry; return its info and the end of its data section."""
    where = f"safetensors file {path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise CheckpointCorrupt(f"{where} has a header entry that is not an object: {entry!r}")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _DTYPES:
        raise CheckpointCorrupt(f"{where} has unknown dtype {dtype!r}; known: {sorted(_DTYPES)}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise CheckpointCorrupt(f"{where} has invalid shape {shape!r} (want a list of ints >= 0)")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise CheckpointCorrupt(f"{where} has invalid data_offsets {offsets!r} (want [begin, end])")
    expected = math.prod(shape) * _DTYPES[dtype][0] // 8
    if offsets[1] - offsets[0] != expected:
        raise CheckpointCorrupt(
            f"{where} spans {offsets[1] - offsets[0]} bytes but shape {shape} of {dtype} "
            f"needs {expected} bytes"
        )
    return _TensorInfo(path, dtype, tuple(shape)), offsets[1]


def _read_header(path: Path) -> dict[str, _TensorInfo]:
    """Parse and validate the header of the safetensors file `path` without reading its data."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointCorrupt(
                    f"safetensors file {path} is {size} bytes, too small to hold a header"
                )
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > size - 8:
                raise CheckpointCorrupt(
                    f"safetensors file {path} declares a {header_len}-byte header but the file "
                    f"is only {size} bytes; it is not a safetensors file or is badly truncated"
                )
            raw = f.read(header_len)
    except FileNotFoundError:
        raise CheckpointFileMissing(f"safetensors file {path} does not exist") from None
    except OSError as exc:
        raise CheckpointCorrupt(f"cannot read safetensors file {path}: {exc}") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointCorrupt(
            f"safetensors file {path} has a header that is not valid JSON: {exc}"
        ) from exc
    if not isinstance(header, dict):
        raise CheckpointCorrupt(f"safetensors file {path} has a header that is not a JSON object")
    infos: dict[str, _TensorInfo] = {}
    data_end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        infos[name], end = _check_entry(path, name, entry)
        data_end = max(data_end, end)
    expected_size = 8 + header_len + data_end
    if expected_size > size:
        raise CheckpointCorrupt(
            f"safetensors file {path} looks truncated (an interrupted download or copy?): "
            f"its header implies {expected_size} bytes but the file has {size} bytes; "
            "download or copy it again"
        )
    return infos


class CheckpointReader:
    """Memory-mapped, validated read access to a Hugging Face checkpoint directory.

    All validation happens in the constructor; `get` only re-checks what the caller expects
    (shape, dtype) against the already parsed headers before touching any data.
    """

    def __init__(self, model_dir: str | os.PathLike[str]) -> None:
        path = Path(model_dir).expanduser()
        if not path.is_dir():
            what = "is not a directory" if path.exists() else "does not exist"
            raise CheckpointFileMissing(f"checkpoint directory {path} {what}")
        self.model_dir: Path = path.resolve()
        config = _load_json(self.model_dir / CONFIG_NAME, "model config")
        if not isinstance(config, dict):
            raise CheckpointCorrupt(
                f"model config {self.model_dir / CONFIG_NAME} must be a JSON object, "
                f"found {type(config).__name__}"
            )
        self.config: dict[str, Any] = config
        self._tensors: dict[str, _TensorInfo] = self._scan()
        self._handles: dict[Path, Any] = {}
        n_files = len({info.file for info in self._tensors.values()})
        logger.info("checkpoint %s: %d tensors in %d files", self.model_dir, len(self), n_files)

    # ---- construction-time validation -------------------------------------------------

    def _scan(self) -> dict[str, _TensorInfo]:
        index, single = self.model_dir / INDEX_NAME, self.model_dir / SINGLE_NAME
        if index.is_file():
            return self._scan_index(index)
        if single.is_file():
            return _read_header(single)
        raise CheckpointFileMissing(self._no_weights_message())

    def _no_weights_message(self) -> str:
        msg = (
            f"no safetensors weights were found in {self.model_dir} "
            f"(expected {SINGLE_NAME} or {INDEX_NAME})"
        )
        others = sorted(p.name for p in self.model_dir.glob("*.safetensors"))
        if others:
            msg += f"; found other safetensors files {others} but no index naming them"
        if any(self.model_dir.glob("pytorch_model*.bin")):
            msg += "; pytorch_model*.bin checkpoints are not supported, convert them to safetensors"
        return msg

    def _scan_index(self, index: Path) -> dict[str, _TensorInfo]:
        data = _load_json(index, "checkpoint index")
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise CheckpointCorrupt(
                f"checkpoint index {index} has no 'weight_map' object mapping tensor names "
                "to shard file names"
            )
        by_shard: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            by_shard.setdefault(shard, []).append(name)
        for shard, names in sorted(by_shard.items()):
            if not (self.model_dir / shard).is_file():
                raise CheckpointFileMissing(
                    f"shard {shard} listed in {index} is missing from {self.model_dir} "
                    f"(it should hold {len(names)} tensors, e.g. {names[0]!r})"
                )
        tensors: dict[str, _TensorInfo] = {}
        for shard, names in sorted(by_shard.items()):
            header = _read_header(self.model_dir / shard)
            for name in names:
                if name not in header:
                    raise TensorMismatch(
                        f"tensor {name!r} is mapped to shard {self.model_dir / shard} by {index}, "
                        f"but that shard's header does not contain it"
                    )
                tensors[name] = header[name]
        return tensors

    # ---- read access ---------------------------------------------------------------------

    def keys(self) -> list[str]:
        """Every tensor name in the checkpoint, sorted."""
        return sorted(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    def file_of(self, name: str) -> Path:
        """The safetensors file that holds tensor `name`."""
        return self._info(name).file

    def _info(self, name: str) -> _TensorInfo:
        info = self._tensors.get(name)
        if info is None:
            msg = f"tensor {name!r} is missing from checkpoint {self.model_dir}"
            close = difflib.get_close_matches(name, self._tensors, n=3)
            if close:
                msg += f"; did you mean {', '.join(close)}?"
            raise TensorMismatch(msg)
        return info

    def get(
        self,
        name: str,
        *,
        shape: Sequence[int] | None = None,
        dtypes: tuple[torch.dtype, ...] | None = FLOAT_DTYPES,
    ) -> torch.Tensor:
        """Return tensor `name` (memory-mapped, CPU, dtype as stored).

        shape: the exact shape the caller expects, or None to accept any.
        dtypes: the dtypes the caller accepts, or None to accept any.
        Both are checked against the shard header before any data is read.
        """
        info = self._info(name)
        if shape is not None and tuple(shape) != info.shape:
            raise TensorMismatch(
                f"tensor {name!r} in {info.file} has shape {list(info.shape)}, "
                f"expected {list(shape)}"
            )
        found = _torch_dtype(info.dtype)
        if dtypes is not None and found not in dtypes:
            raise TensorMismatch(
                f"tensor {name!r} in {info.file} has dtype {found or info.dtype}, "
                f"expected one of {', '.join(str(d) for d in dtypes)}"
            )
        try:
            return self._handle(info.file).get_tensor(name)
        except SafetensorError as exc:
            raise CheckpointCorrupt(
                f"cannot read tensor {name!r} from {info.file}: {exc}"
            ) from exc

    def _handle(self, file: Path) -> Any:
        handle = self._handles.get(file)
        if handle is None:
            try:
                handle = safe_open(str(file), framework="pt")
            except FileNotFoundError:
                raise CheckpointFileMissing(
                    f"safetensors file {file} disappeared after the checkpoint was validated"
                ) from None
            except (SafetensorError, OSError) as exc:
                raise CheckpointCorrupt(f"cannot open safetensors file {file}: {exc}") from exc
            self._handles[file] = handle
        return handle

    def close(self) -> None:
        """Drop the open file handles (idempotent); tensors already returned stay valid.

        A later `get` reopens the file it needs.
        """
        handles, self._handles = self._handles, {}
        for handle in handles.values():
            handle.__exit__(None, None, None)

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.model_dir)!r}, {len(self._tensors)} tensors)"
