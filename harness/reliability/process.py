"""Faults 1, 4 and 5: kill -9 of the daemon, training SIGKILLed after a save, a slow in-place writer."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from harness.faultproxy import FaultProxy
from harness.reliability.common import (
    ROOT,
    CheckpointWriter,
    Daemon,
    MiB,
    Result,
    _store,
    bucket_audit,
    check_pointer_on_disk,
    journal_rows,
    rclone_server,
    sha256_file,
    wait_gone,
)
from uploader import RetryPolicy
from uploader.bucket.pointer import read_pointer

__all__ = ["scenario_kill9", "scenario_trainer_sigkill", "scenario_slow_writer", "TRAIN_AND_DIE"]

log = logging.getLogger(__name__)


# -- 1. kill -9 of the daemon ------------------------------------------------------------------


def scenario_kill9(
    workdir: Path,
    cycles: int = 30,
    kill_after: tuple[float, float] = (0.3, 3.0),
    interval: float = 0.25,
    sizes: Sequence[int] = (96 << 10, 1536 << 10, 6 * MiB + 12345),
    max_files: int = 400,
    seed: int = 99,
    final_timeout: float = 300.0,
) -> Result:
    """``kill -9`` the daemon at random moments, ``cycles`` times, while checkpoints appear.

    Between daemon and server sits the fault proxy with no faults, recording every
    request, so a re-upload of a file verified before a kill is seen on the wire.
    After each kill the commit pointer is read from the server's directory and every
    object it names is checked complete and correct.
    """
    rng = random.Random(seed)
    run_dir, state_dir = workdir / "run", workdir / "state"
    run_dir.mkdir(parents=True)
    state_dir.mkdir(parents=True)
    prefix, bucket = "kill9", "kill9"
    log_path = workdir / "daemon.log"
    kills: list[tuple[float, set[str]]] = []
    pointer_checks = 0
    pointer_problems: list[str] = []
    t0 = time.monotonic()
    with rclone_server(workdir) as server:
        server.make_bucket(bucket)
        assert server.data_dir is not None
        proxy = FaultProxy(("127.0.0.1", server.port), seed=seed).start()
        writer = CheckpointWriter(run_dir, prefix, sizes, interval, max_files, seed)
        daemon: Daemon | None = None
        try:
            uri = server.uri(bucket, prefix).replace(server.endpoint, proxy.url)
            args = ("--part-size", "5M", "--settle", "0.3", "--retry-seconds", "60", "-v")
            writer.start()
            for _ in range(cycles):
                daemon = Daemon(run_dir, uri, state_dir, *args, log=log_path)
                # One kill in four lands during start-up (recovery); the others count from
                # the moment the daemon runs, so a slow machine still kills mid-stream.
                if rng.random() >= 0.25:
                    daemon.wait_running(60)
                time.sleep(rng.uniform(*kill_after))
                daemon.kill(signal.SIGKILL)
                killed_at = time.time()
                rows = journal_rows(state_dir)
                kills.append((killed_at, {o for o, r in rows.items() if r["state"] == "done"}))
                pointer_checks += 1
                pointer_problems += check_pointer_on_disk(server.data_dir, bucket, prefix, 0)
            expected = writer.finish()
            daemon = Daemon(run_dir, uri, state_dir, *args, "--exit-when-idle", log=log_path)
            code = daemon.wait(final_timeout)
            if code != 0:
                raise AssertionError(f"final daemon run exited {code}:\n{daemon.tail()}")
            pointer_checks += 1
            pointer_problems += check_pointer_on_disk(server.data_dir, bucket, prefix, 0)
        finally:
            writer.stop_event.set()
            if daemon is not None:
                daemon.kill()
            proxy.stop()
        requests = list(proxy.requests)
        reuploaded: set[str] = set()
        for killed_at, done in kills:
            for ts, method, path in requests:
                if ts > killed_at and method in ("PUT", "POST"):
                    obj = path.split("/", 2)[2] if path.count("/") >= 2 else ""
                    if obj in done:
                        reuploaded.add(obj)
        with _store(server, bucket, retry=RetryPolicy(attempts=3)) as store:
            audit = bucket_audit(store, expected, workdir / "audit", [(prefix, 0)])
    verified_before = len(kills[-1][1]) if kills else 0
    return Result(
        "1. kill -9 of the daemon, restarted",
        {
            "cycles": cycles,
            "files": len(expected),
            "verified_before_last_kill": verified_before,
            "reuploaded_after_verify": len(reuploaded),
            "pointer_checks": pointer_checks,
            "bad_pointers": len(pointer_problems) + len(audit.bad_pointers),
            "lost": len(audit.lost),
            "corrupted": len(audit.corrupted),
            "seconds": round(time.monotonic() - t0, 1),
        },
        [
            f"kill after uniform{kill_after}s of each start (3 in 4 counted from the moment "
            f"the daemon runs); a new checkpoint every {interval}s"
        ]
        + pointer_problems[:5]
        + audit.bad_pointers[:5]
        + [f"re-uploaded: {sorted(reuploaded)[:5]}"] * bool(reuploaded),
    )


# -- 4. training SIGKILLed right after a save ---------------------------------------------------

TRAIN_AND_DIE = """
import json, os, signal, sys
import torch
from ckpt import Trainer
from uploader import RunDirectoryUploader

