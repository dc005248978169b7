"""``uploader.fetch_latest``: None before anything is committed, then the newest
checkpoint every rank committed, whole and verified (real `push` processes, LOCAL store)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from harness.data import write_random
from harness.ranks import OnceShare, commit_world
from uploader import ConfigError, IntegrityError, ObjectStoreHparams, fetch_latest

REPO = Path(__file__).resolve().parents[2]


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _push(run: Path, bucket: Path, prefix: str = "exp") -> None:
    out = subprocess.run(
        [sys.executable, "-m", "uploader", "push", str(run), "--to",
         f"file://{bucket}?prefix={prefix}", "--settle", "0.05", "-q"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr


def _hf_checkpoint(run: Path, step: int) -> dict[str, str]:
    d = run / f"checkpoint-{step}"
    d.mkdir(parents=True)
    for i, name in enumerate(("model.safetensors", "optimizer.pt", "trainer_state.json")):
        write_random(d / name, 1000 + step + i, seed=step * 10 + i)
    return {p.name: file_digest(p) for p in d.iterdir()}


def test_none_first_then_the_newest_directory_checkpoint(tmp_path: Path) -> None:
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    run = tmp_path / "run"
    uri = f"file://{bucket}?prefix=exp"
    assert fetch_latest(uri, tmp_path / "restore0") is None  # a first run starts fresh
    assert not (tmp_path / "restore0").exists()
    _hf_checkpoint(run, 8)
    want = _hf_checkpoint(run, 16)
    _push(run, bucket)
    got = fetch_latest(uri, tmp_path / "restore")
    assert got == tmp_path / "restore" / "checkpoint-16"
    assert {p.name: file_digest(p) for p in got.iterdir()} == want
    # hparams and an explicit prefix name the same place
    hp = ObjectStoreHparams(provider="local", container=str(bucket))
    again = fetch_latest(hp, tmp_path / "restore2", prefix="exp", rank=0)
    assert again == tmp_path / "restore2" / "checkpoint-16"


def test_ranks_and_bad_input(tmp_path: Path) -> None:
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    run = tmp_path / "run"
    for r in (0, 1):
        write_random(run / f"rank_{r}" / "ep1.pt", 500 + r, seed=r)
    _push(run, bucket)
    uri = f"file://{bucket}?prefix=exp"
    assert fetch_latest(uri, tmp_path / "one", rank=1) == tmp_path / "one" / "ep1.pt"
    assert file_digest(tmp_path / "one" / "ep1.pt") == file_digest(run / "rank_1" / "ep1.pt")
    both = fetch_latest(uri, tmp_path / "both")
    assert both == tmp_path / "both"
    for r in (0, 1):
        assert file_digest(both / f"rank_{r}" / "ep1.pt") == file_digest(
            run / f"rank_{r}" / "ep1.pt"
        )
    with pytest.raises(ConfigError, match="rank 5 has no committed checkpoint"):
        fetch_latest(uri, tmp_path / "x", rank=5)
    with pytest.raises(ConfigError, match="store URI or an ObjectStoreHparams"):
        fetch_latest(42, tmp_path / "x")  # type: ignore[arg-type]
    # damaged bytes in the bucket are never handed to training
    obj = bucket / "exp" / "rank_1" / "ep1.pt"
    data = bytearray(obj.read_bytes())
    data[10] ^= 0xFF
    obj.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        fetch_latest(uri, tmp_path / "bad", rank=1)
    assert not (tmp_path / "bad" / "ep1.pt").exists()


def test_ranks_sharing_one_resolution(tmp_path: Path) -> None:
    """``share`` resolves once for every rank (OnceShare stands in for the torch.distributed
    broadcast, tested with real gloo ranks in tests/ckpt/test_distributed.py)."""
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    uri = f"file://{bucket}?prefix=exp"
    first = OnceShare()
    got = [fetch_latest(uri, tmp_path / f"r{r}", rank=r, share=first) for r in range(3)]
    assert got == [None] * 3 and first.calls == 3
    hp = ObjectStoreHparams(provider="local", container=str(bucket))
    with hp.initialize_object() as store:
        commit_world(store, "exp", 3, ["ep1.pt", "ep2.pt"], data=b"weights" * 100)
    share = OnceShare()
    for r in range(3):
        path = fetch_latest(uri, tmp_path / f"s{r}", rank=r, share=share)
        assert path == tmp_path / f"s{r}" / "ep2.pt"
        assert path.read_bytes() == b"weights" * 100
    assert share.calls == 3
