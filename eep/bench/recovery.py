"""Recovery from one SIGKILLed rank under steady load, and the rank's reintegration.

What `run_recovery_bench` promises: an instance of `ep_size` ranks serves a closed loop of
`concurrency` requests (seeded random token-id prompts, greedy, EOS ignored, so each runs
exactly `output_len` tokens; a finished request is replaced at once). After `fault_at_s` of
steady serving one rank is SIGKILLed; `rejoin_after_s` later its rejoin is requested; serving
goes on for `tail_s` after the rank is back. Every engine step is recorded (wall time at its
end, tokens committed in it): the token timeline of `eep.bench.harness.timeline`, whose
figures these are. From that series:
- `recovery_pause_s`: the longest stretch without a committed token that starts at or after
  the last commit before the kill and ends within the recovery (the pause users see);
- `reintegration_pause_s`: the same around the step boundary where the rank is switched in,
  minus the median step time of that window (what switching in adds to a step);
- `rejoin_s`: from the rejoin request to the switch-in (the new process's start, load and
  warm-up while the others serve; with the fork server, no interpreter start);
- `pre_fault_tokens_per_s`: the median of the 0.5 s windows' token rates over the 2 s before
  the kill (`timeline.pre_fault_rate`: a short burst does not set a bar the load never reaches
  again, as the mean over the stretch did: 608 tok/s once, and `time_to_95_s` was null);
- `time_to_95_s`: from the kill until tokens/s over a sliding window (ending at a step) is
  back to 95% of the pre-fault rate and stays there for the window after it; `reached_95`
  says whether it was: if not within the run, `time_to_95_s` is the time from the kill to the
  run's last step, a lower bound (never None); `post_fault_tokens_per_s`: the rate over the
  2 s from that point on (None if the rate never came back);
- `requests_lost`: requests that never finished; `outputs_differing`: requests whose tokens
  differ from the same requests served again, fault-free, by the repaired instance (greedy
  outputs do not depend on batch or placement, so any difference is a wrong token).
"""

from __future__ import annotations

import logging
import os
import signal
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from eep.bench.harness import BenchFailed, provenance, timeline
from eep.bench.steady import FIRST_PROMPT_ID, checkpoint_vocab
from eep.config import EngineConfig
from eep.control.config import EPConfig
from eep.control.executor import EPExecutor
from eep.engine.engine import LLMEngine
from eep.engine.request import Request
from eep.engine.sampling import SamplingParams
from eep.errors import ConfigError
from eep.membership.view import RankState

logger = logging.getLogger(__name__)

_PRE_FAULT_S = 2.0  # the stretch before the kill the pre-fault rate is read over
_RECOVER_TIMEOUT_S = 120.0


@dataclass(slots=True)
class _Run:
    """What the timed loop saw, on its clock (seconds since the load started)."""

    requests: list[Request] = field(default_factory=list)
    series: list[tuple[float, int]] = field(default_factory=list)  # (time at a step's end, tokens committed in it)
    t_kill: float | None = None
    t_rejoin: float | None = None
    t_back: float | None = None
    kill_wall: float = 0.0


def run_recovery_bench(
    model_path: str,
    *,
    ep_size: int = 4,
    victim: int = 1,
    concurrency: int = 32,
    prompt_len: int = 32,
    output_len: int = 48,
    fault_at_s: float = 4.0,
    rejoin_after_s: float = 3.0,
    tail_s: float = 4.0,
    num_redundant_experts: int = 0,
    failure_timeout_s: float = 1.0,
    dtype: str = "auto",
    seed: int = 0,
    fork_server: bool = True,
) -> dict[str, Any]:
    if not 0 <= victim < ep_size or ep_size < 2:
        raise ConfigError(f"need ep_size >= 2 and a victim in 0..{ep_size - 1}")
    settings = {"ep_size": ep_size, "victim": victim, "concurrency": concurrency, "prompt_len": prompt_len,
                "output_len": output_len, "num_redundant_experts": num_redundant_experts,
                "failure_timeout_s": failure_timeout_s, "dtype": dtype, "seed": seed, "model_path": model_path,
                "fork_server": fork_server}
    vocab = checkpoint_vocab(model_path)
    g = torch.Generator().manual_seed(seed)
    params = SamplingParams(max_tokens=output_len, ignore_eos=True)
    engine, ex = _engine(settings)

    def prompt() -> list[int]:
        return torch.randint(FIRST_PROMPT_ID, vocab, (prompt_len,), generator=g).tolist()  # type: ignore[no-any-return]

    try:
        warm = [engine.add_request(prompt(), params) for _ in range(concurrency)]
        while not all(r.finished for r in warm):
            engine.step()
        run = _drive(engine, ex, prompt, params, concurrency=concurrency, victim=victim, fault_at_s=fault_at_s,
                     rejoin_after_s=rejoin_after_s, tail_s=tail_s)
        lost = sum(not r.finished for r in run.requests)
        # the same requests again, fault-free, on the repaired instance
        again = engine.generate([r.prompt_ids for r in run.requests], params)
        differing = sum(a.output_ids != r.output_ids for a, r in zip(again, run.requests))
    finally:
        engine.close()
    return {
        **_figures(run, ex),
        "requests_lost": lost,
        "outputs_differing": differing,
        "requests": len(run.requests),
        "repairs": list(ex.repairs),
        "events": [e.to_dict() for e in ex.events],
        "series": {"t": [round(t, 4) for t, _ in run.series], "tokens": [n for _, n in run.series]},
        "config": settings,
        **provenance(),
    }


