"""Test oracles for the transfer package, written from the definitions, not the product code."""

from __future__ import annotations

import hashlib
import os

from uploader.transfer.digest import Digest

__all__ = ["file_digest"]

_READ = 4 << 20


def file_digest(path: str | os.PathLike[str], part_size: int) -> Digest:
    """The digest a store of ``part_size`` records for the file at ``path``: the plain
    sha256 of a file of at most one part, else the sha256 over its parts' sha256."""
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
