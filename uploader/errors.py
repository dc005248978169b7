"""Exceptions raised by the uploader, and the process exit codes. Every message says what
to do next.

:class:`ExitCode` is the one owner of what each exit status means: the command line's
``--help`` text, the daemon's return value and the training side's error messages all
read it. ``ConfigError`` maps to :attr:`ExitCode.CONFIG`, any other ``UploaderError``
to :attr:`ExitCode.FAILED` (:meth:`ExitCode.of`), at start-up and while the daemon runs
alike: a certificate the store presents that stops being trusted mid-run exits 2 too, and
so do credentials the store refuses (:class:`AuthError`) once refreshing them did not help.
"""

from __future__ import annotations

import enum

__all__ = [
    "ExitCode",
    "UploaderError",
    "ConfigError",
    "TransientError",
    "PermanentError",
    "AuthError",
    "ContainerNotFoundError",
    "ObjectNotFoundError",
    "IntegrityError",
    "FileChangedError",
    "TLSError",
    "PreconditionFailedError",
]


class ExitCode(enum.IntEnum):
    """The exit status of ``ckpt-uploader`` (and of the worker process training starts)."""

    #: everything accepted (or asked for) is uploaded and verified
    OK = 0
    #: some upload, download or verification failed, or is not verified
    FAILED = 1
    #: configuration error: bad flag, URI or config file, missing environment variable,
    #: missing container, or another daemon holds the journal lock
    CONFIG = 2
    #: drain timeout hit with work left (resumed from the journal at the next start)
    TIMEOUT = 3
    #: a second SIGINT: immediate exit, journal intact
    SIGINT = 130
    #: a second SIGTERM: immediate exit, journal intact
    SIGTERM = 143

    @property
    def meaning(self) -> str:
        """What this exit status says about the uploads, in words."""
        return _MEANINGS[self]

    @classmethod
    def describe(cls, code: int) -> str:
        """The meaning of ``code``, or "unexpected exit" for a status not listed here."""
        try:
            return cls(code).meaning
        except ValueError:
            return "unexpected exit"

    @classmethod
    def of(cls, error: BaseException) -> ExitCode:
        """The exit status ``error`` calls for: its ``exit_code`` when it is an
        :class:`UploaderError` (CONFIG for a :class:`ConfigError`), FAILED for any other."""
        if isinstance(error, UploaderError):
            return error.exit_code
        return cls.FAILED

    @classmethod
    def help_text(cls) -> str:
        """The "exit codes:" block of every command's ``--help``."""
        rows = [f"  {int(c):<4} {_HELP.get(c, c.meaning)}" for c in cls]
        return "exit codes:\n" + "\n".join(rows) + "\n"


_MEANINGS = {
    ExitCode.OK: "all checkpoints uploaded and verified",
    ExitCode.FAILED: "an upload failed or could not be verified",
    ExitCode.CONFIG: "its configuration is wrong (flags, store, credentials)",
    ExitCode.TIMEOUT: "the drain timeout expired before every checkpoint was uploaded",
    ExitCode.SIGINT: "it was interrupted a second time while draining",
    ExitCode.SIGTERM: "it was terminated a second time while draining",
}

_HELP = {
    ExitCode.OK: "everything accepted (or asked for) is uploaded and verified",
    ExitCode.FAILED: "some upload, download or verification failed, or is not verified",
    ExitCode.CONFIG: "configuration error: bad flag, URI or config file, missing environment\n"
    "       variable, missing container, another daemon holds the journal lock, or the\n"
    "       store's TLS certificate is not trusted, or the store refuses the credentials\n"
    "       (at start or while running; expired ones are refreshed and retried once first)",
    ExitCode.TIMEOUT: "drain timeout hit with work left (resumed from the journal next start)",
    ExitCode.SIGINT: "second SIGINT: immediate exit, journal intact",
    ExitCode.SIGTERM: "second SIGTERM: immediate exit, journal intact",
}


class UploaderError(Exception):
    """Base class of every error this package raises on purpose."""

    exit_code = ExitCode.FAILED


class ConfigError(UploaderError, ValueError):
    """The configuration is wrong; nothing was sent. Fix the named setting and retry."""

    exit_code = ExitCode.CONFIG


class TransientError(UploaderError):
    """A failure that may go away by itself (network, throttling, 5xx). Retried."""


class PermanentError(UploaderError):
    """A failure that retrying will not fix (credentials, permissions, missing container)."""


class AuthError(PermanentError):
    """The store refused the credentials (after they were found again once, for
    credentials that expire). A configuration problem: exits with ExitCode.CONFIG,
    at start or while running."""

    exit_code = ExitCode.CONFIG


class ContainerNotFoundError(PermanentError):
    """The container (bucket) does not exist."""


class ObjectNotFoundError(PermanentError, FileNotFoundError):
    """The object does not exist in the container."""


class IntegrityError(UploaderError):
    """Bytes do not match their recorded size or digest. Never load or keep such data."""


class FileChangedError(IntegrityError):
    """A local file changed while it was uploaded: nothing was committed; the new version
    is to be uploaded once complete."""


class TLSError(ConfigError, PermanentError):
    """The store's endpoint failed the TLS check (an untrusted, expired or misnamed
    certificate, or no TLS at all). Nothing was sent; never retried. Trust a private CA
    with the ``ca_bundle`` option."""


class PreconditionFailedError(UploaderError):
    """A conditional write found the object changed (or present) since it was read:
    another writer got there first. Read it again, merge, and write again; retrying
    the same write cannot succeed."""
