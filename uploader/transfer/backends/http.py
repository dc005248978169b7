"""Pieces shared by the backends that speak HTTP to their store.

* :func:`range_value` builds the ``bytes=first-last`` value of a ranged GET,
  :func:`metadata_from_headers` reads user metadata back from response
  headers, :func:`http_time` reads an HTTP date (S3, Azure and Google Cloud
  Storage alike) and :func:`iso_time` an ISO 8601 time from a listing (S3, GCS).
* :class:`LibcloudHTTPBackend` is the plumbing of the backends whose requests
  are built by the adapter but signed and sent by a libcloud connection (Azure,
  Google Cloud Storage): one driver per thread, because a libcloud connection
  holds the state of the request in flight; a timeout on every request; the TLS
  trust of :mod:`uploader.transfer.tls` on every connection; transport errors mapped
  to :mod:`uploader.errors` (a failed certificate check to ``TLSError``); and ranged
  downloads that also cope with a server that ignores the range.

Example::

    class MyBackend(LibcloudHTTPBackend):
        range_header = "Range"

        def _new_driver(self): ...
        def _endpoint(self): ...
        def _fail(self, what, resp, name=None): ...
"""

from __future__ import annotations

import logging
import threading
from abc import abstractmethod
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote

from uploader.errors import AuthError, PermanentError, TransientError, UploaderError
from uploader.redact import redact
from uploader.transfer.backends.base import Backend, ObjectInfo
from uploader.transfer.backends.encryption import ENCRYPTION_OPTIONS
from uploader.transfer.backends.identity import Identity
from uploader.transfer.retry import is_transient
from uploader.transfer.settings import StoreSettings
from uploader.transfer.tls import tls_failure

#: Seconds a request of a libcloud-driven backend may take (``extra_init_kwargs["timeout"]``).
DEFAULT_TIMEOUT = 120.0

__all__ = [
    "DEFAULT_TIMEOUT",
    "LibcloudHTTPBackend",
    "http_time",
    "install_request_timeout",
    "iso_time",
    "metadata_from_headers",
    "range_value",
    "read_bounded",
]


def range_value(start: int, length: int | None) -> str | None:
    """The value of a Range header for ``[start, start+length)`` (to the end when
    ``length`` is None); None when the whole object is wanted."""
    if not start and length is None:
        return None
    end = "" if length is None else str(start + length - 1)
    return f"bytes={start}-{end}"


def metadata_from_headers(headers: Iterable[tuple[str, str]], prefix: str) -> dict[str, str]:
    """User metadata from response headers: those whose name starts with ``prefix``
    (any case), keyed by the lower-case rest of the name."""
    return {k.lower()[len(prefix) :]: v for k, v in headers if k.lower().startswith(prefix)}


def http_time(text: str | None) -> float | None:
    """Seconds since the epoch for an HTTP date (``Last-Modified``); None if unreadable."""
    if not text:
        return None
    try:
        return parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError):
        return None


def iso_time(text: str | None) -> float | None:
    """Seconds since the epoch for a listing's ISO 8601 time
    (``2026-11-24T01:00:00.000Z``); None if unreadable."""
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except (TypeError, ValueError):
        return None


def read_bounded(resp: Any, limit: int | None, chunk_size: int = 1 << 16) -> bytes:
    """The body of a streamed ``requests.Response``, at most ``limit`` bytes (all of it
    when None); the caller closes the response."""
    if limit is None:
        return bytes(resp.content)
    out = bytearray()
    for chunk in resp.iter_content(chunk_size):
        out += chunk[: limit - len(out)]
        if len(out) >= limit:
            break
    return bytes(out)


def install_request_timeout(session: Any, timeout: float) -> None:
    """Give every request of a ``requests.Session`` a timeout: libcloud's raw
    (streaming) requests set none, so a silent server would block forever."""
    from requests import PreparedRequest, Response
    from requests.adapters import HTTPAdapter

    class _Adapter(HTTPAdapter):
        def send(
            self,
            request: PreparedRequest,
            stream: bool = False,
            timeout: Any = None,
            verify: bool | str = True,
            cert: Any = None,
            proxies: Any = None,
        ) -> Response:
            return super().send(
                request,
                stream=stream,
                timeout=default if timeout is None else timeout,
                verify=verify,
                cert=cert,
                proxies=proxies,
            )

    default = timeout

    for prefix in ("http://", "https://"):
        session.mount(prefix, _Adapter())


