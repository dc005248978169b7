"""ObjectStore on the embedded default store: a directory as the bucket (libcloud LOCAL)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tests.fixtures.local import assert_growing_file_is_refused, write_random
from uploader import (
    ConfigError,
    ContainerNotFoundError,
    IntegrityError,
    ObjectNotFoundError,
    ObjectStore,
    ObjectStoreHparams,
)
from uploader.transfer.digest import Digest, file_digest
from uploader.transfer.store import DIGEST_SUFFIX

MiB = 1 << 20


def roundtrip(store: ObjectStore, tmp_path: Path, size: int, name: str | None = None) -> None:
    """Upload a random file of ``size`` bytes, download it, compare bytes and digests."""
    src = write_random(tmp_path / f"src-{size}.bin", size, seed=size)
    obj = name or f"run/rank_0/f{size}.bin"
    result = store.upload_file(src, obj)
    expected = file_digest(src, store.effective_part_size(size))
    assert result.size == size
    assert result.digest == expected
    stat = store.stat(obj)
    assert stat.size == size
    assert stat.digest == expected
    dest = store.download_file(obj, tmp_path / "out" / f"f{size}.bin", progress=False)
    assert dest.stat().st_size == size
    assert file_digest(dest, store.part_size) == file_digest(src, store.part_size)
    if size <= 8 * MiB:
        assert dest.read_bytes() == src.read_bytes()
    # No temporary file left beside the destination.
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name]
    dest.unlink()


SIZES = [0, 1, MiB - 1, MiB, MiB + 1, 3 * MiB, 3 * MiB + 7]


@pytest.mark.parametrize("size", SIZES)
def test_roundtrip_sizes(local_store: ObjectStore, tmp_path: Path, size: int) -> None:
    roundtrip(local_store, tmp_path, size)


def test_roundtrip_200mib(local_store: ObjectStore, tmp_path: Path) -> None:
    roundtrip(local_store, tmp_path, 200 * MiB + 12345)


def test_parts_counted_and_digest_form(local_store: ObjectStore, tmp_path: Path) -> None:
    src = write_random(tmp_path / "a.bin", 5 * MiB + 3)
    result = local_store.upload_file(src, "a.bin")
    assert result.parts == 6
    assert result.digest.algo == "sha256-parts" and result.digest.part_size == MiB
    small = write_random(tmp_path / "b.bin", 1000)
    r2 = local_store.upload_file(small, "b.bin")
    assert r2.parts == 1
    assert str(r2.digest) == "sha256:" + hashlib.sha256(small.read_bytes()).hexdigest()


def test_list_prefixes_and_hidden_files(
    local_store: ObjectStore, local_bucket: Path, tmp_path: Path
) -> None:
    for name in ("run/rank_0/a.pt", "run/rank_0/b.pt", "run/rank_1/a.pt", "other/x.pt"):
        local_store.put_bytes(name, name.encode())
    big = write_random(tmp_path / "big.bin", 2 * MiB + 1)
    local_store.upload_file(big, "run/rank_1/big.bin")  # writes a digest sidecar
    assert (local_bucket / ("run/rank_1/big.bin" + DIGEST_SUFFIX)).exists()
    # A staged, unfinished upload must not show up anywhere.
    backend = local_store.backend
    upload_id = backend.begin("run/rank_0/c.pt", {})
    names = [i.name for i in local_store.list("")]
    assert names == [
        "other/x.pt",
        "run/rank_0/a.pt",
        "run/rank_0/b.pt",
        "run/rank_1/a.pt",
        "run/rank_1/big.bin",
    ]
    assert [i.name for i in local_store.list("run/rank_0/")] == [
        "run/rank_0/a.pt",
        "run/rank_0/b.pt",
    ]
    assert [i.name for i in local_store.list("run/rank_1")] == [
        "run/rank_1/a.pt",
        "run/rank_1/big.bin",
    ]
    assert local_store.list("nothing/") == []
    sizes = {i.name: i.size for i in local_store.list("run/rank_1/")}
    assert sizes["run/rank_1/big.bin"] == 2 * MiB + 1
    backend.abort("run/rank_0/c.pt", upload_id)


def test_overwrite_and_delete(local_store: ObjectStore, tmp_path: Path) -> None:
    a = write_random(tmp_path / "a.bin", 3 * MiB, seed=1)
    b = write_random(tmp_path / "b.bin", 100, seed=2)
    local_store.upload_file(a, "x/obj")
    assert local_store.stat("x/obj").digest == file_digest(a, MiB)
    local_store.upload_file(b, "x/obj")
    st = local_store.stat("x/obj")
    assert st.size == 100 and st.digest == file_digest(b, MiB)
    out = local_store.download_file("x/obj", tmp_path / "o", progress=False)
    assert out.read_bytes() == b.read_bytes()
    assert local_store.delete("x/obj") is True
    assert local_store.delete("x/obj") is False
    assert not local_store.exists("x/obj")
    with pytest.raises(ObjectNotFoundError):
        local_store.stat("x/obj")
    assert local_store.list("") == []


def test_stat_digest_from_sidecar(
    local_store: ObjectStore, local_bucket: Path, tmp_path: Path
) -> None:
    src = write_random(tmp_path / "a.bin", 2 * MiB + 5)
    local_store.upload_file(src, "a.bin")
    assert local_store.stat("a.bin").digest == file_digest(src, MiB)
    (local_bucket / ("a.bin" + DIGEST_SUFFIX)).unlink()
    assert local_store.stat("a.bin").digest is None
    # Without a digest the download still works (size only), unless one is required.
    out = local_store.download_file("a.bin", tmp_path / "o.bin", progress=False)
    assert out.read_bytes() == src.read_bytes()
    with pytest.raises(IntegrityError, match="no digest"):
        local_store.download_file("a.bin", tmp_path / "o2.bin", progress=False, require_digest=True)
    assert not (tmp_path / "o2.bin").exists()


def test_download_into_directory(local_store: ObjectStore, tmp_path: Path) -> None:
    src = write_random(tmp_path / "a.bin", 1500)
    local_store.upload_file(src, "run/rank_0/ep1.pt")
    d = tmp_path / "restore"
    d.mkdir()
    out = local_store.download_file("run/rank_0/ep1.pt", d, progress=False)
    assert out == d / "ep1.pt"
    assert out.read_bytes() == src.read_bytes()


def _no_partials(d: Path) -> list[str]:
    return [p.name for p in d.iterdir()] if d.exists() else []


@pytest.mark.parametrize("size", [1000, 3 * MiB + 1])
def test_corrupted_object_detected(
    local_store: ObjectStore, local_bucket: Path, tmp_path: Path, size: int
) -> None:
    src = write_random(tmp_path / "a.bin", size)
    local_store.upload_file(src, "c/a.bin")
    stored = local_bucket / "c" / "a.bin"
    with open(stored, "r+b") as f:
        f.seek(size // 2)
        byte = f.read(1)
        f.seek(size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    out_dir = tmp_path / "out"
    with pytest.raises(IntegrityError, match="corrupt"):
        local_store.download_file("c/a.bin", out_dir / "a.bin", progress=False)
    assert _no_partials(out_dir) == []


def test_truncated_object_detected(
    local_store: ObjectStore, local_bucket: Path, tmp_path: Path
) -> None:
    src = write_random(tmp_path / "a.bin", 3 * MiB)
    result = local_store.upload_file(src, "t/a.bin")
    stored = local_bucket / "t" / "a.bin"
    os.truncate(stored, 2 * MiB)
    out_dir = tmp_path / "out"
    with pytest.raises(IntegrityError):
        local_store.download_file("t/a.bin", out_dir / "a.bin", progress=False)
    assert _no_partials(out_dir) == []
    with pytest.raises(IntegrityError, match="truncated"):
        local_store.download_file(
            "t/a.bin", out_dir / "a.bin", progress=False, expected_size=result.size
        )
    # A small object has its digest recorded elsewhere only when the caller knows it.
    small = write_random(tmp_path / "s.bin", 4000)
    r = local_store.upload_file(small, "t/s.bin")
    os.truncate(local_bucket / "t" / "s.bin", 3000)
    with pytest.raises(IntegrityError):
        local_store.download_file(
            "t/s.bin", out_dir / "s.bin", progress=False, expected_digest=r.digest
        )
    assert _no_partials(out_dir) == []


def test_expected_digest_mismatch(local_store: ObjectStore, tmp_path: Path) -> None:
    src = write_random(tmp_path / "a.bin", 100)
    local_store.upload_file(src, "a.bin")
    wrong = Digest("sha256", "0" * 64)
    with pytest.raises(IntegrityError):
        local_store.download_file(
            "a.bin", tmp_path / "o.bin", progress=False, expected_digest=wrong
        )
    assert not (tmp_path / "o.bin").exists()


def test_file_changing_during_upload(local_store: ObjectStore, tmp_path: Path) -> None:
    """A writer appends while the store reads parts: the upload must fail, not commit."""
    assert_growing_file_is_refused(local_store, tmp_path)


@pytest.mark.parametrize(
    "name",
    ["../escape", "a/../../b", "/abs/path", "a//b", "a/./b", "", "a/", "x\x00y"],
)
def test_bad_object_names(local_store: ObjectStore, tmp_path: Path, name: str) -> None:
    src = write_random(tmp_path / "a.bin", 10)
    with pytest.raises(ConfigError):
        local_store.upload_file(src, name)
    with pytest.raises(ConfigError):
        local_store.put_bytes(name, b"x")
    with pytest.raises(ConfigError):
        local_store.stat(name)
    with pytest.raises(ConfigError):
        local_store.download_file(name, tmp_path / "o", progress=False)
    assert not (tmp_path / "escape").exists()


def test_missing_container_message(tmp_path: Path) -> None:
    hp = ObjectStoreHparams(provider="local", container=str(tmp_path / "nope"))
    with pytest.raises(ContainerNotFoundError) as info:
        hp.initialize_object()
    msg = str(info.value)
    assert "does not exist" in msg and "create" in msg
    assert "mkdir -p" in msg


def test_create_container(tmp_path: Path) -> None:
    root = tmp_path / "deep" / "bucket"
    hp = ObjectStoreHparams(provider="local", container=str(root))
    with hp.initialize_object(create_container=True, part_size=MiB) as store:
        assert root.is_dir()
        store.put_bytes("a", b"1")
        assert store.get_bytes("a") == b"1"
    # Creating again is harmless.
    hp.initialize_object(create_container=True).close()


def test_container_deleted_during_an_upload_is_reported_not_recreated(tmp_path: Path) -> None:
    """The bucket directory is removed while the parts of a file are being sent: the
    commit must fail with ContainerNotFoundError (as S3 answers NoSuchBucket) rather
    than re-create the container."""
    import shutil

    root = tmp_path / "bucket"
    root.mkdir()
    src = write_random(tmp_path / "src.bin", 3 * MiB, seed=1)
    hp = ObjectStoreHparams(provider="local", container=str(root))
    removed = []

    def remove_bucket(n: int) -> None:
        if not removed:
            removed.append(n)
            shutil.rmtree(root)

    with (
        hp.initialize_object(part_size=MiB) as store,
        pytest.raises(ContainerNotFoundError, match="does not exist"),
    ):
        store.upload_file(src, "run/rank_0/ep2.pt", progress=remove_bucket)
    assert removed and not root.exists()


def test_get_bytes_missing(local_store: ObjectStore) -> None:
    with pytest.raises(ObjectNotFoundError):
        local_store.get_bytes("missing")
    with pytest.raises(ObjectNotFoundError):
        local_store.download_file("missing", "/nonexistent-dir/x", progress=False)


def test_part_size_bounds(local_hparams: ObjectStoreHparams) -> None:
    with pytest.raises(ConfigError):
        local_hparams.initialize_object(part_size=1)
    with pytest.raises(ConfigError):
        local_hparams.initialize_object(concurrency=0)
