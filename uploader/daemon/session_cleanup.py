"""Multipart sessions that uploads leave behind: aborting the stale and the orphaned.

:class:`SessionCleanup` is a part of :class:`uploader.daemon.uploads.Uploads` (its
``store``, ``journal`` and ``call``): an interrupted attempt's other sessions are aborted
before it resumes the one the journal records; sessions no file will resume are aborted
at start.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

from uploader.daemon.journal import FileRecord, Journal
from uploader.daemon.layouts import is_inside
from uploader.redact import redact
from uploader.transfer.store import ObjectStore

__all__ = ["SessionCleanup"]

log = logging.getLogger("uploader.daemon.uploads")


class SessionCleanup:
    store: ObjectStore
    journal: Journal
    call: Callable[..., Awaitable[Any]]
    root: Path

    async def abort_stale(self, rec: FileRecord) -> None:
        """Abort the multipart uploads an interrupted attempt of ``rec`` left behind,
        except the session the journal records to resume."""
        age = max(0.0, time.time() - (rec.started_at or time.time()) - 1.0)
        session = await self.call(self.journal.sessions.session, rec.object)
        keep = {session.upload_id} if session is not None else set()

        def abort() -> int:
            return self.store.abort_stale_uploads(rec.object, older_than=age, keep=keep)

        try:
            n = await anyio.to_thread.run_sync(abort, abandon_on_cancel=True)
            if n:
                log.info("aborted %d stale multipart upload(s) of %s", n, rec.object)
        except Exception as exc:  # best effort: the store expires them too
            log.warning("could not abort stale uploads of %s: %s", rec.object, redact(str(exc)))
        if session is not None:
            log.info(
                "upload of %s can resume: %d part(s), %d bytes recorded as held",
                rec.object,
                len(session.parts),
                session.bytes_held,
            )

    async def abort_orphans(self) -> None:
        """Abort the recorded sessions no file will resume: the journal no longer holds
        their file, or holds it as verified, or the file is gone from the run directory."""

        def orphans() -> list[tuple[str, str, str]]:
            out = []
            for session in self.journal.sessions.all():
                row = self.journal.find_object(session.object)
                if row is None:
                    why = "the journal no longer holds its file"
                elif row.state == "done":
                    why = "its file is verified"
                elif is_inside(self.root, row.path) is None:
                    why = "its file is gone"
                else:
                    continue
                out.append((session.object, session.upload_id, why))
            return out

        for name, upload_id, why in await self.call(orphans):
            await self.drop_session(name, upload_id, why)

    async def drop_session(self, name: str, upload_id: str, why: str) -> None:
        """Abort one recorded session in the store (best effort) and forget it."""

        def abort() -> None:
            self.store.backend.abort(name, upload_id)

        try:
            await anyio.to_thread.run_sync(abort, abandon_on_cancel=True)
        except Exception as exc:  # the store expires it too
            log.warning("could not abort the upload of %s: %s", name, redact(str(exc)))
        await self.call(self.journal.sessions.end_session, name, upload_id)
        log.info("aborted the unfinished upload of %s: %s", name, why)
