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
