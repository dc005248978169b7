"""The journal: a sqlite file that remembers every file the daemon accepted.

A file is recorded (path, size, mtime, object name, state) before any byte is
sent, and every state change is committed before the daemon acts on it, so a
crash or ``kill -9`` loses nothing: on restart, ``pending`` and ``uploading``
rows are uploaded (again), ``done`` rows are not, and ``done`` checkpoints whose
commit pointer was not yet written get it.

States::

    pending -> uploading -> done
                         -> pending   (a failed attempt that will be retried)
                         -> failed    (retries exhausted; reported, retried at next start)

Multipart sessions and their confirmed parts are recorded too
(:mod:`uploader.daemon.sessions`, ``journal.sessions``), so an interrupted upload
resumes. A journal of an earlier version is upgraded when it is opened for
writing (:data:`JOURNAL_VERSION`).

Only one daemon may use a journal at a time: :meth:`Journal.open` takes an
inter-process lock beside it and raises ConfigError when another holds it.

Example::

    journal = Journal.open(Path("runs/1/rank_0"))
    journal.accept(FileRecord("ep1.pt", 0, "ep1.pt", "exp1/rank_0/ep1.pt", size, mtime_ns, True))
    journal.start("ep1.pt")           # uploading
    journal.done("ep1.pt", digest)    # verified
    journal.mark_committed("ep1.pt")  # in the commit pointer
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uploader.daemon.chunk_journal import CHUNKS_SCHEMA, JournalChunks
from uploader.daemon.journal_db import (
    RESERVE_BYTES,
    RESERVE_NAME,
    JournalDb,
    JournalFullError,
    make_reserve,
    room,
)
from uploader.daemon.sessions import SESSIONS_SCHEMA, JournalSessions, upgrade_sessions
from uploader.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = [
    "Journal",
    "FileRecord",
    "Totals",
    "JOURNAL_NAME",
    "JOURNAL_VERSION",
    "LOCK_NAME",
    "STATE_NAMES",
    "journal_path",
    "JournalFullError",
    "RESERVE_NAME",
    "make_reserve",
]

JOURNAL_NAME = ".ckpt-uploader.sqlite"
LOCK_NAME = ".ckpt-uploader.lock"
#: Names the watcher must never upload (the journal and its sqlite companions).
STATE_NAMES = frozenset(
    {
        JOURNAL_NAME,
        JOURNAL_NAME + "-wal",
        JOURNAL_NAME + "-shm",
        JOURNAL_NAME + "-journal",
        LOCK_NAME,
        RESERVE_NAME,
    }
)
#: "removed": deleted from the run directory before it was uploaded, with the whole
#: checkpoint it belonged to (rotated away by the trainer), or an artifact.
#: "superseded": not sent, because --keep-remote would delete its checkpoint on arrival
#: (newer complete checkpoints wait or are committed; see :mod:`uploader.daemon.keepup`).
STATES = ("pending", "uploading", "done", "failed", "removed", "superseded")
#: The schema version: 0 had the files table only; 1 added sessions and parts; 2 added
#: the parts' crc64nvme; 3 the chunk lists and chunk index of --dedup.
JOURNAL_VERSION = 3

_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS files (
    path        TEXT PRIMARY KEY,   -- relative to the run directory
    rank        INTEGER NOT NULL,
    name        TEXT NOT NULL,      -- relative to the rank directory
    object      TEXT NOT NULL,
    size        INTEGER NOT NULL,
    mtime_ns    INTEGER NOT NULL,
    checkpoint  INTEGER NOT NULL,   -- 1 when it belongs to a checkpoint (else an artifact)
    state       TEXT NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    digest      TEXT,
    committed   INTEGER NOT NULL DEFAULT 0,
    last_error  TEXT,
    accepted_at REAL NOT NULL,
    started_at  REAL,
    finished_at REAL,
    updated_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS files_state ON files(state);
CREATE INDEX IF NOT EXISTS files_rank_name ON files(rank, name);
"""
    + SESSIONS_SCHEMA
    + CHUNKS_SCHEMA
)


