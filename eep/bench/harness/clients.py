"""The benches' HTTP clients: one request trace, each request's record, closed-loop load.

`Trace` is request i of every run and every system: a seeded random token-id prompt and a
seeded output length, greedy, EOS ignored, so two servers given the same indices do the same
work and must return the same tokens. `complete` streams one request through
`POST /v1/completions` and records every chunk with its arrival time and token count (the
token timeline, `eep.bench.harness.timeline`, is built from those); `complete_whole` asks for
the whole completion at once. `ClosedLoop` keeps `concurrency` such clients busy, each starting
its next request as soon as one ends, until told to stop. `warm` is the untimed wave a server
gets once before it is measured, `serve_reference` the fault-free outputs a run is checked
against.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from eep.bench.harness.server import BenchFailed, ServerHandle
from eep.bench.steady import FIRST_PROMPT_ID

logger = logging.getLogger(__name__)
logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise

REQUEST_TIMEOUT_S = 300.0
WARM_FIRST_INDEX = 10**6  # trace indices of the warm-up wave (apart from every timed run's)


@dataclass(frozen=True, slots=True)
class Trace:
    """Request i of every run: the same prompt and output length for every system."""

    seed: int
    vocab: int
    prompt_len: int
    output_len: int

    def request(self, i: int) -> tuple[list[int], int]:
        rng = random.Random(self.seed * 1_000_003 + i)
        prompt = [rng.randrange(FIRST_PROMPT_ID, self.vocab) for _ in range(self.prompt_len)]
        return prompt, rng.randint(max(1, self.output_len // 2), self.output_len * 3 // 2)

    @property
    def max_model_len(self) -> int:
        return self.prompt_len + self.output_len * 3 // 2 + 8


@dataclass(slots=True)
class RequestRecord:
    """One request as its client saw it."""

    index: int
    start: float
    max_tokens: int
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (arrival, tokens in the chunk)
    token_ids: list[int] = field(default_factory=list)
    done: bool = False
    error: str | None = None

    @property
    def complete(self) -> bool:
        return self.done and self.error is None and len(self.token_ids) == self.max_tokens


def http_client(server: ServerHandle, concurrency: int, *, timeout_s: float = REQUEST_TIMEOUT_S,
                connect_timeout_s: float | None = None) -> Any:
    """An async HTTP client of `server` with a connection for each of `concurrency` requests;
    every call's read (and, unless `connect_timeout_s`, connect) timeout is `timeout_s`."""
    import httpx

    timeout = httpx.Timeout(timeout_s, connect=timeout_s if connect_timeout_s is None else connect_timeout_s)
    return httpx.AsyncClient(base_url=server.url, timeout=timeout,
                             limits=httpx.Limits(max_connections=concurrency + 4,
                                                 max_keepalive_connections=concurrency + 4))


async def membership(client: Any) -> dict[str, Any]:
    """The server's `/membership` status (view, pids, events, dataplane, accounting)."""
    resp = await client.get("/membership")
    resp.raise_for_status()
    return resp.json()  # type: ignore[no-any-return]


def _body(trace: Trace, index: int, model: str, stream: bool) -> tuple[dict[str, Any], int]:
    prompt, max_tokens = trace.request(index)
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": stream,
            "ignore_eos": True, "return_token_ids": True}, max_tokens


async def complete(client: Any, model: str, trace: Trace, index: int, clock: float,
                   into: list[RequestRecord] | None = None) -> RequestRecord:
    """Stream request `index` of the trace, its record appended to `into` at once (so a
    cancelled request still counts the tokens it got); a failure is the record's error."""
    body, max_tokens = _body(trace, index, model, stream=True)
    rec = RequestRecord(index, time.monotonic() - clock, max_tokens)
    if into is not None:
        into.append(rec)
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                rec.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:200]}"
                return rec
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    rec.done = True
                    break
                ids = json.loads(line[6:])["choices"][0].get("token_ids") or []
                if ids:
                    rec.chunks.append((time.monotonic() - clock, len(ids)))
                    rec.token_ids += ids
    except Exception as e:  # noqa: BLE001 - any failure of a request is what a bench counts
        rec.error = f"{type(e).__name__}: {e}"
    return rec


