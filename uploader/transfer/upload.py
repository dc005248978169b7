"""Sending one open file to the store: one request, parallel multipart, or one stream.

The file is read once and each part hashed once: read into a buffer of the
store's :class:`uploader.transfer.parts.PartPool` (one request, multipart), or
read straight into the body of a streamed request. A part's hash signs its
request (where the backend signs payloads) and goes into the file's digest
(:mod:`uploader.transfer.digest`). Which way a file goes:

* at most one part: one request from one buffer; the digest is known before the
  request, so it travels in the object's metadata (or, where the store keeps
  none, in a digest record written after the data);
* larger, backend with multipart: ``begin``, the parts in parallel on the pool's
  threads, ``complete`` (``abort`` on any failure), then the digest record;
* larger, backend without multipart (GCS): one streamed request whose body is
  read and hashed part by part as it is sent, then the digest record.

``before_commit`` runs just before the object becomes visible (before
``complete``, before the single request, before the last bytes of a stream), so
a file that changed while it was read never lands.

Example::

    uploader = Uploader(backend, pool, call)
    digest, parts = uploader.upload(fd, size, part_size, "run/ep1.pt", {}, None, check)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

from uploader.errors import IntegrityError
from uploader.transfer.backends.base import Backend
from uploader.transfer.digest import (
    DIGEST_META,
    DIGEST_SUFFIX,
    Digest,
    PartHasher,
    digest_record,
)
from uploader.transfer.files import pread_exact
from uploader.transfer.parts import PartPool

__all__ = ["Call", "ProgressFn", "Uploader"]

MiB = 1 << 20

ProgressFn = Callable[[int], None]
#: Runs a backend operation with the store's retries: ``call(fn, what)``.
Call = Callable[[Callable[[], Any], str], Any]


class Uploader:
    """Uploads of one store: its backend, its part pool and its retrying ``call``."""

    def __init__(self, backend: Backend, pool: PartPool, call: Call) -> None:
        self.backend = backend
        self.pool = pool
        self.call = call

    def upload(
        self,
        fd: int,
        size: int,
        part_size: int,
        name: str,
        meta: dict[str, str],
        progress: ProgressFn | None,
        before_commit: Callable[[], None] | None = None,
    ) -> tuple[Digest, int]:
        """Upload ``size`` bytes of ``fd`` as object ``name``; return its digest and parts."""
        if size <= part_size:
            return self._single(fd, size, name, meta, progress, before_commit), 1
        if self.backend.multipart:
            return self._multipart(fd, size, part_size, name, meta, progress, before_commit)
        return self._stream(fd, size, part_size, name, meta, progress, before_commit)

    def write_digest_record(self, name: str, size: int, digest: Digest) -> None:
        """Write the digest record of object ``name`` (see :mod:`uploader.transfer.digest`)."""
        body = digest_record(name, size, digest)
        record = name + DIGEST_SUFFIX
        self.call(
            lambda: self.backend.put_bytes(record, body, {}, hashlib.sha256(body).digest()),
            f"write digest of {name}",
        )

    def _single(
        self,
        fd: int,
        size: int,
        name: str,
        meta: dict[str, str],
        progress: ProgressFn | None,
        before_commit: Callable[[], None] | None,
    ) -> Digest:
        with self.pool.buffer(size) as buf:
            view = memoryview(buf)[:size]
            pread_exact(fd, view, 0)
            if before_commit is not None:
                before_commit()
            sha = hashlib.sha256(view).digest()
            digest = Digest("sha256", sha.hex())
            meta = dict(meta)
            if self.backend.keeps_metadata:
                meta[DIGEST_META] = str(digest)
            data = bytes(view)
        self.call(lambda: self.backend.put_bytes(name, data, meta, sha), f"upload {name}")
        if not self.backend.keeps_metadata:
            self.write_digest_record(name, size, digest)
        if progress:
            progress(size)
        return digest

    def _multipart(
        self,
        fd: int,
        size: int,
        part_size: int,
        name: str,
        meta: dict[str, str],
        progress: ProgressFn | None,
        before_commit: Callable[[], None] | None,
    ) -> tuple[Digest, int]:
        hasher = PartHasher(size, part_size)
        backend = self.backend
        upload_id = self.call(lambda: backend.begin(name, meta), f"start upload of {name}")
        tokens: dict[int, Any] = {}
        failed = threading.Event()

        def part(index: int) -> None:
            if failed.is_set():
                return
            start = index * part_size
            length = min(part_size, size - start)
            with self.pool.buffer(part_size) as buf:
                view = memoryview(buf)[:length]
                pread_exact(fd, view, start)
                sha = hashlib.sha256(view).digest()
                hasher.add(index, sha)
                tokens[index] = self.call(
                    lambda: backend.put_part(name, upload_id, index, start, view, sha),
                    f"upload part {index + 1}/{hasher.count} of {name}",
                )
            if progress:
                progress(length)

        try:
            self.pool.run(part, range(hasher.count), failed)
            if before_commit is not None:
                before_commit()
            self.call(
                lambda: backend.complete(name, upload_id, [tokens[i] for i in range(hasher.count)]),
                f"complete upload of {name}",
            )
        except BaseException:
            with contextlib.suppress(Exception):
                backend.abort(name, upload_id)
            raise
        digest = hasher.digest()
        self.write_digest_record(name, size, digest)
        return digest, hasher.count

    def _stream(
        self,
        fd: int,
        size: int,
        part_size: int,
        name: str,
        meta: dict[str, str],
        progress: ProgressFn | None,
        before_commit: Callable[[], None] | None,
    ) -> tuple[Digest, int]:
        holder: dict[str, PartHasher] = {}

        def chunks() -> Iterator[bytes]:
            # A fresh hasher for every attempt: a retried stream starts from byte 0.
            hasher = holder["h"] = PartHasher(size, part_size)
            step = min(part_size, 4 * MiB)
            for index in range(hasher.count):
                h = hashlib.sha256()
                start = index * part_size
                end = min(size, start + part_size)
                pos = start
                while pos < end:
                    data = os.pread(fd, min(step, end - pos), pos)
                    if not data:
                        raise IntegrityError(f"{name}: local file shrank during upload")
                    h.update(data)
                    pos += len(data)
                    if progress:
                        progress(len(data))
                    if pos >= size and before_commit is not None:
                        before_commit()  # before the last bytes go out
                    yield data
                hasher.add(index, h.digest())

        self.call(lambda: self.backend.put_stream(name, chunks(), meta, size), f"upload {name}")
        digest = holder["h"].digest()
        self.write_digest_record(name, size, digest)
        return digest, holder["h"].count
