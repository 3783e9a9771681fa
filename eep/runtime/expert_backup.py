"""The host-memory expert backup: a copy of every routed expert, outside every rank.

It stands for the backup "on another failure domain" of the design: when the last replica of
an expert dies with its rank, the repair can copy it from here (memory bandwidth) instead of
from the checkpoint on disk. The controller builds it once at start from the checkpoint, in
the slots' own layout (`w13 [H, 2I]`, `w2 [I, H]`, the model's dtype), so a copy into a slot is
one memcpy per tensor; ranks attach to it read-mostly by name.
"""

from __future__ import annotations

import logging
import mmap

import torch

from eep.config import resolve_dtype
from eep.dataplane.shmfile import ShmFile
from eep.model.checkpoint import CheckpointReader
from eep.model.config import ModelConfig
from eep.model.loader import load_expert

logger = logging.getLogger(__name__)


class ExpertBackup:
    def __init__(self, file: ShmFile, cfg: ModelConfig, dtype: torch.dtype) -> None:
        self.file, self.name, self.dtype = file, file.name, dtype
        h, i = cfg.hidden_size, cfg.moe_intermediate_size
        self.num_layers, self.num_experts = len(cfg.moe_layers), cfg.num_experts
        self._w13_numel, self._w2_numel = h * 2 * i, i * h
        self._shapes = ((h, 2 * i), (i, h))
        per = self._w13_numel + self._w2_numel
        self._flat = torch.frombuffer(file.mm, dtype=dtype, count=self.num_layers * self.num_experts * per)
        self._flat = self._flat.view(self.num_layers, self.num_experts, per)

    @staticmethod
    def nbytes_for(cfg: ModelConfig, dtype: torch.dtype) -> int:
        per = 3 * cfg.hidden_size * cfg.moe_intermediate_size * torch.empty(0, dtype=dtype).element_size()
        return len(cfg.moe_layers) * cfg.num_experts * per

    @classmethod
    def build(cls, model_path: str, dtype: str) -> ExpertBackup:
        """Controller side: allocate and fill from the checkpoint."""
        with CheckpointReader(model_path) as reader:
            cfg = ModelConfig.from_hf(reader.config)
            torch_dtype = resolve_dtype(dtype, reader.config)
            backup = cls(ShmFile.create("backup", cls.nbytes_for(cfg, torch_dtype)), cfg, torch_dtype)
            for layer in range(backup.num_layers):
                for expert in range(backup.num_experts):
                    load_expert(*backup.get(layer, expert), reader, layer, expert)
        logger.info("expert backup %s: %d experts, %.1f MiB", backup.name, backup.num_layers * backup.num_experts,
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

    def get(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views `(w13 [H, 2I], w2 [I, H])` of one expert of MoE layer `layer`."""
        row = self._flat[layer, expert]
        return row[: self._w13_numel].view(self._shapes[0]), row[self._w13_numel :].view(self._shapes[1])

    def close(self) -> None:
        del self._flat
        self.file.close()
