"""Local file primitives shared by every writer and reader of checkpoint files.

Crash safety of a rename needs the folder itself fsynced (the rename lives in
the folder's entry, not in the file): :func:`fsync_dir` does that, for the
store's verified downloads, the local backend's commits and the training-side
saver (``ckpt.saver``) alike. :func:`pread_exact` fills a buffer from a file
offset without moving the file position, so parts are read in parallel from one
descriptor.
"""

from __future__ import annotations

import os

from uploader.errors import IntegrityError

__all__ = ["fsync_dir", "pread_exact"]


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the entries of folder ``path`` durable (a rename into it, above all).

    Best effort: platforms or filesystems without directory descriptors (or
    without fsync on them) are skipped silently.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def pread_exact(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` with the bytes of ``fd`` from ``offset`` on.

    Raises IntegrityError when the file ends first (it shrank while it was read).
    """
    pos = 0
    while pos < len(view):
        n = os.preadv(fd, [view[pos:]], offset + pos)
        if n <= 0:
            raise IntegrityError(
                "the local file shrank while it was uploaded; upload it again once it is complete"
            )
        pos += n