@dataclass(frozen=True)
class FileRecord:
    """One accepted file, as the journal holds it."""

    path: str
    rank: int
    name: str
    object: str
    size: int
    mtime_ns: int
    checkpoint: bool
    state: str = "pending"
    attempts: int = 0
    digest: str | None = None
    committed: bool = False
    last_error: str | None = None
    accepted_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> FileRecord:
        return cls(
            row["path"],
            int(row["rank"]),
            row["name"],
            row["object"],
            int(row["size"]),
            int(row["mtime_ns"]),
            bool(row["checkpoint"]),
            row["state"],
            int(row["attempts"]),
            row["digest"],
            bool(row["committed"]),
            row["last_error"],
            float(row["accepted_at"]),
            row["started_at"],
            row["finished_at"],
        )


@dataclass(frozen=True)
class Totals:
    """Counts and bytes by state, for ``status``."""

    pending: int = 0
    uploading: int = 0
    done: int = 0
    failed: int = 0
    removed: int = 0
    bytes_total: int = 0
    bytes_done: int = 0
    rate_bytes_per_s: float = 0.0
    last_error: str | None = None
    superseded: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "pending": self.pending,
            "uploading": self.uploading,
            "done": self.done,
            "failed": self.failed,
            "removed": self.removed,
            "superseded": self.superseded,
            "bytes_total": self.bytes_total,
            "bytes_done": self.bytes_done,
            "rate_bytes_per_s": round(self.rate_bytes_per_s, 1),
            "last_error": self.last_error,
        }


def journal_path(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir) / JOURNAL_NAME


