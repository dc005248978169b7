"""Many ranks restoring at once: do N processes, each downloading its own file, share
the server fairly and finish within 1.2x of N x size / the throughput of one?

Each rank is a process of its own with its own :class:`uploader.ObjectStore` (the
default part size and concurrency), as on a node restoring after a restart. Every
process imports, opens its store and reads its object's metadata first, then waits;
all start downloading at the same instant (a line on stdin), so process start-up is
not timed. Each object is read once (one HEAD) before timing, so the server's
first-touch cost (rclone computes an MD5 on first access) is not timed either.

Two servers, both ``rclone serve s3`` on loopback:

* limited: ``--bwlimit`` caps the server's total rate, so the server is the
  bottleneck and the question is only how the ranks share it;
* unlimited: the machine's CPU is the bottleneck (client, server and hashing share
  2 cores).

For each N (1 is the baseline), runs are interleaved; each reports the wall time
until the last rank finishes against N x (the wall time of one rank alone, same
server, same run), each rank's own time, and Jain's fairness index over the ranks'
rates (1.0: every rank got the same share; 1/N: one rank got everything).

Usage::

    python -m bench.concurrent_restore                  # N = 1, 2, 4, 8; 32 MiB each
    python -m bench.concurrent_restore --quick          # N = 1, 4; 16 MiB
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import ROOT
from harness.data import write_random
from harness.servers.s3 import S3Server, start_rclone_s3

__all__ = ["Run", "measure", "report", "main"]

log = logging.getLogger("bench.concurrent_restore")

MiB = 1 << 20
RANKS = (1, 2, 4, 8)
#: The limited server's total rate (rclone --bwlimit), bytes per second.
LIMIT = 16 * MiB


def _worker(fields_json: str, obj: str, dest: str) -> None:
    """One rank: open the store, read the object's metadata, wait for "go", download."""
    from uploader import ObjectStoreHparams

    store = ObjectStoreHparams(**json.loads(fields_json)).initialize_object()
    store.stat(obj)
    print("ready", flush=True)
    sys.stdin.readline()
    t0 = time.time()
    store.download_file(obj, dest, progress=False)
    t1 = time.time()
    store.close()
    print(json.dumps({"start": t0, "end": t1}), flush=True)


@dataclass
class Run:
    """One concurrent restore of ``ranks`` processes on server ``server``."""

    server: str
    ranks: int
    size: int
    wall: float
    times: list[float] = field(default_factory=list)

    @property
    def jain(self) -> float:
        rates = [self.size / t for t in self.times]
        return sum(rates) ** 2 / (len(rates) * sum(r * r for r in rates))


def _restore(
    fields: dict[str, Any], objs: Sequence[str], workdir: Path, env: dict[str, str]
) -> Run:
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.concurrent_restore",
                "--worker",
                json.dumps(fields),
                obj,
                str(workdir / f"rank_{i}.bin"),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )  # fmt: skip
        for i, obj in enumerate(objs)
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"a rank did not start: {line!r}")
        for p in procs:  # "go" to every rank as close together as a loop allows
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        results = []
        for p in procs:
            out, _ = p.communicate(timeout=600)
            if p.returncode != 0:
                raise RuntimeError(f"a rank failed with exit code {p.returncode}")
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in workdir.glob("rank_*.bin"):
            f.unlink()
    start = min(r["start"] for r in results)
    return Run(
        "",
        len(objs),
        0,
        max(r["end"] for r in results) - start,
        [r["end"] - r["start"] for r in results],
    )


def measure(ranks: Sequence[int], size: int, runs: int, limit: int, workdir: Path) -> list[Run]:
    """Interleaved runs of every N on the limited and the unlimited server."""
    servers: dict[str, S3Server] = {}
    out: list[Run] = []
    try:
        servers["limited"] = start_rclone_s3(
            workdir / "limited", extra_args=["--bwlimit", f"{limit // MiB}M"]
        )
        servers["unlimited"] = start_rclone_s3(workdir / "unlimited")
        src = workdir / "src.bin"
        write_random(src, size, seed=1)
        objects: dict[str, list[str]] = {}
        fields: dict[str, dict[str, Any]] = {}
        env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
        for name, server in servers.items():
            env.update(server.env)
            bucket = f"restore-{uuid.uuid4().hex[:8]}"
            server.make_bucket(bucket)
            with server.hparams(bucket).initialize_object() as store:
                objects[name] = [f"run/rank_{i}/ep.pt" for i in range(max(ranks))]
                for obj in objects[name]:
                    store.upload_file(src, obj)
                    store.stat(obj)  # warm: rclone hashes an object on first access
            fields[name] = {
                "provider": "s3", "container": bucket, "host": server.host,
                "port": server.port, "key_environ": server.key_env,
                "secret_environ": server.secret_env, "region": "us-east-1",
            }  # fmt: skip
        for i in range(runs):
            for n in ranks:
                for name in servers:
                    run = _restore(fields[name], objects[name][:n], workdir, env)
                    run.server, run.size = name, size
                    out.append(run)
                    log.info(
                        "run %d %s N=%d: wall %.2fs, ranks %s",
                        i + 1, name, n, run.wall, ", ".join(f"{t:.2f}" for t in run.times),
                    )  # fmt: skip
    finally:
        for server in servers.values():
            server.close()
    return out


