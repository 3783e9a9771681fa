"""Routing state: the tables that turn a router's logical expert ids into physical slots.

Names and shapes follow vLLM / SGLang EPLB (L = MoE layers, E = logical experts,
P = physical slots, R = maximum replicas of one expert):

- `physical_to_logical_map [L, P]` int64: the logical expert held by each slot, -1 = empty.
- `logical_to_physical_map [L, E, R]` int64: the live replicas of each expert, -1 padded.
- `logical_replica_count [L, E]` int64: how many entries of the row above are live.

Promise: the tensors are allocated once at their maximum shape and only ever updated in
place (`copy_`), so their storage (`data_ptr()`) never changes for the life of a process and
anything captured against them stays valid. Replica choice is deterministic (no RNG): the
same tokens routed through the same tables reach the same slots on every process.
"""

from __future__ import annotations

import math

from dataclasses import dataclass

import torch

from eep.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Placement:
    """A complete slot layout, as produced by a placement or repair planner (pure data)."""

    physical_to_logical_map: torch.Tensor  # [L, P] int64, -1 = empty slot
    logical_to_physical_map: torch.Tensor  # [L, E, R] int64, -1 padded
    logical_replica_count: torch.Tensor  # [L, E] int64

    def __post_init__(self) -> None:
        """The three tables fit each other (a Placement also arrives from the network)."""
        p2l, l2p, count = self.physical_to_logical_map, self.logical_to_physical_map, self.logical_replica_count
        for name, t, ndim in (("physical_to_logical_map", p2l, 2), ("logical_to_physical_map", l2p, 3),
                              ("logical_replica_count", count, 2)):
            if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.dim() != ndim:
                raise ConfigError(f"{name} must be a {ndim}-d int64 tensor")
        if l2p.shape[:2] != count.shape or p2l.shape[0] != count.shape[0]:
            raise ConfigError(f"routing tables of mismatched shapes: {list(p2l.shape)}, {list(l2p.shape)}, "
                              f"{list(count.shape)}")

    @property
    def num_layers(self) -> int:
        return self.physical_to_logical_map.shape[0]

    @property
    def num_physical(self) -> int:
        return self.physical_to_logical_map.shape[1]

    @property
    def num_logical(self) -> int:
        return self.logical_replica_count.shape[1]

    @property
    def max_replicas(self) -> int:
        return self.logical_to_physical_map.shape[2]


def placement_from_phy2log(phy2log: torch.Tensor, num_experts: int, max_replicas: int) -> Placement:
    """Derive the other two tables from `phy2log [L, P]`; replicas are listed in slot order.

    Whole-table tensor operations (no per-slot Python): at DeepSeek-V3's shape on 256 ranks
    (58 x 768 slots, replica lists 256 wide) this takes milliseconds, on a repair's critical path.
    """
    phy2log = phy2log.to(torch.int64).clone()
    num_layers, num_physical = phy2log.shape
    listed = phy2log >= 0
    expert = torch.where(listed, phy2log, num_experts)  # empty slots sort last, as a dummy expert
    count = torch.zeros(num_layers, num_experts + 1, dtype=torch.int64).scatter_add_(1, expert, torch.ones_like(expert))
    count = count[:, :num_experts]
    if num_layers and num_experts and int(count.max()) > max_replicas:
        layer, e = divmod(int(torch.argmax((count > max_replicas).flatten().to(torch.int8))), num_experts)
        raise ConfigError(f"layer {layer}: expert {e} has more than max_replicas={max_replicas} replicas")
    slots = torch.arange(num_physical).expand(num_layers, num_physical)
    order = torch.argsort(expert * num_physical + slots, dim=1)  # by expert, then slot
    sorted_expert = torch.gather(expert, 1, order)
    starts = torch.cat([torch.zeros(num_layers, 1, dtype=torch.int64), count.cumsum(1)], dim=1)  # [L, E + 1]
    replica = torch.arange(num_physical).expand(num_layers, num_physical) - torch.gather(starts, 1, sorted_expert)
    rows = torch.arange(num_layers).unsqueeze(1).expand(num_layers, num_physical)
    keep = sorted_expert < num_experts
    log2phy = torch.full((num_layers, num_experts, max_replicas), -1, dtype=torch.int64)
    log2phy[rows[keep], sorted_expert[keep], replica[keep]] = order[keep]
    return Placement(phy2log, log2phy, count.contiguous())


