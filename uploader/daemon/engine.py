"""The upload engine: from a finished file on disk to a verified object and a commit pointer.

Structure (one anyio task group, owned by :meth:`Engine.run`; the pipeline is a
task group of its own, which finishes when the work is done)::

    signals, status (1 Hz), parent watch, idle watch
    pipeline:
      watchdog thread --events (bounded)--> Intake --+
      journal resume, start-up scan --------> Settler +-> take: journal.accept -> work queue
                                                       (bounded; keepup: newest first, superseded skipped)
      upload loops (--files) <-----------------------------------------------------+
        upload (thread, CapacityLimiter) -> read back size + digest -> journal done
        Assembler: which checkpoint, complete? (per checkpoint, coalesced)
        Committer: pointer + manifest (per-rank batches) -> remote, local retention
    artifact re-uploads (at most every --artifact-interval)

A full work queue blocks the intake (it slows down; nothing is dropped: the
journal holds every accepted file). Memory is bounded by the store's part
buffers (``concurrency x part_size``) and the stream lengths, whatever the
number and size of files. Journal calls run one at a time
(:attr:`Engine.journal_lock`), in worker threads; a short one (a few files
accepted, a pointer batch marked committed) runs on the loop when the lock is
free (:meth:`Engine.quick`). Each is awaited before the next step: a file is
recorded before its upload starts (in the upload's thread), and "done" before
its pointer commit and before local retention.

Draining (a signal, the parent gone, or idle): the intake stops and closes the
work stream; the upload loops finish what is queued; the pipeline ends when
every upload and pointer write is over, or the drain timeout (exit code 3) hits.
The exit code once drained: 0 when everything accepted is verified and committed;
2 when a file or pointer failed for a configuration reason (a certificate the store
presents that is no longer trusted, say); 1 for any other failure. Failed files stay
in the journal and are sent again at the next start.

Example::

    engine = Engine(options, store, journal)
    exit_code = engine.run()
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskStatus

from uploader.daemon.accept import QUICK_ROWS, Acceptor
from uploader.daemon.artifacts import ArtifactThrottle
from uploader.daemon.assembly import Assembler
from uploader.daemon.chunk_send import ChunkSender
from uploader.daemon.committer import Committer
from uploader.daemon.intake import Intake, ignore_lease_breaks, watch_parent
from uploader.daemon.journal import Journal, Totals
from uploader.daemon.keepup import Backlog, WorkQueue
from uploader.daemon.layouts import Checkpoints, FileFilter, RunLayout
from uploader.daemon.metrics import attach as attach_metrics
from uploader.daemon.outcome import nothing_committed, outcome
from uploader.daemon.progress import Progress
from uploader.daemon.reporter import Reporter
from uploader.daemon.settle import Settler
from uploader.daemon.signals import signal_task
from uploader.daemon.skipping import Skipping
from uploader.daemon.status import StatusReport, log_summary
from uploader.daemon.uploads import Uploads
from uploader.errors import ExitCode
from uploader.redact import redact
from uploader.transfer.bandwidth import TokenBucket
from uploader.transfer.retry import backoff
from uploader.transfer.store import ObjectStore

__all__ = ["Engine", "EngineOptions"]

log = logging.getLogger(__name__)


#: The longest pause between two attempts of one file or one pointer write.
MAX_PAUSE = 60.0
#: Files the work queue holds at least (more with --files): the newest complete
#: checkpoint can only go first when it is queued.
QUEUE_BOUND = 256


@dataclass
class EngineOptions:
    """What the engine does. Every field is given: the defaults live once, in
    :class:`uploader.config.options.WatchOptions` (see ``ckpt-uploader watch --help``).

    Args:
        run_dir: the directory watched.
        prefix: object name prefix (``{prefix}/rank_N/...``).
        rank: rank of files not under a ``rank_N`` directory.
        filter: which files are uploaded.
        checkpoints: which files form one checkpoint, and when it is complete.
        artifact_interval: seconds between two uploads of a file in no checkpoint
            (a log, metrics) that keeps changing.
        watch: watch for new files (False: upload what is there, then stop).
        settle: seconds a file must keep its size and mtime after it was closed.
        open_timeout: seconds of stability that count as complete without a close event.
        files: files uploaded at once.
        attempts: upload attempts per file before it is marked failed.
        retry_delay: first pause between file attempts (doubles, at most 60 s).
        drain_timeout: seconds a drain may take before exiting with work left.
        exit_when_idle: exit once everything found is verified and nothing is pending.
        parent_pid: when this process is gone, finish and exit.
        status_file: JSON status rewritten every second.
        keep_local / keep_remote: retention (None: keep everything).
        bwlimit: bytes per second for all uploads together (0: no limit).
        verify_resumed: read and hash again the parts a resumed upload keeps.
        progress: draw tqdm bars.
        metrics_port / metrics_addr: serve Prometheus metrics there (None: not served).
        metrics_file: write them there in node_exporter's textfile format (None: not).
        ready_max_lag: /readyz fails while the lag is above this (seconds).
        dedup_scope: store checkpoint files as chunks shared under this prefix (the run's
            prefix or a parent; None: files as they are).
    """

    run_dir: Path
    prefix: str
    rank: int
    filter: FileFilter
    checkpoints: Checkpoints
    artifact_interval: float
    watch: bool
    settle: float
    open_timeout: float
    files: int
    attempts: int
    retry_delay: float
    drain_timeout: float
    exit_when_idle: bool
    parent_pid: int | None
    status_file: Path | None
    keep_local: int | None
    keep_remote: int | None
    bwlimit: int
    verify_resumed: bool
    progress: bool
    metrics_port: int | None = None
    metrics_addr: str = "127.0.0.1"
    metrics_file: Path | None = None
    ready_max_lag: float = 600.0
    dedup_scope: str | None = None

    def pause(self, attempt: int) -> float:
        """Seconds before retry number ``attempt`` of a file or a pointer write."""
        return backoff(self.retry_delay, attempt, MAX_PAUSE)


class Engine:
    """Watches a run directory and uploads every finished file, verified.

    Args:
        options: see :class:`EngineOptions`.
        store: the destination store (its part concurrency bounds memory).
        journal: the opened (locked) journal.
    """

    def __init__(self, options: EngineOptions, store: ObjectStore, journal: Journal) -> None:
        self.opts = options
        self.store = store
        self.journal = journal
        self.layout = RunLayout(options.run_dir, options.prefix, options.rank)
        self.root = self.layout.root
        #: Held by every journal call: one at a time, each in a worker thread.
        self.journal_lock = threading.Lock()
        #: starting -> running -> (draining ->) done | failed
        self.phase = "starting"
        self.exit_code: int | None = None
        self.settler = Settler(
            options.settle, options.open_timeout, snapshot_after=options.artifact_interval
        )
        self.committer = Committer(
            store,
            options.prefix,
            options.attempts,
            options.pause,
            journal,
            self.call,
            options.keep_remote,
            self._report,
            quick=self.quick,
            quick_rows=QUICK_ROWS,
            keep_local=options.keep_local,
            retain_local=lambda rank, pointer: self.skipping.retain_local(rank, pointer),
        )
        self.assembler = Assembler(
            self.layout, options.checkpoints, options.filter, journal, self.call, self.committer
        )
        self.assembler.scope = options.dedup_scope
        bucket = TokenBucket(options.bwlimit) if options.bwlimit > 0 else None
        self.uploads = Uploads(
            store,
            self.root,
            journal,
            self.call,
            self.journal_lock,
            self.assembler,
            options,
            self._report,
            Progress(options.progress),
            bucket,
        )
        if options.dedup_scope is not None:
            sender = ChunkSender(
                store, options.dedup_scope, journal.chunks.locked(self.journal_lock), self.root
            )
            self.uploads.chunked = self.committer.chunked = sender
        self.intake: Intake | None = None
        self.last_error: str | None = None
        #: The last failure whose error calls for exit 2 (a configuration error).
        self.config_error: str | None = None
        self._resumed = False
        self._stop_reason: str | None = None
        #: Changed artifacts wait for --artifact-interval.
        self.artifacts = ArtifactThrottle(options.artifact_interval)
        self.accept = Acceptor(
            self.layout,
            journal,
            self.call,
            self.quick,
            self.assembler,
            self.artifacts,
            self.uploads.outstanding,
        )
        #: The order of the work and the superseded checkpoints (protocol 10).
        self.backlog = Backlog(
            options.keep_remote,
            complete=self.accept.complete,
            keep_skipped=options.keep_local is not None,
        )
        self.uploads.superseded = self.backlog.is_superseded
        self.reporter = Reporter(self)
        self.skipping = Skipping(self)
        #: Prometheus metrics, when --metrics-port or --metrics-file asks for them.
        self.metrics = attach_metrics(self)

    # -- entry point --------------------------------------------------------------------
    def run(self) -> int:
        """Run until told to stop; return the exit code (0, 1, 2 or 3)."""
        return anyio.run(self._main)

    async def call(self, fn: Any, *args: Any) -> Any:
        """Run a journal call in a worker thread, one at a time, and return its result."""

        def locked() -> Any:
            with self.journal_lock:
                return fn(*args)

        return await anyio.to_thread.run_sync(locked)

    async def quick(self, fn: Any, *args: Any) -> Any:
        """Run a short journal call (a few rows) on the event loop when the journal lock is
        free right now, else as :meth:`call` (the loop never waits for the lock).

        Such a call takes about 0.05-0.15 ms of sqlite (commits are not forced to disk,
        see :mod:`uploader.daemon.journal_db`), less than the round trip to a worker
        thread (0.3 ms idle, over 1 ms on a busy machine), which sat on the path from a
        renamed checkpoint to its first request.
        """
        if not self.journal_lock.acquire(blocking=False):
            return await self.call(fn, *args)
        try:
            return fn(*args)
        finally:
            self.journal_lock.release()

    async def _main(self) -> int:
        ignore_lease_breaks()
        self._stop = anyio.Event()
        self.intake = Intake(
            self.layout,
            self.opts.filter,
            self.settler,
            self.opts.watch,
            self.accept.take,
            self.accept.fresh,
            is_artifact=lambda rel: self.assembler.key(rel) is None,
            link=self.assembler.link,
            gone=self.assembler.request_many,
        )
        self._write_status()
        code: int = ExitCode.FAILED
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(signal_task, lambda: self._request_stop("signal"), self._last_words)
                await self._recover()
                await self._fence()  # before any upload: the probe's scratch object is alone
                done = anyio.Event()
                await tg.start(self._pipeline, done)
                self.phase = "running"
                tg.start_soon(self.reporter.run)
                tg.start_soon(self.artifacts.run, self.accept.take_now)
                if self.opts.parent_pid:
                    pid = self.opts.parent_pid
                    tg.start_soon(watch_parent, pid, self.intake, self._idle, self._request_stop)
                if self.opts.exit_when_idle or not self.opts.watch:
                    tg.start_soon(self._idle_task)
                code = await self._supervise(done)
                tg.cancel_scope.cancel()
        finally:
            self.uploads.progress.close()
            if self.metrics is not None:
                self.metrics.close()
        self.exit_code = code
        self.phase = "done" if code == ExitCode.OK else "failed"
        with self.journal_lock:  # an abandoned upload thread may still record
            self.journal.save()
        self._write_status()
        return code

    async def _pipeline(
        self, done: anyio.Event, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Intake -> work stream -> upload loops -> commits; ends once drained."""
        assert self.intake is not None
        bound = max(QUEUE_BOUND, 2 * self.opts.files)
        queue = WorkQueue(self.backlog, bound, self.skipping.skip)
        self.accept.queue = queue

        self.committer.on_commit = self.skipping.committed_with(queue)
        async with anyio.create_task_group() as tg:
            self.committer.task_group = tg
            self.assembler.task_group = tg
            for _ in range(self.opts.files):
                tg.start_soon(self._upload_loop, queue)
            try:
                await self.intake.run(self._resume, task_status=task_status)
            finally:  # the intake is over: the upload loops end once the queue is empty
                queue.close()
        done.set()

    async def _fence(self) -> None:
        """Find out at start-up whether pointer commits are fenced (the committer logs it)."""
        try:
            await anyio.to_thread.run_sync(self.committer.prepare, abandon_on_cancel=True)
        except Exception as exc:
            log.warning(
                "could not find out whether the store fences pointer commits (%s); "
                "asking again at the first commit",
                redact(f"{type(exc).__name__}: {exc}"),
            )

    # -- recovery -----------------------------------------------------------------------
    async def _recover(self) -> None:
        for rec in await self.call(self.journal.recover):
            log.info("resuming interrupted upload path=%s object=%s", rec.path, rec.object)
            await self.uploads.abort_stale(rec)
        await self.uploads.abort_orphans()

    async def _resume(self) -> None:
        """Before the start-up scan: commit what was verified, queue what is pending."""
        uncommitted = await self.call(self.journal.uncommitted)
        self.assembler.request_many([r.path for r in uncommitted])
        for rec in await self.call(self.journal.records, "pending"):
            await self.accept.enqueue(rec)
        self._resumed = True

    async def _upload_loop(self, queue: WorkQueue) -> None:
        """One upload at a time from the work queue, until it is closed and empty."""
        while (rel := await queue.get()) is not None:
            try:
                await self.uploads.process(rel)
            finally:
                failed = rel in self.uploads.failed_now
                self.uploads.failed_now.discard(rel)
                queue.done(rel, failed)

    # -- stopping -----------------------------------------------------------------------
    def _request_stop(self, reason: str) -> None:
        if self._stop_reason is None:
            self._stop_reason = reason
            self._stop.set()

    def _report(self, message: str, code: ExitCode = ExitCode.FAILED) -> None:
        self.last_error = message
        if code == ExitCode.CONFIG:
            self.config_error = message

    def _idle(self) -> bool:
        intake = self.intake
        return (
            intake is not None
            and intake.quiet
            and not self.uploads.outstanding
            and not self.committer.busy
            and not self.assembler.busy
        )

    async def _idle_task(self) -> None:
        # Idle at two checks in a row. Watching, an event may still be on its way from
        # the filesystem: checks 50 ms apart. Pushing, nothing comes from outside once
        # the scan is done (and idle is exact, see _idle): 20 ms apart.
        every = 0.05 if self.opts.watch else 0.02
        quiet = 0
        while True:
            await anyio.sleep(every)
            quiet = quiet + 1 if self._idle() else 0
            if quiet >= 2:
                self._request_stop("idle")
                return

    def _last_words(self, reason: str) -> None:
        self.phase = "failed"
        self.last_error = reason
        self.reporter.write(self.reporter.totals)

    async def _supervise(self, done: anyio.Event) -> int:
        assert self.intake is not None
        await self._stop.wait()
        reason = self._stop_reason
        if reason in ("signal", "parent"):
            self.phase = "draining"
        await self.artifacts.flush(self.accept.take_now)  # a changed log goes up once more
        # A checkpoint renamed into place just before the signal is part of the drain,
        # even if its event was not processed yet: take every file complete on disk.
        await self.intake.stop(final=reason == "signal")
        left = len(self.uploads.outstanding) + len(self.intake)
        if left:
            log.info("draining %d file(s), timeout %.0fs", left, self.opts.drain_timeout)
        with anyio.move_on_after(self.opts.drain_timeout):
            await done.wait()
        if not done.is_set():
            log.error(
                "drain timeout (%.0fs) hit with %d file(s) not verified; the next start "
                "resumes them from the journal and the run directory",
                self.opts.drain_timeout,
                len(self.uploads.outstanding) + len(self.intake),
            )
            return ExitCode.TIMEOUT
        totals: Totals = await self.call(self.journal.totals)
        nothing = await self._summary()
        return outcome(
            totals, self.committer.failures, self.last_error, self.config_error, self.store, nothing
        )

    async def _summary(self) -> bool:
        """Log what was committed, left out, rotated away and not committed (and why).
        True when checkpoints wait and none was ever committed (an error)."""
        assert self.intake is not None
        self.intake.prune_left_out()
        uncommitted, rotated = await self.call(self.assembler.uncommitted)
        self.assembler.incomplete.update(uncommitted)
        self.assembler.rotated.update(rotated)
        ever = self.committer.committed > 0 or await self.call(self.journal.any_committed)
        log_summary(
            self.root,
            self.committer.committed,
            self.intake.left_out,
            uncommitted,
            self.assembler.unmatched_rules(),
            rotated=len(rotated),
            skipped=self.backlog.skipped,
            max_lag=self.backlog.max_lag,
        )
        return nothing_committed(uncommitted, ever)

    # -- status -------------------------------------------------------------------------
    def status(self, totals: Totals | None = None) -> StatusReport:
        """The daemon's report (:class:`~uploader.daemon.reporter.Reporter`)."""
        return self.reporter.build(totals)

    @property
    def intake_finished(self) -> bool:
        """Journal resumed, start-up scan done, nothing settling, no watch event unread."""
        return self._resumed and self.intake is not None and self.intake.quiet

    def _write_status(self) -> None:
        self.reporter.write()
