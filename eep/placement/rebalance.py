"""Rebalancing planner: from the layout in use to a balanced one under the observed load, in the
fewest expert moves, with every expert covered in every state in between (pure functions).

Legend: L = MoE layers, E = logical experts, P = physical slots, N = ranks,
S = P // N slots per rank (slot p lives on rank p // S), W = a layer's load `[E]`.

Promise: `plan_rebalance` is a pure function of its arguments (no RNG, no clock, no global
state; CPU tensors in, every tie broken by the lowest expert, rank or slot id), so every
process that plans from the same input gets an identical plan.

How a plan is made, per layer and all layers at once:
1. Replicas where they pay (`replica_counts`, after CRAFT): every expert keeps one replica; the
   budget (`num_redundant` per layer on average, spent across layers) goes, one replica at a
   time, to the expert whose replicas carry the most load relative to its layer's average
   replica, as long as that is more than `pay_ratio` times the average. A layer whose load is
   even gets none beyond coverage; a skewed one may get more than `num_redundant`.
2. Sticky packing: replicas are taken heaviest first, each to the least-loaded active rank with
   room that does not hold the expert yet (LPT). A rank that already holds the expert's
   weights is taken instead if that keeps it within `1 + keep_slack` of the layer's mean rank
   load (or it is the least loaded anyway): a slot whose expert stays costs no move.
3. Moves only into free slots: every expert's first listed slot keeps serving throughout; any
   other slot is free (empty, an unlisted copy, or a listed replica beyond the first). A new
   replica on a rank is written into one of its free slots (empty ones first, then unlisted
   copies, then replicas given up); the interim tables are those in use without the replicas
   given up, so every expert stays covered while the copies run, and one table switch turns the
   new layout on. A rank takes at most as many new replicas as it has free slots in that
   layer; a layer that cannot be packed within that, or whose imbalance would not improve by
   `min_gain`, keeps its layout (no moves).
4. Sources (no step waits for a move, so no schedule is needed, only an order of preference):
   a peer rank on the destination's host that holds the expert in a slot no move writes to,
   else the destination host's backup (host memory: no bytes on the network, which the data
   plane's all-to-all uses), else a peer on another host, else another host's backup, else
   the destination's disk. The moves of one hot expert are spread over all of its holders.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from eep.errors import ConfigError
from eep.placement.eplb import loads_of_ranks
from eep.placement.repair import Transfer
from eep.placement.routing import Placement, placement_from_phy2log
from eep.placement.topology import Topology

PAY_RATIO = 1.5  # a replica pays while the expert's replicas carry this much more than the layer's average one
KEEP_SLACK = 0.02  # a rank that holds the expert keeps it if that stays within 2% of the layer's mean rank load
MIN_GAIN = 0.01  # a layer is only re-laid out if its imbalance falls by at least this much


@dataclass(frozen=True, slots=True, eq=False)
class RebalancePlan:
    """What `plan_rebalance` decided (pure data; compare tensors with torch.equal).

    - `placement`: the tables to switch to once every move is written.
    - `interim`: the tables to serve with while the moves run: those in use without the listed
      replicas that moves overwrite (each expert keeps a listed replica; no weights move).
    - `held_after [L, P]`: what each slot holds after the moves (the others keep their content).
    - `moves`: the copies, in (layer, expert) order, each into a slot the tables in use do not list
      (`Moves`: columns; iterating gives `Transfer`s).
    - `replicas [L]`: replicas beyond one per expert in the new layout, per layer (the budget spent).
    - `imbalance_before`, `imbalance_after` `[L]` float64: max / mean rank load of the active
      ranks under the load planned for, of the tables in use and of the new ones.
    - `changed [L]` bool: the layers whose tables change.
    """

    placement: Placement
    interim: Placement
    held_after: torch.Tensor
    moves: Moves
    replicas: torch.Tensor
    imbalance_before: torch.Tensor
    imbalance_after: torch.Tensor
    changed: torch.Tensor

    @property
    def bytes_moved(self) -> int:
        return len(self.moves) * self.moves.expert_bytes

    @property
    def moves_from_peers(self) -> int:
        return self.moves.count("peer")

    @property
    def switches(self) -> bool:
        """Whether the plan changes any table."""
        return bool(self.changed.any())


def layer_imbalance(placement: Placement, load: torch.Tensor, active: Sequence[int], num_ranks: int) -> torch.Tensor:
    """`[L]` float64: per layer, the most loaded active rank's load over the active ranks' mean,
    where a rank's load is the sum over its listed slots of `load[e] / replicas[e]` (each token
    pair of an expert goes to one of its replicas, spread evenly). 1.0 where a layer has no load."""
    phy2log = placement.physical_to_logical_map
    num_layers, num_physical = phy2log.shape
    if num_ranks < 1 or num_physical % num_ranks:
        raise ConfigError(f"num_ranks={num_ranks} does not divide the {num_physical} physical slots")
    weights = _loads(load, num_layers, placement.num_logical)
    return _imbalance(phy2log, placement.logical_replica_count, weights, active, num_ranks)


def _imbalance(phy2log: torch.Tensor, count: torch.Tensor, weights: torch.Tensor, active: Sequence[int],
               num_ranks: int) -> torch.Tensor:
    ranks = loads_of_ranks(phy2log, count, weights, num_ranks)[:, list(active)]  # [L, A]
    mean = ranks.mean(1)
    return torch.where(mean > 0, ranks.max(1).values / mean.clamp(min=1e-300), torch.ones_like(mean))


def replica_counts(load: torch.Tensor, budget: int, fill_cap: torch.Tensor, max_per_expert: int,
                   pay_ratio: float = PAY_RATIO) -> torch.Tensor:
    """Replicas per (layer, expert) `[L, E]` int64: one each, then up to `budget` more in all
    (step 1 of the module docstring); a layer gets at most `fill_cap[l]` replicas in all, an
    expert at most `max_per_expert`."""
    num_layers, num_experts = load.shape
    count = torch.ones((num_layers, num_experts), dtype=torch.int64)
    if budget <= 0 or max_per_expert <= 1:
        return count
    w = load.to(torch.float64)
    total = w.sum(1)
    rows = torch.arange(num_layers)
    ninf = torch.tensor(float("-inf"), dtype=torch.float64)
    while budget > 0:
        mean = (total / count.sum(1)).clamp(min=1e-300)  # the layer's average replica
        ratio = torch.where(count < max_per_expert, (w / count) / mean.unsqueeze(1), ninf)  # [L, E]
        best, expert = ratio.max(1)  # first maximum: lowest expert id
        want = (best > pay_ratio) & (count.sum(1) < fill_cap) & (total > 0)
        n = int(want.sum())
        if n == 0:
            break
        if n > budget:  # the layers where a replica pays most
            order = torch.argsort(torch.where(want, best, ninf), descending=True, stable=True)
            want = torch.zeros_like(want)
            want[order[:budget]] = True
            n = budget
        count[rows[want], expert[want]] += 1
        budget -= n
    return count


def plan_rebalance(
    placement: Placement,
    held: torch.Tensor,
    load: torch.Tensor,
    active: Sequence[int],
    num_ranks: int,
    *,
    num_redundant: int,
    expert_bytes: int,
    topology: Topology,
    host_of: Sequence[int] | None = None,
    backup: Mapping[int, torch.Tensor] | None = None,
    min_gain: float = MIN_GAIN,
    leaving: Sequence[int] = (),
) -> RebalancePlan:
    """Plan the move from `placement` (the tables in use) to a layout balanced under `load`.

    Args:
        placement: the tables in use (`physical_to_logical_map [L, P]`, -1 = not listed).
        held: `[L, P]` the expert whose weights each slot holds (-1 = none or unknown); a listed
            slot holds its listed expert.
        load: `[L, E]` observed load per (layer, expert) (token pairs routed), >= 0.
        active: the ranks that serve (ascending); only their slots are used.
        num_ranks: N; it divides P.
        num_redundant: the replica budget, per layer on average (`--ep-num-redundant-experts`).
        expert_bytes: bytes of one expert's weights; every move copies this much.
        topology: the bandwidth model for the moves' sources.
        host_of: each rank's host (None: one host); backup: host -> `[L, E]` bool, what each
            host's expert backup keeps (None: no backups).
        min_gain: a layer is re-laid out only if its imbalance falls by at least this much.
        leaving: active ranks the new layout leaves empty (a scale-down): they serve meanwhile
            and send as peers; every layer listing one of their slots is laid out again, whatever
            it gains (`_packed`; ConfigError if the others lack a slot per expert).
            `imbalance_before` is then of the active ranks, `imbalance_after` of those that stay.
    """
    phy2log = placement.physical_to_logical_map
    num_layers, num_physical = phy2log.shape
    num_experts = placement.num_logical
    if num_ranks < 1 or num_physical % num_ranks:
        raise ConfigError(f"num_ranks={num_ranks} does not divide the {num_physical} physical slots")
    if tuple(held.shape) != (num_layers, num_physical):
        raise ConfigError(f"held has shape {list(held.shape)}, expected {[num_layers, num_physical]}")
    active = sorted(set(int(r) for r in active))
    if not active or active[0] < 0 or active[-1] >= num_ranks:
        raise ConfigError(f"active ranks {active} are not a non-empty subset of 0..{num_ranks - 1}")
    out, stay = _staying(active, leaving)
    hosts = list(host_of) if host_of is not None else [0] * num_ranks
    weights = _loads(load, num_layers, num_experts)
    per_rank = num_physical // num_ranks
    before = layer_imbalance(placement, weights, active, num_ranks)
    before_stay = layer_imbalance(placement, weights, stay, num_ranks) if out else before
    state = _State.of(placement, held.to(torch.int64), stay, num_ranks)
    fill_cap = torch.full((num_layers,), len(stay) * max(per_rank - 1, 1), dtype=torch.int64).clamp(min=num_experts)
    count = replica_counts(weights, num_layers * num_redundant, fill_cap, min(len(stay), placement.max_replicas))
    items, picks = _packed(weights, count, state, len(stay), fall_back=bool(out))
    new_phy, held_after, moves = _assign(items, picks, state, phy2log, held.to(torch.int64))
    after = _imbalance(new_phy, _replicas(new_phy, num_experts), weights, stay, num_ranks)
    must = _must_move(phy2log, out, per_rank, picks.failed, stay)
    keep = picks.failed | ((after > before_stay - min_gain) & ~must)  # not worth it, or not possible: as it is
    new_phy[keep] = phy2log[keep]
    held_after[keep] = held[keep].to(torch.int64)
    moves = moves[~keep[moves[:, 0]]]
    # the leaving ranks' listed slots are never written: they send as peers too
    sources = _State.of(placement, held.to(torch.int64), active, num_ranks) if out else state
    kind, ident = _sources(moves, sources, num_ranks, hosts, backup, num_experts)
    table = torch.cat([moves, (moves[:, 2] // per_rank).unsqueeze(1), kind.unsqueeze(1), ident.unsqueeze(1)], 1)
    final = placement_from_phy2log(new_phy, num_experts, placement.max_replicas)
    interim = phy2log.clone()
    interim[moves[:, 0], moves[:, 2]] = -1  # listed replicas given up for a move stop serving first
    return RebalancePlan(
        placement=final, interim=placement_from_phy2log(interim, num_experts, placement.max_replicas),
        held_after=held_after, moves=Moves(table, tuple(hosts), expert_bytes, topology),
        replicas=(final.logical_replica_count.sum(1) - num_experts).clamp(min=0),
        imbalance_before=before, imbalance_after=torch.where(keep, before_stay, after),
        changed=(new_phy != phy2log).any(1),
    )


def _packed(weights: torch.Tensor, count: torch.Tensor, state: _State, num_stay: int,
            fall_back: bool) -> tuple[_Items, _Picks]:
    """The packing (`_pack`); with `fall_back` (ranks leave) and no room for some layer, again
    without replicas and tight: every expert stays where a staying rank lists it."""
    items = _Items.of(weights, count)
    picks = _pack(items, state, weights.sum(1) / num_stay)
    if fall_back and bool(picks.failed.any()):
        items = _Items.of(weights, torch.ones_like(count))
        picks = _pack(items, state, weights.sum(1) / num_stay, tight=True)
    return items, picks


def _staying(active: list[int], leaving: Sequence[int]) -> tuple[list[int], list[int]]:
    """(the leaving ranks, the active ranks that stay), checked."""
    out = sorted(set(int(r) for r in leaving))
    stay = [r for r in active if r not in out]
    if not set(out) <= set(active) or not stay:
        raise ConfigError(f"leaving ranks {out} must be active ranks of {active}, and some must stay")
    return out, stay


def _must_move(phy2log: torch.Tensor, out: list[int], per_rank: int, failed: torch.Tensor,
               stay: list[int]) -> torch.Tensor:
    """`[L]` the layers that list a slot of a leaving rank (laid out again whatever they gain);
    ConfigError if the packing found no room for one of them."""
    must = torch.zeros(phy2log.shape[0], dtype=torch.bool)
    for r in out:
        must |= (phy2log[:, r * per_rank:(r + 1) * per_rank] >= 0).any(1)
    if (must & failed).any():
        layer = int(torch.nonzero(must & failed)[0])
        raise ConfigError(f"layer {layer}: ranks {stay} have too few slots ({len(stay)} x {per_rank}) for every "
                          f"expert once ranks {out} leave")
    return must


def _replicas(phy2log: torch.Tensor, num_experts: int) -> torch.Tensor:
    """`[L, E]` how many slots of each layer list each expert."""
    ids = torch.where(phy2log >= 0, phy2log, num_experts)
    out = torch.zeros(phy2log.shape[0], num_experts + 1, dtype=torch.int64).scatter_add_(1, ids, torch.ones_like(ids))
    return out[:, :num_experts]


def _loads(load: torch.Tensor, num_layers: int, num_experts: int) -> torch.Tensor:
    if not isinstance(load, torch.Tensor) or tuple(load.shape) != (num_layers, num_experts):
        shape = list(load.shape) if isinstance(load, torch.Tensor) else type(load).__name__
        raise ConfigError(f"load must be a [{num_layers}, {num_experts}] tensor, got {shape}")
    w = load.detach().to("cpu", torch.float64)
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ConfigError("load must hold finite numbers >= 0")
    return w


@dataclass(slots=True)
class _State:
    """What the packing may use: per (layer, rank) room and free slots; per (layer, expert) the
    ranks that hold its weights already (`holders`, -1 padded, ascending) and how many listed
    slots (the expert's first listed one) and free slots (any other copy) of it each has. Rows of the (layer, expert) tables
    are `layer * (E + 1) + expert`; row E of every layer (the padding expert) is empty."""

    rank_of: torch.Tensor  # [P] the rank of each slot
    usable: torch.Tensor  # [L, P] bool: on an active rank
    in_use: torch.Tensor  # [L, P] bool: listed in the tables in use (and usable)
    listed: torch.Tensor  # [L, P] bool: of those, each expert's first: listed also in the interim tables
    room: torch.Tensor  # [L, N] slots of the rank (0 for ranks outside `active`)
    free: torch.Tensor  # [L, N] usable slots but those: where moves may write
    holders: torch.Tensor  # [L * (E + 1), H] int64 ranks, -1 padded
    kept_listed: torch.Tensor  # [L * (E + 1), H] listed slots of that holder with the expert
    kept_free: torch.Tensor  # [L * (E + 1), H] free slots of that holder with a copy of it

    @classmethod
    def of(cls, placement: Placement, held: torch.Tensor, active: list[int], num_ranks: int) -> _State:
        phy2log = placement.physical_to_logical_map
        num_layers, num_physical = phy2log.shape
        num_experts, per_rank = placement.num_logical, num_physical // num_ranks
        width = num_experts + 1
        rank_of = torch.arange(num_physical) // per_rank
        on = torch.zeros(num_ranks, dtype=torch.bool)
        on[active] = True
        usable = on[rank_of].expand(num_layers, num_physical)
        in_use = usable & (phy2log >= 0)
        # each expert's first listed slot stays listed throughout (the interim tables serve with it);
        # every other slot is free: its copy may be kept (no move) or given up for a move
        width_key = torch.where(in_use, torch.arange(num_layers).unsqueeze(1) * width + phy2log.clamp(min=0),
                                num_layers * width)
        order = torch.argsort(width_key * num_physical + torch.arange(num_physical), dim=1)
        key_sorted = width_key.gather(1, order)
        lead = torch.ones_like(key_sorted, dtype=torch.bool)
        lead[:, 1:] = key_sorted[:, 1:] != key_sorted[:, :-1]
        listed = torch.zeros_like(in_use)
        listed.scatter_(1, order, lead & (key_sorted < num_layers * width))
        free = usable & ~listed
        room = torch.where(on, per_rank, 0).expand(num_layers, num_ranks).clone()
        # one key per (layer, expert, rank) that holds it; its listed and free slot counts
        has = usable & (held >= 0)
        layer = torch.arange(num_layers).unsqueeze(1).expand(num_layers, num_physical)
        key = ((layer * width + held.clamp(min=0)) * num_ranks + rank_of)[has]
        keys, inverse = torch.unique(key, return_inverse=True)
        n_listed = torch.zeros(len(keys), dtype=torch.int64).scatter_add_(0, inverse, listed[has].to(torch.int64))
        n_free = torch.zeros(len(keys), dtype=torch.int64).scatter_add_(0, inverse, free[has].to(torch.int64))
        row, rank = keys // num_ranks, keys % num_ranks
        first = torch.searchsorted(row, row, right=False)
        col = torch.arange(len(keys)) - first  # the holder's place among its expert's (ascending rank)
        most = int(col.max()) + 1 if len(keys) else 1
        holders = torch.full((num_layers * width, most), -1, dtype=torch.int64)
        kept_listed = torch.zeros((num_layers * width, most), dtype=torch.int64)
        kept_free = torch.zeros((num_layers * width, most), dtype=torch.int64)
        holders[row, col], kept_listed[row, col], kept_free[row, col] = rank, n_listed, n_free
        return cls(rank_of, usable, in_use, listed, room, free.view(num_layers, num_ranks, per_rank).sum(2),
                   holders, kept_listed, kept_free)


@dataclass(slots=True)
class _Items:
    """Each layer's replicas, heaviest first (ties: lowest expert), padded to the longest layer."""

    expert: torch.Tensor  # [L, M] int64 (E: padding)
    weight: torch.Tensor  # [L, M] float64 (0 for padding)
    valid: torch.Tensor  # [L, M] bool
    first: torch.Tensor  # [L, M] bool: the expert's first replica in this order (the one coverage needs)

    @classmethod
    def of(cls, weights: torch.Tensor, count: torch.Tensor) -> _Items:
        num_layers, num_experts = weights.shape
        most = int(count.sum(1).max())
        bounds = count.cumsum(1)  # [L, E]
        idx = torch.arange(most).expand(num_layers, most).contiguous()
        valid = idx < bounds[:, -1:]
        expert = torch.searchsorted(bounds, idx, right=True).clamp(max=num_experts - 1)
        per = (weights / count).gather(1, expert)
        # uniform layers have equal weights everywhere: the heaviest-first order is the expert order
        key = torch.where(valid, per, torch.tensor(-1.0, dtype=torch.float64))
        key, order = key.sort(dim=1, descending=True, stable=True)
        expert, valid = expert.gather(1, order), valid.gather(1, order)
        expert = torch.where(valid, expert, num_experts)
        # an expert's replicas (equal weights, adjacent in expert order) stay adjacent in a stable
        # sort: its first is where the expert differs from the one before
        first = torch.zeros_like(valid)
        first[:, 0] = valid[:, 0]
        first[:, 1:] = valid[:, 1:] & (expert[:, 1:] != expert[:, :-1])
        return cls(expert, torch.where(valid, key, 0.0), valid, first)


@dataclass(slots=True)
class _Picks:
    rank: torch.Tensor  # [L, M] the rank each item goes to (-1: dropped)
    kind: torch.Tensor  # [L, M] 0 kept in a listed slot, 1 kept in a free slot, 2 moved, -1 dropped
    failed: torch.Tensor  # [L] bool: a layer some expert's only replica found no rank for


def _pack(items: _Items, state: _State, mean_load: torch.Tensor, tight: bool = False) -> _Picks:
    """Steps 2 and 3 of the module docstring: sticky LPT over all layers at once, one item of
    every layer per iteration. This loop is most of a plan's time: each iteration is a few
    whole-`[L, N]` operations and the rest on the expert's few holders (`[L, H]`), in numpy,
    whose per-operation cost on arrays this small is a fraction of torch's. `closed` is +inf
    where a rank has no room or no free slot left (no move there); `taken` marks the ranks a
    replica of the expert at hand went to already (its replicas are consecutive items). `tight`:
    every expert stays where it is listed, whatever the load (a listed holder before one with an
    unlisted copy): a move takes a free slot only for an expert no staying rank lists."""
    num_layers, num_items = items.expert.shape
    num_ranks = state.room.shape[1]
    width = state.holders.shape[0] // num_layers
    rows = np.arange(num_layers)
    inf = np.inf
    flat = num_layers * num_ranks
    load = np.zeros(flat)
    used = np.zeros(flat, dtype=np.int64)
    room = state.room.reshape(flat).numpy()
    free = state.free.reshape(flat).numpy().copy()
    closed = np.where((room > 0) & (free > 0), 0.0, inf)
    full = room <= 0
    taken = np.zeros(flat, dtype=bool)
    kept_listed, kept_free = state.kept_listed.numpy().copy(), state.kept_free.numpy().copy()
    holders_all = state.holders.numpy()
    picks = np.full((num_items, num_layers), -1, dtype=np.int64)
    kinds = np.full((num_items, num_layers), -1, dtype=np.int64)
    failed = np.zeros(num_layers, dtype=bool)
    near = np.full(num_layers, inf) if tight else (mean_load * (1 + KEEP_SLACK)).numpy()  # [L]
    experts, weights = items.expert.t().contiguous().numpy(), items.weight.t().contiguous().numpy()
    valids, firsts = items.valid.t().contiguous().numpy(), items.first.t().contiguous().numpy()
    same = np.zeros((num_items, num_layers), dtype=bool)
    same[1:] = experts[1:] == experts[:-1]
    base = rows * num_ranks
    for i in range(num_items):
        e, w, valid = experts[i], weights[i], valids[i]
        taken.reshape(num_layers, num_ranks)[~same[i]] = False  # a new expert in a layer: none taken
        row = rows * width + e
        score = np.where(taken, inf, load + closed).reshape(num_layers, num_ranks)
        best = score.argmin(1)  # a move to the least-loaded open rank without the expert
        best_load = score[rows, best]
        hold = holders_all[row]  # [L, H]
        cells = base[:, None] + np.maximum(hold, 0)
        listed_left, free_left = kept_listed[row], kept_free[row]
        sticky = ~(full[cells] | taken[cells]) & (hold >= 0) & ((listed_left > 0) | ((free_left > 0) & (free[cells] > 0)))
        keep_all = np.where(sticky, load[cells] + (np.where(listed_left > 0, 0.0, 1e300) if tight else 0.0), inf)
        j = keep_all.argmin(1)
        keep_load = keep_all[rows, j]
        take_keep = (keep_load < inf) & ((keep_load + w <= near) | (keep_load <= best_load))
        pick = np.where(take_keep, hold[rows, j], best)
        ok = valid & (take_keep | (best_load < inf))
        failed |= valid & ~ok & firsts[i]
        in_listed = take_keep & ok & (listed_left[rows, j] > 0)
        in_copy = take_keep & ok & ~in_listed
        picks[i] = np.where(ok, pick, -1)
        kinds[i] = np.where(in_listed, 0, np.where(in_copy, 1, np.where(ok, 2, -1)))
        cell = (base + pick)[ok]  # one cell per layer: no repeats
        load[cell] += w[ok]
        used[cell] += 1
        free[cell] -= ~in_listed[ok]  # a free slot taken: a copy kept, or a move
        taken[cell] = True
        full[cell] |= used[cell] >= room[cell]
        closed[cell[full[cell] | (free[cell] <= 0)]] = inf
        kept_listed[row[in_listed], j[in_listed]] -= 1
        kept_free[row[in_copy], j[in_copy]] -= 1
    return _Picks(torch.from_numpy(picks.T.copy()), torch.from_numpy(kinds.T.copy()), torch.from_numpy(failed))


def _match(slot_key: torch.Tensor, item_key: torch.Tensor, none: int) -> torch.Tensor:
    """Per row, the slot each item is matched with: the j-th item of a key gets the j-th slot of
    that key (slots in ascending slot order). Keys equal to `none` are not matched (-1); every
    item key must have enough slots."""
    num_layers, num_slots = slot_key.shape
    sorted_slots, slot_order = torch.sort(slot_key * num_slots + torch.arange(num_slots), dim=1)
    sorted_slot_key = sorted_slots // num_slots
    num_items = item_key.shape[1]
    sorted_items, item_order = torch.sort(item_key * num_items + torch.arange(num_items), dim=1)
    sorted_item_key = sorted_items // num_items
    first_of_item = torch.searchsorted(sorted_item_key, sorted_item_key, right=False)
    occurrence = torch.arange(num_items).expand(num_layers, num_items) - first_of_item
    at = torch.searchsorted(sorted_slot_key, sorted_item_key, right=False) + occurrence
    at = at.clamp(max=num_slots - 1)
    slot = slot_order.gather(1, at)
    matched = (sorted_item_key != none) & (sorted_slot_key.gather(1, at) == sorted_item_key)
    out = torch.full((num_layers, num_items), -1, dtype=torch.int64)
    out.scatter_(1, item_order, torch.where(matched, slot, -1))
    return out


def _assign(items: _Items, picks: _Picks, state: _State, phy2log: torch.Tensor,
            held: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The packing's choices as slots: kept replicas in the slots that hold them (listed ones
    first), moved ones in the rank's free slots (empty ones first, then lowest). Returns the new
    slot map, what the slots hold after the moves, and the moves `[M, 3]` (layer, expert, slot)
    in (layer, expert) order."""
    num_layers, num_physical = phy2log.shape
    num_experts = int(items.expert.max()) + 1 if items.expert.numel() else 1
    none = 1 << 40
    rank, kind, expert = picks.rank, picks.kind, items.expert
    rank_e = rank * (num_experts + 1) + expert
    slot_re = state.rank_of * (num_experts + 1) + held
    in_listed = _match(torch.where(state.listed, slot_re, none), torch.where(kind == 0, rank_e, none), none)
    free_with_copy = state.usable & ~state.listed & (held >= 0)
    in_free = _match(torch.where(free_with_copy, slot_re, none), torch.where(kind == 1, rank_e, none), none)
    taken = torch.zeros(num_layers, num_physical, dtype=torch.bool)
    rows = torch.arange(num_layers).unsqueeze(1).expand_as(in_free)
    taken[rows[in_free >= 0], in_free[in_free >= 0]] = True
    # the free slots for the moves (a copy there is given up); `ranked` lists the open slots in the
    # order below; matching by rank over it (ties: position in `ranked`) gives each moved replica
    # a position there
    open_ = state.usable & ~state.listed & ~taken
    # per rank: empty slots, then unlisted copies, then listed replicas the new layout gives up
    grade = torch.where(held < 0, 0, torch.where(state.in_use, 2, 1))
    order_key = torch.where(open_, state.rank_of * 3 + grade, none)
    ranked = torch.sort(order_key * num_physical + torch.arange(num_physical), dim=1).indices
    rank_sorted = torch.where(open_, state.rank_of, none).gather(1, ranked)
    pos = _match(rank_sorted, torch.where(kind == 2, rank, none), none)
    in_moved = torch.where(pos >= 0, ranked.gather(1, pos.clamp(min=0)), -1)
    slot = torch.where(kind == 0, in_listed, torch.where(kind == 1, in_free, torch.where(kind == 2, in_moved, -1)))
    new_phy = torch.full_like(phy2log, -1)
    placed = slot >= 0
    new_phy[rows[placed], slot[placed]] = expert[placed]
    held_after = held.clone()
    held_after[rows[placed], slot[placed]] = expert[placed]
    moved = (kind == 2) & placed
    layer_m, expert_m, slot_m = rows[moved], expert[moved], slot[moved]
    order = torch.argsort((layer_m * (num_experts + 1) + expert_m) * num_physical + slot_m)  # (layer, expert) order
    return new_phy, held_after, torch.stack([layer_m[order], expert_m[order], slot_m[order]], dim=1)


def _sources(moves: torch.Tensor, state: _State, num_ranks: int, hosts: list[int],
             backup: Mapping[int, torch.Tensor] | None, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 4 of the module docstring, for the moves `[M, 3]` (layer, expert, slot) in (layer,
    expert) order: per move the source kind (0 peer, 1 backup, 2 disk) and its rank (a peer) or
    host (a backup, the disk). A peer sends from a slot the tables in use list: no move writes
    one, so its content stays while the moves run."""
    if not len(moves):
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    per_rank = state.usable.shape[1] // num_ranks
    layer, expert, slot = (c.numpy() for c in moves.unbind(1))
    count = len(layer)
    dst = slot // per_rank
    host = np.asarray(hosts, dtype=np.int64)
    row = layer * (num_experts + 1) + expert
    hold = state.holders.numpy()[row]  # [M, H]
    cand = (hold >= 0) & (state.kept_listed.numpy()[row] > 0) & (hold != dst[:, None])
    same = host[np.maximum(hold, 0)] == host[dst][:, None]
    near, far = cand & same, cand & ~same
    # the j-th move of one (layer, expert) takes its j-th candidate (cyclic): a hot expert's new
    # replicas are sent by all of its holders, not all by the first
    first = np.searchsorted(row, row, side="left")
    j = np.arange(count) - first
    live = {hosts[r] for r in range(num_ranks) if bool(state.usable[0, r * per_rank])}
    own = np.zeros(count, dtype=bool)
    other = np.full(count, -1, dtype=np.int64)
    for h in sorted((h for h in (backup or {}) if h in live), reverse=True):  # the lowest other host last wins
        kept = backup[h].numpy()[layer, expert]  # type: ignore[index]
        own |= kept & (host[dst] == h)
        other = np.where(kept & (host[dst] != h), h, other)
    kind = np.full(count, 2, dtype=np.int64)
    ident = host[dst].copy()
    for mask, k, value in ((other >= 0, 1, other), (far.any(1), 0, _nth(far, j, hold)),
                           (own, 1, host[dst]), (near.any(1), 0, _nth(near, j, hold))):  # last wins
        kind = np.where(mask, k, kind)
        ident = np.where(mask, value, ident)
    return torch.from_numpy(kind), torch.from_numpy(ident)


def _nth(cand: np.ndarray, j: np.ndarray, hold: np.ndarray) -> np.ndarray:
    """Per row of `cand [M, H]` bool, the holder of its (j mod count)-th True (0 where none)."""
    count = np.maximum(cand.sum(1), 1)
    target = (j % count) + 1
    at = np.argmax(cand & (np.cumsum(cand, axis=1) == target[:, None]), axis=1)
    return np.maximum(hold[np.arange(len(hold)), at], 0)


@dataclass(frozen=True, slots=True, eq=False)
class Moves:
    """A plan's copies as columns (M moves in (layer, expert) order); iterating gives `Transfer`s."""

    table: torch.Tensor  # [M, 6] int64: layer, expert, dst_slot, dst_rank, source kind (0 peer, 1 backup,
    # 2 disk), source rank (a peer) or host (a backup or the disk)
    hosts: tuple[int, ...]  # each rank's host
    expert_bytes: int
    topology: Topology

    def __len__(self) -> int:
        return int(self.table.shape[0])

    def __bool__(self) -> bool:
        return len(self) > 0

    def __iter__(self):  # type: ignore[no-untyped-def]
        kinds = ("peer", "backup", "disk")
        for layer, expert, slot, rank, kind, ident in self.table.tolist():
            name = kinds[kind]
            host = self.hosts[ident] if name == "peer" else ident
            est = self.topology.transfer_s(name, self.expert_bytes, across_hosts=host != self.hosts[rank])
            yield Transfer(layer, expert, slot, rank, name, ident if name == "peer" else None, self.expert_bytes,
                           est, 0.0, host)

    def count(self, kind: str) -> int:
        return int((self.table[:, 4] == ("peer", "backup", "disk").index(kind)).sum())

    def keep(self, rows: torch.Tensor) -> Moves:
        return Moves(self.table[rows], self.hosts, self.expert_bytes, self.topology)
