"""A request's state inside the engine: prompt, sampling parameters, committed output."""

from __future__ import annotations

from dataclasses import dataclass, field

from eep.engine.sampling import SamplingParams


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
