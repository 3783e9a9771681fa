"""`EngineLoop`: one `LLMEngine` driven by one background thread, fed from any thread.

Guarantees:
- The loop's thread is the only thread that touches the engine (which is not thread-safe);
  `submit` only queues, and may be called from any number of threads at once.
- Submissions are admitted at step boundaries, so requests from concurrent callers share
  steps (continuous batching); a request's output does not depend on what it shared them with.
- Every future resolves: with a `RequestOutput` (text decoded when the model has a
  tokenizer), with the request's own validation error (`RequestError`, the loop goes on), with
  the error of a failed step (every in-flight request gets it, and the loop becomes unhealthy:
  later submissions fail at once with `EngineUnavailable`), or with `EngineUnavailable` when
  the loop is closed. A future cancelled by its caller aborts its request at the next step
  boundary and frees its KV slot.
- Idle, the thread sleeps on a condition variable (woken by `submit`, re-checked every
  `idle_wait_s`); it never spins.

It knows nothing of sockets or wire formats: `eep.serving` (and later an HTTP frontend) sit
on top of it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any

from eep.engine.engine import LLMEngine, Prompt
from eep.engine.request import Request, RequestOutput
from eep.engine.sampling import SamplingParams
from eep.errors import EepError, EngineUnavailable

logger = logging.getLogger(__name__)

_JOIN_POLL_S = 0.05  # idle, with a rank loading to rejoin: how often a step boundary is offered


@dataclass(slots=True)
class _Call:
    fn: Callable[[LLMEngine], Any]
    future: Future[Any]


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """What a streaming request committed in one step: the new token ids, the text they add
    (the decoded output's new suffix), and the finish reason once it ended."""

    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None


@dataclass(slots=True)
class _Submission:
    prompt: Prompt
    params: SamplingParams
    future: Future[RequestOutput]
    on_tokens: Callable[[TokenEvent], None] | None = None
    resume: tuple[list[int], str] | None = None


@dataclass(slots=True)
class _Inflight:
    request: Request
    future: Future[RequestOutput]
    on_tokens: Callable[[TokenEvent], None] | None = None
    sent_tokens: int = 0
    sent_text: str = ""


class EngineLoop:
    """Owns `engine` from construction on: `close()` closes it (stops ranks, removes shm)."""

    def __init__(self, engine: LLMEngine, *, idle_wait_s: float = 1.0, name: str = "eep-engine-loop") -> None:
        self.engine = engine
        self._idle_wait_s = idle_wait_s
        self._cond = threading.Condition()
        self._queue: deque[_Submission] = deque()  # guarded by _cond
        self._calls: deque[_Call] = deque()  # guarded by _cond
        self._closing = False  # guarded by _cond
        self._error: BaseException | None = None  # set once, by the loop thread
        self._stopped: EngineUnavailable | None = None  # stop_serving's reason; guarded by _cond
        self._inflight: dict[str, _Inflight] = {}  # loop thread only
        self._closed = False
        self.on_step: Callable[[float], None] | None = None  # called on the loop thread with each step's seconds
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        elastic = engine.executor.elastic
        if elastic is not None:  # a head that another head deposed serves no more
            elastic.on_deposed.append(self.stop_serving)
            if elastic.deposed is not None:
                self.stop_serving(elastic.deposed)

    # -- any thread -------------------------------------------------------------------------
    @property
    def queued(self) -> int:
        """Submissions not yet admitted to the engine."""
        with self._cond:
            return len(self._queue)

    @property
    def healthy(self) -> bool:
        """False once a step failed, the loop stopped serving or was closed."""
        return self._error is None and self._stopped is None and not self._closing

    @property
    def error(self) -> BaseException | None:
        """Why the loop stopped serving (a deposed head), else the error of the step that stopped it."""
        return self._stopped or self._error

    def stop_serving(self, reason: str) -> None:
        """Serve no more (any thread): the step in progress ends, every request in flight and
        every later one fails with EngineUnavailable(`reason`); the engine stays open until
        `close`. Idempotent (the first reason stays)."""
        with self._cond:
            if self._stopped is None:
                self._stopped = EngineUnavailable(reason)
                logger.error("the engine loop stops serving: %s", reason)
            self._cond.notify_all()

    def submit(
        self, prompt: Prompt, params: SamplingParams, on_tokens: Callable[[TokenEvent], None] | None = None,
        resume: tuple[list[int], str] | None = None,
    ) -> Future[RequestOutput]:
        """Queue one request; the future resolves as the module docstring says. Never blocks.

        `on_tokens` (streaming) is called on the loop's thread after every step that committed
        tokens of this request, last with its finish reason, before the future resolves; it
        must not block (hand the event to another thread or event loop). `resume`: the output
        ids committed already (elsewhere, or before its client went away) and the text streamed
        of them; the request goes on from there (`LLMEngine.add_request`), streaming only what
        follows."""
        future: Future[RequestOutput] = Future()
        with self._cond:
            unavailable = self._unavailable()
            if unavailable is None:
                self._queue.append(_Submission(prompt, params, future, on_tokens, resume))
                self._cond.notify()
        if unavailable is not None:
            future.set_exception(unavailable)
        return future

    def call(self, fn: Callable[[LLMEngine], Any]) -> Future[Any]:
        """Run `fn(engine)` on the loop's thread between two steps (the engine is not
        thread-safe: status reads and membership changes go through here); the future gets its
        result or exception. Never blocks."""
        future: Future[Any] = Future()
        with self._cond:
            # also after a failed step: the thread is gone, a queued call would wait forever
            unavailable = self._unavailable()
            if unavailable is None:
                self._calls.append(_Call(fn, future))
                self._cond.notify()
        if unavailable is not None:
            future.set_exception(unavailable)
        return future

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the thread (after the step it is in), fail what is pending, close the engine.

        If the thread does not stop within `timeout_s` (a step hung), the engine is closed
        under it: its ranks are stopped, so the step fails and the thread fails its futures.
        Idempotent.
        """
        with self._cond:
            if self._closed:
                return
            self._closed = self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            logger.warning("engine loop did not stop within %.1f s; closing the engine under it", timeout_s)
        try:
            self.engine.close()
        finally:
            self._thread.join(timeout_s)
            with self._cond:
                queued = list(self._queue)
                self._queue.clear()
            stopped = EngineUnavailable("the engine loop was closed (the server is shutting down); retry on a running instance")
            for sub in queued:
                _fail(sub.future, stopped)

    def __enter__(self) -> EngineLoop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unavailable(self) -> EngineUnavailable | None:
        if self._stopped is not None:
            return self._stopped
        if self._error is not None:
            return EngineUnavailable(
                f"the engine stopped after a failed step ({self._error}); restart the instance to serve again"
            )
        if self._closing:
            return EngineUnavailable("the engine loop is closed (the server is shutting down)")
        return None

    # -- the loop thread --------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._closing or self._stopped or self._queue or self._inflight or self._calls):
                        if self.engine.membership_pending():  # a joiner to switch in: look again soon
                            self._cond.wait(_JOIN_POLL_S)
                            break
                        self._cond.wait(self._idle_wait_s)
                    if self._closing or self._stopped:
                        break
                    admitted = list(self._queue)
                    self._queue.clear()
                    calls = list(self._calls)
                    self._calls.clear()
                for c in calls:
                    self._run_call(c)
                for sub in admitted:
                    self._admit(sub)
                self._abort_cancelled()
                if self.engine.has_work() or self.engine.membership_pending():
                    start = time.perf_counter()
                    finished = self.engine.step()
                    if self.on_step is not None:
                        self.on_step(time.perf_counter() - start)
                    self._resolve(finished)
                elif self._inflight:  # would spin: every in-flight request must be scheduled
                    raise RuntimeError(f"{len(self._inflight)} requests in flight but the engine has no work")
            with self._cond:
                stopped, queued = self._stopped, list(self._queue)
                self._queue.clear()
            self._fail_inflight(stopped or EngineUnavailable("the engine loop was closed before this request finished"))
            self._fail_calls(stopped or EngineUnavailable("the engine loop was closed"))
            for sub in queued:
                _fail(sub.future, stopped or EngineUnavailable("the engine loop was closed"))
        except BaseException as e:  # a failed step: a rank died or went silent, or a bug
            logger.error("engine step failed; failing %d in-flight requests: %s", len(self._inflight), e, exc_info=e)
            with self._cond:
                self._error = e
                queued = list(self._queue)
                self._queue.clear()
            self._fail_inflight(e)
            self._fail_calls(self._unavailable() or EngineUnavailable(str(e)))
            for sub in queued:
                _fail(sub.future, self._unavailable() or e)

    def _run_call(self, c: _Call) -> None:
        if not c.future.set_running_or_notify_cancel():
            return
        try:
            c.future.set_result(c.fn(self.engine))
        except Exception as e:  # the call's own failure; the loop goes on
            c.future.set_exception(e)

    def _admit(self, sub: _Submission) -> None:
        if sub.future.cancelled():
            return
        done, text = sub.resume if sub.resume is not None else ([], "")
        try:
            req = self.engine.add_request(sub.prompt, sub.params, output_ids=done)
        except EepError as e:  # the request's own fault: its caller learns why, the loop goes on
            _fail(sub.future, e)
            return
        self._inflight[req.request_id] = _Inflight(req, sub.future, sub.on_tokens, len(done), text)

    def _abort_cancelled(self) -> None:
        for rid, entry in list(self._inflight.items()):
            if entry.future.cancelled():
                _abort(self.engine, entry.request)
                del self._inflight[rid]

    def _stream(self) -> None:
        for entry in self._inflight.values():
            req = entry.request
            if entry.on_tokens is None or (len(req.output_ids) == entry.sent_tokens and not req.finished):
                continue
            text = self.engine.decode(req.output_ids) or ""
            # a token that ends inside a multi-byte character decodes to U+FFFD: hold it back
            stable = text.rstrip("\ufffd") if not req.finished else text
            new_ids = tuple(req.output_ids[entry.sent_tokens :])
            delta = stable[len(entry.sent_text) :] if stable.startswith(entry.sent_text) else ""
            entry.sent_tokens, entry.sent_text = len(req.output_ids), entry.sent_text + delta
            try:
                entry.on_tokens(TokenEvent(new_ids, delta, req.finish_reason))
            except Exception:  # the consumer's fault (e.g. its event loop closed): the request goes on
                logger.exception("a streaming callback failed")

    def _resolve(self, finished: list[Request]) -> None:
        self._stream()
        for req in finished:
            entry = self._inflight.pop(req.request_id, None)
            if entry is None:
                continue
            out = RequestOutput(
                req.request_id, req.prompt_ids, list(req.output_ids), req.finish_reason or "",
                self.engine.decode(req.output_ids),
            )
            try:
                entry.future.set_result(out)
            except InvalidStateError:  # cancelled meanwhile: nobody waits for it
                pass

    def _fail_calls(self, error: BaseException) -> None:
        with self._cond:
            calls = list(self._calls)
            self._calls.clear()
        for c in calls:
            _fail(c.future, error)

    def _fail_inflight(self, error: BaseException) -> None:
        for entry in self._inflight.values():
            _fail(entry.future, error)
        self._inflight.clear()


def _fail(future: Future[RequestOutput], error: BaseException) -> None:
    try:
        future.set_exception(error)
    except InvalidStateError:  # cancelled (or already resolved): nobody waits for it
        pass


def _abort(engine: LLMEngine, req: Request) -> None:
    """Drop `req` from its scheduler, freeing its KV slot (between steps only)."""
    for scheduler in engine.schedulers:
        if req in scheduler.waiting:
            scheduler.waiting.remove(req)
            return
        if req in scheduler.running:
            scheduler.finish(req)
            return
