"""Keeping up: which accepted file goes next, and which waiting checkpoint is not sent.

The engine's work stream is this module's :class:`WorkQueue`, a bounded queue (a full
queue makes the intake wait; nothing is dropped: the journal holds every accepted file)
whose order is the policy of :class:`Backlog`:

* **Newest first when behind.** Files are served in the order they were accepted,
  except that the slot of a file of a *complete* checkpoint goes to the newest
  complete checkpoint waiting (by its recency: the newest mtime of its files, then its
  name, the order of the pointer's history), so ``latest`` stays fresh while older
  checkpoints fill in after. Artifacts (logs, configs) and files of a checkpoint that
  is not complete yet (a directory whose marker is still to come) keep their place.
  A checkpoint once started is finished before another one starts (a file already
  half-sent is never abandoned for a newer one), unless the one in flight is small
  (under :data:`GATE_BYTES` in flight): small checkpoints do not wait for each other.
* **Nothing sent that retention would delete.** With ``--keep-remote N``, a complete
  checkpoint with files still waiting or in flight that would not be among its rank's
  newest N once the newer complete ones land is *superseded*: its waiting files are
  skipped (journal state ``superseded``), an upload of it in flight stops at its next
  part, and it is never committed. It counts as uploaded and then removed by remote
  retention (``skipped_superseded``), never as rotated away by the trainer. Without
  ``--keep-remote`` every checkpoint is sent, newest first.
* **Lag.** :meth:`Backlog.lag` is how long ago the newest complete checkpoint of a
  rank became complete, on the daemon's clock, while it is newer than everything the
  rank committed (0 once it is committed, or when nothing waits): how stale
  ``latest`` is. ``pending_bytes`` and ``pending_checkpoints`` say how much waits.

:class:`Backlog` is plain, synchronous and takes its clock, so the policy is tested
alone; :class:`WorkQueue` puts it behind the engine's upload loops.

Example::

    backlog = Backlog(keep_remote=2, clock=time.monotonic, complete=is_complete)
    backlog.add("ckpt/ep3.pt", Ckpt(0, "ckpt/ep3.pt", "ckpt/ep3.pt"), size, mtime_ns, True)
    rel = backlog.next()            # the newest complete checkpoint's file first
    backlog.finish(rel)
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import anyio

__all__ = ["Ckpt", "Backlog", "WorkQueue", "GATE_BYTES", "SupersededError"]

log = logging.getLogger(__name__)

#: A checkpoint in flight with fewer bytes than this in flight does not hold back the
#: start of another (many small checkpoints keep their parallelism).
GATE_BYTES = 1 << 20
#: Save intervals remembered per rank (their median is "the save interval").
INTERVALS = 8


class SupersededError(Exception):
    """Raised in an upload thread when the file's checkpoint was superseded meanwhile;
    ``sent``: whether bytes of it may have reached the store."""

    def __init__(self, message: str, sent: bool = True) -> None:
        super().__init__(message)
        self.sent = sent


@dataclass(frozen=True)
class Ckpt:
    """A checkpoint: its rank, its name inside the rank directory (the pointer entry's
    name) and its path relative to RUN_DIR."""

    rank: int
    name: str
    rel: str


@dataclass
class _State:
    ckpt: Ckpt
    mtime_ns: int = 0
    complete_at: float | None = None
    queued: deque[str] = field(default_factory=deque)
    sizes: dict[str, int] = field(default_factory=dict)
    inflight: dict[str, int] = field(default_factory=dict)
    started: bool = False
    committed: bool = False
    superseded: bool = False
    failed: bool = False

    @property
    def order(self) -> tuple[int, str]:
        return (self.mtime_ns, self.ckpt.name)

    @property
    def waiting(self) -> bool:
        return bool(self.queued or self.inflight)


class Backlog:
    """The files waiting for upload and the policy that orders them (module docstring).

    Args:
        keep_remote: remote retention in checkpoints (None: every checkpoint is sent).
        clock: seconds, monotonic (injected in tests).
        complete: whether a checkpoint that was not complete when its file was added is
            complete now (asked again at each :meth:`next`).
    """

    def __init__(
        self,
        keep_remote: int | None,
        clock: Callable[[], float] = time.monotonic,
        complete: Callable[[Ckpt], bool] = lambda c: False,
        keep_skipped: bool = False,
    ) -> None:
        self.keep_remote = keep_remote
        #: Remember superseded checkpoints until :meth:`retired` (--keep-local deletes
        #: their local copies later); otherwise they are forgotten once nothing of them
        #: is in flight, so a long run's bookkeeping stays small.
        self.keep_skipped = keep_skipped
        self.clock = clock
        self._complete = complete
        self._fifo: deque[str] = deque()
        self._of: dict[str, Ckpt | None] = {}
        self._size: dict[str, int] = {}
        self._states: dict[Ckpt, _State] = {}
        #: Orders of checkpoints each rank's pointer holds (from commits).
        self._committed: dict[int, set[tuple[int, str]]] = {}
        self._last_complete: dict[int, tuple[tuple[int, str], float]] = {}
        self._intervals: dict[int, deque[float]] = {}
        self._skipped: list[tuple[Ckpt, list[str]]] = []
        self._superseded_rels: set[str] = set()
        self._lock = threading.Lock()  # is_superseded is asked from upload threads
        #: Checkpoints skipped as superseded (this process).
        self.skipped = 0
        #: Largest lag seen (seconds), and the complete-to-committed times of commits.
        self.max_lag = 0.0
        self.commit_delays: deque[float] = deque(maxlen=256)
        #: Called with (rank, seconds from complete to committed) at each commit.
        self.observers: list[Callable[[int, float], None]] = []

    # -- adding and taking ------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._fifo)

    def add(self, rel: str, ckpt: Ckpt | None, size: int, mtime_ns: int, complete: bool) -> bool:
        """Queue ``rel`` (of checkpoint ``ckpt``; None: an artifact). False when it is not
        queued: its checkpoint is superseded (it is then among :meth:`take_skipped`)."""
        if ckpt is not None:
            st = self._states.get(ckpt)
            done = st is not None and (st.committed or st.superseded) and not st.waiting
            if done and st is not None and mtime_ns > st.mtime_ns:
                st = None  # saved again under the same name: a new checkpoint
            if st is None:
                st = self._states[ckpt] = _State(ckpt)
            if st.superseded:
                self._skipped.append((ckpt, [rel]))
                return False
            st.mtime_ns = max(st.mtime_ns, mtime_ns)
            st.queued.append(rel)
            st.sizes[rel] = size
            if complete:
                self._completed(st)
        self._fifo.append(rel)
        self._of[rel] = ckpt
        self._size[rel] = size
        self._supersede()
        return True

    def _completed(self, st: _State) -> None:
        if st.complete_at is not None:
            return
        now = self.clock()
        st.complete_at = now
        rank = st.ckpt.rank
        last = self._last_complete.get(rank)
        if last is None or st.order > last[0]:
            if last is not None:
                self._intervals.setdefault(rank, deque(maxlen=INTERVALS)).append(now - last[1])
            self._last_complete[rank] = (st.order, now)

    def _is_complete(self, st: _State) -> bool:
        if st.complete_at is None and self._complete(st.ckpt):
            self._completed(st)
            self._supersede()
        return st.complete_at is not None

    def next(self) -> str | None:
        """The file to upload next, or None when none may start now."""
        picked = False
        asked: dict[Ckpt, bool] = {}
        for rel in list(self._fifo):
            if rel not in self._of:
                continue  # taken off the queue meanwhile (superseded)
            ckpt = self._of[rel]
            if ckpt is None:
                return self._take(rel)
            if ckpt not in asked:
                asked[ckpt] = self._is_complete(self._states[ckpt])
            if not asked[ckpt]:
                return self._take(rel)
            if not picked:
                picked = True
                newest = self._pick()
                if newest is not None:
                    return self._take(newest.queued[0], slot=rel)
        return None

    def _pick(self) -> _State | None:
        """The complete checkpoint whose file goes next: one already started (finished
        before another starts), else the newest, unless a big one is in flight."""
        started = [
            s for s in self._states.values() if s.complete_at is not None and s.started and s.queued
        ]
        if started:
            return max(started, key=lambda s: s.order)
        busy = any(
            sum(s.inflight.values()) >= GATE_BYTES
            for s in self._states.values()
            if s.complete_at is not None
        )
        if busy:
            return None
        ready = [s for s in self._states.values() if s.complete_at is not None and s.queued]
        return max(ready, key=lambda s: s.order) if ready else None

    def _take(self, rel: str, slot: str | None = None) -> str:
        """Take ``rel`` off the queue; in the place of ``slot`` (a file of an older
        complete checkpoint, which then moves to where ``rel`` was)."""
        if slot is None or slot == rel:
            self._fifo.remove(rel)
        else:
            i, j = self._fifo.index(rel), self._fifo.index(slot)
            self._fifo[i] = slot
            del self._fifo[j]
        ckpt = self._of[rel]
        if ckpt is not None:
            st = self._states[ckpt]
            st.queued.remove(rel)
            st.inflight[rel] = st.sizes.get(rel, 0)
            st.started = True
        return rel

    def finish(self, rel: str, failed: bool = False) -> None:
        """The upload of ``rel`` is over (verified, failed, gone or superseded)."""
        ckpt = self._of.pop(rel, None)
        self._size.pop(rel, None)
        if ckpt is None:
            return
        st = self._states.get(ckpt)
        if st is not None:
            st.inflight.pop(rel, None)
            st.failed = st.failed or failed
            if st.superseded and not st.waiting and not self.keep_skipped:
                del self._states[ckpt]
        with self._lock:
            self._superseded_rels.discard(rel)

    # -- superseding --------------------------------------------------------------------
    def _newer(self, st: _State) -> int:
        rank = st.ckpt.rank
        orders = {
            s.order
            for s in self._states.values()
            if s.ckpt.rank == rank
            and s.complete_at is not None
            and not s.superseded
            and not s.failed
            and s.order > st.order
        }
        orders.update(o for o in self._committed.get(rank, ()) if o > st.order)
        return len(orders)

    def _supersede(self) -> None:
        keep = self.keep_remote
        if keep is None:
            return
        for st in list(self._states.values()):
            if st.superseded or st.committed or st.complete_at is None or not st.waiting:
                continue
            if self._newer(st) < keep:
                continue
            st.superseded = True
            self.skipped += 1
            rels = list(st.queued)
            for rel in rels:
                self._fifo.remove(rel)
                self._of.pop(rel, None)
                self._size.pop(rel, None)
            st.queued.clear()
            with self._lock:  # the uploads in flight stop at their next part
                self._superseded_rels.update(st.inflight)
            self._skipped.append((st.ckpt, rels))
            if not st.inflight and not self.keep_skipped:
                del self._states[st.ckpt]
            log.info(
                "skipping checkpoint %s (rank %d): --keep-remote %d would delete it once "
                "the %d newer complete checkpoint(s) land",
                st.ckpt.name,
                st.ckpt.rank,
                keep,
                self._newer(st),
            )

    def take_skipped(self) -> list[tuple[Ckpt, list[str]]]:
        """Checkpoints newly superseded, each with its files taken off the queue."""
        out, self._skipped = self._skipped, []
        return out

    def is_superseded(self, rel: str) -> bool:
        """Whether ``rel``, in flight, belongs to a superseded checkpoint; safe from any
        thread. (Queued files of a superseded checkpoint leave the queue at once, see
        :meth:`take_skipped`.)"""
        with self._lock:
            return rel in self._superseded_rels

    def superseded(self, rank: int) -> list[tuple[str, tuple[int, str]]]:
        """The checkpoints of ``rank`` skipped as superseded (this process) and not
        retired yet, nothing of them in flight: each one's path and order."""
        return [
            (s.ckpt.rel, s.order)
            for s in self._states.values()
            if s.superseded and s.ckpt.rank == rank and not s.inflight
        ]

    def retired(self, rels: Iterable[str]) -> None:
        """The local copies of the superseded checkpoints ``rels`` are gone: forget them."""
        gone = set(rels)
        for ckpt in [c for c, s in self._states.items() if s.superseded and c.rel in gone]:
            del self._states[ckpt]

    # -- commits ------------------------------------------------------------------------
    def committed(
        self, rank: int, names: Iterable[str], history: Iterable[tuple[int, str]]
    ) -> None:
        """The rank's pointer now names ``names`` (just committed); ``history``: the
        orders of every checkpoint its pointer holds."""
        now = self.clock()
        orders = self._committed.setdefault(rank, set())
        top = max(orders) if orders else None
        orders.update(history)
        for name in names:
            for st in self._states.values():
                if st.ckpt.rank == rank and st.ckpt.name == name and not st.committed:
                    st.committed = True
                    orders.add(st.order)
                    if st.complete_at is not None:
                        delay = max(0.0, now - st.complete_at)
                        self.commit_delays.append(delay)
                        for observe in self.observers:
                            observe(rank, delay)
                        if top is None or st.order > top:  # it moved latest: its lag
                            self.max_lag = max(self.max_lag, delay)
        self._forget(rank)
        self._supersede()

    def _forget(self, rank: int) -> None:
        """Drop what no longer matters: committed checkpoints older than the newest
        committed one, and skipped ones nothing of which is in flight."""
        orders = self._committed.get(rank)
        if orders:
            top = max(orders)
            keep = sorted(orders, reverse=True)[: max(self.keep_remote or 0, 1) + 1]
            self._committed[rank] = set(keep)
            for ckpt, st in list(self._states.items()):
                if ckpt.rank == rank and st.committed and st.order < top and not st.waiting:
                    del self._states[ckpt]

    # -- numbers ------------------------------------------------------------------------
    def lag(self) -> float:
        """Seconds since the newest complete checkpoint of a rank became complete while
        it is newer than every checkpoint the rank committed (the largest over ranks);
        0 when none waits."""
        now = self.clock()
        worst = 0.0
        newest: dict[int, _State] = {}
        for st in self._states.values():
            if st.complete_at is None or st.superseded:
                continue
            cur = newest.get(st.ckpt.rank)
            if cur is None or st.order > cur.order:
                newest[st.ckpt.rank] = st
        for rank, st in newest.items():
            committed = self._committed.get(rank, set())
            if st.committed or (committed and max(committed) >= st.order):
                continue
            assert st.complete_at is not None
            worst = max(worst, now - st.complete_at)
        self.max_lag = max(self.max_lag, worst)
        return worst

    def save_interval(self) -> float | None:
        """The median seconds between two checkpoints becoming complete (any rank)."""
        values = [v for d in self._intervals.values() for v in d]
        return statistics.median(values) if values else None

    @property
    def pending_bytes(self) -> int:
        """Bytes of files queued or in flight."""
        inflight = sum(sum(s.inflight.values()) for s in self._states.values())
        queued = set(self._fifo)
        artifacts = sum(
            self._size.get(r, 0) for r, c in self._of.items() if c is None and r not in queued
        )
        return sum(self._size.get(r, 0) for r in queued) + inflight + artifacts

    @property
    def pending_checkpoints(self) -> int:
        """Checkpoints with files queued or in flight (not superseded)."""
        return sum(1 for s in self._states.values() if s.waiting and not s.superseded)


