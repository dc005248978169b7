"""S3 and S3-compatible stores: a thin adapter over libcloud's S3 driver.

libcloud resolves the provider name to its endpoint and signing region
(``s3``, ``s3_eu_west``, ``minio``, ``wasabi`` ...). The requests themselves go
out here, because libcloud's paths do not fit large checkpoints: its V4
signer hashes a bytes body again (or signs a stream as ``UNSIGNED-PAYLOAD``),
its stream upload sends 5 MiB parts one after another on one connection, and
its downloads read whole objects into memory.

* Signing: SigV4 (:mod:`uploader.transfer.backends.sigv4`) with the payload hash the
  store already computed for each part. The body is never hashed a second time,
  and the signed hash is the in-transit check: the server rejects a body that
  does not match it. ``Content-MD5`` is not sent: it would cost a second full
  pass over every byte (MD5 is slower than the sha256 pass here) and adds no
  protection beyond the signed sha256.
* Parallel parts: each thread keeps its own keep-alive HTTP connection
  (``http.client``), and bodies are sent as ``memoryview`` slices of the
  store's part buffer, without copies.
* Downloads stream ranged GETs in ``chunk_size`` pieces. Servers that answer a
  range with 200 and ``Content-Range``, or with the whole object, are handled.
* XML replies are parsed with or without the S3 namespace (rclone's server
  omits it).
* Errors map to :mod:`uploader.errors`: 401/403 and signature errors are
  ``AuthError``; ``NoSuchBucket`` is ``ContainerNotFoundError``; ``NoSuchKey``
  and 404 are ``ObjectNotFoundError``; 408/429/5xx and ``SlowDown`` are
  ``TransientError``. Connection errors pass through for
  :func:`uploader.transfer.retry.is_transient`. No message holds a credential.

Addressing is path-style (``/bucket/key``), which every S3-compatible server
accepts. Plain HTTP is used when ``hparams.secure`` is false (loopback, or
``extra_init_kwargs={"secure": False}``). ``extra_init_kwargs["timeout"]`` sets
the socket timeout in seconds (default 60).

Example::

    hp = ObjectStoreHparams(provider="s3", container="ckpts", host="127.0.0.1",
                            port=9000, key_environ="K", secret_environ="S")
    backend = S3Backend(hp)
    backend.check_container()
"""

from __future__ import annotations

import hashlib
import http.client
import itertools
import logging
import re
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any

from uploader.config.hparams import ObjectStoreHparams
from uploader.errors import (
    AuthError,
    ConfigError,
    ContainerNotFoundError,
    ObjectNotFoundError,
    PermanentError,
    TransientError,
)
from uploader.redact import redact, register_secret
from uploader.transfer.backends.base import Backend, ObjectInfo, PartToken
from uploader.transfer.backends.http import http_time, metadata_from_headers, range_value
from uploader.transfer.retry import TRANSIENT_HTTP

from .sigv4 import EMPTY_SHA256, SigV4Signer, canonical_query, quote_path

__all__ = ["S3Backend", "S3Error"]

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
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "InternalError",
        "ServiceUnavailable",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "Throttling",
        "ThrottlingException",
        "OperationAborted",
    }
)
_MISSING_OBJECT_CODES = frozenset({"NoSuchKey", "NoSuchUpload", "NotFound"})
_STALE_CONNECTION = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


