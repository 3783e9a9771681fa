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
from eep.dataplane.shm import ShmLayout, ShmSegment, sweep_orphans
from eep.engine.worker import SeqWork
from eep.errors import ConfigError, DataPlaneError, EepError
from eep.model.checkpoint import CheckpointReader
from eep.model.config import ModelConfig
from eep.placement.eplb import plan_placement
from eep.placement.routing import Placement, check_tables_only
from eep.membership.view import MembershipView
from eep.runtime.rank import RankSpec, StepOrder, StepResult, recv, send

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
        self.loaded = self.placement  # which expert each slot's weights are (tables may differ)
        self._segment: ShmSegment | None = None
        self._tmpdir = tempfile.mkdtemp(prefix="eep-ep-")
        self._procs: list[subprocess.Popen[bytes]] = []
        self._pidfds: list[int] = []
        self._conns: list[Connection] = []
        self.last_step: list[StepResult] = []  # per rank: the timings of the last step
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
        sweep_orphans()  # segments of controllers that were SIGKILLed (they could not remove them)
        self._segment = ShmSegment.create(layout)
        return self._segment.name

    def _start(self, rendezvous: str) -> None:
        # Ranks are fresh interpreters (`python -m eep.runtime`), not multiprocessing
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
                # A session of its own: a terminal's Ctrl-C reaches the controller, which stops
                # the ranks in order, and not every rank at once.
                proc = subprocess.Popen(
                    [sys.executable, "-m", "eep.runtime", str(theirs.fileno())], pass_fds=[theirs.fileno()],
                    start_new_session=True,
                )
                conn = Connection(os.dup(ours.fileno()))
            self._procs.append(proc)
            self._pidfds.append(os.pidfd_open(proc.pid))
            self._conns.append(conn)
            send(conn, spec)
        self._gather("ready", self.ep.start_timeout_s)
        self.view = MembershipView.initial(tuple(p.pid for p in self._procs))
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
                    if got == "aborted":
                        raise DataPlaneError(f"rank {r} abandoned the step: {payload}")
                    if got == "error":
                        raise ConfigError(f"rank {r} refused a {kind!r} request: {payload}")
                    if got != kind:
                        raise RankFailed(r, f"answered {got!r} instead of {kind!r}")
                    replies[r] = payload
                    pending.discard(r)
                elif self._pidfds[r] in ready:
                    raise RankFailed(r, f"process exited with code {self._procs[r].wait(timeout=5)}")
        return replies

    def execute(self, work: list[list[SeqWork]]) -> list[list[int]]:
        active = self.view.active_ranks
        for rank, (conn, rank_work) in enumerate(zip(self._conns, work, strict=True)):
            try:
                send(conn, ("step", StepOrder(self.view.epoch, active, rank_work)))
            except OSError as e:  # its end of the pipe is gone: the process died between steps
                raise RankFailed(rank, f"its pipe is closed ({e.__class__.__name__})") from None
        # The ranks' own data-plane waits name a silent peer after timeout_s; the executor waits
        # longer, so that their report (which names the right rank) arrives first.
        results: list[StepResult] = self._gather("tokens", 2 * self.ep.timeout_s + 5.0)  # type: ignore[assignment]
        self.last_step = results
        return [r.tokens for r in results]

    def update_routing(self, placement: Placement) -> None:
        """Switch every rank's routing tables to `placement`, in place, between two steps.

        Each slot must be given the expert whose weights it holds, or nothing (-1): this moves
        no weights.
        """
        check_tables_only(self.loaded, placement)  # refused here, before any rank applies it
        for conn in self._conns:
            send(conn, ("routing", placement))
        self._gather("routing", self.ep.timeout_s)
        self.placement = placement

    def storage_ptrs(self) -> list[list[int]]:
        """Per rank: data_ptr of its routing tables and expert slots (they must never move)."""
        for conn in self._conns:
            send(conn, ("ptrs", None))
        return self._gather("ptrs", self.ep.timeout_s)  # type: ignore[return-value]

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def close(self) -> None:
        """Stop every rank (politely, then by force), remove the buffers and temp files."""
        if self._segment is not None:  # release any rank blocked on a dead peer, so it reads "stop"
            self._segment.announce_epoch(self._segment.control_epoch + 1)
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
