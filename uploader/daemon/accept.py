"""Taking complete files: from the intake's finished files to queued uploads.

:class:`Acceptor` records each complete file in the journal (one journal call per batch,
on the event loop when it is short, see :meth:`Engine.quick
<uploader.daemon.engine.Engine.quick>`) unless the journal already holds that version,
holds back a changed artifact uploaded less than ``--artifact-interval`` ago
(:class:`~uploader.daemon.artifacts.ArtifactThrottle`), and queues each accepted file on
the engine's bounded work queue (:class:`~uploader.daemon.keepup.WorkQueue`, which
orders it): a full queue makes the intake wait, nothing is dropped. Every queued upload is counted in its checkpoint (:meth:`Assembler.opened
<uploader.daemon.assembly.Assembler.opened>`), so a directory checkpoint is judged once
its last queued upload is over.

Example::

    acceptor = Acceptor(layout, journal, engine.call, engine.quick, assembler, throttle, set())
    acceptor.queue = work_queue
    await acceptor.take([(rel, os.stat(path))])
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from uploader.daemon.artifacts import ArtifactThrottle
from uploader.daemon.assembly import Assembler, UnitKey
from uploader.daemon.intake import Found
from uploader.daemon.journal import FileRecord, Journal
from uploader.daemon.keepup import Ckpt, WorkQueue
from uploader.daemon.layouts import RunLayout, is_inside

__all__ = ["Acceptor", "QUICK_ROWS"]

log = logging.getLogger("uploader.daemon.engine")

#: Files accepted, or pointer entries marked, on the event loop (``Engine.quick``);
#: larger batches go to a worker thread.
QUICK_ROWS = 16

JournalCall = Callable[..., Awaitable[Any]]


class Acceptor:
    """Complete files -> journal -> the work stream (see the module docstring).

    Args:
        layout: the run directory.
        journal: the journal; ``call`` runs a journal call in a worker thread holding
            its lock, ``quick`` on the loop when the lock is free.
        assembler: which checkpoint a file belongs to; counts queued uploads.
        artifacts: the throttle of changed artifacts.
        outstanding: files queued or uploading (shared with the uploads).
    """

    def __init__(
        self,
        layout: RunLayout,
        journal: Journal,
        call: JournalCall,
        quick: JournalCall,
        assembler: Assembler,
        artifacts: ArtifactThrottle,
        outstanding: set[str],
    ) -> None:
        self.layout = layout
        self.root = layout.root
        self.journal = journal
        self.call = call
        self.quick = quick
        self.assembler = assembler
        self.artifacts = artifacts
        self.outstanding = outstanding
        #: The work queue (set by the engine's pipeline).
        self.queue: WorkQueue | None = None
        #: The checkpoint of each :class:`Ckpt` queued (for :meth:`complete`).
        self._units: dict[Ckpt, UnitKey] = {}

    async def fresh(self, found: Found) -> Found:
        """Of scanned files, those whose version the journal does not hold."""

        def unknown() -> Found:
            out = []
            for rel, st in found:
                rec = self.journal.get(rel)
                if rec is None or (rec.size, rec.mtime_ns) != (st.st_size, st.st_mtime_ns):
                    out.append((rel, st))
            return out

        result: Found = await self.call(unknown)
        return result

    async def take(self, found: Found) -> None:
        """Accept complete files into the journal (unless that version is known), in one
        journal call, and queue them. A changed artifact uploaded less than
        ``artifact_interval`` ago waits (:class:`ArtifactThrottle`), unless draining."""
        now = time.time()

        def record() -> list[tuple[FileRecord | None, str, float]]:
            """(record, rel, 1.0 when newly accepted), or (None, rel, when due)."""
            out: list[tuple[FileRecord | None, str, float]] = []
            for rel, st in found:
                rec = self.journal.get(rel)
                if rec is not None and (rec.size, rec.mtime_ns) == (st.st_size, st.st_mtime_ns):
                    out.append((rec, rel, 0.0))
                    continue
                key = self.assembler.key(rel)
                due = self.artifacts.due(rec, key is None, now)
                if due is not None:
                    out.append((None, rel, due))
                    continue
                loc = self.layout.locate(rel)
                new = FileRecord(
                    rel,
                    loc.rank,
                    loc.name,
                    loc.object,
                    st.st_size,
                    st.st_mtime_ns,
                    key is not None,
                )
                out.append((self.journal.accept(new), rel, 1.0))
            return out

        run = self.quick if len(found) <= QUICK_ROWS else self.call
        taken = await run(record)
        self.assembler.tags_seen([rel for rel, _ in found])
        for rec, rel, flag in taken:
            if rec is None:
                self.artifacts.hold(rel, flag)
                continue
            self.artifacts.release(rel)
            accepted = flag > 0
            if accepted:
                log.info("accepted path=%s size=%d object=%s", rec.path, rec.size, rec.object)
            elif rec.state != "pending":
                continue
            await self.enqueue(rec)

    async def take_now(self, rels: list[str]) -> None:
        """Take the files ``rels`` as they are on disk now (those still there)."""
        found: Found = []
        for rel in rels:
            st = is_inside(self.root, rel)
            if st is not None:
                found.append((rel, st))
        if found:
            await self.take(found)

    async def enqueue(self, rec: FileRecord) -> None:
        """Queue the accepted file ``rec`` (once), with its checkpoint and whether that
        checkpoint is complete now (the queue orders by it)."""
        rel = rec.path
        if rel in self.outstanding:
            return
        self.outstanding.add(rel)
        self.assembler.opened(rel)
        key = self.assembler.key(rel)
        ckpt = None
        if key is not None:
            ckpt = Ckpt(key.rank, key.unit.name, key.rel)
            self._units[ckpt] = key
        assert self.queue is not None
        await self.queue.put(rel, ckpt, rec.size, rec.mtime_ns, self.complete(ckpt))

    def complete(self, ckpt: Ckpt | None) -> bool:
        """Whether the checkpoint ``ckpt`` is complete by its rule now (a single file:
        always; a directory: its marker is there)."""
        if ckpt is None:
            return False
        key = self._units.get(ckpt)
        if key is None:
            return False
        rank_root = self.root / key.base if key.base else self.root
        if not self.assembler.rules.complete(rank_root, key.unit):
            return False
        self._units.pop(ckpt, None)  # complete stays complete: never asked again
        return True
