"""Content digests recorded at upload and checked after every download.

One hashing pass serves two purposes: each part's sha256 signs the request
(SigV4 payload hash) and checks it in transit, and the file's digest is derived
from the part hashes. A file of at most one part gets the plain sha256 of its
bytes (what ``sha256sum`` prints); a larger one gets the sha256 over the
concatenated binary sha256 of its parts, together with the part size::

    sha256:<hex>                    # size <= part_size
    sha256-parts:<part_size>:<hex>  # size > part_size

Verification recomputes the same form, hashing parts in parallel threads
(hashlib releases the GIL), so checking a 50 GB download uses every core.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from uploader.errors import IntegrityError

__all__ = ["Digest", "PartHasher", "file_digest", "verify_file", "combine_parts"]

_READ = 4 << 20
# ASCII only: int() would also accept other scripts' digits.
_DIGEST_RE = re.compile(
    r"(?:sha256:|sha256-parts:(?P<size>[0-9]{1,20}):)?(?P<hex>[0-9a-fA-F]{64})", re.ASCII
)


@dataclass(frozen=True)
class Digest:
    """A content digest: ``algo`` is ``sha256`` or ``sha256-parts``."""

    algo: str
    hex: str
    part_size: int = 0

    def __str__(self) -> str:
        if self.algo == "sha256":
            return f"sha256:{self.hex}"
        return f"sha256-parts:{self.part_size}:{self.hex}"

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parse the string form; a bare 64-hex string is a plain sha256."""
        text = text.strip()
        m = _DIGEST_RE.fullmatch(text)
        if m:
            if m.group("size") is None:
                return cls("sha256", m.group("hex").lower())
            size = int(m.group("size"))
            if size > 0:
                return cls("sha256-parts", m.group("hex").lower(), size)
        raise IntegrityError(
            f"unrecognised digest {text[:80]!r}; expected 'sha256:<hex>' "
            "or 'sha256-parts:<part_size>:<hex>'"
        )


def combine_parts(part_digests: Iterable[bytes], size: int, part_size: int) -> Digest:
    """The file digest from its parts' binary sha256 digests, in order."""
    parts = list(part_digests)
    if size <= part_size:
        if len(parts) > 1:
            raise ValueError("a file of at most one part has one part digest")
        return Digest("sha256", parts[0].hex() if parts else hashlib.sha256(b"").hexdigest())
    return Digest("sha256-parts", hashlib.sha256(b"".join(parts)).hexdigest(), part_size)


class PartHasher:
    """Collects per-part sha256 digests (possibly out of order) and yields the file digest."""

    def __init__(self, size: int, part_size: int) -> None:
        self.size = size
        self.part_size = part_size
        self._parts: dict[int, bytes] = {}

    @property
    def count(self) -> int:
        return max(1, -(-self.size // self.part_size))

    def add(self, index: int, sha256_digest: bytes) -> None:
        self._parts[index] = sha256_digest

    def digest(self) -> Digest:
        missing = [i for i in range(self.count) if i not in self._parts]
        if missing:
            raise ValueError(f"parts not hashed: {missing[:5]}")
        return combine_parts((self._parts[i] for i in range(self.count)), self.size, self.part_size)


def _hash_range(path: Path, start: int, length: int) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        remaining = length
        buf = bytearray(min(_READ, max(length, 1)))
        view = memoryview(buf)
        while remaining > 0:
            n = f.readinto(view[: min(len(buf), remaining)])
            if not n:
                raise IntegrityError(f"{path} shrank while it was being hashed")
            h.update(view[:n])
            remaining -= n
    return h.digest()


def file_digest(path: str | os.PathLike[str], part_size: int, threads: int = 0) -> Digest:
    """Digest of a local file in the form a store of ``part_size`` records."""
    p = Path(path)
    size = p.stat().st_size
    if size <= part_size:
        return Digest("sha256", _hash_range(p, 0, size).hex())
    count = -(-size // part_size)
    workers = threads or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="digest") as pool:
        parts = pool.map(
            lambda i: _hash_range(p, i * part_size, min(part_size, size - i * part_size)),
            range(count),
        )
        return combine_parts(parts, size, part_size)


def verify_file(
    path: str | os.PathLike[str], expected: Digest | str, size: int | None = None
) -> Digest:
    """Raise IntegrityError unless the file matches ``expected`` (and ``size`` when given)."""
    exp = Digest.parse(expected) if isinstance(expected, str) else expected
    actual_size = os.path.getsize(path)
    if size is not None and actual_size != size:
        raise IntegrityError(
            f"{path}: size {actual_size} bytes, expected {size}; "
            "the copy is truncated or corrupt, fetch it again"
        )
    part = exp.part_size if exp.algo == "sha256-parts" else max(actual_size, 1)
    got = file_digest(path, part)
    if exp.algo == "sha256" and got.algo != "sha256":  # pragma: no cover - defensive
        got = Digest("sha256", _hash_range(Path(path), 0, actual_size).hex())
    if got != exp:
        raise IntegrityError(
            f"{path}: digest {got} does not match the recorded {exp}; "
            "the data is corrupt, do not use it (fetch it again or use another checkpoint)"
        )
    return got
