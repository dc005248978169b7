"""The fault proxy itself: each fault kind does what it says, counts are exact, stop is clean.

The upstream is a real HTTP server (stdlib ``ThreadingHTTPServer``) on loopback;
the client is ``http.client`` over real sockets.
"""

from __future__ import annotations

import hashlib
import http.client
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from harness.faultproxy import FaultPlan, FaultProxy


class _Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    received: list[bytes] = []

    def log_message(self, *args: object) -> None:
        pass

    def _reply(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_PUT(self) -> None:
        n = int(self.headers.get("Content-Length", "0"))
        data = self.rfile.read(n)
        type(self).received.append(data)
        self._reply(hashlib.sha256(data).hexdigest().encode())

    def do_GET(self) -> None:
        self._reply(b"x" * 1000)

    def do_HEAD(self) -> None:
        self._reply(b"x" * 1000)


@pytest.fixture
def echo() -> Iterator[ThreadingHTTPServer]:
    _Echo.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    t.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        t.join(5)


def _put(
    port: int, body: bytes, timeout: float = 10.0, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(
            "PUT", "/obj", body=body, headers={"Content-Length": str(len(body)), **(headers or {})}
        )
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_clean_proxy_forwards_bytes_exactly(echo: ThreadingHTTPServer) -> None:
    body = bytes(range(256)) * 4096  # 1 MiB
    with FaultProxy(echo.server_address[:2]) as proxy:  # type: ignore[arg-type]
        # Several requests on one keep-alive connection.
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        for _ in range(3):
            conn.request("PUT", "/o", body=body)
            resp = conn.getresponse()
            assert resp.status == 200
            assert resp.read() == hashlib.sha256(body).hexdigest().encode()
        conn.request("GET", "/o")
        assert conn.getresponse().read() == b"x" * 1000
        conn.close()
        stats = proxy.stats()
    assert stats["requests"] == 4
    assert stats["faults"] == 0
    assert stats["connections"] == 1
    assert stats["bytes_up"] > 3 * len(body)
    assert _Echo.received == [body] * 3


def test_slowdown_is_answered_without_forwarding(echo: ThreadingHTTPServer) -> None:
    with FaultProxy(echo.server_address[:2], FaultPlan(slowdown_rate=1.0)) as proxy:  # type: ignore[arg-type]
        status, text = _put(proxy.port, b"payload" * 100)
        assert status == 503
        assert b"<Code>SlowDown</Code>" in text
        assert proxy.stats()["slowdown"] == 1
    assert _Echo.received == []


@pytest.mark.parametrize(("status", "code"), [(501, "NotImplemented"), (412, "PreconditionFailed")])
def test_conditional_writes_are_answered_and_the_rest_pass(
    echo: ThreadingHTTPServer, status: int, code: str
) -> None:
    plan = FaultPlan(conditional_status=status)
    with FaultProxy(echo.server_address[:2], plan) as proxy:  # type: ignore[arg-type]
        for header in ({"If-None-Match": "*"}, {"if-match": '"abc"'}):
            got, text = _put(proxy.port, b"cond", headers=header)
            assert got == status and f"<Code>{code}</Code>".encode() in text
        assert _put(proxy.port, b"plain")[0] == 200
        assert proxy.stats()["conditional"] == 2 and proxy.stats()["faults"] == 2
    assert _Echo.received == [b"plain"]
    with pytest.raises(ValueError, match="conditional_status"):
        FaultPlan(conditional_status=500)


def test_reset_cuts_the_body_with_a_tcp_reset(echo: ThreadingHTTPServer) -> None:
    body = b"z" * (512 << 10)
    plan = FaultPlan(reset_rate=1.0, reset_after=(1000, 2000))
    with FaultProxy(echo.server_address[:2], plan) as proxy:  # type: ignore[arg-type]
        with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
            _put(proxy.port, body)
        assert proxy.stats()["reset"] == 1
    # The server never got the whole body.
    assert all(len(r) < len(body) for r in _Echo.received)


def test_stall_delays_but_delivers(echo: ThreadingHTTPServer) -> None:
    body = b"s" * 100_000
    plan = FaultPlan(stall_rate=1.0, stall_seconds=0.6)
    with FaultProxy(echo.server_address[:2], plan) as proxy:  # type: ignore[arg-type]
        t0 = time.monotonic()
        status, digest = _put(proxy.port, body)
        took = time.monotonic() - t0
        assert proxy.stats()["stall"] == 1
    assert status == 200 and digest == hashlib.sha256(body).hexdigest().encode()
    assert took >= 0.55


def test_latency_delays_every_request_and_is_no_fault(echo: ThreadingHTTPServer) -> None:
    """Each request waits ``latency`` before it is forwarded (a distant store), keep-alive
    or not; nothing is counted as a fault."""
    with FaultProxy(echo.server_address[:2], FaultPlan(latency=0.2)) as proxy:  # type: ignore[arg-type]
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        t0 = time.monotonic()
        for _ in range(3):
            conn.request("GET", "/o")
            assert conn.getresponse().read() == b"x" * 1000
        took = time.monotonic() - t0
        conn.close()
        assert proxy.stats()["faults"] == 0 and proxy.stats()["requests"] == 3
    assert took >= 0.6
    with pytest.raises(ValueError, match="latency"):
        FaultPlan(latency=-1.0)


def test_rates_are_seeded_and_bounded(echo: ThreadingHTTPServer) -> None:
    plan = FaultPlan(slowdown_rate=0.3, stall_rate=0.2, stall_seconds=0.0, max_faults=6)

    def run(seed: int) -> list[int]:
        statuses = []
        with FaultProxy(echo.server_address[:2], plan, seed=seed) as proxy:  # type: ignore[arg-type]
            for _ in range(30):
                statuses.append(_put(proxy.port, b"abc")[0])
            stats = proxy.stats()
        assert stats["faults"] == 6  # max_faults bounds the total
        assert stats["slowdown"] == statuses.count(503)
        return statuses

    assert run(11) == run(11)


def test_upstream_down_is_seen_as_a_closed_connection() -> None:
    from harness.servers.net import free_port

    with FaultProxy(("127.0.0.1", free_port())) as proxy:
        with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
            _put(proxy.port, b"x")
        assert proxy.stats()["upstream_refused"] == 1


def test_only_loopback_upstreams() -> None:
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy(("10.0.0.1", 80))


def test_stop_joins_every_thread(echo: ThreadingHTTPServer) -> None:
    before = {t.name for t in threading.enumerate()}
    proxy = FaultProxy(echo.server_address[:2]).start()  # type: ignore[arg-type]
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    conn.request("GET", "/")
    conn.getresponse().read()
    proxy.stop()  # with the client connection still open
    conn.close()
    left = {t.name for t in threading.enumerate() if t.name.startswith("faultproxy")} - before
    assert left == set()
