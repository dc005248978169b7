"""What the training side sees of the worker process: its status report, and a bar.

:class:`StatusReader` reads the daemon's status file (the one thing the training
side reads) at most once per interval and only when it changed, so a check per
training batch costs a ``stat`` at most. :class:`DrainBar` shows the report's
bytes verified of bytes accepted while the worker drains; silent when disabled.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

from uploader.daemon.status import StatusReport

__all__ = ["StatusReader", "DrainBar"]


class StatusReader:
    """The last status report in ``path``, read again at most once per ``interval``."""

    def __init__(self, path: Path, interval: float) -> None:
        self.path = path
        self.interval = interval
        self._last_read = 0.0
        self._last_mtime: int | None = None
        self._status: StatusReport | None = None

    def reset(self) -> None:
        """Replace a report left by an earlier worker with a fresh ``starting`` one
        (it also holds a block the daemon can overwrite in place if the disk fills)."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        StatusReport().write(self.path)
        self._last_mtime, self._status = None, None

    def read(self, fresh: bool = False) -> StatusReport | None:
        """The newest report (``fresh``: read now), or the last one read; None before any."""
        now = time.monotonic()
        if fresh or now - self._last_read >= self.interval:
            self._last_read = now
            try:
                mtime = os.stat(self.path).st_mtime_ns
            except OSError:
                mtime = None
            if mtime is not None and (fresh or mtime != self._last_mtime):
                st = StatusReport.read(self.path)
                if st is not None:
                    self._status = st
                    self._last_mtime = mtime
        return self._status


class DrainBar:
    """A tqdm bar of bytes uploaded while draining; silent when disabled."""

    def __init__(self, enabled: bool, rank: int) -> None:
        self.enabled = enabled
        self.rank = rank
        self.bar: Any = None

    def show(self, st: StatusReport) -> None:
        if not self.enabled or (self.bar is None and st.bytes_total <= 0):
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(
                total=max(st.bytes_total, 1),
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=f"uploading rank_{self.rank}",
                leave=False,
                dynamic_ncols=True,
            )
        if st.bytes_total and st.bytes_total != self.bar.total:
            self.bar.total = st.bytes_total
        self.bar.n = min(st.bytes_done, self.bar.total)
        self.bar.set_postfix_str(f"{st.outstanding} file(s) left", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
