"""The benches' shared harness (`eep.bench.harness`): the token timeline's recovery figures on
made-up series, the figures the failure and recovery benches build from them, the server
handles' one interface, and that no bench reaches into another bench's private names."""

from __future__ import annotations

import ast
import gc
from pathlib import Path
from types import SimpleNamespace

import pytest

from eep.bench import failure, recovery
from eep.bench.harness import (
    FIXED,
    LocalServer,
    NamespaceServer,
    RequestRecord,
    ServerHandle,
    Trace,
    analyse_fault_run,
    frozen_gc,
    timeline,
)

BENCH_DIR = Path(failure.__file__).parent


def _http_series_with_a_burst() -> list[tuple[float, int]]:
    """100 tokens/s (10 every 0.1 s) up to a kill at 6 s, 500 tokens/s more for 0.4 s at 4 s
    (a burst the load never reaches again), nothing for 1 s after the kill, then 100 tokens/s."""
    steady = [(round(0.1 * i, 6), 10) for i in range(1, 60)]
    burst = [(round(4.0 + 0.01 * i, 6), 5) for i in range(1, 41)]
    back = [(round(7.0 + 0.1 * i, 6), 10) for i in range(1, 40)]
    return sorted(steady + burst) + back


def _step_series_with_a_burst(back_at: float = 100.0) -> list[tuple[float, int]]:
    """The recovery bench's engine steps: 5 tokens every 50 ms (100 tokens/s) up to a kill at
    4 s, 25 more per step for 0.3 s at 3 s, nothing for 1 s after the kill, then `back_at` tokens/s."""
    steps: dict[float, int] = {}
    for t, n in [(round(0.05 * i, 6), 5) for i in range(1, 80)] + [(round(3.0 + 0.05 * i, 6), 25) for i in range(1, 7)]:
        steps[t] = steps.get(t, 0) + n
    per_step = int(back_at * 0.05)
    return sorted(steps.items()) + [(round(5.0 + 0.05 * i, 6), per_step) for i in range(1, 60)]


def test_the_pre_fault_rate_is_the_median_window_rate_not_a_burst() -> None:
    """The bug: `eep bench recovery` reported `time_to_95_s: null` after a short burst (608 tok/s)
    set a pre-fault rate the load never reached again. The mean over the pre-fault stretch
    (what both benches took: 167 and 172.5 tok/s here) takes the burst in; the median of the
    0.5 s windows' rates does not, and the rate is back 1 s after the kill."""
    chunks = _http_series_with_a_burst()
    mean = timeline.rate(timeline.token_bins(_records(chunks), chunks[-1][0]), 3.0, 6.0)  # failure's baseline
    assert mean == pytest.approx(166.7, abs=0.1)  # the burst counted: 95% of it is never reached again
    assert timeline.time_to(chunks, 6.0, 0.95 * mean) is None
    rate = timeline.pre_fault_rate(chunks, timeline.STEADY_FROM_S, 6.0)
    assert rate == pytest.approx(100.0)
    assert timeline.time_to_95(chunks, 6.0, rate) == (pytest.approx(1.0), True)

    steps = _step_series_with_a_burst()
    assert timeline.window_rate(steps, 2.0, 4.0) == pytest.approx(172.5)  # recovery's baseline: the mean
    rate = timeline.pre_fault_rate(steps, 2.0, 4.0)
    assert rate == pytest.approx(100.0)
    starts = [t - timeline.WINDOW_S for t, _ in steps if t > 4.0 + timeline.WINDOW_S]
    assert timeline.time_to_95(steps, 4.0, rate, starts) == (pytest.approx(1.0), True)


def test_the_pre_fault_rate_without_a_whole_window_is_the_mean() -> None:
    chunks = [(0.1, 10), (0.2, 10), (0.3, 10)]
    assert timeline.pre_fault_rate(chunks, 0.0, 0.3) == pytest.approx(100.0)
    assert timeline.pre_fault_rate(chunks, 0.3, 0.3) == 0.0
    assert timeline.pre_fault_rate([], 0.0, 2.0) == 0.0


def test_time_to_95_is_never_none_a_rate_not_back_is_the_runs_span_flagged() -> None:
    steady = [(round(0.1 * i, 6), 10) for i in range(1, 60)]  # 100 tokens/s up to the kill at 6 s
    half = steady + [(round(6.5 + 0.1 * i, 6), 5) for i in range(1, 30)]  # then 50 tokens/s to 9.4 s
    assert timeline.time_to(half, 6.0, 95.0) is None
    span, reached = timeline.time_to_95(half, 6.0, 100.0)
    assert reached is False and span == pytest.approx(9.4 - 6.0)  # a lower bound: the run's end
    assert timeline.time_to_95(steady, 6.0, 100.0) == (0.0, False)  # nothing after the kill at all
    assert timeline.time_to_95([], 6.0, 100.0) == (0.0, False)


