"""Putting chunked files back together (``--dedup``): to a file, or in order to a reader.

:func:`restore_file` receives each chunk object straight into the destination file's
mapped pages (as a plain download is received), decompresses a compressed one there,
checks each chunk's BLAKE3 against its name and the whole file's CRC64NVME against the
manifest's digest, and renames the file into place only then. :func:`stream_chunks`
feeds a reader the file's bytes in order, each chunk checked as it comes. The chunk
format is :mod:`uploader.transfer.chunks`'.

Example::

    restore_file(store, "runs", chunks, Path("out/model.safetensors"), size, digest)
"""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from uploader.errors import IntegrityError, ObjectNotFoundError
from uploader.transfer.chunks import (
    MAGIC,
    RAW,
    ZSTD,
    Chunk,
    blake3_hex,
    chunk_object,
    chunk_offsets,
    decode_chunk,
    max_body,
    run_on_pool,
)
from uploader.transfer.digest import Digest, crc64nvme, crc64nvme_combine
from uploader.transfer.files import fsync_dir, reserve

if TYPE_CHECKING:  # pragma: no cover
    from uploader.transfer.store import ObjectStore

__all__ = ["restore_file", "stream_chunks"]


class _Landing:
    """Where a chunk object's bytes land: its 5-byte header in a buffer of its own, the
    payload in ``view`` (the file's mapped pages at the chunk's offset), so a chunk
    stored as it is is received straight into the file; a compressed payload lands
    there too and is then replaced by its decompressed bytes."""

    def __init__(self, view: memoryview) -> None:
        self.head = bytearray(5)
        self.view = view

    def window(self, offset: int, limit: int) -> memoryview:
        if offset < 5:
            return memoryview(self.head)[offset : offset + min(limit, 5 - offset)]
        return self.view[offset - 5 : offset - 5 + limit]


def _land(store: ObjectStore, name: str, chunk: Chunk, view: memoryview) -> None:
    """Receive chunk ``name`` into ``view`` (its ``chunk.size`` bytes of the file),
    decoded and checked (IntegrityError otherwise)."""
    landing = _Landing(view)
    got = store.read_into(name, chunk.size + 5, landing)
    head = bytes(landing.head[: min(got, 5)])
    if head[:4] != MAGIC or len(head) < 5 or head[4] not in (RAW, ZSTD):
        raise IntegrityError(f"chunk {name} is not a chunk object (bad header); it was damaged")
    if head[4] == ZSTD:  # decompressed into the file's pages, from a copy of the frame
        _inflate_into(bytes(view[: got - 5]), view, name)
    elif got != chunk.size + 5:
        raise IntegrityError(
            f"chunk {name} holds {got - 5} bytes, the manifest says {chunk.size}; it was damaged"
        )
    if blake3_hex(view) != chunk.hash:
        raise IntegrityError(f"chunk {name} does not hash to its name; it was damaged in the store")


def _inflate_into(frame: bytes, view: memoryview, name: str) -> None:
    """Decompress the zstd ``frame`` into exactly ``view`` (IntegrityError otherwise)."""
    import zstandard  # noqa: PLC0415

    pos = 0
    try:
        with zstandard.ZstdDecompressor().stream_reader(frame) as reader:
            while pos < len(view):
                n = reader.readinto(view[pos:])
                if not n:
                    break
                pos += n
            extra = reader.read(1)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"chunk {name} does not decompress ({exc}); it was damaged") from None
    if pos != len(view) or extra:
        raise IntegrityError(
            f"chunk {name} decompresses to {'more' if extra else pos} bytes, the manifest says "
            f"{len(view)}; it was damaged"
        )


