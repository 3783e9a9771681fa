"""The model and the cluster `eep sim` simulates, read from files (no download).

What this module promises: `ModelShape.load(path)` reads the fields of a Hugging Face
`config.json` the simulator needs (plus `total_params` and `weight_bytes_per_param`), and
derives one routed expert's bytes and the bytes every rank holds besides its routed experts;
`Cluster.load(path)` reads a topology file (GPUs per node, NVLink, per-GPU RDMA NIC, PCIe
host <-> GPU, a node's NVMe read rate, host memory). `Cluster.topology()` is eep's planner
bandwidth model (`eep.placement.topology.Topology`) at that cluster: peer copies over NVLink,
host-memory backups over PCIe (and the NIC when they are on another node), the checkpoint from
the node's NVMe, every copy between nodes capped by one GPU's NIC.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from eep.errors import ConfigError
from eep.placement.topology import Topology

DATA = Path(__file__).parent / "data"
DEFAULT_MODEL = DATA / "deepseek_v3.json"
DEFAULT_CLUSTER = DATA / "h800_cluster.json"


def _read(path: Path | str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def _pick(cls: type, data: dict[str, Any], path: Path | str) -> dict[str, Any]:
    names = [f.name for f in fields(cls)]
    missing = [n for n in names if n not in data]
    if missing:
        raise ConfigError(f"{path}: missing {missing}")
    return {n: data[n] for n in names}


@dataclass(frozen=True, slots=True)
class ModelShape:
    name: str
    hidden_size: int
    moe_intermediate_size: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    num_hidden_layers: int
    first_k_dense_replace: int
    weight_bytes_per_param: float
    total_params: float

    @classmethod
    def load(cls, path: Path | str = DEFAULT_MODEL) -> ModelShape:
        return cls(**_pick(cls, _read(path), path))

    @property
    def moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    @property
    def expert_bytes(self) -> int:
        """One routed expert: gate, up and down projections."""
        return int(3 * self.hidden_size * self.moe_intermediate_size * self.weight_bytes_per_param)

    @property
    def routed_bytes(self) -> int:
        return self.moe_layers * self.n_routed_experts * self.expert_bytes

    @property
    def rest_bytes(self) -> int:
        """Everything besides the routed experts (attention, dense layers, shared experts,
        embeddings): every rank holds a copy."""
        return int(self.total_params * self.weight_bytes_per_param) - self.routed_bytes


@dataclass(frozen=True, slots=True)
class Cluster:
    name: str
    gpus_per_node: int
    nvlink_bytes_per_s: float
    rdma_bytes_per_s: float
    pcie_bytes_per_s: float
    nvme_bytes_per_s: float
    host_memory_bytes: float

    @classmethod
    def load(cls, path: Path | str = DEFAULT_CLUSTER) -> Cluster:
        return cls(**_pick(cls, _read(path), path))

    def topology(self) -> Topology:
        return Topology(
            peer_bytes_per_s=self.nvlink_bytes_per_s,
            backup_bytes_per_s=self.pcie_bytes_per_s,
            disk_bytes_per_s=self.nvme_bytes_per_s,
            network_bytes_per_s=self.rdma_bytes_per_s,
            peer_concurrency=1,  # a GPU sends one copy at a time at its full NVLink rate
            backup_concurrency=self.gpus_per_node,  # a node's host memory feeds each GPU's PCIe link
            disk_concurrency=1,  # the node's NVMe rate is one shared figure
            disk_open_s=0.0,
        )
