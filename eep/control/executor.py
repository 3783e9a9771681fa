"""The expert-parallel executor: the façade the engine drives, over the controller's parts.

The parts (eep/control/, see docs/architecture.md):
- `Cluster`: the hosts (node 0's `LocalHost` in this process, the other nodes' agents);
- `RankPool`: the rank processes (start, ready, fence, stop, reap);
- `FailureDetector`: who failed and why; `ReplyCollector`: the one reply loop;
- `Controller`: the committed view, the tables and weights in use, the one commit point;
- `StepRunner`: a step's orders and answers; `CoverageKeeper`: coverage fitted to every view
  (with `AheadPlanner`); `Reintegration`: rejoin, switch-in, drain.

Failure handling (fault_policy "repair", the default; see docs/failure-handling.md): a step's
failure is committed (epoch + 1: every survivor blocked on the dead abandons the step at once),
the survivors' answers to the aborted step are drained and thrown away, coverage is fitted to
the new view, and `execute` raises `RanksFailed`: the engine re-admits the dead ranks' requests
on survivors and runs the step again. fault_policy "none" keeps the fixed membership: any
failure raises `RankFailed`."""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable

import torch

from eep.config import EngineConfig, resolve_dtype
from eep.control.cluster import Cluster, data_layout
from eep.control.config import EPConfig, Takeover
from eep.control.controller import Controller
from eep.control.coverage import CoverageKeeper
from eep.control.detector import FailureDetector
from eep.control.hooks import FaultHooks
from eep.control.leadership import Leadership
from eep.control.pool import RankPool
from eep.control.rebalance import Rebalancer
from eep.control.reintegration import Reintegration
from eep.control.replies import ReplyCollector
from eep.control.scaling import Scaler
from eep.control.steps import StepRunner
from eep.control.takeover import TakeOver
from eep.engine.worker import SeqWork
from eep.errors import ConfigError, DataPlaneError, RankFailed, RanksFailed, StepRetry
from eep.membership.store import EtcdStore, MembershipStore, MemoryStore
from eep.membership.view import MembershipEvent, MembershipView
from eep.model.checkpoint import CheckpointReader
from eep.model.config import ModelConfig
from eep.placement.backups import backup_masks
from eep.placement.eplb import plan_placement
from eep.placement.routing import (
    Placement,
    placement_from_phy2log,
    spare_slots_for,
    with_spare_slots,
)
from eep.runtime import wire
from eep.runtime.accounting import Ledger
from eep.runtime.wire import StepResult
from eep.security.channel import Channel
from eep.security.secret import ClusterSecret

logger = logging.getLogger(__name__)

_MAX_RETRIES = 3  # consecutive steps abandoned without a failure before the data plane is declared broken


