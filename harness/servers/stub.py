"""The life of the small protocol stubs in harness/servers/ (credential endpoints, metadata
servers, token endpoints): a threaded HTTP(S) server on loopback, served from a daemon
thread, started and stopped once, usable as a context manager.

A stub sets ``self.server`` (a ``ThreadingHTTPServer`` on 127.0.0.1) and
``self._thread`` (serving it) in its ``__init__``; :class:`Served` does the rest::

    with MetadataServer(...) as mds:
        ...                      # mds.server answers on 127.0.0.1:mds.port
"""

from __future__ import annotations

import threading
from http.server import ThreadingHTTPServer
from typing import Self

__all__ = ["Served"]


class Served:
    """Start, stop and context management of a stub's loopback server."""

    server: ThreadingHTTPServer
    _thread: threading.Thread

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
