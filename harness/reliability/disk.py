"""Faults 6 and 7: the local disk full while saving, and an object corrupted in the bucket."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness.reliability.common import (
    ROOT,
    Daemon,
    MiB,
    Result,
    _store,
    bucket_audit,
    rclone_server,
    sha256_file,
)
from uploader import RetryPolicy

__all__ = [
    "small_filesystem",
    "enospc_after",
    "scenario_disk_full",
    "scenario_disk_full_late_start",
    "scenario_corrupt_object",
]

log = logging.getLogger(__name__)


# -- 6. local disk full while saving -------------------------------------------------------------


@contextlib.contextmanager
def small_filesystem(path: Path, size_mib: int) -> Iterator[bool]:
    """Mount a ``size_mib`` tmpfs on ``path``; yields False where the machine refuses."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0700", "tmpfs", str(path)],
            capture_output=True,
            timeout=30,
        )
        mounted = r.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        mounted = False
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


@contextlib.contextmanager
def enospc_after(limit_bytes: int, folder: Path) -> Iterator[None]:
    """Fallback where no small filesystem can be mounted: ``torch.save`` inside the
    checkpoint writer raises ENOSPC once ``folder`` holds ``limit_bytes`` (injected at
    the write layer, after writing part of the file, as a full disk would)."""
    import errno

    import ckpt.saver as saver

    real = saver.torch.save

    def save(obj: Any, f: Any, *a: Any, **kw: Any) -> None:
        used = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        if used >= limit_bytes:
            with (
                open(f, "wb")
                if isinstance(f, (str, os.PathLike))
                else contextlib.nullcontext(f) as out
            ):
                out.write(b"\0" * 4096)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(obj, f, *a, **kw)

    saver.torch.save = save
    try:
        yield
    finally:
        saver.torch.save = real


def scenario_disk_full(
    workdir: Path,
    fs_mib: int = 8,
    width: int = 512,
    epochs: int = 40,
    force_inject: bool = False,
    journal_on_full_disk: bool = False,
) -> Result:
    """Train with checkpoints going to a ``fs_mib`` filesystem until it is full.

    The Trainer must stop with a clear error naming the cause; every checkpoint
    saved before must still be on disk, intact, and uploaded by the worker (which
    keeps running and drains normally); no partial file may be left.
    """
    import torch

    from ckpt import Trainer
    from ckpt.errors import CheckpointError
    from uploader import RunDirectoryUploader

    mount = workdir / "small"
    bucket, prefix = "diskfull", "diskfull"
    with rclone_server(workdir) as server, small_filesystem(mount, fs_mib) as mounted:
        server.make_bucket(bucket)
        run_dir = mount / "run"
        inject = (
            contextlib.nullcontext()
            if mounted and not force_inject
            else enospc_after(fs_mib * MiB - 2 * MiB, mount)
        )
        torch.manual_seed(0)
        model = torch.nn.Linear(width, width)
        x = torch.randn(16, width)
        data = torch.utils.data.TensorDataset(x, x)
        # journal_on_full_disk: the journal stays in the run directory (the default), on
        # the disk that fills up, and uploads are throttled so that journal updates are
        # still due when it is full. Otherwise the journal lives on another disk.
        cb = RunDirectoryUploader(
            server.uri(bucket, prefix),
            progress_bar=False,
            state_dir=None if journal_on_full_disk else workdir / "state",
            extra_args=["--settle", "0.2"]
            + (["--bwlimit", "1M", "--files", "1"] if journal_on_full_disk else []),
        )
        error: BaseException | None = None
        try:
            with inject:
                Trainer(
                    model=model,
                    train_dataloader=torch.utils.data.DataLoader(data, batch_size=8),
                    max_duration=f"{epochs}ep",
                    loss_fn=torch.nn.functional.mse_loss,
                    save_folder=str(run_dir),
                    save_async=True,
                    callbacks=[cb],
                    seed=0,
                ).fit()
        except CheckpointError as exc:
            error = exc
        finally:
            final = cb.close(timeout=120)
        worker_log = (run_dir if journal_on_full_disk else workdir / "state") / ".ckpt-uploader.log"
        errors = [
            line.split(" ERROR ", 1)[1]
            for line in (
                worker_log.read_text(errors="replace") if worker_log.exists() else ""
            ).splitlines()
            if " ERROR " in line
        ]
        causes = [
            line.strip()
            for line in (
                worker_log.read_text(errors="replace") if worker_log.exists() else ""
            ).splitlines()
            if line.startswith(("sqlite3.", "OSError", "PermissionError"))
        ]
        worker_error = "; ".join(errors[:1] + causes[:1])
        saved = sorted(run_dir.glob("*.pt"))
        leftovers = [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]
        expected = {f"{prefix}/rank_0/{p.name}": sha256_file(p) for p in saved}
        with _store(server, bucket, retry=RetryPolicy(attempts=3)) as store:
            audit = bucket_audit(store, expected, workdir / "audit", [(prefix, 0)])
    message = str(error) if error is not None else ""
    return Result(
        "6. local disk full while saving"
        + (" (journal on the full disk)" if journal_on_full_disk else ""),
        {
            "filesystem": f"tmpfs {fs_mib} MiB"
            if mounted and not force_inject
            else "ENOSPC injected",
            "files": len(saved),
            "saved_before_full": len(saved),
            "clear_error": int("space" in message.lower()),
            "partial_files_left": len(leftovers),
            "uploaded": final.done if final is not None else 0,
            "lost": len(audit.lost),
            "corrupted": len(audit.corrupted),
            "bad_pointers": len(audit.bad_pointers),
        },
        [message.splitlines()[0][:300] if message else "no error raised"]
        + [f"upload worker: {worker_error[:300]}"] * bool(worker_error),
    )


