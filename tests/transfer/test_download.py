"""Downloads to a file: verified, received into the file's own pages, refused early.

An object uploaded as one part (its digest a plain sha256) by a store with a
larger part size than the downloading store's is fetched in parallel ranges
that cannot each be checked against that digest: the written file is hashed
once after the download, before it is renamed into place. Ranges are received
into the destination's mapped pages a window at a time where the filesystem
can allocate the file's space ahead, else written at their offsets; a download
the destination has no room for fails before a byte is received.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from harness.data import file_digest
from tests.fixtures.local import write_random
from uploader import IntegrityError, ObjectStore, ObjectStoreHparams, UploaderError
from uploader.transfer import download
from uploader.transfer.files import reserve

KiB = 1 << 10


def _store(
    bucket: Path, part_size: int, digest: str = "crc64nvme", download_part_size: int | None = None
) -> ObjectStore:
    hp = ObjectStoreHparams(provider="local", container=str(bucket))
    return hp.initialize_object(
        part_size=part_size,
        create_container=True,
        digest=digest,
        download_part_size=download_part_size,
    )


@pytest.mark.parametrize("ranges", [48 * KiB, 64 * KiB, 100 * KiB, 1 << 20])
def test_a_crc_digest_is_checked_over_ranges_that_cut_across_the_upload_parts(
    tmp_path: Path, ranges: int
) -> None:
    src = write_random(tmp_path / "src.bin", 300 * KiB + 17, seed=3)
    bucket = tmp_path / "bucket"
    with _store(bucket, 64 * KiB) as up:
        result = up.upload_file(src, "run/f.bin")
    assert result.parts == 5 and result.digest == file_digest(src, 64 * KiB)
    with _store(bucket, 64 * KiB, download_part_size=ranges) as down:
        out = down.download_file("run/f.bin", tmp_path / "out.bin", progress=False)
        assert out.read_bytes() == src.read_bytes()
        got = bytearray()
        down.download_stream("run/f.bin", got.extend)
        assert bytes(got) == src.read_bytes()
    with open(bucket / "run" / "f.bin", "r+b") as f:  # one flipped bit
        f.seek(200 * KiB + 3)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    dest = tmp_path / "bad.bin"
    with _store(bucket, 64 * KiB, download_part_size=ranges) as down:
        with pytest.raises(IntegrityError, match="crc64nvme:.* was recorded at upload"):
            down.download_file("run/f.bin", dest, progress=False)
        with pytest.raises(IntegrityError, match="do not use it"):
            down.download_stream("run/f.bin", lambda v: None)
    assert not dest.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")] == []


def test_plain_digest_larger_than_download_parts(tmp_path: Path) -> None:
    src = write_random(tmp_path / "src.bin", 200 * KiB, seed=7)
    bucket = tmp_path / "bucket"
    with _store(bucket, 256 * KiB, "sha256") as big:
        result = big.upload_file(src, "run/one-part.bin")
    assert result.parts == 1 and result.digest.algo == "sha256"
    assert result.digest == file_digest(src, 256 * KiB, "sha256")
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
    with _store(bucket, 256 * KiB, "sha256") as big:
        big.upload_file(src, "one-part.bin")
    with open(bucket / "one-part.bin", "r+b") as f:  # same size, other bytes
        f.seek(150 * KiB)
        f.write(b"\xff\x00\xff")
    dest = tmp_path / "out.bin"
    with _store(bucket, 64 * KiB) as small, pytest.raises(IntegrityError, match="do not use it"):
        small.download_file("one-part.bin", dest, progress=False)
    assert not dest.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")] == []


def _counting_windows(monkeypatch: pytest.MonkeyPatch, width: int) -> list[int]:
    """Map ``width`` bytes at a time and record the start of every window mapped
    (instrumentation of the real class, not a stand-in)."""
    lows: list[int] = []

    class Counting(download._MappedRange):
        def window(self, offset: int, limit: int) -> memoryview:
            low = self._lo
            view = super().window(offset, limit)
            if self._lo != low:
                lows.append(self._lo)
            return view

    monkeypatch.setattr(download, "MAP_WINDOW", width)
    monkeypatch.setattr(download, "_MappedRange", Counting)
    return lows


@pytest.mark.parametrize("kind", ["s3", "local"])
def test_download_into_mapped_pages_across_windows(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """Ranges are received straight into the file's mapped pages; ranges that do not line
    up with the windows share a window's pages (from several threads) without mixing
    their bytes, and the verified file is the object."""
    lows = _counting_windows(monkeypatch, 80 * KiB)
    if kind == "s3":
        server = request.getfixturevalue("rclone_s3")
        server.make_bucket("mapped")
        hp, part = server.hparams("mapped"), 5 << 20
    else:
        hp, part = ObjectStoreHparams(provider="local", container=str(tmp_path / "b")), 64 * KiB
    size = 2 * part + 4097
    src = write_random(tmp_path / "src.bin", size, seed=11)
    with hp.initialize_object(
        part_size=part, create_container=True, download_part_size=part, concurrency=3
    ) as store:
        store.upload_file(src, "run/mapped.bin")
        out = store.download_file("run/mapped.bin", tmp_path / "out.bin", progress=False)
    assert out.read_bytes() == src.read_bytes()
    # Every window of the file was mapped at least once, by the ranges that touch it.
    assert set(lows) == set(range(0, size, 80 * KiB))
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")] == []


def test_download_without_fallocate_writes_at_offsets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a filesystem that cannot allocate ahead (stand-in: ``reserve`` answers False, as
    it does for EOPNOTSUPP; every filesystem here supports fallocate), ranges go through
    the pool's buffers and positional writes, and nothing is mapped."""
    lows = _counting_windows(monkeypatch, 80 * KiB)
    monkeypatch.setattr(download, "reserve", lambda fd, size: False)
    src = write_random(tmp_path / "src.bin", 300 * KiB + 5, seed=12)
    with _store(tmp_path / "bucket", 64 * KiB) as store:
        store.upload_file(src, "run/unmapped.bin")
        out = store.download_file("run/unmapped.bin", tmp_path / "out.bin", progress=False)
    assert out.read_bytes() == src.read_bytes()
    assert lows == []


