"""The commit pointer's format: its entries and manifests, their JSON, and the checks on
everything read back from the bucket.

A rank's pointer, ``{prefix}/rank_{r}/latest.json``::

    {"format": "ckpt-uploader/pointer/2", "rank": 0,
     "latest": {"name": "checkpoint-16", "rule": "hf", "object": "run1/rank_0/checkpoint-16",
                "size": 123, "digest": "sha256:...", "mtime_ns": ..., "committed_at": ...,
                "files": [{"path": "checkpoint-16/model.safetensors", "size": 100,
                           "digest": "sha256:..."}, ...]},
     "history": [ ...the same entries, newest first, at most 64... ],
     "aliases": {"last.ckpt": "epoch=2-step=24.ckpt"}}

A checkpoint is a single file or a directory (see :mod:`uploader.daemon.layouts` for
the rules that recognise them). ``name`` is its path inside the rank directory, the
same for every rank, so ``latest`` across ranks is the newest name that every rank
has committed. ``files`` is the manifest: every file's path (inside the rank
directory), size and sha256; a single-file checkpoint's manifest is that file. A
directory's ``digest`` is the sha256 of its manifest (:func:`manifest_digest`).
Entries are ordered by the checkpoint's mtime (its newest file's; then name).
``aliases`` names checkpoints by another name (Lightning's ``last.ckpt`` symlink).

A manifest larger than :data:`INLINE_MANIFEST_BYTES` of JSON (a directory of more than
some 500 files) is not held in the pointer: it is an object of its own, written before
the pointer (:mod:`uploader.bucket.manifest`), and the entry names it instead of
``files``::

     "manifest": {"object": "run1/rank_0/.ckpt-uploader/manifests/checkpoint-16.<16 hex>.json",
                  "size": 1234567, "digest": "sha256:<of the object's bytes>", "files": 10000}

Format versions: 1 (one file per entry, no manifest, no aliases), 2 (manifests inline),
3 (some entry names a manifest object; written only then, so a pointer without one
stays readable by versions that know format 2), 4 (some entry's files are stored as
chunks, ``--dedup``: its manifest object, ``"chunked": true``, lists each file's chunks;
see :mod:`uploader.bucket.manifest`). All three resolve: an entry without
``files`` or ``manifest`` is a single-file checkpoint. A pointer of a newer format is
refused with a message saying to upgrade, never parsed as if it were an older one.

Everything read back from the bucket is checked before it is trusted: a pointer is read
with a size bound (:data:`MAX_POINTER_BYTES`); every name and manifest path must be a
plain relative path (no ``..``, ``.``, empty part, leading ``/``, backslash or NUL; at
most :data:`MAX_NAME_BYTES` a part and :data:`MAX_PATH_BYTES` in all); and a
directory's manifest lies inside the checkpoint and a file's names only the file.
Where the entries' objects must be is checked when ``latest`` is resolved
(:func:`uploader.bucket.latest.check_location`).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from uploader.config.hparams import join_key
from uploader.errors import IntegrityError, ObjectNotFoundError, UploaderError
from uploader.transfer.chunks import Chunk

if TYPE_CHECKING:  # pragma: no cover
    from uploader.transfer.store import ObjectStore

__all__ = [
    "FORMAT",
    "FORMATS",
    "FILE_RULE",
    "POINTER_FILE",
    "HISTORY_LIMIT",
    "MAX_POINTER_BYTES",
    "MAX_NAME_BYTES",
    "MAX_PATH_BYTES",
    "FORMAT_INLINE",
    "FORMAT_CHUNKED",
    "INLINE_MANIFEST_BYTES",
    "MANIFEST_DIR",
    "ManifestFile",
    "ManifestRef",
    "PointerEntry",
    "check_manifest",
    "manifest_object",
    "Pointer",
    "manifest_digest",
    "pointer_name",
    "read_pointer",
    "read_pointer_versioned",
    "write_pointer",
]

FORMAT_PREFIX = "ckpt-uploader/pointer/"
#: Written when no entry names a manifest object (readable by every version since 2).
FORMAT_INLINE = FORMAT_PREFIX + "2"
#: Written when some entry names a manifest object instead of holding its files.
FORMAT = FORMAT_PREFIX + "3"
#: Written when some entry's files are stored as chunks (its manifest is an object).
FORMAT_CHUNKED = FORMAT_PREFIX + "4"
#: Formats read (1: one file per entry, before checkpoints had manifests).
FORMATS = (FORMAT_PREFIX + "1", FORMAT_INLINE, FORMAT, FORMAT_CHUNKED)
#: The rule of a single-file checkpoint (and of every format-1 entry).
FILE_RULE = "file"
POINTER_FILE = "latest.json"
HISTORY_LIMIT = 64
#: The most bytes read of a pointer: 64 entries of manifests of thousands of files fit.
MAX_POINTER_BYTES = 64 << 20
#: The most bytes of JSON a manifest may take inside the pointer (about 500 files); a
#: larger one is an object of its own. 64 entries of this size keep a pointer, which
#: every commit and every restore reads whole, at most 4 MiB.
INLINE_MANIFEST_BYTES = 64 << 10
#: Where a rank's manifest objects live, inside its rank directory (``.ckpt-uploader``
#: names are never uploaded from a run directory, so no checkpoint file lands there).
MANIFEST_DIR = ".ckpt-uploader/manifests"
#: The longest part of a name (the file systems' NAME_MAX), and the longest name, in bytes.
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 1024


def _safe_path(path: str, where: str) -> str:
    """``path`` when it is a plain relative '/'-path (no '..', '.', empty part, NUL)."""
    parts = path.split("/")
    if (
        not path
        or path.startswith("/")
        or "\\" in path
        or "\0" in path
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise ValueError(f"{where} path {path!r} is not a plain relative path")
    longest = max(len(p.encode("utf-8", "surrogatepass")) for p in parts)
    if longest > MAX_NAME_BYTES or len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise ValueError(
            f"{where} path {path[:60]!r}... is too long (a part of {longest} bytes; at most "
            f"{MAX_NAME_BYTES} a part and {MAX_PATH_BYTES} in all)"
        )
    return path


@dataclass(frozen=True)
class ManifestFile:
    """One file of a checkpoint: its path inside the rank directory, size and digest;
    ``chunks`` when it is stored as chunks (``--dedup``), in order."""

    path: str
    size: int
    digest: str
    chunks: tuple[Chunk, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": self.path, "size": self.size, "digest": self.digest}
        if self.chunks:
            d["chunks"] = [c.to_json() for c in self.chunks]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ManifestFile:
        f = cls(_safe_path(str(d["path"]), "manifest"), int(d["size"]), str(d["digest"]))
        if "chunks" not in d:
            return f
        chunks = tuple(Chunk.from_json(c) for c in d["chunks"])
        if sum(c.size for c in chunks) != f.size:
            raise ValueError(
                f"the chunks of {f.path!r} add up to {sum(c.size for c in chunks)} bytes, "
                f"not its {f.size}"
            )
        return replace(f, chunks=chunks)


def manifest_digest(files: Iterable[ManifestFile]) -> str:
    """The sha256 of a manifest (sorted by path): a directory checkpoint's identity."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.path):
        h.update(f"{f.path}\0{f.size}\0{f.digest}\n".encode())
    return "sha256:" + h.hexdigest()