class Journal:
    """The sqlite journal of one run directory.

    Args:
        path: the sqlite file.
        lock: the single-daemon lock, released at :meth:`close` (None for read-only use
            such as ``status``).
        readonly: open the file for reading only.

    Every method commits before it returns, so what it recorded survives a crash
    or ``kill -9`` of the process. :meth:`sync` also forces it to disk (power
    loss); the daemon calls it before it deletes anything. After a power loss
    the last changes may be lost, which is safe: files still on disk are found
    again by the start-up scan, and an upload or pointer commit is idempotent.

    A full disk does not stop the daemon: a reserve file beside the journal is
    released first (see :func:`make_reserve`); if the disk is still full, the
    journal goes on in memory and is saved to its file as soon as there is room
    (tried every few seconds, by :meth:`sync` and at :meth:`close`). Meanwhile
    :meth:`sync` raises JournalFullError, so nothing local is deleted. That handling
    lives in :mod:`uploader.daemon.journal_db`.

    One call at a time: the connection may be used from any thread (the daemon runs
    its journal calls in worker threads, one at a time), never from two at once.
    """

    def __init__(self, path: Path, lock: Any = None, readonly: bool = False) -> None:
        self.path = path
        self._lock = lock
        self._conn = JournalDb(path, _SCHEMA, readonly, JOURNAL_VERSION, upgrade_sessions)
        #: Multipart sessions, for callers holding the journal's lock (the upload
        #: threads use ``sessions.locked(lock)``).
        self.sessions = JournalSessions(self._conn)
        #: Chunk lists and the chunk index (--dedup), for callers holding the lock.
        self.chunks = JournalChunks(self._conn)

    @property
    def _db(self) -> sqlite3.Connection:
        return self._conn.db

    @property
    def in_memory(self) -> bool:
        """True while the journal's disk is full and its changes are held in memory."""
        return self._conn.in_memory

    def save(self) -> bool:
        """Try now to save a journal held in memory; True when it is on disk."""
        return self._conn.flush(force=True)

    def _write(self, sql: str, params: tuple[Any, ...] = ()) -> int:
        return self._conn.write(sql, params)

    # -- opening ------------------------------------------------------------------------
    @classmethod
    def open(cls, state_dir: str | os.PathLike[str]) -> Journal:
        """Open (creating) the journal in ``state_dir`` and take the single-daemon lock."""
        import fasteners

        state = Path(state_dir)
        try:
            state.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the state directory {state}: {exc.strerror}; "
                "choose another with --state-dir"
            ) from None
        lock = fasteners.InterProcessLock(str(state / LOCK_NAME))
        if not lock.acquire(blocking=False):
            raise ConfigError(
                f"another ckpt-uploader is already running with the journal in {state} "
                "(lock file " + LOCK_NAME + "); stop it first, or give this one "
                "another --state-dir"
            )
        try:
            return cls(journal_path(state), lock)
        except ConfigError:
            lock.release()
            raise
        except sqlite3.Error as exc:
            lock.release()
            if room(state) < RESERVE_BYTES:
                raise ConfigError(
                    f"the journal {journal_path(state)} cannot be opened ({exc}): the disk "
                    f"holding {state} is full; free space there or move the journal with "
                    "--state-dir"
                ) from None
            raise ConfigError(
                f"the journal {journal_path(state)} cannot be opened ({exc}); "
                "move it away to start afresh (verified files will be checked again)"
            ) from None

    @classmethod
    def open_readonly(cls, state_dir: str | os.PathLike[str]) -> Journal:
        path = journal_path(state_dir)
        if not path.exists():
            raise ConfigError(
                f"no journal at {path}; is this the run directory (or --state-dir) "
                "a ckpt-uploader watched?"
            )
        return cls(path, readonly=True)

    def close(self) -> None:
        self._conn.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading ------------------------------------------------------------------------
    def get(self, path: str) -> FileRecord | None:
        row = self._db.execute("SELECT * FROM files WHERE path = ?", (path,)).fetchone()
        return FileRecord.from_row(row) if row else None

    def records(self, *states: str) -> list[FileRecord]:
        if states:
            marks = ",".join("?" * len(states))
            cur = self._db.execute(
                f"SELECT * FROM files WHERE state IN ({marks}) ORDER BY accepted_at, path", states
            )
        else:
            cur = self._db.execute("SELECT * FROM files ORDER BY accepted_at, path")
        return [FileRecord.from_row(r) for r in cur]

    def under(self, directory: str) -> list[FileRecord]:
        """Records of files below ``directory`` (a path relative to the run directory)."""
        lo = directory.rstrip("/") + "/"
        hi = lo[:-1] + chr(ord("/") + 1)
        cur = self._db.execute(
            "SELECT * FROM files WHERE path >= ? AND path < ? ORDER BY path", (lo, hi)
        )
        return [FileRecord.from_row(r) for r in cur]

    def find(self, rank: int, name: str) -> FileRecord | None:
        """The record of ``rank``'s file ``name`` (relative to its rank directory)."""
        row = self._db.execute(
            "SELECT * FROM files WHERE rank = ? AND name = ? ORDER BY updated_at DESC",
            (rank, name),
        ).fetchone()
        return FileRecord.from_row(row) if row else None

    def find_object(self, object_name: str) -> FileRecord | None:
        """The record of the file uploaded as ``object_name``."""
        row = self._db.execute(
            "SELECT * FROM files WHERE object = ? ORDER BY updated_at DESC", (object_name,)
        ).fetchone()
        return FileRecord.from_row(row) if row else None

    def uncommitted(self) -> list[FileRecord]:
        cur = self._db.execute(
            "SELECT * FROM files WHERE state = 'done' AND checkpoint = 1 AND committed = 0 "
            "ORDER BY mtime_ns"
        )
        return [FileRecord.from_row(r) for r in cur]

    def totals(self) -> Totals:
        counts = dict.fromkeys(STATES, 0)
        bytes_total = bytes_done = 0
        for row in self._db.execute(
            "SELECT state, COUNT(*) AS n, COALESCE(SUM(size), 0) AS b FROM files GROUP BY state"
        ):
            counts[row["state"]] = int(row["n"])
            if row["state"] not in ("removed", "superseded"):
                bytes_total += int(row["b"])
            if row["state"] == "done":
                bytes_done = int(row["b"])
        span = self._db.execute(
            "SELECT MIN(started_at) AS s, MAX(finished_at) AS f, COALESCE(SUM(size), 0) AS b "
            "FROM files WHERE state = 'done' AND started_at IS NOT NULL"
        ).fetchone()
        rate = 0.0
        if span["s"] is not None and span["f"] is not None and span["f"] > span["s"]:
            rate = int(span["b"]) / (span["f"] - span["s"])
        err = self._db.execute(
            "SELECT last_error FROM files WHERE last_error IS NOT NULL "
            "ORDER BY updated_at DESC LIMIT 1"
        ).fetchone()
        return Totals(
            counts["pending"],
            counts["uploading"],
            counts["done"],
            counts["failed"],
            counts["removed"],
            bytes_total,
            bytes_done,
            rate,
            err["last_error"] if err else None,
            counts["superseded"],
        )

    # -- writing ------------------------------------------------------------------------
    def accept(self, rec: FileRecord) -> FileRecord:
        """Record a file (new, or changed since it was last recorded) as pending."""
        now = time.time()
        self._write(
            "INSERT INTO files (path, rank, name, object, size, mtime_ns, checkpoint, state, "
            "attempts, digest, committed, last_error, accepted_at, started_at, finished_at, "
            "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', 0, NULL, 0, NULL, ?, NULL, "
            "NULL, ?) ON CONFLICT(path) DO UPDATE SET rank = excluded.rank, "
            "name = excluded.name, object = excluded.object, size = excluded.size, "
            "mtime_ns = excluded.mtime_ns, checkpoint = excluded.checkpoint, "
            "state = 'pending', attempts = 0, digest = NULL, committed = 0, last_error = NULL, "
            "accepted_at = excluded.accepted_at, started_at = NULL, finished_at = NULL, "
            "updated_at = excluded.updated_at",
            (
                rec.path,
                rec.rank,
                rec.name,
                rec.object,
                rec.size,
                rec.mtime_ns,
                int(rec.checkpoint),
                now,
                now,
            ),
        )
        got = self.get(rec.path)
        assert got is not None
        return got

    def start(self, path: str) -> None:
        """Mark an upload attempt as begun (attempts + 1)."""
        now = time.time()
        self._write(
            "UPDATE files SET state = 'uploading', attempts = attempts + 1, started_at = ?, "
            "updated_at = ? WHERE path = ?",
            (now, now, path),
        )

    def retry_later(self, path: str, error: str) -> None:
        self._write(
            "UPDATE files SET state = 'pending', last_error = ?, updated_at = ? WHERE path = ?",
            (error, time.time(), path),
        )

    def fail(self, path: str, error: str) -> None:
        now = time.time()
        self._write(
            "UPDATE files SET state = 'failed', last_error = ?, finished_at = ?, updated_at = ? "
            "WHERE path = ?",
            (error, now, now, path),
        )

    def removed(self, path: str) -> None:
        """``path`` was deleted before it was uploaded, and that is no failure (see
        :data:`STATES`); accepted again if it comes back."""
        self._write(
            "UPDATE files SET state = 'removed', last_error = NULL, finished_at = ?, "
            "updated_at = ? WHERE path = ?",
            (time.time(), time.time(), path),
        )

    def superseded(self, path: str) -> None:
        """``path`` is not sent: its checkpoint is superseded (see :data:`STATES`);
        accepted again if it changes."""
        self._write(
            "UPDATE files SET state = 'superseded', last_error = NULL, finished_at = ?, "
            "updated_at = ? WHERE path = ?",
            (time.time(), time.time(), path),
        )

    def any_committed(self) -> bool:
        """Whether any checkpoint file recorded here was ever committed."""
        return (
            self._db.execute("SELECT 1 FROM files WHERE committed = 1 LIMIT 1").fetchone()
            is not None
        )

    def done(self, path: str, digest: str, version: tuple[int, int] | None = None) -> bool:
        """Record ``path`` verified with ``digest``; with ``version`` (size, mtime_ns), only
        if the journal still holds that version. True when recorded."""
        now = time.time()
        sql = (
            "UPDATE files SET state = 'done', digest = ?, last_error = NULL, finished_at = ?, "
            "updated_at = ? WHERE path = ?"
        )
        if version is None:
            return self._write(sql, (digest, now, now, path)) > 0
        sql += " AND size = ? AND mtime_ns = ?"
        return self._write(sql, (digest, now, now, path, *version)) > 0

    def mark_committed(self, path: str) -> None:
        self._write(
            "UPDATE files SET committed = 1, updated_at = ? WHERE path = ?", (time.time(), path)
        )

    def sync(self) -> None:
        """Force everything recorded so far to disk (checkpoint the WAL, with fsync).

        Raises JournalFullError while the journal is held in memory and still cannot be
        saved: the caller must not do anything destructive then.
        """
        if not self._conn.flush(force=True):
            raise JournalFullError(
                f"the journal {self.path} cannot be saved: its disk is full; free space "
                "there or move the journal with --state-dir"
            )
        self._write("PRAGMA wal_checkpoint(FULL)")

    def recover(self) -> list[FileRecord]:
        """After a restart: interrupted uploads and failures go back to pending.

        Returns the rows that were ``uploading`` (their multipart uploads may be stale).
        """
        stale = self.records("uploading")
        now = time.time()
        self._write(
            "UPDATE files SET state = 'pending', updated_at = ? WHERE state = 'uploading'",
            (now,),
        )
        self._write(
            "UPDATE files SET state = 'pending', attempts = 0, updated_at = ? "
            "WHERE state = 'failed'",
            (now,),
        )
        return stale
