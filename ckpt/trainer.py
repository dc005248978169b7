"""Trainer: a small, real training loop with Composer-style checkpoint arguments.

Example::

    from ckpt import Trainer

    trainer = Trainer(
        model=model,                      # forward(batch) returns the scalar loss
        train_dataloader=loader,
        max_duration="10ep",              # or "5000ba"
        optimizers=torch.optim.Adam(model.parameters()),
        save_folder="checkpoints",        # -> ./runs/<timestamp>/rank_0/checkpoints
        save_interval="1ep",
        save_compression="zstd",
    )
    trainer.fit()

    # resume exactly where a checkpoint left off
    Trainer(..., load_path_format="runs/<timestamp>/rank_{rank}/checkpoints/ep3.pt.zst").fit()
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .callbacks import dispatch, dispatch_exception
from .data import (
    as_list,
    batch_size,
    len_or_none,
    require_batches,
    shard_for_rank,
    skip_batches,
    to_device,
)
from .distributed import broadcast as _broadcast
from .interval import Interval, parse_interval
from .loader import DEFAULT_CHUNK_SIZE, load
from .resume import restore
from .saver import CheckpointSaver
from .state import State, Timer, capture_rng, restore_rng

__all__ = ["Trainer", "State"]

log = logging.getLogger("ckpt.trainer")


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


class Trainer:
    """Train a model and save/load checkpoints with Composer's checkpoint arguments.

    Args:
        model: a ``torch.nn.Module``; ``forward(batch)`` returns the scalar loss,
            unless ``loss_fn`` is given (then ``loss_fn(model(inputs), targets)``
            for ``(inputs, targets)`` batches).
        train_dataloader: a ``torch.utils.data.DataLoader`` (any iterable of
            batches works, without exact mid-epoch resume).
        max_duration: ``"Nep"`` or ``"Nba"`` (an integer means epochs).
        optimizers: one optimizer or a list (default: SGD, lr 0.01).
        schedulers: one LR scheduler or a list; stepped every epoch, or every
            batch with ``scheduler_step="batch"``.
        eval_dataloader: evaluated (mean loss in ``trainer.eval_loss``) after each epoch.
        callbacks: objects with any of the events in :mod:`ckpt.callbacks`.
        seed: seed of rank 0 (rank r uses seed + r); random when None.
        loss_fn: see ``model``.
        save_folder: a relative path stores checkpoints in
            ``CWD/runs/<timestamp>/rank_<r>/<save_folder>``; an absolute one is used
            as-is; None saves nothing.
        save_interval: ``"10ep"``, ``"500ba"``, or an integer (epochs). The end of
            training always leaves a checkpoint.
        save_compression: ``"zstd"``, ``"gzip"``, ``"bzip2"``, ``"lzma"`` or
            None/"" for none.
        save_async: write checkpoints in a background thread (default True).
        save_compression_threads: zstd threads (0: half the cores, at most 4).
        load_path_format: a checkpoint to resume from: a path (``{rank}`` is
            replaced by the rank), a URI (``s3://bucket/key``), or ``latest``
            (with ``load_object_store``) / ``s3://bucket/prefix/latest``.
        load_object_store: an ``uploader.ObjectStore`` or ``ObjectStoreHparams``;
            then ``load_path_format`` is the path inside the bucket.
        load_prefix: object name prefix under which ``latest`` is resolved.
        load_weights_only: load only the model weights (for fine-tuning).
        load_strict: with ``load_weights_only``, require the checkpoint's and the
            model's weight names to match exactly (shapes must always match; a full
            resume always requires matching names).
        load_chunk_size: kept for compatibility; a load from a bucket streams in the
            store's ranges and does not use it (default 1 MiB = 1,048,576).
        load_progress_bar: show a download progress bar.
        device: where to train (default CPU).
        run_timestamp: the ``runs/<timestamp>`` name (default: now, agreed across ranks).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        train_dataloader: Iterable[Any],
        max_duration: str | int,
        optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
        schedulers: Any = None,
        eval_dataloader: Iterable[Any] | None = None,
        callbacks: Sequence[Any] = (),
        seed: int | None = None,
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        save_folder: str | os.PathLike[str] | None = None,
        save_interval: str | int = "1ep",
        save_compression: str | None = None,
        save_async: bool = True,
        save_compression_threads: int = 0,
        load_path_format: str | None = None,
        load_object_store: Any = None,
        load_prefix: str | None = None,
        load_weights_only: bool = False,
        load_strict: bool = False,
        load_chunk_size: int = DEFAULT_CHUNK_SIZE,
        load_progress_bar: bool = True,
        scheduler_step: str = "epoch",
        device: str | torch.device = "cpu",
        run_timestamp: str | None = None,
    ) -> None:
        self.max_duration: Interval = parse_interval(max_duration, "max_duration")
        if scheduler_step not in ("epoch", "batch"):
            raise ValueError(f"scheduler_step={scheduler_step!r}: use 'epoch' or 'batch'")
        self.scheduler_step = scheduler_step
        self.device = torch.device(device)
        self.loss_fn = loss_fn
        self.eval_dataloader = eval_dataloader
        self.eval_loss: float | None = None
        self.last_loss: float | None = None

        distributed = _dist_ready()
        self.rank = dist.get_rank() if distributed else 0
        self.world_size = dist.get_world_size() if distributed else 1

        # Seeds: rank 0 picks one when none is given; every rank r uses seed + r.
        if seed is None:
            seed = random.SystemRandom().randrange(2**31)
            if distributed:
                seed = _broadcast(seed)
        self.rank_zero_seed = int(seed)
        self.seed = self.rank_zero_seed + self.rank
        _seed_everything(self.seed)

        model = model.to(self.device)
        is_ddp = False
        if distributed:
            from torch.nn.parallel import DistributedDataParallel

            if not isinstance(model, DistributedDataParallel):
                model = DistributedDataParallel(model)
            is_ddp = True
            train_dataloader = shard_for_rank(
                train_dataloader, self.world_size, self.rank, self.rank_zero_seed
            )
        self.train_dataloader = train_dataloader

        opts = as_list(optimizers)
        if not opts:
            opts = [torch.optim.SGD(model.parameters(), lr=0.01)]
        self.callbacks = list(callbacks)
        self.timer = Timer()
        self.state = State(
            model,
            opts,
            as_list(schedulers),
            self.callbacks,
            self.timer,
            self.rank_zero_seed,
            is_ddp,
        )

        self.run_directory, folder = _checkpoint_folder(save_folder, run_timestamp, self.rank)
        self.checkpoint_saver: CheckpointSaver | None = None
        if folder is not None:
            self.checkpoint_saver = CheckpointSaver(
                folder,
                save_interval,
                compression=save_compression,
                async_save=save_async,
                compression_threads=save_compression_threads,
            )
        else:
            parse_interval(save_interval)  # still reject bad values early

        self._pending_rng: dict[str, Any] | None = None
        self._last_saved_at: tuple[int, int] | None = None
        if load_path_format is not None:
            self._load(
                load_path_format,
                load_object_store,
                load_prefix,
                load_weights_only,
                load_strict,
                load_chunk_size,
                load_progress_bar,
            )

    # -- properties -------------------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        return self.state.model

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return self.state.optimizers

    @property
    def schedulers(self) -> list[Any]:
        return self.state.schedulers

    # -- loading ----------------------------------------------------------------------------
    # -- loading ----------------------------------------------------------------------------
    def _load(
        self,
        path: str,
        store: Any,
        prefix: str | None,
        weights_only: bool,
        strict: bool,
        chunk_size: int,
        progress: bool,
    ) -> None:
        ckpt = load(
            path,
            object_store=store,
            prefix=prefix,
            rank=self.rank,
            world_size=self.world_size,
            chunk_size=chunk_size,
            progress=progress and self.rank == 0,
        )
        rng = restore(self.state, ckpt, path, weights_only, strict)
        if rng is not None:  # a full resume continues from the save point
            self._pending_rng = rng
            self._last_saved_at = (self.timer.epoch, self.timer.batch)

    # -- events -----------------------------------------------------------------------------
    def _event(self, name: str) -> None:
        if self.checkpoint_saver is not None:
            for path in self.checkpoint_saver.poll():
                self._notify_saved(path)
        dispatch(self.callbacks, name, self)

    def _notify_saved(self, path: Path) -> None:
        dispatch(self.callbacks, "checkpoint_saved", self, path)

    def _save(self, unit: str) -> None:
        saver = self.checkpoint_saver
        if saver is None:
            return
        name = saver.filename(self.timer.epoch, self.timer.batch, unit)
        saver.save(self.state.checkpoint, name)
        self._last_saved_at = (self.timer.epoch, self.timer.batch)

    def _done(self) -> bool:
        if self.max_duration.unit == "ep":
            return self.timer.epoch >= self.max_duration.value
        return self.timer.batch >= self.max_duration.value

    # -- training ---------------------------------------------------------------------------
    def _loss(self, batch: Any) -> torch.Tensor:
        if self.loss_fn is None:
            out = self.state.model(batch)
        else:
            inputs, targets = batch
            out = self.loss_fn(self.state.model(inputs), targets)
        if not isinstance(out, torch.Tensor) or out.dim() != 0:
            raise TypeError(
                "the model's forward(batch) must return the scalar loss tensor; "
                "or pass loss_fn= to compute it from the model's output"
            )
        return out

    def _epoch_iterator(self) -> Iterator[Any]:
        sampler = getattr(self.train_dataloader, "sampler", None)
        if sampler is not None and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.timer.epoch)
        skip = self.timer.batch_in_epoch
        if skip == 0:
            self.state.epoch_start_rng = capture_rng()
            if self._pending_rng:
                # resumed at an epoch boundary: generators continue from the save point
                restore_rng(self._pending_rng)
                self.state.epoch_start_rng = capture_rng()
                self._pending_rng = None
            return iter(self.train_dataloader)
        # Resumed mid-epoch: rebuild this epoch's order, skip what was trained, then
        # continue the generators from the save point.
        if self.state.epoch_start_rng:
            restore_rng(self.state.epoch_start_rng)
        it = iter(self.train_dataloader)
        skip_batches(it, skip)
        if self._pending_rng:
            restore_rng(self._pending_rng)
            self._pending_rng = None
        return it

    def _evaluate(self) -> None:
        if self.eval_dataloader is None:
            return
        model = self.state.model
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in self.eval_dataloader:
                batch = to_device(batch, self.device)
                total += float(self._loss(batch)) * batch_size(batch)
                count += batch_size(batch)
        model.train()
        self.eval_loss = total / max(count, 1)

    def fit(self) -> None:
        """Train until ``max_duration``; returns once the last checkpoint is on disk."""
        saver = self.checkpoint_saver
        ok = False
        try:
            self._event("fit_start")
            self.state.model.train()
            while not self._done():
                it = self._epoch_iterator()
                self._event("epoch_start")
                if self.timer.batch_in_epoch == 0:
                    it = require_batches(it)
                for batch in it:
                    self._train_batch(batch)
                    self._event("batch_end")
                    if saver and saver.should_save(self.timer.epoch, self.timer.batch, "batch"):
                        self._save("ba")
                    if self._done():
                        break
                if self.max_duration.unit == "ba" and self._done() and self._epoch_unfinished(it):
                    break
                self.timer.epoch += 1
                self.timer.batch_in_epoch = 0
                if self.scheduler_step == "epoch":
                    with warnings.catch_warnings():
                        # Resumed on an epoch's last batch: no optimizer step in this process
                        # precedes this scheduler step, which is still the right order.
                        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
                        for s in self.schedulers:
                            s.step()
                self._evaluate()
                self._event("epoch_end")
                if saver and saver.should_save(self.timer.epoch, self.timer.batch, "epoch"):
                    self._save("ep")
            if saver and self._last_saved_at != (self.timer.epoch, self.timer.batch):
                at_boundary = self.timer.batch_in_epoch == 0
                unit = "ep" if saver.save_interval.unit == "ep" and at_boundary else "ba"
                self._save(unit)
            if saver:
                for path in saver.wait():
                    self._notify_saved(path)
            ok = True
        except Exception as exc:
            if saver:
                try:
                    saver.wait()
                except Exception as write_exc:  # the original error is more useful
                    log.error("a checkpoint write also failed: %s", write_exc)
            dispatch_exception(self.callbacks, self, exc)
            raise
        finally:
            if saver and not ok:
                with contextlib.suppress(Exception):
                    saver.wait()
        self._event("fit_end")

    def _epoch_unfinished(self, it: Iterator[Any]) -> bool:
        """After stopping on a batch count: is the epoch's data not yet exhausted?"""
        n = len_or_none(self.train_dataloader)
        if n is None:
            return True
        return self.timer.batch_in_epoch < n

    def _train_batch(self, batch: Any) -> None:
        batch = to_device(batch, self.device)
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        loss = self._loss(batch)
        loss.backward()
        for opt in self.optimizers:
            opt.step()
        if self.scheduler_step == "batch":
            for s in self.schedulers:
                s.step()
        self.last_loss = float(loss.detach())
        self.timer.batch += 1
        self.timer.batch_in_epoch += 1
        self.timer.sample += batch_size(batch)


def _checkpoint_folder(
    save_folder: str | os.PathLike[str] | None, run_timestamp: str | None, rank: int
) -> tuple[Path | None, Path | None]:
    """(run directory, checkpoint folder) for ``save_folder``: see the Trainer's Args."""
    if save_folder is None:
        return None, None
    sf = Path(save_folder)
    if sf.is_absolute():
        return sf, sf
    stamp = run_timestamp or time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + (
        f"-{time.time_ns() // 1000 % 1_000_000:06d}Z"
    )
    if _dist_ready():
        stamp = _broadcast(stamp)  # one name for the run, agreed across ranks
    run_directory = Path.cwd() / "runs" / stamp / f"rank_{rank}"
    return run_directory, run_directory / sf


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass
