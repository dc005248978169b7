"""Which files of a run directory are uploaded, which form one checkpoint, and where they go.

The one place for layout rules:

* :class:`FileFilter` decides which files are uploaded at all: everything in the run
  directory except the uploader's own files and temporary names (``*.tmp``,
  ``.*.tmp``, ``*.part``, ``*~``, ``*.swp``, lock files), narrowed by ``--include`` /
  ``--exclude``. A dot file is not temporary by itself (DCP's ``.metadata``). Every
  file left out has a reason (:meth:`FileFilter.exclusion`), shown in ``status``.
* which files form one checkpoint, and when it is complete, is
  :mod:`uploader.daemon.checkpoints` (its names are re-exported here); every file in no
  checkpoint is an *artifact* (logs, configs, metrics): uploaded, again when it
  changes (at most every ``--artifact-interval``), never committed.
* :class:`RunLayout` maps a path under RUN_DIR to its rank, its name inside the rank
  directory and its object name (``{prefix}/rank_N/{name}``). Rules apply to names
  inside the rank directory.
* :func:`scan` lists the accepted files present (:func:`scan_stat` with their stat,
  one pass); :func:`is_inside` stats one.
  Symlinks are never followed: a path whose real location is outside RUN_DIR is never
  read; a symlink to a file inside RUN_DIR is an alias (:func:`alias_target`).

Example::

    layout = RunLayout(Path("runs/1"), prefix="exp1", default_rank=0)
    filt, rules = FileFilter(), Checkpoints()
    for rel in scan(layout.root, filt):
        loc = layout.locate(rel)
        print(loc.object, rules.unit(layout.rank_root(loc), loc.name))
"""

from __future__ import annotations

import fnmatch
import os
import re
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from uploader.config.hparams import join_key
from uploader.daemon.checkpoints import (
    CHECKPOINT_PATTERNS,
    DEEPSPEED_TAG,
    DEFAULT_DIR_RULES,
    Checkpoints,
    DirRule,
    Unit,
    parse_dir_rule,
)
from uploader.daemon.journal import STATE_NAMES

__all__ = [
    "CHECKPOINT_PATTERNS",
    "TEMPORARY_PATTERNS",
    "OWN_PREFIX",
    "DirRule",
    "DEFAULT_DIR_RULES",
    "parse_dir_rule",
    "Unit",
    "Checkpoints",
    "FileFilter",
    "RunLayout",
    "Location",
    "scan",
    "scan_stat",
    "DEEPSPEED_TAG",
    "is_inside",
    "alias_target",
]

#: Names being written or held by an editor or a lock: never uploaded (shown in status).
TEMPORARY_PATTERNS: tuple[str, ...] = (
    "*.tmp",
    ".*.tmp",
    "*.part",
    "*~",
    "*.swp",
    "*.lock",
    ".~lock.*",
)
#: The uploader's own files (journal, lock, status, log) start with this: never
#: uploaded and not listed as left out.
OWN_PREFIX = ".ckpt-uploader"
_RANK_DIR = re.compile(r"^rank_(\d+)$")


def _matches(rel: str, patterns: Sequence[str]) -> bool:
    base = rel.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(rel if "/" in p else base, p) for p in patterns)


def _first(rel: str, patterns: Sequence[str]) -> str | None:
    base = rel.rsplit("/", 1)[-1]
    for p in patterns:
        if fnmatch.fnmatchcase(rel if "/" in p else base, p):
            return p
    return None


