"""Engine configuration: one frozen dataclass, checked on construction; the CLI maps onto it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eep.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# "auto" follows the checkpoint, as vLLM and transformers do: 16-bit checkpoints run in bf16.
_AUTO = {"float32": "float32", "bfloat16": "bfloat16", "float16": "bfloat16"}


def resolve_dtype(dtype: str, hf_config: dict[str, object]) -> torch.dtype:
    """The compute dtype for `dtype` ("auto", "float32" or "bfloat16") and a checkpoint's config.json."""
    if dtype == "auto":
        saved = str(hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32")
        dtype = _AUTO.get(saved, "float32")
    return DTYPES[dtype]


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model_path: str
    dtype: str = "auto"  # "auto" (the checkpoint's), "float32" or "bfloat16"
    max_num_seqs: int = 32  # KV-cache slots = most requests running at once
    max_model_len: int = 1024  # prompt + output tokens of one request
    max_num_batched_tokens: int = 2048  # tokens per step (decode tokens + prefill chunks)
    # prefill tokens per rank in a step that also decodes (chunked prefill): bounds how long a
    # long prompt, or a failed rank's requests prefilled again on a survivor, stall the streams
    max_prefill_tokens: int = 16
    progress: bool = True  # progress bar while loading

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_model_len < 2:
            raise ConfigError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.max_prefill_tokens < 1:
            raise ConfigError(f"max_prefill_tokens must be >= 1, got {self.max_prefill_tokens}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ConfigError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs}) so that every running request can decode in each step"
            )
