"""Content digests: their two forms, where a store records them, and how downloads check them.

One hashing pass serves two purposes: each part's sha256 signs its request
where the backend signs payloads (S3's SigV4 payload hash, which the server
checks in transit), and the file's digest is derived from the part hashes. A file of at most one part gets the plain sha256 of its
bytes (what ``sha256sum`` prints); a larger one gets the sha256 over the
concatenated binary sha256 of its parts, together with the part size::

    sha256:<hex>                    # size <= part_size
    sha256-parts:<part_size>:<hex>  # size > part_size

Where it is recorded: in the object's metadata under :data:`DIGEST_META` when
the file fits one part (so the digest is known before its single request) and
the store keeps metadata; otherwise in a digest record, a small JSON object
``<name>`` + :data:`DIGEST_SUFFIX` written after the data
(:func:`digest_record` / :func:`parse_digest_record`)::

    {"object": "run/ep1.pt", "size": 123, "digest": "sha256-parts:8388608:<hex>"}

Downloads check the digest before the file is renamed into place. For a ``sha256-parts`` digest
the ranged reads are aligned to the upload's parts and each part is hashed by
the thread that fetches it, so the check runs as parallel as the download. An
object that fits one download part is fetched and hashed in one stream. A plain
``sha256`` of a larger object (uploaded with a larger part size, or given by the
caller) cannot be split: it is computed after the parallel download, in one
sequential pass over the written file.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

from uploader.errors import IntegrityError

__all__ = [
    "DIGEST_META",
    "DIGEST_SUFFIX",
    "Digest",
    "PartHasher",
    "combine_parts",
    "digest_record",
    "parse_digest_record",
]

#: The name suffix of a digest record (the object's own name comes first).
DIGEST_SUFFIX = ".ckpt-digest"
#: Metadata key for the digest; letters only, valid on S3, Azure and GCS alike.
DIGEST_META = "ckptdigest"
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


def digest_record(name: str, size: int, digest: Digest) -> bytes:
    """The body of the digest record of object ``name`` (``size`` bytes)."""
    return json.dumps({"object": name, "size": size, "digest": str(digest)}).encode()


def parse_digest_record(body: bytes) -> tuple[Digest, int | None]:
    """The digest and the size a digest record names (None when it names no
    readable size: the digest is still the one to check against).

    Raises ValueError, KeyError, TypeError or IntegrityError when the record names
    no readable digest.
    """
    record = json.loads(body)
    digest = Digest.parse(str(record["digest"]))
    try:
        size = int(record["size"])
    except (KeyError, TypeError, ValueError):
        size = None
    return digest, size
