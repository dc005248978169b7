"""Fetching one object to a local file: parallel ranged reads, verified, then renamed.

The object is written into a temporary file beside the destination
(``.<name>.<random>.part``, created exclusively, mode 0600), sized up front and
filled by ranged reads that run in parallel on the store's
:class:`uploader.transfer.parts.PartPool` threads, each writing its range at
its own offset. Each range is hashed as it arrives (see
:mod:`uploader.transfer.digest` for how that yields the file digest). The file
is fsynced, its size and digest compared with the recorded ones, and only then
renamed into place and its folder fsynced; on any failure the temporary file
is removed, so the destination holds either the verified object or what it
held before.

A failed range is retried on its own (the store's ``call``), its progress
taken back first.

Example::

    downloader = Downloader(backend, pool, call, part_size=8 << 20)
    downloader.download("run/ep1.pt", size, digest, Path("/tmp/ep1.pt"), 1 << 20, True)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import uuid
from pathlib import Path
from typing import Any

from uploader.errors import IntegrityError
from uploader.transfer.backends.base import Backend
from uploader.transfer.digest import Digest, PartHasher
from uploader.transfer.files import fsync_dir
from uploader.transfer.parts import PartPool
from uploader.transfer.upload import Call, ProgressFn

__all__ = ["Downloader"]

MiB = 1 << 20


class Downloader:
    """Downloads of one store: its backend, its part pool and its retrying ``call``.

    ``part_size`` is the range size for objects whose digest does not name
    the upload's parts.
    """

    def __init__(self, backend: Backend, pool: PartPool, call: Call, part_size: int) -> None:
        self.backend = backend
        self.pool = pool
        self.call = call
        self.part_size = part_size

    def download(
        self,
        name: str,
        size: int,
        digest: Digest | None,
        target: Path,
        chunk_size: int,
        progress: bool | ProgressFn,
    ) -> Path:
        """Fetch object ``name`` (``size`` bytes) to file ``target``, checked against
        ``digest`` when there is one; raise IntegrityError on a mismatch."""
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.part"
        # Read-write: a plain sha256 over several ranges is checked by reading the file back.
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        bar = _progress_bar(progress, size, target.name)
        try:
            if size:
                os.ftruncate(fd, size)
            self._fetch(name, fd, size, digest, chunk_size, bar)
            os.fsync(fd)
            os.close(fd)
            fd = -1
            if os.path.getsize(tmp) != size:
                raise IntegrityError(
                    f"{name}: downloaded {os.path.getsize(tmp)} bytes, expected {size}"
                )
            os.replace(tmp, target)
            fsync_dir(target.parent)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        finally:
            bar.close()
        return target

    def _fetch(
        self, name: str, fd: int, size: int, digest: Digest | None, chunk_size: int, bar: Any
    ) -> None:
        lock = threading.Lock()

        def fetch_range(start: int, length: int) -> bytes:
            def attempt() -> bytes:
                h = hashlib.sha256()
                got = 0
                try:
                    for chunk in self.backend.read_range(name, start, length, chunk_size):
                        if got + len(chunk) > length:
                            chunk = chunk[: length - got]
                        os.pwrite(fd, chunk, start + got)
                        h.update(chunk)
                        got += len(chunk)
                        with lock:
                            bar.update(len(chunk))
                        if got == length:
                            break
                except BaseException:
                    with lock:
                        bar.update(-got)
                    raise
                if got != length:
                    with lock:
                        bar.update(-got)
                    raise IntegrityError(
                        f"{name}: read {got} of {length} bytes at offset "
                        f"{start}; the object is shorter than its listing"
                    )
                return h.digest()

            return self.call(attempt, f"download {name} [{start}:{start + length}]")

        actual: Digest | None = None
        if digest is not None and digest.algo == "sha256-parts" and size > digest.part_size:
            # Ranges aligned to the upload's parts: each worker hashes its own part.
            part = digest.part_size
            hasher = PartHasher(size, part)

            def one(i: int) -> None:
                hasher.add(i, fetch_range(i * part, min(part, size - i * part)))

            self.pool.run(one, range(hasher.count), threading.Event())
            actual = hasher.digest()
        elif size <= self.part_size:
            actual = Digest("sha256", fetch_range(0, size).hex())
        else:
            part = self.part_size

            def plain(i: int) -> None:
                fetch_range(i * part, min(part, size - i * part))

            self.pool.run(plain, range(-(-size // part)), threading.Event())
            if digest is not None:
                # A plain sha256 of a larger object: one pass over the written file.
                actual = _fd_sha256(fd, size)
        if digest is not None and actual != digest:
            raise IntegrityError(
                f"{name}: downloaded bytes have digest {actual}, but {digest} "
                "was recorded at upload; the object is corrupt, do not use it"
            )


def _fd_sha256(fd: int, size: int) -> Digest:
    h = hashlib.sha256()
    pos = 0
    while pos < size:
        data = os.pread(fd, min(4 * MiB, size - pos), pos)
        if not data:
            break
        h.update(data)
        pos += len(data)
    return Digest("sha256", h.hexdigest())


class _NullBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


class _FnBar(_NullBar):
    def __init__(self, fn: ProgressFn) -> None:
        self.fn = fn

    def update(self, n: int) -> None:
        self.fn(n)


def _progress_bar(progress: bool | ProgressFn, total: int, desc: str) -> Any:
    """A tqdm bar when ``progress`` is True, the callable itself, or nothing."""
    if callable(progress):
        return _FnBar(progress)
    if not progress:
        return _NullBar()
    from tqdm import tqdm

    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=desc,
        leave=False,
        dynamic_ncols=True,
    )
