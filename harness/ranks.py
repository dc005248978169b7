"""Many ranks of one job, simulated in one process: for tests and benchmarks of ``latest``.

Starting W real torch.distributed processes costs seconds each here, so tests and
benchmarks that need tens of ranks simulate them: :func:`commit_world` writes the
pointers W ranks' uploaders would have written, :class:`OnceShare` plays the part of
``ckpt.share_from_rank_zero`` (the first caller, rank 0, runs the function; every
later caller gets its result or its error, as a broadcast would hand it out), and
:func:`pointer_requests` counts what reached the store through a
:class:`harness.faultproxy.FaultProxy`. The real broadcast is tested with two gloo
processes (``tests/ckpt/test_distributed.py``).

Example::

    commit_world(store, "run", world=8, names=["ep1.pt", "ep2.pt"])
    share = OnceShare()
    for rank in range(8):
        select_latest(store, "run/latest", rank=rank, share=share)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from uploader.bucket.pointer import POINTER_FILE, PointerEntry, commit

if TYPE_CHECKING:  # pragma: no cover
    from harness.faultproxy import FaultProxy
    from uploader.transfer.store import ObjectStore

__all__ = ["OnceShare", "commit_world", "pointer_requests"]

_T = TypeVar("_T")


class OnceShare:
    """A :data:`uploader.bucket.pointer.Share` for ranks simulated in one process: the
    first call runs its function, later calls return that result (or raise that error).
    ``calls`` counts the calls (one per simulated rank)."""

    def __init__(self) -> None:
        self._done = False
        self._result: Any = None
        self._error: BaseException | None = None
        self.calls = 0

    def __call__(self, fn: Callable[[], _T]) -> _T:
        self.calls += 1
        if not self._done:
            self._done = True
            try:
                self._result = fn()
            except Exception as exc:
                self._error = exc
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[no-any-return]


def commit_world(
    store: ObjectStore,
    prefix: str,
    world: int,
    names: Sequence[str],
    data: bytes | None = None,
    ranks: Iterable[int] | None = None,
) -> None:
    """Commit the single-file checkpoints ``names`` (oldest first) for ranks 0..world-1
    (or only ``ranks``).

    With ``data``, each checkpoint's object is uploaded too (its digest recorded), so
    it can be downloaded; without, the entries name objects that do not exist.
    """
    for rank in range(world) if ranks is None else ranks:
        current = None
        for i, name in enumerate(names, 1):
            obj = f"{prefix}/rank_{rank}/{name}"
            digest = "sha256:" + "1" * 64
            if data is not None:
                digest = str(store.put_bytes(obj, data))
            size = len(data) if data is not None else 10
            entry = PointerEntry(name, obj, size, digest, i, 1.0)
            current = commit(store, prefix, rank, entry, current)


def pointer_requests(proxy: FaultProxy, since: int = 0) -> dict[str, int]:
    """Requests the proxy relayed from index ``since`` on, by kind: ``pointer`` (GETs of
    a ``rank_N/latest.json``), ``list`` (bucket listings), ``other``, ``total``."""
    counts = {"pointer": 0, "list": 0, "other": 0, "total": 0}
    for _, method, path in _tail(proxy.requests, since):
        counts["total"] += 1
        if method == "GET" and path.endswith("/" + POINTER_FILE) and "/rank_" in path:
            counts["pointer"] += 1
        elif method == "GET" and path.rstrip("/").count("/") <= 1:
            counts["list"] += 1
        else:
            counts["other"] += 1
    return counts


def _tail(items: Iterable[Any], since: int) -> list[Any]:
    return list(items)[since:]
