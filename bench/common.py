"""Pieces the benchmarks share: the repository root, the environment for the clients,
and warming an object before a timed download."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

ROOT = str(Path(__file__).resolve().parent.parent)

MiB = 1 << 20


def warm_object(server: Any, bucket: str, key: str) -> None:
    """Warm one object the same way for every client, before any timed download.

    On the first request for an object, ``rclone serve s3`` computes an MD5 over
    all of it (its ETag), which costs about 2 s per GiB on this machine and would
    be charged to whichever client came first. One HEAD makes the server compute
    and cache it; one full read brings the object's file into the page cache. A
    benchmark then measures the client, not the server's first touch.
    """
    from uploader.transfer.backends.s3 import S3Backend

    backend = S3Backend(server.hparams(bucket).store_settings())
    try:
        backend.stat(key)
        for _ in backend.read_range(key, 0, None, 8 * MiB):
            pass
    finally:
        backend.close()


def client_env(server: Any, base: Path) -> dict[str, str]:
    """This process's environment plus what every client of a benchmark reads to reach
    ``server`` (an ``S3Server`` of harness/servers/s3.py): its credentials under the
    store's own variables, ``BENCH_S3_KEY``/``BENCH_S3_SECRET`` (the Python clients of
    a child process) and ``AWS_*`` (s5cmd, boto3), an rclone remote ``bench:``, and
    PYTHONPATH for children."""
    env = dict(os.environ)
    env.update(server.env)
    env.update(
        {
            "BENCH_S3_KEY": server.key,
            "BENCH_S3_SECRET": server.secret,
            "AWS_ACCESS_KEY_ID": server.key,
            "AWS_SECRET_ACCESS_KEY": server.secret,
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
            "RCLONE_CONFIG": str(base / "rclone.conf"),
            "RCLONE_CONFIG_BENCH_TYPE": "s3",
            "RCLONE_CONFIG_BENCH_PROVIDER": "Other",
            "RCLONE_CONFIG_BENCH_ACCESS_KEY_ID": server.key,
            "RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY": server.secret,
            "RCLONE_CONFIG_BENCH_ENDPOINT": server.endpoint,
            "RCLONE_CONFIG_BENCH_REGION": "us-east-1",
            "RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE": "true",
            "PYTHONPATH": ROOT,
        }
    )
    (base / "rclone.conf").touch()
    return env


def _credentials() -> tuple[str, str]:
    """The server's key and secret, as :func:`client_env` hands them to a child process."""
    return os.environ["BENCH_S3_KEY"], os.environ["BENCH_S3_SECRET"]


def ours_hparams(endpoint: str, bucket: str) -> Any:
    """``ObjectStoreHparams`` of ``bucket`` at ``endpoint`` (``http://host:port``), in a child."""
    from uploader import ObjectStoreHparams

    host, port = endpoint.rsplit("//", 1)[1].split(":")
    return ObjectStoreHparams(
        provider="s3",
        container=bucket,
        host=host,
        port=int(port),
        key_environ="BENCH_S3_KEY",
        secret_environ="BENCH_S3_SECRET",
    )


def boto3_client(endpoint: str) -> Any:
    """A boto3 S3 client for ``endpoint``, in a child."""
    import boto3

    access, secret = _credentials()
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access,
        aws_secret_access_key=secret,
        region_name="us-east-1",
    )


def obstore_store(endpoint: str, bucket: str) -> Any:
    """An obstore ``S3Store`` of ``bucket`` at ``endpoint`` (plain HTTP, path style), in a child."""
    from obstore.store import S3Store

    access, secret = _credentials()
    return S3Store(
        bucket,
        endpoint=endpoint,
        access_key_id=access,
        secret_access_key=secret,
        region="us-east-1",
        virtual_hosted_style_request=False,
        client_options={"allow_http": True},
    )


def peak_rss_mib() -> float:
    """This process's own peak RSS in MiB (VmHWM: its memory since exec, unlike
    ``ru_maxrss``, which keeps the high-water mark of the process it was forked from)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")  # pragma: no cover - Linux only


def ratio_text(a: float, b: float) -> str:
    """``a / b`` as ``1.23x``; "n/a" where either is missing (0 or NaN)."""
    return f"{a / b:.2f}x" if b and b == b and a == a else "n/a"
