"""Remote retention (``--keep-remote N``): keep each rank's newest N checkpoints.

Retention counts checkpoints, not files, by the commit pointer's history (newest
first, by the checkpoint's own mtime). :func:`prune` removes the checkpoints beyond
the newest N from the pointer (never ``latest``); once that pointer is written,
:func:`delete_checkpoints` deletes every file of each removed checkpoint that no
remaining entry names. The pointer therefore never names a deleted object. Objects
the pointer never named (artifacts, another tool's files) are never touched.

Example::

    kept, doomed = prune(pointer, keep=3)
    write_pointer(store, prefix, kept)
    delete_checkpoints(store, kept, doomed)
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

from uploader.bucket.pointer import Pointer, PointerEntry, beyond
from uploader.errors import ObjectNotFoundError

if TYPE_CHECKING:  # pragma: no cover
    from uploader.transfer.store import ObjectStore

__all__ = ["prune", "delete_checkpoints"]

log = logging.getLogger(__name__)


def prune(pointer: Pointer, keep: int) -> tuple[Pointer, list[PointerEntry]]:
    """``pointer`` without the checkpoints beyond its newest ``keep``, and those."""
    doomed = beyond(pointer, keep)
    if not doomed:
        return pointer, []
    return pointer.without([e.name for e in doomed]), doomed


def delete_checkpoints(
    store: ObjectStore, pointer: Pointer, doomed: list[PointerEntry]
) -> list[str]:
    """Delete every object of the ``doomed`` checkpoints that ``pointer`` (as written)
    does not name; return the deleted object names."""
    live = {obj for e in pointer.history for _, obj in e.objects()}
    gone = []
    for e in doomed:
        for _, obj in e.objects():
            if obj in live:
                continue
            with contextlib.suppress(ObjectNotFoundError):
                store.delete(obj)
            gone.append(obj)
        log.info("retention deleted remote checkpoint=%s (%d file(s))", e.name, len(e.manifest))
    return gone
