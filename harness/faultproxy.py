"""A fault-injecting HTTP/1.1 TCP proxy for loopback tests.

The proxy listens on a free loopback port and forwards each client connection
to one upstream server (also on loopback). It understands just enough HTTP/1.1
to find request boundaries (``Content-Length`` or chunked bodies), so it can
decide a fault for every request, with a seeded RNG:

* ``reset``: forward the head and part of the body, then close both sockets
  with a TCP RST (``SO_LINGER`` 0): the client sees a connection reset mid-body,
  the server a torn request.
* ``stall``: pause the request for ``stall_seconds`` part-way through its body
  (before the head for requests without one), then go on.
* ``slowdown``: answer ``HTTP/1.1 503 Slow Down`` with an S3
  ``<Error><Code>SlowDown</Code>`` body without forwarding the request, and
  close the connection.
* ``conditional``: answer every request that carries ``If-Match`` or
  ``If-None-Match`` with one status (``conditional_status``: 412
  ``PreconditionFailed``, a store where another writer always wins; 501
  ``NotImplemented``, a store without conditional writes) and its S3 error body,
  unforwarded, and close the connection; every other request passes through.
* ``expired_token``: answer the first N requests (of ``methods``, if given) with
  ``400 ExpiredToken``, unforwarded: credentials that went stale mid-run.
* ``deny_unencrypted``: answer every PUT and every CreateMultipartUpload (POST
  ``?uploads``) without ``x-amz-server-side-encryption`` with ``403 AccessDenied``, as a
  bucket policy that demands encryption does (UploadPart carries no such header and
  passes).
* ``unauthorized``: answer the first N requests (of ``methods``, if given) with ``401``,
  unforwarded: a bearer token the store no longer accepts.
* ``bad_digest``: answer the first N uploads of bytes (PutObject, UploadPart: a PUT
  with a body) with ``400 BadDigest``, unforwarded, as S3 does when the bytes that
  arrived do not match their ``x-amz-checksum-*`` header.
* ``refuse_checksums``: answer every request carrying an ``x-amz-checksum-*`` or
  ``x-amz-sdk-checksum-algorithm`` header with ``400 InvalidArgument``, unforwarded, as
  an S3-compatible server that does not implement them does.
* ``flip_byte``: forward the first N uploads of bytes (as above) with one body byte
  inverted, the middle one: damage in transit that TLS would have stopped, for a
  server that does not check the checksum header.

The access key of every signed request (from its ``Authorization`` header) is recorded
in ``access_keys``, in order, every bearer token in ``bearer_tokens``, and every
request's headers in ``headers``.

Responses are relayed unchanged. Every request is recorded (``requests``), with the
body bytes forwarded for each method and path (``body_bytes``, cut bodies included). Every
injected fault is counted; ``stats()`` returns a snapshot. ``stop()`` closes every
socket and joins every thread.

Example::

    with FaultProxy(("127.0.0.1", server_port), FaultPlan(reset_rate=0.1), seed=7) as proxy:
        client_endpoint = proxy.url          # http://127.0.0.1:<port>
        ...
        print(proxy.stats())                 # {'requests': 120, 'reset': 11, ...}
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import random
import socket
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import unquote

__all__ = ["FaultPlan", "FaultProxy", "S3_ERRORS", "SLOWDOWN_BODY"]

log = logging.getLogger(__name__)

_HEAD_LIMIT = 64 << 10
_CHUNK = 64 << 10

#: The answers the proxy makes up: status -> (reason phrase, S3 error code, message).
S3_ERRORS = {
    400: ("Bad Request", "ExpiredToken", "The provided token has expired."),
    401: ("Unauthorized", "AuthenticationRequired", "Invalid Credentials"),
    403: ("Forbidden", "AccessDenied", "Access Denied"),
    412: (
        "Precondition Failed",
        "PreconditionFailed",
        "At least one of the pre-conditions you specified did not hold",
    ),
    501: (
        "Not Implemented",
        "NotImplemented",
        "A header you provided implies functionality that is not implemented",
    ),
    503: ("Slow Down", "SlowDown", "Please reduce your request rate."),
}


#: The 400 answer of ``refuse_checksums``.
CHECKSUMS_REFUSED = (
    "Bad Request",
    "InvalidArgument",
    "x-amz-checksum-crc64nvme is not supported by this server.",
)
#: The 400 answer of ``bad_digest`` (S3_ERRORS' 400 is ExpiredToken).
BAD_DIGEST = (
    "Bad Request",
    "BadDigest",
    "The CRC64NVME you specified did not match the calculated checksum.",
)


def _error_body(status: int, error: tuple[str, str, str] | None = None) -> bytes:
    _, code, message = error or S3_ERRORS[status]
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        "<RequestId>faultproxy</RequestId></Error>"
    ).encode()


SLOWDOWN_BODY = _error_body(503)


@dataclass(frozen=True)
class FaultPlan:
    """Per-request fault probabilities.

    reset_rate: chance that a request with a body is cut by a TCP reset after
        a random number of body bytes in ``reset_after`` (clipped to the body).
    stall_rate: chance that a request pauses ``stall_seconds`` part-way through.
    slowdown_rate: chance that a request is answered ``503 SlowDown`` unforwarded.
    conditional_status: answer every request carrying ``If-Match`` / ``If-None-Match``
        with this status (one of :data:`S3_ERRORS`) unforwarded (None: forward them).
    latency: seconds every request waits before it is forwarded (a network whose first
        byte takes that long; not a fault, so not counted as one).
    max_faults: stop injecting after this many faults in total (None: no limit).
    methods: only requests with these methods are faulted (None: every method).
    """

    reset_rate: float = 0.0
    reset_after: tuple[int, int] = (1, 256 << 10)
    stall_rate: float = 0.0
    stall_seconds: float = 1.0
    slowdown_rate: float = 0.0
    max_faults: int | None = None
    methods: frozenset[str] | None = None
    conditional_status: int | None = None
    latency: float = 0.0
    expired_token: int = 0
    deny_unencrypted: bool = False
    unauthorized: int = 0
    bad_digest: int = 0
    flip_byte: int = 0
    refuse_checksums: bool = False

    def __post_init__(self) -> None:
        if self.conditional_status is not None and self.conditional_status not in S3_ERRORS:
            raise ValueError(
                f"conditional_status must be one of {sorted(S3_ERRORS)}, "
                f"got {self.conditional_status}"
            )
        for name in ("reset_rate", "stall_rate", "slowdown_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within 0..1, got {value}")
        if self.reset_rate + self.stall_rate + self.slowdown_rate > 1.0:
            raise ValueError("the fault rates add up to more than 1")
        if self.stall_seconds < 0 or self.reset_after[0] < 0 or self.latency < 0:
            raise ValueError("stall_seconds, reset_after and latency must not be negative")


@dataclass
class _Stats:
    connections: int = 0
    requests: int = 0
    reset: int = 0
    stall: int = 0
    slowdown: int = 0
    conditional: int = 0
    expired_token: int = 0
    unauthorized: int = 0
    denied: int = 0
    bad_digest: int = 0
    flipped: int = 0
    checksums_refused: int = 0
    upstream_refused: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    methods: dict[str, int] = field(default_factory=dict)


class _Closed(Exception):
    """The client closed its side (a normal end between requests)."""


class _Reader:
    """Buffered reads from a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def _fill(self) -> None:
        data = self.sock.recv(_CHUNK)
        if not data:
            raise _Closed()
        self.buf += data

    def read_until(self, marker: bytes, limit: int = _HEAD_LIMIT) -> bytes:
        while True:
            i = self.buf.find(marker)
            if i >= 0:
                out = bytes(self.buf[: i + len(marker)])
                del self.buf[: i + len(marker)]
                return out
            if len(self.buf) > limit:
                raise ValueError("request head too long")
            self._fill()

    def read_some(self, n: int) -> bytes:
        if not self.buf:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[: len(out)]
        return out


