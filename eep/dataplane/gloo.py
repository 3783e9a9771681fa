"""The fixed-membership baseline transport: torch.distributed (gloo) all-to-all.

A process group is created once at start and frozen: gloo cannot shrink a group or admit a
new process, and a group that saw a failure must never be reused (a failure ends the instance,
or with `--fault-policy restart` relaunches every rank). Every collective runs under the
group's timeout, so a dead or stopped peer becomes a RuntimeError after at most `timeout_s`
instead of the 30-minute default.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

import torch
import torch.distributed as dist

from eep.errors import DataPlaneError


class GlooExchange:
    """An `Exchange` over a gloo process group of `num_ranks` processes."""

    def __init__(self, rank: int, num_ranks: int, init_method: str, timeout_s: float = 30.0) -> None:
        self.rank, self.num_ranks = rank, num_ranks
        dist.init_process_group(
            "gloo", init_method=init_method, rank=rank, world_size=num_ranks,
            timeout=datetime.timedelta(seconds=timeout_s),
        )

    def set_view(self, epoch: int, active: Sequence[int]) -> None:
        """The baseline's membership is frozen: any view but all ranks is refused."""
        if list(active) != list(range(self.num_ranks)):
            raise DataPlaneError(
                f"the gloo baseline has fixed membership ({self.num_ranks} ranks); it cannot run with "
                f"ranks {list(active)}: use the shm backend for elastic membership"
            )

    def all_to_all(self, send: list[torch.Tensor]) -> list[torch.Tensor]:
        """Two collectives: the byte counts, then the payloads in one `all_to_all_single`."""
        send_sizes = torch.tensor([t.numel() for t in send], dtype=torch.int64)
        recv_sizes = torch.empty_like(send_sizes)
        dist.all_to_all_single(recv_sizes, send_sizes)
        out_splits = recv_sizes.tolist()
        recv = torch.empty(sum(out_splits), dtype=torch.uint8)
        payload = torch.cat(send) if send else torch.empty(0, dtype=torch.uint8)
        dist.all_to_all_single(recv, payload, output_split_sizes=out_splits, input_split_sizes=send_sizes.tolist())
        return list(recv.split(out_splits))

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
