"""Keep secrets out of every string we print, log or raise.

Credential values read from the environment are registered here when a store
is built; :func:`redact` replaces them (and any other registered value) with
``***``, and :class:`RedactingFilter` applies that to every log record.
"""

from __future__ import annotations

import logging
import threading

__all__ = ["register_secret", "redact", "RedactingFilter"]

_lock = threading.Lock()
_secrets: set[str] = set()


def register_secret(value: str | None) -> None:
    """Never show ``value`` again. Very short values are ignored (they would mask text)."""
    if value and len(value) >= 4:
        with _lock:
            _secrets.add(value)


def redact(text: str) -> str:
    with _lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for s in secrets:
        if s in text:
            text = text.replace(s, "***")
    return text


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if _secrets:
            msg = record.getMessage()
            clean = redact(msg)
            if record.exc_info and record.exc_info[1] is not None:
                exc_text = logging.Formatter().formatException(record.exc_info)
                record.exc_text = redact(exc_text)
            if clean != msg:
                record.msg, record.args = clean, None
        return True