def _require_loopback(host: str) -> None:
    h = host.strip("[]")
    if h == "localhost":
        return
    if not ipaddress.ip_address(h).is_loopback:
        raise ValueError(f"the fault proxy only talks to loopback addresses, not {host!r}")


def _rst_close(sock: socket.socket | None) -> None:
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        # Wakes a thread blocked in recv() on it (close alone does not); sends nothing.
        sock.shutdown(socket.SHUT_RD)
    with contextlib.suppress(OSError):
        sock.close()  # with SO_LINGER 0: a TCP RST


def _quiet_close(sock: socket.socket | None) -> None:
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


class FaultProxy:
    """A threaded proxy from ``127.0.0.1:<free port>`` to ``upstream`` with injected faults.

    Args:
        upstream: (host, port) of the real server; must be a loopback address.
        plan: the fault probabilities (change later with ``set_plan``).
        seed: seeds the RNG that decides every fault.
        host: the loopback address to listen on.

    Example::

        proxy = FaultProxy(("127.0.0.1", 9000), FaultPlan(slowdown_rate=0.2), seed=1).start()
        try:
            ...  # point the client at proxy.url
        finally:
            proxy.stop()
    """

    def __init__(
        self,
        upstream: tuple[str, int],
        plan: FaultPlan | None = None,
        seed: int = 0,
        host: str = "127.0.0.1",
    ) -> None:
        _require_loopback(upstream[0])
        _require_loopback(host)
        self._upstream = upstream
        self._plan = plan or FaultPlan()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._stats = _Stats()
        self._faults = 0
        self._stop = threading.Event()
        self._threads: set[threading.Thread] = set()
        self._socks: set[socket.socket] = set()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, 0))
        self._listener.listen(128)
        self._listener.settimeout(0.2)
        self.host = host
        self.port: int = self._listener.getsockname()[1]
        self._accept_thread: threading.Thread | None = None
        #: Every request seen: (time.time(), method, unquoted path without the query).
        self.requests: list[tuple[float, str, str]] = []
        #: Request body bytes forwarded upstream, by (method, unquoted path) (cut bodies
        #: included).
        self.body_bytes: dict[tuple[str, str], int] = {}
        self._path = threading.local()
        #: The access key of every signed request, in order (none for unsigned ones).
        self.access_keys: list[str] = []
        self.bearer_tokens: list[str] = []
        #: (method, path, lower-cased header name -> value) of every request, in order.
        self.headers: list[tuple[str, str, dict[str, str]]] = []

    # -- lifecycle ---------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> FaultProxy:
        t = threading.Thread(target=self._accept_loop, name="faultproxy-accept", daemon=True)
        self._accept_thread = t
        t.start()
        return self

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, timeout: float = 10.0) -> None:
        """Close the listener and every open connection; join every thread."""
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            _quiet_close(s)
        deadline = time.monotonic() + timeout
        if self._accept_thread is not None:
            self._accept_thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in threads if t.is_alive()]
        if alive:
            raise RuntimeError(f"fault proxy threads did not stop: {alive}")

    # -- configuration -----------------------------------------------------------------
    def set_plan(self, plan: FaultPlan) -> None:
        with self._lock:
            self._plan = plan

    def set_upstream(self, upstream: tuple[str, int]) -> None:
        """Send new connections to another upstream (e.g. a restarted server)."""
        _require_loopback(upstream[0])
        with self._lock:
            self._upstream = upstream

    def stats(self) -> dict[str, Any]:
        """A snapshot of the counters (connections, requests, each fault kind, bytes)."""
        with self._lock:
            s = replace(self._stats, methods=dict(self._stats.methods))
        out = dict(s.__dict__)
        out["faults"] = s.reset + s.stall + s.slowdown + s.conditional
        return out

    # -- internals ---------------------------------------------------------------------
    def _spawn(self, target: Any, *args: Any, name: str) -> threading.Thread:
        def run() -> None:
            try:
                target(*args)
            finally:
                with self._lock:
                    self._threads.discard(threading.current_thread())

        t = threading.Thread(target=run, name=name, daemon=True)
        with self._lock:
            self._threads.add(t)
        t.start()
        return t

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.add(sock)

    def _untrack(self, *socks: socket.socket | None) -> None:
        with self._lock:
            for s in socks:
                if s is not None:
                    self._socks.discard(s)

    def _accept_loop(self) -> None:
        n = 0
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            n += 1
            client.settimeout(None)
            self._track(client)
            with self._lock:
                self._stats.connections += 1
            self._spawn(self._serve, client, name=f"faultproxy-conn-{n}")

    def _decide(self, method: str, has_body: bool) -> tuple[str | None, float]:
        """Pick a fault for one request: (kind or None, a fraction of the body)."""
        with self._lock:
            plan = self._plan
            r = self._rng.random()
            where = self._rng.random()
            if plan.max_faults is not None and self._faults >= plan.max_faults:
                return None, where
            if plan.methods is not None and method not in plan.methods:
                return None, where
            kind: str | None = None
            if has_body and r < plan.reset_rate:
                kind = "reset"
            elif plan.reset_rate <= r < plan.reset_rate + plan.stall_rate:
                kind = "stall"
            elif (
                plan.reset_rate + plan.stall_rate
                <= r
                < plan.reset_rate + plan.stall_rate + plan.slowdown_rate
            ):
                kind = "slowdown"
            if kind is not None:
                self._faults += 1
                setattr(self._stats, kind, getattr(self._stats, kind) + 1)
            return kind, where

    def _answer_conditional(self) -> int | None:
        """The status to answer a conditional request with (None: forward it)."""
        with self._lock:
            status = self._plan.conditional_status
            if status is not None:
                self._stats.conditional += 1
            return status

    def _refuses_checksums(self, head: bytes) -> bool:
        lower = head.lower()
        if not self._plan.refuse_checksums or not (
            b"\r\nx-amz-checksum-" in lower or b"\r\nx-amz-sdk-checksum-" in lower
        ):
            return False
        with self._lock:
            self._stats.checksums_refused += 1
        return True

    def _take(self, fault: str) -> bool:
        """Whether this request gets the counted fault ``fault`` (``bad_digest``,
        ``flip_byte``): True while the plan's count for it lasts."""
        with self._lock:
            left = getattr(self._plan, fault)
            if not left:
                return False
            self._plan = replace(self._plan, **{fault: left - 1})
            stat = "flipped" if fault == "flip_byte" else fault
            setattr(self._stats, stat, getattr(self._stats, stat) + 1)
            return True

    def _answer_identity(self, method: str, target: str, head: bytes) -> int | None:
        """400 ExpiredToken while ``expired_token`` lasts; 403 for an unencrypted upload
        under ``deny_unencrypted``; None to forward."""
        with self._lock:
            plan = self._plan
            if plan.expired_token and (plan.methods is None or method in plan.methods):
                self._plan = replace(plan, expired_token=plan.expired_token - 1)
                self._stats.expired_token += 1
                return 400
            if plan.unauthorized and (plan.methods is None or method in plan.methods):
                self._plan = replace(plan, unauthorized=plan.unauthorized - 1)
                self._stats.unauthorized += 1
                return 401
            if plan.deny_unencrypted:
                query = target.split("?", 1)[1] if "?" in target else ""
                creates = (method == "PUT" and "uploadId=" not in query) or (
                    method == "POST" and query.startswith("uploads")
                )
                if creates and b"\r\nx-amz-server-side-encryption:" not in head.lower():
                    self._stats.denied += 1
                    return 403
        return None

    def _connect_upstream(self) -> socket.socket | None:
        with self._lock:
            upstream = self._upstream
        try:
            up = socket.create_connection(upstream, timeout=5.0)
        except OSError:
            with self._lock:
                self._stats.upstream_refused += 1
            return None
        up.settimeout(None)
        self._track(up)
        return up

    def _serve(self, client: socket.socket) -> None:
        up: socket.socket | None = None
        pipe: threading.Thread | None = None
        reader = _Reader(client)
        try:
            while not self._stop.is_set():
                try:
                    head = reader.read_until(b"\r\n\r\n")
                except _Closed:
                    return
                method, body_len, chunked, expect, conditional = _parse_head(head)
                raw_target = head.split(b" ", 2)[1].decode("latin-1")
                target = unquote(raw_target.split("?", 1)[0])
                key = _access_key(head)
                bearer = _bearer_token(head)
                with self._lock:
                    self.requests.append((time.time(), method, target))
                    self.headers.append((method, target, _header_map(head)))
                    if key:
                        self.access_keys.append(key)
                    if bearer:
                        self.bearer_tokens.append(bearer)
                    self._stats.requests += 1
                    self._stats.methods[method] = self._stats.methods.get(method, 0) + 1
                self._path.value = (method, target)
                has_body = chunked or body_len > 0
                kind, where = self._decide(method, has_body)
                answer = self._answer_conditional() if conditional else None
                if answer is None:
                    answer = self._answer_identity(method, raw_target, head)
                uploads = method == "PUT" and has_body
                if answer is None and self._refuses_checksums(head):
                    if not expect:
                        _drain_body(reader, body_len, chunked)
                    _send_error(client, method, 400, CHECKSUMS_REFUSED)
                    return
                if answer is None and uploads and self._take("bad_digest"):
                    if not expect:
                        _drain_body(reader, body_len, chunked)
                    _send_error(client, method, 400, BAD_DIGEST)
                    return
                if answer is not None or kind == "slowdown":
                    if not expect:
                        _drain_body(reader, body_len, chunked)
                    _send_error(client, method, answer or 503)
                    return
                flip_at = (
                    body_len // 2 if uploads and not chunked and self._take("flip_byte") else None
                )
                if up is None:
                    up = self._connect_upstream()
                    if up is None:
                        _rst_close(client)
                        return
                    pipe = self._spawn(self._pipe, up, client, name="faultproxy-pipe")
                if kind == "stall" and not has_body:
                    self._sleep(self._plan.stall_seconds)
                if self._plan.latency:
                    self._sleep(self._plan.latency)
                up.sendall(head)
                self._count_up(len(head))
                stop_at: int | None = None
                if kind == "reset":
                    lo, hi = self._plan.reset_after
                    limit = body_len if not chunked else hi
                    stop_at = max(0, min(limit - 1, lo + int(where * max(0, hi - lo))))
                stall_at = int(where * body_len) if kind == "stall" and has_body else None
                if chunked:
                    ok = self._relay_chunked(reader, up, stop_at, stall_at)
                else:
                    ok = self._relay_body(reader, up, body_len, stop_at, stall_at, flip_at)
                if not ok:
                    log.debug("reset %s request mid-body", method)
                    _rst_close(client)
                    _rst_close(up)
                    return
        except (OSError, ValueError, _Closed) as exc:
            log.debug("connection ended: %s", exc)
        finally:
            _quiet_close(client)
            _quiet_close(up)
            self._untrack(client, up)
            if pipe is not None and pipe is not threading.current_thread():
                pipe.join(5.0)

    def _count_up(self, n: int, body: bool = False) -> None:
        with self._lock:
            self._stats.bytes_up += n
            if body:
                key = getattr(self._path, "value", ("", ""))
                self.body_bytes[key] = self.body_bytes.get(key, 0) + n

    def _sleep(self, seconds: float) -> None:
        self._stop.wait(seconds)

    def _relay_body(
        self,
        reader: _Reader,
        up: socket.socket,
        length: int,
        stop_at: int | None,
        stall_at: int | None,
        flip_at: int | None = None,
    ) -> bool:
        """Forward ``length`` body bytes (the one at ``flip_at`` inverted); False when
        cut at ``stop_at`` (reset)."""
        sent = 0
        while sent < length:
            want = length - sent
            if flip_at is not None and flip_at >= sent:
                data = reader.read_some(min(flip_at - sent + 1, _CHUNK))
                if sent + len(data) > flip_at:
                    damaged = bytearray(data)
                    damaged[flip_at - sent] ^= 0xFF
                    data, flip_at = bytes(damaged), None
                up.sendall(data)
                self._count_up(len(data), body=True)
                sent += len(data)
                continue
            for mark in (stop_at, stall_at):
                if mark is not None and mark > sent:
                    want = min(want, mark - sent)
            if stop_at is not None and sent >= stop_at:
                return False
            if stall_at is not None and sent >= stall_at:
                self._sleep(self._plan.stall_seconds)
                stall_at = None
            data = reader.read_some(min(want, _CHUNK))
            up.sendall(data)
            self._count_up(len(data), body=True)
            sent += len(data)
        return stop_at is None or stop_at >= length

    def _relay_chunked(
        self, reader: _Reader, up: socket.socket, stop_at: int | None, stall_at: int | None
    ) -> bool:
        sent = 0
        while True:
            line = reader.read_until(b"\r\n", 4096)
            size = int(line.split(b";")[0].strip() or b"0", 16)
            up.sendall(line)
            if size == 0:
                while True:  # trailers, then the empty line
                    trailer = reader.read_until(b"\r\n", 8192)
                    up.sendall(trailer)
                    if trailer == b"\r\n":
                        return True
            if stall_at is not None:
                self._sleep(self._plan.stall_seconds)
                stall_at = None
            if not self._relay_body(reader, up, size, None, None):
                return False
            tail = reader.read_until(b"\r\n", 16)
            up.sendall(tail)
            sent += size
            if stop_at is not None and sent >= stop_at:
                return False

    def _pipe(self, up: socket.socket, client: socket.socket) -> None:
        try:
            while True:
                data = up.recv(_CHUNK)
                if not data:
                    break
                client.sendall(data)
                with self._lock:
                    self._stats.bytes_down += len(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_WR)