def check_manifest(name: str, rule: str, files: Iterable[ManifestFile]) -> None:
    """ValueError unless every file of the manifest lies inside checkpoint ``name`` (a
    single file's manifest names only the file)."""
    for f in files:
        inside = f.path.startswith(name + "/") if rule != FILE_RULE else f.path == name
        if not inside:
            raise ValueError(f"manifest path {f.path!r} is not inside checkpoint {name!r}")


def manifest_object(entry_object: str, name: str, digest: str) -> str:
    """The manifest object of checkpoint ``name`` whose files are under ``entry_object``
    (``{prefix}/rank_N/{name}``), for the manifest with sha256 ``digest``:
    ``{prefix}/rank_N/.ckpt-uploader/manifests/{name}.{16 hex}.json``. The digest in the
    name means a checkpoint committed again with other files never overwrites a manifest
    that a pointer may still name."""
    rank_dir = entry_object[: len(entry_object) - len(name)]
    return f"{rank_dir}{MANIFEST_DIR}/{name}.{digest.removeprefix('sha256:')[:16]}.json"


_SHA256 = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass(frozen=True)
class ManifestRef:
    """A manifest stored as an object of its own: its name, its size in bytes, the
    sha256 of those bytes (``sha256:<hex>``), how many files it lists, and whether they
    are stored as chunks (``--dedup``); ``stored`` is then the bytes of the chunks this
    checkpoint added to its scope (compressed), for ``ls``."""

    object: str
    size: int
    digest: str
    files: int
    chunked: bool = False
    stored: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "object": self.object,
            "size": self.size,
            "digest": self.digest,
            "files": self.files,
        }
        if self.chunked:
            d["chunked"] = True
            if self.stored is not None:
                d["stored"] = self.stored
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ManifestRef:
        chunked = d.get("chunked", False)
        stored = d.get("stored")
        if chunked not in (True, False) or not (stored is None or isinstance(stored, int)):
            raise ValueError(f"manifest reference {d!r} is malformed")
        ref = cls(
            _safe_path(str(d["object"]), "manifest object"),
            int(d["size"]),
            str(d["digest"]),
            int(d["files"]),
            bool(chunked),
            stored,
        )
        if not _SHA256.match(ref.digest) or ref.size < 1 or ref.files < 1:
            raise ValueError(f"manifest reference {d!r} is malformed")
        return ref


