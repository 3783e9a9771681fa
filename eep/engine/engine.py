"""The single-process engine: requests in, committed tokens out.

`LLMEngine.step()` runs one scheduled step (decode tokens and prefill chunks of several
requests flattened into one batch), samples a token for every sequence whose chunk reached
the end of its known tokens, and commits it. `generate()` drives steps until every request
it added has finished. A request's output depends only on its own prompt and sampling
parameters, never on what else shares its batch.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Sequence
from pathlib import Path

import torch

from eep.config import EngineConfig
from eep.engine.request import Request, RequestOutput
from eep.engine.sampling import SamplingParams, sample
from eep.engine.scheduler import ScheduledSeq, Scheduler
from eep.errors import ConfigError, RequestError
from eep.model.attention import KVCache, StepLayout
from eep.model.loader import load_model
from eep.model.model import MoEModel
from eep.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

Prompt = str | Sequence[int]


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model: MoEModel = load_model(
            config.model_path, dtype=config.dtype, max_len=config.max_model_len, progress=config.progress
        )
        if config.max_model_len > self.model.cfg.max_position_embeddings:
            raise ConfigError(
                f"max_model_len ({config.max_model_len}) exceeds the model's max_position_embeddings "
                f"({self.model.cfg.max_position_embeddings}); lower --max-model-len"
            )
        self.kv = KVCache(self.model.cfg, config.max_num_seqs, config.max_model_len, self.model.dtype)
        self.scheduler = Scheduler(config.max_num_seqs, config.max_num_batched_tokens)
        tokenizer_file = Path(config.model_path) / "tokenizer.json"
        self.tokenizer = Tokenizer.from_dir(config.model_path) if tokenizer_file.exists() else None
        self.eos_ids = set(self.model.cfg.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        self._ids = itertools.count()
        self.steps = 0
        logger.info("engine ready: %s, KV cache %.1f MiB", self.model.dtype, self.kv.nbytes() / 2**20)

    # -- requests ---------------------------------------------------------------------------
    def add_request(self, prompt: Prompt, params: SamplingParams, request_id: str | None = None) -> Request:
        ids = self._encode(prompt)
        if not ids:
            raise RequestError("the prompt is empty")
        limit = self.config.max_model_len
        if len(ids) + params.max_tokens > limit:
            raise RequestError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds max_model_len ({limit})"
            )
        vocab = self.model.cfg.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise RequestError(f"prompt token ids must be in [0, {vocab})")
        seed = params.seed if params.seed is not None else random.SystemRandom().randrange(2**31)
        req = Request(request_id or f"req-{next(self._ids)}", list(ids), params, seed)
        self.scheduler.add(req)
        return req

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError(f"{self.config.model_path} has no tokenizer.json: pass token ids, not text")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def decode(self, ids: Sequence[int]) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode(ids)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # -- stepping ---------------------------------------------------------------------------
    def step(self) -> list[Request]:
        """Run one step; return the requests that finished in it."""
        plan = self.scheduler.schedule()
        if not plan:
            return []
        logits = self._forward(plan)  # [N, V] for the sequences that sample
        sampling = [s.request for s in plan if s.completes]
        tokens = sample(
            logits,
            [r.params for r in sampling],
            [r.seed for r in sampling],
            [len(r.output_ids) for r in sampling],
        )
        # Commit only now that the whole step succeeded: a failure above leaves every request as
        # it was before the step, so the step can simply be run again.
        for s in plan:
            s.request.num_computed += s.q_len
        finished = []
        for req, tok in zip(sampling, tokens):
            req.output_ids.append(tok)
            if self._check_stop(req, tok):
                self.scheduler.finish(req)
                finished.append(req)
        self.steps += 1
        return finished

    def _forward(self, plan: list[ScheduledSeq]) -> torch.Tensor:
        input_ids: list[int] = []
        last_rows: list[int] = []
        for s in plan:
            r = s.request
            input_ids.extend(r.tokens(r.num_computed, r.num_computed + s.q_len))
            if s.completes:
                last_rows.append(len(input_ids) - 1)
        layout = StepLayout.build(
            [s.request.slot for s in plan], [s.request.num_computed for s in plan], [s.q_len for s in plan]
        )
        hidden = self.model(torch.tensor(input_ids, dtype=torch.int64), layout, self.kv)
        if not last_rows:
            return hidden.new_zeros(0, self.model.cfg.vocab_size)
        return self.model.compute_logits(hidden[last_rows])

    def _check_stop(self, req: Request, tok: int) -> bool:
        p = req.params
        if (tok in self.eos_ids and not p.ignore_eos) or tok in p.stop_token_ids:
            req.finish_reason = "stop"
        elif len(req.output_ids) >= p.max_tokens or req.num_tokens >= self.config.max_model_len:
            req.finish_reason = "length"
        return req.finished

    # -- batch API --------------------------------------------------------------------------
    def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[RequestOutput]:
        """Run `prompts` to completion (continuous batching) and return outputs in prompt order.

        A bare string is one prompt; a token-id prompt is a list of ints inside `prompts`.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if any(isinstance(p, int) for p in prompts):
            raise RequestError("prompts must be a list of prompts: pass [[1, 2, 3]] for one token-id prompt")
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(plist) != len(prompts):
            raise RequestError(f"{len(prompts)} prompts but {len(plist)} sampling parameter sets")
        reqs = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        while not all(r.finished for r in reqs):
            self.step()
        return [
            RequestOutput(r.request_id, r.prompt_ids, list(r.output_ids), r.finish_reason or "", self.decode(r.output_ids))
            for r in reqs
        ]
