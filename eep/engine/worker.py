"""The model side of a step: run a list of sequence chunks through the model and sample.

`SeqWork` is plain picklable data, so the same `ModelWorker.execute` runs in the engine's own
process (one rank) or in a rank process that receives its share of each step over a pipe.
A worker keeps no request state between steps besides the KV cache contents: everything it
needs for a step (tokens, positions, cache slot, sampling parameters and output index) comes
with the step, which is what lets a request move to another rank and replay exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eep.engine.sampling import SamplingParams, sample
from eep.model.attention import KVCache, StepLayout
from eep.model.model import MoEModel


@dataclass(frozen=True, slots=True)
class SampleSpec:
    params: SamplingParams
    seed: int
    index: int  # output index of the token to sample


@dataclass(frozen=True, slots=True)
class SeqWork:
    """One sequence's chunk of a step: `token_ids` at positions `ctx_len ..` in KV slot `slot`."""

    slot: int
    ctx_len: int
    token_ids: tuple[int, ...]
    sample: SampleSpec | None  # set when the chunk reaches the end of the known tokens


class ModelWorker:
    def __init__(self, model: MoEModel, num_slots: int, max_len: int) -> None:
        self.model = model
        self.kv = KVCache(model.cfg, num_slots, max_len, model.dtype)

    def execute(self, work: list[SeqWork]) -> list[int]:
        """Forward every chunk in one batch; return one token per chunk with a `sample`, in order.

        An empty `work` still runs the model on zero tokens, so that an expert-parallel rank
        with no requests takes part in every dispatch and combine of the step.
        """
        logits = self.forward_logits(work)
        specs = [w.sample for w in work if w.sample is not None]
        return sample(logits, [s.params for s in specs], [s.seed for s in specs], [s.index for s in specs])

    def forward_logits(self, work: list[SeqWork]) -> torch.Tensor:
        """Logits `[N, V]` float32 of the last token of each chunk that samples, in order."""
        input_ids = [t for w in work for t in w.token_ids]
        layout = StepLayout.build([w.slot for w in work], [w.ctx_len for w in work], [len(w.token_ids) for w in work])
        hidden = self.model(torch.tensor(input_ids, dtype=torch.int64), layout, self.kv)
        rows, end = [], 0
        for w in work:
            end += len(w.token_ids)
            if w.sample is not None:
                rows.append(end - 1)
        return self.model.compute_logits(hidden[rows])
