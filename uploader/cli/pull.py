"""``ckpt-uploader pull``: download a checkpoint, ``latest``, an object, or a prefix, verified.

``latest`` is resolved by :func:`uploader.bucket.pointer.select_latest` (the same
resolution the loader uses); a checkpoint name (``.../rank_0/checkpoint-16``, or an
alias such as ``last.ckpt``) through its rank's pointer. A checkpoint is restored
whole by :func:`uploader.bucket.fetch.fetch_entry`: a directory checkpoint as
``DEST/<name>/...``, a single file as DEST (or inside DEST when it ends with ``/`` or
is a directory). Every byte is checked against the size and digest recorded at
upload before it is renamed into place. ``--fsync`` flushes each file to disk
before it gets its name; without it a restored file is left in the page cache for
the kernel to write back, as s5cmd, rclone and the AWS CLI leave theirs.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from uploader.bucket.fetch import (
    FILES_AT_ONCE,
    Download,
    download_all,
    fetch_entry,
    find_checkpoint,
    is_dir_dest,
)
from uploader.bucket.pointer import MAX_NAME_BYTES, PointerEntry, select_latest
from uploader.cli.options import (
    EXIT_CODES,
    Formatter,
    add_output_options,
    add_store_options,
    open_store,
)
from uploader.config.hparams import listing_prefix
from uploader.config.resolve import resolve
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
        description="Download URI to DEST, checking size and digest. URI is the one push "
        "wrote to with 'latest' appended (s3://b/run/latest, file:///data/b/run/latest: "
        "the newest checkpoint committed by every rank), a checkpoint "
        "(s3://b/run/rank_0/checkpoint-16: a directory checkpoint lands as "
        "DEST/checkpoint-16/...), an object (s3://b/run/rank_0/train.log), or the URI "
        "itself (everything under it). A DEST ending with '/' is always a directory.",
        epilog=EXIT_CODES,
        formatter_class=Formatter,
    )
    p.add_argument("uri", metavar="URI")
    p.add_argument("dest", metavar="DEST", help="a file path, or a directory")
    p.add_argument(
        "--rank",
        type=int,
        help="with latest: only this rank's checkpoint (default: every rank, to "
        "DEST/rank_N/NAME; a single rank goes straight to DEST)",
    )
    p.add_argument(
        "--world-size",
        type=int,
        help="with latest: ranks that must have committed (default: every rank with a pointer)",
    )
    p.add_argument(
        "--fsync",
        action="store_true",
        help="flush every restored file to disk before it gets its name, so it survives "
        "a power loss once pull returns (at the disk's write speed); default: leave it "
        "in the page cache for the kernel to write back, like other download tools",
    )
    p.add_argument(
        "--files",
        type=int,
        default=FILES_AT_ONCE,
        metavar="N",
        help="files of a directory checkpoint (or a prefix) downloaded at once; raise it for a store "
        "whose first byte takes long (each file's ranges share --concurrency; "
        "default: %(default)s)",
    )
    add_store_options(p, to=False)
    add_output_options(p)
    p.set_defaults(func=cmd_pull)


def cmd_pull(args: argparse.Namespace) -> int:
    if args.files < 1:
        raise ConfigError(f"--files {args.files} must be at least 1")
    loc = resolve(vars(args), reading=True).location
    name = loc.name  # the prefix push wrote to, and latest, rank_N/NAME or an object below
    store = open_store(loc)
    progress = not args.quiet and not args.no_progress and stderr_is_terminal()
    dest = Path(args.dest)
    into = is_dir_dest(args.dest)
    sync = bool(args.fsync)
    with store:
        latest = select_latest(store, name, args.world_size, args.rank)
        if latest is not None:
            entries = latest.chosen
            if not entries:
                raise ConfigError(f"rank {args.rank} has no pointer under {latest.prefix!r}")
            for rank, e in sorted(entries.items()):
                where = dest if len(entries) == 1 else dest / f"rank_{rank}"
                single_into = into or len(entries) > 1
                got = fetch_entry(
                    store,
                    e,
                    where,
                    progress=progress,
                    into=single_into,
                    fsync=sync,
                    files=args.files,
                )
                _report(e, got)
            return ExitCode.OK
        entry = find_checkpoint(store, name)
        if entry is not None:
            _report(
                entry,
                fetch_entry(
                    store, entry, dest, progress=progress, into=into, fsync=sync, files=args.files
                ),
            )
            return ExitCode.OK
        if name and store.exists(name):
            target = dest / Path(name).name if into else dest
            got = store.download_file(name, target, progress=progress, fsync=sync)
            print(f"{name} -> {got}")
            return ExitCode.OK
        return _pull_prefix(store, name, dest, progress, sync, args.files)


def _report(e: PointerEntry, got: Path) -> None:
    files = f", {e.file_count} files" if e.is_directory else ""
    print(f"{e.object} -> {got} ({format_bytes(e.size)}{files}, {e.digest})")


def _pull_prefix(
    store: ObjectStore, prefix: str, dest: Path, progress: bool, sync: bool, files: int
) -> int:
    """Everything under ``prefix`` into ``dest``, ``files`` at a time, but names that would
    land outside it."""
    base = listing_prefix(prefix)
    objs = store.list(base)
    if not objs:
        raise UploaderError(
            f"nothing under {prefix or '(root)'!r}; check the URI with 'ckpt-uploader ls'"
        )
    unsafe = []
    jobs: list[Download] = []
    for info in objs:
        rel = info.name[len(base) :]
        try:
            check_object_name(rel)
            if any(len(part.encode()) > MAX_NAME_BYTES for part in rel.split("/")):
                raise ConfigError(f"a part of {rel!r} is longer than a file name may be")
        except ConfigError:
            # Another tool wrote it: it would land outside DEST. Skip it, say so.
            unsafe.append(info.name)
            continue
        jobs.append(Download(info.name, dest / rel, size=info.size))
    download_all(
        store,
        jobs,
        files=files,
        progress=progress,
        label=prefix or "(root)",
        fsync=sync,
        done=lambda job, got: print(f"{job.object} -> {got}"),
    )
    if unsafe:
        log.error(
            "not downloaded: %d object(s) whose names would land outside %s "
            "(absolute, '..', '.', empty or over-long segments): %s; rename them in the store "
            "to fetch them",
            len(unsafe),
            dest,
            ", ".join(repr(n) for n in unsafe[:5]) + (" ..." if len(unsafe) > 5 else ""),
        )
        return ExitCode.FAILED
    return ExitCode.OK
