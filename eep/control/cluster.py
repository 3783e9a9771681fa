"""The instance's hosts as the controller reaches them: node 0's agent in this process
(`LocalHost`: segment, heartbeat board, expert backup, its ranks' starts) and, across hosts, the
other nodes' agents (`HostListener`), with every rank's data-plane and every host's backup
address. It does what is asked of a host; it decides nothing."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile

import torch

from eep.config import EngineConfig
from eep.control.config import EPConfig, Takeover, Timeouts
from eep.dataplane.shm import ShmLayout
from eep.model.config import ModelConfig
from eep.runtime import wire
from eep.runtime.hosts import AgentLink, HostError, HostListener
from eep.runtime.local_host import LocalHost, Started
from eep.runtime.wire import RankSpec
from eep.security.channel import Channel
from eep.security.secret import ClusterSecret

logger = logging.getLogger(__name__)


def data_layout(cfg: ModelConfig, dtype: torch.dtype, ep: EPConfig, max_num_batched_tokens: int) -> ShmLayout:
    """Every host's data-plane segment (global rank numbering); gloo: the agents' unused ones.
    A region carries at most one step's tokens of one rank: dispatch sends ids + weights + hidden
    row per token, combine one hidden row per (token, k) pair (not pre-summed, see
    eep.dataplane.dispatch), so up to top_k rows per token."""
    if ep.backend == "gloo":
        return ShmLayout(num_ranks=ep.num_ranks, region_bytes=64)
    hidden_bytes = cfg.hidden_size * torch.empty(0, dtype=dtype).element_size()
    row = max(cfg.top_k * 12 + hidden_bytes, cfg.top_k * hidden_bytes)
    return ShmLayout(num_ranks=ep.num_ranks, region_bytes=max_num_batched_tokens * row)


class Cluster:
    def __init__(self, config: EngineConfig, ep: EPConfig, timeouts: Timeouts, layout: ShmLayout,
                 backup_masks: dict[int, torch.Tensor] | None, secret: ClusterSecret | None,
                 takeover: Takeover | None = None) -> None:
        self.config, self.ep, self.timeouts, self.layout = config, ep, timeouts, layout
        self.backup_masks = backup_masks
        # a standby that takes over: node 0 is gone; this process (on node takeover.node, beside
        # that node's agent) listens at takeover.control and runs no rank of its own
        self.takeover = takeover
        self.secret = secret
        # the ranks' expert row servers (a rebalance's peer source) are CURVE doors like every other:
        # one host without a cluster secret makes one of its own, handed only to its ranks
        self.rank_secret = secret if ep.nnodes > 1 else ClusterSecret(os.urandom(32)) if ep.elastic else None
        self.peer_addresses: tuple[str, ...] | None = None
        self.hosts: HostListener | None = None  # the other nodes' agents (multi-host)
        self.data_addresses: tuple[str, ...] | None = None
        self.backup_addresses: tuple[str, ...] | None = None  # multi-host: each node's backup server
        self._aborts = None  # multi-host: ZeroMQ ABORTs to every rank's data address at each new epoch
        self._tmpdir: str | None = None  # gloo's file store on one host; made only for it
        self.local = LocalHost(
            ep.num_ranks, layout=layout if ep.backend == "shm" else None, heartbeats=ep.elastic,
            backup_mask=backup_masks[0] if backup_masks is not None and takeover is None else None,
            model_path=config.model_path, dtype=config.dtype, cpu_affinity=ep.cpu_affinity,
            fork_server=ep.fork_server and takeover is None, secret=self.rank_secret,
        )
        try:
            segment = self.local.segment
            self.rendezvous = segment.name if segment is not None else self._gloo_rendezvous()
            if ep.elastic and ep.nnodes == 1 and segment is not None:  # abstract Unix sockets: no file to remove
                self.peer_addresses = tuple(f"ipc://@{segment.name}-experts-{r}" for r in range(ep.num_ranks))
            if ep.nnodes > 1:
                self._join_hosts()
        except BaseException:
            self.close()
            raise

    # -- start -----------------------------------------------------------------------------
    def _gloo_rendezvous(self) -> str:
        if self.ep.nnodes > 1:  # gloo's TCP store, on node 0 after the data-plane ports
            host, port = wire.split_addr(self.ep.dist_init_addr)  # type: ignore[arg-type]
            return f"tcp://{host}:{port + 1 + self.ep.num_ranks}"
        self._tmpdir = tempfile.mkdtemp(prefix="eep-ep-")
        return f"file://{self._tmpdir}/gloo-store"

    def _join_hosts(self) -> None:
        """Multi-host start: wait for every other node's agent, set its host up, and fix each
        rank's data-plane address (`data_port_base + rank` on its node's address)."""
        from eep.dataplane.network import AbortPusher, data_address

        ep, t = self.ep, self.timeouts
        assert ep.dist_init_addr is not None and self.secret is not None
        host0, port = wire.split_addr(ep.dist_init_addr)
        setup = wire.HostSetup(
            0, self.layout, ep.num_ranks, self.config.model_path, self.config.dtype, self.backup_masks,
            t.heartbeat_interval_s, ep.failure_timeout_s, ep.etcd_endpoints, ep.instance, ep.cpu_affinity,
            ep.fork_server,
        )
        listen = self.takeover.control if self.takeover is not None else ep.dist_init_addr
        self.hosts = HostListener(listen, t.heartbeat_interval_s, setup, self.secret)  # also takes hosts back later
        if self.takeover is None:
            agents = self.hosts.wait_agents(range(1, ep.nnodes), ep.start_timeout_s)
        else:  # the agents that follow: those that come within the wait (a host lost with node 0 does not)
            agents = self.hosts.wait_agents(range(1, ep.nnodes), max(10.0, 6 * ep.failure_timeout_s), some=True)
        address = {0: host0, **{n: link.address for n, link in agents.items()}}
        # (a node that did not follow a new head keeps its old address: its ranks are lost anyway)
        address = {**{n: self._known_address(n) for n in range(ep.nnodes)}, **address}
        self.data_addresses = tuple(data_address(address[ep.node_of(r)], port + 1, r) for r in range(ep.num_ranks))
        if ep.backend == "shm":
            from eep.security.curve import CurveKeys

            keys = CurveKeys.from_secret(self.secret) if ep.curve_data_plane else None
            if keys is None:
                logger.warning("--insecure-data-plane: the ranks' data addresses take frames from anyone who reaches "
                               "them, unencrypted (the control connections stay authenticated)")
            self._aborts = AbortPusher(self.data_addresses, keys)
        if ep.elastic:
            from eep.runtime.backup_server import peer_address

            self.peer_addresses = tuple(peer_address(address[ep.node_of(r)], port, ep.num_ranks, ep.nnodes, r)
                                        for r in range(ep.num_ranks))
        if self.backup_masks is not None:
            from eep.runtime.backup_server import backup_address

            self.backup_addresses = tuple(backup_address(address.get(n, host0), port, ep.num_ranks, n)
                                          for n in range(ep.nnodes))
            if self.takeover is None:
                self.local.serve_backup(self.backup_addresses[0])
        logger.info("nodes up: %s", ", ".join(f"{n}={a}" for n, a in sorted(address.items())))

    def _known_address(self, node: int) -> str:
        """Where `node` was (its agent is not connected): node 0 at the head's address, any other
        unknown (its ranks fail; nothing is sent there)."""
        host0, _ = wire.split_addr(self.ep.dist_init_addr)  # type: ignore[arg-type]
        return host0 if node == 0 else "0.0.0.0"

    # -- ranks -----------------------------------------------------------------------------
    def spec(self, rank: int, placement: object, held: torch.Tensor | None, epoch: int) -> RankSpec:
        """What rank `rank` is started with (node 0's names; another host's agent fills its own)."""
        c, ep = self.config, self.ep
        return RankSpec(
            rank, ep.num_ranks, c.model_path, c.dtype, c.max_num_seqs, c.max_model_len, placement,  # type: ignore[arg-type]
            ep.backend, self.rendezvous, ep.timeout_s, heartbeat_interval_s=self.timeouts.heartbeat_interval_s,
            held=held, **self.local.names(),  # type: ignore[arg-type]
            data_addresses=self.data_addresses if ep.backend == "shm" else None, epoch=epoch,
            node_of=tuple(ep.node_of(r) for r in range(ep.num_ranks)) if self.data_addresses else None,
            backup_addresses=self.backup_addresses, backup_timeout_s=self.timeouts.backup_fetch_s,
            data_plane_curve=ep.curve_data_plane, peer_addresses=self.peer_addresses, count_expert_load=ep.elastic,
        )

    def start_local(self, spec: RankSpec, wait_s: float) -> Started:
        return self.local.start(spec, wait_s)

    def start_remote(self, spec: RankSpec, epoch: int) -> tuple[Channel, wire.RankConnect, AgentLink]:
        """Have `spec.rank`'s node's agent start it; it connects back to us over TCP (that
        connection is its control pipe) and is sent `spec` with its host's own names in it.
        HostError if its agent cannot, or its host came back at another address."""
        assert self.hosts is not None and self.data_addresses is not None
        node = self.ep.node_of(spec.rank)
        conn, hello = self.hosts.spawn(node, spec.rank, epoch)
        local = {k: v for k, v in hello.host_local.items() if k != "rendezvous" or self.ep.backend == "shm"}
        spec = dataclasses.replace(spec, **local)  # gloo keeps its TCP rendezvous on node 0
        link = self.hosts.agents[node]
        if f"//{link.address}:" not in self.data_addresses[spec.rank]:
            conn.close()
            raise HostError(f"node {node} came back as {link.address}, not at the address its ranks' "
                            f"data plane has ({self.data_addresses[spec.rank]})")
        try:
            wire.send(conn, spec)
        except OSError as e:
            conn.close()
            raise HostError(f"rank {spec.rank}'s connection closed before its spec was sent ({e})") from None
        return conn, hello, link

    def adopt_remote(self, rank: int, pid: int, epoch: int) -> tuple[Channel, wire.RankConnect, AgentLink]:
        """A head that took over: `rank`'s running process `pid`, with a new control connection
        its agent opened for it (HostError if it cannot)."""
        assert self.hosts is not None
        node = self.ep.node_of(rank)
        conn, hello = self.hosts.adopt(node, rank, pid, epoch, timeout_s=self.timeouts.start_s)
        return conn, hello, self.hosts.agents[node]

    # -- hosts -----------------------------------------------------------------------------
    def node_up(self, node: int) -> bool:
        """Node 0 (this process) always, unless this head took over from it (then never);
        another node while its agent is connected."""
        if node == 0:
            return self.takeover is None
        return self.hosts is not None and self.hosts.agent(node) is not None

    @property
    def heartbeats(self) -> bool:
        """Ranks beat (failure handling is on): a silent one is failed after failure_timeout_s."""
        return self.local.board is not None

    @property
    def wake_handle(self) -> int | None:
        """Across hosts: readable once an agent relayed an exit (drain with `drain_wake`)."""
        return self.hosts.wake_r if self.hosts is not None else None

    def drain_wake(self, ready: list[object]) -> None:
        if self.hosts is not None and self.hosts.wake_r in ready:
            self.hosts.drain_wake()

    def announce(self, epoch: int) -> None:
        """A new epoch is committed: every rank blocked in a step of an older one abandons it at
        once (node 0's segment, the ZeroMQ aborts to every data address), every agent announces
        it in its host's segment."""
        self.local.announce_epoch(epoch)
        if self.hosts is None:
            return
        if self._aborts is not None:
            self._aborts.abort(epoch)
        self.hosts.epoch = epoch
        for link in list(self.hosts.agents.values()):
            link.epoch = epoch
            if not link.closed:
                try:
                    link.send(wire.Announce(epoch))
                except OSError:
                    pass

    def release_all(self) -> None:
        """At close: release every rank blocked on a dead peer, so that it reads its Stop."""
        segment = self.local.segment
        if segment is not None:
            segment.announce_epoch(segment.control_epoch + 1)
            if self._aborts is not None:
                self._aborts.abort(segment.control_epoch)

    def close(self) -> None:
        self.local.close()
        if self._aborts is not None:
            self._aborts.close()
            self._aborts = None
        if self.hosts is not None:
            self.hosts.close()
            self.hosts = None
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
