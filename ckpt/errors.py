"""Errors raised by the checkpoint package. Every message says what to do next."""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "CorruptCheckpointError",
    "UnsafeCheckpointError",
    "IncompatibleStateError",
]


class CheckpointError(Exception):
    """A checkpoint could not be written or read."""


class CorruptCheckpointError(CheckpointError):
    """The file is truncated, damaged, or not a checkpoint at all."""


class UnsafeCheckpointError(CheckpointError):
    """The file holds pickled objects other than tensors and plain data; it was not executed."""


class IncompatibleStateError(CheckpointError, ValueError):
    """The checkpoint's weights or optimizer state do not fit the objects given to the Trainer."""
