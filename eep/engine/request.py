"""A request's state inside the engine: prompt, sampling parameters, committed output."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from eep.engine.sampling import SamplingParams
from eep.errors import RequestError

Prompt = str | Sequence[int]  # text, or token ids


def as_batch(
    prompts: Prompt | Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None
) -> tuple[list[Prompt], list[SamplingParams]]:
    """The batch conventions of every `generate`: a bare string is one prompt, a token-id prompt
    is a list of ints inside `prompts`; one `SamplingParams` (or None: defaults) applies to all."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if any(isinstance(p, int) for p in prompts):
        raise RequestError("prompts must be a list of prompts: pass [[1, 2, 3]] for one token-id prompt")
    batch = list(prompts)  # type: ignore[arg-type]
    if params is None or isinstance(params, SamplingParams):
        return batch, [params or SamplingParams()] * len(batch)
    plist = list(params)
    if len(plist) != len(batch):
        raise RequestError(f"{len(batch)} prompts but {len(plist)} sampling parameter sets")
    return batch, plist


@dataclass(slots=True)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose keys/values are in the KV cache
    slot: int | None = None  # KV-cache slot while running
    finish_reason: str | None = None  # "stop" | "length" once finished

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_at(self, i: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[i] if i < n else self.output_ids[i - n]

    def tokens(self, start: int, stop: int) -> list[int]:
        return (self.prompt_ids + self.output_ids)[start:stop]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True, slots=True)
class RequestOutput:
    request_id: str
    prompt_ids: list[int]
    output_ids: list[int]
    finish_reason: str
    text: str | None = None
