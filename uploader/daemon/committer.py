"""Pointer commits: after every file of a checkpoint is verified, its rank's pointer names it.

The assembler (:mod:`uploader.daemon.assembly`) submits complete checkpoints, each
a :class:`PointerEntry` with its manifest and the journal paths of its files.
Commits of one rank are batched: while one pointer write is in flight, later
entries queue up and go out together in the next write, so a burst of small
checkpoints costs a few pointer writes, not one each, and no upload waits for a
pointer write. A write is retried a bounded number of times (the daemon's file
backoff); once it succeeds, the files are marked committed in the journal.

Retention counts checkpoints, by the pointer's history (newest first), and never
touches ``latest``:

* ``--keep-remote N``: checkpoints beyond the newest N leave the pointer in the same
  write that commits the new one; then their objects are deleted (every file of
  the manifest, then the manifest object). The pointer never names a deleted object.
* ``--keep-local N``: after the write, the engine's ``retain_local`` deletes local
  copies of checkpoints beyond the newest N, whole, and only once every file is
  verified (see :mod:`uploader.daemon.retention`). It counts the checkpoints that
  ``--keep-remote`` removed from the pointer too (those this process committed).

Aliases (a symlink such as Lightning's ``last.ckpt``) join the pointer once their
target is committed. A manifest larger than the pointer holds inline is written as an
object of its own before the pointer write that names it
(:mod:`uploader.bucket.manifest`).

Fencing: where the store honours conditional writes (probed once, at start-up, by
:meth:`Committer.prepare`), every pointer write is compare-and-swap on the version
this process last wrote or read (:func:`uploader.bucket.pointer.update_pointer`);
when another uploader wrote the rank's pointer in between, the batch is merged into
what it wrote and written again. ``conflicts`` counts those lost writes, and
``conflict_failures`` the commits that lost every one of their writes in a row (then
retried like any failed commit). Where the store ignores conditions, the pointer is written as before (a plain PUT of the
pointer this process merged), which is safe only with one uploader per rank; the
start-up log says which.

Example::

    committer = Committer(store, "exp1", attempts=5, pause=opts.pause, journal=j, call=call)
    committer.task_group = tg
    committer.submit(rank, entry, ["checkpoint-8/model.safetensors", ...])
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import anyio
from anyio.abc import TaskGroup

from uploader.bucket.manifest import load_manifest, store_manifest
from uploader.bucket.pointer import (
    CONFLICT_ATTEMPTS,
    HISTORY_LIMIT,
    ManifestFile,
    Pointer,
    PointerEntry,
    alias,
    beyond,
    fencing,
    merge,
    read_pointer,
    update_pointer,
    write_pointer,
)
from uploader.bucket.retention import delete_checkpoints, prune
from uploader.daemon.journal import Journal
from uploader.errors import ExitCode, PermanentError, PreconditionFailedError
from uploader.redact import redact
from uploader.transfer.store import ObjectStore

__all__ = ["Committer"]

log = logging.getLogger(__name__)

#: Runs a journal call off the event loop (one at a time), returning its result.
JournalCall = Callable[..., Awaitable[Any]]


@dataclass
class _Queue:
    entries: list[tuple[PointerEntry, list[str]]] = field(default_factory=list)
    #: alias -> target name (None: remove the alias)
    aliases: dict[str, str | None] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.entries or self.aliases)


class ChunkedManifests(Protocol):
    def store_manifest(self, entry: PointerEntry, paths: list[str]) -> PointerEntry: ...


class Committer:
    """Writes each rank's commit pointer; one writer task per rank while work is queued.

    Args:
        store: the destination store.
        prefix: the object name prefix.
        attempts: pointer writes tried per batch before it counts as failed (one only
            when the error is permanent: bad credentials or certificate, no bucket).
        pause: seconds to wait before retry number ``attempt`` (1-based).
        journal: the journal, and ``call`` to run its methods off the event loop.
        keep_remote: remote retention in checkpoints (None: keep everything).
        keep_local: local retention in checkpoints (None: keep everything); run by
            ``retain_local(rank, pointer)`` after each write.
        report: called when a batch fails for good, with the error message and the exit
            status its error calls for (:meth:`ExitCode.of`).
        quick: runs a short journal call, on the event loop when it can (default: ``call``);
            used to mark batches of at most ``quick_rows`` files committed.
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
        report: Callable[[str, ExitCode], None] = lambda msg, code: None,
        quick: JournalCall | None = None,
        quick_rows: int = 0,
        keep_local: int | None = None,
        retain_local: Callable[[int, Pointer], Awaitable[None]] | None = None,
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
        self.keep_local = keep_local
        self.retain_local = retain_local
        self.history_limit = max(HISTORY_LIMIT, keep_remote or 0, keep_local or 0)
        self.report = report
        #: Where the per-rank writer tasks run (set by the engine before ``submit``).
        self.task_group: TaskGroup | None = None
        #: Files whose pointer commit failed for good.
        self.failures = 0
        #: Checkpoints committed by this process.
        self.committed = 0
        #: Pointer writes lost to another writer (then merged and written again).
        self.conflicts = 0
        #: Pointer commits that lost every conditional write in a row (then retried).
        self.conflict_failures = 0
        #: Whether pointer writes are compare-and-swap (None: not known yet), and why.
        self.fenced: bool | None = None
        self.fence_reason = ""
        self._fence_lock = threading.Lock()
        self._pointers: dict[int, Pointer | None] = {}
        #: The store's version of each rank's pointer as this process last saw it.
        self._versions: dict[int, str | None] = {}
        self._queued: dict[int, _Queue] = {}
        #: Aliases whose target is not committed yet, per rank.
        self._waiting: dict[int, dict[str, str | None]] = {}
        self._writing: set[int] = set()
        #: Checkpoints remote retention removed from the pointer, per rank (newest
        #: first, at most ``history_limit``): local retention still counts them.
        self._retired: dict[int, list[PointerEntry]] = {}
        #: Manifests read from manifest objects for local retention, per rank, by object
        #: name (only of checkpoints local retention still counts).
        self._manifests: dict[int, dict[str, tuple[ManifestFile, ...]]] = {}
        #: Awaited after each write that committed checkpoints: (rank, their names, the
        #: pointer written); the work queue learns what is committed from it.
        self.on_commit: Callable[[int, list[str], Pointer], Awaitable[None]] | None = None
        #: Writes chunked checkpoints' manifests (``--dedup``; set by the engine).
        self.chunked: ChunkedManifests | None = None

    @property
    def busy(self) -> bool:
        """A pointer write is queued or in flight."""
        return bool(self._writing)

    def pointer(self, rank: int) -> Pointer | None:
        """The rank's pointer as this process last wrote or read it (None: not yet)."""
        return self._pointers.get(rank)

    def submit(self, rank: int, entry: PointerEntry, paths: list[str]) -> None:
        """Queue the complete checkpoint ``entry`` (every file verified); ``paths`` are its
        files' journal paths, marked committed once the pointer is written."""
        self._queue(rank).entries.append((entry, paths))
        self._start(rank)

    def alias(self, rank: int, name: str, target: str | None) -> None:
        """Record ``name`` as another name of the checkpoint ``target`` (None: ``name`` is
        no longer an alias), once ``target`` is committed."""
        self._queue(rank).aliases[name] = target
        self._start(rank)

    def _queue(self, rank: int) -> _Queue:
        return self._queued.setdefault(rank, _Queue())

    def _start(self, rank: int) -> None:
        assert self.task_group is not None
        if rank not in self._writing:
            self._writing.add(rank)
            self.task_group.start_soon(self._writer, rank)

    async def _writer(self, rank: int) -> None:
        try:
            while self._queued.get(rank):
                await self._write(rank, self._queued.pop(rank))
        finally:
            self._writing.discard(rank)

    def prepare(self) -> bool:
        """Find out (once) whether the store fences pointer writes, and log it; blocking.
        Transient failures propagate (asked again at the next commit)."""
        with self._fence_lock:
            if self.fenced is None:
                fenced, why = fencing(self.store, self.prefix)
                if fenced:
                    log.info("pointer commits are compare-and-swap (%s)", why)
                else:
                    log.warning(
                        "pointer commits are NOT fenced: %s; run one uploader per rank "
                        "(a second writer could move a pointer back)",
                        why,
                    )
                self.fenced, self.fence_reason = fenced, why
            return self.fenced

    def _apply(
        self, rank: int, batch: _Queue, waiting: dict[str, str | None]
    ) -> tuple[Pointer | None, list[PointerEntry], dict[str, str | None]]:
        """The pointer after ``batch`` is written, the checkpoints retention removed from
        it, and the aliases still waiting for their target."""
        if self.fenced is None:
            self.prepare()
        # Large manifests are objects of their own, durable before a pointer names them;
        # a chunked checkpoint's after its chunks are confirmed (:mod:`uploader.bucket.gc`).
        batch.entries = [
            (
                self.chunked.store_manifest(e, p)
                if e.chunked and self.chunked is not None
                else store_manifest(self.store, e),
                p,
            )
            for e, p in batch.entries
        ]
        if self.fenced:
            return self._apply_fenced(rank, batch, waiting)
        if rank in self._pointers:
            cur = self._pointers[rank]
        else:
            cur = read_pointer(self.store, self.prefix, rank)
        new, doomed, still = self._change(rank, cur, batch, waiting)
        if new is not None and new != cur:
            write_pointer(self.store, self.prefix, new)
        return new, doomed, still

    def _apply_fenced(
        self, rank: int, batch: _Queue, waiting: dict[str, str | None]
    ) -> tuple[Pointer | None, list[PointerEntry], dict[str, str | None]]:
        last: list[tuple[Pointer | None, list[PointerEntry], dict[str, str | None]]] = []

        def change(cur: Pointer | None) -> Pointer | None:
            last.append(self._change(rank, cur, batch, waiting))
            return last[-1][0]

        known = (self._pointers.get(rank), self._versions.get(rank))
        try:
            update = update_pointer(self.store, self.prefix, rank, change, known)
        except PreconditionFailedError:  # lost every write in a row
            self._versions.pop(rank, None)
            self.conflicts += CONFLICT_ATTEMPTS
            self.conflict_failures += 1
            raise
        except Exception:
            self._versions.pop(rank, None)  # read afresh next time
            raise
        self.conflicts += update.conflicts
        if update.conflicts:
            log.info(
                "pointer of rank %d: %d write(s) lost to another writer, merged",
                rank,
                update.conflicts,
            )
        self._versions[rank] = update.version
        return update.pointer, last[-1][1], last[-1][2]

    def _change(
        self, rank: int, cur: Pointer | None, batch: _Queue, waiting: dict[str, str | None]
    ) -> tuple[Pointer | None, list[PointerEntry], dict[str, str | None]]:
        """``cur`` with ``batch`` merged in (not written), the checkpoints retention
        removes from it, and the aliases still waiting for their target."""
        for entry, _ in batch.entries:
            cur = merge(cur, rank, entry, self.history_limit)
        still: dict[str, str | None] = {}
        for name, target in {**waiting, **batch.aliases}.items():
            if cur is not None and (target is None or cur.entry(target) is not None):
                cur = alias(cur, name, target)
            elif target is not None:
                still[name] = target
        doomed: list[PointerEntry] = []
        if cur is not None and self.keep_remote is not None:
            cur, doomed = prune(cur, self.keep_remote)
        return cur, doomed, still

    async def _write(self, rank: int, batch: _Queue) -> None:
        waiting = self._waiting.pop(rank, {})
        files = sum(len(paths) for _, paths in batch.entries)
        for attempt in range(1, self.attempts + 1):
            try:
                pointer, doomed, still = await anyio.to_thread.run_sync(
                    self._apply, rank, batch, waiting, abandon_on_cancel=True
                )
                break
            except Exception as exc:
                msg = redact(f"{type(exc).__name__}: {exc}")
                # A permanent error (credentials, certificate, missing bucket) answers the
                # same every time: fail now, keep the batch for the next commit or start.
                if attempt >= self.attempts or isinstance(exc, PermanentError):
                    self.failures += files
                    self._waiting[rank] = {**waiting, **batch.aliases}
                    self.report(f"commit pointer of rank {rank}: {msg}", ExitCode.of(exc))
                    log.error("pointer commit failed rank=%d error=%s", rank, msg)
                    return
                await anyio.sleep(self.pause(attempt))
        self._pointers[rank] = pointer
        if still:
            self._waiting[rank] = still
        if pointer is None:
            return
        paths = [p for _, ps in batch.entries for p in ps]
        if paths:
            mark = self._quick if len(paths) <= self._quick_rows else self._call
            await mark(_mark_committed, self.journal, paths)
        if batch.entries:
            self.committed += len(batch.entries)
            names = [e.name for e, _ in batch.entries]
            log.info(
                "committed rank=%d latest=%s (after %s)",
                rank,
                pointer.latest.name,
                ", ".join(names[:3]) + (f" +{len(names) - 3}" if len(names) > 3 else ""),
            )
            if self.on_commit is not None:
                await self.on_commit(rank, names, pointer)
        if doomed:
            if self.keep_local is not None:
                # Read before their manifest objects go, for local retention after them.
                doomed = await anyio.to_thread.run_sync(
                    lambda: [self._loaded(rank, e) for e in doomed], abandon_on_cancel=True
                )
            await self._delete(pointer, doomed)
        if self.keep_local is not None and self.retain_local is not None and batch.entries:
            view = self._local_view(rank, pointer, doomed)
            view = await anyio.to_thread.run_sync(
                self._with_manifests, rank, view, self.keep_local, abandon_on_cancel=True
            )
            await self.retain_local(rank, view)

    def _local_view(self, rank: int, pointer: Pointer, doomed: list[PointerEntry]) -> Pointer:
        """``pointer`` with the checkpoints remote retention removed from it (now or
        before) back in its history: local retention counts every committed checkpoint,
        not only those still stored."""
        names = {e.name for e in pointer.history}
        by_name: dict[str, PointerEntry] = {}
        for e in [*doomed, *self._retired.get(rank, [])]:
            if e.name not in names:
                by_name.setdefault(e.name, e)
        retired = sorted(by_name.values(), key=lambda e: e.order, reverse=True)
        self._retired[rank] = retired[: self.history_limit]
        if not retired:
            return pointer
        history = sorted([*pointer.history, *retired], key=lambda e: e.order, reverse=True)
        return replace(pointer, history=tuple(history))

    def _with_manifests(self, rank: int, pointer: Pointer, keep: int) -> Pointer:
        """``pointer`` with the manifests of the checkpoints beyond the newest ``keep``
        at hand (local retention deletes by them); see :meth:`_loaded`. Manifests of
        checkpoints no longer in ``pointer`` leave the cache."""
        gone = {e.name for e in beyond(pointer, keep)}
        history = tuple(self._loaded(rank, e) if e.name in gone else e for e in pointer.history)
        live = {e.manifest_ref.object for e in history if e.manifest_ref is not None}
        cache = self._manifests.get(rank, {})
        self._manifests[rank] = {k: v for k, v in cache.items() if k in live}
        return replace(pointer, history=history)

    def _loaded(self, rank: int, entry: PointerEntry) -> PointerEntry:
        """``entry`` with its manifest at hand, a manifest object read once per process
        (blocking). One that cannot be read now stays unread: local retention skips it,
        remote retention tries again and keeps its files when it cannot."""
        ref = entry.manifest_ref
        if entry.manifest_loaded or ref is None:
            return entry
        cache = self._manifests.setdefault(rank, {})
        files = cache.get(ref.object)
        if files is None:
            try:
                files = load_manifest(self.store, entry).files
            except Exception as exc:
                log.warning("cannot read the manifest of %s: %s", entry.name, redact(str(exc)))
                return entry
            cache[ref.object] = files
        return replace(entry, files=files)

    async def _delete(self, pointer: Pointer, doomed: list[PointerEntry]) -> None:
        """Delete the objects of checkpoints that left the pointer (none it still names)."""
        try:
            await anyio.to_thread.run_sync(
                delete_checkpoints, self.store, pointer, doomed, abandon_on_cancel=True
            )
        except Exception as exc:
            log.warning("remote retention failed: %s", redact(str(exc)))


def _mark_committed(journal: Journal, paths: list[str]) -> None:
    for path in paths:
        journal.mark_committed(path)
