"""ckpt-uploader, the training side: a Trainer with Composer-style checkpoint arguments,
atomic asynchronous checkpoint writes, and loading from disk or object stores.

Example::

    import ckpt
    trainer = ckpt.Trainer(model=model, train_dataloader=loader, max_duration="2ep",
                           save_folder="checkpoints", save_interval="1ep",
                           save_compression="zstd")
    trainer.fit()
    weights = ckpt.load(trainer.checkpoint_saver.saved[-1])["state"]["model"]
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .callbacks import Callback
from .codecs import CODECS, EXTENSIONS, normalize_codec
from .distributed import share_from_rank_zero
from .errors import (
    CheckpointError,
    CorruptCheckpointError,
    IncompatibleStateError,
    UnsafeCheckpointError,
)
from .interval import Interval, parse_interval
from .loader import DEFAULT_CHUNK_SIZE, load, read_checkpoint
from .saver import CheckpointSaver, write_checkpoint
from .state import STATE_KEYS, Timer, snapshot
from .trainer import State, Trainer

__all__ = [
    "Trainer",
    "State",
    "Timer",
    "Callback",
    "CheckpointSaver",
    "load",
    "save",
    "read_checkpoint",
    "share_from_rank_zero",
    "Interval",
    "parse_interval",
    "CODECS",
    "EXTENSIONS",
    "STATE_KEYS",
    "DEFAULT_CHUNK_SIZE",
    "CheckpointError",
    "CorruptCheckpointError",
    "UnsafeCheckpointError",
    "IncompatibleStateError",
]

_BY_SUFFIX = {".gz": "gzip", ".bz2": "bzip2", ".xz": "lzma", ".zst": "zstd"}


def save(
    obj: Any, path: str | os.PathLike[str], compression: str | None = None, check: bool = True
) -> Path:
    """Write ``obj`` atomically with ``torch.save``; the codec defaults to the file's suffix.

    With ``check`` (default), anything that ``torch.load(..., weights_only=True)``
    would refuse raises CheckpointError naming where it is, and nothing is written.
    """
    if check:
        snapshot(obj, "obj", copy=False)
    if compression is not None:
        codec = normalize_codec(compression)
    else:
        codec = _BY_SUFFIX.get(Path(path).suffix)
    return write_checkpoint(obj, path, codec)
