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
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from eep.config import EngineConfig
from eep.engine.request import Prompt, Request, RequestOutput, as_batch
from eep.engine.sampling import SamplingParams
from eep.engine.scheduler import ScheduledSeq, Scheduler
from eep.engine.worker import ModelWorker, SampleSpec, SeqWork
from eep.errors import ConfigError, RankFailed, RanksFailed, RequestError, StepRetry
from eep.model.checkpoint import CheckpointReader
from eep.model.config import ModelConfig
from eep.model.loader import load_model
from eep.model.model import MoEModel
from eep.tokenizer import Tokenizer

logger = logging.getLogger(__name__)



class ElasticExecutor(Protocol):
    """The membership side of an expert-parallel executor (`eep.control.executor.EPExecutor`),
    as the engine, `eep.llm.LLM` and the HTTP admin call it."""

    @property
    def active_ranks(self) -> tuple[int, ...]: ...

    @property
    def paused_reason(self) -> str | None: ...

    @property
    def deposed(self) -> str | None: ...

    @property
    def view(self) -> Any: ...

    on_deposed: list[Callable[[str], None]]

    def standby_door(self, subscribe: Callable[[Any, Any], None], attached: Callable[[], bool]) -> bool: ...

    def membership_pending(self) -> bool: ...

    def needs_step(self) -> bool: ...

    def at_step_boundary(self) -> tuple[int, ...]: ...

    def status(self) -> dict[str, object]: ...

    def rejoin(self, rank: int) -> None: ...

    def drain(self, rank: int) -> None: ...

    def scale(self, ep_size: int, operation_id: str | None = None) -> dict[str, object]: ...

    def scale_status(self, operation_id: str) -> dict[str, object]: ...


class Executor(Protocol):
    """Runs each rank's share of a step and returns, per rank, the tokens its chunks sampled.

    `elastic` is the executor's membership side (None: one fixed process). An elastic executor
    raises `RanksFailed` / `StepRetry` from `execute` when a step could not finish; the engine
    then re-admits requests and runs the step again.
    """

    num_ranks: int

    @property
    def elastic(self) -> ElasticExecutor | None: ...

    def execute(self, work: list[list[SeqWork]]) -> list[list[int]]: ...

    def close(self) -> None: ...


class LocalExecutor:
    """The whole model in this process: one rank, every expert slot local."""

    num_ranks = 1
    elastic = None

    def __init__(self, config: EngineConfig) -> None:
        model = load_model(config.model_path, dtype=config.dtype, max_len=config.max_model_len, progress=config.progress)
        self.worker = ModelWorker(model, config.max_num_seqs, config.max_model_len)
        logger.info("local executor: %s, KV cache %.1f MiB", model.dtype, self.worker.kv.nbytes() / 2**20)

    def execute(self, work: list[list[SeqWork]]) -> list[list[int]]:
        return [self.worker.execute(work[0])]

    def close(self) -> None:
        pass


