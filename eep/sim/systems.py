"""How each system answers a failure, as phases with durations: the simulator's inputs.

What this module promises: `respond(system, scenario, model, cluster, constants)` returns a
`Response`: the phases of the recovery pause (failure to serving again, detection first), the
phases that make a replacement ready off the critical path, the phases of the pause when it
switches in, the re-prefill work the survivors take on, and the requests lost. Every duration
is arithmetic on the constants table (`eep.sim.constants`) and the cluster; expert copies come
from eep's own planner (`plan_placement` for the layout with redundant experts, `plan_repair`
for the copies and their schedule, on the cluster's bandwidth model): nothing is fitted to the
figures being compared.

The systems, each as its published mechanism (`SYSTEMS` names them):
- `full_restart`: a fixed-membership instance. The survivors hang in DeepEP until its timeout,
  the job fails and is scheduled again, every process starts, loads its weights, warms up
  DeepGEMM and captures its CUDA graphs; every request in flight is lost and resubmitted (its
  prompt and output so far prefilled again, nothing decoded meanwhile).
- `eep_paper`: EEP as the paper presents it: detection by a collective timeout (masked
  buffers, no communicator rebuilt), the lost experts restored from host memory, the decode
  CUDA graphs re-captured for the new membership, the faulted batch run again, the dead
  rank's requests prefilled again on the survivors; a replacement warms up off the critical
  path and switches in with a re-capture. Which timeout EEP uses is not in the figures we have:
  it is SGLang's dispatch timeout here (both build on DeepEP's masked buffers), with its range.
- `sglang`: SGLang Elastic EP with Mooncake EP: a rank that misses the dispatch timeout is
  masked out (`active_ranks` is an input of the captured graphs: no re-capture), EPLB
  rebalances the experts, the batch is run again; the requests on the dead rank are lost. A
  relaunched rank rejoins when ready (PR #15771), with a re-capture on every rank.
- `eep`: eep's design as built here, carried to GPUs: a dead process seen by its host agent's
  death notice (a hung one by the failure timeout), repair planned ahead, the lost experts copied
  from backups on another node and from peers (eep's planner and schedule), the survivors' part
  of the faulted step replayed, the dead rank's requests re-prefilled in chunks (at most
  `eep_reprefill_share` of each step), the joiner warmed up off the critical path and switched in
  between two steps. Two steps eep has not built on GPUs are modelled and marked: CUDA graphs
  kept valid across membership changes by masked buffers (as Mooncake EP's), and GPU-to-GPU
  expert copies.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

from eep.errors import ConfigError
from eep.placement.backups import backup_masks
from eep.placement.repair import RepairPlan, plan_rejoin, plan_repair
from eep.placement.routing import Placement, spare_slots_for, with_spare_slots
from eep.sim.cluster import Cluster, ModelShape

SYSTEMS = ("full_restart", "eep_paper", "sglang", "eep")
LABELS = {"full_restart": "full restart (fixed membership)", "eep_paper": "EEP (paper)",
          "sglang": "SGLang Elastic EP", "eep": "eep (this design)"}
MODELLED = "modelled: a GPU step eep has not built"


@dataclass(frozen=True, slots=True)
class Phase:
    name: str
    seconds: float
    note: str = ""


@dataclass(frozen=True, slots=True)
class Scenario:
    """`failed` ranks of an EP `ep` instance lost at `fail_at_s` (none: a schedule without a
    failure); `failure` "crash" (the process dies: its host's agent sees it) or "hang" (it stops
    answering, or its whole node is gone: seen by its silence); a replacement rejoins when ready
    (`rejoin`)."""

    ep: int
    failed: tuple[int, ...]
    fail_at_s: float = 30.0
    horizon_s: float = 600.0
    failure: Literal["crash", "hang"] = "crash"
    redundant: int = 32
    rejoin: bool = True

    def __post_init__(self) -> None:
        if self.ep < 2 or len(set(self.failed)) != len(self.failed) or \
                not all(0 <= r < self.ep for r in self.failed) or len(self.failed) >= self.ep:
            raise ConfigError(f"a scenario needs ep >= 2 and 0..ep-1 distinct failed ranks in [0, ep): {self}")
        if not 0 <= self.fail_at_s < self.horizon_s:
            raise ConfigError("fail_at_s must lie within [0, horizon_s)")


@dataclass(frozen=True, slots=True)
class Response:
    system: str
    pause: tuple[Phase, ...]
    replacement: tuple[Phase, ...]
    reintegration: tuple[Phase, ...]
    reprefill_tokens: float
    reprefill_share: float
    requests_lost: int
    serving_after_pause: int
    repair: dict[str, object] = field(default_factory=dict)

    @property
    def pause_s(self) -> float:
        return sum(p.seconds for p in self.pause)

    @property
    def reintegration_s(self) -> float:
        return sum(p.seconds for p in self.reintegration)


@dataclass(frozen=True, slots=True)
class Layout:
    """Where the experts are at EP `ep` (eep's placement, spare slots, ring backups)."""

    tables: Placement
    host_of: tuple[int, ...]
    backups: dict[int, object]
    slots_per_rank: int

    def backup_bytes_per_node(self, model: ModelShape) -> int:
        """The most host memory one node's backup takes (its own experts and the next node's)."""
        return max(int(mask.sum()) for mask in self.backups.values()) * model.expert_bytes  # type: ignore[attr-defined]

    @classmethod
    def of(cls, model: ModelShape, cluster: Cluster, ep: int, redundant: int, ranks_lost: int = 0) -> Layout:
        """Spare slots for the survivors of one node's loss (eep's default), or of `ranks_lost`
        ranks if more."""
        from eep.bench.plan import placement_for

        slots = -(-(model.n_routed_experts + redundant) // ep)
        wide = ep > model.n_routed_experts  # every expert replicated about evenly: tables just that wide
        placed = placement_for(ep, redundant, num_experts=model.n_routed_experts, num_layers=model.moe_layers,
                               max_replicas=-(-slots * ep // model.n_routed_experts) + 1 if wide else None)
        covered = max(min(cluster.gpus_per_node, ep // 2), ranks_lost)
        tables = with_spare_slots(placed, ep, spare_slots_for(slots, ep, covered))
        host_of = tuple(r // cluster.gpus_per_node for r in range(ep))
        layout = cls(tables, host_of, backup_masks(tables, host_of), tables.num_physical // ep)
        need = layout.backup_bytes_per_node(model)
        if need > cluster.host_memory_bytes:
            raise ConfigError(f"the ring backups need {need / 1e9:.0f} GB of host memory per node; the cluster "
                              f"has {cluster.host_memory_bytes / 1e9:.0f} GB")
        return layout


def plan_for(layout: Layout, model: ModelShape, cluster: Cluster, failed: tuple[int, ...]) -> tuple[RepairPlan, float]:
    """eep's repair plan for `failed` on `layout`, and the wall time planning took (ms)."""
    held = layout.tables.physical_to_logical_map.clone()
    start = time.perf_counter()
    plan = plan_repair(layout.tables, held, len(layout.host_of), frozenset(failed), expert_bytes=model.expert_bytes,
                       topology=cluster.topology(), backup=layout.backups, host_of=list(layout.host_of))
    return plan, 1e3 * (time.perf_counter() - start)


def joiner_expert_bytes(layout: Layout, repair: RepairPlan, model: ModelShape, failed: tuple[int, ...]) -> int:
    """The expert bytes one replacement loads to take its slots back (eep's `plan_rejoin`, the
    failed ranks back one after the other into the repaired tables), at most."""
    tables, held = repair.placement, repair.held_after
    target, n, per = layout.tables.physical_to_logical_map, len(layout.host_of), layout.slots_per_rank
    for r in failed:
        tables, held = plan_rejoin(tables, held, n, r, target)
    return max(int((held[:, r * per:(r + 1) * per] >= 0).sum()) for r in failed) * model.expert_bytes


def _repair_summary(plan: RepairPlan, plan_ms: float) -> dict[str, object]:
    by: dict[str, int] = {}
    for t in plan.transfers:
        by[t.source_kind] = by.get(t.source_kind, 0) + t.nbytes
    return {"bytes_moved": plan.bytes_moved, "bytes_by_source": by, "copies": len(plan.transfers),
            "copy_makespan_s": plan.est_makespan_s, "plan_ms": plan_ms, "uncovered": len(plan.uncovered)}


def respond(system: str, scenario: Scenario, model: ModelShape, cluster: Cluster, c: dict[str, float],
            plan: tuple[RepairPlan, float] | None = None, layout: Layout | None = None) -> Response:
    """`system`'s answer to `scenario` (see the module docstring); `c`: the constants' values
    (the links' figures come from `cluster`). `plan` (eep's repair plan and its planning ms) is
    made here when not given."""
    if system not in SYSTEMS:
        raise ConfigError(f"unknown system {system!r}; known: {list(SYSTEMS)}")
    layout = layout or Layout.of(model, cluster, scenario.ep, scenario.redundant)
    if plan is None:
        plan = plan_for(layout, model, cluster, scenario.failed)
    repair, plan_ms = plan
    k, n = len(scenario.failed), scenario.ep
    step = c["decode_step_s"]
    per_gpu_requests = c["decode_tokens_per_s_per_gpu"] * step  # requests in each GPU's decode batch
    lost_work = k * per_gpu_requests * c["kv_tokens_per_request"]  # prompt + output so far, to prefill again
    slots = -(-(model.n_routed_experts + scenario.redundant) // n)
    rank_bytes = model.rest_bytes + slots * model.moe_layers * model.expert_bytes
    # a process (re)starting reads its weights from the node's NVMe, shared by the node's GPUs
    # that start together, and no faster than one PCIe link
    def load_s(together: int) -> float:
        return max(rank_bytes / cluster.pcie_bytes_per_s, rank_bytes * together / cluster.nvme_bytes_per_s)

    per_node = [r // cluster.gpus_per_node for r in scenario.failed]
    replacements = max((per_node.count(h) for h in set(per_node)), default=1)  # on the busiest node
    load_node = load_s(min(cluster.gpus_per_node, n))
    warm = (Phase("process start + CUDA context", c["process_start_s"]),
            Phase("weights from NVMe", load_s(replacements)),
            Phase("DeepGEMM warm-up", c["deepgemm_warmup_s"]),
            Phase("CUDA graph capture", c["cuda_graph_capture_s"]))
    copies = Phase("copy lost experts (eep's plan)", repair.est_makespan_s)
    summary = _repair_summary(repair, plan_ms)

    if system == "full_restart":
        pause = (Phase("DeepEP timeout", c["deepep_timeout_s"]),
                 Phase("job scheduled again", c["scheduler_restart_s"]),
                 warm[0], Phase("weights from NVMe (whole node)", load_node), *warm[2:])
        return Response(system, pause, (), (), n * per_gpu_requests * c["kv_tokens_per_request"], 1.0,
                        0, n, {"bytes_moved": 0})
    if system == "eep_paper":
        pause = (Phase("dispatch timeout", c["sglang_dispatch_timeout_s"]), copies,
                 Phase("CUDA graph re-capture", c["cuda_graph_recapture_s"]), Phase("faulted batch again", step))
        return Response(system, pause, warm, (Phase("CUDA graph re-capture", c["cuda_graph_recapture_s"]),),
                        lost_work, c["eep_reprefill_share"], 0, n - k, summary)
    if system == "sglang":
        pause = (Phase("dispatch timeout", c["sglang_dispatch_timeout_s"]), copies,
                 Phase("batch run again", step))
        return Response(system, pause, warm, (Phase("CUDA graph re-capture", c["cuda_graph_recapture_s"]),),
                        0.0, 0.0, int(round(k * per_gpu_requests)), n - k, summary)
    detect = (Phase("death notice", c["eep_death_notice_s"]) if scenario.failure == "crash"
              else Phase("failure timeout", c["eep_failure_timeout_s"]))
    pause = (detect, Phase("plan (made ahead)", 0.0),
             Phase(copies.name, copies.seconds, MODELLED + " (GPU-to-GPU copies)"),
             Phase("replay survivors' part of the step", step))
    # the joiner takes its slots back (plan_rejoin) from live peers and backups through its own
    # NIC, with the weights every rank holds
    joiner_bytes = model.rest_bytes + (joiner_expert_bytes(layout, repair, model, scenario.failed)
                                       if scenario.failed else 0)
    joiner = (warm[0], Phase("its weights from peers/backups (plan_rejoin)", joiner_bytes / cluster.rdma_bytes_per_s),
              *warm[2:])
    switch = (Phase("switch in between two steps", step, MODELLED + " (graphs kept by masked buffers)"),)
    return Response(system, pause, joiner, switch, lost_work, c["eep_reprefill_share"], 0, n - k,
                    {**summary, "joiner_bytes": joiner_bytes})


def expected_failures(num_gpus: int, days: float, c: dict[str, float]) -> float:
    return num_gpus * days * c["failures_per_gpu_day"]
