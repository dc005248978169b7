"""Objects of superseded files that may have reached the store, deleted once a pointer
write shows that no checkpoint names them.

A file whose checkpoint is superseded (:mod:`uploader.daemon.keepup`) while it was
being sent, or that was being sent when the daemon was killed, may have left its object
in the store. It is never committed, so no pointer will name it: after the next pointer
write of its rank, :meth:`Orphans.sweep` deletes every such object that the pointer
does not name (a checkpoint's object, or a file under a directory checkpoint's prefix).

Example::

    orphans = Orphans(store)
    orphans.add(record)                     # superseded after its upload started
    await orphans.sweep(rank, pointer)      # after a pointer write of that rank
"""

from __future__ import annotations

import logging

import anyio

from uploader.bucket.pointer import Pointer
from uploader.daemon.journal import FileRecord
from uploader.redact import redact
from uploader.transfer.store import ObjectStore

__all__ = ["Orphans", "named"]

log = logging.getLogger(__name__)


def named(pointer: Pointer, object_name: str) -> bool:
    """Whether a checkpoint of ``pointer`` holds ``object_name``."""
    return any(
        object_name == e.object or object_name.startswith(e.object.rstrip("/") + "/")
        for e in pointer.history
    )


class Orphans:
    """Objects to delete once their rank's pointer is known not to name them."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self._waiting: dict[int, set[str]] = {}

    def add(self, rec: FileRecord, started: bool = False) -> None:
        """``rec`` is superseded; its object may be in the store when its upload started
        (``started``, or the journal recorded a start)."""
        if started or rec.started_at is not None:
            self._waiting.setdefault(rec.rank, set()).add(rec.object)

    async def sweep(self, rank: int, pointer: Pointer) -> list[str]:
        """Delete the waiting objects of ``rank`` that ``pointer`` does not name."""
        doomed = [o for o in self._waiting.pop(rank, set()) if not named(pointer, o)]

        def delete() -> list[str]:
            gone = []
            for name in doomed:
                try:
                    if self.store.delete(name):
                        gone.append(name)
                except Exception as exc:  # best effort: an orphan costs space, not safety
                    log.warning("could not delete %s: %s", name, redact(str(exc)))
            return gone

        gone: list[str] = await anyio.to_thread.run_sync(delete, abandon_on_cancel=True)
        for name in gone:
            log.info("deleted %s: sent before its checkpoint was superseded", name)
        return gone
