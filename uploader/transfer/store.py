"""ObjectStore: move files between local disk and a bucket, streamed, verified, retried.

The store reads a file in parts, hashes each part once (that hash signs the
request and checks it in transit), uploads parts in parallel through the
backend's multipart protocol, and records the file's digest (see
``uploader.transfer.digest``) where a later download finds it: object metadata for a
file of one part (the digest is known before its single request), else a small
sidecar object ``<name>.ckpt-digest`` written after the data. Downloads use
parallel ranged reads into a temporary file beside the destination, hash each
part as it arrives, and rename only when size and digest match.

Memory is bounded by ``concurrency`` buffers of ``part_size`` bytes shared by
every transfer of the store, whatever the number and size of files.

Example::

    store = ObjectStoreHparams(provider="local", container="/tmp/bucket").initialize_object(
        create_container=True)
    result = store.upload_file("ep1.pt", "run1/rank_0/ep1.pt")
    store.download_file("run1/rank_0/ep1.pt", "/tmp/restore/ep1.pt")
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import queue
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uploader.config.hparams import ObjectStoreHparams
from uploader.errors import ConfigError, IntegrityError, ObjectNotFoundError, UploaderError
from uploader.redact import redact
from uploader.transfer.backends.base import Backend, ObjectInfo
from uploader.transfer.digest import Digest, PartHasher
from uploader.transfer.retry import RetryPolicy

__all__ = [
    "ObjectStore",
    "ObjectStat",
    "UploadResult",
    "DIGEST_SUFFIX",
    "DIGEST_META",
    "check_object_name",
]

log = logging.getLogger("uploader.transfer.store")

MiB = 1 << 20
DIGEST_SUFFIX = ".ckpt-digest"
#: Metadata key for the digest; letters only, valid on S3, Azure and GCS alike.
DIGEST_META = "ckptdigest"
DEFAULT_PART_SIZE = 8 * MiB
DEFAULT_CONCURRENCY = 4

ProgressFn = Callable[[int], None]


@dataclass(frozen=True)
class UploadResult:
    name: str
    size: int
    digest: Digest
    parts: int
    retries: int = 0


@dataclass(frozen=True)
class ObjectStat:
    name: str
    size: int
    digest: Digest | None
    metadata: Mapping[str, str] = field(default_factory=dict)
    etag: str | None = None
    mtime: float | None = None


def make_backend(hparams: ObjectStoreHparams) -> Backend:
    family = hparams.family
    if family == "local":
        from uploader.transfer.backends.local import LocalBackend

        return LocalBackend(hparams)
    if family == "s3":
        from .backends.s3 import S3Backend

        return S3Backend(hparams)
    if family == "azure":
        from uploader.transfer.backends.azure import AzureBackend

        return AzureBackend(hparams)
    if family == "gcs":
        from uploader.transfer.backends.gcs import GCSBackend

        return GCSBackend(hparams)
    raise ConfigError(f"no backend for provider {hparams.provider!r}")  # pragma: no cover


class _Counter:
    def __init__(self) -> None:
        self.n = 0
        self._lock = threading.Lock()

    def __call__(self, *_: Any) -> None:
        with self._lock:
            self.n += 1


class ObjectStore:
    """A container in an object store, with verified streaming transfers.

    Args:
        hparams: which store (see :class:`ObjectStoreHparams`).
        part_size: bytes per part for multipart uploads and parallel downloads
            (default 8 MiB; grown automatically so no object needs more than the
            provider's part limit, 10,000 on S3).
        concurrency: parts in flight at once, across all transfers of this store.
        retry: bounds for retrying transient failures.
        create_container: create the container when it does not exist.
        check: look the container up now, so a wrong name or bad credentials fail
            here with a clear error rather than at the first upload.
        backend: a ready backend instance (tests and advanced use).
    """

    def __init__(
        self,
        hparams: ObjectStoreHparams,
        *,
        part_size: int = DEFAULT_PART_SIZE,
        concurrency: int = DEFAULT_CONCURRENCY,
        retry: RetryPolicy | None = None,
        create_container: bool = False,
        check: bool = True,
        backend: Backend | None = None,
    ) -> None:
        if concurrency < 1 or concurrency > 64:
            raise ConfigError(f"concurrency {concurrency} must be between 1 and 64")
        self.hparams = hparams
        self.backend = backend or make_backend(hparams)
        if part_size < self.backend.min_part_size or part_size > self.backend.max_part_size:
            raise ConfigError(
                f"part size {part_size} is outside {self.backend.min_part_size}-"
                f"{self.backend.max_part_size} bytes for provider {hparams.provider!r}"
            )
        self.part_size = part_size
        self.concurrency = concurrency
        self.retry = retry or RetryPolicy()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._buffers: queue.LifoQueue[bytearray] = queue.LifoQueue()
        self._buffer_slots = threading.Semaphore(concurrency)
        self.retries = _Counter()
        if check:
            self.retry.call(
                lambda: self.backend.check_container(create_container),
                f"checking container {hparams.container!r}",
                self.retries,
            )

    # -- lifecycle ---------------------------------------------------------------------
    def __enter__(self) -> ObjectStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        self.backend.close()

    def __repr__(self) -> str:
        return f"ObjectStore({self.hparams!r}, part_size={self.part_size}, concurrency={self.concurrency})"

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                # One extra worker per slot lets downloads and uploads overlap safely.
                self._pool = ThreadPoolExecutor(
                    max_workers=self.concurrency, thread_name_prefix="objstore"
                )
            return self._pool

    @contextlib.contextmanager
    def _buffer(self, size: int) -> Iterator[bytearray]:
        self._buffer_slots.acquire()
        try:
            try:
                buf = self._buffers.get_nowait()
            except queue.Empty:
                buf = bytearray(size)
            if len(buf) < size:
                buf = bytearray(size)
            yield buf
            self._buffers.put(buf)
        finally:
            self._buffer_slots.release()

    def _call(self, fn: Callable[[], Any], what: str) -> Any:
        return self.retry.call(fn, what, self.retries)

    def effective_part_size(self, size: int) -> int:
        """The part size used for a file of ``size`` bytes (grown to fit the part limit)."""
        part = self.part_size
        need = -(-size // self.backend.max_parts)
        if need > part:
            part = -(-need // MiB) * MiB
        if part > self.backend.max_part_size:
            raise ConfigError(
                f"a file of {size} bytes exceeds the provider's largest object "
                f"({self.backend.max_parts} parts of {self.backend.max_part_size} bytes)"
            )
        return part

    # -- upload ------------------------------------------------------------------------
    def upload_file(
        self,
        path: str | os.PathLike[str],
        object_name: str,
        metadata: Mapping[str, str] | None = None,
        progress: ProgressFn | None = None,
        verify: bool = True,
    ) -> UploadResult:
        """Upload a file in constant memory; return its size and digest.

        The file must not change while it is read: a change in size or mtime
        raises IntegrityError and nothing is committed.
        """
        object_name = check_object_name(object_name)
        meta = {k.lower(): str(v) for k, v in (metadata or {}).items()}
        retries_before = self.retries.n
        with open(path, "rb", buffering=0) as f:
            fd = f.fileno()
            st = os.fstat(fd)
            size = st.st_size
            part_size = self.effective_part_size(size)

            def unchanged() -> None:
                # Checked before the object is committed, so a torn copy never lands.
                after = os.fstat(fd)
                if (after.st_size, after.st_mtime_ns) != (size, st.st_mtime_ns):
                    raise IntegrityError(
                        f"{path} changed while it was uploaded; upload it again once it is complete"
                    )

            if size <= part_size:
                digest = self._upload_single(fd, size, object_name, meta, progress, unchanged)
                parts = 1
            elif self.backend.multipart:
                digest, parts = self._upload_multipart(
                    fd, size, part_size, object_name, meta, progress, unchanged
                )
            else:
                digest, parts = self._upload_stream(
                    fd, size, part_size, object_name, meta, progress, unchanged
                )
            unchanged()
        if verify:
            info = self._call(lambda: self.backend.stat(object_name), f"stat {object_name}")
            if info.size != size:
                raise IntegrityError(
                    f"{object_name}: the store holds {info.size} bytes after "
                    f"uploading {size}; the upload will be retried"
                )
        log.debug("uploaded %s (%d bytes, %d parts, %s)", object_name, size, parts, digest)
        return UploadResult(object_name, size, digest, parts, self.retries.n - retries_before)

    def _upload_single(
        self,
        fd: int,
        size: int,
        name: str,
        meta: dict[str, str],
        progress: ProgressFn | None,
        before_commit: Callable[[], None] | None = None,
    ) -> Digest:
        with self._buffer(size) as buf:
            view = memoryview(buf)[:size]
            _pread_exact(fd, view, 0)
            if before_commit is not None:
                before_commit()
            sha = hashlib.sha256(view).digest()
            digest = Digest("sha256", sha.hex())
            meta = dict(meta)
            if self.backend.keeps_metadata:
                meta[DIGEST_META] = str(digest)
            data = bytes(view)
        self._call(lambda: self.backend.put_bytes(name, data, meta, sha), f"upload {name}")
        if not self.backend.keeps_metadata:
            self._write_sidecar(name, size, digest)
        if progress:
            progress(size)
        return digest

    def _upload_multipart(
        self,
        fd: int,
        size: int,
        part_size: int,
        name: str,
        meta: dict[str, str],
        progress: ProgressFn | None,
        before_commit: Callable[[], None] | None = None,
    ) -> tuple[Digest, int]:
        hasher = PartHasher(size, part_size)
        upload_id = self._call(lambda: self.backend.begin(name, meta), f"start upload of {name}")
        tokens: dict[int, Any] = {}
        failed = threading.Event()

        def part(index: int) -> None:
            if failed.is_set():
                return
            start = index * part_size
            length = min(part_size, size - start)
            with self._buffer(part_size) as buf:
                view = memoryview(buf)[:length]
                _pread_exact(fd, view, start)
                sha = hashlib.sha256(view).digest()
                hasher.add(index, sha)
                tokens[index] = self._call(
                    lambda: self.backend.put_part(name, upload_id, index, start, view, sha),
                    f"upload part {index + 1}/{hasher.count} of {name}",
                )
            if progress:
                progress(length)

        try:
            self._run_parallel(part, range(hasher.count), failed)
            if before_commit is not None:
                before_commit()
            self._call(
                lambda: self.backend.complete(
                    name, upload_id, [tokens[i] for i in range(hasher.count)]
                ),
                f"complete upload of {name}",
            )
        except BaseException:
            with contextlib.suppress(Exception):
                self.backend.abort(name, upload_id)
            raise
        digest = hasher.digest()
        self._write_sidecar(name, size, digest)
        return digest, hasher.count

    def _upload_stream(
        self,
        fd: int,
        size: int,
        part_size: int,
        name: str,
        meta: dict[str, str],
        progress: ProgressFn | None,
        before_commit: Callable[[], None] | None = None,
    ) -> tuple[Digest, int]:
        holder: dict[str, PartHasher] = {}

        def chunks() -> Iterator[bytes]:
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

        self._call(lambda: self.backend.put_stream(name, chunks(), meta, size), f"upload {name}")
        digest = holder["h"].digest()
        self._write_sidecar(name, size, digest)
        return digest, holder["h"].count

    def _run_parallel(
        self, fn: Callable[[int], None], items: range, failed: threading.Event
    ) -> None:
        """Run ``fn(i)`` for every item on the shared pool; the first error cancels the rest.

        Submission is lazy (at most 2 x concurrency queued), so a huge file does not
        create thousands of futures up front.
        """
        pool = self._executor()
        it = iter(items)
        pending: set[Future[None]] = set()
        try:
            while True:
                for i in it:
                    pending.add(pool.submit(fn, i))
                    if len(pending) >= 2 * self.concurrency:
                        break
                if not pending:
                    return
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for d in done:
                    exc = d.exception()
                    if exc is not None:
                        raise exc
        except BaseException:
            failed.set()
            for f in pending:
                f.cancel()
            wait(pending)
            raise

    # -- digests -----------------------------------------------------------------------
    def _write_sidecar(self, name: str, size: int, digest: Digest) -> None:
        body = json.dumps({"object": name, "size": size, "digest": str(digest)}).encode()
        sidecar = name + DIGEST_SUFFIX
        self._call(
            lambda: self.backend.put_bytes(sidecar, body, {}, hashlib.sha256(body).digest()),
            f"write digest of {name}",
        )

    def stat(self, object_name: str) -> ObjectStat:
        """Size, digest (from metadata or the sidecar) and metadata of an object."""
        object_name = check_object_name(object_name)
        info: ObjectInfo = self._call(lambda: self.backend.stat(object_name), f"stat {object_name}")
        digest: Digest | None = None
        raw = info.metadata.get(DIGEST_META)
        if raw:
            with contextlib.suppress(IntegrityError):
                digest = Digest.parse(raw)
        if digest is None:
            try:
                side = json.loads(self.get_bytes(object_name + DIGEST_SUFFIX))
                digest = Digest.parse(str(side["digest"]))
                if int(side.get("size", -1)) != info.size:
                    # Keep the recorded digest: a truncated or replaced object must
                    # fail verification, not pass as "no digest, size only".
                    log.warning(
                        "digest sidecar of %s names %s bytes but the object has %d; "
                        "the object was truncated or replaced, downloads will fail verification",
                        object_name,
                        side.get("size"),
                        info.size,
                    )
            except ObjectNotFoundError:
                pass
            except (ValueError, KeyError, TypeError, IntegrityError):
                log.warning("digest sidecar of %s is unreadable; ignoring it", object_name)
        meta = {k: v for k, v in info.metadata.items() if k != DIGEST_META}
        return ObjectStat(object_name, info.size, digest, meta, info.etag, info.mtime)

    def exists(self, object_name: str) -> bool:
        try:
            self._call(
                lambda: self.backend.stat(check_object_name(object_name)), f"stat {object_name}"
            )
            return True
        except ObjectNotFoundError:
            return False

    # -- listing, deleting, small objects ----------------------------------------------
    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Objects under ``prefix`` (digest sidecars hidden), sorted by name."""
        items = self._call(lambda: list(self.backend.list(prefix)), f"list {prefix!r}")
        return sorted(
            (i for i in items if not i.name.endswith(DIGEST_SUFFIX)), key=lambda i: i.name
        )

    def delete(self, object_name: str) -> bool:
        object_name = check_object_name(object_name)
        existed = self._call(lambda: self.backend.delete(object_name), f"delete {object_name}")
        self._call(
            lambda: self.backend.delete(object_name + DIGEST_SUFFIX),
            f"delete digest of {object_name}",
        )
        return bool(existed)

    def put_bytes(
        self, object_name: str, data: bytes, metadata: Mapping[str, str] | None = None
    ) -> Digest:
        object_name = check_object_name(object_name)
        sha = hashlib.sha256(data).digest()
        digest = Digest("sha256", sha.hex())
        meta = {k.lower(): str(v) for k, v in (metadata or {}).items()}
        if self.backend.keeps_metadata:
            meta[DIGEST_META] = str(digest)
        self._call(
            lambda: self.backend.put_bytes(object_name, bytes(data), meta, sha),
            f"upload {object_name}",
        )
        return digest

    def get_bytes(self, object_name: str) -> bytes:
        object_name = check_object_name(object_name)
        return self._call(
            lambda: b"".join(self.backend.read_range(object_name, 0, None)),
            f"download {object_name}",
        )

    def abort_stale_uploads(self, prefix: str = "", older_than: float = 0.0) -> int:
        """Abort unfinished multipart uploads under ``prefix`` started ``older_than`` seconds ago."""
        import time

        now = time.time()
        count = 0
        for name, upload_id, started in self._call(
            lambda: self.backend.list_uploads(prefix), f"list uploads {prefix!r}"
        ):
            if now - started >= older_than:
                self._call(
                    functools.partial(self.backend.abort, name, upload_id),
                    f"abort upload of {name}",
                )
                count += 1
        return count

    # -- download ----------------------------------------------------------------------
    def download_file(
        self,
        object_name: str,
        dest: str | os.PathLike[str],
        chunk_size: int = MiB,
        progress: bool | ProgressFn = True,
        expected_digest: Digest | str | None = None,
        expected_size: int | None = None,
        require_digest: bool = False,
    ) -> Path:
        """Download to ``dest`` (a file path, or an existing directory), verified.

        The object is written to a temporary name in the destination folder and
        renamed only after its size and digest match the recorded ones (or
        ``expected_*``). Large objects are fetched with parallel ranged reads.
        Raises IntegrityError on mismatch (the partial file is removed), and when
        ``require_digest`` is set but no digest is recorded anywhere.
        """
        if chunk_size < 1:
            raise ConfigError(f"chunk_size {chunk_size} must be positive")
        info = self.stat(object_name)
        digest = (
            Digest.parse(expected_digest) if isinstance(expected_digest, str) else expected_digest
        ) or info.digest
        if expected_size is not None and expected_size != info.size:
            raise IntegrityError(
                f"{object_name}: the store holds {info.size} bytes but "
                f"{expected_size} were recorded at upload; the object is "
                "truncated or was replaced, do not use it"
            )
        if digest is None:
            if require_digest:
                raise IntegrityError(
                    f"{object_name}: no digest is recorded for it, so it cannot "
                    "be verified; upload it with ckpt-uploader, or pass the "
                    "expected sha256"
                )
            log.warning("%s has no recorded digest; checking its size only", object_name)
        target = Path(dest)
        if target.is_dir():
            target = target / Path(object_name).name
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.part"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        bar = _progress_bar(progress, info.size, target.name)
        try:
            if info.size:
                os.ftruncate(fd, info.size)
            self._fetch(object_name, fd, info.size, digest, chunk_size, bar)
            os.fsync(fd)
            os.close(fd)
            fd = -1
            if os.path.getsize(tmp) != info.size:
                raise IntegrityError(
                    f"{object_name}: downloaded {os.path.getsize(tmp)} bytes, expected {info.size}"
                )
            os.replace(tmp, target)
            _fsync_dir(target.parent)
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

            return self._call(attempt, f"download {name} [{start}:{start + length}]")

        actual: Digest | None = None
        if digest is not None and digest.algo == "sha256-parts" and size > digest.part_size:
            # Ranges aligned to the upload's parts: each worker hashes its own part.
            part = digest.part_size
            hasher = PartHasher(size, part)

            def one(i: int) -> None:
                hasher.add(i, fetch_range(i * part, min(part, size - i * part)))

            self._run_parallel(one, range(hasher.count), threading.Event())
            actual = hasher.digest()
        elif size <= self.part_size:
            actual = Digest("sha256", fetch_range(0, size).hex())
        else:
            part = self.part_size

            def plain(i: int) -> None:
                fetch_range(i * part, min(part, size - i * part))

            self._run_parallel(plain, range(-(-size // part)), threading.Event())
            if digest is not None:
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


def _pread_exact(fd: int, view: memoryview, offset: int) -> None:
    pos = 0
    while pos < len(view):
        n = os.preadv(fd, [view[pos:]], offset + pos)
        if n <= 0:
            raise IntegrityError(
                "the local file shrank while it was uploaded; upload it again once it is complete"
            )
        pos += n


def _fsync_dir(path: Path) -> None:
    try:
        dfd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def check_object_name(name: str) -> str:
    """Object names are relative, normalised, and never climb out of the prefix."""
    if not isinstance(name, str) or not name or name.startswith("/"):
        raise ConfigError(f"object name {name!r} must be a relative path like 'run/rank_0/ep1.pt'")
    parts = name.split("/")
    if any(p in ("..", ".") for p in parts) or "" in parts or "\x00" in name:
        raise ConfigError(
            f"object name {name!r} must not contain '..', '.', empty segments "
            "or NUL; use a plain relative path"
        )
    return name


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


def describe_error(exc: BaseException) -> str:
    """One line for users: the type and message, with secrets removed."""
    if isinstance(exc, UploaderError):
        return redact(str(exc))
    return redact(f"{type(exc).__name__}: {exc}")
