"""Retries with exponential backoff and full jitter, bounded by attempts and total time.

Transient failures (connection reset or refused, timeouts, HTTP 408/429/5xx,
S3 SlowDown) are retried; permanent ones (401/403, missing container or
object, bad configuration) fail at once. Every retry is logged with its reason.
"""

from __future__ import annotations

import errno
import logging
import random
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from uploader.errors import PermanentError, TransientError, UploaderError

__all__ = ["RetryPolicy", "backoff", "is_transient", "TRANSIENT_HTTP"]

log = logging.getLogger("uploader.transfer.retry")

T = TypeVar("T")

TRANSIENT_HTTP = frozenset({408, 429, 500, 502, 503, 504})
_TRANSIENT_ERRNO = frozenset(
    {
        errno.ECONNRESET,
        errno.ECONNREFUSED,
        errno.ECONNABORTED,
        errno.EPIPE,
        errno.ETIMEDOUT,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENETDOWN,
    }
)
_TRANSIENT_WORDS = (
    "SlowDown",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
    "Throttl",
    "timed out",
    "Connection reset",
    "Connection refused",
    "Connection aborted",
    "RemoteDisconnected",
    "IncompleteRead",
    "Broken pipe",
    "ServerBusy",
    "OperationTimedOut",
)


def is_transient(exc: BaseException) -> bool:
    """Whether retrying ``exc`` can help."""
    if isinstance(exc, TransientError):
        return True
    if isinstance(exc, (PermanentError,)):
        return False
    if isinstance(exc, UploaderError):
        return False
    if isinstance(exc, (socket.timeout, TimeoutError, ConnectionError, ssl.SSLEOFError)):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNO:
        return True
    status = getattr(exc, "status", None) or getattr(exc, "status_code", None)
    if isinstance(status, int):
        return status in TRANSIENT_HTTP
    name = type(exc).__name__
    text = f"{name}: {exc}"
    if any(w in text for w in _TRANSIENT_WORDS):
        return True
    # requests / urllib3 connection-level failures.
    return name in {
        "ConnectionError",
        "ChunkedEncodingError",
        "ProtocolError",
        "ReadTimeout",
        "ConnectTimeout",
        "RemoteDisconnected",
        "IncompleteRead",
    }


def backoff(base: float, attempt: int, cap: float) -> float:
    """The exponential backoff bound before retry number ``attempt`` (1-based):
    ``base`` doubled for each earlier attempt, at most ``cap``."""
    return min(cap, base * (2 ** (attempt - 1)))


@dataclass(frozen=True)
class RetryPolicy:
    """How long to keep trying.

    attempts: the most tries of one operation (first try included).
    total_seconds: give up once this much time has passed since the first try.
    base_delay / max_delay: backoff is ``uniform(0, min(max_delay, base_delay * 2**n))``.
    """

    attempts: int = 8
    total_seconds: float = 300.0
    base_delay: float = 0.25
    max_delay: float = 20.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("RetryPolicy.attempts must be at least 1")
        if self.total_seconds <= 0:
            raise ValueError("RetryPolicy.total_seconds must be positive")

    def delay(self, attempt: int) -> float:
        """Sleep before retry number ``attempt`` (1-based)."""
        return random.uniform(0, backoff(self.base_delay, attempt, self.max_delay))

    def call(
        self,
        fn: Callable[[], T],
        what: str,
        on_retry: Callable[[int, BaseException], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> T:
        """Run ``fn`` until it succeeds, fails permanently, or the bounds run out."""
        start = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn()
            except BaseException as exc:
                if not isinstance(exc, Exception) or not is_transient(exc):
                    raise
                elapsed = time.monotonic() - start
                pause = self.delay(attempt)
                if attempt >= self.attempts or elapsed + pause > self.total_seconds:
                    raise TransientError(
                        f"{what}: gave up after {attempt} attempts in {elapsed:.1f}s; "
                        f"last error: {_describe(exc)}. Check that the store is reachable, "
                        "or raise the retry bounds (--retries, --retry-seconds)."
                    ) from exc
                log.warning(
                    "retry %d/%d of %s in %.2fs: %s",
                    attempt,
                    self.attempts - 1,
                    what,
                    pause,
                    _describe(exc),
                )
                if on_retry is not None:
                    on_retry(attempt, exc)
                sleep(pause)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__
