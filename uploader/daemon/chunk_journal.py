"""The journal's record of chunks (``--dedup``): each verified file's chunk list, and the
local index of the chunks a scope holds.

Two tables in the journal's sqlite file::

    file_chunks: path, size, mtime_ns, chunks (JSON [[blake3, size], ...]), new_bytes, stored_bytes
    chunk_index: scope, hash                       (a chunk known to be in the scope)
    chunk_scopes: scope, generation, seeded_at     (what the index was last checked against)

A file's chunk list is written before the file is recorded ``done``, for the version on
disk (size and mtime), so the committer can write the checkpoint's manifest after a
restart too. The index is a cache: a chunk found in it is not asked about, so the
common case (an unchanged tensor) costs no request. It is filled by the uploads, and
seeded by one listing of the scope's chunks when it is empty or when a garbage
collection ran in the scope since it was last seeded (the scope's generation, see
:mod:`uploader.bucket.gc`); a collection may have deleted what it lists.

The upload threads call it directly; each call takes the journal's lock.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Protocol

from uploader.bucket.pointer import PointerEntry
from uploader.daemon.journal_db import JournalTables
from uploader.transfer.chunks import Chunk, FileChunks
from uploader.transfer.digest import Digest

__all__ = ["CHUNKS_SCHEMA", "JournalChunks", "ScopeIndex", "with_chunks"]

CHUNKS_SCHEMA = """
CREATE TABLE IF NOT EXISTS file_chunks (
    path         TEXT PRIMARY KEY,  -- relative to the run directory
    size         INTEGER NOT NULL,  -- the version the chunks are of
    mtime_ns     INTEGER NOT NULL,
    digest       TEXT NOT NULL,
    chunks       TEXT NOT NULL,     -- JSON [[blake3 hex, size], ...]
    new_bytes    INTEGER NOT NULL,  -- bytes of chunks this upload added to the scope
    stored_bytes INTEGER NOT NULL,  -- the same chunks' bytes in the store (compressed)
    generation   TEXT NOT NULL      -- the scope's GC generation they were sent at
);
CREATE TABLE IF NOT EXISTS chunk_index (
    scope TEXT NOT NULL,
    hash  TEXT NOT NULL,
    PRIMARY KEY (scope, hash)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS chunk_scopes (
    scope      TEXT PRIMARY KEY,
    generation TEXT NOT NULL,       -- the scope's GC generation when the index was seeded
    seeded_at  REAL NOT NULL
);
"""

_BATCH = 500


class JournalChunks(JournalTables):
    """Chunk lists and the chunk index in the journal ``db``; every call holds ``lock``
    (None: the caller holds the journal's lock already)."""

    # -- a file's chunks ----------------------------------------------------------------
    def record_file(self, path: str, mtime_ns: int, chunks: FileChunks, generation: str) -> None:
        body = json.dumps([c.to_json() for c in chunks.chunks], separators=(",", ":"))
        with self._lock:
            self._conn.write(
                "INSERT OR REPLACE INTO file_chunks (path, size, mtime_ns, digest, chunks, "
                "new_bytes, stored_bytes, generation) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    path,
                    chunks.size,
                    mtime_ns,
                    str(chunks.digest),
                    body,
                    chunks.new_bytes,
                    chunks.stored_bytes,
                    generation,
                ),
            )

    def generation_of(self, path: str) -> str:
        """The scope generation ``path``'s recorded chunks were sent at ("" if none)."""
        with self._lock:
            rows = self._rows("SELECT generation FROM file_chunks WHERE path = ?", (path,))
        return str(rows[0]["generation"]) if rows else ""

    def of_file(self, path: str, size: int, mtime_ns: int) -> FileChunks | None:
        """The chunks recorded for this version of ``path`` (None: none recorded)."""
        with self._lock:
            rows = self._rows(
                "SELECT * FROM file_chunks WHERE path = ? AND size = ? AND mtime_ns = ?",
                (path, size, mtime_ns),
            )
        if not rows:
            return None
        r = rows[0]
        chunks = tuple(Chunk.from_json(c) for c in json.loads(r["chunks"]))
        return FileChunks(
            int(r["size"]),
            Digest.parse(r["digest"]),
            chunks,
            int(r["new_bytes"]),
            int(r["stored_bytes"]),
        )

    def forget_files(self, paths: Iterable[str]) -> None:
        with self._lock:
            for p in paths:
                self._conn.write("DELETE FROM file_chunks WHERE path = ?", (p,))

    # -- the index ------------------------------------------------------------------------
    def known(self, scope: str, hashes: Sequence[str]) -> set[str]:
        """Those of ``hashes`` the index holds for ``scope``."""
        out: set[str] = set()
        with self._lock:
            for i in range(0, len(hashes), _BATCH):
                batch = list(hashes[i : i + _BATCH])
                marks = ",".join("?" * len(batch))
                rows = self._rows(
                    f"SELECT hash FROM chunk_index WHERE scope = ? AND hash IN ({marks})",
                    (scope, *batch),
                )
                out.update(r["hash"] for r in rows)
        return out

    def add(self, scope: str, hashes: Iterable[str]) -> None:
        items = sorted(set(hashes))
        with self._lock:
            for i in range(0, len(items), _BATCH):
                batch = items[i : i + _BATCH]
                self._conn.write(
                    "INSERT OR IGNORE INTO chunk_index (scope, hash) VALUES "
                    + ",".join("(?, ?)" for _ in batch),
                    tuple(v for h in batch for v in (scope, h)),
                )

    def generation(self, scope: str) -> str | None:
        """The scope's GC generation the index was seeded at (None: never seeded)."""
        with self._lock:
            rows = self._rows("SELECT generation FROM chunk_scopes WHERE scope = ?", (scope,))
        return str(rows[0]["generation"]) if rows else None

    def reseed(self, scope: str, generation: str, hashes: Iterable[str]) -> None:
        """Replace the scope's index with ``hashes`` (a listing of its chunks made at
        ``generation``)."""
        with self._lock:
            self._conn.write("DELETE FROM chunk_index WHERE scope = ?", (scope,))
        self.add(scope, hashes)
        with self._lock:
            self._conn.write(
                "INSERT OR REPLACE INTO chunk_scopes (scope, generation, seeded_at) "
                "VALUES (?, ?, ?)",
                (scope, generation, time.time()),
            )

    def drop(self, scope: str, hashes: Iterable[str]) -> None:
        """Forget chunks the store no longer holds."""
        with self._lock:
            for h in hashes:
                self._conn.write("DELETE FROM chunk_index WHERE scope = ? AND hash = ?", (scope, h))


class ScopeIndex:
    """:class:`uploader.transfer.chunks.ChunkIndex` of one scope, over the journal."""

    def __init__(self, chunks: JournalChunks, scope: str) -> None:
        self.chunks = chunks
        self.scope = scope

    def known(self, hashes: Sequence[str]) -> set[str]:
        return self.chunks.known(self.scope, hashes)

    def add(self, chunks: Sequence[Chunk]) -> None:
        self.chunks.add(self.scope, (c.hash for c in chunks))


class _Record(Protocol):
    @property
    def path(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def mtime_ns(self) -> int: ...


def with_chunks(
    chunks: JournalChunks, scope: str | None, entry: PointerEntry, records: Mapping[str, _Record]
) -> PointerEntry:
    """``entry`` with each file's chunks (``--dedup``: ``scope`` not None) where the journal
    records them for the version verified (``records``: journal path -> file record); a
    file sent as a plain object keeps none."""
    if scope is None:
        return entry
    by_name = {r.name: r for r in records.values()}
    files, stored = [], 0
    for f in entry.manifest:
        r = by_name[f.path]
        got = chunks.of_file(r.path, r.size, r.mtime_ns)
        if got is not None and got.digest == Digest.parse(f.digest):
            f = replace(f, chunks=got.chunks)
            stored += got.stored_bytes
        files.append(f)
    if not any(f.chunks for f in files):
        return entry
    return replace(entry, files=tuple(files), scope=scope, stored=stored)
