"""Commit pointers: which checkpoints of a rank are safely in the bucket, with manifests.

After every file of a checkpoint is uploaded and verified, the daemon writes
``{prefix}/rank_{r}/latest.json``::

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
Entries are ordered by the checkpoint's mtime (its newest file's; then name): a late
upload of an older checkpoint joins the history but never moves ``latest`` back.
``aliases`` names checkpoints by another name (Lightning's ``last.ckpt`` symlink).

Pointers of format 1 (one file per entry, no manifest, no aliases) still resolve: an
entry without ``files`` is a single-file checkpoint.

Everything read back from the bucket is checked before it is trusted: a pointer is read
with a size bound (:data:`MAX_POINTER_BYTES`); every name and manifest path must be a
plain relative path (no ``..``, ``.``, empty part, leading ``/``, backslash or NUL; at
most :data:`MAX_NAME_BYTES` a part and :data:`MAX_PATH_BYTES` in all); a directory's
manifest lies inside the checkpoint and a file's names only the file; and
:func:`resolve_latest` takes an entry only if its objects are where its rank's pointer
is (``{prefix}/rank_N/{name}``).

Resolving ``latest`` reads one pointer per rank (W GETs). When W ranks restore at
once, each resolving it alone would make W x W GETs; :func:`select_latest` takes a
``share`` function instead (:data:`Share`) that resolves once and hands the result
to every rank (``ckpt.share_from_rank_zero`` does it with a torch.distributed
broadcast), so a restart costs O(W) requests in total.

Writes are compare-and-swap where the store honours conditions
(:func:`fencing`): :func:`update_pointer` writes the merged pointer only while the
object still has the version it was merged from (S3/Azure ETag, GCS generation,
LOCAL under an exclusive lock); when another writer got there first (a second
uploader on the same rank, e.g. a rescheduled job while the old one drains) it
reads again, merges again and retries, a bounded number of times with jitter. So
``latest`` never moves back and no committed entry is lost, across processes.
Where the store ignores conditions, the write is a plain PUT (atomic on every
store) and those guarantees hold within one process only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

from uploader.config.hparams import join_key, listing_prefix
from uploader.errors import (
    IntegrityError,
    ObjectNotFoundError,
    PreconditionFailedError,
    UploaderError,
)

if TYPE_CHECKING:  # pragma: no cover
    from uploader.transfer.store import ObjectStore

__all__ = [
    "ManifestFile",
    "PointerEntry",
    "manifest_digest",
    "Pointer",
    "pointer_name",
    "read_pointer",
    "commit",
    "merge",
    "alias",
    "beyond",
    "write_pointer",
    "read_pointer_versioned",
    "update_pointer",
    "PointerUpdate",
    "fencing",
    "CONFLICT_ATTEMPTS",
    "resolve_latest",
    "LatestSelection",
    "Share",
    "latest_prefix",
    "select_latest",
    "list_ranks",
    "POINTER_FILE",
    "HISTORY_LIMIT",
    "MAX_POINTER_BYTES",
    "MAX_NAME_BYTES",
    "check_location",
]

log = logging.getLogger(__name__)

FORMAT = "ckpt-uploader/pointer/2"
#: Formats read (1: one file per entry, before checkpoints had manifests).
FORMATS = ("ckpt-uploader/pointer/1", FORMAT)
#: The rule of a single-file checkpoint (and of every format-1 entry).
FILE_RULE = "file"
POINTER_FILE = "latest.json"
HISTORY_LIMIT = 64
#: The most bytes read of a pointer: 64 entries of manifests of thousands of files fit.
MAX_POINTER_BYTES = 64 << 20
#: The longest part of a name (the file systems' NAME_MAX), and the longest name, in bytes.
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 1024
_T = TypeVar("_T")
#: Runs the function it is given on one process of a job and returns that result (or
#: raises that error) on every process that calls it: how ranks resolve ``latest`` once.
Share = Callable[[Callable[[], _T]], _T]
_RANK = re.compile(r"(?:^|/)rank_(\d+)/" + re.escape(POINTER_FILE) + "$")


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
    """One file of a checkpoint: its path inside the rank directory, size and digest."""

    path: str
    size: int
    digest: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "digest": self.digest}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ManifestFile:
        return cls(_safe_path(str(d["path"]), "manifest"), int(d["size"]), str(d["digest"]))


def manifest_digest(files: Iterable[ManifestFile]) -> str:
    """The sha256 of a manifest (sorted by path): a directory checkpoint's identity."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.path):
        h.update(f"{f.path}\0{f.size}\0{f.digest}\n".encode())
    return "sha256:" + h.hexdigest()


