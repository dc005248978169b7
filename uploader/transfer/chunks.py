"""Chunk objects for ``--dedup``: a file stored as content-named chunks shared inside a
scope, sent only when the scope does not hold them yet, and put back together verified.

**Names.** A chunk is named by the BLAKE3 (256 bits, hex) of its bytes:
``{scope}/.ckpt-uploader/chunks/{blake3 hex}``, where ``scope`` is a bucket prefix
(``--dedup-scope``: by default the run's prefix; a parent prefix shares chunks between
runs). Equal bytes have one name in a scope, so an unchanged tensor is stored once.

**Bodies.** A chunk object is a 5-byte header, ``b"CKC1"`` and an encoding byte, then
the payload: encoding 0 is the bytes as they are, 1 a zstd frame of them. Each chunk is
compressed on its own (so compression and dedup compose) when a zstd pass over its first
64 KiB saves at least a tenth; float weights rarely compress that well and are stored as
they are, which keeps a full fine-tune's CPU near a plain upload's.

**Reading** checks everything: the header, the decoded length against the manifest's,
and the BLAKE3 against the name; a file's chunks are written at their offsets into a
temporary file, their CRC64NVMEs combined into the file's and compared with the digest
the manifest records, before the file gets its name.

Example::

    writer = ChunkWriter(store, "runs", index)
    result = writer.upload_file(Path("ckpt/model.safetensors"))  # FileChunks

Reading them back is :mod:`uploader.transfer.chunk_restore`.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from uploader.errors import FileChangedError, IntegrityError
from uploader.transfer.chunking import MAX_CHUNK, spans
from uploader.transfer.digest import Digest, crc64nvme, crc64nvme_combine

if TYPE_CHECKING:  # pragma: no cover
    from uploader.transfer.store import ObjectStore

__all__ = [
    "blake3_hex",
    "chunk_offsets",
    "run_on_pool",
    "CHUNK_DIR",
    "INLINE_MAX",
    "Chunk",
    "ChunkIndex",
    "ChunkWriter",
    "FileChunks",
    "chunk_object",
    "chunk_prefix",
    "check_chunk",
    "max_body",
    "is_chunk_object",
    "decode_chunk",
    "encode_chunk",
]

log = logging.getLogger(__name__)

#: Where a scope's chunks live, under the scope's prefix.
CHUNK_DIR = ".ckpt-uploader/chunks"
MAGIC = b"CKC1"
RAW, ZSTD = 0, 1
_SAMPLE = 64 << 10
#: A chunk is compressed when its sample shrinks to at most this fraction.
_WORTH = 0.9
_HEX = frozenset("0123456789abcdef")
#: A chunk of at most this many bytes is kept in the manifest, not as an object.
INLINE_MAX = 4096


@dataclass(frozen=True)
class Chunk:
    """One chunk of a file: its BLAKE3 (hex) and its length in bytes; ``data`` holds a
    chunk of at most :data:`INLINE_MAX` bytes, kept in the manifest instead of an object
    of its own (a zip entry's header, a small norm: no request for a few bytes)."""

    hash: str
    size: int
    data: bytes | None = None

    def to_json(self) -> list[object]:
        if self.data is not None:
            return [self.hash, self.size, base64.b64encode(self.data).decode()]
        return [self.hash, self.size]

    @classmethod
    def from_json(cls, item: object) -> Chunk:
        if not (isinstance(item, list) and len(item) in (2, 3)):
            raise ValueError(f"chunk {item!r} is not [blake3, size] or [blake3, size, base64]")
        h, size = item[0], item[1]
        if not (isinstance(h, str) and len(h) == 64 and set(h) <= _HEX):
            raise ValueError(f"chunk name {h!r} is not a BLAKE3 in hex")
        if not (isinstance(size, int) and 0 < size <= MAX_CHUNK):
            raise ValueError(f"chunk {h[:16]} has size {size!r} (1 to {MAX_CHUNK} bytes)")
        if len(item) == 2:
            return cls(h, size)
        text = item[2]
        if not (isinstance(text, str) and size <= INLINE_MAX and len(text) <= 2 * INLINE_MAX):
            raise ValueError(f"chunk {h[:16]} inline is not base64 of at most {INLINE_MAX} bytes")
        try:
            data = base64.b64decode(text, validate=True)
        except ValueError:
            raise ValueError(f"chunk {h[:16]} inline is not base64") from None
        if len(data) != size or blake3_hex(data) != h:
            raise ValueError(f"chunk {h[:16]} inline does not hash to its name")
        return cls(h, size, data)


@dataclass(frozen=True)
class FileChunks:
    """A file as sent: its size, digest (CRC64NVME), chunks in order, and how many bytes
    were new to the scope (sent) and how many the store holds for them (compressed)."""

    size: int
    digest: Digest
    chunks: tuple[Chunk, ...]
    new_bytes: int = 0
    stored_bytes: int = 0


def chunk_prefix(scope: str) -> str:
    """The prefix of the chunks of ``scope`` (a bucket prefix; "" for the bucket's root)."""
    scope = scope.strip("/")
    return f"{scope}/{CHUNK_DIR}" if scope else CHUNK_DIR


def chunk_object(scope: str, h: str) -> str:
    return f"{chunk_prefix(scope)}/{h}"


def blake3_hex(data: bytes | bytearray | memoryview) -> str:
    from blake3 import blake3  # noqa: PLC0415 - a native library, only for --dedup

    return str(blake3(data).hexdigest())


_local = threading.local()


def _compressor() -> Any:
    """This thread's zstd compressor (level 1), made once: a context per call costs more
    than compressing an incompressible chunk's sample."""
    zc = getattr(_local, "zc", None)
    if zc is None:
        import zstandard  # noqa: PLC0415 - a native library, only for --dedup

        zc = _local.zc = zstandard.ZstdCompressor(level=1)
    return zc


def encode_chunk(raw: bytes | bytearray | memoryview) -> bytes:
    """The body of the chunk object holding ``raw`` (for a chunk stored as it is, only
    when ``raw`` is not a memoryview: then the 5-byte header alone, for the caller to
    put in front of the bytes it holds)."""
    zc = _compressor()
    sample = bytes(raw[:_SAMPLE])
    if sample and len(zc.compress(sample)) <= _WORTH * len(sample):
        packed = zc.compress(raw)
        if len(packed) < len(raw):
            return MAGIC + bytes([ZSTD]) + packed
    if isinstance(raw, memoryview):
        return MAGIC + bytes([RAW])
    return MAGIC + bytes([RAW]) + bytes(raw)


def is_chunk_object(name: str) -> bool:
    """Whether object ``name`` is a chunk (``.../.ckpt-uploader/chunks/<blake3>``)."""
    head, _, h = name.rpartition("/")
    return (head == CHUNK_DIR or head.endswith("/" + CHUNK_DIR)) and len(h) == 64


def max_body(size: int) -> int:
    """The most bytes a chunk object holding ``size`` bytes may have: the header and
    zstd's worst case for incompressible data (a read bound, against planted objects)."""
    return 5 + size + (size >> 7) + 64


def _payload(body: bytes, name: str, limit: int) -> bytes | memoryview:
    """The decoded bytes of chunk object ``name`` (at most ``limit`` of them); IntegrityError
    for a bad header or a frame that does not decompress."""
    if body[:4] != MAGIC or len(body) < 5 or body[4] not in (RAW, ZSTD):
        raise IntegrityError(f"chunk {name} is not a chunk object (bad header); it was damaged")
    if body[4] == RAW:
        return memoryview(body)[5:]
    import zstandard  # noqa: PLC0415

    try:
        return bytes(zstandard.ZstdDecompressor().decompress(body[5:], max_output_size=limit))
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"chunk {name} does not decompress ({exc}); it was damaged") from None


