"""Continuous batching: which requests run in the next step, and how many tokens each.

Every step is a mix: each running request that has its whole history cached decodes one
token; requests still prefilling continue with a chunk; waiting requests are admitted FIFO
while KV slots and the step's token budget last. In a step that decodes, prefill chunks
together take at most `max_prefill_tokens` (chunked prefill, as SGLang's
`--chunked-prefill-size`): a long prompt, or the requests of a failed rank re-admitted here
with their whole history to prefill again, never stall the running streams for more than a
short chunk per step. A step runs on every rank in lock step (the experts' all-to-all), so a
rank that decodes nothing itself still chunks while any other rank decodes (`others_decode`):
a rank just switched in, handed a queue of waiting requests, would otherwise prefill them all
in one step that every rank's streams wait for. A request leaves the step plan only by
finishing, which frees its slot for the next waiting request at the next step. CPU
bookkeeping only: nothing here touches tensors.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from eep.engine.request import Request


@dataclass(frozen=True, slots=True)
class ScheduledSeq:
    request: Request
    q_len: int  # tokens computed this step, starting at request.num_computed

    @property
    def completes(self) -> bool:
        """True when this chunk reaches the end of the known tokens, so a token is sampled."""
        return self.request.num_computed + self.q_len == self.request.num_tokens


class Scheduler:
    def __init__(self, num_slots: int, max_batched_tokens: int, max_prefill_tokens: int | None = None) -> None:
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_slots = num_slots
        self.free_slots = list(range(num_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self.max_batched_tokens = max_batched_tokens
        self.max_prefill_tokens = max_batched_tokens if max_prefill_tokens is None else max_prefill_tokens

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def decoding(self) -> bool:
        """Some running request decodes in the next step (its whole history is cached)."""
        return any(r.num_tokens - r.num_computed == 1 for r in self.running)

    def schedule(self, admit: bool = True, others_decode: bool = False) -> list[ScheduledSeq]:
        """The next step's plan; `admit=False` takes no waiting request in (a replayed step);
        `others_decode`: another rank of the same step decodes (prefill is chunked here too)."""
        budget = self.max_batched_tokens
        plan: list[ScheduledSeq] = []
        # Decodes first (one token each, in slot order so attention reads the cache as a view),
        # then chunks of requests still prefilling, within the prefill budget if anything decodes.
        running = sorted(self.running, key=lambda r: (r.num_tokens - r.num_computed, r.slot))
        decodes = [r for r in running if r.num_tokens - r.num_computed == 1]
        for req in decodes:
            plan.append(ScheduledSeq(req, 1))
        budget -= len(decodes)
        if decodes or others_decode:
            budget = min(budget, self.max_prefill_tokens)
        for req in (r for r in running if r.num_tokens - r.num_computed > 1):
            q_len = min(req.num_tokens - req.num_computed, budget)
            if q_len <= 0:
                continue
            plan.append(ScheduledSeq(req, q_len))
            budget -= q_len
        while admit and self.waiting and self.free_slots and budget > 0:
            req = self.waiting.popleft()
            req.slot = self.free_slots.pop()
            self.running.append(req)
            q_len = min(req.num_tokens - req.num_computed, budget)
            plan.append(ScheduledSeq(req, q_len))
            budget -= q_len
        return plan

    def evict_all(self) -> list[Request]:
        """Take every request out (its rank is gone): running ones first, in admission order.
        Each loses its slot and its cached tokens, and keeps its committed output."""
        evicted = self.running + list(self.waiting)
        for req in evicted:
            req.slot, req.num_computed = None, 0
        self.running, self.waiting = [], deque()
        self.free_slots = list(range(self.num_slots - 1, -1, -1))
        return evicted

    def finish(self, request: Request) -> None:
        self.running.remove(request)
        if request.slot is not None:
            self.free_slots.append(request.slot)
            request.slot = None
