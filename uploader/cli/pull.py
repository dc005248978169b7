"""``ckpt-uploader pull``: download an object, ``latest``, or a prefix, verified.

``latest`` is resolved by :func:`uploader.bucket.pointer.select_latest` (the same
resolution the loader uses); every byte is checked against the size and digest
recorded at upload before it is renamed into place.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from uploader.bucket.pointer import select_latest
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
from uploader.daemon.progress import format_bytes, stderr_is_terminal
from uploader.errors import ConfigError, ExitCode, UploaderError
from uploader.transfer.store import ObjectStore, check_object_name

__all__ = ["register", "cmd_pull"]

log = logging.getLogger("uploader.cli.pull")


def register(sub: Any) -> None:
    """Add the ``pull`` subcommand to ``sub`` (argparse subparsers)."""
    p = sub.add_parser(
        "pull",
        help="download a checkpoint (or 'latest') and verify it",
        description="Download URI to DEST, checking size and digest. URI names an object "
        "(s3://b/run/rank_0/ep3.pt), 'latest' under a prefix (s3://b/run/latest: the "
        "newest checkpoint committed by every rank), or a prefix (everything under it).",
        epilog=EXIT_CODES,
        formatter_class=Formatter,
    )
    p.add_argument("uri", metavar="URI")
    p.add_argument("dest", metavar="DEST", help="a file path, or a directory")
    p.add_argument(
        "--rank",
        type=int,
        help="with latest: only this rank's file, written to DEST (default: every rank, "
        "to DEST/rank_N/NAME; a single rank goes straight to DEST)",
    )
    p.add_argument(
        "--world-size",
        type=int,
        help="with latest: ranks that must have committed (default: every rank with a pointer)",
    )
    add_store_options(p, to=False)
    add_output_options(p)
    p.set_defaults(func=cmd_pull)


def cmd_pull(args: argparse.Namespace) -> int:
    cfg = load_config_file(args.config)
    loc = location(args, args.uri, cfg)
    store = open_store(loc)
    progress = not args.quiet and not args.no_progress and stderr_is_terminal()
    dest = Path(args.dest)
    with store:
        latest = select_latest(store, loc.prefix, args.world_size, args.rank)
        if latest is not None:
            entries = latest.chosen
            if not entries:
                raise ConfigError(f"rank {args.rank} has no pointer under {latest.prefix!r}")
            for rank, e in sorted(entries.items()):
                target = dest if len(entries) == 1 else dest / f"rank_{rank}" / e.name
                got = store.download_file(
                    e.object,
                    target,
                    progress=progress,
                    expected_digest=e.digest,
                    expected_size=e.size,
                    require_digest=True,
                )
                print(f"{e.object} -> {got} ({format_bytes(e.size)}, {e.digest})")
            return ExitCode.OK
        if loc.prefix and store.exists(loc.prefix):
            got = store.download_file(loc.prefix, dest, progress=progress)
            print(f"{loc.prefix} -> {got}")
            return ExitCode.OK
        return _pull_prefix(store, loc.prefix, dest, progress)


def _pull_prefix(store: ObjectStore, prefix: str, dest: Path, progress: bool) -> int:
    """Everything under ``prefix`` into ``dest``, but names that would land outside it."""
    base = listing_prefix(prefix)
    objs = store.list(base)
    if not objs:
        raise UploaderError(
            f"nothing under {prefix or '(root)'!r}; check the URI with 'ckpt-uploader ls'"
        )
    unsafe = []
    for info in objs:
        rel = info.name[len(base) :]
        try:
            check_object_name(rel)
        except ConfigError:
            # Another tool wrote it: it would land outside DEST. Skip it, say so.
            unsafe.append(info.name)
            continue
        target = dest / rel
        store.download_file(info.name, target, progress=progress)
        print(f"{info.name} -> {target}")
    if unsafe:
        log.error(
            "not downloaded: %d object(s) whose names would land outside %s "
            "(absolute, '..', '.' or empty segments): %s; rename them in the store "
            "to fetch them",
            len(unsafe),
            dest,
            ", ".join(repr(n) for n in unsafe[:5]) + (" ..." if len(unsafe) > 5 else ""),
        )
        return ExitCode.FAILED
    return ExitCode.OK
