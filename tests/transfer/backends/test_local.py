"""LOCAL-specific cases for the embedded default store, a directory as the bucket: digest
sidecars and staged uploads hidden from listings, the mkdir message, deep container
paths, the bucket directory removed mid-upload, a 200 MiB round trip. The cases every
backend shares are in test_contract.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.data import write_random
from tests.fixtures.stores import roundtrip
from uploader import (
    ContainerNotFoundError,
    ObjectStore,
    ObjectStoreHparams,
)
from uploader.transfer.store import DIGEST_SUFFIX

MiB = 1 << 20


def test_roundtrip_200mib(local_store: ObjectStore, tmp_path: Path) -> None:
    roundtrip(local_store, tmp_path, 200 * MiB + 12345)


def test_list_prefixes_and_hidden_files(
    local_store: ObjectStore, local_bucket: Path, tmp_path: Path
) -> None:
    for name in ("run/rank_0/a.pt", "run/rank_0/b.pt", "run/rank_1/a.pt", "other/x.pt"):
        local_store.put_bytes(name, name.encode())
    big = write_random(tmp_path / "big.bin", 2 * MiB + 1)
    local_store.upload_file(big, "run/rank_1/big.bin")  # writes a digest record
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
