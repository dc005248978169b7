"""Loopback plumbing every server starter needs: a free port, an installed binary, a probe,
and one way to start a server process, wait until it answers, and stop it."""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Mapping
from pathlib import Path

__all__ = [
    "answers_http",
    "find_binary",
    "free_port",
    "port_open",
    "spawn",
    "wait_ready",
    "stop_group",
]


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


def spawn(
    argv: list[str], log_path: Path, cwd: Path, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start a server in its own session (so :func:`stop_group` reaches its children),
    its output appended to ``log_path``."""
    with open(log_path, "ab") as logf:
        return subprocess.Popen(
            argv,
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=None if env is None else dict(env),
            cwd=cwd,
            start_new_session=True,
        )


def wait_ready(
    proc: subprocess.Popen[bytes],
    name: str,
    log_path: Path,
    ready: Callable[[], bool],
    timeout: float,
    poll: float = 0.05,
) -> bool:
    """Wait (bounded) until ``ready()``; False on timeout. A server that exits first
    raises RuntimeError with the end of its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{name} exited with {proc.returncode}; see {log_path}:\n"
                + log_path.read_text(errors="replace")[-2000:]
            )
        if ready():
            return True
        time.sleep(poll)
    return False


def stop_group(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    """Stop a server started by :func:`spawn`: SIGTERM to its process group, SIGKILL
    after ``timeout`` (idempotent)."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout)
