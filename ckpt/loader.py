"""Load a checkpoint from a local path, a URI, an object-store path, or ``latest``.

Every load goes through ``torch.load(..., weights_only=True)``: only tensors and
plain data are accepted, so a file carrying pickled code is refused without
running it. Compressed files and Composer-style tar archives are recognised by
their first bytes and unpacked into a temporary folder that is removed
afterwards; an uncompressed file's zip CRCs are checked before loading, so a
damaged file gives a clear error instead of wrong weights.

Remote checkpoints are checked against the digest recorded at upload (the
commit pointer entry naming the object when there is one, else the object's own
record); a mismatch raises :class:`uploader.IntegrityError` and nothing is
loaded. :func:`load` pipelines the restore: parallel ranged reads arrive in
order (:meth:`uploader.ObjectStore.download_stream`), are hashed, and a zstd
checkpoint is decompressed as they arrive, into one temporary file; once the
digest matches, ``torch.load(mmap=True)`` maps that file instead of reading it
into memory, so the checkpoint is held once (as the tensors' storage) and the
process's own memory stays at the stream's few ranges whatever the size. The
file is an anonymous in-memory one (``memfd_create``) when the checkpoint takes
at most a quarter of the memory available, so a restore never waits for a disk;
otherwise a temporary file, whose pages the kernel may drop and read again. The zip CRC check is skipped for such a file: the recorded digest of every
byte (and zstd's own checksum) already vouch for it. :func:`local_copy` instead
downloads the file as it is (``chunk_size`` pieces, a progress bar).

``latest`` is resolved from every rank's commit pointer. When a torch.distributed
process group of several ranks is initialised, rank 0 reads the pointers and
broadcasts the answer (:mod:`ckpt.distributed`): every rank must then load
``latest`` together (``distributed=False`` lets each process resolve it alone).

Example::

    model.load_state_dict(ckpt.load("runs/.../ep3.pt.zst")["state"]["model"])
    ckpt.load("s3://bucket/run1/latest", rank=0)
    ckpt.load("run1/rank_0/checkpoints/ep3.pt", object_store=store)
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .codecs import StreamDecoder, decompress_file, detect_format, extract_tar_member
from .distributed import default_share
from .errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError

__all__ = ["load", "read_checkpoint", "local_copy", "resolve_remote", "DEFAULT_CHUNK_SIZE"]

log = logging.getLogger("ckpt.loader")

#: Download chunk size: 1 MiB.
DEFAULT_CHUNK_SIZE = 1 << 20
_COMPRESSED = ("gzip", "bzip2", "xz", "lzma", "zstd")
_RANK_DIR = re.compile(r"^(?:(.*)/)?rank_(\d+)/(.+)$")


def _head(path: Path, n: int = 512) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


@contextlib.contextmanager
def _plain_torch_file(path: Path, tmp_dir: str | None) -> Iterator[Path]:
    """Yield a path to an uncompressed torch file for ``path`` (unpacking when needed)."""
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; check the path (and {{rank}} in load_path_format)"
        )
    fmt = detect_format(_head(path), path.name)
    if fmt in ("zip", "pickle"):
        yield path
        return
    work = Path(tempfile.mkdtemp(prefix="ckpt-load-", dir=tmp_dir))
    try:
        current = path
        if fmt in _COMPRESSED:
            assert fmt is not None
            out = work / "decompressed"
            decompress_file(current, fmt, out)
            current = out
            fmt = detect_format(_head(current), "")
        if fmt == "tar" or (fmt is None and current.name.endswith(".tar")):
            out = work / "member.pt"
            extract_tar_member(current, out)
            current = out
            fmt = detect_format(_head(current), "")
        if fmt not in ("zip", "pickle"):
            size = path.stat().st_size
            raise CorruptCheckpointError(
                f"{path} is not a checkpoint: its first bytes match no torch file, "
                f"compression format or tar archive ({size} bytes). "
                + ("The file is empty. " if size == 0 else "")
                + "Load another file, or fetch it again if it was damaged in transit"
            )
        yield current
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _check_zip(path: Path, shown: Path) -> None:
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise CorruptCheckpointError(
            f"{shown} is truncated or damaged ({exc}); load an earlier checkpoint or fetch it again"
        ) from None
    if bad is not None:
        raise CorruptCheckpointError(
            f"{shown} is corrupt: record {bad!r} fails its CRC check. Do not use it; load an "
            "earlier checkpoint or fetch it again"
        )


def read_checkpoint(
    path: str | os.PathLike[str],
    map_location: Any = "cpu",
    verify: bool = True,
    tmp_dir: str | None = None,
    distributed: bool = True,
) -> Any:
    """Load a local checkpoint file (any codec, or a tar archive) with weights_only=True."""
    src = Path(path)
    with _plain_torch_file(src, tmp_dir) as plain:
        if verify and detect_format(_head(plain)) == "zip":
            _check_zip(plain, src)
        return _torch_load(plain, src, map_location, mmap=False)


def _torch_load(path: Path, shown: Any, map_location: Any, mmap: bool) -> Any:
    """``torch.load(weights_only=True)``, its errors said in the loader's terms. With
    ``mmap``, tensors map the file (which must be ours: never a user's file that may
    be rewritten in place)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"refused to load {shown}: it contains pickled objects other than tensors and "
            f"plain data, which could run code ({str(exc).splitlines()[0][:300]}). "
            "Only load it with weights_only=False if you fully trust its origin"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CorruptCheckpointError(
            f"{shown} could not be read as a torch checkpoint ({str(exc).splitlines()[0][:300]}); "
            "it is truncated or damaged: load an earlier checkpoint or fetch it again"
        ) from None


