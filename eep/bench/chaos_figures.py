"""The chaos soak's figures and its record, from what the soak saw (`eep.bench.chaos`).

The stretches the figures look at: work pending (a streaming request in flight) while every
rank is `active` in the server's committed view (`view_timeline`: its `view_committed`
events' structured `active` field and commit time; the polls where it names none). In them,
`stuck_stretch` is the longest stretch without a token (`stuck_s`), `normal_gap` the median of
1 s windows' longest stretch (`normal_gap_s`, for scale). Each action's `pause_s` is the
longest stretch without a token until the next action (`eep.bench.harness.timeline.gap_within`).
`result` assembles the summary and the whole record (module docstring of `eep.bench.chaos`).
"""

from __future__ import annotations

import bisect
import statistics
from typing import TYPE_CHECKING, Any

from eep.bench.chaos_load import ChaosRequest
from eep.bench.harness import provenance
from eep.bench.harness.timeline import gap_within

if TYPE_CHECKING:
    from eep.bench.chaos import ChaosRun

Stretches = list[tuple[float, float]]


def eligible(samples: list[tuple[float, bool]], pending: Stretches, end: float) -> Stretches:
    """The stretches during which some interval of `pending` is open and the latest sample (a
    poll: time, every rank active) says True; a sample holds until the next (the last until `end`)."""
    active: Stretches = []
    for (t, ok), nxt in zip(samples, [s[0] for s in samples[1:]] + [end]):
        if ok and nxt > t:
            if active and active[-1][1] >= t:
                active[-1] = (active[-1][0], nxt)
            else:
                active.append((t, nxt))
    return _intersect(active, _union(pending))


def view_timeline(samples: list[tuple[float, bool]], events: list[dict[str, Any]],
                  num_ranks: int) -> list[tuple[float, bool]]:
    """(time, every rank active) at each view the server committed, from its own
    `view_committed` events (exact times; a poll sees a change up to a poll period late), after
    the first poll's state; the polled `samples` themselves if the events name no view."""
    views = []
    for e in events:
        if e["kind"] == "view_committed":
            views.append((float(e["t"]), len(e["active"]) == num_ranks))
    if not views or not samples:
        return samples
    first = samples[0]
    return [first, *sorted(v for v in views if v[0] > first[0])]


def stuck_stretch(samples: list[tuple[float, bool]], pending: Stretches, arrivals: list[float],
                  end: float) -> tuple[float, float, float]:
    """(length, start, stop) of the longest stretch within `eligible(samples, pending, end)` in
    which no time of `arrivals` falls."""
    arrivals = sorted(arrivals)
    best = (0.0, 0.0, 0.0)
    for a, b in eligible(samples, pending, end):
        inside = arrivals[bisect.bisect_right(arrivals, a):bisect.bisect_left(arrivals, b)]
        points = [a, *inside, b]
        for x, y in zip(points, points[1:]):
            if y - x > best[0]:
                best = (y - x, x, y)
    return best


def normal_gap(arrivals: list[float], stretches: Stretches, window: float = 1.0) -> float | None:
    """The median, over the `window`-second windows that fit in `stretches`, of each one's
    longest stretch without an arrival (the step cadence as the clients see it); None if no
    window fits."""
    gaps = [gap_within(arrivals, a + k * window, a + (k + 1) * window)
            for a, b in stretches for k in range(int((b - a) / window))]
    return statistics.median(gaps) if gaps else None


