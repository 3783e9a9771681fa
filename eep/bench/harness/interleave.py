"""Two servers' steady-state speed and CPU cost compared in alternating slices (ABBA...).

On a shared host the rate drifts by several percent within a minute; separate runs would turn
that drift into a difference. `interleaved` drives one server at a time with the same
closed-loop load on the same requests, in rounds whose order alternates (A B, B A, ...), the
other server idle, and compares each round's two slices on the same work: from the token count
both had reached at the end of the ramp to the count both reached in all, each on its own clock
(`same_work_ratio`, `same_work_cpu_ratio`; `round_ratio` falls back to the slices' token rates
where they have too little work in common). Each server's own ledger (`accounting` of
/membership) gives the share of its CPU time that served tokens (`bookkeeping_round_ratios`).
`cpu_summary` is the median and spread of the rounds' CPU and bookkeeping ratios.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import statistics
import time
from dataclasses import dataclass
from typing import Any

from eep.bench.harness.clients import (
    ClosedLoop,
    Trace,
    http_client,
    membership,
    warm_all,
)
from eep.bench.harness.cpu import CpuMeter, CpuReader, cpu_at, cpu_source, descendants
from eep.bench.harness.server import ServerHandle

logger = logging.getLogger(__name__)

STEADY_FIRST_INDEX = 10**7  # trace indices of the steady-state slices (apart from the timed runs')
_MIN_COMMON_SHARE = 0.25

Chunks = list[tuple[float, int]]


@dataclass(slots=True)
class _Slice:
    """What one server did in one slice."""

    arrivals: Chunks  # the slice's chunks, sorted
    cpu: list[tuple[float, float]] | None  # (time, CPU seconds) samples; None: no figure
    ledger: dict[str, Any] | None  # the server's ledger from the ramp's end to the slice's end
    steps: int | None  # committed steps in that stretch (None: not known)
    processes: int
    tokens_after_ramp: int


async def interleaved(servers: dict[str, ServerHandle], trace: Trace, *, concurrency: int, rounds: int,
                      slice_s: float) -> dict[str, Any]:
    """Steady-state tokens/s of each of the two `servers`, measured in alternating slices of
    the same closed-loop load on the same requests, the other idle. The first third of a slice
    (at most 1 s: the loop ramping up) is not counted; at a slice's end the requests in flight
    are cancelled (the server aborts them). `round_ratios`: per round, the first server's speed
    over the second's on the same work (`round_ratio`). `cpu_round_ratios`: per round, the
    second server's CPU seconds over the first's on that same work (`same_work_cpu_ratio`), from
    each server's and its ranks' CPU clocks read every `CPU_SAMPLE_S` through the slice
    (`cpu_source` says which clocks: `process_cpu_clock_ns`, exact, or the 10 ms ticks of
    /proc/PID/stat)."""
    ramp = min(1.0, slice_s / 3)
    first = next(iter(servers.values())).proc
    assert first is not None
    source, read = cpu_source(first.pid)
    await warm_all(servers, trace, concurrency)
    runs: dict[tuple[int, str], _Slice] = {}
    slices: list[dict[str, Any]] = []
    for k in range(rounds):
        for name in (list(servers) if k % 2 == 0 else list(reversed(servers))):
            # the same requests for every server
            run = await _slice(servers[name], trace, first_index=STEADY_FIRST_INDEX + k * 100_000,
                               concurrency=concurrency, ramp=ramp, slice_s=slice_s, read=read)
            runs[k, name] = run
            slices.append(_slice_row(name, k, run, ramp, slice_s))
            logger.info("  steady slice %d/%d on %s: %.0f tok/s", len(slices), rounds * len(servers), name,
                        slices[-1]["tokens_per_s"])
    return _rounds(list(servers), runs, slices, rounds=rounds, ramp=ramp, slice_s=slice_s, source=source)


async def _slice(srv: ServerHandle, trace: Trace, *, first_index: int, concurrency: int, ramp: float, slice_s: float,
                 read: CpuReader) -> _Slice:
    assert srv.proc is not None
    pids = descendants(srv.proc.pid)  # the server, its ranks, its fork server; none starts or ends in a slice
    async with http_client(srv, concurrency) as client:
        clock = time.monotonic()
        load = ClosedLoop(client, srv, trace, clock=clock, first_index=first_index)
        meter = CpuMeter(pids, read, clock)
        meter.start()
        load.start(concurrency)
        await asyncio.sleep(ramp)
        # the ledger from the end of the ramp, as the token counts: what a server did while it
        # idled through the other's slice (its heartbeats go on), its ranks report with their
        # first step, and it is no part of this slice's work
        books0, steps0 = await _books(client)
        await asyncio.sleep(max(0.0, slice_s - (time.monotonic() - clock)))
        await meter.stop()  # at the slice's end, before the requests in flight are cancelled
        books1, steps1 = await _books(client)  # the steps of the slice; the cancelled requests' are idle work
        await load.cancel()
    arrivals = sorted(c for r in load.records for c in r.chunks if c[0] <= slice_s)
    return _Slice(arrivals, meter.samples or None, _books_delta(books0, books1),
                  steps1 - steps0 if steps0 is not None and steps1 is not None else None, len(pids),
                  sum(c for t, c in arrivals if ramp < t))


def _slice_row(name: str, k: int, run: _Slice, ramp: float, slice_s: float) -> dict[str, Any]:
    samples = run.cpu or []
    return {"server": name, "round": k, "tokens_per_s": run.tokens_after_ramp / (slice_s - ramp),
            # committed steps from the ramp's end to the slice's end (None: not known)
            "steps": run.steps,
            "tokens": sum(c for _, c in run.arrivals), "processes": run.processes,
            "cpu_s": samples[-1][1] - samples[0][1] if samples else None,
            "ledger": run.ledger,
            "cpu_samples": len(samples),  # the longest gap bounds the interpolation's error
            "cpu_sample_gap_max_s": max((b[0] - a[0] for a, b in zip(samples, samples[1:])), default=None)}


def _rounds(names: list[str], runs: dict[tuple[int, str], _Slice], slices: list[dict[str, Any]], *, rounds: int,
            ramp: float, slice_s: float, source: str) -> dict[str, Any]:
    """The rounds' ratios from their slices."""
    a, b = names
    rate = {(s["round"], s["server"]): s["tokens_per_s"] for s in slices}
    per_round = [round_ratio(runs[k, a].arrivals, runs[k, b].arrivals, ramp, rate[k, a], rate[k, b])
                 for k in range(rounds)]
    by_rate = [k for k, (r, rated) in enumerate(per_round) if rated and r is not None]
    cpu_ratios = [same_work_cpu_ratio(runs[k, a].arrivals, runs[k, b].arrivals, ramp, runs[k, a].cpu, runs[k, b].cpu)
                  for k in range(rounds)]
    served = {k: [1.0 - led["bookkeeping_cpu_s"] / led["cpu_s"] if led is not None and led["cpu_s"] > 0 else None
                  for led in (runs[k, a].ledger, runs[k, b].ledger)] for k in range(rounds)}
    seconds = rounds * (slice_s - ramp)
    tokens = {name: sum(runs[k, name].tokens_after_ramp for k in range(rounds)) for name in names}
    return {"tokens_per_s": {name: n / seconds for name, n in tokens.items()},
            "round_ratios": [r for r, _ in per_round if r is not None], "rate_ratio_rounds": len(by_rate),
            # per round: the share of the first server's CPU that served tokens (not bookkeeping)
            # over the second's (eep.runtime.accounting)
            "bookkeeping_round_ratios": [sa / sb for sa, sb in served.values() if sa is not None and sb],
            "served_share": {name: [v[i] for v in served.values()] for i, name in enumerate(names)},
            "cpu_round_ratios": [r for r in cpu_ratios if r is not None], "cpu_source": source,
            "slices": slices, "ramp_s": ramp, "slice_s": slice_s}


