"""Restoring a directory checkpoint of many files: every file verified, fetched several at once.

A Hugging Face style ``checkpoint-N/`` directory (a few large files and many small
ones) is pushed by the real ``ckpt-uploader push`` into a LOCAL bucket and pulled
back with ``ckpt-uploader pull``. The files are fetched several at a time; a
damaged file fails the restore with its name, after the files already running
have ended, and leaves no temporary file behind. A run copied to another prefix
restores from the copy.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from harness.data import write_random
from tests.daemon.test_process import run_cli, sha256

SMALL = 40  # more files than are fetched at once


@pytest.fixture
def pushed(tmp_path: Path) -> tuple[Path, Path]:
    """A pushed ``checkpoint-10/`` of 2 multi-part files and SMALL small ones; returns the
    run directory and the bucket."""
    run, bucket = tmp_path / "run", tmp_path / "bucket"
    ck = run / "checkpoint-10"
    ck.mkdir(parents=True)
    bucket.mkdir()
    for i in range(2):
        write_random(ck / f"model-{i}.safetensors", 3 * (1 << 20) + i, seed=i)
    for i in range(SMALL):
        write_random(ck / f"rng_state_{i}.pth", 1000 + 37 * i, seed=100 + i)
    (ck / "trainer_state.json").write_text('{"global_step": 10}')
    uri = f"file://{bucket}?prefix=run"
    got = run_cli("push", str(run), "--to", uri, "--part-size", str(1 << 20), "-q")
    assert got.returncode == 0, got.stderr
    return run, bucket


def test_pull_restores_every_file_of_a_directory_checkpoint(
    pushed: tuple[Path, Path], tmp_path: Path
) -> None:
    run, bucket = pushed
    dest = tmp_path / "restore"
    got = run_cli("pull", f"file://{bucket}?prefix=run/rank_0/checkpoint-10", f"{dest}/", "-q")
    assert got.returncode == 0, got.stderr
    want = sorted(p.relative_to(run) for p in (run / "checkpoint-10").rglob("*") if p.is_file())
    have = sorted(p.relative_to(dest) for p in dest.rglob("*") if p.is_file())
    assert have == want and len(have) == SMALL + 3
    for rel in want:
        assert sha256(dest / rel) == sha256(run / rel), rel


def test_a_damaged_file_fails_the_restore_and_leaves_no_partial_file(
    pushed: tuple[Path, Path], tmp_path: Path
) -> None:
    run, bucket = pushed
    damaged = next(bucket.rglob("rng_state_7.pth"))
    data = bytearray(damaged.read_bytes())
    data[10] ^= 0xFF  # same size, other bytes
    damaged.write_bytes(bytes(data))
    dest = tmp_path / "restore"
    got = run_cli("pull", f"file://{bucket}?prefix=run/rank_0/checkpoint-10", f"{dest}/", "-q")
    assert got.returncode == 1
    assert "rng_state_7.pth" in got.stderr and "do not use it" in got.stderr
    restored = {p.name for p in dest.rglob("*") if p.is_file()}
    assert "rng_state_7.pth" not in restored
    assert not [n for n in restored if n.endswith(".part")]
    for p in dest.rglob("*"):  # what was restored is whole and right
        if p.is_file():
            assert sha256(p) == sha256(run / p.relative_to(dest)), p


def test_a_run_copied_to_another_prefix_restores_from_the_copy(
    pushed: tuple[Path, Path], tmp_path: Path
) -> None:
    """``rclone copy`` / ``aws s3 sync`` of a run to another prefix: its pointer still names
    the first prefix; ``pull .../latest`` of the copy restores from the copy alone."""
    run, bucket = pushed
    shutil.copytree(bucket / "run", bucket / "run-copy")
    shutil.rmtree(bucket / "run")  # only the copy is left to read
    dest = tmp_path / "restore"
    got = run_cli("pull", f"file://{bucket}?prefix=run-copy/latest", f"{dest}/", "-v")
    assert got.returncode == 0, got.stderr
    assert "restored from their copy under 'run-copy'" in got.stderr
    want = sorted(p.relative_to(run) for p in (run / "checkpoint-10").rglob("*") if p.is_file())
    assert sorted(p.relative_to(dest) for p in dest.rglob("*") if p.is_file()) == want
    for rel in want:
        assert sha256(dest / rel) == sha256(run / rel), rel


def test_a_prefix_pull_fetches_every_object_several_at_a_time(
    pushed: tuple[Path, Path], tmp_path: Path
) -> None:
    """``pull URI/prefix DEST`` (no checkpoint named): every object under the prefix, each
    checked against the digest its store records, ``--files`` at a time, one line each (the
    digest records themselves are the store's, not listed)."""
    run, bucket = pushed
    dest = tmp_path / "all"
    got = run_cli("pull", f"file://{bucket}?prefix=run/rank_0", f"{dest}/", "--files", "4", "-q")
    assert got.returncode == 0, got.stderr
    objects = sorted(
        str(p.relative_to(bucket / "run" / "rank_0"))
        for p in (bucket / "run" / "rank_0").rglob("*")
        if p.is_file() and not p.name.startswith(".") and not p.name.endswith(".ckpt-digest")
    )
    lines = got.stdout.splitlines()
    assert len(lines) == len(objects) and len(objects) >= SMALL + 3
    for rel in objects:
        assert (dest / rel).read_bytes() == (bucket / "run" / "rank_0" / rel).read_bytes(), rel
