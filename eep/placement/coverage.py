"""Expert coverage of a committed membership view (pure functions).

What this module promises:
- `plan_coverage` is the one decision the controller takes after *every* committed view
  change (a failure, a drain, a joiner switched in, a joiner that failed while loading): from
  the view alone, the routing tables in use and the weights each slot is known to hold, it
  plans the tables that fit the view. Nothing of how the view was reached (which rejoin was
  loading, which repair was cut short, whether the instance was paused) enters the plan, so
  coverage can never stay behind the view.
- The plan covers every (layer, expert) pair whenever the active ranks have enough slots for
  it (`coverable`): a paused instance resumes at the first view change after which its active
  ranks can hold every expert again, and an instance that can hold them is never paused.
- Pure: no clock, no RNG, no global state; the same input gives an equal plan on every process
  (`plan_repair` and `plan_rejoin` are pure).

Legend: L = MoE layers, E = logical experts, P = physical slots, N = ranks, S = P // N.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from eep.membership.view import MembershipView
from eep.placement.repair import RepairPlan, plan_rejoin, plan_repair
from eep.placement.routing import Placement, without_slots
from eep.placement.topology import Topology


def outside(view: MembershipView) -> frozenset[int]:
    """Ranks that take no part in the view's steps (failed or still joining)."""
    active = set(view.active_ranks)
    return frozenset(r for r in range(view.num_ranks) if r not in active)


def plan_coverage(
    view: MembershipView,
    tables: Placement,
    held: torch.Tensor,
    *,
    expert_bytes: int,
    topology: Topology,
    backup: torch.Tensor | None = None,
    host_of: Sequence[int] | None = None,
    joined: Iterable[int] = (),
    target: torch.Tensor | None = None,
) -> RepairPlan:
    """The repair that fits the routing tables to committed `view`.

    Args:
        view: the committed view; its active ranks serve the next step.
        tables: the routing tables in use (`physical_to_logical_map [L, P]`, -1 = empty).
        held: `[L, P]` the expert whose weights each slot is known to hold (-1 = none or
            unknown). Slots of ranks outside the view are ignored; a listed slot whose content
            is not the listed expert is unlisted first.
        expert_bytes, topology, backup, host_of: as `plan_repair` takes them.
        joined: ranks switched in by this view change; each has loaded its slots of
            `target [L, P]` (required with `joined`), which are listed first (`plan_rejoin`).

    Returns:
        The `RepairPlan` whose `placement` lists no slot outside the view, every live replica
        it can, and copies for what no active rank holds, into free, spare or reclaimed slots
        of the active ranks. `plan.uncovered` is empty unless `coverable` is False.
    """
    joined = tuple(joined)
    if joined and target is None:
        raise ValueError("joined ranks need the target placement they loaded")
    phy2log = tables.physical_to_logical_map
    unknown = (phy2log >= 0) & (phy2log != held.to(phy2log.dtype))
    if bool(unknown.any()):  # listed, but its content is not known (a copy into it was cut short)
        tables = without_slots(tables, unknown)
    for rank in joined:
        tables, held = plan_rejoin(tables, held, view.num_ranks, rank, target)  # type: ignore[arg-type]
    return plan_repair(tables, held, view.num_ranks, outside(view), expert_bytes=expert_bytes,
                       topology=topology, backup=backup, host_of=host_of)


def coverable(view: MembershipView, num_physical: int, num_experts: int) -> bool:
    """Whether the view's active ranks have a slot for every expert of a layer (every layer has
    the same number of slots): the condition under which `plan_coverage` covers everything."""
    return len(view.active_ranks) * (num_physical // view.num_ranks) >= num_experts


def pause_reason(plan: RepairPlan, on_uncoverable: str) -> str | None:
    """Why the instance must pause after `plan` (None: it serves). With `on_uncoverable` =
    "degrade" it serves with the uncovered experts masked instead."""
    if not plan.uncovered or on_uncoverable != "pause":
        return None
    return (f"{len(plan.uncovered)} (layer, expert) pairs have no live replica and the active ranks have no "
            f"slot left for them; waiting for a rank to rejoin")
