"""The expert-parallel executor: controller and supervisor of N rank processes.

The executor owns everything that must outlive a rank: the membership view and the routing
tables, and, through its host's agent (`eep.runtime.local_host.LocalHost`; every other host
runs `eep.runtime.agent.HostAgent`), the data-plane buffers (the shared-memory segment is
created there, never by a rank), the heartbeat board and the host's expert backup. It has the
ranks started, hands each its share of a step over its control connection, and collects the
sampled tokens.

Failure handling (fault_policy "repair", the default; see docs/failure-handling.md):
- detect: a rank's death is seen within a millisecond through its death notice (a robust
  mutex it holds, see `eep.runtime.death_notice`), its pidfd and pipe as a fallback; a stopped
  or wedged rank by its
  heartbeat going silent for `failure_timeout_s`; a live rank silent on the data plane for
  `timeout_s` by its peers' reports. Nothing else changes the view.
- decide: the failed ranks leave the view (epoch + 1), the new epoch is announced in the
  segment so every survivor blocked on the dead abandons the step at once; every survivor's
  answer to the aborted step is drained and thrown away (nothing is committed). Every view
  change is committed at one point (`_commit`).
- repair (`plan_coverage`, pure, after *every* view change: failure, drain, switch-in, a joiner
  that failed): tier 1 drops the slots outside the view from the tables; tier 2 copies experts
  that lost every replica into free or reclaimed slots on active ranks from the backup or the
  disk; the new tables are switched on in place on every active rank. Coverage is judged from
  the committed view alone, so an instance whose active ranks have room for every expert is
  never left paused.
- resume: `execute` raises `RanksFailed`; the engine re-admits the dead ranks' requests on
  survivors and runs the step again under the new epoch.
- reintegrate: `rejoin(rank)` starts a new process for the rank, which loads its experts while
  the others serve; at the next step boundary after it is ready it is switched in (epoch + 1)
  with one in-place table update on every rank.
fault_policy "none" keeps the fixed membership: any failure raises `RankFailed`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import wait

import torch

from eep.config import EngineConfig, resolve_dtype
from eep.dataplane.shm import ShmLayout
from eep.engine.worker import SeqWork
from eep.errors import (  # noqa: F401 (RankFailed re-exported)
    ConfigError, DataPlaneError, EepError, MembershipError, RankFailed, RanksFailed, StepRetry,
)
from eep.membership.coverage import outside, pause_reason, plan_coverage
from eep.membership.store import Committed, EpochConflict, EtcdStore, MemoryStore, MembershipStore, StoreError
from eep.membership.view import MembershipEvent, MembershipView, RankState
from eep.model.checkpoint import CheckpointReader
from eep.model.config import ModelConfig
from eep.placement.backups import backup_masks
from eep.placement.eplb import plan_placement
from eep.placement.repair import RepairPlan, plan_rejoin
from eep.placement.routing import Placement, check_tables_only, spare_slots_for, with_spare_slots
from eep.placement.topology import Topology
from eep.runtime.accounting import Ledger
from eep.runtime.death_notice import DeathNotice
from eep.runtime.hosts import HostError, HostListener, RemoteProcess
from eep.runtime.fork_server import ForkedProcess
from eep.runtime.local_host import LocalHost, renice
from eep.runtime import wire
from eep.runtime.wire import ExpertCopy, RankSpec, StepOrder, StepResult
from eep.security.channel import Channel
from eep.security.secret import ClusterSecret

logger = logging.getLogger(__name__)

BACKENDS = ("shm", "gloo")
FAULT_POLICIES = ("repair", "none", "restart")
REJOIN_POLICIES = ("manual", "auto")
UNCOVERABLE_POLICIES = ("pause", "degrade")
_MAX_RETRIES = 3
_HISTORY = 1000  # events and repair records kept for status()
_PLAN_AFTER_STEPS = 20  # steps after a view change before the next repairs are planned ahead
SECRET_HOW = ("make one with `eep secret init PATH`, copy it to every host (mode 0600) and pass it to every "
              "`eep serve` of the instance")


@dataclass(frozen=True, slots=True)
class EPConfig:
    ep_size: int = 4
    num_redundant_experts: int = 0
    backend: str = "shm"
    timeout_s: float = 30.0  # a data-plane wait this long on a live (heartbeating) peer fails it
    failure_timeout_s: float = 1.0  # heartbeat silence that confirms a stopped or hung rank
    start_timeout_s: float = 120.0  # rank start-up: import torch, load weights
    fault_policy: str | None = None  # "repair" | "none" | "restart"; default: repair on shm, none on gloo
    rejoin: str = "manual"
    on_uncoverable: str = "pause"
    num_spare_slots: int | None = None  # empty slots per rank for tier-2 repair; None: enough for one rank's experts
    expert_backup: bool = True  # keep experts in host memory (a fast tier-2 source; eep.placement.backups)
    cpu_affinity: bool = True  # pin active ranks to the cores round-robin; re-spread at every view change
    fork_server: bool = True  # fork this host's ranks from one interpreter that imported torch once
    topology: Topology = field(default_factory=Topology)
    # across hosts (eep.runtime.agent): ranks r * nnodes // ep_size live on node r // (ep_size // nnodes);
    # node 0 (this process) listens on dist_init_addr for the other nodes' agents
    nnodes: int = 1
    dist_init_addr: str | None = None
    etcd_endpoints: tuple[str, ...] = ()  # the membership store (memory when empty)
    instance: str = "default"  # the store's key prefix
    # the cluster credential (eep.security.secret): every connection between hosts proves it
    # holds it; the data plane's CURVE keys and the etcd password derive from it
    cluster_secret_file: str | None = None
    curve_data_plane: bool = True  # the ranks' data addresses authenticate and encrypt (ZeroMQ CURVE)
    allow_unauthenticated_gloo: bool = False  # gloo across hosts: torch's TCPStore and pairs, open to anyone

    def __post_init__(self) -> None:
        if self.fault_policy is None:
            object.__setattr__(self, "fault_policy", "repair" if self.backend == "shm" else "none")
        if self.ep_size < 1:
            raise ConfigError(f"ep_size must be >= 1, got {self.ep_size}")
        if self.num_redundant_experts < 0:
            raise ConfigError(f"num_redundant_experts must be >= 0, got {self.num_redundant_experts}")
        for name, value, allowed in (
            ("ep backend", self.backend, BACKENDS), ("fault policy", self.fault_policy, FAULT_POLICIES),
            ("rejoin policy", self.rejoin, REJOIN_POLICIES), ("on_uncoverable", self.on_uncoverable, UNCOVERABLE_POLICIES),
        ):
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {value!r}")
        if self.fault_policy == "repair" and self.backend != "shm":
            raise ConfigError("fault_policy 'repair' needs the shm backend; gloo's membership is fixed (use 'none')")
        if self.failure_timeout_s <= 0 or self.timeout_s <= 0:
            raise ConfigError("failure_timeout_s and timeout_s must be > 0")
        if self.num_spare_slots is not None and self.num_spare_slots < 0:
            raise ConfigError(f"num_spare_slots must be >= 0, got {self.num_spare_slots}")
        if self.nnodes < 1 or self.ep_size % self.nnodes:
            raise ConfigError(f"nnodes must divide ep_size: {self.ep_size} ranks on {self.nnodes} nodes")
        if self.nnodes > 1 and self.dist_init_addr is None:
            raise ConfigError("more than one node needs --dist-init-addr HOST:PORT (node 0's address)")
        if self.nnodes > 1 and self.cluster_secret_file is None:
            raise ConfigError(f"an instance across hosts needs --cluster-secret-file PATH: {SECRET_HOW}")
        if self.nnodes > 1 and self.backend == "gloo" and not self.allow_unauthenticated_gloo:
            raise ConfigError("gloo across hosts is unauthenticated (torch's TCPStore and gloo's pair connections "
                              "accept anyone who reaches them): it is a benchmark baseline only; pass "
                              "--allow-unauthenticated-gloo to run it on a network you trust")

    @property
    def elastic(self) -> bool:
        return self.fault_policy == "repair"

    def node_of(self, rank: int) -> int:
        return rank // (self.ep_size // self.nnodes)


@dataclass(slots=True)
class _Proc:
    """One rank process as the supervisor sees it."""

    rank: int
    proc: subprocess.Popen[bytes] | ForkedProcess | RemoteProcess
    pidfd: int | None  # None: on another host (its agent relays the exit, `wake` wakes us)
    conn: Channel
    notice: DeathNotice | None = None  # readable `notice.fd` once the process died (< 1 ms)
    ready: bool = False
    warmup_s: float | None = None  # a replacement's isolated warm-up before it reported ready
    started: float = field(default_factory=time.monotonic)
    wake: int | None = None  # remote: readable after any relayed exit

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

    def close(self, kill: bool) -> int | None:
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


def _exit_reason(p: _Proc) -> str:
    code = p.proc.poll()
    if code is not None:
        return f"process exited with code {code}"
    return "process dying (its death notice fired)"  # the kernel is still tearing it down


class EPExecutor:
    def __init__(self, config: EngineConfig, ep: EPConfig) -> None:
        self.config, self.ep, self.num_ranks = config, ep, ep.ep_size
        with CheckpointReader(config.model_path) as reader:
            cfg = ModelConfig.from_hf(reader.config)
            dtype = resolve_dtype(config.dtype, reader.config)
        self.model_config = cfg
        balanced = plan_placement(
            cfg.num_experts, ep.ep_size, num_layers=len(cfg.moe_layers), num_redundant=ep.num_redundant_experts
        )
        spare = ep.num_spare_slots
        if spare is None:  # room to re-home one rank's experts on the others; across hosts, one host's
            lost = ep.ep_size // ep.nnodes if ep.nnodes > 1 else 1
            spare = (spare_slots_for(balanced.num_physical // ep.ep_size, ep.ep_size, lost)
                     if ep.elastic and ep.ep_size > 1 else 0)
        self.target = with_spare_slots(balanced, ep.ep_size, spare, balanced.max_replicas + (1 if ep.elastic else 0))
        self.placement = self.target  # the routing tables in use
        self.held = self.target.physical_to_logical_map.clone()  # the expert each slot's weights are
        self.expert_bytes = 3 * cfg.hidden_size * cfg.moe_intermediate_size * torch.empty(0, dtype=dtype).element_size()
        self.view = MembershipView.initial((0,) * ep.ep_size)
        # the most recent history only: a long-lived server must not grow without bound
        self.events: deque[MembershipEvent] = deque(maxlen=_HISTORY)
        self.repairs: deque[dict[str, object]] = deque(maxlen=_HISTORY)  # per repair / rejoin: tiers, bytes, times
        self.uncovered: tuple[tuple[int, int], ...] = ()
        self.paused_reason: str | None = None
        self.steps = 0
        self.steps_from_fenced = 0  # committed steps with an answer from a process outside the view (must stay 0)
        # the data plane's time over the committed steps (status()["dataplane"]; eep.bench.steady's figures)
        self.dataplane = {"steps": 0, "exchange_critical_s": 0.0, "exchange_s": 0.0}
        self._local: LocalHost | None = None  # this host's agent: segment, board, backup, its ranks' processes
        self._backup_addresses: tuple[str, ...] | None = None  # multi-host: each node's backup server
        # what each host's backup keeps, fixed at start from the initial tables: host h keeps its
        # own experts and host h+1's (one host: every expert)
        self._backup_masks = (backup_masks(self.target, [ep.node_of(r) for r in range(self.num_ranks)])
                              if ep.elastic and ep.expert_backup else None)
        self._tmpdir: str | None = None  # gloo's file store on one host; made only for it
        self._procs: list[_Proc | None] = [None] * ep.ep_size
        self._fenced: list[_Proc] = []  # failed processes that may still be alive (stopped)
        self._pending_rejoin: set[int] = set()
        self._pending_drain: set[int] = set()
        self._retries = 0  # consecutive steps abandoned without a failure
        self._fault_time: float | None = None  # when the last failure was seen, until a step completes
        # repair plans for each single further failure, made ahead by a thread (see _plan_ahead):
        # dead set -> (placement, held, plan) they were made from
        self._plans: dict[frozenset[int], tuple[Placement, torch.Tensor, RepairPlan]] = {}
        self._planner: threading.Thread | None = None
        self._plan_at_step: int | None = None  # when to start the planner (steps completed)
        self._last_copies: dict[str, int] = {}  # what the last switch-in copied (tier2_experts, bytes_moved)
        self.last_step: list[StepResult] = []  # per active rank: the timings of the last step
        self.ledger = Ledger()  # CPU time of elastic bookkeeping and of all the work (eep.runtime.accounting)
        self._hosts: HostListener | None = None  # the other nodes' agents (multi-host)
        self._aborts = None  # multi-host: ZeroMQ ABORTs to every rank's data address at each new epoch
        self._data_addresses: tuple[str, ...] | None = None
        self._secret = ClusterSecret.load(ep.cluster_secret_file) if ep.cluster_secret_file else None
        credentials = self._secret.etcd_credentials(ep.instance) if self._secret is not None else None
        self._store: MembershipStore = (EtcdStore(list(ep.etcd_endpoints), ep.instance, timeout_s=ep.failure_timeout_s,
                                                  credentials=credentials)
                                        if ep.etcd_endpoints else MemoryStore())
        try:
            layout = self._data_layout(cfg, dtype)
            self._local = LocalHost(
                self.num_ranks, layout=layout if ep.backend == "shm" else None, heartbeats=ep.elastic,
                backup_mask=self._backup_masks[0] if self._backup_masks is not None else None,
                model_path=config.model_path, dtype=config.dtype, cpu_affinity=ep.cpu_affinity,
                fork_server=ep.fork_server, secret=self._secret if ep.nnodes > 1 else None,
            )
            self._rendezvous = self._local.segment.name if self._local.segment is not None else self._gloo_rendezvous()
            if ep.nnodes > 1:
                self._join_hosts()
            for rank in range(self.num_ranks):  # the start waits for the fork server's imports
                self._spawn(rank, self.placement, None, wait_s=ep.start_timeout_s)
            self._await_ready(range(self.num_ranks), self.ep.start_timeout_s)
            committed = self._store.current()  # an instance restarted under the same name goes on from its epoch
            initial = MembershipView.initial(tuple(self._procs[r].proc.pid for r in range(self.num_ranks)))  # type: ignore[union-attr]
            if committed is not None:
                initial = dataclasses.replace(initial, epoch=committed.epoch + 1)
            self._store_commit(committed.epoch if committed is not None else None, initial)
            self.view = initial
            self._settle()
        except BaseException:
            self.close()
            raise
        logger.info("%d ranks ready (%s, %d slots, policy %s)", self.num_ranks, ep.backend,
                    self.placement.num_physical, ep.fault_policy)

    # -- hosts ---------------------------------------------------------------------------------
    def _join_hosts(self) -> None:
        """Multi-host start: wait for every other node's agent, set its host up, and fix each
        rank's data-plane address (`data_port_base + rank` on its node's address)."""
        from eep.dataplane.network import AbortPusher, data_address

        ep = self.ep
        assert ep.dist_init_addr is not None
        host0, port = wire.split_addr(ep.dist_init_addr)
        setup = wire.HostSetup(
            self.view.epoch, self._layout, self.num_ranks, self.config.model_path, self.config.dtype,
            self._backup_masks, self._heartbeat_interval_s, ep.failure_timeout_s, ep.etcd_endpoints, ep.instance,
            ep.cpu_affinity, ep.fork_server,
        )
        assert self._secret is not None
        self._hosts = HostListener(ep.dist_init_addr, self._heartbeat_interval_s, setup, self._secret)  # also takes hosts back later
        agents = self._hosts.wait_agents(range(1, ep.nnodes), ep.start_timeout_s)
        address = {0: host0, **{n: link.address for n, link in agents.items()}}
        self._data_addresses = tuple(data_address(address[ep.node_of(r)], port + 1, r) for r in range(self.num_ranks))
        if ep.backend == "shm":
            from eep.security.curve import CurveKeys

            keys = CurveKeys.from_secret(self._secret) if ep.curve_data_plane else None
            if keys is None:
                logger.warning("--insecure-data-plane: the ranks' data addresses take frames from anyone who reaches "
                               "them, unencrypted (the control connections stay authenticated)")
            self._aborts = AbortPusher(self._data_addresses, keys)
        if self._backup_masks is not None:
            from eep.runtime.backup_server import backup_address

            self._backup_addresses = tuple(backup_address(address[n], port, self.num_ranks, n)
                                           for n in range(ep.nnodes))
            assert self._local is not None
            self._local.serve_backup(self._backup_addresses[0])
        logger.info("nodes up: %s", ", ".join(f"{n}={a}" for n, a in sorted(address.items())))

    def _node_up(self, node: int) -> bool:
        """Node 0 (this process) always; another node while its agent is connected."""
        return node == 0 or (self._hosts is not None and self._hosts.agent(node) is not None)

    @property
    def _heartbeat_interval_s(self) -> float:
        return min(0.1, self.ep.failure_timeout_s / 5)

    @property
    def _heartbeats(self) -> bool:
        """Ranks beat (failure handling is on): a silent one is failed after failure_timeout_s."""
        return self._local is not None and self._local.board is not None

    def _age_s(self, rank: int) -> float:
        """Seconds since `rank`'s last heartbeat (an upper bound for a rank on another host)."""
        p = self._procs[rank]
        if p is not None and p.remote:
            return p.proc.link.age_s(rank)  # type: ignore[union-attr]
        assert self._local is not None
        return self._local.age_s(rank)

    def _store_commit(self, expected: int | None, view: MembershipView) -> None:
        """Commit `view` in the membership store, by compare-and-swap of the epoch. The store is
        the authority across hosts: a controller that finds another epoch there is not the
        instance's controller any more and stops. An unreachable store is retried (other
        endpoints first) for `_store_patience_s`: meanwhile the instance waits (no view may serve
        uncommitted), then ends. A retry after an answer that was lost is safe (EtcdStore.commit
        knows its own commit again)."""
        record = Committed(view.epoch, {"view": view.to_dict(), "nodes": self.ep.nnodes})
        deadline = time.monotonic() + self._store_patience_s
        while True:
            try:
                self._store.commit(expected, record)
                return
            except EpochConflict as e:
                raise MembershipError(f"the membership store refused epoch {view.epoch}: {e}; another controller "
                                      f"commits this instance's views") from None
            except StoreError as e:
                if time.monotonic() > deadline:
                    raise MembershipError(f"the membership store is unreachable: {e}") from None
                logger.warning("membership store: %s; retrying epoch %d for %.0f s more", e, view.epoch,
                               deadline - time.monotonic())
                time.sleep(0.05)

    @property
    def _store_patience_s(self) -> float:
        """How long a view change waits for an unreachable membership store: an etcd election
        takes about one election timeout (1 s by default), a member's restart seconds."""
        return max(10.0, 10 * self.ep.failure_timeout_s)

    # -- processes ----------------------------------------------------------------------------
    def _gloo_rendezvous(self) -> str:
        if self.ep.nnodes > 1:  # gloo's TCP store, on node 0 after the data-plane ports
            host, port = wire.split_addr(self.ep.dist_init_addr)  # type: ignore[arg-type]
            return f"tcp://{host}:{port + 1 + self.num_ranks}"
        self._tmpdir = tempfile.mkdtemp(prefix="eep-ep-")
        return f"file://{self._tmpdir}/gloo-store"

    def _data_layout(self, cfg: ModelConfig, dtype: torch.dtype) -> ShmLayout:
        """Every host's data-plane segment (global rank numbering); gloo: the agents' unused ones."""
        if self.ep.backend == "gloo":
            self._layout = ShmLayout(num_ranks=self.num_ranks, region_bytes=64)
            return self._layout
        # A region carries at most one step's tokens of one rank: dispatch sends ids + weights +
        # hidden row per token, combine one hidden row per (token, k) pair (not pre-summed, see
        # eep.dataplane.dispatch), so up to top_k rows per token.
        hidden_bytes = cfg.hidden_size * torch.empty(0, dtype=dtype).element_size()
        row = max(cfg.top_k * 12 + hidden_bytes, cfg.top_k * hidden_bytes)
        layout = ShmLayout(num_ranks=self.num_ranks, region_bytes=self.config.max_num_batched_tokens * row)
        self._layout = layout
        return layout

    def _spawn(self, rank: int, placement: Placement, held: torch.Tensor | None, wait_s: float = 0.0) -> _Proc:
        # Ranks are forked from the host's fork server or are fresh interpreters (`python -m
        # eep.runtime`), never multiprocessing children: nothing of the caller's __main__ is
        # re-imported, and a replacement rank is started the same way at any time, by its host's
        # agent (this one's: `LocalHost`). A
        # death is seen through its death notice (< 1 ms), its pidfd once the exit is complete;
        # on another host through its agent and its connection.
        remote = self.ep.node_of(rank) != 0
        assert self._local is not None
        spec = RankSpec(
            rank, self.num_ranks, self.config.model_path, self.config.dtype, self.config.max_num_seqs,
            self.config.max_model_len, placement, self.ep.backend, self._rendezvous, self.ep.timeout_s,
            heartbeat_interval_s=self._heartbeat_interval_s, held=held, **self._local.names(),  # type: ignore[arg-type]
            data_addresses=self._data_addresses if self.ep.backend == "shm" else None, epoch=self.view.epoch,
            node_of=tuple(self.ep.node_of(r) for r in range(self.num_ranks)) if self._data_addresses else None,
            backup_addresses=self._backup_addresses, backup_timeout_s=max(2.0, 2 * self.ep.failure_timeout_s),
            data_plane_curve=self.ep.curve_data_plane,
        )
        if remote:
            return self._spawn_remote(spec)
        s = self._local.start(spec, wait_s)
        p = _Proc(rank, s.proc, s.pidfd, s.conn, s.notice)
        self._procs[rank] = p
        return p

    def _spawn_remote(self, spec: RankSpec) -> _Proc:
        """Start `spec.rank` through its node's agent; it connects back to us over TCP, and that
        connection is its control pipe. The host's own names (segment, board, backup) replace
        ours in the spec."""
        assert self._hosts is not None
        node = self.ep.node_of(spec.rank)
        try:
            conn, hello = self._hosts.spawn(node, spec.rank, self.view.epoch)
        except HostError as e:
            raise RankFailed(spec.rank, str(e)) from None
        local = {k: v for k, v in hello.host_local.items() if k != "rendezvous" or self.ep.backend == "shm"}
        spec = dataclasses.replace(spec, **local)  # gloo keeps its TCP rendezvous on node 0
        link = self._hosts.agents[node]
        assert self._data_addresses is not None
        if f"//{link.address}:" not in self._data_addresses[spec.rank]:
            conn.close()
            raise RankFailed(spec.rank, f"node {node} came back as {link.address}, not at the address its ranks' "
                                        f"data plane has ({self._data_addresses[spec.rank]})")
        p = _Proc(spec.rank, RemoteProcess(link, spec.rank, hello.pid), None, conn, None, wake=self._hosts.wake_r)
        self._procs[spec.rank] = p
        wire.send(conn, spec)
        return p

    def _await_ready(self, ranks: range | list[int], timeout_s: float) -> None:
        for rank, ready in self._gather(list(ranks), wire.Ready, timeout_s).items():
            p = self._procs[rank]
            assert p is not None
            p.ready, p.warmup_s = True, ready.warmup_s  # type: ignore[attr-defined]
            if p.notice is not None:  # it holds the mutex since before it said ready
                p.notice.watch(rank)

    def _gather(self, ranks: list[int], kind: type, timeout_s: float, heartbeats: bool = False) -> dict[int, object]:
        """One reply of `kind` from each of `ranks`, outside a step. A rank that exits, closes
        its pipe, answers out of turn or not within `timeout_s` raises RankFailed, but only
        after every other rank's reply was read, so that no stale reply is left in a pipe. With
        `heartbeats`, a rank whose heartbeat is silent for failure_timeout_s fails too (a
        stopped rank must not hold a switch-in or a repair for timeout_s)."""
        replies: dict[int, object] = {}
        failures: list[RankFailed] = []
        refused: list[str] = []
        pending = set(ranks)
        deadline = time.monotonic() + timeout_s
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                failures += [RankFailed(r, f"no {kind.__name__} reply within {timeout_s:.1f} s") for r in sorted(pending)]
                break
            wait_s = min(left, self._look_s(pending)) if heartbeats else left
            for r, p, ready in self._ready(pending, wait_s):
                if p.conn in ready:
                    pending.discard(r)
                    try:
                        msg = wire.recv(p.conn, wire.FROM_RANK)
                    except (EOFError, OSError):
                        failures.append(RankFailed(r, "its pipe closed"))
                        continue
                    if isinstance(msg, wire.Refused):
                        refused.append(f"rank {r} refused the request for {kind.__name__}: {msg.reason}")
                    elif not isinstance(msg, kind):
                        failures.append(RankFailed(r, f"answered {type(msg).__name__} instead of {kind.__name__}"))
                    else:
                        replies[r] = msg
                elif p.exited(ready):
                    pending.discard(r)
                    failures.append(RankFailed(r, _exit_reason(p)))
            if heartbeats:
                for r in sorted(self._silent(pending)):
                    pending.discard(r)
                    failures.append(RankFailed(r, f"no heartbeat for {self.ep.failure_timeout_s:g} s"))
        if failures:
            raise failures[0]
        if refused:
            raise ConfigError("; ".join(refused))
        return replies

    def _ready(self, ranks: set[int], timeout_s: float) -> list[tuple[int, _Proc, list[object]]]:
        """Wait up to `timeout_s` for a message or an exit of any of `ranks`; returns, in rank
        order, each rank with its process and what became ready (check `p.conn in ready` and
        `p.exited(ready)`)."""
        procs = {r: self._procs[r] for r in ranks}
        ready = wait(list({h: None for p in procs.values() if p for h in p.handles}), timeout_s)
        if self._hosts is not None and self._hosts.wake_r in ready:
            self._hosts.drain_wake()
        return [(r, p, ready) for r, p in sorted(procs.items()) if p is not None]

    def _event(self, kind: str, rank: int | None = None, detail: str = "") -> None:
        ev = MembershipEvent(time.time(), self.view.epoch, self.steps, kind, rank, detail)
        self.events.append(ev)
        logger.info("membership %s epoch=%d step=%d rank=%s %s", kind, ev.epoch, ev.step, rank, detail)

    # -- steps ---------------------------------------------------------------------------------
    @property
    def active_ranks(self) -> tuple[int, ...]:
        return self.view.active_ranks

    def at_step_boundary(self) -> tuple[int, ...]:
        """Between two steps: start replacements (rejoin auto) and switch in every joiner that
        has finished loading. Returns the ranks switched in."""
        if not self.ep.elastic:
            return ()
        with self.ledger.charge("step_boundary"):
            return self._step_boundary()

    def _step_boundary(self) -> tuple[int, ...]:
        if self.paused_reason is not None:
            self._check_while_paused()
        if self._pending_drain:
            self._drain_now()
        for rank in sorted(self._pending_rejoin):
            if not self._node_up(self.ep.node_of(rank)):
                continue  # its host is gone: it rejoins once the host's agent is back
            self._pending_rejoin.discard(rank)
            try:
                self.rejoin(rank)
            except ConfigError as e:  # its host went away again meanwhile: try once it is back
                logger.warning("rank %d: %s", rank, e)
                self._pending_rejoin.add(rank)
        switched = []
        for rank in self.view.ranks_in(RankState.JOINING):
            p = self._procs[rank]
            assert p is not None
            if not p.ready and (p.conn.poll(0) or p.proc.poll() is not None):
                try:
                    self._await_ready([rank], 5.0)
                except (RankFailed, ConfigError) as e:
                    self._joiner_failed(rank, str(e))
                    continue
            elif not p.ready and time.monotonic() - p.started > self.ep.start_timeout_s:
                # a joiner that hangs (stopped, wedged on I/O) must not stay "joining" forever
                self._joiner_failed(rank, f"not ready within {self.ep.start_timeout_s:g} s")
                continue
            if p.ready:
                self._activate(rank)
                switched.append(rank)
        return tuple(switched)

    def _check_while_paused(self) -> None:
        """While paused no step runs, and nothing else would notice an active rank that died or
        stopped meanwhile: it would stay in the view and be switched against at the next change.
        Look now (death notices, pidfds, heartbeats; no waiting) and fail what is gone."""
        active = set(self.view.active_ranks)
        dead = set()
        for r, p, ready in self._ready(active, 0):
            if p.exited(ready):
                dead.add(r)
                self._event("fault_seen", r, f"while paused: {_exit_reason(p)}")
        dead |= self._silent(active - dead)
        if dead:
            self._handle_failure(frozenset(dead), [])

    def membership_pending(self) -> bool:
        """A rank is to be restarted, loading or to be drained: `at_step_boundary` has work to do.
        A rank waiting for its host to come back is not (the idle loop looks again within its
        idle wait, a second, instead of every 50 ms for as long as the host is gone)."""
        return bool(any(self._node_up(self.ep.node_of(r)) for r in self._pending_rejoin) or self._pending_drain
                    or self.view.ranks_in(RankState.JOINING))

    def drain(self, rank: int) -> None:
        """Take active `rank` out of the view gracefully at the next step boundary: its requests
        move to the others (prefilled again), its experts are covered as after a failure (reuse,
        then copies), then its process stops. It can rejoin later like a failed rank."""
        if not self.ep.elastic:
            raise ConfigError("drain needs fault_policy 'repair'")
        if not 0 <= rank < self.num_ranks or self.view.states[rank] is not RankState.ACTIVE:
            raise ConfigError(f"rank {rank} is not active: only an active rank can be drained")
        if len(self.view.active_ranks) - len(self._pending_drain - {rank}) <= 1:
            raise ConfigError("the last active rank cannot be drained")
        self._pending_drain.add(rank)

    def execute(self, work: list[list[SeqWork]]) -> list[list[int]]:
        """Run one step: `work[r]` on each active rank r (inactive ranks must get no work).
        Raises `RanksFailed` / `StepRetry` (elastic) or `RankFailed` (fixed) if it cannot finish."""
        active = self.view.active_ranks
        if any(work[r] for r in range(self.num_ranks) if r not in active):
            raise ConfigError("work was given to a rank outside the view")
        order_epoch = self.view.epoch
        failed: set[int] = set()
        for rank in active:
            p = self._procs[rank]
            try:
                wire.send(p.conn, StepOrder(order_epoch, active, work[rank]))  # type: ignore[union-attr]
            except OSError as e:  # its end of the pipe is gone: the process died between steps
                if not self.ep.elastic:
                    raise RankFailed(rank, f"its pipe is closed ({e.__class__.__name__})") from None
                failed.add(rank)
        sent = [r for r in active if r not in failed]
        results, failed, retry = self._gather_step(sent, failed)
        self.steps += 1
        unfinished = [r for r in sent if r not in failed and r not in results]
        if failed:
            self._handle_failure(frozenset(failed), unfinished)
        if retry:  # no one failed, but the step is broken: abort it everywhere, run it again
            self._retries += 1
            if self._retries > _MAX_RETRIES:
                raise DataPlaneError(f"the same step failed {self._retries} times without a rank failure: {retry}")
            self._commit(self.view.bump(), f"step aborted: {retry}")
            _, more = self._drain(unfinished)
            if more:
                self._handle_failure(frozenset(more), [])
            raise StepRetry(retry)
        self._retries = 0
        if self._plan_at_step is not None and self.steps >= self._plan_at_step:
            self._plan_ahead()
        if self._fault_time is not None:  # the first step that completed since a failure
            self._event("resume", None, f"serving again {time.time() - self._fault_time:.3f} s after the fault was seen")
            self._fault_time = None
        self.last_step = [results[r] for r in active]
        self._count_exchanges([results[r].exchange_s for r in active])
        # an invariant kept as a figure: every answer committed came from the process the view names
        self.steps_from_fenced += any(self._procs[r].proc.pid != self.view.incarnations[r] for r in active)  # type: ignore[union-attr]
        for r in active:
            self.ledger.rank_report(r, self._procs[r].proc.pid, results[r].cpu_ns, results[r].heartbeat_ns)  # type: ignore[union-attr]
        return [results[r].tokens if r in results else [] for r in range(self.num_ranks)]

    def _gather_step(self, ranks: list[int], failed: set[int]) -> tuple[dict[int, StepResult], set[int], str]:
        """Collect each rank's step result until all answered or a failure is confirmed."""
        results: dict[int, StepResult] = {}
        pending = set(ranks)
        hard_deadline = time.monotonic() + 2 * self.ep.timeout_s + 5.0
        retry = ""
        while pending and not failed and not retry:
            if time.monotonic() > hard_deadline:
                r = min(pending)
                if not self.ep.elastic:
                    raise RankFailed(r, f"no step reply within {2 * self.ep.timeout_s + 5.0:.1f} s")
                failed.add(r)
                break
            for r, p, ready in self._ready(pending, self._look_s(pending)):
                if p.conn in ready:
                    try:
                        msg = wire.recv(p.conn, wire.FROM_RANK)
                    except (EOFError, OSError):
                        msg = None  # it exited
                    if isinstance(msg, wire.StepDone):
                        results[r] = msg.result
                        pending.discard(r)
                    elif isinstance(msg, wire.PeerSilent):  # a live peer silent for timeout_s: it is broken
                        if not self.ep.elastic:
                            raise RankFailed(msg.peer, f"silent on the data plane (reported by rank {r})")
                        failed.add(msg.peer)
                        self._event("fault_seen", msg.peer, f"silent on the data plane for {self.ep.timeout_s:g} s (rank {r})")
                        pending.discard(r)
                    elif isinstance(msg, wire.StepAbandoned):
                        if not self.ep.elastic:
                            raise DataPlaneError(f"rank {r} abandoned the step: {msg.reason}")
                        retry = f"rank {r} abandoned the step: {msg.reason}"
                        pending.discard(r)
                    else:
                        what = "pipe closed" if msg is None else f"answered {type(msg).__name__}"
                        if not self.ep.elastic:
                            raise RankFailed(r, "its pipe closed" if msg is None else what)
                        failed.add(r)
                        self._event("fault_seen", r, what)
                elif p.exited(ready):
                    if not self.ep.elastic:
                        raise RankFailed(r, _exit_reason(p))
                    failed.add(r)
                    self._event("fault_seen", r, _exit_reason(p))
            if self.ep.elastic and not failed:
                failed |= self._silent(pending)
        return results, failed, retry

    def _count_exchanges(self, timings: list[tuple[float, ...]]) -> None:
        """Add a committed step's dispatch/combine times: `exchange_s`, the mean over ranks of
        their time inside the calls (waiting for peers included), and `exchange_critical_s`, per
        call the shortest time any rank spent in it (the last to arrive waits for no one: the
        transport's own cost)."""
        calls = min((len(t) for t in timings), default=0)
        self.dataplane["steps"] += 1
        if calls:
            self.dataplane["exchange_critical_s"] += sum(min(t[i] for t in timings) for i in range(calls))
            self.dataplane["exchange_s"] += sum(sum(t) for t in timings) / len(timings)

    def _look_s(self, ranks: set[int]) -> float:
        """How long to wait for messages before the heartbeats of `ranks` are looked at again:
        failure_timeout_s / 20, or until the oldest beat turns failure_timeout_s old if that is
        sooner, so a stopped rank is failed right at failure_timeout_s after its last beat
        (each look is one read of the board)."""
        check_s = self.ep.failure_timeout_s / 20
        if not self._heartbeats or not ranks:
            return check_s
        with self.ledger.charge("heartbeat_looks"):
            due_s = self.ep.failure_timeout_s - max(self._age_s(r) for r in ranks)
            return max(0.001, min(check_s, due_s + 0.001))

    def _silent(self, ranks: set[int]) -> set[int]:
        """Ranks whose heartbeat has been silent for failure_timeout_s (stopped, hung)."""
        assert self._heartbeats
        with self.ledger.charge("heartbeat_looks"):
            silent = {r for r in ranks if self._age_s(r) > self.ep.failure_timeout_s}
            silent |= self._with_silent_hosts(silent, ranks)
        for r in sorted(silent):
            self._event("fault_seen", r, f"no heartbeat for {self._age_s(r):.2f} s")
        return silent

    def _with_silent_hosts(self, silent: set[int], ranks: set[int]) -> set[int]:
        """A silent remote rank whose agent is silent too: its whole host is gone (or cut off),
        and every rank of it among `ranks` fails with it, in one view change."""
        more: set[int] = set()
        for r in silent:
            p = self._procs[r]
            if p is not None and p.remote and p.proc.link.silent_s() > 2 * self._heartbeat_interval_s:  # type: ignore[union-attr]
                node = self.ep.node_of(r)
                more |= {q for q in ranks if self.ep.node_of(q) == node}
        return more - silent

    def _drain(self, ranks: list[int]) -> tuple[dict[int, object], set[int]]:
        """Read each of `ranks`' answer to an abandoned step (thrown away); returns the answers
        and the ranks that failed meanwhile (or named a silent peer, or never answered)."""
        results: dict[int, object] = {}
        failed: set[int] = set()
        pending = set(ranks)
        deadline = time.monotonic() + self.ep.timeout_s
        while pending and time.monotonic() < deadline:
            for r, p, ready in self._ready(pending, self.ep.failure_timeout_s / 4):
                if p.conn in ready:
                    try:
                        msg = wire.recv(p.conn, wire.FROM_RANK)
                    except (EOFError, OSError):
                        failed.add(r)
                        pending.discard(r)
                        continue
                    if isinstance(msg, wire.PeerSilent):
                        failed.add(msg.peer)
                    results[r] = msg
                    pending.discard(r)
                elif p.exited(ready):
                    failed.add(r)
                    pending.discard(r)
            newly = self._silent(pending)
            failed |= newly
            pending -= newly
        failed |= pending  # no answer within timeout_s: it is not serving
        return results, failed

    # -- failure -------------------------------------------------------------------------------
    def _handle_failure(self, failed: frozenset[int], in_step: list[int]) -> None:
        """Commit a view without `failed`, abort the step on every survivor, fit coverage to the
        new view and raise RanksFailed. A failure seen while this runs joins the same view change."""
        t0 = time.perf_counter()
        self._fault_time = self._fault_time or time.time()
        dead, all_dead = set(failed), set(failed)
        while dead:
            self._commit_failure(dead)  # survivors blocked on the dead abandon the step now
            in_step = [r for r in in_step if r not in dead]
            answered, more = self._drain(in_step)
            dead = more - all_dead
            all_dead |= dead
            in_step = [r for r in in_step if r not in dead and r not in answered]
        all_dead |= self._reconcile(t0)
        raise RanksFailed(frozenset(all_dead), self.view.epoch)

    def _commit(self, view: MembershipView, what: str) -> None:
        """The one point where a membership view is committed: the new view is recorded, and if
        its epoch is new it is announced in the segment (every rank blocked in a step of an older
        epoch abandons it at once), and the change is logged as a structured event."""
        bumped = view.epoch != self.view.epoch
        if bumped:
            self._store_commit(self.view.epoch, view)
        self.view = view
        if bumped and self._local is not None:
            self._local.announce_epoch(view.epoch)
        if bumped and self._hosts is not None:
            if self._aborts is not None:
                self._aborts.abort(view.epoch)
            self._hosts.epoch = view.epoch
            for link in list(self._hosts.agents.values()):
                link.epoch = view.epoch
                if not link.closed:
                    try:
                        link.send(wire.Announce(view.epoch))
                    except OSError:
                        pass
        self._event("view_committed", None, f"{what}; active {list(view.active_ranks)}")

    def _commit_failure(self, ranks: set[int]) -> None:
        """Commit the failure of `ranks` and cut their processes off."""
        self._commit(self.view.fail(ranks), f"failed {sorted(ranks)}")
        self._fence(ranks)

    def _fence(self, ranks: set[int]) -> None:
        """Cut the failed processes off: close their pipes (a stopped one finds it closed when
        it wakes, and exits as fenced) and keep them to reap; auto rejoin replaces them.

        A process seen dying through its death notice is still being torn down by the kernel
        (15-25 ms of CPU for a rank, on the core of a survivor): it gets the lowest priority,
        so that the repair and the replayed step run first and the teardown fills idle time
        (measured: a task sharing the core got ~60% more CPU in the 100 ms after the kill)."""
        for r in sorted(ranks):
            p = self._procs[r]
            if p is None:
                continue
            self._procs[r] = None
            if p.proc.poll() is None:
                if not p.remote:
                    renice(p.proc.pid, 19)
                try:
                    wire.send(p.conn, wire.Fence(self.view.epoch, f"not in the view of epoch {self.view.epoch}"))
                except OSError:
                    pass
            self._fenced.append(p)
            if self.ep.rejoin == "auto":
                self._pending_rejoin.add(r)

    def _settle(self) -> None:
        """After every view change: spread the ranks over the cores, plan the next repairs soon."""
        self._spread_ranks()
        self._plan_soon()

    def _plan_soon(self) -> None:
        """The tables or weights changed: plans made before are void; new ones are made once
        `_PLAN_AFTER_STEPS` steps completed (not during the step replayed after a failure,
        which would lose a core to the planner)."""
        self._plans = {}
        if self.ep.elastic:
            self._plan_at_step = self.steps + _PLAN_AFTER_STEPS

    def _plan_ahead(self) -> None:
        """Plan, in a background thread, the coverage after the failure of each active rank, from
        the tables and weights in use now (`plan_coverage` is pure: the plan made at the failure
        would be the same). A failure finds its plan ready (measured: 4 ms per plan alone, 15 ms
        inside a loaded server); the thread runs while the controller waits for the ranks, and a
        view change or table switch voids its plans."""
        self._plan_at_step = None
        placement, held, view = self.placement, self.held.clone(), self.view
        plans: dict[frozenset[int], tuple[Placement, torch.Tensor, RepairPlan]] = {}
        self._plans = plans

        def run() -> None:
            with self.ledger.charge("plan_ahead"):
                for r in view.active_ranks:
                    if self._plans is not plans:  # superseded
                        return
                    try:
                        after = view.fail({r})
                    except MembershipError:  # the last active rank: nothing would be left to plan for
                        continue
                    plans[outside(after)] = (placement, held, self._plan(after, placement, held))

        self._planner = threading.Thread(target=run, name="eep-repair-planner", daemon=True)
        self._planner.start()

    def _plan(self, view: MembershipView, placement: Placement, held: torch.Tensor,
              joined: tuple[int, ...] = ()) -> RepairPlan:
        return plan_coverage(
            view, placement, held, expert_bytes=self.expert_bytes, topology=self.ep.topology,
            backup=self._backup_masks,
            host_of=[self.ep.node_of(r) for r in range(self.num_ranks)],
            joined=joined, target=self.target.physical_to_logical_map,
        )

    def _spread_ranks(self) -> None:
        """Pin this host's active ranks to its cores (`LocalHost.pin`); a loading joiner is not
        pinned. Every view change calls this again."""
        assert self._local is not None
        self._local.pin({r: p.proc.pid for r in self.view.active_ranks
                         if (p := self._procs[r]) is not None and not p.remote})

    def _reconcile(self, t0: float, joined: tuple[int, ...] = ()) -> set[int]:
        """Fit coverage to the committed view; called after every view change, whatever was in
        flight when it began (`plan_coverage` judges from the view alone). A rank that fails
        meanwhile leaves the view, and coverage is planned again from what is known to be held.
        Returns the ranks that failed meanwhile."""
        failed: set[int] = set()
        while True:
            try:
                self._reconcile_once(t0, joined)
                self._settle()
                return failed
            except RankFailed as e:
                self._event("fault_seen", e.rank, f"while coverage was repaired: {e}")
                self._fault_time = self._fault_time or time.time()
                self._commit_failure({e.rank})
                failed.add(e.rank)
                joined = tuple(r for r in joined if r in self.view.active_ranks)

    def _reconcile_once(self, t0: float, joined: tuple[int, ...]) -> None:
        """Plan coverage for the committed view (or take the plan made ahead for it), carry it out
        on every active rank, then commit tables, held weights and the pause state."""
        t_start = time.perf_counter()  # t0..t_start: the view committed, the survivors stopped
        active = self.view.active_ranks
        dead = outside(self.view)
        ready = None if joined else self._plans.get(dead)
        cached = ready is not None and ready[0] is self.placement and torch.equal(ready[1], self.held)
        plan = ready[2] if cached else self._plan(self.view, self.placement, self.held, joined)  # type: ignore[index]
        for r in joined:  # the joiners hold their slots of the target (they loaded them)
            self.held[:, self._slots_of(r)] = self.target.physical_to_logical_map[:, self._slots_of(r)]
        self.held[:, [s for s in range(self.placement.num_physical) if s // self._per_rank in dead]] = -1
        copies: dict[int, list[ExpertCopy]] = {}
        for t in plan.transfers:
            if t.source_kind == "peer":
                raise EepError(f"repair chose a peer copy for layer {t.layer} expert {t.expert}: not supported")
            copies.setdefault(t.dst_rank, []).append(ExpertCopy(
                t.layer, t.dst_slot, t.expert, t.source_kind, t.source_host if t.source_kind == "backup" else None))
        t_plan = time.perf_counter()
        experts: list[dict[str, object]] = [
            {"layer": r.layer, "expert": r.expert, "tier": 1, "source": None, "seconds": 0.0}
            for r in plan.tiers if r.tier == 1
        ]
        if copies:
            # One message per active rank, one round trip in all (no step runs meanwhile): each
            # switches to the interim tables (the targets unlisted: they never list a reclaimed
            # slot), writes its copies, then switches to the new tables. The targets' content is
            # forgotten until their rank answers: a copy cut short leaves a slot with no known
            # content, and coverage is planned again from what is known to be held.
            check_tables_only(self._held_placement(plan.interim), plan.interim)
            for rank_copies in copies.values():
                for c in rank_copies:
                    self.held[c.layer, c.slot] = -1
            check_tables_only(Placement(plan.held_after, plan.placement.logical_to_physical_map,
                                        plan.placement.logical_replica_count), plan.placement)
            orders = {r: wire.Repair(self.view.epoch, plan.interim, copies.get(r, []), plan.placement) for r in active}
            for rank, done in self._exchange_all(orders, wire.Repaired).items():
                for c, sec in zip(copies.get(rank, []), done.seconds):  # type: ignore[attr-defined]
                    self.held[c.layer, c.slot] = c.expert
                    experts.append({"layer": c.layer, "expert": c.expert, "tier": 2, "source": c.source,
                                    "host": c.source_host, "rank": rank, "seconds": sec})
        elif not torch.equal(plan.placement.physical_to_logical_map, self.placement.physical_to_logical_map):
            self._update_routing_on(active, plan.placement)
        self.placement = plan.placement
        self.held = plan.held_after.clone()
        t_done = time.perf_counter()
        if joined or not (plan.tiers or plan.uncovered):  # a switch-in, or a change that touched no expert
            self._last_copies = {"tier2_experts": len(plan.transfers), "bytes_moved": plan.bytes_moved}
        else:
            self._record_repair(plan, dead, cached, experts, (t0, t_start, t_plan, t_done))
        self._commit_coverage(plan)

    def _record_repair(self, plan: RepairPlan, dead: frozenset[int], cached: bool, experts: list[dict[str, object]],
                       times: tuple[float, float, float, float]) -> None:
        t0, t_start, t_plan, t_done = times
        tiers = {1: sum(r.tier == 1 for r in plan.tiers), 2: sum(r.tier == 2 for r in plan.tiers)}
        record = {
            "epoch": self.view.epoch, "dead": sorted(dead), "tier1_experts": tiers[1], "tier2_experts": tiers[2],
            "bytes_moved": plan.bytes_moved, "uncovered": len(plan.uncovered), "plan_ready": cached,
            "settle_s": t_start - t0,
            "plan_s": t_plan - t_start, "copy_s": t_done - t_plan, "total_s": t_done - t0,
            "sources": sorted({t.source_kind for t in plan.transfers}),
            "experts": experts,  # per repaired (layer, expert): tier, source, seconds
        }
        self.repairs.append(record)
        self._event("repair", None, f"tier1={tiers[1]} tier2={tiers[2]} bytes={plan.bytes_moved} "
                    f"uncovered={len(plan.uncovered)} in {t_done - t0:.3f} s (survivors stopped in "
                    f"{(t_start - t0) * 1e3:.0f} ms, plan {(t_plan - t_start) * 1e3:.0f} ms"
                    f"{' (made ahead)' if cached else ''}, copies and tables "
                    f"{(t_done - t_plan) * 1e3:.0f} ms)")

    def _commit_coverage(self, plan: RepairPlan) -> None:
        """Record what `plan` left uncovered and pause, degrade or resume accordingly."""
        self.uncovered = plan.uncovered
        reason = pause_reason(plan, self.ep.on_uncoverable)
        if reason is not None and reason != self.paused_reason:
            self._event("paused", None, reason)
        elif reason is None and self.paused_reason is not None:
            self._event("resumed", None, "full coverage" if not plan.uncovered else "degraded")
        self.paused_reason = reason
        if plan.uncovered and reason is None:
            logger.warning("DEGRADED: %d (layer, expert) pairs have no live replica; serving with them masked "
                           "and the remaining top-k weights renormalised", len(plan.uncovered))
            self._event("degraded", None, f"{len(plan.uncovered)} (layer, expert) pairs masked")

    def _slots_of(self, rank: int) -> slice:
        return slice(rank * self._per_rank, (rank + 1) * self._per_rank)

    @property
    def _per_rank(self) -> int:
        return self.placement.num_physical // self.num_ranks

    def _exchange_all(self, messages: dict[int, object], reply: type) -> dict[int, object]:
        """Send each rank its control message and collect the replies (of type `reply`); a rank
        that fails here is handled like a failure in a step (repair again) by the caller's next step."""
        sent, broken = [], []
        for r, message in messages.items():
            try:
                wire.send(self._procs[r].conn, message)  # type: ignore[union-attr]
                sent.append(r)
            except OSError as e:
                broken.append(RankFailed(r, f"its pipe is closed ({e.__class__.__name__})"))
        replies = self._gather(sent, reply, self.ep.timeout_s, heartbeats=self._heartbeats)  # every reply read
        if broken:
            raise broken[0]
        return replies

    def _update_routing_on(self, ranks: tuple[int, ...] | list[int], placement: Placement) -> None:
        check_tables_only(self._held_placement(placement), placement)
        self._exchange_all({r: wire.SetRouting(self.view.epoch, placement) for r in ranks}, wire.RoutingSet)

    def _held_placement(self, like: Placement) -> Placement:
        """`held` as a Placement (for `check_tables_only`); replica lists may overflow, so only
        the slot map is meaningful."""
        return Placement(self.held.clone(), like.logical_to_physical_map, like.logical_replica_count)

    # -- reintegration -------------------------------------------------------------------------
    def rejoin(self, rank: int) -> None:
        """Start a new process for failed `rank`; it loads while the others serve and is switched
        in at the first step boundary after it is ready (`at_step_boundary`)."""
        if not self.ep.elastic:
            raise ConfigError("rejoin needs fault_policy 'repair'")
        if not 0 <= rank < self.num_ranks:  # -1 would index the last rank
            raise ConfigError(f"rank {rank} does not exist: this instance has ranks 0..{self.num_ranks - 1}")
        if self.view.states[rank] is not RankState.FAILED:
            raise ConfigError(f"rank {rank} is {self.view.states[rank].value}: only a failed rank can rejoin")
        node = self.ep.node_of(rank)
        if not self._node_up(node):
            raise ConfigError(f"rank {rank} lives on node {node}, whose agent is not connected: start "
                              f"`eep serve --node-rank {node} --dist-init-addr {self.ep.dist_init_addr}` there first")
        for p in [p for p in self._fenced if p.rank == rank]:  # the old process must be gone first
            code = p.close(kill=True)
            self._fenced.remove(p)
            self._event("reaped", rank, f"old process exited with code {code}")
        # The joiner loads its slots of the balanced target placement and starts with the tables
        # in use (its own slots unlisted); the tables that list them are made when it is ready.
        _, held_after = plan_rejoin(self.placement, self.held, self.num_ranks, rank, self.target.physical_to_logical_map)
        try:
            p = self._spawn(rank, self.placement, held_after)
        except RankFailed as e:  # its host's agent did not start it
            self._event("rejoin_failed", rank, str(e))
            raise ConfigError(f"rank {rank} could not be started: {e}") from None
        self._commit(self.view.begin_join(rank, p.proc.pid), f"rank {rank} joining (pid {p.proc.pid})")
        self._event("rejoin_started", rank, f"pid {p.proc.pid}")

    def _drain_now(self) -> None:
        t0 = time.perf_counter()
        ranks, self._pending_drain = set(self._pending_drain), set()
        self._commit(self.view.fail(ranks), f"drained {sorted(ranks)}")
        for rank in sorted(ranks):
            p = self._procs[rank]
            self._procs[rank] = None
            if p is not None:
                try:
                    wire.send(p.conn, wire.Stop(self.view.epoch))
                except OSError:
                    pass
                code = p.close(kill=False)
                self._event("drained", rank, f"left the view; process exited with code {code}")
        failed = self._reconcile(t0)
        raise RanksFailed(frozenset(ranks | failed), self.view.epoch)

    def _joiner_failed(self, rank: int, why: str) -> None:
        """A joiner died or refused while loading: it was never in a step, so the epoch stays; the
        coverage of the view is judged again all the same (it cannot have grown worse)."""
        self._event("rejoin_failed", rank, why)
        self._commit_failure({rank})
        failed = self._reconcile(time.perf_counter())
        if failed:
            raise RanksFailed(frozenset(failed), self.view.epoch)

    def _activate(self, rank: int) -> None:
        """Switch the ready joiner in at this step boundary: epoch + 1, tables listing its
        slots written in place on every active rank (healthy ranks do nothing else). If
        coverage is still incomplete and the active ranks now have room, the missing experts are
        copied in the same round trip (into the joiner's spare slots first)."""
        t0 = time.perf_counter()
        self._commit(self.view.activate(rank), f"rank {rank} switched in")
        failed = self._reconcile(t0, joined=(rank,))  # a death while switching is a failure like any other
        if failed:
            raise RanksFailed(frozenset(failed), self.view.epoch)
        pause = time.perf_counter() - t0
        warmup_s = self._procs[rank].warmup_s  # type: ignore[union-attr]
        self.repairs.append({"epoch": self.view.epoch, "rejoined": rank, "pause_s": pause, "warmup_s": warmup_s,
                             **self._last_copies})
        self._event("rejoined", rank, f"warmed up in {warmup_s or 0:.3f} s alone; switched in, tables updated "
                                      f"in {pause * 1e3:.1f} ms")

    # -- status --------------------------------------------------------------------------------
    def coverage(self) -> dict[str, int]:
        """(layer, expert) pairs with 0, 1 and >= 2 live replicas in the tables in use."""
        counts = self.placement.logical_replica_count
        return {"none": int((counts == 0).sum()), "one": int((counts == 1).sum()), "two_or_more": int((counts >= 2).sum())}

    def status(self) -> dict[str, object]:
        return {
            "view": self.view.to_dict(),
            "pids": self.pids(),
            "coverage": self.coverage(),
            "paused": self.paused_reason,
            "degraded": bool(self.uncovered) and self.paused_reason is None,
            "repairs": list(self.repairs),
            "events": [e.to_dict() for e in self.events],
            "accounting": self.ledger.snapshot(),
            "steps_committed_by_fenced_ranks": self.steps_from_fenced,
            "dataplane": dict(self.dataplane),
            "nodes": self.ep.nnodes,
        }

    # -- tables and introspection --------------------------------------------------------------
    def update_routing(self, placement: Placement) -> None:
        """Switch every active rank's routing tables to `placement`, in place, between two steps.

        Each slot must be given the expert whose weights it holds, or nothing (-1): this moves
        no weights.
        """
        self._update_routing_on(self.view.active_ranks, placement)  # checked before any rank applies it
        self.placement = placement
        self._plan_soon()

    def storage_ptrs(self) -> list[list[int]]:
        """Per active rank: data_ptr of its routing tables, expert slots and buffers."""
        replies = self._exchange_all({r: wire.QueryPtrs(self.view.epoch) for r in self.view.active_ranks}, wire.Ptrs)
        return [replies[r].ptrs for r in self.view.active_ranks]  # type: ignore[attr-defined]

    def pids(self) -> list[int]:
        """The pid of each rank's current process (0 where there is none)."""
        return [p.proc.pid if p is not None else 0 for p in self._procs]

    def close(self) -> None:
        """Stop every rank (politely, then by force), remove the buffers and temp files."""
        self._plans = {}  # stops the planner after its current plan
        if self._planner is not None:
            self._planner.join(10.0)
        segment = self._local.segment if self._local is not None else None
        if segment is not None:  # release any rank blocked on a dead peer, so it reads "stop"
            segment.announce_epoch(segment.control_epoch + 1)
            if self._aborts is not None:
                self._aborts.abort(segment.control_epoch)
        live = [p for p in self._procs if p is not None]
        for p in live:
            if p.proc.poll() is None:
                try:
                    wire.send(p.conn, wire.Stop(self.view.epoch))
                except OSError:
                    pass
        for p in live:
            p.close(kill=False)
        for p in self._fenced:
            if p.proc.poll() is None and not p.remote:
                os.kill(p.proc.pid, signal.SIGKILL)  # also wakes and kills a stopped process
            p.close(kill=True)
        self._procs, self._fenced = [None] * self.num_ranks, []
        if self._local is not None:
            self._local.close()
            self._local = None
        if self._aborts is not None:
            self._aborts.close()
            self._aborts = None
        if self._hosts is not None:
            self._hosts.close()
            self._hosts = None
        self._store.close()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
