"""The exceptions eep raises on bad input, each with a message that says what to do."""

from __future__ import annotations


class EepError(Exception):
    """Base class of every error eep raises on purpose."""


class CheckpointError(EepError):
    """A checkpoint directory cannot be used as it is."""


class CheckpointFileMissing(CheckpointError):
    """A file the checkpoint needs (config.json, a shard, the index) is not there."""


class CheckpointCorrupt(CheckpointError):
    """A checkpoint file exists but cannot be parsed (bad header, truncated data, bad JSON)."""


class TensorMismatch(CheckpointError):
    """A tensor is missing from the checkpoint or has another shape or dtype than the config implies."""


class UnsupportedModel(CheckpointError):
    """The checkpoint's `model_type` or one of its options is not implemented by eep."""


class ConfigError(EepError):
    """A configuration value (CLI flag, engine setting) is invalid."""


class RequestError(EepError):
    """A generation request is invalid (empty prompt, too long, bad sampling parameters)."""


class MembershipError(EepError):
    """A membership transition is not allowed (e.g. activating a rank that is not joining)."""


class DataPlaneError(EepError):
    """The data plane cannot complete an exchange; the step must be aborted, never half-used."""


class SegmentError(DataPlaneError):
    """A shared-memory segment is missing, has another layout than expected, or is not eep's."""


class PayloadTooLarge(DataPlaneError):
    """A message is larger than the region it must fit in: create the segment with a larger
    `region_bytes` (the engine sizes it from max tokens per step x hidden size)."""


class PeerTimeout(DataPlaneError):
    """A peer did not send (or did not drain its receive region) within the timeout.

    `peer` is the silent rank; the caller reports it to the controller and aborts the step.
    """

    def __init__(
        self, *, peer: int, rank: int, epoch: int, step: int, waited_s: float, op: str = "recv"
    ) -> None:
        self.peer, self.rank, self.epoch, self.step, self.waited_s, self.op = (
            peer, rank, epoch, step, waited_s, op
        )
        what = "sent nothing for" if op == "recv" else "did not drain its region for"
        super().__init__(
            f"rank {peer} is silent: it {what} epoch {epoch} step {step} after {waited_s:.3f} s "
            f"(noticed by rank {rank} in {op}); report rank {peer} to the controller and abort "
            f"the step"
        )


class StaleEpoch(DataPlaneError):
    """A peer already sends in a newer epoch: this process is behind and must rejoin."""

    def __init__(self, *, rank: int, peer: int, epoch: int, seen_epoch: int) -> None:
        self.rank, self.peer, self.epoch, self.seen_epoch = rank, peer, epoch, seen_epoch
        super().__init__(
            f"rank {rank} waits in epoch {epoch} but rank {peer} already sends in epoch "
            f"{seen_epoch}: this rank is behind the membership view and must rejoin"
        )


class StepAborted(DataPlaneError):
    """The controller announced a newer epoch while this rank waited: the step is abandoned
    (nothing of it is committed) and runs again under the new view."""

    def __init__(self, *, rank: int, epoch: int, step: int, peer: int, announced: int) -> None:
        self.rank, self.epoch, self.step, self.peer, self.announced = rank, epoch, step, peer, announced
        super().__init__(
            f"rank {rank} abandons epoch {epoch} step {step} (waiting on rank {peer}): the controller "
            f"announced epoch {announced}"
        )


class OutOfStep(DataPlaneError):
    """A peer sent a later step of the same epoch than the one awaited: the ranks left lockstep."""


class RankFenced(DataPlaneError):
    """Another process has since attached as this rank (a replacement): this one must exit."""


class EngineUnavailable(EepError):
    """The engine loop no longer runs requests: it was closed, or a step failed (a rank died).

    Until failure recovery exists, restart the instance (`eep serve`) to serve again.
    """


class ServerError(EepError):
    """`eep serve` cannot serve: its socket path is taken or unsafe, or a request timed out."""


class RequestTimeout(ServerError):
    """A request did not finish within the server's request timeout; it was aborted."""


class ClientError(EepError):
    """`eep.Client` cannot talk to the server (none listening, connection lost, no reply in
    time), or the server reported an error that has no eep exception type of its own."""


class RanksFailed(EepError):
    """Ranks failed during a step; the executor has committed a new view and repaired coverage.
    Nothing of the step was committed: re-admit the dead ranks' requests and run it again."""

    def __init__(self, ranks: frozenset[int], epoch: int) -> None:
        self.ranks, self.epoch = ranks, epoch
        super().__init__(f"ranks {sorted(ranks)} failed; serving on under epoch {epoch}")


class StepRetry(EepError):
    """A step was abandoned without a membership change (a rank reported it could not finish
    it); nothing was committed, run it again."""


class RankFailed(EepError):
    """A rank process exited or stopped answering (fixed membership: the instance is lost, or
    restarted whole with fault_policy 'restart')."""

    def __init__(self, rank: int, why: str) -> None:
        self.rank = rank
        super().__init__(f"rank {rank} failed: {why}")
