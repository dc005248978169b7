"""The upload engine: from a finished file on disk to a verified object and a commit pointer.

Structure (one anyio task group, owned by :meth:`Engine.run`)::

    watchdog thread --events--> intake ----+
    start-up scan --------------> settler -+-> journal.accept -> work queue (bounded)
    journal (resume) ----------------------+                         |
                                         workers (--files) <---------+
                                           upload (thread, CapacityLimiter)
                                           read back size + digest -> journal done
                                           commit pointer (per-rank lock) -> retention
    status (1 Hz), signals, parent watch, idle watch

A full work queue blocks the settler (intake slows; nothing is dropped: the
journal holds every accepted file). Memory is bounded by the store's part
buffers (``concurrency x part_size``) and the queue length, whatever the number
and size of files.

Example::

    engine = Engine(options, store, journal)
    exit_code = engine.run()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path

import anyio
from anyio.abc import TaskGroup

from uploader.bucket.pointer import HISTORY_LIMIT, Pointer, PointerEntry, commit, read_pointer
from uploader.daemon.journal import FileRecord, Journal, JournalFullError
from uploader.daemon.progress import Progress
from uploader.daemon.retention import apply_local, remote_deletions
from uploader.daemon.status import StatusReport
from uploader.daemon.watcher import (
    FileFilter,
    RunLayout,
    Watcher,
    ignore_lease_breaks,
    is_inside,
    open_for_writing,
    scan,
)
from uploader.errors import AuthError, ConfigError, ContainerNotFoundError, ExitCode, IntegrityError
from uploader.redact import redact
from uploader.transfer.store import ObjectStore, UploadResult

__all__ = ["Engine", "EngineOptions", "TokenBucket"]

log = logging.getLogger("uploader.daemon.engine")


@dataclass
class EngineOptions:
    """What the engine does. Every field is given: the defaults live once, in
    :class:`uploader.config.options.WatchOptions` (see ``ckpt-uploader watch --help``).

    Args:
        run_dir: the directory watched.
        prefix: object name prefix (``{prefix}/rank_N/...``).
        rank: rank of files not under a ``rank_N`` directory.
        filter: which files are uploaded and which move the pointer.
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
        progress: draw tqdm bars.
    """

    run_dir: Path
    prefix: str
    rank: int
    filter: FileFilter
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
    progress: bool


class TokenBucket:
    """Limits bytes per second across threads; ``consume`` blocks until allowed."""

    def __init__(self, rate: int, burst: int | None = None) -> None:
        self.rate = float(rate)
        self.capacity = float(burst or max(rate, 1))
        self._tokens = self.capacity
        self._stamp = time.monotonic()
        self._lock = threading.Lock()

    def consume(self, n: int) -> None:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= n
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            time.sleep(wait)


@dataclass
class _Candidate:
    size: int
    mtime_ns: int
    since: float
    closed: bool = False
    modified: bool = False
    held: bool = False  # seen open for writing while quiet


class _Interrupted(Exception):
    pass


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
        self.state = "starting"
        self.exit_code: int | None = None
        self._cands: dict[str, _Candidate] = {}
        self._outstanding: set[str] = set()
        self._inflight: dict[str, int] = {}
        self._pointers: dict[int, Pointer] = {}
        self._to_commit: dict[int, list[FileRecord]] = {}
        self._committing: set[int] = set()
        self._sent = 0
        self._sent_lock = threading.Lock()
        self._rate_window: deque[tuple[float, int]] = deque(maxlen=12)
        self._last_error: str | None = None
        self._commit_failures = 0
        self._accepting = True
        self._final = False
        self._scanned = False
        self._resumed = False
        self._stop_reason: str | None = None
        self._signals = 0
        self._bucket = TokenBucket(options.bwlimit) if options.bwlimit > 0 else None
        self._progress = Progress(options.progress)
        self._watcher: Watcher | None = None

    # -- entry point --------------------------------------------------------------------
    def run(self) -> int:
        """Run until told to stop; return the exit code (0, 1 or 3)."""
        return anyio.run(self._main)

    async def _main(self) -> int:
        self._loop = asyncio.get_running_loop()
        ignore_lease_breaks()
        self._events_send, self._events_recv = anyio.create_memory_object_stream[tuple[str, str]](
            math.inf
        )
        self._work_send, self._work_recv = anyio.create_memory_object_stream[str](
            max(2, 2 * self.opts.files)
        )
        self._limiter = anyio.CapacityLimiter(self.opts.files + 2)
        self._wake = anyio.Event()
        self._stop = anyio.Event()
        self._changed = anyio.Event()
        self._write_status()
        code: int = ExitCode.FAILED
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._signal_task, tg)
                await self._recover()
                if self.opts.watch:
                    self._watcher = Watcher(self.root, self._notify)
                    self._watcher.start()
                self.state = "running"
                tg.start_soon(self._status_task)
                for _ in range(self.opts.files):
                    tg.start_soon(self._worker)
                tg.start_soon(self._intake_task)
                tg.start_soon(self._settle_task)
                tg.start_soon(self._startup_task)
                if self.opts.parent_pid:
                    tg.start_soon(self._parent_task, self.opts.parent_pid)
                if self.opts.exit_when_idle or not self.opts.watch:
                    tg.start_soon(self._idle_task)
                code = await self._supervise()
                tg.cancel_scope.cancel()
        finally:
            if self._watcher is not None:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(self._watcher.stop)
            self._progress.close()
        self.exit_code = code
        self.state = "done" if code == ExitCode.OK else "failed"
        self.journal.save()
        self._write_status()
        return code

    # -- recovery -----------------------------------------------------------------------
    async def _recover(self) -> None:
        stale = self.journal.recover()
        for rec in stale:
            log.info("resuming interrupted upload path=%s object=%s", rec.path, rec.object)
            age = max(0.0, time.time() - (rec.started_at or time.time()) - 1.0)

            def abort(name: str = rec.object, older: float = age) -> int:
                return self.store.abort_stale_uploads(name, older_than=older)

            try:
                n = await anyio.to_thread.run_sync(abort, abandon_on_cancel=True)
                if n:
                    log.info("aborted %d stale multipart upload(s) of %s", n, rec.object)
            except Exception as exc:  # best effort: the store expires them too
                log.warning("could not abort stale uploads of %s: %s", rec.object, redact(str(exc)))

    async def _startup_task(self) -> None:
        for rec in self.journal.uncommitted():
            await self._commit_pointer(rec)
        for rec in self.journal.records("pending"):
            await self._enqueue(rec.path)
        self._resumed = True
        self._changed.set()
        for rel in await anyio.to_thread.run_sync(_scan_list, self.root, self.opts.filter, ""):
            self._consider(rel, "scan")
        self._scanned = True
        self._wake.set()

    # -- intake -------------------------------------------------------------------------
    def _notify(self, kind: str, path: str) -> None:
        """Called on the watchdog thread."""
        self._loop.call_soon_threadsafe(self._events_send.send_nowait, (kind, path))

    async def _intake_task(self) -> None:
        async for kind, path in self._events_recv:
            if not self._accepting:
                continue
            rel = self.layout.relative(path)
            if rel is None:
                continue
            if kind in ("dirmoved", "dircreated"):
                found = await anyio.to_thread.run_sync(_scan_list, self.root, self.opts.filter, rel)
                for f in found:
                    self._consider(f, "moved" if kind == "dirmoved" else "created")
                continue
            if not self.opts.filter.accepts(rel):
                continue
            if kind == "moved":
                st = is_inside(self.root, rel)
                self._cands.pop(rel, None)
                if st is not None:
                    await self._take(rel, st)
                continue
            self._consider(rel, kind)

    def _consider(self, rel: str, kind: str) -> None:
        """Track a file until it is complete."""
        st = is_inside(self.root, rel)
        if st is None:
            self._cands.pop(rel, None)
            return
        if kind == "scan":
            rec = self.journal.get(rel)
            if rec is not None and (rec.size, rec.mtime_ns) == (st.st_size, st.st_mtime_ns):
                return  # already accepted in this version
        now = time.monotonic()
        c = self._cands.get(rel)
        if c is None:
            c = self._cands[rel] = _Candidate(st.st_size, st.st_mtime_ns, now)
        if kind in ("scan", "moved"):
            c.closed = True
        elif kind == "closed":
            c.closed = True
            c.since = now
        elif kind == "modified":
            c.modified = True
            c.closed = False
            c.since = now
        elif kind == "created":
            c.since = now
        self._wake.set()

    async def _settle_task(self) -> None:
        tick = max(0.02, min(0.1, self.opts.settle / 4))
        while True:
            if not self._cands:
                await self._wake.wait()
                self._wake = anyio.Event()
                continue
            await anyio.sleep(tick)
            now = time.monotonic()
            for rel, c in list(self._cands.items()):
                if not self._accepting:
                    self._cands.clear()
                    break
                st = is_inside(self.root, rel)
                if st is None:
                    self._cands.pop(rel, None)
                    continue
                if (st.st_size, st.st_mtime_ns) != (c.size, c.mtime_ns):
                    c.size, c.mtime_ns, c.since = st.st_size, st.st_mtime_ns, now
                    continue
                quiet = now - c.since
                complete = (
                    quiet >= self.opts.open_timeout
                    or (quiet >= self.opts.settle and (c.closed or self._final))
                    or (quiet >= self.opts.settle and not c.modified and c.size > 0)
                )
                if (
                    complete
                    and quiet < self.opts.open_timeout
                    and open_for_writing(self.root / rel) is True
                ):
                    # Quiet, but a writer still holds it open (one that started before
                    # this daemon, say): wait for it to close, or for --open-timeout.
                    if not c.held:
                        c.held = True
                        log.info("path=%s is quiet but still open for writing; waiting", rel)
                    continue
                if complete and self._cands.get(rel) is c:
                    del self._cands[rel]
                    await self._take(rel, st)

    async def _take(self, rel: str, st: os.stat_result) -> None:
        """Accept a complete file into the journal (unless that version is known) and queue it."""
        if not self._accepting:
            return
        await self._take_inner(rel, st)

    async def _take_inner(self, rel: str, st: os.stat_result) -> None:
        rec = self.journal.get(rel)
        if rec is not None and (rec.size, rec.mtime_ns) == (st.st_size, st.st_mtime_ns):
            if rec.state == "pending":
                await self._enqueue(rel)
            return
        loc = self.layout.locate(rel)
        rec = self.journal.accept(
            FileRecord(
                rel,
                loc.rank,
                loc.name,
                loc.object,
                st.st_size,
                st.st_mtime_ns,
                self.opts.filter.moves_pointer(rel),
            )
        )
        log.info("accepted path=%s size=%d object=%s", rel, rec.size, rec.object)
        await self._enqueue(rel)

    async def _enqueue(self, rel: str) -> None:
        if rel in self._outstanding:
            return
        self._outstanding.add(rel)
        await self._work_send.send(rel)

    # -- workers ------------------------------------------------------------------------
    async def _worker(self) -> None:
        async for rel in self._work_recv:
            try:
                await self._process(rel)
            except Exception as exc:  # a bug must not lose the file: record it
                msg = redact(f"{type(exc).__name__}: {exc}")
                log.exception("internal error on %s", rel)
                self._last_error = msg
                try:
                    self.journal.fail(rel, msg)
                except Exception:
                    log.exception("could not record the failure of %s in the journal", rel)
            finally:
                self._outstanding.discard(rel)
                self._changed.set()

    async def _process(self, rel: str) -> None:
        while True:
            rec = self.journal.get(rel)
            if rec is None:
                return
            if rec.state == "done":
                if rec.checkpoint and not rec.committed:
                    await self._commit_pointer(rec)
                return
            st = is_inside(self.root, rel)
            if st is None:
                msg = (
                    f"{rel} was accepted but is gone or no longer a regular file inside "
                    "the run directory; it cannot be uploaded (was it deleted before upload?)"
                )
                self.journal.fail(rel, msg)
                self._last_error = msg
                log.error("failed path=%s error=%s", rel, msg)
                return
            if (st.st_size, st.st_mtime_ns) != (rec.size, rec.mtime_ns):
                rec = self.journal.accept(
                    replace(rec, size=st.st_size, mtime_ns=st.st_mtime_ns, state="pending")
                )
            self.journal.start(rel)
            attempts = rec.attempts + 1
            t0 = time.monotonic()
            self._inflight[rel] = 0
            self._progress.start(rel, rec.size)
            try:
                result = await anyio.to_thread.run_sync(
                    self._upload_verified, rec, limiter=self._limiter, abandon_on_cancel=True
                )
            except Exception as exc:
                sent = self._inflight.pop(rel, 0)
                self._progress.finish(rel, sent, rec.size)
                msg = redact(f"{type(exc).__name__}: {exc}")
                permanent = isinstance(exc, (AuthError, ContainerNotFoundError, ConfigError))
                if permanent or attempts >= self.opts.attempts:
                    self.journal.fail(rel, msg)
                    self._last_error = msg
                    log.error("failed path=%s attempts=%d error=%s", rel, attempts, msg)
                    return
                self.journal.retry_later(rel, msg)
                pause = min(60.0, self.opts.retry_delay * 2 ** (attempts - 1))
                log.warning(
                    "attempt %d of %s failed, retrying in %.1fs: %s", attempts, rel, pause, msg
                )
                await anyio.sleep(pause)
                continue
            self._inflight.pop(rel, None)
            self._progress.finish(rel)
            cur = self.journal.get(rel)
            if cur is None or (cur.size, cur.mtime_ns) != (rec.size, rec.mtime_ns):
                log.info("path=%s changed during upload; uploading it again", rel)
                continue
            self.journal.done(rel, str(result.digest))
            seconds = time.monotonic() - t0
            log.info(
                "verified path=%s object=%s size=%d digest=%s seconds=%.3f",
                rel,
                rec.object,
                rec.size,
                result.digest,
                seconds,
            )
            done = self.journal.get(rel)
            if done is not None and done.checkpoint:
                await self._commit_pointer(done)
            if self.opts.keep_local is not None:
                try:
                    self.journal.sync()  # "done" is on disk before any local file goes
                except JournalFullError as exc:
                    log.warning("local retention waits until the journal is saved: %s", exc)
                else:
                    apply_local(self.journal.records(), self.root, self.opts.keep_local, rec.rank)
            return

    def _upload_verified(self, rec: FileRecord) -> UploadResult:
        """Upload, then read back size and digest (runs in a worker thread)."""
        rel = rec.path
        bucket = self._bucket

        def progress(n: int) -> None:
            with self._sent_lock:
                self._sent += n
                self._inflight[rel] = self._inflight.get(rel, 0) + n
            self._progress.advance(rel, n)
            if bucket is not None:
                bucket.consume(n)

        log.debug("sending path=%s object=%s", rel, rec.object)
        result = self.store.upload_file(
            self.root / rel, rec.object, progress=progress, verify=False
        )
        stat = self.store.stat(rec.object)
        if stat.size != result.size:
            raise IntegrityError(
                f"{rec.object}: the store holds {stat.size} bytes after sending "
                f"{result.size}; it will be uploaded again"
            )
        if stat.digest is not None and stat.digest != result.digest:
            raise IntegrityError(
                f"{rec.object}: the store records digest {stat.digest} but "
                f"{result.digest} was sent; it will be uploaded again"
            )
        return result

    async def _commit_pointer(self, rec: FileRecord) -> None:
        """Queue ``rec`` (verified) for its rank's pointer; a per-rank writer task commits.

        Commits of one rank are batched: while one pointer write is in flight,
        later entries queue up and go out together in the next write, so a burst
        of small checkpoints costs a few pointer writes, not one each, and no
        upload worker waits for a pointer write.
        """
        assert rec.digest is not None
        self._to_commit.setdefault(rec.rank, []).append(rec)
        if rec.rank not in self._committing:
            self._committing.add(rec.rank)
            self._tg.start_soon(self._pointer_writer, rec.rank)

    async def _pointer_writer(self, rank: int) -> None:
        try:
            while self._to_commit.get(rank):
                await self._write_pointer(rank, self._to_commit.pop(rank))
                self._changed.set()
        finally:
            self._committing.discard(rank)
            self._changed.set()

    async def _write_pointer(self, rank: int, batch: list[FileRecord]) -> None:
        entries = [
            PointerEntry(r.name, r.object, r.size, r.digest or "", r.mtime_ns) for r in batch
        ]
        current = self._pointers.get(rank)

        def write() -> Pointer:
            cur = (
                current if current is not None else read_pointer(self.store, self.opts.prefix, rank)
            )
            for e in entries[:-1]:
                cur = _merge(cur, rank, e)
            return commit(self.store, self.opts.prefix, rank, entries[-1], cur)

        for attempt in range(1, self.opts.attempts + 1):
            try:
                pointer = await anyio.to_thread.run_sync(write, abandon_on_cancel=True)
                break
            except Exception as exc:
                msg = redact(f"{type(exc).__name__}: {exc}")
                if attempt >= self.opts.attempts:
                    self._commit_failures += len(batch)
                    self._last_error = f"commit pointer of rank {rank}: {msg}"
                    log.error("pointer commit failed rank=%d error=%s", rank, msg)
                    return
                await anyio.sleep(min(60.0, self.opts.retry_delay * 2 ** (attempt - 1)))
        self._pointers[rank] = pointer
        for r in batch:
            self.journal.mark_committed(r.path)
        log.info(
            "committed rank=%d latest=%s (after %s)",
            rank,
            pointer.latest.name,
            ", ".join(r.name for r in batch[:3])
            + (f" +{len(batch) - 3}" if len(batch) > 3 else ""),
        )
        if self.opts.keep_remote is not None:
            await self._prune_remote(rank, pointer)

    async def _prune_remote(self, rank: int, pointer: Pointer) -> None:
        keep = self.opts.keep_remote
        assert keep is not None
        in_flight = {
            r.object
            for r in self.journal.records()
            if r.rank == rank and r.checkpoint and (r.state != "done" or not r.committed)
        }

        def prune() -> list[str]:
            names = remote_deletions(
                self.store, self.opts.prefix, rank, keep, self.opts.filter, pointer, in_flight
            )
            for name in names:
                self.store.delete(name)
            return names

        try:
            for name in await anyio.to_thread.run_sync(prune, abandon_on_cancel=True):
                log.info("retention deleted remote object=%s", name)
        except Exception as exc:
            log.warning("remote retention failed: %s", redact(str(exc)))

    # -- stopping -----------------------------------------------------------------------
    def _request_stop(self, reason: str) -> None:
        if self._stop_reason is None:
            self._stop_reason = reason
            self._stop.set()

    def _busy(self) -> bool:
        """Accepted work not finished: queued or in flight, unwritten pointers, unread journal."""
        return bool(self._outstanding or self._committing or not self._resumed)

    def _idle(self) -> bool:
        return (
            self._scanned
            and not self._cands
            and not self._outstanding
            and not self._committing
            and self._events_recv.statistics().current_buffer_used == 0
        )

    async def _idle_task(self) -> None:
        quiet = 0
        while True:
            await anyio.sleep(0.05)
            quiet = quiet + 1 if self._idle() else 0
            if quiet >= 2:
                self._request_stop("idle")
                return

    async def _parent_task(self, pid: int) -> None:
        while _alive(pid):
            await anyio.sleep(0.5)
        log.info("parent process %d is gone; finishing accepted and complete files", pid)
        self._final = True
        for rel in await anyio.to_thread.run_sync(_scan_list, self.root, self.opts.filter, ""):
            self._consider(rel, "scan")
        self._scanned = True
        self._wake.set()
        quiet = 0
        while quiet < 3:
            await anyio.sleep(0.1)
            quiet = quiet + 1 if self._idle() else 0
        self._request_stop("parent")

    async def _signal_task(self, tg: TaskGroup) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            # Signals that arrived while the store was being opened count too.
            while _early_signals:
                self._on_signal(_early_signals.pop(0))
            async for signum in signals:
                self._on_signal(signum)

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        name = signal.Signals(signum).name
        if self._signals == 1:
            log.info("%s received: draining (a second signal exits at once)", name)
            self._request_stop("signal")
        else:
            log.warning("second signal %s: exiting now; the journal is intact", name)
            self.state = "failed"
            self._last_error = f"interrupted by a second {name}"
            self._write_status()
            logging.shutdown()
            os._exit(128 + signum)

    async def _supervise(self) -> int:
        await self._stop.wait()
        reason = self._stop_reason
        self.state = "draining" if reason in ("signal", "parent") else self.state
        if self._watcher is not None:
            self._watcher.stop(join=False)
        if reason == "signal":
            # A checkpoint renamed into place just before the signal is part of the drain,
            # even if its event was not processed yet: take every file complete on disk.
            self._final = True
            found = await anyio.to_thread.run_sync(_scan_list, self.root, self.opts.filter, "")
            for rel in found:
                self._consider(rel, "scan")
            self._wake.set()
        left = len(self._outstanding) + len(self._cands)
        if left:
            log.info("draining %d file(s), timeout %.0fs", left, self.opts.drain_timeout)
        with anyio.move_on_after(self.opts.drain_timeout):
            while self._busy() or self._cands:
                with anyio.move_on_after(0.1):
                    await self._changed.wait()
                self._changed = anyio.Event()
        self._accepting = False
        if self._busy() or self._cands:
            log.error(
                "drain timeout (%.0fs) hit with %d file(s) not verified; the next start "
                "resumes them from the journal and the run directory",
                self.opts.drain_timeout,
                len(self._outstanding) + len(self._cands),
            )
            return ExitCode.TIMEOUT
        totals = self.journal.totals()
        if totals.failed or totals.pending or totals.uploading or self._commit_failures:
            log.error(
                "finished with failures: failed=%d pending=%d pointer_failures=%d last_error=%s",
                totals.failed,
                totals.pending + totals.uploading,
                self._commit_failures,
                self._last_error or totals.last_error,
            )
            return ExitCode.FAILED
        log.info(
            "finished: %d file(s) verified, %d bytes, %d request retries, %d resent on a "
            "fresh connection",
            totals.done,
            totals.bytes_done,
            self.store.retries.n,
            int(getattr(self.store.backend, "resent", 0)),
        )
        return ExitCode.OK

    # -- status -------------------------------------------------------------------------
    def status(self) -> StatusReport:
        t = self.journal.totals()
        now = time.monotonic()
        with self._sent_lock:
            sent = self._sent
            inflight = sum(self._inflight.values())
        self._rate_window.append((now, sent))
        t0, s0 = self._rate_window[0]
        rate = (sent - s0) / (now - t0) if now > t0 else 0.0
        state = self.state
        if state in ("running", "draining") and (t.failed or self._commit_failures):
            state = "failed"
        return StatusReport(
            pid=os.getpid(),
            state=state,
            pending=t.pending,
            uploading=t.uploading,
            done=t.done,
            failed=t.failed,
            bytes_total=t.bytes_total,
            bytes_done=t.bytes_done + inflight,
            rate_bytes_per_s=round(rate, 1),
            last_error=self._last_error or t.last_error,
            journal_saved=not self.journal.in_memory,
            intake_finished=self._intake_finished(),
            updated_at=time.time(),
        )

    def _intake_finished(self) -> bool:
        """Journal resumed, start-up scan done, nothing settling, no event unread."""
        recv = getattr(self, "_events_recv", None)
        return (
            self._resumed
            and self._scanned
            and not self._cands
            and recv is not None
            and recv.statistics().current_buffer_used == 0
        )

    def _write_status(self) -> None:
        if self.opts.status_file is None:
            return
        with contextlib.suppress(Exception):
            self.status().write(self.opts.status_file)

    async def _status_task(self) -> None:
        while True:
            s = self.status()
            if self.opts.status_file is not None:
                s.write(self.opts.status_file)
            self._progress.tick(s)
            await anyio.sleep(1.0)


_early_signals: list[int] = []


def capture_early_signals() -> None:
    """Remember SIGTERM/SIGINT arriving before the engine runs (while the store is opened).

    The engine drains for them once it starts, instead of the process dying with the
    default action; a second early signal exits at once (the journal is intact).
    """

    def remember(signum: int, frame: object) -> None:
        _early_signals.append(signum)
        if len(_early_signals) >= 2:
            os._exit(128 + signum)

    signal.signal(signal.SIGTERM, remember)
    signal.signal(signal.SIGINT, remember)


def _merge(cur: Pointer | None, rank: int, e: PointerEntry) -> Pointer:
    """``cur`` with ``e`` added, by the rules of :func:`uploader.bucket.pointer.commit`, unwritten."""
    history = [h for h in (cur.history if cur else ()) if h.name != e.name] + [e]
    history.sort(key=lambda h: h.order, reverse=True)
    latest = e
    if cur is not None and cur.latest.name != e.name and cur.latest.order > e.order:
        latest = cur.latest
    return Pointer(rank, latest, tuple(history[:HISTORY_LIMIT]))


def _scan_list(root: Path, filt: FileFilter, sub: str) -> list[str]:
    return list(scan(root, filt, sub))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