class Model(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.lin = torch.nn.Linear(width, width)
    def forward(self, batch):
        x, y = batch
        return torch.nn.functional.mse_loss(self.lin(x), y)

class DieAfterSave:
    def __init__(self, cb, epoch):
        self.cb, self.epoch = cb, epoch
    def checkpoint_saved(self, trainer, path):
        if path.name == f"ep{self.epoch}.pt":
            print(json.dumps({"worker": self.cb.worker.pid, "path": str(path)}), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

uri, width, epoch, save_async = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
x = torch.randn(16, width)
data = torch.utils.data.TensorDataset(x, x)
cb = RunDirectoryUploader(uri, "trainkill", progress_bar=False, extra_args=["--part-size", "5M"])
Trainer(model=Model(width), train_dataloader=torch.utils.data.DataLoader(data, batch_size=8),
        max_duration="50ep", save_folder="checkpoints", save_async=save_async,
        callbacks=[cb, DieAfterSave(cb, epoch)], seed=0).fit()
"""


def scenario_trainer_sigkill(
    workdir: Path, runs: int = 5, width: int = 1280, time_limit: float = 180.0
) -> Result:
    """Run a real Trainer with RunDirectoryUploader; SIGKILL it right after a save.

    ``width`` sets the model (a width x width linear layer: 1280 -> 6.3 MiB, a
    multipart upload). Runs alternate synchronous and asynchronous saves and
    the epoch they die at. The orphaned worker must upload every checkpoint on
    disk, commit the pointer to the last one, and exit by itself.
    """
    script = workdir / "train_and_die.py"
    script.write_text(TRAIN_AND_DIE)
    bucket = "trainkill"
    files = lost = corrupted = bad = 0
    worker_exit_s: list[float] = []
    t0 = time.monotonic()
    with rclone_server(workdir) as server:
        server.make_bucket(bucket)
        for i in range(runs):
            run_cwd = workdir / f"run{i}"
            run_cwd.mkdir()
            prefix = f"run{i}"
            epoch = 1 + i % 3
            proc = subprocess.run(
                [
                    sys.executable,
                    str(script),
                    server.uri(bucket, prefix),
                    str(width),
                    str(epoch),
                    str(i % 2),
                ],
                cwd=run_cwd,
                capture_output=True,
                timeout=time_limit,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
            if proc.returncode != -signal.SIGKILL:
                raise AssertionError(
                    f"training exited {proc.returncode}:\n{proc.stderr.decode()[-3000:]}"
                )
            info = json.loads(proc.stdout.decode().strip().splitlines()[-1])
            killed = time.monotonic()
            if not wait_gone(int(info["worker"]), time_limit):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(info["worker"]), signal.SIGKILL)
                raise AssertionError("the upload worker outlived the training process")
            worker_exit_s.append(time.monotonic() - killed)
            ckdir = Path(info["path"]).parent
            expected = {
                f"{prefix}/trainkill/rank_0/checkpoints/{p.name}": sha256_file(p)
                for p in sorted(ckdir.glob("*.pt"))
            }
            files += len(expected)
            with _store(server, bucket, retry=RetryPolicy(attempts=3)) as store:
                audit = bucket_audit(
                    store, expected, workdir / "audit", [(f"{prefix}/trainkill", 0)]
                )
                p = read_pointer(store, f"{prefix}/trainkill", 0)
                if p is None or p.latest.name != f"checkpoints/ep{epoch}.pt":
                    bad += 1
            lost += len(audit.lost)
            corrupted += len(audit.corrupted)
            bad += len(audit.bad_pointers)
    return Result(
        "4. training SIGKILLed right after a save",
        {
            "runs": runs,
            "files": files,
            "checkpoint_mib": round(width * (width + 1) * 4 / MiB, 1),
            "max_worker_exit_s": round(max(worker_exit_s), 1),
            "lost": lost,
            "corrupted": corrupted,
            "bad_pointers": bad,
            "seconds": round(time.monotonic() - t0, 1),
        },
        ["alternating save_async False/True; dying after epoch 1, 2 or 3"],
    )


# -- 5. a slow writer writing in place -------------------------------------------------------


def scenario_slow_writer(
    workdir: Path,
    files: int = 4,
    write_seconds: float = 8.0,
    chunks: int = 8,
    size: int = 6 * MiB,
    seed: int = 5,
    time_limit: float = 300.0,
) -> Result:
    """Write files in place over ``write_seconds`` (pauses up to 1.5x ``--settle``), then
    rewrite each once. No byte may be sent for a version before it is complete, and
    the rewritten version must be uploaded again.

    The daemon talks to the server through the (fault-free) proxy, whose request
    log shows when each object was first written.
    """
    rng = random.Random(seed)
    run_dir, state_dir = workdir / "run", workdir / "state"
    run_dir.mkdir(parents=True)
    state_dir.mkdir()
    prefix, bucket = "slow", "slow"
    early: list[str] = []
    rewrites_uploaded = 0
    t0 = time.monotonic()
    with rclone_server(workdir) as server:
        server.make_bucket(bucket)
        proxy = FaultProxy(("127.0.0.1", server.port), seed=seed).start()
        daemon: Daemon | None = None
        try:
            uri = server.uri(bucket, prefix).replace(server.endpoint, proxy.url)
            daemon = Daemon(
                run_dir,
                uri,
                state_dir,
                "--settle",
                "1.0",
                "--part-size",
                "5M",
                log=workdir / "daemon.log",
            )
            time.sleep(1.0)
            expected: dict[str, str] = {}
            for version in (0, 1):
                for i in range(files):
                    rel = f"checkpoints/slow{i}.pt"
                    obj = f"{prefix}/rank_0/{rel}"
                    path = run_dir / rel
                    path.parent.mkdir(parents=True, exist_ok=True)
                    data = random.Random(seed * 100 + i * 10 + version).randbytes(size)
                    started = time.time()
                    with open(path, "wb") as f:  # in place: no temporary name
                        step = -(-size // chunks)
                        for c in range(chunks):
                            f.write(data[c * step : (c + 1) * step])
                            f.flush()
                            time.sleep(rng.uniform(0.2, 2 * write_seconds / chunks - 0.2))
                    closed = time.time()
                    for ts, method, path_ in list(proxy.requests):
                        if (
                            started <= ts < closed
                            and method in ("PUT", "POST")
                            and path_ == f"/{bucket}/{obj}"
                        ):
                            early.append(f"{obj} v{version}")
                    expected[obj] = hashlib.sha256(data).hexdigest()
                # Wait (bounded) until every object holds this version.
                deadline = time.monotonic() + time_limit
                while time.monotonic() < deadline:
                    rows = journal_rows(state_dir)
                    if all(
                        rows.get(o, {}).get("state") == "done"
                        and rows[o]["digest"]
                        and rows[o]["size"] == size
                        and (run_dir / rows[o]["path"]).stat().st_mtime_ns == rows[o]["mtime_ns"]
                        for o in expected
                    ):
                        break
                    time.sleep(0.3)
                else:
                    raise TimeoutError(f"slow-writer files not uploaded:\n{daemon.tail()}")
                if version == 1:
                    data_dir = server.data_dir
                    assert data_dir is not None
                    rewrites_uploaded = sum(
                        sha256_file(data_dir / bucket / o) == s for o, s in expected.items()
                    )
        finally:
            if daemon is not None:
                daemon.kill(signal.SIGTERM)
            proxy.stop()
        with _store(server, bucket, retry=RetryPolicy(attempts=3)) as store:
            audit = bucket_audit(store, expected, workdir / "audit", [(prefix, 0)])
    return Result(
        "5. slow in-place writer, then a rewrite",
        {
            "files": files,
            "versions": 2,
            "write_seconds": write_seconds,
            "uploaded_before_complete": len(early),
            "rewrites_uploaded": rewrites_uploaded,
            "lost": len(audit.lost),
            "corrupted": len(audit.corrupted),
            "bad_pointers": len(audit.bad_pointers),
            "seconds": round(time.monotonic() - t0, 1),
        },
        [
            f"{chunks} writes per file, pauses of 0.2-{2 * write_seconds / chunks - 0.2:.1f}s "
            "(longer than --settle 1.0), file open throughout"
        ],
    )
