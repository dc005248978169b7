"""Local file primitives shared by every writer and reader of checkpoint files.

Crash safety of a rename needs the folder itself fsynced (the rename lives in
the folder's entry, not in the file): :func:`fsync_dir` does that, for the
store's verified downloads, the local backend's commits and the training-side
saver (``ckpt.saver``) alike. :func:`pread_exact` fills a buffer from a file
offset without moving the file position, so parts are read in parallel from one
descriptor. :func:`reserve` allocates a file's disk space up front (a download
writes into mapped pages only once the space is its own).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
from collections.abc import Callable
from typing import Any

from uploader.errors import IntegrityError

__all__ = ["fsync_dir", "pread_exact", "reserve"]

#: Answers of fallocate(2) that mean "this filesystem cannot", not "no space".
_CANNOT_ALLOCATE = {errno.EOPNOTSUPP, errno.ENOSYS, errno.ENODEV, errno.EPERM}


@functools.cache
def _fallocate() -> Callable[..., Any] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).fallocate
    except (AttributeError, OSError):  # not Linux, or no such symbol
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


def reserve(fd: int, size: int) -> bool:
    """Allocate ``size`` bytes of disk for the open file ``fd`` (fallocate(2), which
    also sets its length): True once they are its own; False where the platform or
    filesystem cannot (the caller writes without the reservation).

    Raises OSError when the filesystem can but has no room (ENOSPC, EDQUOT): a
    download learns it before receiving a byte. Unlike ``os.posix_fallocate``, this
    never falls back to writing zeros through the whole file.
    """
    fn = _fallocate()
    if fn is None or size <= 0:
        return False
    if fn(fd, 0, 0, size) == 0:
        return True
    err = ctypes.get_errno()
    if err in _CANNOT_ALLOCATE:
        return False
    raise OSError(err, os.strerror(err))


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