@dataclass(frozen=True)
class PointerEntry:
    """One committed checkpoint.

    ``object`` is the file's object, or for a directory the object prefix its files
    are under (``{prefix}/rank_N/{name}``); ``size`` the bytes of every file;
    ``digest`` the file's, or :func:`manifest_digest` for a directory; ``rule`` the
    layout rule that recognised it; ``files`` the manifest (empty: the one file).

    ``manifest_ref`` names the manifest object of a large manifest, or of a chunked
    checkpoint (:mod:`uploader.bucket.manifest`). An entry read from the bucket then has
    no ``files`` until :func:`uploader.bucket.manifest.load_manifest` reads them (the
    committing process keeps them); ``manifest`` and ``objects`` refuse to guess.
    ``scope`` is the bucket prefix a chunked checkpoint's chunks are under (set by the
    committing process, and by ``load_manifest``); ``stored`` the bytes its chunks added
    to the scope (the committing process's count, kept in its manifest reference).
    """

    name: str
    object: str
    size: int
    digest: str
    mtime_ns: int
    committed_at: float = field(default_factory=time.time)
    rule: str = FILE_RULE
    files: tuple[ManifestFile, ...] = ()
    manifest_ref: ManifestRef | None = None
    scope: str | None = None
    stored: int | None = None

    @property
    def chunked(self) -> bool:
        """Whether its files are stored as chunks (restored with their manifest)."""
        if self.manifest_ref is not None:
            return self.manifest_ref.chunked
        return any(f.chunks for f in self.files)

    @property
    def order(self) -> tuple[int, str]:
        return (self.mtime_ns, self.name)

    @property
    def is_directory(self) -> bool:
        return self.rule != FILE_RULE

    @property
    def manifest_loaded(self) -> bool:
        """Whether :attr:`manifest` is at hand (False: a manifest object not read yet)."""
        return self.manifest_ref is None or bool(self.files)

    @property
    def file_count(self) -> int:
        """How many files the checkpoint has (known without reading a manifest object)."""
        if self.manifest_ref is not None:
            return self.manifest_ref.files
        return len(self.files) or 1

    @property
    def manifest(self) -> tuple[ManifestFile, ...]:
        """Every file of the checkpoint (a single file's entry: that file)."""
        if not self.manifest_loaded:
            raise UploaderError(
                f"checkpoint {self.name!r}: its manifest is the object "
                f"{self.manifest_ref and self.manifest_ref.object!r}, not read yet; read it "
                "with uploader.bucket.manifest.load_manifest first"
            )
        return self.files or (ManifestFile(self.name, self.size, self.digest),)

    def objects(self) -> Iterator[tuple[ManifestFile, str]]:
        """Each manifest file with its object name."""
        if not self.is_directory:
            for f in self.manifest:
                yield f, self.object
            return
        for f in self.manifest:
            yield f, self.object + "/" + f.path[len(self.name) + 1 :]

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "object": self.object,
            "size": self.size,
            "digest": self.digest,
            "mtime_ns": self.mtime_ns,
            "committed_at": self.committed_at,
            "rule": self.rule,
        }
        if self.manifest_ref is not None:
            d["manifest"] = self.manifest_ref.to_dict()
        elif self.files:
            d["files"] = [f.to_dict() for f in self.files]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PointerEntry:
        name = _safe_path(str(d["name"]), "checkpoint")
        rule = str(d.get("rule") or FILE_RULE)
        files = tuple(ManifestFile.from_dict(f) for f in d.get("files") or ())
        check_manifest(name, rule, files)
        obj = str(d["object"])
        ref = None
        if d.get("manifest") is not None:
            ref = ManifestRef.from_dict(d["manifest"])
            if files or (rule == FILE_RULE and not ref.chunked):
                raise ValueError(f"entry {name!r} names a manifest object and is not a directory")
            if ref.object != manifest_object(obj, name, ref.digest):
                raise ValueError(
                    f"manifest object {ref.object!r} of {name!r} is not where its checkpoint is"
                )
        return cls(
            name,
            obj,
            int(d["size"]),
            str(d["digest"]),
            int(d["mtime_ns"]),
            float(d.get("committed_at", 0.0)),
            rule,
            files,
            ref,
        )


