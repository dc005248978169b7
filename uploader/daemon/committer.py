"""Pointer commits: after a checkpoint is verified, its rank's commit pointer names it.

Commits of one rank are batched: while one pointer write is in flight, later
entries queue up and go out together in the next write, so a burst of small
checkpoints costs a few pointer writes, not one each, and no upload waits for a
pointer write. A write is retried a bounded number of times (the daemon's file
backoff); once it succeeds, its files are marked committed in the journal, and
remote retention (``--keep-remote``) runs for that rank.

Example::

    committer = Committer(store, "exp1", attempts=5, pause=opts.pause, journal=call)
    committer.task_group = tg
    committer.submit(verified_record)
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from anyio.abc import TaskGroup

from uploader.bucket.pointer import Pointer, PointerEntry, commit, merge, read_pointer
from uploader.bucket.retention import prune_remote
from uploader.daemon.journal import FileRecord, Journal
from uploader.redact import redact
from uploader.transfer.store import ObjectStore

__all__ = ["Committer"]

log = logging.getLogger(__name__)

#: Runs a journal call off the event loop (one at a time), returning its result.
JournalCall = Callable[..., Awaitable[Any]]


class Committer:
    """Writes each rank's commit pointer; one writer task per rank while work is queued.

    Args:
        store: the destination store.
        prefix: the object name prefix.
        attempts: pointer writes tried per batch before it counts as failed.
        pause: seconds to wait before retry number ``attempt`` (1-based).
        journal: the journal, and ``call`` to run its methods off the event loop.
        keep_remote: remote retention (None: keep everything).
        is_checkpoint: which names (inside a rank directory) are checkpoints.
        report: called with an error message when a batch fails for good.
        quick: runs a short journal call, on the event loop when it can (default: ``call``);
            used to mark batches of at most ``quick_rows`` entries committed.
    """

    def __init__(
        self,
        store: ObjectStore,
        prefix: str,
        attempts: int,
        pause: Callable[[int], float],
        journal: Journal,
        call: JournalCall,
        keep_remote: int | None = None,
        is_checkpoint: Callable[[str], bool] = lambda name: True,
        report: Callable[[str], None] = lambda msg: None,
        quick: JournalCall | None = None,
        quick_rows: int = 0,
    ) -> None:
        self.store = store
        self.prefix = prefix
        self.attempts = attempts
        self.pause = pause
        self.journal = journal
        self._call = call
        self._quick = quick or call
        self._quick_rows = quick_rows
        self.keep_remote = keep_remote
        self.is_checkpoint = is_checkpoint
        self.report = report
        #: Where the per-rank writer tasks run (set by the engine before ``submit``).
        self.task_group: TaskGroup | None = None
        #: Files whose pointer commit failed for good.
        self.failures = 0
        self._pointers: dict[int, Pointer] = {}
        self._queued: dict[int, list[FileRecord]] = {}
        self._writing: set[int] = set()

    @property
    def busy(self) -> bool:
        """A pointer write is queued or in flight."""
        return bool(self._writing)

    def submit(self, rec: FileRecord) -> None:
        """Queue ``rec`` (verified) for its rank's pointer."""
        assert rec.digest is not None and self.task_group is not None
        self._queued.setdefault(rec.rank, []).append(rec)
        if rec.rank not in self._writing:
            self._writing.add(rec.rank)
            self.task_group.start_soon(self._writer, rec.rank)

    async def _writer(self, rank: int) -> None:
        try:
            while self._queued.get(rank):
                await self._write(rank, self._queued.pop(rank))
        finally:
            self._writing.discard(rank)

    async def _write(self, rank: int, batch: list[FileRecord]) -> None:
        entries = [
            PointerEntry(r.name, r.object, r.size, r.digest or "", r.mtime_ns) for r in batch
        ]
        current = self._pointers.get(rank)

        def write() -> Pointer:
            cur = current if current is not None else read_pointer(self.store, self.prefix, rank)
            for e in entries[:-1]:
                cur = merge(cur, rank, e)
            return commit(self.store, self.prefix, rank, entries[-1], cur)

        for attempt in range(1, self.attempts + 1):
            try:
                pointer = await anyio.to_thread.run_sync(write, abandon_on_cancel=True)
                break
            except Exception as exc:
                msg = redact(f"{type(exc).__name__}: {exc}")
                if attempt >= self.attempts:
                    self.failures += len(batch)
                    self.report(f"commit pointer of rank {rank}: {msg}")
                    log.error("pointer commit failed rank=%d error=%s", rank, msg)
                    return
                await anyio.sleep(self.pause(attempt))
        self._pointers[rank] = pointer
        mark = self._quick if len(batch) <= self._quick_rows else self._call
        await mark(_mark_committed, self.journal, [r.path for r in batch])
        log.info(
            "committed rank=%d latest=%s (after %s)",
            rank,
            pointer.latest.name,
            ", ".join(r.name for r in batch[:3])
            + (f" +{len(batch) - 3}" if len(batch) > 3 else ""),
        )
        if self.keep_remote is not None:
            await self._prune(rank, pointer, self.keep_remote)

    async def _prune(self, rank: int, pointer: Pointer, keep: int) -> None:
        records: list[FileRecord] = await self._call(self.journal.records)
        in_flight = {
            r.object
            for r in records
            if r.rank == rank and r.checkpoint and (r.state != "done" or not r.committed)
        }

        def prune() -> list[str]:
            return prune_remote(
                self.store, self.prefix, rank, keep, self.is_checkpoint, pointer, in_flight
            )

        try:
            for name in await anyio.to_thread.run_sync(prune, abandon_on_cancel=True):
                log.info("retention deleted remote object=%s", name)
        except Exception as exc:
            log.warning("remote retention failed: %s", redact(str(exc)))


def _mark_committed(journal: Journal, paths: list[str]) -> None:
    for path in paths:
        journal.mark_committed(path)
