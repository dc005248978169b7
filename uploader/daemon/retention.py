"""Local retention (``--keep-local N``): keep each rank's newest N checkpoints on disk.

Retention counts checkpoints, not files. After each pointer write, the checkpoints
the pointer's history holds beyond the newest N are deleted locally, whole: every
file of the manifest, then the directory of a directory checkpoint (and any empty
directories in it). A checkpoint is deleted only when every one of its files is
verified (``done`` in the journal) and the file on disk is still the one that was
verified (same size and mtime); otherwise nothing of it is deleted. Files of the
directory that are not in the manifest are kept (and so is the directory). The
pointer's ``latest`` is never deleted. Remote retention lives in
:mod:`uploader.bucket.retention`.

A checkpoint skipped as superseded (:mod:`uploader.daemon.keepup`) never enters the
pointer: :func:`retire_superseded` deletes its local copy once the pointer's history
holds at least ``max(1, N)`` committed checkpoints newer than it (a newer checkpoint
that supersedes it is committed), whole and only while every file on disk is the
version the journal recorded; never otherwise.

Example::

    for rel in apply_local(journal, layout, pointer, keep=3):
        print("deleted", rel)
"""

from __future__ import annotations

import contextlib
import logging
import os

from uploader.bucket.pointer import Pointer, PointerEntry, beyond
from uploader.daemon.journal import Journal, JournalFullError
from uploader.daemon.layouts import RunLayout, is_inside

__all__ = ["local_deletions", "apply_local", "retain_local", "retire_superseded"]

log = logging.getLogger(__name__)


def local_deletions(
    journal: Journal, layout: RunLayout, pointer: Pointer, keep: int
) -> list[tuple[PointerEntry, str, list[str]]]:
    """Checkpoints of ``pointer`` whose local copy may go to keep the newest ``keep``,
    each with its path and the paths of its files still on disk (relative to RUN_DIR)."""
    out = []
    for entry in beyond(pointer, keep):
        if not entry.manifest_loaded:
            continue  # its manifest object could not be read: its files are unknown
        paths: list[str] = []
        where = ""
        ok = True
        for f in entry.manifest:
            rec = journal.find(pointer.rank, f.path)
            if rec is None:
                ok = False  # not uploaded from this run directory
                break
            where = rec.path[: len(rec.path) - len(f.path)] + entry.name
            st = is_inside(layout.root, rec.path)
            if st is None:
                continue  # already gone
            if rec.state != "done" or (st.st_size, st.st_mtime_ns) != (rec.size, rec.mtime_ns):
                ok = False
                break
            paths.append(rec.path)
        if ok and paths:
            out.append((entry, where, paths))
    return out


def apply_local(journal: Journal, layout: RunLayout, pointer: Pointer, keep: int) -> list[str]:
    """Delete what :func:`local_deletions` allows; return the deleted relative paths."""
    deleted = []
    for entry, where, paths in local_deletions(journal, layout, pointer, keep):
        for rel in paths:
            try:
                os.unlink(layout.root / rel)
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("retention: cannot delete %s: %s", rel, exc.strerror)
                continue
            deleted.append(rel)
        if entry.is_directory:
            _remove_empty(layout.root / where)
        log.info(
            "retention deleted local checkpoint=%s (%d file(s), verified as %s)",
            entry.name,
            len(paths),
            entry.object,
        )
    return deleted


def retain_local(
    journal: Journal, layout: RunLayout, pointer: Pointer, keep: int | None
) -> list[str]:
    """After a pointer write: force the journal to disk (``done`` is there before any
    local file goes), then :func:`apply_local`. Nothing is deleted while the journal
    cannot be saved (its disk is full)."""
    if keep is None:
        return []
    try:
        journal.sync()
    except JournalFullError as exc:
        log.warning("local retention waits until the journal is saved: %s", exc)
        return []
    return apply_local(journal, layout, pointer, keep)


def _remove_empty(top: os.PathLike[str] | str) -> None:
    """Remove ``top`` and the directories below it that are empty (bottom up)."""
    for dirpath, _, _ in sorted(os.walk(top), key=lambda w: -len(w[0])):
        with contextlib.suppress(OSError):
            os.rmdir(dirpath)


def retire_superseded(
    journal: Journal,
    layout: RunLayout,
    pointer: Pointer,
    keep: int,
    skipped: list[tuple[str, tuple[int, str]]],
) -> list[str]:
    """Delete the local copies of superseded checkpoints (``skipped``: each one's path
    relative to RUN_DIR and its order) that at least ``max(1, keep)`` committed
    checkpoints of ``pointer`` are newer than; return the paths of those handled
    (deleted, or nothing of them left). Journal lock held."""
    handled = []
    for rel, order in skipped:
        newer = sum(1 for e in pointer.history if e.order > order)
        if newer < max(1, keep):
            continue
        recs = [r for r in [journal.get(rel), *journal.under(rel)] if r is not None]
        paths = []
        ok = True
        for rec in recs:
            st = is_inside(layout.root, rec.path)
            if st is None:
                continue
            if rec.state not in ("superseded", "done") or (st.st_size, st.st_mtime_ns) != (
                rec.size,
                rec.mtime_ns,
            ):
                ok = False  # a new version, or a file still on its way: keep it all
                break
            paths.append(rec.path)
        if not ok:
            continue
        for path in paths:
            try:
                os.unlink(layout.root / path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("retention: cannot delete %s: %s", path, exc.strerror)
        if os.path.isdir(layout.root / rel):
            _remove_empty(layout.root / rel)
        if paths:
            log.info(
                "retention deleted local checkpoint=%s (%d file(s), superseded: not sent)",
                rel,
                len(paths),
            )
        handled.append(rel)
    return handled