def without_slots(placement: Placement, slots: torch.Tensor) -> Placement:
    """`placement` with physical `slots [L, P]` bool (True = drop) emptied on their layers;
    the replica lists are rebuilt in slot order and the table shapes kept. Experts whose every
    replica is dropped get a replica count of 0."""
    phy2log = torch.where(slots, -1, placement.physical_to_logical_map)
    return placement_from_phy2log(phy2log, placement.num_logical, placement.max_replicas)


def check_tables_only(loaded: Placement, new: Placement, slots: range | None = None) -> None:
    """Raise ConfigError unless `new` asks only for what the weights `loaded` into the slots
    allow: every slot (of `slots`, default all) is given the expert it holds, or nothing (-1).
    Such a switch moves no weights, so it can be applied in place between two steps."""
    if new.physical_to_logical_map.shape != loaded.physical_to_logical_map.shape:
        raise ConfigError(
            f"placement of shape {tuple(new.physical_to_logical_map.shape)} does not fit "
            f"{tuple(loaded.physical_to_logical_map.shape)}"
        )
    cols = slice(None) if slots is None else slice(slots.start, slots.stop)
    o, n = loaded.physical_to_logical_map[:, cols], new.physical_to_logical_map[:, cols]
    moved = torch.nonzero((n != o) & (n >= 0))
    if moved.numel():
        layer, slot = (int(v) for v in moved[0])
        slot += 0 if slots is None else slots.start
        raise ConfigError(
            f"layer {layer} slot {slot}: the new tables give it expert {int(new.physical_to_logical_map[layer, slot])} "
            f"but it holds {int(loaded.physical_to_logical_map[layer, slot])}; relocate the weights first"
        )


def identity_placement(num_layers: int, num_experts: int, max_replicas: int = 1) -> Placement:
    """Slot p holds expert p on every layer: the layout of a single process without redundancy."""
    phy2log = torch.arange(num_experts, dtype=torch.int64).repeat(num_layers, 1)
    return placement_from_phy2log(phy2log, num_experts, max_replicas)


