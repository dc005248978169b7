"""RunDirectoryUploader: a Trainer callback that uploads the run directory from a worker process.

The callback never moves bytes in the training process. At ``fit_start`` it
starts ``ckpt-uploader watch`` on this rank's run directory as a separate
process (see :mod:`uploader.launch.worker`); at each later event it checks, cheaply,
that the worker is alive and no upload failed for good; at ``fit_end`` it asks
the worker to drain, waits with a progress bar, and raises unless every
checkpoint was verified in the store. If training dies, even by SIGKILL, the
worker still uploads every checkpoint complete on disk and then exits.

The Trainer calls, when present: ``fit_start``, ``epoch_start``, ``batch_end``,
``epoch_end``, ``checkpoint_saved`` and ``fit_end``, each with the trainer (it
needs ``trainer.rank`` and ``trainer.run_directory``). Nothing here imports the
Trainer's package or torch.

Example::

    from uploader import ObjectStoreHparams, RunDirectoryUploader

    hp = ObjectStoreHparams(provider="s3", container="ckpts",
                            key_environ="AWS_ACCESS_KEY_ID",
                            secret_environ="AWS_SECRET_ACCESS_KEY")
    store_uploader = RunDirectoryUploader(hp, object_name_prefix="exp1")
    trainer = Trainer(model=model, train_dataloader=dataloader, eval_dataloader=None,
                      max_duration="90ep", save_folder="checkpoints",
                      callbacks=[store_uploader])
    trainer.fit()   # objects: exp1/rank_0/checkpoints/ep1.pt ...
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from uploader.config.hparams import ObjectStoreHparams, join_key
from uploader.daemon.status import StatusReport
from uploader.launch.options import WorkerOptions, checked_worker_options, store_location
from uploader.launch.worker import UploadWorker, WorkerError

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["RunDirectoryUploader", "WorkerError"]

log = logging.getLogger("uploader.launch.callback")


class RunDirectoryUploader:
    """Upload each rank's run directory to an object store, from a separate process.

    Args:
        hparams: the store (:class:`ObjectStoreHparams`), or a store URI such as
            ``s3://bucket/prefix`` or ``file:///data/bucket``.
        object_name_prefix: objects are named ``{prefix}/rank_{r}/{path in the run
            directory}``; a URI's own prefix comes first.
        drain_timeout: seconds ``fit_end`` waits for the last uploads; on expiry it
            raises (the journal keeps what is left). None waits as long as it takes.
        progress_bar: show a progress bar while ``fit_end`` waits.
        keep_local: keep only the newest N checkpoints on local disk, deleting
            older ones only after their upload is verified. None keeps all.
        state_dir: where the worker keeps its journal, status file and log; default: the
            run directory itself (hidden ``.ckpt-uploader.*`` files).
        create_container: create the bucket if it does not exist.
        dedup, dedup_scope: store checkpoint files as chunks shared in a scope (``--dedup``).
        log_to: ``"file"`` (``.ckpt-uploader.log`` in the state dir) or ``"stderr"``.
        check_interval: least seconds between two reads of the worker's status.
        env: extra environment variables for the worker. Credentials reach it
            through the environment (the variables that ``key_environ`` and
            ``secret_environ`` name), never through its command line.
        extra_args: further ``ckpt-uploader watch`` flags.

    Every keyword but ``progress_bar`` is one of :class:`uploader.launch.options.WorkerOptions`,
    handed to the worker unchanged (``log_format`` and ``verbosity`` too).

    Raises :class:`uploader.WorkerError` (from the event after the failure, or from
    ``fit_end``) when the worker crashed or a checkpoint could not be uploaded.
    """

    def __init__(
        self,
        hparams: ObjectStoreHparams | str,
        object_name_prefix: str | None = None,
        *,
        progress_bar: bool = True,
        **worker_options: Unpack[WorkerOptions],
    ) -> None:
        hp, base = store_location(
            hparams,
            "RunDirectoryUploader needs an ObjectStoreHparams or a store URI "
            "such as s3://bucket/prefix",
        )
        hp.validate()
        self.hparams = hp
        self.object_name_prefix = join_key(base, (object_name_prefix or "").strip("/"))
        self.progress_bar = progress_bar
        self.worker_options = checked_worker_options("RunDirectoryUploader", worker_options)
        self.worker: UploadWorker | None = None
        self.final_status: StatusReport | None = None
        self._warned_outside = False

    def __repr__(self) -> str:
        return (
            f"RunDirectoryUploader(provider={self.hparams.provider!r}, "
            f"container={self.hparams.container!r}, prefix={self.object_name_prefix!r})"
        )

    # -- events ---------------------------------------------------------------------------
    def fit_start(self, trainer: Any) -> None:
        """Start this rank's worker on ``trainer.run_directory``."""
        if self.worker is not None and self.worker.running:
            # A second fit() with the worker still up: keep using it.
            self.worker.check()
            return
        run_dir = getattr(trainer, "run_directory", None)
        if run_dir is None:
            log.warning(
                "the trainer has no run directory (no save_folder), so there is nothing to "
                "upload; set save_folder to save checkpoints and upload them"
            )
            self.worker = None
            return
        rank = int(getattr(trainer, "rank", 0) or 0)
        options = self.worker_options.copy()
        state_dir = options.get("state_dir")
        if state_dir is not None and int(getattr(trainer, "world_size", 1) or 1) > 1:
            # One journal per rank, even when the user names one folder.
            options["state_dir"] = Path(state_dir) / f"rank_{rank}"
        self.worker = UploadWorker(
            run_dir,
            hparams=self.hparams,
            prefix=self.object_name_prefix,
            rank=rank,
            **options,
        ).start()
        self.final_status = None
        self._warned_outside = False

    def epoch_start(self, trainer: Any) -> None:
        self.check()

    def batch_end(self, trainer: Any) -> None:
        self.check()

    def epoch_end(self, trainer: Any) -> None:
        self.check()

    def checkpoint_saved(self, trainer: Any, path: str | os.PathLike[str]) -> None:
        """Warn once when a checkpoint lands outside the watched run directory."""
        if self.worker is not None and not self._warned_outside:
            saved = Path(path).absolute()
            if self.worker.run_dir not in saved.parents:
                self._warned_outside = True
                log.warning(
                    "checkpoint %s is outside the run directory %s and will not be "
                    "uploaded; use a relative save_folder, or upload it with "
                    "'ckpt-uploader push'",
                    saved,
                    self.worker.run_dir,
                )
        self.check()

    def fit_end(self, trainer: Any) -> None:
        """Drain the worker: wait for every checkpoint to be verified in the store."""
        self.close()

    def on_exception(self, trainer: Any, exc: BaseException) -> None:
        """Training failed: still get the checkpoints already saved into the store.

        Drains like ``fit_end``; a drain failure is logged (the trainer re-raises the
        training error, which is the one the caller needs to see).
        """
        if self.worker is None or self.worker.proc is None or self.worker.finished:
            return
        log.warning(
            "training failed (%s); draining uploads of the checkpoints already saved",
            type(exc).__name__,
        )
        try:
            self.close()
        except Exception as drain_exc:
            log.error("%s", drain_exc)

    # -- public helpers ---------------------------------------------------------------------
    def check(self) -> None:
        """Raise :class:`WorkerError` if the worker died or an upload failed for good."""
        if self.worker is not None:
            self.worker.check()

    def close(self, timeout: float | None = None) -> StatusReport | None:
        """Drain and stop the worker (what ``fit_end`` does); safe to call twice."""
        worker = self.worker
        if worker is None or worker.proc is None or worker.finished:
            return self.final_status
        self.final_status = worker.drain(timeout=timeout, progress=self.progress_bar)
        return self.final_status

    def status(self) -> StatusReport | None:
        """The worker's latest status (counts, bytes, last error), if it has written one."""
        return self.worker.status() if self.worker is not None else None

    def state_dict(self) -> dict[str, Any]:
        return {"object_name_prefix": self.object_name_prefix}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        prefix = state.get("object_name_prefix")
        if prefix is not None and prefix != self.object_name_prefix:
            log.info(
                "resuming a run that uploaded under prefix %r; this run uploads under %r",
                prefix,
                self.object_name_prefix,
            )
