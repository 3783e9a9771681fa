"""Suite-wide guard: every test leaves no process of its own (child, or a child's child: ranks
forked by a fork server) and no shared-memory segment behind."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def _children() -> set[int]:
    """Live (non-zombie) descendants of this process, read from /proc."""
    below: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and not _is_mp_helper(stat.parent):
            below.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [os.getpid()]
    while todo:
        for child in below.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _is_mp_helper(proc: Path) -> bool:
    """multiprocessing's resource tracker lives for the whole session by design: not a leak."""
    try:
        return b"resource_tracker" in (proc / "cmdline").read_bytes()
    except OSError:
        return False


def _segments() -> set[str]:
    """eep segments created by this process, or by a process that is gone (a leak of one of our
    children). Segments of other live processes (a second test run, a server) are not ours."""
    found = set()
    for p in Path("/dev/shm").glob("eep-*-*"):
        creator = p.name.split("-")[1]
        if creator.isdigit() and (int(creator) == os.getpid() or not Path(f"/proc/{creator}").exists()):
            found.add(p.name)
    return found


@pytest.fixture(autouse=True)
def nothing_left_behind() -> Iterator[None]:
    children, segments = _children(), _segments()
    yield
    deadline = time.monotonic() + 5  # processes a test just stopped may take a moment to exit
    while (_children() - children) and time.monotonic() < deadline:
        time.sleep(0.05)
    leaked = _children() - children
    for pid in leaked:  # clean up first, so one leak does not fail every later test too
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    new_segments = _segments() - segments
    for name in new_segments:
        Path("/dev/shm", name).unlink(missing_ok=True)
    assert not leaked, f"test left child processes running: {sorted(leaked)}"
    assert not new_segments, f"test left shared-memory segments: {sorted(new_segments)}"
