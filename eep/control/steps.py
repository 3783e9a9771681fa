"""One step on the active ranks: each is sent its share (`StepOrder`, under the view's epoch)
and the answers are gathered until every rank answered, or a failure is confirmed, or a rank
abandoned the step; an aborted step's leftover answers are drained. No membership decision is
taken here: the outcome says who failed and why."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from eep.control.config import EPConfig, Timeouts
from eep.control.pool import RankPool
from eep.control.replies import ReplyCollector
from eep.engine.worker import SeqWork
from eep.errors import DataPlaneError, RankFailed
from eep.membership.view import MembershipView
from eep.runtime import wire
from eep.runtime.wire import StepOrder, StepResult

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class StepOutcome:
    results: dict[int, StepResult] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)  # rank -> why
    unfinished: list[int] = field(default_factory=list)  # sent, neither failed nor answered: to drain
    retry: str = ""  # the step is broken without a failure (a rank abandoned it): why


class StepRunner:
    def __init__(self, ep: EPConfig, timeouts: Timeouts, pool: RankPool, replies: ReplyCollector) -> None:
        self.ep, self.timeouts, self.pool, self.replies = ep, timeouts, pool, replies

    def run(self, view: MembershipView, work: list[list[SeqWork]], report_load: bool = False) -> StepOutcome:
        """Send each active rank its work under `view`'s epoch and gather the answers (with
        `report_load`, each with its expert load since its last report). A fixed membership
        (fault_policy none) raises RankFailed or DataPlaneError at once instead."""
        out = StepOutcome()
        sent = []
        for rank in view.active_ranks:
            try:
                wire.send(self.pool[rank].conn, StepOrder(view.epoch, view.active_ranks, work[rank], report_load))
                sent.append(rank)
            except OSError as e:  # its end of the pipe is gone: the process died between steps
                out.failed[rank] = f"its pipe is closed ({e.__class__.__name__})"
        if not out.failed:  # else: no step to wait for (a fixed membership raises below)
            answers = self.replies.collect(sent, (wire.StepDone,), view.epoch, self.timeouts.step_deadline_s,
                                           heartbeats=self.ep.elastic, stop_early=True)
            out.results = {r: a.result for r, a in answers.replies.items()}  # type: ignore[attr-defined]
            out.failed.update(answers.failed)
            out.failed.update({r: f"refused the step: {why}" for r, why in answers.refused.items()})
            if answers.abandoned:
                rank = min(answers.abandoned)
                out.retry = f"rank {rank} abandoned the step: {answers.abandoned[rank]}"
        if not self.ep.elastic:
            if out.failed:
                rank = min(out.failed)
                raise RankFailed(rank, out.failed[rank])
            if out.retry:
                raise DataPlaneError(out.retry)
        out.unfinished = [r for r in sent if r not in out.failed and r not in out.results]
        return out

    def drain(self, ranks: list[int], epoch: int) -> tuple[set[int], set[int]]:
        """Read each of `ranks`' answer to an abandoned step of `epoch` (thrown away); returns
        the ranks that answered and those that failed meanwhile (or were named silent by a peer,
        or never answered within timeout_s)."""
        answers = self.replies.collect(ranks, (wire.StepDone,), epoch, self.timeouts.data_plane_s, heartbeats=True)
        failed = set(answers.failed)
        return set(ranks) - failed, failed
