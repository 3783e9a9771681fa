"""One rank process as the controller sees it, wherever it runs."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field

from eep.runtime.death_notice import DeathNotice
from eep.runtime.fork_server import ForkedProcess
from eep.runtime.hosts import RemoteProcess
from eep.security.channel import Channel


@dataclass(slots=True)
class RankProcess:
    """A rank's process: how to reach it (`conn`), how to see it die, and what it is."""

    rank: int
    incarnation: int  # unique within the instance: the view names processes by it (pids repeat across hosts)
    epoch: int  # the controller's epoch when it was started (its Ready carries it)
    proc: subprocess.Popen[bytes] | ForkedProcess | RemoteProcess
    pidfd: int | None  # None: on another host (its agent relays the exit, `wake` wakes us)
    conn: Channel
    notice: DeathNotice | None = None  # readable `notice.fd` once the process died (< 1 ms)
    ready: bool = False
    warmup_s: float | None = None  # a replacement's isolated warm-up before it reported ready
    started: float = field(default_factory=time.monotonic)
    wake: int | None = None  # remote: readable after any relayed exit

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def remote(self) -> bool:
        return isinstance(self.proc, RemoteProcess)

    @property
    def handles(self) -> list[object]:
        """What to wait on for a message or an exit of this process."""
        return ([self.conn] + [h for h in (self.pidfd, self.wake) if h is not None]
                + ([self.notice.fd] if self.notice is not None else []))

    def exited(self, ready: list[object]) -> bool:
        """True when `ready` (from `wait(handles)`) says the process died."""
        if self.remote:
            return self.proc.poll() is not None
        return self.pidfd in ready or (self.notice is not None and self.notice.fd in ready)

    def exit_reason(self) -> str:
        code = self.proc.poll()
        if code is not None:
            return f"process exited with code {code}"
        return "process dying (its death notice fired)"  # the kernel is still tearing it down

    def close(self, kill: bool) -> int | None:
        """Reap the process (killed first with `kill`) and release its handles; its exit code,
        None where its host could not say within the wait."""
        if kill and self.proc.poll() is None:
            self.proc.kill()
        if self.remote:  # its host may be unreachable: its agent reaps it, or is gone with it
            try:
                code: int | None = self.proc.wait(timeout=10 if not kill else 2)
            except subprocess.TimeoutExpired:
                code = None
            self.conn.close()
            return code
        try:
            code = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(timeout=5)
        self.conn.close()
        assert self.pidfd is not None
        os.close(self.pidfd)
        if self.notice is not None:
            self.notice.close()
        return code
