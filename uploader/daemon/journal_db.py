"""The journal's sqlite connection, kept writable when its disk fills up.

The journal usually lives in the run directory, on the disk training fills with
checkpoints. A full disk must not stop the daemon (its uploads need no local
space, and retention frees the disk), so:

1. a small reserve file is kept beside the journal (:func:`make_reserve`); when a
   write fails for lack of space, the reserve is released and the write retried
   (the reserve is re-created once space is back);
2. if the disk is still full, the journal goes on in memory and is saved to its
   file as soon as there is room (tried every few seconds, on :meth:`JournalDb.flush`
   with ``force`` and at :meth:`JournalDb.close`).

The connections are opened with ``check_same_thread=False``: the daemon runs its
journal calls in worker threads, one at a time.

Example::

    db = JournalDb(path, schema)
    db.write("UPDATE files SET state = 'done' WHERE path = ?", ("ep1.pt",))
    rows = db.db.execute("SELECT * FROM files").fetchall()
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

from uploader.errors import ConfigError, UploaderError

__all__ = [
    "JournalDb",
    "JournalFullError",
    "JournalTables",
    "RESERVE_NAME",
    "RESERVE_BYTES",
    "make_reserve",
    "room",
]

log = logging.getLogger(__name__)

#: Space kept aside so the journal can still record progress when the disk fills up.
RESERVE_NAME = ".ckpt-uploader.reserve"
RESERVE_BYTES = 2 << 20
_FLUSH_EVERY = 5.0  # seconds between attempts to save an in-memory journal


class JournalFullError(UploaderError):
    """The journal's disk is full even after releasing the space reserve."""


class JournalTables:
    """Tables of their own in the journal ``db`` (sessions, chunks): every call holds
    ``lock`` (None: the caller holds the journal's lock already)."""

    def __init__(self, db: JournalDb, lock: threading.Lock | None = None) -> None:
        self._conn = db
        self._lock: contextlib.AbstractContextManager[object] = (
            lock if lock is not None else contextlib.nullcontext()
        )

    def locked(self, lock: threading.Lock) -> Self:
        """The same records, each call holding ``lock`` (for the upload threads)."""
        return type(self)(self._conn, lock)

    def _rows(self, sql: str, params: tuple[object, ...] = ()) -> list[sqlite3.Row]:
        try:
            return list(self._conn.db.execute(sql, params))
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):  # a journal of an earlier version, read-only
                return []
            raise


