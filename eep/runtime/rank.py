"""One expert-parallel rank process: attention + KV for its own requests, a share of every
MoE layer's expert slots, and a dispatch/combine exchange with its peers at every MoE layer.

The rank keeps no request state of its own beyond the KV cache: each step arrives from the
executor as a list of `SeqWork`, and the rank answers with the tokens it sampled. A rank with
no work still runs the step on zero tokens, because its peers need its (empty) messages at
every exchange.

A rank is started by its host with one end of a socketpair (`main`), on which the host sends
`Launch` (node 0: that socketpair is the control pipe) or `Handover` (another host: with it
the TCP connection to the controller its agent opened and authenticated for it). Every message
from the controller is decoded into exactly the classes `wire.TO_RANK` names.
"""

from __future__ import annotations

import faulthandler
import gc
import logging
import os
import select
import signal
import socket
import time
import warnings
from collections.abc import Callable

import torch

from eep.dataplane.dispatch import EPDispatcher
from eep.engine.worker import ModelWorker, SeqWork
from eep.errors import ConfigError, DataPlaneError, PeerTimeout, RankFenced
from eep.model.checkpoint import CheckpointReader
from eep.model.loader import load_expert, load_model
from eep.placement.routing import Placement, check_tables_only
from eep.runtime import wire
from eep.runtime.death_notice import HeldNotice
from eep.runtime.expert_backup import ExpertBackup
from eep.runtime.heartbeat import Heartbeat
from eep.runtime.wire import ExpertCopy, RankSpec, StepOrder, StepResult  # noqa: F401 (the rank's messages)
from eep.runtime.launch import recv_launch
from eep.security.channel import Channel, ProtocolError
from eep.security.secret import ClusterSecret

logger = logging.getLogger(__name__)

EXIT_FENCED = 3  # the exit code of a rank that found itself out of the view (it must rejoin)


def _exchange(spec: RankSpec, secret: ClusterSecret | None):  # type: ignore[no-untyped-def]
    if spec.backend == "gloo":
        from eep.dataplane.gloo import GlooExchange

        return GlooExchange(spec.rank, spec.num_ranks, spec.rendezvous, timeout_s=spec.timeout_s)
    from eep.dataplane.shm import Endpoint, ShmExchange, ShmSegment

    segment = ShmSegment.attach(spec.rendezvous)
    endpoint = Endpoint(segment, spec.rank, timeout_s=spec.timeout_s)
    if spec.data_addresses is None:
        return ShmExchange(endpoint, spec.num_ranks)
    from eep.dataplane.network import HybridExchange, ZmqLink

    assert spec.node_of is not None
    me = spec.node_of[spec.rank]
    keys = None
    if spec.data_plane_curve:
        if secret is None:
            raise ConfigError(f"rank {spec.rank} has data-plane peers on other hosts but no cluster secret")
        from eep.security.curve import CurveKeys

        keys = CurveKeys.from_secret(secret)
    link = ZmqLink(spec.rank, spec.data_addresses, [r for r in range(spec.num_ranks) if spec.node_of[r] != me],
                   timeout_s=spec.timeout_s, announced=lambda: segment.control_epoch, keys=keys,
                   max_message_bytes=segment.layout.region_bytes)
    return HybridExchange(endpoint, link, spec.num_ranks, spec.node_of)


