"""A tiny PyTorch Lightning run writing its run directory as Lightning does.

``python -m harness.trainers.lightning_run RUN_DIR --epochs 3 [--max-epochs N]
[--save-last link|copy|none] [--resume CKPT]``

A small regression model on seeded random tensors (64 samples, batch 8: 8 steps an
epoch), Adam with a cosine schedule over ``--epochs``. ``ModelCheckpoint(dirpath=RUN_DIR,
save_top_k=-1)`` writes ``epoch=E-step=S.ckpt`` after every epoch and ``last.ckpt`` (a
copy, or with ``link`` a symbolic link to the newest epoch file); a ``CSVLogger`` writes
``RUN_DIR/logs/metrics.csv`` and ``hparams.yaml``. ``--max-epochs`` stops the run early
(an interrupted run); ``--resume`` continues from a checkpoint with
``trainer.fit(ckpt_path=CKPT)``.

Prints one JSON line at the end: ``{"event": "end", "global_step", "epoch", "digest"}``,
the digest being :func:`harness.trainers.common.state_digest` of the model's state dict.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Literal

from harness.trainers.common import emit, go_offline, state_digest

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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m harness.trainers.lightning_run")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--epochs", type=int, default=3, help="length of the schedule")
    p.add_argument("--max-epochs", type=int, help="stop after this many epochs (default: --epochs)")
    p.add_argument("--save-last", choices=("link", "copy", "none"), default="copy")
    p.add_argument("--resume", type=Path, help="a .ckpt to continue from")
    args = p.parse_args(argv)
    go_offline()

    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger

    pl.seed_everything(0, workers=True, verbose=False)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    save_last: Literal["link"] | bool = (
        "link" if args.save_last == "link" else args.save_last == "copy"
    )
    checkpoint = ModelCheckpoint(dirpath=args.run_dir, save_top_k=-1, save_last=save_last)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=args.max_epochs or args.epochs,
        callbacks=[checkpoint],
        logger=CSVLogger(save_dir=args.run_dir, name="", version="logs"),
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
        default_root_dir=args.run_dir,
    )
    model = _build(args.epochs)
    trainer.fit(model, train_dataloaders=_data(), ckpt_path=args.resume)
    emit(
        event="end",
        global_step=trainer.global_step,
        epoch=trainer.current_epoch,
        digest=state_digest(model.state_dict()),
    )


if __name__ == "__main__":
    main()
