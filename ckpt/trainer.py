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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, RandomSampler

from .errors import CheckpointError, IncompatibleStateError
from .interval import Interval, parse_interval
from .loader import DEFAULT_CHUNK_SIZE, load
from .saver import CheckpointSaver
from .state import STATE_KEYS, Timer, capture_rng, restore_rng, strip_ddp_prefix

__all__ = ["Trainer", "State"]

log = logging.getLogger("ckpt.trainer")

#: Optimizer state entries that have one value per parameter element.
_PER_ELEMENT = {
    "exp_avg",
    "exp_avg_sq",
    "max_exp_avg_sq",
    "momentum_buffer",
    "square_avg",
    "grad_avg",
    "acc_delta",
    "sum",
    "ax",
    "prev",
    "step_size",
    "exp_inf",
    "mu_product_buf",
}


def _as_list(x: Any) -> list[Any]:
    if x is None:
        return []
    if isinstance(x, (list, tuple)):
        return list(x)
    return [x]


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return type(batch)({k: _to_device(v, device) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, Mapping):
        for v in batch.values():
            return _batch_size(v)
    if isinstance(batch, (list, tuple)) and batch:
        return _batch_size(batch[0])
    return 1


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


class State:
    """What the Trainer trains and what a checkpoint holds (see :data:`ckpt.state.STATE_KEYS`)."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizers: list[torch.optim.Optimizer],
        schedulers: list[Any],
        callbacks: list[Any],
        timer: Timer,
        rank_zero_seed: int,
        is_model_ddp: bool,
        scaler: Any = None,
    ) -> None:
        self.model = model
        self.optimizers = optimizers
        self.schedulers = schedulers
        self.callbacks = callbacks
        self.timer = timer
        self.rank_zero_seed = rank_zero_seed
        self.is_model_ddp = is_model_ddp
        self.scaler = scaler
        self.algorithms: list[Any] = []
        self.epoch_start_rng: dict[str, Any] = {}

    @property
    def raw_model(self) -> torch.nn.Module:
        """The model without its DistributedDataParallel wrapper."""
        return self.model.module if self.is_model_ddp else self.model  # type: ignore[return-value]

    def callback_states(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, cb in _callback_keys(self.callbacks):
            fn = getattr(cb, "state_dict", None)
            if callable(fn):
                out[key] = fn()
        return out

    def state_dict(self) -> dict[str, Any]:
        sd = {
            "model": strip_ddp_prefix(self.raw_model.state_dict()),
            "timer": self.timer.state_dict(),
            "optimizers": [o.state_dict() for o in self.optimizers],
            "schedulers": [s.state_dict() for s in self.schedulers],
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "algorithms": [],
            "callbacks": self.callback_states(),
            "rng": self.epoch_start_rng,
            "rank_zero_seed": self.rank_zero_seed,
            "is_model_ddp": self.is_model_ddp,
        }
        assert tuple(sd) == STATE_KEYS
        return sd

    def checkpoint(self) -> dict[str, Any]:
        """The whole checkpoint: ``{"rng": ..., "state": ...}``."""
        return {"rng": capture_rng(), "state": self.state_dict()}


def _callback_keys(callbacks: Sequence[Any]) -> Iterator[tuple[str, Any]]:
    seen: dict[str, int] = {}
    for cb in callbacks:
        name = type(cb).__name__
        n = seen.get(name, 0)
        seen[name] = n + 1
        yield (name if n == 0 else f"{name}#{n}"), cb


def check_model_state(model: torch.nn.Module, sd: Mapping[str, Any], strict: bool) -> None:
    """Raise IncompatibleStateError naming mismatched keys or shapes."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd
        and isinstance(sd[k], torch.Tensor)
        and isinstance(own[k], torch.Tensor)
        and sd[k].shape != own[k].shape
    ]
    problems = []
    if shapes:
        problems.append("shape mismatch: " + "; ".join(shapes[:20]))
    if strict and missing:
        problems.append("missing in checkpoint: " + ", ".join(missing[:20]))
    if strict and unexpected:
        problems.append("not in model: " + ", ".join(unexpected[:20]))
    if problems:
        raise IncompatibleStateError(
            "the checkpoint's model weights do not fit the model given to the Trainer ("
            + " | ".join(problems)
            + "). Pass the same architecture, or load_weights_only=True with load_strict=False "
            "to load the matching weights only"
        )


