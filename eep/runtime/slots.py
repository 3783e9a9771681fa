"""A rank's expert slots: what each holds, writing experts into them, serving them to peers.

`ExpertSlots` owns the rank's view of its slot weights (`held`: the expert each global slot's
weights are, this rank's slots only being meaningful) and the one lock under which a slot is
rewritten or read for a peer, so a peer never gets half of a slot that is being overwritten.
A copy reads its expert from one of three sources:
- "peer": another rank's slot, over ZeroMQ (`fetch_rows` from that rank's `RowServer`;
  CURVE-authenticated on every transport: on one host an abstract Unix socket, across hosts
  TCP), falling back to the disk if the peer does not answer or gave the slot up;
- "backup": this host's expert backup (shared memory), or another host's over ZeroMQ;
- "disk": the checkpoint on this host.

`ExpertMover` runs a rebalance's copies on a thread of its own while the rank serves steps:
its targets are slots no table lists, so no step reads them; the controller switches the
tables once every target rank reports the batch done (`StepResult.moves_done`). A repair
cancels a batch in flight and waits for its copy in progress first (`settle`).
"""

from __future__ import annotations

import logging
import threading
import time
import warnings

import torch

from eep.errors import ConfigError
from eep.model.checkpoint import CheckpointReader
from eep.model.loader import SlotRange, load_expert
from eep.model.moe import MoELayer
from eep.runtime.expert_backup import ExpertBackup
from eep.runtime.wire import ExpertCopy
from eep.security.secret import ClusterSecret

logger = logging.getLogger(__name__)

SOURCES = ("peer", "backup", "disk")


class ExpertSlots:
    def __init__(self, layers: list[MoELayer], slots: SlotRange, held: torch.Tensor, model_path: str,
                 num_experts: int, rank: int, node_of: tuple[int, ...] | None = None,
                 backup: ExpertBackup | None = None, secret: ClusterSecret | None = None,
                 backup_addresses: tuple[str, ...] | None = None, peer_addresses: tuple[str, ...] | None = None,
                 fetch_timeout_s: float = 2.0) -> None:
        self.layers, self.slots, self.model_path, self.rank = layers, slots, model_path, rank
        self.num_layers, self.num_experts = len(layers), num_experts
        self.held = held.clone()  # [L, P] the expert whose weights each slot holds (this rank's slots)
        self.lock = threading.Lock()  # held and the slots' weights change together, under it
        self.node_of, self.backup, self.secret = node_of, backup, secret
        self.backup_addresses, self.peer_addresses = backup_addresses, peer_addresses
        self.fetch_timeout_s = fetch_timeout_s
        w13, w2 = layers[0].w13[0], layers[0].w2[0]
        self.row_numel = w13.numel() + w2.numel()
        self.dtype = w13.dtype

    # -- serving peers (eep.runtime.backup_server.RowSource) -------------------------------------
    def keeps(self, layer: int, expert: int) -> bool:
        return self._slot_of(layer, expert) is not None

    def raw(self, layer: int, expert: int) -> bytes | None:
        """The expert's row (w13 then w2) from a slot of this rank holding it; None if none does."""
        with self.lock:
            slot = self._slot_of(layer, expert)
            if slot is None:
                return None
            local = slot - self.slots.offset
            row = torch.cat([self.layers[layer].w13[local].reshape(-1), self.layers[layer].w2[local].reshape(-1)])
            return row.cpu().view(torch.uint8).numpy().tobytes()

    def _slot_of(self, layer: int, expert: int) -> int | None:
        if not (0 <= layer < self.num_layers and 0 <= expert < self.num_experts):
            return None
        mine = self.held[layer, self.slots.offset:self.slots.offset + self.slots.count]
        hits = torch.nonzero(mine == expert).flatten()
        return int(hits[0]) + self.slots.offset if hits.numel() else None

    # -- copies ----------------------------------------------------------------------------------
    def check(self, copies: list[ExpertCopy], listed: torch.Tensor) -> None:
        """ConfigError unless every copy names one of this rank's slots that `listed` (the slot map
        of the tables in use) does not list for another expert, an expert of the model and a known
        source."""
        for c in copies:
            if not 0 <= c.slot - self.slots.offset < self.slots.count:
                raise ConfigError(f"slot {c.slot} is not on rank {self.rank}")
            if not (0 <= c.layer < self.num_layers and 0 <= c.expert < self.num_experts):
                raise ConfigError(f"layer {c.layer} expert {c.expert} does not exist in this model")
            if c.source not in SOURCES:
                raise ConfigError(f"unknown expert source {c.source!r}")
            if c.source == "peer" and (c.source_rank is None or self.peer_addresses is None
                                       or not 0 <= c.source_rank < len(self.peer_addresses)):
                raise ConfigError(f"a peer copy from rank {c.source_rank}, whose address this rank does not know")
            if int(listed[c.layer, c.slot]) not in (-1, c.expert):
                raise ConfigError(f"layer {c.layer} slot {c.slot} is in use by expert {int(listed[c.layer, c.slot])}")

    def copy(self, copies: list[ExpertCopy], cancel: threading.Event | None = None) -> list[float]:
        """Write each copy's expert into its slot (checked with `check` first); returns each
        copy's seconds. With `cancel` set, the copies not yet begun are left out."""
        fetched = self._fetch_remote(copies, cancel)
        reader = None
        times = []
        try:
            for c in copies:
                if cancel is not None and cancel.is_set():
                    break
                start = time.perf_counter()
                got = fetched.get((c.source, c.layer, c.expert))
                if got is not None:
                    start -= got[1]
                with self.lock:
                    self.held[c.layer, c.slot] = -1  # unknown until written whole
                    local = c.slot - self.slots.offset
                    w13, w2 = self.layers[c.layer].w13[local], self.layers[c.layer].w2[local]
                    if got is not None:
                        w13.copy_(got[0][: w13.numel()].view_as(w13))
                        w2.copy_(got[0][w13.numel():].view_as(w2))
                    elif c.source == "backup" and self._local(c) and self.backup is not None \
                            and self.backup.keeps(c.layer, c.expert):
                        src13, src2 = self.backup.get(c.layer, c.expert)
                        w13.copy_(src13)
                        w2.copy_(src2)
                    else:  # the disk; also a source that did not answer or does not keep the expert
                        if reader is None:
                            reader = CheckpointReader(self.model_path)
                        load_expert(w13, w2, reader, c.layer, c.expert)
                    self.held[c.layer, c.slot] = c.expert
                times.append(time.perf_counter() - start)
        finally:
            if reader is not None:
                reader.close()
        return times

    def _local(self, c: ExpertCopy) -> bool:
        return c.source_host is None or c.source_host == (self.node_of[self.rank] if self.node_of else 0)

    def _fetch_remote(self, copies: list[ExpertCopy], cancel: threading.Event | None = None
                      ) -> dict[tuple[str, int, int], tuple[torch.Tensor, float]]:
        """The experts of `copies` to be read from another host's backup or a peer rank, one
        request per source: (source, layer, expert) -> (the row as a flat tensor of the model's
        dtype, its share of the fetch's seconds). A source that does not answer in time, or no
        longer keeps what was asked, is left out (its copies read the disk), logged."""
        asked: dict[tuple[str, int], list[tuple[int, int]]] = {}
        for c in copies:
            if c.source == "backup" and not self._local(c):
                asked.setdefault(("backup", c.source_host), []).append((c.layer, c.expert))  # type: ignore[arg-type]
            elif c.source == "peer":
                asked.setdefault(("peer", c.source_rank), []).append((c.layer, c.expert))  # type: ignore[arg-type]
        out: dict[tuple[str, int, int], tuple[torch.Tensor, float]] = {}
        if not asked:
            return out
        addresses = {"backup": self.backup_addresses, "peer": self.peer_addresses}
        if self.secret is None or any(addresses[kind] is None for kind, _ in asked):
            raise ConfigError(f"rank {self.rank} was told to copy from another host's backup or a peer but knows no "
                              f"address or no cluster secret")
        from eep.runtime.backup_server import BackupUnavailable, fetch_rows
        from eep.security.curve import CurveKeys

        keys = CurveKeys.from_secret(self.secret)
        for (kind, ident), pairs in asked.items():
            if cancel is not None and cancel.is_set():
                break
            pairs = sorted(set(pairs))
            start = time.perf_counter()
            try:
                rows = fetch_rows(addresses[kind][ident], pairs, self.fetch_timeout_s, keys,  # type: ignore[index]
                                  self.row_numel * self.dtype.itemsize, cancel)
            except BackupUnavailable as e:
                logger.warning("rank %d: %s; reading %d experts from the disk instead", self.rank, e, len(pairs))
                continue
            seconds = time.perf_counter() - start
            logger.debug("rank %d: %d experts from %s %d in %.1f ms", self.rank, len(pairs),
                        "host" if kind == "backup" else "rank", ident, seconds * 1e3)
            for pair, row in zip(pairs, rows):
                with warnings.catch_warnings():  # a received frame is read-only; it is only read
                    warnings.simplefilter("ignore", UserWarning)
                    flat = torch.frombuffer(row, dtype=self.dtype)
                out[(kind, *pair)] = (flat, seconds / len(pairs))
        return out