class WorkQueue:
    """The engine's work stream: :class:`Backlog` behind an async, bounded queue.

    Args:
        backlog: the policy.
        bound: files queued at most; :meth:`put` waits while it is full.
        skip: awaited with each superseded checkpoint and its files taken off the queue.
    """

    def __init__(
        self,
        backlog: Backlog,
        bound: int,
        skip: Callable[[Ckpt, list[str]], Awaitable[None]],
    ) -> None:
        self.backlog = backlog
        self.bound = max(2, bound)
        self._skip = skip
        self._changed = anyio.Event()
        self._closed = False

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def _skipped(self) -> None:
        for ckpt, rels in self.backlog.take_skipped():
            await self._skip(ckpt, rels)

    async def put(
        self, rel: str, ckpt: Ckpt | None, size: int, mtime_ns: int, complete: bool
    ) -> None:
        """Queue ``rel``; waits while the queue is full."""
        while len(self.backlog) >= self.bound:
            await self._changed.wait()
        self.backlog.add(rel, ckpt, size, mtime_ns, complete)
        self._notify()
        await self._skipped()

    async def get(self) -> str | None:
        """The next file to upload; None once closed and empty."""
        while True:
            await self._skipped()
            rel = self.backlog.next()
            if rel is not None:
                self._notify()
                return rel
            if self._closed and not len(self.backlog):
                return None
            if not len(self.backlog):
                await self._changed.wait()
                continue
            with anyio.move_on_after(0.5):  # a directory's marker may appear meanwhile
                await self._changed.wait()

    def done(self, rel: str, failed: bool = False) -> None:
        self.backlog.finish(rel, failed)
        self._notify()

    async def committed(self, rank: int, names: list[str], history: list[tuple[int, str]]) -> None:
        self.backlog.committed(rank, names, history)
        self._notify()
        await self._skipped()

    def close(self) -> None:
        self._closed = True
        self._notify()
