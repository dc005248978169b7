"""Upload benchmark: one directory checkpoint of many small files, whole processes, against peers.

A torch DCP style ``step_1/`` (N shards of 256 bytes, as many ranks write into one
directory, and ``.metadata``) is uploaded to one ``rclone serve s3`` on loopback by each
client in turn (the order rotates; medians over the runs; every run to a fresh prefix):

* push: ``ckpt-uploader push RUN_DIR URI`` (a fresh state directory each run: every file
  accepted in the journal, uploaded, verified, then the checkpoint committed whole: one
  pointer naming the manifest of every file)
* s5cmd: ``s5cmd cp 'RUN_DIR/step_1/*' s3://bucket/prefix/step_1/``
* rclone: ``rclone copy RUN_DIR/step_1 remote:bucket/prefix/step_1``

Each client is a process of its own, timed over its whole life (start-up included) by a
small Python process that reads its CPU time and peak RSS from ``RUSAGE_CHILDREN``
(:mod:`bench.restore`'s child).

Usage::

    python -m bench.many_files                     # 1000 and 10000 files, 3 runs
    python -m bench.many_files --files 1000 --runs 5
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import client_env, ratio_text
from bench.report import publish
from bench.restore import BUCKET, Results, _measure, _rotations

__all__ = ["main", "CLIENTS"]

log = logging.getLogger("bench.many_files")

CLIENTS = ["push", "s5cmd", "rclone"]
CHECKPOINT = "step_1"
SHARD = 256


def _write(run: Path, files: int) -> int:
    ck = run / CHECKPOINT
    ck.mkdir(parents=True)
    for i in range(files):
        (ck / f"__{i}_0.distcp").write_bytes(os.urandom(SHARD))
    (ck / ".metadata").write_bytes(os.urandom(4096))
    return sum(p.stat().st_size for p in ck.iterdir())


def _argv(client: str, run: Path, prefix: str, server: Any, tools: dict[str, str]) -> list[str]:
    if client == "push":
        uri = server.uri(BUCKET, prefix)
        state = run.parent / f"state-{prefix}"
        return [
            sys.executable,
            "-m",
            "uploader",
            "push",
            str(run),
            uri,
            "--quiet",
            "--state-dir",
            str(state),
        ]
    src = run / CHECKPOINT
    if client == "s5cmd":
        dst = f"s3://{BUCKET}/{prefix}/{CHECKPOINT}/"
        return [tools["s5cmd"], "--endpoint-url", server.endpoint, "cp", f"{src}/*", dst]
    if client == "rclone":
        return [tools["rclone"], "copy", str(src), f"bench:{BUCKET}/{prefix}/{CHECKPOINT}"]
    raise SystemExit(f"unknown client {client}")


def _stored(server: Any, prefix: str) -> int:
    with server.hparams(BUCKET).initialize_object() as store:
        return sum(1 for o in store.list(f"{prefix}/") if "/step_1/" in o.name)


def run_files(
    files: int,
    runs: int,
    clients: list[str],
    base: Path,
    server: Any,
    env: dict[str, str],
    tools: dict[str, str],
) -> Results:
    run = base / f"run-{files}"
    size = _write(run, files)
    res = Results(size)
    for r in range(runs):
        for client in _rotations(clients, r):
            prefix = f"f{files}-r{r}-{client}"
            binary = _argv(client, run, prefix, server, tools)
            argv = [sys.executable, "-m", "bench.restore", "--child-download", client, "-", "-"]
            s = _measure([*argv, server.endpoint], dict(env, BENCH_ARGV=json.dumps(binary)))
            got = _stored(server, prefix)
            if got != files + 1:
                raise RuntimeError(f"{client} stored {got} objects of {files + 1}")
            shutil.rmtree(base / f"state-{prefix}", ignore_errors=True)
            res.add(client, s)
            log.info(
                "%d files run %d %-6s %7.2f s  cpu %.2f s  rss %.0f MiB",
                files,
                r + 1,
                client,
                s.seconds,
                s.cpu,
                s.rss_mib,
            )
    return res


def report(results: dict[int, Results], runs: int, load: tuple[float, float]) -> str:
    lines = [
        "## Uploads of many small files in one checkpoint (`bench/many_files.py`)",
        "",
        "A torch DCP style `step_1/` of N shards of 256 bytes and a `.metadata`, uploaded to "
        "`rclone serve s3` on 127.0.0.1 by each client as a whole process, start-up "
        f"included; {runs} interleaved run(s), medians, each to a fresh prefix. `push` "
        "records every file in its journal, checks each upload and commits the directory as "
        "one checkpoint (a pointer naming the manifest of every file); s5cmd and rclone copy "
        "the files. `s5cmd / push` is s5cmd's time divided by ours (1.0: as fast).",
        "",
        "| files | client | seconds | CPU s | peak RSS MiB | s5cmd / client |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for files, res in sorted(results.items()):
        m = res.median
        s5 = m("s5cmd", "seconds")
        for c in CLIENTS:
            if c in res.samples:
                lines.append(
                    f"| {files} | {c} | {m(c, 'seconds'):.2f} | {m(c, 'cpu'):.2f} "
                    f"| {m(c, 'rss'):.0f} | {ratio_text(s5, m(c, 'seconds'))} |"
                )
    counts = sorted(results)
    if len(counts) >= 2 and "push" in results[counts[0]].samples:
        a, b = counts[0], counts[-1]
        t = results[b].median("push", "seconds") / results[a].median("push", "seconds")
        lines += ["", f"push at {b} files takes {t:.1f}x its time at {a} files."]
    lines += [
        "",
        f"Load average (1 min) on this 2-core machine at the start and the end of these "
        f"runs: {load[0]:.1f} and {load[1]:.1f}.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.many_files", description=__doc__.split("\n")[0]
    )
    p.add_argument("--files", type=int, action="append", help="files (default 1000 and 10000)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--no-write", action="store_true", help="print the table only")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from harness.servers.s3 import find_binary, start_rclone_s3

    tools = {"s5cmd": find_binary("s5cmd"), "rclone": find_binary("rclone")}
    counts = args.files or [1000, 10000]
    results: dict[int, Results] = {}
    with tempfile.TemporaryDirectory(prefix="bench-many-files-") as tmp:
        base = Path(tmp)
        server = start_rclone_s3(base / "data", bucket=BUCKET)
        try:
            env = client_env(server, base)
            load0 = os.getloadavg()[0]
            for files in counts:
                results[files] = run_files(files, args.runs, CLIENTS, base, server, env, tools)
            load1 = os.getloadavg()[0]
        finally:
            server.close()
    text = report(results, args.runs, (load0, load1))
    publish("many-files", text, "bench.many_files", argv, not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
