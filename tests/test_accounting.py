"""The ledger of elastic bookkeeping (eep.runtime.accounting): what it charges and what not."""

from __future__ import annotations

import time

import pytest

from eep.runtime.accounting import BOOKKEEPING, Ledger


def _burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_a_charge_counts_the_threads_cpu_time_not_its_waiting() -> None:
    ledger = Ledger()
    with ledger.charge("heartbeat_looks"):
        _burn(0.02)
    with ledger.charge("step_boundary"):
        time.sleep(0.05)  # waiting costs no CPU: next to nothing is charged
    books = ledger.snapshot()["bookkeeping_cpu_s"]
    assert set(books) == set(BOOKKEEPING)
    assert 0.02 <= books["heartbeat_looks"] < 0.04
    assert books["step_boundary"] < 0.005
    assert books["plan_ahead"] == books["rank_heartbeats"] == 0


def test_a_charge_inside_a_charge_is_counted_once_by_the_outer_one() -> None:
    ledger = Ledger()
    with ledger.charge("step_boundary"):
        with ledger.charge("heartbeat_looks"):
            _burn(0.01)
    books = ledger.snapshot()["bookkeeping_cpu_s"]
    assert books["heartbeat_looks"] == 0 and 0.01 <= books["step_boundary"] < 0.03
    with ledger.charge("heartbeat_looks"):  # and the thread charges normally afterwards
        _burn(0.005)
    assert ledger.snapshot()["bookkeeping_cpu_s"]["heartbeat_looks"] >= 0.005


def test_rank_reports_charge_growth_and_a_new_process_starts_from_zero() -> None:
    ledger = Ledger()
    own0 = ledger.snapshot()["cpu_s"]
    ledger.rank_report(0, pid=100, cpu_ns=2_000_000_000, heartbeat_ns=1_000_000)
    ledger.rank_report(0, pid=100, cpu_ns=3_000_000_000, heartbeat_ns=3_000_000)
    ledger.rank_report(1, pid=101, cpu_ns=1_000_000_000, heartbeat_ns=0)
    ledger.rank_report(0, pid=200, cpu_ns=500_000_000, heartbeat_ns=1_000_000)  # rank 0 replaced
    snap = ledger.snapshot()
    assert snap["bookkeeping_cpu_s"]["rank_heartbeats"] == pytest.approx(0.004)
    # 3 s of the first rank-0 process, 1 s of rank 1, 0.5 s of the replacement, + the controller's
    assert snap["cpu_s"] - own0 == pytest.approx(4.5, abs=0.05)