def _engine(settings: dict[str, Any]) -> tuple[LLMEngine, EPExecutor]:
    """The instance under test, from the bench's settings."""
    per_rank = -(-settings["concurrency"] // (settings["ep_size"] - 1))  # survivors must hold every running request
    config = EngineConfig(settings["model_path"], dtype=settings["dtype"], max_num_seqs=per_rank,
                          max_model_len=settings["prompt_len"] + settings["output_len"] + 8, progress=False)
    ep = EPConfig(ep_size=settings["ep_size"], num_redundant_experts=settings["num_redundant_experts"],
                  failure_timeout_s=settings["failure_timeout_s"], fork_server=settings["fork_server"])
    engine = LLMEngine(config, EPExecutor(config, ep))
    ex = engine.executor
    assert isinstance(ex, EPExecutor)
    return engine, ex


def _drive(engine: LLMEngine, ex: EPExecutor, prompt: Callable[[], list[int]], params: SamplingParams, *, concurrency: int, victim: int,
           fault_at_s: float, rejoin_after_s: float, tail_s: float) -> _Run:
    """The closed loop, step by step: the kill, the rejoin, `tail_s` after the rank is back,
    then every running request finished."""
    run = _Run()
    t0 = time.monotonic()
    while True:
        now = time.monotonic() - t0
        running = [r for r in run.requests if not r.finished]
        if run.t_back is None or now < run.t_back + tail_s:
            run.requests += [engine.add_request(prompt(), params) for _ in range(concurrency - len(running))]
        elif not running:
            return run
        if run.t_kill is None and now >= fault_at_s:
            os.kill(ex.pids()[victim], signal.SIGKILL)
            run.t_kill, run.kill_wall = time.monotonic() - t0, time.time()
        if run.t_kill is not None and run.t_rejoin is None and now >= run.t_kill + rejoin_after_s \
                and ex.view.states[victim] is RankState.FAILED:
            ex.rejoin(victim)
            run.t_rejoin = time.monotonic() - t0
        before = sum(len(r.output_ids) for r in run.requests)
        engine.step()
        run.series.append((time.monotonic() - t0, sum(len(r.output_ids) for r in run.requests) - before))
        if run.t_rejoin is not None and run.t_back is None and ex.view.states[victim] is RankState.ACTIVE:
            run.t_back = time.monotonic() - t0
        if now > fault_at_s + rejoin_after_s + tail_s + _RECOVER_TIMEOUT_S:
            raise BenchFailed(f"the instance did not recover within {_RECOVER_TIMEOUT_S:.0f} s")


def _figures(run: _Run, ex: EPExecutor) -> dict[str, Any]:
    """The module docstring's figures from the step series."""
    t_kill, t_back, series = run.t_kill, run.t_back, run.series
    assert t_kill is not None and t_back is not None and run.t_rejoin is not None
    fault = next(e for e in ex.events if e.kind == "fault_seen")
    commits = [t for t, n in series if n > 0]
    last_before = max((t for t in commits if t <= t_kill), default=0.0)
    first_after = min(t for t in commits if t > t_kill)
    # reintegration: around t_back, the gap between commits minus a typical step
    window = [t for t in commits if t_back - 2.0 <= t <= t_back + 2.0]
    gaps = [b - a for a, b in zip(window, window[1:])]
    typical = statistics.median(gaps) if gaps else 0.0
    around = [b - a for a, b in zip(window, window[1:]) if a <= t_back <= b + 1e-9 or abs(b - t_back) < 0.2]
    rate_before = timeline.pre_fault_rate(series, max(0.0, t_kill - _PRE_FAULT_S), t_kill)
    # sliding windows that end at a step: one window, and the one after it, back at the target
    starts = [t - timeline.WINDOW_S for t, _ in series if t > t_kill + timeline.WINDOW_S]
    time_to_95, reached = timeline.time_to_95(series, t_kill, rate_before, starts)
    return {
        "recovery_pause_s": first_after - last_before,
        "reintegration_pause_s": max(0.0, max(around, default=typical) - typical),
        "time_to_95_s": time_to_95,
        "reached_95": reached,
        "rejoin_s": t_back - run.t_rejoin,
        "pre_fault_tokens_per_s": rate_before,
        "post_fault_tokens_per_s": timeline.window_rate(series, t_kill + time_to_95, t_kill + time_to_95 + 2.0)
        if reached else None,
        "median_step_s": typical,
        "times": {"kill": t_kill, "rejoin_requested": run.t_rejoin, "rejoined": t_back,
                  "detected_after_kill_s": fault.time - run.kill_wall},
    }
