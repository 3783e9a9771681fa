"""`eep bench failure`: three real `eep serve --http` systems driven by async HTTP clients; a rank
is SIGKILLed under load. The record must be complete and consistent, eep must lose no request
and return no wrong token; the speed targets live in the benchmark's figures, not here."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from eep.bench.failure import SYSTEMS
from eep.bench.harness.cpu import cpu_at, descendants, process_cpu_s, stat_cpu_s
from eep.bench.harness.interleave import (
    round_ratio,
    same_work_cpu_ratio,
    same_work_ratio,
)
from eep.bench.harness.timeline import BIN_S, longest_gap, normal_gap, time_to
from eep.model.default_model import init_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_model(tmp_path_factory.mktemp("m") / "qwen3_moe", "qwen3_moe")


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


def test_a_bench_stopped_by_sigterm_stops_its_servers_and_their_ranks(model_dir: Path, tmp_path: Path) -> None:
    cmd = [
        sys.executable, "-m", "eep", "bench", "failure", "--model-path", str(model_dir), "--ep-size", "2",
        "--systems", "fixed", "--concurrency", "2", "--prompt-len", "8", "--output-len", "8", "--fault-at", "60",
        "--steady-rounds", "0", "--json", str(tmp_path / "out.json"), "--plot", str(tmp_path / "out.png"),
    ]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)  # type: ignore[arg-type]
    reader.start()
    try:
        deadline = time.monotonic() + 180
        while not any("ready in" in line for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines[-20:])
            time.sleep(0.1)
        assert _processes_mentioning(str(model_dir))  # the server and its ranks run
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 130
    finally:
        proc.kill()
        proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while _processes_mentioning(str(model_dir)):
        assert time.monotonic() < deadline, "a server or rank outlived the SIGTERMed bench"
        time.sleep(0.1)


@pytest.mark.slow
def test_bench_failure_runs_three_systems_and_writes_record_and_picture(model_dir: Path, tmp_path: Path) -> None:
    out, png = tmp_path / "failure.json", tmp_path / "failure.png"
    cmd = [
        sys.executable, "-m", "eep", "bench", "failure", "--model-path", str(model_dir), "--ep-size", "2",
        "--victim", "1", "--concurrency", "8", "--prompt-len", "8", "--output-len", "16", "--fault-at", "4",
        "--rejoin-after", "1.5", "--tail", "1.5", "--steady-rounds", "1", "--steady-slice", "2",
        "--json", str(out), "--plot", str(png),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert not _processes_mentioning(str(model_dir)), "a server or rank outlived the bench"
    assert f"picture: {png}" in done.stdout and "steady-state ratio" in done.stdout
    assert "steady-state CPU ratio" in done.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads(out.read_text())

    summary = result["summary"]
    for key in ("steady_state_ratio", "recovery_pause_s", "reintegration_pause_s", "time_to_95_s",
                "full_restart_unavailable_s", "requests_lost", "outputs_differing"):
        assert key in summary, key
    assert summary["requests_lost"] == 0 and summary["outputs_differing"] == 0
    assert summary["full_restart_requests_lost"] == 0 and summary["full_restart_outputs_differing"] == 0
    # the repaired instance pauses for less than the restart of every rank takes
    assert 0 <= summary["recovery_pause_s"] < summary["full_restart_unavailable_s"]
    assert 0 < summary["recovery_longest_gap_s"] < summary["full_restart_longest_gap_s"]
    assert summary["recovery_pause_s"] == pytest.approx(
        max(0.0, summary["recovery_longest_gap_s"] - summary["normal_gap_s"]))
    assert summary["steady_state_ratio"] > 0 and summary["steady_state_cpu_ratio"] > 0
    assert set(result["targets_met"]) >= {"no_request_lost", "steady_state_cpu_ratio_ge_0.99"}
    slices = result["steady_state"]["slices"]
    assert [s["server"] for s in slices] == ["eep", "fixed"] and all(s["tokens_per_s"] > 0 for s in slices)
    # every slice counted the CPU of the server, both its ranks and its fork server (idle)
    assert [s["processes"] for s in slices] == [4, 4] and all(s["cpu_s"] > 0 for s in slices)
    assert result["steady_state"]["round_ratios"] == [pytest.approx(summary["steady_state_ratio"])]
    assert result["steady_state"]["cpu_round_ratios"] == [pytest.approx(summary["steady_state_cpu_ratio"])]
    # eep's own ledger: some bookkeeping, a small share of all its CPU time; none in the fixed path
    eep_books, fixed_books = (sl["ledger"] for sl in slices)
    assert 0 < eep_books["bookkeeping_cpu_s"] < 0.05 * eep_books["cpu_s"] and eep_books["by"]["rank_heartbeats"] > 0
    assert fixed_books["bookkeeping_cpu_s"] == 0 and fixed_books["cpu_s"] > 0
    assert 0.95 < summary["steady_state_bookkeeping_ratio"] < 1.0
    assert "steady-state bookkeeping ratio" in done.stdout
    # the full restart is the fixed-membership fast path restarted (shm), not the gloo engine
    assert result["labels"]["restart"] == "full restart (shm)"

    eep, fixed, restart = (result["systems"][k] for k in ("eep", "fixed", "restart"))
    for run in (eep, fixed, restart):
        assert run["requests_completed"] == run["requests"] > 0 and not run["errors"]
        assert sum(run["tokens_per_bin"]) > 0
    assert "kill" not in fixed["times"] and "kill" in restart["times"]
    assert eep["times"]["kill"] < eep["times"]["rejoin_requested"] < eep["times"]["rejoined"]
    # the load went on until the rank was back (and tail_s more), however long its start took
    assert eep["times"]["rejoin_done"] + 1.5 <= eep["times"]["load_end"] + 0.1
    kinds = [e["kind"] for e in eep["events"]]
    assert kinds[:4] == ["view_committed", "fault_seen", "view_committed", "repair"] and "rejoined" in kinds
    fault = next(e for e in eep["events"] if e["kind"] == "fault_seen")
    assert fault["rank"] == 1 and eep["times"]["kill"] < fault["t"] < eep["times"]["kill"] + 2
    # the restart relaunched every rank: its membership shows a fresh instance (no fault seen)
    assert not any(e["kind"] == "fault_seen" for e in restart["events"])


@pytest.mark.slow
@pytest.mark.parametrize("system", ["fixed", "eep"])
def test_bench_failure_calibrate_compares_two_identical_servers(model_dir: Path, tmp_path: Path, system: str) -> None:
    out = tmp_path / "aa.json"
    cmd = [
        sys.executable, "-m", "eep", "bench", "failure", "--calibrate", system, "--model-path", str(model_dir),
        "--ep-size", "2", "--concurrency", "4", "--prompt-len", "8", "--output-len", "16", "--steady-rounds", "2",
        "--steady-slice", "1.5", "--json", str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert not _processes_mentioning(str(model_dir)), "a server or rank outlived the bench"
    assert "A/A steady-state ratio" in done.stdout and "A/A steady-state CPU ratio" in done.stdout
    result = json.loads(out.read_text())
    steady, summary = result["steady_state"], result["summary"]
    assert [(s["server"], s["round"]) for s in steady["slices"]] == [("a", 0), ("b", 0), ("b", 1), ("a", 1)]
    assert all(s["tokens_per_s"] > 0 for s in steady["slices"]) and len(steady["round_ratios"]) == 2
    # identical servers on identical work: the same order of magnitude, whatever the host's noise
    assert 0.5 < summary["aa_ratio"] < 2.0
    assert summary["aa_round_min"] <= summary["aa_ratio"] <= summary["aa_round_max"]
    # the CPU seconds per token under the same key as the experiment's, with their spread
    assert 0.5 < summary["steady_state_cpu_ratio"] < 2.0 and len(steady["cpu_round_ratios"]) == 2
    assert (summary["steady_state_cpu_ratio_min"] <= summary["steady_state_cpu_ratio"]
            <= summary["steady_state_cpu_ratio_max"])
    assert summary["steady_state_cpu_source"] == "process_cpu_clock_ns"
    assert "A/A steady-state bookkeeping ratio" in done.stdout and result["config"]["system"] == system
    if system == "fixed":  # two fixed servers keep no bookkeeping: their served shares are both 1
        assert summary["steady_state_bookkeeping_ratio"] == 1.0
    else:  # two eep servers keep the same small bookkeeping: the figure moves little between them
        assert all(0.95 < v < 1.0 for v in steady["served_share"]["a"] + steady["served_share"]["b"])
        assert 0.97 < summary["steady_state_bookkeeping_ratio"] < 1.03


def test_longest_gap_counts_the_stretches_that_overlap_the_interval() -> None:
    arrivals = [0.0, 0.1, 0.2, 1.0, 1.1, 1.2]
    assert longest_gap(arrivals, 0.15, 0.5) == pytest.approx(0.8)  # 0.2 -> 1.0 spans the kill at 0.15+
    assert longest_gap(arrivals, 1.05, 1.15) == pytest.approx(0.1)
    assert longest_gap([], 2.0, 3.0) == pytest.approx(1.0)  # nothing at all: the whole interval
    assert longest_gap([0.0], 0.5, 2.0) == pytest.approx(2.0)  # nothing after: up to the bound


def test_normal_gap_is_the_median_of_each_windows_longest_gap() -> None:
    steps = [k * 0.1 for k in range(41)]  # a step's tokens every 0.1 s for 4 s
    assert normal_gap(steps, 0.0, 4.0) == pytest.approx(0.1)
    slow = [t for t in steps if not 1.05 < t < 1.45]  # one stall of 0.5 s in 1.0..1.5
    assert normal_gap(slow, 0.0, 4.0) == pytest.approx(0.1)  # one slow window does not move it
    assert normal_gap(steps, 0.0, 0.3) == 0.0  # no whole window: nothing to measure


def test_same_work_ratio_times_both_servers_over_the_same_tokens() -> None:
    # a: 10 tokens every 0.1 s; b: the same tokens at 0.125 s intervals (a is 1.25x faster)
    a = [(0.1 * i, 10) for i in range(1, 31)]
    b = [(0.125 * i, 10) for i in range(1, 25)]
    # from the count both reached by 1 s (a: 100, b: 80 -> 100) to the count both reached (240)
    assert same_work_ratio(a, b, 1.0) == pytest.approx(1.25)
    assert same_work_ratio(b, a, 1.0) == pytest.approx(0.8)
    # a stall in b's first second does not matter, only the time for the same tokens after it
    stalled = [(0.5 + 0.125 * i, 10) for i in range(1, 25)]
    assert same_work_ratio(a, stalled, 1.0) == pytest.approx(1.25)
    assert same_work_ratio(a, [(0.5, 10)], 1.0) is None  # nothing in common after the start
    assert same_work_ratio(a, [], 1.0) is None


def test_a_round_with_no_work_in_common_is_the_ratio_of_its_token_rates() -> None:
    fast = [(0.01 * i, 10) for i in range(1, 301)]  # 1000 tokens/s: 1000 by the end of its 1 s ramp
    slow = [(0.1 * i, 10) for i in range(1, 31)]  # 100 tokens/s: 300 in its whole 3 s slice
    assert same_work_ratio(fast, slow, 1.0) is None
    assert round_ratio(fast, slow, 1.0, 1000.0, 100.0) == (10.0, True)  # kept, not dropped
    a = [(0.1 * i, 10) for i in range(1, 31)]
    b = [(0.125 * i, 10) for i in range(1, 25)]
    assert round_ratio(a, b, 1.0, 100.0, 80.0) == (pytest.approx(1.25), False)  # work in common: same work
    assert round_ratio(fast, [], 1.0, 1000.0, 0.0) == (None, False)  # the other served nothing: no ratio
    # a few tokens in common only (the faster one's ramp ends just below the slower one's total):
    # the same-work times would be those of single chunks; the rates' ratio is taken
    slower = [(0.1 * i, 10) for i in range(1, 102)]  # 100 tokens/s: 1010 in all, 10 above the fast ramp
    assert same_work_ratio(fast, slower, 1.0) is not None
    assert round_ratio(fast, slower, 1.0, 1000.0, 100.0) == (10.0, True)


def test_same_work_cpu_ratio_counts_each_servers_cpu_over_the_same_tokens() -> None:
    a = [(0.1 * i, 10) for i in range(1, 31)]  # the same tokens as above: a reaches 100..240 at 1.0..2.4 s
    b = [(0.125 * i, 10) for i in range(1, 25)]  # b at 1.25..3.0 s
    cpu_a = [(0.0, 0.0), (3.0, 6.0)]  # 2 CPU-seconds per second: 2.8 s over a's 1.4 s
    cpu_b = [(0.0, 0.0), (1.25, 1.0), (3.0, 5.2)]  # 2.4 per second from 1.25 s: 4.2 s over b's 1.75 s
    assert same_work_cpu_ratio(a, b, 1.0, cpu_a, cpu_b) == pytest.approx(4.2 / 2.8)
    assert same_work_cpu_ratio(a, b, 1.0, cpu_a, None) is None  # a server without samples: no figure
    assert same_work_cpu_ratio(a, [], 1.0, cpu_a, cpu_b) is None
    assert cpu_at(cpu_b, 2.0) == pytest.approx(1.0 + 0.75 * 2.4)  # between samples: linear
    assert cpu_at(cpu_b, 9.0) == 5.2 and cpu_at(cpu_b, -1.0) == 0.0  # outside: the nearest sample


def test_process_cpu_clock_resolves_far_below_a_clock_tick() -> None:
    """The CPU ratio's source: another process's CPU clock in ns, its exited threads counted;
    /proc/PID/stat's utime + stime (the fallback) only move in 10 ms ticks."""
    child = subprocess.Popen([sys.executable, "-c", (
        "import threading, time\n"
        "def spin():\n    t = time.process_time()\n    while time.process_time() - t < 0.2: pass\n"
        "th = threading.Thread(target=spin); th.start(); th.join()\n"  # this thread's CPU outlives it
        "print('spun', flush=True); time.sleep(30)")], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "spun\n"
        assert descendants(os.getpid()).count(child.pid) == 1
        first = process_cpu_s(child.pid)
        assert first >= 0.2  # the exited thread's 0.2 s included
        assert abs(stat_cpu_s(child.pid) - first) < 0.05
        readings = {process_cpu_s(child.pid) for _ in range(3)} | {first}
        assert any(r * 100 % 1 > 1e-6 for r in readings)  # not whole ticks
    finally:
        child.kill()
        child.wait(10)
    with pytest.raises(OSError):
        process_cpu_s(child.pid)  # gone (reaped): a slice that sees this has no CPU figure


def test_restart_systems_are_shm_by_default_and_gloo_by_name() -> None:
    by_name = {s.name: s for s in SYSTEMS}
    assert ("--ep-backend", "shm", "--fault-policy", "restart") == by_name["restart"].serve_args
    assert ("--ep-backend", "gloo", "--fault-policy", "restart") == by_name["gloo-restart"].serve_args
    assert by_name["fixed"].serve_args[:2] == by_name["restart"].serve_args[:2]  # the same data plane


def test_time_to_finds_the_first_window_back_at_the_target_rate() -> None:
    steady = [(i * BIN_S, 10) for i in range(1, 51)]  # 100 tokens/s up to 5 s
    gap_then_back = [(5.0 + 1.0 + i * BIN_S, 10) for i in range(40)]  # nothing for 1 s, then 100 tokens/s
    chunks = steady + gap_then_back
    t = time_to(chunks, 5.0, 95.0)
    assert t is not None and 0.9 <= t <= 1.1
    assert time_to(steady, 4.0, 95.0) == 0.0  # no drop at all
    assert time_to(steady, 4.5, 95.0) is None  # the run ends before two windows fit
    assert time_to(steady + [(5.0 + 1.0, 1)], 5.0, 95.0) is None  # never back to the rate
