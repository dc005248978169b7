"""Content digests: their forms, where a store records them, and how downloads check them.

One checksum pass per byte, on the thread that moves the part, gives each part's
value; the file's digest is combined from the part values (no sequential pass).
Two kinds are written (:data:`DIGEST_KINDS`):

* ``crc64nvme`` (the default): the CRC-64/NVME of the whole file, the checksum S3
  computes and checks itself. A CRC of two pieces combines from their CRCs and the
  second one's length, so parts (and download ranges of any size) are checked on
  their own threads and combined in order::

      crc64nvme:<16 hex>            # the value, big-endian, as S3's base64 header holds it

* ``sha256`` (asked for with ``--digest sha256``: a cryptographic identity): a file of
  at most one part gets the plain sha256 of its bytes (what ``sha256sum`` prints); a
  larger one gets the sha256 over the concatenated binary sha256 of its parts,
  together with the part size::

      sha256:<hex>                    # size <= part_size
      sha256-parts:<part_size>:<hex>  # size > part_size

Every form ever written keeps verifying: objects uploaded with sha256 restore as
before, and one manifest may name files of both kinds.

Where it is recorded: in the object's metadata under :data:`DIGEST_META` when
the file fits one part (so the digest is known before its single request) and
the store keeps metadata; otherwise in a digest record, a small JSON object
``<name>`` + :data:`DIGEST_SUFFIX` written after the data
(:func:`digest_record` / :func:`parse_digest_record`)::

    {"object": "run/ep1.pt", "size": 123, "digest": "crc64nvme:<hex>"}

Downloads check the digest before the file is renamed into place. A
``crc64nvme`` digest is computed per ranged read, as it is received, and the
ranges combined. For a ``sha256-parts`` digest the ranged reads are aligned to
the upload's parts and each part is hashed by the thread that fetches it. A plain
``sha256`` of an object larger than one download range cannot be split: it is
computed after the parallel download, in one sequential pass over the written file.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from uploader.errors import IntegrityError

__all__ = [
    "DIGEST_KINDS",
    "DIGEST_META",
    "DIGEST_SUFFIX",
    "Digest",
    "PartHasher",
    "RunningSum",
    "combine_parts",
    "crc64nvme",
    "crc64nvme_b64",
    "crc64nvme_combine",
    "running_sum",
    "digest_record",
    "parse_digest_record",
]

#: The name suffix of a digest record (the object's own name comes first).
DIGEST_SUFFIX = ".ckpt-digest"
#: Metadata key for the digest; letters only, valid on S3, Azure and GCS alike.
DIGEST_META = "ckptdigest"
#: The digest kinds an upload can be asked to write (``--digest``); the first is the default.
DIGEST_KINDS = ("crc64nvme", "sha256")
# ASCII only: int() would also accept other scripts' digits.
_DIGEST_RE = re.compile(
    r"(?:sha256:|sha256-parts:(?P<size>[0-9]{1,20}):)?(?P<hex>[0-9a-fA-F]{64})", re.ASCII
)
_CRC_RE = re.compile(r"crc64nvme:(?P<hex>[0-9a-fA-F]{16})", re.ASCII)


def _checksums() -> Any:
    # Imported when first needed: loading awscrt's native library takes some 45 ms, which
    # commands that compute no checksum (status, ls) need not pay at start-up.
    from awscrt import checksums

    return checksums


def crc64nvme(data: bytes | bytearray | memoryview, previous: int = 0) -> int:
    """The CRC-64/NVME of ``data``, continuing from ``previous`` (the CRC of the bytes
    before it); hardware-accelerated by awscrt (which lets go of the interpreter lock)."""
    return int(_checksums().crc64nvme(data, previous))


def crc64nvme_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC-64/NVME of ``a + b`` from ``crc(a)``, ``crc(b)`` and ``len(b)``."""
    return int(_checksums().combine_crc64nvme(crc1, crc2, len2))


def crc64nvme_b64(crc: int) -> str:
    """The value as S3's ``x-amz-checksum-crc64nvme`` carries it: base64 of 8 bytes,
    big-endian."""
    return base64.b64encode(crc.to_bytes(8, "big")).decode()


