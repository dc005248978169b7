"""``ckpt-uploader gc``: delete the chunks (``--dedup``) no manifest of a scope references.

The protocol that keeps a concurrent writer's chunks safe is in :mod:`uploader.bucket.gc`.
``--dry-run`` lists what would go and writes nothing.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from uploader.bucket.gc import GRACE, LIMIT, WINDOW, collect
from uploader.cli.options import (
    EXIT_CODES,
    Formatter,
    add_output_options,
    add_store_options,
    open_store,
)
from uploader.config.resolve import resolve
from uploader.daemon.progress import format_bytes
from uploader.errors import ExitCode

__all__ = ["register", "cmd_gc"]


def register(sub: Any) -> None:
    """Add the ``gc`` subcommand to ``sub`` (argparse subparsers)."""
    p = sub.add_parser(
        "gc",
        help="delete the chunks no manifest of a dedup scope references",
        description="Collect a dedup scope (URI's prefix, the --dedup-scope push and watch "
        "were given): delete every chunk that no manifest object under it references and "
        "that is older than --grace. Safe beside running uploaders of the scope: it marks "
        "the scope first and waits --window before it looks, and uploaders check for it "
        "before each manifest. --dry-run shows what would go.",
        epilog=EXIT_CODES,
        formatter_class=Formatter,
    )
    p.add_argument("uri", metavar="URI")
    p.add_argument(
        "--dry-run", action="store_true", help="list what would go; delete nothing (default: off)"
    )
    p.add_argument(
        "--grace",
        type=float,
        default=GRACE,
        metavar="SECONDS",
        help="keep chunks younger than this, referenced or not (default: %(default)s)",
    )
    p.add_argument(
        "--window",
        type=float,
        default=WINDOW,
        metavar="SECONDS",
        help="wait this long after marking the scope, for uploaders writing a manifest; "
        "never less than the protocol's 5 s (default: %(default)s)",
    )
    p.add_argument(
        "--limit",
        type=float,
        default=LIMIT,
        metavar="SECONDS",
        help="stop deleting this long after marking the scope; run again for the rest "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--json", action="store_true", help="the report as one JSON object (default: a sentence)"
    )
    add_store_options(p, to=False)
    add_output_options(p)
    p.set_defaults(func=cmd_gc)


def cmd_gc(args: argparse.Namespace) -> int:
    loc = resolve(vars(args), reading=True).location
    scope = loc.name
    with open_store(loc) as store:
        report = collect(
            store,
            scope,
            grace=args.grace,
            window=args.window,
            limit=args.limit,
            dry_run=args.dry_run,
        )
    doomed_bytes = sum(size for _, size in report.doomed)
    if args.json:
        print(
            json.dumps(
                {
                    "scope": scope,
                    "dry_run": args.dry_run,
                    "manifests": report.manifests,
                    "chunks": report.chunks,
                    "referenced": report.referenced,
                    "young": report.young,
                    "unreferenced": len(report.doomed),
                    "unreferenced_bytes": doomed_bytes,
                    "deleted": report.deleted,
                    "deleted_bytes": report.deleted_bytes,
                    "stopped": report.stopped,
                    "would_delete": [n for n, _ in report.doomed] if args.dry_run else [],
                },
                sort_keys=True,
            )
        )
    else:
        if args.dry_run:
            for name, size in report.doomed:
                print(f"would delete {name} ({format_bytes(size)})")
        verb = "would delete" if args.dry_run else "deleted"
        n, b = (
            (len(report.doomed), doomed_bytes)
            if args.dry_run
            else (report.deleted, report.deleted_bytes)
        )
        print(
            f"scope {scope or '(root)'!r}: {report.manifests} manifest(s), {report.chunks} "
            f"chunk(s), {report.referenced} referenced, {report.young} unreferenced but "
            f"younger than the grace period; {verb} {n} chunk(s), {format_bytes(b)}"
            + ("; stopped at the limit: run again" if report.stopped else "")
        )
    return ExitCode.FAILED if report.stopped else ExitCode.OK
