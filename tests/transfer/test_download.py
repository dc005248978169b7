"""Downloads verify a plain sha256 even when the object spans several download parts.

An object uploaded as one part (its digest a plain sha256) by a store with a
larger part size than the downloading store's is fetched in parallel ranges
that cannot each be checked against that digest: the written file is hashed
once after the download, before it is renamed into place.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.data import file_digest
from tests.fixtures.local import write_random
from uploader import IntegrityError, ObjectStore, ObjectStoreHparams

KiB = 1 << 10


def _store(bucket: Path, part_size: int) -> ObjectStore:
    hp = ObjectStoreHparams(provider="local", container=str(bucket))
    return hp.initialize_object(part_size=part_size, create_container=True)


def test_plain_digest_larger_than_download_parts(tmp_path: Path) -> None:
    src = write_random(tmp_path / "src.bin", 200 * KiB, seed=7)
    bucket = tmp_path / "bucket"
    with _store(bucket, 256 * KiB) as big:
        result = big.upload_file(src, "run/one-part.bin")
    assert result.parts == 1 and result.digest.algo == "sha256"
    assert result.digest == file_digest(src, 256 * KiB)
    with _store(bucket, 64 * KiB) as small:
        out = small.download_file("run/one-part.bin", tmp_path / "out.bin", progress=False)
        assert out.read_bytes() == src.read_bytes()
        # The caller's plain sha256 is checked the same way.
        small.download_file(
            "run/one-part.bin", tmp_path / "out2.bin", progress=False, expected_digest=result.digest
        )


def test_plain_digest_mismatch_across_download_parts_is_refused(tmp_path: Path) -> None:
    src = write_random(tmp_path / "src.bin", 200 * KiB, seed=8)
    bucket = tmp_path / "bucket"
    with _store(bucket, 256 * KiB) as big:
        big.upload_file(src, "one-part.bin")
    with open(bucket / "one-part.bin", "r+b") as f:  # same size, other bytes
        f.seek(150 * KiB)
        f.write(b"\xff\x00\xff")
    dest = tmp_path / "out.bin"
    with _store(bucket, 64 * KiB) as small, pytest.raises(IntegrityError, match="do not use it"):
        small.download_file("one-part.bin", dest, progress=False)
    assert not dest.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")] == []
