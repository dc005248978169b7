"""uploader.integrations.lightning.UploaderCallback with the real PyTorch Lightning.

Training runs in its own process (harness/trainers/lightning_run.py with ``--upload-to``),
which prints what the bucket holds right after ``fit()`` returns and whether a worker
process is still alive; the bucket is a local directory (file://). The runs shared by
several tests start once per module, one at a time. Bad input is checked in this
process, with a real Trainer that must fail before its first training step.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from harness.reliability import wait_gone
from harness.reliability.common import journal_rows
from harness.trainers import (
    files_digest,
    last,
    recorded_digests,
    records,
    run_trainer,
    succeeded,
)
from uploader import ConfigError, parse_uri
from uploader.bucket.pointer import read_pointer

pytestmark = pytest.mark.timeout(300)

Run = subprocess.CompletedProcess[str]
EPOCHS = 3
STEPS = 8  # a epoch: 64 samples, batch 8


def _bucket(path: Path) -> str:
    path.mkdir(parents=True, exist_ok=True)
    return path.as_uri()


def _checkpoints(run_dir: Path) -> dict[str, str]:
    return {k: v for k, v in files_digest(run_dir).items() if k.endswith(".ckpt")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An uninterrupted run, a run cut after one epoch, and its resume on another
    machine (a new directory) from what the cut run uploaded."""
    base = tmp_path_factory.mktemp("lightning")
    full_bucket, cut_bucket = _bucket(base / "bucket-full"), _bucket(base / "bucket-cut")
    full = succeeded(
        run_trainer("lightning_run", base / "full", "--epochs", EPOCHS, "--upload-to", full_bucket)
    )
    cut = succeeded(
        run_trainer(
            "lightning_run",
            base / "cut",
            "--epochs",
            EPOCHS,
            "--max-epochs",
            "1",
            "--upload-to",
            cut_bucket,
        )
    )
    resumed = succeeded(
        run_trainer(
            "lightning_run",
            base / "resumed",
            "--epochs",
            EPOCHS,
            "--upload-to",
            cut_bucket,
            "--resume-from-bucket",
            base / "restore",
        )
    )
    return {"base": base, "full": full, "cut": cut, "resumed": resumed}


def test_every_checkpoint_is_in_the_bucket_when_fit_returns(runs: dict[str, Any]) -> None:
    run_dir = runs["base"] / "full"
    report = last(runs["full"], "bucket")
    local = _checkpoints(run_dir)
    assert set(local) == {
        "epoch=0-step=8.ckpt",
        "epoch=1-step=16.ckpt",
        "epoch=2-step=24.ckpt",
        "last.ckpt",
    }
    # the bytes in the bucket, read right after fit() returned, are the bytes on disk
    for name, digest in local.items():
        assert report["objects"].get(f"rank_0/{name}") == digest, name
    pointer = report["pointers"]["0"]
    committed = {entry["name"] for entry in pointer["history"]}
    assert committed == set(local)
    assert pointer["latest"]["digest"] == recorded_digests(run_dir)["epoch=2-step=24.ckpt"]
    # no worker process left: none among the trainer's children, and the one it ran is gone
    assert report["workers_alive"] == []
    worker = last(runs["full"], "worker")
    assert worker["pid"] and wait_gone(worker["pid"], 5)
    assert last(runs["full"], "end")["global_step"] == EPOCHS * STEPS


def test_resume_on_another_machine_from_fetch_latest(runs: dict[str, Any]) -> None:
    fetched = last(runs["resumed"], "fetched")["path"]
    assert fetched is not None
    assert Path(fetched).parent == runs["base"] / "restore"
    # the cut run's newest checkpoint (last.ckpt is a copy of epoch 0's)
    cut_digests = _checkpoints(runs["base"] / "cut")
    assert files_digest(Path(fetched).parent)[Path(fetched).name] in set(cut_digests.values())
    end, full_end = last(runs["resumed"], "end"), last(runs["full"], "end")
    assert end["global_step"] == EPOCHS * STEPS
    assert end["digest"] == full_end["digest"]  # bit for bit: the uninterrupted weights
    # and the resumed run uploaded its own checkpoints to the same place
    pointer = last(runs["resumed"], "bucket")["pointers"]["0"]
    latest = recorded_digests(runs["base"] / "resumed")["epoch=2-step=24.ckpt"]
    assert pointer["latest"]["digest"] == latest


