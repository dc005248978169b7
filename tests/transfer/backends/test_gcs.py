"""GCS cases that need the in-process fake below rather than fake-gcs-server.

The backend contract (round trips, metadata, ranges, listing, integrity, missing and
created buckets, a file changing during the streamed upload) runs against the real
emulator, fake-gcs-server, in test_contract.py (see harness/servers/gcs.py). That
emulator checks no request signature, lists every bucket in one page, and knows no
XML-API bucket HEAD/PUT. So these cases keep a FAKE: a tiny in-process HTTP server on
loopback that speaks the few XML-API calls the adapter makes (bucket HEAD/PUT, object
PUT/HEAD/GET with Range/DELETE, bucket listing with markers) and checks the HMAC
signature of every request independently of libcloud. With it: the streamed upload is
one PUT with a Content-Length (request details), listing follows markers across pages,
and a wrong secret is an AuthError that does not leak the secret. It does not prove
compatibility with Google's servers.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import sys
import threading
import time
from collections.abc import Iterator
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape

import pytest

from harness.data import file_digest, write_random
from uploader import (
    AuthError,
    ContainerNotFoundError,
    ObjectNotFoundError,
    ObjectStore,
    ObjectStoreHparams,
)
from uploader.transfer.store import DIGEST_META

MiB = 1 << 20
HMAC_ID = "GOOGTESTACCESSID0123456789"
HMAC_SECRET = "fake-gcs-hmac-secret-for-tests"
KEY_ENV = "CKPTUP_TEST_GCS_ID"
SECRET_ENV = "CKPTUP_TEST_GCS_SECRET"
NS = "http://doc.s3.amazonaws.com/2006-03-01"
PAGE = 3  # small pages, so listing pagination is exercised


class FakeGCS(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.buckets: dict[str, dict[str, tuple[bytes, dict[str, str], str]]] = {}
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str, dict[str, str]]] = []

    def handle_error(self, request: object, client_address: object) -> None:
        # A client that hangs up mid-request (the short-body test) is expected here;
        # anything else still surfaces as a failed request in the test itself.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


class _Handler(BaseHTTPRequestHandler):
    server: FakeGCS
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    # -- helpers -------------------------------------------------------------------------
    def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str) -> None:
        body = f"<?xml version='1.0'?><Error><Code>{code}</Code></Error>".encode()
        self._reply(status, body, {"Content-Type": "application/xml"})

    def _signed(self, path: str) -> bool:
        auth = self.headers.get("Authorization", "")
        if not auth.startswith(f"GOOG1 {HMAC_ID}:"):
            return False
        h = {k.lower(): v.strip() for k, v in self.headers.items()}
        vendor = "\n".join(f"{k}:{h[k]}" for k in sorted(h) if k.startswith("x-goog"))
        parts = [
            self.command,
            h.get("content-md5", ""),
            h.get("content-type", ""),
            h.get("date", ""),
        ]
        to_sign = "\n".join(parts) + ("\n" + vendor if vendor else "") + "\n" + path
        want = base64.b64encode(
            hmac.new(HMAC_SECRET.encode(), to_sign.encode(), hashlib.sha1).digest()
        ).decode()
        return hmac.compare_digest(auth.split(":", 1)[1], want)

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            raise AssertionError("uploads must carry a Content-Length, not chunked encoding")
        n = int(self.headers.get("Content-Length", 0))
        body = self.rfile.read(n) if n else b""
        self._short = len(body) != n  # the client gave up mid-body
        return body

    def _route(self) -> tuple[str, str | None, dict[str, list[str]]] | None:
        parts = urlsplit(self.path)
        self.server.requests.append((self.command, parts.path, dict(self.headers)))
        body = self._body() if self.command == "PUT" else b""
        self._put_body = body
        if not self._signed(parts.path):
            self._error(403, "SignatureDoesNotMatch")
            return None
        segs = parts.path.lstrip("/").split("/", 1)
        bucket = unquote(segs[0])
        name = unquote(segs[1]) if len(segs) > 1 and segs[1] else None
        return bucket, name, parse_qs(parts.query)

    # -- verbs ---------------------------------------------------------------------------
    def do_HEAD(self) -> None:
        self._get(head=True)

    def do_GET(self) -> None:
        self._get(head=False)

    def _get(self, head: bool) -> None:
        r = self._route()
        if r is None:
            return
        bucket, name, query = r
        with self.server.lock:
            objs = self.server.buckets.get(bucket)
            if objs is None:
                return self._error(404, "NoSuchBucket")
            if name is None:
                if head:
                    return self._reply(200)
                return self._list(objs, query)
            if name not in objs:
                return self._error(404, "NoSuchKey")
            data, meta, mtime = objs[name]
        headers = {
            "ETag": f'"{hashlib.md5(data).hexdigest()}"',
            "Last-Modified": mtime,
            "x-goog-stored-content-length": str(len(data)),
            **{f"x-goog-meta-{k}": v for k, v in meta.items()},
        }
        rng = self.headers.get("Range")
        if rng and not head:
            start_s, _, end_s = rng.removeprefix("bytes=").partition("-")
            start = int(start_s)
            end = min(int(end_s), len(data) - 1) if end_s else len(data) - 1
            if start >= len(data):
                return self._error(416, "InvalidRange")
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return self._reply(206, data[start : end + 1], headers)
        headers["Content-Length"] = str(len(data))
        self._reply(200, b"" if head else data, headers)

    def _list(self, objs: dict[str, tuple[bytes, dict[str, str], str]], query: dict) -> None:
        prefix = query.get("prefix", [""])[0]
        marker = query.get("marker", [""])[0]
        names = sorted(n for n in objs if n.startswith(prefix) and n > marker)
        page, truncated = names[:PAGE], len(names) > PAGE
        items = "".join(
            f"<Contents><Key>{escape(n)}</Key><Size>{len(objs[n][0])}</Size>"
            f"<ETag>&quot;{hashlib.md5(objs[n][0]).hexdigest()}&quot;</ETag>"
            "<LastModified>2026-01-02T03:04:05.000Z</LastModified></Contents>"
            for n in page
        )
        body = (
            f'<?xml version="1.0"?><ListBucketResult xmlns="{NS}"><Name>b</Name>'
            f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>{items}"
            "</ListBucketResult>"
        ).encode()
        self._reply(200, body, {"Content-Type": "application/xml"})

    def do_PUT(self) -> None:
        r = self._route()
        if r is None:
            return
        bucket, name, _ = r
        body = self._put_body
        if self._short:
            self.close_connection = True
            return self._error(400, "IncompleteBody")
        with self.server.lock:
            if name is None:
                if bucket in self.server.buckets:
                    return self._error(409, "BucketAlreadyOwnedByYou")
                self.server.buckets[bucket] = {}
                return self._reply(200)
            objs = self.server.buckets.get(bucket)
            if objs is None:
                return self._error(404, "NoSuchBucket")
            md5 = self.headers.get("x-goog-hash", "").removeprefix("md5=")
            if md5 and base64.b64decode(md5) != hashlib.md5(body).digest():
                return self._error(400, "BadDigest")
            meta = {
                k.lower()[len("x-goog-meta-") :]: v
                for k, v in self.headers.items()
                if k.lower().startswith("x-goog-meta-")
            }
            objs[name] = (body, meta, formatdate(usegmt=True))
        self._reply(200, b"", {"ETag": f'"{hashlib.md5(body).hexdigest()}"'})

    def do_DELETE(self) -> None:
        r = self._route()
        if r is None:
            return
        bucket, name, _ = r
        with self.server.lock:
            objs = self.server.buckets.get(bucket)
            if objs is None:
                return self._error(404, "NoSuchBucket")
            if name not in objs:
                return self._error(404, "NoSuchKey")
            del objs[name]
        self._reply(204)


@pytest.fixture
def fake_gcs(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeGCS]:
    monkeypatch.setenv(KEY_ENV, HMAC_ID)
    monkeypatch.setenv(SECRET_ENV, HMAC_SECRET)
    server = FakeGCS()
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    t.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        t.join(timeout=10)


def _hparams(server: FakeGCS, bucket: str = "ckpts") -> ObjectStoreHparams:
    return ObjectStoreHparams(
        provider="google_storage",
        container=bucket,
        key_environ=KEY_ENV,
        secret_environ=SECRET_ENV,
        host="127.0.0.1",
        port=server.server_address[1],
    )


@pytest.fixture
def gcs_store(fake_gcs: FakeGCS) -> Iterator[ObjectStore]:
    with _hparams(fake_gcs).initialize_object(part_size=MiB, create_container=True) as store:
        yield store


def test_streamed_upload_is_one_put_with_length(
    fake_gcs: FakeGCS, gcs_store: ObjectStore, tmp_path: Path
) -> None:
    src = write_random(tmp_path / "a.bin", 5 * MiB + 1)
    fake_gcs.requests.clear()
    result = gcs_store.upload_file(src, "run/a.bin", metadata={"run": "r1"})
    puts = [r for r in fake_gcs.requests if r[0] == "PUT" and r[1] == "/ckpts/run/a.bin"]
    assert len(puts) == 1
    assert puts[0][2]["Content-Length"] == str(5 * MiB + 1)
    assert result.digest == file_digest(src, MiB)
    st = gcs_store.stat("run/a.bin")
    assert st.digest == result.digest and st.metadata == {"run": "r1"}
    # Last-Modified is an HTTP date ("..., 24 Nov 2026 01:00:00 GMT"): it must parse.
    assert st.mtime is not None and abs(st.mtime - time.time()) < 3600
    small = write_random(tmp_path / "s.bin", 10)
    gcs_store.upload_file(small, "run/s.bin")
    assert gcs_store.backend.stat("run/s.bin").metadata[DIGEST_META].startswith("crc64nvme:")


def test_list_paginated_delete_and_ranges(gcs_store: ObjectStore) -> None:
    names = [f"p/o{i:02d}" for i in range(8)]
    for n in names:
        gcs_store.put_bytes(n, n.encode() * 3)
    gcs_store.put_bytes("q/x", b"x")
    assert [i.name for i in gcs_store.list("p/")] == names
    assert gcs_store.list("p/o0")[0].size == 15
    assert b"".join(gcs_store.backend.read_range("p/o01", 2, 5)) == b"o01p/"
    assert b"".join(gcs_store.backend.read_range("p/o01", 10, None)) == b"p/o01"
    assert gcs_store.delete("q/x") is True
    assert gcs_store.delete("q/x") is False
    with pytest.raises(ObjectNotFoundError):
        gcs_store.stat("q/x")
    with pytest.raises(ObjectNotFoundError):
        gcs_store.get_bytes("q/x")


def test_missing_bucket_and_wrong_secret(
    fake_gcs: FakeGCS, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ContainerNotFoundError, match="gcloud storage buckets create"):
        _hparams(fake_gcs, "nobucket").initialize_object()
    monkeypatch.setenv(SECRET_ENV, "a-wrong-secret-value")
    with pytest.raises(AuthError) as info:
        _hparams(fake_gcs).initialize_object(create_container=True)
    assert "a-wrong-secret-value" not in str(info.value)
    assert SECRET_ENV in str(info.value)
