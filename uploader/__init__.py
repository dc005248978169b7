"""ckpt-uploader, the uploader side: move checkpoint files to object stores, verified.

This package never imports torch or ``ckpt``: the sidecar starts fast and runs
on hosts where the training environment is not importable.
"""

from __future__ import annotations

from uploader.config.hparams import ObjectStoreHparams, StoreLocation, parse_uri
from uploader.errors import (
    AuthError,
    ConfigError,
    ContainerNotFoundError,
    IntegrityError,
    ObjectNotFoundError,
    PermanentError,
    TLSError,
    TransientError,
    UploaderError,
)
from uploader.launch.callback import RunDirectoryUploader
from uploader.launch.fetch import fetch_latest
from uploader.launch.sidecar import Sidecar
from uploader.launch.worker import WorkerError
from uploader.transfer.digest import Digest
from uploader.transfer.retry import RetryPolicy
from uploader.transfer.store import ObjectStat, ObjectStore, UploadResult

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
    "TLSError",
    "RunDirectoryUploader",
    "Sidecar",
    "WorkerError",
    "fetch_latest",
]

__version__ = "0.1.0"
