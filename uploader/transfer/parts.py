"""The worker threads and part buffers one store shares among all its transfers.

A :class:`PartPool` holds ``concurrency`` worker threads (started on first
use) and as many buffer slots. The parts of every multipart upload and
parallel download of the store run on these threads, so at most
``concurrency`` such parts are in flight across the store however many files
move at once; each transfer queues at most ``2 x concurrency`` parts ahead, so
a huge file does not create thousands of futures up front. A single-request
upload, a streamed upload and a one-range download run in the caller's thread
instead. Upload parts (single-request ones too) are read into reusable
buffers, taken only with a slot, so upload memory stays at ``concurrency``
buffers of the largest part size in use.

Example::

    pool = PartPool(concurrency=4)
    pool.run(lambda i: print(i), range(10), threading.Event())
    pool.close()
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait

__all__ = ["PartPool"]


class PartPool:
    """``concurrency`` worker threads and buffer slots, shared by every transfer of a store."""

    def __init__(self, concurrency: int) -> None:
        self.concurrency = concurrency
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._buffers: queue.LifoQueue[bytearray] = queue.LifoQueue()
        self._buffer_slots = threading.Semaphore(concurrency)

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                # As many workers as slots: parts of every transfer of the store share them.
                self._pool = ThreadPoolExecutor(
                    max_workers=self.concurrency, thread_name_prefix="objstore"
                )
            return self._pool

    @contextlib.contextmanager
    def buffer(self, size: int) -> Iterator[bytearray]:
        """A buffer of at least ``size`` bytes, once one of the slots is free."""
        self._buffer_slots.acquire()
        try:
            try:
                buf = self._buffers.get_nowait()
            except queue.Empty:
                buf = bytearray(size)
            if len(buf) < size:
                buf = bytearray(size)
            yield buf
            self._buffers.put(buf)
        finally:
            self._buffer_slots.release()

    def run(self, fn: Callable[[int], None], items: Iterable[int], failed: threading.Event) -> None:
        """Run ``fn(i)`` for every item on the worker threads; the first error cancels the
        rest, sets ``failed`` (so parts already running can stop early) and is raised."""
        pool = self._executor()
        it = iter(items)
        pending: set[Future[None]] = set()
        try:
            while True:
                for i in it:
                    pending.add(pool.submit(fn, i))
                    if len(pending) >= 2 * self.concurrency:
                        break
                if not pending:
                    return
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for d in done:
                    exc = d.exception()
                    if exc is not None:
                        raise exc
        except BaseException:
            failed.set()
            for f in pending:
                f.cancel()
            wait(pending)
            raise

    def close(self) -> None:
        """Stop the worker threads (queued parts are cancelled, running ones finish)."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
