"""Sending a checkpoint file as chunks (``--dedup``), for :class:`uploader.daemon.uploads.Uploads`.

:class:`ChunkSender` cuts the file (:mod:`uploader.transfer.chunking`), sends the
chunks its scope lacks (:class:`uploader.transfer.chunks.ChunkWriter`: the journal's
index first, then one HEAD), and records the file's chunk list in the journal before
the file is recorded ``done``. Before the first file, and again when a garbage
collection has run in the scope since (its generation changed,
:mod:`uploader.bucket.gc`), the index is seeded afresh from one listing of the scope's
chunks: a collection may have deleted chunks the index remembers.

Artifacts (files of no checkpoint) are not chunked: no manifest would reference their
chunks, and a collection would delete them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from uploader.bucket.gc import confirm_chunks, read_generation
from uploader.bucket.manifest import store_manifest
from uploader.bucket.pointer import ManifestFile, PointerEntry
from uploader.daemon.chunk_journal import JournalChunks, ScopeIndex
from uploader.errors import FileChangedError
from uploader.transfer.chunks import ChunkWriter, FileChunks, chunk_prefix
from uploader.transfer.store import ObjectStore

__all__ = ["ChunkSender"]

log = logging.getLogger(__name__)

#: How often (seconds) the scope's generation is read again before a file is sent.
GENERATION_EVERY = 30.0


class ChunkSender:
    """Sends files as chunks into ``scope``; ``chunks`` is the journal's (locked) record."""

    def __init__(self, store: ObjectStore, scope: str, chunks: JournalChunks, root: Path) -> None:
        self.store = store
        self.root = root
        self.scope = scope
        self.chunks = chunks
        self.writer = ChunkWriter(store, scope, ScopeIndex(chunks, scope))
        self._lock = threading.Lock()
        self._checked = 0.0
        #: Since start: chunk bytes sent (new to the scope) and reused.
        self.new_bytes = 0
        self.reused_bytes = 0

    def refresh(self, force: bool = False) -> str:
        """Seed the index when the scope's generation is not the one it was seeded at;
        return the generation (blocking: reads one small object, may list the chunks)."""
        with self._lock:
            now = time.monotonic()
            if not force and self._checked and now - self._checked < GENERATION_EVERY:
                return self.chunks.generation(self.scope) or ""
            gen = read_generation(self.store, self.scope)
            if self.chunks.generation(self.scope) != gen:
                prefix = chunk_prefix(self.scope) + "/"
                names = [i.name[len(prefix) :] for i in self.store.list(prefix)]
                self.chunks.reseed(self.scope, gen, names)
                log.info(
                    "dedup scope %r: %d chunk(s) in the store (generation %s)",
                    self.scope or "/",
                    len(names),
                    gen,
                )
            self._checked = now
            return gen

    def send(
        self,
        rel: str,
        path: Path,
        mtime_ns: int,
        progress: Callable[[int], None],
        before_send: Callable[[int], None] | None = None,
    ) -> FileChunks:
        """Send ``path`` (the run's ``rel``) as chunks and record its chunk list."""
        generation = self.refresh()
        result = self.writer.upload_file(path, progress, before_send)
        self.chunks.record_file(rel, mtime_ns, result, generation)
        with self._lock:
            self.new_bytes += result.new_bytes
            self.reused_bytes += result.size - result.new_bytes
        return result

    def store_manifest(self, entry: PointerEntry, paths: list[str]) -> PointerEntry:
        """Write chunked ``entry``'s manifest object once every chunk it names is
        confirmed beside any garbage collection of the scope (:func:`confirm_chunks`);
        ``paths`` are its files' journal paths. Blocking."""
        if entry.manifest_ref is not None:
            return entry
        rels = _journal_paths([f.path for f in entry.files], paths)
        files = [(f, self.chunks.generation_of(rels[f.path])) for f in entry.files if f.chunks]
        out: list[PointerEntry] = []

        def resend(f: ManifestFile) -> None:
            rel = rels[f.path]
            self.refresh(force=True)
            path = self.root / rel
            got = self.writer.upload_file(path)
            if got.chunks != f.chunks:
                raise FileChangedError(
                    f"{rel} changed after it was sent, and some of its chunks were "
                    "collected meanwhile; it is sent again"
                )

        def write() -> None:
            out.append(store_manifest(self.store, entry))

        confirm_chunks(self.store, self.scope, files, resend, write)
        return out[-1]


def _journal_paths(names: list[str], paths: list[str]) -> dict[str, str]:
    """The journal path of each manifest file name (inside its rank directory): the
    checkpoint's files share the rank directory's place in the run directory."""
    have = set(paths)
    first = next(p for p in paths if p == names[0] or p.endswith("/" + names[0]))
    base = first[: len(first) - len(names[0])]
    out = {n: base + n for n in names}
    missing = [n for n, p in out.items() if p not in have]
    if missing:
        raise KeyError(f"{missing[0]} is not among the checkpoint's files")
    return out
