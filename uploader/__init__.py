"""ckpt-uploader, the uploader side: move checkpoint files to object stores, verified.

This package never imports torch or ``ckpt``: the sidecar starts fast and runs
on hosts where the training environment is not importable.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - the names below are imported on first use
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

#: Where each public name lives: it is imported on first use, so a command that needs
#: only the store (``ckpt-uploader pull``) does not pay for the daemon and the launcher.
_HOMES = {
    "ObjectStoreHparams": "uploader.config.hparams",
    "StoreLocation": "uploader.config.hparams",
    "parse_uri": "uploader.config.hparams",
    "AuthError": "uploader.errors",
    "ConfigError": "uploader.errors",
    "ContainerNotFoundError": "uploader.errors",
    "IntegrityError": "uploader.errors",
    "ObjectNotFoundError": "uploader.errors",
    "PermanentError": "uploader.errors",
    "TLSError": "uploader.errors",
    "TransientError": "uploader.errors",
    "UploaderError": "uploader.errors",
    "RunDirectoryUploader": "uploader.launch.callback",
    "fetch_latest": "uploader.launch.fetch",
    "Sidecar": "uploader.launch.sidecar",
    "WorkerError": "uploader.launch.worker",
    "Digest": "uploader.transfer.digest",
    "RetryPolicy": "uploader.transfer.retry",
    "ObjectStat": "uploader.transfer.store",
    "ObjectStore": "uploader.transfer.store",
    "UploadResult": "uploader.transfer.store",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'uploader' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])


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
