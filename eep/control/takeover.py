"""`TakeOver`: how a standby head becomes the head of a running instance, without restarting a
healthy rank.

It runs once, in place of a first start (`EPExecutor` with a `Takeover`), after the standby
took the leader key (`Leadership`): only the key's holder may commit, so the old head can no
longer change the view it leaves behind.

1. The committed view and each rank's process (`pids`) are read from the store: the state the
   old head left, exactly.
2. The agents that followed the new head (etcd's leader key names its control address) offered
   their running ranks (`AgentHello.ranks`); every active rank of the view whose process is
   among them is adopted (`RankPool.adopt`: a new control connection, authenticated and
   introduced by its agent, handed to the running rank). Its first message (`Adopted`) says
   what its slots hold and which tables it routes by.
3. The tables in use and what each slot holds are rebuilt from those answers; every rank not
   adopted (the lost head's host's, a rank that died meanwhile) fails in one view change,
   committed from the old head's epoch (`Controller.commit`), and coverage is repaired as after
   any host's loss (`CoverageKeeper.reconcile`). A rank offered but not in the view is killed.
"""

from __future__ import annotations

import logging
import time

import torch

from eep.control.controller import Controller
from eep.control.coverage import CoverageKeeper
from eep.control.pool import RankPool
from eep.control.replies import ReplyCollector
from eep.errors import MembershipError, RankFailed
from eep.membership.view import MembershipView, RankState
from eep.runtime import wire

logger = logging.getLogger(__name__)


def view_of(record: dict[str, object]) -> MembershipView:
    """A committed record's view (`MembershipView.to_dict`'s shape)."""
    ranks = record["view"]["ranks"]  # type: ignore[index]
    return MembershipView(int(record["view"]["epoch"]),  # type: ignore[index]
                          tuple(RankState(r["state"]) for r in ranks), tuple(int(r["incarnation"]) for r in ranks))


class TakeOver:
    def __init__(self, ctl: Controller, pool: RankPool, replies: ReplyCollector, coverage: CoverageKeeper,
                 start_timeout_s: float) -> None:
        self.ctl, self.pool, self.replies, self.coverage = ctl, pool, replies, coverage
        self.start_timeout_s = start_timeout_s

    def run(self) -> None:
        t0 = time.perf_counter()
        committed = self.ctl.store.current()
        if committed is None:
            raise MembershipError("nothing to take over: the store holds no committed view")
        view = view_of(committed.record)
        pids = [int(p) for p in committed.record.get("pids", [])]  # type: ignore[union-attr]
        hosts = self.ctl.cluster.hosts
        assert hosts is not None
        offered = {r: (link.node, pid) for link in list(hosts.agents.values()) for r, pid in link.ranks.items()}
        self.pool.continue_incarnations(max(view.incarnations))
        # whatever the old head had in flight is abandoned on every rank at once (a rank blocked in
        # a step on a lost peer answers nothing, its new connection included): the epoch that
        # this take-over commits below
        self.ctl.cluster.announce(view.epoch + 1)
        adopted: list[int] = []
        for r in view.active_ranks:
            if r in offered and r < len(pids) and offered[r][1] == pids[r]:
                try:
                    self.pool.adopt(r, pids[r], view.incarnations[r], view.epoch)
                    adopted.append(r)
                except RankFailed as e:
                    logger.warning("take-over: rank %d not adopted: %s", r, e)
        answers = self.replies.collect(adopted, (wire.Adopted,), view.epoch, self.start_timeout_s, heartbeats=False)
        if not answers.replies:
            raise MembershipError(f"take-over: no rank could be adopted (offered {sorted(offered)}, active "
                                  f"{list(view.active_ranks)})")
        self._tables(answers.replies)  # type: ignore[arg-type]
        for r in answers.replies:
            self.pool.mark_ready(r, None)
        lost = set(view.active_ranks) - set(answers.replies)
        for r, (node, pid) in offered.items():  # running, but not the view's process of that rank
            if r not in answers.replies and (link := hosts.agents.get(node)) is not None:
                try:
                    link.send(wire.KillRank(view.epoch, r, pid))
                except OSError:
                    pass
        self.ctl.view = view
        self.ctl.event("taken_over", None, f"from the old head's epoch {view.epoch}; adopted {sorted(answers.replies)}")
        joining = set(view.ranks_in(RankState.JOINING))
        new = view.fail(lost | joining)
        # a new epoch in any case: whatever the old head had in flight is abandoned on every rank
        self.ctl.commit(new if new != view else view.bump(), f"took over: failed {sorted(lost | joining)}")
        self.coverage.reconcile(t0)
        logger.info("took over: adopted ranks %s in %.2f s; epoch %d", sorted(answers.replies),
                    time.perf_counter() - t0, self.ctl.view.epoch)

    def _tables(self, replies: dict[int, wire.Adopted]) -> None:
        """The tables in use and what each slot holds, from the adopted ranks' answers: their
        slots as they hold them, every other slot empty."""
        ctl = self.ctl
        held = torch.full_like(ctl.held, -1)
        for r, a in replies.items():
            own = ctl.slots_of(r)
            held[:, own] = a.held[:, own]
        first = replies[min(replies)]
        ctl.placement = first.placement
        ctl.held = held
