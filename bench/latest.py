"""Requests to resolve ``latest`` when W ranks restore at once, counted by a proxy.

W ranks have committed two checkpoints each to ``rclone serve s3``; then every rank
restores ``latest`` at the same moment, as a job does when it restarts. Each request
that reaches the server passes a counting :class:`harness.faultproxy.FaultProxy`.
Two ways, for W = 1, 8 and 64 simulated ranks (one process; see
:mod:`harness.ranks`):

* alone: each rank resolves ``latest`` by itself, reading every rank's pointer
  (what ``ckpt.load`` and ``fetch_latest`` do without a process group);
* shared: rank 0 resolves and the result is handed to every rank
  (``ckpt.share_from_rank_zero``, a torch.distributed broadcast; simulated here by
  :class:`harness.ranks.OnceShare`).

Two entry points: the loader's (``select_latest``, what ``ckpt.load("latest")``
resolves with; the world size given, no listing) and ``fetch_latest`` (lists the
ranks, then downloads each rank's small file: a HEAD and a GET).

:func:`measure` and :func:`table` are importable (``bench.restore`` can show the same
table as its part (c)); ``python -m bench.latest`` writes the ``latest`` section of
docs/benchmarks.md.

Usage::

    python -m bench.latest                 # W = 1, 8, 64
    python -m bench.latest --worlds 1 8    # a quick check
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.faultproxy import FaultProxy
from harness.ranks import OnceShare, commit_world, pointer_requests
from harness.servers.s3 import FAST_RETRY, S3Server, start_rclone_s3
from uploader import ObjectStoreHparams, fetch_latest
from uploader.bucket.pointer import select_latest

__all__ = ["Row", "measure", "table", "main"]

log = logging.getLogger("bench.latest")

WORLDS = (1, 8, 64)
PREFIX = "run"


@dataclass(frozen=True)
class Row:
    """Requests of one way for one world size: counts from :func:`pointer_requests`."""

    entry: str
    world: int
    way: str
    counts: dict[str, int]


def _loader(hp: ObjectStoreHparams, world: int, share: OnceShare | None, _: Path) -> None:
    with hp.initialize_object(retry=FAST_RETRY) as store:
        for rank in range(world):
            sel = select_latest(store, f"{PREFIX}/latest", world, rank, share)
            assert sel is not None and sel.chosen[rank].name == "ep2.pt"


def _fetch(hp: ObjectStoreHparams, world: int, share: OnceShare | None, dest: Path) -> None:
    for rank in range(world):
        path = fetch_latest(hp, dest / f"rank_{rank}", prefix=PREFIX, rank=rank, share=share)
        assert path is not None and path.name == "ep2.pt"


LOADER = "ckpt.load (select_latest)"
FETCH = "fetch_latest"
ENTRIES: dict[str, Callable[[ObjectStoreHparams, int, OnceShare | None, Path], None]] = {
    LOADER: _loader,
    FETCH: _fetch,
}


def measure(server: S3Server, worlds: Sequence[int], workdir: Path) -> list[Row]:
    """Count each entry point's requests, alone and shared, for each world size."""
    rows = []
    for world in worlds:
        bucket = f"latest-{world}-{uuid.uuid4().hex[:8]}"
        server.make_bucket(bucket)
        with server.hparams(bucket).initialize_object() as store:
            commit_world(store, PREFIX, world, ["ep1.pt", "ep2.pt"], data=b"w" * 4096)
        with FaultProxy(("127.0.0.1", server.port)) as proxy:
            hp = server.hparams(bucket, port=proxy.port)
            for entry, run in ENTRIES.items():
                for way in ("alone", "shared"):
                    dest = Path(tempfile.mkdtemp(dir=workdir))
                    start = len(proxy.requests)
                    run(hp, world, OnceShare() if way == "shared" else None, dest)
                    rows.append(Row(entry, world, way, pointer_requests(proxy, start)))
                    shutil.rmtree(dest, ignore_errors=True)
                    log.info("%s W=%d %s: %s", entry, world, way, rows[-1].counts)
    return rows


def table(rows: Sequence[Row]) -> str:
    """The markdown table of :func:`measure`'s rows."""
    lines = [
        "| entry point | W | way | pointer GETs | listings | all requests | per rank |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        c = r.counts
        lines.append(
            f"| {r.entry} | {r.world} | {r.way} | {c['pointer']} | {c['list']} | "
            f"{c['total']} | {c['total'] / r.world:.1f} |"
        )
    return "\n".join(lines)


def report(rows: Sequence[Row]) -> str:
    by = {(r.entry, r.world, r.way): r.counts["total"] for r in rows}
    worlds = sorted({r.world for r in rows})

    def ratios(entry: str) -> str:
        return ", ".join(
            f"W={w}: {by[(entry, w, 'alone')] / by[(entry, w, 'shared')]:.1f}x" for w in worlds
        )

    return (
        "## Resolving `latest` at scale\n\n"
        "W simulated ranks restore `latest` at once from `rclone serve s3`; every request "
        "is counted by a proxy in front of the server. *alone*: each rank resolves it by "
        "reading every rank's pointer (W x W GETs). *shared*: rank 0 resolves and hands the "
        "result to every rank (`ckpt.share_from_rank_zero`, a torch.distributed broadcast; "
        "`ckpt.load` does it whenever a process group of several ranks is initialised, "
        "`fetch_latest` with `share=`). The loader's row is its resolution alone "
        "(`select_latest` given the world size, as the Trainer calls it; one store, so one "
        "HEAD of the bucket, for all simulated ranks). `fetch_latest` opens a store per rank "
        "(HEAD of the bucket), lists the ranks, and downloads each rank's file (HEAD, GET)."
        "\n\n"
        + table(rows)
        + "\n\n"
        + "Shared, the requests grow as W: for `fetch_latest` about 4 per rank (its store's "
        "HEAD, its pointer read by rank 0, its file's HEAD and GET) plus one listing; alone, "
        f"as W x W. All requests, alone / shared: the loader {ratios(LOADER)}; "
        f"`fetch_latest` {ratios(FETCH)}."
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.latest", description=__doc__.split("\n")[0])
    p.add_argument("--worlds", type=int, nargs="+", default=list(WORLDS), help="world sizes")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("uploader").setLevel(logging.WARNING)
    workdir = Path(tempfile.mkdtemp(prefix="bench-latest-"))
    server = start_rclone_s3(workdir / "data")
    try:
        rows = measure(server, args.worlds, workdir)
    finally:
        server.close()
        shutil.rmtree(workdir, ignore_errors=True)
    text = report(rows)
    print(text)
    if not args.no_write:
        from bench.report import write_section

        command = "python -m bench.latest" + (
            f" --worlds {' '.join(map(str, args.worlds))}" if args.worlds != list(WORLDS) else ""
        )
        write_section("latest", text, command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
