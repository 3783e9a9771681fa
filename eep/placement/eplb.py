"""Initial expert placement (EPLB style): which logical expert each physical slot holds.

Legend: L = MoE layers, E = logical experts, P = physical slots (E + redundant),
N = ranks, S = slots per rank (P // N), R = maximum replicas of one expert.

Promise: `plan_placement` is a pure function of its arguments. It uses no RNG and no
global state, works on CPU tensors, and every tie is broken by the lowest expert or rank
id, so every process that calls it with the same input gets identical tables. Slot p
lives on rank p // S.

Per layer, in two greedy passes:
1. Replication: every expert gets one replica. Each redundant replica then goes to the
   expert with the highest load per replica (ties: lowest expert id).
2. Packing: replicas are taken heaviest first (load / replicas of their expert; ties:
   lowest expert id). Each goes to the least-loaded rank (ties: lowest rank id) that has
   a free slot and does not already hold that expert. If every rank with a free slot
   already holds it, the least-loaded rank with a free slot takes it anyway. Within a
   rank, slots are ordered by expert id. Exception: a layer with one replica per expert
   and equal loads is laid out contiguously (rank r holds experts r*S .. r*S+S-1). Any
   layout balances such a layer equally well. With one rank, this contiguous layout is
   the identity layout.

Both passes run on all layers at once. The loop runs over redundant replicas and then
over slots, not over layers, so E=256, N=32, L=61 takes a few milliseconds.
"""

from __future__ import annotations

import torch

from eep.errors import ConfigError
from eep.placement.routing import Placement, placement_from_phy2log


def plan_placement(
    num_experts: int,
    num_ranks: int,
    *,
    num_layers: int = 1,
    num_redundant: int = 0,
    load: torch.Tensor | None = None,
    max_replicas: int | None = None,
) -> Placement:
    """Place `num_experts + num_redundant` replicas on `num_ranks` ranks, balancing load.

    Args:
        num_experts: E, logical experts per MoE layer (>= 1).
        num_ranks: N, ranks (>= 1). E + num_redundant must be divisible by N.
        num_layers: L, MoE layers (>= 1).
        num_redundant: extra physical slots beyond one per expert (>= 0).
        load: expected per-expert load. Shape `[E]` (the same for every layer) or `[L, E]`.
            Any real dtype. Entries must be finite and >= 0. None means uniform. A layer
            whose load is all zeros is treated as uniform.
        max_replicas: R, the last dimension of `logical_to_physical_map`. Defaults to
            N, so later repairs can add replicas without changing the table shapes.
            Must be >= the most replicas any expert gets.

    Returns:
        `Placement` with `physical_to_logical_map [L, P]` int64 (no empty slots here),
        `logical_to_physical_map [L, E, R]` int64 (-1 padded, replicas in slot order),
        and `logical_replica_count [L, E]` int64 (each row sums to P).

    Raises:
        ConfigError: for any invalid argument. The message names the bad value.
    """
    _check_sizes(num_experts, num_ranks, num_layers, num_redundant)
    weights = _layer_loads(load, num_layers, num_experts)  # [L, E] float64
    count = _replicate(weights, num_redundant)  # [L, E]
    most = int(count.max())
    r = num_ranks if max_replicas is None else max_replicas
    if r < most:
        raise ConfigError(
            f"max_replicas={r} is too small: the plan gives one expert {most} replicas; "
            f"raise max_replicas to at least {most} or lower num_redundant={num_redundant}"
        )
    phy2log = _pack(weights, count, num_ranks)  # [L, P]
    return placement_from_phy2log(phy2log, num_experts, r)


def rank_loads(placement: Placement, load: torch.Tensor | None, num_ranks: int) -> torch.Tensor:
    """Load on each rank: the sum over its slots of `load[expert] / replicas[expert]`.

    Args:
        placement: any placement. Empty slots (-1) add nothing.
        load: `[E]` or `[L, E]`, as for `plan_placement`. None means uniform (1 per expert).
        num_ranks: N. It must divide the number of physical slots.

    Returns:
        `[L, N]` float64.
    """
    phy2log = placement.physical_to_logical_map  # [L, P]
    num_layers, num_physical = phy2log.shape
    if num_ranks < 1 or num_physical % num_ranks:
        raise ConfigError(f"num_ranks={num_ranks} does not divide the {num_physical} physical slots")
    weights = _layer_loads(load, num_layers, placement.num_logical, uniform_if_zero=False)  # [L, E]
    return loads_of_ranks(phy2log, placement.logical_replica_count, weights, num_ranks)


