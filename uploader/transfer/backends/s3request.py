"""The request layer of the S3 adapter: endpoint, connections, signing, error mapping.

:class:`S3RequestBackend` is the plumbing under :class:`uploader.transfer.backends.s3.S3Backend`
(the S3 operations):

* Endpoint: libcloud's driver for the provider name (``s3``, ``s3_eu_west``,
  ``minio``, ``wasabi`` ...) resolves the host, port and signing region; an
  explicit ``host``/``port`` wins. Addressing is path-style (``/bucket/key``),
  which every S3-compatible server accepts. Plain HTTP is used when
  ``settings.secure`` is false (loopback, or ``extra_init_kwargs={"secure": False}``).
  ``extra_init_kwargs["timeout"]`` sets the socket timeout in seconds (default 60).
  Certificates are checked against the trust :mod:`uploader.transfer.tls` resolves
  (``ca_bundle``, ``AWS_CA_BUNDLE`` ...); a failed check is a ``TLSError``.
* Signing: SigV4 (:mod:`uploader.transfer.backends.sigv4`) with the payload hash
  the caller passes in; only bodies sent without one (small XML requests) are
  hashed here. The credentials (:mod:`uploader.transfer.backends.aws_identity`:
  botocore's chain, or the variables ``key_environ``/``secret_environ`` name) are
  taken fresh for every request and part, session token included.
* Expired credentials: a refusal that says the token or signature expired
  (``ExpiredToken``, ``InvalidToken``, ``RequestExpired``) makes the adapter find the
  credentials again and send that request once more (a multipart upload goes on
  with the same upload id); a second refusal is an ``AuthError``.
* Connections: each thread keeps its own keep-alive ``http.client`` connection.
  A request that finds its kept-alive connection closed by the server is sent
  once more on a fresh one (counted in ``resent``, not as a retry).
* Errors map to :mod:`uploader.errors`: 401/403 and signature errors are
  ``AuthError``; ``NoSuchBucket`` is ``ContainerNotFoundError``; ``NoSuchKey``
  and 404 are ``ObjectNotFoundError``; 408/429/5xx and ``SlowDown`` are
  ``TransientError``. Connection errors pass through for
  :func:`uploader.transfer.retry.is_transient`. No message holds a credential.
* XML replies are parsed with or without the S3 namespace (rclone's server
  omits it).
"""

from __future__ import annotations

import hashlib
import http.client
import itertools
import logging
import threading
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import Any

from uploader.errors import (
    AuthError,
    ConfigError,
    ContainerNotFoundError,
    ObjectNotFoundError,
    PermanentError,
    TransientError,
)
from uploader.redact import redact
from uploader.transfer.backends.aws_identity import AwsIdentity, is_expired_answer
from uploader.transfer.backends.base import Backend
from uploader.transfer.backends.http import http_time
from uploader.transfer.backends.s3options import object_headers, validate_s3_options
from uploader.transfer.backends.sigv4 import (
    EMPTY_SHA256,
    SigV4Signer,
    canonical_query,
    quote_path,
)
from uploader.transfer.retry import TRANSIENT_HTTP
from uploader.transfer.settings import StoreSettings
from uploader.transfer.tls import tls_failure

__all__ = ["S3Error", "S3RequestBackend", "S3TransientError", "TRANSIENT_CODES", "parse_xml"]

#: The S3 adapter's logger, the same one :mod:`uploader.transfer.backends.s3` uses.
log = logging.getLogger("uploader.transfer.backends.s3")

_AUTH_CODES = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "AuthorizationHeaderMalformed",
        "InvalidSecurity",
        "AccountProblem",
    }
)
TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "InternalError",
        "ServiceUnavailable",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "Throttling",
        "ThrottlingException",
        "OperationAborted",
        "BadDigest",  # bytes damaged on the way (checksum or signed hash): sent again
        "XAmzContentSHA256Mismatch",
    }
)
_MISSING_OBJECT_CODES = frozenset({"NoSuchKey", "NoSuchUpload", "NotFound"})
_STALE_CONNECTION = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)


