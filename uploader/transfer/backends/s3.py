"""S3 and S3-compatible stores: the S3 operations, over the request layer in
:mod:`uploader.transfer.backends.s3request`.

libcloud resolves the provider name to its endpoint and signing region
(``s3``, ``s3_eu_west``, ``minio``, ``wasabi`` ...). The requests themselves go
out here, because libcloud's paths do not fit large checkpoints: its V4
signer hashes a bytes body again (or signs a stream as ``UNSIGNED-PAYLOAD``),
its stream upload sends 5 MiB parts one after another on one connection, and
its downloads read whole objects into memory.

* Checksums: with a CRC64NVME upload (the default digest) every PutObject and
  UploadPart carries ``x-amz-checksum-crc64nvme`` (and
  ``x-amz-sdk-checksum-algorithm``), which S3 checks against the bytes it received
  (``BadDigest`` otherwise: the part is sent again); a multipart upload is created as
  a ``FULL_OBJECT`` CRC64NVME one and completed with each part's value and the whole
  object's, which S3 checks again. Over HTTPS the payload is then not signed
  (``x-amz-content-sha256: UNSIGNED-PAYLOAD``, the checksum header is) and no
  sha256 is computed at all; over plain HTTP the payload's sha256 is signed too.
  With a sha256 upload the part's sha256, computed once by the store, is the signed
  payload hash, and no checksum header is sent.
  What S3-compatible servers do with them (probed in the tests, moto 5.2 and rclone
  1.7x): moto accepts the headers and stores the values (a multipart object's
  FULL_OBJECT CRC64NVME it combines itself; ``HeadObject`` with
  ``x-amz-checksum-mode: ENABLED`` returns them) but refuses no wrong one; rclone
  serve s3 accepts and ignores them (it echoes a PutObject's header back, keeps
  none for multipart). Neither refuses a request for them. A server that does
  (400 ``InvalidArgument``, 501 ``NotImplemented``: older S3-compatibles) gets that
  request again without them and no checksum header from then on, with a warning;
  the payload's sha256 is then signed (``S3Multipart._checksummed``). Where the
  server does not check, TLS (or over plain HTTP the signed payload) and the
  download's own check against the recorded digest guard the bytes.
* Signing: SigV4 (:mod:`uploader.transfer.backends.sigv4`) with the payload hash the
  store already computed for each part, or ``UNSIGNED-PAYLOAD`` (above). The body
  is never hashed a second time. ``Content-MD5`` is not sent: it would cost a
  second full pass over every byte and adds no protection beyond the checksum.
* Parallel parts: each thread keeps its own keep-alive HTTP connection
  (``http.client``), and bodies are sent as ``memoryview`` slices of the
  store's part buffer, without copies.
* Downloads stream ranged GETs in ``chunk_size`` pieces. Servers that answer a
  range with 200 and ``Content-Range``, or with the whole object, are handled.
* Listings page through ListObjectsV2 (``list_page_size`` keys a page). Multipart
  uploads, their listings and resuming live in
  :mod:`uploader.transfer.backends.s3multipart`.
* New objects carry the bucket-policy options (``sse``, ``sse_kms_key_id``,
  ``storage_class``, ``acl``; :mod:`uploader.transfer.backends.s3options`) on PutObject
  and CreateMultipartUpload, as the AWS CLI sends them.
* Conditional writes: ``If-None-Match: *`` to create, ``If-Match: <ETag>`` to replace;
  412 ``PreconditionFailed`` and 409 ``ConditionalRequestConflict`` (a concurrent
  conditional write) raise PreconditionFailedError. AWS S3 and moto honour both;
  rclone serve s3 ignores them (see ``ObjectStore.conditions_honoured``). A 501
  ``NotImplemented`` answer is permanent: the store cannot do conditional writes.

Endpoint, TLS, timeout and error mapping: see :mod:`uploader.transfer.backends.s3request`.

Example::

    hp = ObjectStoreHparams(provider="s3", container="ckpts", host="127.0.0.1",
                            port=9000, key_environ="K", secret_environ="S")
    backend = S3Backend(hp.store_settings())
    backend.check_container()
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping

from uploader.errors import (
    ConfigError,
    ContainerNotFoundError,
    ObjectNotFoundError,
    PreconditionFailedError,
)
from uploader.transfer.backends.base import (
    RECV_PIECE,
    ObjectInfo,
    RangeTarget,
    range_target,
)
from uploader.transfer.backends.http import http_time, iso_time, metadata_from_headers, range_value
from uploader.transfer.backends.s3multipart import S3Multipart
from uploader.transfer.backends.s3request import (
    S3Error,
    S3TransientError,
    parse_xml,
)
from uploader.transfer.settings import StoreSettings

__all__ = ["S3Backend", "S3Error"]

log = logging.getLogger(__name__)

_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


class S3Backend(S3Multipart):
    """One bucket on S3 or an S3-compatible server.

    Args:
        settings: provider (an S3-family libcloud name), container (the bucket),
            host/port/region, TLS, and the names of the credential variables.
        list_page_size: keys per ListObjectsV2 page (1-1000).

    The request counters (``requests``, ``resent``) are :class:`S3RequestBackend`'s.
    """

    keeps_metadata = True
    put_checked = True  # S3 refuses a body whose sha256 is not the signed one
    conditional = True

    def __init__(self, settings: StoreSettings, *, list_page_size: int = 1000) -> None:
        if not 1 <= list_page_size <= 1000:
            raise ConfigError(f"list_page_size {list_page_size} must be between 1 and 1000")
        super().__init__(settings)
        self.list_page_size = list_page_size

    # -- container ------------------------------------------------------------------------
    def check_container(self, create: bool = False) -> None:
        what = f"checking {self._where}"
        try:
            self._request("HEAD", None, what, missing="bucket")
            return
        except ContainerNotFoundError:
            if not create:
                raise
        body = b""
        if self.region != "us-east-1":
            body = (
                "<CreateBucketConfiguration><LocationConstraint>"
                f"{self.region}</LocationConstraint></CreateBucketConfiguration>"
            ).encode()
        try:
            self._request("PUT", None, f"creating {self._where}", body=body)
        except S3Error as exc:
            if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
        log.info("created %s", self._where)

    # -- small objects --------------------------------------------------------------------
    def put_bytes(
        self,
        name: str,
        data: bytes,
        metadata: Mapping[str, str],
        sha256: bytes | None,
        crc64nvme: int | None = None,
    ) -> None:
        def send() -> None:
            headers = self._object_headers(metadata)
            payload = self._payload(data, sha256, crc64nvme, headers)
            self._request("PUT", name, what, headers=headers, body=data, payload_sha256=payload)

        what = f"upload {name}"
        self._checksummed(send, what, crc64nvme is not None)

    # -- conditional writes ---------------------------------------------------------------
    def get_versioned(self, name: str, limit: int | None = None) -> tuple[bytes, str | None]:
        resp = self._send("GET", name)
        try:
            if resp.status != 200:
                raise self._error(resp.status, resp.read(), f"download {name}")
            return (resp.read() if limit is None else resp.read(limit)), resp.getheader("ETag")
        finally:
            if not resp.isclosed() or resp.will_close:  # not read to its end: not reusable
                self._drop_conn()

    def put_if(
        self,
        name: str,
        data: bytes,
        metadata: Mapping[str, str],
        sha256: bytes,
        expected: str | None,
    ) -> str | None:
        headers = self._object_headers(metadata)
        payload = self._payload(data, sha256, None, headers)
        if expected is None:
            headers["if-none-match"] = "*"
        else:
            headers["if-match"] = expected
        what = f"upload {name}"
        try:
            resp, _ = self._request(
                "PUT", name, what, headers=headers, body=data, payload_sha256=payload
            )
        except (S3Error, S3TransientError) as exc:
            if exc.status == 412 or exc.code in (
                "PreconditionFailed",
                "ConditionalRequestConflict",
            ):
                raise PreconditionFailedError(
                    f"{what}: another writer changed it since it was read "
                    f"({exc.code or exc.status}); read it again and merge"
                ) from None
            if exc.status == 501 or exc.code == "NotImplemented":  # an answer, not a fault
                answer = f"HTTP {exc.status}" + (f" {exc.code}" if exc.code else "")
                raise S3Error(
                    f"{what}: the store does not implement conditional writes ({answer})",
                    exc.status,
                    exc.code,
                ) from None
            raise
        return resp.getheader("ETag")

    # -- reading --------------------------------------------------------------------------
    def stat(self, name: str) -> ObjectInfo:
        resp, _ = self._request("HEAD", name, f"stat {name}")
        etag = resp.getheader("ETag")
        return ObjectInfo(
            name=name,
            size=int(resp.getheader("Content-Length") or 0),
            metadata=metadata_from_headers(resp.getheaders(), "x-amz-meta-"),
            etag=etag.strip('"') if etag else None,
            mtime=http_time(resp.getheader("Last-Modified")),
        )

    def read_range(
        self, name: str, start: int, length: int | None, chunk_size: int = 1 << 20
    ) -> Iterator[bytes]:
        if length == 0:
            self.stat(name)
            return
        headers: dict[str, str] = {}
        wanted = range_value(start, length)
        if wanted is not None:
            headers["range"] = wanted
        what = f"download {name}"
        resp = self._send("GET", name, headers=headers)
        try:
            if resp.status == 416 and start == 0:
                resp.read()
                return  # an empty object asked for from byte 0
            if resp.status not in (200, 206):
                raise self._error(resp.status, resp.read(), what)
            skip = 0
            if "range" in headers:
                cr = _CONTENT_RANGE.match(resp.getheader("Content-Range") or "")
                if cr:
                    skip = start - int(cr.group(1))
                elif resp.status == 200:
                    skip = start  # the whole object came back
                if skip < 0:
                    raise S3TransientError(f"{what}: the store sent an unexpected range", 500, None)
            while skip > 0:
                n = len(resp.read(min(skip, chunk_size)))
                if n == 0:
                    return
                skip -= n
            remaining = length
            while remaining is None or remaining > 0:
                chunk = resp.read(chunk_size if remaining is None else min(chunk_size, remaining))
                if not chunk:
                    break
                if remaining is not None:
                    remaining -= len(chunk)
                yield chunk
        finally:
            # A reply not read to its end (or one the server closes) cannot be reused.
            if not resp.isclosed() or resp.will_close:
                self._drop_conn()

    def read_range_into(
        self, name: str, start: int, length: int, into: RangeTarget | memoryview | bytearray
    ) -> Iterator[memoryview]:
        # Received straight into the target's memory (one readinto a piece): no copy
        # beyond the kernel's, and one interpreter call per piece, not per socket read.
        if length <= 0:
            yield from super().read_range_into(name, start, length, into)
            return
        target = range_target(into)
        what = f"download {name}"
        resp = self._send("GET", name, headers={"range": range_value(start, length) or ""})
        try:
            # rclone's server answers a range with 200 and Content-Range.
            cr = resp.getheader("Content-Range") or ""
            if resp.status in (200, 206) and cr.startswith(f"bytes {start}-"):
                pos = 0
                while pos < length:
                    window = target.window(pos, min(length - pos, RECV_PIECE))
                    n = resp.readinto(window)
                    if not n:
                        return
                    yield window[:n]
                    pos += n
                return
            if resp.status not in (200, 206, 416):
                raise self._error(resp.status, resp.read(), what)
        finally:
            if not resp.isclosed() or resp.will_close:
                self._drop_conn()
        # Any other answer (the whole object, another range): the general path copes.
        yield from super().read_range_into(name, start, length, target)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        params = {"list-type": "2", "prefix": prefix, "max-keys": str(self.list_page_size)}
        for _ in range(10_000_000):
            _, body = self._request(
                "GET", None, f"list {prefix!r} in {self._where}", params=params, missing="bucket"
            )
            root = parse_xml(body)
            if root is None:
                return
            last = None
            for c in root.iter("Contents"):
                key = c.findtext("Key")
                if key is None:
                    continue
                last = key
                etag = c.findtext("ETag")
                yield ObjectInfo(
                    name=key,
                    size=int(c.findtext("Size") or 0),
                    etag=etag.strip('"') if etag else None,
                    mtime=iso_time(c.findtext("LastModified")),
                )
            if (root.findtext("IsTruncated") or "").lower() != "true":
                return
            params = {"list-type": "2", "prefix": prefix, "max-keys": str(self.list_page_size)}
            token = root.findtext("NextContinuationToken")
            if token:
                params["continuation-token"] = token
            elif last is not None:
                params["start-after"] = last
            else:
                return

    def delete(self, name: str) -> bool:
        try:
            self.stat(name)
        except ObjectNotFoundError:
            return False
        try:
            self._request("DELETE", name, f"delete {name}", ok=(200, 204))
        except ObjectNotFoundError:
            return False
        return True
