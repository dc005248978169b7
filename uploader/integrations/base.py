"""What the framework callbacks share: the store, the worker options, one worker handle.

:class:`WorkerSlot` holds what a callback was given (store, prefix, worker options) and
the :class:`uploader.launch.worker.UploadWorker` of the current ``fit``/``train`` call,
if this process runs one. It imports no framework; the callbacks in
:mod:`uploader.integrations.lightning` and :mod:`uploader.integrations.transformers`
decide where and on which rank a worker runs, and call :meth:`WorkerSlot.start`,
:meth:`WorkerSlot.check` and :meth:`WorkerSlot.drain` from their hooks.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from uploader.config.hparams import ObjectStoreHparams, join_key
from uploader.daemon.status import StatusReport
from uploader.errors import ConfigError, UploaderError
from uploader.launch.options import checked_worker_options, store_location, worker_environment
from uploader.launch.worker import UploadWorker

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from uploader.launch.options import WorkerOptions

__all__ = ["WorkerSlot", "SlotCallback", "lazy_callback"]

log = logging.getLogger("uploader.integrations")


class WorkerSlot:
    """The store and worker options of one callback, and its running worker (if any).

    Args:
        owner: the callback's name, for error messages.
        to: a store URI (``s3://bucket/prefix``) or :class:`ObjectStoreHparams`; a bad
            URI raises :class:`uploader.ConfigError` here, before training starts.
        prefix: object name prefix after the URI's own.
        progress_bar: show a progress bar while draining.
        worker_options: :class:`uploader.launch.options.WorkerOptions`, checked here.
    """

    def __init__(
        self,
        owner: str,
        to: ObjectStoreHparams | str,
        prefix: str,
        progress_bar: bool,
        worker_options: Mapping[str, Any],
    ) -> None:
        hp, base = store_location(
            to,
            f"{owner}(to=...) takes a store URI such as s3://bucket/prefix or an "
            "ObjectStoreHparams",
        )
        hp.validate()
        self.owner = owner
        self.hparams = hp
        self.prefix = join_key(base, prefix.strip("/"))
        self.progress_bar = progress_bar
        self.options = checked_worker_options(owner, worker_options)
        self.worker: UploadWorker | None = None
        self.final_status: StatusReport | None = None

    def __repr__(self) -> str:
        return (
            f"{self.owner}(provider={self.hparams.provider!r}, "
            f"container={self.hparams.container!r}, prefix={self.prefix!r})"
        )

    def check_environment(self) -> None:
        """Raise ConfigError now if a credential variable the store names is unset.

        Called on every rank, so that all of them fail alike before training starts
        (only some ranks start a worker, which checks again)."""
        worker_environment(self.hparams, self.options.get("env") or {})

    def start(self, run_dir: str | os.PathLike[str], rank: int, *, world_size: int) -> None:
        """Start a worker watching ``run_dir`` as ``rank``; keep a running one."""
        if self.worker is not None and self.worker.running and not self.worker.finished:
            self.worker.check()
            return
        text = os.fspath(run_dir)
        if "://" in text:
            raise ConfigError(
                f"{self.owner} watches a local directory, but checkpoints go to {text}; "
                "save checkpoints to a local directory and let the callback upload them"
            )
        options = self.options.copy()
        state_dir = options.get("state_dir")
        if state_dir is not None and world_size > 1:
            # One journal per worker, even when the user names one folder.
            options["state_dir"] = Path(state_dir) / f"rank_{rank}"
        self.final_status = None
        self.worker = UploadWorker(
            Path(text), hparams=self.hparams, prefix=self.prefix, rank=rank, **options
        ).start()

    def check(self) -> None:
        """Raise :class:`uploader.WorkerError` if the worker died or an upload failed."""
        if self.worker is not None:
            self.worker.check()

    @property
    def active(self) -> bool:
        """A worker was started and has not been drained yet."""
        w = self.worker
        return w is not None and w.proc is not None and not w.finished

    def drain(self) -> StatusReport | None:
        """Wait for every checkpoint to be verified; raise unless all were."""
        if not self.active:
            return self.final_status
        assert self.worker is not None
        self.final_status = self.worker.drain(progress=self.progress_bar)
        return self.final_status

    def drain_after(self, exc: BaseException) -> None:
        """Training failed with ``exc``: upload what was saved; log, not raise, a failure
        (the training error is the one to see)."""
        if not self.active:
            return
        log.warning(
            "training failed (%s); draining uploads of the checkpoints already saved",
            type(exc).__name__,
        )
        try:
            self.drain()
        except UploaderError as err:
            log.error("%s", err)


class SlotCallback:
    """What both framework callbacks expose: built from the store and the worker options
    (a bad URI or option fails here), and the worker of the current run.

    Args:
        to: a store URI or :class:`ObjectStoreHparams`.
        prefix: object name prefix after the URI's own.
        progress_bar: show a progress bar while the end of training drains.
        worker_options: :class:`uploader.launch.options.WorkerOptions`.
    """

    def __init__(
        self,
        to: str | ObjectStoreHparams,
        *,
        prefix: str = "",
        progress_bar: bool = True,
        **worker_options: Unpack[WorkerOptions],
    ) -> None:
        super().__init__()
        self.slot = WorkerSlot("UploaderCallback", to, prefix, progress_bar, worker_options)

    def __repr__(self) -> str:
        return repr(self.slot)

    @property
    def worker(self) -> UploadWorker | None:
        """This process's worker for the current run, or None (another rank runs it)."""
        return self.slot.worker

    @property
    def final_status(self) -> StatusReport | None:
        """The worker's last status once the end of training drained it."""
        return self.slot.final_status

    def status(self) -> StatusReport | None:
        """The worker's latest status (counts, bytes, last error), if it runs here."""
        return self.slot.worker.status() if self.slot.worker is not None else None


class lazy_callback:  # noqa: N801 (a module __getattr__, named as the function it stands for)
    """A module ``__getattr__`` that builds ``UploaderCallback`` on first lookup.

    The class is ``mixin`` plus the framework's callback ``bases()`` (imported only
    then), so importing the integration module never imports its framework."""

    def __init__(
        self, module: str, mixin: type, bases: Callable[[], tuple[type, ...]], doc: str
    ) -> None:
        self.module, self.mixin, self.bases, self.doc = module, mixin, bases, doc

    def build(self) -> type:
        """A new ``UploaderCallback`` class from the bases installed now."""
        names = {"__module__": self.module, "__qualname__": "UploaderCallback"}
        return type("UploaderCallback", (self.mixin, *self.bases()), {**names, "__doc__": self.doc})

    def __call__(self, name: str) -> Any:
        if name != "UploaderCallback":
            raise AttributeError(f"module {self.module!r} has no attribute {name!r}")
        cls = self.build()
        setattr(sys.modules[self.module], name, cls)  # built once
        return cls
