"""Death notices (robust mutexes held by rank processes): real processes, real signals."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from eep.runtime import death_notice
from eep.runtime.death_notice import DeathNotice

pytestmark = pytest.mark.skipif(not death_notice.supported(), reason="needs glibc robust mutexes")

_HOLDER = """
import sys, time
from eep.runtime.death_notice import HeldNotice
held = HeldNotice(sys.argv[1])
print("holding", flush=True)
if sys.argv[2] == "sleep":
    time.sleep(60)
"""


@pytest.fixture
def notice() -> Iterator[DeathNotice]:
    n = DeathNotice.create()
    assert n is not None
    yield n
    n.close()
    assert not os.path.exists(n.file.path)


def _holder(notice: DeathNotice, then: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, notice.name, then], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"holding\n"
    return proc


def _fires(notice: DeathNotice, timeout_s: float) -> bool:
    return bool(select.select([notice.fd], [], [], timeout_s)[0])


def test_sigkill_fires_the_notice_and_a_live_holder_does_not(notice: DeathNotice) -> None:
    proc = _holder(notice, "sleep")
    try:
        notice.watch(0)
        assert not _fires(notice, 0.3) and notice.died_at is None  # alive: nothing
        proc.send_signal(signal.SIGKILL)
        assert _fires(notice, 10.0) and notice.died_at is not None
    finally:
        proc.kill()
        proc.wait(10)


def test_a_clean_exit_fires_the_notice_too(notice: DeathNotice) -> None:
    proc = _holder(notice, "exit")
    notice.watch(0)
    assert _fires(notice, 10.0)
    assert proc.wait(10) == 0


def test_close_while_the_holder_lives_stops_the_watcher_and_removes_the_file() -> None:
    notice = DeathNotice.create()
    assert notice is not None
    proc = _holder(notice, "sleep")
    try:
        notice.watch(0)
        notice.close()  # the watcher gives up within one round of its lock attempts
        assert not os.path.exists(notice.file.path)
        notice.close()  # idempotent
    finally:
        proc.kill()
        proc.wait(10)