@dataclass(frozen=True)
class PointerEntry:
    """One committed checkpoint.

    ``object`` is the file's object, or for a directory the object prefix its files
    are under (``{prefix}/rank_N/{name}``); ``size`` the bytes of every file;
    ``digest`` the file's, or :func:`manifest_digest` for a directory; ``rule`` the
    layout rule that recognised it; ``files`` the manifest (empty: the one file).
    """

    name: str
    object: str
    size: int
    digest: str
    mtime_ns: int
    committed_at: float = field(default_factory=time.time)
    rule: str = FILE_RULE
    files: tuple[ManifestFile, ...] = ()

    @property
    def order(self) -> tuple[int, str]:
        return (self.mtime_ns, self.name)

    @property
    def is_directory(self) -> bool:
        return self.rule != FILE_RULE

    @property
    def manifest(self) -> tuple[ManifestFile, ...]:
        """Every file of the checkpoint (a single file's entry: that file)."""
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
        if self.files:
            d["files"] = [f.to_dict() for f in self.files]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PointerEntry:
        name = _safe_path(str(d["name"]), "checkpoint")
        rule = str(d.get("rule") or FILE_RULE)
        files = tuple(ManifestFile.from_dict(f) for f in d.get("files") or ())
        for f in files:
            inside = f.path.startswith(name + "/") if rule != FILE_RULE else f.path == name
            if not inside:
                raise ValueError(f"manifest path {f.path!r} is not inside checkpoint {name!r}")
        return cls(
            name,
            str(d["object"]),
            int(d["size"]),
            str(d["digest"]),
            int(d["mtime_ns"]),
            float(d.get("committed_at", 0.0)),
            rule,
            files,
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
        body: dict[str, Any] = {
            "format": FORMAT,
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


def merge(
    current: Pointer | None, rank: int, entry: PointerEntry, history_limit: int = HISTORY_LIMIT
) -> Pointer:
    """``current`` with ``entry`` added (not written): the one rule of a pointer update.

    ``entry`` replaces an entry of the same name; the history is ordered newest first
    and cut to ``history_limit``; ``latest`` never moves back to an older checkpoint.
    An alias of the same name as ``entry`` is dropped (a real checkpoint wins).
    """
    history = [e for e in (current.history if current else ()) if e.name != entry.name]
    history.append(entry)
    history.sort(key=lambda e: e.order, reverse=True)
    latest = entry
    if (
        current is not None
        and current.latest.name != entry.name
        and current.latest.order > entry.order
    ):
        latest = current.latest
    aliases = {a: t for a, t in (current.aliases if current else {}).items() if a != entry.name}
    kept = history[:history_limit]
    if latest not in kept:
        kept = [latest, *kept[: history_limit - 1]]
    names = {e.name for e in kept}
    aliases = {a: t for a, t in aliases.items() if t in names}
    return Pointer(rank, latest, tuple(kept), aliases)


def alias(current: Pointer, name: str, target: str | None) -> Pointer:
    """``current`` with ``name`` standing for the committed checkpoint ``target`` (None:
    ``name`` is no longer an alias). The target must be in the history."""
    aliases = {a: t for a, t in current.aliases.items() if a != name}
    if target is not None:
        if current.entry(target) is None:
            raise ValueError(f"alias {name!r}: {target!r} is not a committed checkpoint")
        aliases[name] = current.aliases.get(target, target)
    return replace(current, aliases=aliases)


def beyond(pointer: Pointer, keep: int) -> list[PointerEntry]:
    """The checkpoints of ``pointer`` older than its newest ``keep``; never ``latest``."""
    return [e for e in pointer.history[keep:] if e.name != pointer.latest.name]


_POINTER_META = {"content-type": "application/json"}


def write_pointer(store: ObjectStore, prefix: str, pointer: Pointer) -> None:
    """PUT ``pointer`` as its rank's ``latest.json`` (atomic on every store; not
    fenced: see :func:`update_pointer`)."""
    store.put_bytes(pointer_name(prefix, pointer.rank), pointer.to_json(), _POINTER_META)


#: Conditional writes tried per update (each after a fresh read and merge).
CONFLICT_ATTEMPTS = 16
#: Most seconds of jitter before retry number n: min(CONFLICT_PAUSE_CAP, base * 2**n).
CONFLICT_PAUSE_BASE = 0.005
CONFLICT_PAUSE_CAP = 0.25


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


@dataclass(frozen=True)
class PointerUpdate:
    """What :func:`update_pointer` left in the store: the pointer (None: none yet), its
    version (None: unknown, read before the next update), whether this update wrote
    it, and how many writes lost to another writer first."""

    pointer: Pointer | None
    version: str | None
    written: bool
    conflicts: int


def update_pointer(
    store: ObjectStore,
    prefix: str,
    rank: int,
    change: Callable[[Pointer | None], Pointer | None],
    known: tuple[Pointer | None, str | None] | None = None,
    attempts: int = CONFLICT_ATTEMPTS,
    sleep: Callable[[float], None] = time.sleep,
) -> PointerUpdate:
    """Compare-and-swap the rank's pointer to ``change(current)``.

    ``change`` must be a pure merge (e.g. by :func:`merge`): it is called again with
    the pointer another writer left whenever the conditional write loses. ``known`` is
    a (pointer, version) this process wrote or read last, tried before reading (a
    read is saved when no one else wrote since). Nothing is written when ``change``
    returns None or the current pointer. Raises PreconditionFailedError after
    ``attempts`` lost writes. Only for stores where :func:`fencing` says yes.
    """
    name = pointer_name(prefix, rank)
    conflicts = 0
    for attempt in range(1, attempts + 1):
        if known is not None and known[1] is not None:
            current, version = known
        else:
            current, version = read_pointer_versioned(store, prefix, rank)
        known = None
        new = change(current)
        if new is None or new == current:
            return PointerUpdate(current, version, False, conflicts)
        if current is not None and version is None:
            raise UploaderError(
                f"commit pointer {name}: the store reported no version for it, so it "
                "cannot be replaced conditionally; the commit is retried"
            )
        try:
            version = store.put_if(
                name, new.to_json(), version if current is not None else None, _POINTER_META
            )
            return PointerUpdate(new, version, True, conflicts)
        except PreconditionFailedError:
            conflicts += 1
            if attempt < attempts:
                sleep(random.uniform(0, min(CONFLICT_PAUSE_CAP, CONFLICT_PAUSE_BASE * 2**attempt)))
    raise PreconditionFailedError(
        f"commit pointer {name}: {attempts} conditional writes in a row lost to other "
        "writers; more than one uploader is committing this rank. Stop the extra one; "
        "the commit is retried"
    )


def fencing(store: ObjectStore, prefix: str) -> tuple[bool, str]:
    """Whether pointer writes under ``prefix`` can be compare-and-swap, and why not
    (tested once per store with a scratch object, see ``ObjectStore.conditions_honoured``)."""
    probe = join_key(prefix, f".ckpt-uploader-probe-{uuid.uuid4().hex[:12]}")
    return store.conditions_honoured(probe)


def commit(
    store: ObjectStore,
    prefix: str,
    rank: int,
    entry: PointerEntry,
    current: Pointer | None = None,
    history_limit: int = HISTORY_LIMIT,
) -> Pointer:
    """Record ``entry`` (every file already verified in the store) by :func:`merge`'s rule,
    compare-and-swap where the store allows (:func:`fencing`).

    ``current`` is the pointer as last written by this process; when None it is read.
    """
    if fencing(store, prefix)[0]:
        update = update_pointer(
            store, prefix, rank, lambda cur: merge(cur, rank, entry, history_limit)
        )
        assert update.pointer is not None
        return update.pointer
    if current is None:
        current = read_pointer(store, prefix, rank)
    pointer = merge(current, rank, entry, history_limit)
    write_pointer(store, prefix, pointer)
    return pointer


def list_ranks(store: ObjectStore, prefix: str) -> list[int]:
    """Ranks that have a pointer under ``prefix``."""
    base = listing_prefix(prefix)
    ranks = set()
    for info in store.list(base):
        rest = info.name[len(base) :]
        m = _RANK.match(rest)
        if m and rest.count("/") == 1:
            ranks.add(int(m.group(1)))
    return sorted(ranks)


def resolve_latest(
    store: ObjectStore,
    prefix: str,
    world_size: int | None = None,
    *,
    listed: Iterable[int] | None = None,
) -> dict[int, PointerEntry]:
    """The newest checkpoint every rank has committed, as rank -> entry.

    ``world_size`` says how many ranks must agree; by default, every rank that has
    a pointer (``listed``, when the caller has just listed them; else listed here).
    Raises ObjectNotFoundError (with what to do) when nothing qualifies.
    """
    ranks: Iterable[int]
    if world_size:
        ranks = range(world_size)
    else:
        ranks = list_ranks(store, prefix) if listed is None else listed
    pointers: dict[int, Pointer] = {}
    for r in ranks:
        p = read_pointer(store, prefix, r)
        if p is None:
            raise ObjectNotFoundError(
                f"rank {r} has committed no checkpoint under {prefix or '(root)'!r} yet; wait "
                "for its uploader, or load a specific checkpoint path instead of 'latest'"
            )
        pointers[r] = p
    if not pointers:
        raise ObjectNotFoundError(
            f"no commit pointer (rank_N/{POINTER_FILE}) under {prefix or '(root)'!r}; nothing "
            "has been uploaded there yet, or the prefix is wrong (try 'ckpt-uploader ls')"
        )
    by_rank = {r: {e.name: e for e in p.history} for r, p in pointers.items()}
    common = set.intersection(*(set(m) for m in by_rank.values()))
    if not common:
        raise UploaderError(
            "the ranks share no committed checkpoint (each rank's newest: "
            + ", ".join(f"rank {r}: {p.latest.name}" for r, p in sorted(pointers.items()))
            + "); wait for the uploads to finish, or load per-rank paths explicitly"
        )
    first = min(by_rank)
    best = max(common, key=lambda n: by_rank[first][n].order)
    return {r: check_location(m[best], prefix, r) for r, m in by_rank.items()}


_COPIES_SEEN: set[tuple[str, str]] = set()


def check_location(entry: PointerEntry, prefix: str, rank: int) -> PointerEntry:
    """``entry`` with its objects where rank ``rank``'s pointer under ``prefix`` is
    (``{prefix}/rank_N/{name}``, where the daemon puts them), so that a pointer can
    never send a restore to objects of another run.

    A pointer copied with its run to another prefix (``aws s3 sync``, ``rclone copy``
    of ``run1/`` to ``run1-copy/``) still names the objects under the prefix it was
    written under: such an entry (``{other}/rank_N/{name}``) is read from its copy
    beside the pointer, and every file is still checked against the manifest. Any
    other object name is IntegrityError: the pointer was altered.
    """
    expected = join_key(prefix, f"rank_{rank}/{entry.name}")
    if entry.object == expected:
        return entry
    tail = f"rank_{rank}/{entry.name}"
    if entry.object == tail or entry.object.endswith("/" + tail):
        moved = (entry.object[: -len(tail)].rstrip("/") or "(root)", prefix or "(root)")
        if moved not in _COPIES_SEEN:  # once per copy, not once per rank and checkpoint
            _COPIES_SEEN.add(moved)
            log.info("checkpoints committed under %r are restored from their copy under %r", *moved)
        return replace(entry, object=expected)
    raise IntegrityError(
        f"the pointer of rank {rank} under {prefix or '(root)'!r} names checkpoint "
        f"{entry.name!r} at {entry.object!r}, outside its place {expected!r}; it was "
        "altered: restore from a pointer written by ckpt-uploader, or run "
        "'ckpt-uploader push' again to rewrite it"
    )


def latest_prefix(name: str) -> str | None:
    """Where the pointers are for a name that asks for ``latest``, else None.

    ``"run1/latest"`` -> ``"run1"``, ``"latest"`` -> ``""``, ``"run1/ep3.pt"`` -> None.
    """
    name = name.strip("/")
    if name == "latest" or name.endswith("/latest"):
        return name[: -len("latest")].strip("/")
    return None


@dataclass(frozen=True)
class LatestSelection:
    """What ``latest`` under ``prefix`` resolved to.

    ``entries`` holds every rank's entry for the newest checkpoint all ranks have
    committed; ``chosen`` the ones asked for (``rank``, or all when None), and is
    empty when the rank asked for has no entry.
    """

    prefix: str
    entries: dict[int, PointerEntry]
    rank: int | None = None

    @property
    def chosen(self) -> dict[int, PointerEntry]:
        if self.rank is None:
            return dict(self.entries)
        entry = self.entries.get(self.rank)
        return {self.rank: entry} if entry is not None else {}


def select_latest(
    store: ObjectStore,
    name: str,
    world_size: int | None = None,
    rank: int | None = None,
    share: Share[dict[int, PointerEntry]] | None = None,
) -> LatestSelection | None:
    """Resolve ``name`` when it asks for ``latest`` (see :func:`latest_prefix`); None
    when it names something else. ``world_size`` and the errors are those of
    :func:`resolve_latest`; ``rank`` picks one rank's entry (see ``chosen``).

    With ``share``, every rank of a job calls this together and the pointers are read
    once, by the process ``share`` picks: W ranks make W GETs in all, not W x W, and
    they all get the same answer even while uploads still commit.
    """
    prefix = latest_prefix(name)
    if prefix is None:
        return None

    def resolve() -> dict[int, PointerEntry]:
        return resolve_latest(store, prefix, world_size)

    return LatestSelection(prefix, share(resolve) if share else resolve(), rank)
