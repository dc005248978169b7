"""Loading from object stores: LOCAL driver and rclone's S3 server, commit pointers, digests."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt
from harness.servers.s3 import S3Server
from tests.ckpt.helpers import assert_same_tensors, assert_same_training_state, make_trainer
from uploader import IntegrityError, ObjectStore, ObjectStoreHparams
from uploader.bucket import pointer
from uploader.errors import UploaderError


def upload_and_commit(
    store: ObjectStore, local: Path, prefix: str, rank: int, name: str, digest: str | None = None
) -> str:
    """What the uploader daemon does: upload, verify, then commit the pointer."""
    obj = f"{prefix}/rank_{rank}/{name}"
    res = store.upload_file(local, obj)
    entry = pointer.PointerEntry(
        name=name,
        object=obj,
        size=res.size,
        digest=digest or str(res.digest),
        mtime_ns=local.stat().st_mtime_ns,
    )
    pointer.commit(store, prefix, rank, entry)
    return obj


@pytest.fixture(scope="module")
def run_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Checkpoints ep1..ep3 (zstd) of one run, plus the uninterrupted 4-epoch result."""
    folder = tmp_path_factory.mktemp("run")
    make_trainer("3ep", save_folder=str(folder), save_compression="zstd").fit()
    paths = {p.name: p for p in folder.iterdir()}
    # distinct, increasing mtimes so pointer ordering is unambiguous
    for i, name in enumerate(sorted(paths)):
        os.utime(paths[name], ns=(time.time_ns(), 1_700_000_000_000_000_000 + i))
    ref = make_trainer("4ep")
    ref.fit()
    return {"paths": paths, "reference": ref}


def test_latest_is_the_newest_checkpoint_every_rank_committed(
    local_store: ObjectStore, local_bucket: Path, run_files: dict[str, Any], tmp_path: Path
) -> None:
    p = run_files["paths"]
    for name in ("ep1.pt.zst", "ep2.pt.zst", "ep3.pt.zst"):
        upload_and_commit(local_store, p[name], "run1", 0, name)
    for name in ("ep1.pt.zst", "ep2.pt.zst"):
        upload_and_commit(local_store, p[name], "run1", 1, name)

    seen: list[int] = []
    tmp_dir = tmp_path / "tmp"
    tmp_dir.mkdir()
    for kwargs in (
        {"path_or_uri": "run1/latest", "object_store": local_store},
        {"path_or_uri": "latest", "object_store": local_store, "prefix": "run1"},
        {"path_or_uri": "latest", "object_store": local_store.hparams, "prefix": "run1"},
        {"path_or_uri": f"file://{local_bucket}?prefix=run1/latest"},
    ):
        data = ckpt.load(**kwargs, world_size=2, rank=1, progress=False, tmp_dir=str(tmp_dir))
        seen.append(data["state"]["timer"]["epoch"])
        assert os.listdir(tmp_dir) == []  # the download was removed
    assert seen == [2, 2, 2, 2]
    # rank 0 alone: its newest
    assert (
        ckpt.load("run1/latest", object_store=local_store, world_size=1, progress=False)["state"][
            "timer"
        ]["epoch"]
        == 3
    )
    # a plain object path
    data = ckpt.load(
        "run1/rank_{rank}/ep1.pt.zst", object_store=local_store, rank=1, progress=lambda n: None
    )
    assert data["state"]["timer"]["epoch"] == 1


def test_trainer_resumes_exactly_from_latest(
    local_store: ObjectStore, run_files: dict[str, Any]
) -> None:
    p = run_files["paths"]
    for name in ("ep1.pt.zst", "ep2.pt.zst"):
        upload_and_commit(local_store, p[name], "run7", 0, name)
    t = make_trainer(
        "4ep",
        load_path_format="latest",
        load_object_store=local_store,
        load_prefix="run7",
        load_chunk_size=4096,
    )
    assert t.timer.epoch == 2
    t.fit()
    assert_same_training_state(run_files["reference"], t)
    t2 = make_trainer("4ep", load_path_format="run7/latest", load_object_store=local_store.hparams)
    assert t2.timer.epoch == 2


