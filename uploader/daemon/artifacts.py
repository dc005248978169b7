"""Artifacts: files in no checkpoint (logs, metrics), uploaded again at most every interval.

A changed artifact whose last upload finished less than ``interval`` seconds ago is
held back (:meth:`ArtifactThrottle.hold`) until the interval is over; the engine's
task (:meth:`ArtifactThrottle.run`) then takes the version on disk at that time.
When draining, nothing is held and everything held goes up once more
(:meth:`ArtifactThrottle.flush`). Checkpoint files are never held.

Example::

    throttle = ArtifactThrottle(300.0)
    due = throttle.hold(record, now)    # in the journal call that accepts files
    ...
    await throttle.flush(take_now)      # at drain
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import anyio

from uploader.daemon.journal import FileRecord

__all__ = ["ArtifactThrottle"]

log = logging.getLogger(__name__)


class ArtifactThrottle:
    """Which changed artifacts wait, and until when (wall-clock seconds).

    Args:
        interval: least seconds between two uploads of one artifact.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.draining = False
        self._held: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._held)

    def due(self, rec: FileRecord | None, artifact: bool, now: float) -> float | None:
        """When the new version of ``rec``'s file may go up (None: now). Pure: may run in
        the journal's worker thread; the caller records it with :meth:`hold`."""
        if not artifact or rec is None or rec.state != "done" or self.draining:
            return None
        done_at = rec.finished_at or 0.0
        if now - done_at >= self.interval:
            return None
        return done_at + self.interval

    def hold(self, rel: str, until: float) -> None:
        self._held[rel] = until
        log.debug("path=%s changed; uploaded again after the artifact interval", rel)

    def release(self, rel: str) -> None:
        self._held.pop(rel, None)

    async def run(self, take_now: Callable[[list[str]], Awaitable[None]]) -> None:
        """Take held artifacts once their interval is over, until draining."""
        while not self.draining:
            await anyio.sleep(1.0)
            now = time.time()
            due = [rel for rel, when in self._held.items() if when <= now]
            if due and not self.draining:
                for rel in due:
                    self._held.pop(rel, None)
                await take_now(due)

    async def flush(self, take_now: Callable[[list[str]], Awaitable[None]]) -> None:
        """Draining: from now on nothing is held; take what was held."""
        self.draining = True
        held, self._held = list(self._held), {}
        if held:
            await take_now(held)
