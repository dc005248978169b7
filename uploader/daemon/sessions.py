"""The journal's record of multipart sessions and their confirmed parts.

:class:`JournalSessions` is the daemon's :class:`uploader.transfer.resume.SessionStore`:
two tables in the journal's sqlite file, written before the store's answer is relied
on, so a restarted daemon continues an interrupted upload where it stopped::

    sessions: object, upload_id, part_size, size, mtime_ns, started_at
    parts:    object, upload_id, idx, size, sha256, etag, crc64nvme   (one row a confirmed part)

One session per object name: beginning a new one replaces the old one's rows.
The upload threads call it directly; each call takes the journal's lock (the
one every other journal call holds), so it may run beside the event loop's calls.

Example::

    sessions = journal.sessions.locked(lock)   # journal.sessions: for callers holding it
    store.upload_file(path, name, resume=Resume(sessions))
"""

from __future__ import annotations

import sqlite3

from uploader.daemon.journal_db import JournalTables
from uploader.transfer.resume import PartRecord, Session

__all__ = ["JournalSessions", "SESSIONS_SCHEMA", "upgrade_sessions"]

#: The tables, created (in an older journal too) when the journal is opened for writing.
SESSIONS_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    object      TEXT PRIMARY KEY,
    upload_id   TEXT NOT NULL,      -- S3 upload id; Azure block id prefix; LOCAL staged file
    part_size   INTEGER NOT NULL,
    size        INTEGER NOT NULL,   -- the file's size and mtime when the session began
    mtime_ns    INTEGER NOT NULL,
    started_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS parts (
    object      TEXT NOT NULL,
    upload_id   TEXT NOT NULL,
    idx         INTEGER NOT NULL,   -- 0-based part index
    size        INTEGER NOT NULL,
    sha256      TEXT NOT NULL,      -- '' when the upload's digest is a CRC
    etag        TEXT NOT NULL,      -- ETag or block id the store answered
    crc64nvme   TEXT NOT NULL DEFAULT '',  -- 16 hex; '' when the digest is sha256 (schema 2)
    PRIMARY KEY (upload_id, idx)
);
CREATE INDEX IF NOT EXISTS parts_object ON parts(object);
"""


def upgrade_sessions(db: sqlite3.Connection) -> None:
    """Bring the parts table of an older journal (schema 1: no ``crc64nvme``) up to date;
    its sha256 part records stay valid."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(parts)")}
    if columns and "crc64nvme" not in columns:
        db.execute("ALTER TABLE parts ADD COLUMN crc64nvme TEXT NOT NULL DEFAULT ''")


class JournalSessions(JournalTables):
    """Multipart sessions in the journal ``db``; every call holds ``lock`` (None: the
    caller holds the journal's lock already)."""

    def _session(self, row: sqlite3.Row) -> Session:
        parts = {
            int(p["idx"]): PartRecord(
                int(p["idx"]),
                int(p["size"]),
                p["sha256"],
                p["etag"],
                # A journal of schema 1 opened read-only has no such column.
                p["crc64nvme"] if "crc64nvme" in p.keys() else "",  # noqa: SIM118 (a Row)
            )
            for p in self._rows(
                "SELECT * FROM parts WHERE object = ? AND upload_id = ?",
                (row["object"], row["upload_id"]),
            )
        }
        return Session(
            row["object"],
            row["upload_id"],
            int(row["part_size"]),
            int(row["size"]),
            int(row["mtime_ns"]),
            float(row["started_at"]),
            parts,
        )

    # -- SessionStore -----------------------------------------------------------------
    def session(self, object_name: str) -> Session | None:
        with self._lock:
            rows = self._rows("SELECT * FROM sessions WHERE object = ?", (object_name,))
            return self._session(rows[0]) if rows else None

    def begin_session(self, session: Session) -> None:
        with self._lock:
            self._conn.write("DELETE FROM parts WHERE object = ?", (session.object,))
            self._conn.write(
                "INSERT OR REPLACE INTO sessions (object, upload_id, part_size, size, mtime_ns, "
                "started_at) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    session.object,
                    session.upload_id,
                    session.part_size,
                    session.size,
                    session.mtime_ns,
                    session.started_at,
                ),
            )

    def record_part(self, object_name: str, upload_id: str, part: PartRecord) -> None:
        with self._lock:
            self._conn.write(
                "INSERT OR REPLACE INTO parts (object, upload_id, idx, size, sha256, etag, "
                "crc64nvme) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    object_name,
                    upload_id,
                    part.index,
                    part.size,
                    part.sha256,
                    part.etag,
                    part.crc64nvme,
                ),
            )

    def end_session(self, object_name: str, upload_id: str) -> None:
        with self._lock:
            self._conn.write(
                "DELETE FROM parts WHERE object = ? AND upload_id = ?", (object_name, upload_id)
            )
            self._conn.write(
                "DELETE FROM sessions WHERE object = ? AND upload_id = ?",
                (object_name, upload_id),
            )

    # -- for recovery and status ------------------------------------------------------
    def all(self) -> list[Session]:
        """Every recorded session, oldest first."""
        with self._lock:
            rows = self._rows("SELECT * FROM sessions ORDER BY started_at, object")
            return [self._session(r) for r in rows]