# -- remote ------------------------------------------------------------------------------


def _store(obj: Any) -> tuple[Any, bool]:
    """(ObjectStore, owned) for an ObjectStore or ObjectStoreHparams."""
    from uploader import ObjectStore, ObjectStoreHparams

    if isinstance(obj, ObjectStore):
        return obj, False
    if isinstance(obj, ObjectStoreHparams):
        return obj.initialize_object(), True
    raise TypeError(
        f"load_object_store must be an uploader.ObjectStore or ObjectStoreHparams, not {type(obj).__name__}"
    )


def resolve_remote(
    store: Any,
    name: str,
    prefix: str | None,
    rank: int,
    world_size: int | None,
    share: Callable[[Callable[[], Any]], Any] | None = None,
) -> tuple[str, str | None, int | None, Any]:
    """(object name, expected digest, expected size, committed entry or None) for a path
    or ``latest`` in ``store``; ``share`` resolves ``latest`` once for the whole job (see
    :mod:`ckpt.distributed`). A chunked entry (``--dedup``) has no object of that name:
    restore it through the entry (``uploader.bucket.fetch``)."""
    from uploader.bucket import pointer
    from uploader.errors import UploaderError

    name = name.strip("/")
    if pointer.latest_prefix(name) is not None and prefix is not None:
        name = "/".join(p for p in (prefix.strip("/"), name) if p)
    latest = pointer.select_latest(store, name, world_size, rank, share)
    if latest is not None:
        if rank not in latest.chosen:
            raise CheckpointError(
                f"'latest' under {latest.prefix or '(root)'!r} has no entry for rank {rank}; "
                f"ranks with commit pointers: {sorted(latest.entries)}"
            )
        e = latest.chosen[rank]
        if e.is_directory:
            raise CheckpointError(
                f"'latest' under {latest.prefix or '(root)'!r} is the directory checkpoint "
                f"{e.name} ({e.rule}), not a file this loader reads; restore it with "
                "'ckpt-uploader pull' and load it with the framework that wrote it"
            )
        log.info("latest resolves to %s (%s)", e.object, e.digest)
        return e.object, e.digest, e.size, e
    if prefix:
        name = f"{prefix.strip('/')}/{name}"
    m = _RANK_DIR.match(name)
    if m:
        with contextlib.suppress(UploaderError):
            p = pointer.read_pointer(store, m.group(1) or "", int(m.group(2)))
            if p is not None:
                for e in (p.latest, *p.history):
                    if e.object == name:
                        return name, e.digest, e.size, e
    return name, None, None, None


def _remote(path_or_uri: str, object_store: Any, rank: int) -> tuple[str, Any] | None:
    """(object name, store or hparams) when the checkpoint lies in a bucket; None for a
    local path."""
    name = str(path_or_uri).replace("{rank}", str(rank))
    if object_store is None and "://" not in name:
        if name == "latest" or name.endswith("/latest"):
            raise CheckpointError(
                f"{name!r} needs an object store: pass load_object_store (or a URI such as "
                "s3://bucket/prefix/latest)"
            )
        return None
    if object_store is None:
        from uploader import parse_uri

        loc = parse_uri(name)
        object_store, name = loc.hparams, loc.prefix
        if not name:
            raise CheckpointError(
                f"{path_or_uri!r} names a bucket but no object; add the checkpoint path or "
                "'latest' after it"
            )
    return name, object_store


@contextlib.contextmanager
def local_copy(
    path_or_uri: str,
    *,
    object_store: Any = None,
    prefix: str | None = None,
    rank: int = 0,
    world_size: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: bool = True,
    tmp_dir: str | None = None,
    distributed: bool = True,
) -> Iterator[Path]:
    """Yield a local, verified path for a checkpoint; downloads are removed afterwards.
    ``distributed``: see :func:`load`."""
    remote = _remote(path_or_uri, object_store, rank)
    if remote is None:
        yield Path(str(path_or_uri).replace("{rank}", str(rank)))
        return
    name, where = remote
    store, owned = _store(where)
    work = Path(tempfile.mkdtemp(prefix="ckpt-download-", dir=tmp_dir))
    try:
        share = default_share() if distributed else None
        obj, digest, size, entry = resolve_remote(store, name, prefix, rank, world_size, share)
        dest = work / Path(obj).name
        if entry is not None and entry.chunked:
            from uploader.bucket.fetch import fetch_entry

            yield fetch_entry(store, entry, dest, progress=progress, into=False)
            return
        store.download_file(
            obj,
            dest,
            chunk_size=chunk_size,
            progress=progress,
            expected_digest=digest,
            expected_size=size,
            require_digest=True,
        )
        yield dest
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if owned:
            store.close()


