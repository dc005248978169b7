"""S3 multipart uploads: the part protocol of :class:`uploader.transfer.backends.s3.S3Backend`.

``begin`` is CreateMultipartUpload (a ``FULL_OBJECT`` CRC64NVME upload when the
digest is a CRC), ``put_part`` an UploadPart with the part's CRC64NVME header or
signed with its sha256 (computed once by the store; the body is not hashed again; see
:mod:`uploader.transfer.backends.s3` for which), ``complete`` a
CompleteMultipartUpload with each part's ``ChecksumCRC64NVME`` and the whole
object's value where the upload has them (whose 200 answer may still carry an
error, checked here),
``abort`` an AbortMultipartUpload. Resuming reads what an unfinished upload holds
(ListParts, page by page; NoSuchUpload means the store forgot it), and
``list_uploads`` pages through ListMultipartUploads for the stale ones. A part's token
is its number and ETag; a multipart object's ETag names the parts it was completed
from, which ``completed_from`` checks after a lost reply.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import TypeVar

from uploader.errors import ObjectNotFoundError
from uploader.transfer.backends.base import HeldPart, PartToken
from uploader.transfer.backends.http import iso_time
from uploader.transfer.backends.s3request import (
    TRANSIENT_CODES,
    S3Error,
    S3RequestBackend,
    S3TransientError,
    log,
    parse_xml,
)
from uploader.transfer.backends.sigv4 import payload_hash
from uploader.transfer.digest import crc64nvme_b64

T = TypeVar("T")

#: What a store answers to checksum headers it does not implement (an S3-compatible
#: server older than CRC64NVME, or one without FULL_OBJECT multipart checksums).
_CHECKSUM_REFUSALS = frozenset({"InvalidArgument", "InvalidRequest", "NotImplemented"})

__all__ = ["S3Multipart"]


class S3Multipart(S3RequestBackend):
    """Multipart uploads in parts of 5 MiB-5 GiB, at most 10,000, resumable."""

    multipart = True
    max_parts = 10_000
    max_part_size = 5 << 30
    min_part_size = 5 << 20
    resumable = True
    #: Whether requests carry ``x-amz-checksum-*`` headers: until the store refuses them.
    checksums = True

    def _payload(
        self,
        body: bytes | memoryview,
        sha256: bytes | None,
        crc64nvme: int | None,
        headers: dict[str, str],
    ) -> str:
        """The payload hash to sign ``body`` with; adds its checksum headers (see
        :func:`uploader.transfer.backends.sigv4.payload_hash`) while the store takes them."""
        crc = crc64nvme if self.checksums else None
        return payload_hash(body, sha256, crc, headers, unsigned=not self.payload_sha256)

    def _checksummed(self, send: Callable[[], T], what: str, carries: bool = True) -> T:
        """``send()``, which builds its request by :attr:`checksums`. A store that refuses
        the checksum headers (400 ``InvalidArgument``, 501 ``NotImplemented``...) gets
        the request once more without them, and no checksum header from then on: the
        payload's sha256 is signed instead, and the download's check still guards it.
        ``carries``: whether the request has checksum headers to drop at all."""
        try:
            return send()
        except (S3Error, S3TransientError) as exc:
            if not (carries and self.checksums) or exc.code not in _CHECKSUM_REFUSALS:
                raise
            answer = f"HTTP {exc.status} {exc.code}"
        self.checksums = False
        try:
            out = send()
        except BaseException:
            self.checksums = True  # refused for another reason: not the checksums' fault
            raise
        log.warning(
            "%s: %s refuses the CRC64NVME checksum headers (%s); sending none from now on "
            "(each body is signed with its sha256; downloads still check the recorded digest)",
            what,
            self._where,
            answer,
        )
        return out

    def begin(self, name: str, metadata: Mapping[str, str], checksum: str | None = None) -> str:
        def send() -> bytes:
            headers = self._object_headers(metadata)
            if checksum == "crc64nvme" and self.checksums:
                headers["x-amz-checksum-algorithm"] = "CRC64NVME"
                headers["x-amz-checksum-type"] = "FULL_OBJECT"
            what = f"start upload of {name}"
            return self._request("POST", name, what, params={"uploads": ""}, headers=headers)[1]

        body = self._checksummed(send, f"start upload of {name}", checksum == "crc64nvme")
        root = parse_xml(body)
        upload_id = root.findtext("UploadId") if root is not None else None
        if not upload_id:
            raise S3TransientError(
                f"start upload of {name}: the store sent no upload id; retrying", 500, None
            )
        return upload_id

    def put_part(
        self,
        name: str,
        upload_id: str,
        index: int,
        offset: int,
        data: memoryview,
        sha256: bytes | None,
        crc64nvme: int | None = None,
    ) -> PartToken:
        number = index + 1
        what = f"upload part {number} of {name}"

        def send() -> str | None:
            headers: dict[str, str] = {}
            payload = self._payload(data, sha256, crc64nvme, headers)
            params = {"partNumber": str(number), "uploadId": upload_id}
            resp, _ = self._request(
                "PUT", name, what, params=params, headers=headers, body=data, payload_sha256=payload
            )
            return resp.getheader("ETag")

        etag = self._checksummed(send, what, crc64nvme is not None)
        if not etag:
            raise S3TransientError(
                f"upload part {number} of {name}: no ETag in the reply", 500, None
            )
        return (number, etag)

    def complete(
        self,
        name: str,
        upload_id: str,
        tokens: list[PartToken],
        part_crcs: list[int] | None = None,
        crc64nvme: int | None = None,
    ) -> None:
        what = f"complete upload of {name}"

        def send() -> bytes:
            crcs = part_crcs if self.checksums else None
            parts = "".join(
                f"<Part><PartNumber>{n}</PartNumber><ETag>{_xml_escape(etag)}</ETag>"
                + (
                    f"<ChecksumCRC64NVME>{crc64nvme_b64(crcs[i])}</ChecksumCRC64NVME>"
                    if crcs is not None
                    else ""
                )
                + "</Part>"
                for i, (n, etag) in enumerate(tokens)
            )
            body = f"<CompleteMultipartUpload>{parts}</CompleteMultipartUpload>".encode()
            headers: dict[str, str] = {}
            if crc64nvme is not None and self.checksums:
                # The whole object's value: S3 checks it against the one it combined.
                headers["x-amz-checksum-crc64nvme"] = crc64nvme_b64(crc64nvme)
                headers["x-amz-checksum-type"] = "FULL_OBJECT"
            params = {"uploadId": upload_id}
            return self._request("POST", name, what, params=params, headers=headers, body=body)[1]

        reply = self._checksummed(send, what, crc64nvme is not None or part_crcs is not None)
        root = parse_xml(reply)
        if root is not None and root.tag == "Error":
            # S3 may answer 200 and report the failure in the body.
            raise self._error(500 if root.findtext("Code") in TRANSIENT_CODES else 400, reply, what)

    def abort(self, name: str, upload_id: str) -> None:
        try:
            self._request(
                "DELETE",
                name,
                f"abort upload of {name}",
                params={"uploadId": upload_id},
                ok=(200, 204),
            )
        except ObjectNotFoundError:
            pass

    def list_uploads(self, prefix: str) -> list[tuple[str, str, float]]:
        out: list[tuple[str, str, float]] = []
        params = {"uploads": "", "prefix": prefix}
        for _ in range(100_000):
            _, body = self._request("GET", None, f"list uploads in {self._where}", params=params)
            root = parse_xml(body)
            if root is None:
                break
            for up in root.iter("Upload"):
                key = up.findtext("Key")
                uid = up.findtext("UploadId")
                if key and uid and key.startswith(prefix):
                    out.append((key, uid, iso_time(up.findtext("Initiated")) or 0.0))
            if (root.findtext("IsTruncated") or "").lower() != "true":
                break
            km, um = root.findtext("NextKeyMarker"), root.findtext("NextUploadIdMarker")
            if not km:
                break
            params = {"uploads": "", "prefix": prefix, "key-marker": km}
            if um:
                params["upload-id-marker"] = um
        return out

    def list_parts(self, name: str, upload_id: str) -> dict[int, HeldPart] | None:
        held: dict[int, HeldPart] = {}
        params = {"uploadId": upload_id, "max-parts": "1000"}
        for _ in range(100):  # 10,000 parts at most, 1000 a page
            try:
                _, body = self._request("GET", name, f"list parts of {name}", params=params)
            except ObjectNotFoundError:  # NoSuchUpload: completed, aborted or forgotten
                return None
            root = parse_xml(body)
            if root is None:
                break
            for part in root.iter("Part"):
                number, etag = part.findtext("PartNumber"), part.findtext("ETag")
                if number and etag:
                    held[int(number) - 1] = HeldPart(int(part.findtext("Size") or 0), etag)
            marker = root.findtext("NextPartNumberMarker")
            if (root.findtext("IsTruncated") or "").lower() != "true" or not marker:
                break
            params = {"uploadId": upload_id, "max-parts": "1000", "part-number-marker": marker}
        return held

    def part_etag(self, token: PartToken) -> str:
        return str(token[1])

    def completed_from(self, name: str, upload_id: str, tokens: list[PartToken]) -> bool:
        # A multipart object's ETag is the MD5 of its parts' MD5s, "-" the part count
        # (where part ETags are MD5s): it names the parts it was completed from.
        try:
            md5s = b"".join(bytes.fromhex(str(etag).strip('"')) for _, etag in tokens)
            etag = self.stat(name).etag
        except (ValueError, ObjectNotFoundError):
            return False
        return etag == f"{hashlib.md5(md5s).hexdigest()}-{len(tokens)}"

    def part_token(self, index: int, etag: str) -> PartToken:
        return (index + 1, etag)


def _xml_escape(text: str) -> str:
    return (
        text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    )
