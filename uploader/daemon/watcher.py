"""Which files of a run directory to upload, where they go, and when they are complete.

* :class:`RunLayout` maps a path under RUN_DIR to its rank, its name inside the
  rank directory and its object name (``{prefix}/rank_N/{name}``).
* :class:`FileFilter` decides which names are considered at all (hidden and
  temporary names, the journal, include/exclude patterns) and which move the
  commit pointer.
* :func:`scan` lists the files already present (start-up, and directories that
  appear later); :class:`Watcher` forwards watchdog events (recursive) to a
  callback. Symlinks are never followed: a symlink is ignored, and a path whose
  real location is outside RUN_DIR is never read.

Example::

    layout = RunLayout(Path("runs/1"), prefix="exp1", default_rank=0)
    filt = FileFilter()
    for path in scan(layout.root, filt):
        print(layout.locate(path))
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import logging
import os
import re
import signal
import stat
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uploader.config.hparams import join_key
from uploader.daemon.journal import STATE_NAMES

__all__ = [
    "CHECKPOINT_PATTERNS",
    "IGNORED_SUFFIXES",
    "FileFilter",
    "RunLayout",
    "Location",
    "Watcher",
    "scan",
    "is_inside",
    "open_for_writing",
    "ignore_lease_breaks",
]

log = logging.getLogger("uploader.daemon.watcher")

CHECKPOINT_PATTERNS: tuple[str, ...] = (
    "*.pt",
    "*.pt.gz",
    "*.pt.bz2",
    "*.pt.xz",
    "*.pt.zst",
    "*.tar",
    "*.tar.gz",
    "*.tgz",
    "*.tar.bz2",
    "*.tar.lzma",
)
IGNORED_SUFFIXES: tuple[str, ...] = (".tmp", ".part", "~", ".swp")
_RANK_DIR = re.compile(r"^rank_(\d+)$")


def _matches(rel: str, patterns: Sequence[str]) -> bool:
    base = rel.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(rel if "/" in p else base, p) for p in patterns)


@dataclass(frozen=True)
class FileFilter:
    """Which files are uploaded, and which of them move the commit pointer.

    Args:
        include: glob patterns (on the base name, or on the relative path when the
            pattern holds a ``/``); default: checkpoint files.
        exclude: patterns that win over ``include``.
        pointer: patterns of files that move the commit pointer; default: checkpoints.
    """

    include: tuple[str, ...] = CHECKPOINT_PATTERNS
    exclude: tuple[str, ...] = ()
    pointer: tuple[str, ...] = CHECKPOINT_PATTERNS

    def ignored_part(self, part: str) -> bool:
        return part.startswith(".") or part.endswith(IGNORED_SUFFIXES) or part in STATE_NAMES

    def accepts(self, rel: str) -> bool:
        """Whether the file at ``rel`` (relative to RUN_DIR, '/'-separated) is uploaded."""
        if any(self.ignored_part(p) for p in rel.split("/")):
            return False
        return _matches(rel, self.include) and not _matches(rel, self.exclude)

    def moves_pointer(self, rel: str) -> bool:
        return _matches(rel, self.pointer)


@dataclass(frozen=True)
class Location:
    rel: str  #: relative to RUN_DIR
    rank: int
    name: str  #: relative to the rank directory
    object: str


class RunLayout:
    """Maps files of RUN_DIR to ranks and object names.

    * RUN_DIR named ``rank_N``: every file belongs to rank N.
    * Files under a ``rank_N/`` directory of RUN_DIR belong to rank N.
    * Otherwise, files belong to ``default_rank``.
    """

    def __init__(self, root: Path, prefix: str, default_rank: int = 0) -> None:
        self.root = Path(os.path.realpath(root))
        self.prefix = prefix.strip("/")
        m = _RANK_DIR.match(self.root.name)
        self.fixed_rank: int | None = int(m.group(1)) if m else None
        self.default_rank = default_rank

    def relative(self, path: str | os.PathLike[str]) -> str | None:
        """``path`` relative to RUN_DIR, or None when it is outside or not a plain path."""
        p = os.path.abspath(path)
        root = str(self.root)
        if not p.startswith(root + os.sep):
            return None
        return p[len(root) + 1 :].replace(os.sep, "/")

    def locate(self, rel: str) -> Location:
        if self.fixed_rank is not None:
            rank, name = self.fixed_rank, rel
        else:
            first, _, rest = rel.partition("/")
            m = _RANK_DIR.match(first)
            if m and rest:
                rank, name = int(m.group(1)), rest
            else:
                rank, name = self.default_rank, rel
        return Location(rel, rank, name, join_key(self.prefix, f"rank_{rank}/{name}"))


def is_inside(root: Path, rel: str) -> os.stat_result | None:
    """The stat of RUN_DIR/rel when it is a regular file really inside RUN_DIR, else None.

    No component may be a symlink leading elsewhere; the file itself may not be a symlink.
    """
    path = root / rel
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    real = os.path.realpath(path)
    if not real.startswith(str(root) + os.sep) or real != str(path):
        return None
    return st


# -- is a writer still at work? ----------------------------------------------------------
# Linux grants a read lease on a file only when no process has it open for writing,
# whatever process, container or mount namespace that writer lives in. Taking one and
# releasing it at once tells whether a file that looks quiet is really finished, e.g.
# one a slow writer started before the daemon (whose close event would come later).
if sys.platform == "linux":
    import fcntl

    _F_SETLEASE: int | None = getattr(fcntl, "F_SETLEASE", 1024)
else:  # pragma: no cover
    _F_SETLEASE = None
_probe_ready = False


def ignore_lease_breaks() -> bool:
    """Let :func:`open_for_writing` work in this process: a writer opening the file in
    the microseconds the lease is held sends SIGIO, whose default action ends a process.
    Must be called from the main thread; True when the probe is available."""
    global _probe_ready
    if _F_SETLEASE is None or threading.current_thread() is not threading.main_thread():
        return _probe_ready
    signal.signal(signal.SIGIO, signal.SIG_IGN)
    _probe_ready = True
    return True


def open_for_writing(path: str | os.PathLike[str]) -> bool | None:
    """True if some process has ``path`` open for writing, False if none has, None when
    this cannot be told here (not Linux, probe not enabled, another user's file, a
    filesystem without leases)."""
    if not _probe_ready or _F_SETLEASE is None:
        return None
    try:
        # O_NONBLOCK: never wait for another process's lease to be broken.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        return True if exc.errno in (errno.EAGAIN, errno.EBUSY) else None
    else:
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_UNLCK)
        return False
    finally:
        os.close(fd)


def scan(root: Path, filt: FileFilter, sub: str = "") -> Iterator[str]:
    """Relative paths of accepted regular files under ``root`` (or its subfolder ``sub``).

    Symlinked directories are not entered; symlinked files are skipped.
    """
    top = root / sub if sub else root
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not filt.ignored_part(d))
        base = os.path.relpath(dirpath, root).replace(os.sep, "/")
        for fn in sorted(filenames):
            rel = fn if base == "." else f"{base}/{fn}"
            if filt.accepts(rel) and is_inside(root, rel) is not None:
                yield rel


#: Callback kinds: "moved" (renamed into place: complete now), "created", "modified",
#: "closed" (closed after writing), "dirmoved" / "dircreated" (a directory appeared: scan it).
EventFn = Callable[[str, str], None]


class Watcher:
    """Recursive watchdog observer forwarding file events to ``notify(kind, abs_path)``.

    ``notify`` runs on the observer thread; it must be thread-safe and quick.
    """

    def __init__(self, root: Path, notify: EventFn) -> None:
        from watchdog.events import (
            DirCreatedEvent,
            DirMovedEvent,
            FileClosedEvent,
            FileCreatedEvent,
            FileModifiedEvent,
            FileMovedEvent,
            FileSystemEvent,
            FileSystemEventHandler,
        )
        from watchdog.observers import Observer

        self.root = root

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                try:
                    if isinstance(event, FileMovedEvent):
                        if event.dest_path:
                            notify("moved", os.fsdecode(event.dest_path))
                    elif isinstance(event, FileClosedEvent):
                        notify("closed", os.fsdecode(event.src_path))
                    elif isinstance(event, FileCreatedEvent):
                        notify("created", os.fsdecode(event.src_path))
                    elif isinstance(event, FileModifiedEvent):
                        notify("modified", os.fsdecode(event.src_path))
                    elif isinstance(event, DirMovedEvent):
                        if event.dest_path:
                            notify("dirmoved", os.fsdecode(event.dest_path))
                    elif isinstance(event, DirCreatedEvent):
                        notify("dircreated", os.fsdecode(event.src_path))
                except Exception:  # the loop may be closing; never kill the observer
                    log.debug("event dropped during shutdown: %r", event)

        filters: list[type[Any]] = [
            FileMovedEvent,
            FileClosedEvent,
            FileCreatedEvent,
            FileModifiedEvent,
            DirMovedEvent,
            DirCreatedEvent,
        ]
        self._observer = Observer()
        self._observer.daemon = True
        self._observer.schedule(Handler(), str(root), recursive=True, event_filter=filters)

    def start(self) -> None:
        self._observer.start()

    def stop(self, join: bool = True) -> None:
        """Stop watching; ``join`` waits (up to 5 s) for the observer thread to end."""
        if self._observer.is_alive():
            self._observer.stop()
            if join:
                self._observer.join(timeout=5)
