"""Loopback plumbing every server starter needs: a free port, an installed binary, a probe."""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import sys
import sysconfig
from pathlib import Path

__all__ = ["answers_http", "find_binary", "free_port", "port_open"]


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_binary(name: str) -> str:
    """A console script installed in this environment (next to the interpreter first)."""
    candidates = [
        Path(sys.executable).parent / name,
        Path(sysconfig.get_path("scripts")) / name,
    ]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which(name)
    if found:
        return found
    raise FileNotFoundError(
        f"{name} is not installed in this environment; run 'make env' "
        f"(pip install -e '.[dev]') to install it"
    )


def answers_http(host: str, port: int, path: str = "/") -> bool:
    """True when something on ``host:port`` answers an HTTP GET (any status)."""
    conn = http.client.HTTPConnection(host, port, timeout=1.0)
    try:
        conn.request("GET", path)
        conn.getresponse().read()
        return True
    except OSError:
        return False
    finally:
        conn.close()


def port_open(host: str, port: int) -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False