def test_no_room_for_the_download_is_refused_before_receiving(tmp_path: Path) -> None:
    """An object larger than the destination filesystem allows (a sparse 17 TiB object in a
    bucket on tmpfs, restored to a filesystem whose largest file is 16 TiB) fails before a
    byte is received, says what to do, and leaves the destination as it was."""
    shm = Path(tempfile.mkdtemp(prefix="ckpt-test-", dir="/dev/shm"))
    try:
        with open(shm / "huge.bin", "wb") as f:
            f.truncate(17 << 40)
        dest = tmp_path / "huge.bin"
        dest.write_bytes(b"the previous restore")
        hp = ObjectStoreHparams(provider="local", container=str(shm))
        with hp.initialize_object() as store, pytest.raises(UploaderError) as err:
            store.download_file("huge.bin", dest, progress=False)
        assert "cannot make room for huge.bin" in str(err.value)
        assert "free space there or download elsewhere" in str(err.value)
        assert dest.read_bytes() == b"the previous restore"
        assert [p.name for p in tmp_path.iterdir()] == ["huge.bin"]
    finally:
        shutil.rmtree(shm)


def test_reserve_allocates_and_sets_the_length(tmp_path: Path) -> None:
    with open(tmp_path / "r.bin", "wb") as f:
        assert reserve(f.fileno(), 3 * KiB + 1) is True
        assert os.fstat(f.fileno()).st_size == 3 * KiB + 1
        assert os.fstat(f.fileno()).st_blocks * 512 >= 3 * KiB + 1
        assert reserve(f.fileno(), 0) is False  # nothing to reserve
