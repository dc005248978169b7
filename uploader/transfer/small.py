"""Small objects held whole in memory, and compare-and-swap writes of them.

Pointers, digest records and manifests are small: they are written in one request
(``put_bytes``), read whole with a size bound (``get_bytes``), and, where the store
honours conditions, replaced only while they still have the version they were read
with (``get_versioned`` / ``put_if``). Whether it does is tested once per store with
a scratch object (``conditions_honoured``). :class:`SmallObjects` is a part of
:class:`uploader.transfer.store.ObjectStore`, which supplies the backend, the
retries and deletion.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

from uploader.errors import (
    IntegrityError,
    ObjectNotFoundError,
    PreconditionFailedError,
    TransientError,
    UploaderError,
)
from uploader.transfer.backends.base import Backend, ObjectInfo, RangeTarget
from uploader.transfer.digest import (
    DIGEST_META,
    DIGEST_SUFFIX,
    Digest,
    crc64nvme,
    parse_digest_record,
)
from uploader.transfer.names import check_object_name
from uploader.transfer.settings import StoreSettings

__all__ = ["SmallObjects", "DIGEST_RECORD_MAX"]

log = logging.getLogger("uploader.transfer.store")

#: The most bytes read of a digest record (one line of JSON; anything larger is not one).
DIGEST_RECORD_MAX = 64 << 10


def _refuse_larger(object_name: str, data: bytes, max_size: int | None) -> None:
    if max_size is not None and len(data) > max_size:
        raise IntegrityError(
            f"{object_name} is larger than the {max_size} bytes allowed for it; it was "
            "not written by ckpt-uploader or is damaged: remove or replace it"
        )


class SmallObjects:
    """Whole-object reads and writes, conditional writes, and the probe of conditions."""

    backend: Backend
    settings: StoreSettings
    _conditions: tuple[bool, str] | None

    def _call(self, fn: Callable[[], Any], what: str) -> Any:
        raise NotImplementedError  # pragma: no cover

    def delete(self, object_name: str) -> bool:
        raise NotImplementedError  # pragma: no cover

    def put_bytes(
        self, object_name: str, data: bytes, metadata: Mapping[str, str] | None = None
    ) -> Digest:
        """Store ``data`` in one request, its digest in the metadata where the store
        keeps metadata (no digest record is written); return the digest."""
        object_name = check_object_name(object_name)
        sha = hashlib.sha256(data).digest()
        digest = Digest("sha256", sha.hex())
        meta = {k.lower(): str(v) for k, v in (metadata or {}).items()}
        if self.backend.keeps_metadata:
            meta[DIGEST_META] = str(digest)
        self._call(
            lambda: self.backend.put_bytes(object_name, bytes(data), meta, sha),
            f"upload {object_name}",
        )
        return digest

    def put_blob(
        self, object_name: str, data: bytes | bytearray | memoryview, crc: int | None = None
    ) -> None:
        """Store ``data`` in one request, checked by the store on arrival where it checks
        (its CRC64NVME, ``crc`` when the caller has it, sent with it; its sha256 only
        where the payload is signed); no metadata and no digest record (a chunk object
        is named by its own hash)."""
        object_name = check_object_name(object_name)
        sha = hashlib.sha256(data).digest() if self.backend.payload_sha256 else None
        crc = crc64nvme(data) if crc is None else crc
        self._call(
            lambda: self.backend.put_bytes(object_name, data, {}, sha, crc),  # type: ignore[arg-type]
            f"upload {object_name}",
        )

    def read_into(self, object_name: str, length: int, into: RangeTarget) -> int:
        """Receive the object's first ``length`` bytes (fewer when it is shorter) into
        ``into`` (retried as a whole on transient errors); how many arrived."""
        object_name = check_object_name(object_name)

        def go() -> int:
            return sum(len(w) for w in self.backend.read_range_into(object_name, 0, length, into))

        return int(self._call(go, f"download {object_name}"))

    def get_bytes(self, object_name: str, max_size: int | None = None) -> bytes:
        """The whole object in memory (small objects: pointers, digest records); unverified.

        ``max_size`` bounds what is read: a larger object raises IntegrityError after
        ``max_size + 1`` bytes, so a huge object planted in the bucket cannot exhaust memory.
        """
        object_name = check_object_name(object_name)
        length = None if max_size is None else max_size + 1
        data: bytes = self._call(
            lambda: b"".join(self.backend.read_range(object_name, 0, length)),
            f"download {object_name}",
        )
        _refuse_larger(object_name, data, max_size)
        return data

    def get_versioned(
        self, object_name: str, max_size: int | None = None
    ) -> tuple[bytes, str | None]:
        """The whole (small) object and its version, for :meth:`put_if`; unverified.
        ``max_size`` bounds what is read, as for :meth:`get_bytes`."""
        object_name = check_object_name(object_name)
        limit = None if max_size is None else max_size + 1
        data, version = self._call(
            lambda: self.backend.get_versioned(object_name, limit), f"download {object_name}"
        )
        _refuse_larger(object_name, data, max_size)
        return data, version

    def put_if(
        self,
        object_name: str,
        data: bytes,
        expected: str | None,
        metadata: Mapping[str, str] | None = None,
    ) -> str | None:
        """Store ``data`` only while the object still has the version ``expected`` (as
        :meth:`get_versioned` returned it; None: only while it does not exist); return
        the new version. Raises PreconditionFailedError when another writer changed it
        first (read again and merge). Only meaningful where :meth:`conditions_honoured`.

        A transient failure is retried; if the first attempt landed after all, the retry
        fails its condition, and the caller's re-read finds its own write.
        """
        object_name = check_object_name(object_name)
        sha = hashlib.sha256(data).digest()
        meta = {k.lower(): str(v) for k, v in (metadata or {}).items()}
        if self.backend.keeps_metadata:
            meta[DIGEST_META] = str(Digest("sha256", sha.hex()))
        return self._call(  # type: ignore[no-any-return]
            lambda: self.backend.put_if(object_name, bytes(data), meta, sha, expected),
            f"upload {object_name}",
        )

    def conditions_honoured(self, probe_name: str) -> tuple[bool, str]:
        """Whether conditional writes work here, and why not; tested once per store.

        A scratch object ``probe_name`` is created only-if-absent, then written again
        only-if-absent and only-if-version-"1" (both must be refused), then replaced
        with its real version (must succeed), then deleted. Stores that ignore the
        conditions (rclone serve s3) accept the second and third writes. A backend that
        enforces them itself (LOCAL) is not asked.
        """
        if self._conditions is not None:
            return self._conditions
        self._conditions = self._probe_conditions(check_object_name(probe_name))
        return self._conditions

    def _probe_conditions(self, name: str) -> tuple[bool, str]:
        if not self.backend.conditional:
            return False, f"the {self.settings.provider} backend has no conditional writes"
        if self.backend.enforces_conditions:
            return True, "the backend enforces the conditions itself"
        try:
            self.put_if(name, b"1", None)
            for expected, what in ((None, "If-None-Match: *"), ("1", "a version mismatch")):
                try:
                    self.put_if(name, b"2", expected)
                except PreconditionFailedError:
                    continue
                return False, f"the store ignores conditional writes (it accepted {what})"
            read = self.get_versioned(name)[1]
            if read is None:
                return False, "the store reports no object version"
            try:
                self.put_if(name, b"3", read)
            except PreconditionFailedError:
                return False, "the store refused a write carrying the object's own version"
            return True, "conditional writes honoured"
        except PreconditionFailedError:
            return False, "the store refused to create a new scratch object conditionally"
        except TransientError:
            raise  # not an answer: ask again later
        except UploaderError as exc:
            return False, f"a conditional write failed ({type(exc).__name__}: {exc})"
        finally:
            try:
                self.delete(name)
            except UploaderError as exc:
                log.warning("could not delete the scratch object %s: %s", name, exc)

    def recorded_digest(self, object_name: str, info: ObjectInfo) -> Digest | None:
        """The digest recorded for ``object_name`` (listed as ``info``): in its metadata,
        else in its digest record (a small object beside it); None when neither is."""
        digest: Digest | None = None
        raw = info.metadata.get(DIGEST_META)
        if raw:
            with contextlib.suppress(IntegrityError):
                digest = Digest.parse(raw)
        if digest is None:
            try:
                digest, recorded_size = parse_digest_record(
                    self.get_bytes(object_name + DIGEST_SUFFIX, max_size=DIGEST_RECORD_MAX)
                )
                if recorded_size != info.size:
                    # Keep the recorded digest: a truncated or replaced object must
                    # fail verification, not pass as "no digest, size only".
                    log.warning(
                        "digest record of %s names %s bytes but the object has %d; "
                        "the object was truncated or replaced, downloads will fail verification",
                        object_name,
                        recorded_size,
                        info.size,
                    )
            except ObjectNotFoundError:
                pass
            except (ValueError, KeyError, TypeError, IntegrityError):
                log.warning("digest record of %s is unreadable; ignoring it", object_name)
        return digest
