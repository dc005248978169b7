"""``moto_server`` answering one request at a time: ``python harness/servers/moto_serial.py
-H 127.0.0.1 -p PORT`` (the same options as ``moto_server``; run as a script, it needs
only moto).

moto checks an S3 conditional write (``If-Match``, ``If-None-Match: *``) and then
stores the object without a lock, and ``moto_server`` serves each connection in a
thread of its own: two conditional PUTs that arrive together can both pass the same
check, which AWS S3 decides atomically. Served one request at a time (HTTP/1.0, no
keep-alive), moto decides them in order, as S3 does. The fencing tests use this; other
tests use the ordinary threaded ``moto_server``.
"""

from __future__ import annotations

import sys
from typing import Any

from moto import server
from werkzeug.serving import run_simple

__all__ = ["main"]


def _serial(*args: Any, **kwargs: Any) -> None:
    kwargs["threaded"] = False
    run_simple(*args, **kwargs)


def main(argv: list[str] | None = None) -> None:
    server.run_simple = _serial  # type: ignore[attr-defined]
    server.main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
