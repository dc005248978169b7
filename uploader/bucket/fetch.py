"""Restore whole checkpoints from the bucket: every file verified against the manifest.

:func:`fetch_entry` downloads one committed checkpoint (a :class:`PointerEntry`):

* a single-file checkpoint lands as ``dest`` (a file path), or as ``dest/<name>``
  when ``dest`` is an existing directory or ends with ``/``;
* a directory checkpoint lands as ``dest/<name>/...``: every file of its manifest,
  each checked against the size and digest the manifest records before it is
  renamed into place. A manifest stored as an object of its own is read and checked
  first (:func:`uploader.bucket.manifest.load_manifest`). The manifest's paths were
  checked when it was read (relative, no ``..``), and each target is checked again to
  lie inside ``dest``.
  A manifest whose paths would land on one file (names equal after Unicode
  normalisation and case folding, as on macOS and Windows file systems, or a file
  that is also another's folder) is refused before anything is downloaded. Its
  files are downloaded :data:`FILES_AT_ONCE` at a time (the ranges of large ones
  share the store's threads), so a checkpoint of many small files is not fetched
  one request after another; a failed file stops the ones not yet started, and
  its error is raised once those running have ended (``files=`` sets how many at a
  time: more for a store far away, whose first byte takes long).

:func:`find_checkpoint` resolves a name under a prefix (``exp/rank_0/checkpoint-16``,
or an alias such as ``exp/rank_0/last.ckpt``) through its rank's pointer.

A chunked checkpoint (``--dedup``) is restored the same way: each of its files is put
together from its chunks, in parallel, each chunk checked against its BLAKE3 name and the
whole file against its CRC64NVME (:func:`uploader.transfer.chunks.restore_file`);
:func:`stream_entry` feeds a single-file checkpoint's bytes to a reader in order, either
kind, as a pipelined load wants them.

Example::

    entry = find_checkpoint(store, "exp/rank_0/checkpoint-16")
    path = fetch_entry(store, entry, Path("restore/"))   # restore/checkpoint-16/
"""

from __future__ import annotations

import os
import re
import threading
import unicodedata
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from uploader.bucket.manifest import load_manifest
from uploader.bucket.pointer import PointerEntry, check_location, read_pointer
from uploader.errors import ConfigError, IntegrityError, UploaderError
from uploader.transfer.chunk_restore import restore_file, stream_chunks
from uploader.transfer.chunks import Chunk
from uploader.transfer.digest import Digest
from uploader.transfer.download import progress_bar

if TYPE_CHECKING:  # pragma: no cover
    from uploader.transfer.store import ObjectStore

__all__ = [
    "Download",
    "download_all",
    "fetch_entry",
    "find_checkpoint",
    "is_dir_dest",
    "stream_entry",
]

_RANK_NAME = re.compile(r"^(?:(.*)/)?rank_(\d+)/(.+)$")
#: Files of a directory checkpoint downloaded at once.
FILES_AT_ONCE = 16


def is_dir_dest(dest: str | os.PathLike[str]) -> bool:
    """A destination that means a directory: ends with a separator, or is one."""
    text = os.fspath(dest)
    return text.endswith(("/", os.sep)) or Path(text).is_dir()


def find_checkpoint(store: ObjectStore, name: str) -> PointerEntry | None:
    """The committed checkpoint ``{prefix}/rank_N/{checkpoint}`` (or an alias of one, then
    named as the alias), from rank N's pointer; None when ``name`` has no such form or
    no entry.

    A damaged pointer (unreadable, or a manifest path with ``..``) raises its
    IntegrityError unless ``name`` is an object of its own (then None: the object is
    fetched as such): a directory checkpoint is never fetched some other, unverified way.
    """
    m = _RANK_NAME.match(name.strip("/"))
    if m is None:
        return None
    try:
        pointer = read_pointer(store, m.group(1) or "", int(m.group(2)))
    except IntegrityError:
        if store.exists(name.strip("/")):
            return None
        raise
    except UploaderError:
        return None
    entry = pointer.entry(m.group(3)) if pointer is not None else None
    if entry is not None:
        # A run copied to another prefix: its objects are read from the copy.
        entry = check_location(entry, m.group(1) or "", int(m.group(2)))
    if entry is not None and not entry.is_directory and entry.name != m.group(3):
        entry = replace(entry, name=m.group(3))  # an alias lands under its own name
    return entry


def fetch_entry(
    store: ObjectStore,
    entry: PointerEntry,
    dest: str | os.PathLike[str],
    *,
    progress: bool = False,
    into: bool | None = None,
    fsync: bool = False,
    files: int = FILES_AT_ONCE,
) -> Path:
    """Download the checkpoint ``entry`` (see the module docstring); return its local path:
    the file, or the checkpoint's directory.

    ``into`` says whether ``dest`` is a directory to put the checkpoint in (default:
    :func:`is_dir_dest`; a directory checkpoint always goes inside ``dest``). ``fsync``:
    every file is on disk before it gets its name (see ``ObjectStore.download_file``).
    ``files``: files of a directory checkpoint downloaded at once (at least 1).
    """
    if into is None:
        into = is_dir_dest(dest)
    base = Path(dest)
    if not entry.is_directory and entry.chunked:
        entry = load_manifest(store, entry)
        f = entry.manifest[0]
        target = base / entry.name if into else base
        job = Download(entry.object, target, f.digest, f.size, f.chunks, entry.scope)
        download_all(store, [job], progress=progress, label=entry.name, fsync=fsync)
        return job.target
    if not entry.is_directory:
        target = base / entry.name if into else base
        return store.download_file(
            entry.object,
            target,
            progress=progress,
            expected_digest=entry.digest,
            expected_size=entry.size,
            require_digest=True,
            fsync=fsync,
        )
    entry = load_manifest(store, entry)
    root = base.absolute()
    top = root / entry.name
    _refuse_collisions(entry)
    jobs = []
    for f, obj in entry.objects():
        target = (root / f.path).absolute()
        if os.path.commonpath([str(root), os.path.normpath(target)]) != str(root):
            raise IntegrityError(
                f"manifest path {f.path!r} of {entry.name} would land outside {root}; "
                "the pointer is damaged or was not written by ckpt-uploader"
            )
        if target.is_dir():
            raise ConfigError(f"{target} is a directory; cannot restore {f.path} there")
        jobs.append(Download(obj, target, f.digest, f.size, f.chunks, entry.scope))
    download_all(store, jobs, files=files, progress=progress, label=entry.name, fsync=fsync)
    return top


