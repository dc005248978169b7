"""Remote retention (``--keep-remote N``): keep each rank's newest N checkpoints.

Retention counts checkpoints, not files, by the commit pointer's history (newest
first, by the checkpoint's own mtime). :func:`prune` removes the checkpoints beyond
the newest N from the pointer (never ``latest``); once that pointer is written,
:func:`delete_checkpoints` deletes every file of each removed checkpoint that no
remaining entry names, then its manifest object when it has one (never one that a
remaining entry names). The pointer therefore never names a deleted object. Objects
the pointer never named (artifacts, another tool's files) are never touched. A chunked
checkpoint (``--dedup``) loses its manifest object; its chunks are collected later by
:mod:`uploader.bucket.gc`, since other checkpoints may share them.

Example::

    kept, doomed = prune(pointer, keep=3)
    write_pointer(store, prefix, kept)
    delete_checkpoints(store, kept, doomed)
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

from uploader.bucket.manifest import load_manifest
from uploader.bucket.pointer import Pointer, PointerEntry, beyond
from uploader.errors import ObjectNotFoundError, UploaderError

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
    does not name, their manifest objects last; return the deleted object names.

    A doomed checkpoint whose manifest object cannot be read keeps its files and its
    manifest object (its files are unknown); the failure is logged."""
    entries: list[PointerEntry] = []
    for e in doomed:
        try:
            entries.append(load_manifest(store, e))
        except UploaderError as exc:
            log.warning("retention keeps checkpoint=%s: %s", e.name, exc)
    # A chunked file has no object of its own: its manifest goes, its chunks stay for
    # a collection (``ckpt-uploader gc``) to find unreferenced.
    live = _live(store, pointer, {obj for e in entries for f, obj in e.objects() if not f.chunks})
    gone = []
    for e in entries:
        names = [obj for f, obj in e.objects() if not f.chunks]
        if e.manifest_ref is not None:
            names.append(e.manifest_ref.object)  # last: while files remain, it lists them
        for obj in names:
            if obj in live:
                continue
            with contextlib.suppress(ObjectNotFoundError):
                store.delete(obj)
            gone.append(obj)
        log.info("retention deleted remote checkpoint=%s (%d file(s))", e.name, e.file_count)
    return gone


def _live(store: ObjectStore, pointer: Pointer, doomed: set[str]) -> set[str]:
    """The objects ``pointer`` names among ``doomed`` and its manifest objects. An entry
    whose manifest is an object of its own is read only when its objects' place could
    hold one of ``doomed`` (never, unless checkpoints nest)."""
    live: set[str] = set()
    for e in pointer.history:
        if e.manifest_ref is not None:
            live.add(e.manifest_ref.object)
        if not e.manifest_loaded:
            under = e.object + "/"
            if not any(o.startswith(under) for o in doomed):
                continue
            e = load_manifest(store, e)
        live.update(obj for _, obj in e.objects() if obj in doomed)
    return live
