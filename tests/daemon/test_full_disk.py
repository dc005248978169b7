"""A run directory on a disk that is full to the last byte.

Real tmpfs mounts (``make test`` runs as root, as CI does; without root these tests
fail loudly rather than skip). The journal first releases its reserve; when there
is none (the disk was already full when the uploader started) it goes on in memory
and is saved as soon as there is room. Uploads never wait for the local disk.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.reliability import small_filesystem
from uploader.daemon.journal import RESERVE_NAME, FileRecord, Journal, JournalFullError
from uploader.launch.worker import UploadWorker

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20


@contextlib.contextmanager
def mounted(path: Path, mib: int) -> Iterator[Path]:
    with small_filesystem(path, mib) as ok:
        assert ok, "could not mount a tmpfs (this test needs root, as make test has)"
        yield path


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """8 MiB: too small for the journal's 2 MiB reserve (it needs 4x that free)."""
    with mounted(tmp_path / "small", 8) as mount:
        yield mount


def record_verified(journal: Journal, n: int) -> None:
    for i in range(n):
        rec = FileRecord(f"ep{i}.pt", 0, f"ep{i}.pt", f"p/rank_0/ep{i}.pt", i, i, True)
        journal.accept(rec)
        journal.start(rec.path)
        journal.done(rec.path, "sha256:" + "0" * 64)


def fill(folder: Path, leave: int = 0) -> None:
    """Fill the disk holding ``folder`` to the last byte, then free ``leave`` bytes."""
    pad = folder / ".pad"
    if leave:
        pad.write_bytes(b"\0" * leave)
    fd = os.open(folder / ".ballast", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError) as full:
            for _ in range(100_000):
                os.write(fd, b"\0" * 4096)
        assert full.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    if leave:
        pad.unlink()


def write_checkpoints(run: Path, n: int, size: int) -> dict[str, str]:
    run.mkdir(parents=True, exist_ok=True)
    digests = {}
    for i in range(1, n + 1):
        data = os.urandom(size)
        tmp = run / f".ep{i}.pt.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, run / f"ep{i}.pt")
        digests[f"ep{i}.pt"] = hashlib.sha256(data).hexdigest()
    return digests


def bucket_digests(root: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.glob("*.pt") if p.is_file()
    }


def test_journal_releases_its_reserve_and_keeps_recording(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """12 MiB, filled to the last byte: the journal releases its reserve, shrinks its
    write-ahead log and goes on recording on disk."""
    with mounted(tmp_path / "small", 12) as mount:
        journal = Journal.open(mount)
        try:
            reserve = mount / RESERVE_NAME
            assert reserve.stat().st_size == 2 << 20
            fill(mount)
            with caplog.at_level("WARNING", logger="uploader.daemon.journal_db"):
                record_verified(journal, 200)
            assert not reserve.exists()
            assert "released its 2 MiB reserve" in caplog.text
            assert not journal.in_memory
            assert journal.totals().done == 200
        finally:
            journal.close()


def test_journal_goes_on_in_memory_and_is_saved_when_there_is_room(
    tmpfs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal = Journal.open(tmpfs)
    try:
        assert not (tmpfs / RESERVE_NAME).exists()  # 8 MiB is too small to set 2 MiB aside
        for i in range(5):
            journal.accept(FileRecord(f"a{i}.pt", 0, f"a{i}.pt", f"p/a{i}.pt", i, i, True))
        fill(tmpfs)
        with caplog.at_level("WARNING", logger="uploader.daemon.journal_db"):
            record_verified(journal, 300)
            assert journal.in_memory
            assert "keeping the journal in memory" in caplog.text
            assert journal.totals().done == 300 and journal.get("a3.pt") is not None
            # Nothing destructive may follow a sync that could not reach the disk.
            with pytest.raises(JournalFullError, match="cannot be saved"):
                journal.sync()
            with Journal.open_readonly(tmpfs) as on_disk:
                assert on_disk.totals().done == 0 and on_disk.totals().pending == 5
            (tmpfs / ".ballast").unlink()
            assert journal.save()
            assert not journal.in_memory
            assert "saved on disk again (900 change(s)" in caplog.text
        journal.sync()
        with Journal.open_readonly(tmpfs) as on_disk:
            assert on_disk.totals().done == 300 and on_disk.totals().pending == 5
            mode = on_disk._db.execute("PRAGMA journal_mode").fetchone()[0]
            assert mode == "wal"
    finally:
        journal.close()


def test_push_from_a_full_disk_uploads_everything(tmpfs: Path, tmp_path: Path) -> None:
    """``push`` started when the disk is already full: the journal cannot even be
    created on disk, yet every checkpoint is uploaded and verified (exit 0). Once
    there is room, the next run records them."""
    run = tmpfs / "run"
    digests = write_checkpoints(run, 4, 1 * MiB)
    fill(tmpfs)
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    cmd = [sys.executable, "-m", "uploader", "push", str(run), "--to", f"file://{bucket}/b"]
    cmd += ["--create-container"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "keeping the journal in memory" in r.stderr
    assert "could not be saved" in r.stderr
    assert bucket_digests(bucket / "b" / "rank_0") == digests
    (tmpfs / ".ballast").unlink()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "in memory" not in r.stderr
    with Journal.open_readonly(run) as journal:
        assert journal.totals().done == 4
    assert bucket_digests(bucket / "b" / "rank_0") == digests


def test_worker_drains_with_its_journal_in_memory(tmpfs: Path, tmp_path: Path) -> None:
    """The callback's worker on a disk with one free page: the status file the
    training process reads is overwritten in place, and the drain trusts it (the
    journal file lags behind) instead of reporting verified files as missing."""
    run = tmpfs / "run"
    digests = write_checkpoints(run, 4, 1 * MiB)
    fill(tmpfs, leave=4096)
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    worker = UploadWorker(run, to=f"file://{bucket}/b", create_container=True).start()
    st = worker.drain(timeout=120, progress=False)
    assert worker.exit_code == 0
    assert st is not None and not st.journal_saved, st
    assert st.done == 4 and st.outstanding == 0 and st.failed == 0, st
    assert bucket_digests(bucket / "b" / "rank_0") == digests
