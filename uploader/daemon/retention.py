"""Retention: keep the newest N checkpoints, deleting only what is safely elsewhere.

* Local (``--keep-local N``): per rank, checkpoint files beyond the newest N (by
  mtime, then name) are deleted, but only when the journal says their upload is
  verified (``done``) and the file on disk is still the one that was verified
  (same size and mtime). An unverified file is never deleted, whatever N says.
* Remote (``--keep-remote N``): per rank, checkpoint objects beyond the newest N
  are deleted, never the one the rank's commit pointer names as ``latest``.

Example::

    for path in local_deletions(journal.records(), root, keep=3, rank=0):
        path.unlink()
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from uploader.config.hparams import join_key
from uploader.daemon.journal import FileRecord
from uploader.daemon.watcher import FileFilter, is_inside

if TYPE_CHECKING:  # pragma: no cover
    from uploader.bucket.pointer import Pointer
    from uploader.transfer.store import ObjectStore

__all__ = ["local_deletions", "apply_local", "remote_deletions"]

log = logging.getLogger("uploader.daemon.retention")


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


def remote_deletions(
    store: ObjectStore,
    prefix: str,
    rank: int,
    keep: int,
    filt: FileFilter,
    pointer: Pointer,
    in_flight: Collection[str] = (),
) -> list[str]:
    """Checkpoint objects of ``rank`` beyond the newest ``keep``; never the pointer's latest.

    Objects in ``in_flight`` (uploaded or uploading, but not yet in the pointer) are left
    out: without their pointer entry their age is unknown (the store's mtime is the
    upload time), and ranking a late old checkpoint as the newest would delete a newer
    one. They are judged once committed.
    """
    base = join_key(prefix, f"rank_{rank}") + "/"
    order = {e.object: e.order for e in pointer.history}
    skip = set(in_flight)
    objs = []
    for info in store.list(base):
        rel = info.name[len(base) :]
        if not rel or rel.endswith(".json") or not filt.moves_pointer(rel):
            continue
        if info.name in skip:
            continue
        key = order.get(info.name, (int((info.mtime or 0) * 1e9), rel))
        objs.append((key, info.name))
    objs.sort(reverse=True)
    protected = {pointer.latest.object}
    return [name for _, name in objs[keep:] if name not in protected]
