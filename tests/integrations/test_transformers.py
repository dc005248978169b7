"""uploader.integrations.transformers.UploaderCallback with the real Hugging Face Trainer.

Training runs in its own process (harness/trainers/hf_run.py with ``--upload-to``), which
prints what the bucket holds right after ``train()`` returns and whether a worker process
is still alive. The uninterrupted run uploads to rclone's S3 server (SigV4 credentials
reach the worker only through its environment); the run killed with SIGKILL in the middle
of a save, and its resume on another machine, use a local directory bucket. Bad input is
checked in this process, with a real Trainer that must fail before its first step.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from harness.reliability import wait_gone
from harness.servers.s3 import S3Server
from harness.trainers import HF_FILES, files_digest, last, records, run_trainer, succeeded
from uploader import ConfigError, parse_uri
from uploader.bucket.pointer import read_pointer

pytestmark = pytest.mark.timeout(300)

Run = subprocess.CompletedProcess[str]
KILLED = -9


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, rclone_s3: S3Server) -> dict[str, Any]:
    """An uninterrupted run (to S3); a run SIGKILLed while saving step 16 (to a local
    bucket); and, once the killed run's worker is gone, its resume in a new directory
    from what that worker uploaded."""
    base = tmp_path_factory.mktemp("hf")
    if not rclone_s3.alive():
        rclone_s3.start()
    bucket = f"hf-{uuid.uuid4().hex[:10]}"
    rclone_s3.make_bucket(bucket)
    s3_uri = rclone_s3.uri(bucket, "exp1")
    full = succeeded(run_trainer("hf_run", base / "full", "--upload-to", s3_uri))
    local = base / "bucket"
    local.mkdir()
    killed = run_trainer(
        "hf_run", base / "killed", "--kill-mid-save", "16", "--upload-to", local.as_uri()
    )
    worker_pid = last(killed, "worker")["pid"]
    worker_gone = wait_gone(worker_pid, 60)
    with parse_uri(local.as_uri()).hparams.initialize_object() as store:
        after_kill = read_pointer(store, "", 0)  # before the resume commits more
    resumed = succeeded(
        run_trainer(
            "hf_run",
            base / "resumed",
            "--upload-to",
            local.as_uri(),
            "--resume-from-bucket",
            base / "restore",
        )
    )
    return {
        "base": base,
        "s3_uri": s3_uri,
        "local": local,
        "full": full,
        "killed": killed,
        "worker_gone": worker_gone,
        "after_kill": after_kill,
        "resumed": resumed,
    }


def test_every_checkpoint_is_in_the_s3_bucket_when_train_returns(runs: dict[str, Any]) -> None:
    run_dir = runs["base"] / "full"
    report = last(runs["full"], "bucket")
    local = files_digest(run_dir)
    checkpoints = {k: v for k, v in local.items() if k.startswith("checkpoint-")}
    assert {k.split("/")[0] for k in checkpoints} == {"checkpoint-8", "checkpoint-16"}
    assert {k.split("/")[1] for k in checkpoints} == HF_FILES
    for name, digest in checkpoints.items():
        assert report["objects"].get(f"exp1/rank_0/{name}") == digest, name
    pointer = report["pointers"]["0"]
    assert {e["name"] for e in pointer["history"]} == {"checkpoint-8", "checkpoint-16"}
    assert pointer["latest"]["name"] == "checkpoint-16"
    assert report["workers_alive"] == []
    assert wait_gone(last(runs["full"], "worker")["pid"], 5)
    assert last(runs["full"], "end")["global_step"] == 16


def test_after_sigkill_the_worker_uploads_what_is_complete_and_exits(
    runs: dict[str, Any],
) -> None:
    assert runs["killed"].returncode == KILLED
    assert runs["worker_gone"], "the worker did not exit within 60 s of training's SIGKILL"
    pointer = runs["after_kill"]
    assert pointer is not None
    # checkpoint-16 lost its trainer_state.json to the kill: never committed
    assert pointer.latest.name == "checkpoint-8"
    assert {e.name for e in pointer.history} == {"checkpoint-8"}
    killed_dir = runs["base"] / "killed"
    for name, digest in files_digest(killed_dir / "checkpoint-8").items():
        assert (runs["local"] / "rank_0" / "checkpoint-8" / name).read_bytes() == (
            killed_dir / "checkpoint-8" / name
        ).read_bytes(), digest


def test_resume_on_another_machine_from_fetch_latest(runs: dict[str, Any]) -> None:
    fetched = Path(last(runs["resumed"], "fetched")["path"])
    assert fetched == runs["base"] / "restore" / "checkpoint-8"
    assert {p.name for p in fetched.iterdir()} == HF_FILES
    end = last(runs["resumed"], "end")
    assert end["global_step"] == 16
    assert end["digest"] == last(runs["full"], "end")["digest"]  # bit for bit
    pointer = last(runs["resumed"], "bucket")["pointers"]["0"]
    assert pointer["latest"]["name"] == "checkpoint-16"


# -- bad input, before training starts (in this process, with a real Trainer) ------------


@pytest.fixture(scope="module")
def hf() -> Any:
    from harness.trainers.common import go_offline

    go_offline()
    import transformers

    return transformers


def _train(hf: Any, run_dir: Path, callback: Any, **args_kw: Any) -> Any:
    from harness.trainers.hf_run import BATCH, _dataset

    config = hf.BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=8,
        num_labels=2,
    )
    kw: dict[str, Any] = {
        "output_dir": os.fspath(run_dir),
        "max_steps": 4,
        "save_strategy": "steps",
        "save_steps": 2,
        "per_device_train_batch_size": BATCH,
        "report_to": "none",
        "disable_tqdm": True,
        "use_cpu": True,
    }
    kw.update(args_kw)
    trainer = hf.Trainer(
        model=hf.BertForSequenceClassification(config),
        args=hf.TrainingArguments(**kw),
        train_dataset=_dataset(),
        callbacks=[callback],
    )
    try:
        trainer.train()
    finally:
        assert trainer.state.global_step == 0  # failed before the first step
    return trainer


def test_permanent_store_error_raises_in_training(tmp_path: Path) -> None:
    """The bucket's directory is taken away when step 9 begins (after the first save):
    the next upload fails for good, and a later step raises WorkerError out of train()."""
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    steps = 40
    run = run_trainer(
        "hf_run",
        tmp_path / "run",
        "--save-steps",
        "8",
        "--max-steps",
        steps,
        "--upload-to",
        bucket.as_uri(),
        "--remove-bucket-at-step",
        "9",
        "--step-sleep",
        "0.1",
    )
    assert run.returncode != 0
    error = last(run, "error")
    assert error["type"] == "WorkerError", error
    assert "bucket" in error["message"] or "container" in error["message"]
    assert error["global_step"] < steps, error  # raised while training ran
    assert "WorkerError" in run.stderr
    assert "end" not in {r.get("event") for r in records(run)}


def test_callback_is_a_trainer_callback(hf: Any) -> None:
    from uploader.integrations.transformers import UploaderCallback

    cb = UploaderCallback("file:///tmp/some-bucket", keep_local=2)
    assert isinstance(cb, hf.TrainerCallback)
    assert UploaderCallback.__module__ == "uploader.integrations.transformers"


@pytest.mark.parametrize("to", ["bogus://bucket/x", "file://relative/dir", None])
def test_bad_uri_raises_when_the_callback_is_built(hf: Any, to: Any) -> None:
    from uploader.integrations.transformers import UploaderCallback

    with pytest.raises(ConfigError):
        UploaderCallback(to)


def test_save_strategy_no_is_refused_before_training(
    hf: Any, tmp_path: Path, local_bucket: Path
) -> None:
    from uploader.integrations.transformers import UploaderCallback

    cb = UploaderCallback(local_bucket.as_uri())
    with pytest.raises(ConfigError, match="save_strategy"):
        _train(hf, tmp_path / "run", cb, save_strategy="no")
    assert cb.worker is None


def test_missing_credential_variable_fails_train_before_training(
    hf: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from uploader.integrations.transformers import UploaderCallback

    monkeypatch.delenv("NO_SUCH_SECRET_VAR", raising=False)
    monkeypatch.setenv("SOME_KEY_VAR", "AKIAEXAMPLE")
    cb = UploaderCallback(
        "s3://ckpts/exp?endpoint=http://127.0.0.1:9&key_environ=SOME_KEY_VAR"
        "&secret_environ=NO_SUCH_SECRET_VAR"
    )
    with pytest.raises(ConfigError, match="NO_SUCH_SECRET_VAR"):
        _train(hf, tmp_path / "run", cb)
    assert cb.worker is None