def _load_remote(
    where: Any,
    name: str,
    *,
    prefix: str | None,
    rank: int,
    world_size: int | None,
    map_location: Any,
    progress: bool,
    verify: bool,
    tmp_dir: str | None,
    distributed: bool,
) -> Any:
    """Stream, verify, decompress and load a checkpoint from a bucket (module docstring)."""
    store, owned = _store(where)
    work = Path(tempfile.mkdtemp(prefix="ckpt-download-", dir=tmp_dir))
    try:
        share = default_share() if distributed else None
        obj, digest, size, entry = resolve_remote(store, name, prefix, rank, world_size, share)
        known = size if size is not None else store.stat(obj).size
        with _scratch(work / Path(obj).name, known) as (f, out):
            dec = StreamDecoder(f)
            if entry is not None and entry.chunked:
                from uploader.bucket.fetch import stream_entry

                stream_entry(store, entry, dec.write, progress=progress)
            else:
                store.download_stream(
                    obj,
                    dec.write,
                    progress=progress,
                    expected_digest=digest,
                    expected_size=size,
                    require_digest=True,
                )
            dec.close()
            fmt = detect_format(_head(out)) if dec.decoded else dec.fmt
            if fmt == "zip":
                # Verified bytes in a file of our own: mapped, not read into memory.
                return _torch_load(out, obj, map_location, mmap=True)
            # A legacy pickle, another codec or a tar archive: the general path.
            return read_checkpoint(out, map_location=map_location, verify=verify, tmp_dir=tmp_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if owned:
            store.close()


#: A restore is decoded into memory (a memfd) while its object takes at most this share
#: of the memory available; larger ones go to a temporary file.
MEMORY_SHARE = 0.25


@contextlib.contextmanager
def _scratch(path: Path, size: int) -> Iterator[tuple[Any, Path]]:
    """(binary file, path to reopen it by) for a restore's decoded bytes.

    An anonymous in-memory file (``memfd_create``) where the checkpoint fits easily in
    the memory available: its pages become the tensors' storage when mapped, so it is
    still one copy, and it never waits for a disk (a download's writes would otherwise
    be throttled to the disk's speed once the kernel holds too many dirty pages).
    Otherwise ``path``, a file in the restore's temporary folder, whose clean pages the
    kernel can drop.
    """
    if hasattr(os, "memfd_create") and size < MEMORY_SHARE * _available():
        fd = os.memfd_create("ckpt-restore", os.MFD_CLOEXEC)
        with open(fd, "wb", buffering=0, closefd=True) as f:
            yield f, Path(f"/proc/self/fd/{fd}")
        return
    with open(path, "wb", buffering=0) as f:
        yield f, path


def _available() -> int:
    """Bytes of memory available (``MemAvailable``), 0 when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def load(
    path_or_uri: str | os.PathLike[str],
    *,
    object_store: Any = None,
    prefix: str | None = None,
    rank: int = 0,
    world_size: int | None = None,
    map_location: Any = "cpu",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: bool = True,
    verify: bool = True,
    tmp_dir: str | None = None,
    distributed: bool = True,
) -> Any:
    """Load a checkpoint: what ``torch.load`` returns, for any codec and location.

    Args:
        path_or_uri: a local file; a URI (``s3://bucket/run1/rank_0/ep3.pt``,
            ``s3://bucket/run1/latest``); or, with ``object_store``, the object
            name inside the bucket (or ``latest``). ``{rank}`` is replaced by ``rank``.
        object_store: an ``uploader.ObjectStore`` or ``ObjectStoreHparams``.
        prefix: object name prefix for ``latest`` (or prepended to the name).
        rank / world_size: which rank's file; how many ranks must agree on ``latest``.
        map_location: as for ``torch.load``.
        chunk_size: unused by a load, which streams in the store's ranges (kept for
            callers that pass it; :func:`local_copy` takes it).
        progress: a progress bar for a download.
        verify: check the zip CRCs of a local torch file before loading (a download is
            checked by its recorded digest instead).
        distributed: when a torch.distributed process group of several ranks is
            initialised, ``latest`` is resolved by rank 0 and broadcast, so every
            rank must load it together; False: this process resolves it alone
            (one pointer read per rank).
    """
    remote = _remote(str(path_or_uri), object_store, rank)
    if remote is None:
        path = str(path_or_uri).replace("{rank}", str(rank))
        return read_checkpoint(path, map_location=map_location, verify=verify, tmp_dir=tmp_dir)
    name, where = remote
    return _load_remote(
        where,
        name,
        prefix=prefix,
        rank=rank,
        world_size=world_size,
        map_location=map_location,
        progress=progress,
        verify=verify,
        tmp_dir=tmp_dir,
        distributed=distributed,
    )
