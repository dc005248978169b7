"""``ckpt-uploader ls``: list the committed checkpoints under a prefix, or its objects.

By default every rank's commit pointer under the prefix is read, and each
checkpoint it names is one row: rank, name, layout rule, files, bytes and when it
was committed, ``latest`` marked. ``--files`` lists the objects instead (pointers
show their latest).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Callable
from typing import Any

from uploader.bucket.pointer import (
    MAX_POINTER_BYTES,
    Pointer,
    list_ranks,
    read_pointer,
    select_latest,
)
from uploader.bucket.verify import is_pointer
from uploader.cli.options import (
    EXIT_CODES,
    Formatter,
    add_output_options,
    add_store_options,
    open_store,
)
from uploader.config.hparams import StoreLocation, listing_prefix
from uploader.config.resolve import resolve
from uploader.daemon.progress import format_bytes
from uploader.errors import ExitCode, UploaderError
from uploader.transfer.store import ObjectStore

__all__ = ["register", "cmd_ls"]

_RANK_TARGET = re.compile(r"^rank_(\d+)(?:/(.+))?$")


def register(sub: Any) -> None:
    """Add the ``ls`` subcommand to ``sub`` (argparse subparsers)."""
    p = sub.add_parser(
        "ls",
        help="list committed checkpoints (or objects) under a prefix",
        description="List the checkpoints committed under URI's prefix, one row each: "
        "rank, name, files, bytes, committed; latest marked. URI is the one push wrote to; "
        "with /latest, /rank_N or /rank_N/NAME appended, only those rows. --files lists "
        "the objects.",
        epilog=EXIT_CODES,
        formatter_class=Formatter,
    )
    p.add_argument("uri", metavar="URI")
    p.add_argument(
        "--files",
        action="store_true",
        help="list the objects instead of the checkpoints (default: checkpoints)",
    )
    p.add_argument(
        "--json", action="store_true", help="one JSON object per line (default: a table)"
    )
    add_store_options(p, to=False)
    add_output_options(p)
    p.set_defaults(func=cmd_ls)


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)) if t else "-"


def cmd_ls(args: argparse.Namespace) -> int:
    loc = resolve(vars(args), reading=True).location
    with open_store(loc) as store:
        if args.files:
            _list_files(store, loc.prefix if loc.target == "latest" else loc.name, args.json)
            return ExitCode.OK
        ranks = list_ranks(store, loc.prefix)
        if not ranks:
            raise UploaderError(
                f"no committed checkpoint under {loc.prefix or '(root)'!r} (no "
                "rank_N/latest.json); 'ckpt-uploader ls --files URI' lists its objects"
            )
        wanted = _wanted(store, loc)
        shown = 0
        totals = [0, 0]  # logical and stored bytes of chunked checkpoints shown
        for rank in ranks:
            pointer = read_pointer(store, loc.prefix, rank)
            if pointer is not None:
                shown += _list_pointer(pointer, args.json, wanted, totals)
        if totals[1] and not args.json:
            print(
                f"dedup: {format_bytes(totals[0])} of chunked checkpoints stored as "
                f"{format_bytes(totals[1])} of new chunks ({totals[0] / totals[1]:.1f}x)"
            )
        if not shown:
            raise UploaderError(
                f"no committed checkpoint {loc.target!r} under {loc.prefix or '(root)'!r}; "
                "'ckpt-uploader ls' on the URI without it lists them all"
            )
    return ExitCode.OK


def _wanted(store: ObjectStore, loc: StoreLocation) -> Callable[[int, str], bool]:
    """Which rows the URI's target asks for: ``latest`` (the newest checkpoint every
    rank committed), ``rank_N`` (that rank's), ``rank_N/NAME`` (that checkpoint), or
    all of them."""
    if not loc.target:
        return lambda rank, name: True
    if loc.target == "latest":
        selection = select_latest(store, loc.name)
        chosen = {r: e.name for r, e in selection.chosen.items()} if selection else {}
        return lambda rank, name: chosen.get(rank) == name
    m = _RANK_TARGET.match(loc.target)
    if m is None:
        return lambda rank, name: False
    want_rank, want_name = int(m.group(1)), m.group(2)
    return lambda rank, name: rank == want_rank and want_name in (None, name)


def _list_pointer(
    pointer: Pointer, as_json: bool, wanted: Callable[[int, str], bool], totals: list[int]
) -> int:
    """Print the pointer's checkpoints that ``wanted`` picks; how many. A chunked one
    (``--dedup``) shows the bytes its chunks added to the scope; ``totals`` adds its
    logical and stored bytes."""
    aliases: dict[str, list[str]] = {}
    for a, t in pointer.aliases.items():
        aliases.setdefault(t, []).append(a)
    shown = 0
    for e in pointer.history:
        if not (
            wanted(pointer.rank, e.name)
            or any(wanted(pointer.rank, a) for a in aliases.get(e.name, []))
        ):
            continue
        shown += 1
        latest = e.name == pointer.latest.name
        stored = e.manifest_ref.stored if e.manifest_ref is not None else None
        if stored is not None:
            totals[0] += e.size
            totals[1] += stored
        if as_json:
            row = {
                "rank": pointer.rank,
                "name": e.name,
                "rule": e.rule,
                "object": e.object,
                "files": e.file_count,
                "bytes": e.size,
                "digest": e.digest,
                "committed_at": e.committed_at,
                "latest": latest,
                "aliases": sorted(aliases.get(e.name, [])),
                "chunked": e.chunked,
                "stored_bytes": stored,
            }
            print(json.dumps(row))
            continue
        also = f"  (also {', '.join(sorted(aliases[e.name]))})" if e.name in aliases else ""
        if stored is not None:
            also = f"  new {format_bytes(stored)}{also}"
        print(
            f"rank_{pointer.rank}  {e.name + ('/' if e.is_directory else ''):<32} "
            f"{e.rule:<9} {e.file_count:>5} files {format_bytes(e.size):>10}  "
            f"{_when(e.committed_at)}{'  latest' if latest else ''}{also}"
        )
    return shown


def _list_files(store: ObjectStore, prefix: str, as_json: bool) -> None:
    for info in store.list(listing_prefix(prefix)):
        latest = None
        if is_pointer(info.name):
            try:
                latest = Pointer.from_json(
                    store.get_bytes(info.name, max_size=MAX_POINTER_BYTES), info.name
                ).latest.name
            except UploaderError:
                latest = "(unreadable)"
        if as_json:
            row = {"name": info.name, "size": info.size, "mtime": info.mtime, "latest": latest}
            print(json.dumps(row))
        else:
            extra = f"  -> {latest}" if latest else ""
            print(f"{info.size:>14}  {_when(info.mtime)}  {info.name}{extra}")
