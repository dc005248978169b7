"""Commit pointers: which checkpoint of a rank is safely in the bucket.

After a checkpoint object is uploaded and verified, the daemon writes
``{prefix}/rank_{r}/latest.json``::

    {"format": "ckpt-uploader/pointer/1", "rank": 0,
     "latest": {"name": "checkpoints/ep3.pt", "object": "run1/rank_0/checkpoints/ep3.pt",
                "size": 123, "digest": "sha256:...", "mtime_ns": ..., "committed_at": ...},
     "history": [ ...the same entries, newest first, at most 64... ]}

``name`` is the path inside the rank directory, the same for every rank, so
``latest`` across ranks is the newest name that every rank has committed.
Entries are ordered by the checkpoint file's mtime (then name): a late upload
of an older checkpoint joins the history but never moves ``latest`` back.

One daemon writes one rank's pointer, so a read-modify-write is race-free;
the PUT of the pointer is atomic on every store.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from uploader.config.hparams import join_key, listing_prefix
from uploader.errors import IntegrityError, ObjectNotFoundError, UploaderError

if TYPE_CHECKING:  # pragma: no cover
    from uploader.transfer.store import ObjectStore

__all__ = [
    "PointerEntry",
    "Pointer",
    "pointer_name",
    "read_pointer",
    "commit",
    "merge",
    "resolve_latest",
    "LatestSelection",
    "latest_prefix",
    "select_latest",
    "list_ranks",
    "POINTER_FILE",
    "HISTORY_LIMIT",
]

FORMAT = "ckpt-uploader/pointer/1"
POINTER_FILE = "latest.json"
HISTORY_LIMIT = 64
_RANK = re.compile(r"(?:^|/)rank_(\d+)/" + re.escape(POINTER_FILE) + "$")


@dataclass(frozen=True)
class PointerEntry:
    name: str
    object: str
    size: int
    digest: str
    mtime_ns: int
    committed_at: float = field(default_factory=time.time)

    @property
    def order(self) -> tuple[int, str]:
        return (self.mtime_ns, self.name)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PointerEntry:
        return cls(
            str(d["name"]),
            str(d["object"]),
            int(d["size"]),
            str(d["digest"]),
            int(d["mtime_ns"]),
            float(d.get("committed_at", 0.0)),
        )


@dataclass(frozen=True)
class Pointer:
    rank: int
    latest: PointerEntry
    history: tuple[PointerEntry, ...]

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "format": FORMAT,
                "rank": self.rank,
                "latest": asdict(self.latest),
                "history": [asdict(e) for e in self.history],
            },
            indent=1,
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Pointer:
        try:
            d = json.loads(data)
            if d.get("format") != FORMAT:
                raise ValueError(f"unknown format {d.get('format')!r}")
            latest = PointerEntry.from_dict(d["latest"])
            history = tuple(PointerEntry.from_dict(e) for e in d.get("history", []))
            return cls(int(d["rank"]), latest, history or (latest,))
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
        data = store.get_bytes(name)
    except ObjectNotFoundError:
        return None
    return Pointer.from_json(data, name)


def merge(
    current: Pointer | None, rank: int, entry: PointerEntry, history_limit: int = HISTORY_LIMIT
) -> Pointer:
    """``current`` with ``entry`` added (not written): the one rule of a pointer update.

    ``entry`` replaces an entry of the same name; the history is ordered newest first
    and cut to ``history_limit``; ``latest`` never moves back to an older checkpoint.
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
    return Pointer(rank, latest, tuple(history[:history_limit]))


def commit(
    store: ObjectStore,
    prefix: str,
    rank: int,
    entry: PointerEntry,
    current: Pointer | None = None,
    history_limit: int = HISTORY_LIMIT,
) -> Pointer:
    """Record ``entry`` (already verified in the store) by :func:`merge`'s rule.

    ``current`` is the pointer as last written by this process; when None it is read.
    """
    if current is None:
        current = read_pointer(store, prefix, rank)
    pointer = merge(current, rank, entry, history_limit)
    store.put_bytes(
        pointer_name(prefix, rank), pointer.to_json(), {"content-type": "application/json"}
    )
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
    store: ObjectStore, prefix: str, world_size: int | None = None
) -> dict[int, PointerEntry]:
    """The newest checkpoint every rank has committed, as rank -> entry.

    ``world_size`` says how many ranks must agree; by default, every rank that has
    a pointer. Raises ObjectNotFoundError (with what to do) when nothing qualifies.
    """
    ranks: Iterable[int] = range(world_size) if world_size else list_ranks(store, prefix)
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
    return {r: m[best] for r, m in by_rank.items()}


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
    store: ObjectStore, name: str, world_size: int | None = None, rank: int | None = None
) -> LatestSelection | None:
    """Resolve ``name`` when it asks for ``latest`` (see :func:`latest_prefix`); None
    when it names something else. ``world_size`` and the errors are those of
    :func:`resolve_latest`; ``rank`` picks one rank's entry (see ``chosen``)."""
    prefix = latest_prefix(name)
    if prefix is None:
        return None
    return LatestSelection(prefix, resolve_latest(store, prefix, world_size), rank)