def loads_of_ranks(phy2log: torch.Tensor, count: torch.Tensor, weights: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """`rank_loads` on checked tables: slot map `phy2log [L, P]`, replica counts `count [L, E]`,
    loads `weights [L, E]` float64 -> `[L, N]`."""
    num_layers, num_physical = phy2log.shape
    per_replica = weights / count.clamp(min=1)  # [L, E]
    slot_load = torch.where(phy2log >= 0, per_replica.gather(1, phy2log.clamp(min=0)), 0.0)  # [L, P]
    return slot_load.view(num_layers, num_ranks, num_physical // num_ranks).sum(dim=2)


def _check_sizes(num_experts: int, num_ranks: int, num_layers: int, num_redundant: int) -> None:
    if num_experts < 1:
        raise ConfigError(f"num_experts={num_experts} must be >= 1")
    if num_ranks < 1:
        raise ConfigError(f"num_ranks={num_ranks} must be >= 1")
    if num_layers < 1:
        raise ConfigError(f"num_layers={num_layers} must be >= 1")
    if num_redundant < 0:
        raise ConfigError(f"num_redundant={num_redundant} must be >= 0")
    slots = num_experts + num_redundant
    if slots % num_ranks:
        raise ConfigError(
            f"num_experts + num_redundant = {num_experts} + {num_redundant} = {slots} physical slots "
            f"cannot be split evenly over num_ranks={num_ranks}; choose num_redundant so that the sum "
            f"is a multiple of {num_ranks}"
        )


def _layer_loads(
    load: torch.Tensor | None, num_layers: int, num_experts: int, *, uniform_if_zero: bool = True
) -> torch.Tensor:
    """Check `load` and return it as `[L, E]` float64."""
    if load is None:
        return torch.ones((num_layers, num_experts), dtype=torch.float64)
    if not isinstance(load, torch.Tensor):
        raise ConfigError(f"load must be a torch.Tensor of shape [{num_experts}] or [{num_layers}, {num_experts}], got {type(load).__name__}")
    if load.dtype == torch.bool or load.is_complex():
        raise ConfigError(f"load must hold real numbers, got dtype {load.dtype}")
    shape = tuple(load.shape)
    if shape not in ((num_experts,), (num_layers, num_experts)):
        raise ConfigError(f"load has shape {list(shape)}; expected [{num_experts}] or [{num_layers}, {num_experts}] (num_layers, num_experts)")
    weights = load.detach().to("cpu", torch.float64).expand(num_layers, num_experts).clone()
    if not torch.isfinite(weights).all():
        bad = weights[~torch.isfinite(weights)][0].item()
        raise ConfigError(f"load has a non-finite entry ({bad}); every expert load must be a finite number >= 0")
    if (weights < 0).any():
        bad = weights[weights < 0][0].item()
        raise ConfigError(f"load has a negative entry ({bad}); every expert load must be >= 0")
    if uniform_if_zero:
        # No observed load says nothing about the experts: spread replicas as if uniform.
        weights[(weights == 0).all(dim=1)] = 1.0
    return weights


def _replicate(weights: torch.Tensor, num_redundant: int) -> torch.Tensor:
    """Replica count `[L, E]` int64: one each, plus each redundant one to the hottest per replica."""
    count = torch.ones_like(weights, dtype=torch.int64)  # [L, E]
    rows = torch.arange(weights.shape[0])
    for _ in range(num_redundant):
        hottest = (weights / count).argmax(dim=1)  # [L], first maximum = lowest expert id
        count[rows, hottest] += 1
    return count


def _pack(weights: torch.Tensor, count: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """Greedy packing of the replicas onto ranks; returns `phy2log [L, P]` int64."""
    num_layers, num_experts = weights.shape
    num_physical = int(count[0].sum())
    per_rank = num_physical // num_ranks
    # Replicas in expert order: item i of layer l is a replica of expert `expert[l, i]`.
    bounds = count.cumsum(dim=1)  # [L, E]
    items = torch.arange(num_physical).expand(num_layers, num_physical).contiguous()  # [L, P]
    expert = torch.searchsorted(bounds, items, right=True)  # [L, P]
    item_load = (weights / count).gather(1, expert)  # [L, P]
    # Heaviest first; a stable sort keeps expert order among equal loads.
    item_load, order = item_load.sort(dim=1, descending=True, stable=True)
    expert = expert.gather(1, order)

    rows = torch.arange(num_layers)
    load = torch.zeros((num_layers, num_ranks), dtype=torch.float64)  # [L, N]
    used = torch.zeros((num_layers, num_ranks), dtype=torch.int64)  # [L, N]
    holds = torch.zeros((num_layers, num_ranks, num_experts), dtype=torch.bool)  # [L, N, E]
    rank = torch.empty((num_layers, num_physical), dtype=torch.int64)  # [L, P]
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    for i in range(num_physical):
        e = expert[:, i]  # [L]
        free = used < per_rank  # [L, N]
        fresh = free & ~holds[rows, :, e]  # [L, N]
        best_fresh = torch.where(fresh, load, inf).argmin(dim=1)  # [L], first minimum = lowest rank
        best_free = torch.where(free, load, inf).argmin(dim=1)  # [L]
        pick = torch.where(fresh.any(dim=1), best_fresh, best_free)  # [L]
        rank[:, i] = pick
        load[rows, pick] += item_load[:, i]
        used[rows, pick] += 1
        holds[rows, pick, e] = True
    # Slot order: by rank, then by expert id; every rank is exactly full, so this is phy2log.
    key = rank * num_experts + expert  # [L, P]
    _, slot_order = key.sort(dim=1, stable=True)
    phy2log = expert.gather(1, slot_order)
    # One replica per expert and all loads equal: every layout with S slots per rank is equally
    # balanced. Use the contiguous one, so rank r holds experts r*S .. r*S+S-1 and one rank is
    # the identity layout of the single-process engine (the greedy would deal them round-robin).
    if num_physical == num_experts:
        even = (item_load == item_load[:, :1]).all(dim=1)  # [L]
        phy2log[even] = torch.arange(num_experts)
    return phy2log