def test_pointer_digest_mismatch_is_an_error(
    local_store: ObjectStore, run_files: dict[str, Any]
) -> None:
    p = run_files["paths"]
    wrong = "sha256:" + "0" * 64
    upload_and_commit(local_store, p["ep1.pt.zst"], "run2", 0, "ep1.pt.zst", digest=wrong)
    for path in ("run2/latest", "run2/rank_0/ep1.pt.zst"):
        with pytest.raises(IntegrityError, match="corrupt|does not match"):
            ckpt.load(path, object_store=local_store, progress=False)
    with pytest.raises(IntegrityError):
        make_trainer("2ep", load_path_format="run2/latest", load_object_store=local_store)


def test_tampered_object_is_refused(
    local_store: ObjectStore, local_bucket: Path, run_files: dict[str, Any], tmp_path: Path
) -> None:
    p = run_files["paths"]
    obj = upload_and_commit(local_store, p["ep2.pt.zst"], "run3", 0, "ep2.pt.zst")
    stored = local_bucket / obj
    data = bytearray(stored.read_bytes())
    data[100] ^= 1
    stored.write_bytes(bytes(data))  # same size, different bytes
    tmp_dir = tmp_path / "tmp"
    tmp_dir.mkdir()
    with pytest.raises(IntegrityError, match="do not use it"):
        ckpt.load(
            "latest", object_store=local_store, prefix="run3", progress=False, tmp_dir=str(tmp_dir)
        )
    assert os.listdir(tmp_dir) == []


def test_object_without_recorded_digest_is_refused(
    local_store: ObjectStore, local_bucket: Path, run_files: dict[str, Any]
) -> None:
    target = local_bucket / "run4" / "rank_0" / "ep1.pt.zst"
    target.parent.mkdir(parents=True)
    target.write_bytes(run_files["paths"]["ep1.pt.zst"].read_bytes())
    with pytest.raises(IntegrityError, match="no digest"):
        ckpt.load("run4/rank_0/ep1.pt.zst", object_store=local_store, progress=False)


def test_latest_without_pointer_says_what_to_do(local_store: ObjectStore) -> None:
    with pytest.raises(UploaderError, match="uploaded|committed"):
        ckpt.load("nothing/latest", object_store=local_store, progress=False)
    with pytest.raises(ckpt.CheckpointError, match="object store"):
        ckpt.load("latest")


def test_rclone_s3_latest_and_multipart_object(
    rclone_s3: S3Server, run_files: dict[str, Any], tmp_path: Path
) -> None:
    bucket = "ckpt-remote"
    rclone_s3.make_bucket(bucket)
    store = rclone_s3.hparams(bucket).initialize_object(part_size=5 << 20)
    try:
        p = run_files["paths"]
        for name in ("ep1.pt.zst", "ep2.pt.zst"):
            upload_and_commit(store, p[name], "exp", 0, name)
        big = {"state": {"model": {"w": torch.randn(3 << 20)}}}  # 12 MiB: a multipart upload
        ckpt.save(big, tmp_path / "big.pt")
        res = store.upload_file(tmp_path / "big.pt", "exp/rank_0/big.pt")
        assert res.parts == 3
    finally:
        store.close()
    t = make_trainer("4ep", load_path_format=rclone_s3.uri(bucket, "exp/latest"))
    assert t.timer.epoch == 2
    t.fit()
    assert_same_training_state(run_files["reference"], t)
    loaded = ckpt.load(
        rclone_s3.uri(bucket, "exp/rank_0/big.pt"), progress=False, chunk_size=1 << 16
    )
    assert_same_tensors(loaded, big)
    # damage the stored object behind the server's back: the load is refused
    assert rclone_s3.data_dir is not None
    stored = rclone_s3.data_dir / bucket / "exp" / "rank_0" / "big.pt"
    with open(stored, "r+b") as f:
        f.seek(7 << 20)
        b = f.read(1)
        f.seek(7 << 20)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(IntegrityError):
        ckpt.load(rclone_s3.uri(bucket, "exp/rank_0/big.pt"), progress=False)


def test_hparams_store_is_accepted_by_trainer(
    local_hparams: ObjectStoreHparams, local_store: ObjectStore, run_files: dict[str, Any]
) -> None:
    upload_and_commit(local_store, run_files["paths"]["ep3.pt.zst"], "run5", 0, "ep3.pt.zst")
    t = make_trainer(
        "4ep",
        load_path_format="run5/rank_{rank}/ep3.pt.zst",
        load_object_store=local_hparams,
        load_weights_only=True,
    )
    assert t.timer.epoch == 0
    with pytest.raises(TypeError, match="ObjectStore"):
        make_trainer("4ep", load_path_format="x.pt", load_object_store="s3://bucket")