def report(runs: Sequence[Run], size: int, limit: int) -> str:
    lines = [
        "## Many ranks restoring at once",
        "",
        f"N processes each download their own {size // MiB} MiB object (verified against its digest) from "
        "one `rclone serve s3` at the same instant (start-up and the server's first touch "
        f"not timed). *limited*: the server's total rate is capped (`--bwlimit "
        f"{limit // MiB}M`), so it is the bottleneck; *unlimited*: the 2 CPU cores are. "
        "*wall / (N x one)*: the time until the last rank finishes over N times one rank's "
        "time alone on the same server (target at most 1.2). *Jain*: fairness of the ranks' "
        "rates (1.0 = equal shares). Medians of interleaved runs.",
        "",
        "| server | N | one rank alone (s) | wall (s) | wall / (N x one) | ranks' times (s), min-max | Jain |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    groups: dict[tuple[str, int], list[Run]] = {}
    worst: dict[str, float] = {}
    fairest: dict[str, float] = {}
    for r in runs:
        groups.setdefault((r.server, r.ranks), []).append(r)
    for (server, n), rs in sorted(groups.items()):
        one = statistics.median(r.wall for r in groups[(server, 1)])
        wall = statistics.median(r.wall for r in rs)
        lo = statistics.median(min(r.times) for r in rs)
        hi = statistics.median(max(r.times) for r in rs)
        jain = statistics.median(r.jain for r in rs)
        lines.append(
            f"| {server} | {n} | {one:.2f} | {wall:.2f} | {wall / (n * one):.2f} | "
            f"{lo:.2f}-{hi:.2f} | {jain:.3f} |"
        )
        worst[server] = max(worst.get(server, 0.0), wall / (n * one))
        fairest[server] = min(fairest.get(server, 1.0), jain)
    lines.append("")
    lines.append(
        "What the figures say: "
        + "; ".join(
            f"{server}, the last rank finishes within {worst[server]:.2f}x of N x one rank's "
            f"time ({'within' if worst[server] <= 1.2 else 'beyond'} the 1.2x target) and "
            f"Jain's index is at least {fairest[server]:.3f}"
            for server in sorted(worst)
        )
        + ". Every rank runs the same part size and concurrency, so each holds the same "
        "number of connections to the server; ranks of unequal sizes are not measured here."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["--worker"]:
        _worker(*args_in[1:4])
        return 0
    p = argparse.ArgumentParser(
        prog="python -m bench.concurrent_restore", description=__doc__.split("\n")[0]
    )
    p.add_argument("--quick", action="store_true", help="N = 1, 4; 16 MiB; one run")
    p.add_argument("--ranks", type=int, nargs="+", default=None, help="N values (1 is added)")
    p.add_argument("--size-mib", type=int, default=None, help="object size (default 32)")
    p.add_argument("--runs", type=int, default=None, help="interleaved runs (default 3)")
    p.add_argument("--limit-mib", type=int, default=LIMIT // MiB, help="limited rate, MiB/s")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    args = p.parse_args(args_in)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    ranks = sorted({1, *(args.ranks or ((4,) if args.quick else RANKS))})
    size = (args.size_mib or (16 if args.quick else 32)) * MiB
    runs = args.runs or (1 if args.quick else 3)
    limit = args.limit_mib * MiB
    workdir = Path(tempfile.mkdtemp(prefix="bench-restore-ranks-"))
    try:
        results = measure(ranks, size, runs, limit, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = report(results, size, limit)
    print(text)
    if not args.no_write:
        from bench.report import write_section

        command = " ".join(["python -m bench.concurrent_restore", *args_in])
        write_section("concurrent-restore", text, command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
