"""``ckpt-uploader verify``: re-check every stored object and pointer under a prefix.

The checking is :func:`uploader.bucket.verify.verify_prefix`; this command prints
one line per verified object, one per failure, and a summary.
"""

from __future__ import annotations

import argparse
from typing import Any

from uploader.bucket.verify import verify_prefix
from uploader.cli.options import (
    EXIT_CODES,
    Formatter,
    add_output_options,
    add_store_options,
    open_store,
)
from uploader.config.resolve import resolve
from uploader.errors import ExitCode
from uploader.redact import redact
from uploader.transfer.store import ObjectStat

__all__ = ["register", "cmd_verify"]


def register(sub: Any) -> None:
    """Add the ``verify`` subcommand to ``sub`` (argparse subparsers)."""
    p = sub.add_parser(
        "verify",
        help="re-check sizes and digests of stored objects",
        description="Download every object under URI's prefix (URI as push wrote to it, "
        "or with /rank_N or a checkpoint's path appended) into a temporary directory, "
        "check its size and recorded digest (CRC64NVME or sha256), and check that every commit "
        "pointer's entries match the objects they name. Reports each failure.",
        epilog=EXIT_CODES,
        formatter_class=Formatter,
    )
    p.add_argument("uri", metavar="URI")
    p.add_argument(
        "--strict",
        action="store_true",
        help="count objects with no recorded digest as failures (default: warn only)",
    )
    p.add_argument(
        "--tmp-dir",
        metavar="DIR",
        help="where objects are staged while checked (default: the system temp dir)",
    )
    add_store_options(p, to=False)
    add_output_options(p)
    p.set_defaults(func=cmd_verify)


def _print_ok(stat: ObjectStat) -> None:
    print(f"ok      {stat.name}  {stat.size} bytes  {stat.digest}")


def cmd_verify(args: argparse.Namespace) -> int:
    loc = resolve(vars(args), reading=True).location
    # .../latest: everything under the prefix, the latest checkpoint and its pointers too.
    prefix = loc.prefix if loc.target == "latest" else loc.name
    with open_store(loc) as store:
        report = verify_prefix(
            store, prefix, strict=args.strict, tmp_dir=args.tmp_dir, on_verified=_print_ok
        )
    for f in report.failures:
        print(f"FAILED  {redact(f)}")
    print(f"{report.checked} object(s) verified, {len(report.failures)} failure(s)")
    return ExitCode.FAILED if report.failures else ExitCode.OK
