"""Exceptions raised by the uploader. Every message says what to do next.

Exit codes used by the command line (see ``uploader.cli``):

* ``ConfigError`` -> 2 (bad flags, config file, URI, missing environment variable)
* any other ``UploaderError`` -> 1 (an upload or verification failed)
"""

from __future__ import annotations

__all__ = [
    "UploaderError",
    "ConfigError",
    "TransientError",
    "PermanentError",
    "AuthError",
    "ContainerNotFoundError",
    "ObjectNotFoundError",
    "IntegrityError",
]


class UploaderError(Exception):
    """Base class of every error this package raises on purpose."""

    exit_code = 1


class ConfigError(UploaderError, ValueError):
    """The configuration is wrong; nothing was sent. Fix the named setting and retry."""

    exit_code = 2


class TransientError(UploaderError):
    """A failure that may go away by itself (network, throttling, 5xx). Retried."""


class PermanentError(UploaderError):
    """A failure that retrying will not fix (credentials, permissions, missing container)."""


class AuthError(PermanentError):
    """The store refused the credentials."""


class ContainerNotFoundError(PermanentError):
    """The container (bucket) does not exist."""


class ObjectNotFoundError(PermanentError, FileNotFoundError):
    """The object does not exist in the container."""


class IntegrityError(UploaderError):
    """Bytes do not match their recorded size or digest. Never load or keep such data."""
