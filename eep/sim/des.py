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
    run = _Run(resp, scenario, c)
    run.loop()
    return run.tl, run.figures()


class _Run:
    """One scenario's event loop: a heap of events, the decode rate piecewise constant between
    them, every membership transition a `MembershipView` commit."""

    def __init__(self, resp: Response, scenario: Scenario, c: dict[str, float]) -> None:
        self.resp, self.scenario, self.n, self.failed = resp, scenario, scenario.ep, scenario.failed
        self.per_gpu, self.prefill = c["decode_tokens_per_s_per_gpu"], c["prefill_tokens_per_s_per_gpu"]
        self.tl = Timeline(steady=self.n * self.per_gpu)
        self.view = MembershipView.initial(tuple(range(self.n)))  # one incarnation per process
        self.queue: list[tuple[float, int, str, Any]] = []
        self.seq = itertools.count()
        self.state = _State(serving=self.n)
        self.now, self.rate, self.label = 0.0, self.tl.steady, "steady"
        self._handlers = {"fail": self._on_fail, "resume": self._on_resume, "reprefill_done": self._on_reprefill_done,
                          "replacement_start": self._on_replacement_start, "switch_in": self._on_switch_in,
                          "switched_in": self._on_switched_in}

    def commit(self, t: float, new: MembershipView) -> None:
        self.tl.events.append({"t": t, "event": "view", "epoch": new.epoch, "active": len(new.active_ranks)})
        self.view = new

    def at(self, t: float, kind: str, payload: Any = None) -> None:
        heapq.heappush(self.queue, (t, next(self.seq), kind, payload))

    def set_rate(self, t: float, new_rate: float, new_label: str) -> None:
        if t > self.now:
            self.tl.segments.append((self.now, t, self.rate, self.label))
        self.now, self.rate, self.label = t, new_rate, new_label

    def reprefill_speed(self) -> float:
        return 0.0 if self.state.paused else self.state.serving * self.prefill * self.resp.reprefill_share

    def reprefill_progress(self, t: float) -> None:
        """Count the re-prefill work done since the last change, at the rate that held then."""
        st = self.state
        st.reprefill_left = max(0.0, st.reprefill_left - (t - st.reprefill_since) * self.reprefill_speed())
        st.reprefill_since = t

    def reprefill_reschedule(self, t: float) -> None:
        st = self.state
        st.reprefill_gen += 1
        if st.reprefill_left > 0 and self.reprefill_speed() > 0:
            self.at(t + st.reprefill_left / self.reprefill_speed(), "reprefill_done", st.reprefill_gen)

    def serving_rate(self) -> tuple[float, str]:
        base = self.state.serving * self.per_gpu
        if self.state.reprefill_left > 1e-9:
            return base * (1.0 - self.resp.reprefill_share), "re-prefill"
        return base, "serving" if self.state.serving == self.n else "degraded"

    def loop(self) -> None:
        if self.failed:
            self.at(self.scenario.fail_at_s, "fail")
        while self.queue:  # every event, also past the horizon: no figure is cut short
            t, _, kind, payload = heapq.heappop(self.queue)
            if kind == "reprefill_done" and payload != self.state.reprefill_gen:
                continue  # the re-prefill's speed changed after this end was planned
            self.tl.events.append({"t": t, "event": kind, "epoch": self.view.epoch,
                                   **({"phase": payload} if isinstance(payload, str) else {})})
            handler = self._handlers.get(kind)
            if handler is not None:  # phase_done only marks the timeline
                handler(t)
        self.end = max(self.scenario.horizon_s, self.now + 1.0)  # the horizon, or a second past the last event
        self.set_rate(self.end, self.rate, self.label)

    def _on_fail(self, t: float) -> None:
        resp, st = self.resp, self.state
        self.commit(t, self.view.fail(set(self.failed)))
        st.paused = True
        self.set_rate(t, 0.0, "recovery pause")
        end = t
        for i, phase in enumerate(resp.pause):
            end += phase.seconds
            self.at(end, "phase_done", phase.name)
            if i == 0 and self.scenario.rejoin and resp.replacement:  # detected: the replacement starts
                self.at(end, "replacement_start")
                st.ready_at = end + sum(p.seconds for p in resp.replacement)
        st.pause_end = end
        self.at(end, "resume")

    def _on_resume(self, t: float) -> None:
        resp, st, n = self.resp, self.state, self.n
        st.paused = False
        if resp.serving_after_pause == n:  # a new instance: every process new
            self.commit(t, MembershipView.initial(tuple(range(n, 2 * n))))
        st.serving = len(self.view.active_ranks)  # the ranks the committed view serves with
        if resp.reprefill_share > 0:
            st.reprefill_left, st.reprefill_since = resp.reprefill_tokens, t
        self.reprefill_reschedule(t)
        self.set_rate(t, *self.serving_rate())
        if st.ready_at is not None:
            self.at(max(t, st.ready_at), "switch_in")

    def _on_reprefill_done(self, t: float) -> None:
        self.state.reprefill_left, self.state.reprefill_since = 0.0, t
        self.set_rate(t, *self.serving_rate())

    def _on_replacement_start(self, t: float) -> None:
        for i, r in enumerate(self.failed):
            self.commit(t, self.view.begin_join(r, 2 * self.n + i))  # loading, not yet in the step

    def _on_switch_in(self, t: float) -> None:
        self.reprefill_progress(t)
        self.state.paused = True
        self.reprefill_reschedule(t)  # halted while paused
        self.set_rate(t, 0.0, "reintegration pause")
        self.at(t + self.resp.reintegration_s, "switched_in")

    def _on_switched_in(self, t: float) -> None:
        st = self.state
        for r in self.failed:
            self.commit(t, self.view.activate(r))
        st.reprefill_since = t
        st.paused, st.serving, st.switched = False, len(self.view.active_ranks), True
        self.reprefill_reschedule(t)  # the joiners take their share of it
        self.set_rate(t, *self.serving_rate())

    def figures(self) -> dict[str, float | None]:
        tl, st, end, t_fail = self.tl, self.state, self.end, self.scenario.fail_at_s
        back = tl.back_to(0.95, st.pause_end) if st.pause_end is not None else None
        lost = tl.steady * (end - t_fail) - tl.tokens(t_fail, end)
        if not self.failed:
            return {"recovery_pause_s": 0.0, "reintegration_pause_s": 0.0, "time_to_95_s": 0.0,
                    "unavailable_s": 0.0, "tokens_lost": lost}
        return {
            "recovery_pause_s": self.resp.pause_s,
            "reintegration_pause_s": self.resp.reintegration_s if st.switched else 0.0,  # 0.0: no rejoin planned
            "time_to_95_s": None if back is None else back - t_fail,  # None: never back to 95 % (no rejoin)
            "unavailable_s": tl.paused_s(t_fail, end),
            "tokens_lost": lost,
        }