def check_optimizer_state(opt: torch.optim.Optimizer, sd: Mapping[str, Any], index: int) -> None:
    """Raise IncompatibleStateError when ``sd`` cannot be the state of ``opt``."""
    what = f"optimizer {index} ({type(opt).__name__})"
    groups = opt.param_groups
    saved = sd.get("param_groups", [])
    if len(saved) != len(groups):
        raise IncompatibleStateError(
            f"{what} has {len(groups)} parameter group(s) but the checkpoint has {len(saved)}"
        )
    state = sd.get("state", {})
    for gi, (g, sg) in enumerate(zip(groups, saved, strict=False)):
        if len(g["params"]) != len(sg["params"]):
            raise IncompatibleStateError(
                f"{what}: group {gi} has {len(g['params'])} parameters but the checkpoint's has "
                f"{len(sg['params'])}; the model or the parameter grouping differs"
            )
        lacking = sorted(set(g) - set(sg) - {"params"})
        if lacking:
            raise IncompatibleStateError(
                f"{what}: the checkpoint's group {gi} lacks hyperparameters {lacking}; it was "
                "saved by a different optimizer class. Use the same optimizer to resume, or "
                "load_weights_only=True to start a new optimizer"
            )
        for p, pid in zip(g["params"], sg["params"], strict=False):
            for k, v in state.get(pid, {}).items():
                if (
                    k in _PER_ELEMENT
                    and isinstance(v, torch.Tensor)
                    and v.dim() > 0
                    and v.shape != p.shape
                ):
                    raise IncompatibleStateError(
                        f"{what}: state {k!r} of parameter {pid} has shape {tuple(v.shape)} in "
                        f"the checkpoint but the parameter has shape {tuple(p.shape)}"
                    )


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
        load_chunk_size: download chunk size in bytes (default 1 MiB = 1,048,576).
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
                seed = self._broadcast(seed)
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
            train_dataloader = self._shard(train_dataloader)
        self.train_dataloader = train_dataloader

        opts = _as_list(optimizers)
        if not opts:
            opts = [torch.optim.SGD(model.parameters(), lr=0.01)]
        self.callbacks = list(callbacks)
        self.timer = Timer()
        self.state = State(
            model,
            opts,
            _as_list(schedulers),
            self.callbacks,
            self.timer,
            self.rank_zero_seed,
            is_ddp,
        )

        # Where checkpoints go.
        self.run_directory: Path | None = None
        folder: Path | None = None
        if save_folder is not None:
            sf = Path(save_folder)
            if sf.is_absolute():
                self.run_directory = folder = sf
            else:
                stamp = run_timestamp or time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + (
                    f"-{time.time_ns() // 1000 % 1_000_000:06d}Z"
                )
                if distributed:
                    stamp = self._broadcast(stamp)
                self.run_directory = Path.cwd() / "runs" / stamp / f"rank_{self.rank}"
                folder = self.run_directory / sf
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

    # -- distributed helpers ----------------------------------------------------------------
    @staticmethod
    def _broadcast(value: Any) -> Any:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _shard(self, loader: Iterable[Any]) -> Iterable[Any]:
        """Give each rank its own deterministic share of the data (seeded by epoch)."""
        from torch.utils.data.distributed import DistributedSampler

        if not isinstance(loader, DataLoader) or isinstance(loader.sampler, DistributedSampler):
            return loader
        sampler: DistributedSampler[Any] = DistributedSampler(
            loader.dataset,  # type: ignore[arg-type]
            num_replicas=self.world_size,
            rank=self.rank,
            shuffle=isinstance(loader.sampler, RandomSampler),
            seed=self.rank_zero_seed,
            drop_last=loader.drop_last,
        )
        return DataLoader(
            loader.dataset,
            batch_size=loader.batch_size,
            sampler=sampler,
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory,
            drop_last=loader.drop_last,
            worker_init_fn=loader.worker_init_fn,
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
        if not isinstance(ckpt, Mapping) or "state" not in ckpt or "model" not in ckpt["state"]:
            raise CheckpointError(
                f"{path} is a torch file but not a trainer checkpoint (no ['state']['model']); "
                "to load bare weights, call model.load_state_dict(torch.load(path)) yourself"
            )
        st = ckpt["state"]
        raw = self.state.raw_model
        model_sd = strip_ddp_prefix(st["model"])
        check_model_state(raw, model_sd, strict=strict or not weights_only)
        if weights_only:
            raw.load_state_dict(model_sd, strict=strict)
            log.info("loaded model weights from %s", path)
            return
        opt_states = list(st.get("optimizers", []))
        if len(opt_states) != len(self.optimizers):
            raise IncompatibleStateError(
                f"the checkpoint holds {len(opt_states)} optimizer state(s) but the Trainer has "
                f"{len(self.optimizers)} optimizer(s); pass the same optimizers to resume, or "
                "load_weights_only=True"
            )
        for i, (opt, osd) in enumerate(zip(self.optimizers, opt_states, strict=False)):
            check_optimizer_state(opt, osd, i)
        sched_states = list(st.get("schedulers", []))
        if len(sched_states) != len(self.schedulers):
            raise IncompatibleStateError(
                f"the checkpoint holds {len(sched_states)} scheduler state(s) but the Trainer has "
                f"{len(self.schedulers)} scheduler(s); pass the same schedulers to resume"
            )
        raw.load_state_dict(model_sd, strict=True)
        for i, (opt, osd) in enumerate(zip(self.optimizers, opt_states, strict=False)):
            try:
                opt.load_state_dict(osd)
            except (ValueError, KeyError, RuntimeError) as exc:
                raise IncompatibleStateError(
                    f"optimizer {i} ({type(opt).__name__}) rejected the checkpoint's state: {exc}"
                ) from None
        for s, ssd in zip(self.schedulers, sched_states, strict=False):
            s.load_state_dict(ssd)
        if self.state.scaler is not None and st.get("scaler"):
            self.state.scaler.load_state_dict(st["scaler"])
        cb_states = st.get("callbacks", {}) or {}
        for key, cb in _callback_keys(self.callbacks):
            fn = getattr(cb, "load_state_dict", None)
            if key in cb_states and callable(fn):
                fn(cb_states[key])
        self.timer.load_state_dict(st["timer"])
        self.state.epoch_start_rng = dict(st.get("rng") or {})
        self._pending_rng = dict(ckpt.get("rng") or {})
        self._last_saved_at = (self.timer.epoch, self.timer.batch)
        log.info("resumed from %s at epoch %d, batch %d", path, self.timer.epoch, self.timer.batch)

    # -- events -----------------------------------------------------------------------------
    def _event(self, name: str) -> None:
        if self.checkpoint_saver is not None:
            for path in self.checkpoint_saver.poll():
                self._notify_saved(path)
        for cb in self.callbacks:
            fn = getattr(cb, name, None)
            if callable(fn):
                fn(self)

    def _notify_saved(self, path: Path) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, "checkpoint_saved", None)
            if callable(fn):
                fn(self, path)

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
        _skip(it, skip)
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
                batch = _to_device(batch, self.device)
                total += float(self._loss(batch)) * _batch_size(batch)
                count += _batch_size(batch)
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
                    it = _require_batches(it)
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
            self._exception_event(exc)
            raise
        finally:
            if saver and not ok:
                with contextlib.suppress(Exception):
                    saver.wait()
        self._event("fit_end")

    def _exception_event(self, exc: BaseException) -> None:
        """Tell callbacks that ``fit()`` is failing; their own errors are logged, not raised,
        so the training error is the one the caller sees."""
        for cb in self.callbacks:
            fn = getattr(cb, "on_exception", None)
            if callable(fn):
                try:
                    fn(self, exc)
                except Exception as cb_exc:
                    log.error(
                        "callback %s failed while handling the training error: %s",
                        type(cb).__name__,
                        cb_exc,
                    )

    def _epoch_unfinished(self, it: Iterator[Any]) -> bool:
        """After stopping on a batch count: is the epoch's data not yet exhausted?"""
        n = _len_or_none(self.train_dataloader)
        if n is None:
            return True
        return self.timer.batch_in_epoch < n

    def _train_batch(self, batch: Any) -> None:
        batch = _to_device(batch, self.device)
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
        self.timer.sample += _batch_size(batch)


def _require_batches(it: Iterator[Any]) -> Iterator[Any]:
    """Yield from ``it``; an epoch without a single batch is an error (it would never end)."""
    empty = True
    for batch in it:
        empty = False
        yield batch
    if empty:
        raise ValueError(
            "train_dataloader yielded no batches in this epoch; check the dataset size, "
            "batch_size and drop_last"
        )


def _len_or_none(x: Any) -> int | None:
    try:
        return len(x)
    except TypeError:
        return None


def _skip(it: Iterator[Any], n: int) -> None:
    """Advance a DataLoader iterator by ``n`` batches (without loading them when possible)."""
    from torch.utils.data.dataloader import _DatasetKind, _SingleProcessDataLoaderIter

    # A map-style dataset in this process: drawing indices skips without loading data.
    if isinstance(it, _SingleProcessDataLoaderIter) and it._dataset_kind == _DatasetKind.Map:
        for _ in range(n):
            next(it._sampler_iter)
            it._num_yielded += 1
        return
    for _ in range(n):
        next(it)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass
