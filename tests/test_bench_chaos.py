"""`eep bench chaos`: a seeded random fault schedule against a real `eep serve --http` under load.
The short soak must lose no request, return no wrong token, end healthy and leave nothing
behind; the figures' arithmetic is checked on made-up timelines."""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from eep.bench.chaos import ChaosRun, run_chaos_bench
from eep.bench.chaos_figures import normal_gap, stuck_stretch, view_timeline
from eep.bench.harness.timeline import gap_within
from eep.cli import build_parser
from eep.model.default_model import init_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_model(tmp_path_factory.mktemp("m") / "qwen3_moe", "qwen3_moe")


@pytest.mark.slow
def test_chaos_soak_short_schedule_loses_nothing_and_leaves_nothing(model_dir: Path, tmp_path: Path) -> None:
    start = time.monotonic()
    failure_timeout = 1.0
    # seed 39's first deck starts stop, drain, down_to_one, kill_paused: with 4 ranks the first
    # few seconds hold a SIGSTOP, a drain and a kill while paused (down_to_one needs 3 healthy
    # ranks and waits), then the rejoins of everything
    result = run_chaos_bench(
        str(model_dir), ep_size=4, concurrency=4, seconds=5.0, seed=39, failure_timeout_s=failure_timeout,
        prompt_len=8, output_len=16, gap_s=(0.3, 1.0), settle_timeout_s=45.0, drain_timeout_s=30.0,
        keep_log=tmp_path / "chaos.serve.log",
    )
    wall = time.monotonic() - start
    json.dumps(result, allow_nan=False)  # the record is standard JSON
    s, actions = result["summary"], result["actions"]
    evidence = (f"summary {s}\nactions {json.dumps(actions)[:3000]}\n"
                f"server log:\n" + "\n".join(result.get("server_log_tail") or []))
    ops = {(a["fault"], a["op"]) for a in actions}
    assert any(op == "SIGKILL" for _, op in ops), evidence
    assert ("double_kill", "SIGKILL") in ops or ("kill_paused", "SIGKILL") in ops, evidence
    assert ("stop", "SIGSTOP") in ops and ("stop", "SIGCONT") in ops, evidence
    assert any(a["op"] == "POST drain" and a["status"] == 200 for a in actions), evidence
    assert any(a["op"] == "POST rejoin" and a["status"] == 200 for a in actions), evidence
    for key in ("requests_completed", "requests_lost", "outputs_differing", "stuck_s", "healthy_at_end",
                "processes_left", "shm_left", "actions", "max_pause_s"):
        assert key in s, key
    assert s["requests_completed"] > 0 and s["requests_lost"] == 0, evidence
    assert s["outputs_differing"] == 0, evidence
    assert s["healthy_at_end"] and s["settled"], evidence
    assert s["processes_left"] == 0 and s["shm_left"] == 0, evidence
    assert 0 <= s["stuck_s"] < failure_timeout + 1.0, evidence
    assert s["actions"] == len(actions) and s["max_pause_s"] == max(a["pause_s"] for a in actions)
    assert [a["t"] for a in actions] == sorted(a["t"] for a in actions)
    assert not result["failed"] and result["server_log"] is None
    assert result["config"]["seed"] == 39 and "timestamp" in result
    print(f"chaos soak test: {wall:.1f} s of wall time, {s}")


def test_stuck_stretch_counts_only_pending_all_active_stretches_without_tokens() -> None:
    # polls: all active from 0 to 5, a rank out from 5 to 7, all active again from 7 to 20
    samples = [(0.0, True), (5.0, False), (7.0, True)]
    arrivals = [0.5, 1.0, 4.0, 9.0, 9.5]
    pending = [(0.0, 12.0)]
    # 1.0 -> 4.0 (3 s) inside; 4.0 -> 5.0 cut by the view; 7.0 -> 9.0 (2 s); 9.5 -> 12.0 (2.5 s)
    assert stuck_stretch(samples, pending, arrivals, end=20.0) == (3.0, 1.0, 4.0)
    # no request in flight from 1.5 to 3.5: the longest is now 9.5 -> 12.0
    assert stuck_stretch(samples, [(0.0, 1.5), (3.5, 12.0)], arrivals, end=20.0) == (2.5, 9.5, 12.0)
    # nothing all-active: nothing stuck
    assert stuck_stretch([(0.0, False)], pending, arrivals, end=20.0)[0] == 0.0
    # a view that never comes back with no token: stuck to the end of the pending work
    assert stuck_stretch([(0.0, True)], [(2.0, 30.0)], [], end=40.0) == (28.0, 2.0, 30.0)