def test_permanent_store_error_raises_in_training(tmp_path: Path) -> None:
    """The bucket's directory is removed when epoch 1 starts: the next upload fails for
    good, and a later training hook raises WorkerError out of fit()."""
    epochs = 6
    run = run_trainer(
        "lightning_run",
        tmp_path / "run",
        "--epochs",
        epochs,
        "--upload-to",
        _bucket(tmp_path / "bucket"),
        "--remove-bucket-at-epoch",
        "1",
        "--step-sleep",
        "0.1",
    )
    assert run.returncode != 0
    error = last(run, "error")
    assert error["type"] == "WorkerError"
    assert "bucket" in error["message"] or "container" in error["message"]
    # raised while training ran, not only at the end
    assert error["global_step"] < epochs * STEPS, error
    assert "WorkerError" in run.stderr
    assert "end" not in {r.get("event") for r in records(run)}


def test_after_sigkill_of_training_the_worker_uploads_what_is_complete_and_exits(
    tmp_path: Path,
) -> None:
    """Training is SIGKILLed as epoch 2 starts: the worker, left alone, uploads the two
    epochs' checkpoints saved before the kill, commits the newest, and exits by itself."""
    bucket = tmp_path / "bucket"
    run_dir = tmp_path / "run"
    run = run_trainer(
        "lightning_run",
        run_dir,
        "--epochs",
        EPOCHS,
        "--kill-at-epoch",
        "2",
        "--upload-to",
        _bucket(bucket),
    )
    assert run.returncode == -9, run.stderr[-2000:]
    assert wait_gone(last(run, "worker")["pid"], 60), "the worker outlived training by 60 s"
    saved = _checkpoints(run_dir)
    assert set(saved) == {"epoch=0-step=8.ckpt", "epoch=1-step=16.ckpt", "last.ckpt"}
    for name, digest in saved.items():
        assert files_digest(bucket / "rank_0")[name] == digest, name
    with parse_uri(bucket.as_uri()).hparams.initialize_object() as store:
        pointer = read_pointer(store, "", 0)
    assert pointer is not None  # latest: epoch 1's checkpoint (last.ckpt is its copy)
    assert pointer.latest.digest == recorded_digests(run_dir)["epoch=1-step=16.ckpt"], pointer


def test_two_ddp_ranks_upload_each_file_once(tmp_path: Path) -> None:
    """DDP on CPU, 2 gloo processes sharing one checkpoint directory: one worker (on
    local rank 0, as node rank 0) uploads each file exactly once."""
    run_dir = tmp_path / "run"
    run = succeeded(
        run_trainer(
            "lightning_run",
            run_dir,
            "--epochs",
            "2",
            "--devices",
            "2",
            "--upload-to",
            _bucket(tmp_path / "bucket"),
            timeout=240,
        )
    )
    workers = {r["rank"]: r["pid"] for r in records(run) if r.get("event") == "worker"}
    assert set(workers) == {0, 1}
    assert workers[0] is not None and workers[1] is None
    report = last(run, "bucket")
    local = _checkpoints(run_dir)
    assert len(local) == 3  # 2 epochs of 4 steps each rank, and last.ckpt
    assert {k for k in report["objects"] if k.endswith(".ckpt")} == {
        f"rank_0/{name}" for name in local
    }
    assert not [k for k in report["objects"] if not k.startswith("rank_0/")]
    for name, digest in local.items():
        assert report["objects"][f"rank_0/{name}"] == digest
    # the journal holds each checkpoint once, verified, and the log uploaded it once
    rows = journal_rows(run_dir)
    ckpt_rows = {k: v for k, v in rows.items() if k.endswith(".ckpt")}
    assert set(ckpt_rows) == {f"rank_0/{name}" for name in local}
    log = (run_dir / ".ckpt-uploader.log").read_text()
    for name in local:
        assert len(re.findall(rf"verified path={re.escape(name)} ", log)) == 1, name
    assert report["workers_alive"] == []


