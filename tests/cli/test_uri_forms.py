"""URIs as people type them: ``push RUN_DIR URI`` (positional, as ``aws s3 cp``, ``s5cmd
cp`` and ``rclone copy`` take the destination), then ``pull``/``ls``/``verify`` on the
same URI with ``/latest``, ``/rank_N/NAME`` or an object path appended, on every scheme:
a local directory (``file://``), rclone's S3 server, Azurite and fake-gcs-server. Every
command is a real ``ckpt-uploader`` process.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.servers.azure import AZURITE_KEY_ENV, AZURITE_SECRET_ENV, Azurite
from harness.servers.gcs import GCS_KEY_ENV, GCS_SECRET_ENV, FakeGCS
from harness.servers.s3 import S3Server
from tests.daemon.test_process import atomic_write, run_cli, sha256
from uploader.errors import ExitCode


def _below(uri: str, path: str) -> str:
    """``uri`` with ``/path`` appended to its path (before any ``?query``)."""
    base, sep, query = uri.partition("?")
    return f"{base.rstrip('/')}/{path}{sep}{query}"


def _file_uri(tmp_path: Path) -> str:
    return f"file://{tmp_path}/bucket/exp"


def _s3_uri(server: S3Server) -> str:
    bucket = "uri-" + uuid.uuid4().hex[:8]
    server.make_bucket(bucket)
    return server.uri(bucket, "exp")


def _azure_uri(az: Azurite) -> str:
    return (
        f"azure://t{uuid.uuid4().hex[:20]}/exp?endpoint=http://{az.host}:{az.port}"
        f"&key_environ={AZURITE_KEY_ENV}&secret_environ={AZURITE_SECRET_ENV}"
    )


def _gs_uri(gcs: FakeGCS) -> str:
    bucket = "uri-" + uuid.uuid4().hex[:8]
    gcs.make_bucket(bucket)
    assert gcs.shim is not None
    return (
        f"gs://{bucket}/exp?endpoint=http://{gcs.host}:{gcs.shim.port}"
        f"&key_environ={GCS_KEY_ENV}&secret_environ={GCS_SECRET_ENV}"
    )


URIS: dict[str, Callable[[pytest.FixtureRequest, Path], str]] = {
    "file": lambda request, tmp: _file_uri(tmp),
    "s3": lambda request, tmp: _s3_uri(request.getfixturevalue("rclone_s3")),
    "azure": lambda request, tmp: _azure_uri(request.getfixturevalue("azurite")),
    "gs": lambda request, tmp: _gs_uri(request.getfixturevalue("fake_gcs_server")),
}


@pytest.mark.parametrize("scheme", sorted(URIS))
def test_pull_and_ls_take_the_uri_push_wrote_to_with_a_path_appended(
    scheme: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    uri = URIS[scheme](request, tmp_path)
    run = tmp_path / "run"
    ckpt = run / "checkpoint-2"
    ckpt.mkdir(parents=True)
    model = atomic_write(ckpt / "model.safetensors", 70_000, seed=1)
    atomic_write(ckpt / "trainer_state.json", 100, seed=2)  # HF's marker, written last
    log = atomic_write(run / "train.log", 500, seed=3)
    if scheme == "file":
        (tmp_path / "bucket" / "exp").mkdir(parents=True)

    out = run_cli("push", str(run), uri, "--settle=0.1", "--create-container", "-q")
    assert out.returncode == 0, out.stderr

    out = run_cli("pull", _below(uri, "latest"), f"{tmp_path}/latest/", "-q")
    assert out.returncode == 0, out.stderr
    assert sha256(tmp_path / "latest" / "checkpoint-2" / "model.safetensors") == model

    out = run_cli("pull", _below(uri, "rank_0/checkpoint-2"), f"{tmp_path}/named/", "-q")
    assert out.returncode == 0, out.stderr
    assert sha256(tmp_path / "named" / "checkpoint-2" / "model.safetensors") == model

    out = run_cli("pull", _below(uri, "rank_0/train.log"), f"{tmp_path}/obj/", "-q")
    assert out.returncode == 0, out.stderr
    assert sha256(tmp_path / "obj" / "train.log") == log

    out = run_cli("ls", uri, "--json")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r["rank"], r["name"], r["latest"]) for r in rows] == [(0, "checkpoint-2", True)]
    for tail in ("latest", "rank_0", "rank_0/checkpoint-2"):
        out = run_cli("ls", _below(uri, tail), "--json")
        assert out.returncode == 0, (tail, out.stderr)
        assert [json.loads(line)["name"] for line in out.stdout.splitlines()] == ["checkpoint-2"]
    out = run_cli("ls", _below(uri, "rank_0/checkpoint-9"))
    assert out.returncode == ExitCode.FAILED
    assert "no committed checkpoint 'rank_0/checkpoint-9'" in out.stderr

    out = run_cli("verify", _below(uri, "rank_0/checkpoint-2"))
    assert out.returncode == 0, out.stderr
    assert "2 object(s) verified, 0 failure(s)" in out.stdout

    if scheme == "file":
        # The store is the directory push named: no lock or staging folder anywhere else.
        assert sorted(p.name for p in (tmp_path / "bucket").iterdir()) == [
            ".exp.lock",
            ".exp.uploads",
            "exp",
        ]


def test_a_destination_given_twice_differently_is_a_configuration_error(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for command in ("push", "watch"):
        out = run_cli(command, str(run), f"file://{tmp_path}/a", "--to", f"file://{tmp_path}/b")
        assert out.returncode == ExitCode.CONFIG
        assert "the destination is given twice" in out.stderr
        assert "give it once" in out.stderr
    assert not any((tmp_path / "a").iterdir()) and not any((tmp_path / "b").iterdir())
    # The same URI both ways is one destination.
    atomic_write(run / "ep1.pt", 10, seed=0)
    uri = f"file://{tmp_path}/a"
    out = run_cli("push", str(run), uri, "--to", uri, "--settle=0.1", "-q")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "a" / "rank_0" / "ep1.pt").exists()