def scenario_disk_full_late_start(workdir: Path, fs_mib: int = 16, width: int = 512) -> Result:
    """The uploader starts only after training has filled the disk to the last byte
    (a sidecar restarted late): no reserve can be set aside and the journal cannot be
    written. Every checkpoint must still be uploaded and verified, with the journal
    held in memory; once space is freed, a second run records them all.
    """
    import torch

    from ckpt import Trainer
    from ckpt.errors import CheckpointError
    from uploader.daemon.journal import Journal

    mount = workdir / "small"
    bucket, prefix = "latestart", "latestart"
    with rclone_server(workdir) as server, small_filesystem(mount, fs_mib) as mounted:
        if not mounted:
            raise AssertionError("could not mount a tmpfs (this case needs root)")
        server.make_bucket(bucket)
        run_dir = mount / "run"
        run_dir.mkdir()
        # 2 MiB set aside now and topped up to the last byte after training: removing
        # it later is "the operator frees space".
        ballast = run_dir / ".ballast.tmp"  # a temporary name: never uploaded
        ballast.write_bytes(b"\0" * (2 * MiB))
        torch.manual_seed(0)
        model = torch.nn.Linear(width, width)
        x = torch.randn(16, width)
        data = torch.utils.data.TensorDataset(x, x)
        stopped = ""
        try:
            Trainer(
                model=model,
                train_dataloader=torch.utils.data.DataLoader(data, batch_size=8),
                max_duration="1000ep",
                loss_fn=torch.nn.functional.mse_loss,
                save_folder=str(run_dir),
                seed=0,
            ).fit()
        except CheckpointError as exc:
            stopped = str(exc).splitlines()[0][:160]
        fd = os.open(ballast, os.O_WRONLY | os.O_APPEND)
        try:
            for _ in range(1 << 20):
                os.write(fd, b"\0" * 4096)
        except OSError:
            pass
        finally:
            os.close(fd)
        free_at_start = shutil.disk_usage(mount).free
        saved = sorted(run_dir.glob("*.pt"))
        expected = {f"{prefix}/rank_0/{p.name}": sha256_file(p) for p in saved}
        uri = server.uri(bucket, prefix)
        log1 = workdir / "first.log"
        t0 = time.monotonic()
        # The journal stays in the run directory (the default), on the full disk; the
        # status file is written elsewhere so that this report can read it.
        here = ("--exit-when-idle", "--state-dir", str(run_dir))
        (workdir / "status1").mkdir()
        (workdir / "status2").mkdir()
        code1 = Daemon(run_dir, uri, workdir / "status1", *here, log=log1).wait(300)
        seconds = time.monotonic() - t0
        text1 = log1.read_text(errors="replace")
        status1 = json.loads((workdir / "status1" / "status.json").read_text())
        with _store(server, bucket, retry=RetryPolicy(attempts=3)) as store:
            audit = bucket_audit(store, expected, workdir / "audit", [(prefix, 0)])
        ballast.unlink()
        log2 = workdir / "second.log"
        code2 = Daemon(run_dir, uri, workdir / "status2", *here, log=log2).wait(300)
        with Journal.open_readonly(run_dir) as journal:
            recorded = journal.totals().done
    return Result(
        "6. disk already full when the uploader starts (journal in memory)",
        {
            "filesystem": f"tmpfs {fs_mib} MiB",
            "files": len(saved),
            "free_bytes_at_start": free_at_start,
            "exit_code": code1,
            "uploaded": int(status1.get("done", 0)),
            "journal_in_memory": int("keeping the journal in memory" in text1),
            "journal_saved_at_exit": int(bool(status1.get("journal_saved"))),
            "lost": len(audit.lost),
            "corrupted": len(audit.corrupted),
            "bad_pointers": len(audit.bad_pointers),
            "second_run_exit": code2,
            "recorded_after_space_freed": recorded,
            "seconds": round(seconds, 1),
        },
        [f"training stopped: {stopped}" if stopped else "training did not fill the disk"],
    )


