"""RunDirectoryUploader with the real Trainer: a worker process per rank, failures, SIGKILL.

Everything is real: ckpt.Trainer trains a tiny model, the callback starts
``python -m uploader watch`` as a child process, the store is rclone's S3 server
(with SigV4 credentials that reach the worker only through its environment) or
a local directory bucket.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

from ckpt import Trainer
from harness.data import bytes_digest
from harness.reliability import wait_gone
from harness.servers.s3 import S3Server
from uploader import ObjectStoreHparams, RunDirectoryUploader, WorkerError
from uploader.bucket.pointer import read_pointer


class TinyModel(torch.nn.Module):
    """forward(batch) returns the scalar loss, as the Trainer expects."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)

    def forward(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.lin(x), y)


def tiny_loader(n: int = 16, batch_size: int = 8) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = x.sum(dim=1, keepdim=True)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


class Probe:
    """Records what the worker process looks like while training runs."""

    def __init__(self, uploader: RunDirectoryUploader) -> None:
        self.uploader = uploader
        self.seen: dict[str, Any] = {}

    def batch_end(self, trainer: Any) -> None:
        if self.seen:
            return
        worker = self.uploader.worker
        assert worker is not None and worker.pid is not None
        pid = worker.pid
        # Right after fork the child may not have exec'd yet: wait (bounded) for its
        # own command line before reading it.
        deadline = time.monotonic() + 10
        cmdline = b""
        while time.monotonic() < deadline:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"uploader" in cmdline:
                break
            time.sleep(0.02)
        self.seen = {
            "pid": pid,
            "sid": os.getsid(pid),
            "cmdline": cmdline.split(b"\0"),
            "environ": _environ(pid),
        }


def _environ(pid: int) -> list[bytes] | None:
    """The worker's environment; None when it is private (the worker marks itself
    non-dumpable, so only root may read it: see uploader/daemon/privacy.py)."""
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except PermissionError:
        return None


