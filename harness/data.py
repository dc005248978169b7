"""Test data: files of pseudo-random bytes, fast to write at any size."""

from __future__ import annotations

import random
from pathlib import Path

__all__ = ["write_random"]


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
