"""Blocking waits on a 32-bit word in shared memory, between processes, with a timeout.

A thin ctypes wrapper over Linux `futex(2)` (x86_64 only: the shared-memory transport also
relies on x86's ordered stores). The futexes are *shared* (no FUTEX_PRIVATE_FLAG), so a word
inside a MAP_SHARED mapping of a file in /dev/shm can be waited on in one process and woken
from another. A waiter sleeps in the kernel, it never spins; nothing is held while waiting,
so a process can die at any point without blocking the others (they time out instead).

The ctypes call releases the GIL while the thread sleeps.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import sys
import time

_SYS_FUTEX_X86_64 = 202
_FUTEX_WAIT = 0
_FUTEX_WAKE = 1
INT_MAX = 2**31 - 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _load_syscall() -> ctypes._CFuncPtr:
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise OSError(
            "eep's shared-memory data plane needs Linux on x86_64 (futex syscall "
            f"{_SYS_FUTEX_X86_64}); this is {sys.platform}/{platform.machine()}: "
            "use a network transport instead"
        )
    fn = ctypes.CDLL(None, use_errno=True).syscall
    fn.restype = ctypes.c_long
    return fn


_syscall = _load_syscall()


def futex_wait(addr: int, expected: int, timeout_s: float) -> bool:
    """Sleep while the u32 at `addr` equals `expected`, for at most `timeout_s` seconds.

    Returns True when woken or when the word no longer equals `expected` (the caller must
    re-check its condition: wake-ups can be spurious), False when the timeout passed.
    Interruptions by signals are retried with the time that is left.
    """
    if addr % 4:
        raise ValueError(f"futex word at {addr:#x} is not 4-byte aligned")
    deadline = time.monotonic() + timeout_s
    expected_c = ctypes.c_uint32(expected & 0xFFFFFFFF)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        ts = _Timespec(int(left), int((left % 1.0) * 1e9))
        r = _syscall(
            ctypes.c_long(_SYS_FUTEX_X86_64), ctypes.c_void_p(addr), ctypes.c_int(_FUTEX_WAIT),
            expected_c, ctypes.byref(ts), None, ctypes.c_int(0),
        )
        if r == 0:
            return True
        err = ctypes.get_errno()
        if err == errno.EAGAIN:  # the word had already changed
            return True
        if err == errno.ETIMEDOUT:
            return False
        if err == errno.EINTR:
            continue
        raise OSError(err, f"futex wait failed: {os.strerror(err)}")


def futex_wake(addr: int, n: int = INT_MAX) -> int:
    """Wake up to `n` processes sleeping on the u32 at `addr`; returns how many were woken."""
    r = _syscall(
        ctypes.c_long(_SYS_FUTEX_X86_64), ctypes.c_void_p(addr), ctypes.c_int(_FUTEX_WAKE),
        ctypes.c_int(n), None, None, ctypes.c_int(0),
    )
    if r < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"futex wake failed: {os.strerror(err)}")
    return int(r)
