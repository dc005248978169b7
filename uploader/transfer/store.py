"""ObjectStore: move files between local disk and a bucket, streamed, verified, retried.

The store is the facade over the pieces of ``uploader.transfer``: it owns the
backend (one adapter per provider, built from :class:`StoreSettings`), the
:class:`uploader.transfer.parts.PartPool` (``concurrency`` worker threads and
part buffers shared by every transfer of the store) and the retries
(:class:`uploader.transfer.retry.RetryPolicy`, counted in ``retries``).
Uploads go through :mod:`uploader.transfer.upload` (one request, parallel
multipart, or one stream; the digest in metadata or a digest record),
downloads through :mod:`uploader.transfer.download` (parallel ranged reads
into a temporary file, renamed once size and digest match; or, for a caller
that consumes the bytes as they arrive, an ordered stream checked at its end). Here live the
checks around them: object names, the part size, a file that changes while it
is read, the size the store holds afterwards, and the recorded digest
(:mod:`uploader.transfer.digest`). Small objects (pointers, digest records) are
read and written whole, and compare-and-swap (``get_versioned`` / ``put_if``) where
the store honours conditions, by the part of the store in
:mod:`uploader.transfer.small`.

Example::

    store = ObjectStoreHparams(provider="local", container="/tmp/bucket").initialize_object(
        create_container=True)
    result = store.upload_file("ep1.pt", "run1/rank_0/ep1.pt")
    store.download_file("run1/rank_0/ep1.pt", "/tmp/restore/ep1.pt")
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uploader.errors import (
    ConfigError,
    FileChangedError,
    IntegrityError,
    ObjectNotFoundError,
)
from uploader.transfer.backends.base import Backend, ObjectInfo
from uploader.transfer.digest import DIGEST_KINDS, DIGEST_META, DIGEST_SUFFIX, Digest
from uploader.transfer.download import Downloader
from uploader.transfer.names import check_object_name
from uploader.transfer.parts import PartPool
from uploader.transfer.resume import Resume
from uploader.transfer.retry import RetryPolicy
from uploader.transfer.settings import SettingsSource, StoreSettings, resolve_settings
from uploader.transfer.small import SmallObjects
from uploader.transfer.upload import ProgressFn, Uploader

__all__ = [
    "ObjectStore",
    "ObjectStat",
    "UploadResult",
    "DIGEST_SUFFIX",
    "DIGEST_META",
    "check_object_name",
    "make_backend",
]

log = logging.getLogger("uploader.transfer.store")

MiB = 1 << 20
DEFAULT_PART_SIZE = 8 * MiB
DEFAULT_CONCURRENCY = 4
#: The digest kind uploads write unless asked otherwise.
DEFAULT_DIGEST = DIGEST_KINDS[0]


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


def make_backend(settings: StoreSettings) -> Backend:
    """The adapter for the settings' family (its module imported only when used)."""
    family = settings.family
    if family == "local":
        from uploader.transfer.backends.local import LocalBackend

        return LocalBackend(settings)
    if family == "s3":
        from uploader.transfer.backends.s3 import S3Backend

        return S3Backend(settings)
    if family == "azure":
        from uploader.transfer.backends.azure import AzureBackend

        return AzureBackend(settings)
    if family == "gcs":
        from uploader.transfer.backends.gcs import GCSBackend

        return GCSBackend(settings)
    raise ConfigError(f"no backend for provider {settings.provider!r}")  # pragma: no cover


class _Counter:
    def __init__(self) -> None:
        self.n = 0
        self._lock = threading.Lock()

    def __call__(self, *_: Any) -> None:
        with self._lock:
            self.n += 1


