"""Azure Blob Storage (and Azurite) over libcloud's AZURE_BLOBS driver.

Block blobs carry the multipart protocol: ``begin`` only names the upload,
``put_part`` is a Put Block, ``complete`` a Put Block List that also sets the
metadata. Requests are built here and sent by libcloud's connection, one driver
per thread because a libcloud connection holds the state of the request in flight.

Credentials (:mod:`uploader.transfer.backends.azure_identity`): a SAS named by
``sas_environ`` (added to each request's query), an account key (libcloud signs
each request with Shared Key), or a Microsoft Entra bearer token from
azure-identity's chain, taken right before each request and renewed before it
expires; a refused token (401, or 403 ``AuthenticationFailed``) gets a new token and
the request is sent once more.

Integrity in transit: Azure checks ``Content-MD5`` (or CRC64) and nothing
stronger; the part's sha256 that the store passes in cannot be used. Each block
and each small blob is therefore sent with its MD5, computed in the uploading
thread (hashlib releases the GIL, so parts hash in parallel; MD5 runs at about
400 MiB/s a core, more than one block upload sustains on most links). Where
that second pass is not wanted (TLS already protects the bytes in transit),
``extra_init_kwargs={"content_md5": False}`` turns it off. The store's sha256
digest is kept as the ``ckptdigest`` metadata or digest record as usual, and checked
after every download.

Conditional writes (commit pointers): a Put Blob with ``If-None-Match: *`` creates,
with ``If-Match: <ETag>`` replaces; 412 ``ConditionNotMet`` and 409
``BlobAlreadyExists`` raise PreconditionFailedError. Azure and Azurite honour both.

The block-blob protocol (parts, resuming, blob headers) lives in
:mod:`uploader.transfer.backends.azure_blocks`: unfinished uploads leave
uncommitted blocks that Azure discards by itself, so ``abort`` sends nothing, and
an interrupted upload resumes from the blob's uncommitted block list.

Example::

    hp = ObjectStoreHparams(provider="azure_blobs", container="ckpts",
                            key_environ="AZURE_STORAGE_ACCOUNT",
                            secret_environ="AZURE_STORAGE_KEY")
    store = hp.initialize_object()   # builds AzureBackend(hp.store_settings())
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import re
import time
from collections.abc import Iterator, Mapping
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
from uploader.transfer.backends.azure_blocks import AzureBlocks, b64
from uploader.transfer.backends.azure_identity import AzureIdentity
from uploader.transfer.backends.base import ObjectInfo
from uploader.transfer.backends.encryption import AZURE_SCOPE_VERSION
from uploader.transfer.backends.http import (
    http_time,
    install_request_timeout,
    metadata_from_headers,
)
from uploader.transfer.retry import TRANSIENT_HTTP, is_transient
from uploader.transfer.settings import StoreSettings
from uploader.transfer.tls import tls_failure

__all__ = ["AzureBackend", "install_request_timeout"]


_CONTAINER = re.compile(r"^(\$root|[a-z0-9][a-z0-9-]{1,61}[a-z0-9])$")
_PUBLIC_SUFFIX = "blob.core.windows.net"


class AzureBackend(AzureBlocks):
    """Block blobs in one Azure container.

    Args:
        settings: ``provider="azure_blobs"``; ``key_environ`` names the variable with
            the account name, ``secret_environ`` the one with the account key (see
            the module docstring for SAS and tokens);
            ``host``/``port`` point at another endpoint (Azurite, sovereign clouds);
            ``extra_init_kwargs`` may hold ``secure``, ``timeout`` (seconds per
            request, default 120), ``content_md5`` (default True) and further
            libcloud driver arguments.

    Example::

        backend = AzureBackend(hp.store_settings())
        backend.check_container(create=True)
        backend.put_bytes("a.txt", b"hi", {}, hashlib.sha256(b"hi").digest())
    """

    identity: AzureIdentity

    keeps_metadata = True
    range_header = "x-ms-range"
    conditional = True

    def __init__(self, settings: StoreSettings) -> None:
        if not _CONTAINER.match(settings.container) or "--" in settings.container:
            raise ConfigError(
                f"Azure container name {settings.container!r} is invalid: use 3-63 lower-case "
                "letters, digits and single hyphens, starting with a letter or digit"
            )
        extra = self._init_drivers(settings)
        extra.pop("sas_environ", None)
        self._content_md5 = bool(extra.pop("content_md5", True))
        self.identity = AzureIdentity(settings, self._trust)
        account = self.identity.account
        self._account = account
        # libcloud wants a base64 key even when it signs nothing (SAS, tokens: _authorise).
        self._key = self.identity.key or "AAAA"
        host = settings.host
        if host and host.lower() == f"{account}.{_PUBLIC_SUFFIX}".lower():
            # The public endpoint written out in full: libcloud builds it itself, and
            # would otherwise address the account by path as it does for Azurite.
            host = None
        self._driver_kwargs: dict[str, Any] = {
            "secure": settings.secure,
            "host": host,
            "port": settings.port,
            "timeout": self._timeout,
            **extra,
        }
        # Imported once the TLS trust is resolved: libcloud refuses a missing
        # $SSL_CERT_FILE with a bare error of its own.
        from libcloud.storage.drivers.azure_blobs import AzureBlobsStorageDriver

        self._driver_cls = AzureBlobsStorageDriver
        self._uploads: dict[str, dict[str, str]] = {}

    # -- plumbing ----------------------------------------------------------------------
    def _new_driver(self) -> Any:
        try:
            drv = self._driver_cls(self._account, self._key, **self._driver_kwargs)
        except Exception as exc:  # bad kwargs, bad key format ...
            raise ConfigError(
                f"cannot set up the Azure driver: {redact(str(exc))}; check host, port "
                "and extra_init_kwargs"
            ) from None
        if self.settings.extra.get("encryption_scope") is not None:
            drv.connection.API_VERSION = AZURE_SCOPE_VERSION  # type: ignore[attr-defined]
        if self.identity.mode != "shared key":
            conn = drv.connection
            conn.pre_connect_hook = lambda p, h: self._authorise(conn, p, h)  # type: ignore[method-assign]
        return drv

    def _authorise(
        self, conn: Any, params: dict[str, Any], headers: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """libcloud's last step before sending, in place of Shared Key signing: the
        current bearer token, or the SAS in the query."""
        headers = dict(headers)
        headers.pop("Host", None)
        headers["x-ms-date"] = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime())
        headers["x-ms-version"] = conn.API_VERSION  # 2018-11-09: OAuth needs 2017-11-09+
        if self.identity.bearer:
            headers["Authorization"] = "Bearer " + self.identity.token()
        else:
            params = {**(params or {}), **self.identity.sas}
        return params, headers

    def _token_refused(self, resp: Any) -> bool:
        """Whether ``resp`` (None: this thread's last request) refuses this store's bearer
        token (401, or 403 ``AuthenticationFailed`` / ``InvalidAuthenticationInfo``)."""
        if not self.identity.bearer:
            return False
        if resp is None:  # this thread's last request
            resp = getattr(self._driver().connection.connection, "response", None)
            if resp is None:
                return False
        status = getattr(resp, "status_code", None)
        if status == 401:
            return True
        code = resp.headers.get("x-ms-error-code", "")
        return status == 403 and code in ("AuthenticationFailed", "InvalidAuthenticationInfo")

    def _endpoint(self) -> str:
        if self.settings.host:
            port = f":{self.settings.port}" if self.settings.port else ""
            return f"the Azure endpoint {self.settings.host}{port}"
        return "the Azure Blob endpoint"

    def _fail(self, what: str, resp: Any, name: str | None = None) -> UploaderError:
        status = int(resp.status_code)
        code = resp.headers.get("x-ms-error-code", "")
        message = ""
        try:
            body = resp.content if resp.request.method != "HEAD" else b""
            if body:
                root = ET.fromstring(body)
                code = root.findtext("Code") or code
                message = (root.findtext("Message") or "").split("\n")[0]
        except Exception:
            pass
        finally:
            resp.close()
        detail = redact(f"HTTP {status} {code} {message}".strip())
        if status in (401, 403):
            return self._auth_error(what, detail)
        if code == "ContainerNotFound":
            return self._no_container()
        if status == 404:
            return ObjectNotFoundError(
                f"{what}: object {name!r} not found in container {self.container!r}"
            )
        md5_bad = code == "Md5Mismatch" or ("md5" in message.lower() and "match" in message)
        if md5_bad:  # bytes damaged on the way (Azurite words it differently): resend
            return TransientError(f"{what}: {detail}; the bytes were damaged in transit")
        if status in TRANSIENT_HTTP or code in ("ServerBusy", "OperationTimedOut"):
            return TransientError(f"{what}: {detail}; the store is busy, retrying helps")
        return PermanentError(f"{what}: the store answered {detail}")

    def _auth_error(self, what: str, detail: str) -> AuthError:
        if self.identity.mode == "sas" and (
            "expired" in detail.lower() or _past(self.identity.sas_expiry)
        ):
            return AuthError(
                f"{what}: the store refused the SAS ({detail}); " + self.identity.sas_expired()
            )
        return AuthError(
            f"{what}: the store refused the credentials ({detail}). The credentials in use: "
            f"{self.identity.describe()}; check that they may use container "
            f"{self.container!r} ('ckpt-uploader check URI' tests each permission)"
        )

    def _no_container(self) -> ContainerNotFoundError:
        return ContainerNotFoundError(
            f"Azure container {self.container!r} does not exist on {self._endpoint()}; "
            "create it (az storage container create --name "
            f"{self.container}) or pass --create-container (create_container=True)"
        )

    # -- container ---------------------------------------------------------------------
    def check_container(self, create: bool = False) -> None:
        what = f"checking container {self.container!r}"
        resp = self._request(what, self._path(), "HEAD", {"restype": "container"})
        if resp.status_code == 200:
            resp.close()
            return
        if resp.status_code == 404 and create:
            resp.close()
            resp = self._request(
                f"creating container {self.container!r}",
                self._path(),
                "PUT",
                {"restype": "container"},
            )
            if resp.status_code in (201, 409):  # 409: created meanwhile
                resp.close()
                return
            raise self._fail(f"creating container {self.container!r}", resp)
        if resp.status_code == 404:
            resp.close()
            raise self._no_container()
        raise self._fail(what, resp)

    # -- small objects -----------------------------------------------------------------
    def put_bytes(
        self,
        name: str,
        data: bytes,
        metadata: Mapping[str, str],
        sha256: bytes | None,
        crc64nvme: int | None = None,
    ) -> None:
        self._put_blob(name, data, metadata, {})

    def _put_blob(
        self, name: str, data: bytes, metadata: Mapping[str, str], conditions: dict[str, str]
    ) -> Any:
        """One Put Blob; return the response (closed), raise the mapped error unless 201."""
        headers = self._headers_for(metadata)
        headers.update(conditions)
        headers["x-ms-blob-type"] = "BlockBlob"
        if data:
            # An empty body is signed with an empty Content-Length, so send none.
            headers["Content-Length"] = str(len(data))
            if self._content_md5:
                headers["Content-MD5"] = b64(hashlib.md5(data).digest())
        headers.setdefault("x-ms-blob-content-type", "application/octet-stream")
        what = f"upload {name}"
        resp = self._request(what, self._path(name), "PUT", None, headers, data or None)
        if resp.status_code != 201:
            code = resp.headers.get("x-ms-error-code", "")
            if conditions and code in ("ConditionNotMet", "BlobAlreadyExists"):
                resp.close()
                raise PreconditionFailedError(
                    f"{what}: another writer changed it since it was read ({code}); "
                    "read it again and merge"
                )
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
        cond = {"If-None-Match": "*"} if expected is None else {"If-Match": expected}
        resp = self._put_blob(name, data, metadata, cond)
        etag: str | None = resp.headers.get("etag")
        return etag

    # -- reading -----------------------------------------------------------------------
    def stat(self, name: str) -> ObjectInfo:
        h = self._head(f"stat {name}", name)
        return ObjectInfo(
            name,
            int(h.get("content-length", 0)),
            metadata_from_headers(h.items(), "x-ms-meta-"),
            h.get("etag"),
            http_time(h.get("last-modified")),
        )

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        return self._listing(f"list {prefix!r}", lambda: self._list(prefix))

    def _list(self, prefix: str) -> Iterator[ObjectInfo]:
        from libcloud.storage.base import Container
        from libcloud.storage.types import ContainerDoesNotExistError

        drv = self._driver()
        container = Container(self.container, {}, drv)
        try:
            for obj in drv.iterate_container_objects(container, prefix=prefix or None):
                meta = {k.lower(): v for k, v in (obj.meta_data or {}).items()}
                yield ObjectInfo(
                    obj.name,
                    int(obj.size),
                    meta,
                    obj.extra.get("etag"),
                    http_time(obj.extra.get("last_modified")),
                )
        except ContainerDoesNotExistError:
            raise self._no_container() from None
        except (TransientError, PermanentError, ConfigError):
            raise
        except Exception as exc:
            raise _map_libcloud(f"list {prefix!r}", exc, self) from None

    def delete(self, name: str) -> bool:
        what = f"delete {name}"
        resp = self._request(what, self._path(name), "DELETE")
        if resp.status_code == 202:
            resp.close()
            return True
        if resp.status_code == 404 and resp.headers.get("x-ms-error-code") != "ContainerNotFound":
            resp.close()
            return False
        raise self._fail(what, resp, name)


def _map_libcloud(what: str, exc: Exception, backend: AzureBackend) -> Exception:
    """Map an exception raised inside libcloud's driver code."""
    from libcloud.common.types import InvalidCredsError, LibcloudError

    failed = tls_failure(exc, backend._endpoint(), backend._trust)
    if failed is not None:
        return failed
    text = redact(str(exc))[:300]
    if isinstance(exc, InvalidCredsError):
        return backend._auth_error(what, text)
    if isinstance(exc, LibcloudError):
        m = re.search(r"[Ss]tatus code:? (\d{3})", text)
        status = int(m.group(1)) if m else 0
        if status in (401, 403):
            return backend._auth_error(what, text)
        if status in TRANSIENT_HTTP:
            return TransientError(f"{what}: {text}")
        return PermanentError(f"{what}: {text}")
    if is_transient(exc):
        return TransientError(f"{what}: {type(exc).__name__}: {text}")
    return PermanentError(f"{what}: {type(exc).__name__}: {text}")


def _past(when: _dt.datetime | None) -> bool:
    return when is not None and when <= _dt.datetime.now(_dt.timezone.utc)
