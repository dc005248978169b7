"""CRC64NVME on S3, against real servers: the headers every upload carries, the store's
``BadDigest`` answer, the unsigned payload over HTTPS, and other clients reading it.

Servers: moto (keeps the checksums it is sent and combines a multipart object's
full-object CRC64NVME itself) and ``rclone serve s3`` (ignores them), each behind the
fault proxy, which records every request's headers and injects the faults; ``rclone
serve s3 --cert/--key`` for HTTPS.
"""

from __future__ import annotations

import base64
import functools
import logging
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from awscrt import checksums

from harness.data import file_digest, write_random
from harness.faultproxy import FaultPlan, FaultProxy
from harness.servers.certs import Certs
from harness.servers.net import find_binary
from harness.servers.s3 import FAST_RETRY, S3Server
from uploader import IntegrityError, ObjectStore
from uploader.transfer.backends.sigv4 import UNSIGNED_PAYLOAD, payload_hash

MiB = 1 << 20
PART = 5 * MiB


def _crc(data: bytes) -> int:
    return int(checksums.crc64nvme(data))


def _b64(crc: int) -> str:
    return base64.b64encode(crc.to_bytes(8, "big")).decode()


@pytest.fixture(params=["moto", "rclone"])
def proxied(request: pytest.FixtureRequest) -> Iterator[tuple[S3Server, FaultProxy, str]]:
    """A fresh bucket on one S3 server, reached through a recording fault proxy."""
    server: S3Server = request.getfixturevalue(f"{request.param}_s3")
    if not server.alive():
        server.start()
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    server.make_bucket(bucket)
    with FaultProxy(("127.0.0.1", server.port)) as proxy:
        yield server, proxy, bucket


def _store(server: S3Server, proxy: FaultProxy, bucket: str, **kw: Any) -> ObjectStore:
    kw.setdefault("retry", FAST_RETRY)
    return server.hparams(bucket, port=proxy.port).initialize_object(part_size=PART, **kw)


def _puts(proxy: FaultProxy) -> list[dict[str, str]]:
    return [h for m, _, h in proxy.headers if m == "PUT"]


def test_every_upload_carries_its_crc64nvme_and_plain_http_still_signs_the_payload(
    proxied: tuple[S3Server, FaultProxy, str], tmp_path: Path
) -> None:
    server, proxy, bucket = proxied
    small = write_random(tmp_path / "small.bin", 1000, seed=1)
    big = write_random(tmp_path / "big.bin", 2 * PART + 123, seed=2)
    data = big.read_bytes()
    with _store(server, proxy, bucket) as store:
        assert store.upload_file(small, "run/small.bin").digest == file_digest(small, PART)
        proxy.headers.clear()
        result = store.upload_file(big, "run/big.bin")
        assert result.digest == file_digest(big, PART) and result.parts == 3
        out = store.download_file("run/big.bin", tmp_path / "out.bin", progress=False)
        assert out.read_bytes() == data
    create = [h for m, t, h in proxy.headers if m == "POST" and "x-amz-checksum-algorithm" in h]
    assert len(create) == 1 and create[0]["x-amz-checksum-algorithm"] == "CRC64NVME"
    assert create[0]["x-amz-checksum-type"] == "FULL_OBJECT"
    parts = [h for h in _puts(proxy) if "x-amz-checksum-crc64nvme" in h]
    want = sorted(_b64(_crc(data[i : i + PART])) for i in range(0, len(data), PART))
    assert sorted(h["x-amz-checksum-crc64nvme"] for h in parts) == want
    for h in parts:
        assert h["x-amz-sdk-checksum-algorithm"] == "CRC64NVME"
        assert len(h["x-amz-content-sha256"]) == 64  # plain HTTP: the payload is signed
        assert "x-amz-checksum-crc64nvme" in h["authorization"]  # the header is signed
    complete = [h for m, t, h in proxy.headers if m == "POST" and "x-amz-checksum-crc64nvme" in h]
    assert complete[0]["x-amz-checksum-crc64nvme"] == _b64(_crc(data))
    assert complete[0]["x-amz-checksum-type"] == "FULL_OBJECT"