class ObjectStore(SmallObjects):
    """A container in an object store, with verified streaming transfers.

    Args:
        hparams: which store: an ``ObjectStoreHparams`` (resolved through its
            ``store_settings()``) or :class:`StoreSettings`. Kept as ``hparams``.
        part_size: bytes per part for multipart uploads
            (default 8 MiB; grown automatically so no object needs more than the
            provider's part limit, 10,000 on S3).
        concurrency: worker threads (and part buffers) for parallel parts, shared by
            all transfers of this store (see :mod:`uploader.transfer.parts`).
        download_part_size: bytes per ranged read of a download (one request); default:
            chosen by the object's size, 8-64 MiB, so every worker gets about two
            ranges (rounded to whole upload parts where the digest names them). A
            download's memory is ``concurrency`` buffers of 4 MiB whatever the range.
        retry: bounds for retrying transient failures.
        digest: the digest kind uploads write: ``crc64nvme`` (the default: checked by
            S3 itself on arrival) or ``sha256`` (a cryptographic identity); downloads
            verify every kind (see :mod:`uploader.transfer.digest`).
        create_container: create the container when it does not exist.
        check: look the container up now, so a wrong name or bad credentials fail
            here with a clear error rather than at the first upload.
        backend: a ready backend instance (tests and advanced use).
    """

    def __init__(
        self,
        hparams: StoreSettings | SettingsSource,
        *,
        part_size: int = DEFAULT_PART_SIZE,
        concurrency: int = DEFAULT_CONCURRENCY,
        download_part_size: int | None = None,
        retry: RetryPolicy | None = None,
        digest: str = DEFAULT_DIGEST,
        create_container: bool = False,
        check: bool = True,
        backend: Backend | None = None,
    ) -> None:
        if concurrency < 1 or concurrency > 64:
            raise ConfigError(f"concurrency {concurrency} must be between 1 and 64")
        if digest not in DIGEST_KINDS:
            raise ConfigError(
                f"digest {digest!r} is not one this store can write; use one of "
                f"{', '.join(DIGEST_KINDS)}"
            )
        self.hparams = hparams
        self.settings = resolve_settings(hparams)
        self.backend = backend or make_backend(self.settings)
        if part_size < self.backend.min_part_size or part_size > self.backend.max_part_size:
            raise ConfigError(
                f"part size {part_size} is outside {self.backend.min_part_size}-"
                f"{self.backend.max_part_size} bytes for provider {self.settings.provider!r}"
            )
        self.part_size = part_size
        self.concurrency = concurrency
        self.retry = retry or RetryPolicy()
        self.retries = _Counter()
        self._pool = PartPool(concurrency)
        #: The worker threads every transfer of this store shares (chunked ones too).
        self.pool = self._pool
        self.digest = digest
        self._uploader = Uploader(self.backend, self._pool, self._call, digest)
        if download_part_size is not None and download_part_size < 1:
            raise ConfigError(f"download part size {download_part_size} must be positive")
        self._downloader = Downloader(self.backend, self._pool, self._call, download_part_size)
        self._conditions: tuple[bool, str] | None = None
        if check:
            self.retry.call(
                lambda: self.backend.check_container(create_container),
                f"checking container {self.settings.container!r}",
                self.retries,
            )

    # -- lifecycle ---------------------------------------------------------------------
    def __enter__(self) -> ObjectStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._pool.close()
        self.backend.close()

    @property
    def identity(self) -> str:
        """Which credentials the store is used with, in words (never a secret)."""
        return self.backend.describe_identity()

    def __repr__(self) -> str:
        return (
            f"ObjectStore({self.hparams!r}, part_size={self.part_size}, "
            f"concurrency={self.concurrency}, digest={self.digest!r})"
        )

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
        resume: Resume | None = None,
    ) -> UploadResult:
        """Upload a file in constant memory; return its size and digest.

        The file must not change while it is read: a change in size or mtime
        raises IntegrityError and nothing is committed. With ``verify``, the size
        the store then holds is checked too. With ``resume``, a multipart upload is
        recorded as it goes and continues where an earlier attempt on the same file
        version stopped (see :mod:`uploader.transfer.resume`).
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
                    raise FileChangedError(
                        f"{path} changed while it was uploaded; upload it again once it is complete"
                    )

            digest, parts = self._uploader.upload(
                fd, size, part_size, object_name, meta, progress, unchanged, resume, st.st_mtime_ns
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

    # -- digests -----------------------------------------------------------------------
    def stat(self, object_name: str) -> ObjectStat:
        """Size, digest (from metadata or the digest record) and metadata of an object."""
        object_name = check_object_name(object_name)
        info: ObjectInfo = self._call(lambda: self.backend.stat(object_name), f"stat {object_name}")
        digest = self.recorded_digest(object_name, info)
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

    # -- listing, deleting -------------------------------------------------------------
    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Objects under ``prefix`` (digest records hidden), sorted by name."""
        items = self._call(lambda: list(self.backend.list(prefix)), f"list {prefix!r}")
        return sorted(
            (i for i in items if not i.name.endswith(DIGEST_SUFFIX)), key=lambda i: i.name
        )

    def delete(self, object_name: str) -> bool:
        """Delete an object and its digest record; False when the object did not exist."""
        object_name = check_object_name(object_name)
        existed = self._call(lambda: self.backend.delete(object_name), f"delete {object_name}")
        self._call(
            lambda: self.backend.delete(object_name + DIGEST_SUFFIX),
            f"delete digest of {object_name}",
        )
        return bool(existed)

    def abort_stale_uploads(
        self, prefix: str = "", older_than: float = 0.0, keep: Collection[str] = ()
    ) -> int:
        """Abort unfinished multipart uploads under ``prefix`` started ``older_than`` seconds
        ago, except those whose upload id is in ``keep`` (sessions to resume)."""
        now = time.time()
        count = 0
        for name, upload_id, started in self._call(
            lambda: self.backend.list_uploads(prefix), f"list uploads {prefix!r}"
        ):
            if now - started >= older_than and upload_id not in keep:
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
        fsync: bool = False,
    ) -> Path:
        """Download to ``dest`` (a file path, or an existing directory), verified.

        The object is written to a temporary name in the destination folder and
        renamed only after its size and digest match the recorded ones (or
        ``expected_*``). Large objects are fetched with parallel ranged reads.
        Raises IntegrityError on mismatch (the partial file is removed), and when
        ``require_digest`` is set but no digest is recorded anywhere.

        ``fsync``: the file (and then its folder's entry) is flushed to disk before
        this returns, so it survives a power loss; without it the verified file is
        left in the page cache for the kernel to write back, as other download
        tools do (see :mod:`uploader.transfer.download`).
        """
        if chunk_size < 1:
            raise ConfigError(f"chunk_size {chunk_size} must be positive")
        info, digest = self._expected(object_name, expected_digest, expected_size, require_digest)
        target = Path(dest)
        if target.is_dir():
            target = target / Path(object_name).name
        return self._downloader.download(
            info.name, info.size, digest, target, chunk_size, progress, fsync
        )

    def download_stream(
        self,
        object_name: str,
        sink: Callable[[memoryview], None],
        progress: bool | ProgressFn = False,
        expected_digest: Digest | str | None = None,
        expected_size: int | None = None,
        require_digest: bool = False,
    ) -> ObjectStat:
        """Pass the object's bytes to ``sink``, in order, as parallel ranged reads
        deliver them; then check size and digest as :meth:`download_file` does.

        Nothing is written to disk here: the caller decides where the bytes go (a
        decompressor, say) while the rest is still arriving. Until this returns,
        what ``sink`` made of the bytes is unverified: on IntegrityError (or any
        error) the caller must discard it. ``sink`` runs in the calling thread and
        must not keep the ``memoryview`` it is given. Memory: ``concurrency + 2``
        ranges of at most 16 MiB.
        """
        info, digest = self._expected(object_name, expected_digest, expected_size, require_digest)
        self._downloader.stream(info.name, info.size, digest, sink, progress)
        return info

    def _expected(
        self,
        object_name: str,
        expected_digest: Digest | str | None,
        expected_size: int | None,
        require_digest: bool,
    ) -> tuple[ObjectStat, Digest | None]:
        """The object's listing and the digest a download must match (``expected_*``
        first, then what the store records); the checks that need no byte of it.

        Given both the size and the digest (a manifest's), the store is not asked:
        the download reads exactly that many bytes and checks them against the
        digest, so a shorter object fails as surely as a stat would have said, and
        a restore of many small files costs one request per file, not two or three.
        """
        expected = (
            Digest.parse(expected_digest) if isinstance(expected_digest, str) else expected_digest
        )
        if expected is not None and expected_size is not None:
            return ObjectStat(check_object_name(object_name), expected_size, expected), expected
        info = self.stat(object_name)
        digest = expected or info.digest
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
        return info, digest
