"""Recovery from one SIGKILLed rank under steady load, and the rank's reintegration.

What `run_recovery_bench` promises: an instance of `ep_size` ranks serves a closed loop of
`concurrency` requests (seeded random token-id prompts, greedy, EOS ignored, so each runs
exactly `output_len` tokens; a finished request is replaced at once). After `fault_at_s` of
steady serving one rank is SIGKILLed; `rejoin_after_s` later its rejoin is requested; serving
goes on for `tail_s` after the rank is back. Every engine step is recorded (wall time at its
end, tokens committed in it). From that series:
- `recovery_pause_s`: the longest stretch without a committed token that starts at or after
  the last commit before the kill and ends within the recovery (the pause users see);
- `reintegration_pause_s`: the same around the step boundary where the rank is switched in,
  minus the median step time of that window (what switching in adds to a step);
- `rejoin_s`: from the rejoin request to the switch-in (the new process's start, load and
  warm-up while the others serve; with the fork server, no interpreter start);
- `time_to_95_s`: from the kill until tokens/s over a sliding window is back to 95% of the
  pre-fault rate and stays there for the window; None (JSON null) if that never happens
  within the run;
- `requests_lost`: requests that never finished; `outputs_differing`: requests whose tokens
  differ from the same requests served again, fault-free, by the repaired instance (greedy
  outputs do not depend on batch or placement, so any difference is a wrong token).
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import statistics
import time
from typing import Any

import torch

from eep.config import EngineConfig
from eep.engine.engine import LLMEngine
from eep.engine.request import Request
from eep.engine.sampling import SamplingParams
from eep.bench.steady import FIRST_PROMPT_ID, checkpoint_vocab
from eep.errors import ConfigError
from eep.membership.view import RankState
from eep.runtime.executor import EPConfig, EPExecutor

logger = logging.getLogger(__name__)

_WINDOW_S = 0.5  # sliding window of the throughput series


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
    vocab = checkpoint_vocab(model_path)
    g = torch.Generator().manual_seed(seed)
    per_rank = -(-concurrency // (ep_size - 1))  # survivors must hold every running request
    config = EngineConfig(model_path, dtype=dtype, max_num_seqs=per_rank, max_model_len=prompt_len + output_len + 8,
                          progress=False)
    ep = EPConfig(ep_size=ep_size, num_redundant_experts=num_redundant_experts, failure_timeout_s=failure_timeout_s,
                  fork_server=fork_server)
    params = SamplingParams(max_tokens=output_len, ignore_eos=True)
    engine = LLMEngine(config, EPExecutor(config, ep))
    ex = engine.executor
    assert isinstance(ex, EPExecutor)
    try:
        warm = [engine.add_request(torch.randint(FIRST_PROMPT_ID, vocab, (prompt_len,), generator=g).tolist(), params)
                for _ in range(concurrency)]
        while not all(r.finished for r in warm):
            engine.step()
        requests: list[Request] = []
        series: list[tuple[float, int]] = []  # (time at the end of a step, tokens committed in it)
        t0 = time.monotonic()
        t_kill = t_rejoin = t_back = None
        kill_wall = 0.0
        while True:
            now = time.monotonic() - t0
            running = [r for r in requests if not r.finished]
            if t_back is None or now < t_back + tail_s:
                for _ in range(concurrency - len(running)):
                    prompt = torch.randint(FIRST_PROMPT_ID, vocab, (prompt_len,), generator=g).tolist()
                    requests.append(engine.add_request(prompt, params))
            elif not running:
                break
            if t_kill is None and now >= fault_at_s:
                os.kill(ex.pids()[victim], signal.SIGKILL)
                t_kill, kill_wall = time.monotonic() - t0, time.time()
            if t_kill is not None and t_rejoin is None and now >= t_kill + rejoin_after_s \
                    and ex.view.states[victim] is RankState.FAILED:
                ex.rejoin(victim)
                t_rejoin = time.monotonic() - t0
            before = sum(len(r.output_ids) for r in requests)
            engine.step()
            series.append((time.monotonic() - t0, sum(len(r.output_ids) for r in requests) - before))
            if t_rejoin is not None and t_back is None and ex.view.states[victim] is RankState.ACTIVE:
                t_back = time.monotonic() - t0
            if now > fault_at_s + rejoin_after_s + tail_s + 120:
                raise ConfigError("the instance did not recover within 120 s")
        lost = sum(not r.finished for r in requests)
        # the same requests again, fault-free, on the repaired instance
        again = engine.generate([r.prompt_ids for r in requests], params)
        differing = sum(a.output_ids != r.output_ids for a, r in zip(again, requests))
    finally:
        engine.close()
    assert t_kill is not None and t_back is not None
    fault = next(e for e in ex.events if e.kind == "fault_seen")
    commits = [t for t, n in series if n > 0]
    last_before = max((t for t in commits if t <= t_kill), default=0.0)
    first_after = min(t for t in commits if t > t_kill)
    recovery_pause = first_after - last_before
    # reintegration: around t_back, the gap between commits minus a typical step
    window = [t for t in commits if t_back - 2.0 <= t <= t_back + 2.0]
    gaps = [b - a for a, b in zip(window, window[1:])]
    typical = statistics.median(gaps) if gaps else 0.0
    around = [b - a for a, b in zip(window, window[1:]) if a <= t_back <= b + 1e-9 or abs(b - t_back) < 0.2]
    reintegration_pause = max(0.0, max(around, default=typical) - typical)
    rate_before = _rate(series, max(0.0, t_kill - 2.0), t_kill)
    time_to_95 = _time_to(series, t_kill, 0.95 * rate_before)
    return {
        "recovery_pause_s": recovery_pause,
        "reintegration_pause_s": reintegration_pause,
        "time_to_95_s": time_to_95,
        "rejoin_s": t_back - t_rejoin,  # type: ignore[operator]
        "requests_lost": lost,
        "outputs_differing": differing,
        "requests": len(requests),
        "pre_fault_tokens_per_s": rate_before,
        "post_fault_tokens_per_s": None if time_to_95 is None else _rate(series, t_kill + time_to_95,
                                                                          t_kill + time_to_95 + 2.0),
        "median_step_s": typical,
        "repairs": list(ex.repairs),
        "events": [e.to_dict() for e in ex.events],
        "series": {"t": [round(t, 4) for t, _ in series], "tokens": [n for _, n in series]},
        "times": {"kill": t_kill, "rejoin_requested": t_rejoin, "rejoined": t_back,
                  "detected_after_kill_s": fault.time - kill_wall},
        "config": {"ep_size": ep_size, "victim": victim, "concurrency": concurrency, "prompt_len": prompt_len,
                   "output_len": output_len, "num_redundant_experts": num_redundant_experts,
                   "failure_timeout_s": failure_timeout_s, "dtype": dtype, "seed": seed, "model_path": model_path,
                   "fork_server": fork_server},
        "torch_version": torch.__version__,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _rate(series: list[tuple[float, int]], start: float, stop: float) -> float:
    tokens = sum(n for t, n in series if start < t <= stop)
    return tokens / (stop - start) if stop > start else 0.0


def _time_to(series: list[tuple[float, int]], t_kill: float, target: float) -> float | None:
    """Seconds after `t_kill` until the windowed rate reaches `target` (and the window after it
    too); None if it never does (not infinity: the record must stay standard JSON)."""
    for t, _ in series:
        if t <= t_kill + _WINDOW_S:
            continue
        if _rate(series, t - _WINDOW_S, t) >= target and _rate(series, t, t + _WINDOW_S) >= target:
            return t - _WINDOW_S - t_kill
    return None