def check_chunk(store: ObjectStore, name: str) -> int:
    """Read chunk object ``name`` and check it against its name; its decoded length.
    IntegrityError when it is damaged."""
    raw = _payload(store.get_bytes(name, max_size=max_body(MAX_CHUNK)), name, MAX_CHUNK)
    if blake3_hex(raw) != name.rpartition("/")[2]:
        raise IntegrityError(f"chunk {name} does not hash to its name; it was damaged in the store")
    return len(raw)


def decode_chunk(body: bytes, chunk: Chunk, name: str) -> bytes | memoryview:
    """The bytes of ``chunk`` from its object's ``body``; IntegrityError unless they are
    exactly the chunk its name and the manifest say."""
    raw = _payload(body, name, chunk.size)
    if len(raw) != chunk.size:
        raise IntegrityError(
            f"chunk {name} holds {len(raw)} bytes, the manifest says {chunk.size}; it was damaged"
        )
    if blake3_hex(raw) != chunk.hash:
        raise IntegrityError(f"chunk {name} does not hash to its name; it was damaged in the store")
    return raw


class ChunkIndex(Protocol):
    """Which chunks of a scope are known to be stored (a local cache of the bucket)."""

    def known(self, hashes: Sequence[str]) -> set[str]: ...

    def add(self, chunks: Sequence[Chunk]) -> None: ...