log = logging.getLogger(__name__)


class LibcloudHTTPBackend(Backend):
    """A backend that sends its own requests through per-thread libcloud drivers.

    A subclass sets :attr:`range_header`, calls :meth:`_init_drivers` in its
    constructor, and supplies :meth:`_new_driver` (build one driver, raising the
    provider's error), :meth:`_endpoint` (for messages) and :meth:`_fail` (map a
    failed response). It may refine :meth:`_map` for errors libcloud raises itself.
    """

    #: The request header that carries a byte range.
    range_header = "Range"

    def _init_drivers(self, settings: StoreSettings) -> dict[str, Any]:
        """Set up the per-thread drivers for the settings' container and read the
        request timeout; return the extra keyword arguments left for the driver."""
        self.settings = settings
        self.container = settings.container
        extra = dict(settings.extra)
        self._timeout = float(extra.pop("timeout", DEFAULT_TIMEOUT))
        for name in ENCRYPTION_OPTIONS:  # headers of ours, not driver arguments
            extra.pop(name, None)
        self._local = threading.local()
        self._drivers: list[Any] = []
        self._lock = threading.Lock()
        self._trust = settings.trust(self._endpoint())
        return extra

    @abstractmethod
    def _new_driver(self) -> Any:
        """A new libcloud driver for this store, its connection configured."""

    @abstractmethod
    def _endpoint(self) -> str:
        """The store's endpoint, as error messages name it."""

    @abstractmethod
    def _fail(self, what: str, resp: Any, name: str | None = None) -> UploaderError:
        """The uploader error for a failed response (its body is read and closed)."""

    def _driver(self) -> Any:
        """This thread's driver, connected, with a timeout on every request."""
        drv = getattr(self._local, "driver", None)
        if drv is None:
            drv = self._new_driver()
            drv.connection.connect()
            http: Any = drv.connection.connection
            install_request_timeout(http.session, self._timeout)
            verify = self._trust.requests_verify()
            if verify is not None:  # else libcloud's default trust store
                http.verify = verify is not False
                http.ca_cert = verify or None
            self._local.driver = drv
            with self._lock:
                self._drivers.append(drv)
        return drv

    def _path(self, name: str | None = None) -> str:
        base = f"/{self.container}"
        return base if name is None else f"{base}/{quote(name, safe='/')}"

    def _map(self, what: str, exc: BaseException) -> UploaderError:
        """An uploader error for an exception raised while sending a request."""
        if isinstance(exc, UploaderError):
            return exc
        failed = tls_failure(exc, self._endpoint(), self._trust)
        if failed is not None:
            return failed
        text = f"{what}: {type(exc).__name__}: {redact(str(exc))[:300]}"
        if is_transient(exc):
            return TransientError(f"{text}; check that {self._endpoint()} is reachable")
        return PermanentError(text)

    # -- credentials renewed when refused --------------------------------------------------
    #: The store's renewable credentials (bearer tokens), set by the adapter; None while
    #: libcloud signs every request with a fixed key.
    identity: Identity | None = None

    def describe_identity(self) -> str:
        return (
            self.identity.describe() if self.identity is not None else super().describe_identity()
        )

    def _token_refused(self, resp: Any) -> bool:
        """Whether ``resp`` (None: this thread's last request, which raised AuthError)
        refuses the current token. No token, no refusal of one."""
        return False

    def _renew(self, what: str, seen: int) -> None:
        """A new token, unless another thread renewed it since generation ``seen``."""
        assert self.identity is not None
        log.warning("%s: the store refused the access token; getting a new one", what)
        self.identity.refresh(seen)

    def _listing(
        self, what: str, listing: Callable[[], Iterator[ObjectInfo]]
    ) -> Iterator[ObjectInfo]:
        """The objects ``listing`` yields; when the store refuses the token before the
        first one, a new token and the listing once more."""
        seen = self.identity.generation if self.identity is not None else 0
        listed = 0
        try:
            for info in listing():
                listed += 1
                yield info
        except AuthError:
            if listed or not self._token_refused(None):
                raise
            self._renew(what, seen)
            yield from listing()

    def _request(
        self,
        what: str,
        path: str,
        method: str = "GET",
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        data: Any = None,
        stream: bool = False,
    ) -> Any:
        """One request (see :meth:`_send`); a token the store refuses is renewed and the
        request sent once more (a second refusal is the caller's to see)."""
        seen = self.identity.generation if self.identity is not None else 0
        try:
            resp = self._send(what, path, method, params, headers, data, stream)
        except AuthError:  # libcloud raises on 401 and 403 for some stores
            if not self._token_refused(None):
                raise
        else:
            if not self._token_refused(resp):
                return resp
            resp.close()
        self._renew(what, seen)
        return self._send(what, path, method, params, headers, data, stream)

    def _send(
        self,
        what: str,
        path: str,
        method: str = "GET",
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        data: Any = None,
        stream: bool = False,
    ) -> Any:
        """Send one signed request; return the ``requests.Response``. Transport errors
        become uploader errors with a clean message."""
        conn = self._driver().connection
        try:
            conn.request(
                path,
                params=params or {},
                data=data,
                headers=headers or {},
                method=method,
                raw=True,
                stream=stream,
            )
        except Exception as exc:
            raise self._map(what, exc) from None
        return conn.connection.response

    #: the response header that carries an object's version (ETag, GCS generation)
    version_header = "etag"

    def get_versioned(self, name: str, limit: int | None = None) -> tuple[bytes, str | None]:
        """Object ``name`` (at most ``limit`` bytes read) and its version."""
        what = f"download {name}"
        resp = self._request(what, self._path(name), "GET", stream=True)
        if resp.status_code != 200:
            raise self._fail(what, resp, name)
        try:
            return read_bounded(resp, limit), resp.headers.get(self.version_header)
        finally:
            resp.close()

    def _head(self, what: str, name: str) -> Any:
        """The headers of object ``name``; raise the mapped error unless it exists."""
        resp = self._request(what, self._path(name), "HEAD")
        if resp.status_code != 200:
            raise self._fail(what, resp, name)
        resp.close()
        return resp.headers

    def read_range(
        self, name: str, start: int, length: int | None, chunk_size: int = 1 << 20
    ) -> Iterator[bytes]:
        if length == 0:
            self.stat(name)
            return
        headers: dict[str, str] = {}
        wanted = range_value(start, length)
        if wanted is not None:
            headers[self.range_header] = wanted
        what = f"download {name}"
        resp = self._request(what, self._path(name), "GET", None, headers, stream=True)
        if resp.status_code == 416:  # start at or past the end
            resp.close()
            return
        if resp.status_code not in (200, 206):
            raise self._fail(what, resp, name)
        try:
            # A server that ignores the range answers 200 with the whole object.
            skip = start if (resp.status_code == 200 and start > 0) else 0
            remaining = length if length is not None else -1
            for chunk in resp.iter_content(chunk_size):
                if skip:
                    if len(chunk) <= skip:
                        skip -= len(chunk)
                        continue
                    chunk, skip = chunk[skip:], 0
                if remaining >= 0:
                    chunk = chunk[:remaining]
                    remaining -= len(chunk)
                if chunk:
                    yield chunk
                if remaining == 0:
                    return
        except UploaderError:
            raise
        except Exception as exc:
            raise TransientError(
                f"{what}: the connection broke ({type(exc).__name__}: {redact(str(exc))[:200]})"
            ) from None
        finally:
            resp.close()

    def close(self) -> None:
        if self.identity is not None:
            self.identity.close()
        with self._lock:
            drivers, self._drivers = self._drivers, []
        for drv in drivers:
            try:
                drv.connection.connection.session.close()
            except Exception:  # noqa: S110 - closing is best effort
                pass
