"""``ckpt-uploader ls``: list the objects under a prefix; pointers show their latest."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from uploader.bucket.pointer import Pointer
from uploader.bucket.verify import is_pointer
from uploader.cli.options import (
    EXIT_CODES,
    Formatter,
    add_output_options,
    add_store_options,
    location,
    open_store,
)
from uploader.config.files import load_config_file
from uploader.config.hparams import listing_prefix
from uploader.errors import ExitCode, UploaderError

__all__ = ["register", "cmd_ls"]


def register(sub: Any) -> None:
    """Add the ``ls`` subcommand to ``sub`` (argparse subparsers)."""
    p = sub.add_parser(
        "ls",
        help="list stored objects under a prefix",
        description="List objects under URI's prefix with size and time; pointers show their latest.",
        epilog=EXIT_CODES,
        formatter_class=Formatter,
    )
    p.add_argument("uri", metavar="URI")
    p.add_argument(
        "--json", action="store_true", help="one JSON object per line (default: a table)"
    )
    add_store_options(p, to=False)
    add_output_options(p)
    p.set_defaults(func=cmd_ls)


def cmd_ls(args: argparse.Namespace) -> int:
    loc = location(args, args.uri, load_config_file(args.config))
    with open_store(loc) as store:
        base = listing_prefix(loc.prefix)
        for info in store.list(base):
            latest = None
            if is_pointer(info.name):
                try:
                    latest = Pointer.from_json(store.get_bytes(info.name), info.name).latest.name
                except UploaderError:
                    latest = "(unreadable)"
            when = (
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(info.mtime)) if info.mtime else "-"
            )
            if args.json:
                row = {"name": info.name, "size": info.size, "mtime": info.mtime, "latest": latest}
                print(json.dumps(row))
            else:
                extra = f"  -> {latest}" if latest else ""
                print(f"{info.size:>14}  {when}  {info.name}{extra}")
    return ExitCode.OK
