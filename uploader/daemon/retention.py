"""Local retention (``--keep-local N``): keep each rank's newest N checkpoint files on disk.

Per rank, checkpoint files beyond the newest N (by mtime, then name) are deleted,
but only when the journal says their upload is verified (``done``) and the file
on disk is still the one that was verified (same size and mtime). An unverified
file is never deleted, whatever N says. Remote retention lives in
:mod:`uploader.bucket.retention`.

Example::

    for path in apply_local(journal.records(), root, keep=3, rank=0):
        print("deleted", path)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

from uploader.daemon.journal import FileRecord
from uploader.daemon.layouts import is_inside

__all__ = ["local_deletions", "apply_local"]

log = logging.getLogger(__name__)


def local_deletions(
    records: Iterable[FileRecord], root: Path, keep: int, rank: int
) -> list[FileRecord]:
    """Records of ``rank`` whose local file may be deleted to keep the newest ``keep``."""
    present: list[tuple[FileRecord, os.stat_result]] = []
    for rec in records:
        if rec.rank != rank or not rec.checkpoint:
            continue
        st = is_inside(root, rec.path)
        if st is not None:
            present.append((rec, st))
    present.sort(key=lambda p: (p[1].st_mtime_ns, p[0].name), reverse=True)
    out = []
    for rec, st in present[keep:]:
        if rec.state == "done" and (st.st_size, st.st_mtime_ns) == (rec.size, rec.mtime_ns):
            out.append(rec)
    return out


def apply_local(records: Iterable[FileRecord], root: Path, keep: int, rank: int) -> list[str]:
    """Delete what :func:`local_deletions` allows; return the deleted relative paths."""
    deleted = []
    for rec in local_deletions(records, root, keep, rank):
        try:
            os.unlink(root / rec.path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("retention: cannot delete %s: %s", rec.path, exc.strerror)
            continue
        log.info("retention deleted local path=%s (verified as %s)", rec.path, rec.object)
        deleted.append(rec.path)
    return deleted
