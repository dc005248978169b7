"""What the daemon reports: the status file, progress bars or log lines, ``status`` output.

The status file (``--status-file``) is JSON, rewritten atomically (temporary
file + rename; in place when the disk is full) at least every second and at exit::

    {"pid": 4242, "state": "running", "pending": 1, "uploading": 1, "done": 7,
     "failed": 0, "bytes_total": 1234, "bytes_done": 1000, "rate_bytes_per_s": 5e7,
     "last_error": null, "journal_saved": true, "updated_at": 1764000000.0}

``state`` is one of ``starting``, ``running``, ``draining``, ``done``, ``failed``.
It never holds a secret: errors pass through :func:`uploader.redact.redact`.

Example::

    write_status_file(Path("status.json"), {"pid": os.getpid(), "state": "running"})
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .redact import redact

__all__ = ["write_status_file", "read_status_file", "Progress", "format_bytes", "STATES"]

log = logging.getLogger("uploader.progress")

STATES = ("starting", "running", "draining", "done", "failed")


def write_status_file(path: Path, data: Mapping[str, Any]) -> None:
    """Write ``data`` as JSON to ``path`` atomically (readers never see half a file).

    On a full disk the file is overwritten in place instead (padded with spaces to
    its old length, in one write), which needs no new space while it fits in the
    blocks it already has; a reader that catches it half written retries.
    """
    body = dict(data)
    if body.get("last_error"):
        body["last_error"] = redact(str(body["last_error"]))
    body.setdefault("updated_at", time.time())
    text = (json.dumps(body, sort_keys=True) + "\n").encode()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT) and _overwrite(path, text):
            return
        _warn_once(path, f"cannot write the status file {path}: {exc.strerror}")


def _overwrite(path: Path, text: bytes) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError:
        return False
    try:
        old = os.fstat(fd).st_size
        data = text + b" " * (old - len(text)) if old > len(text) else text
        return os.pwrite(fd, data, 0) == len(data)
    except OSError:
        return False
    finally:
        os.close(fd)


_warned: dict[str, float] = {}


def _warn_once(path: Path, message: str, every: float = 60.0) -> None:
    """Log ``message`` at most once per ``every`` seconds for ``path``."""
    now = time.monotonic()
    if now - _warned.get(str(path), -every) >= every:
        _warned[str(path)] = now
        log.warning("%s", message)


def read_status_file(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


class Progress:
    """Per-file and overall progress: tqdm bars on a terminal, log lines otherwise.

    Args:
        bars: draw tqdm bars (use when stderr is a terminal and not quiet).
        log_every: seconds between overall progress log lines when not drawing bars.

    Methods are thread-safe: ``advance`` is called from upload threads.
    """

    def __init__(self, bars: bool, log_every: float = 10.0) -> None:
        self.bars = bars
        self.log_every = log_every
        self._lock = threading.Lock()
        self._files: dict[str, Any] = {}
        self._overall: Any = None
        self._last_log = 0.0
        if bars:
            from tqdm import tqdm

            self._tqdm = tqdm
            # Log lines go above the bars instead of through them.
            for h in logging.getLogger().handlers:
                if h.get_name() == "ckpt-uploader" and isinstance(h, logging.StreamHandler):
                    h.setStream(_TqdmStream(tqdm))  # type: ignore[arg-type]
            self._overall = tqdm(
                total=0, unit="B", unit_scale=True, unit_divisor=1024, desc="total", position=0
            )

    def start(self, rel: str, size: int) -> None:
        if not self.bars:
            return
        with self._lock:
            self._overall.total = (self._overall.total or 0) + size
            self._overall.refresh()
            self._files[rel] = self._tqdm(
                total=size,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=rel[-40:],
                leave=False,
                position=len(self._files) + 1,
            )

    def advance(self, rel: str, n: int) -> None:
        if not self.bars:
            return
        with self._lock:
            bar = self._files.get(rel)
            if bar is not None:
                bar.update(n)
            self._overall.update(n)

    def finish(self, rel: str, sent: int = 0, size: int = 0) -> None:
        if not self.bars:
            return
        with self._lock:
            bar = self._files.pop(rel, None)
            if bar is not None:
                bar.close()
            if sent < size:  # a failed attempt: take its bytes back off the total
                self._overall.total = max(0, (self._overall.total or 0) - (size - sent))

    def tick(self, status: Mapping[str, Any]) -> None:
        """Called about once a second with the status dict."""
        if self.bars:
            return
        now = time.monotonic()
        busy = status.get("uploading", 0) or status.get("pending", 0)
        if busy and now - self._last_log >= self.log_every:
            self._last_log = now
            log.info(
                "progress state=%s pending=%d uploading=%d done=%d failed=%d bytes_done=%d "
                "bytes_total=%d rate_bytes_per_s=%.0f",
                status.get("state"),
                status.get("pending", 0),
                status.get("uploading", 0),
                status.get("done", 0),
                status.get("failed", 0),
                status.get("bytes_done", 0),
                status.get("bytes_total", 0),
                status.get("rate_bytes_per_s", 0.0),
            )

    def close(self) -> None:
        if not self.bars:
            return
        with self._lock:
            for bar in self._files.values():
                bar.close()
            self._files.clear()
            self._overall.close()


class _TqdmStream:
    def __init__(self, tqdm: Any) -> None:
        self._tqdm = tqdm

    def write(self, text: str) -> None:
        if text.strip():
            self._tqdm.write(text.rstrip("\n"), file=sys.stderr)

    def flush(self) -> None:
        sys.stderr.flush()


def stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
