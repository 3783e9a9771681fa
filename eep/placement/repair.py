"""Repair planner: new routing tables and weight copies after ranks die (pure functions).

Legend: L = MoE layers, E = logical experts, P = physical slots, N = ranks,
S = P // N slots per rank (slot p lives on rank p // S), R = maximum replicas of one expert.

Promise: `plan_repair` and `schedule_transfers` are pure functions of their arguments. They
use no RNG, no clock and no global state, read only CPU tensors, and break every tie by a
fixed rule on ids (never by set or dict iteration order), so every process that plans the
same failure from the same input gets an identical plan, float estimates included.

Cheapest tier first; each tier only handles what the one before could not:

1. reuse: every slot on a dead rank leaves the tables. An expert that keeps a live replica
   is served at once. An expert whose listed replicas all died, but whose weights a live
   slot still holds (dropped from the tables earlier), is listed there again (lowest slot).
   No bytes move.
2. relocate: each remaining lost expert, by ascending id, is copied into one target slot on
   a survivor: a free slot (holds nothing), else a spare slot (holds an unlisted copy of an
   expert that is served elsewhere), else a reclaimed slot (a listed replica of the expert
   with the most replicas, at least 2; ties lowest expert id). Among the candidates the slot
   on the rank with the fewest relocations in this layer, then in all layers, then the
   lowest slot, is taken, so the copies spread over the survivors. When no candidate is
   left, the remaining lost experts of that layer are `uncovered`; the last replica of an
   expert is never reclaimed, so nothing covered is given up for them.
   Sources (`schedule_transfers`): every live peer rank holding the expert, every live
   host's backup that holds it, the disk of the destination's host always. A source on
   another host than the destination is reached over the inter-host link
   (`Topology.network_bytes_per_s`). Copies are taken in (layer, expert) order and each goes
   to the source where it would finish first (each source a queue of `concurrency` lanes;
   ties: shorter copy, then peer < backup < disk, then lowest rank or host).
3. stabilise: the new tables list the surviving replicas, the reused slots and the copy
   targets, and no slot of a dead rank. `interim` are the tables to serve with while the
   copies run (tier 1 without the reclaimed slots): they move no weights either.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from eep.errors import ConfigError
from eep.placement.routing import Placement, placement_from_phy2log
from eep.placement.topology import SOURCE_KINDS, SourceKind, Topology


@dataclass(frozen=True, slots=True)
class Transfer:
    """One copy of one expert's weights into one slot.

    `source_rank` is the sending rank for a "peer" copy and None for "backup" and "disk";
    `source_host` the host the bytes come from (the peer's, the backup's, the destination's
    for the disk). `est_s` is the copy's own duration on its link; `start_s` when it is
    estimated to start, after the copies queued before it on the same source (seconds from
    the repair's start).
    """

    layer: int
    expert: int
    dst_slot: int
    dst_rank: int
    source_kind: SourceKind
    source_rank: int | None
    nbytes: int
    est_s: float
    start_s: float = 0.0
    source_host: int = 0

    @property
    def finish_s(self) -> float:
        return self.start_s + self.est_s


@dataclass(frozen=True, slots=True)
class ExpertRepair:
    """An expert the failure touched and the tier that serves it again: 1 reuse, 2 relocate."""

    layer: int
    expert: int
    tier: int


@dataclass(frozen=True, slots=True)
class Relocation:
    """A copy to schedule: `expert` of `layer` into `dst_slot` on `dst_rank` (on `dst_host`).

    `peer_ranks`: live ranks that hold the expert's weights (ascending, no repeats), on the
    hosts `peer_hosts` (same order; empty: every peer on `dst_host`). `in_backup`: whether the
    destination host's own backup holds it; `backup_hosts`: other hosts whose backup holds it
    (ascending). The disk of the destination's host always does.
    """

    layer: int
    expert: int
    dst_slot: int
    dst_rank: int
    peer_ranks: tuple[int, ...] = ()
    in_backup: bool = False
    dst_host: int = 0
    peer_hosts: tuple[int, ...] = ()
    backup_hosts: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True, eq=False)
class RepairPlan:
    """What `plan_repair` decided (pure data; compare field by field, tensors with torch.equal).

    - `placement`: the tables to switch to once the copies are done (shapes of the input's).
    - `interim`: the tables to serve with while the copies run (moves no weights).
    - `held_after [L, P]` int64: the expert each slot holds once the copies are done,
      -1 = nothing (every slot of a dead rank is -1).
    - `transfers`: the copies, in (layer, expert) order.
    - `tiers`: every touched (layer, expert) that is served again, sorted by (layer, expert).
      Touched: listed on a dead rank, or without a live listed replica.
    - `uncovered`: (layer, expert) pairs left without a replica, sorted.
    - `est_makespan_s`: when the last copy is estimated to finish (0.0 without copies).
    """

    placement: Placement
    interim: Placement
    held_after: torch.Tensor
    transfers: tuple[Transfer, ...]
    tiers: tuple[ExpertRepair, ...]
    uncovered: tuple[tuple[int, int], ...]
    est_makespan_s: float

    @property
    def bytes_moved(self) -> int:
        return sum(t.nbytes for t in self.transfers)

    @property
    def covered_fraction(self) -> float:
        """Share of the L x E (layer, expert) pairs that have at least one replica."""
        return float((self.placement.logical_replica_count > 0).double().mean())

    def tier_of(self, layer: int, expert: int) -> int | None:
        """The tier that repaired (layer, expert); None if it was untouched or is uncovered."""
        return next((r.tier for r in self.tiers if (r.layer, r.expert) == (layer, expert)), None)


def plan_repair(
    tables: Placement,
    held: torch.Tensor,
    num_ranks: int,
    dead: frozenset[int],
    *,
    expert_bytes: int,
    topology: Topology,
    backup: torch.Tensor | Mapping[int, torch.Tensor] | None = None,
    host_of: Sequence[int] | None = None,
) -> RepairPlan:
    """Plan the repair after the ranks in `dead` failed (see the module docstring).

    Args:
        tables: the routing tables in use: `physical_to_logical_map [L, P]` int64 (-1 = empty).
        held: `[L, P]` integer tensor, the expert whose weights each slot holds (-1 = none).
            Where a live slot is listed in `tables` it must hold that expert; an unlisted slot
            may hold anything. Entries of dead slots are ignored.
        num_ranks: N, ranks before the failure; it must divide P.
        dead: the failed ranks, ids in [0, N). Empty gives a plan that changes nothing.
        expert_bytes: bytes of one expert's weights (int >= 1); every copy moves this much.
        topology: the bandwidth model used to choose sources and estimate times.
        backup: `[L, E]` bool, True where the host-memory backup holds (layer, expert), one
            such backup on every host (the destination's own is used); or a mapping host ->
            `[L, E]` bool, the backup each host keeps (`backup_masks`: another host's
            experts); a host with no live rank is gone with its backup. None = no backup.
        host_of: the host of each of the N ranks; None = all on one host.

    Returns:
        A `RepairPlan`; the same input gives an equal plan on every process.

    Raises:
        ConfigError: for invalid input; the message names the bad value.
    """
    dead = _check_inputs(tables, held, num_ranks, dead, expert_bytes, topology, backup)
    hosts = _check_hosts(host_of, num_ranks)
    num_layers, num_physical = tables.physical_to_logical_map.shape
    per_rank = num_physical // num_ranks
    live = [slot // per_rank not in dead for slot in range(num_physical)]
    live_hosts = {hosts[r] for r in range(num_ranks) if r not in dead}
    start = _Start.of(tables, held, live)
    moves_total = [0] * num_ranks
    relisted: list[tuple[int, int, int]] = []  # tier 1: (layer, slot, expert) listed again
    copies: list[tuple[int, int, int]] = []  # tier 2: (layer, expert, target slot)
    tiers: list[ExpertRepair] = []
    uncovered: list[tuple[int, int]] = []
    for layer in range(num_layers):
        state = _LayerState(live, per_rank, start.phy[layer], start.hold[layer], start.count[layer])
        served: list[tuple[int, int]] = []  # (expert, tier)
        lost = _reuse(state, start.touched[layer], start.dropped[layer], served)
        relisted.extend((layer, slot, expert) for slot, expert in state.assigned)
        placed = _relocate(state, lost, moves_total, start.free[layer], start.dropped[layer])
        served.extend((expert, 2) for expert, _ in placed)
        served.sort()
        tiers.extend(ExpertRepair(layer, expert, tier) for expert, tier in served)
        uncovered.extend((layer, expert) for expert in lost[len(placed):])
        copies.extend((layer, expert, slot) for expert, slot in placed)
    transfers = _schedule(_copies(copies, per_rank, hosts, backup, live_hosts), expert_bytes, topology)
    # The tables from the starting ones and the few slots the plan changed: tier 1 lists its slots
    # again; a copy's target lists (and holds) its expert once written, and is unlisted meanwhile
    # (`interim`: a reclaimed slot stops serving its old expert at once).
    phy_new, interim, held_after = start.phy_t.clone(), start.phy_t.clone(), start.hold_t.clone()
    if relisted:
        layers, slots, experts = (torch.tensor(v) for v in zip(*relisted))
        for table in (phy_new, interim, held_after):
            table[layers, slots] = experts
    if copies:
        layers, experts, slots = (torch.tensor(v) for v in zip(*copies))
        phy_new[layers, slots] = experts
        held_after[layers, slots] = experts
        interim[layers, slots] = -1
    return RepairPlan(
        placement=placement_from_phy2log(phy_new, tables.num_logical, tables.max_replicas),
        interim=placement_from_phy2log(interim, tables.num_logical, tables.max_replicas),
        held_after=held_after,
        transfers=transfers,
        tiers=tuple(tiers),  # by layer, then expert
        uncovered=tuple(uncovered),
        est_makespan_s=max((t.finish_s for t in transfers), default=0.0),
    )


def schedule_transfers(
    relocations: Sequence[Relocation], *, expert_bytes: int, topology: Topology
) -> tuple[Transfer, ...]:
    """Choose a source for each copy so that the last copy finishes as early as possible.

    Greedy earliest finish: the copies are taken in the given order and each goes to the
    source (a peer rank in `peer_ranks`, the backup if `in_backup`, the disk) on which it would
    finish first. A source runs `topology.concurrency(kind)` copies at once, each in the lane
    that frees first (lowest lane on ties); a source on another host than the destination
    sends at no more than `topology.network_bytes_per_s`. Ties between sources: shorter
    copy, then peer < backup < disk, then lowest rank or host. A destination rank's first copy from the disk
    starts `topology.disk_open_s` late (it opens the checkpoint first), so a few copies never
    go to the disk while a faster source is a little behind. Every copy finishes no later than
    it would if all copies came from any one source that holds them all (the disk, for
    instance, opened once by each destination rank).

    Returns:
        One `Transfer` per relocation, in the same order.
    """
    _check_positive_int("expert_bytes", expert_bytes)
    return _schedule(((m.layer, m.expert, m.dst_slot, m.dst_rank, m.dst_host, _sources(m)) for m in relocations),
                     expert_bytes, topology)


_Copy = tuple[int, int, int, int, int, list[tuple[SourceKind, int, int]]]  # layer, expert, slot, rank, host, sources


def _schedule(copies: Iterable[_Copy], expert_bytes: int, topology: Topology) -> tuple[Transfer, ...]:
    """`schedule_transfers` over plain tuples (the repair's own path: no `Relocation` objects)."""
    lanes: dict[str, dict[int, list[float]]] = {kind: {} for kind in SOURCE_KINDS}  # kind -> source -> lanes
    opened: set[int] = set()  # destination ranks that have opened the checkpoint
    # one copy's duration per kind, within a host and across hosts: every copy moves the same bytes
    within = {kind: topology.transfer_s(kind, expert_bytes) for kind in SOURCE_KINDS}
    across = {kind: topology.transfer_s(kind, expert_bytes, across_hosts=True) for kind in SOURCE_KINDS}
    lanes_of = {kind: topology.concurrency(kind) for kind in SOURCE_KINDS}
    out = []
    for layer, expert, dst_slot, dst_rank, dst_host, sources in copies:
        disk_setup = 0.0 if dst_rank in opened else topology.disk_open_s
        best: tuple[tuple[float, float, int, int], SourceKind, int, int, float] | None = None
        for kind, ident, host in sources:  # the first with the earliest finish (see _KIND_ORDER)
            duration = (within if host == dst_host else across)[kind]
            queue = lanes[kind].get(ident)
            free_at = (min(queue) if queue else 0.0) + (disk_setup if kind == "disk" else 0.0)
            key = (free_at + duration, duration, _KIND_ORDER[kind], ident)
            if best is None or key < best[0]:
                best = (key, kind, ident, host, duration)
        assert best is not None  # the disk always holds it
        _, kind, ident, host, duration = best
        queue = lanes[kind].get(ident)
        if queue is None:
            queue = lanes[kind][ident] = [0.0] * lanes_of[kind]
        lane = 0 if len(queue) == 1 else min(range(len(queue)), key=queue.__getitem__)
        start = queue[lane] + (disk_setup if kind == "disk" else 0.0)
        queue[lane] = start + duration
        if kind == "disk":
            opened.add(dst_rank)
        out.append(Transfer(layer, expert, dst_slot, dst_rank, kind, ident if kind == "peer" else None, expert_bytes,
                            duration, start, host))
    return tuple(out)


@dataclass(slots=True)
class _Start:
    """Every layer's starting point, computed for all layers at once with tensor operations (a
    plan then spends Python time only on what the failure touched, not on every slot):
    the tables without dead slots (`phy`), what live slots hold (`hold`), listed replicas per
    expert (`count`), the touched experts ascending (listed on a dead slot, or without a live
    listed replica), live unlisted slots that hold an expert's weights (`dropped`: expert ->
    its slots, ascending) and free live slots, holding nothing (`free`, ascending)."""

    phy_t: torch.Tensor  # [L, P] int64
    hold_t: torch.Tensor  # [L, P] int64
    phy: list[list[int]]
    hold: list[list[int]]
    count: list[list[int]]
    touched: list[list[int]]
    dropped: list[dict[int, list[int]]]
    free: list[list[int]]

    @classmethod
    def of(cls, tables: Placement, held: torch.Tensor, live: list[bool]) -> _Start:
        phy2log = tables.physical_to_logical_map.to(torch.int64)
        num_layers, num_physical = phy2log.shape
        num_experts = tables.num_logical
        alive = torch.tensor(live, dtype=torch.bool).expand(num_layers, num_physical)
        phy = torch.where(alive, phy2log, -1)
        hold = torch.where(alive, held.to(torch.int64), -1)
        other = torch.full_like(phy, num_experts)  # a dummy expert for what is not counted

        def per_expert(mask: torch.Tensor) -> torch.Tensor:  # [L, E]: how many masked slots list each expert
            ids = torch.where(mask, phy2log, other)
            return torch.zeros(num_layers, num_experts + 1, dtype=torch.int64).scatter_add_(
                1, ids, torch.ones_like(ids))[:, :num_experts]

        count = per_expert(phy >= 0)
        touched_mask = (count == 0) | (per_expert(~alive & (phy2log >= 0)) > 0)
        touched: list[list[int]] = [[] for _ in range(num_layers)]
        for layer, expert in touched_mask.nonzero().tolist():
            touched[layer].append(expert)
        unlisted = alive & (phy < 0)
        dropped: list[dict[int, list[int]]] = [{} for _ in range(num_layers)]
        free: list[list[int]] = [[] for _ in range(num_layers)]
        copy = unlisted & (hold >= 0)
        for (layer, slot), expert in zip(copy.nonzero().tolist(), hold[copy].tolist()):  # row-major: slots ascending
            dropped[layer].setdefault(expert, []).append(slot)
        for layer, slot in (unlisted & (hold < 0)).nonzero().tolist():
            free[layer].append(slot)
        return cls(phy, hold, phy.tolist(), hold.tolist(), count.tolist(), touched, dropped, free)


@dataclass(slots=True)
class _LayerState:
    """One layer while it is repaired: tables being built, weights held, live replica counts."""

    live: list[bool]
    per_rank: int
    phy: list[int]  # [P] the new tables, -1 = not listed
    hold: list[int]  # [P] weights held after the plan's copies, -1 = none
    count: list[int] = field(default_factory=list)  # [E] listed replicas in `phy`
    assigned: list[tuple[int, int]] = field(default_factory=list)  # (slot, expert), in order

    def rank(self, slot: int) -> int:
        return slot // self.per_rank

    def assign(self, slot: int, expert: int) -> None:
        """List `expert` in `slot` (which then holds it), reclaiming whatever was listed there."""
        if self.phy[slot] >= 0:
            self.count[self.phy[slot]] -= 1
        self.phy[slot] = expert
        self.hold[slot] = expert
        self.count[expert] += 1
        self.assigned.append((slot, expert))


def _reuse(state: _LayerState, touched: list[int], dropped: dict[int, list[int]],
           served: list[tuple[int, int]]) -> list[int]:
    """Tier 1 for `touched` (`dropped`: expert -> live unlisted slots holding it, ascending),
    each served expert added to `served` as (expert, 1); returns the experts it cannot serve
    (ascending)."""
    lost = []
    for expert in touched:
        if state.count[expert] == 0:
            slots = dropped.get(expert)
            if not slots:
                lost.append(expert)
                continue
            state.assign(slots[0], expert)  # the lowest; listed for this expert alone from now on
        served.append((expert, 1))
    return lost


def _relocate(
    state: _LayerState, lost: list[int], moves_total: list[int], free: list[int], dropped: dict[int, list[int]],
) -> list[tuple[int, int]]:
    """Tier 2: a target slot for each lost expert in order, until none is left.

    Returns (expert, slot) pairs, a prefix of `lost`. Updates the per-rank move counts.
    """
    moves_layer = [0] * len(moves_total)
    placed: list[tuple[int, int]] = []
    if not lost:
        return placed
    spare = sorted(p for slots in dropped.values() for p in slots if state.phy[p] < 0)  # not reused
    targets = _Targets(state, moves_layer, moves_total, free, spare)
    for expert in lost:
        slot = targets.pick()
        if slot is None:
            break
        state.assign(slot, expert)  # pick() counted the move on its rank
        placed.append((expert, slot))
    return placed


class _Targets:
    """Target slots of one layer's copies, in the order of the rule: a free slot (live,
    unlisted, holding nothing), else a spare one (live, unlisted, holding an unlisted copy),
    else a reclaimed one (a listed replica of the expert with the most replicas, at least 2,
    lowest id on ties); among the candidates, the slot on the rank with the fewest moves in
    this layer, then in all layers, then the lowest slot.

    The same choice as scanning every slot for every copy, in O(log N) per copy: per kind, each
    rank's candidate slots in ascending order and a heap of ranks keyed by (moves in the layer,
    moves in all, lowest candidate). Only the rank that was picked changes its key; an entry
    that no longer matches its rank's key is refreshed when it surfaces (keys only grow).
    """

    def __init__(self, state: _LayerState, moves_layer: list[int], moves_total: list[int], free: list[int],
                 spare: list[int]) -> None:
        """`free`, `spare`: the layer's free and spare slots, ascending."""
        self.state, self.moves_layer, self.moves_total = state, moves_layer, moves_total
        # per kind: rank -> its candidate slots, descending (the lowest pops from the end)
        self.kinds: list[dict[int, list[int]]] = []
        for slots in (free, spare):
            by_rank: dict[int, list[int]] = {}
            for p in reversed(slots):
                by_rank.setdefault(p // state.per_rank, []).append(p)
            self.kinds.append(by_rank)
        self.heaps = [self._heap(by_rank) for by_rank in self.kinds]
        self.donors: list[tuple[int, int]] | None = None  # built at the first reclaim

    def _key(self, rank: int, slot: int) -> tuple[int, int, int, int]:
        return (self.moves_layer[rank], self.moves_total[rank], slot, rank)

    def _heap(self, by_rank: dict[int, list[int]]) -> list[tuple[int, int, int, int]]:
        heap = [self._key(r, slots[-1]) for r, slots in by_rank.items()]
        heapq.heapify(heap)
        return heap

    def pick(self) -> int | None:
        """The next target slot (taken out of the candidates, its move counted on its rank), or
        None if none is left."""
        moves_layer, moves_total = self.moves_layer, self.moves_total
        for by_rank, heap in zip(self.kinds, self.heaps):
            while heap:
                entry = heapq.heappop(heap)
                rank = entry[3]
                slots = by_rank[rank]
                current = (moves_layer[rank], moves_total[rank], slots[-1], rank)
                if entry != current:  # its rank moved meanwhile: back in with its key of now
                    heapq.heappush(heap, current)
                    continue
                slot = slots.pop()
                moves_layer[rank] += 1
                moves_total[rank] += 1
                if slots:
                    heapq.heappush(heap, (moves_layer[rank], moves_total[rank], slots[-1], rank))
                return slot
        slot = self._reclaim()
        if slot is not None:
            moves_layer[slot // self.state.per_rank] += 1
            moves_total[slot // self.state.per_rank] += 1
        return slot

    def _reclaim(self) -> int | None:
        state = self.state
        if self.donors is None:
            self.donors = [(-n, e) for e, n in enumerate(state.count) if n >= 2]
            heapq.heapify(self.donors)
        while self.donors:
            neg, donor = self.donors[0]
            if -neg != state.count[donor]:  # it gave up a replica meanwhile
                heapq.heapreplace(self.donors, (-state.count[donor], donor))
                continue
            if state.count[donor] < 2:
                heapq.heappop(self.donors)
                continue
            slots = [p for p, e in enumerate(state.phy) if e == donor]
            return min(slots, key=lambda p: self._key(p // state.per_rank, p))
        return None


def _copies(
    copies: list[tuple[int, int, int]], per_rank: int, hosts: Sequence[int],
    backup: torch.Tensor | Mapping[int, torch.Tensor] | None, live_hosts: set[int],
) -> list[_Copy]:
    """The copies (layer, expert, target slot) with their destination and their sources, in the
    order of `_sources`. No peer: a copied expert was lost, so no live slot held it (tier 1
    would have listed that slot again). The backup every host keeps (`backup` a tensor), or
    the live hosts whose own holds it; the disk of the destination's host."""
    if not copies:
        return []
    layers = torch.tensor([c[0] for c in copies])
    experts = torch.tensor([c[1] for c in copies])
    local = backup[layers, experts].tolist() if isinstance(backup, torch.Tensor) else [False] * len(copies)
    held_by: list[list[int]] = [[] for _ in copies]
    if isinstance(backup, Mapping):
        remote = [h for h in sorted(backup) if h in live_hosts]
        if remote:
            has = torch.stack([backup[h][layers, experts] for h in remote], dim=1)  # [C, hosts]
            for c, i in has.nonzero().tolist():  # row-major: each copy's hosts ascending
                held_by[c].append(remote[i])
    out: list[_Copy] = []
    for (layer, expert, slot), backed, by in zip(copies, local, held_by):
        rank = slot // per_rank
        host = hosts[rank]
        if backed and host not in by:
            by = sorted([*by, host])
        sources: list[tuple[SourceKind, int, int]] = [("backup", h, h) for h in by]
        sources.append(("disk", host, host))
        out.append((layer, expert, slot, rank, host, sources))
    return out


def _sources(move: Relocation) -> list[tuple[SourceKind, int, int]]:
    """(kind, id, host) of every source holding the expert: id is a peer's rank, or the host
    of a backup or a disk (the destination's own disk)."""
    out: list[tuple[SourceKind, int, int]] = []
    if move.peer_ranks:
        peer_hosts = move.peer_hosts or (move.dst_host,) * len(move.peer_ranks)
        out.extend(sorted({("peer", r, h) for r, h in zip(move.peer_ranks, peer_hosts)}))
    backups = set(move.backup_hosts)
    if move.in_backup:
        backups.add(move.dst_host)
    out.extend(("backup", h, h) for h in sorted(backups))
    out.append(("disk", move.dst_host, move.dst_host))
    return out


_KIND_ORDER = {kind: i for i, kind in enumerate(SOURCE_KINDS)}


# A copy goes to the source where it finishes first; ties: the shorter copy, then peer < backup
# < disk, then the lowest rank or host (`schedule_transfers`).





def _check_inputs(
    tables: Placement,
    held: torch.Tensor,
    num_ranks: int,
    dead: Iterable[int],
    expert_bytes: int,
    topology: Topology,
    backup: torch.Tensor | Mapping[int, torch.Tensor] | None,
) -> frozenset[int]:
    """Raise ConfigError for invalid input; returns `dead` as a frozenset of ints."""
    if not isinstance(tables, Placement):
        raise ConfigError(f"tables must be a Placement, got {type(tables).__name__}")
    if not isinstance(topology, Topology):
        raise ConfigError(f"topology must be a Topology, got {type(topology).__name__}")
    _check_positive_int("expert_bytes", expert_bytes)
    phy2log = tables.physical_to_logical_map
    num_layers, num_physical = phy2log.shape
    num_experts = tables.num_logical
    _check_ids("tables.physical_to_logical_map", phy2log, num_experts)
    _check_positive_int("num_ranks", num_ranks)
    if num_physical % num_ranks:
        raise ConfigError(f"num_ranks={num_ranks} does not divide the {num_physical} physical slots")
    dead = _check_dead(dead, num_ranks)
    if not isinstance(held, torch.Tensor) or tuple(held.shape) != (num_layers, num_physical):
        got = list(held.shape) if isinstance(held, torch.Tensor) else type(held).__name__
        raise ConfigError(f"held must be a tensor of shape [{num_layers}, {num_physical}] (layers, slots), got {got}")
    _check_ids("held", held, num_experts)
    _check_held_matches(phy2log, held, num_physical // num_ranks, dead)
    masks = list(backup.values()) if isinstance(backup, Mapping) else [] if backup is None else [backup]
    for mask in masks:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (num_layers, num_experts):
            got = f"{list(mask.shape)} {mask.dtype}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ConfigError(f"backup must be None, a bool tensor of shape [{num_layers}, {num_experts}] or a "
                              f"mapping of hosts to such tensors, got {got}")
    return dead


def _check_hosts(host_of: Sequence[int] | None, num_ranks: int) -> tuple[int, ...]:
    if host_of is None:
        return (0,) * num_ranks
    hosts = tuple(host_of)
    if len(hosts) != num_ranks or any(isinstance(h, bool) or not isinstance(h, int) or h < 0 for h in hosts):
        raise ConfigError(f"host_of must give a host id >= 0 for each of the {num_ranks} ranks, got {list(hosts)}")
    return hosts


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r} must be an int >= 1")


def _check_dead(dead: Iterable[int], num_ranks: int) -> frozenset[int]:
    if isinstance(dead, (str, bytes)) or not isinstance(dead, Iterable):
        raise ConfigError(f"dead must be a set of rank ids, got {type(dead).__name__}")
    ranks = frozenset(dead)
    for rank in sorted(ranks, key=repr):
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < num_ranks:
            raise ConfigError(f"dead rank {rank!r} is not a rank id in [0, {num_ranks})")
    return ranks


def _check_ids(name: str, ids: torch.Tensor, num_experts: int) -> None:
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ConfigError(f"{name} must hold integer expert ids, got dtype {ids.dtype}")
    bad = (ids < -1) | (ids >= num_experts)
    if bad.any():
        layer, slot = (int(v) for v in bad.nonzero()[0])
        raise ConfigError(
            f"{name}[{layer}, {slot}] = {int(ids[layer, slot])} is not an expert id in [0, {num_experts}) or -1"
        )


def _check_held_matches(phy2log: torch.Tensor, held: torch.Tensor, per_rank: int, dead: frozenset[int]) -> None:
    """Every live slot the tables list must hold the expert they route to it."""
    live = torch.tensor([slot // per_rank not in dead for slot in range(phy2log.shape[1])])  # [P]
    bad = live & (phy2log >= 0) & (phy2log != held.to(torch.int64))
    if bad.any():
        layer, slot = (int(v) for v in bad.nonzero()[0])
        raise ConfigError(
            f"layer {layer} slot {slot}: the tables route expert {int(phy2log[layer, slot])} to it but held "
            f"says it holds {int(held[layer, slot])}; pass in held the weights each slot really holds"
        )


def plan_rejoin(
    tables: Placement, held: torch.Tensor, num_ranks: int, rank: int, target: torch.Tensor
) -> tuple[Placement, torch.Tensor]:
    """Tables and held weights once `rank` is back, loaded with its slots of `target [L, P]`
    (the balanced placement it started with). Pure: no weights of a live rank move.

    Every slot that holds an expert afterwards is listed, in slot order, up to the tables'
    `max_replicas` per expert (the rest stay loaded but unlisted spares). Slots of other ranks
    that hold nothing (failed ranks) stay empty.

    Returns `(placement, held_after)`.
    """
    num_layers, num_physical = tables.physical_to_logical_map.shape
    if num_physical % num_ranks or not 0 <= rank < num_ranks:
        raise ConfigError(f"rank {rank} of {num_ranks} does not fit {num_physical} slots")
    if tuple(target.shape) != (num_layers, num_physical) or tuple(held.shape) != (num_layers, num_physical):
        raise ConfigError(f"held and target must be [L, P] = {[num_layers, num_physical]}")
    per_rank = num_physical // num_ranks
    held_after = held.to(torch.int64).clone()
    held_after[:, rank * per_rank : (rank + 1) * per_rank] = target[:, rank * per_rank : (rank + 1) * per_rank]
    phy2log = torch.full_like(held_after, -1)
    for layer, row in enumerate(held_after.tolist()):
        count = [0] * tables.num_logical
        for slot, expert in enumerate(row):
            if expert >= 0 and count[expert] < tables.max_replicas:
                phy2log[layer, slot] = expert
                count[expert] += 1
    return placement_from_phy2log(phy2log, tables.num_logical, tables.max_replicas), held_after
