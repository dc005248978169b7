"""The daemon's report: builds its :class:`StatusReport`, rewrites the status file every
second, and warns when uploads fall behind the saves.

The report reads the engine's parts (journal totals, uploads in flight, committer,
assembler, the work queue's :class:`~uploader.daemon.keepup.Backlog`); the schema is
:mod:`uploader.daemon.status`. A warning is logged when the lag (see
:meth:`Backlog.lag <uploader.daemon.keepup.Backlog.lag>`) stays above twice the observed
save interval for :data:`LAG_CHECKS` readings in a row, at most once a minute.

Example::

    reporter = Reporter(engine)
    report = reporter.build()
    await reporter.run()        # the status task, every second
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import anyio

from uploader.daemon.journal import Totals
from uploader.daemon.status import LEFT_OUT_SHOWN, StatusReport

__all__ = ["Reporter", "LAG_CHECKS", "lag_behind"]

log = logging.getLogger("uploader.daemon.engine")

#: Status readings in a row with the lag above twice the save interval before a warning.
LAG_CHECKS = 3
#: Least seconds between two lag warnings.
LAG_WARN_EVERY = 60.0


def lag_behind(lag: float, interval: float | None) -> bool:
    """Whether ``lag`` is above twice the save ``interval`` (None: not known yet)."""
    return interval is not None and interval > 0 and lag > 2 * interval


class Reporter:
    """The status report of one engine (see the module docstring).

    Args:
        engine: the :class:`~uploader.daemon.engine.Engine` reported on.
        clock: monotonic seconds.
    """

    def __init__(self, engine: Any, clock: Callable[[], float] = time.monotonic) -> None:
        self.engine = engine
        self.clock = clock
        self.totals = Totals()
        self._rate_window: deque[tuple[float, int]] = deque(maxlen=12)
        self._behind = 0
        self._warned_at = -LAG_WARN_EVERY
        #: Bytes held by unfinished multipart uploads (read every second).
        self.resumable_bytes = 0
        #: Called with each report the status task builds (metrics).
        self.listeners: list[Callable[[StatusReport], None]] = []

    def build(self, totals: Totals | None = None) -> StatusReport:
        """The daemon's report; ``totals`` from the journal (read here when None)."""
        e = self.engine
        if totals is None:
            with e.journal_lock:
                totals = e.journal.totals()
        t = totals
        now = self.clock()
        sent, inflight = e.uploads.sent()
        self._rate_window.append((now, sent))
        t0, s0 = self._rate_window[0]
        rate = (sent - s0) / (now - t0) if now > t0 else 0.0
        phase = e.phase
        left_out = e.intake.left_out if e.intake is not None else {}
        if phase in ("running", "draining") and (t.failed or e.committer.failures):
            phase = "failed"
        backlog = e.backlog
        interval = backlog.save_interval()
        chunked = e.uploads.chunked
        return StatusReport(
            pid=os.getpid(),
            state=phase,
            pending=t.pending,
            uploading=t.uploading,
            done=t.done,
            failed=t.failed,
            bytes_total=t.bytes_total,
            bytes_done=t.bytes_done + inflight,
            rate_bytes_per_s=round(rate, 1),
            last_error=e.last_error or t.last_error,
            journal_saved=not e.journal.in_memory,
            intake_finished=e.intake_finished,
            committed=e.committer.committed,
            fenced=e.committer.fenced,
            fencing=e.committer.fence_reason,
            conflicts=e.committer.conflicts,
            conflict_failures=e.committer.conflict_failures,
            removed=t.removed,
            rotated=len(e.assembler.rotated),
            skipped_superseded=backlog.skipped,
            dedup_scope=e.opts.dedup_scope,
            dedup_new_bytes=chunked.new_bytes if chunked is not None else 0,
            dedup_reused_bytes=chunked.reused_bytes if chunked is not None else 0,
            lag_seconds=round(backlog.lag(), 3),
            max_lag_seconds=round(backlog.max_lag, 3),
            pending_bytes=backlog.pending_bytes,
            pending_checkpoints=backlog.pending_checkpoints,
            save_interval_seconds=round(interval, 3) if interval is not None else None,
            incomplete=dict(e.assembler.incomplete),
            left_out=dict(sorted(left_out.items())[:LEFT_OUT_SHOWN]),
            left_out_count=len(left_out),
            identity=e.store.identity,
            updated_at=time.time(),
        )

    def write(self, totals: Totals | None = None) -> None:
        """Rewrite the status file (if any) and tell the listeners; never raises."""
        path = self.engine.opts.status_file
        if path is None and not self.listeners:
            return
        with contextlib.suppress(Exception):
            report = self.build(totals)
            if path is not None:
                report.write(path)
            for listener in self.listeners:
                listener(report)

    def check_lag(self, report: StatusReport) -> bool:
        """Log a warning when the lag stayed above twice the save interval for
        :data:`LAG_CHECKS` readings; True when it warned."""
        if not lag_behind(report.lag_seconds, report.save_interval_seconds):
            self._behind = 0
            return False
        self._behind += 1
        now = self.clock()
        if self._behind < LAG_CHECKS or now - self._warned_at < LAG_WARN_EVERY:
            return False
        self._warned_at = now
        log.warning(
            "uploads are falling behind: the newest complete checkpoint became complete "
            "%.1fs ago and is not committed (saves come every %.1fs, %d checkpoint(s), "
            "%d bytes waiting); raise --bwlimit or --files, save less often, or set "
            "--keep-remote so superseded checkpoints are skipped",
            report.lag_seconds,
            report.save_interval_seconds or 0.0,
            report.pending_checkpoints,
            report.pending_bytes,
        )
        return True

    async def run(self) -> None:
        """The status task: every second, a report to the status file and listeners."""
        e = self.engine
        tick = 0
        while True:
            if e.intake is not None and tick % 5 == 0:
                await anyio.to_thread.run_sync(e.intake.prune_left_out)
            tick += 1
            self.totals = await e.call(e.journal.totals)
            if self.listeners:
                self.resumable_bytes = await e.call(_held, e.journal)
            report = self.build(self.totals)
            if e.opts.status_file is not None:
                report.write(e.opts.status_file)
            e.uploads.progress.tick(report)
            self.check_lag(report)
            for listener in self.listeners:
                with contextlib.suppress(Exception):
                    listener(report)
            await anyio.sleep(1.0)


def _held(journal: Any) -> int:
    """Bytes the journal records as held by unfinished multipart uploads."""
    return sum(s.bytes_held for s in journal.sessions.all())
