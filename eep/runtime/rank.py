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
from collections.abc import Callable

import torch

from eep.dataplane.dispatch import EPDispatcher
from eep.engine.worker import ModelWorker, SeqWork
from eep.errors import ConfigError, DataPlaneError, PeerTimeout, RankFenced
from eep.model.expert_load import ExpertLoadCounter
from eep.model.loader import load_model
from eep.placement.routing import Placement, check_tables_only
from eep.runtime import wire
from eep.runtime.death_notice import HeldNotice
from eep.runtime.expert_backup import ExpertBackup
from eep.runtime.heartbeat import Heartbeat
from eep.runtime.slots import ExpertMover, ExpertSlots
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
        # the router's choices of this rank's own tokens, per (layer, expert): the instance's load is their sum
        self.load = ExpertLoadCounter(len(model.moe_layers()), model.cfg.num_experts,
                                      max(1, spec.max_num_seqs) * model.cfg.top_k * 64, device=model.embed.device)
        self.load.enabled = spec.count_expert_load
        for layer in model.moe_layers():
            layer.load = self.load
        self._view: tuple[int, tuple[int, ...]] = (0, tuple(range(spec.num_ranks)))
        self.backup: ExpertBackup | None = None
        if spec.backup is not None:  # attached and its pages mapped now, not inside a repair's pause
            self.backup = ExpertBackup.attach(spec.backup, model.cfg, model.dtype)
            self.backup.prefault()
        self.slots = ExpertSlots(model.moe_layers(), spec.slots, held, spec.model_path, model.cfg.num_experts,
                                 spec.rank, spec.node_of, self.backup, secret, spec.backup_addresses,
                                 spec.peer_addresses, spec.backup_timeout_s)
        self.mover = ExpertMover(self.slots)
        self.peer_server = None  # this rank's slots served to its peers (a rebalance's peer source)
        if spec.peer_addresses is not None and secret is not None:
            from eep.runtime.backup_server import RowServer

            self.peer_server = RowServer(self.slots, spec.peer_addresses[spec.rank], secret, f"rank{spec.rank}-experts")

    def close(self) -> None:
        """The process is ending: moves in flight are dropped (their slots are no table's)."""
        self.mover.cancel()
        if self.peer_server is not None:
            self.peer_server.close()

    def step(self, order: StepOrder) -> StepResult:
        start = time.perf_counter()
        if (order.epoch, order.active) != self._view:
            self.exchange.set_view(order.epoch, order.active)
            self._view = (order.epoch, order.active)
        work = order.work
        self.exchange_timings.clear()
        tokens = self.worker.execute(work)
        self.load.flush()
        load = self.load.take().to(torch.int32) if order.report_load else None
        expert_s = 0.0
        for layer in self.worker.model.moe_layers():
            expert_s, layer.expert_s = expert_s + layer.expert_s, 0.0
        return StepResult(tokens, time.perf_counter() - start, tuple(self.exchange_timings), time.process_time_ns(),
                          self.heartbeat.cpu_ns if self.heartbeat is not None else 0, load, expert_s, self.load.cpu_ns,
                          self.mover.done, self.mover.failed)

    def warm_up(self, num_tokens: int = 8) -> None:
        """A replacement rank's warm-up, in isolation: one forward pass through every layer and
        every local expert slot with the exchange cut off (nothing is sent to any peer), before
        it reports ready; the results and KV writes are discarded."""
        model = self.worker.model
        layers = model.moe_layers()
        saved = [layer.dispatcher.exchange for layer in layers if layer.dispatcher is not None]
        alone = _Isolated(self.spec.rank, self.spec.num_ranks)
        counting, self.load.enabled = self.load.enabled, False  # its made-up tokens are no load
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
            self.load.enabled = counting

    def routing_state(self) -> tuple[torch.Tensor, Placement]:
        """What this rank's slots hold ([L, P], -1 outside its slots) and the tables it routes by
        (a head that adopts it rebuilds its own from these)."""
        with self.slots.lock:
            held = torch.full_like(self.slots.held, -1)
            own = slice(self.spec.slots.offset, self.spec.slots.offset + self.spec.slots.count)
            held[:, own] = self.slots.held[:, own]
        t = self.worker.model.tables
        return held, Placement(t.physical_to_logical_map.clone(), t.logical_to_physical_map.clone(),
                               t.logical_replica_count.clone())

    def update_routing(self, placement: Placement) -> None:
        """Switch the routing tables in place. A slot of this rank may keep its expert or be
        emptied (-1), never be given an expert it does not hold: moving weights is not a table
        update."""
        slots = range(self.spec.slots.offset, self.spec.slots.offset + self.spec.slots.count)
        with self.slots.lock:  # against the weights loaded (only the slot map of `held` is read)
            check_tables_only(Placement(self.slots.held, placement.logical_to_physical_map,
                                        placement.logical_replica_count), placement, slots)
            self.worker.model.tables.update_(placement)

    def repair(self, interim: Placement, copies: list[ExpertCopy], placement: Placement) -> list[float]:
        """A repair's whole share of this rank in one message (no step runs meanwhile): unlist
        the copies' targets (`interim`), write the copies, switch to `placement`. Returns each
        copy's seconds. A rebalance's moves in flight are cancelled first: a repair may write
        where they were writing."""
        self.mover.settle()
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
        self.slots.check(copies, self.worker.model.tables.physical_to_logical_map)
        return self.slots.copy(copies)

    def move(self, batch: int, copies: list[ExpertCopy]) -> None:
        """Start writing a rebalance's `copies` on the mover's thread (checked first)."""
        self.slots.check(copies, self.worker.model.tables.physical_to_logical_map)
        self.mover.start(batch, copies)

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
              secret: ClusterSecret | None = None, pipe: socket.socket | None = None) -> None:
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
    state = None
    try:
        state = RankWorker(spec, heartbeat, secret)
        _serve(spec, conn, state, gone, pipe)
    except ProtocolError as e:  # the control connection cannot be trusted any more: leave it
        logger.warning("rank %d: %s; exiting as fenced", spec.rank, e)
        raise SystemExit(EXIT_FENCED) from None
    except (BrokenPipeError, ConnectionResetError):  # the controller dropped this process: fenced
        logger.warning("rank %d: the controller closed the pipe; exiting as fenced", spec.rank)
        raise SystemExit(EXIT_FENCED) from None
    finally:
        if state is not None:
            state.close()
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


