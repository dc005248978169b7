"""Sidecar: the worker process as a context manager, for any training loop.

Lightning, Hugging Face or a hand-written loop: whatever writes checkpoints into
a directory can have them uploaded by the same worker process the Trainer
callback uses. Entering starts ``ckpt-uploader watch`` on the directory as a
separate process; leaving drains it (SIGTERM, wait with a progress bar) and
raises unless every checkpoint was verified in the store. If the training
process dies, the worker still uploads what is complete on disk, then exits.

Example::

    import uploader

    with uploader.Sidecar("out/run1", to="s3://ckpts/exp1") as sidecar:
        for epoch in range(10):
            train_one_epoch()
            save_checkpoint(f"out/run1/ep{epoch}.pt")   # write to a temp name, then rename
            sidecar.check()                               # optional: fail fast on upload errors

Under torch.distributed, give each rank its own directory; the rank defaults
to the ``RANK`` environment variable that ``torchrun`` sets.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from uploader.config.hparams import ObjectStoreHparams, join_key
from uploader.daemon.status import StatusReport
from uploader.errors import ConfigError, UploaderError
from uploader.launch.options import WorkerOptions, checked_worker_options, store_location
from uploader.launch.worker import UploadWorker

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["Sidecar"]

log = logging.getLogger("uploader.launch.sidecar")


def _env_rank() -> int:
    value = os.environ.get("RANK", "0") or "0"
    try:
        return int(value)
    except ValueError:
        raise ConfigError(
            f"RANK={value!r} in the environment is not a number; pass rank="
        ) from None


class Sidecar:
    """Run the worker process beside a block of code; drain it on the way out.

    Args:
        run_dir: the directory the training loop writes checkpoints into.
        to: the store, as a URI (``s3://bucket/prefix``, ``azure://container/prefix``,
            ``gs://bucket/prefix``, ``file:///dir``) or :class:`ObjectStoreHparams`.
        prefix: object name prefix inside the store (after the URI's own prefix).
            Objects are ``{prefix}/rank_{rank}/{path inside run_dir}``.
        rank: default: ``$RANK`` (set by torchrun), else 0.
        drain_timeout: seconds to wait for the last uploads on exit; None: no limit.
        progress_bar: show a progress bar while draining.
        keep_local: keep only the newest N checkpoints locally (deleted only after
            their upload is verified).
        state_dir: journal, status file and log; default: the
            run directory itself (hidden ``.ckpt-uploader.*`` files).
        create_container: create the bucket if it does not exist.
        dedup, dedup_scope: store checkpoint files as chunks shared in a scope (``--dedup``).
        log_to: ``"file"`` (``.ckpt-uploader.log`` in the state dir) or ``"stderr"``.
        env: extra environment variables for the worker (credentials come from
            the environment variables the store configuration names).
        extra_args: further ``ckpt-uploader watch`` flags.

    Every keyword but ``prefix``, ``rank`` and ``progress_bar`` is one of
    :class:`uploader.launch.options.WorkerOptions`, handed to the worker unchanged
    (``log_format`` and ``verbosity`` too).

    On exit after an exception in the block, the worker is still drained (the
    checkpoints written so far are worth keeping) and the block's exception
    propagates; an upload failure then is logged, not raised over it.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        to: str | ObjectStoreHparams,
        *,
        prefix: str = "",
        rank: int | None = None,
        progress_bar: bool = True,
        **worker_options: Unpack[WorkerOptions],
    ) -> None:
        hp, base = store_location(
            to,
            "Sidecar(to=...) takes a store URI such as s3://bucket/prefix or an ObjectStoreHparams",
        )
        options = checked_worker_options("Sidecar", worker_options)
        self.run_dir = Path(run_dir).absolute()
        self.progress_bar = progress_bar
        self.final_status: StatusReport | None = None
        self.worker = UploadWorker(
            self.run_dir,
            hparams=hp,
            prefix=join_key(base, prefix.strip("/")),
            rank=_env_rank() if rank is None else rank,
            **options,
        )

    @property
    def pid(self) -> int | None:
        """The worker's process id once started."""
        return self.worker.pid

    def start(self) -> Sidecar:
        self.worker.start()
        return self

    def check(self) -> None:
        """Raise :class:`uploader.WorkerError` if the worker died or an upload failed."""
        self.worker.check()

    def status(self) -> StatusReport | None:
        """The worker's latest status (counts, bytes, last error)."""
        return self.worker.status()

    def stop(self, timeout: float | None = None) -> StatusReport | None:
        """Drain the worker and wait; raise unless everything was verified."""
        if self.worker.finished:
            return self.final_status
        self.final_status = self.worker.drain(timeout=timeout, progress=self.progress_bar)
        return self.final_status

    def __enter__(self) -> Sidecar:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.stop()
            return
        try:
            self.stop()
        except UploaderError as err:
            log.error("while leaving after %s: %s", exc_type.__name__, err)
