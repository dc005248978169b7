"""AWS Signature Version 4 for S3 requests whose payload hash is already known.

libcloud's V4 signer hashes a bytes body itself (twice: once for the
``x-amz-content-sha256`` header, once for the canonical request) and signs a
streamed body as ``UNSIGNED-PAYLOAD``. The store hashes every part exactly once
while reading it; :class:`SigV4Signer` signs with that hash, so the body is
never hashed again and the server still rejects a body that does not match it.

Example::

    signer = SigV4Signer(region="us-east-1")
    headers = {"host": "127.0.0.1:9000"}
    signer.sign("PUT", "/bucket/key", {}, headers, payload_sha256_hex, ("AKIA...", "secret", None))
    # headers now carries x-amz-date, x-amz-content-sha256 and authorization
    # (and x-amz-security-token when the credentials carry a session token)

The credentials are passed with every request (taken fresh from
:class:`uploader.transfer.backends.aws_identity.AwsIdentity`), so temporary
credentials that were refreshed are used from the next request on.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import threading
from collections.abc import Mapping, MutableMapping
from urllib.parse import quote

from uploader.transfer.digest import crc64nvme_b64

__all__ = [
    "SigV4Signer",
    "EMPTY_SHA256",
    "UNSIGNED_PAYLOAD",
    "canonical_query",
    "payload_hash",
    "quote_path",
]

#: sha256 of the empty string: the payload hash of bodiless requests.
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
#: The payload "hash" of a body that is not signed (over HTTPS, where a signed
#: ``x-amz-checksum-*`` header guards the body instead).
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"


def payload_hash(
    body: bytes | memoryview,
    sha256: bytes | None,
    crc64nvme: int | None,
    headers: MutableMapping[str, str],
    unsigned: bool,
) -> str:
    """The payload hash to sign ``body`` with, adding its checksum headers to
    ``headers``: with a CRC, ``x-amz-checksum-crc64nvme`` (signed, as every header is)
    and, where ``unsigned`` (over HTTPS), ``UNSIGNED-PAYLOAD``; otherwise the body's
    sha256 (the one given, else computed here)."""
    if crc64nvme is not None:
        headers["x-amz-checksum-crc64nvme"] = crc64nvme_b64(crc64nvme)
        headers["x-amz-sdk-checksum-algorithm"] = "CRC64NVME"
        if unsigned:
            return UNSIGNED_PAYLOAD
    if sha256 is None:
        return hashlib.sha256(body).hexdigest() if len(body) else EMPTY_SHA256
    return sha256.hex()


def quote_path(path: str) -> str:
    """URI-encode an S3 path once, keeping ``/`` (S3 does not double-encode)."""
    return quote(path, safe="/~")


def canonical_query(params: Mapping[str, str]) -> str:
    """The query string, sorted and encoded as SigV4 requires (also used on the wire)."""
    return "&".join(
        f"{quote(str(k), safe='~')}={quote(str(v), safe='~')}" for k, v in sorted(params.items())
    )


class SigV4Signer:
    """Sign S3 requests with AWS Signature Version 4.

    Args:
        region: the signing region (``us-east-1`` for most S3-compatible servers).
        service: the signing service name.

    The credentials come with each :meth:`sign` call; the signing key derived from a
    secret is kept for the day it is valid.
    """

    def __init__(self, region: str = "us-east-1", service: str = "s3") -> None:
        self.region = region
        self.service = service
        self._lock = threading.Lock()
        self._key_for: tuple[str, str] = ("", "")
        self._key = b""

    def __repr__(self) -> str:
        return f"SigV4Signer(region={self.region!r}, service={self.service!r})"

    def _signing_key(self, secret: str, day: str) -> bytes:
        with self._lock:
            if (secret, day) != self._key_for:
                k = _hmac(("AWS4" + secret).encode(), day)
                k = _hmac(k, self.region)
                k = _hmac(k, self.service)
                self._key = _hmac(k, "aws4_request")
                self._key_for = (secret, day)
            return self._key

    def sign(
        self,
        method: str,
        path: str,
        params: Mapping[str, str],
        headers: MutableMapping[str, str],
        payload_sha256: str,
        credentials: tuple[str, str, str | None],
        now: _dt.datetime | None = None,
    ) -> None:
        """Add ``x-amz-date``, ``x-amz-content-sha256``, ``authorization`` and, for
        temporary credentials, ``x-amz-security-token`` to ``headers``.

        ``path`` is already encoded (see :func:`quote_path`); ``headers`` must hold
        ``host``; every header in it is signed. ``payload_sha256`` is the hex digest
        of the body (``EMPTY_SHA256`` for none), or ``UNSIGNED_PAYLOAD``. ``credentials``: access key, secret
        and session token (None for long-term keys).
        """
        access_key, secret, token = credentials
        now = now or _dt.datetime.now(_dt.timezone.utc)
        stamp = now.strftime("%Y%m%dT%H%M%SZ")
        day = stamp[:8]
        headers["x-amz-date"] = stamp
        headers["x-amz-content-sha256"] = payload_sha256
        if token:
            headers["x-amz-security-token"] = token
        else:
            headers.pop("x-amz-security-token", None)
        items = sorted((k.lower(), " ".join(str(v).split())) for k, v in headers.items())
        signed = ";".join(k for k, _ in items)
        canonical = "\n".join(
            [
                method,
                path,
                canonical_query(params),
                "".join(f"{k}:{v}\n" for k, v in items),
                signed,
                payload_sha256,
            ]
        )
        scope = f"{day}/{self.region}/{self.service}/aws4_request"
        to_sign = "\n".join(
            [
                "AWS4-HMAC-SHA256",
                stamp,
                scope,
                hashlib.sha256(canonical.encode()).hexdigest(),
            ]
        )
        signature = hmac.new(
            self._signing_key(secret, day), to_sign.encode(), hashlib.sha256
        ).hexdigest()
        headers["authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
            f"SignedHeaders={signed}, Signature={signature}"
        )


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()