@pytest.mark.parametrize("size", [1000, 2 * PART + 7], ids=["PutObject", "UploadPart"])
def test_a_bad_digest_answer_sends_the_part_again(
    proxied: tuple[S3Server, FaultProxy, str], tmp_path: Path, size: int
) -> None:
    server, proxy, bucket = proxied
    src = write_random(tmp_path / "f.bin", size, seed=3)
    with _store(server, proxy, bucket) as store:
        proxy.set_plan(FaultPlan(bad_digest=1))
        result = store.upload_file(src, "run/f.bin")
        assert proxy.stats()["bad_digest"] == 1 and result.retries == 1
        assert result.digest == file_digest(src, PART)
        out = store.download_file("run/f.bin", tmp_path / "out.bin", progress=False)
        assert out.read_bytes() == src.read_bytes()


def test_a_store_refusing_the_checksum_headers_gets_none_and_the_payload_signed(
    proxied: tuple[S3Server, FaultProxy, str],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An S3-compatible server that answers 400 InvalidArgument to x-amz-checksum-*
    (played by the proxy): the refused request is sent again without them, and no later
    one carries them; uploads complete, and restores still check the CRC64NVME digest."""
    server, proxy, bucket = proxied
    big = write_random(tmp_path / "big.bin", 2 * PART + 5, seed=7)
    small = write_random(tmp_path / "small.bin", 100, seed=8)
    with _store(server, proxy, bucket) as store:
        proxy.set_plan(FaultPlan(refuse_checksums=True))
        caplog.set_level(logging.WARNING, "uploader.transfer.backends.s3")
        assert store.upload_file(big, "run/big.bin").digest == file_digest(big, PART)
        assert store.upload_file(small, "run/small.bin").digest == file_digest(small, PART)
        assert proxy.stats()["checksums_refused"] == 1  # CreateMultipartUpload, once
        assert [r.getMessage() for r in caplog.records if "refuses" in r.getMessage()]
        for path in (big, small):
            out = store.download_file(f"run/{path.name}", tmp_path / "o", progress=False)
            assert out.read_bytes() == path.read_bytes()
    puts = _puts(proxy)
    assert puts and not [h for h in puts if "x-amz-checksum-crc64nvme" in h]
    assert all(len(h["x-amz-content-sha256"]) == 64 for h in puts)


def test_a_byte_flipped_in_transit_of_an_unsigned_payload_is_caught_at_restore(
    rclone_s3: S3Server, tmp_path: Path
) -> None:
    """rclone serve s3 does not check x-amz-checksum-crc64nvme: with the payload unsigned
    (as over HTTPS, forced here on plain HTTP by replacing the backend's payload seam,
    since no proxy can alter bytes inside TLS) a damaged body is stored, and the
    download's own check refuses it; nothing is renamed into place."""
    if not rclone_s3.alive():
        rclone_s3.start()
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    rclone_s3.make_bucket(bucket)
    src = write_random(tmp_path / "f.bin", 2 * PART + 5, seed=4)
    with (
        FaultProxy(("127.0.0.1", rclone_s3.port)) as proxy,
        _store(rclone_s3, proxy, bucket) as store,
    ):
        backend: Any = store.backend
        backend._payload = functools.partial(payload_hash, unsigned=True)
        proxy.set_plan(FaultPlan(flip_byte=1))
        store.upload_file(src, "run/f.bin")
        assert proxy.stats()["flipped"] == 1
        parts = [h for h in _puts(proxy) if "x-amz-checksum-crc64nvme" in h]
        assert len(parts) == 3
        assert all(h["x-amz-content-sha256"] == UNSIGNED_PAYLOAD for h in parts)
        dest = tmp_path / "restore" / "f.bin"
        with pytest.raises(IntegrityError, match="corrupt"):
            store.download_file("run/f.bin", dest, progress=False)
        assert not dest.exists() and list(dest.parent.iterdir()) == []


def test_over_https_the_payload_is_unsigned_and_no_sha256_is_computed(
    tls_s3: dict[str, S3Server], certs: Certs, tmp_path: Path
) -> None:
    """rclone serve s3 with --cert/--key: every part goes as UNSIGNED-PAYLOAD with its
    signed CRC header, and the uploader hands the backend no sha256 (none computed)."""
    server = tls_s3["leaf"]
    hp = server.hparams(
        "ckpts", host="localhost", extra_init_kwargs={"secure": True, "ca_bundle": str(certs.ca)}
    )
    sent: list[tuple[str, bytes | None]] = []
    with hp.initialize_object(part_size=PART, retry=FAST_RETRY) as store:
        backend: Any = store.backend
        assert not backend.payload_sha256
        seam = backend._payload

        def spy(body: Any, sha256: Any, crc: Any, headers: dict[str, str]) -> str:
            out: str = seam(body, sha256, crc, headers)
            if crc is not None:
                sent.append((out, sha256))
            return out

        backend._payload = spy
        for size in (1000, 2 * PART + 9):
            src = write_random(tmp_path / f"{size}.bin", size, seed=size)
            result = store.upload_file(src, f"https/{size}.bin")
            assert result.digest == file_digest(src, PART)
            out = store.download_file(f"https/{size}.bin", tmp_path / "o", progress=False)
            assert out.read_bytes() == src.read_bytes()
    assert sent == [(UNSIGNED_PAYLOAD, None)] * 4


def _boto3(server: S3Server) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        aws_access_key_id=server.key,
        aws_secret_access_key=server.secret,
        region_name="us-east-1",
        config=Config(
            request_checksum_calculation="when_supported",
            response_checksum_validation="when_supported",
        ),
    )


