"""Bandwidth model of the links that expert weights can be copied over during a repair.

Three kinds of source can send one expert's weights to a rank:

- "peer": another live rank that holds the expert;
- "backup": a host-memory backup (one per host that keeps one);
- "disk": the checkpoint on the destination's own host, which always holds every expert.

Each source serves at most `concurrency` copies at once; each copy runs at the kind's full
bandwidth, so a source with concurrency c delivers up to c x bandwidth in all. Every peer
rank is its own source, every host's backup one source, every host's disk one source. A copy
from a source on another host than its destination crosses the inter-host link and runs at
no more than `network_bytes_per_s` (within a host, shared memory: the kind's own figure).

Defaults, measured on the development machine (2 cores, 2026-11-25) as the median per-expert
copy time of the tier-2 copies in `eep bench recovery --json out/recovery.json`
(`repairs[0].experts[*].seconds`, 96 KiB experts of the default model): host backup -> slot
2.9 GB/s, checkpoint (page-cached safetensors) -> slot 0.6 GB/s, plus `disk_open_s` before a
rank's first copy from the checkpoint (the slowest copy of each rank that read the disk).
Peer copies are not executed yet; 5 GB/s is an estimate. One copy at a time per source.
`network_bytes_per_s` 0.6 GB/s: ZeroMQ over TCP between two network-namespace hosts here, one
rank sending 3 x 256 KiB in 1.2 ms (the all-to-all measured for the multi-host data plane);
a GPU cluster's RDMA NIC is 25-50 GB/s.
Another machine passes its own figures (`Topology.from_dict` reads them from a small
JSON/YAML mapping).

Promise: `Topology` is immutable and checked when built; `transfer_s` is a pure function.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Literal

from eep.errors import ConfigError

SourceKind = Literal["peer", "backup", "disk"]
SOURCE_KINDS: tuple[SourceKind, ...] = ("peer", "backup", "disk")


@dataclass(frozen=True, slots=True)
class Topology:
    """Per-link bandwidth (bytes/s) and per-source concurrency of the copy sources.

    Bandwidths are finite numbers > 0 (stored as float); concurrencies are ints >= 1.
    """

    peer_bytes_per_s: float = 5e9  # estimate (peer copies are not executed yet)
    backup_bytes_per_s: float = 2.9e9  # measured, see the module docstring
    disk_bytes_per_s: float = 0.6e9  # measured
    network_bytes_per_s: float = 0.6e9  # one copy across hosts, see the module docstring
    peer_concurrency: int = 1
    backup_concurrency: int = 1
    disk_concurrency: int = 1
    # A rank's first copy from the checkpoint in a repair opens the safetensors files and
    # parses their headers first: 13-16 ms measured here (a 100 KiB expert copies in 0.16 ms).
    disk_open_s: float = 0.015

    def __post_init__(self) -> None:
        for kind in SOURCE_KINDS:
            _check_bandwidth(self, f"{kind}_bytes_per_s")
            _check_concurrency(self, f"{kind}_concurrency")
        _check_bandwidth(self, "network_bytes_per_s")
        value = self.disk_open_s
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ConfigError(f"disk_open_s={value!r} must be a finite number of seconds >= 0")
        object.__setattr__(self, "disk_open_s", float(value))

    def bandwidth(self, kind: SourceKind) -> float:
        """Bytes per second of one copy from a source of `kind`."""
        return float(getattr(self, f"{_checked_kind(kind)}_bytes_per_s"))

    def concurrency(self, kind: SourceKind) -> int:
        """How many copies one source of `kind` serves at once (>= 1)."""
        return int(getattr(self, f"{_checked_kind(kind)}_concurrency"))

    def transfer_s(self, kind: SourceKind, nbytes: int, *, across_hosts: bool = False) -> float:
        """Estimated seconds to copy `nbytes` (>= 0) from one source of `kind`, alone on its
        link; `across_hosts`: the source is on another host than the destination."""
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise ConfigError(f"nbytes={nbytes!r} must be an int >= 0")
        rate = self.bandwidth(kind)
        return nbytes / (min(rate, self.network_bytes_per_s) if across_hosts else rate)

    def to_dict(self) -> dict[str, float | int]:
        """The fields as a plain mapping (JSON/YAML friendly); `from_dict` reads it back."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Topology:
        """Build from a mapping of field names to values; missing fields keep their defaults.

        Raises:
            ConfigError: `data` is not a mapping, has an unknown key, or a value is invalid.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"a topology must be a mapping of field names to numbers, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise ConfigError(f"unknown topology key(s) {unknown}; the known keys are {sorted(known)}")
        return cls(**data)  # type: ignore[arg-type]


def _checked_kind(kind: str) -> str:
    if kind not in SOURCE_KINDS:
        raise ConfigError(f"source kind {kind!r} is unknown; use one of {list(SOURCE_KINDS)}")
    return kind


def _check_bandwidth(topology: Topology, name: str) -> None:
    value = getattr(topology, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name}={value!r} must be a finite number of bytes per second > 0")
    object.__setattr__(topology, name, float(value))


def _check_concurrency(topology: Topology, name: str) -> None:
    value = getattr(topology, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r} must be an int >= 1 (copies one source serves at once)")
