"""The storage-client interface every backend adapter implements.

The :class:`uploader.transfer.store.ObjectStore` and its upload and download
modules own everything that is the same for every store: reading the file in
parts, hashing each part once, parallelism, retries, progress, digests, and
verified downloads. A backend only maps a few primitive operations onto one
provider, as thinly as it can; libcloud resolves the endpoints, and for Azure
and GCS also signs and sends the requests. A backend is built from a
:class:`uploader.transfer.settings.StoreSettings`.

Multipart protocol (S3 multipart, Azure block blobs): ``begin`` -> ``put_part``
(any order, in parallel) -> ``complete``; ``abort`` on failure. Backends
without one set ``multipart = False`` and implement ``put_stream``.

Resuming (``resumable = True``): ``list_parts`` says which parts of an unfinished
upload the store holds (size and ETag or block id), or that it no longer knows the
upload; ``part_etag`` / ``part_token`` turn a part's token into the text the
journal records and back; ``reopen`` prepares a resumed upload for ``complete``.

Conditional writes (compare-and-swap of a small object, for commit pointers):
``get_versioned`` returns an object with its version (S3 and Azure: the ETag; GCS:
the generation; LOCAL: the sha256 of its bytes), and ``put_if`` writes only while
the object still has that version (``None``: only while it does not exist),
raising :class:`uploader.errors.PreconditionFailedError` otherwise. Backends that
implement them set ``conditional = True``; a server may still ignore the
conditions (rclone serve s3 does), which
:meth:`uploader.transfer.store.ObjectStore.conditions_honoured` finds out.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "Backend",
    "HeldPart",
    "ObjectInfo",
    "PartToken",
    "RangeTarget",
    "Ring",
    "RECV_PIECE",
    "range_target",
]

#: Most bytes one receive of a ranged read puts in memory before they are handed on:
#: the consumer hashes each piece while it is still in the processor's cache.
RECV_PIECE = 4 << 20


@runtime_checkable
class RangeTarget(Protocol):
    """Where a ranged read (:meth:`Backend.read_range_into`) puts the bytes it receives."""

    def window(self, offset: int, limit: int) -> memoryview:
        """Writable memory for the range's bytes from ``offset`` (counted from the
        range's start) on: at least one byte and at most ``limit``. A window stays
        valid until the next call."""


class Ring:
    """A :class:`RangeTarget` over one buffer: the range's bytes fill it from its start
    and start again from its start once it is full (so a buffer of the range's length
    ends up holding the whole range)."""

    def __init__(self, buf: memoryview | bytearray) -> None:
        self.buf = memoryview(buf)
        if not len(self.buf):
            raise ValueError("a ranged read needs a buffer of at least one byte")

    def window(self, offset: int, limit: int) -> memoryview:
        pos = offset % len(self.buf)
        return self.buf[pos : pos + min(limit, len(self.buf) - pos)]


def range_target(into: RangeTarget | memoryview | bytearray) -> RangeTarget:
    """``into`` as a :class:`RangeTarget` (a plain buffer becomes a :class:`Ring`)."""
    return into if isinstance(into, RangeTarget) else Ring(into)


@dataclass(frozen=True)
class ObjectInfo:
    """What a store says about one object."""

    name: str
    size: int
    metadata: Mapping[str, str] = field(default_factory=dict)
    etag: str | None = None
    mtime: float | None = None


PartToken = Any  # whatever ``complete`` needs to stitch a part in (ETag, block id ...)


@dataclass(frozen=True)
class HeldPart:
    """A part of an unfinished upload as the store lists it."""

    size: int
    etag: str


class Backend(ABC):
    """One provider. Methods raise ``uploader.errors`` types (or transport errors that
    ``uploader.transfer.retry.is_transient`` recognises) and never retry by themselves."""

    #: Whether begin/put_part/complete/abort are implemented.
    multipart: bool = False
    #: Largest part the provider accepts, and the most parts in one object.
    max_part_size: int = 5 << 30
    max_parts: int = 10_000
    #: Smallest part (except the last) the provider accepts.
    min_part_size: int = 5 << 20
    #: Whether object metadata survives a round trip (LOCAL keeps none).
    keeps_metadata: bool = True
    #: Whether put_bytes/put_part need the body's sha256 even when the upload's digest is
    #: a CRC (S3 over plain HTTP signs the payload; elsewhere none is computed).
    payload_sha256: bool = False
    #: Whether the store checks every put and part against a digest of the bytes sent (S3:
    #: the signed ``x-amz-content-sha256`` or the signed ``x-amz-checksum-crc64nvme``) and a
    #: multipart completion against the parts it holds, so that success means the bytes
    #: are stored as sent: the daemon then reads back no size and digest after an upload.
    put_checked: bool = False
    #: Whether an unfinished multipart upload can be listed and continued.
    resumable: bool = False
    #: Whether get_versioned/put_if are implemented (the server may still ignore them).
    conditional: bool = False
    #: Whether this adapter enforces the conditions itself (no server to ask: LOCAL).
    enforces_conditions: bool = False

    # -- container ---------------------------------------------------------------------
    @abstractmethod
    def check_container(self, create: bool = False) -> None:
        """Raise ContainerNotFoundError (saying how to create it) unless it exists;
        create it instead when ``create`` is true. Also surfaces bad credentials."""

    # -- small objects -----------------------------------------------------------------
    @abstractmethod
    def put_bytes(
        self,
        name: str,
        data: bytes,
        metadata: Mapping[str, str],
        sha256: bytes | None,
        crc64nvme: int | None = None,
    ) -> None:
        """Store ``data`` in one request. ``sha256`` is its binary digest (for signing;
        None when the caller computed none: see :attr:`payload_sha256`); ``crc64nvme``
        its CRC64NVME where the upload's digest is one (a backend whose store checks
        that checksum sends it with the body)."""

    # -- streaming upload (backends without multipart) ---------------------------------------
    def put_stream(
        self, name: str, chunks: Iterable[bytes], metadata: Mapping[str, str], size: int
    ) -> None:  # pragma: no cover - overridden where used
        raise NotImplementedError

    # -- multipart ---------------------------------------------------------------------
    def begin(
        self, name: str, metadata: Mapping[str, str], checksum: str | None = None
    ) -> str:  # pragma: no cover
        """Start a multipart upload; ``checksum`` is the upload's digest kind
        (``crc64nvme``: its parts come with their CRC64NVME)."""
        raise NotImplementedError

    def put_part(
        self,
        name: str,
        upload_id: str,
        index: int,
        offset: int,
        data: memoryview,
        sha256: bytes | None,
        crc64nvme: int | None = None,
    ) -> PartToken:  # pragma: no cover
        """Upload part ``index`` (0-based), which starts at byte ``offset`` of the object.
        ``sha256`` is the part's binary digest (sign with it; never hash again), None
        when the caller computed none; ``crc64nvme`` its CRC64NVME (when the upload's
        digest is one). Must be safe to call again for the same index (retries)."""
        raise NotImplementedError

    def complete(
        self,
        name: str,
        upload_id: str,
        tokens: list[PartToken],
        part_crcs: list[int] | None = None,
        crc64nvme: int | None = None,
    ) -> None:  # pragma: no cover
        """Stitch the parts together; for a CRC64NVME upload, ``part_crcs`` are the
        parts' values and ``crc64nvme`` the whole object's."""
        raise NotImplementedError

    def abort(self, name: str, upload_id: str) -> None:  # pragma: no cover
        raise NotImplementedError

    def list_uploads(self, prefix: str) -> list[tuple[str, str, float]]:
        """Unfinished multipart uploads as (name, upload_id, started_unix_time)."""
        return []

    # -- resuming (resumable backends) -----------------------------------------------------
    def list_parts(self, name: str, upload_id: str) -> dict[int, HeldPart] | None:
        """The parts the store holds of an unfinished upload, by 0-based index; None when
        the store does not know the upload (completed, aborted, expired, forgotten)."""
        return None

    def part_etag(self, token: PartToken) -> str:
        """The ETag or block id in a token ``put_part`` returned (what the journal keeps)."""
        return str(token)

    def part_token(self, index: int, etag: str) -> PartToken:
        """The token ``complete`` needs for part ``index`` recorded with ``etag``."""
        return etag

    def reopen(self, name: str, upload_id: str, metadata: Mapping[str, str]) -> None:
        """Prepare a resumed upload (begun by an earlier process) for ``complete``."""

    def completed_from(self, name: str, upload_id: str, tokens: list[PartToken]) -> bool:
        """Whether object ``name`` is this upload completed from exactly these parts (a
        ``complete`` whose answer was lost); False where the store cannot tell."""
        return False

    # -- conditional writes ----------------------------------------------------------
    def get_versioned(
        self, name: str, limit: int | None = None
    ) -> tuple[bytes, str | None]:  # pragma: no cover
        """The whole (small) object and its version; ObjectNotFoundError when absent.
        With ``limit``, at most that many bytes are read (the caller checks for more).
        The version is None when the store sent none (a later ``put_if`` then cannot
        name it: read again)."""
        raise NotImplementedError

    def put_if(
        self,
        name: str,
        data: bytes,
        metadata: Mapping[str, str],
        sha256: bytes,
        expected: str | None,
    ) -> str | None:  # pragma: no cover
        """Store ``data`` only if the object's version is ``expected`` (None: only if
        there is no such object); return the new version (None when the store sent
        none). Raise PreconditionFailedError when the condition does not hold."""
        raise NotImplementedError

    # -- reading -----------------------------------------------------------------------
    @abstractmethod
    def stat(self, name: str) -> ObjectInfo:
        """Raise ObjectNotFoundError when absent."""

    @abstractmethod
    def read_range(
        self, name: str, start: int, length: int | None, chunk_size: int = 1 << 20
    ) -> Iterator[bytes]:
        """Yield the bytes ``[start, start+length)`` (to the end when ``length`` is None),
        in chunks of about ``chunk_size``. Raise ObjectNotFoundError when absent."""

    def read_range_into(
        self, name: str, start: int, length: int, into: RangeTarget | memoryview | bytearray
    ) -> Iterator[memoryview]:
        """Read the bytes ``[start, start+length)`` into ``into``, piece by piece: each
        yielded view is the window of ``into`` that holds the next bytes (at most
        :data:`RECV_PIECE` of them), valid until the generator is resumed. A plain
        buffer is used as a :class:`Ring`; a :class:`RangeTarget` says where each
        piece goes (``Downloader`` receives into the destination file's mapped pages).
        Ends early when the object is shorter. Raise ObjectNotFoundError when absent.

        This default copies what :meth:`read_range` yields; a backend that can receive
        into memory (S3) overrides it to save that copy."""
        target = range_target(into)
        pos = 0
        for chunk in self.read_range(name, start, length, RECV_PIECE):
            data = memoryview(chunk)
            while len(data):
                window = target.window(pos, len(data))
                n = len(window)
                window[:] = data[:n]
                data = data[n:]
                pos += n
                yield window

    @abstractmethod
    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Objects whose name starts with ``prefix``, in name order where the store allows."""

    @abstractmethod
    def delete(self, name: str) -> bool:
        """Delete; False when it did not exist."""

    def server_date(self) -> float | None:
        """The store's clock (its ``Date`` header), seconds since the epoch; None where
        the adapter cannot read it."""
        return None

    def describe_identity(self) -> str:
        """Which credentials this adapter uses, in words (never a secret)."""
        settings = getattr(self, "settings", None)
        if settings is None or settings.family == "local":
            return "none needed (local directory)"
        names = [f"${v}" for v in (settings.key_environ, settings.secret_environ) if v]
        return "environment variables " + " / ".join(names) if names else "none"

    def close(self) -> None:
        """Release connections."""
