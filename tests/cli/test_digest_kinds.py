"""Digest kinds through the command line: ``push --digest``, and restores of buckets that
hold objects of both kinds (objects written before CRC64NVME became the default, with
sha256, keep restoring and verifying beside new ones).

The bucket is a real directory store (libcloud LOCAL) and moto for the S3 cases; the
commands run in this process through ``uploader.cli.main.main``.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from harness.data import bytes_digest, file_digest, write_random
from harness.servers.s3 import S3Server
from uploader.cli.main import main
from uploader.errors import ExitCode

MiB = 1 << 20


def _pointer(bucket: Path, prefix: str = "exp") -> dict[str, object]:
    data: dict[str, object] = json.loads((bucket / prefix / "rank_0" / "latest.json").read_text())
    return data


def _flip(path: Path, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x01]))


def test_push_digest_option_writes_either_kind_and_both_restore(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    uri = f"file://{bucket}?prefix=exp"
    run = tmp_path / "run"
    run.mkdir()
    old = write_random(run / "ep1.pt", 3 * MiB + 5, seed=1)
    os.utime(old, (1_000_000, 1_000_000))
    # Written as today's main writes it: sha256 (over 1 MiB parts: sha256-parts).
    assert main(["push", str(run), uri, "--digest", "sha256", "--part-size", "1M", "-q"]) == 0
    first = _pointer(bucket)["latest"]
    assert first["digest"] == str(file_digest(old, MiB, "sha256"))  # type: ignore[index]
    assert first["digest"].startswith("sha256-parts:")  # type: ignore[index]
    new = write_random(run / "ep2.pt", 2 * MiB + 3, seed=2)
    assert main(["push", str(run), uri, "--part-size", "1M", "-q"]) == 0
    pointer = _pointer(bucket)
    assert pointer["latest"]["digest"] == bytes_digest(new.read_bytes())  # type: ignore[index]
    digests = {e["name"]: e["digest"] for e in pointer["history"]}  # type: ignore[attr-defined]
    assert digests["ep1.pt"] == first["digest"]  # type: ignore[index]

    out = tmp_path / "out"
    assert main(["pull", f"{uri}/latest", f"{out}/", "-q"]) == 0
    assert (out / "ep2.pt").read_bytes() == new.read_bytes()
    assert main(["pull", f"file://{bucket}?prefix=exp/rank_0/ep1.pt", f"{out}/", "-q"]) == 0
    assert (out / "ep1.pt").read_bytes() == old.read_bytes()
    assert main(["verify", uri, "-q"]) == 0

    # One flipped bit in either object: its restore fails, nothing lands, verify names it.
    for name, at in (("ep1.pt", 2 * MiB + 7), ("ep2.pt", MiB + 1)):
        _flip(bucket / "exp" / "rank_0" / name, at)
        dest = tmp_path / f"bad-{name}"
        dest.mkdir()
        code = main(["pull", f"file://{bucket}?prefix=exp/rank_0/{name}", f"{dest}/", "-q"])
        assert code == ExitCode.FAILED and list(dest.iterdir()) == []
        assert "corrupt" in capsys.readouterr().err
    assert main(["verify", uri]) != 0
    err = capsys.readouterr()
    assert "ep1.pt" in err.out + err.err and "ep2.pt" in err.out + err.err


def test_an_unknown_digest_kind_is_refused_with_the_choices(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    code = main(["push", str(run), f"file://{tmp_path}?prefix=x", "--digest", "md5"])
    assert code == ExitCode.CONFIG
    assert "'md5'" in capsys.readouterr().err
    toml = tmp_path / "up.toml"
    toml.write_text('[watch]\ndigest = "md5"\n')
    code = main(["push", str(run), f"file://{tmp_path}?prefix=x", "--config", str(toml)])
    assert code == ExitCode.CONFIG
    assert "--digest 'md5' is not a digest kind; use one of crc64nvme, sha256" in (
        capsys.readouterr().err
    )


def test_a_directory_checkpoint_whose_manifest_holds_both_kinds_restores(
    tmp_path: Path, moto_s3: S3Server, capsys: pytest.CaptureFixture[str]
) -> None:
    """One file of a DCP directory uploaded with sha256 (multipart: sha256-parts), the
    other with the default CRC64NVME, and the manifest naming both (as a checkpoint
    finished by a newer uploader after an older one sent part of it): it restores, each
    file checked against its own kind."""
    from uploader.bucket.pointer import ManifestFile, PointerEntry, commit, manifest_digest

    if not moto_s3.alive():
        moto_s3.start()
    bucket = f"k-{uuid.uuid4().hex[:8]}"
    moto_s3.make_bucket(bucket)
    src = tmp_path / "src"
    src.mkdir()
    a = write_random(src / "a.distcp", 6 * MiB + 1, seed=3)
    b = write_random(src / "b.distcp", 1000, seed=4)
    files = []
    hp = moto_s3.hparams(bucket)
    with hp.initialize_object(part_size=5 * MiB, digest="sha256") as sha_store:
        ra = sha_store.upload_file(a, "exp/rank_0/step_1/a.distcp")
        files.append(ManifestFile("step_1/a.distcp", ra.size, str(ra.digest)))
    with hp.initialize_object(part_size=5 * MiB) as store:
        rb = store.upload_file(b, "exp/rank_0/step_1/b.distcp")
        files.append(ManifestFile("step_1/b.distcp", rb.size, str(rb.digest)))
        assert {f.digest.split(":")[0] for f in files} == {"sha256-parts", "crc64nvme"}
        entry = PointerEntry(
            "step_1",
            "exp/rank_0/step_1",
            ra.size + rb.size,
            manifest_digest(tuple(files)),
            1,
            1.0,
            "dcp",
            tuple(files),
        )
        commit(store, "exp", 0, entry)
    out = tmp_path / "out"
    assert main(["pull", moto_s3.uri(bucket, "exp/latest"), f"{out}/", "-q"]) == 0
    assert (out / "step_1" / "a.distcp").read_bytes() == a.read_bytes()
    assert (out / "step_1" / "b.distcp").read_bytes() == b.read_bytes()