def _union(intervals: Stretches) -> Stretches:
    out: Stretches = []
    for a, b in sorted(i for i in intervals if i[1] > i[0]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _intersect(xs: Stretches, ys: Stretches) -> Stretches:
    out, i, j = [], 0, 0
    while i < len(xs) and j < len(ys):
        a, b = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        if a < b:
            out.append((a, b))
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return out


# -- the record ---------------------------------------------------------------------------------
def _stuck(chaos: ChaosRun, reqs: list[ChaosRequest], load_end: float,
           num_ranks: int) -> tuple[tuple[float, float, float], float | None]:
    """`stuck_stretch` and `normal_gap` of the soak, from its steady point on."""
    arrivals = sorted(t for r in reqs for t, _ in r.rec.chunks)
    pending = [(r.rec.start, r.end if r.end is not None else load_end) for r in reqs if r.stream]
    # from the point every client was served on (the ramp's prefills commit no token for steps)
    steady = chaos.times.get("steady", 0.0)
    pending = [(max(a, steady), b) for a, b in pending]
    views = view_timeline(chaos.watch.samples, chaos.watch.events, num_ranks)
    return stuck_stretch(views, pending, arrivals, load_end), normal_gap(arrivals, eligible(views, pending, load_end))


def _actions(chaos: ChaosRun, arrivals: list[float], load_stop: float) -> list[dict[str, Any]]:
    """The actions in time order, each with its `pause_s` (until the next, the last until the load stopped)."""
    actions = sorted(chaos.acts.actions, key=lambda a: a["t"])
    for a, nxt in zip(actions, [a["t"] for a in actions[1:]] + [load_stop]):
        a["pause_s"] = round(gap_within(arrivals, a["t"], max(nxt, a["t"])), 4)
    return actions


def _series(reqs: list[ChaosRequest], load_end: float) -> list[int]:
    """Tokens that arrived in each second of the load."""
    series = [0] * (int(load_end) + 1)
    for r in reqs:
        for t, n in r.rec.chunks:
            series[min(int(t), len(series) - 1)] += n
    return series


def _brief(r: ChaosRequest, reference: dict[int, list[int]]) -> dict[str, Any]:
    ref = reference.get(r.rec.index)
    first = next((k for k, (a, b) in enumerate(zip(r.rec.token_ids, ref or [])) if a != b), None)
    return {"index": r.rec.index, "stream": r.stream, "start": round(r.rec.start, 4),
            "end": None if r.end is None else round(r.end, 4), "tokens": len(r.rec.token_ids),
            "max_tokens": r.rec.max_tokens, "error": r.rec.error, "first_difference_at": first}


def _failed(chaos: ChaosRun, summary: dict[str, Any], stuck: float, reference_error: str | None) -> bool:
    """Whether the run shows a failure (its log is then kept)."""
    return bool(summary["requests_lost"] or summary["outputs_differing"] or reference_error
                or stuck >= chaos.failure_timeout_s + 1.0 or not chaos.healthy_at_end or not chaos.settled
                or summary["processes_left"] or summary["shm_left"] or chaos.server_exit_code not in (0, None))


def result(chaos: ChaosRun, reference: dict[int, list[int]], reference_error: str | None,
           left: dict[str, list[Any]], ref_left: dict[str, list[Any]], config: dict[str, Any]) -> dict[str, Any]:
    """The soak's JSON-able record (its keys: the module docstring of `eep.bench.chaos`)."""
    reqs = [r for r in chaos.load.requests if r.box]
    load_stop = chaos.times.get("load_stop", chaos.watch.now())
    load_end = chaos.times.get("load_end", max((r.end or 0.0 for r in reqs), default=load_stop))
    (stuck, stuck_from, stuck_to), normal = _stuck(chaos, reqs, load_end, config["ep_size"])
    actions = _actions(chaos, sorted(t for r in reqs for t, _ in r.rec.chunks), load_stop)
    completed = [r for r in reqs if r.complete]
    lost = [r for r in reqs if not r.complete]
    differing = ([r for r in completed if reference.get(r.rec.index) != r.rec.token_ids]
                 if reference_error is None else [])
    summary = _summary(chaos, reqs, actions, stuck=stuck, normal=normal, completed=len(completed), lost=len(lost),
                       differing=len(differing) if reference_error is None else None, left=left, ref_left=ref_left,
                       seed=config["seed"])
    return {
        "summary": summary,
        "failed": _failed(chaos, summary, stuck, reference_error),
        "stuck": {"s": round(stuck, 4), "from": round(stuck_from, 4), "to": round(stuck_to, 4)},
        "actions": actions,
        "lost": [_brief(r, reference) for r in lost[:50]],
        "differing": [_brief(r, reference) for r in differing[:50]],
        "reference_error": reference_error,
        "times": {k: round(v, 4) for k, v in chaos.times.items()},
        "server_exit_code": chaos.server_exit_code,
        "poll_failures": chaos.watch.poll_failures,
        "tokens_per_second": _series(reqs, load_end),
        "requests_fields": ["index", "stream", "start", "first_token", "end", "tokens", "complete"],
        "requests": [[r.rec.index, r.stream, round(r.rec.start, 3),
                      round(r.rec.chunks[0][0], 3) if r.rec.chunks else None,
                      None if r.end is None else round(r.end, 3), len(r.rec.token_ids), r.complete] for r in reqs],
        "view_changes": chaos.watch.view_changes,
        "events": chaos.watch.events,
        "leftovers": {"chaos": left, "reference": ref_left},
        "config": config,
        "server_log": None,
        **provenance(),
    }


def _summary(chaos: ChaosRun, reqs: list[ChaosRequest], actions: list[dict[str, Any]], *, stuck: float,
             normal: float | None, completed: int, lost: int, differing: int | None, left: dict[str, list[Any]],
             ref_left: dict[str, list[Any]], seed: int) -> dict[str, Any]:
    bound = None if normal is None else chaos.failure_timeout_s + normal
    kinds: dict[str, int] = {}
    for a in actions:
        kinds[a["fault"]] = kinds.get(a["fault"], 0) + 1
    return {
        "requests_started": len(reqs),
        "requests_completed": completed,
        "requests_lost": lost,
        "outputs_differing": differing,
        "stuck_s": round(stuck, 4),
        "normal_gap_s": None if normal is None else round(normal, 4),
        "stuck_bound_s": None if bound is None else round(bound, 4),
        "stuck_within_bound": None if bound is None else stuck < bound,
        "max_pause_s": max((a["pause_s"] for a in actions), default=0.0),
        "actions": len(actions),
        "healthy_at_end": chaos.healthy_at_end,
        "processes_left": len(left["processes"]) + len(ref_left["processes"]),
        "shm_left": len(left["shm"]) + len(ref_left["shm"]),
        "tokens": sum(len(r.rec.token_ids) for r in reqs),
        "actions_by_fault": kinds,
        "settled": chaos.settled,
        "seed": seed,
    }
