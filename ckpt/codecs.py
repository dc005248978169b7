"""Compression codecs for checkpoint files, detected by their leading bytes.

Writing streams ``torch.save`` through a compressor straight into the file, so a
large state is never held twice in memory as encoded bytes. Each codec runs at
a setting chosen for speed (checkpoints are mostly float noise, which no codec
shrinks much; see docs/checkpoints.md):

=========  =========  ====================================  =========================
codec      extension  setting                               when to pick it
=========  =========  ====================================  =========================
(none)     ``.pt``    -                                     local disk, fast network
``zstd``   ``.pt.zst`` level 3, multi-threaded, checksummed  any compression at all
``gzip``   ``.pt.gz`` level 1                               readers without zstd
``bzip2``  ``.pt.bz2`` level 1                              compatibility only
``lzma``   ``.pt.xz`` preset 0, CRC64                       compatibility only
=========  =========  ====================================  =========================

Reading recognises the codec from the first bytes, whatever the file is called,
and also unpacks Composer-style tar archives (``.tar``, ``.tar.gz``, ``.tgz``,
``.tar.bz2``, ``.tar.lzma``) holding one torch pickle.

Example::

    with open("ep1.pt.zst", "wb") as raw, compressing_writer(raw, "zstd") as w:
        torch.save(obj, w)
"""

from __future__ import annotations

import bz2
import contextlib
import lzma
import os
import shutil
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Protocol

from uploader.daemon.layouts import CHECKPOINT_PATTERNS

from .errors import CorruptCheckpointError

__all__ = [
    "CODECS",
    "EXTENSIONS",
    "normalize_codec",
    "extension_for",
    "compressing_writer",
    "detect_format",
    "decompress_file",
    "extract_tar_member",
    "default_threads",
    "StreamDecoder",
]

#: Accepted ``save_compression`` values (and aliases) -> canonical codec name.
_ALIASES = {
    "": None,
    "none": None,
    "gzip": "gzip",
    "gz": "gzip",
    "bzip2": "bzip2",
    "bz2": "bzip2",
    "lzma": "lzma",
    "xz": "lzma",
    "zstd": "zstd",
    "zst": "zstd",
    "zstandard": "zstd",
}
CODECS = ("gzip", "bzip2", "lzma", "zstd")
#: The torch checkpoint suffixes, from the one list of checkpoint names (the uploader's).
_PT_SUFFIXES = tuple(p[1:] for p in CHECKPOINT_PATTERNS if p.startswith("*.pt"))
#: What each codec appends to a file name.
_TAILS = {None: "", "gzip": ".gz", "bzip2": ".bz2", "lzma": ".xz", "zstd": ".zst"}


def _suffix(tail: str) -> str:
    """The checkpoint suffix ending in ``tail``: a codec the uploader would not take as a
    checkpoint is an error here, not a silent gap in uploads."""
    found = [s for s in _PT_SUFFIXES if s == _PT_SUFFIXES[0] + tail]
    if not found:
        raise ImportError(
            f"no checkpoint pattern '*{_PT_SUFFIXES[0]}{tail}' in CHECKPOINT_PATTERNS"
        )
    return found[0]


#: Codec -> file suffix (``None``: uncompressed).
EXTENSIONS = {codec: _suffix(tail) for codec, tail in _TAILS.items()}

GZIP_LEVEL = 1
BZIP2_LEVEL = 1
LZMA_PRESET = 0
ZSTD_LEVEL = 3
_CHUNK = 4 << 20


