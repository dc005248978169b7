"""Which files of a run directory are uploaded, which form one checkpoint, and where they go.

The one place for layout rules:

* :class:`FileFilter` decides which files are uploaded at all: everything in the run
  directory except the uploader's own files and temporary names (``*.tmp``,
  ``.*.tmp``, ``*.part``, ``*~``, ``*.swp``, lock files), narrowed by ``--include`` /
  ``--exclude``. A dot file is not temporary by itself (DCP's ``.metadata``). Every
  file left out has a reason (:meth:`FileFilter.exclusion`), shown in ``status``.
* :class:`Checkpoints` decides which files form one checkpoint and when it is complete:

  - a *directory checkpoint* is a directory that a :class:`DirRule` recognises: torch
    DCP (a directory holding ``.metadata``, which DCP writes last; Composer's sharded
    checkpoints are DCP directories), the Hugging Face Trainer (``checkpoint-N/``,
    complete once ``trainer_state.json``, written last, exists), DeepSpeed
    (``global_stepN/``, complete once the ``latest`` tag file beside it names it), and
    the user's ``--checkpoint-dir GLOB=MARKER`` rules. It is complete once its marker
    says so and every file in it is settled and verified;
  - a *single-file checkpoint* is a file outside any directory checkpoint whose name
    matches :data:`CHECKPOINT_PATTERNS` (``*.pt``, ``*.ckpt``, ``*.safetensors``, ...);
    complete once settled;
  - everything else is an *artifact* (logs, configs, metrics): uploaded, again when
    it changes (at most every ``--artifact-interval``), never committed.

* :class:`RunLayout` maps a path under RUN_DIR to its rank, its name inside the rank
  directory and its object name (``{prefix}/rank_N/{name}``). Rules apply to names
  inside the rank directory.
* :func:`scan` lists the accepted files present; :func:`is_inside` stats one.
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
from uploader.daemon.journal import STATE_NAMES
from uploader.errors import ConfigError

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
    "is_inside",
    "alias_target",
]

#: Single-file checkpoint names (outside any directory checkpoint): committed once
#: settled and verified. The torch side derives its file suffixes from these.
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
    "*.ckpt",
    "*.pth",
    "*.safetensors",
    "*.bin",
)
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
#: DeepSpeed's tag file: names the newest complete ``global_stepN`` directory.
DEEPSPEED_TAG = "latest"


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
class DirRule:
    """A kind of directory checkpoint.

    Args:
        name: shown in the pointer (``rule``) and in logs: ``dcp``, ``hf``, ``deepspeed``,
            or ``dir:GLOB`` for a user rule.
        glob: the directory's name (or its path inside the rank directory, when the glob
            holds a ``/``).
        marker: the file whose presence makes the directory complete (``latest`` for
            DeepSpeed: the tag file beside the directory, naming it).
        named: a directory matching ``glob`` is a checkpoint directory even before its
            marker exists (its files are never single-file checkpoints).
    """

    name: str
    glob: str
    marker: str
    named: bool = True

    def matches(self, dirname: str) -> bool:
        return _matches(dirname, (self.glob,))

    def complete(self, rank_root: Path, dirname: str) -> bool:
        """Whether the directory ``dirname`` (inside ``rank_root``) has its marker."""
        if self.name == "deepspeed":
            parent, _, base = dirname.rpartition("/")
            tag = rank_root / parent / DEEPSPEED_TAG if parent else rank_root / DEEPSPEED_TAG
            try:
                return tag.read_text(errors="replace").strip() == base
            except OSError:
                return False
        return is_inside(rank_root, f"{dirname}/{self.marker}") is not None


DEFAULT_DIR_RULES: tuple[DirRule, ...] = (
    DirRule("hf", "checkpoint-*", "trainer_state.json"),
    DirRule("deepspeed", "global_step*", DEEPSPEED_TAG),
    DirRule("dcp", "*", ".metadata", named=False),
)


def parse_dir_rule(text: str) -> DirRule:
    """A user rule from ``GLOB=MARKER`` (``--checkpoint-dir``); ConfigError when malformed."""
    glob, sep, marker = text.partition("=")
    glob, marker = glob.strip().strip("/"), marker.strip()
    if not sep or not glob or not marker:
        raise ConfigError(
            f"--checkpoint-dir {text!r} is not GLOB=MARKER; e.g. 'step_*=COMMITTED' makes "
            "every directory named step_* a checkpoint, complete once it holds COMMITTED"
        )
    if "/" in marker or marker in (".", ".."):
        raise ConfigError(
            f"--checkpoint-dir {text!r}: MARKER must be a file name inside the directory, "
            f"not a path ({marker!r})"
        )
    if any(p in ("", ".", "..") for p in glob.split("/")):
        raise ConfigError(f"--checkpoint-dir {text!r}: GLOB must be a relative path pattern")
    return DirRule(f"dir:{glob}", glob, marker)


@dataclass(frozen=True)
class Unit:
    """The checkpoint a file belongs to: ``name`` (inside the rank directory) and the
    rule that recognised it (``file`` for a single-file checkpoint)."""

    name: str
    rule: str
    directory: bool


@dataclass(frozen=True)
class Checkpoints:
    """Which files form one checkpoint, and when a directory checkpoint is complete.

    Args:
        single: names of single-file checkpoints (outside any directory checkpoint).
        rules: directory rules, the user's first: the first that matches wins.
    """

    single: tuple[str, ...] = CHECKPOINT_PATTERNS
    rules: tuple[DirRule, ...] = DEFAULT_DIR_RULES

    def rule(self, name: str) -> DirRule | None:
        for r in self.rules:
            if r.name == name:
                return r
        return None

    def unit(self, rank_root: Path, name: str) -> Unit | None:
        """The checkpoint the file ``name`` (inside ``rank_root``) belongs to, or None for
        an artifact. The nearest enclosing directory a rule recognises wins (a named
        directory at once; a marker rule once its marker exists)."""
        parts = name.split("/")
        for depth in range(len(parts) - 1, 0, -1):
            dirname = "/".join(parts[:depth])
            for r in self.rules:
                if r.matches(dirname) and (r.named or r.complete(rank_root, dirname)):
                    return Unit(dirname, r.name, True)
        if _matches(name, self.single):
            return Unit(name, "file", False)
        return None

    def complete(self, rank_root: Path, unit: Unit) -> bool:
        """A directory checkpoint's marker says it is complete (single files: always)."""
        if not unit.directory:
            return True
        r = self.rule(unit.rule)
        return r is not None and r.complete(rank_root, unit.name)

    def is_marker(self, unit: Unit, name: str) -> bool:
        """Whether ``name`` is the marker file of the directory checkpoint ``unit``."""
        r = self.rule(unit.rule) if unit.directory else None
        return r is not None and r.name != "deepspeed" and name == f"{unit.name}/{r.marker}"


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
    top = root / sub if sub else root
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        base = os.path.relpath(dirpath, root).replace(os.sep, "/")
        kept = []
        for d in sorted(dirnames):
            rel = d if base == "." else f"{base}/{d}"
            why = filt.skipped_dir(d)
            if why is None and os.path.islink(root / rel):
                why = "symlink to a directory (not followed)"
            if why is None:
                kept.append(d)
            elif why and left_out is not None:
                left_out[rel + "/"] = why
        dirnames[:] = kept
        for fn in sorted(filenames):
            rel = fn if base == "." else f"{base}/{fn}"
            why = filt.exclusion(rel)
            if why is not None:
                if why and left_out is not None:
                    left_out[rel] = why
                continue
            if is_inside(root, rel) is not None:
                yield rel
            elif os.path.islink(root / rel):
                if links is not None:
                    links.append(rel)
            elif left_out is not None and os.path.lexists(root / rel):
                left_out[rel] = "not a regular file"