def test_the_view_timeline_is_the_servers_commits_after_the_first_poll() -> None:
    polls = [(0.5, True), (1.6, False), (2.7, True)]
    events = [  # the structured fields count; the words are free to change
        {"t": 0.2, "kind": "view_committed", "active": [0, 1, 2], "detail": "started"},  # before the first poll
        {"t": 1.5, "kind": "view_committed", "active": [0, 2], "detail": "failed [1]; active [0, 1, 2] before"},
        {"t": 1.55, "kind": "paused", "active": [0], "detail": "no slot left"},  # not a view
        {"t": 2.6, "kind": "view_committed", "active": [0, 1, 2], "detail": "rank 1 switched in"},
        {"t": 3.0, "kind": "view_committed", "active": [], "detail": ""},
    ]
    assert view_timeline(polls, events, 3) == [(0.5, True), (1.5, False), (2.6, True), (3.0, False)]
    assert view_timeline(polls, [], 3) == polls  # no events: the polls


def test_gap_within_is_clipped_to_the_action_window() -> None:
    arrivals = [0.0, 1.0, 5.0, 6.0]
    assert gap_within(arrivals, 2.0, 4.0) == 2.0  # no arrival in the window: all of it
    assert gap_within(arrivals, 0.5, 5.5) == 4.0  # 1.0 -> 5.0
    assert gap_within(arrivals, 5.5, 5.5) == 0.0
    assert math.isclose(gap_within(arrivals, 0.9, 1.2), 0.2)


def test_chaos_never_counts_a_stopped_killed_or_drained_rank_as_healthy() -> None:
    srv = SimpleNamespace(url="http://127.0.0.1:1", proc=None, model_name="m", admin_key="k")
    chaos = ChaosRun(srv, None, rng=random.Random(0), concurrency=1, seconds=1.0,  # type: ignore[arg-type]
                     failure_timeout_s=1.0, gap_s=(1.0, 2.0), settle_timeout_s=1.0, drain_timeout_s=1.0)
    watch, acts, schedule = chaos.watch, chaos.acts, chaos.schedule
    watch.clock = time.monotonic()
    watch.states = ["active", "active", "active", "joining"]
    watch.pids = [10, 11, 12, 13]
    assert acts.healthy() == [0, 1, 2] and schedule.feasible("double_kill")
    assert schedule.feasible("kill_during_rejoin")  # rank 3 is loading
    acts.doomed.add(10)  # SIGKILLed, the view not updated yet
    acts.stopped[11] = float("inf")  # SIGSTOPped
    assert acts.healthy() == [2]
    for kind in ("kill", "double_kill", "stop", "drain", "down_to_one", "kill_paused", "kill_during_rejoin"):
        assert not schedule.feasible(kind), kind  # nothing may take the last healthy rank
    acts.stopped[11] = watch.now() - 0.1  # resumed, and past its grace
    assert acts.healthy() == [1, 2] and schedule.feasible("kill") and not schedule.feasible("double_kill")
    assert watch.auth == {"Authorization": "Bearer k"}


def test_cli_bench_chaos_defaults() -> None:
    args = build_parser().parse_args(["bench", "chaos"])
    assert (args.ep_size, args.concurrency, args.seconds, args.seed, args.failure_timeout, args.json) == (
        4, 16, 600.0, 7, 1.0, "out/chaos.json")
    assert args.func.__name__ == "_cmd_bench_chaos"


def test_normal_gap_is_the_median_window_gap_inside_the_stretches() -> None:
    arrivals = [k * 0.1 for k in range(100)]  # a token every 0.1 s for 10 s
    assert normal_gap(arrivals, [(0.0, 5.0)]) == pytest.approx(0.1)
    assert normal_gap(arrivals, [(0.0, 0.5)]) is None  # no whole window fits
    assert normal_gap([0.0, 3.0], [(0.0, 3.0)]) == pytest.approx(1.0)  # every window is one gap
