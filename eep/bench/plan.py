"""`eep bench plan`: eep's repair planner timed at datacenter scale, for real.

What `run_plan_bench` promises: DeepSeek-V3's MoE shape (256 routed experts in each of 58 MoE
layers; one expert's fp8 weights 3 x 7168 x 2048 bytes) with 32 redundant experts, placed by
`plan_placement` over EP ranks, 8 ranks per node; where the 288 slots do not divide evenly over
the ranks, each rank gets the slots of the next multiple and the ones left over stay empty
(EP 64: 320 slots, 32 of them empty; EP 128: 384, 96; EP 256: 512, 224). Routing tables list up
to 33 replicas of an expert (32 redundant + 1, the width of EPLB's `log2phy`). Each rank also
has the spare (empty) slots eep gives it by default across hosts: enough for the survivors of
one node's loss to hold every slot it had (`spare_slots_for`). Each node keeps the ring backup
(`backup_masks`: its own experts and the next node's). For every EP size and every failure,
`plan_repair` (pure; what runs on the critical path when no plan was made ahead) is timed
`repeats` times on this CPU after one untimed plan (a running controller has planned before:
it makes plans ahead), and the slowest is reported (the garbage collector's start-up objects
frozen first, as in a running `eep serve`):
- `one_rank`: rank N/2;
- `one_node`: the 8 ranks of node 1;
- `sixteen_ranks`: 16 ranks spread over the instance (ranks i * N / 16).
`summary.planner_max_ms` is the slowest plan of all cases (target: <= 50 ms).

`plan_rebalance` (online EPLB, `eep.placement.rebalance`) is timed the same way on each EP
size's start layout under a skewed load: per layer a Zipf(`REBALANCE_ZIPF`) load over the 256
experts in a seeded order of its own, the budget `REDUNDANT` replicas per layer, every rank
active, the ring backups as sources besides the peers. `summary.rebalance_max_ms` is its
slowest plan (target: <= 50 ms); each case also says how balanced the plan is and what it moves.
"""

from __future__ import annotations

import datetime
import gc
import platform
import statistics
import time
from typing import Any

import torch

from eep.placement.backups import backup_masks
from eep.placement.eplb import plan_placement
from eep.placement.rebalance import plan_rebalance
from eep.placement.repair import plan_repair
from eep.placement.routing import (
    Placement,
    placement_from_phy2log,
    spare_slots_for,
    with_spare_slots,
)
from eep.placement.topology import Topology

NUM_EXPERTS, NUM_MOE_LAYERS = 256, 58  # DeepSeek-V3 (config.json: n_routed_experts, 61 layers - 3 dense)
EXPERT_BYTES = 3 * 7168 * 2048  # gate, up and down projections in fp8: hidden 7168, moe_intermediate 2048
REDUNDANT = 32
RANKS_PER_NODE = 8
TARGET_MS = 50.0
REBALANCE_ZIPF = 0.5  # DeepSeek-V3-like: the hottest of 256 experts gets ~8x the mean, the top 10% ~35%


