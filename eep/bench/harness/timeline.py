"""The token timeline as the clients saw it, and the figures read off it.

Every streamed chunk is an (arrival time, tokens) pair (`clients.RequestRecord.chunks`; the
recovery bench's engine steps are the same pairs: the time at a step's end, the tokens it
committed). From those: the series of committed tokens per `BIN_S` (`token_bins`, `rate`, the
plots' `moving_rates`), the gaps between arrivals (`longest_gap`: the stretch around an
interval; `gap_within`: clipped to it; `normal_gap`: the step cadence, the median of windows'
longest gaps), and the recovery of the rate after a fault: `pre_fault_rate` (the median of
per-window rates before it: one short burst does not set the bar) and `time_to` / `time_to_95`
(the first window, and the one after it, back at the target).
"""

from __future__ import annotations

import bisect
import itertools
import statistics
from collections.abc import Iterable, Iterator, Sequence

from eep.bench.harness.clients import RequestRecord

BIN_S = 0.1  # the series' resolution: committed tokens per 100 ms
WINDOW_S = 0.5  # time_to's and pre_fault_rate's window, the plots' moving average
# The closed loop's start is left out of steady-state rates: its requests start together and
# decode in lockstep (no prefill beside them) until the first ones end, a peak ~30% above the
# mixed load that follows (2-3 s with 24-72 output tokens)
STEADY_FROM_S = 3.0

Chunks = Sequence[tuple[float, int]]  # (arrival time, tokens), sorted by time


def arrivals(records: Iterable[RequestRecord]) -> list[float]:
    """Every chunk's arrival time, sorted."""
    return sorted(t for r in records for t, _ in r.chunks)


def chunks(records: Iterable[RequestRecord]) -> list[tuple[float, int]]:
    """Every chunk, sorted by arrival."""
    return sorted(c for r in records for c in r.chunks)


def token_bins(records: Iterable[RequestRecord], last: float) -> list[int]:
    """Tokens that arrived in each `BIN_S` from 0 up to `last` (the latest arrival)."""
    bins = [0] * (int(last / BIN_S) + 1)
    for r in records:
        for t, n in r.chunks:
            bins[int(t / BIN_S)] += n
    return bins


def rate(bins: list[int], start: float, stop: float) -> float:
    """Tokens/s of `token_bins` over [start, stop) (whole bins)."""
    lo, hi = int(round(start / BIN_S)), int(round(stop / BIN_S))
    return sum(bins[lo:hi]) / ((hi - lo) * BIN_S) if hi > lo else 0.0


def moving_rates(bins: list[int], window: float = WINDOW_S) -> tuple[list[float], list[float]]:
    """(each bin's end, tokens/s over the `window` up to it): the plots' curve."""
    smooth = int(round(window / BIN_S))
    rates = [sum(bins[max(0, i - smooth + 1):i + 1]) / (min(i + 1, smooth) * BIN_S) for i in range(len(bins))]
    return [(i + 1) * BIN_S for i in range(len(bins))], rates


def longest_gap(arrivals: list[float], start: float, stop: float) -> float:
    """The longest stretch between consecutive arrivals that ends after `start` and begins
    before `stop` (a stretch with no arrival on one side counts to that bound)."""
    inside = [t for t in arrivals if start < t < stop]
    before = [t for t in arrivals if t <= start][-1:] or [start]
    after = [t for t in arrivals if t >= stop][:1] or [stop]
    points = before + inside + after
    return max(b - a for a, b in zip(points, points[1:]))


def gap_within(arrivals: list[float], start: float, stop: float) -> float:
    """The longest stretch in [start, stop] without a time of `arrivals` (sorted) inside."""
    if stop <= start:
        return 0.0
    inside = arrivals[bisect.bisect_right(arrivals, start):bisect.bisect_left(arrivals, stop)]
    points = [start, *inside, stop]
    return max(y - x for x, y in zip(points, points[1:]))


def normal_gap(arrivals: list[float], start: float, stop: float, window: float = 0.5) -> float:
    """The median over the `window`-second windows in [start, stop) of each one's longest gap
    between arrivals (the step cadence as clients see it; one slow step does not move it)."""
    gaps = [longest_gap(arrivals, a, a + window)
            for a in (start + k * window for k in range(int((stop - start) / window)))]
    return statistics.median(gaps) if gaps else 0.0


class _Cumulative:
    """Tokens that arrived in (start, stop], from the running sum of `chunks`."""

    def __init__(self, chunks: Chunks) -> None:
        self.times = [t for t, _ in chunks]
        self.cum = list(itertools.accumulate((n for _, n in chunks), initial=0))

    def rate(self, start: float, stop: float) -> float:
        tokens = self.cum[bisect.bisect_right(self.times, stop)] - self.cum[bisect.bisect_right(self.times, start)]
        return tokens / (stop - start)


def window_rate(chunks: Chunks, start: float, stop: float) -> float:
    """Tokens/s of the chunks that arrived in (start, stop]; 0 if the stretch is empty."""
    return _Cumulative(chunks).rate(start, stop) if stop > start else 0.0


def pre_fault_rate(chunks: Chunks, start: float, stop: float, window: float = WINDOW_S) -> float:
    """The rate a recovery is measured against: the median over the whole `window`-second
    windows from `start` to `stop` of each one's tokens/s (a burst shorter than half the
    windows does not move it, where the mean over the stretch would take it in); the mean
    over (start, stop] if no whole window fits, 0 if the stretch is empty."""
    if stop <= start:
        return 0.0
    cum = _Cumulative(chunks)
    rates = [cum.rate(a, a + window) for a in (start + k * window for k in range(int((stop - start) / window)))]
    return statistics.median(rates) if rates else cum.rate(start, stop)


def _grid(since: float, last: float) -> Iterator[tuple[float, float]]:
    """(offset, start) of window starts every `BIN_S` from `since` while two windows fit before `last`."""
    k = 0
    while (start := since + k * BIN_S) + 2 * WINDOW_S <= last:
        yield k * BIN_S, start
        k += 1


def time_to(chunks: Chunks, since: float, target: float, starts: Iterable[float] | None = None) -> float | None:
    """Seconds from `since` until the rate over a `WINDOW_S` window, and over the window after
    it, each reach `target` tokens/s; None if no window start does. The window starts tried:
    every `BIN_S` from `since` while both windows fit in the series, or `starts` (each >= since)."""
    if not chunks:
        return None
    cum = _Cumulative(chunks)
    tried = _grid(since, cum.times[-1]) if starts is None else ((s - since, s) for s in starts)
    for offset, start in tried:
        if cum.rate(start, start + WINDOW_S) >= target and cum.rate(start + WINDOW_S, start + 2 * WINDOW_S) >= target:
            return offset
    return None


def time_to_95(chunks: Chunks, since: float, before: float,
               starts: Iterable[float] | None = None) -> tuple[float, bool]:
    """(`time_to` 95% of the rate `before`, True), or, if the rate is not back within the
    series, (the series' span after `since`, False): never None, a lower bound flagged."""
    t = time_to(chunks, since, 0.95 * before, starts)
    if t is not None:
        return t, True
    return max(0.0, (chunks[-1][0] if chunks else since) - since), False
