"""The expert-parallel executor: starts N rank processes and runs every step on all of them.

The executor is the ranks' supervisor: it owns the data-plane buffers (the shared-memory
segment is created here, never by a rank, so a rank's death leaves it intact), starts the
ranks, hands each its share of a step over a pipe, and collects the sampled tokens. Every
wait has a timeout, and a rank that exits is seen at once through its process sentinel and
reported as `RankFailed` (recovery from it is the failure-handling layer's job).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

import torch

from eep.config import EngineConfig, resolve_dtype
from eep.dataplane.shm import ShmLayout, ShmSegment
from eep.engine.worker import SeqWork
from eep.errors import ConfigError, EepError
from eep.model.checkpoint import CheckpointReader
from eep.model.config import ModelConfig
from eep.placement.eplb import plan_placement
from eep.runtime.rank import RankSpec, recv, send

logger = logging.getLogger(__name__)

BACKENDS = ("shm", "gloo")


class RankFailed(EepError):
    """A rank process exited or stopped answering during a step."""

    def __init__(self, rank: int, why: str) -> None:
        self.rank = rank
        super().__init__(f"rank {rank} failed: {why}")


@dataclass(frozen=True, slots=True)
class EPConfig:
    ep_size: int = 4
    num_redundant_experts: int = 0
    backend: str = "shm"
    timeout_s: float = 30.0  # a data-plane wait or a step that takes longer means a failed rank
    start_timeout_s: float = 120.0  # rank start-up: import torch, load weights

    def __post_init__(self) -> None:
        if self.ep_size < 1:
            raise ConfigError(f"ep_size must be >= 1, got {self.ep_size}")
        if self.num_redundant_experts < 0:
            raise ConfigError(f"num_redundant_experts must be >= 0, got {self.num_redundant_experts}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"ep backend must be one of {BACKENDS}, got {self.backend!r}")


class EPExecutor:
    def __init__(self, config: EngineConfig, ep: EPConfig) -> None:
        self.config, self.ep, self.num_ranks = config, ep, ep.ep_size
        with CheckpointReader(config.model_path) as reader:
            cfg = ModelConfig.from_hf(reader.config)
            dtype = resolve_dtype(config.dtype, reader.config)
        self.placement = plan_placement(
            cfg.num_experts, ep.ep_size, num_layers=len(cfg.moe_layers), num_redundant=ep.num_redundant_experts
        )
        self._segment: ShmSegment | None = None
        self._tmpdir = tempfile.mkdtemp(prefix="eep-ep-")
        self._procs: list[subprocess.Popen[bytes]] = []
        self._pidfds: list[int] = []
        self._conns: list[Connection] = []
        try:
            rendezvous = self._make_rendezvous(cfg, dtype)
            self._start(rendezvous)
        except BaseException:
            self.close()
            raise

    def _make_rendezvous(self, cfg: ModelConfig, dtype: torch.dtype) -> str:
        if self.ep.backend == "gloo":
            return f"file://{self._tmpdir}/gloo-store"
        # a region carries at most one step's tokens of one rank: ids + weights + hidden row each
        row = cfg.top_k * 12 + cfg.hidden_size * torch.empty(0, dtype=dtype).element_size()
        layout = ShmLayout(num_ranks=self.num_ranks, region_bytes=self.config.max_num_batched_tokens * row)
        self._segment = ShmSegment.create(layout)
        return self._segment.name

    def _start(self, rendezvous: str) -> None:
        # Ranks are fresh interpreters (`python -m eep.runtime.rank`), not multiprocessing
        # children: nothing of the caller's __main__ is re-imported, and a replacement rank can
        # be started the same way at any time. Control travels over a socketpair; exits are
        # seen through a pidfd, at once.
        for rank in range(self.num_ranks):
            spec = RankSpec(
                rank, self.num_ranks, self.config.model_path, self.config.dtype, self.config.max_num_seqs,
                self.config.max_model_len, self.placement, self.ep.backend, rendezvous, self.ep.timeout_s,
            )
            ours, theirs = socket.socketpair()
            with ours, theirs:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "eep.runtime.rank", str(theirs.fileno())], pass_fds=[theirs.fileno()]
                )
                conn = Connection(os.dup(ours.fileno()))
            self._procs.append(proc)
            self._pidfds.append(os.pidfd_open(proc.pid))
            self._conns.append(conn)
            send(conn, spec)
        self._gather("ready", self.ep.start_timeout_s)
        logger.info("%d ranks ready (%s, %d slots)", self.num_ranks, self.ep.backend, self.placement.num_physical)

    def _gather(self, kind: str, timeout_s: float) -> list[object]:
        """One reply of `kind` from every rank; RankFailed if one exits or the timeout passes."""
        replies: list[object] = [None] * self.num_ranks
        pending = set(range(self.num_ranks))
        deadline = time.monotonic() + timeout_s
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RankFailed(min(pending), f"no {kind!r} reply within {timeout_s:.1f} s")
            ready = wait([self._conns[r] for r in pending] + [self._pidfds[r] for r in pending], left)
            for r in sorted(pending):
                if self._conns[r] in ready:
                    try:
                        got, payload = recv(self._conns[r])
                    except EOFError:
                        raise RankFailed(r, "its pipe closed") from None
                    if got == "peer_timeout":
                        raise RankFailed(payload, f"silent on the data plane (reported by rank {r})")
                    if got != kind:
                        raise RankFailed(r, f"answered {got!r} instead of {kind!r}")
                    replies[r] = payload
                    pending.discard(r)
                elif self._pidfds[r] in ready:
                    raise RankFailed(r, f"process exited with code {self._procs[r].wait(timeout=5)}")
        return replies

    def execute(self, work: list[list[SeqWork]]) -> list[list[int]]:
        for conn, rank_work in zip(self._conns, work, strict=True):
            send(conn, ("step", rank_work))
        # The ranks' own data-plane waits name a silent peer after timeout_s; the executor waits
        # longer, so that their report (which names the right rank) arrives first.
        return self._gather("tokens", 2 * self.ep.timeout_s + 5.0)  # type: ignore[return-value]

    def storage_ptrs(self) -> list[list[int]]:
        """Per rank: data_ptr of its routing tables and expert slots (they must never move)."""
        for conn in self._conns:
            send(conn, ("ptrs", None))
        return self._gather("ptrs", self.ep.timeout_s)  # type: ignore[return-value]

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def close(self) -> None:
        """Stop every rank (politely, then by force), remove the buffers and temp files."""
        for conn, proc in zip(self._conns, self._procs):
            if proc.poll() is None:
                try:
                    send(conn, ("stop", None))
                except OSError:
                    pass
        for proc in self._procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for conn in self._conns:
            conn.close()
        for fd in self._pidfds:
            os.close(fd)
        self._procs, self._conns, self._pidfds = [], [], []
        if self._segment is not None:
            self._segment.close()
            self._segment.unlink()
            self._segment = None
        shutil.rmtree(self._tmpdir, ignore_errors=True)