class ExpertMover:
    """A rebalance's copies on a thread of their own (see the module docstring)."""

    def __init__(self, slots: ExpertSlots) -> None:
        self.slots = slots
        self.done = 0  # the last batch finished (0: none)
        self.failed = ""  # why that batch did not finish ("" : it did)
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, batch: int, copies: list[ExpertCopy]) -> None:
        self.settle()
        self._cancel.clear()
        self._thread = threading.Thread(target=self._run, args=(batch, copies), name="eep-mover", daemon=True)
        self._thread.start()

    def _run(self, batch: int, copies: list[ExpertCopy]) -> None:
        why = ""
        try:
            start = time.perf_counter()
            done = len(self.slots.copy(copies, self._cancel))
            if done < len(copies):
                why = f"cancelled after {done} of {len(copies)} copies"
            logger.info("rank %d: moves %d: %d experts in %.1f ms%s", self.slots.rank, batch, done,
                        (time.perf_counter() - start) * 1e3, f" ({why})" if why else "")
        except Exception as e:  # noqa: BLE001 (reported to the controller, which gives the batch up)
            why = f"{e.__class__.__name__}: {e}"
            logger.warning("rank %d: moves %d failed: %s", self.slots.rank, batch, why)
        self.failed, self.done = why, batch

    def cancel(self) -> None:
        """Leave out the copies of the batch in flight not yet begun (without waiting)."""
        self._cancel.set()

    def settle(self, timeout_s: float = 30.0) -> None:
        """Cancel a batch in flight and wait for its copy in progress."""
        thread = self._thread
        if thread is None:
            return
        self._cancel.set()
        thread.join(timeout_s)
        if thread.is_alive():
            raise ConfigError(f"rank {self.slots.rank}: a move did not end within {timeout_s:g} s")
        self._thread = None