class S3Error(PermanentError):
    """The store refused a request for a reason retrying will not fix."""

    def __init__(self, message: str, status: int, code: str | None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class S3TransientError(TransientError):
    """The store failed a request in a way that retrying may fix (busy, 5xx)."""

    def __init__(self, message: str, status: int, code: str | None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def _strip_ns(root: ET.Element) -> ET.Element:
    for el in root.iter():
        if isinstance(el.tag, str) and el.tag.startswith("{"):
            el.tag = el.tag.split("}", 1)[1]
    return root


def parse_xml(body: bytes) -> ET.Element | None:
    """The root of an XML reply, namespace stripped; None when the body is not XML."""
    if not body or not body.lstrip().startswith(b"<"):
        return None
    try:
        return _strip_ns(ET.fromstring(body))
    except ET.ParseError:
        return None


class S3RequestBackend(Backend):
    """Signed requests to one bucket on S3 or an S3-compatible server.

    Args:
        settings: provider (an S3-family libcloud name), container (the bucket),
            host/port/region, TLS, and the names of the credential variables.

    Attributes:
        requests: how many HTTP requests were sent (tests use it to bound retries).
        resent: requests sent once more on a fresh connection because a kept-alive
            one was found closed (not retries: the request never reached the server).
    """

    def __init__(self, settings: StoreSettings) -> None:
        validate_s3_options(settings.extra, settings.family)
        self.identity = AwsIdentity(settings)
        key, secret, _ = self.identity.frozen()
        self.settings = settings
        self.bucket = settings.container
        self.secure = settings.secure
        # Over plain HTTP the payload is signed (nothing else guards it on the way).
        self.payload_sha256 = not self.secure
        port = f":{settings.port}" if settings.port else ""
        where = f"{'https' if self.secure else 'http'}://{settings.host or settings.provider}{port}"
        # Before libcloud is imported: it refuses a missing $SSL_CERT_FILE with a bare error.
        self._trust = settings.trust(where)
        self.timeout = float(settings.extra.get("timeout", 60))
        self.host, self.port, region = self._endpoint(settings, key, secret)
        self.region = settings.region or region or "us-east-1"
        default_port = 443 if self.secure else 80
        self.host_header = self.host if self.port == default_port else f"{self.host}:{self.port}"
        self._signer = SigV4Signer(self.region)
        self._local = threading.local()
        self._conns: list[http.client.HTTPConnection] = []
        self._conns_lock = threading.Lock()
        self._counter = itertools.count(1)
        self.requests = 0
        self._resend_counter = itertools.count(1)
        self.resent = 0
        self._where = (
            f"bucket {self.bucket!r} at {'https' if self.secure else 'http'}://{self.host_header}"
        )
        self._ssl = self._trust.context() if self.secure else None

    # -- endpoint through libcloud --------------------------------------------------------
    def _endpoint(
        self, settings: StoreSettings, key: str, secret: str
    ) -> tuple[str, int, str | None]:
        """Host, port and signing region, resolved by libcloud's driver for the provider."""
        scheme_port = 443 if self.secure else 80
        if settings.provider == "s3" and settings.host:
            # An explicit endpoint (an S3-compatible server) is all libcloud's S3 driver
            # would give back, with its default region; importing libcloud (and requests)
            # would add a fifth of a second to every command's start-up.
            return settings.host, settings.port or scheme_port, settings.region or "us-east-1"
        from libcloud.storage.providers import get_driver

        try:
            cls = get_driver(settings.provider)
        except AttributeError:
            if settings.host:  # libcloud does not know it; an explicit endpoint is all we need
                return settings.host, settings.port or scheme_port, settings.region
            raise ConfigError(
                f"libcloud has no storage driver {settings.provider!r}; give its endpoint with "
                "host and port (or ?endpoint= in the URI), or use provider 's3'"
            ) from None
        kwargs: dict[str, Any] = {"secure": self.secure}
        if settings.host:
            kwargs["host"] = settings.host
        if settings.port:
            kwargs["port"] = settings.port
        if settings.provider == "s3" and settings.region and not settings.host:
            from libcloud.storage.drivers.s3 import REGION_TO_HOST_MAP

            if settings.region not in REGION_TO_HOST_MAP:  # a region newer than libcloud
                return (
                    f"s3.{settings.region}.amazonaws.com",
                    settings.port or scheme_port,
                    settings.region,
                )
        attempts = [dict(kwargs, region=settings.region), kwargs] if settings.region else [kwargs]
        driver = None
        problem = ""
        for kw in attempts:
            try:
                driver = cls(key, secret, **kw)
                host, port = driver.connection.host, int(driver.connection.port)
                break
            except Exception as exc:  # libcloud raises several types for a bad host or region
                problem = str(getattr(exc, "value", exc))
                driver = None
        if driver is None:
            raise ConfigError(
                redact(
                    f"cannot resolve the endpoint of provider {settings.provider!r} "
                    f"({problem[:200]}); give host (and port) for S3-compatible servers, "
                    "or a region the provider knows"
                )
            )
        if not host:
            raise ConfigError(
                f"provider {settings.provider!r} needs an endpoint: set host and port "
                "(e.g. s3://bucket?endpoint=http://127.0.0.1:9000)"
            )
        region = getattr(driver, "region_name", None) or getattr(driver, "region", None)
        return host, port, region if isinstance(region, str) else None

    # -- HTTP -----------------------------------------------------------------------------
    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self.secure:
                conn = http.client.HTTPSConnection(
                    self.host, self.port, timeout=self.timeout, context=self._ssl
                )
            else:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    def _drop_conn(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            self._local.conn = None
            conn.close()
            with self._conns_lock:
                if conn in self._conns:
                    self._conns.remove(conn)

    def close(self) -> None:
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for c in conns:
            c.close()
        self._local = threading.local()

    def _path(self, key: str | None = None) -> str:
        return quote_path(f"/{self.bucket}/{key}" if key is not None else f"/{self.bucket}")

    def describe_identity(self) -> str:
        return self.identity.describe()

    def server_date(self) -> float | None:
        resp, _ = self._request("HEAD", None, f"checking {self._where}", missing="bucket")
        return http_time(resp.getheader("Date"))

    def _send(
        self,
        method: str,
        key: str | None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        body: bytes | memoryview = b"",
        payload_sha256: str | None = None,
    ) -> http.client.HTTPResponse:
        """Send one signed request and return the response, headers read, body unread
        (for a refusal, read already). A refusal saying the credentials expired is
        answered by finding them again and sending once more."""
        if payload_sha256 is None:
            payload_sha256 = hashlib.sha256(body).hexdigest() if len(body) else EMPTY_SHA256
        seen = self.identity.generation
        resp = self._send_signed(method, key, params, headers, body, payload_sha256)
        if resp.status not in (400, 401, 403):
            return resp
        try:
            data = resp.read()
        except BaseException:
            self._drop_conn()
            raise
        if resp.will_close:
            self._drop_conn()
        root = parse_xml(data)
        code = root.findtext("Code") if root is not None else None
        message = (root.findtext("Message") if root is not None else None) or ""
        if method == "HEAD":  # no body to say why: refresh only what can expire
            expired = resp.status in (400, 403) and self.identity.temporary
        else:
            expired = is_expired_answer(resp.status, code, message)
        if not expired:
            return _Answered(resp, data)  # type: ignore[return-value]
        log.warning(
            "%s %s: the store refused the session credentials (HTTP %d%s); finding them "
            "again and sending once more",
            method,
            self._path(key),
            resp.status,
            f" {code}" if code else "",
        )
        self.identity.refresh(seen)
        return self._send_signed(method, key, params, headers, body, payload_sha256)

    def _send_signed(
        self,
        method: str,
        key: str | None,
        params: Mapping[str, str] | None,
        headers: Mapping[str, str] | None,
        body: bytes | memoryview,
        payload_sha256: str,
    ) -> http.client.HTTPResponse:
        path = self._path(key)
        params = dict(params or {})
        hdrs: dict[str, str] = {"host": self.host_header}
        if headers:
            hdrs.update({k.lower(): v for k, v in headers.items()})
        self._signer.sign(method, path, params, hdrs, payload_sha256, self.identity.frozen())
        query = canonical_query(params)
        url = f"{path}?{query}" if query else path
        if method in ("PUT", "POST") or len(body):
            hdrs["content-length"] = str(len(body))
        for attempt in (1, 2):
            conn = self._conn()
            reused = conn.sock is not None
            self.requests = next(self._counter)
            try:
                conn.putrequest(method, url, skip_host=True, skip_accept_encoding=True)
                for k, v in hdrs.items():
                    conn.putheader(k, v)
                conn.endheaders()
                if len(body):
                    try:
                        conn.send(body)
                    except _STALE_CONNECTION:
                        # The server may have answered before reading the body (an error
                        # such as NoSuchUpload) and closed: that answer is the result.
                        early = _early_error(conn)
                        if early is None:
                            raise
                        return early
                return conn.getresponse()
            except _STALE_CONNECTION:
                # A kept-alive connection the server closed while idle: send once more on a
                # fresh one, without counting it as a failure. Anything else is for the retrier.
                self._drop_conn()
                if not reused or attempt == 2:
                    raise
                self.resent = next(self._resend_counter)
                log.debug("%s %s: kept-alive connection was closed; sent again", method, path)
            except BaseException as exc:
                self._drop_conn()
                failed = tls_failure(exc, self._where, self._trust) if self.secure else None
                if failed is not None:
                    raise failed from None
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _request(
        self,
        method: str,
        key: str | None,
        what: str,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        body: bytes | memoryview = b"",
        payload_sha256: str | None = None,
        ok: tuple[int, ...] = (200,),
        missing: str = "object",
    ) -> tuple[http.client.HTTPResponse, bytes]:
        """Send a request, read the whole (small) reply, raise a mapped error unless ``ok``."""
        resp = self._send(method, key, params, headers, body, payload_sha256)
        try:
            data = resp.read()
        except BaseException:
            self._drop_conn()
            raise
        if resp.will_close:
            self._drop_conn()
        if resp.status not in ok:
            raise self._error(resp.status, data, what, missing)
        return resp, data

    def _error(self, status: int, body: bytes, what: str, missing: str = "object") -> Exception:
        root = parse_xml(body)
        code = root.findtext("Code") if root is not None else None
        message = (root.findtext("Message") if root is not None else None) or ""
        detail = (
            f"HTTP {status}" + (f" {code}" if code else "") + (f": {message}" if message else "")
        )
        detail = redact(detail[:300])
        if status == 400 and not code and self.identity.temporary:
            detail += " with no reason: a session token the store does not accept"
            code = "InvalidToken"
        if status in (401, 403) or code in _AUTH_CODES:
            hint = ""
            if code == "AccessDenied" and what.startswith(("upload ", "start upload")):
                hint = _policy_hint(self.settings.extra)
            return AuthError(
                f"{what}: the store refused the request ({detail}). The credentials in use: "
                f"{self.identity.describe()}; check that they may use {self._where}{hint}. "
                "'ckpt-uploader check URI' tests each operation."
            )
        if code == "NoSuchBucket" or (status == 404 and missing == "bucket"):
            return ContainerNotFoundError(self._no_bucket_text(what))
        if code in _MISSING_OBJECT_CODES or status == 404:
            return ObjectNotFoundError(f"{what}: no such object in {self._where} ({detail})")
        if status in TRANSIENT_HTTP or code in TRANSIENT_CODES or status >= 500:
            return S3TransientError(
                f"{what}: the store is busy or failing ({detail})", status, code
            )
        return S3Error(f"{what}: the store refused the request ({detail})", status, code)

    def _no_bucket_text(self, what: str) -> str:
        endpoint = f"{'https' if self.secure else 'http'}://{self.host_header}"
        return (
            f"{what}: bucket {self.bucket!r} does not exist at {endpoint}; create it "
            f"(e.g. 'aws s3 mb s3://{self.bucket} --endpoint-url {endpoint}' or "
            f"'rclone mkdir remote:{self.bucket}') or pass --create-container "
            "(create_container=True)"
        )

    def _object_headers(self, metadata: Mapping[str, str]) -> dict[str, str]:
        """The headers of a new object: its metadata, content type and the bucket-policy
        options (encryption, storage class, ACL)."""
        headers = self._meta_headers(metadata)
        headers["content-type"] = "application/octet-stream"
        headers.update(object_headers(self.settings.extra))
        return headers

    @staticmethod
    def _meta_headers(metadata: Mapping[str, str]) -> dict[str, str]:
        out = {}
        for k, v in metadata.items():
            value = str(v)
            if not value.isascii() or "\n" in value or "\r" in value:
                raise ConfigError(
                    f"metadata value for {k!r} must be printable ASCII on one line; "
                    "encode it (e.g. base64) first"
                )
            out[f"x-amz-meta-{k.lower()}"] = value
        return out


def _policy_hint(extra: Mapping[str, Any]) -> str:
    """What to try when an upload is denied: a bucket policy may demand encryption, an
    ACL or a storage class that the request did not carry."""
    if extra.get("sse") is None:
        return (
            ", and whether a bucket policy demands encryption: set the sse option "
            "(?sse=AES256 or ?sse=aws:kms in the URI, --sse, or sse = ... in [store])"
        )
    return (
        f", and whether the bucket policy accepts sse={extra['sse']}"
        + (f" with key {extra['sse_kms_key_id']}" if extra.get("sse_kms_key_id") else "")
        + " (and the acl / storage_class options it may require)"
    )


class _Answered:
    """A refusal whose body was read already (to see whether the credentials expired):
    hands that body out as the response would have."""

    def __init__(self, resp: http.client.HTTPResponse, body: bytes) -> None:
        self._resp = resp
        self._body = body
        self.status = resp.status
        self.will_close = resp.will_close

    def read(self, amt: int | None = None) -> bytes:
        if amt is None:
            out, self._body = self._body, b""
        else:
            out, self._body = self._body[:amt], self._body[amt:]
        return out

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def isclosed(self) -> bool:
        return True

    def getheader(self, name: str, default: str | None = None) -> str | None:
        return self._resp.getheader(name, default)

    def getheaders(self) -> list[tuple[str, str]]:
        return self._resp.getheaders()


def _early_error(conn: http.client.HTTPConnection) -> http.client.HTTPResponse | None:
    """An error reply the server sent before the request body was fully sent, if any."""
    try:
        resp = conn.getresponse()
    except Exception:
        return None
    return resp if resp.status >= 400 else None