def test_seed_usage_uploads_from_a_worker_process_and_fine_tunes(
    rclone_s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    bucket = f"seed-usage-{uuid.uuid4().hex[:8]}"
    rclone_s3.make_bucket(bucket)
    prefix = "exp1"
    # The seed's usage, with our import paths.
    hp = ObjectStoreHparams(
        provider="s3",
        container=bucket,
        key_environ=rclone_s3.key_env,
        secret_environ=rclone_s3.secret_env,
        host=rclone_s3.host,
        port=rclone_s3.port,
    )
    store_uploader = RunDirectoryUploader(hp, object_name_prefix=prefix, progress_bar=False)
    probe = Probe(store_uploader)
    model = TinyModel()
    trainer = Trainer(
        model=model,
        train_dataloader=tiny_loader(),
        eval_dataloader=None,
        max_duration="2ep",
        save_folder="checkpoints",
        callbacks=[store_uploader, probe],
        seed=1,
    )
    trainer.fit()

    # A separate process in its own session; credentials by name on argv, by value in env.
    seen = probe.seen
    assert seen["pid"] != os.getpid()
    assert seen["sid"] == seen["pid"]
    secret = os.environ[rclone_s3.secret_env].encode()
    key = os.environ[rclone_s3.key_env].encode()
    argv = b" ".join(seen["cmdline"])
    assert secret not in argv and key not in argv
    assert rclone_s3.secret_env.encode() in argv
    if seen["environ"] is not None:  # readable by root only
        assert f"{rclone_s3.secret_env}=".encode() + secret in seen["environ"]

    # fit() returned after the drain: the worker is gone, every checkpoint is verified.
    worker = store_uploader.worker
    assert worker is not None and worker.exit_code == 0
    assert wait_gone(seen["pid"], 1)
    assert store_uploader.final_status is not None
    assert store_uploader.final_status.done == 2
    store = hp.initialize_object()
    names = {i.name for i in store.list(prefix)}
    assert f"{prefix}/rank_0/checkpoints/ep1.pt" in names
    assert f"{prefix}/rank_0/checkpoints/ep2.pt" in names
    pointer = read_pointer(store, prefix, 0)
    assert pointer is not None and pointer.latest.name == "checkpoints/ep2.pt"
    assert trainer.run_directory is not None
    local = trainer.run_directory / "checkpoints" / "ep1.pt"
    assert store.stat(f"{prefix}/rank_0/checkpoints/ep1.pt").size == local.stat().st_size

    # Fine-tune from the bucket, as in the seed.
    ft_model = TinyModel()
    Trainer(
        model=ft_model,
        train_dataloader=tiny_loader(),
        max_duration="1ep",
        load_path_format=f"{prefix}/rank_0/checkpoints/ep1.pt",
        load_object_store=hp.initialize_object(),
        load_weights_only=True,
        load_progress_bar=False,
    )
    saved = torch.load(local, map_location="cpu", weights_only=False)["state"]["model"]
    for name, value in ft_model.state_dict().items():
        assert torch.equal(value, saved[name]), name


class DeleteBucketAfterFirstUpload:
    """A permanent upload error: the bucket disappears once the first checkpoint is in it."""

    def __init__(self, bucket: Path) -> None:
        self.bucket = bucket
        self.deleted_at_epoch: int | None = None

    def batch_end(self, trainer: Any) -> None:
        if self.deleted_at_epoch is None and (self.bucket / "exp/rank_0/latest.json").exists():
            # Atomically: the worker may be writing into the bucket at this moment, so a
            # recursive delete could race with it; a rename makes the container vanish at once.
            os.rename(self.bucket, self.bucket.with_name("bucket-removed"))
            self.deleted_at_epoch = trainer.timer.epoch
        time.sleep(0.05)  # training takes time; bounded by max_duration


def test_permanent_upload_error_is_raised_at_the_next_event(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    cb = RunDirectoryUploader(
        ObjectStoreHparams(provider="local", container=str(bucket)),
        "exp",
        progress_bar=False,
        check_interval=0.2,
    )
    chaos = DeleteBucketAfterFirstUpload(bucket)
    trainer = Trainer(
        model=TinyModel(),
        train_dataloader=tiny_loader(n=16, batch_size=4),
        max_duration="100ep",  # ~20 s if the error were never raised
        save_folder="checkpoints",
        callbacks=[chaos, cb],
        seed=0,
    )
    t0 = time.monotonic()
    with pytest.raises(WorkerError) as err:
        trainer.fit()
    message = str(err.value)
    assert "rank 0" in message and "could not upload" in message
    assert str(bucket) in message  # the worker's own reason: the container is gone
    assert err.value.last_error
    assert chaos.deleted_at_epoch is not None
    assert trainer.timer.epoch < 100 and time.monotonic() - t0 < 20
    # The worker keeps running (it still owns the journal); stop it.
    assert cb.worker is not None
    cb.worker.kill()


class KillWorkerAtEpoch:
    def __init__(self, uploader: RunDirectoryUploader, epoch: int) -> None:
        self.uploader = uploader
        self.epoch = epoch

    def epoch_end(self, trainer: Any) -> None:
        if trainer.timer.epoch == self.epoch:
            worker = self.uploader.worker
            assert worker is not None and worker.proc is not None
            os.kill(worker.proc.pid, signal.SIGKILL)
            worker.proc.wait(timeout=10)


def test_worker_crash_is_raised_at_the_next_event(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    cb = RunDirectoryUploader(
        ObjectStoreHparams(provider="local", container=str(bucket)), "exp", progress_bar=False
    )
    trainer = Trainer(
        model=TinyModel(),
        train_dataloader=tiny_loader(),
        max_duration="5ep",
        save_folder="checkpoints",
        callbacks=[cb, KillWorkerAtEpoch(cb, 2)],
        seed=0,
    )
    with pytest.raises(WorkerError, match="killed by signal 9") as err:
        trainer.fit()
    assert err.value.worker_exit_code == -signal.SIGKILL
    assert trainer.timer.epoch == 2  # raised at the event right after the crash


def test_config_error_of_the_worker_fails_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A missing bucket is a configuration error (exit 2): fit raises with the reason."""
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "no-such-bucket"
    cb = RunDirectoryUploader(
        ObjectStoreHparams(provider="local", container=str(missing)), "exp", progress_bar=False
    )
    trainer = Trainer(
        model=TinyModel(),
        train_dataloader=tiny_loader(),
        max_duration="1ep",
        save_folder="checkpoints",
        callbacks=[cb],
    )
    with pytest.raises(WorkerError) as err:
        trainer.fit()
    assert err.value.worker_exit_code == 2
    assert "configuration" in str(err.value) and "no-such-bucket" in str(err.value)


def test_credentials_missing_from_the_environment_fail_before_spawning(
    tmp_path: Path,
) -> None:
    from types import SimpleNamespace

    from uploader import ConfigError

    cb = RunDirectoryUploader(
        ObjectStoreHparams(
            provider="s3",
            container="b",
            key_environ="CKPT_TEST_SURELY_UNSET_KEY",
            secret_environ="CKPT_TEST_SURELY_UNSET_SECRET",
        ),
        "exp",
    )
    trainer = SimpleNamespace(rank=0, world_size=1, run_directory=tmp_path / "run")
    with pytest.raises(ConfigError, match="CKPT_TEST_SURELY_UNSET_KEY"):
        cb.fit_start(trainer)
    assert cb.worker is None or cb.worker.proc is None


def test_events_never_wait_for_uploads_only_fit_end_does(tmp_path: Path) -> None:
    """With uploads slowed to 256 KiB/s, 200 events take a blink; fit_end waits for them.

    The trainer here is a plain object with the attributes the callback reads
    (the Trainer's duck-typed contract), so the test controls every event.
    """
    from types import SimpleNamespace

    bucket = tmp_path / "bucket"
    bucket.mkdir()
    run = tmp_path / "runs" / "t" / "rank_0"
    trainer = SimpleNamespace(rank=0, world_size=1, run_directory=run)
    cb = RunDirectoryUploader(
        ObjectStoreHparams(provider="local", container=str(bucket)),
        "exp",
        progress_bar=False,
        extra_args=["--bwlimit", "256K", "--part-size", "64K"],
    )
    cb.fit_start(trainer)
    (run / "checkpoints").mkdir(parents=True)
    tmp = run / "checkpoints" / ".ep1.pt.tmp"
    tmp.write_bytes(os.urandom(1 << 20))
    os.replace(tmp, run / "checkpoints" / "ep1.pt")
    cb.checkpoint_saved(trainer, run / "checkpoints" / "ep1.pt")
    t0 = time.monotonic()
    for _ in range(200):
        cb.batch_end(trainer)
    events = time.monotonic() - t0
    t1 = time.monotonic()
    cb.fit_end(trainer)
    drain = time.monotonic() - t1
    assert cb.final_status is not None and cb.final_status.done == 1
    # 1 MiB at 256 KiB/s: about 3 s, all of it spent in fit_end, none in the events.
    assert drain > 2.0, drain
    assert events < drain / 4, (events, drain)


class FailAtEpoch:
    """A callback that makes training fail at the end of epoch ``n``."""

    def __init__(self, n: int) -> None:
        self.n = n

    def epoch_end(self, trainer: Any) -> None:
        if trainer.timer.epoch >= self.n:
            raise RuntimeError("loss is NaN")


def test_training_error_still_uploads_saved_checkpoints_and_keeps_the_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    cb = RunDirectoryUploader(
        ObjectStoreHparams(provider="local", container=str(bucket)), "exp", progress_bar=False
    )
    trainer = Trainer(
        model=TinyModel(),
        train_dataloader=tiny_loader(),
        max_duration="5ep",
        save_folder="checkpoints",
        save_interval="1ep",
        callbacks=[FailAtEpoch(3), cb],
        seed=1,
    )
    with pytest.raises(RuntimeError, match="loss is NaN"):
        trainer.fit()
    # The error propagated only after the worker drained: ep1 and ep2 are in the bucket.
    assert cb.worker is not None and cb.worker.finished
    assert cb.final_status is not None and cb.final_status.failed == 0
    stored = sorted(p.name for p in (bucket / "exp" / "rank_0" / "checkpoints").glob("ep*.pt"))
    assert stored == ["ep1.pt", "ep2.pt"]
    local = trainer.checkpoint_saver.checkpoint_folder
    for name in stored:
        assert (bucket / "exp" / "rank_0" / "checkpoints" / name).read_bytes() == (
            local / name
        ).read_bytes()


def test_drain_timeout_raises_and_the_journal_finishes_the_upload_later(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from uploader.launch.worker import UploadWorker

    bucket = tmp_path / "bucket"
    bucket.mkdir()
    hp = ObjectStoreHparams(provider="local", container=str(bucket))
    run = tmp_path / "runs" / "t" / "rank_0"
    trainer = SimpleNamespace(rank=0, world_size=1, run_directory=run)
    cb = RunDirectoryUploader(
        hp,
        "exp",
        progress_bar=False,
        drain_timeout=1,
        extra_args=["--bwlimit", "64K", "--part-size", "64K"],
    )
    cb.fit_start(trainer)
    (run / "checkpoints").mkdir(parents=True)
    data = os.urandom(1 << 20)  # 16 s at 64 KiB/s: cannot finish in 1 s
    tmp = run / "checkpoints" / ".ep1.pt.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, run / "checkpoints" / "ep1.pt")
    with pytest.raises(WorkerError, match="drain timeout") as err:
        cb.fit_end(trainer)
    assert err.value.worker_exit_code == 3
    assert "--exit-when-idle" in str(err.value)  # says how to finish
    store = hp.initialize_object()
    assert not store.exists("exp/rank_0/checkpoints/ep1.pt")

    # What the message suggests: a worker on the same journal finishes the upload.
    later = UploadWorker(
        run, hparams=hp, prefix="exp", rank=0, drain_timeout=60, extra_args=["--exit-when-idle"]
    ).start()
    assert later.proc is not None and later.proc.wait(timeout=60) == 0
    later.kill()  # already gone: only closes its log file
    assert store.get_bytes("exp/rank_0/checkpoints/ep1.pt") == data


TRAIN_AND_DIE = textwrap.dedent(
    """
    import json, os, signal
    import torch
    from ckpt import Trainer
    from uploader import ObjectStoreHparams, RunDirectoryUploader

    class TinyModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)
        def forward(self, batch):
            x, y = batch
            return torch.nn.functional.mse_loss(self.lin(x), y)

    class DieAfterSave:
        def __init__(self, cb):
            self.cb = cb
        def checkpoint_saved(self, trainer, path):
            if path.name == "ep2.pt":
                print(json.dumps({{"worker": self.cb.worker.pid, "path": str(path)}}), flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

    x = torch.randn(16, 4)
    data = torch.utils.data.TensorDataset(x, x.sum(dim=1, keepdim=True))
    cb = RunDirectoryUploader(ObjectStoreHparams(provider="local", container={bucket!r}), "exp",
                              progress_bar=False)
    Trainer(model=TinyModel(), train_dataloader=torch.utils.data.DataLoader(data, batch_size=8),
            max_duration="50ep", save_folder="checkpoints", save_async=False,
            callbacks=[cb, DieAfterSave(cb)], seed=0).fit()
    """
)


def test_sigkill_of_training_right_after_a_save_still_uploads_it(tmp_path: Path) -> None:
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    script = tmp_path / "train.py"
    script.write_text(TRAIN_AND_DIE.format(bucket=str(bucket)))
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    info = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    worker_pid = info["worker"]
    # The orphaned worker finishes the checkpoint and exits by itself.
    assert wait_gone(worker_pid, 60), "the upload worker outlived the training process"
    store = ObjectStoreHparams(provider="local", container=str(bucket)).initialize_object()
    pointer = read_pointer(store, "exp", 0)
    assert pointer is not None and pointer.latest.name == "checkpoints/ep2.pt"
    local = Path(info["path"])
    data = store.get_bytes("exp/rank_0/checkpoints/ep2.pt")
    assert hashlib.sha256(data).hexdigest() == hashlib.sha256(local.read_bytes()).hexdigest()
    assert pointer.latest.digest == bytes_digest(data)


def test_make_demo_trains_uploads_and_resumes_from_latest(tmp_path: Path) -> None:
    """What `make demo` runs, into a temporary output directory."""
    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "demo-output"
    proc = subprocess.run(
        [sys.executable, "-m", "examples.demo", "--output", str(out)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert "uploader worker pid" in text and "3 checkpoints verified" in text
    assert "done 3" in text and "failed 0" in text  # `ckpt-uploader status`
    assert "resuming from latest = rank_0/checkpoints/ep3.pt (verified crc64nvme:" in text
    assert "latest is now rank_0/checkpoints/ep5.pt" in text
    store = ObjectStoreHparams(provider="local", container=str(out / "bucket")).initialize_object()
    pointer = read_pointer(store, "demo", 0)
    assert pointer is not None and pointer.latest.name == "checkpoints/ep5.pt"
    assert len(text.splitlines()) < 40  # a few readable lines