def _is_full(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "full" in text or "no space" in text


def room(folder: Path) -> int:
    """Bytes free for this user in ``folder``'s filesystem (-1: unknown)."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return -1
    return st.f_bavail * st.f_frsize


def make_reserve(folder: str | os.PathLike[str]) -> bool:
    """Set aside ``RESERVE_BYTES`` in ``folder`` for the journal.

    Called by the daemon, and by a training process before it starts its worker, so
    that the reserve exists before checkpoints can fill the disk. Skipped (False)
    when the disk has less than four times that much room.
    """
    reserve = Path(folder) / RESERVE_NAME
    if reserve.exists():
        return True
    try:
        if room(reserve.parent) < 4 * RESERVE_BYTES:
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


class JournalDb:
    """The sqlite connection of the journal at ``path`` (see the module docstring).

    Args:
        path: the sqlite file.
        schema: the SQL script creating the tables (run on every writable open, so a
            journal of an earlier version gains the tables it lacks).
        readonly: open for reading only (no schema, no reserve).
        version: the schema version (sqlite's ``user_version``): an older journal is
            upgraded to it; a newer one, written by a later release, is refused.
        upgrade: run on an older journal before ``schema``: alters what
            ``CREATE ... IF NOT EXISTS`` cannot (a column added to a table).
    """

    def __init__(
        self,
        path: Path,
        schema: str,
        readonly: bool = False,
        version: int = 0,
        upgrade: Callable[[sqlite3.Connection], None] | None = None,
    ) -> None:
        self.path = path
        self._schema = schema
        self._upgrade = upgrade
        self._version = version
        # While the disk is full, ``db`` is in memory and ``_disk`` holds the
        # connection to the file, to save to once there is room.
        self._disk: sqlite3.Connection | None = None
        self._flush_tried = 0.0
        self._unsaved = 0
        if readonly:
            self.db = sqlite3.connect(
                f"file:{path}?mode=ro",
                uri=True,
                isolation_level=None,
                timeout=10,
                check_same_thread=False,
            )
        else:
            self.db = sqlite3.connect(
                path, isolation_level=None, timeout=10, check_same_thread=False
            )
            try:
                self._prepare(self.db)
            except sqlite3.OperationalError as exc:
                if not _is_full(exc):
                    raise
                self._to_memory()
        self.db.row_factory = sqlite3.Row
        self._reserve = path.parent / RESERVE_NAME
        self._reserve_checked = 0.0
        if not readonly:
            self._make_reserve()

    def _prepare(self, db: sqlite3.Connection) -> None:
        db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: every commit survives a crash or kill -9 of this
        # process; Journal.sync() forces the disk before anything destructive.
        db.execute("PRAGMA synchronous=NORMAL")
        found = int(db.execute("PRAGMA user_version").fetchone()[0])
        if found > self._version:
            raise ConfigError(
                f"the journal {self.path} was written by a newer ckpt-uploader (schema "
                f"{found}, this one knows {self._version}); upgrade ckpt-uploader, or move "
                "the journal away to start afresh (verified files are then checked again)"
            )
        if found < self._version and self._upgrade is not None:
            self._upgrade(db)  # tables of the older schema, before its new indexes
        db.executescript(self._schema)
        if found < self._version:
            db.execute(f"PRAGMA user_version = {int(self._version)}")
            if found:
                log.info("upgraded the journal %s to schema %d", self.path, self._version)

    @property
    def in_memory(self) -> bool:
        """True while the disk is full and the changes are held in memory."""
        return self._disk is not None

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
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self.db.execute("PRAGMA wal_autocheckpoint=64")
        log.warning(
            "the disk holding the journal %s is full: released its %d MiB reserve to keep "
            "recording uploads; free space there (e.g. --keep-local) or move the journal "
            "with --state-dir",
            self.path,
            RESERVE_BYTES >> 20,
        )
        return True

    def write(self, sql: str, params: tuple[Any, ...] = ()) -> int:
        """Execute one write; return the number of rows it changed. On a full disk:
        release the reserve and retry; if the disk is still full, keep the journal in
        memory until there is room again."""
        if self._disk is not None:
            n = self.db.execute(sql, params).rowcount
            self._unsaved += 1
            self.flush()
            return n
        delay = 0.05
        for attempt in range(4):
            try:
                n = self.db.execute(sql, params).rowcount
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
                n = self.db.execute(sql, params).rowcount
                self._unsaved += 1
                return n
            if not self._reserve.exists() and time.monotonic() - self._reserve_checked > 10:
                self._make_reserve()
            return n
        raise AssertionError("unreachable")  # pragma: no cover

    def _to_memory(self) -> None:
        """Go on with a copy of the journal in memory (its disk is full)."""
        mem = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        try:
            self.db.backup(mem)
        except sqlite3.Error:  # nothing readable on disk yet (created on a full disk)
            pass
        mem.executescript(self._schema)
        mem.row_factory = sqlite3.Row
        self._disk, self.db = self.db, mem
        self._flush_tried = time.monotonic()
        log.error(
            "the disk holding the journal %s is full: keeping the journal in memory until "
            "there is room again (uploads go on; if this process is killed before then, "
            "files verified meanwhile are uploaded again at the next start). Free space "
            "there or move the journal with --state-dir",
            self.path,
        )

    def flush(self, force: bool = False) -> bool:
        """Save an in-memory journal to its file (at most every few seconds unless
        ``force``); True when the journal is on disk."""
        disk = self._disk
        if disk is None:
            return True
        now = time.monotonic()
        if not force and now - self._flush_tried < _FLUSH_EVERY:
            return False
        self._flush_tried = now
        try:
            self.db.backup(disk)
            self._prepare(disk)
        except sqlite3.Error as exc:
            if not (isinstance(exc, sqlite3.OperationalError) and _is_full(exc)):
                log.warning("cannot save the journal %s yet: %s", self.path, exc)
            return False
        disk.row_factory = sqlite3.Row
        self.db.close()
        self.db, self._disk = disk, None
        log.warning(
            "the journal %s is saved on disk again (%d change(s) kept in memory meanwhile)",
            self.path,
            self._unsaved,
        )
        self._unsaved = 0
        return True

    def close(self) -> None:
        """Save (if held in memory) and close."""
        if self._disk is not None and not self.flush(force=True):
            log.error(
                "the journal %s could not be saved: its disk is still full; %d change(s) "
                "are lost from it. Uploads verified meanwhile are in the store; the next "
                "start uploads those files again",
                self.path,
                self._unsaved,
            )
        if self._disk is not None:
            self._disk.close()
        self.db.close()