@dataclass(frozen=True)
class Download:
    """One object to fetch to ``target``, checked against ``digest`` and ``size`` when
    given (else against what the store records)."""

    object: str
    target: Path
    digest: Digest | str | None = None
    size: int | None = None
    #: A chunked file's chunks (then ``object`` is not read) and the scope they are in.
    chunks: tuple[Chunk, ...] = ()
    scope: str | None = None


def download_all(
    store: ObjectStore,
    jobs: Sequence[Download],
    *,
    files: int = FILES_AT_ONCE,
    progress: bool = False,
    label: str = "",
    fsync: bool = False,
    done: Callable[[Download, Path], None] | None = None,
) -> None:
    """Fetch every job, ``files`` at a time (each one's ranges share the store's threads),
    under one progress bar; ``done(job, path)`` after each, from one thread at a time.
    A job given a digest must match it (``require_digest``). A failure stops the jobs not
    yet started, and the first failure in ``jobs`` order is raised once the running ones
    have ended."""
    if files < 1:
        raise ConfigError(f"files {files} must be at least 1")
    bar = progress_bar(progress, sum(j.size or 0 for j in jobs), label)
    lock = threading.Lock()

    def count(n: int) -> None:
        with lock:
            bar.update(n)

    def one(job: Download) -> None:
        if job.chunks:
            if job.scope is None or job.size is None or job.digest is None:
                raise IntegrityError(f"{job.target.name}: a chunked file without its manifest")
            restore_file(
                store,
                job.scope,
                job.chunks,
                job.target,
                job.size,
                job.digest,
                progress=count,
                fsync=fsync,
            )
            if done is not None:
                with lock:
                    done(job, job.target)
            return
        got = store.download_file(
            job.object,
            job.target,
            progress=count,
            expected_digest=job.digest,
            expected_size=job.size,
            require_digest=job.digest is not None,
            fsync=fsync,
        )
        if done is not None:
            with lock:
                done(job, got)

    try:
        with ThreadPoolExecutor(files, thread_name_prefix="fetch") as pool:
            futures = [pool.submit(one, job) for job in jobs]
            _, pending = wait(futures, return_when=FIRST_EXCEPTION)
            for fut in pending:
                fut.cancel()
        for fut in futures:  # the first failure in job order, once all have ended
            exc = None if fut.cancelled() else fut.exception()
            if exc is not None:
                raise exc
    finally:
        bar.close()


def _folded(path: str) -> str:
    """``path`` as a case-insensitive, normalising file system compares it."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", path).casefold())


def _refuse_collisions(entry: PointerEntry) -> None:
    """IntegrityError when two manifest paths of ``entry`` would be one file on disk: equal
    once folded (``Model.bin`` / ``model.bin``; ``é`` composed or not), or a file that is
    also the folder of another. Restoring it would silently keep only one of them."""
    seen: dict[str, str] = {}
    for f in entry.manifest:
        key = _folded(f.path)
        other = seen.get(key)
        if other is not None:
            raise IntegrityError(
                f"checkpoint {entry.name!r} names {other!r} and {f.path!r}, one file on "
                "case-insensitive or Unicode-normalising file systems; nothing was "
                "downloaded: give them distinct names at the source and save it again"
            )
        seen[key] = f.path
    for key, path in seen.items():
        parts = key.split("/")
        for i in range(1, len(parts)):
            folder = seen.get("/".join(parts[:i]))
            if folder is not None:
                raise IntegrityError(
                    f"checkpoint {entry.name!r} names {folder!r} as a file and as the folder "
                    f"of {path!r}; nothing was downloaded: the pointer is damaged or was not "
                    "written by ckpt-uploader (run 'ckpt-uploader push' on the run directory "
                    "to write it again)"
                )


def stream_entry(
    store: ObjectStore,
    entry: PointerEntry,
    sink: Callable[[memoryview], None],
    *,
    progress: bool | Callable[[int], None] = False,
) -> None:
    """Feed single-file checkpoint ``entry``'s bytes to ``sink`` in order, verified
    (a chunked one's chunks as they come; a plain object's ranges)."""
    if entry.is_directory:
        raise ConfigError(f"{entry.name} is a directory checkpoint; restore it with fetch_entry")
    if not entry.chunked:
        store.download_stream(
            entry.object,
            sink,
            progress=progress,
            expected_digest=entry.digest,
            expected_size=entry.size,
            require_digest=True,
        )
        return
    entry = load_manifest(store, entry)
    f = entry.manifest[0]
    assert entry.scope is not None
    bar = progress_bar(progress, f.size, entry.name)
    try:
        stream_chunks(store, entry.scope, f.chunks, sink, f.size, f.digest, progress=bar.update)
    finally:
        bar.close()
