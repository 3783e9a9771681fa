"""Who failed, and why: every sign that a rank or its host is gone is read here.

- a death: the rank's death notice (a robust mutex it holds, < 1 ms), its pidfd and its pipe;
  on another host the exit its agent relays, or its connection closing;
- a stopped or wedged rank: its heartbeat silent for failure_timeout_s (node 0's board, another
  host's ages as its agent reports them);
- a whole host: a silent rank whose agent is silent too fails with every rank of its host;
- a live rank silent on the data plane for timeout_s: its peers' `PeerSilent` (read by
  `eep.control.replies`).

The deadline rule (`look_s`): a reply wait is cut short so the heartbeats are looked at again
no later than when the oldest one turns failure_timeout_s old."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from eep.control.cluster import Cluster
from eep.control.config import Timeouts
from eep.control.pool import RankPool
from eep.runtime.accounting import Ledger

logger = logging.getLogger(__name__)


class FailureDetector:
    def __init__(self, cluster: Cluster, pool: RankPool, timeouts: Timeouts, ledger: Ledger) -> None:
        self.cluster, self.pool, self.timeouts, self.ledger = cluster, pool, timeouts, ledger

    @property
    def heartbeats(self) -> bool:
        return self.cluster.heartbeats

    def age_s(self, rank: int) -> float:
        """Seconds since `rank`'s last heartbeat (an upper bound for a rank on another host)."""
        p = self.pool.process(rank)
        if p is not None and p.remote:
            return p.proc.link.age_s(rank)  # type: ignore[union-attr]
        return self.cluster.local.age_s(rank)

    def look_s(self, ranks: Iterable[int]) -> float:
        """How long to wait for messages before the heartbeats of `ranks` are looked at again:
        failure_timeout_s / 20, or until the oldest beat turns failure_timeout_s old if that is
        sooner, so a stopped rank is failed right at failure_timeout_s after its last beat
        (each look is one read of the board)."""
        ranks = list(ranks)
        check_s = self.timeouts.look_s
        if not self.heartbeats or not ranks:
            return check_s
        with self.ledger.charge("heartbeat_looks"):
            due_s = self.timeouts.failure_s - max(self.age_s(r) for r in ranks)
            return max(0.001, min(check_s, due_s + 0.001))

    def silent(self, ranks: Iterable[int]) -> dict[int, str]:
        """Ranks whose heartbeat has been silent for failure_timeout_s (stopped, hung), and every
        rank among `ranks` of a host that is silent as a whole; each with its reason."""
        ranks = set(ranks)
        if not self.heartbeats or not ranks:
            return {}
        with self.ledger.charge("heartbeat_looks"):
            silent = {r for r in ranks if self.age_s(r) > self.timeouts.failure_s}
            silent |= self._with_silent_hosts(silent, ranks)
        return {r: f"no heartbeat for {self.age_s(r):.2f} s" for r in sorted(silent)}

    def _with_silent_hosts(self, silent: set[int], ranks: set[int]) -> set[int]:
        """A silent remote rank whose agent is silent too: its whole host is gone (or cut off),
        and every rank of it among `ranks` fails with it, in one view change."""
        node_of = self.cluster.ep.node_of
        more: set[int] = set()
        for r in silent:
            p = self.pool.process(r)
            if p is not None and p.remote and p.proc.link.silent_s() > self.timeouts.host_silent_s:  # type: ignore[union-attr]
                more |= {q for q in ranks if node_of(q) == node_of(r)}
        return more - silent

    def gone_now(self, ranks: Iterable[int]) -> dict[int, str]:
        """Without waiting: the ranks among `ranks` that died (death notice, pidfd) or whose
        heartbeat is silent, each with its reason (while paused no step would notice them)."""
        gone = {r: p.exit_reason() for r, p, ready in self.pool.wait_any(ranks, 0) if p.exited(ready)}
        gone.update(self.silent(set(ranks) - set(gone)))
        return gone