async def _books(client: Any) -> tuple[dict[str, Any] | None, int | None]:
    """The server's ledger (`accounting` of /membership; None if it keeps none) and its count of
    committed steps (`dataplane.steps`; None if it has no data plane)."""
    status = await membership(client)
    return status.get("accounting"), status.get("dataplane", {}).get("steps")


def _books_delta(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the ledger grew by between `a` and `b`: bookkeeping CPU seconds (all, and by what)
    and all CPU seconds."""
    if a is None or b is None:
        return None
    by = {k: b["bookkeeping_cpu_s"][k] - a["bookkeeping_cpu_s"].get(k, 0.0) for k in b["bookkeeping_cpu_s"]}
    return {"bookkeeping_cpu_s": sum(by.values()), "by": by, "cpu_s": b["cpu_s"] - a["cpu_s"]}


def cpu_summary(steady: dict[str, Any]) -> dict[str, Any]:
    """`steady_state_cpu_ratio` (the median of the rounds' CPU ratios), `steady_state_bookkeeping_ratio`
    (of the rounds' served shares) and their spreads."""
    r, k = steady["cpu_round_ratios"], steady.get("bookkeeping_round_ratios") or []
    return {"steady_state_bookkeeping_ratio": statistics.median(k) if k else None,
            "steady_state_bookkeeping_ratio_min": min(k, default=None),
            "steady_state_bookkeeping_ratio_max": max(k, default=None),
            "steady_state_bookkeeping_ratio_stdev": statistics.stdev(k) if len(k) > 1 else None,
            "steady_state_cpu_ratio": statistics.median(r) if r else None,
            "steady_state_cpu_ratio_min": min(r, default=None), "steady_state_cpu_ratio_max": max(r, default=None),
            "steady_state_cpu_ratio_stdev": statistics.stdev(r) if len(r) > 1 else None,
            "steady_state_cpu_source": steady["cpu_source"]}


# -- the same work ------------------------------------------------------------------------------
def round_ratio(a: Chunks, b: Chunks, start: float, rate_a: float, rate_b: float) -> tuple[float | None, bool]:
    """One round's ratio, `a`'s speed over `b`'s, and whether it is the rates' ratio.

    On the same work (`same_work_ratio`) where the two slices have enough work in common. A
    server several times faster than the other may have served, by `start` (the end of its
    ramp), more than (or nearly as much as) the other serves in its whole slice: with less in
    common than `_MIN_COMMON_SHARE` of what the slower of them served after the ramp (a span of
    a step or two, whose times are those of single chunks: a ratio of 0.006 was seen), the ratio
    of the slices' token rates after the ramp, `rate_a / rate_b` (leaving such a round out would
    drop exactly the largest ratios)."""
    common = _common_work(a, b, start)
    after = min(_total(a) - _count_by(a, start), _total(b) - _count_by(b, start))
    if (common is None or common[1] - common[0] < _MIN_COMMON_SHARE * after) and rate_b > 0:
        return rate_a / rate_b, True
    return same_work_ratio(a, b, start), False


def _total(chunks: Chunks) -> int:
    return sum(n for _, n in chunks)


def _count_by(chunks: Chunks, t: float) -> int:
    return sum(n for at, n in chunks if at <= t)


def _common_work(a: Chunks, b: Chunks, start: float) -> tuple[int, int] | None:
    """The token counts both had reached by `start` and both reached in all; None if empty."""
    lo = max(_count_by(a, start), _count_by(b, start))
    hi = min(_total(a), _total(b))
    return (lo, hi) if hi > lo else None


def same_work_ratio(a: Chunks, b: Chunks, start: float) -> float | None:
    """`a`'s speed over `b`'s on the same work: from (arrival time, tokens) chunks of the same
    requests, b's time over a's time from the token count both had reached by `start` to the
    count both reached in all; None if that stretch is empty."""
    span = _same_work_span(a, b, start)
    if span is None:
        return None
    (a0, a1), (b0, b1) = span
    return (b1 - b0) / (a1 - a0) if a1 > a0 else None


def same_work_cpu_ratio(a: Chunks, b: Chunks, start: float, cpu_a: list[tuple[float, float]] | None,
                        cpu_b: list[tuple[float, float]] | None) -> float | None:
    """`b`'s CPU seconds over `a`'s on the same work as `same_work_ratio` (the same token range,
    each on its own clock), from each one's (time, CPU seconds) samples; None if that stretch
    is empty or a server has no samples."""
    span = _same_work_span(a, b, start)
    if span is None or not cpu_a or not cpu_b:
        return None
    (a0, a1), (b0, b1) = span
    ca, cb = cpu_at(cpu_a, a1) - cpu_at(cpu_a, a0), cpu_at(cpu_b, b1) - cpu_at(cpu_b, b0)
    return cb / ca if ca > 0 else None


def _same_work_span(a: Chunks, b: Chunks, start: float) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """When `a`, and when `b`, reached the token count both had reached by `start` and the count
    both reached in all: ((a's from, a's to), (b's from, b's to)); None if that range is empty."""
    def cumulative(chunks: Chunks) -> tuple[list[float], list[int]]:
        return [t for t, _ in chunks], list(itertools.accumulate(n for _, n in chunks))

    (ta, na), (tb, nb) = cumulative(a), cumulative(b)

    def count_by(times: list[float], counts: list[int], t: float) -> int:
        i = bisect.bisect_right(times, t)
        return counts[i - 1] if i else 0

    lo = max(count_by(ta, na, start), count_by(tb, nb, start))
    hi = min(na[-1] if na else 0, nb[-1] if nb else 0)
    if hi <= lo:
        return None

    def span(times: list[float], counts: list[int]) -> tuple[float, float]:
        return times[bisect.bisect_left(counts, lo)], times[bisect.bisect_left(counts, hi)]

    return span(ta, na), span(tb, nb)
