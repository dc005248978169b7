"""ckpt-uploader, the uploader side: move checkpoint files to object stores, verified.

This package never imports torch or ``ckpt``: the sidecar starts fast and runs
on hosts where the training environment is not importable.
"""

from __future__ import annotations

from .callback import RunDirectoryUploader
from .digest import Digest
from .errors import (
    AuthError,
    ConfigError,
    ContainerNotFoundError,
    IntegrityError,
    ObjectNotFoundError,
    PermanentError,
    TransientError,
    UploaderError,
)
from .hparams import ObjectStoreHparams, StoreLocation, parse_uri
from .retry import RetryPolicy
from .sidecar import Sidecar
from .store import ObjectStat, ObjectStore, UploadResult
from .worker import WorkerError

__all__ = [
    "ObjectStoreHparams",
    "ObjectStore",
    "ObjectStat",
    "UploadResult",
    "StoreLocation",
    "parse_uri",
    "RetryPolicy",
    "Digest",
    "UploaderError",
    "ConfigError",
    "TransientError",
    "PermanentError",
    "AuthError",
    "ContainerNotFoundError",
    "ObjectNotFoundError",
    "IntegrityError",
    "RunDirectoryUploader",
    "Sidecar",
    "WorkerError",
]

__version__ = "0.1.0"
