"""Google Cloud Storage over libcloud's google_storage driver (XML API).

Uploads go through libcloud's streaming upload (``upload_object_via_stream``):
one PUT whose body is produced while the store reads and hashes the file, with
its length announced up front so nothing is buffered and no chunked encoding
is needed. ``multipart`` is False: the XML API's resumable and compose uploads
are not used, so an object is written by one request of any size up to 5 TiB.

Small objects carry their MD5 in ``x-goog-hash`` (GCS checks it); streamed ones rely on TLS
in transit and on the store's digest, checked after every download.

Conditional writes (commit pointers): a PUT with ``x-goog-if-generation-match``
(``0``: only if absent) writes only while the object has that generation; 412
raises PreconditionFailedError. The version is the ``x-goog-generation`` header.

Credentials (:mod:`uploader.transfer.backends.gcp_identity`): with no variables
named, google-auth's default chain (``GOOGLE_APPLICATION_CREDENTIALS``, gcloud's
application default credentials, the metadata server) and a bearer token on every
request, renewed before it expires; a 401 gets a new token and the request is sent
once more. ``key_environ`` may name the variable with an HMAC access id (``GOOG...``)
or a service account email, ``secret_environ`` the one with the HMAC secret or the
key file path. ``extra_init_kwargs`` may hold ``project`` and ``timeout`` and other
libcloud driver arguments.

Example::

    hp = ObjectStoreHparams(provider="google_storage", container="ckpts",
                            key_environ="GOOGLE_CLIENT_EMAIL",
                            secret_environ="GOOGLE_APPLICATION_CREDENTIALS",
                            extra_init_kwargs={"project": "my-project"})
    store = hp.initialize_object()   # builds GCSBackend(hp.store_settings())
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any
from xml.etree import ElementTree as ET

from uploader.errors import (
    AuthError,
    ConfigError,
    ContainerNotFoundError,
    ObjectNotFoundError,
    PermanentError,
    PreconditionFailedError,
    TransientError,
    UploaderError,
)
from uploader.redact import redact
from uploader.transfer.backends.base import ObjectInfo
from uploader.transfer.backends.encryption import encryption_headers
from uploader.transfer.backends.gcp_identity import GcpIdentity
from uploader.transfer.backends.http import (
    LibcloudHTTPBackend,
    http_time,
    iso_time,
    metadata_from_headers,
)
from uploader.transfer.retry import TRANSIENT_HTTP
from uploader.transfer.settings import StoreSettings

__all__ = ["GCSBackend"]


_MiB = 1 << 20
_META_KEY = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
_PROPERTIES = {"content-type", "content-encoding", "content-language", "cache-control"}


class _SizedStream:
    """An iterator of chunks with a known total length, so the PUT carries a
    Content-Length and streams without chunked encoding."""

    def __init__(self, chunks: Iterable[bytes], size: int) -> None:
        self._it = iter(chunks)
        self._size = size
        self.sent = 0

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return True

    def __iter__(self) -> _SizedStream:
        return self

    def __next__(self) -> bytes:
        chunk = next(self._it)
        self.sent += len(chunk)
        if self.sent > self._size:
            raise PermanentError(f"stream yielded more than the announced {self._size} bytes")
        return chunk


class GCSBackend(LibcloudHTTPBackend):
    """Objects in one Google Cloud Storage bucket.

    Args:
        settings: ``provider="google_storage"``; see the module docstring for the
            credentials; ``host``/``port`` point at another endpoint.

    Example::

        backend = GCSBackend(hp.store_settings())
        backend.put_bytes("a.txt", b"hi", {}, hashlib.sha256(b"hi").digest())
    """

    identity: GcpIdentity

    multipart = False
    keeps_metadata = True
    version_header = "x-goog-generation"  # a pointer's version is its generation
    # One PUT per object (up to GCS's 5 TiB limit); "parts" here are only the
    # units the store hashes while streaming, so the usual limits apply to them.
    max_part_size = 5 << 30
    max_parts = 10_000
    min_part_size = 64 << 10
    conditional = True

    def __init__(self, settings: StoreSettings) -> None:
        from libcloud.storage.drivers.google_storage import GoogleStorageDriver

        extra = self._init_drivers(settings)
        self.identity = GcpIdentity(settings, self._trust)
        if self.identity.signed is not None:
            self._key, self._secret = self.identity.signed
        else:
            # libcloud builds and sends the request; the Authorization header is ours
            # (_bearer). An HMAC-shaped placeholder keeps libcloud from starting an
            # OAuth flow of its own; nothing is signed with it.
            self._key, self._secret = "GOOG0BEARER0TOKEN0IN0USE", "-"
            if self.identity.project and "project" not in extra:
                extra["project"] = self.identity.project
        self._driver_kwargs: dict[str, Any] = {
            "secure": settings.secure,
            "timeout": self._timeout,
            **extra,
        }
        self._driver_cls = GoogleStorageDriver

    # -- plumbing ----------------------------------------------------------------------
    def _new_driver(self) -> Any:
        try:
            drv = self._driver_cls(self._key, self._secret, **self._driver_kwargs)
        except Exception as exc:
            raise AuthError(
                f"cannot set up Google Cloud Storage credentials: {redact(str(exc))[:200]}; "
                f"check ${self.settings.key_environ} (service account email or HMAC id) and "
                f"${self.settings.secret_environ} (key file or HMAC secret)"
            ) from None
        if self.identity.bearer:
            drv.connection.pre_connect_hook = self._bearer  # type: ignore[method-assign]
        if self.settings.host:
            # Set on the connection: libcloud's GCS connection takes its 4th
            # positional argument as the auth type, so host cannot go through
            # the driver's constructor.
            conn = drv.connection
            conn.host = self.settings.host
            conn.secure = self.settings.secure
            conn.port = self.settings.port or (443 if self.settings.secure else 80)
        return drv

    def _bearer(self, params: dict[str, Any], headers: dict[str, Any]) -> tuple[Any, Any]:
        """libcloud's last step before sending: the current bearer token."""
        headers["Authorization"] = "Bearer " + self.identity.token()
        return params, headers

    def _token_refused(self, resp: Any) -> bool:
        """Whether ``resp`` (None: this thread's last request) answered a bearer token
        with 401."""
        if not self.identity.bearer:
            return False
        if resp is None:
            resp = getattr(self._driver().connection.connection, "response", None)
        return getattr(resp, "status_code", None) == 401

    def _endpoint(self) -> str:
        if self.settings.host:
            port = f":{self.settings.port}" if self.settings.port else ""
            return f"{self.settings.host}{port}"
        return "storage.googleapis.com"

    def _auth_error(self, what: str, detail: str = "") -> AuthError:
        extra = f" ({detail})" if detail else ""
        return AuthError(
            f"{what}: the store refused the credentials{extra}. The credentials in use: "
            f"{self.identity.describe()}; check that they may use bucket {self.container!r} "
            "('ckpt-uploader check URI' tests each permission)"
        )

    def _map(self, what: str, exc: BaseException) -> UploaderError:
        """An uploader error for an exception raised by libcloud or the transport."""
        from libcloud.common.types import InvalidCredsError, LibcloudError

        if isinstance(exc, InvalidCredsError):
            return self._auth_error(what)
        if isinstance(exc, LibcloudError):
            text = redact(str(exc))[:300]
            m = re.search(r"[Ss]tatus[ _]code[:=]? ?(\d{3})", text)
            status = int(m.group(1)) if m else 0
            if status in (401, 403):
                return self._auth_error(what)
            if status == 404:
                return ObjectNotFoundError(f"{what}: not found in bucket {self.container!r}")
            if status == 412:  # only conditional writes carry a precondition
                return _precondition_failed(what)
            if status in TRANSIENT_HTTP:
                return TransientError(f"{what}: {text}")
            return PermanentError(f"{what}: {text}")
        return super()._map(what, exc)

    def _fail(self, what: str, resp: Any, name: str | None = None) -> UploaderError:
        status = int(resp.status_code)
        code = ""
        try:
            if resp.request.method != "HEAD" and resp.content:
                code = ET.fromstring(resp.content).findtext("Code") or ""
        except Exception:
            pass
        finally:
            resp.close()
        if status in (401, 403):
            return self._auth_error(what, f"HTTP {status} {code}".strip())
        if code == "NoSuchBucket":
            return self._no_bucket()
        if status == 404:
            return ObjectNotFoundError(f"{what}: {name!r} not found in bucket {self.container!r}")
        if status in TRANSIENT_HTTP:
            return TransientError(f"{what}: HTTP {status} {code}".strip())
        return PermanentError(f"{what}: the store answered HTTP {status} {code}".strip())

    def _no_bucket(self) -> ContainerNotFoundError:
        return ContainerNotFoundError(
            f"bucket {self.container!r} does not exist on {self._endpoint()}; create it "
            f"(gcloud storage buckets create gs://{self.container}) or pass "
            "--create-container (create_container=True)"
        )

    # -- container ---------------------------------------------------------------------
    def check_container(self, create: bool = False) -> None:
        what = f"checking bucket {self.container!r}"
        resp = self._request(what, self._path(), "HEAD")
        if resp.status_code == 200:
            resp.close()
            return
        if resp.status_code == 404:
            resp.close()
            if not create:
                raise self._no_bucket()
            resp = self._request(f"creating bucket {self.container!r}", self._path(), "PUT")
            if resp.status_code in (200, 201, 409):
                resp.close()
                return
            raise self._fail(f"creating bucket {self.container!r}", resp)
        raise self._fail(what, resp)

    # -- uploads -----------------------------------------------------------------------
    def put_bytes(
        self,
        name: str,
        data: bytes,
        metadata: Mapping[str, str],
        sha256: bytes | None,
        crc64nvme: int | None = None,
    ) -> None:
        self._put(name, data, metadata, {})

    def _put(
        self, name: str, data: bytes, metadata: Mapping[str, str], conditions: dict[str, str]
    ) -> Any:
        """One PUT of ``data``; return the response (closed), raise the mapped error."""
        headers, content_type = _headers_for(metadata)
        headers.update(encryption_headers(self.settings.extra, "gcs"))
        headers.update(conditions)
        headers["Content-Type"] = content_type or "application/octet-stream"
        # x-goog-hash rather than Content-MD5: libcloud lower-cases Content-MD5 when it
        # signs with HMAC keys, which breaks the signature.
        headers["x-goog-hash"] = "md5=" + base64.b64encode(hashlib.md5(data).digest()).decode()
        headers["Content-Length"] = str(len(data))
        what = f"upload {name}"
        resp = self._request(what, self._path(name), "PUT", None, headers, data)
        if resp.status_code not in (200, 201):
            if conditions and resp.status_code == 412:
                resp.close()
                raise _precondition_failed(what)
            raise self._fail(what, resp, name)
        resp.close()
        return resp

    # -- conditional writes ------------------------------------------------------------
    def put_if(
        self,
        name: str,
        data: bytes,
        metadata: Mapping[str, str],
        sha256: bytes,
        expected: str | None,
    ) -> str | None:
        cond = {"x-goog-if-generation-match": expected or "0"}
        resp = self._put(name, data, metadata, cond)
        generation: str | None = resp.headers.get("x-goog-generation")
        return generation

    def put_stream(
        self, name: str, chunks: Iterable[bytes], metadata: Mapping[str, str], size: int
    ) -> None:
        from libcloud.storage.base import Container

        headers, content_type = _headers_for(metadata)
        meta = {
            k[len("x-goog-meta-") :]: v for k, v in headers.items() if k.startswith("x-goog-meta-")
        }
        props = {k: v for k, v in headers.items() if not k.startswith("x-goog-meta-")}
        props.update(encryption_headers(self.settings.extra, "gcs"))
        props["Content-Length"] = str(size)
        drv = self._driver()
        body = _SizedStream(chunks, size)
        seen = self.identity.generation
        what = f"upload {name}"
        try:
            drv.upload_object_via_stream(
                body,
                Container(self.container, {}, drv),
                name,
                extra={
                    "meta_data": meta,
                    "content_type": content_type or "application/octet-stream",
                },
                headers=props,
            )
        except Exception as exc:
            err = self._map(what, exc)
            if isinstance(err, AuthError) and self._token_refused(None):
                # The body is spent: a new token now, and the retry sends the file again.
                self._renew(what, seen)
                raise TransientError(
                    f"{what}: the access token was refused; sending again"
                ) from None
            # A PUT finds no object to miss: a 404 means the bucket is gone.
            raise (self._no_bucket() if isinstance(err, ObjectNotFoundError) else err) from None
        if body.sent != size:
            raise TransientError(f"{what}: sent {body.sent} of {size} bytes")

    # -- reading -----------------------------------------------------------------------
    def stat(self, name: str) -> ObjectInfo:
        h = self._head(f"stat {name}", name)
        size = h.get("x-goog-stored-content-length") or h.get("content-length") or 0
        meta = metadata_from_headers(h.items(), "x-goog-meta-")
        return ObjectInfo(name, int(size), meta, h.get("etag"), http_time(h.get("last-modified")))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        return self._listing(f"list {prefix!r}", lambda: self._list(prefix))

    def _list(self, prefix: str) -> Iterator[ObjectInfo]:
        from libcloud.storage.base import Container

        drv = self._driver()
        what = f"list {prefix!r}"
        try:
            for obj in drv.iterate_container_objects(
                Container(self.container, {}, drv), prefix=prefix or None
            ):
                yield ObjectInfo(
                    obj.name,
                    int(obj.size),
                    {},
                    obj.hash,
                    iso_time(obj.extra.get("last_modified")),
                )
        except UploaderError:
            raise
        except Exception as exc:
            if "NoSuchBucket" in str(exc) or "status code: 404" in str(exc):
                raise self._no_bucket() from None
            raise self._map(what, exc) from None

    def delete(self, name: str) -> bool:
        what = f"delete {name}"
        resp = self._request(what, self._path(name), "DELETE")
        if resp.status_code in (200, 204):
            resp.close()
            return True
        if resp.status_code == 404:
            err = self._fail(what, resp, name)
            if isinstance(err, ContainerNotFoundError):
                raise err
            return False
        raise self._fail(what, resp, name)


def _precondition_failed(what: str) -> PreconditionFailedError:
    return PreconditionFailedError(
        f"{what}: another writer changed it since it was read (generation mismatch); "
        "read it again and merge"
    )


def _headers_for(metadata: Mapping[str, str]) -> tuple[dict[str, str], str | None]:
    """The headers of an object's metadata, and its content type (None: not given)."""
    meta: dict[str, str] = {}
    content_type = None
    for key, value in metadata.items():
        k = key.lower()
        v = str(value)
        if not v.isascii() or "\n" in v or "\r" in v:
            raise ConfigError(f"metadata value of {key!r} must be one line of ASCII text")
        if k == "content-type":
            content_type = v
        elif k in _PROPERTIES:
            meta[k] = v
        elif _META_KEY.match(k):
            meta[f"x-goog-meta-{k}"] = v
        else:
            raise ConfigError(
                f"metadata key {key!r} is not valid: use letters, digits, '-', '_' and '.'"
            )
    return meta, content_type
