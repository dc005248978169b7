"""Sending one open file to the store: one request, parallel multipart, or one stream.

The file is read once and each part checksummed once, on the thread that sends
it: read into a buffer of the store's :class:`uploader.transfer.parts.PartPool`
(one request, multipart), or read straight into the body of a streamed request.
The checksum is of the uploader's digest kind (``crc64nvme`` by default, or
``sha256``); it goes with the part to the store (S3 checks a CRC64NVME header, and
signs with a sha256) and into the file's digest (:mod:`uploader.transfer.digest`).
A sha256 is computed beside a CRC only where the backend signs payloads with it
(``Backend.payload_sha256``: S3 over plain HTTP). Which way a file goes:

* at most one part: one request from one buffer; the digest is known before the
  request, so it travels in the object's metadata (or, where the store keeps
  none, in a digest record written after the data);
* larger, backend with multipart: ``begin``, the parts in parallel on the pool's
  threads, ``complete`` (``abort`` on any failure), then the digest record;
* larger, backend without multipart (GCS): one streamed request whose body is
  read and hashed part by part as it is sent, then the digest record.

``before_commit`` runs just before the object becomes visible (before
``complete``, before the single request, before the last bytes of a stream), so
a file that changed while it was read never lands.

Resuming (a :class:`uploader.transfer.resume.Resume` given, backend
``resumable``): each multipart session and each confirmed part is recorded
through its :class:`uploader.transfer.resume.SessionStore`; a failed attempt
leaves the session in the store (a file that changed is aborted) and the next
one continues it, sending only the parts the store does not hold (see
:mod:`uploader.transfer.resume` for when a session is kept). Without one, a
failed multipart upload is aborted.

Example::

    uploader = Uploader(backend, pool, call)
    digest, parts = uploader.upload(fd, size, part_size, "run/ep1.pt", {}, None, check)
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from uploader.errors import FileChangedError, IntegrityError
from uploader.transfer.backends.base import Backend
from uploader.transfer.digest import (
    DIGEST_KINDS,
    DIGEST_META,
    DIGEST_SUFFIX,
    Digest,
    PartHasher,
    combine_parts,
    digest_record,
    parse_digest_record,
    running_sum,
)
from uploader.transfer.files import pread_exact
from uploader.transfer.parts import PartPool
from uploader.transfer.resume import SESSION_MAX_AGE, PartRecord, Resume, Session, same_etag

__all__ = ["Call", "ProgressFn", "Uploader"]

log = logging.getLogger("uploader.transfer.upload")

MiB = 1 << 20

ProgressFn = Callable[[int], None]
#: Runs a backend operation with the store's retries: ``call(fn, what)``.
Call = Callable[[Callable[[], Any], str], Any]


class Uploader:
    """Uploads of one store: its backend, its part pool, its retrying ``call`` and the
    digest kind it writes (``crc64nvme`` or ``sha256``)."""

    def __init__(
        self, backend: Backend, pool: PartPool, call: Call, digest: str = DIGEST_KINDS[0]
    ) -> None:
        if digest not in DIGEST_KINDS:
            raise ValueError(f"digest {digest!r}: expected one of {', '.join(DIGEST_KINDS)}")
        self.backend = backend
        self.pool = pool
        self.call = call
        self.kind = digest

    def _sums(self, view: memoryview) -> tuple[bytes, bytes | None, int | None]:
        """One part's checksum of the digest kind (binary), the sha256 to sign it with
        (None where none is needed) and its CRC64NVME (None for a sha256 upload)."""
        value = running_sum(self.kind)
        value.update(view)
        part = value.digest()
        if self.kind == "sha256":
            return part, part, None
        sha = hashlib.sha256(view).digest() if self.backend.payload_sha256 else None
        return part, sha, int.from_bytes(part, "big")

    def _whole(self, part: bytes) -> Digest:
        """The digest of a file of one part whose checksum is ``part``."""
        return Digest(self.kind, part.hex())

    def upload(
        self,
        fd: int,
        size: int,
        part_size: int,
        name: str,
        meta: dict[str, str],
        progress: ProgressFn | None,
        before_commit: Callable[[], None] | None = None,
        resume: Resume | None = None,
        mtime_ns: int = 0,
    ) -> tuple[Digest, int]:
        """Upload ``size`` bytes of ``fd`` as object ``name``; return its digest and parts.

        With ``resume``, a multipart upload is recorded and continues an earlier
        session of ``name`` begun on this file version (``size``, ``mtime_ns``)."""
        multipart = size > part_size and self.backend.multipart
        if resume is not None and not (multipart and self.backend.resumable):
            self._drop_session(name, resume, "it is now sent without multipart")
            resume = None
        if size <= part_size:
            return self._single(fd, size, name, meta, progress, before_commit), 1
        if multipart:
            return self._multipart(
                fd, size, part_size, name, meta, progress, before_commit, resume, mtime_ns
            )
        return self._stream(fd, size, part_size, name, meta, progress, before_commit)

    def write_digest_record(self, name: str, size: int, digest: Digest) -> None:
        """Write the digest record of object ``name`` (see :mod:`uploader.transfer.digest`)."""
        body = digest_record(name, size, digest)
        record = name + DIGEST_SUFFIX
        self.call(
            lambda: self.backend.put_bytes(record, body, {}, hashlib.sha256(body).digest()),
            f"write digest of {name}",
        )

    def _single(
        self,
        fd: int,
        size: int,
        name: str,
        meta: dict[str, str],
        progress: ProgressFn | None,
        before_commit: Callable[[], None] | None,
    ) -> Digest:
        with self.pool.buffer(size) as buf:
            view = memoryview(buf)[:size]
            pread_exact(fd, view, 0)
            if before_commit is not None:
                before_commit()
            part, sha, crc = self._sums(view)
            digest = self._whole(part)
            meta = dict(meta)
            if self.backend.keeps_metadata:
                meta[DIGEST_META] = str(digest)
            data = bytes(view)
        self.call(
            lambda: self.backend.put_bytes(name, data, meta, sha, crc64nvme=crc), f"upload {name}"
        )
        if not self.backend.keeps_metadata:
            self.write_digest_record(name, size, digest)
        if progress:
            progress(size)
        return digest

    def _multipart(
        self,
        fd: int,
        size: int,
        part_size: int,
        name: str,
        meta: dict[str, str],
        progress: ProgressFn | None,
        before_commit: Callable[[], None] | None,
        resume: Resume | None,
        mtime_ns: int,
    ) -> tuple[Digest, int]:
        hasher = PartHasher(size, part_size, self.kind)
        backend = self.backend
        kind = self.kind
        kept: dict[int, PartRecord] = {}
        found = None
        if resume is not None:
            found = self._resumable(name, size, part_size, mtime_ns, resume, hasher.count)
        if isinstance(found, Digest):  # completed before the last process was killed
            return found, hasher.count
        if found is not None:
            upload_id, kept = found
            backend.reopen(name, upload_id, meta)
        else:
            upload_id = self.call(
                lambda: backend.begin(name, meta, checksum=kind), f"start upload of {name}"
            )
            if resume is not None:
                resume.sessions.begin_session(
                    Session(name, upload_id, part_size, size, mtime_ns, time.time())
                )
        tokens: dict[int, Any] = {i: backend.part_token(i, p.etag) for i, p in kept.items()}
        failed = threading.Event()

        def part(index: int) -> None:
            if failed.is_set():
                return
            start = index * part_size
            length = min(part_size, size - start)
            with self.pool.buffer(part_size) as buf:
                view = memoryview(buf)[:length]
                pread_exact(fd, view, start)
                value, sha, crc = self._sums(view)
                if index in kept:  # --verify-resumed: a kept part is read and checked again
                    if value.hex() == kept[index].checksum(kind):
                        hasher.add(index, value)
                        return
                    log.warning(
                        "part %d of %s differs from its record; sending it again", index + 1, name
                    )
                hasher.add(index, value)
                token = self.call(
                    lambda: backend.put_part(
                        name, upload_id, index, start, view, sha, crc64nvme=crc
                    ),
                    f"upload part {index + 1}/{hasher.count} of {name}",
                )
                tokens[index] = token
            if resume is not None:
                etag = backend.part_etag(token)
                if kind == "crc64nvme":
                    record = PartRecord(index, length, "", etag, value.hex())
                else:
                    record = PartRecord(index, length, value.hex(), etag)
                resume.sessions.record_part(name, upload_id, record)
            if progress:
                progress(length)

        verify = resume is not None and resume.verify
        todo = [i for i in range(hasher.count) if verify or i not in kept]
        if not verify:
            for i, p in kept.items():
                hasher.add(i, bytes.fromhex(p.checksum(kind) or ""))
        try:
            self.pool.run(part, todo, failed)
            if before_commit is not None:
                before_commit()
            digest = hasher.digest()
            crcs = whole = None
            if kind == "crc64nvme":
                crcs = [int.from_bytes(hasher.part(i), "big") for i in range(hasher.count)]
                whole = int(digest.hex, 16)
            self.call(
                lambda: backend.complete(
                    name, upload_id, [tokens[i] for i in range(hasher.count)], crcs, whole
                ),
                f"complete upload of {name}",
            )
        except BaseException as exc:
            # Kept for the next attempt where it can resume; a changed file never is.
            if resume is None or isinstance(exc, FileChangedError):
                with contextlib.suppress(Exception):
                    backend.abort(name, upload_id)
                if resume is not None:
                    resume.sessions.end_session(name, upload_id)
            raise
        if resume is not None:
            resume.sessions.end_session(name, upload_id)
        self.write_digest_record(name, size, digest)
        return digest, hasher.count

    def _resumable(
        self, name: str, size: int, part_size: int, mtime_ns: int, resume: Resume, count: int
    ) -> tuple[str, dict[int, PartRecord]] | Digest | None:
        """The recorded session of ``name`` to continue, and the parts the store holds as
        recorded; None (the session aborted and forgotten) when it cannot continue; the
        digest when the session was completed, with this file's recorded parts."""
        prior = resume.sessions.session(name)
        if prior is None:
            return None
        why = ""
        if (prior.size, prior.mtime_ns) != (size, mtime_ns):
            why = "the file changed since its upload began"
        elif any(p.checksum(self.kind) is None for p in prior.parts.values()):
            why = f"its parts were recorded without their {self.kind} checksum"
        elif prior.part_size != part_size:
            why = f"the part size is now {part_size}, not {prior.part_size}"
        elif time.time() - prior.started_at > SESSION_MAX_AGE:
            why = f"its upload began more than {SESSION_MAX_AGE / 86400:g} days ago"
        if why:
            self._drop_session(name, resume, why, prior)
            return None
        backend = self.backend
        held = self.call(lambda: backend.list_parts(name, prior.upload_id), f"list parts of {name}")
        if held is None:
            done = self._completed(name, prior, count)
            if done is not None:
                log.info("the upload of %s was completed before a restart; not sent again", name)
                resume.sessions.end_session(name, prior.upload_id)
                return done
            log.log(
                logging.WARNING if prior.parts else logging.DEBUG,
                "the store no longer knows the upload of %s begun at %s (completed, aborted, "
                "expired, or forgotten by a server restart); sending it again from the start",
                name,
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(prior.started_at)),
            )
            resume.sessions.end_session(name, prior.upload_id)
            return None
        kept = {}
        for i, p in prior.parts.items():
            h = held.get(i)
            if i < count and h is not None and h.size == p.size and same_etag(h.etag, p.etag):
                kept[i] = p
        again = len(prior.parts) - len(kept)
        log.info(
            "resuming upload of %s: the store holds %d of %d parts (%d bytes)%s",
            name,
            len(kept),
            count,
            sum(p.size for p in kept.values()),
            f"; {again} recorded part(s) differ from the store's and are sent again"
            if again
            else "",
        )
        return prior.upload_id, kept

    def _completed(self, name: str, prior: Session, count: int) -> Digest | None:
        """The digest of ``name`` when the store holds it as the completed ``prior``
        session: every part recorded, the object's size the recorded one, and either its
        digest record (written after completion) names the digest the recorded part
        checksums give, or the store says it was completed from exactly the recorded
        parts (the digest record is then written)."""
        if sorted(prior.parts) != list(range(count)):
            return None
        digest = combine_parts(
            (bytes.fromhex(prior.parts[i].checksum(self.kind) or "") for i in range(count)),
            prior.size,
            prior.part_size,
            self.kind,
        )
        backend = self.backend
        try:
            if backend.stat(name).size != prior.size:
                return None
        except Exception:  # absent or unreadable: not known to be complete
            return None
        try:
            body = b"".join(backend.read_range(name + DIGEST_SUFFIX, 0, None))
            recorded, recorded_size = parse_digest_record(body)
            if recorded == digest and recorded_size == prior.size:
                return digest
        except Exception:  # no digest record yet: ask the store how it was completed
            pass
        tokens = [backend.part_token(i, prior.parts[i].etag) for i in range(count)]
        try:
            if not backend.completed_from(name, prior.upload_id, tokens):
                return None
        except Exception:
            return None
        self.write_digest_record(name, prior.size, digest)
        return digest

    def _drop_session(
        self, name: str, resume: Resume, why: str, prior: Session | None = None
    ) -> None:
        """Abort and forget the recorded session of ``name``, if any."""
        if prior is None:
            prior = resume.sessions.session(name)
            if prior is None:
                return
        log.info("not resuming the upload of %s: %s; sending it whole", name, why)
        upload_id = prior.upload_id
        with contextlib.suppress(Exception):
            self.call(lambda: self.backend.abort(name, upload_id), f"abort upload of {name}")
        resume.sessions.end_session(name, upload_id)

    def _stream(
        self,
        fd: int,
        size: int,
        part_size: int,
        name: str,
        meta: dict[str, str],
        progress: ProgressFn | None,
        before_commit: Callable[[], None] | None,
    ) -> tuple[Digest, int]:
        holder: dict[str, PartHasher] = {}

        def chunks() -> Iterator[bytes]:
            # A fresh hasher for every attempt: a retried stream starts from byte 0.
            hasher = holder["h"] = PartHasher(size, part_size, self.kind)
            step = min(part_size, 4 * MiB)
            for index in range(hasher.count):
                h = running_sum(self.kind)
                start = index * part_size
                end = min(size, start + part_size)
                pos = start
                while pos < end:
                    data = os.pread(fd, min(step, end - pos), pos)
                    if not data:
                        raise IntegrityError(f"{name}: local file shrank during upload")
                    h.update(data)
                    pos += len(data)
                    if progress:
                        progress(len(data))
                    if pos >= size and before_commit is not None:
                        before_commit()  # before the last bytes go out
                    yield data
                hasher.add(index, h.digest())

        self.call(lambda: self.backend.put_stream(name, chunks(), meta, size), f"upload {name}")
        digest = holder["h"].digest()
        self.write_digest_record(name, size, digest)
        return digest, holder["h"].count
