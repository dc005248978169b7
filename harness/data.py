"""Test data: files of pseudo-random bytes, fast to write at any size, and the digest oracle."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

from awscrt import checksums

from uploader.transfer.digest import Digest

__all__ = ["write_random", "file_digest", "bytes_digest"]

_READ = 4 << 20


def write_random(path: Path, size: int, seed: int = 0) -> Path:
    """A file of ``size`` pseudo-random bytes (fast for large sizes)."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        remaining = size
        block = rng.randbytes(min(size, 4 << 20)) if size else b""
        i = 0
        while remaining > 0:
            n = min(len(block), remaining)
            # vary each block so parts differ
            f.write(i.to_bytes(8, "little") + block[8:n] if n >= 8 else block[:n])
            remaining -= n
            i += 1
    return path


def file_digest(path: str | os.PathLike[str], part_size: int, kind: str = "crc64nvme") -> Digest:
    """The digest a store of ``part_size`` records for the file at ``path``: with the
    ``crc64nvme`` kind (the default) the file's CRC64NVME (in one sequential pass, not
    from parts), with ``sha256`` the plain sha256 of a file of at most one part, else
    the sha256 over its parts' sha256."""
    if kind == "crc64nvme":
        crc = 0
        with open(path, "rb") as f:
            while data := f.read(_READ):
                crc = checksums.crc64nvme(data, crc)
        return Digest("crc64nvme", f"{crc:016x}")
    whole = hashlib.sha256()
    parts: list[bytes] = []
    with open(path, "rb") as f:
        while True:
            part = hashlib.sha256()
            left = part_size
            while left and (data := f.read(min(left, _READ))):
                whole.update(data)
                part.update(data)
                left -= len(data)
            if left == part_size:  # nothing more to read
                break
            parts.append(part.digest())
    if len(parts) <= 1:
        return Digest("sha256", whole.hexdigest())
    return Digest("sha256-parts", hashlib.sha256(b"".join(parts)).hexdigest(), part_size)


def bytes_digest(data: bytes) -> str:
    """The digest a store records by default (``crc64nvme``) for a file holding ``data``."""
    return f"crc64nvme:{checksums.crc64nvme(data):016x}"
