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
class Repaired:
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
    tiers: tuple[Repaired, ...]
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
    local = backup.tolist() if isinstance(backup, torch.Tensor) else None
    remote = ({h: m.tolist() for h, m in sorted(backup.items()) if h in live_hosts}
              if isinstance(backup, Mapping) else {})
    moves_total = [0] * num_ranks
    rows_new, rows_interim, rows_held = [], [], []
    relocations: list[Relocation] = []
    tiers: list[Repaired] = []
    uncovered: list[tuple[int, int]] = []
    for layer, (row, held_row) in enumerate(zip(tables.physical_to_logical_map.tolist(), held.tolist())):
        state = _LayerState.start(row, held_row, live, per_rank, tables.num_logical)
        lost = _reuse(state, _touched(state, row), layer, tiers)
        before = list(state.hold)  # the weights the copies can be taken from
        interim = list(state.phy)
        placed = _relocate(state, lost, moves_total, interim)
        tiers.extend(Repaired(layer, expert, 2) for expert, _ in placed)
        uncovered.extend((layer, expert) for expert in lost[len(placed):])
        relocations.extend(_relocations(layer, placed, before, per_rank, hosts,
                                        local[layer] if local is not None else None,
                                        {h: m[layer] for h, m in remote.items()}))
        rows_new.append(state.phy)
        rows_interim.append(interim)
        rows_held.append(state.hold)
    transfers = schedule_transfers(relocations, expert_bytes=expert_bytes, topology=topology)
    return RepairPlan(
        placement=_tables(rows_new, tables),
        interim=_tables(rows_interim, tables),
        held_after=torch.tensor(rows_held, dtype=torch.int64).view(num_layers, num_physical),
        transfers=transfers,
        tiers=tuple(sorted(tiers, key=lambda r: (r.layer, r.expert))),
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
    lanes: dict[tuple[str, int], list[float]] = {}
    opened: set[int] = set()  # destination ranks that have opened the checkpoint
    out = []
    for move in relocations:
        setup = {"disk": 0.0 if move.dst_rank in opened else topology.disk_open_s}
        kind, ident, host = min(_sources(move), key=lambda src: _finish_key(src, move.dst_host, lanes, topology,
                                                                            expert_bytes, setup))
        queue = lanes.setdefault((kind, ident), [0.0] * topology.concurrency(kind))
        lane = min(range(len(queue)), key=queue.__getitem__)
        duration = topology.transfer_s(kind, expert_bytes, across_hosts=host != move.dst_host)
        start = queue[lane] + setup.get(kind, 0.0)
        queue[lane] = start + duration
        if kind == "disk":
            opened.add(move.dst_rank)
        out.append(
            Transfer(
                move.layer, move.expert, move.dst_slot, move.dst_rank,
                kind, ident if kind == "peer" else None, expert_bytes, duration, start, host,
            )
        )
    return tuple(out)


@dataclass(slots=True)
class _LayerState:
    """One layer while it is repaired: tables being built, weights held, live replica counts."""

    live: list[bool]
    per_rank: int
    phy: list[int]  # [P] the new tables, -1 = not listed
    hold: list[int]  # [P] weights held after the plan's copies, -1 = none
    count: list[int] = field(default_factory=list)  # [E] listed replicas in `phy`

    @classmethod
    def start(cls, row: list[int], held_row: list[int], live: list[bool], per_rank: int, num_experts: int) -> _LayerState:
        phy = [e if ok else -1 for e, ok in zip(row, live)]
        hold = [h if ok else -1 for h, ok in zip(held_row, live)]
        count = [0] * num_experts
        for expert in phy:
            if expert >= 0:
                count[expert] += 1
        return cls(live, per_rank, phy, hold, count)

    def rank(self, slot: int) -> int:
        return slot // self.per_rank

    def assign(self, slot: int, expert: int) -> None:
        """List `expert` in `slot` (which then holds it), reclaiming whatever was listed there."""
        if self.phy[slot] >= 0:
            self.count[self.phy[slot]] -= 1
        self.phy[slot] = expert
        self.hold[slot] = expert
        self.count[expert] += 1


def _touched(state: _LayerState, row: list[int]) -> list[int]:
    """Experts listed on a dead slot or without a live listed replica, ascending."""
    on_dead = {expert for expert, ok in zip(row, state.live) if expert >= 0 and not ok}
    return [e for e, n in enumerate(state.count) if n == 0 or e in on_dead]


def _reuse(state: _LayerState, touched: list[int], layer: int, tiers: list[Repaired]) -> list[int]:
    """Tier 1 for `touched`; returns the experts it cannot serve (ascending)."""
    lost = []
    for expert in touched:
        if state.count[expert] == 0:
            slot = next((p for p, h in enumerate(state.hold) if h == expert and state.phy[p] < 0), None)
            if slot is None:
                lost.append(expert)
                continue
            state.assign(slot, expert)
        tiers.append(Repaired(layer, expert, 1))
    return lost


def _relocate(
    state: _LayerState, lost: list[int], moves_total: list[int], interim: list[int]
) -> list[tuple[int, int]]:
    """Tier 2: a target slot for each lost expert in order, until none is left.

    Returns (expert, slot) pairs, a prefix of `lost`. Updates the per-rank move counts and
    takes reclaimed slots out of `interim`.
    """
    moves_layer = [0] * len(moves_total)
    placed = []
    for expert in lost:
        slot = _pick_target(state, moves_layer, moves_total)
        if slot is None:
            break
        interim[slot] = -1
        state.assign(slot, expert)
        moves_layer[state.rank(slot)] += 1
        moves_total[state.rank(slot)] += 1
        placed.append((expert, slot))
    return placed


def _pick_target(state: _LayerState, moves_layer: list[int], moves_total: list[int]) -> int | None:
    """A free slot, else a spare one, else a reclaimed one; spread over ranks. None if none."""
    unlisted = [p for p, ok in enumerate(state.live) if ok and state.phy[p] < 0]
    for candidates in ([p for p in unlisted if state.hold[p] < 0], [p for p in unlisted if state.hold[p] >= 0]):
        if candidates:
            return _spread(state, candidates, moves_layer, moves_total)
    donors = [e for e, n in enumerate(state.count) if n >= 2]
    if not donors:
        return None
    donor = max(donors, key=lambda e: (state.count[e], -e))
    return _spread(state, [p for p, e in enumerate(state.phy) if e == donor], moves_layer, moves_total)


def _spread(state: _LayerState, candidates: list[int], moves_layer: list[int], moves_total: list[int]) -> int:
    """The candidate on the rank with the fewest moves in this layer, then overall; lowest slot."""
    return min(candidates, key=lambda p: (moves_layer[state.rank(p)], moves_total[state.rank(p)], p))


def _relocations(
    layer: int, placed: list[tuple[int, int]], before: list[int], per_rank: int, hosts: Sequence[int],
    local: list[bool] | None, remote: dict[int, list[bool]],
) -> list[Relocation]:
    """The copies of one layer with their possible sources; `before` is what live slots held,
    `local` the row of the backup every host keeps, `remote` the rows of each live host's own."""
    targets = {slot for _, slot in placed}
    out = []
    for expert, slot in placed:
        dst = slot // per_rank
        peers = sorted({p // per_rank for p, h in enumerate(before) if h == expert and p not in targets})
        backed = bool(local[expert]) if local is not None else False
        held_by = tuple(h for h, row in remote.items() if row[expert])
        out.append(Relocation(layer, expert, slot, dst, tuple(peers), backed, hosts[dst],
                              tuple(hosts[p] for p in peers), held_by))
    return out


def _sources(move: Relocation) -> list[tuple[SourceKind, int, int]]:
    """(kind, id, host) of every source holding the expert: id is a peer's rank, or the host
    of a backup or a disk (the destination's own disk)."""
    peer_hosts = move.peer_hosts or (move.dst_host,) * len(move.peer_ranks)
    peers = sorted({("peer", r, h) for r, h in zip(move.peer_ranks, peer_hosts)})
    backups = {("backup", h, h) for h in move.backup_hosts}
    if move.in_backup:
        backups.add(("backup", move.dst_host, move.dst_host))
    disk: tuple[SourceKind, int, int] = ("disk", move.dst_host, move.dst_host)
    return [*peers, *sorted(backups), disk]  # type: ignore[list-item]


def _finish_key(
    source: tuple[SourceKind, int, int], dst_host: int, lanes: dict[tuple[str, int], list[float]],
    topology: Topology, nbytes: int, setup: dict[str, float],
) -> tuple[float, float, int, int]:
    kind, ident, host = source
    duration = topology.transfer_s(kind, nbytes, across_hosts=host != dst_host)
    free_at = min(lanes.get((kind, ident), [0.0])) + setup.get(kind, 0.0)
    return (free_at + duration, duration, SOURCE_KINDS.index(kind), ident)


def _tables(rows: list[list[int]], like: Placement) -> Placement:
    phy2log = torch.tensor(rows, dtype=torch.int64).view(like.physical_to_logical_map.shape)
    return placement_from_phy2log(phy2log, like.num_logical, like.max_replicas)


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