def failures(ep: int) -> dict[str, frozenset[int]]:
    """The failures timed at EP `ep` (see the module docstring)."""
    return {"one_rank": frozenset({ep // 2}),
            "one_node": frozenset(range(RANKS_PER_NODE, 2 * RANKS_PER_NODE)),
            "sixteen_ranks": frozenset(i * ep // 16 for i in range(16))}


def placement_for(ep: int, redundant: int = REDUNDANT, *, num_experts: int = NUM_EXPERTS,
                  num_layers: int = NUM_MOE_LAYERS, max_replicas: int | None = None) -> Placement:
    """`redundant` redundant experts over `ep` ranks, the slots left over (up to the next
    multiple of `ep`) empty: placed with every slot filled, then the replicas beyond the first
    `redundant` extra ones (in slot order) taken out. Routing tables `max_replicas` wide
    (default `redundant + 1`: one expert may hold every redundant slot)."""
    filled = -(-(num_experts + redundant) // ep) * ep - num_experts
    placed = plan_placement(num_experts, ep, num_layers=num_layers, num_redundant=filled)
    rows = placed.physical_to_logical_map.tolist()
    for row in rows:
        seen: set[int] = set()
        extra = 0
        for slot, expert in enumerate(row):
            if expert in seen:
                extra += 1
                if extra > redundant:
                    row[slot] = -1
            seen.add(expert)
    return placement_from_phy2log(torch.tensor(rows), num_experts, max_replicas or redundant + 1)


def run_plan_bench(ep_sizes: tuple[int, ...] = (32, 64, 128, 256), repeats: int = 5) -> dict[str, Any]:
    topology = Topology()
    cases: list[dict[str, Any]] = []
    rebalances: list[dict[str, Any]] = []
    for ep in ep_sizes:
        placed = placement_for(ep)
        per_rank = placed.num_physical // ep
        spare = spare_slots_for(per_rank, ep, RANKS_PER_NODE)
        tables = with_spare_slots(placed, ep, spare)
        held = tables.physical_to_logical_map.clone()
        host_of = [r // RANKS_PER_NODE for r in range(ep)]
        backups = backup_masks(tables, host_of)
        gc.collect()
        gc.freeze()  # as `eep serve` does once started: a full collection never walks torch's objects
        for name, dead in failures(ep).items():
            times, plan = [], None
            plan_repair(tables, held, ep, dead, expert_bytes=EXPERT_BYTES, topology=topology, backup=backups,
                        host_of=host_of)  # untimed: a running controller has planned before (plans ahead)
            for _ in range(repeats):
                start = time.perf_counter()
                plan = plan_repair(tables, held, ep, dead, expert_bytes=EXPERT_BYTES, topology=topology,
                                   backup=backups, host_of=host_of)
                times.append(1e3 * (time.perf_counter() - start))
            assert plan is not None
            sources: dict[str, int] = {}
            for t in plan.transfers:
                sources[t.source_kind] = sources.get(t.source_kind, 0) + 1
            cases.append({
                "ep": ep, "failure": name, "dead": sorted(dead), "redundant_experts": REDUNDANT,
                "slots_per_rank": per_rank + spare, "spare_slots_per_rank": spare,
                "empty_slots": int((tables.physical_to_logical_map[0] < 0).sum()),
                "plan_ms": {"max": max(times), "median": statistics.median(times), "all": times},
                "copies": len(plan.transfers), "copies_by_source": sources, "bytes_moved": plan.bytes_moved,
                "est_makespan_s": plan.est_makespan_s, "uncovered": len(plan.uncovered),
            })
        rebalances.append(_time_rebalance(ep, tables, held, host_of, backups, topology, repeats))
    worst = max(c["plan_ms"]["max"] for c in cases)
    worst_rebalance = max(c["plan_ms"]["max"] for c in rebalances)
    return {
        "summary": {"planner_max_ms": worst, "target_ms": TARGET_MS, "met": worst <= TARGET_MS,
                    "rebalance_max_ms": worst_rebalance, "rebalance_met": worst_rebalance <= TARGET_MS},
        "cases": cases,
        "rebalance_cases": rebalances,
        "config": {"num_experts": NUM_EXPERTS, "num_moe_layers": NUM_MOE_LAYERS, "expert_bytes": EXPERT_BYTES,
                   "redundant_experts": REDUNDANT,
                   "ranks_per_node": RANKS_PER_NODE, "repeats": repeats, "topology": topology.to_dict()},
        "machine": {"cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads()},
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def skewed_load(seed: int = 0) -> torch.Tensor:
    """`[58, 256]` per layer a Zipf(`REBALANCE_ZIPF`) load in a seeded expert order of its own."""
    g = torch.Generator().manual_seed(seed)
    zipf = 1 / torch.arange(1, NUM_EXPERTS + 1, dtype=torch.float64) ** REBALANCE_ZIPF
    return torch.stack([zipf[torch.randperm(NUM_EXPERTS, generator=g)] for _ in range(NUM_MOE_LAYERS)]) * 1e5


def _time_rebalance(ep: int, tables: Placement, held: torch.Tensor, host_of: list[int],
                    backups: dict[int, torch.Tensor], topology: Topology, repeats: int) -> dict[str, Any]:
    load = skewed_load()

    def plan():  # type: ignore[no-untyped-def]
        return plan_rebalance(tables, held, load, range(ep), ep, num_redundant=REDUNDANT, expert_bytes=EXPERT_BYTES,
                              topology=topology, host_of=host_of, backup=backups)

    plan()  # untimed, as for the repairs
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = plan()
        times.append(1e3 * (time.perf_counter() - start))
    assert result is not None
    return {"ep": ep, "plan_ms": {"max": max(times), "median": statistics.median(times), "all": times},
            "imbalance_before": float(result.imbalance_before.mean()),
            "imbalance_after": float(result.imbalance_after.mean()),
            "imbalance_after_max": float(result.imbalance_after.max()), "moves": len(result.moves),
            "moves_from_peers": result.moves_from_peers, "bytes_moved": result.bytes_moved,
            "replicas_per_layer_max": int(result.replicas.max())}


def summary_table(result: dict[str, Any]) -> str:
    lines = [f"{'EP':>4} {'failure':14} {'plan ms (max)':>13} {'copies':>7} {'GB moved':>9} {'est. s':>7} {'uncov.':>6}"]
    for c in result["cases"]:
        lines.append(f"{c['ep']:>4} {c['failure']:14} {c['plan_ms']['max']:>13.1f} {c['copies']:>7} "
                     f"{c['bytes_moved'] / 1e9:>9.2f} {c['est_makespan_s']:>7.2f} {c['uncovered']:>6}")
    s = result["summary"]
    lines.append(f"planner_max_ms {s['planner_max_ms']:.1f} (target <= {s['target_ms']:.0f}: "
                 f"{'met' if s['met'] else 'NOT MET'})")
    lines.append(f"{'EP':>4} {'rebalance ms (max)':>18} {'imbalance':>17} {'moves':>6} {'from peers':>10}")
    for c in result.get("rebalance_cases", []):
        lines.append(f"{c['ep']:>4} {c['plan_ms']['max']:>18.1f} {c['imbalance_before']:>7.3f} -> "
                     f"{c['imbalance_after']:.3f} {c['moves']:>6} {c['moves_from_peers']:>10}")
    if "rebalance_max_ms" in s:
        lines.append(f"rebalance_max_ms {s['rebalance_max_ms']:.1f} (target <= {s['target_ms']:.0f}: "
                     f"{'met' if s['rebalance_met'] else 'NOT MET'})")
    return "\n".join(lines)
