"""Loading: codecs found by their bytes, tar archives, refusing pickled code, damaged files."""

from __future__ import annotations

import gzip
import io
import lzma
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt
from tests.ckpt.helpers import assert_same_tensors, make_trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One epoch's checkpoint in every codec, and the model weights it must hold."""
    folder = tmp_path_factory.mktemp("codecs")
    out: dict[str, Any] = {}
    for codec in (None, "gzip", "bzip2", "lzma", "zstd"):
        sub = folder / str(codec)
        t = make_trainer("1ep", save_folder=str(sub), save_compression=codec)
        t.fit()
        (path,) = sub.iterdir()
        out[str(codec)] = path
        out["weights"] = {k: v.clone() for k, v in t.model.state_dict().items()}
    return out


@pytest.mark.parametrize("codec", ["None", "gzip", "bzip2", "lzma", "zstd"])
def test_codec_is_found_from_leading_bytes_not_the_name(
    tmp_path: Path, trained: dict[str, Any], codec: str
) -> None:
    renamed = tmp_path / "checkpoint.bin"
    renamed.write_bytes(trained[codec].read_bytes())
    data = ckpt.load(renamed)
    assert_same_tensors(data["state"]["model"], trained["weights"])
    assert data["state"]["timer"]["epoch"] == 1


def _tar_bytes(member: bytes, name: str = "mosaic_states.pt") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(member)
        tar.addfile(info, io.BytesIO(member))
    return buf.getvalue()


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.lzma"])
def test_composer_tar_archives_load(tmp_path: Path, trained: dict[str, Any], suffix: str) -> None:
    import bz2

    raw = _tar_bytes(trained["None"].read_bytes())
    enc = {
        ".tar": lambda b: b,
        ".tar.gz": lambda b: gzip.compress(b, compresslevel=9),
        ".tgz": gzip.compress,
        ".tar.bz2": bz2.compress,
        ".tar.lzma": lambda b: lzma.compress(b, format=lzma.FORMAT_ALONE),
    }[suffix]
    path = tmp_path / f"ep1{suffix}"
    path.write_bytes(enc(raw))
    data = ckpt.load(path)
    assert_same_tensors(data["state"]["model"], trained["weights"])


def test_tar_with_several_checkpoints_is_refused(tmp_path: Path, trained: dict[str, Any]) -> None:
    buf = io.BytesIO()
    body = trained["None"].read_bytes()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in ("a.pt", "b.pt"):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    (tmp_path / "two.tar").write_bytes(buf.getvalue())
    with pytest.raises(ckpt.CorruptCheckpointError, match="expected one torch checkpoint"):
        ckpt.load(tmp_path / "two.tar")


def test_legacy_torch_format_loads(tmp_path: Path) -> None:
    obj = {"state": {"model": {"w": torch.arange(5.0)}}}
    torch.save(obj, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    assert torch.equal(ckpt.load(tmp_path / "old.pt")["state"]["model"]["w"], torch.arange(5.0))


def test_save_and_load_outside_the_trainer(tmp_path: Path) -> None:
    obj = {"w": torch.randn(64), "n": 3, "s": "x", "l": [1.5, None]}
    for name in ("a.pt", "a.pt.zst", "a.pt.gz", "a.pt.bz2", "a.pt.xz"):
        ckpt.save(obj, tmp_path / name)
        assert_same_tensors(ckpt.load(tmp_path / name), obj)
    assert (tmp_path / "a.pt.zst").read_bytes()[:4] == b"\x28\xb5\x2f\xfd"
    assert sorted(os.listdir(tmp_path)) == ["a.pt", "a.pt.bz2", "a.pt.gz", "a.pt.xz", "a.pt.zst"]


# -- security ------------------------------------------------------------------------------


class Evil:
    """Unpickling this creates a marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["evil.pt", "evil.pt.zst", "evil.pt.gz", "evil.tar"])
def test_malicious_pickle_is_refused_without_running(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "pwned"
    payload = {"state": {"model": {"w": torch.zeros(2)}, "x": Evil(marker)}}
    path = tmp_path / name
    if name.endswith(".tar"):
        buf = io.BytesIO()
        torch.save(payload, buf)
        path.write_bytes(_tar_bytes(buf.getvalue()))
    else:
        with pytest.raises(ckpt.CheckpointError, match=r"obj\['state'\]\['x'\].*Evil"):
            ckpt.save(payload, path)  # our own writer refuses to produce such a file
        ckpt.save(payload, path, check=False)
    assert not marker.exists()
    with pytest.raises(ckpt.UnsafeCheckpointError, match="refused to load.*weights_only=False"):
        ckpt.load(path)
    assert not marker.exists()
    # and the Trainer refuses it too
    with pytest.raises(ckpt.UnsafeCheckpointError):
        make_trainer("1ep", load_path_format=str(path))
    assert not marker.exists()


def test_tar_member_paths_are_never_extracted(tmp_path: Path, trained: dict[str, Any]) -> None:
    body = trained["None"].read_bytes()
    (tmp_path / "t.tar").write_bytes(_tar_bytes(body, name="../../escape.pt"))
    data = ckpt.load(tmp_path / "t.tar", tmp_dir=str(tmp_path))
    assert_same_tensors(data["state"]["model"], trained["weights"])
    assert not (tmp_path.parent / "escape.pt").exists()
    assert sorted(os.listdir(tmp_path)) == ["t.tar"]  # temporary folder removed


# -- damaged files -------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["None", "gzip", "bzip2", "lzma", "zstd"])
def test_truncated_files_give_clear_errors(
    tmp_path: Path, trained: dict[str, Any], codec: str
) -> None:
    data = trained[codec].read_bytes()
    for cut in (len(data) // 2, len(data) - 3):
        p = tmp_path / trained[codec].name
        p.write_bytes(data[:cut])
        with pytest.raises(ckpt.CorruptCheckpointError, match="truncated|damaged|corrupt"):
            ckpt.load(p)


@pytest.mark.parametrize("codec", ["None", "gzip", "bzip2", "lzma", "zstd"])
def test_corrupted_files_give_clear_errors(
    tmp_path: Path, trained: dict[str, Any], codec: str
) -> None:
    data = bytearray(trained[codec].read_bytes())
    data[len(data) * 2 // 3] ^= 0x5A
    p = tmp_path / trained[codec].name
    p.write_bytes(bytes(data))
    with pytest.raises(ckpt.CorruptCheckpointError, match="corrupt|damaged|truncated"):
        ckpt.load(p)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ckpt.CorruptCheckpointError, match="not a checkpoint.*empty"):
        ckpt.load(tmp_path / "empty.pt")
    (tmp_path / "junk.pt").write_bytes(os.urandom(4096))
    with pytest.raises(ckpt.CorruptCheckpointError, match="not a checkpoint"):
        ckpt.load(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.load(tmp_path / "missing.pt")
    torch.save({"w": torch.zeros(1)}, tmp_path / "bare.pt")
    with pytest.raises(ckpt.CheckpointError, match="not a trainer checkpoint"):
        make_trainer("1ep", load_path_format=str(tmp_path / "bare.pt"))
