"""The ``ckpt-uploader`` command line (also ``python -m uploader``).

Subcommands: ``watch``, ``push``, ``pull``, ``ls``, ``verify``, ``status``, ``check``, ``gc``, one
module each in this package; the option groups they share are in
:mod:`uploader.cli.options`. Each one that talks to a store takes it as a URI (after
RUN_DIR for watch/push, or ``--to URI``; first for pull/ls/verify, with ``/latest`` or
``/rank_N/NAME`` appended where they name a checkpoint), as hparams flags, or from
``--config FILE``; flags win over the file. Credentials come only from the environment
variables the config names.

This module is the entry point: it parses the command line, sets up logging, runs
the command and maps errors to :class:`uploader.errors.ExitCode`.

Example::

    export AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=...
    ckpt-uploader watch runs/1/rank_0 s3://ckpts/exp1 --keep-local 3
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence

from uploader import __version__
from uploader.cli import check, gc, ls, pull, status, verify, watch
from uploader.cli.options import EXIT_CODES, Formatter
from uploader.errors import ConfigError, ExitCode, UploaderError
from uploader.redact import RedactingFilter, redact

__all__ = ["main", "build_parser", "setup_logging", "JsonFormatter", "EXIT_CODES"]

log = logging.getLogger("uploader.cli.main")


# -- logging -----------------------------------------------------------------------------
class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg (journald/ELK friendly)."""

    def format(self, record: logging.LogRecord) -> str:
        body = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        if record.exc_info:
            body["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(body)


def setup_logging(fmt: str = "text", verbosity: int = 0) -> None:
    """One stderr handler (secrets redacted) for the ``uploader`` loggers."""
    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter(
                "%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S"
            )
        )
    handler.addFilter(RedactingFilter())
    handler.set_name("ckpt-uploader")
    root = logging.getLogger()
    for h in list(root.handlers):
        if h.get_name() == "ckpt-uploader":
            root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("uploader").setLevel(level)


# -- parser ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ckpt-uploader",
        description="Upload training checkpoints from a run directory to an object store, "
        "durably and verifiably, and fetch them back.",
        epilog=EXIT_CODES,
        formatter_class=Formatter,
    )
    parser.add_argument("--version", action="version", version=f"ckpt-uploader {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command in (watch, pull, ls, verify, status, check, gc):
        command.register(sub)
    return parser


# -- entry point -------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: CONFIG on bad flags, OK for --help
        return int(exc.code or ExitCode.OK)
    verbosity = -1 if getattr(args, "quiet", False) else 1 if getattr(args, "verbose", False) else 0
    setup_logging(getattr(args, "log_format", "text"), verbosity)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ConfigError as exc:
        log.error("configuration error: %s", redact(str(exc)))
        return ExitCode.CONFIG
    except UploaderError as exc:
        log.error("%s", redact(str(exc)))
        return exc.exit_code
    except KeyboardInterrupt:
        return ExitCode.SIGINT
    except BrokenPipeError:
        return ExitCode.FAILED
    except OSError as exc:  # a local file: permissions, a full disk, a missing folder
        log.error("local file error: %s; check the path, its permissions and free space", exc)
        return ExitCode.FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
