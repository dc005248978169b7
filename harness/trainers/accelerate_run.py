"""A tiny Accelerate loop saving with ``Accelerator.save_state``, in two layouts.

``python -m harness.trainers.accelerate_run RUN_DIR --layout auto|diffusers --steps 8
--save-every 2 [--total-limit N] [--kill-before-rng STEP] [--resume-from-bucket URI DEST]``

* ``--layout auto``: ``ProjectConfiguration(project_dir=RUN_DIR,
  automatic_checkpoint_naming=True, total_limit=N)``: each save writes
  ``RUN_DIR/checkpoints/checkpoint_<i>/`` with ``model.safetensors``, ``optimizer.bin``,
  ``scheduler.bin`` and ``random_states_0.pkl`` (and ``custom_checkpoint_0.pkl`` for the
  registered step counter); Accelerate deletes the oldest beyond ``total_limit`` itself.
* ``--layout diffusers``: as diffusers' training scripts do,
  ``accelerator.save_state(RUN_DIR/checkpoint-{step})`` with a save-state pre-hook that
  writes the model with ``save_pretrained``-style files into ``unet/`` and takes it out
  of the list Accelerate saves, and a load hook that reads it back.

``--kill-before-rng STEP``: during the save at STEP, after every model, optimizer and
scheduler file is written, the process SIGKILLs itself just before
``random_states_0.pkl`` would be (the ``torch.save`` that ``save_accelerator_state``
makes last for it), leaving a checkpoint directory without its last files.

``--resume-from-bucket URI DEST``: no training; ``uploader.fetch_latest(URI, DEST)`` and
``accelerator.load_state`` of the directory it returns, then ``{"event": "loaded"}`` with
the model's digest and the step counter restored.

Prints JSON lines: ``{"event": "save", "step", "dir", "digest"}`` after each save and
``{"event": "end", "digest"}`` (the model's state dict digest, see
:func:`harness.trainers.common.state_digest`).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from harness.trainers.common import emit, go_offline, kill_self, state_digest

__all__ = ["main"]


class _Counter:
    """A registered object (``custom_checkpoint_0.pkl``): the training step."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])


def _kill_before_rng(step: int, counter: _Counter) -> None:
    """Make the save at ``step`` die just before its ``random_states_0.pkl``."""
    import accelerate.checkpointing as ckpt

    original = ckpt.torch.save

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> Any:
        if counter.step == step and Path(os.fspath(f)).name.startswith("random_states_"):
            kill_self(f"--kill-before-rng {step}: before {f}")
        return original(obj, f, *args, **kwargs)

    ckpt.torch.save = save


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m harness.trainers.accelerate_run")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--layout", choices=("auto", "diffusers"), default="auto")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--save-every", type=int, default=2)
    p.add_argument("--total-limit", type=int)
    p.add_argument("--kill-before-rng", type=int, metavar="STEP")
    p.add_argument("--resume-from-bucket", nargs=2, metavar=("URI", "DEST"))
    args = p.parse_args(argv)
    go_offline()

    import torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from safetensors.torch import load_file, save_file

    set_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    counter = _Counter()
    if args.layout == "auto":
        config = ProjectConfiguration(
            project_dir=os.fspath(args.run_dir),
            automatic_checkpoint_naming=True,
            total_limit=args.total_limit,
        )
        accelerator = Accelerator(cpu=True, project_config=config)
    else:
        accelerator = Accelerator(cpu=True)

        # diffusers' train_*.py: the model goes to unet/ through the hooks.
        def save_hook(models: list[Any], weights: list[Any], output_dir: str) -> None:
            unet = Path(output_dir) / "unet"
            unet.mkdir(parents=True, exist_ok=True)
            for m in models:
                save_file(m.state_dict(), os.fspath(unet / "diffusion_pytorch_model.safetensors"))
                (unet / "config.json").write_text('{"_class_name": "Tiny"}')
                weights.pop()

        def load_hook(models: list[Any], input_dir: str) -> None:
            while models:
                m = models.pop()
                path = Path(input_dir) / "unet" / "diffusion_pytorch_model.safetensors"
                m.load_state_dict(load_file(os.fspath(path)))

        accelerator.register_save_state_pre_hook(save_hook)
        accelerator.register_load_state_pre_hook(load_hook)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    accelerator.register_for_checkpointing(counter)

    if args.resume_from_bucket:
        import uploader

        uri, dest = args.resume_from_bucket
        fetched = uploader.fetch_latest(uri, dest)
        if fetched is None:
            emit(event="loaded", path=None)
            return
        accelerator.load_state(os.fspath(fetched))
        emit(
            event="loaded",
            path=os.fspath(fetched),
            step=counter.step,
            digest=state_digest(accelerator.unwrap_model(model).state_dict()),
        )
        return

    if args.kill_before_rng is not None:
        _kill_before_rng(args.kill_before_rng, counter)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 8, generator=g), torch.randint(0, 2, (64,), generator=g)
    for step in range(1, args.steps + 1):
        idx = torch.arange((step - 1) * 8, step * 8) % 64
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        counter.step = step
        if step % args.save_every == 0:
            out = None if args.layout == "auto" else args.run_dir / f"checkpoint-{step}"
            where = accelerator.save_state(None if out is None else os.fspath(out))
            emit(
                event="save",
                step=step,
                dir=os.fspath(where),
                digest=state_digest(accelerator.unwrap_model(model).state_dict()),
            )
    emit(event="end", digest=state_digest(accelerator.unwrap_model(model).state_dict()))


if __name__ == "__main__":
    main()