class _Isolated:
    """An `Exchange` that reaches nobody: every part comes straight back, as if each peer had
    sent exactly what this rank sends it. The shapes stay consistent through dispatch and
    combine, and this rank's slots compute every part (the values are meaningless)."""

    def __init__(self, rank: int, num_ranks: int) -> None:
        self.rank, self.num_ranks = rank, num_ranks

    def all_to_all(self, send: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(send)


class RankWorker:
    """What a rank process holds between steps: its model worker and its data-plane exchange."""

    def __init__(self, spec: RankSpec, heartbeat: Heartbeat | None = None,
                 secret: ClusterSecret | None = None) -> None:
        self.spec = spec
        self.heartbeat = heartbeat
        self.secret = secret
        held = spec.held if spec.held is not None else spec.placement.physical_to_logical_map
        self.held = held.clone()  # the expert whose weights each of this rank's slots holds
        # Weights are loaded by `held` (only its slot map is read), the tables are allocated at
        # the placement's shape and set to it: `held` may hold more copies of an expert than
        # the tables list (spares after a rejoin).
        p = spec.placement
        loading = Placement(held, p.logical_to_physical_map, p.logical_replica_count)
        model = load_model(
            spec.model_path, dtype=spec.dtype, max_len=spec.max_model_len, placement=loading,
            slots=spec.slots, progress=False,
        )
        model.tables.update_(spec.placement)
        self.exchange = _exchange(spec, secret)
        self.exchange_timings: list[float] = []  # every dispatch/combine of the current step, in order
        for layer in model.moe_layers():
            layer.dispatcher = EPDispatcher(
                self.exchange, spec.slots.count, model.cfg.hidden_size, model.cfg.top_k, model.dtype,
                timings=self.exchange_timings,
            )
        self.worker = ModelWorker(model, spec.max_num_seqs, spec.max_model_len)
        self._view: tuple[int, tuple[int, ...]] = (0, tuple(range(spec.num_ranks)))
        self.backup: ExpertBackup | None = None
        if spec.backup is not None:  # attached and its pages mapped now, not inside a repair's pause
            self.backup = ExpertBackup.attach(spec.backup, model.cfg, model.dtype)
            self.backup.prefault()

    def step(self, order: StepOrder) -> StepResult:
        start = time.perf_counter()
        if (order.epoch, order.active) != self._view:
            self.exchange.set_view(order.epoch, order.active)
            self._view = (order.epoch, order.active)
        work = order.work
        self.exchange_timings.clear()
        tokens = self.worker.execute(work)
        return StepResult(tokens, time.perf_counter() - start, tuple(self.exchange_timings), time.process_time_ns(),
                          self.heartbeat.cpu_ns if self.heartbeat is not None else 0)

    def warm_up(self, num_tokens: int = 8) -> None:
        """A replacement rank's warm-up, in isolation: one forward pass through every layer and
        every local expert slot with the exchange cut off (nothing is sent to any peer), before
        it reports ready; the results and KV writes are discarded."""
        model = self.worker.model
        layers = model.moe_layers()
        saved = [layer.dispatcher.exchange for layer in layers if layer.dispatcher is not None]
        alone = _Isolated(self.spec.rank, self.spec.num_ranks)
        try:
            for layer in layers:
                if layer.dispatcher is not None:
                    layer.dispatcher.exchange = alone
            with torch.no_grad():
                self.worker.forward_logits(
                    [SeqWork(0, 0, tuple(range(3, 3 + num_tokens)), None), SeqWork(1, 0, (3,), None)]
                )
        finally:
            for layer, exchange in zip([x for x in layers if x.dispatcher is not None], saved):
                layer.dispatcher.exchange = exchange  # type: ignore[union-attr]
            self.exchange_timings.clear()

    def update_routing(self, placement: Placement) -> None:
        """Switch the routing tables in place. A slot of this rank may keep its expert or be
        emptied (-1), never be given an expert it does not hold: moving weights is not a table
        update."""
        slots = range(self.spec.slots.offset, self.spec.slots.offset + self.spec.slots.count)
        # against the weights loaded (only the slot map of `held` is read)
        check_tables_only(Placement(self.held, placement.logical_to_physical_map, placement.logical_replica_count),
                          placement, slots)
        self.worker.model.tables.update_(placement)

    def repair(self, interim: Placement, copies: list[ExpertCopy], placement: Placement) -> list[float]:
        """A repair's whole share of this rank in one message (no step runs meanwhile): unlist
        the copies' targets (`interim`), write the copies, switch to `placement`. Returns each
        copy's seconds."""
        if not copies:
            self.update_routing(placement)
            return []
        self.update_routing(interim)
        seconds = self.copy_experts(copies)
        self.update_routing(placement)
        return seconds

    def copy_experts(self, copies: list[ExpertCopy]) -> list[float]:
        """Write each copy's expert into its slot (the slot must be one of this rank's and not
        be listed in the tables in use); returns each copy's seconds."""
        spec, model = self.spec, self.worker.model
        layers = model.moe_layers()
        tables = model.tables.physical_to_logical_map
        for c in copies:
            if not 0 <= c.slot - spec.slots.offset < spec.slots.count:
                raise ConfigError(f"slot {c.slot} is not on rank {spec.rank}")
            if not (0 <= c.layer < len(layers) and 0 <= c.expert < model.cfg.num_experts):
                raise ConfigError(f"layer {c.layer} expert {c.expert} does not exist in this model")
            if c.source not in ("backup", "disk"):
                raise ConfigError(f"unknown expert source {c.source!r}")
            if int(tables[c.layer, c.slot]) not in (-1, c.expert):
                raise ConfigError(f"layer {c.layer} slot {c.slot} is in use by expert {int(tables[c.layer, c.slot])}")
        fetched = self._fetch_remote(copies)
        reader = None
        times = []
        try:
            for c in copies:
                local = c.slot - spec.slots.offset
                start = time.perf_counter()
                w13, w2 = layers[c.layer].w13[local], layers[c.layer].w2[local]
                if (c.layer, c.expert) in fetched:
                    row, fetch_s = fetched[(c.layer, c.expert)]
                    w13.copy_(row[: w13.numel()].view_as(w13))
                    w2.copy_(row[w13.numel() :].view_as(w2))
                    start -= fetch_s
                elif c.source == "backup" and self._local(c) and self.backup is not None \
                        and self.backup.keeps(c.layer, c.expert):
                    src13, src2 = self.backup.get(c.layer, c.expert)
                    w13.copy_(src13)
                    w2.copy_(src2)
                else:  # the disk; also a backup that did not answer or does not keep the expert
                    if reader is None:
                        reader = CheckpointReader(spec.model_path)
                    load_expert(w13, w2, reader, c.layer, c.expert)
                self.held[c.layer, c.slot] = c.expert
                times.append(time.perf_counter() - start)
        finally:
            if reader is not None:
                reader.close()
        return times

    def _local(self, c: ExpertCopy) -> bool:
        node_of = self.spec.node_of
        return c.source_host is None or c.source_host == (node_of[self.spec.rank] if node_of else 0)

    def _fetch_remote(self, copies: list[ExpertCopy]) -> dict[tuple[int, int], tuple[torch.Tensor, float]]:
        """The experts of `copies` to be read from another host's backup, one request per host:
        (layer, expert) -> (the row as a flat tensor of the model's dtype, its share of the
        fetch's seconds). A host that does not answer in time is left out (its copies read the
        disk), logged."""
        spec, model = self.spec, self.worker.model
        by_host: dict[int, list[tuple[int, int]]] = {}
        for c in copies:
            if c.source == "backup" and not self._local(c):
                by_host.setdefault(c.source_host, []).append((c.layer, c.expert))  # type: ignore[arg-type]
        out: dict[tuple[int, int], tuple[torch.Tensor, float]] = {}
        if not by_host:
            return out
        if spec.backup_addresses is None or self.secret is None:
            raise ConfigError(f"rank {spec.rank} was told to copy from another host's backup but knows no address "
                              f"or no cluster secret")
        from eep.runtime.backup_server import BackupUnavailable, fetch_rows
        from eep.security.curve import CurveKeys

        keys = CurveKeys.from_secret(self.secret)
        layer0 = model.moe_layers()[0]
        numel = layer0.w13[0].numel() + layer0.w2[0].numel()
        for host, pairs in by_host.items():
            pairs = sorted(set(pairs))
            start = time.perf_counter()
            try:
                rows = fetch_rows(spec.backup_addresses[host], pairs, spec.backup_timeout_s, keys,
                                  numel * model.dtype.itemsize)
            except BackupUnavailable as e:
                logger.warning("rank %d: %s; reading %d experts from the disk instead", spec.rank, e, len(pairs))
                continue
            seconds = time.perf_counter() - start
            share = seconds / len(pairs)
            logger.info("rank %d: %d experts from host %d's backup in %.1f ms", spec.rank, len(pairs), host, seconds * 1e3)
            for pair, row in zip(pairs, rows):
                with warnings.catch_warnings():  # a received frame is read-only; it is only read
                    warnings.simplefilter("ignore", UserWarning)
                    flat = torch.frombuffer(row, dtype=model.dtype)
                if flat.numel() != numel:
                    raise ConfigError(f"host {host} sent {flat.numel()} values for layer {pair[0]} expert "
                                      f"{pair[1]}, expected {numel}: another model or dtype?")
                out[pair] = (flat, share)
        return out

    def storage_ptrs(self) -> list[int]:
        """data_ptr of everything that must never be reallocated: routing tables, expert slots
        and (shm) every data-plane buffer this rank reads or writes."""
        model = self.worker.model
        ptrs = list(model.tables.data_ptrs())
        for layer in model.moe_layers():
            ptrs += [layer.w13.data_ptr(), layer.w2.data_ptr()]
        endpoint = getattr(self.exchange, "endpoint", None)
        if endpoint is not None:
            seg, me = endpoint.segment, self.spec.rank
            for peer in range(self.spec.num_ranks):
                for buf in (0, 1):
                    ptrs += [seg.payload(me, peer, buf).data_ptr(), seg.payload(peer, me, buf).data_ptr()]
        return ptrs


def rank_main(spec: RankSpec, conn: Channel, supervisor: int | None = None,
              secret: ClusterSecret | None = None) -> None:
    """Entry point of a rank process: serve steps from `conn` until told to stop, or until
    `supervisor` (the process that started it: the executor or the host's agent; default the
    parent, which a rank forked by a fork server is not) is gone. `secret`: the cluster's
    (multi-host), from which the data plane's keys derive."""
    torch.set_num_threads(1)  # N ranks share the host's cores: one thread each, no oversubscription
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` prints every thread's stack (debugging)
    _log_as(spec.rank)
    gone = _watch(supervisor if supervisor is not None else os.getppid())
    # held by this (the main) thread until the process ends: the kernel reports the death at once
    notice = HeldNotice(spec.death_notice) if spec.death_notice else None  # noqa: F841 (kept alive)
    heartbeat = Heartbeat(spec.heartbeat, spec.rank, spec.heartbeat_interval_s) if spec.heartbeat else None
    try:
        _serve(spec, conn, RankWorker(spec, heartbeat, secret), gone)
    except ProtocolError as e:  # the control connection cannot be trusted any more: leave it
        logger.warning("rank %d: %s; exiting as fenced", spec.rank, e)
        raise SystemExit(EXIT_FENCED) from None
    except (BrokenPipeError, ConnectionResetError):  # the controller dropped this process: fenced
        logger.warning("rank %d: the controller closed the pipe; exiting as fenced", spec.rank)
        raise SystemExit(EXIT_FENCED) from None
    finally:
        if heartbeat is not None:
            heartbeat.stop()


def _log_as(rank: int) -> None:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")


def _watch(pid: int) -> Callable[[], bool]:
    """A test of whether process `pid` has ended (its pidfd turned readable)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return lambda: True
    return lambda: bool(select.select([pidfd], [], [], 0)[0])


def _serve(spec: RankSpec, conn: Channel, state: RankWorker, gone: Callable[[], bool]) -> None:
    warmup_s = None
    if spec.held is not None:  # a replacement: warm up before the controller switches it in
        start = time.perf_counter()
        state.warm_up()
        warmup_s = time.perf_counter() - start
    gc.collect()
    gc.freeze()  # torch and the model live as long as the process: a full collection skips them
    wire.send(conn, wire.Ready(spec.epoch, os.getpid(), warmup_s))
    while True:
        if not conn.poll(spec.poll_s):
            if gone():  # the executor (or agent) is gone: nobody will ever send a step
                return
            continue
        try:
            msg = wire.recv(conn, wire.TO_RANK)
        except EOFError:  # the executor closed our pipe: it is gone or has replaced us
            return
        if isinstance(msg, StepOrder):
            try:
                wire.send(conn, wire.StepDone(msg.epoch, state.step(msg)))
            except PeerTimeout as e:  # a silent peer: report it; the executor decides what follows
                logger.warning("step aborted: %s", e)
                wire.send(conn, wire.PeerSilent(msg.epoch, e.peer))
            except RankFenced as e:  # a newer view or process excludes this one: it must go
                logger.warning("fenced: %s", e)
                raise SystemExit(EXIT_FENCED) from None
            except DataPlaneError as e:  # aborted by the controller, or out of step: nothing committed
                logger.warning("step aborted: %s", e)
                wire.send(conn, wire.StepAbandoned(msg.epoch, str(e)))
        elif isinstance(msg, wire.SetRouting):
            try:
                state.update_routing(msg.placement)
                wire.send(conn, wire.RoutingSet(msg.epoch))
            except ConfigError as e:
                wire.send(conn, wire.Refused(msg.epoch, str(e)))
        elif isinstance(msg, wire.Repair):
            try:
                wire.send(conn, wire.Repaired(msg.epoch, state.repair(msg.interim, msg.copies, msg.placement)))
            except ConfigError as e:
                wire.send(conn, wire.Refused(msg.epoch, str(e)))
        elif isinstance(msg, wire.QueryPtrs):
            wire.send(conn, wire.Ptrs(msg.epoch, state.storage_ptrs()))
        elif isinstance(msg, wire.Stop):
            return
        elif isinstance(msg, wire.Fence):  # the view moved on without this process
            logger.warning("rank %d fenced by the controller in epoch %d: %s", spec.rank, msg.epoch, msg.reason)
            raise SystemExit(EXIT_FENCED)


def main(argv: list[str], supervisor: int | None = None) -> None:
    """`python -m eep.runtime FD`: FD is this rank's end of the socketpair its host started it
    with (also what a fork server's child runs, with the host as `supervisor`). The host's first
    message says where the controller is: `Launch` (this socketpair) or `Handover` (a TCP
    connection to it, authenticated by the agent, that comes with the message)."""
    local = socket.socket(fileno=int(argv[1]))
    try:
        payload, fds = recv_launch(local, timeout_s=60.0)
        launch = wire.LAUNCH.decode(payload)
    except (EOFError, OSError):  # its host closed the pipe before handing it a rank
        return
    if isinstance(launch, wire.Launch):
        secret = ClusterSecret(launch.secret) if launch.secret is not None else None
        rank_main(launch.spec, Channel(local), supervisor, secret)
        return
    local.close()
    _log_as(launch.rank)
    if len(fds) != 1:
        logger.error("rank %d: the agent's handover came without its connection", launch.rank)
        raise SystemExit(1)
    conn = Channel.resume(socket.socket(fileno=fds[0]), launch.session, launch.sent, launch.received, client=True,
                          peer=launch.peer)
    try:
        spec = wire.recv(conn, wire.RANK_SPEC, timeout_s=30.0)
    except (EOFError, OSError) as e:
        logger.error("rank %d: no spec from the controller at %s: %s", launch.rank, launch.peer, e or "closed")
        raise SystemExit(1) from None
    rank_main(spec, conn, supervisor, ClusterSecret(launch.secret))
