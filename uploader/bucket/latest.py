"""Resolving ``latest``: the newest checkpoint every rank has committed, and where its
objects must be.

Resolving ``latest`` reads one pointer per rank (W GETs). When W ranks restore at
once, each resolving it alone would make W x W GETs; :func:`select_latest` takes a
``share`` function instead (:data:`Share`) that resolves once and hands the result
to every rank (``ckpt.share_from_rank_zero`` does it with a torch.distributed
broadcast), so a restart costs O(W) requests in total.

:func:`resolve_latest` takes an entry only if its objects are where its rank's pointer
is (``{prefix}/rank_N/{name}``, :func:`check_location`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, TypeVar

from uploader.bucket.format import (
    POINTER_FILE,
    Pointer,
    PointerEntry,
    manifest_object,
    read_pointer,
)
from uploader.config.hparams import join_key, listing_prefix
from uploader.errors import IntegrityError, ObjectNotFoundError, UploaderError

if TYPE_CHECKING:  # pragma: no cover
    from uploader.transfer.store import ObjectStore

__all__ = [
    "Share",
    "list_ranks",
    "resolve_latest",
    "check_location",
    "latest_prefix",
    "LatestSelection",
    "select_latest",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
#: Runs the function it is given on one process of a job and returns that result (or
#: raises that error) on every process that calls it: how ranks resolve ``latest`` once.
Share = Callable[[Callable[[], _T]], _T]
_RANK = re.compile(r"(?:^|/)rank_(\d+)/" + re.escape(POINTER_FILE) + "$")


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
        ref = entry.manifest_ref
        if ref is not None:
            ref = replace(ref, object=manifest_object(expected, entry.name, ref.digest))
        return replace(entry, object=expected, manifest_ref=ref)
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
