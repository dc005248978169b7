"""``UploaderCallback`` for the Hugging Face Trainer: upload every ``checkpoint-N/``.

::

    from transformers import Trainer, TrainingArguments
    from uploader.integrations.transformers import UploaderCallback

    args = TrainingArguments(output_dir="runs/hf1", save_steps=500)
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[UploaderCallback("s3://my-checkpoints/hf1")])
    trainer.train()             # returns once every checkpoint is verified in the bucket

At ``on_train_begin`` the callback starts the worker process (``python -m uploader
watch``, :class:`uploader.launch.worker.UploadWorker`) on ``args.output_dir``. The
Trainer saves from the world's main process only, so that process runs the one worker
(as rank 0); with ``save_on_each_node=True`` every node's main process runs one, as
rank ``$GROUP_RANK`` (set by torchrun; else ``$NODE_RANK``, else 0). Objects are named
``{prefix}/rank_{r}/checkpoint-N/...``; a checkpoint is committed once its
``trainer_state.json`` (written last) is there and every file is verified.

``on_step_end`` and ``on_save`` check the worker (rate limited) and raise
:class:`uploader.WorkerError` once an upload failed for good; ``on_train_end`` drains
it with a progress bar and raises unless every checkpoint was verified. The Trainer
has no exception hook: if training fails or the process is SIGKILLed, the worker
notices its parent is gone, uploads what is complete on disk and exits by itself.

Bad input fails before the first step: a bad URI when the callback is built; an unset
credential variable, or ``save_strategy="no"``, at ``on_train_begin``, with
:class:`uploader.ConfigError`. Resume elsewhere with
``trainer.train(resume_from_checkpoint=uploader.fetch_latest(uri, "restore/"))``.

The class derives from ``transformers.TrainerCallback`` and is built when it is first
looked up; importing this module does not import transformers.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from uploader.errors import ConfigError
from uploader.integrations.base import SlotCallback, lazy_callback

if TYPE_CHECKING:
    pass

__all__ = ["UploaderCallback", "node_rank"]

log = logging.getLogger("uploader.integrations.transformers")


def node_rank() -> int:
    """This node's rank: ``$GROUP_RANK`` (torchrun), else ``$NODE_RANK``, else 0."""
    for var in ("GROUP_RANK", "NODE_RANK"):
        value = os.environ.get(var, "").strip()
        if value:
            try:
                return int(value)
            except ValueError:
                raise ConfigError(f"{var}={value!r} in the environment is not a number") from None
    return 0


def _value(option: Any) -> str:
    return str(getattr(option, "value", option))


class _TransformersUploader(SlotCallback):
    """The callback's behaviour; :func:`_build` adds ``transformers.TrainerCallback``."""

    # -- hooks ----------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if _value(args.save_strategy) == "no":
            raise ConfigError(
                "UploaderCallback has nothing to upload: save_strategy='no' saves no "
                "checkpoints. Set TrainingArguments(save_strategy='steps', save_steps=N) "
                "(or 'epoch')"
            )
        if not args.output_dir:
            raise ConfigError("UploaderCallback needs TrainingArguments(output_dir=...)")
        self.slot.check_environment()  # every process: all fail alike, before training
        if getattr(args, "save_on_each_node", False):
            if not state.is_local_process_zero:
                self.slot.worker = None
                return
            rank = node_rank()
        else:
            if not state.is_world_process_zero:
                self.slot.worker = None
                return
            rank = 0
        self.slot.start(args.output_dir, rank, world_size=int(getattr(args, "world_size", 1)))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.slot.check()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.slot.check()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Drain: wait until every checkpoint is verified in the store, else raise."""
        self.slot.drain()


_DOC = (
    "Upload the checkpoints a Hugging Face Trainer saves, from a separate worker process.\n\n"
    "Args:\n"
    "    to: a store URI (``s3://bucket/prefix``, ``file:///data/bucket``...) or an\n"
    "        :class:`uploader.ObjectStoreHparams`.\n"
    "    prefix: object name prefix after the URI's own.\n"
    "    progress_bar: show a progress bar while ``on_train_end`` drains.\n"
    "    **worker_options: :class:`uploader.launch.options.WorkerOptions` (``keep_local``,\n"
    "        ``drain_timeout``, ``state_dir``, ``create_container``, ``env``...).\n\n"
    "See :mod:`uploader.integrations.transformers`."
)


def _bases() -> tuple[type, ...]:
    from transformers import TrainerCallback

    return (TrainerCallback,)


if TYPE_CHECKING:
    # For type checkers; at run time the module's __getattr__ builds the class.
    UploaderCallback = _TransformersUploader


__getattr__ = lazy_callback(__name__, _TransformersUploader, _bases, _DOC)