@pytest.mark.parametrize("size", [1000, 2 * PART + 11], ids=["single", "multipart"])
def test_boto3_and_s5cmd_read_what_push_wrote_and_moto_holds_the_files_crc(
    moto_s3: S3Server, tmp_path: Path, size: int
) -> None:
    if not moto_s3.alive():
        moto_s3.start()
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    moto_s3.make_bucket(bucket)
    src = write_random(tmp_path / "f.bin", size, seed=5)
    data = src.read_bytes()
    with moto_s3.hparams(bucket).initialize_object(part_size=PART, retry=FAST_RETRY) as store:
        store.upload_file(src, "run/f.bin")
    client = _boto3(moto_s3)
    head = client.head_object(Bucket=bucket, Key="run/f.bin", ChecksumMode="ENABLED")
    assert head["ChecksumCRC64NVME"] == _b64(_crc(data))
    if size > PART:
        assert head.get("ChecksumType") == "FULL_OBJECT"
    client.download_file(bucket, "run/f.bin", str(tmp_path / "boto3.bin"))
    assert (tmp_path / "boto3.bin").read_bytes() == data
    got = client.get_object(Bucket=bucket, Key="run/f.bin", ChecksumMode="ENABLED")
    assert got["Body"].read() == data  # botocore checks the CRC it is sent as it reads
    env = dict(os.environ)
    env.update(
        AWS_ACCESS_KEY_ID=moto_s3.key,
        AWS_SECRET_ACCESS_KEY=moto_s3.secret,
        AWS_REGION="us-east-1",
    )
    argv = [find_binary("s5cmd"), "--endpoint-url", moto_s3.endpoint, "cp"]
    subprocess.run(
        [*argv, f"s3://{bucket}/run/f.bin", str(tmp_path / "s5cmd.bin")],
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert (tmp_path / "s5cmd.bin").read_bytes() == data
