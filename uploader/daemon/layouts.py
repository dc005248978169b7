"""Which files of a run directory are uploaded, which are checkpoints, and where they go.

* :data:`CHECKPOINT_PATTERNS` is the one list of checkpoint file names (the torch
  side derives its file suffixes from it).
* :class:`RunLayout` maps a path under RUN_DIR to its rank, its name inside the
  rank directory and its object name (``{prefix}/rank_N/{name}``).
* :class:`FileFilter` decides which names are considered at all (hidden and
  temporary names, the journal, include/exclude patterns) and which move the
  commit pointer.
* :func:`scan` lists the accepted files present; :func:`is_inside` stats one.
  Symlinks are never followed: a symlink is ignored, and a path whose real
  location is outside RUN_DIR is never read.

Example::

    layout = RunLayout(Path("runs/1"), prefix="exp1", default_rank=0)
    filt = FileFilter()
    for path in scan(layout.root, filt):
        print(layout.locate(path))
"""

from __future__ import annotations

import fnmatch
import os
import re
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from uploader.config.hparams import join_key
from uploader.daemon.journal import STATE_NAMES

__all__ = [
    "CHECKPOINT_PATTERNS",
    "IGNORED_SUFFIXES",
    "FileFilter",
    "RunLayout",
    "Location",
    "scan",
    "is_inside",
]

#: Checkpoint file names: uploaded and moving the commit pointer by default.
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