def _parse_head(head: bytes) -> tuple[str, int, bool, bool, bool]:
    """(method, content length, chunked, expects 100-continue, carries If-Match or
    If-None-Match) of a request head."""
    lines = head.decode("latin-1").split("\r\n")
    method = lines[0].split(" ", 1)[0].upper()
    length = 0
    chunked = expect = conditional = False
    for line in lines[1:]:
        if ":" not in line:
            continue
        k, v = line.split(":", 1)
        k = k.strip().lower()
        v = v.strip()
        if k == "content-length":
            length = int(v)
        elif k == "transfer-encoding" and "chunked" in v.lower():
            chunked = True
        elif k == "expect" and v.lower() == "100-continue":
            expect = True
        elif k in ("if-match", "if-none-match"):
            conditional = True
    return method, length, chunked, expect, conditional


def _access_key(head: bytes) -> str | None:
    """The access key a request is signed with (SigV4 ``Credential=KEY/...``)."""
    marker = b"Credential="
    at = head.find(marker)
    if at < 0:
        return None
    end = head.find(b"/", at)
    return head[at + len(marker) : end].decode("latin-1") if end > at else None


def _header_map(head: bytes) -> dict[str, str]:
    """A request head's headers, names lower-cased."""
    out: dict[str, str] = {}
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            out[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    return out


def _bearer_token(head: bytes) -> str | None:
    """The bearer token a request carries (``Authorization: Bearer TOKEN``)."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            return token.decode("latin-1") if scheme.lower() == b"bearer" else None
    return None


def _drain_body(reader: _Reader, length: int, chunked: bool) -> None:
    if chunked:
        while True:
            size = int(reader.read_until(b"\r\n", 4096).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while reader.read_until(b"\r\n", 8192) != b"\r\n":
                    pass
                return
            left = size + 2
            while left > 0:
                left -= len(reader.read_some(left))
    left = length
    while left > 0:
        left -= len(reader.read_some(min(left, _CHUNK)))


def _send_error(
    client: socket.socket, method: str, status: int, error: tuple[str, str, str] | None = None
) -> None:
    """Answer with ``status`` and its S3 error body (see :data:`S3_ERRORS`; ``error``:
    another reason, code and message), then close."""
    full = _error_body(status, error)
    body = b"" if method == "HEAD" else full
    head = (
        f"HTTP/1.1 {status} {(error or S3_ERRORS[status])[0]}\r\n"
        "Content-Type: application/xml\r\n"
        f"Content-Length: {len(full)}\r\n"
        f"x-amz-request-id: {uuid.uuid4().hex[:16]}\r\n"
        + ("Retry-After: 0\r\n" if status == 503 else "")
        + "Connection: close\r\n\r\n"
    ).encode()
    with contextlib.suppress(OSError):
        client.sendall(head + body)
