"""Bucket-policy options on S3: sse, sse_kms_key_id, storage_class, acl.

moto keeps what PutObject and CreateMultipartUpload carried and answers head_object
with it. moto does not enforce bucket policies, so the policy that denies unencrypted
uploads is harness/faultproxy.py answering them ``403 AccessDenied`` as S3 does.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import pytest

from harness.data import write_random
from harness.faultproxy import FaultPlan, FaultProxy
from harness.servers.s3 import S3Server
from uploader.config.hparams import parse_uri
from uploader.config.resolve import resolve
from uploader.errors import AuthError, ConfigError

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20


def _head(server: S3Server, bucket: str, key: str) -> dict:
    s3 = boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        region_name="us-east-1",
        aws_access_key_id=server.key,
        aws_secret_access_key=server.secret,
    )
    return s3.head_object(Bucket=bucket, Key=key)


@pytest.mark.parametrize("size", [1000, 11 * MiB], ids=["put", "multipart"])
def test_encryption_and_class_reach_the_object(
    moto_s3: S3Server, tmp_path: Path, size: int
) -> None:
    bucket = f"opt-{uuid.uuid4().hex[:8]}"
    moto_s3.make_bucket(bucket)
    uri = (
        moto_s3.uri(bucket) + "&sse=AES256&storage_class=STANDARD_IA&acl=bucket-owner-full-control"
    )
    src = write_random(tmp_path / "f.bin", size, seed=size)
    with parse_uri(uri).hparams.initialize_object(part_size=5 * MiB) as store:
        store.upload_file(src, "a/f.bin")
    head = _head(moto_s3, bucket, "a/f.bin")
    assert head["ServerSideEncryption"] == "AES256"
    assert head["StorageClass"] == "STANDARD_IA"
    uri = moto_s3.uri(bucket) + "&sse=aws:kms&sse_kms_key_id=alias/ckpt"
    with parse_uri(uri).hparams.initialize_object(part_size=5 * MiB) as store:
        store.upload_file(src, "a/kms.bin")
    head = _head(moto_s3, bucket, "a/kms.bin")
    assert head["ServerSideEncryption"] == "aws:kms"
    assert "alias/ckpt" in head.get("SSEKMSKeyId", "")


def test_options_from_flags_and_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[store]\nuri = "s3://b/p"\nsse = "aws:kms"\nstorage_class = "GLACIER_IR"\n')
    loc = resolve({"config": str(cfg), "acl": "bucket-owner-full-control", "profile": "x"}).location
    extra = loc.hparams.extra_init_kwargs
    assert extra == {
        "sse": "aws:kms",
        "storage_class": "GLACIER_IR",
        "acl": "bucket-owner-full-control",
        "profile": "x",
    }
    # Flags win over the file.
    loc = resolve({"config": str(cfg), "sse": "AES256"}).location
    assert loc.hparams.extra_init_kwargs["sse"] == "AES256"


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("s3://b/p?sse=aes", "use one of AES256"),
        ("s3://b/p?sse_kms_key_id=k", "needs sse=aws:kms"),
        ("s3://b/p?acl=everyone", "canned ACL"),
        ("s3://b/p?storage_class=standard", "capitals"),
        ("azure://c/p?sse=AES256", "S3 stores only"),
    ],
)
def test_bad_option_values_are_config_errors(uri: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_uri(uri)


def test_a_policy_denying_unencrypted_uploads_names_the_sse_option(
    moto_s3: S3Server, tmp_path: Path
) -> None:
    bucket = f"deny-{uuid.uuid4().hex[:8]}"
    moto_s3.make_bucket(bucket)
    with FaultProxy(("127.0.0.1", moto_s3.port), FaultPlan(deny_unencrypted=True)) as proxy:
        store = parse_uri(moto_s3.uri(bucket, port=proxy.port)).hparams.initialize_object()
        with store, pytest.raises(AuthError, match=r"AccessDenied.*set the sse option"):
            store.backend.put_bytes("x", b"x", {}, hashlib.sha256(b"x").digest())
        # The whole command: exit 2, the message says what to set.
        run = tmp_path / "run"
        run.mkdir()
        write_random(run / "ep1.pt", 1000)
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "uploader",
                "push",
                str(run),
                moto_s3.uri(bucket, port=proxy.port),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert proc.returncode == 2, proc.stderr
        assert "sse option" in proc.stderr
        # With encryption asked for, the same policy lets it through.
        ok = subprocess.run(
            [
                sys.executable,
                "-m",
                "uploader",
                "push",
                str(run),
                moto_s3.uri(bucket, port=proxy.port) + "&sse=AES256",
                "--state-dir",
                str(tmp_path / "state2"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert ok.returncode == 0, ok.stderr
        assert proxy.stats()["denied"] >= 2