class S3Error(PermanentError):
    """The store refused a request for a reason retrying will not fix."""

    def __init__(self, message: str, status: int, code: str | None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class _Transient(TransientError):
    def __init__(self, message: str, status: int, code: str | None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def _strip_ns(root: ET.Element) -> ET.Element:
    for el in root.iter():
        if isinstance(el.tag, str) and el.tag.startswith("{"):
            el.tag = el.tag.split("}", 1)[1]
    return root


def _xml(body: bytes) -> ET.Element | None:
    if not body or not body.lstrip().startswith(b"<"):
        return None
    try:
        return _strip_ns(ET.fromstring(body))
    except ET.ParseError:
        return None


def _iso_time(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class S3Backend(Backend):
    """One bucket on S3 or an S3-compatible server.

    Args:
        hparams: provider (an S3-family libcloud name), container (the bucket),
            host/port/region, and the names of the credential variables.
        list_page_size: keys per ListObjectsV2 page (1-1000).

    Attributes:
        requests: how many HTTP requests were sent (tests use it to bound retries).
    """

    multipart = True
    max_parts = 10_000
    max_part_size = 5 << 30
    min_part_size = 5 << 20
    keeps_metadata = True

    def __init__(self, hparams: ObjectStoreHparams, *, list_page_size: int = 1000) -> None:
        if not 1 <= list_page_size <= 1000:
            raise ConfigError(f"list_page_size {list_page_size} must be between 1 and 1000")
        key, secret = hparams.credentials()
        register_secret(key)
        register_secret(secret)
        if not key or not secret:
            raise ConfigError(
                f"provider {hparams.provider!r} needs both an access key and a secret: "
                "set key_environ and secret_environ"
            )
        self.hparams = hparams
        self.bucket = hparams.container
        self.secure = hparams.secure
        self.list_page_size = list_page_size
        self.timeout = float(hparams.extra_init_kwargs.get("timeout", 60))
        self.host, self.port, region = self._endpoint(hparams, key, secret)
        self.region = hparams.region or region or "us-east-1"
        default_port = 443 if self.secure else 80
        self.host_header = self.host if self.port == default_port else f"{self.host}:{self.port}"
        self._signer = SigV4Signer(key, secret, self.region)
        self._local = threading.local()
        self._conns: list[http.client.HTTPConnection] = []
        self._conns_lock = threading.Lock()
        self._counter = itertools.count(1)
        self.requests = 0
        #: Requests sent once more on a fresh connection because a kept-alive one was
        #: found closed (not counted as retries: the request never reached the server).
        self._resend_counter = itertools.count(1)
        self.resent = 0
        self._where = (
            f"bucket {self.bucket!r} at {'https' if self.secure else 'http'}://{self.host_header}"
        )

    # -- endpoint through libcloud --------------------------------------------------------
    def _endpoint(
        self, hp: ObjectStoreHparams, key: str, secret: str
    ) -> tuple[str, int, str | None]:
        """Host, port and signing region, resolved by libcloud's driver for the provider."""
        from libcloud.storage.providers import get_driver

        scheme_port = 443 if self.secure else 80
        try:
            cls = get_driver(hp.provider)
        except AttributeError:
            if hp.host:  # libcloud does not know it; an explicit endpoint is all we need
                return hp.host, hp.port or scheme_port, hp.region
            raise ConfigError(
                f"libcloud has no storage driver {hp.provider!r}; give its endpoint with "
                "host and port (or ?endpoint= in the URI), or use provider 's3'"
            ) from None
        kwargs: dict[str, Any] = {"secure": self.secure}
        if hp.host:
            kwargs["host"] = hp.host
        if hp.port:
            kwargs["port"] = hp.port
        if hp.provider == "s3" and hp.region and not hp.host:
            from libcloud.storage.drivers.s3 import REGION_TO_HOST_MAP

            if hp.region not in REGION_TO_HOST_MAP:  # a region newer than libcloud
                return f"s3.{hp.region}.amazonaws.com", hp.port or scheme_port, hp.region
        attempts = [dict(kwargs, region=hp.region), kwargs] if hp.region else [kwargs]
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
                    f"cannot resolve the endpoint of provider {hp.provider!r} "
                    f"({problem[:200]}); give host (and port) for S3-compatible servers, "
                    "or a region the provider knows"
                )
            )
        if not host:
            raise ConfigError(
                f"provider {hp.provider!r} needs an endpoint: set host and port "
                "(e.g. s3://bucket?endpoint=http://127.0.0.1:9000)"
            )
        region = getattr(driver, "region_name", None) or getattr(driver, "region", None)
        return host, port, region if isinstance(region, str) else None

    # -- HTTP -----------------------------------------------------------------------------
    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self.secure:
                conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout)
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

    def _send(
        self,
        method: str,
        key: str | None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        body: bytes | memoryview = b"",
        payload_sha256: str | None = None,
    ) -> http.client.HTTPResponse:
        """Send one signed request and return the response, headers read, body unread."""
        path = self._path(key)
        params = dict(params or {})
        hdrs: dict[str, str] = {"host": self.host_header}
        if headers:
            hdrs.update({k.lower(): v for k, v in headers.items()})
        if payload_sha256 is None:
            payload_sha256 = hashlib.sha256(body).hexdigest() if len(body) else EMPTY_SHA256
        self._signer.sign(method, path, params, hdrs, payload_sha256)
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
            except BaseException:
                self._drop_conn()
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
        root = _xml(body)
        code = root.findtext("Code") if root is not None else None
        message = (root.findtext("Message") if root is not None else None) or ""
        detail = (
            f"HTTP {status}" + (f" {code}" if code else "") + (f": {message}" if message else "")
        )
        detail = redact(detail[:300])
        hp = self.hparams
        if status in (401, 403) or code in _AUTH_CODES:
            return AuthError(
                f"{what}: the store refused the credentials ({detail}). Check the access key "
                f"and secret in ${hp.key_environ} / ${hp.secret_environ}, and that they may "
                f"use {self._where}."
            )
        if code == "NoSuchBucket" or (status == 404 and missing == "bucket"):
            return ContainerNotFoundError(self._no_bucket_text(what))
        if code in _MISSING_OBJECT_CODES or status == 404:
            return ObjectNotFoundError(f"{what}: no such object in {self._where} ({detail})")
        if status in TRANSIENT_HTTP or code in _TRANSIENT_CODES or status >= 500:
            return _Transient(f"{what}: the store is busy or failing ({detail})", status, code)
        return S3Error(f"{what}: the store refused the request ({detail})", status, code)

    def _no_bucket_text(self, what: str) -> str:
        endpoint = f"{'https' if self.secure else 'http'}://{self.host_header}"
        return (
            f"{what}: bucket {self.bucket!r} does not exist at {endpoint}; create it "
            f"(e.g. 'aws s3 mb s3://{self.bucket} --endpoint-url {endpoint}' or "
            f"'rclone mkdir remote:{self.bucket}') or pass --create-container "
            "(create_container=True)"
        )

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
    def put_bytes(self, name: str, data: bytes, metadata: Mapping[str, str], sha256: bytes) -> None:
        headers = self._meta_headers(metadata)
        headers["content-type"] = "application/octet-stream"
        self._request(
            "PUT", name, f"upload {name}", headers=headers, body=data, payload_sha256=sha256.hex()
        )

    # -- multipart ------------------------------------------------------------------------
    def begin(self, name: str, metadata: Mapping[str, str]) -> str:
        headers = self._meta_headers(metadata)
        headers["content-type"] = "application/octet-stream"
        _, body = self._request(
            "POST", name, f"start upload of {name}", params={"uploads": ""}, headers=headers
        )
        root = _xml(body)
        upload_id = root.findtext("UploadId") if root is not None else None
        if not upload_id:
            raise _Transient(
                f"start upload of {name}: the store sent no upload id; retrying", 500, None
            )
        return upload_id

    def put_part(
        self, name: str, upload_id: str, index: int, offset: int, data: memoryview, sha256: bytes
    ) -> PartToken:
        number = index + 1
        resp, _ = self._request(
            "PUT",
            name,
            f"upload part {number} of {name}",
            params={"partNumber": str(number), "uploadId": upload_id},
            body=data,
            payload_sha256=sha256.hex(),
        )
        etag = resp.getheader("ETag")
        if not etag:
            raise _Transient(f"upload part {number} of {name}: no ETag in the reply", 500, None)
        return (number, etag)

    def complete(self, name: str, upload_id: str, tokens: list[PartToken]) -> None:
        parts = "".join(
            f"<Part><PartNumber>{n}</PartNumber><ETag>{_xml_escape(etag)}</ETag></Part>"
            for n, etag in tokens
        )
        body = f"<CompleteMultipartUpload>{parts}</CompleteMultipartUpload>".encode()
        what = f"complete upload of {name}"
        _, reply = self._request("POST", name, what, params={"uploadId": upload_id}, body=body)
        root = _xml(reply)
        if root is not None and root.tag == "Error":
            # S3 may answer 200 and report the failure in the body.
            raise self._error(
                500 if root.findtext("Code") in _TRANSIENT_CODES else 400, reply, what
            )

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
            root = _xml(body)
            if root is None:
                break
            for up in root.iter("Upload"):
                key = up.findtext("Key")
                uid = up.findtext("UploadId")
                if key and uid and key.startswith(prefix):
                    out.append((key, uid, _iso_time(up.findtext("Initiated")) or 0.0))
            if (root.findtext("IsTruncated") or "").lower() != "true":
                break
            km, um = root.findtext("NextKeyMarker"), root.findtext("NextUploadIdMarker")
            if not km:
                break
            params = {"uploads": "", "prefix": prefix, "key-marker": km}
            if um:
                params["upload-id-marker"] = um
        return out

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
                    raise _Transient(f"{what}: the store sent an unexpected range", 500, None)
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

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        params = {"list-type": "2", "prefix": prefix, "max-keys": str(self.list_page_size)}
        for _ in range(10_000_000):
            _, body = self._request(
                "GET", None, f"list {prefix!r} in {self._where}", params=params, missing="bucket"
            )
            root = _xml(body)
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
                    mtime=_iso_time(c.findtext("LastModified")),
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


def _early_error(conn: http.client.HTTPConnection) -> http.client.HTTPResponse | None:
    """An error reply the server sent before the request body was fully sent, if any."""
    try:
        resp = conn.getresponse()
    except Exception:
        return None
    return resp if resp.status >= 400 else None


def _xml_escape(text: str) -> str:
    return (
        text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    )
