"""The encryption that GCS buckets and Azure accounts demand of new objects: a Cloud KMS
key name (``kms_key_name``) and an encryption scope (``encryption_scope``), sent with every
request that creates an object, as the stores' APIs take them.

The emulators (fake-gcs-server, Azurite) store objects without encrypting them, so a
recording proxy in front of each shows the header on every request that writes an object;
what the store does with it is the cloud's."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.faultproxy import FaultPlan, FaultProxy
from harness.servers.azure import Azurite
from harness.servers.gcs import GCS_KEY_ENV, GCS_SECRET_ENV, FakeGCS
from uploader.config.hparams import ObjectStoreHparams, parse_uri
from uploader.errors import ConfigError

KEY = "projects/p1/locations/europe-west4/keyRings/ckpt/cryptoKeys/runs"
REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20


def _push(
    run: Path, uri: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "uploader", "push", str(run), uri, "--settle", "0.1"]
    cmd += ["--part-size", "1M"]
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


def _run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "small.pt").write_bytes(os.urandom(1000))
    (run / "large.pt").write_bytes(os.urandom(3 * MiB + 17))  # more than one part
    return run


@pytest.fixture
def gcs_proxy(fake_gcs_server: FakeGCS) -> Iterator[FaultProxy]:
    assert fake_gcs_server.shim is not None
    with FaultProxy((fake_gcs_server.host, fake_gcs_server.shim.port), FaultPlan()) as p:
        yield p


@pytest.fixture
def azure_proxy(azurite: Azurite) -> Iterator[FaultProxy]:
    with FaultProxy((azurite.host, azurite.port), FaultPlan()) as p:
        yield p


def test_gcs_kms_key_name_is_sent_with_every_object_upload(
    tmp_path: Path, fake_gcs_server: FakeGCS, gcs_proxy: FaultProxy
) -> None:
    bucket = "kms-" + uuid.uuid4().hex[:10]
    fake_gcs_server.make_bucket(bucket)
    uri = (
        f"gs://{bucket}/exp?endpoint={gcs_proxy.url}&kms_key_name={KEY}"
        f"&key_environ={GCS_KEY_ENV}&secret_environ={GCS_SECRET_ENV}"
    )
    out = _push(_run_dir(tmp_path), uri)
    assert out.returncode == 0, out.stderr
    puts = [(t, h) for m, t, h in gcs_proxy.headers if m in ("PUT", "POST")]
    objects = [(t, h) for t, h in puts if "/rank_0/" in t and not t.endswith("latest.json")]
    assert {t.rsplit("/", 1)[-1] for t, _ in objects} >= {"small.pt", "large.pt"}
    assert all(h.get("x-goog-encryption-kms-key-name") == KEY for _, h in objects), objects


def test_azure_encryption_scope_is_sent_with_blobs_blocks_and_block_lists(
    tmp_path: Path, azurite: Azurite, azure_proxy: FaultProxy
) -> None:
    container = f"t{uuid.uuid4().hex[:20]}"
    hp = azurite.hparams(container)
    hp.port = azure_proxy.port
    hp.extra_init_kwargs["encryption_scope"] = "ckptscope"
    with hp.initialize_object(part_size=1 * MiB, create_container=True) as store:
        run = _run_dir(tmp_path)
        store.upload_file(run / "small.pt", "exp/small.pt")
        store.upload_file(run / "large.pt", "exp/large.pt")
    writes = [(t, h) for m, t, h in azure_proxy.headers if m == "PUT" and "/exp/" in t]
    assert len(writes) >= 1 + 4 + 1  # Put Blob; Put Block x4; Put Block List
    assert all(h.get("x-ms-encryption-scope") == "ckptscope" for _, h in writes), writes
    assert all(h.get("x-ms-version", "") >= "2019-02-02" for _, h in writes)


@pytest.mark.parametrize(
    "uri,match",
    [
        (f"s3://b/p?kms_key_name={KEY}", "GCS stores only"),
        ("gs://b/p?encryption_scope=scope1", "Azure stores only"),
        ("gs://b/p?kms_key_name=mykey", "not a Cloud KMS key name"),
        ("azure://c/p?encryption_scope=a-b", "not an Azure encryption scope"),
    ],
)
def test_encryption_options_given_wrongly_say_what_to_do(uri: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_uri(uri).hparams.validate()


def test_flags_and_config_file_carry_the_options(tmp_path: Path) -> None:
    """``--kms-key-name`` reaches the store settings as the URI parameter does."""
    from uploader.config.resolve import resolve

    opts = resolve({"uri": "gs://b/p", "kms_key_name": KEY})
    assert opts.location.hparams.extra_init_kwargs["kms_key_name"] == KEY
    hp: ObjectStoreHparams = opts.location.hparams
    assert hp.store_settings().extra["kms_key_name"] == KEY