@dataclass(frozen=True)
class Pointer:
    rank: int
    latest: PointerEntry
    history: tuple[PointerEntry, ...]
    #: Other names of committed checkpoints: alias -> checkpoint name.
    aliases: Mapping[str, str] = field(default_factory=dict)

    def entry(self, name: str) -> PointerEntry | None:
        """The committed checkpoint ``name`` (or the one the alias ``name`` stands for)."""
        name = self.aliases.get(name, name)
        for e in self.history:
            if e.name == name:
                return e
        return self.latest if self.latest.name == name else None

    def without(self, names: Collection[str]) -> Pointer:
        """This pointer with the entries ``names`` (and aliases to them) removed; never
        ``latest``."""
        gone = set(names) - {self.latest.name}
        return replace(
            self,
            history=tuple(e for e in self.history if e.name not in gone),
            aliases={a: t for a, t in self.aliases.items() if t not in gone},
        )

    def to_json(self) -> bytes:
        refs = [e.manifest_ref for e in (self.latest, *self.history) if e.manifest_ref]
        fmt = FORMAT_CHUNKED if any(r.chunked for r in refs) else FORMAT if refs else FORMAT_INLINE
        body: dict[str, Any] = {
            "format": fmt,
            "rank": self.rank,
            "latest": self.latest.to_dict(),
            "history": [e.to_dict() for e in self.history],
        }
        if self.aliases:
            body["aliases"] = dict(sorted(self.aliases.items()))
        return json.dumps(body, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Pointer:
        try:
            d = json.loads(data)
            _refuse_newer(d.get("format") if isinstance(d, dict) else None, where)
            if d.get("format") not in FORMATS:
                raise ValueError(f"unknown format {d.get('format')!r}")
            latest = PointerEntry.from_dict(d["latest"])
            history = tuple(PointerEntry.from_dict(e) for e in d.get("history", []))
            aliases = {
                _safe_path(str(a), "alias"): _safe_path(str(t), "alias target")
                for a, t in (d.get("aliases") or {}).items()
            }
            return cls(int(d["rank"]), latest, history or (latest,), aliases)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise IntegrityError(
                f"commit pointer {where} is unreadable ({exc}); it was not "
                "written by ckpt-uploader or is damaged: restore it by running "
                "'ckpt-uploader push' on the run directory"
            ) from None


def pointer_name(prefix: str, rank: int) -> str:
    return join_key(prefix, f"rank_{rank}/{POINTER_FILE}")


def read_pointer(store: ObjectStore, prefix: str, rank: int) -> Pointer | None:
    name = pointer_name(prefix, rank)
    try:
        data = store.get_bytes(name, max_size=MAX_POINTER_BYTES)
    except ObjectNotFoundError:
        return None
    return Pointer.from_json(data, name)


def read_pointer_versioned(
    store: ObjectStore, prefix: str, rank: int
) -> tuple[Pointer | None, str | None]:
    """The rank's pointer (None when absent) and the version to write it back with."""
    name = pointer_name(prefix, rank)
    try:
        data, version = store.get_versioned(name, max_size=MAX_POINTER_BYTES)
    except ObjectNotFoundError:
        return None, None
    return Pointer.from_json(data, name), version


POINTER_META = {"content-type": "application/json"}


def write_pointer(store: ObjectStore, prefix: str, pointer: Pointer) -> None:
    """PUT ``pointer`` as its rank's ``latest.json`` (atomic on every store; not
    fenced: see :func:`update_pointer`)."""
    store.put_bytes(pointer_name(prefix, pointer.rank), pointer.to_json(), POINTER_META)


def _refuse_newer(fmt: object, where: str) -> None:
    """IntegrityError naming the upgrade when ``fmt`` is a pointer format newer than
    this version reads (an older version's own check says "unknown format")."""
    if not isinstance(fmt, str) or not fmt.startswith(FORMAT_PREFIX) or fmt in FORMATS:
        return
    version = fmt[len(FORMAT_PREFIX) :]
    newest = FORMATS[-1][len(FORMAT_PREFIX) :]
    if version.isdigit() and int(version) > int(newest):
        raise IntegrityError(
            f"commit pointer {where} is of format {version}, written by a newer "
            f"ckpt-uploader; this version reads formats up to {newest}: "
            "upgrade ckpt-uploader here to read it (do not rewrite it with this version)"
        )
