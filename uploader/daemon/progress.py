"""How the daemon shows progress: tqdm bars on a terminal, log lines otherwise.

Example::

    progress = Progress(bars=stderr_is_terminal())
    progress.start("ep1.pt", size)
    progress.advance("ep1.pt", n)     # from upload threads
    progress.finish("ep1.pt")
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from uploader.daemon.status import StatusReport

__all__ = ["Progress", "format_bytes", "stderr_is_terminal"]

log = logging.getLogger("uploader.progress")


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

    def tick(self, status: StatusReport) -> None:
        """Called about once a second with the daemon's status report."""
        if self.bars:
            return
        now = time.monotonic()
        busy = status.uploading or status.pending
        if busy and now - self._last_log >= self.log_every:
            self._last_log = now
            log.info(
                "progress state=%s pending=%d uploading=%d done=%d failed=%d bytes_done=%d "
                "bytes_total=%d rate_bytes_per_s=%.0f",
                status.state,
                status.pending,
                status.uploading,
                status.done,
                status.failed,
                status.bytes_done,
                status.bytes_total,
                status.rate_bytes_per_s,
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
