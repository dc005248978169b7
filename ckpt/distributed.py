"""Work done once for a whole torch.distributed job: rank 0 computes, every rank receives.

:func:`share_from_rank_zero` is the job-wide :data:`uploader.bucket.pointer.Share`:
rank 0 runs the function (for instance, resolving ``latest`` by reading one commit
pointer per rank) and broadcasts its result, or its error, to every rank. So W ranks
restoring at once read the W pointers once, not W times each, and agree on the same
checkpoint even while uploads are still committing newer ones.

Every rank of the default process group must call it together, as with any
collective; :func:`default_share` returns it only when a process group with more
than one rank is initialised. With NCCL, set each rank's CUDA device first
(``torch.cuda.set_device``), as ``broadcast_object_list`` requires.

Example::

    entries = share_from_rank_zero(lambda: resolve_latest(store, "run1"))
    path = uploader.fetch_latest(uri, "restore/", rank=rank, share=share_from_rank_zero)
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

__all__ = ["broadcast", "share_from_rank_zero", "default_share", "distributed_ready"]

_T = TypeVar("_T")


def distributed_ready() -> bool:
    """A default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (pickled; one collective)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class _Failed:
    """Rank 0's error, carried to the other ranks (its message when it cannot be pickled)."""

    def __init__(self, exc: BaseException) -> None:
        self.exc: BaseException | None = exc
        self.message = f"{type(exc).__name__}: {exc}"
        self.kind = type(exc).__name__

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        try:
            pickle.loads(pickle.dumps(self.exc))
        except Exception:
            state["exc"] = None
        return state


def share_from_rank_zero(fn: Callable[[], _T]) -> _T:
    """Run ``fn`` on rank 0 and return its result on every rank; an error raised on
    rank 0 is raised on every rank. Without a process group, just ``fn()``."""
    if not distributed_ready() or dist.get_world_size() == 1:
        return fn()
    result: Any = None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except Exception as exc:
            result = _Failed(exc)
    result = broadcast(result)
    if isinstance(result, _Failed):
        if result.exc is not None:
            raise result.exc
        raise RuntimeError(f"rank 0 failed: {result.message}")
    return result  # type: ignore[no-any-return]


def default_share() -> Callable[[Callable[[], Any]], Any] | None:
    """:func:`share_from_rank_zero` when a process group of several ranks is
    initialised, else None (each process works alone)."""
    if distributed_ready() and dist.get_world_size() > 1:
        return share_from_rank_zero
    return None