@dataclass(frozen=True)
class Digest:
    """A content digest: ``algo`` is ``crc64nvme``, ``sha256`` or ``sha256-parts``."""

    algo: str
    hex: str
    part_size: int = 0

    def __str__(self) -> str:
        if self.algo in ("sha256", "crc64nvme"):
            return f"{self.algo}:{self.hex}"
        return f"sha256-parts:{self.part_size}:{self.hex}"

    @property
    def kind(self) -> str:
        """The kind of upload that writes it: ``crc64nvme`` or ``sha256`` (both sha256 forms)."""
        return "crc64nvme" if self.algo == "crc64nvme" else "sha256"

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parse the string form; a bare 64-hex string is a plain sha256."""
        text = text.strip()
        c = _CRC_RE.fullmatch(text)
        if c:
            return cls("crc64nvme", c.group("hex").lower())
        m = _DIGEST_RE.fullmatch(text)
        if m:
            if m.group("size") is None:
                return cls("sha256", m.group("hex").lower())
            size = int(m.group("size"))
            if size > 0:
                return cls("sha256-parts", m.group("hex").lower(), size)
        raise IntegrityError(
            f"unrecognised digest {text[:80]!r}; expected 'crc64nvme:<16 hex>', "
            "'sha256:<hex>' or 'sha256-parts:<part_size>:<hex>'"
        )


class RunningSum(Protocol):
    """A checksum fed piece by piece (``hashlib``'s interface)."""

    def update(self, data: bytes | bytearray | memoryview, /) -> None: ...

    def digest(self) -> bytes: ...


class _Crc:
    """CRC-64/NVME with ``hashlib``'s interface; ``digest()`` is the 8-byte big-endian value."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: bytes | bytearray | memoryview, /) -> None:
        self.value = crc64nvme(data, self.value)

    def digest(self) -> bytes:
        return self.value.to_bytes(8, "big")


def running_sum(kind: str) -> RunningSum:
    """A fresh checksum of ``kind`` (``crc64nvme`` or ``sha256``)."""
    if kind == "crc64nvme":
        return _Crc()
    if kind == "sha256":
        return hashlib.sha256()
    raise ValueError(f"unknown digest kind {kind!r}; expected one of {', '.join(DIGEST_KINDS)}")


def combine_parts(
    part_digests: Iterable[bytes], size: int, part_size: int, kind: str = "sha256"
) -> Digest:
    """The file digest from its parts' binary checksums (of ``kind``), in order: for
    ``crc64nvme`` 8 bytes big-endian each, combined with the parts' lengths."""
    parts = list(part_digests)
    if kind == "crc64nvme":
        crc = 0
        for i, value in enumerate(parts):
            length = max(0, min(part_size, size - i * part_size))
            crc = crc64nvme_combine(crc, int.from_bytes(value, "big"), length)
        return Digest("crc64nvme", f"{crc:016x}")
    if size <= part_size:
        if len(parts) > 1:
            raise ValueError("a file of at most one part has one part digest")
        return Digest("sha256", parts[0].hex() if parts else hashlib.sha256(b"").hexdigest())
    return Digest("sha256-parts", hashlib.sha256(b"".join(parts)).hexdigest(), part_size)


class PartHasher:
    """Collects per-part checksums of ``kind`` (possibly out of order) and yields the
    file digest. The parts are ``part_size`` bytes each, the last one what is left."""

    def __init__(self, size: int, part_size: int, kind: str = "sha256") -> None:
        self.size = size
        self.part_size = part_size
        self.kind = kind
        self._parts: dict[int, bytes] = {}

    @property
    def count(self) -> int:
        return max(1, -(-self.size // self.part_size))

    def add(self, index: int, part_digest: bytes) -> None:
        self._parts[index] = part_digest

    def part(self, index: int) -> bytes:
        """The checksum added for part ``index``."""
        return self._parts[index]

    def digest(self) -> Digest:
        missing = [i for i in range(self.count) if i not in self._parts]
        if missing:
            raise ValueError(f"parts not hashed: {missing[:5]}")
        return combine_parts(
            (self._parts[i] for i in range(self.count)), self.size, self.part_size, self.kind
        )


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