class LLMEngine:
    """Scheduling and committing for one instance; the model runs in its `Executor`.

    With an expert-parallel executor of N ranks, every rank has its own scheduler (its own KV
    slots and requests: data-parallel attention); all ranks run each step together.
    """

    def __init__(
        self, config: EngineConfig, executor: Executor | None = None,
        restart: Callable[[], Executor] | None = None,
    ) -> None:
        """`restart` (the full-restart baseline): on a rank failure the whole executor is closed
        and this builds a new one (every process relaunched, every weight reloaded); the
        requests in flight are prefilled again on it from their committed tokens."""
        self.config = config
        self._restart_executor = restart
        self.restarts: list[dict[str, object]] = []  # one record per full restart
        with CheckpointReader(config.model_path) as reader:
            self.model_config = ModelConfig.from_hf(reader.config)
        if config.max_model_len > self.model_config.max_position_embeddings:
            raise ConfigError(
                f"max_model_len ({config.max_model_len}) exceeds the model's max_position_embeddings "
                f"({self.model_config.max_position_embeddings}); lower --max-model-len"
            )
        self.executor: Executor = executor or LocalExecutor(config)
        self.schedulers = [
            Scheduler(config.max_num_seqs, config.max_num_batched_tokens, config.max_prefill_tokens)
            for _ in range(self.executor.num_ranks)
        ]
        tokenizer_file = Path(config.model_path) / "tokenizer.json"
        self.tokenizer = Tokenizer.from_dir(config.model_path) if tokenizer_file.exists() else None
        self.eos_ids = set(self.model_config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        self._ids = itertools.count()
        self.steps = 0
        self.tokens_committed = 0  # every token committed since start (metrics)
        self._replay = False  # the next step replays one that failed: the survivors' work only

    @property
    def scheduler(self) -> Scheduler:
        """The scheduler of rank 0 (the only one of a single-rank engine)."""
        return self.schedulers[0]

    @property
    def model(self) -> MoEModel:
        """The in-process model of a single-rank engine."""
        if not isinstance(self.executor, LocalExecutor):
            raise AttributeError("the model lives in the rank processes of an expert-parallel engine")
        return self.executor.worker.model

    def close(self) -> None:
        self.executor.close()

    # -- requests ---------------------------------------------------------------------------
    def add_request(self, prompt: Prompt, params: SamplingParams, request_id: str | None = None,
                    output_ids: Sequence[int] = ()) -> Request:
        """Admit a request; with `output_ids`, one that goes on from tokens committed elsewhere
        (another head, a stream that broke off): prompt and those tokens are prefilled, and
        decoding goes on from their count with the same seed, so it samples what an
        uninterrupted run would have."""
        ids = self._encode(prompt)
        if not ids:
            raise RequestError("the prompt is empty")
        limit = self.config.max_model_len
        if len(ids) + params.max_tokens > limit:
            raise RequestError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds max_model_len ({limit})"
            )
        vocab = self.model_config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise RequestError(f"prompt token ids must be in [0, {vocab})")
        if len(output_ids) >= params.max_tokens or min(output_ids, default=0) < 0 or max(output_ids, default=0) >= vocab:
            raise RequestError(f"{len(output_ids)} committed tokens cannot go on under max_tokens {params.max_tokens}")
        seed = params.seed if params.seed is not None else random.SystemRandom().randrange(2**31)
        req = Request(request_id or f"req-{next(self._ids)}", list(ids), params, seed, [int(t) for t in output_ids])
        # the active rank with the fewest requests takes it (data-parallel attention)
        self._least_loaded().add(req)
        return req

    def _active(self) -> tuple[int, ...]:
        elastic = self.executor.elastic
        return elastic.active_ranks if elastic is not None else tuple(range(self.executor.num_ranks))

    def _least_loaded(self) -> Scheduler:
        return min((self.schedulers[r] for r in self._active()), key=lambda s: len(s.running) + len(s.waiting))

    @property
    def paused_reason(self) -> str | None:
        """Why the engine admits no step now (e.g. experts without a replica), or None."""
        elastic = self.executor.elastic
        return elastic.paused_reason if elastic is not None else None

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError(f"{self.config.model_path} has no tokenizer.json: pass token ids, not text")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def decode(self, ids: Sequence[int]) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode(ids)

    def membership_pending(self) -> bool:
        """A rank is loading to rejoin: `step()` must be called (even with no work) to switch it in."""
        elastic = self.executor.elastic
        return elastic is not None and elastic.membership_pending()

    def has_work(self) -> bool:
        return any(s.has_work() for s in self.schedulers)

    # -- stepping ---------------------------------------------------------------------------
    def step(self) -> list[Request]:
        """Run one step on every active rank; return the requests that finished in it.

        If ranks fail during the step, nothing of it is committed: the executor repairs, their
        requests move to survivors (re-prefilled from their committed tokens), and the next
        call runs the step again.
        """
        elastic = self.executor.elastic
        if elastic is not None:
            try:
                if joined := elastic.at_step_boundary():
                    self._rebalance(joined)
            except RanksFailed:  # a rank died while another was being switched in
                self._readmit_orphans()
                return []
        if self.paused_reason is not None:
            time.sleep(0.01)  # nothing can run until a rank rejoins; do not spin the caller
            return []
        active = self._active()
        # The step after a failure replays the survivors' part of the one that failed and admits
        # nothing: the streams that lived through it pause for one repair and one plain step,
        # not for the re-prefill of the failed ranks' requests, which starts at the next step
        # (in chunks of max_prefill_tokens).
        admit, self._replay = not self._replay, False
        decoding = any(self.schedulers[r].decoding() for r in active)  # then every rank chunks its prefill
        plans = [s.schedule(admit, decoding) if r in active else [] for r, s in enumerate(self.schedulers)]
        if not any(plans) and not admit:  # the survivors had nothing running: admit at once
            plans = [s.schedule(True, decoding) if r in active else [] for r, s in enumerate(self.schedulers)]
        if not any(plans) and not (elastic is not None and elastic.needs_step()):
            return []  # (a rebalance's moves in flight: an empty step collects who is done)
        try:
            tokens = self.executor.execute([[self._work(s) for s in plan] for plan in plans])
        except RanksFailed:
            self._readmit_orphans()
            return []
        except StepRetry:
            return []
        except RankFailed as e:
            if self._restart_executor is None:
                raise
            self._restart(e)
            return []
        if not any(plans):
            return []
        # Commit only now that the whole step succeeded on every rank: a failure above leaves
        # every request as it was before the step, so the step can simply be run again.
        finished = []
        for scheduler, plan, rank_tokens in zip(self.schedulers, plans, tokens):
            sampling = [s.request for s in plan if s.completes]
            for s in plan:
                s.request.num_computed += s.q_len
            self.tokens_committed += len(rank_tokens)
            for req, tok in zip(sampling, rank_tokens, strict=True):
                req.output_ids.append(tok)
                if self._check_stop(req, tok):
                    scheduler.finish(req)
                    finished.append(req)
        self.steps += 1
        return finished

    def _readmit_orphans(self) -> None:
        """Move every request of a rank outside the view to the least-loaded survivors, ahead of
        their own waiting requests (they arrived earlier). Each keeps its committed tokens and
        is prefilled again from them: the KV cache died with its rank."""
        active = self._active()
        orphans: list[Request] = []
        for r, scheduler in enumerate(self.schedulers):
            if r not in active:
                orphans += scheduler.evict_all()
        load = {r: len(self.schedulers[r].running) + len(self.schedulers[r].waiting) for r in active}
        moved: dict[int, list[Request]] = {r: [] for r in active}
        for req in orphans:
            target = min(active, key=load.__getitem__)  # as _least_loaded: first of the least loaded
            moved[target].append(req)
            load[target] += 1
        for r in active:
            self.schedulers[r].waiting.extendleft(reversed(moved[r]))
        self._replay = True
        if orphans:
            logger.info("re-admitted %d requests of failed ranks on %s", len(orphans), list(active))

    def _restart(self, cause: RankFailed) -> None:
        start, wall = time.perf_counter(), time.time()
        logger.warning("full restart after %s: relaunching every rank", cause)
        self.executor.close()
        assert self._restart_executor is not None
        self.executor = self._restart_executor()
        orphans = [req for s in self.schedulers for req in s.evict_all()]
        for req in orphans:
            self._least_loaded().add(req)
        seconds = time.perf_counter() - start
        self.restarts.append({"time": wall, "seconds": seconds, "cause": str(cause), "requests": len(orphans)})
        logger.warning("restarted in %.2f s; %d requests resume from their committed tokens", seconds, len(orphans))

    def _rebalance(self, joined: tuple[int, ...]) -> None:
        """New ranks take waiting requests from the busiest ones until the queues are even."""
        active = self._active()
        for r in joined:
            new = self.schedulers[r]
            while True:
                busiest = max((self.schedulers[a] for a in active), key=lambda s: len(s.running) + len(s.waiting))
                if not busiest.waiting or len(busiest.running) + len(busiest.waiting) <= len(new.waiting) + 1:
                    break
                new.waiting.append(busiest.waiting.pop())

    @staticmethod
    def _work(s: ScheduledSeq) -> SeqWork:
        r = s.request
        spec = SampleSpec(r.params, r.seed, len(r.output_ids)) if s.completes else None
        return SeqWork(r.slot, r.num_computed, tuple(r.tokens(r.num_computed, r.num_computed + s.q_len)), spec)

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
        batch, plist = as_batch(prompts, params)
        reqs = [self.add_request(p, sp) for p, sp in zip(batch, plist)]
        while not all(r.finished for r in reqs):
            self.step()
        return [
            RequestOutput(r.request_id, r.prompt_ids, list(r.output_ids), r.finish_reason or "", self.decode(r.output_ids))
            for r in reqs
        ]