# -- bad input, before training starts (in this process, with a real Trainer) ------------


@pytest.fixture(scope="module")
def pl() -> Any:
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    import pytorch_lightning

    return pytorch_lightning


def _fit(pl: Any, run_dir: Path, callback: Any, **trainer_kw: Any) -> Any:
    from harness.trainers.lightning_run import _build, _data

    kw: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": run_dir,
    }
    kw.update(trainer_kw)
    callbacks = kw.pop("callbacks", [])
    trainer = pl.Trainer(callbacks=[*callbacks, callback], **kw)
    try:
        trainer.fit(_build(1), train_dataloaders=_data())
    finally:
        assert trainer.global_step == 0  # failed before the first step
    return trainer


def test_callback_is_a_lightning_callback_and_needs_no_import_of_its_own(pl: Any) -> None:
    from uploader.integrations import lightning as integration

    cb = integration.UploaderCallback("file:///tmp/some-bucket")
    assert isinstance(cb, pl.Callback)
    assert integration.UploaderCallback.__module__ == "uploader.integrations.lightning"
    assert "some-bucket" in repr(cb)


def test_with_both_packages_installed_it_is_a_callback_of_both(
    pl: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``lightning.pytorch`` is not installed here: a stand-in module with its own
    Callback class shows the class takes every installed package's Callback as a base."""
    import types

    from uploader.integrations import lightning as integration

    class Callback:  # lightning.pytorch.Callback's stand-in
        pass

    fake = types.ModuleType("lightning.pytorch")
    fake.Callback = Callback  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "lightning", types.ModuleType("lightning"))
    monkeypatch.setitem(sys.modules, "lightning.pytorch", fake)
    cls = integration.__getattr__.build()
    cb = cls("file:///tmp/some-bucket")
    assert isinstance(cb, Callback) and isinstance(cb, pl.Callback)
    assert type(cb).on_fit_start is integration._LightningUploader.on_fit_start


@pytest.mark.parametrize(
    "to",
    ["bogus://bucket/x", "file://relative/dir", "s3://", 42],
    ids=["scheme", "relative-file", "no-bucket", "not-a-uri"],
)
def test_bad_uri_raises_when_the_callback_is_built(pl: Any, to: Any) -> None:
    from uploader.integrations.lightning import UploaderCallback

    with pytest.raises(ConfigError):
        UploaderCallback(to)


def test_unknown_worker_option_is_a_type_error(pl: Any) -> None:
    from uploader.integrations.lightning import UploaderCallback

    with pytest.raises(TypeError, match="keep_locals"):
        UploaderCallback("file:///tmp/b", keep_locals=3)


def test_missing_credential_variable_fails_fit_before_training(
    pl: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from uploader.integrations.lightning import UploaderCallback

    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    cb = UploaderCallback(
        "s3://ckpts/exp?endpoint=http://127.0.0.1:9&key_environ=NO_SUCH_KEY_VAR"
        "&secret_environ=NO_SUCH_KEY_VAR"
    )
    with pytest.raises(ConfigError, match="NO_SUCH_KEY_VAR"):
        _fit(pl, tmp_path / "run", cb)
    assert cb.worker is None


def test_trainer_without_checkpointing_is_refused_before_training(
    pl: Any, tmp_path: Path, local_bucket: Path
) -> None:
    from uploader.integrations.lightning import UploaderCallback

    cb = UploaderCallback(local_bucket.as_uri())
    with pytest.raises(ConfigError, match="enable_checkpointing"):
        _fit(pl, tmp_path / "run", cb, enable_checkpointing=False)
    assert cb.worker is None
    assert not [p for p in psutil.Process().children(recursive=True) if "watch" in p.cmdline()]
