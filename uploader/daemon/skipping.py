"""What happens around a superseded checkpoint (see :mod:`uploader.daemon.keepup`): its
queued files are recorded as not sent, the work queue and the orphaned objects learn of
each commit, and ``--keep-local`` retires its local copy once newer checkpoints that
supersede it are committed.

Example::

    skipping = Skipping(engine)
    queue = WorkQueue(backlog, bound, skipping.skip)
    committer.on_commit = skipping.committed_with(queue)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from uploader.bucket.pointer import Pointer
from uploader.daemon.accept import QUICK_ROWS
from uploader.daemon.journal import FileRecord
from uploader.daemon.keepup import Ckpt, WorkQueue
from uploader.daemon.retention import retain_local, retire_superseded

__all__ = ["Skipping"]


class Skipping:
    """The engine's side of skipping superseded checkpoints.

    Args:
        engine: the :class:`~uploader.daemon.engine.Engine` (its journal calls,
            assembler, uploads, backlog, layout, options and metrics).
    """

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    async def skip(self, ckpt: Ckpt, rels: list[str]) -> None:
        """The checkpoint ``ckpt`` is superseded: its queued files ``rels`` are not sent
        (journal state ``superseded``) and it is never committed."""
        e = self.engine
        e.assembler.superseded.add(ckpt.rel)

        def record() -> tuple[list[FileRecord], list[FileRecord]]:
            recs = [r for r in map(e.journal.get, rels) if r is not None]
            # Files of a directory checkpoint verified before the skip: never committed
            # now; superseded too (not judged again after a restart), their objects go.
            sent = [r for r in e.journal.under(ckpt.rel) if r.state == "done" and not r.committed]
            for rel in [*rels, *(r.path for r in sent)]:
                e.journal.superseded(rel)
            return recs, sent

        run = e.quick if len(rels) <= QUICK_ROWS else e.call
        recs, sent = await run(record)
        for rec in recs:
            e.uploads.orphans.add(rec)  # sent in part before a restart, maybe
        for rec in sent:
            e.uploads.orphans.add(rec, started=True)
        for rel in rels:
            e.uploads.outstanding.discard(rel)
            e.assembler.closed(rel)

    def committed_with(
        self, queue: WorkQueue
    ) -> Callable[[int, list[str], Pointer], Awaitable[None]]:
        """The committer's ``on_commit``: the metrics, the queue (what is committed now:
        lag, superseding) and the orphaned objects of ``rank`` learn of each commit."""
        e = self.engine

        async def committed(rank: int, names: list[str], pointer: Pointer) -> None:
            if e.metrics is not None:
                e.metrics.commit(rank, len(names))
            await queue.committed(rank, names, [x.order for x in pointer.history])
            await e.uploads.orphans.sweep(rank, pointer)

        return committed

    async def retain_local(self, rank: int, pointer: Pointer) -> None:
        """After a pointer write: local retention (``--keep-local``), then the local copies
        of superseded checkpoints that committed newer ones supersede."""
        e = self.engine
        keep = e.opts.keep_local
        await e.call(retain_local, e.journal, e.layout, pointer, keep)
        skipped = e.backlog.superseded(rank)
        if keep is not None and skipped:
            gone = await e.call(retire_superseded, e.journal, e.layout, pointer, keep, skipped)
            e.backlog.retired(gone)
