"""The Callback base class. Callbacks are duck-typed: any object with some of these methods works.

The Trainer calls, in the training thread and when present:

* ``fit_start(trainer)``, ``epoch_start(trainer)``, ``batch_end(trainer)``,
  ``epoch_end(trainer)``, ``fit_end(trainer)``;
* ``checkpoint_saved(trainer, path)`` at the first event after a checkpoint
  file is complete on disk (before that event's own method);
* ``state_dict()`` / ``load_state_dict(d)`` to keep callback state in checkpoints.

``fit_end`` comes after the last checkpoint write is on disk, so a callback that
uploads files sees every checkpoint. When ``fit()`` fails with an exception,
``on_exception(trainer, exc)`` is called instead of ``fit_end`` (after pending
checkpoint writes finished); errors a callback raises there are logged, and
the training error is the one that propagates.

Example::

    class PrintLoss(ckpt.Callback):
        def batch_end(self, trainer):
            print(trainer.timer.batch, trainer.last_loss)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["Callback", "dispatch", "dispatch_exception"]

log = logging.getLogger(__name__)


class Callback:
    """No-op implementations of every event; override the ones you need."""

    def fit_start(self, trainer: Any) -> None:
        pass

    def epoch_start(self, trainer: Any) -> None:
        pass

    def batch_end(self, trainer: Any) -> None:
        pass

    def epoch_end(self, trainer: Any) -> None:
        pass

    def checkpoint_saved(self, trainer: Any, path: Path) -> None:
        pass

    def fit_end(self, trainer: Any) -> None:
        pass

    def on_exception(self, trainer: Any, exc: BaseException) -> None:
        pass


def dispatch(callbacks: Sequence[Any], event: str, *args: Any) -> None:
    """Call ``event(*args)`` on every callback that has it, in order."""
    for cb in callbacks:
        fn = getattr(cb, event, None)
        if callable(fn):
            fn(*args)


def dispatch_exception(callbacks: Sequence[Any], trainer: Any, exc: BaseException) -> None:
    """Tell callbacks that ``fit()`` is failing; their own errors are logged, not raised,
    so the training error is the one the caller sees."""
    for cb in callbacks:
        fn = getattr(cb, "on_exception", None)
        if callable(fn):
            try:
                fn(trainer, exc)
            except Exception as cb_exc:
                log.error(
                    "callback %s failed while handling the training error: %s",
                    type(cb).__name__,
                    cb_exc,
                )