# -- 7. an object corrupted in the bucket ----------------------------------------------------------


def scenario_corrupt_object(workdir: Path, width: int = 1280) -> Result:
    """Upload real checkpoints, then flip bytes in one object and truncate another on the
    server's disk. ``ckpt.load`` must refuse both (no data returned, no file left) and
    ``ckpt-uploader verify`` must exit 1 naming both, while the intact one still loads.
    """
    import torch

    import ckpt
    from ckpt.saver import write_checkpoint

    bucket, prefix = "corrupt", "corrupt"
    run_dir = workdir / "run"
    names = ["ep1.pt", "ep2.pt", "ep3.pt"]
    for i, n in enumerate(names):
        torch.manual_seed(i)
        write_checkpoint({"model": torch.nn.Linear(width, width).state_dict()}, run_dir / n)
    refused: dict[str, str] = {}
    with rclone_server(workdir) as server:
        server.make_bucket(bucket)
        assert server.data_dir is not None
        uri = server.uri(bucket, prefix)
        d = Daemon(run_dir, uri, workdir / "state", "--exit-when-idle", log=workdir / "d.log")
        if d.wait(120) != 0:
            raise AssertionError(d.tail())
        root = server.data_dir / bucket / prefix / "rank_0"
        flipped, truncated = root / "ep1.pt", root / "ep2.pt"
        with open(flipped, "r+b") as f:
            f.seek(flipped.stat().st_size // 2)
            b = f.read(16)
            f.seek(-16, os.SEEK_CUR)
            f.write(bytes(x ^ 0xFF for x in b))
        with open(truncated, "r+b") as f:
            f.truncate(truncated.stat().st_size - 4096)
        tmp = workdir / "loadtmp"
        tmp.mkdir()
        for n in ("ep1.pt", "ep2.pt"):
            obj_uri = server.uri(bucket, f"{prefix}/rank_0/{n}")
            try:
                ckpt.load(obj_uri, progress=False, tmp_dir=str(tmp))
            except Exception as exc:
                refused[n] = f"{type(exc).__name__}: {exc}"
        ok = ckpt.load(server.uri(bucket, f"{prefix}/rank_0/ep3.pt"), progress=False)
        intact_loads = int("model" in ok)
        left = [str(p) for p in tmp.rglob("*") if p.is_file()]
        verify = subprocess.run(
            [sys.executable, "-m", "uploader", "verify", uri, "--no-progress"],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=str(ROOT),
        )
    report = verify.stdout + verify.stderr
    return Result(
        "7. object corrupted in the bucket",
        {
            "files": len(names),
            "objects": len(names),
            "damaged": 2,
            "refused_by_loader": len(refused),
            "files_left_by_loader": len(left),
            "intact_loads": intact_loads,
            "verify_exit": verify.returncode,
            "verify_names_both": int("ep1.pt" in report and "ep2.pt" in report),
        },
        [f"{n}: {m.splitlines()[0][:200]}" for n, m in sorted(refused.items())],
    )
