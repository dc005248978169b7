"""Bandwidth limiting: one token bucket shared by every upload thread (``--bwlimit``).

Example::

    bucket = TokenBucket(50 << 20)  # 50 MiB/s for all uploads together
    bucket.consume(len(chunk))      # blocks the calling thread until allowed
"""

from __future__ import annotations

import threading
import time

__all__ = ["TokenBucket"]


class TokenBucket:
    """Limits bytes per second across threads; ``consume`` blocks until allowed."""

    def __init__(self, rate: int, burst: int | None = None) -> None:
        self.rate = float(rate)
        self.capacity = float(burst or max(rate, 1))
        self._tokens = self.capacity
        self._stamp = time.monotonic()
        self._lock = threading.Lock()

    def consume(self, n: int) -> None:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= n
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            time.sleep(wait)
