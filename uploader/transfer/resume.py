"""Resumable multipart uploads: what is recorded of a session, and the seam that records it.

A multipart upload (S3 multipart, Azure block blob, LOCAL staged file) is a
*session* in the store. When the uploader is killed, or an attempt fails and is
retried, the parts the store already holds need not be sent again, provided
they are known to be the right bytes. So the caller records, in its own durable
journal:

* each session when it begins (:class:`Session`): the store's upload id, the part
  size, the object name, and the file's size and mtime at that moment;
* each part as the store confirms it (:class:`PartRecord`): number, size, its
  checksum of the upload's digest kind (CRC64NVME or sha256), and the store's ETag
  or block id.

The transfer layer asks for and writes these records through a
:class:`SessionStore`, which the daemon's journal implements; it never knows
where they live. :class:`Resume` is what one upload is given.

On the next attempt the upload resumes only when the file's size and mtime are
those recorded (a changed file is never stitched from two versions: the session
is aborted and the file sent whole), the part size is unchanged, the session is
younger than :data:`SESSION_MAX_AGE`, and the store still knows it. It keeps the
parts where the record and the store's listing agree on size and ETag, and
sends the rest. The file digest then comes from the recorded part checksums, or,
with ``verify``, from checksumming the kept parts again. A session whose parts were
recorded with another digest kind than the upload now uses is not resumed.

Example::

    store.upload_file("ep1.pt", "run/ep1.pt", resume=Resume(journal_sessions, verify=False))
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["PartRecord", "Resume", "Session", "SessionStore", "SESSION_MAX_AGE", "same_etag"]

#: A session older than this is not resumed (aborted, the file sent again): Azure drops
#: uncommitted blocks after seven days, and S3 lifecycle rules often abort after a week.
SESSION_MAX_AGE = 6 * 86400.0


@dataclass(frozen=True)
class PartRecord:
    """One part the store confirmed: 0-based ``index``, ``size`` bytes, its sha256 (hex;
    empty when the upload's digest is a CRC), the store's ETag or block id (what it
    answered for the part) and its CRC64NVME (16 hex; empty when the digest is sha256)."""

    index: int
    size: int
    sha256: str
    etag: str
    crc64nvme: str = ""

    def checksum(self, kind: str) -> str | None:
        """The part's recorded checksum of ``kind`` (hex), None when it was not recorded."""
        value = self.crc64nvme if kind == "crc64nvme" else self.sha256
        return value or None


@dataclass(frozen=True)
class Session:
    """One multipart upload as recorded when it began, with the parts confirmed since."""

    object: str
    upload_id: str
    part_size: int
    size: int
    mtime_ns: int
    started_at: float
    parts: Mapping[int, PartRecord] = field(default_factory=dict)

    @property
    def bytes_held(self) -> int:
        """Bytes of the parts recorded as held by the store."""
        return sum(p.size for p in self.parts.values())


class SessionStore(Protocol):
    """Durable records of multipart sessions, one session per object name.

    Every method must have committed its change when it returns (the part records
    are relied on after a ``kill -9``), and may be called from any thread.
    """

    def session(self, object_name: str) -> Session | None:
        """The recorded session of ``object_name`` with its parts, or None."""
        ...

    def begin_session(self, session: Session) -> None:
        """Record a new session (replacing any earlier one of the same object)."""
        ...

    def record_part(self, object_name: str, upload_id: str, part: PartRecord) -> None:
        """Record a part the store confirmed (replacing an earlier record of it)."""
        ...

    def end_session(self, object_name: str, upload_id: str) -> None:
        """Forget the session (completed, aborted or lost) and its parts."""
        ...


@dataclass(frozen=True)
class Resume:
    """How one upload resumes: where sessions are recorded, and whether kept parts are
    hashed again (``verify``) before the object is completed."""

    sessions: SessionStore
    verify: bool = False


def same_etag(a: str, b: str) -> bool:
    """Whether two ETags name the same part (quotes and case aside)."""
    return a.strip().strip('"').lower() == b.strip().strip('"').lower()
