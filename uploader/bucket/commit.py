"""Writing commit pointers: the merge rule, and compare-and-swap where the store allows.

:func:`merge` is the one rule of a pointer update: an entry replaces one of the same
name, the history is ordered newest first (by the checkpoint's mtime, then name) and
cut to its limit, and a late upload of an older checkpoint joins the history but
never moves ``latest`` back. :func:`alias` and :func:`beyond` (retention) work on
the same pointer.

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

import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from uploader.bucket.format import (
    HISTORY_LIMIT,
    POINTER_META,
    Pointer,
    PointerEntry,
    pointer_name,
    read_pointer,
    read_pointer_versioned,
    write_pointer,
)
from uploader.bucket.manifest import store_manifest
from uploader.config.hparams import join_key
from uploader.errors import PreconditionFailedError, UploaderError

if TYPE_CHECKING:  # pragma: no cover
    from uploader.transfer.store import ObjectStore

__all__ = [
    "merge",
    "alias",
    "beyond",
    "update_pointer",
    "PointerUpdate",
    "fencing",
    "commit",
    "CONFLICT_ATTEMPTS",
]


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


#: Conditional writes tried per update (each after a fresh read and merge).
CONFLICT_ATTEMPTS = 16
#: Most seconds of jitter before retry number n: min(CONFLICT_PAUSE_CAP, base * 2**n).
CONFLICT_PAUSE_BASE = 0.005
CONFLICT_PAUSE_CAP = 0.25


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
                name, new.to_json(), version if current is not None else None, POINTER_META
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
    A large manifest is written as an object of its own first
    (:func:`uploader.bucket.manifest.store_manifest`).
    """
    entry = store_manifest(store, entry)
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
