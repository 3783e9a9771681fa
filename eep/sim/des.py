"""The discrete-event loop: one instance's decode throughput through a failure and its repair.

What `simulate` promises, for a `Response` (eep.sim.systems) and a `Scenario`:
- before the failure every rank decodes at `decode_tokens_per_s_per_gpu`: the instance's rate
  is `ep` times that, exactly, for as long as nothing fails;
- at `fail_at_s` the failed ranks leave the membership view (eep's `MembershipView.fail`,
  one epoch) and the instance serves nothing through the response's pause phases, one event
  each; then the survivors serve; while they re-prefill the lost requests' tokens they decode
  at (1 - share) of their rate, until the re-prefill (at `prefill_tokens_per_s_per_gpu` x share
  per serving rank; halted in a pause, shared by the joiners once they are in) is done;
- a replacement's warm-up starts when the failure is detected (the end of the first pause
  phase; `begin_join`: joining, not in the step) and runs off the critical path; once it is
  ready and the survivors serve, the instance pauses for the switch-in phases and every rank
  serves again (`activate`: one epoch each);
- a system whose pause restarts every rank (no survivor serves in it) comes back with all of
  them.
Every event is run, also past `horizon_s` (the timeline then ends a second after the last one),
so no figure is cut short. `Timeline` holds the piecewise-constant rate; the figures are read off
it.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Any

from eep.membership.view import MembershipView
from eep.sim.systems import Response, Scenario


@dataclass
class Timeline:
    steady: float  # tokens/s before the failure
    segments: list[tuple[float, float, float, str]] = field(default_factory=list)  # (start, end, rate, state)
    events: list[dict[str, Any]] = field(default_factory=list)

    def rate_at(self, t: float) -> float:
        for start, end, rate, _ in self.segments:
            if start <= t < end:
                return rate
        return self.segments[-1][2]

    def tokens(self, start: float = 0.0, end: float | None = None) -> float:
        end = self.segments[-1][1] if end is None else end
        return sum(rate * max(0.0, min(e, end) - max(s, start)) for s, e, rate, _ in self.segments)

    def paused_s(self, start: float, end: float) -> float:
        return sum(max(0.0, min(e, end) - max(s, start)) for s, e, rate, _ in self.segments if rate == 0)

    def back_to(self, share: float, after: float) -> float | None:
        """The first time >= `after` from which the rate is at least `share` of the steady one."""
        for s, e, rate, _ in self.segments:
            if e > after and rate >= share * self.steady:
                return max(s, after)
        return None


@dataclass
class _State:
    serving: int  # ranks serving
    paused: bool = False
    reprefill_left: float = 0.0  # tokens still to prefill again
    reprefill_since: float = 0.0  # the last time `reprefill_left` was brought up to date
    reprefill_gen: int = 0  # the current re-prefill end event (older ones are stale)
    ready_at: float | None = None  # when the replacement is ready to switch in
    pause_end: float | None = None
    switched: bool = False


def simulate(resp: Response, scenario: Scenario, c: dict[str, float]) -> tuple[Timeline, dict[str, float | None]]:
    n, failed = scenario.ep, scenario.failed
    per_gpu, prefill = c["decode_tokens_per_s_per_gpu"], c["prefill_tokens_per_s_per_gpu"]
    tl = Timeline(steady=n * per_gpu)
    view = MembershipView.initial(tuple(range(n)))  # one incarnation per process
    queue: list[tuple[float, int, str, Any]] = []
    seq = itertools.count()

    def commit(t: float, new: MembershipView) -> MembershipView:
        tl.events.append({"t": t, "event": "view", "epoch": new.epoch, "active": len(new.active_ranks)})
        return new

    def at(t: float, kind: str, payload: Any = None) -> None:
        heapq.heappush(queue, (t, next(seq), kind, payload))

    state = _State(serving=n)
    now, rate, label = 0.0, tl.steady, "steady"

    def set_rate(t: float, new_rate: float, new_label: str) -> None:
        nonlocal now, rate, label
        if t > now:
            tl.segments.append((now, t, rate, label))
        now, rate, label = t, new_rate, new_label

    def reprefill_speed() -> float:
        return 0.0 if state.paused else state.serving * prefill * resp.reprefill_share

    def reprefill_progress(t: float) -> None:
        """Count the re-prefill work done since the last change, at the rate that held then."""
        state.reprefill_left = max(0.0, state.reprefill_left - (t - state.reprefill_since) * reprefill_speed())
        state.reprefill_since = t

    def reprefill_reschedule(t: float) -> None:
        state.reprefill_gen += 1
        if state.reprefill_left > 0 and reprefill_speed() > 0:
            at(t + state.reprefill_left / reprefill_speed(), "reprefill_done", state.reprefill_gen)

    def serving_rate(t: float) -> tuple[float, str]:
        base = state.serving * per_gpu
        if state.reprefill_left > 1e-9:
            return base * (1.0 - resp.reprefill_share), "re-prefill"
        return base, "serving" if state.serving == n else "degraded"

    if failed:
        at(scenario.fail_at_s, "fail")
    while queue:  # every event, also past the horizon: no figure is cut short
        t, _, kind, payload = heapq.heappop(queue)
        if kind == "reprefill_done" and payload != state.reprefill_gen:
            continue  # the re-prefill's speed changed after this end was planned
        tl.events.append({"t": t, "event": kind, "epoch": view.epoch,
                          **({"phase": payload} if isinstance(payload, str) else {})})
        if kind == "fail":
            view = commit(t, view.fail(set(failed)))
            state.paused = True
            set_rate(t, 0.0, "recovery pause")
            end = t
            for i, phase in enumerate(resp.pause):
                end += phase.seconds
                at(end, "phase_done", phase.name)
                if i == 0 and scenario.rejoin and resp.replacement:  # detected: the replacement starts
                    at(end, "replacement_start")
                    state.ready_at = end + sum(p.seconds for p in resp.replacement)
            state.pause_end = end
            at(end, "resume")
        elif kind == "resume":
            state.paused = False
            if resp.serving_after_pause == n:  # a new instance: every process new
                view = commit(t, MembershipView.initial(tuple(range(n, 2 * n))))
            state.serving = len(view.active_ranks)  # the ranks the committed view serves with
            if resp.reprefill_share > 0:
                state.reprefill_left, state.reprefill_since = resp.reprefill_tokens, t
            reprefill_reschedule(t)
            set_rate(t, *serving_rate(t))
            if state.ready_at is not None:
                at(max(t, state.ready_at), "switch_in")
        elif kind == "reprefill_done":
            state.reprefill_left, state.reprefill_since = 0.0, t
            set_rate(t, *serving_rate(t))
        elif kind == "replacement_start":
            for i, r in enumerate(failed):
                view = commit(t, view.begin_join(r, 2 * n + i))  # loading, not yet in the step
        elif kind == "switch_in":
            reprefill_progress(t)
            state.paused = True
            reprefill_reschedule(t)  # halted while paused
            set_rate(t, 0.0, "reintegration pause")
            end = t + resp.reintegration_s
            at(end, "switched_in")
        elif kind == "switched_in":
            for r in failed:
                view = commit(t, view.activate(r))
            state.reprefill_since = t
            state.paused, state.serving, state.switched = False, len(view.active_ranks), True
            reprefill_reschedule(t)  # the joiners take their share of it
            set_rate(t, *serving_rate(t))
    end = max(scenario.horizon_s, now + 1.0)  # the horizon, or a second past the last event
    set_rate(end, rate, label)
    t_fail = scenario.fail_at_s
    back = tl.back_to(0.95, state.pause_end) if state.pause_end is not None else None
    lost = tl.steady * (end - t_fail) - tl.tokens(t_fail, end)
    if not failed:
        return tl, {"recovery_pause_s": 0.0, "reintegration_pause_s": 0.0, "time_to_95_s": 0.0,
                    "unavailable_s": 0.0, "tokens_lost": lost}
    figures = {
        "recovery_pause_s": resp.pause_s,
        "reintegration_pause_s": resp.reintegration_s if state.switched else 0.0,  # 0.0: no rejoin planned
        "time_to_95_s": None if back is None else back - t_fail,  # None: never back to 95 % (no rejoin)
        "unavailable_s": tl.paused_s(t_fail, end),
        "tokens_lost": lost,
    }
    return tl, figures