def _records(chunks: list[tuple[float, int]]) -> list[RequestRecord]:
    rec = RequestRecord(0, 0.0, sum(n for _, n in chunks), chunks=list(chunks), token_ids=[1] * sum(n for _, n in chunks),
                        done=True)
    return [rec]


def test_a_fault_runs_figures_measure_the_recovery_against_the_median_rate() -> None:
    chunks = _http_series_with_a_burst()
    run = analyse_fault_run(failure.SYSTEMS[0], _records(chunks), {"kill": 6.0, "load_end": 10.0}, [])
    assert run["pre_fault_tokens_per_s"] == pytest.approx(100.0)
    assert run["tokens_per_s_steady"] == pytest.approx(166.7, abs=0.1)  # the throughput: every token counts
    assert run["time_to_95_s"] == pytest.approx(1.0) and run["reached_95"] is True
    assert run["longest_gap_after_kill_s"] == pytest.approx(1.2)  # the last token before the kill, 5.9 -> 7.1
    never = analyse_fault_run(failure.SYSTEMS[0], _records([c for c in chunks if c[0] < 6.0 or c[0] > 10.1]),
                              {"kill": 6.0, "load_end": 10.0}, [])  # back for 0.8 s: two windows do not fit
    assert never["time_to_95_s"] == pytest.approx(10.9 - 6.0) and never["reached_95"] is False
    row = failure.summary_table({"systems": {"eep": {**never, "outputs_differing": 0}}, "summary": {},
                                 "targets_met": {}})
    assert "(never)" in row and "None" not in row


def test_the_recovery_bench_shows_a_figure_for_time_to_95_whether_or_not_it_was_reached() -> None:
    fault = SimpleNamespace(events=[SimpleNamespace(kind="fault_seen", time=100.0)])
    back = recovery._Run(series=_step_series_with_a_burst(), t_kill=4.0, t_rejoin=6.0, t_back=7.0, kill_wall=99.9)
    figures = recovery._figures(back, fault)  # type: ignore[arg-type]
    assert figures["pre_fault_tokens_per_s"] == pytest.approx(100.0)
    assert figures["time_to_95_s"] == pytest.approx(1.0) and figures["reached_95"] is True
    assert figures["post_fault_tokens_per_s"] == pytest.approx(100.0)
    slow = recovery._Run(series=_step_series_with_a_burst(back_at=60.0), t_kill=4.0, t_rejoin=6.0, t_back=7.0)
    figures = recovery._figures(slow, fault)  # type: ignore[arg-type]
    assert figures["reached_95"] is False and figures["post_fault_tokens_per_s"] is None
    assert figures["time_to_95_s"] == pytest.approx(slow.series[-1][0] - 4.0)  # the span observed


def test_both_server_kinds_are_server_handles(tmp_path: Path) -> None:
    def handle_attrs(obj: object) -> bool:
        return all(hasattr(obj, a) for a in ("url", "model_name", "admin_key", "warmed", "proc", "log_tail"))

    local = LocalServer(str(tmp_path / "model"), FIXED, ep_size=2, concurrency=4, trace=Trace(0, 100, 8, 8),
                        failure_timeout_s=1.0, dtype="auto")
    try:
        assert handle_attrs(local) and local.proc is None and local.log_tail() == "(no log)"
        assert "--admin-api-key" in local.cmd and local.admin_key in local.cmd
    finally:
        local.__exit__(None, None, None)
    assert not local.tmp.exists()
    inst = SimpleNamespace(head=None, log_tail=lambda node=0: "\n".join(f"line {i}" for i in range(50)))
    remote = NamespaceServer(inst, "http://10.0.0.1:8100", "m", "key")  # type: ignore[arg-type]
    assert handle_attrs(remote) and remote.log_tail(3) == "line 47\nline 48\nline 49"  # `lines` honoured
    handles: list[ServerHandle] = [local, remote]
    assert len(handles) == 2


def test_frozen_gc_gives_the_collector_back_also_when_the_run_fails() -> None:
    assert gc.get_freeze_count() == 0
    with pytest.raises(RuntimeError), frozen_gc():
        assert gc.get_freeze_count() > 0
        raise RuntimeError("a failed run")
    assert gc.get_freeze_count() == 0


def test_no_bench_imports_another_benchs_private_names() -> None:
    """The benches share the harness's public pieces; none reaches into another bench."""
    found = []
    for path in sorted(BENCH_DIR.rglob("*.py")):
        tree = ast.parse(path.read_text())
        aliases = {}  # `from eep.bench import failure as fb` -> fb
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("eep.bench"):
                for a in node.names:
                    if a.name.startswith("_"):
                        found.append(f"{path.name}: from {node.module} import {a.name}")
                    if node.module == "eep.bench":
                        aliases[a.asname or a.name] = a.name
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                    and node.attr.startswith("_"):
                found.append(f"{path.name}: {node.value.id}.{node.attr}")
    assert not found, found
