"""``ckpt.load`` from a bucket: ranges hashed, decompressed and loaded as they arrive.

The object is cut into many ranges (a small ``download_part_size``), so the ordered
stream, the per-part digest and the zstd decoder all work across range boundaries.
Every codec and the uncompressed format give the tensors ``torch.load`` gives for the
original file, and a zstd checkpoint's tensors map the decompressed file instead of
being held a second time in the process's own memory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt
from ckpt.codecs import compressing_writer
from tests.ckpt.helpers import assert_same_tensors
from uploader import IntegrityError, ObjectStore, ObjectStoreHparams

KiB = 1 << 10
MiB = 1 << 20


def _state(nbytes: int, seed: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    per = nbytes // 4 // 4
    model = {f"w{i}": torch.randn(per, generator=gen) for i in range(4)}
    return {"state": {"model": model}, "step": seed, "note": "pipelined"}


def _save(obj: Any, path: Path, codec: str | None) -> Path:
    with open(path, "wb") as raw, compressing_writer(raw, codec) as w:
        torch.save(obj, w)
    return path


def _store(bucket: Path) -> ObjectStore:
    hp = ObjectStoreHparams(provider="local", container=str(bucket))
    # 1 MiB upload parts (a sha256-parts digest), and ranges of one part each.
    return hp.initialize_object(part_size=MiB, download_part_size=256 * KiB)


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * KiB
    raise AssertionError("no RssAnon in /proc/self/status")


@pytest.mark.parametrize("codec", ["zstd", None, "gzip"])
def test_pipelined_load_gives_the_same_tensors(
    tmp_path: Path, local_bucket: Path, codec: str | None
) -> None:
    obj = _state(3 * MiB + 123 * 4, seed=1)
    src = _save(obj, tmp_path / "ep1.pt", codec)
    with _store(local_bucket) as store:
        store.upload_file(src, "run/rank_0/ep1.pt")
        tmp = tmp_path / "tmp"
        tmp.mkdir()
        got = ckpt.load("run/rank_0/ep1.pt", object_store=store, progress=False, tmp_dir=str(tmp))
        assert os.listdir(tmp) == []  # the temporary file is gone once loaded
    assert_same_tensors(got, obj)
    assert got["note"] == "pipelined" and got["step"] == 1


def test_damaged_zstd_object_is_an_integrity_error(tmp_path: Path, local_bucket: Path) -> None:
    """Damage in the middle of a zstd stream may stop the decoder before the digest is
    known; the digest still decides, and nothing is left behind."""
    src = _save(_state(2 * MiB, seed=2), tmp_path / "ep2.pt.zst", "zstd")
    with _store(local_bucket) as store:
        store.upload_file(src, "run/rank_0/ep2.pt.zst")
        stored = local_bucket / "run/rank_0/ep2.pt.zst"
        data = bytearray(stored.read_bytes())
        for at in range(len(data) // 3, len(data) // 3 + 64):
            data[at] ^= 0x5A
        stored.write_bytes(bytes(data))
        tmp = tmp_path / "tmp"
        tmp.mkdir()
        with pytest.raises(IntegrityError, match="do not use it"):
            ckpt.load("run/rank_0/ep2.pt.zst", object_store=store, progress=False, tmp_dir=str(tmp))
        assert os.listdir(tmp) == []


def test_zstd_checkpoint_is_held_once(tmp_path: Path, local_bucket: Path) -> None:
    """The loaded tensors map the decompressed file: the process's anonymous memory grows
    by far less than the checkpoint (a read into memory would add all 48 MiB of it)."""
    size = 48 * MiB
    obj = _state(size, seed=3)
    src = _save(obj, tmp_path / "ep3.pt.zst", "zstd")
    del obj
    with _store(local_bucket) as store:
        store.upload_file(src, "run/rank_0/ep3.pt.zst")
        before = _rss_anon()
        got = ckpt.load("run/rank_0/ep3.pt.zst", object_store=store, progress=False)
        total = sum(float(t.sum()) for t in got["state"]["model"].values())  # every page read
        grown = _rss_anon() - before
    assert total == total  # not NaN: the tensors were readable
    assert grown < size // 3, f"anonymous memory grew by {grown / MiB:.1f} MiB"


def test_restore_too_large_for_memory_goes_through_a_file(
    tmp_path: Path, local_bucket: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beyond its share of the memory available, the decoded checkpoint is a temporary
    file (mapped all the same), removed once loaded."""
    import ckpt.loader

    monkeypatch.setattr(ckpt.loader, "MEMORY_SHARE", 0.0)
    obj = _state(2 * MiB, seed=4)
    src = _save(obj, tmp_path / "ep4.pt.zst", "zstd")
    with _store(local_bucket) as store:
        store.upload_file(src, "run/rank_0/ep4.pt.zst")
        tmp = tmp_path / "tmp"
        tmp.mkdir()
        got = ckpt.load(
            "run/rank_0/ep4.pt.zst", object_store=store, progress=False, tmp_dir=str(tmp)
        )
        assert os.listdir(tmp) == []
    assert_same_tensors(got, obj)