def target_placement(cfg: ModelConfig, ep: EPConfig) -> Placement:
    """The balanced placement with room (spare slots) to re-home one rank's experts on the
    others; across hosts, one host's. With `ep_max_size`, planned on the ranks started and laid
    out over all the instance is sized for: the other ranks' slots stay empty until a scale-up."""
    balanced = plan_placement(cfg.num_experts, ep.ep_size, num_layers=len(cfg.moe_layers),
                              num_redundant=ep.num_redundant_experts)
    spare = ep.num_spare_slots
    if spare is None:
        lost = ep.ep_size // ep.nnodes if ep.nnodes > 1 else 1
        spare = (spare_slots_for(balanced.num_physical // ep.ep_size, ep.ep_size, lost)
                 if ep.elastic and ep.ep_size > 1 else 0)
    started = with_spare_slots(balanced, ep.ep_size, spare, balanced.max_replicas + (1 if ep.elastic else 0))
    if ep.num_ranks == ep.ep_size:
        return started
    per_rank = started.num_physical // ep.ep_size
    phy2log = torch.full((started.num_layers, ep.num_ranks * per_rank), -1, dtype=torch.int64)
    for i, rank in enumerate(ep.initial_ranks):
        phy2log[:, rank * per_rank:(rank + 1) * per_rank] = started.physical_to_logical_map[:, i * per_rank:(i + 1) * per_rank]
    return placement_from_phy2log(phy2log, started.num_logical, started.max_replicas)


class EPExecutor:
    def __init__(self, config: EngineConfig, ep: EPConfig, takeover: Takeover | None = None) -> None:
        """`takeover`: a standby head taking a running instance over (eep.control.takeover):
        adopt its running ranks instead of starting any."""
        self.config, self.ep, self.num_ranks = config, ep, ep.num_ranks
        self.takeover = takeover
        self.timeouts = ep.timeouts
        with CheckpointReader(config.model_path) as reader:
            cfg = ModelConfig.from_hf(reader.config)
            dtype = resolve_dtype(config.dtype, reader.config)
        self.model_config = cfg
        target = target_placement(cfg, ep)
        expert_bytes = 3 * cfg.hidden_size * cfg.moe_intermediate_size * torch.empty(0, dtype=dtype).element_size()
        # what each host's backup keeps, fixed at start from the initial tables: host h keeps its
        # own experts and host h+1's (one host: every expert)
        masks = (backup_masks(target, [ep.node_of(r) for r in range(ep.num_ranks)])
                 if ep.elastic and ep.expert_backup else None)
        secret = ClusterSecret.load(ep.cluster_secret_file) if ep.cluster_secret_file else None
        credentials = secret.etcd_credentials(ep.instance) if secret is not None else None
        self.store: MembershipStore = (EtcdStore(list(ep.etcd_endpoints), ep.instance, timeout_s=ep.failure_timeout_s,
                                                 credentials=credentials)
                                       if ep.etcd_endpoints else MemoryStore())
        self.on_deposed: list[Callable[[str], None]] = []  # told once if another head takes the leader key
        try:  # across hosts with etcd: the leader key first, so that a second head stops before it starts ranks
            head, control = (f"node{takeover.node}", takeover.control) if takeover else ("node0", ep.dist_init_addr)
            self.leadership = (Leadership(self.store, head, {"control": control, "pid": os.getpid()},
                                          ep.head_lease_ttl_s, self._deposed) if ep.etcd_endpoints else None)
        except BaseException:
            self.store.close()
            raise
        self.ledger = Ledger()  # CPU time of elastic bookkeeping and of all the work (eep.runtime.accounting)
        self.hooks = FaultHooks()
        self.steps_from_fenced = 0  # committed steps with an answer from a process outside the view (must stay 0)
        # the data plane's time over the committed steps (status()["dataplane"]; eep.bench.steady's figures)
        self.dataplane = {"steps": 0, "exchange_critical_s": 0.0, "exchange_s": 0.0, "expert_max_s": 0.0,
                          "expert_mean_s": 0.0}
        self.last_step: list[StepResult] = []  # per active rank: the timings of the last step
        self._retries = 0  # consecutive steps abandoned without a failure
        try:
            self._cluster: Cluster | None = Cluster(
                config, ep, self.timeouts, data_layout(cfg, dtype, ep, config.max_num_batched_tokens), masks, secret,
                takeover)
        except BaseException:
            if self.leadership is not None:
                self.leadership.close()
            self.store.close()
            raise
        self.pool = RankPool(self._cluster, ep.num_ranks)
        self.detector = FailureDetector(self._cluster, self.pool, self.timeouts, self.ledger)
        self.ctl = Controller(ep, self.timeouts, self.store, self._cluster, self.pool, target, self.leadership)
        self.replies = ReplyCollector(self.pool, self.detector, lambda r, why: self.ctl.event("fault_seen", r, why))
        self.runner = StepRunner(ep, self.timeouts, self.pool, self.replies)
        self.coverage_keeper = CoverageKeeper(ep, self.ctl, self.replies, self.ledger, expert_bytes, masks, self.hooks)
        self.reintegration = Reintegration(ep, self.timeouts, self.ctl, self.coverage_keeper, self.replies, self.hooks)
        self.rebalancer = Rebalancer(ep, self.ctl, self.coverage_keeper, self.replies, self.ledger, expert_bytes, masks,
                                     self.hooks)
        self.scaler = Scaler(ep, self.ctl, self.reintegration, self.rebalancer)
        try:
            if takeover is None:
                self._start()
            else:
                TakeOver(self.ctl, self.pool, self.replies, self.coverage_keeper, ep.start_timeout_s).run()
        except BaseException:
            self.close()
            raise
        logger.info("%d ranks ready (%s, %d slots, policy %s)", self.num_ranks, ep.backend,
                    self.ctl.placement.num_physical, ep.fault_policy)

    def _start(self) -> None:
        for rank in self.ep.initial_ranks:  # the start waits for the fork server's imports
            self.pool.spawn(rank, self.ctl.placement, None, 0, wait_s=self.ep.start_timeout_s)
        answers = self.replies.collect(self.ep.initial_ranks, (wire.Ready,), 0, self.ep.start_timeout_s,
                                       heartbeats=False)
        answers.raise_first("Ready")
        for rank, ready in answers.replies.items():
            self.pool.mark_ready(rank, ready.warmup_s)  # type: ignore[attr-defined]
        self.ctl.start()
        self.coverage_keeper.settle()

    # -- what the engine and the HTTP admin call (eep.engine.engine.ElasticExecutor) -------------
    @property
    def elastic(self) -> EPExecutor:
        return self

    @property
    def view(self) -> MembershipView:
        return self.ctl.view

    @property
    def active_ranks(self) -> tuple[int, ...]:
        return self.ctl.view.active_ranks

    @property
    def paused_reason(self) -> str | None:
        return self.ctl.paused_reason

    @property
    def placement(self) -> Placement:
        return self.ctl.placement

    @property
    def held(self) -> torch.Tensor:
        return self.ctl.held

    @property
    def repairs(self) -> deque[dict[str, object]]:
        return self.coverage_keeper.repairs

    @property
    def events(self) -> deque[MembershipEvent]:
        return self.ctl.events

    def standby_door(self, subscribe: Callable[[Channel, wire.StandbyHello], None],
                     attached: Callable[[], bool]) -> bool:
        """Across hosts: hand every standby head that connects through the controller's door to
        `subscribe` (the journal's replication feed); `attached()`: one follows now (while it
        does, a lapsed leader key deposes this head: `Leadership`). False on one host."""
        hosts = self._cluster.hosts if self._cluster is not None else None
        if hosts is None:
            return False
        hosts.on_standby = subscribe
        if self.leadership is not None:
            self.leadership.standby = attached
        return True

    @property
    def deposed(self) -> str | None:
        """Why this head no longer leads its instance (another head holds the leader key), or None."""
        return self.leadership.deposed if self.leadership is not None else None

    def _deposed(self, reason: str) -> None:  # the leadership's thread
        for listener in list(self.on_deposed):
            listener(reason)

    def membership_pending(self) -> bool:
        return self.reintegration.pending() or self.scaler.pending() or self.rebalancer.in_flight

    def needs_step(self) -> bool:
        """Moves are being written: only a step's answers (empty ones will do) say when they are done."""
        return self.rebalancer.in_flight

    def at_step_boundary(self) -> tuple[int, ...]:
        """Between two steps: a scale operation's next part, drain, start replacements (rejoin
        auto), switch in every joiner that has finished loading, a rebalance's switch or start.
        Returns the ranks switched in."""
        if not self.ep.elastic:
            return ()
        switched: tuple[int, ...] = ()
        try:
            with self.ledger.charge("step_boundary"):
                if self.ctl.paused_reason is not None:
                    self._check_while_paused()
                self.scaler.at_step_boundary()
                switched = self.reintegration.at_step_boundary()
            if not switched:  # (a switch-in changed the view: a rebalance plans from it at a later boundary)
                self.rebalancer.at_step_boundary(start_new=not self.scaler.pending())
        except RankFailed as e:  # died while moves were sent or the tables switched
            self.ctl.event("fault_seen", e.rank, f"during a rebalance: {e}")
            self._handle_failure(frozenset({e.rank}), [])
        return switched

    def _check_while_paused(self) -> None:
        """While paused no step runs, and nothing else would notice an active rank that died or
        stopped meanwhile: it would stay in the view and be switched against at the next change."""
        gone = self.detector.gone_now(self.ctl.view.active_ranks)
        for r, why in gone.items():
            self.ctl.event("fault_seen", r, f"while paused: {why}")
        if gone:
            self._handle_failure(frozenset(gone), [])

    def drain(self, rank: int) -> None:
        """Take active `rank` out of the view gracefully at the next step boundary: its requests
        move to the others (prefilled again), its experts are covered as after a failure (reuse,
        then copies), then its process stops. It can rejoin later like a failed rank."""
        if not self.ep.elastic:
            raise ConfigError("drain needs fault_policy 'repair'")
        self.reintegration.request_drain(rank)

    def rejoin(self, rank: int) -> None:
        """Start a new process for failed `rank`; it loads while the others serve and is switched
        in at the first step boundary after it is ready (`at_step_boundary`)."""
        if not self.ep.elastic:
            raise ConfigError("rejoin needs fault_policy 'repair'")
        self.reintegration.rejoin(rank)

    def scale(self, ep_size: int, operation_id: str | None = None) -> dict[str, object]:
        """Move the instance to `ep_size` active ranks (within `ep_max_size`), at step boundaries,
        while it serves (eep.control.scaling). The same `operation_id` again gives the same
        operation: safe to retry. ConfigError if refused now."""
        if not self.ep.elastic:
            raise ConfigError("scaling needs fault_policy 'repair'")
        return self.scaler.request(ep_size, operation_id)

    def scale_status(self, operation_id: str) -> dict[str, object]:
        """A scale operation's state; KeyError if this instance has none by that id."""
        return self.scaler.status(operation_id)

    # -- steps ---------------------------------------------------------------------------------
    def execute(self, work: list[list[SeqWork]]) -> list[list[int]]:
        """Run one step: `work[r]` on each active rank r (inactive ranks must get no work).
        Raises `RanksFailed` / `StepRetry` (elastic) or `RankFailed` (fixed) if it cannot finish."""
        view = self.ctl.view
        if any(work[r] for r in range(self.num_ranks) if r not in view.active_ranks):
            raise ConfigError("work was given to a rank outside the view")
        out = self.runner.run(view, work, self.ep.elastic and self.rebalancer.report_due(self.ctl.steps + 1))
        self.ctl.steps += 1
        if out.failed:
            self._handle_failure(frozenset(out.failed), out.unfinished)
        if out.retry:  # no one failed, but the step is broken: abort it everywhere, run it again
            self._retries += 1
            if self._retries > _MAX_RETRIES:
                raise DataPlaneError(f"the same step failed {self._retries} times without a rank failure: {out.retry}")
            self.ctl.commit(self.ctl.view.bump(), f"step aborted: {out.retry}")
            _, more = self.runner.drain(out.unfinished, view.epoch)
            if more:
                self._handle_failure(frozenset(more), [])
            raise StepRetry(out.retry)
        self._retries = 0
        self._committed(view, out.results)
        return [out.results[r].tokens if r in out.results else [] for r in range(self.num_ranks)]

    def _committed(self, view: MembershipView, results: dict[int, StepResult]) -> None:
        """The books of a step that completed."""
        ctl, active = self.ctl, view.active_ranks
        self.coverage_keeper.planner.after_step(ctl.steps, ctl.view, ctl.placement, ctl.held)
        if ctl.fault_time is not None:  # the first step that completed since a failure
            ctl.event("resume", None, f"serving again {time.time() - ctl.fault_time:.3f} s after the fault was seen")
            ctl.fault_time = None
        self.last_step = [results[r] for r in active]
        self._count_exchanges([results[r].exchange_s for r in active])
        experts = [results[r].expert_s for r in active]  # the longest rank's expert time is what balance shortens
        self.dataplane["expert_max_s"] += max(experts)
        self.dataplane["expert_mean_s"] += sum(experts) / len(experts)
        # an invariant kept as a figure: every answer committed came from the process the view names
        self.steps_from_fenced += any(self.pool[r].incarnation != view.incarnations[r] for r in active)
        for r in active:
            self.ledger.rank_report(r, self.pool[r].pid, results[r].cpu_ns, results[r].heartbeat_ns, results[r].load_ns)
        if self.ep.elastic:
            self.rebalancer.after_step(ctl.steps, results)

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

    def _handle_failure(self, failed: frozenset[int], in_step: list[int]) -> None:
        """Commit a view without `failed`, abort the step on every survivor, fit coverage to the
        new view and raise RanksFailed. A failure seen while this runs joins the same view change."""
        t0 = time.perf_counter()
        ctl = self.ctl
        ctl.fault_time = ctl.fault_time or time.time()
        order_epoch = ctl.view.epoch
        dead, all_dead = set(failed), set(failed)
        while dead:
            ctl.fail(dead)  # survivors blocked on the dead abandon the step now
            in_step = [r for r in in_step if r not in dead]
            answered, more = self.runner.drain(in_step, order_epoch)
            dead = more - all_dead
            all_dead |= dead
            in_step = [r for r in in_step if r not in dead and r not in answered]
        all_dead |= self.coverage_keeper.reconcile(t0)
        raise RanksFailed(frozenset(all_dead), ctl.view.epoch)

    # -- status and tables ---------------------------------------------------------------------
    def coverage(self) -> dict[str, int]:
        return self.ctl.coverage()

    def pids(self) -> list[int]:
        """The pid of each rank's current process (0 where there is none)."""
        return self.pool.pids()

    def status(self) -> dict[str, object]:
        ctl = self.ctl
        return {
            "view": ctl.view.to_dict(),
            "pids": self.pids(),
            "coverage": ctl.coverage(),
            "paused": ctl.paused_reason,
            "degraded": bool(ctl.uncovered) and ctl.paused_reason is None,
            "repairs": list(self.repairs),
            "events": [e.to_dict() for e in ctl.events],
            "accounting": self.ledger.snapshot(),
            "steps_committed_by_fenced_ranks": self.steps_from_fenced,
            "stale_replies_dropped": self.replies.stale_dropped,
            "dataplane": dict(self.dataplane),
            "nodes": self.ep.nnodes,
            "eplb": self.rebalancer.status(),
            "ep_max_size": self.ep.num_ranks,
            "scale": self.scaler.current.to_dict() if self.scaler.current is not None else None,
        }

    def update_routing(self, placement: Placement) -> None:
        """Switch every active rank's routing tables to `placement`, in place, between two steps.
        Each slot must be given the expert whose weights it holds, or nothing (-1): this moves
        no weights."""
        self.coverage_keeper.update_routing_on(self.ctl.view.active_ranks, placement)  # checked before any rank applies it
        self.ctl.placement = placement
        self.coverage_keeper.planner.void(self.ctl.steps)

    def storage_ptrs(self) -> list[list[int]]:
        """Per active rank: data_ptr of its routing tables, expert slots and buffers."""
        active = self.ctl.view.active_ranks
        replies = self.replies.request({r: wire.QueryPtrs(self.ctl.view.epoch) for r in active}, wire.Ptrs,
                                       self.ep.timeout_s, heartbeats=self.detector.heartbeats)
        return [replies[r].ptrs for r in active]  # type: ignore[attr-defined]

    def close(self) -> None:
        """Stop every rank (politely, then by force), remove the buffers and temp files. Idempotent."""
        if self._cluster is None:
            return
        self.coverage_keeper.planner.close()
        self._cluster.release_all()
        self.pool.close(self.ctl.view.epoch)
        self._cluster.close()
        self._cluster = None
        if self.leadership is not None:
            self.leadership.close()
        self.store.close()
