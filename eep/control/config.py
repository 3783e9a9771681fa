"""The expert-parallel instance's settings (`EPConfig`) and every interval derived from them
(`Timeouts`): one place says how long the controller waits for what."""

from __future__ import annotations

from dataclasses import dataclass, field

from eep.errors import ConfigError
from eep.placement.topology import Topology

BACKENDS = ("shm", "gloo")
FAULT_POLICIES = ("repair", "none", "restart")
REJOIN_POLICIES = ("manual", "auto")
UNCOVERABLE_POLICIES = ("pause", "degrade")
SECRET_HOW = ("make one with `eep secret init PATH`, copy it to every host (mode 0600) and pass it to every "
              "`eep serve` of the instance")


@dataclass(frozen=True, slots=True)
class EPConfig:
    ep_size: int = 4  # the ranks started
    # the most ranks the instance can grow to (`POST /admin/scale`): its data plane, heartbeat board,
    # tables and rank numbering are sized for this many from the start (None: ep_size)
    ep_max_size: int | None = None
    num_redundant_experts: int = 0
    backend: str = "shm"
    timeout_s: float = 30.0  # a data-plane wait this long on a live (heartbeating) peer fails it
    failure_timeout_s: float = 1.0  # heartbeat silence that confirms a stopped or hung rank
    start_timeout_s: float = 120.0  # rank start-up: import torch, load weights
    fault_policy: str | None = None  # "repair" | "none" | "restart"; default: repair on shm, none on gloo
    rejoin: str = "manual"
    on_uncoverable: str = "pause"
    num_spare_slots: int | None = None  # empty slots per rank for tier-2 repair; None: enough for one rank's experts
    expert_backup: bool = True  # keep experts in host memory (a fast tier-2 source; eep.placement.backups)
    cpu_affinity: bool = True  # pin active ranks to the cores round-robin; re-spread at every view change
    fork_server: bool = True  # fork this host's ranks from one interpreter that imported torch once
    topology: Topology = field(default_factory=Topology)
    # across hosts (eep.runtime.agent): rank r lives on node r // (num_ranks // nnodes);
    # node 0 (this process) listens on dist_init_addr for the other nodes' agents
    nnodes: int = 1
    dist_init_addr: str | None = None
    etcd_endpoints: tuple[str, ...] = ()  # the membership store (memory when empty)
    instance: str = "default"  # the store's key prefix
    head_lease_ttl_s: float = 2.0  # with etcd: the head's hold on the leader key (eep.control.leadership)
    # the cluster credential (eep.security.secret): every connection between hosts proves it
    # holds it; the data plane's CURVE keys and the etcd password derive from it
    cluster_secret_file: str | None = None
    curve_data_plane: bool = True  # the ranks' data addresses authenticate and encrypt (ZeroMQ CURVE)
    allow_unauthenticated_gloo: bool = False  # gloo across hosts: torch's TCPStore and pairs, open to anyone
    # online expert load balancing (eep.control.rebalance): the load is always counted (a window of
    # the last eplb_window_steps steps, reported every eplb_report_steps); with enable_eplb the layout
    # follows it every eplb_rebalance_num_iterations steps, or sooner past eplb_imbalance_threshold
    enable_eplb: bool = False
    eplb_window_steps: int = 1000
    eplb_rebalance_num_iterations: int = 1000
    eplb_imbalance_threshold: float = 1.10
    eplb_report_steps: int = 10
    eplb_min_window_steps: int = 100  # no rebalance on less load than this many steps' (nor than the window)

    def __post_init__(self) -> None:
        if self.fault_policy is None:
            object.__setattr__(self, "fault_policy", "repair" if self.backend == "shm" else "none")
        if self.ep_size < 1:
            raise ConfigError(f"ep_size must be >= 1, got {self.ep_size}")
        if self.ep_max_size is not None and self.ep_max_size < self.ep_size:
            raise ConfigError(f"ep_max_size ({self.ep_max_size}) must be >= ep_size ({self.ep_size})")
        if self.num_ranks > self.ep_size and self.fault_policy != "repair":
            raise ConfigError("--ep-max-size needs fault_policy 'repair': a fixed membership cannot scale")
        if self.num_redundant_experts < 0:
            raise ConfigError(f"num_redundant_experts must be >= 0, got {self.num_redundant_experts}")
        for name, value, allowed in (
            ("ep backend", self.backend, BACKENDS), ("fault policy", self.fault_policy, FAULT_POLICIES),
            ("rejoin policy", self.rejoin, REJOIN_POLICIES), ("on_uncoverable", self.on_uncoverable, UNCOVERABLE_POLICIES),
        ):
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {value!r}")
        if self.fault_policy == "repair" and self.backend != "shm":
            raise ConfigError("fault_policy 'repair' needs the shm backend; gloo's membership is fixed (use 'none')")
        if self.failure_timeout_s <= 0 or self.timeout_s <= 0 or self.head_lease_ttl_s <= 0:
            raise ConfigError("failure_timeout_s, timeout_s and head_lease_ttl_s must be > 0")
        if self.num_spare_slots is not None and self.num_spare_slots < 0:
            raise ConfigError(f"num_spare_slots must be >= 0, got {self.num_spare_slots}")
        for name in ("eplb_window_steps", "eplb_rebalance_num_iterations", "eplb_report_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.eplb_imbalance_threshold >= 1.0:
            raise ConfigError(f"eplb_imbalance_threshold must be >= 1.0 (max over mean), got {self.eplb_imbalance_threshold}")
        if self.enable_eplb and not self.elastic:
            raise ConfigError("--enable-eplb needs fault_policy 'repair' (the shm backend)")
        self._check_hosts()

    def _check_hosts(self) -> None:
        if self.nnodes < 1 or self.ep_size % self.nnodes or self.num_ranks % self.nnodes:
            raise ConfigError(f"nnodes must divide ep_size and ep_max_size: {self.ep_size} (at most "
                              f"{self.num_ranks}) ranks on {self.nnodes} nodes")
        if self.nnodes > 1 and self.dist_init_addr is None:
            raise ConfigError("more than one node needs --dist-init-addr HOST:PORT (node 0's address)")
        if self.nnodes > 1 and self.cluster_secret_file is None:
            raise ConfigError(f"an instance across hosts needs --cluster-secret-file PATH: {SECRET_HOW}")
        if self.nnodes > 1 and self.backend == "gloo" and not self.allow_unauthenticated_gloo:
            raise ConfigError("gloo across hosts is unauthenticated (torch's TCPStore and gloo's pair connections "
                              "accept anyone who reaches them): it is a benchmark baseline only; pass "
                              "--allow-unauthenticated-gloo to run it on a network you trust")

    @property
    def elastic(self) -> bool:
        return self.fault_policy == "repair"

    @property
    def num_ranks(self) -> int:
        """The ranks the instance is sized for (`ep_max_size`, or `ep_size`): ranks 0..num_ranks-1."""
        return self.ep_max_size if self.ep_max_size is not None else self.ep_size

    @property
    def initial_ranks(self) -> tuple[int, ...]:
        """The ranks started: the first ep_size / nnodes of every node's ranks (one host: 0..ep_size-1)."""
        per_node, start = self.num_ranks // self.nnodes, self.ep_size // self.nnodes
        return tuple(n * per_node + i for n in range(self.nnodes) for i in range(start))

    def node_of(self, rank: int) -> int:
        return rank // (self.num_ranks // self.nnodes)

    @property
    def timeouts(self) -> Timeouts:
        return Timeouts.of(self)


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Every interval the controller waits by, derived from the configured three
    (failure_timeout_s, timeout_s, start_timeout_s)."""

    failure_s: float  # heartbeat silence that fails a rank
    data_plane_s: float  # a data-plane wait on a live peer that fails it
    start_s: float  # a rank's start-up
    heartbeat_interval_s: float  # ranks beat this often; agents report and are pinged this often
    look_s: float  # the longest wait for replies before the heartbeats are looked at again
    step_deadline_s: float  # no step reply within this: the first rank pending fails (a bound that never fires)
    store_patience_s: float  # a view change waits this long for an unreachable membership store
    backup_fetch_s: float  # the longest wait for another host's backup (then: the disk)
    joiner_ready_s: float = 5.0  # reading a loaded joiner's Ready at a step boundary

    @classmethod
    def of(cls, ep: EPConfig) -> Timeouts:
        heartbeat = min(0.1, ep.failure_timeout_s / 5)
        return cls(
            failure_s=ep.failure_timeout_s, data_plane_s=ep.timeout_s, start_s=ep.start_timeout_s,
            heartbeat_interval_s=heartbeat, look_s=ep.failure_timeout_s / 20,
            step_deadline_s=2 * ep.timeout_s + 5.0,
            # an etcd election takes about one election timeout (1 s by default), a member's restart seconds
            store_patience_s=max(10.0, 10 * ep.failure_timeout_s),
            backup_fetch_s=max(2.0, 2 * ep.failure_timeout_s),
        )

    @property
    def host_silent_s(self) -> float:
        """An agent silent this long, with a silent rank of its host: the whole host is gone."""
        return 2 * self.heartbeat_interval_s


@dataclass(frozen=True, slots=True)
class Takeover:
    """A standby head that takes a running instance over (eep.control.takeover): its node, and
    the address it listens on for the agents (the one it puts in the leader key)."""

    node: int
    control: str