async def complete_whole(client: Any, model: str, trace: Trace, index: int, clock: float,
                         into: list[RequestRecord] | None = None) -> RequestRecord:
    """Request `index` of the trace as one non-streaming completion (its tokens are one chunk
    at its end); a failure, or an end other than `length`, is the record's error."""
    import httpx

    body, max_tokens = _body(trace, index, model, stream=False)
    rec = RequestRecord(index, time.monotonic() - clock, max_tokens)
    if into is not None:
        into.append(rec)
    try:
        resp = await client.post("/v1/completions", json=body)
        if resp.status_code != 200:
            rec.error = f"HTTP {resp.status_code}: {resp.text[:200]}"
            return rec
        choice = resp.json()["choices"][0]
        ids = list(choice.get("token_ids") or [])
        if ids:
            rec.chunks.append((time.monotonic() - clock, len(ids)))
            rec.token_ids = ids
        rec.done = choice.get("finish_reason") == "length"
        if not rec.done:
            rec.error = f"finish_reason {choice.get('finish_reason')!r}"
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as e:
        rec.error = f"{type(e).__name__}: {e}"
    return rec


class ClosedLoop:
    """`concurrency` streaming clients on one HTTP client, each starting request after request
    of the trace (indices from `first_index` on, in the order they start) while `keep_going()`
    says so; every record lands in `records` as its request starts, times from `clock`."""

    def __init__(self, client: Any, server: ServerHandle, trace: Trace, *, clock: float, first_index: int = 0,
                 keep_going: Callable[[], bool] = lambda: True) -> None:
        self.client, self.server, self.trace, self.clock = client, server, trace, clock
        self.keep_going = keep_going
        self.records: list[RequestRecord] = []
        self._counter = itertools.count(first_index)
        self.tasks: list[asyncio.Task[None]] = []

    async def _worker(self) -> None:
        while self.keep_going():
            await complete(self.client, self.server.model_name, self.trace, next(self._counter), self.clock,
                           self.records)

    def start(self, concurrency: int) -> list[asyncio.Task[None]]:
        self.tasks = [asyncio.create_task(self._worker()) for _ in range(concurrency)]
        return self.tasks

    def in_flight(self) -> int:
        return sum(not t.done() for t in self.tasks)

    async def join(self, timeout_s: float = REQUEST_TIMEOUT_S, *, return_exceptions: bool = False) -> None:
        """Await every client (each ends after its request in flight once `keep_going` says no)."""
        await asyncio.wait_for(asyncio.gather(*self.tasks, return_exceptions=return_exceptions), timeout_s)

    async def cancel(self) -> None:
        """Cancel every request in flight (the server aborts them) and await the clients."""
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def warm(client: Any, server: ServerHandle, trace: Trace, concurrency: int) -> None:
    """Untimed, once per server: one wave of trace-shaped requests (indices apart from the timed ones)."""
    if server.warmed:
        return
    wave = await asyncio.gather(*(complete(client, server.model_name, trace, WARM_FIRST_INDEX + i, time.monotonic())
                                  for i in range(concurrency)))
    bad = [r for r in wave if not r.complete]
    if bad:
        raise BenchFailed(f"a warm-up request failed: {bad[0].error}; the server's log ends:\n{server.log_tail()}")
    server.warmed = True


async def warm_all(servers: dict[str, ServerHandle], trace: Trace, concurrency: int) -> None:
    """`warm` every server, one after the other."""
    for srv in servers.values():
        async with http_client(srv, concurrency) as client:
            await warm(client, srv, trace, concurrency)


async def serve_reference(server: ServerHandle, trace: Trace, indices: list[int],
                          concurrency: int) -> dict[int, list[int]]:
    """The outputs of the trace's requests `indices` on a fault-free `server` (at most
    `concurrency` at once); `BenchFailed` if any does not complete."""
    sem = asyncio.Semaphore(concurrency)
    async with http_client(server, concurrency) as client:
        async def one(i: int) -> RequestRecord:
            async with sem:
                return await complete(client, server.model_name, trace, i, time.monotonic())

        recs = await asyncio.gather(*(one(i) for i in indices))
    bad = [r for r in recs if not r.complete]
    if bad:
        raise BenchFailed(f"the fault-free reference failed on request {bad[0].index}: {bad[0].error}")
    return {r.index: r.token_ids for r in recs}
