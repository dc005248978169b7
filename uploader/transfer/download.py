"""Fetching one object: parallel ranged reads, verified; to a file, or in order to a consumer.

To a file (:meth:`Downloader.download`): the object is written into a temporary
file beside the destination (``.<name>.<random>.part``, created exclusively,
mode 0600), sized up front and filled by ranged reads that run in parallel on
the store's :class:`uploader.transfer.parts.PartPool` threads. A range is one
request (8-64 MiB by the object's size, or the store's ``download_part_size``);
it is received in pieces into one of the pool's reusable 4 MiB buffers (the
backend's ``read_range_into``: on S3 straight from the socket), each piece
hashed and written at its offset (``pwrite``). Where the digest names the
upload's parts, a range holds whole parts and each is hashed on its own (see
:mod:`uploader.transfer.digest` for how that yields the file digest); hashlib
lets go of the interpreter lock, so threads hash while others receive. The
file is fsynced, its size and digest compared with the recorded ones, and only
then renamed into place and its folder fsynced; on any failure the temporary
file is removed, so the destination holds either the verified object or what
it held before.

In order (:meth:`Downloader.stream`): the same parallel ranges, each received
whole into a buffer of its own (at most ``concurrency + 2`` at once), handed to
a consumer in order as they complete, and the digest checked at the end; the
consumer (``ckpt.load``'s decompressor) works while later ranges arrive.

A failed range is retried on its own (the store's ``call``); progress counts a
range once it is complete.

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
from collections.abc import Callable
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
#: Smallest piece a download range is received in (one buffer of the store's pool).
MIN_PIECE = 4 * MiB
#: Bounds of a ranged read chosen by size; a stream holds whole ranges, so its are smaller.
MIN_RANGE = 8 * MiB
MAX_RANGE = 64 * MiB
STREAM_RANGE = 16 * MiB


class Downloader:
    """Downloads of one store: its backend, its part pool and its retrying ``call``.

    ``part_size`` is the size of one ranged read (one request) of a download to a
    file; None chooses it by the object's size (:func:`range_size`). For an object
    whose digest names the upload's parts, it is rounded down to whole upload parts
    (at least one).
    """

    def __init__(
        self, backend: Backend, pool: PartPool, call: Call, part_size: int | None = None
    ) -> None:
        self.backend = backend
        self.pool = pool
        self.call = call
        self.part_size = part_size

    def range_size(self, size: int, largest: int = MAX_RANGE) -> int:
        """The ranged-read size for an object of ``size`` bytes: ``part_size`` when set,
        else enough ranges to keep every worker busy twice over, each between
        :data:`MIN_RANGE` and ``largest`` (few large requests cost the least CPU)."""
        if self.part_size is not None:
            return self.part_size
        want = -(-size // (2 * self.pool.concurrency))
        return max(MIN_RANGE, min(largest, -(-want // MiB) * MiB))

    # -- to a file -----------------------------------------------------------------------
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
        plan = _Plan(size, digest, self.range_size(size))
        lock = threading.Lock()
        piece = max(chunk_size, MIN_PIECE)

        def fetch_range(i: int, buf: memoryview) -> list[bytes]:
            start, length = plan.range(i)

            def attempt() -> list[bytes]:
                hashes = _RangeHasher(plan, start, length, hashed)
                got = 0
                for view in self.backend.read_range_into(name, start, length, buf):
                    hashes.update(view)
                    _pwrite_all(fd, view, start + got)
                    got += len(view)
                if got != length:
                    raise _short(name, got, length, start)
                return hashes.digests()

            digests: list[bytes] = self.call(attempt, f"download {name} [{start}:{start + length}]")
            with lock:
                bar.update(length)
            return digests

        hasher = PartHasher(size, plan.hash_part) if plan.parts_digest else None
        # A plain sha256 can be computed while receiving only when one range is all.
        hashed = digest is not None and (plan.parts_digest or plan.count == 1)
        whole: list[bytes] = []

        def one(i: int) -> None:
            with self.pool.buffer(piece) as raw:
                digests = fetch_range(i, memoryview(raw)[:piece])
            if hasher is not None:
                first = plan.range(i)[0] // plan.hash_part
                for k, d in enumerate(digests):
                    hasher.add(first + k, d)
            else:
                whole.extend(digests)

        if plan.count == 1:
            one(0)  # one range: in this thread
        else:
            self.pool.run(one, range(plan.count), threading.Event())
        actual: Digest | None = None
        if hasher is not None:
            actual = hasher.digest()
        elif digest is not None and plan.count == 1:
            actual = Digest("sha256", whole[0].hex())
        elif digest is not None:
            # A plain sha256 of an object larger than one range: one pass over the file.
            actual = _fd_sha256(fd, size)
        _check(name, digest, actual)

    # -- to a consumer, in order -----------------------------------------------------------
    def stream(
        self,
        name: str,
        size: int,
        digest: Digest | None,
        sink: Callable[[memoryview], None],
        progress: bool | ProgressFn = False,
    ) -> None:
        """Fetch object ``name`` with parallel ranged reads and pass its bytes to ``sink``
        in order, as they arrive; then check ``digest``.

        ``sink`` runs in the calling thread and must not keep the view it is given.
        Its output must not be used before this returns: an IntegrityError (wrong
        digest) or any transfer error is raised after bytes have been passed on. When
        ``sink`` raises, the rest is still fetched and checked but not passed on: a
        wrong digest raises IntegrityError (the bytes were damaged), a right one
        raises what ``sink`` raised.
        At most ``concurrency + 2`` ranges are held in memory.
        """
        plan = _Plan(size, digest, self.range_size(size, STREAM_RANGE))
        window = self.pool.concurrency + 2
        cond = threading.Condition()
        ready: dict[int, memoryview] = {}
        free: list[bytearray] = []
        state: dict[str, Any] = {"next": 0, "error": None, "done": False}
        failed = threading.Event()
        hasher = PartHasher(size, plan.hash_part) if plan.parts_digest else None
        bar = _progress_bar(progress, size, name.rsplit("/", 1)[-1])

        def one(i: int) -> None:
            with cond:
                while i >= state["next"] + window and not failed.is_set():
                    cond.wait()
                if failed.is_set():
                    return
                buf = free.pop() if free else None
            start, length = plan.range(i)
            if buf is None or len(buf) < length:
                buf = bytearray(plan.range_size)
            view = memoryview(buf)[:length]

            def attempt() -> list[bytes]:
                got = 0
                for piece in self.backend.read_range_into(name, start, length, view):
                    got += len(piece)
                if got != length:
                    raise _short(name, got, length, start)
                hashes = _RangeHasher(plan, start, length, plan.parts_digest)
                hashes.update(view)  # hashlib lets go of the interpreter lock meanwhile
                return hashes.digests()

            digests = self.call(attempt, f"download {name} [{start}:{start + length}]")
            if hasher is not None:
                for k, d in enumerate(digests):
                    hasher.add(start // plan.hash_part + k, d)
            with cond:
                ready[i] = view
                cond.notify_all()

        def fetch_all() -> None:
            try:
                self.pool.run(one, range(plan.count), failed)
            except BaseException as exc:  # handed to the consumer
                with cond:
                    state["error"] = exc
            finally:
                with cond:
                    state["done"] = True
                    cond.notify_all()

        whole = hashlib.sha256() if hasher is None else None
        sink_error: Exception | None = None
        fetcher = threading.Thread(target=fetch_all, name="objstore-stream", daemon=True)
        fetcher.start()
        try:
            for i in range(plan.count):
                with cond:
                    while i not in ready and state["error"] is None and not state["done"]:
                        cond.wait()
                    if state["error"] is not None:
                        raise state["error"]
                    if i not in ready:
                        raise IntegrityError(f"{name}: range {i} was never fetched")
                    view = ready.pop(i)
                if whole is not None:
                    whole.update(view)
                if sink_error is None:
                    try:
                        sink(view)
                    except Exception as exc:
                        # Perhaps the bytes are damaged (a decoder chokes on them): the
                        # digest says which error is the real one, so keep checking.
                        sink_error = exc
                bar.update(len(view))
                with cond:
                    state["next"] = i + 1
                    free.append(view.obj)  # type: ignore[arg-type]
                    cond.notify_all()
        except BaseException:
            failed.set()
            with cond:
                cond.notify_all()
            raise
        finally:
            fetcher.join()
            bar.close()
        if state["error"] is not None:
            raise state["error"]
        actual = hasher.digest() if hasher is not None else None
        if whole is not None and digest is not None:
            actual = Digest("sha256", whole.hexdigest())
        _check(name, digest, actual)
        if sink_error is not None:
            raise sink_error


class _Plan:
    """How an object is cut into ranged reads, and how its digest is checked.

    With a ``sha256-parts`` digest each range holds whole upload parts, each hashed
    on its own; otherwise the object's bytes are hashed as one sha256.
    """

    def __init__(self, size: int, digest: Digest | None, part_size: int) -> None:
        self.size = size
        self.parts_digest = (
            digest is not None and digest.algo == "sha256-parts" and size > digest.part_size
        )
        if self.parts_digest:
            assert digest is not None
            self.hash_part = digest.part_size
            self.range_size = max(1, part_size // digest.part_size) * digest.part_size
        else:
            self.hash_part = max(size, 1)
            self.range_size = part_size
        self.count = max(1, -(-size // self.range_size))

    def range(self, i: int) -> tuple[int, int]:
        start = i * self.range_size
        return start, min(self.range_size, self.size - start)


class _RangeHasher:
    """sha256 of each upload part inside one range, fed in order (or of the range
    itself when the digest is one plain sha256)."""

    def __init__(self, plan: _Plan, start: int, length: int, enabled: bool = True) -> None:
        self.enabled = enabled
        self.part = plan.hash_part
        self.pos = start
        self.end = start + length
        self.done: list[bytes] = []
        self.h = hashlib.sha256()

    def update(self, view: memoryview) -> None:
        if not self.enabled:
            return
        while len(view):
            left = self.part - self.pos % self.part
            take = view[:left]
            self.h.update(take)
            self.pos += len(take)
            view = view[len(take) :]
            if self.pos % self.part == 0 or self.pos == self.end:
                self.done.append(self.h.digest())
                self.h = hashlib.sha256()

    def digests(self) -> list[bytes]:
        if self.enabled and not self.done and self.pos == self.end:
            return [self.h.digest()]  # an empty object
        return self.done


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _short(name: str, got: int, length: int, start: int) -> IntegrityError:
    return IntegrityError(
        f"{name}: read {got} of {length} bytes at offset {start}; "
        "the object is shorter than its listing"
    )


def _check(name: str, digest: Digest | None, actual: Digest | None) -> None:
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
