"""A tiny PyTorch Lightning run writing its run directory as Lightning does.

``python -m harness.trainers.lightning_run RUN_DIR --epochs 3 [--max-epochs N]
[--save-last link|copy|none] [--resume CKPT] [--devices N] [--upload-to URI
[--resume-from-bucket DEST] [--no-checkpointing] [--remove-bucket-at-epoch E]
[--step-sleep S] [--kill-at-epoch E]]``

A small regression model on seeded random tensors (64 samples, batch 8: 8 steps an
epoch), Adam with a cosine schedule over ``--epochs``. ``ModelCheckpoint(dirpath=RUN_DIR,
save_top_k=-1)`` writes ``epoch=E-step=S.ckpt`` after every epoch and ``last.ckpt`` (a
copy, or with ``link`` a symbolic link to the newest epoch file); a ``CSVLogger`` writes
``RUN_DIR/logs/metrics.csv`` and ``hparams.yaml``. ``--max-epochs`` stops the run early
(an interrupted run); ``--resume`` continues from a checkpoint with
``trainer.fit(ckpt_path=CKPT)``. ``--devices 2`` runs DDP on CPU with two gloo processes
(Lightning starts the second one by running this module again).

``--upload-to URI`` adds :class:`uploader.integrations.lightning.UploaderCallback` (no
progress bar). ``--resume-from-bucket DEST`` (one device) first calls
``uploader.fetch_latest(URI, DEST)`` and continues from what it returns (a fresh start
when it returns None).
``--no-checkpointing`` passes ``enable_checkpointing=False`` and no ``ModelCheckpoint``;
``--remove-bucket-at-epoch E`` takes the ``file://`` bucket's directory away when epoch E
starts; ``--kill-at-epoch E`` SIGKILLs the process when epoch E starts (after the
checkpoints of the epochs before it are saved); ``--step-sleep S`` sleeps S seconds after each training step.

Prints JSON lines (rank 0 only, except ``worker`` and ``error``): ``{"event": "worker",
"rank", "pid"}`` (each rank, at fit start: its worker's pid or None), ``{"event":
"fetched", "path"}``, ``{"event": "error", "type", "message", "global_step", "rank"}`` when
``fit()`` raises (then the error propagates), ``{"event": "bucket", ...}`` (:func:`harness.trainers.common.bucket_report`,
right after ``fit()`` returns) and at the end ``{"event": "end", "global_step", "epoch",
"digest"}``, the digest being :func:`harness.trainers.common.state_digest` of the model's
state dict.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Literal

from harness.trainers.common import (
    bucket_report,
    emit,
    go_offline,
    kill_self,
    remove_local_bucket,
    state_digest,
)

__all__ = ["main", "SAMPLES", "BATCH"]

SAMPLES = 64
BATCH = 8


def _build(epochs: int) -> Any:
    import pytorch_lightning as pl
    import torch
    from torch import nn

    class TinyRegression(pl.LightningModule):
        def __init__(self, epochs: int) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            loss = nn.functional.mse_loss(self.net(x), y)
            self.log("train_loss", loss, on_step=True, on_epoch=True)
            return loss

        def configure_optimizers(self) -> Any:
            opt = torch.optim.Adam(self.parameters(), lr=1e-2)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.hparams["epochs"])
            return {"optimizer": opt, "lr_scheduler": sched}

    return TinyRegression(epochs)


def _data() -> Any:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(1234)
    x = torch.randn(SAMPLES, 8, generator=g)
    y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(SAMPLES, 1, generator=g)
    # no shuffling: an epoch's batches do not depend on sampler state, so a resumed run
    # sees the same batches as an uninterrupted one
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False)


def _probe(uploader_cb: Any, args: argparse.Namespace) -> Any:
    """A callback after the uploader's: reports each rank's worker, sleeps after each step,
    removes the bucket when ``--remove-bucket-at-epoch`` says."""
    import time

    import pytorch_lightning as pl

    class Probe(pl.Callback):
        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            worker = uploader_cb.worker
            emit(event="worker", rank=trainer.global_rank, pid=worker.pid if worker else None)

        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            if trainer.current_epoch == args.remove_bucket_at_epoch and trainer.global_rank == 0:
                remove_local_bucket(args.upload_to)
            if trainer.current_epoch == args.kill_at_epoch:
                kill_self(f"--kill-at-epoch {args.kill_at_epoch}")

        def on_train_batch_end(self, *a: Any) -> None:
            if args.step_sleep:
                time.sleep(args.step_sleep)

    return Probe()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m harness.trainers.lightning_run")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--epochs", type=int, default=3, help="length of the schedule")
    p.add_argument("--max-epochs", type=int, help="stop after this many epochs (default: --epochs)")
    p.add_argument("--save-last", choices=("link", "copy", "none"), default="copy")
    p.add_argument("--resume", type=Path, help="a .ckpt to continue from")
    p.add_argument("--devices", type=int, default=1, help="CPU processes (2+: DDP on gloo)")
    p.add_argument("--upload-to", metavar="URI", help="add the uploader's Lightning callback")
    p.add_argument("--resume-from-bucket", type=Path, metavar="DEST")
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument("--remove-bucket-at-epoch", type=int, metavar="E")
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--kill-at-epoch", type=int, metavar="E")
    args = p.parse_args(argv)
    if (args.resume_from_bucket or args.remove_bucket_at_epoch is not None) and not args.upload_to:
        p.error("--resume-from-bucket and --remove-bucket-at-epoch need --upload-to")
    go_offline()

    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger

    pl.seed_everything(0, workers=True, verbose=False)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    save_last: Literal["link"] | bool = (
        "link" if args.save_last == "link" else args.save_last == "copy"
    )
    callbacks: list[Any] = []
    if not args.no_checkpointing:
        callbacks.append(ModelCheckpoint(dirpath=args.run_dir, save_top_k=-1, save_last=save_last))
    uploader_cb = None
    if args.upload_to:
        from uploader.integrations.lightning import UploaderCallback

        uploader_cb = UploaderCallback(args.upload_to, progress_bar=False, drain_timeout=120)
        callbacks += [uploader_cb, _probe(uploader_cb, args)]
    if args.resume_from_bucket:
        import uploader

        fetched = uploader.fetch_latest(args.upload_to, args.resume_from_bucket)
        emit(event="fetched", path=None if fetched is None else str(fetched))
        args.resume = fetched
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=args.max_epochs or args.epochs,
        callbacks=callbacks,
        enable_checkpointing=not args.no_checkpointing,
        logger=CSVLogger(save_dir=args.run_dir, name="", version="logs"),
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
        default_root_dir=args.run_dir,
    )
    model = _build(args.epochs)
    try:
        trainer.fit(model, train_dataloaders=_data(), ckpt_path=args.resume)
    except Exception as exc:
        emit(
            event="error",
            type=type(exc).__name__,
            message=str(exc),
            global_step=trainer.global_step,
            rank=trainer.global_rank,
        )
        raise
    if trainer.global_rank != 0:
        return
    if uploader_cb is not None:
        worker = uploader_cb.worker
        emit(event="bucket", **bucket_report(args.upload_to, worker.pid if worker else None))
    emit(
        event="end",
        global_step=trainer.global_step,
        epoch=trainer.current_epoch,
        digest=state_digest(model.state_dict()),
    )


if __name__ == "__main__":
    main()
