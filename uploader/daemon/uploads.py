"""One file's upload: journal first, send, read back size and digest, then commit.

:meth:`Uploads.process` takes one accepted file from the work stream to the
store. In one worker thread (at most ``files + 2`` at once) an attempt records
its start in the journal, uploads, reads the object back (size, and digest where
the store keeps one) and records ``done``; then the assembler judges the checkpoint
the file belongs to (:mod:`uploader.daemon.assembly`). A failed attempt is retried
after the daemon's backoff; retries exhausted, or a permanent error (credentials,
missing container, bad configuration, an untrusted TLS certificate), mark the file
failed and report it with the exit status its error calls for (:meth:`ExitCode.of`:
2 for a configuration error). A file that changed
while it was read is not a failure: its version then on disk is sent after a pause
(backing off). A bug never loses a file: it is recorded as failed.

Multipart uploads are resumable: the store records each session and each part it
confirms in the journal (:mod:`uploader.daemon.sessions`), so a retried attempt, or
the first attempt after a restart, sends only the parts the store does not hold
(:mod:`uploader.transfer.resume`). Sessions no file will resume (its row gone or
done, the file deleted) are aborted.

Example::

    uploads = Uploads(store, root, journal, call, lock, assembler, options, report, progress)
    await uploads.process("ckpt/ep1.pt")
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import anyio

from uploader.daemon.assembly import Assembler
from uploader.daemon.chunk_send import ChunkSender
from uploader.daemon.journal import FileRecord, Journal
from uploader.daemon.keepup import SupersededError
from uploader.daemon.layouts import is_inside
from uploader.daemon.orphans import Orphans
from uploader.daemon.progress import Progress
from uploader.daemon.session_cleanup import SessionCleanup
from uploader.errors import (
    AuthError,
    ConfigError,
    ContainerNotFoundError,
    ExitCode,
    FileChangedError,
    IntegrityError,
)
from uploader.redact import redact
from uploader.transfer.bandwidth import TokenBucket
from uploader.transfer.chunks import FileChunks
from uploader.transfer.resume import Resume
from uploader.transfer.store import ObjectStore, UploadResult

__all__ = ["Uploads"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Attempt:
    """How an attempt ended: "gone", "done" (already), "missing", "failed" (``error``),
    "changed" (the file changed during the upload), "superseded" (not sent, see
    :mod:`uploader.daemon.keepup`) or "verified"."""

    step: str
    rec: FileRecord | None
    error: Exception | None = None
    digest: str = ""
    seconds: float = 0.0
    chunks: str | None = None


class _Options(Protocol):
    files: int
    attempts: int
    verify_resumed: bool
    settle: float

    def pause(self, attempt: int) -> float: ...


class Uploads(SessionCleanup):
    """The files accepted and not finished, and how each one is uploaded.

    Args:
        store: the destination store.
        root: the run directory.
        journal: the journal; ``call`` runs its methods off the event loop, holding ``lock``
            (which an upload thread holds too for its own journal calls).
        assembler: judges the checkpoint of each verified file.
        options: ``files``, ``attempts``, ``verify_resumed`` and ``pause(attempt)``.
        report: called with the message of a file that failed and the exit status its
            error calls for (:meth:`ExitCode.of`).
        progress: the progress bars.
        bucket: the bandwidth limit (None: none).
    """

    def __init__(
        self,
        store: ObjectStore,
        root: Path,
        journal: Journal,
        call: Callable[..., Awaitable[Any]],
        lock: threading.Lock,
        assembler: Assembler,
        options: _Options,
        report: Callable[[str, ExitCode], None],
        progress: Progress,
        bucket: TokenBucket | None = None,
    ) -> None:
        self.store = store
        self.root = root
        self.journal = journal
        self.call = call
        self.lock = lock
        self.assembler = assembler
        self.opts = options
        self.report = report
        self.progress = progress
        self.bucket = bucket
        #: Files queued or being uploaded (a file is queued once).
        self.outstanding: set[str] = set()
        self._inflight: dict[str, int] = {}
        self._sent = 0
        self._sent_lock = threading.Lock()
        self._limiter: anyio.CapacityLimiter | None = None
        #: The journal's sessions, for the upload threads (each call takes ``lock``).
        self.sessions = journal.sessions.locked(lock)
        #: Whether a file's checkpoint was superseded (asked from the upload threads:
        #: such an upload stops at its next part). Set by the engine.
        self.superseded: Callable[[str], bool] = lambda rel: False
        #: Objects of superseded files that may be in the store (deleted after the next
        #: pointer write that does not name them).
        self.orphans = Orphans(store)
        #: Since start: files verified, files failed for good, attempts retried, bytes a
        #: resumed upload did not send again; failed attempts in a row (0 after a success).
        self.verified_files = 0
        self.failed_files = 0
        self.retried = 0
        self.resumed_bytes = 0
        self.failing = 0
        #: Files whose upload failed for good since the caller last looked.
        self.failed_now: set[str] = set()
        #: Sends checkpoint files as chunks (``--dedup``; set by the engine).
        self.chunked: ChunkSender | None = None

    def sent(self) -> tuple[int, int]:
        """Bytes sent since start, and bytes of uploads in flight."""
        with self._sent_lock:
            return self._sent, sum(self._inflight.values())

    async def process(self, rel: str) -> None:
        """Upload ``rel`` (accepted in the journal) until verified, failed or gone."""
        try:
            await self._process(rel)
        except Exception as exc:  # a bug must not lose the file: record it
            msg = redact(f"{type(exc).__name__}: {exc}")
            log.exception("internal error on %s", rel)
            self.report(msg, ExitCode.FAILED)
            try:
                await self.call(self.journal.fail, rel, msg)
            except Exception:
                log.exception("could not record the failure of %s in the journal", rel)
        finally:
            self.outstanding.discard(rel)
            self.assembler.closed(rel)

    async def _fail(self, rel: str, msg: str, code: ExitCode = ExitCode.FAILED) -> None:
        self.failed_now.add(rel)
        self.failed_files += 1
        await self.call(self.journal.fail, rel, msg)
        self.report(msg, code)
        self.assembler.failed(rel, msg)

    async def _process(self, rel: str) -> None:
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.opts.files + 2)
        changes = 0
        while True:
            # One worker thread an attempt: journal (start), upload, read back, journal
            # (done); the journal calls take its lock, as every other journal call does.
            at = await anyio.to_thread.run_sync(
                self._attempt, rel, limiter=self._limiter, abandon_on_cancel=True
            )
            rec = at.rec
            if at.step == "gone" or rec is None:
                return
            if at.step == "done":
                if not rec.committed:
                    self.assembler.verified(rec)
                return
            if at.step == "superseded" or isinstance(at.error, SupersededError):
                sent = isinstance(at.error, SupersededError) and at.error.sent
                await self._superseded(rec, started=sent)
                return
            if at.step == "missing":
                session = await self.call(self.journal.sessions.session, rec.object)
                if session is not None:
                    await self.drop_session(rec.object, session.upload_id, "its file is gone")
                if self.assembler.removed(rel) or await self._rotating(rel):
                    # Deleted with its whole checkpoint (rotated away by the trainer), or
                    # an artifact: nothing of a checkpoint on disk is missing.
                    await self.call(self.journal.removed, rel)
                    log.info("path=%s was deleted before it was uploaded; not sent", rel)
                    return
                msg = (
                    f"{rel} was accepted but is gone or no longer a regular file inside "
                    "the run directory; it cannot be uploaded (was it deleted before upload?)"
                )
                await self._fail(rel, msg)
                log.error("failed path=%s error=%s", rel, msg)
                return
            if isinstance(at.error, FileChangedError):
                # Not a failure (a log still being written, say): the next attempt sends
                # the version then on disk. Backs off, and is not counted as an attempt.
                changes += 1
                pause = self.opts.pause(changes)
                await self.call(self.journal.retry_later, rel, str(at.error))
                log.info("path=%s changed while it was uploaded; again in %.1fs", rel, pause)
                await anyio.sleep(pause)
                continue
            if at.error is not None:
                attempts = rec.attempts + 1
                exc = at.error
                msg = redact(f"{type(exc).__name__}: {exc}")
                permanent = isinstance(exc, (AuthError, ContainerNotFoundError, ConfigError))
                self.failing += 1
                if permanent or attempts >= self.opts.attempts:
                    await self._fail(rel, msg, ExitCode.of(exc))
                    log.error("failed path=%s attempts=%d error=%s", rel, attempts, msg)
                    return
                await self.call(self.journal.retry_later, rel, msg)
                self.retried += 1
                pause = self.opts.pause(attempts)
                log.warning(
                    "attempt %d of %s failed, retrying in %.1fs: %s", attempts, rel, pause, msg
                )
                await anyio.sleep(pause)
                continue
            if at.step == "changed":
                log.info("path=%s changed during upload; uploading it again", rel)
                continue
            log.info(
                "verified path=%s object=%s size=%d digest=%s seconds=%.3f",
                rel,
                rec.object if at.chunks is None else at.chunks,
                rec.size,
                at.digest,
                at.seconds,
            )
            self.verified_files += 1
            self.failing = 0
            if self.superseded(rel):  # superseded as its last part went out: not committed
                await self._superseded(rec, started=True)
                return
            self.assembler.verified(replace(rec, state="done", digest=at.digest))
            return

    async def _superseded(self, rec: FileRecord, started: bool) -> None:
        """The checkpoint of ``rec`` was superseded before or while it was sent: not sent
        (its unfinished multipart upload, if any, is aborted)."""
        session = await self.call(self.journal.sessions.session, rec.object)
        if session is not None:
            await self.drop_session(rec.object, session.upload_id, "its checkpoint is superseded")
        await self.call(self.journal.superseded, rec.path)
        if started:
            log.info("path=%s stopped: its checkpoint was superseded while it was sent", rec.path)
        else:
            log.info("path=%s not sent: its checkpoint is superseded", rec.path)
        self.orphans.add(rec, started)

    async def _rotating(self, rel: str) -> bool:
        """A file missing from a checkpoint directory still on disk: the trainer may be
        deleting that directory right now (HF ``save_total_limit`` removes it file by
        file). True when it is gone after one more settle time."""
        await anyio.sleep(max(self.opts.settle, 0.1))
        return self.assembler.removed(rel)

    def _attempt(self, rel: str) -> _Attempt:
        """One attempt, in a worker thread: record its start, upload, verify, record done."""
        if self.superseded(rel):
            with self.lock:
                return _Attempt("superseded", self.journal.get(rel))
        with self.lock:
            step, rec = self._begin(rel)
        if step != "start" or rec is None:
            return _Attempt(step, rec)
        t0 = time.monotonic()
        self._inflight[rel] = 0
        self.progress.start(rel, rec.size)
        try:
            result = self._upload_verified(rec)
        except Exception as exc:
            sent = self._inflight.pop(rel, 0)
            self.progress.finish(rel, sent, rec.size)
            return _Attempt("failed", rec, error=exc)
        sent = self._inflight.pop(rel, 0)
        self.resumed_bytes += max(0, rec.size - sent)  # parts the store already held
        self.progress.finish(rel)
        digest = str(result.digest)
        with self.lock:
            if not self.journal.done(rel, digest, (rec.size, rec.mtime_ns)):
                return _Attempt("changed", rec)  # accepted again meanwhile, or forgotten
        seconds = time.monotonic() - t0
        if isinstance(result, FileChunks):
            what = f"{len(result.chunks)} chunk(s), {result.new_bytes} byte(s) new"
            return _Attempt("verified", rec, digest=digest, seconds=seconds, chunks=what)
        return _Attempt("verified", rec, digest=digest, seconds=seconds)

    def _begin(self, rel: str) -> tuple[str, FileRecord | None]:
        """What to do with ``rel`` ("gone", "done", "missing" or "start"); on "start",
        the attempt is recorded (for the version on disk). Holds the journal lock."""
        rec = self.journal.get(rel)
        if rec is None:
            return "gone", None
        if rec.state == "done":
            return "done", rec
        st = is_inside(self.root, rel)
        if st is None:
            return "missing", rec
        if (st.st_size, st.st_mtime_ns) != (rec.size, rec.mtime_ns):
            rec = self.journal.accept(
                replace(rec, size=st.st_size, mtime_ns=st.st_mtime_ns, state="pending")
            )
        self.journal.start(rel)
        return "start", rec

    def _upload_verified(self, rec: FileRecord) -> UploadResult | FileChunks:
        """Upload, then read back size and digest, unless the store checked a single put
        on arrival (runs in a worker thread)."""
        rel = rec.path
        bucket = self.bucket
        # Limited per chunk sent. An empty file has no chunk: a plain (empty) object.
        chunked = self.chunked is not None and rec.checkpoint and rec.size > 0
        small = rec.size <= self.store.effective_part_size(rec.size)
        prepaid = bucket is not None and small and not chunked
        if prepaid:
            # One request: the limit is waited for before it, so a checkpoint superseded
            # meanwhile sends nothing (parts of a multipart upload wait after each part).
            assert bucket is not None
            bucket.consume(rec.size)
            if self.superseded(rel):
                raise SupersededError(f"{rel}: its checkpoint is superseded", sent=False)

        def progress(n: int) -> None:
            if self.superseded(rel) and not prepaid:
                raise SupersededError(f"{rel}: its checkpoint is superseded")
            with self._sent_lock:
                self._sent += n
                self._inflight[rel] = self._inflight.get(rel, 0) + n
            self.progress.advance(rel, n)
            if bucket is not None and not prepaid and not chunked:
                bucket.consume(n)
                if self.superseded(rel):  # superseded while the limit held it back
                    raise SupersededError(f"{rel}: its checkpoint is superseded")

        log.debug("sending path=%s object=%s", rel, rec.object)
        if chunked:
            assert self.chunked is not None
            limit = None if bucket is None else bucket.consume
            return self.chunked.send(rel, self.root / rel, rec.mtime_ns, progress, limit)
        result = self.store.upload_file(
            self.root / rel,
            rec.object,
            progress=progress,
            verify=False,
            resume=Resume(self.sessions, self.opts.verify_resumed),
        )
        if self.store.backend.put_checked:
            # The store checked every body against its digest on arrival, and a multipart
            # completion against the parts' checksums: a read-back would prove no more.
            return result
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
