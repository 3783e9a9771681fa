"""Which experts each host keeps in host memory as a backup (a pure function).

A backup on the host of the slots it protects is lost with that host, and a full copy on
every host does not fit at scale (DeepSeek-V3's routed experts are ~650 GB in fp8). So each
host keeps the experts listed on the next host of a ring (host h keeps host (h + 1) mod H's)
and, with `own`, its own: a whole host's experts then survive on exactly one other host, and
a single rank's on its own host too, for 2/H of the experts per host instead of all of them.
One host keeps its own experts only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from eep.errors import ConfigError
from eep.placement.routing import Placement


def backup_masks(tables: Placement, host_of: Sequence[int], *, own: bool = True) -> dict[int, torch.Tensor]:
    """host -> `[L, E]` bool, True where that host keeps (layer, expert) in host memory.

    Args:
        tables: the placement whose listed slots are protected (`physical_to_logical_map [L, P]`).
        host_of: the host of each rank (hosts numbered 0..H-1, each with at least one rank);
            rank r holds slots [r * S, (r + 1) * S).
        own: also keep the host's own experts (a rank lost on a host that lives on is copied
            within the host).
    """
    phy2log = tables.physical_to_logical_map
    num_layers, num_physical = phy2log.shape
    hosts = list(host_of)
    if not hosts or num_physical % len(hosts):
        raise ConfigError(f"{num_physical} slots do not divide over {len(hosts)} ranks")
    num_hosts = max(hosts) + 1
    if sorted(set(hosts)) != list(range(num_hosts)):
        raise ConfigError(f"hosts must be numbered 0..H-1, each with a rank; got {hosts}")
    per_rank = num_physical // len(hosts)
    listed = torch.zeros(num_hosts, num_layers, tables.num_logical, dtype=torch.bool)
    for layer, row in enumerate(phy2log.tolist()):
        for slot, expert in enumerate(row):
            if expert >= 0:
                listed[hosts[slot // per_rank], layer, expert] = True
    masks = {}
    for h in range(num_hosts):
        keep = listed[(h + 1) % num_hosts].clone()
        if own:
            keep |= listed[h]
        masks[h] = keep
    return masks
