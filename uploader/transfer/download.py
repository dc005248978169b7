"""Fetching one object: parallel ranged reads, verified; to a file, or in order to a consumer.

To a file (:meth:`Downloader.download`): the object is written into a temporary
file beside the destination (``.<name>.<random>.part``, created exclusively,
mode 0600), its disk space allocated up front (:func:`uploader.transfer.files.reserve`:
a full disk is an error before a byte is received) and filled by ranged reads that
run in parallel on the store's :class:`uploader.transfer.parts.PartPool` threads.
A range is one request (8-64 MiB by the object's size, or the store's
``download_part_size``). Where the space could be reserved, each range is received
straight into the file's pages, mapped 16 MiB at a time (:class:`_MappedRange`):
the kernel copies from the socket into the page cache and nothing else copies,
and concurrent ranges do not queue on the file's lock as positional writes do.
Elsewhere (a filesystem without fallocate or shared mappings) a range is received
in pieces into one of the pool's reusable 4 MiB buffers and written at its offset
(``pwrite``). Each piece is checksummed as it arrives, while it is in the
processor's cache: a CRC64NVME per range, combined in order; where a sha256 digest
names the upload's parts, a range holds whole parts and each is hashed on its own
(:mod:`uploader.transfer.rangecheck`); the checksums let go of the interpreter
lock, so threads checksum while others receive. The file's size and digest are compared with the recorded ones,
and only then is it renamed into place; on any failure the temporary file is
removed, so the destination holds either the verified object or what it held
before, and no process dies with a partial file under the destination's name.

Durability: with ``fsync`` the file is fsynced before the rename and its folder
after it, so the restored file survives a power loss once the call returns, at
the disk's write speed. Without it (the default, as for s5cmd, rclone and
boto3), the verified file is left in the page cache for the kernel to write
back: a power loss soon after the restore can tear it, while the bucket keeps
the checkpoint.

In order (:meth:`Downloader.stream`): the same parallel ranges, each received
whole into a buffer of its own (at most ``concurrency + 2`` at once), handed to
a consumer in order as they complete, and the digest checked at the end; the
consumer (``ckpt.load``'s decompressor) works while later ranges arrive.

A failed range is retried on its own (the store's ``call``); progress counts a
range once it is complete.

Example::

    downloader = Downloader(backend, pool, call, part_size=8 << 20)
    downloader.download("run/ep1.pt", size, digest, Path("/tmp/ep1.pt"), 1 << 20, True, fsync=False)
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from uploader.errors import IntegrityError, UploaderError
from uploader.transfer.backends.base import Backend, Ring
from uploader.transfer.digest import Digest
from uploader.transfer.files import fsync_dir, reserve
from uploader.transfer.parts import PartPool
from uploader.transfer.rangecheck import Plan, RangeHasher
from uploader.transfer.upload import Call, ProgressFn

__all__ = ["Downloader", "progress_bar"]

MiB = 1 << 20
#: Smallest piece a download range is received in (one buffer of the store's pool).
MIN_PIECE = 4 * MiB
#: Bounds of a ranged read chosen by size; a stream holds whole ranges, so its are smaller.
MIN_RANGE = 8 * MiB
MAX_RANGE = 64 * MiB
STREAM_RANGE = 16 * MiB
#: Bytes of the destination file mapped at once by each range being received.
MAP_WINDOW = 16 * MiB


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
        fsync: bool = False,
    ) -> Path:
        """Fetch object ``name`` (``size`` bytes) to file ``target``, checked against
        ``digest`` when there is one; raise IntegrityError on a mismatch. ``fsync``:
        the file is on disk, not only in the page cache, before it gets its name."""
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.part"
        # Read-write: a plain sha256 over several ranges is checked by reading the file back.
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        bar = progress_bar(progress, size, target.name)
        try:
            mapped = _reserve(fd, size, target) and _can_map(fd)
            if size and not mapped:
                os.ftruncate(fd, size)
            self._fetch(name, fd, size, digest, chunk_size, bar, mapped)
            if fsync:
                os.fsync(fd)
            written = os.fstat(fd).st_size
            os.close(fd)
            fd = -1
            if written != size:
                raise IntegrityError(f"{name}: downloaded {written} bytes, expected {size}")
            os.replace(tmp, target)
            if fsync:
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
        self,
        name: str,
        fd: int,
        size: int,
        digest: Digest | None,
        chunk_size: int,
        bar: Any,
        mapped: bool,
    ) -> None:
        plan = Plan(size, digest, self.range_size(size))
        lock = threading.Lock()
        piece = max(chunk_size, MIN_PIECE)

        def fetch_range(i: int, buf: memoryview | None) -> list[bytes]:
            start, length = plan.range(i)

            def attempt() -> list[bytes]:
                hashes = RangeHasher(plan, start, length, hashed)
                got = 0
                if buf is None:  # into the file's mapped pages
                    into = _MappedRange(fd, size, start, length)
                    try:
                        for view in self.backend.read_range_into(name, start, length, into):
                            hashes.update(view)
                            got += len(view)
                    finally:
                        into.close()
                else:
                    for view in self.backend.read_range_into(name, start, length, Ring(buf)):
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

        hasher = plan.hasher()
        # A plain sha256 can be computed while receiving only when one range is all.
        hashed = digest is not None and (plan.split or plan.count == 1)
        whole: list[bytes] = []

        def one(i: int) -> None:
            if mapped:
                digests = fetch_range(i, None)
            else:
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
        plan = Plan(size, digest, self.range_size(size, STREAM_RANGE))
        window = self.pool.concurrency + 2
        cond = threading.Condition()
        ready: dict[int, memoryview] = {}
        free: list[bytearray] = []
        state: dict[str, Any] = {"next": 0, "error": None, "done": False}
        failed = threading.Event()
        hasher = plan.hasher()
        bar = progress_bar(progress, size, name.rsplit("/", 1)[-1])

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
                hashes = RangeHasher(plan, start, length, plan.split)
                hashes.update(view)  # lets go of the interpreter lock meanwhile
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


class _MappedRange:
    """A :class:`uploader.transfer.backends.base.RangeTarget` over the destination
    file's own pages: the range ``[start, start+length)`` of the ``size``-byte file
    open as ``fd``, mapped :data:`MAP_WINDOW` bytes at a time (windows aligned to
    their size, so ranges of other threads may share a window's pages, never its
    bytes). A window is unmapped once neither this object nor a piece handed out
    from it refers to it, so a download maps at most two windows per range."""

    def __init__(self, fd: int, size: int, start: int, length: int) -> None:
        self.fd = fd
        self.size = size
        self.start = start
        self.end = start + length
        self._lo = self._hi = -1
        self._view: memoryview | None = None

    def window(self, offset: int, limit: int) -> memoryview:
        pos = self.start + offset
        if not self._lo <= pos < self._hi or self._view is None:
            self._view = None  # the old window goes with the last piece cut from it
            self._lo = pos - pos % MAP_WINDOW
            self._hi = min(self._lo + MAP_WINDOW, self.size)
            prot = mmap.PROT_READ | mmap.PROT_WRITE
            mm = mmap.mmap(self.fd, self._hi - self._lo, mmap.MAP_SHARED, prot, offset=self._lo)
            self._view = memoryview(mm)
        a = pos - self._lo
        return self._view[a : a + min(limit, self._hi - pos, self.end - pos)]

    def close(self) -> None:
        self._view = None


def _reserve(fd: int, size: int, target: Path) -> bool:
    """Allocate the download's disk space (see :func:`uploader.transfer.files.reserve`);
    a full disk is an UploaderError that says so before anything is received."""
    try:
        return reserve(fd, size)
    except OSError as exc:
        raise UploaderError(
            f"cannot make room for {target.name} ({size} bytes) in {target.parent}: "
            f"{exc.strerror}; free space there or download elsewhere"
        ) from exc


#: Whether files can be mapped for writing, per filesystem (device): asked once each.
_MAPPABLE: dict[int, bool] = {}


def _can_map(fd: int) -> bool:
    """Whether the file's pages can be mapped for writing (not on every filesystem)."""
    dev = os.fstat(fd).st_dev
    known = _MAPPABLE.get(dev)
    if known is not None:
        return known
    try:
        mmap.mmap(fd, 1, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE).close()
        _MAPPABLE[dev] = True
    except (OSError, ValueError):
        _MAPPABLE[dev] = False
    return _MAPPABLE[dev]


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _short(name: str, got: int, length: int, start: int) -> IntegrityError:
    return IntegrityError(
        f"{name}: read {got} of {length} bytes at offset {start}; "
        "the object is shorter than its listing or its recorded size"
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


def progress_bar(progress: bool | ProgressFn, total: int, desc: str) -> Any:
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