def restore_file(
    store: ObjectStore,
    scope: str,
    chunks: Sequence[Chunk],
    target: Path,
    size: int,
    digest: Digest | str,
    *,
    progress: Callable[[int], None] | None = None,
    fsync: bool = False,
) -> Path:
    """Put ``target`` together from its chunks, verified (each chunk's BLAKE3, the
    file's size and CRC64NVME); written to a temporary name and renamed into place.
    Each chunk is received straight into the file's mapped pages (as a plain download
    is), on the store's worker threads.

    Raises IntegrityError (a damaged or wrong chunk, a manifest that does not add up)
    and ObjectNotFoundError naming the missing chunk; the partial file is removed.
    """
    want = Digest.parse(str(digest))
    if sum(c.size for c in chunks) != size:
        raise IntegrityError(
            f"the manifest of {target.name} lists chunks of {sum(c.size for c in chunks)} "
            f"bytes for a file of {size}; the manifest is damaged"
        )
    if want.kind != "crc64nvme":
        raise IntegrityError(f"{target.name}: a chunked file's digest must be a crc64nvme")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.ckpt-part-{os.getpid()}-{threading.get_ident()}")
    placed = list(chunk_offsets(chunks))
    crcs = [0] * len(placed)
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    mapped: mmap.mmap | None = None
    try:
        if not reserve(fd, size):
            os.ftruncate(fd, size)
        if size:
            mapped = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        whole = memoryview(mapped) if mapped is not None else memoryview(b"")

        def one(i: int) -> None:
            offset, chunk = placed[i]
            name = chunk_object(scope, chunk.hash)
            view = whole[offset : offset + chunk.size]
            try:
                if chunk.data is not None:
                    view[:] = chunk.data  # checked against its name when it was read
                else:
                    _land(store, name, chunk, view)
                crcs[i] = crc64nvme(view)
            except ObjectNotFoundError:
                raise ObjectNotFoundError(
                    f"chunk {name} of {target.name} is missing from the store; this "
                    "checkpoint cannot be restored (was the chunk deleted by hand, or by a "
                    "garbage collection that ignored the scope's protocol?); restore "
                    "another checkpoint ('ckpt-uploader ls')"
                ) from None
            finally:
                view.release()  # the mapping closes only once no view of it is left
            if progress is not None:
                progress(chunk.size)

        try:
            for i, (_, chunk) in enumerate(placed):  # inline ones here: a copy each
                if chunk.data is not None:
                    one(i)
            run_on_pool(store, one, [i for i, (_, c) in enumerate(placed) if c.data is None])
        finally:
            whole.release()
            if mapped is not None:
                mapped.close()
        crc = 0
        for (_, chunk), value in zip(placed, crcs, strict=True):
            crc = crc64nvme_combine(crc, value, chunk.size)
        got = Digest("crc64nvme", f"{crc:016x}")
        if got != want:
            raise IntegrityError(
                f"{target.name} put together from its chunks has digest {got}, the manifest "
                f"records {want}; the manifest or a chunk is damaged"
            )
        if fsync:
            os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, target)
        if fsync:
            fsync_dir(target.parent)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    return target


def stream_chunks(
    store: ObjectStore,
    scope: str,
    chunks: Sequence[Chunk],
    sink: Callable[[memoryview], None],
    size: int,
    digest: Digest | str,
    *,
    progress: Callable[[int], None] | None = None,
    concurrency: int | None = None,
) -> None:
    """Feed a chunked file's bytes to ``sink`` in order, each chunk verified as it comes
    (a few fetched ahead, in parallel); IntegrityError at the end unless the whole adds
    up to ``size`` bytes with ``digest``."""
    want = Digest.parse(str(digest))
    if sum(c.size for c in chunks) != size or want.kind != "crc64nvme":
        raise IntegrityError(f"the manifest's chunks do not make a file of {size} bytes")
    ahead = max(1, concurrency or store.concurrency)

    def fetch(chunk: Chunk) -> bytes | memoryview:
        if chunk.data is not None:
            return chunk.data
        name = chunk_object(scope, chunk.hash)
        try:
            body = store.get_bytes(name, max_size=max_body(chunk.size))
        except ObjectNotFoundError:
            raise ObjectNotFoundError(
                f"chunk {name} is missing from the store; this checkpoint cannot be "
                "restored: restore another one ('ckpt-uploader ls')"
            ) from None
        return decode_chunk(body, chunk, name)

    crc = 0
    with ThreadPoolExecutor(ahead, thread_name_prefix="chunk") as pool:
        pending = [pool.submit(fetch, c) for c in chunks[:ahead]]
        for i, chunk in enumerate(chunks):
            raw = pending[i].result()
            pending[i] = None  # type: ignore[call-overload]
            if i + ahead < len(chunks):
                pending.append(pool.submit(fetch, chunks[i + ahead]))
            crc = crc64nvme_combine(crc, crc64nvme(raw), chunk.size)
            sink(memoryview(raw))
            if progress is not None:
                progress(chunk.size)
    got = Digest("crc64nvme", f"{crc:016x}")
    if got != want:
        raise IntegrityError(
            f"the file put together from its chunks has digest {got}, the manifest records "
            f"{want}; the manifest or a chunk is damaged"
        )