def default_threads() -> int:
    """Compression threads: half the cores (the other half keeps training), at most 4."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def normalize_codec(name: str | None) -> str | None:
    """Canonical codec name for a ``save_compression`` value; ValueError when unknown."""
    if name is None:
        return None
    key = str(name).strip().lower()
    if key not in _ALIASES:
        raise ValueError(
            f"save_compression={name!r} is not supported; use 'zstd' (recommended), "
            "'gzip', 'bzip2', 'lzma', or None / '' for no compression"
        )
    return _ALIASES[key]


def extension_for(codec: str | None) -> str:
    return EXTENSIONS[normalize_codec(codec)]


class _Compressor(Protocol):
    def compress(self, data: bytes) -> bytes: ...

    def flush(self) -> bytes: ...


class _StreamWriter:
    """A write-only file object that compresses into ``raw``."""

    def __init__(self, raw: IO[bytes], comp: _Compressor) -> None:
        self._raw = raw
        self._comp = comp
        self.bytes_in = 0

    def write(self, data: Any) -> int:
        n = len(memoryview(data).cast("B"))
        out = self._comp.compress(data)
        if out:
            self._raw.write(out)
        self.bytes_in += n
        return n

    def flush(self) -> None:
        pass

    def finish(self) -> None:
        self._raw.write(self._comp.flush())

    def writable(self) -> bool:
        return True


class _ZstdWriter:
    def __init__(self, raw: IO[bytes], threads: int) -> None:
        import zstandard

        cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=threads, write_checksum=True)
        self._w = cctx.stream_writer(raw, closefd=False, write_size=1 << 20)
        self.bytes_in = 0

    def write(self, data: Any) -> int:
        n = len(memoryview(data).cast("B"))
        self._w.write(data)
        self.bytes_in += n
        return n

    def flush(self) -> None:
        pass

    def finish(self) -> None:
        self._w.close()

    def writable(self) -> bool:
        return True


class _PlainWriter:
    """Writes through in slices, so the interpreter lock is released between them."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self.bytes_in = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), _CHUNK):
            self._raw.write(view[start : start + _CHUNK])
        self.bytes_in += len(view)
        return len(view)

    def flush(self) -> None:
        pass

    def finish(self) -> None:
        pass

    def writable(self) -> bool:
        return True


@contextlib.contextmanager
def compressing_writer(raw: IO[bytes], codec: str | None, threads: int = 0) -> Iterator[Any]:
    """Yield a file object whose writes reach ``raw`` compressed with ``codec``.

    ``threads`` applies to zstd (0: :func:`default_threads`). ``raw`` is not closed.
    """
    codec = normalize_codec(codec)
    writer: Any
    if codec is None:
        writer = _PlainWriter(raw)
    elif codec == "zstd":
        writer = _ZstdWriter(raw, threads or default_threads())
    elif codec == "gzip":
        writer = _StreamWriter(raw, zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31))
    elif codec == "bzip2":
        writer = _StreamWriter(raw, bz2.BZ2Compressor(BZIP2_LEVEL))
    else:
        writer = _StreamWriter(
            raw,
            lzma.LZMACompressor(format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=LZMA_PRESET),
        )
    yield writer
    writer.finish()


# -- reading -------------------------------------------------------------------------------

_MAGIC = (
    (b"PK\x03\x04", "zip"),
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
)


def detect_format(head: bytes, name: str = "") -> str | None:
    """What the first bytes of a file say it is.

    Returns ``zip`` (a torch checkpoint), ``pickle`` (torch's legacy format),
    ``tar``, ``gzip``, ``bzip2``, ``xz``, ``lzma`` (the legacy .lzma format),
    ``zstd``, or None when unrecognised.
    """
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"
    # The legacy .lzma header: properties byte (< 225), dictionary size, uncompressed size.
    if len(head) >= 13 and head[0] < 225 and (name.endswith(".lzma") or head[0] == 0x5D):
        dict_size = int.from_bytes(head[1:5], "little")
        if dict_size >= 4096 and (
            head[5:13] == b"\xff" * 8 or int.from_bytes(head[5:13], "little") < 1 << 48
        ):
            return "lzma"
    return None


def _open_decompressed(path: Path, fmt: str) -> IO[bytes]:
    if fmt == "gzip":
        import gzip

        return gzip.open(path, "rb")  # type: ignore[return-value]
    if fmt == "bzip2":
        return bz2.open(path, "rb")
    if fmt == "xz":
        return lzma.open(path, "rb", format=lzma.FORMAT_XZ)
    if fmt == "lzma":
        return lzma.open(path, "rb", format=lzma.FORMAT_ALONE)
    if fmt == "zstd":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(
            open(path, "rb"), read_across_frames=True, closefd=True
        )  # type: ignore[return-value]
    raise ValueError(fmt)  # pragma: no cover


