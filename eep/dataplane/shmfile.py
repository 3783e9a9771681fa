"""Plain controller-owned shared-memory files (heartbeats, the host expert backup, KV-free state).

Same rules as the data-plane segment (see `eep.dataplane.shm`): created by the controller,
mode 0600, fully allocated up front, named `eep-{creator pid}-{kind}-{token}` so that
`sweep_orphans` removes the files of a SIGKILLed creator, removed by the creator on close
or exit. A rank attaches by name; its death leaves the file intact.
"""

from __future__ import annotations

import mmap
import os
import secrets
import weakref

from eep.dataplane.shm import NAME_PREFIX, SHM_DIR, _unlink_if_creator, create_mapped
from eep.errors import SegmentError


class ShmFile:
    """One mapped file in /dev/shm: `create` in the controller, `attach` in a rank."""

    def __init__(self, name: str, mm: mmap.mmap, *, created: bool) -> None:
        self.name, self.mm, self.created = name, mm, created
        self._finalizer = weakref.finalize(self, _unlink_if_creator, self.path, os.getpid()) if created else None

    @property
    def path(self) -> str:
        return str(SHM_DIR / self.name)

    @classmethod
    def create(cls, kind: str, nbytes: int) -> ShmFile:
        name = f"{NAME_PREFIX}{os.getpid()}-{kind}-{secrets.token_hex(4)}"
        mm = create_mapped(name, max(nbytes, 1))
        return cls(name, mm, created=True)

    @staticmethod
    def open_fd(name: str) -> int:
        """A read-write descriptor of file `name` (the caller closes it); SegmentError if it is missing."""
        try:
            return os.open(SHM_DIR / name, os.O_RDWR)
        except FileNotFoundError:
            raise SegmentError(f"no shm file {name} in {SHM_DIR}: is the controller up?") from None

    @classmethod
    def attach(cls, name: str) -> ShmFile:
        fd = cls.open_fd(name)
        try:
            mm = mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        return cls(name, mm, created=False)

    def close(self) -> None:
        """Unmap (views still alive keep the memory until freed) and, in the creator, remove."""
        try:
            self.mm.close()
        except BufferError:
            pass
        if self._finalizer is not None:
            self._finalizer()  # unlinks once, in the creator only