def _serve(spec: RankSpec, conn: Channel, state: RankWorker, gone: Callable[[], bool],
           pipe: socket.socket | None = None) -> None:
    """Answer the controller on `conn` until told to stop. `pipe` (a rank on another host): the
    socketpair its agent started it with, on which a head that took over hands this running
    rank a new control connection (`Handover`); while it has none (the old head's connection
    broke), the rank waits there for one, its weights, KV cache and data plane kept."""
    warmup_s = None
    if spec.held is not None:  # a replacement: warm up before the controller switches it in
        start = time.perf_counter()
        state.warm_up()
        warmup_s = time.perf_counter() - start
    gc.collect()
    gc.freeze()  # torch and the model live as long as the process: a full collection skips them
    wire.send(conn, wire.Ready(spec.epoch, os.getpid(), warmup_s))
    control: Channel | None = conn
    while True:
        waiting = [s for s in (control, pipe) if s is not None]
        ready = select.select(waiting, [], [], spec.poll_s)[0]
        if not ready:
            if gone():  # the executor (or agent) is gone: nobody will ever send a step
                return
            continue
        if pipe is not None and pipe in ready:
            taken = _adopted(spec, pipe, state)
            if taken is None:  # the agent is gone (or sent no connection): nobody can adopt this rank
                return
            if control is not None:
                control.close()
            control = taken
            continue
        assert control is not None
        try:
            msg = wire.recv(control, wire.TO_RANK)
            if not _answer(control, msg, state, spec):
                return
        except ProtocolError:  # the control connection cannot be trusted any more: leave it
            raise
        except (EOFError, OSError) as e:  # the head closed it or is gone
            if pipe is None:
                if isinstance(e, EOFError):  # the executor closed our pipe: it is gone or has replaced us
                    return
                raise
            logger.warning("rank %d: the control connection ended (%s); waiting for a head to adopt this rank",
                           spec.rank, e or "closed")
            control.close()
            control = None


def _answer(conn: Channel, msg: object, state: RankWorker, spec: RankSpec) -> bool:
    """Carry one controller message out and answer it; False: stop serving."""
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
    elif isinstance(msg, wire.MoveExperts):
        try:
            state.move(msg.batch, msg.copies)
            wire.send(conn, wire.MovesAccepted(msg.epoch, msg.batch))
        except ConfigError as e:
            wire.send(conn, wire.Refused(msg.epoch, str(e)))
    elif isinstance(msg, wire.QueryPtrs):
        wire.send(conn, wire.Ptrs(msg.epoch, state.storage_ptrs()))
    elif isinstance(msg, wire.Stop):
        return False
    elif isinstance(msg, wire.Fence):  # the view moved on without this process
        logger.warning("rank %d fenced by the controller in epoch %d: %s", spec.rank, msg.epoch, msg.reason)
        raise SystemExit(EXIT_FENCED)
    return True


def _adopted(spec: RankSpec, pipe: socket.socket, state: RankWorker) -> Channel | None:
    """The control connection a new head's agent hands over on `pipe`, told what this rank holds
    and routes by (`Adopted`); None if the agent closed the pipe or sent no connection."""
    try:
        payload, fds = recv_launch(pipe, timeout_s=10.0)
        handover = wire.LAUNCH.decode(payload)
    except (EOFError, OSError):
        return None
    if not isinstance(handover, wire.Handover) or len(fds) != 1 or handover.rank != spec.rank:
        for fd in fds:
            os.close(fd)
        logger.error("rank %d: its agent handed over something that is not its connection", spec.rank)
        return None
    conn = Channel.resume(socket.socket(fileno=fds[0]), handover.session, handover.sent, handover.received,
                          client=True, peer=handover.peer)
    try:
        wire.send(conn, wire.Adopted(handover.epoch, os.getpid(), *state.routing_state()))
    except OSError as e:
        logger.warning("rank %d: the new head's connection broke at once (%s)", spec.rank, e)
        conn.close()
        return None
    logger.info("rank %d: adopted by the head at %s (epoch %d)", spec.rank, handover.peer, handover.epoch)
    return conn


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
    _log_as(launch.rank)  # `local` stays open: a head that takes over hands a new connection on it
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
    rank_main(spec, conn, supervisor, ClusterSecret(launch.secret), pipe=local)
