"""``UploaderCallback`` for PyTorch Lightning: upload every checkpoint the Trainer saves.

::

    import lightning.pytorch as pl          # or: import pytorch_lightning as pl
    from uploader.integrations.lightning import UploaderCallback

    trainer = pl.Trainer(max_epochs=10, callbacks=[
        pl.callbacks.ModelCheckpoint(dirpath="runs/exp1", save_last=True),
        UploaderCallback("s3://my-checkpoints/exp1", keep_local=3),
    ])
    trainer.fit(model)          # returns once every checkpoint is verified in the bucket

At ``on_fit_start`` the callback starts the worker process (``python -m uploader
watch``, :class:`uploader.launch.worker.UploadWorker`) on the directory the Trainer
checkpoints into: the ``ModelCheckpoint``'s ``dirpath``, else ``default_root_dir``.
Where all ranks share that directory (the usual case: Lightning broadcasts rank 0's
``dirpath``), one worker runs per node, on local rank 0, uploading as rank
``node_rank``; where each rank has its own directory, each rank runs one, as its
global rank. Objects are named ``{prefix}/rank_{r}/{path in the directory}``.

While training runs, the batch-end, epoch-end and checkpoint hooks check the worker
(rate limited, see :meth:`UploadWorker.check`) and raise :class:`uploader.WorkerError`
once an upload failed for good. ``on_fit_end`` drains it with a progress bar and
raises unless every checkpoint was verified; ``on_exception`` drains it and lets the
training error propagate. If training is SIGKILLed, the worker uploads what is
complete on disk and exits by itself.

Bad input fails before the first step: a bad URI when the callback is built; an unset
credential variable, or a Trainer without checkpointing
(``enable_checkpointing=False``), at ``on_fit_start``, with :class:`uploader.ConfigError`.

Works with ``lightning.pytorch`` and ``pytorch_lightning``: the class is built when it
is first looked up, on the ``Callback`` of each package that is installed (an instance
is a ``Callback`` of both). Importing this module imports neither.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from uploader.errors import ConfigError
from uploader.integrations.base import SlotCallback, lazy_callback

if TYPE_CHECKING:
    pass

__all__ = ["UploaderCallback", "callback_bases"]

log = logging.getLogger("uploader.integrations.lightning")

#: The packages whose ``Callback`` the class derives from, when importable.
PACKAGES = ("lightning.pytorch", "pytorch_lightning")


def callback_bases() -> tuple[type, ...]:
    """``Callback`` of every Lightning package installed (ImportError when none is)."""
    bases: list[type] = []
    for name in PACKAGES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if module.Callback not in bases:
            bases.append(module.Callback)
    if not bases:
        raise ImportError(
            "uploader.integrations.lightning needs PyTorch Lightning: "
            "pip install lightning (or pytorch-lightning)"
        )
    return tuple(bases)


class _LightningUploader(SlotCallback):
    """The callback's behaviour; :func:`_build` adds the Lightning ``Callback`` bases."""

    # -- hooks ----------------------------------------------------------------------------
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        ckpt = trainer.checkpoint_callback
        if ckpt is None:
            raise ConfigError(
                "UploaderCallback has nothing to upload: this Trainer saves no checkpoints "
                "(enable_checkpointing=False). Turn checkpointing on, e.g. "
                "Trainer(enable_checkpointing=True, callbacks=[ModelCheckpoint(dirpath=...), "
                "UploaderCallback(...)])"
            )
        self.slot.check_environment()  # every rank: all fail alike, before training
        where = getattr(ckpt, "dirpath", None) or trainer.default_root_dir
        run_dir = where if "://" in str(where) else str(Path(where).absolute())
        world_size = int(trainer.world_size)
        shared = True
        if world_size > 1:
            shared = trainer.strategy.broadcast(run_dir, src=0) == run_dir
        if shared:
            if int(trainer.local_rank) != 0:
                self.slot.worker = None
                return
            rank = int(trainer.node_rank)
        else:
            rank = int(trainer.global_rank)
        self.slot.start(run_dir, rank, world_size=world_size)
        for other in getattr(trainer, "checkpoint_callbacks", [])[1:]:
            other_dir = getattr(other, "dirpath", None)
            if other_dir and Path(run_dir) not in (
                Path(other_dir).absolute(),
                *Path(other_dir).absolute().parents,
            ):
                log.warning(
                    "a second ModelCheckpoint saves into %s, outside %s, the directory "
                    "uploaded; its checkpoints are not uploaded: give every ModelCheckpoint "
                    "a dirpath inside that directory",
                    other_dir,
                    run_dir,
                )

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.slot.check()

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.slot.check()

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        self.slot.check()

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        self.slot.check()

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        """Drain: wait until every checkpoint is verified in the store, else raise."""
        self.slot.drain()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Upload the checkpoints saved so far; Lightning then re-raises ``exception``."""
        self.slot.drain_after(exception)


_DOC = (
    "Upload the checkpoints a Lightning Trainer saves, from a separate worker process.\n\n"
    "Args:\n"
    "    to: a store URI (``s3://bucket/prefix``, ``file:///data/bucket``...) or an\n"
    "        :class:`uploader.ObjectStoreHparams`.\n"
    "    prefix: object name prefix after the URI's own.\n"
    "    progress_bar: show a progress bar while ``on_fit_end`` drains.\n"
    "    **worker_options: :class:`uploader.launch.options.WorkerOptions` (``keep_local``,\n"
    "        ``drain_timeout``, ``state_dir``, ``create_container``, ``env``...).\n\n"
    "See :mod:`uploader.integrations.lightning`."
)


if TYPE_CHECKING:
    # For type checkers; at run time the module's __getattr__ builds the class.
    UploaderCallback = _LightningUploader


__getattr__ = lazy_callback(__name__, _LightningUploader, callback_bases, _DOC)
