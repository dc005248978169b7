"""Remote retention (``--keep-remote N``): keep each rank's newest N checkpoint objects.

Per rank, checkpoint objects beyond the newest N are deleted, never the one the
rank's commit pointer names as ``latest``, and never one whose commit is still
to come. Age is the checkpoint's own mtime as the pointer records it; an object
the pointer does not know is ranked by its upload time. Which objects are
checkpoints is the caller's to say (a predicate on the name inside the rank
directory), so this module needs nothing from the daemon.

Example::

    for name in prune_remote(store, "exp1", 0, 3, is_checkpoint, pointer):
        print("deleted", name)
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import TYPE_CHECKING

from uploader.bucket.pointer import Pointer
from uploader.config.hparams import join_key

if TYPE_CHECKING:  # pragma: no cover
    from uploader.transfer.store import ObjectStore

__all__ = ["remote_deletions", "prune_remote"]


def remote_deletions(
    store: ObjectStore,
    prefix: str,
    rank: int,
    keep: int,
    is_checkpoint: Callable[[str], bool],
    pointer: Pointer,
    in_flight: Collection[str] = (),
) -> list[str]:
    """Checkpoint objects of ``rank`` beyond the newest ``keep``; never the pointer's latest.

    ``is_checkpoint`` tells, from a name relative to the rank directory, whether an
    object is a checkpoint. Objects in ``in_flight`` (uploaded or uploading, but not
    yet in the pointer) are left out: without their pointer entry their age is
    unknown (the store's mtime is the upload time), and ranking a late old
    checkpoint as the newest would delete a newer one. They are judged once committed.
    """
    base = join_key(prefix, f"rank_{rank}") + "/"
    order = {e.object: e.order for e in pointer.history}
    skip = set(in_flight)
    objs = []
    for info in store.list(base):
        rel = info.name[len(base) :]
        if not rel or rel.endswith(".json") or not is_checkpoint(rel):
            continue
        if info.name in skip:
            continue
        key = order.get(info.name, (int((info.mtime or 0) * 1e9), rel))
        objs.append((key, info.name))
    objs.sort(reverse=True)
    protected = {pointer.latest.object}
    return [name for _, name in objs[keep:] if name not in protected]


def prune_remote(
    store: ObjectStore,
    prefix: str,
    rank: int,
    keep: int,
    is_checkpoint: Callable[[str], bool],
    pointer: Pointer,
    in_flight: Collection[str] = (),
) -> list[str]:
    """Delete what :func:`remote_deletions` allows; return the deleted object names."""
    names = remote_deletions(store, prefix, rank, keep, is_checkpoint, pointer, in_flight)
    for name in names:
        store.delete(name)
    return names