def decompress_file(path: Path, fmt: str, dest: Path) -> None:
    """Decompress ``path`` into ``dest``; truncation and corruption raise CorruptCheckpointError."""
    import zstandard

    try:
        if fmt == "zstd":
            _decompress_zstd(path, dest)
            return
        with _open_decompressed(path, fmt) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, _CHUNK)
    except EOFError:
        raise CorruptCheckpointError(
            f"{path} is truncated: its {fmt} stream ends early. The file was cut off "
            "(interrupted copy or full disk); load an earlier checkpoint or fetch it again"
        ) from None
    except (OSError, lzma.LZMAError, zlib.error, ValueError, zstandard.ZstdError) as exc:
        raise CorruptCheckpointError(
            f"{path} is corrupt: its {fmt} data does not decode ({exc}). Load an earlier "
            "checkpoint or fetch this one again"
        ) from None


def _decompress_zstd(path: Path, dest: Path) -> None:
    """Decompress every frame of ``path``; EOFError when the last frame is cut off."""
    import zstandard

    with open(path, "rb") as src, open(dest, "wb") as out:
        dobj = zstandard.ZstdDecompressor().decompressobj()
        eof = False
        while True:
            chunk = src.read(_CHUNK)
            if not chunk:
                break
            while chunk:
                if eof:  # a following frame (concatenated streams)
                    dobj = zstandard.ZstdDecompressor().decompressobj()
                out.write(dobj.decompress(chunk))
                eof = bool(dobj.eof)
                chunk = dobj.unused_data if eof else b""
        if not eof:
            raise EOFError("zstd stream ends early")


class StreamDecoder:
    """Writes a checkpoint file's bytes, handed over in order, into ``out``: a zstd
    stream is decompressed on the way (every frame, output in 4 MiB writes, so memory
    stays bounded however well it compresses); any other format is written as it is.

    The format is recognised from the first bytes (:func:`detect_format`); ``fmt`` is
    it, and ``decoded`` says whether ``out`` holds it decompressed. A zstd frame cut
    off at the end is not reported here: what ``out`` then holds is not a whole torch
    file, and reading it fails.

    Example::

        with open(dest, "wb", buffering=0) as out:
            dec = StreamDecoder(out)
            for piece in pieces:
                dec.write(piece)
            dec.close()
    """

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self._writer: Any = None
        self.fmt: str | None = None
        self.decoded = False
        self._started = False

    def write(self, data: memoryview) -> None:
        if not self._started:
            self._started = True
            self.fmt = detect_format(bytes(data[:512]))
            if self.fmt == "zstd":
                import zstandard

                self._writer = zstandard.ZstdDecompressor().stream_writer(
                    self._out, write_size=_CHUNK, closefd=False
                )
                self.decoded = True
        if self._writer is not None:
            import zstandard

            try:
                self._writer.write(data)
            except zstandard.ZstdError as exc:
                raise CorruptCheckpointError(
                    f"the checkpoint's zstd data does not decode ({exc}); load an earlier "
                    "checkpoint or fetch this one again"
                ) from None
        else:
            view = memoryview(data)
            while len(view):
                n = self._out.write(view)
                if not n:
                    raise OSError(f"could not write the checkpoint to {self._out}")
                view = view[n:]

    def close(self) -> None:
        """Flush what the decompressor still holds (``out`` stays open)."""
        if self._writer is not None:
            self._writer.flush()
            self._writer = None


def extract_tar_member(path: Path, dest: Path) -> str:
    """Copy the single torch file out of a tar archive (never extracting paths); return its name."""
    try:
        with tarfile.open(path, "r:") as tar:
            files = [m for m in tar.getmembers() if m.isfile()]
            if not files:
                raise CorruptCheckpointError(f"{path} is a tar archive with no file in it")
            if len(files) > 1:
                pts = [m for m in files if m.name.endswith((".pt", ".pth", ".pkl"))]
                if len(pts) != 1:
                    raise CorruptCheckpointError(
                        f"{path} is a tar archive with {len(files)} files "
                        f"({', '.join(m.name for m in files[:5])}); expected one torch checkpoint"
                    )
                files = pts
            member = files[0]
            src = tar.extractfile(member)
            if src is None:  # pragma: no cover - isfile() above
                raise CorruptCheckpointError(f"{path}: cannot read {member.name}")
            with src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, _CHUNK)
            if dest.stat().st_size != member.size:
                raise CorruptCheckpointError(f"{path} is truncated inside {member.name}")
            return member.name
    except tarfile.TarError as exc:
        raise CorruptCheckpointError(
            f"{path} is a damaged tar archive ({exc}); load an earlier checkpoint or fetch it again"
        ) from None
