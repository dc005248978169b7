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

Only one daemon may use a journal at a time: :meth:`Journal.open` takes an
inter-process lock beside it and raises ConfigError when another holds it.

Example::

    journal = Journal.open(Path("runs/1/rank_0"))
    journal.accept(FileRecord(...))
    journal.set_state("ep1.pt", "uploading")
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uploader.errors import ConfigError, UploaderError

log = logging.getLogger("uploader.daemon.journal")

__all__ = [
    "Journal",
    "FileRecord",
    "Totals",
    "JOURNAL_NAME",
    "LOCK_NAME",
    "STATE_NAMES",
    "journal_path",
    "JournalFullError",
    "RESERVE_NAME",
    "make_reserve",
]

JOURNAL_NAME = ".ckpt-uploader.sqlite"
LOCK_NAME = ".ckpt-uploader.lock"
#: Space kept aside so the journal can still record progress when the disk fills up.
RESERVE_NAME = ".ckpt-uploader.reserve"
RESERVE_BYTES = 2 << 20
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
STATES = ("pending", "uploading", "done", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    path        TEXT PRIMARY KEY,   -- relative to the run directory
    rank        INTEGER NOT NULL,
    name        TEXT NOT NULL,      -- relative to the rank directory
    object      TEXT NOT NULL,
    size        INTEGER NOT NULL,
    mtime_ns    INTEGER NOT NULL,
    checkpoint  INTEGER NOT NULL,   -- 1 when it moves the commit pointer
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
"""


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
    bytes_total: int = 0
    bytes_done: int = 0
    rate_bytes_per_s: float = 0.0
    last_error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "pending": self.pending,
            "uploading": self.uploading,
            "done": self.done,
            "failed": self.failed,
            "bytes_total": self.bytes_total,
            "bytes_done": self.bytes_done,
            "rate_bytes_per_s": round(self.rate_bytes_per_s, 1),
            "last_error": self.last_error,
        }


def journal_path(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir) / JOURNAL_NAME


class JournalFullError(UploaderError):
    """The journal's disk is full even after releasing the space reserve."""


def _is_full(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "full" in text or "no space" in text


def _room(folder: Path) -> int:
    try:
        st = os.statvfs(folder)
    except OSError:
        return -1
    return st.f_bavail * st.f_frsize


_FLUSH_EVERY = 5.0  # seconds between attempts to save an in-memory journal


def _prepare(db: sqlite3.Connection) -> None:
    db.execute("PRAGMA journal_mode=WAL")
    # NORMAL in WAL mode: every commit survives a crash or kill -9 of this
    # process; sync() forces the disk before anything destructive.
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(_SCHEMA)


def make_reserve(folder: str | os.PathLike[str]) -> bool:
    """Set aside ``RESERVE_BYTES`` in ``folder`` for the journal (see :class:`Journal`).

    Called by the daemon, and by a training process before it starts its worker, so
    that the reserve exists before checkpoints can fill the disk. Skipped (False)
    when the disk has less than four times that much room.
    """
    reserve = Path(folder) / RESERVE_NAME
    if reserve.exists():
        return True
    try:
        if _room(reserve.parent) < 4 * RESERVE_BYTES:
            return False
        fd = os.open(reserve, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, RESERVE_BYTES)
        finally:
            os.close(fd)
        return True
    except OSError:
        with contextlib.suppress(OSError):
            reserve.unlink()
        return False


class Journal:
    """The sqlite journal of one run directory.

    Args:
        path: the sqlite file.
        lock: hold the single-daemon lock (``False`` for read-only use such as ``status``).

    Every method commits before it returns, so what it recorded survives a crash
    or ``kill -9`` of the process. :meth:`sync` also forces it to disk (power
    loss); the daemon calls it before it deletes anything. After a power loss
    the last changes may be lost, which is safe: files still on disk are found
    again by the start-up scan, and an upload or pointer commit is idempotent.

    A full disk does not stop the daemon: a reserve file beside the journal is
    released first (see :func:`make_reserve`); if the disk is still full, the
    journal goes on in memory and is saved to its file as soon as there is room
    (tried every few seconds, by :meth:`sync` and at :meth:`close`). Meanwhile
    :meth:`sync` raises JournalFullError, so nothing local is deleted.
    """

    def __init__(self, path: Path, lock: Any = None, readonly: bool = False) -> None:
        self.path = path
        self._lock = lock
        # While the journal's disk is full, the journal lives in memory (``_db``) and
        # ``_disk`` holds the connection to the file, to save it to once there is room.
        self._disk: sqlite3.Connection | None = None
        self._flush_tried = 0.0
        self._unsaved = 0
        if readonly:
            uri = f"file:{path}?mode=ro"
            self._db = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=10)
        else:
            self._db = sqlite3.connect(path, isolation_level=None, timeout=10)
            try:
                _prepare(self._db)
            except sqlite3.OperationalError as exc:
                if not _is_full(exc):
                    raise
                self._to_memory()
        self._db.row_factory = sqlite3.Row
        self._reserve = path.parent / RESERVE_NAME
        self._reserve_checked = 0.0
        if not readonly:
            self._make_reserve()

    @property
    def in_memory(self) -> bool:
        """True while the journal's disk is full and its changes are held in memory."""
        return self._disk is not None

    def save(self) -> bool:
        """Try now to save a journal held in memory; True when it is on disk."""
        return self._flush(force=True)

    # -- disk-full safety ---------------------------------------------------------------
    # The journal usually lives in the run directory, on the disk training fills with
    # checkpoints. A small reserve file is kept beside it; when a journal write fails
    # for lack of space, the reserve is released so the daemon can still record its
    # uploads (which need no local space) and retention can free the disk. It is
    # re-created once space is back.
    def _make_reserve(self) -> None:
        self._reserve_checked = time.monotonic()
        make_reserve(self._reserve.parent)

    def _release_reserve(self) -> bool:
        try:
            self._reserve.unlink()
        except OSError:
            return False
        # Keep the write-ahead log small from now on: move it into the database and
        # truncate it (frees its space), and checkpoint every 64 pages instead of 1000.
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.execute("PRAGMA wal_autocheckpoint=64")
        log.warning(
            "the disk holding the journal %s is full: released its %d MiB reserve to keep "
            "recording uploads; free space there (e.g. --keep-local) or move the journal "
            "with --state-dir",
            self.path,
            RESERVE_BYTES >> 20,
        )
        return True

    def _write(self, sql: str, params: tuple[Any, ...] = ()) -> None:
        """Execute one write. On a full disk: release the reserve and retry; if the disk
        is still full, keep the journal in memory until there is room again."""
        if self._disk is not None:
            self._db.execute(sql, params)
            self._unsaved += 1
            self._flush()
            return
        delay = 0.05
        for attempt in range(4):
            try:
                self._db.execute(sql, params)
            except sqlite3.OperationalError as exc:
                if not _is_full(exc):
                    raise
                if self._release_reserve():
                    continue
                if attempt < 3:
                    time.sleep(delay)
                    delay *= 2
                    continue
                self._to_memory()
                self._db.execute(sql, params)
                self._unsaved += 1
                return
            if not self._reserve.exists() and time.monotonic() - self._reserve_checked > 10:
                self._make_reserve()
            return

    def _to_memory(self) -> None:
        """Go on with a copy of the journal in memory (its disk is full)."""
        mem = sqlite3.connect(":memory:", isolation_level=None)
        try:
            self._db.backup(mem)
        except sqlite3.Error:  # nothing readable on disk yet (created on a full disk)
            pass
        mem.executescript(_SCHEMA)
        mem.row_factory = sqlite3.Row
        self._disk, self._db = self._db, mem
        self._flush_tried = time.monotonic()
        log.error(
            "the disk holding the journal %s is full: keeping the journal in memory until "
            "there is room again (uploads go on; if this process is killed before then, "
            "files verified meanwhile are uploaded again at the next start). Free space "
            "there or move the journal with --state-dir",
            self.path,
        )

    def _flush(self, force: bool = False) -> bool:
        """Save an in-memory journal to its file (at most every few seconds unless
        ``force``); True when the journal is on disk again."""
        disk = self._disk
        if disk is None:
            return True
        now = time.monotonic()
        if not force and now - self._flush_tried < _FLUSH_EVERY:
            return False
        self._flush_tried = now
        try:
            self._db.backup(disk)
            _prepare(disk)
        except sqlite3.Error as exc:
            if not (isinstance(exc, sqlite3.OperationalError) and _is_full(exc)):
                log.warning("cannot save the journal %s yet: %s", self.path, exc)
            return False
        disk.row_factory = sqlite3.Row
        self._db.close()
        self._db, self._disk = disk, None
        log.warning(
            "the journal %s is saved on disk again (%d change(s) kept in memory meanwhile)",
            self.path,
            self._unsaved,
        )
        self._unsaved = 0
        return True

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
        except sqlite3.Error as exc:
            lock.release()
            if _room(state) < RESERVE_BYTES:
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
        if self._disk is not None and not self._flush(force=True):
            log.error(
                "the journal %s could not be saved: its disk is still full; %d change(s) "
                "are lost from it. Uploads verified meanwhile are in the store; the next "
                "start uploads those files again",
                self.path,
                self._unsaved,
            )
        if self._disk is not None:
            self._disk.close()
        self._db.close()
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

    def uncommitted(self) -> list[FileRecord]:
        cur = self._db.execute(
            "SELECT * FROM files WHERE state = 'done' AND checkpoint = 1 AND committed = 0 "
            "ORDER BY mtime_ns"
        )
        return [FileRecord.from_row(r) for r in cur]

    def __iter__(self) -> Iterator[FileRecord]:
        return iter(self.records())

    def totals(self) -> Totals:
        counts = dict.fromkeys(STATES, 0)
        bytes_total = bytes_done = 0
        for row in self._db.execute(
            "SELECT state, COUNT(*) AS n, COALESCE(SUM(size), 0) AS b FROM files GROUP BY state"
        ):
            counts[row["state"]] = int(row["n"])
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
            bytes_total,
            bytes_done,
            rate,
            err["last_error"] if err else None,
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

    def done(self, path: str, digest: str) -> None:
        now = time.time()
        self._write(
            "UPDATE files SET state = 'done', digest = ?, last_error = NULL, finished_at = ?, "
            "updated_at = ? WHERE path = ?",
            (digest, now, now, path),
        )

    def mark_committed(self, path: str) -> None:
        self._write(
            "UPDATE files SET committed = 1, updated_at = ? WHERE path = ?", (time.time(), path)
        )

    def sync(self) -> None:
        """Force everything recorded so far to disk (checkpoint the WAL, with fsync).

        Raises JournalFullError while the journal is held in memory and still cannot be
        saved: the caller must not do anything destructive then.
        """
        if not self._flush(force=True):
            raise JournalFullError(
                f"the journal {self.path} cannot be saved: its disk is full; free space "
                "there or move the journal with --state-dir"
            )
        self._write("PRAGMA wal_checkpoint(FULL)")

    def forget(self, path: str) -> None:
        self._write("DELETE FROM files WHERE path = ?", (path,))

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
