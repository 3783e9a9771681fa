"""Death notices: the kernel tells the controller that a rank died, within a millisecond.

A SIGKILLed process closes its pipes and makes its pidfd readable only at the end of its
exit, after the kernel has torn its address space down: measured here, 15-25 ms for a rank
(a process that imported torch), up to ~60 ms for one holding 400 MB. Much earlier in the
exit, before that teardown, the kernel walks the dying thread's *robust futex list*: every
robust mutex the thread holds is marked "owner died" and one waiter is woken. That takes
0.1-0.2 ms from the signal (measured with `kill -9`, same machine).

So each rank process locks a robust, process-shared pthread mutex in a small controller-owned
shared-memory file as soon as it starts, from its main thread, and holds it for life. Once
the rank reported ready, a controller thread waits to lock it (`pthread_mutex_timedlock`, in
rounds of `_ROUND_S`, the GIL released while it sleeps); when the lock returns EOWNERDEAD it
writes an eventfd that the executor waits on with the rank's pipe and pidfd. A clean exit
ends the same way (the mutex is never unlocked by its rank): the executor tells the two
apart by whether it asked the rank to stop. A stopped (SIGSTOP) or wedged process holds the
mutex and is found by its heartbeat instead.

glibc on Linux only (the shm data plane needs Linux too); elsewhere `supported()` is False
and failures are seen through pipes and pidfds as before.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import threading
import time

from eep.dataplane.shmfile import ShmFile

logger = logging.getLogger(__name__)

_MUTEX_BYTES = 64  # pthread_mutex_t is 40 bytes on x86_64 glibc; room to spare
_ATTR_BYTES = 16  # pthread_mutexattr_t is 4
_PTHREAD_PROCESS_SHARED = 1
_PTHREAD_MUTEX_ROBUST = 1
_ROUND_S = 1.0  # the watcher's lock attempts time out this often to see whether it must stop


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _load_libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        for fn in ("pthread_mutex_init", "pthread_mutex_timedlock", "pthread_mutex_consistent",
                   "pthread_mutexattr_setrobust", "pthread_mutexattr_setpshared"):
            getattr(libc, fn)
    except (OSError, AttributeError):
        return None
    return libc


_libc = _load_libc()


def supported() -> bool:
    return _libc is not None and hasattr(os, "eventfd")


class DeathNotice:
    """Controller side, one per rank process: `create()` before the spawn, `watch()` once the
    rank holds the mutex (it reported ready), `fd` readable once it died, `close()` after the
    process was reaped."""

    def __init__(self) -> None:
        assert _libc is not None
        self.file = ShmFile.create("dn", _MUTEX_BYTES)
        self.name = self.file.name
        self._buf = (ctypes.c_char * _MUTEX_BYTES).from_buffer(self.file.mm)
        self._mutex = ctypes.c_void_p(ctypes.addressof(self._buf))
        attr = ctypes.create_string_buffer(_ATTR_BYTES)
        _check(_libc.pthread_mutexattr_init(attr), "pthread_mutexattr_init")
        _check(_libc.pthread_mutexattr_setpshared(attr, _PTHREAD_PROCESS_SHARED), "pthread_mutexattr_setpshared")
        _check(_libc.pthread_mutexattr_setrobust(attr, _PTHREAD_MUTEX_ROBUST), "pthread_mutexattr_setrobust")
        _check(_libc.pthread_mutex_init(self._mutex, attr), "pthread_mutex_init")
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.died_at: float | None = None  # time.time() when the watcher saw the owner die
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def create(cls) -> DeathNotice | None:
        """A new notice, or None where robust mutexes are not available."""
        return cls() if supported() else None

    def watch(self, rank: int) -> None:
        """Start waiting for the owner's death (call once the rank holds the mutex)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._wait, name=f"eep-death-notice-{rank}", daemon=True)
            self._thread.start()

    def _wait(self) -> None:
        assert _libc is not None
        while not self._stop.is_set():
            deadline = time.time() + _ROUND_S
            ts = _Timespec(int(deadline), int((deadline % 1) * 1e9))
            rc = _libc.pthread_mutex_timedlock(self._mutex, ctypes.byref(ts))
            if rc == errno.ETIMEDOUT:
                continue
            if rc == errno.EOWNERDEAD:  # leave it usable (and unlocked) for nobody's sake but tidiness
                _libc.pthread_mutex_consistent(self._mutex)
            if rc in (0, errno.EOWNERDEAD):
                _libc.pthread_mutex_unlock(self._mutex)
                self.died_at = time.time()
                os.eventfd_write(self.fd, 1)
            else:
                logger.warning("death notice: pthread_mutex_timedlock returned %d (%s); the pipe and pidfd "
                               "still report this rank's exit", rc, os.strerror(rc))
            return

    def close(self, timeout_s: float = 2 * _ROUND_S) -> None:
        """Stop the watcher and remove the file. Idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():  # still inside the lock call: the mapping must outlive it
                logger.warning("death notice %s: watcher still waiting; its file is kept until exit", self.name)
                return
        os.close(self.fd)
        del self._mutex, self._buf
        self.file.close()


class HeldNotice:
    """Rank side: lock the notice's mutex from this (the main) thread and never unlock it.

    The mutex is mapped with libc's mmap and never unmapped: a Python mmap object would be
    closed at interpreter shutdown, before the thread exits, and the kernel cannot mark a
    mutex that is no longer mapped (a clean exit would then go unnoticed)."""

    def __init__(self, name: str) -> None:
        if _libc is None:
            raise OSError("robust pthread mutexes are not available here")
        fd = ShmFile.open_fd(name)
        try:
            mmap_ = _libc.mmap
            mmap_.restype, mmap_.argtypes = ctypes.c_void_p, [
                ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
            addr = mmap_(None, _MUTEX_BYTES, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
        finally:
            os.close(fd)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap of death notice {name} failed")
        _check(_libc.pthread_mutex_lock(ctypes.c_void_p(addr)), "pthread_mutex_lock")


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise OSError(rc, f"{what}: {os.strerror(rc)}")