@dataclass(frozen=True)
class FileFilter:
    """Which files are uploaded; why each one left out is.

    Args:
        include: glob patterns (on the base name, or on the relative path when the
            pattern holds a ``/``); default: every file.
        exclude: patterns that win over ``include``.
        own: paths (relative to RUN_DIR) of the uploader's own files, such as a status
            file given inside RUN_DIR: never uploaded, not listed.
    """

    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    own: frozenset[str] = field(default_factory=frozenset)

    @staticmethod
    def own_part(part: str) -> bool:
        # ".ckpt-uploader*" and its temporary names ("..ckpt-uploader.status.json.1.tmp")
        return part in STATE_NAMES or (
            part.startswith(".") and part.lstrip(".").startswith(OWN_PREFIX[1:])
        )

    def skipped_dir(self, part: str) -> str | None:
        """Why a directory named ``part`` is not entered (None: it is)."""
        if self.own_part(part):
            return ""
        p = _first(part, TEMPORARY_PATTERNS)
        return f"temporary name ({p})" if p else None

    def exclusion(self, rel: str) -> str | None:
        """Why the file at ``rel`` (relative to RUN_DIR, '/'-separated) is not uploaded:
        None when it is; "" for the uploader's own files (never listed)."""
        if rel in self.own:
            return ""
        parts = rel.split("/")
        for part in parts[:-1]:
            why = self.skipped_dir(part)
            if why is not None:
                return why
        if self.own_part(parts[-1]):
            return ""
        p = _first(parts[-1], TEMPORARY_PATTERNS)
        if p:
            return f"temporary name ({p})"
        if not _matches(rel, self.include):
            return "not matched by --include " + " ".join(self.include)
        p = _first(rel, self.exclude)
        if p:
            return f"excluded by --exclude {p}"
        return None

    def accepts(self, rel: str) -> bool:
        """Whether the file at ``rel`` (relative to RUN_DIR, '/'-separated) is uploaded."""
        return self.exclusion(rel) is None


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

    def rank_root(self, loc: Location) -> Path:
        """The directory that ``loc.name`` is relative to."""
        if loc.rel == loc.name:
            return self.root
        return self.root / loc.rel[: len(loc.rel) - len(loc.name) - 1]


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


def alias_target(root: Path, rel: str) -> str | None:
    """For a symlink at ``rel``: the path (relative to ``root``) of the regular file it
    leads to when that file is inside ``root``, else None."""
    path = root / rel
    real = os.path.realpath(path)
    if not real.startswith(str(root) + os.sep):
        return None
    target = real[len(str(root)) + 1 :].replace(os.sep, "/")
    return target if is_inside(root, target) is not None else None


def scan(
    root: Path,
    filt: FileFilter,
    sub: str = "",
    left_out: dict[str, str] | None = None,
    links: list[str] | None = None,
) -> Iterator[str]:
    """Relative paths of accepted regular files under ``root`` (or its subfolder ``sub``).

    Symlinked directories are not entered; symlinks are not followed. ``left_out``
    receives every file not uploaded, with the reason (the uploader's own files
    aside); ``links`` the symlinks to files (the caller decides: alias or not).
    """
    for rel, _ in scan_stat(root, filt, sub, left_out, links):
        yield rel


def scan_stat(
    root: Path,
    filt: FileFilter,
    sub: str = "",
    left_out: dict[str, str] | None = None,
    links: list[str] | None = None,
) -> Iterator[tuple[str, os.stat_result]]:
    """As :func:`scan`, with each file's ``lstat``: one directory read and one stat per
    file (a directory checkpoint of many files is judged in linear time).

    Every directory entered is a real directory reached from ``root`` without a
    symlink (``root`` is a real path, symlinked directories are not entered), so a
    regular file found here is really inside ``root``, as :func:`is_inside` checks.
    """
    top = root / sub if sub else root
    base0 = sub.strip("/")
    if sub:
        try:
            if not stat.S_ISDIR(os.lstat(top).st_mode):
                return
        except OSError:
            return
    stack = [(str(top), base0)]
    while stack:
        path, base = stack.pop()
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue
        subdirs = []
        for e in entries:
            rel = f"{base}/{e.name}" if base else e.name
            try:
                is_dir = e.is_dir(follow_symlinks=False)
                is_link = not is_dir and e.is_symlink()
            except OSError:
                continue
            if is_dir:
                why = filt.skipped_dir(e.name)
                if why is None:
                    subdirs.append((e.path, rel))
                elif why and left_out is not None:
                    left_out[rel + "/"] = why
                continue
            if is_link and os.path.isdir(e.path):
                why = filt.skipped_dir(e.name)
                if why is None:
                    why = "symlink to a directory (not followed)"
                if why and left_out is not None:
                    left_out[rel + "/"] = why
                continue
            why = filt.exclusion(rel)
            if why is not None:
                if why and left_out is not None:
                    left_out[rel] = why
                continue
            if is_link:
                if links is not None:
                    links.append(rel)
                continue
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                yield rel, st
            elif left_out is not None:
                left_out[rel] = "not a regular file"
        stack.extend(reversed(subdirs))
