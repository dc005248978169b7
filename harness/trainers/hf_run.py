"""A tiny Hugging Face ``Trainer`` run writing ``checkpoint-N/`` directories as transformers does.

``python -m harness.trainers.hf_run RUN_DIR --save-steps 8 --max-steps 16 [--resume DIR]
[--kill-mid-save STEP] [--save-strategy steps|no] [--save-total-limit N] [--upload-to URI [--resume-from-bucket DEST]]
[--remove-bucket-at-step S] [--step-sleep SECONDS]``

A one-layer BERT classifier (hidden size 16) built from its config, so nothing is
downloaded, trained on seeded random token ids (32 samples, batch 4: 8 steps an epoch).
Each save writes ``RUN_DIR/checkpoint-N/`` with ``config.json``, ``model.safetensors``,
``training_args.bin``, ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth`` and, last,
``trainer_state.json``. ``--resume DIR`` continues with
``trainer.train(resume_from_checkpoint=DIR)``.

``--kill-mid-save STEP``: during the save of step STEP, after the model, optimizer,
scheduler and RNG state are written and just before ``trainer_state.json`` would be, the
process SIGKILLs itself (``TrainerState.save_to_json`` is wrapped, the call that
``Trainer._save_checkpoint`` makes last), leaving a checkpoint directory without its marker.

``--remove-bucket-at-step S`` takes the ``file://`` bucket's directory away when step S
begins (a permanent store error); ``--step-sleep`` sleeps after each step.

``--upload-to URI`` adds :class:`uploader.integrations.transformers.UploaderCallback` (no
progress bar); ``--resume-from-bucket DEST`` first calls ``uploader.fetch_latest(URI, DEST)``
and resumes from the directory it returns (a fresh start when it returns None).

Prints JSON lines: ``{"event": "worker", "pid"}`` at train begin (with ``--upload-to``),
``{"event": "fetched", "path"}``, ``{"event": "save", "step", "dir"}`` after each complete
save, ``{"event": "error", "type", "message", "global_step"}`` when ``train()`` raises (the
error then propagates), ``{"event": "bucket", ...}``
(:func:`harness.trainers.common.bucket_report`, right after ``train()`` returns), and at the
end ``{"event": "end", "global_step", "digest"}`` (the model's state dict digest).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from harness.trainers.common import (
    bucket_report,
    emit,
    go_offline,
    kill_self,
    remove_local_bucket,
    state_digest,
)

__all__ = ["main", "SAMPLES", "BATCH"]

SAMPLES = 32
BATCH = 4
_SEQ = 8


def _dataset() -> list[dict[str, Any]]:
    import torch

    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, 64, (SAMPLES, _SEQ), generator=g)
    labels = (ids.sum(dim=1) % 2).long()
    return [
        {
            "input_ids": ids[i],
            "attention_mask": torch.ones(_SEQ, dtype=torch.long),
            "labels": labels[i],
        }
        for i in range(SAMPLES)
    ]


def _kill_before_trainer_state(step: int) -> None:
    """Make the save of ``step`` die just before its ``trainer_state.json`` is written."""
    from transformers.trainer_callback import TrainerState

    original = TrainerState.save_to_json

    def save_to_json(self: Any, json_path: str) -> None:
        if Path(json_path).parent.name == f"checkpoint-{step}":
            kill_self(f"--kill-mid-save {step}: before {json_path}")
        original(self, json_path)

    TrainerState.save_to_json = save_to_json  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m harness.trainers.hf_run")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--save-steps", type=int, default=8)
    p.add_argument("--max-steps", type=int, default=16)
    p.add_argument("--resume", type=Path, help="a checkpoint-N directory to continue from")
    p.add_argument("--kill-mid-save", type=int, metavar="STEP")
    p.add_argument("--save-strategy", choices=("steps", "no"), default="steps")
    p.add_argument("--save-total-limit", type=int, metavar="N", help="the Trainer's own rotation")
    p.add_argument("--upload-to", metavar="URI", help="add the uploader's HF Trainer callback")
    p.add_argument("--resume-from-bucket", type=Path, metavar="DEST")
    p.add_argument("--remove-bucket-at-step", type=int, metavar="S")
    p.add_argument("--step-sleep", type=float, default=0.0, metavar="SECONDS")
    args = p.parse_args(argv)
    if args.resume_from_bucket and not args.upload_to:
        p.error("--resume-from-bucket needs --upload-to")
    kill = args.kill_mid_save
    if kill is not None and (kill % args.save_steps or not 0 < kill <= args.max_steps):
        p.error(
            f"--kill-mid-save {kill} is not a save step: pass a multiple of --save-steps "
            f"{args.save_steps} up to --max-steps {args.max_steps}"
        )
    go_offline()

    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_warning()
    hf_logging.disable_progress_bar()
    if args.kill_mid_save is not None:
        _kill_before_trainer_state(args.kill_mid_save)

    class SaveReport(TrainerCallback):
        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            emit(event="save", step=state.global_step, dir=os.fspath(path))

    cli = args

    class Probe(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == cli.remove_bucket_at_step:
                remove_local_bucket(cli.upload_to)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if cli.step_sleep:
                time.sleep(cli.step_sleep)

    callbacks: list[Any] = [SaveReport(), Probe()]
    uploader_cb = None
    if args.upload_to:
        from uploader.integrations.transformers import UploaderCallback

        uploader_cb = up = UploaderCallback(args.upload_to, progress_bar=False, drain_timeout=120)

        class WorkerReport(TrainerCallback):
            def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                worker = up.worker
                emit(event="worker", pid=worker.pid if worker else None)

        callbacks = [uploader_cb, WorkerReport(), *callbacks]
    if args.resume_from_bucket:
        import uploader

        fetched = uploader.fetch_latest(args.upload_to, args.resume_from_bucket)
        emit(event="fetched", path=None if fetched is None else str(fetched))
        args.resume = fetched

    set_seed(0)
    config = BertConfig(  # type: ignore[call-arg]
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=_SEQ,
        num_labels=2,
    )
    model = BertForSequenceClassification(config)
    training_args = TrainingArguments(
        output_dir=os.fspath(args.run_dir),
        max_steps=args.max_steps,
        save_strategy=args.save_strategy,
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        per_device_train_batch_size=BATCH,
        learning_rate=1e-3,
        logging_strategy="steps",
        logging_steps=4,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model, args=training_args, train_dataset=_dataset(), callbacks=callbacks
    )
    try:
        trainer.train(resume_from_checkpoint=os.fspath(args.resume) if args.resume else None)
    except Exception as exc:
        emit(
            event="error",
            type=type(exc).__name__,
            message=str(exc),
            global_step=trainer.state.global_step,
        )
        raise
    if uploader_cb is not None:
        worker = uploader_cb.worker
        emit(event="bucket", **bucket_report(args.upload_to, worker.pid if worker else None))
    emit(
        event="end",
        global_step=trainer.state.global_step,
        digest=state_digest(model.state_dict()),
    )


if __name__ == "__main__":
    main()
