"""`make demo`: train, upload from a worker process, look in the bucket, resume from `latest`.

Run from the repository root::

    python -m examples.demo            # or: make demo

Everything it writes lives in ``demo-output/`` (the bucket is a local directory,
the embedded default, so no account is needed); delete it to start over.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from ckpt import Trainer
from uploader import ObjectStoreHparams, RunDirectoryUploader
from uploader.bucket.pointer import resolve_latest

PREFIX = "demo"


class Regressor(torch.nn.Module):
    """A small MLP; forward(batch) returns the loss, as the Trainer expects."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1)
        )

    def forward(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)


def dataloader() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 16, generator=g)
    y = (x[:, :4].sum(dim=1, keepdim=True) - x[:, 4:5]).tanh()
    data = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(data, batch_size=32, shuffle=True)


class Narrator:
    """Prints one line per epoch and per checkpoint."""

    def __init__(self, uploader: RunDirectoryUploader, store_uri: str) -> None:
        self.uploader = uploader
        self.store_uri = store_uri
        self.announced = False

    def epoch_start(self, trainer: Any) -> None:
        worker = self.uploader.worker
        if worker is not None and not self.announced:
            self.announced = True
            print(f"   uploader worker pid {worker.pid} uploading to {self.store_uri}")

    def epoch_end(self, trainer: Any) -> None:
        print(f"   epoch {trainer.timer.epoch}: loss {trainer.last_loss:.4f}")

    def checkpoint_saved(self, trainer: Any, path: Path) -> None:
        print(f"   saved {path.name} ({path.stat().st_size / 1024:.1f} KiB)")


def make_trainer(model: Regressor, epochs: int, callbacks: list[Any], **kw: Any) -> Trainer:
    return Trainer(
        model=model,
        train_dataloader=dataloader(),
        eval_dataloader=None,
        max_duration=f"{epochs}ep",
        optimizers=torch.optim.Adam(model.parameters(), lr=3e-3),
        save_folder="checkpoints",
        callbacks=callbacks,
        seed=42,
        **kw,
    )


def rel(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="demo-output", help="where everything goes")
    parser.add_argument("--epochs", type=int, default=3, help="epochs before the 'interruption'")
    parser.add_argument("--resume-to", type=int, default=5, help="total epochs after resuming")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    home = Path.cwd()
    out = Path(args.output).absolute()
    if out.exists():
        shutil.rmtree(out)
    bucket = out / "bucket"
    bucket.mkdir(parents=True)
    os.chdir(out)  # runs/<timestamp>/rank_0 lands in demo-output/
    store_uri = f"file://{bucket}"
    hp = ObjectStoreHparams(provider="local", container=str(bucket))
    progress = sys.stderr.isatty()

    # 1. Train with the callback: a separate worker process uploads each checkpoint.
    uploader = RunDirectoryUploader(hp, object_name_prefix=PREFIX, progress_bar=progress)
    trainer = make_trainer(Regressor(), args.epochs, [uploader, Narrator(uploader, store_uri)])
    assert trainer.run_directory is not None
    run_dir = trainer.run_directory
    print(f"1. training {args.epochs} epochs, checkpoints -> {rel(run_dir / 'checkpoints', home)}")
    trainer.fit()
    done = uploader.final_status.done if uploader.final_status else 0
    print(f"   fit_end: the worker drained and exited; {done} checkpoints verified in the bucket")

    # 2. What the bucket holds.
    store = hp.initialize_object()
    print(f"\n2. the bucket ({rel(bucket, home)}):")
    for info in store.list(PREFIX):
        print(f"   {info.name:<40} {info.size / 1024:8.1f} KiB")

    # 3. What the worker's journal says.
    print(f"\n3. ckpt-uploader status --files {rel(run_dir, home)}")
    status = subprocess.run(
        [sys.executable, "-m", "uploader", "status", "--files", str(run_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    for line in (status.stdout or status.stderr).strip().splitlines():
        print(f"   {line}")

    # 4. Resume from the bucket's latest (as on a fresh machine) and finish.
    latest = resolve_latest(store, PREFIX, world_size=1)[0]
    print(
        f"\n4. resuming from latest = rank_0/{latest.name} "
        f"(verified {latest.digest[:23]}...), training to epoch {args.resume_to}"
    )
    uploader2 = RunDirectoryUploader(hp, object_name_prefix=PREFIX, progress_bar=progress)
    resumed = make_trainer(
        Regressor(),
        args.resume_to,
        [uploader2, Narrator(uploader2, store_uri)],
        load_path_format="latest",
        load_object_store=hp,
        load_prefix=PREFIX,
        load_progress_bar=False,
    )
    print(f"   resumed at epoch {resumed.timer.epoch}")
    resumed.fit()
    now = resolve_latest(store, PREFIX, world_size=1)[0]
    print(
        f"\ndone: trained to epoch {resumed.timer.epoch}; the bucket's latest is now "
        f"rank_0/{now.name}.\nEverything is in {rel(out, home)}/ (delete it to start over)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
