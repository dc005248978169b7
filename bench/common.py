"""Pieces the benchmarks share: the repository root and the environment for rclone's client."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

ROOT = str(Path(__file__).resolve().parent.parent)


def rclone_env(server: Any, base: Path) -> dict[str, str]:
    """This process's environment plus an rclone remote ``bench:`` for ``server`` (an
    ``S3Server`` of harness/servers/s3.py), its credentials, and PYTHONPATH for children."""
    env = dict(os.environ)
    env.update(server.env)
    env.update(
        {
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
