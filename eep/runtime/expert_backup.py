"""The host-memory expert backup: a copy of some routed experts, outside every rank.

It is the backup "on another failure domain" of the design: when the last replica of an
expert dies with its rank, the repair copies it from a backup (memory, or memory on another
host over the network) instead of from the checkpoint on disk. Which experts a host keeps is
`eep.placement.backups.backup_masks` (the next host's in a ring, and its own); one host keeps
all of them.

The file is built once from the checkpoint: a header `[L, E] int32` (the row of each kept
(layer, expert), -1 where it is not kept) and then one row per kept expert in the slots' own
layout (`w13 [H, 2I]`, `w2 [I, H]`, the model's dtype), so a copy into a slot is one memcpy per
tensor and one row is one contiguous span of bytes to send. Ranks attach to it by name; the
header tells them what is in it.
"""

from __future__ import annotations

import logging
import mmap

import torch

from eep.config import resolve_dtype
from eep.dataplane.shmfile import ShmFile
from eep.errors import EepError
from eep.model.checkpoint import CheckpointReader
from eep.model.config import ModelConfig
from eep.model.loader import load_expert

logger = logging.getLogger(__name__)

_ALIGN = 64


class NotBackedUp(EepError, KeyError):
    """This backup does not keep the asked (layer, expert)."""


class ExpertBackup:
    def __init__(self, file: ShmFile, cfg: ModelConfig, dtype: torch.dtype) -> None:
        self.file, self.name, self.cfg, self.dtype = file, file.name, cfg, dtype
        h, i = cfg.hidden_size, cfg.moe_intermediate_size
        self.num_layers, self.num_experts = len(cfg.moe_layers), cfg.num_experts
        self._w13_numel, self._w2_numel = h * 2 * i, i * h
        self._shapes = ((h, 2 * i), (i, h))
        self.index = torch.frombuffer(file.mm, dtype=torch.int32, count=self.num_layers * self.num_experts)
        self.index = self.index.view(self.num_layers, self.num_experts)
        self.row_bytes = (self._w13_numel + self._w2_numel) * dtype.itemsize
        self._start = _header_bytes(self.num_layers, self.num_experts)
        rows = int((self.index >= 0).sum())
        self._flat = torch.frombuffer(file.mm, dtype=dtype, offset=self._start,
                                      count=rows * (self._w13_numel + self._w2_numel))
        self._flat = self._flat.view(rows, self._w13_numel + self._w2_numel)

    @staticmethod
    def nbytes_for(cfg: ModelConfig, dtype: torch.dtype, rows: int) -> int:
        per = 3 * cfg.hidden_size * cfg.moe_intermediate_size * dtype.itemsize
        return _header_bytes(len(cfg.moe_layers), cfg.num_experts) + rows * per

    @classmethod
    def build(cls, model_path: str, dtype: str, keep: torch.Tensor | None = None) -> ExpertBackup:
        """Allocate and fill from the checkpoint: the experts where `keep [L, E]` is True (None:
        every expert)."""
        with CheckpointReader(model_path) as reader:
            cfg = ModelConfig.from_hf(reader.config)
            torch_dtype = resolve_dtype(dtype, reader.config)
            shape = (len(cfg.moe_layers), cfg.num_experts)
            if keep is None:
                keep = torch.ones(shape, dtype=torch.bool)
            if tuple(keep.shape) != shape:
                raise ValueError(f"backup mask {tuple(keep.shape)} does not fit the model's {shape}")
            rows = int(keep.sum())
            file = ShmFile.create("backup", cls.nbytes_for(cfg, torch_dtype, rows))
            index = torch.frombuffer(file.mm, dtype=torch.int32, count=shape[0] * shape[1]).view(shape)
            index.fill_(-1)
            index[keep] = torch.arange(rows, dtype=torch.int32)
            del index
            backup = cls(file, cfg, torch_dtype)
            for layer, expert in keep.nonzero().tolist():
                load_expert(*backup.get(layer, expert), reader, layer, expert)
        logger.info("expert backup %s: %d of %d experts, %.1f MiB", backup.name, rows, shape[0] * shape[1],
                    backup.file.mm.size() / 2**20)
        return backup

    @classmethod
    def attach(cls, name: str, cfg: ModelConfig, dtype: torch.dtype) -> ExpertBackup:
        return cls(ShmFile.attach(name), cfg, dtype)

    def prefault(self) -> None:
        """Map every page into this process now (one read per page), so that the first copy
        out of it in a repair does not pay thousands of page faults."""
        page = mmap.PAGESIZE
        flat = torch.frombuffer(self.file.mm, dtype=torch.uint8)
        int(flat[::page].sum())

    def keeps(self, layer: int, expert: int) -> bool:
        return 0 <= layer < self.num_layers and 0 <= expert < self.num_experts and int(self.index[layer, expert]) >= 0

    def _row(self, layer: int, expert: int) -> int:
        if not self.keeps(layer, expert):
            raise NotBackedUp(f"backup {self.name} does not keep layer {layer} expert {expert}")
        return int(self.index[layer, expert])

    def get(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views `(w13 [H, 2I], w2 [I, H])` of one expert of MoE layer `layer`."""
        row = self._flat[self._row(layer, expert)]
        return row[: self._w13_numel].view(self._shapes[0]), row[self._w13_numel :].view(self._shapes[1])

    def raw(self, layer: int, expert: int) -> memoryview:
        """The expert's row as bytes (w13 then w2), without a copy: what a peer host is sent."""
        start = self._start + self._row(layer, expert) * self.row_bytes
        return memoryview(self.file.mm)[start : start + self.row_bytes]

    def close(self) -> None:
        del self._flat, self.index
        self.file.close()


def _header_bytes(num_layers: int, num_experts: int) -> int:
    return -(-num_layers * num_experts * 4 // _ALIGN) * _ALIGN
