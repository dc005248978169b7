"""Restore benchmark (d): a directory checkpoint of many files, whole processes, against peers.

A Hugging Face style ``checkpoint-10/`` (two large files and many small ones, as
``model-*.safetensors`` beside per-process ``rng_state_*.pth``) is pushed once by
``ckpt-uploader push`` to one ``rclone serve s3`` on loopback, every object warmed
(:func:`bench.common.warm_object`), then restored by each client in turn (the order
rotates; medians over the runs; ``sync`` before each run):

* pull: ``ckpt-uploader pull URI/rank_0/checkpoint-10 DEST/`` (resolves the
  checkpoint through its pointer, fetches every file of its manifest 16 at a time,
  each verified against the manifest's digest)
* pull-1: the same with ``--files 1``: one file after another
* s5cmd: ``s5cmd cp 's3://bucket/prefix/*' DEST/``
* rclone: ``rclone copy remote:bucket/prefix DEST``

Each client is a process of its own, timed over its whole life (start-up
included) by a small Python process that reads its CPU time and peak RSS from
``RUSAGE_CHILDREN``, as :mod:`bench.restore` does for its binaries.

``--latency-ms`` puts :class:`harness.faultproxy.FaultProxy` in front of the server,
holding every request that long before forwarding it: a store whose first byte takes
that long, as one in another region or across the internet does (all three clients
go through it).

Usage::

    python -m bench.restore_dir                    # 2 x 64 MiB + 200 x 256 KiB, 5 runs
    python -m bench.restore_dir --small 1000 --big-mib 0 --runs 3
    python -m bench.restore_dir --latency-ms 20 --big-mib 0
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import client_env, ratio_text, warm_object
from bench.restore import BUCKET, MiB, Results, _measure, _rotations

__all__ = ["main", "CLIENTS"]

log = logging.getLogger("bench.restore_dir")

CLIENTS = ["pull", "pull-1", "s5cmd", "rclone"]
PREFIX = "dirs"
CHECKPOINT = "checkpoint-10"
SMALL_BYTES = 256 << 10


def _write_checkpoint(run: Path, small: int, big_mib: int) -> tuple[int, int]:
    """The checkpoint's files under ``run``; return (files, bytes)."""
    ck = run / CHECKPOINT
    ck.mkdir(parents=True)
    for i in range(2 if big_mib else 0):
        with open(ck / f"model-{i:05d}-of-00002.safetensors", "wb") as f:
            for _ in range(big_mib // 2):
                f.write(os.urandom(MiB))
    for i in range(small):
        (ck / f"rng_state_{i}.pth").write_bytes(os.urandom(SMALL_BYTES))
    (ck / "trainer_state.json").write_text('{"global_step": 10}')
    files = [p for p in ck.iterdir()]
    return len(files), sum(p.stat().st_size for p in files)


def _argv(client: str, dst: Path, server: Any, tools: dict[str, str], port: int) -> list[str]:
    """The client's command line, reaching the server through ``port`` (its own, or a
    proxy's)."""
    key = f"{PREFIX}/rank_0/{CHECKPOINT}"
    if client in ("pull", "pull-1"):
        uri = server.uri(BUCKET, key, port=port)
        one = ["--files", "1"] if client == "pull-1" else []
        return [sys.executable, "-m", "uploader", "pull", uri, f"{dst}/", "--quiet", *one]
    if client == "s5cmd":
        remote = f"s3://{BUCKET}/{key}/*"
        endpoint = f"http://{server.host}:{port}"
        return [tools["s5cmd"], "--endpoint-url", endpoint, "cp", remote, f"{dst}/"]
    if client == "rclone":
        return [tools["rclone"], "copy", f"bench:{BUCKET}/{key}", str(dst)]
    raise SystemExit(f"unknown client {client}")


def _restored(dst: Path, client: str) -> set[str]:
    """The file names a client restored (``pull`` puts the checkpoint's folder inside)."""
    root = dst / CHECKPOINT if client.startswith("pull") else dst
    return {p.name for p in root.iterdir() if p.is_file()}


def run_dirs(
    small: int,
    big_mib: int,
    runs: int,
    clients: list[str],
    base: Path,
    server: Any,
    env: dict[str, str],
    tools: dict[str, str],
    port: int,
) -> tuple[Results, int]:
    run = base / "run"
    log.info("(d) writing %s: 2 x %d MiB + %d x 256 KiB", CHECKPOINT, big_mib // 2, small)
    files, size = _write_checkpoint(run, small, big_mib)
    uri = server.uri(BUCKET, PREFIX)
    push = [sys.executable, "-m", "uploader", "push", str(run), "--to", uri, "--quiet"]
    subprocess.run(push + ["--state-dir", str(base / "state")], env=env, check=True)
    want = {p.name for p in (run / CHECKPOINT).iterdir()}
    with server.hparams(BUCKET).initialize_object() as store:
        keys = [o.name for o in store.list(f"{PREFIX}/rank_0/{CHECKPOINT}/")]
    for key in keys:
        warm_object(server, BUCKET, key)
    res = Results(size)
    for r in range(runs):
        for client in _rotations(clients, r):
            dst = base / f"dst-{client}"
            binary = _argv(client, dst, server, tools, port)
            argv = [sys.executable, "-m", "bench.restore", "--child-download", client, "-", "-"]
            os.sync()  # earlier runs' dirty pages written back before the clock starts
            s = _measure([*argv, server.endpoint], dict(env, BENCH_ARGV=json.dumps(binary)))
            missing = want - _restored(dst, client)
            if missing:
                raise RuntimeError(f"{client} did not restore {sorted(missing)[:5]}")
            subprocess.run(["rm", "-rf", str(dst)], check=True)
            res.add(client, s)
            log.info(
                "(d) run %d %-7s %6.2f s  cpu %.2f s  rss %.0f MiB",
                r + 1,
                client,
                s.seconds,
                s.cpu,
                s.rss_mib,
            )
    return res, files


def report(res: Results, runs: int, files: int, latency_ms: float) -> str:
    m = res.median
    lines = [
        "## Restore (d): a directory checkpoint of many files (`bench/restore_dir.py`)"
        + (f", {latency_ms:g} ms per request" if latency_ms else ""),
        "",
        f"A Hugging Face style `{CHECKPOINT}/` of {files} files, {res.size / MiB:.0f} MiB in "
        "all (two large shards and 256 KiB files beside them), pushed by `ckpt-uploader push` "
        "to `rclone serve s3` on 127.0.0.1 and every object warmed; each client restores it "
        f"as a whole process, start-up included; {runs} interleaved run(s), medians, `sync` "
        "before each. `pull` resolves the checkpoint through its pointer and checks every "
        "file against the manifest's digest; `s5cmd cp 'prefix/*'` and `rclone copy` fetch "
        "the objects under the prefix (s5cmd checks nothing; rclone compares the MD5 the "
        "server reports, where it reports one). `pull-1` is `pull --files 1`, one file after "
        "another."
        + (
            f" Every request waits {latency_ms:g} ms in a proxy before it reaches the server "
            "(`harness/faultproxy.py`), as a distant store's first byte would."
            if latency_ms
            else ""
        ),
        "",
        "| client | seconds | MiB/s | CPU s | peak RSS MiB | pull / client (speed) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    pull = m("pull", "seconds")
    for c in CLIENTS:
        if c not in res.samples:
            continue
        lines.append(
            f"| {c} | {m(c, 'seconds'):.2f} | {m(c, 'mibs'):.0f} "
            f"| {m(c, 'cpu'):.2f} | {m(c, 'rss'):.0f} "
            f"| {ratio_text(m(c, 'seconds'), pull)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.restore_dir", description=__doc__.split("\n")[0]
    )
    p.add_argument("--small", type=int, default=200, help="256 KiB files (default 200)")
    p.add_argument("--big-mib", type=int, default=128, help="MiB in the two shards (default 128)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--latency-ms", type=float, default=0.0, help="per request, via a proxy")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from harness.servers.s3 import find_binary, start_rclone_s3

    tools = {"s5cmd": find_binary("s5cmd"), "rclone": find_binary("rclone")}
    with tempfile.TemporaryDirectory(prefix="bench-restore-dir-") as tmp:
        base = Path(tmp)
        server = start_rclone_s3(base / "data", bucket=BUCKET)
        try:
            env = client_env(server, base)
            with contextlib.ExitStack() as stack:
                port = server.port
                if args.latency_ms:
                    from harness.faultproxy import FaultPlan, FaultProxy

                    plan = FaultPlan(latency=args.latency_ms / 1000)
                    proxy = stack.enter_context(FaultProxy((server.host, server.port), plan))
                    port = proxy.port
                    env["RCLONE_CONFIG_BENCH_ENDPOINT"] = proxy.url
                load0 = os.getloadavg()[0]
                res, files = run_dirs(
                    args.small, args.big_mib, args.runs, CLIENTS, base, server, env, tools, port
                )
                load1 = os.getloadavg()[0]
        finally:
            server.close()
    name = "restore-dir" + ("-latency" if args.latency_ms else "")
    text = report(res, args.runs, files, args.latency_ms) + (
        f"\n\nLoad average (1 min) on this 2-core machine at the start and the end of these "
        f"runs: {load0:.1f} and {load1:.1f}."
    )
    print(text + "\n")
    if not args.no_write:
        from bench.report import write_section

        command = "python -m bench.restore_dir" + "".join(
            f" {a}" for a in (argv if argv is not None else sys.argv[1:])
        )
        write_section(name, text, command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
