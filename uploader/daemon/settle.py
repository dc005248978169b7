"""Settling: when is a file that is being written complete?

A pure state machine: no filesystem call and no clock of its own. The caller
feeds it what it saw (watch events, scan results, stats) and the time comes from
an injected clock; it answers which files are complete. The rules:

* A file renamed into place or found by a scan is complete once its size and
  mtime have stayed the same for ``settle`` seconds (a scanned file's quiet time
  counts from its mtime, on the injected wall clock: one last written long ago is
  complete at its first check).
* A file written in place is complete ``settle`` seconds after its close event;
  without a close event, once ``final`` is set (draining, or the parent is gone),
  or when no modify event was ever seen for it (and it is not empty).
* Any file quiet for ``open_timeout`` seconds is complete, closed or not.
* Any change of size or mtime restarts the quiet time.
* A file otherwise complete but still open for writing by some process (asked of
  the caller: :attr:`Verdict.QUIET`) is held until it is closed or ``open_timeout``
  has passed.
* A file that is gone drops out.
* A *snapshot* file (an artifact such as a log, see ``observe``) is complete once
  quiet for ``settle`` seconds whether or not a writer holds it, and in any case
  ``snapshot_after`` seconds after it was first seen: a log that never goes quiet
  is still uploaded, as it is then (it is uploaded again when it changes).

Example::

    settler = Settler(settle=1.0, open_timeout=30.0)
    settler.observe("ep1.pt", "moved", size, mtime_ns)
    ...
    verdict = settler.check("ep1.pt", (size, mtime_ns))
    if verdict is Verdict.QUIET:
        verdict = settler.writer("ep1.pt", open_for_writing(path))
    if verdict is Verdict.DONE:
        upload("ep1.pt")
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Settler", "Verdict", "EVENT_KINDS"]

#: What the caller saw: "scan" (found on disk), "moved" (renamed into place),
#: "created", "modified", "closed" (closed after writing).
EVENT_KINDS = ("scan", "moved", "created", "modified", "closed")


class Verdict(enum.Enum):
    GONE = "gone"  #: the file is gone or no longer a regular file: dropped
    WAIT = "wait"  #: not complete yet
    QUIET = "quiet"  #: complete unless a writer still holds it: ask :meth:`Settler.writer`
    HELD = "held"  #: quiet, but a writer still holds it open (said once per file): waiting
    DONE = "done"  #: complete; no longer tracked


@dataclass
class _Candidate:
    size: int
    mtime_ns: int
    since: float
    closed: bool = False
    modified: bool = False
    held: bool = False  # seen open for writing while quiet
    snapshot: bool = False
    first: float = 0.0


class Settler:
    """Tracks files until they are complete (see the module docstring for the rules).

    Args:
        settle: seconds a file must keep its size and mtime.
        open_timeout: seconds of quiet that count as complete without a close event.
        snapshot_after: seconds after which a snapshot file is complete even if it
            keeps changing (None: never).
        clock: monotonic seconds (injected by tests).
    """

    def __init__(
        self,
        settle: float,
        open_timeout: float,
        snapshot_after: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.settle = settle
        self.wall = wall
        self.open_timeout = open_timeout
        self.snapshot_after = snapshot_after
        self.clock = clock
        #: Take in-place writes without a close event (draining, or the parent is gone).
        self.final = False
        self._cands: dict[str, _Candidate] = {}

    def __len__(self) -> int:
        return len(self._cands)

    def __contains__(self, rel: object) -> bool:
        return rel in self._cands

    def paths(self) -> list[str]:
        """The files being tracked, in the order they were first seen."""
        return list(self._cands)

    def observe(
        self, rel: str, kind: str, size: int, mtime_ns: int, snapshot: bool = False
    ) -> None:
        """Record an event (or a scan result) for ``rel`` whose stat is ``size``/``mtime_ns``;
        ``snapshot`` (read when ``rel`` is first seen) marks a file taken as it is."""
        now = self.clock()
        c = self._cands.get(rel)
        if c is None:
            since = now
            if kind == "scan" and self.wall() - mtime_ns / 1e9 >= 0:
                # Found on disk already unchanged for that long (by its mtime): a run
                # directory pushed after training waits for no settle time.
                since = now - min(self.wall() - mtime_ns / 1e9, self.settle)
            c = self._cands[rel] = _Candidate(size, mtime_ns, since, snapshot=snapshot, first=now)
        if kind in ("scan", "moved"):
            c.closed = True
        elif kind == "closed":
            c.closed = True
            c.since = now
        elif kind == "modified":
            c.modified = True
            c.closed = False
            c.since = now
        elif kind == "created":
            c.since = now

    def drop(self, rel: str) -> None:
        """Stop tracking ``rel`` (gone, or taken by another way)."""
        self._cands.pop(rel, None)

    def clear(self) -> None:
        self._cands.clear()

    def check(self, rel: str, stat: tuple[int, int] | None) -> Verdict:
        """Judge ``rel`` given its current ``(size, mtime_ns)`` (None: gone)."""
        c = self._cands.get(rel)
        if c is None:
            return Verdict.GONE
        if stat is None:
            del self._cands[rel]
            return Verdict.GONE
        now = self.clock()
        after = self.snapshot_after
        if c.snapshot and after is not None and now - c.first >= after:
            del self._cands[rel]
            return Verdict.DONE
        if stat != (c.size, c.mtime_ns):
            c.size, c.mtime_ns = stat
            c.since = now
            return Verdict.WAIT
        quiet = now - c.since
        if quiet >= self.open_timeout:
            del self._cands[rel]
            return Verdict.DONE
        settled = quiet >= self.settle
        if settled and c.snapshot:
            del self._cands[rel]
            return Verdict.DONE
        if settled and (c.closed or self.final or (not c.modified and c.size > 0)):
            return Verdict.QUIET
        return Verdict.WAIT

    def writer(self, rel: str, open_for_writing: bool | None) -> Verdict:
        """After :attr:`Verdict.QUIET`: whether some process has ``rel`` open for writing
        (None: cannot be told). DONE when not; when it has, the file is kept: HELD the
        first time (worth a log line), WAIT after that."""
        c = self._cands.get(rel)
        if c is None:
            return Verdict.GONE
        if open_for_writing is True:
            if c.held:
                return Verdict.WAIT
            c.held = True
            return Verdict.HELD
        del self._cands[rel]
        return Verdict.DONE