class ChunkWriter:
    """Sends the chunks of files to a scope; a chunk the index knows, or the store
    already holds (one HEAD), is not sent.

    Args:
        store: the destination.
        scope: the bucket prefix chunks are shared in.
        index: the local index (None: ask the store about every chunk).
    """

    def __init__(
        self,
        store: ObjectStore,
        scope: str,
        index: ChunkIndex | None = None,
    ) -> None:
        self.store = store
        self.scope = scope.strip("/")
        self.index = index

    def upload_file(
        self,
        path: Path,
        progress: Callable[[int], None] | None = None,
        before_send: Callable[[int], None] | None = None,
    ) -> FileChunks:
        """Send the chunks of ``path`` the scope lacks; FileChangedError when the file
        changed while it was read. ``progress(n)`` after each chunk, sent or not;
        ``before_send(n)`` before a chunk object of ``n`` bytes is sent (a bandwidth
        limit waits there)."""
        st = os.stat(path)
        cuts = spans(path, st.st_size)
        crcs: list[tuple[int, int]] = [(0, 0)] * len(cuts)
        chunks: list[Chunk | None] = [None] * len(cuts)
        new = [0, 0]
        lock = threading.Lock()
        fd = os.open(path, os.O_RDONLY)

        def one(i: int) -> None:
            offset, length = cuts[i]
            if length <= INLINE_MAX:
                one_in(i, memoryview(bytearray(5 + length)))
                return
            with self.store.pool.buffer(5 + length) as big:  # reused, as parts' buffers are
                one_in(i, memoryview(big)[: 5 + length])

        def one_in(i: int, buf: memoryview) -> None:
            offset, length = cuts[i]
            # Read after room for the header: a chunk stored as it is is sent from here.
            raw = buf[5:]
            if os.preadv(fd, [raw], offset) != length:
                raise FileChangedError(f"{path} shrank while it was read")
            crc = crc64nvme(raw)
            crcs[i] = (crc, length)
            h = blake3_hex(raw)
            if length <= INLINE_MAX:  # kept in the manifest: no request
                chunks[i] = Chunk(h, length, bytes(raw))
                with lock:
                    new[0] += length
                    new[1] += length
            else:
                chunks[i] = Chunk(h, length)
            if length > INLINE_MAX and not self._stored(h):
                body: bytes | memoryview = encode_chunk(raw)
                body_crc = None
                if body[4] == RAW:
                    buf[:5] = body[:5]
                    body, body_crc = buf, crc64nvme_combine(crc64nvme(body[:5]), crc, length)
                if before_send is not None:
                    before_send(len(body))
                self.store.put_blob(chunk_object(self.scope, h), body, body_crc)
                with lock:
                    new[0] += length
                    new[1] += len(body)
            if progress is not None:
                progress(length)

        try:
            # Inline chunks here (a few bytes each: a thread hop costs more than they do).
            small = [i for i, (_, n) in enumerate(cuts) if n <= INLINE_MAX]
            for i in small:
                one(i)
            run_on_pool(self.store, one, [i for i, (_, n) in enumerate(cuts) if n > INLINE_MAX])
        finally:
            os.close(fd)
        after = os.stat(path)
        if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
            raise FileChangedError(f"{path} changed while it was read")
        done = tuple(c for c in chunks if c is not None)
        if self.index is not None:
            self.index.add([c for c in done if c.data is None])
        crc = 0
        for value, length in crcs:
            crc = crc64nvme_combine(crc, value, length)
        digest = Digest("crc64nvme", f"{crc:016x}")
        return FileChunks(st.st_size, digest, done, new[0], new[1])

    def _stored(self, h: str) -> bool:
        if self.index is not None and self.index.known([h]):
            return True
        return self.store.exists(chunk_object(self.scope, h))


def run_on_pool(
    store: ObjectStore, fn: Callable[[int], None], items: Sequence[int] | range
) -> None:
    """``fn`` on every item, on the store's shared worker threads (so chunks of every
    file of the store together hold at most ``concurrency`` buffers, on warm
    connections); the first failure stops the rest and is raised."""
    if len(items) <= 1:
        for i in items:
            fn(i)
        return
    store.pool.run(fn, items, threading.Event())


def chunk_offsets(chunks: Sequence[Chunk]) -> Iterator[tuple[int, Chunk]]:
    offset = 0
    for c in chunks:
        yield offset, c
        offset += c.size