class RoutingTables:
    """Per-process routing state; see the module docstring for the storage promise."""

    def __init__(self, num_layers: int, num_experts: int, num_physical: int, max_replicas: int) -> None:
        self.physical_to_logical_map = torch.full((num_layers, num_physical), -1, dtype=torch.int64)
        self.logical_to_physical_map = torch.full((num_layers, num_experts, max_replicas), -1, dtype=torch.int64)
        self.logical_replica_count = torch.zeros((num_layers, num_experts), dtype=torch.int64)
        # Per layer: does every expert have exactly one live replica? Then the mapping is one
        # gather. Host-side bookkeeping derived at update time, never read from the tensors per token.
        self._single_replica = [False] * num_layers

    @classmethod
    def from_placement(cls, placement: Placement) -> RoutingTables:
        tables = cls(placement.num_layers, placement.num_logical, placement.num_physical, placement.max_replicas)
        tables.update_(placement)
        return tables

    def update_(self, placement: Placement) -> None:
        """Switch to `placement` in place; shapes must match the allocation and every entry be
        in range (checked before anything is written: a refused placement changes nothing)."""
        pairs = (
            (self.physical_to_logical_map, placement.physical_to_logical_map),
            (self.logical_to_physical_map, placement.logical_to_physical_map),
            (self.logical_replica_count, placement.logical_replica_count),
        )
        for dst, src in pairs:
            if dst.shape != src.shape:
                raise ConfigError(f"placement table of shape {tuple(src.shape)} does not fit {tuple(dst.shape)}")
        num_physical, num_experts, max_replicas = (self.physical_to_logical_map.shape[1],
                                                   self.logical_replica_count.shape[1],
                                                   self.logical_to_physical_map.shape[2])
        for name, t, lo, hi in (("physical_to_logical_map", placement.physical_to_logical_map, -1, num_experts),
                                ("logical_to_physical_map", placement.logical_to_physical_map, -1, num_physical),
                                ("logical_replica_count", placement.logical_replica_count, 0, max_replicas + 1)):
            if t.numel() and (int(t.min()) < lo or int(t.max()) >= hi):
                raise ConfigError(f"{name} has entries out of range [{lo}, {hi})")
        for dst, src in pairs:
            dst.copy_(src)
        self._single_replica = [bool((row == 1).all()) for row in self.logical_replica_count]

    def placement(self) -> Placement:
        """A copy of the current tables as a `Placement`."""
        return Placement(
            self.physical_to_logical_map.clone(), self.logical_to_physical_map.clone(), self.logical_replica_count.clone()
        )

    def data_ptrs(self) -> tuple[int, int, int]:
        return (
            self.physical_to_logical_map.data_ptr(),
            self.logical_to_physical_map.data_ptr(),
            self.logical_replica_count.data_ptr(),
        )

    def to_physical(self, layer: int, topk_ids: torch.Tensor, allow_none: bool = False) -> torch.Tensor:
        """Map logical ids `topk_ids [T, K]` int64 of MoE layer `layer` to slots `[T, K]`.

        Router output has no -1 entries; pass `allow_none=True` for ids that may be -1 (= none).

        Replica of the (t, k) pair: (t + k) mod live replica count, so consecutive tokens spread
        over the replicas of a hot expert without any randomness. An expert with no live replica
        maps to -1 (only possible in degraded mode); -1 inputs stay -1.
        """
        if self._single_replica[layer] and not allow_none:
            return self.logical_to_physical_map[layer, :, 0][topk_ids]  # one gather
        valid = topk_ids >= 0
        ids = topk_ids.clamp(min=0)
        count = self.logical_replica_count[layer][ids]  # [T, K]
        t, k = topk_ids.shape
        spread = torch.arange(t).unsqueeze(1) + torch.arange(k).unsqueeze(0)  # [T, K]
        replica = spread % count.clamp(min=1)
        slots = self.logical_to_physical_map[layer][ids, replica]  # [T, K]
        return torch.where(valid & (count > 0), slots, torch.full_like(slots, -1))


def spare_slots_for(slots_per_rank: int, num_ranks: int, ranks_lost: int) -> int:
    """Empty slots per rank that let the survivors of `ranks_lost` lost ranks (one rank, or one
    host's) re-home every slot the lost ones held without giving up a replica: their
    `slots_per_rank * ranks_lost` slots spread over `num_ranks - ranks_lost` survivors."""
    if not 0 <= ranks_lost < num_ranks:
        raise ConfigError(f"cannot plan for {ranks_lost} of {num_ranks} ranks lost")
    return math.ceil(slots_per_rank * ranks_lost / (num_ranks - ranks_lost))


def with_spare_slots(placement: Placement, num_ranks: int, spare: int, max_replicas: int | None = None) -> Placement:
    """`placement` with `spare` empty slots appended to each rank's block (rank r's slots stay
    contiguous), and replica lists `max_replicas` wide (default: unchanged). Empty slots cost
    expert memory and buy repair capacity: a lost expert can be copied into one without giving
    up a replica of another."""
    phy2log = placement.physical_to_logical_map
    num_layers, num_physical = phy2log.shape
    if num_physical % num_ranks:
        raise ConfigError(f"{num_physical} slots do not divide over {num_ranks} ranks")
    if spare < 0:
        raise ConfigError(f"spare slots must be >= 0, got {spare}")
    blocks = phy2log.view(num_layers, num_ranks, num_physical // num_ranks)
    empty = torch.full((num_layers, num_ranks, spare), -1, dtype=torch.int64)
    wide = torch.cat([blocks, empty], dim=2).reshape(num_layers, -1)
    return placement_from_phy2log(wide, placement.num_logical, max_replicas or placement.max_replicas)
