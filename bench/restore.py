"""Restore benchmark: downloads (a) and time to resume a zstd checkpoint (b), against peers.

One ``rclone serve s3`` on loopback (started here) serves every client in the
same run. Each measurement runs in its own process, so its CPU time and peak RSS
are the client's alone (``os.wait4``); clients take turns within each run (the
order rotates) and the tables show medians over the runs. Every object is pushed
once by ``ObjectStore.upload_file`` (so its digest is recorded) and warmed before
any timing (:func:`bench.common.warm_object`: one HEAD, which makes the server
compute and cache its MD5, then one full read).

(a) Downloads of a random file:

* ours: ``ObjectStore.download_file`` (default options: parallel ranges received
  into the temporary file's mapped pages, digest (CRC64NVME) verified end to end, renamed into
  place; left in the page cache like every peer's file)
* ours-fsync: the same with ``fsync=True`` (``pull --fsync``): on disk before the rename
* ours-pwrite: the path taken on a filesystem that cannot allocate ahead (forced here
  by making ``reserve`` answer False): 4 MiB buffers written at their offsets
* pull: ``ckpt-uploader pull URI DEST`` (the whole process, start-up included)
* s5cmd: ``s5cmd cp``; rclone: ``rclone copyto``; boto3: ``download_file``;
  obstore: ``get`` streamed into the file

(b) Time to resume: a checkpoint of float32 tensors saved by ``ckpt`` with zstd
(``.pt.zst``), restored until every tensor is copied into a model-sized set of
tensors allocated before the timing (what ``load_state_dict`` does):

* ours: ``ckpt.load`` from the bucket (download, digest, decompression and
  deserialisation pipelined)
* s5cmd / boto3 / obstore: the download as in (a), then zstd decompression into a
  file (``zstandard``'s ``copy_stream``) and ``torch.load(weights_only=True)``

Python clients are timed inside their process around the restore (interpreter
start-up and imports excluded); the processes of (a) (s5cmd, rclone, ``pull``) over
their whole life, started by a small Python process that reads their CPU time and
peak RSS from ``RUSAGE_CHILDREN``. A Python client's peak RSS is its own ``VmHWM``
(``ru_maxrss`` would carry over the high-water mark of the process it was forked
from); in (b) it leaves out the s5cmd process the s5cmd client starts.

Usage::

    python -m bench.restore                  # (a) 1 GiB and (b) 1 GiB checkpoint, 3 runs
    python -m bench.restore --quick          # 256 MiB, 1 run, (a) and (b)
    python -m bench.restore --part a --size-mib 512 --runs 5
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    ROOT,
    boto3_client,
    client_env,
    obstore_store,
    ours_hparams,
    peak_rss_mib,
    ratio_text,
    warm_object,
)

__all__ = ["main", "DOWNLOAD_CLIENTS", "RESUME_CLIENTS"]

log = logging.getLogger("bench.restore")

MiB = 1 << 20
GiB = 1 << 30
BUCKET = "bench"
DOWNLOAD_CLIENTS = [
    "ours",
    "ours-fsync",
    "ours-pwrite",
    "pull",
    "s5cmd",
    "boto3",
    "rclone",
    "obstore",
]
RESUME_CLIENTS = ["ours", "s5cmd", "boto3", "obstore"]
#: Tensors of the checkpoint in (b): its size split into this many float32 tensors.
TENSORS = 16


# -- children ----------------------------------------------------------------------------------


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _download(client: str, key: str, path: str, endpoint: str) -> None:
    """Download ``key`` to ``path`` with a Python client (imports already done)."""
    if client in ("ours", "ours-fsync", "ours-pwrite"):
        if client == "ours-pwrite":
            from uploader.transfer import download

            download.reserve = lambda fd, size: False  # as on a filesystem without fallocate
        with ours_hparams(endpoint, BUCKET).initialize_object() as store:
            fsync = client == "ours-fsync"
            store.download_file(key, path, progress=False, require_digest=True, fsync=fsync)
    elif client == "boto3":
        boto3_client(endpoint).download_file(BUCKET, key, path)
    elif client == "obstore":
        import obstore

        ostore = obstore_store(endpoint, BUCKET)
        with open(path, "wb") as f:
            for chunk in obstore.get(ostore, key).stream(min_chunk_size=8 * MiB):
                f.write(chunk)
    elif client == "s5cmd":
        subprocess.run(
            [
                os.environ["BENCH_S5CMD"],
                "--endpoint-url",
                endpoint,
                "cp",
                f"s3://{BUCKET}/{key}",
                path,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    else:
        raise SystemExit(f"unknown client {client}")


def _child_download(client: str, key: str, path: str, endpoint: str) -> dict[str, float]:
    """One download; a binary (s5cmd, rclone, pull) runs as a subprocess of this small
    process, timed over its whole life, its CPU and peak RSS from RUSAGE_CHILDREN."""
    argv = json.loads(os.environ.get("BENCH_ARGV") or "null")
    if argv is not None:
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - t0
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        return {"seconds": seconds, "cpu": ru.ru_utime + ru.ru_stime, "rss": ru.ru_maxrss / 1024}
    if client == "boto3":
        import boto3  # noqa: F401 - imported before the timing
    t0, c0 = time.perf_counter(), _cpu()
    _download(client, key, path, endpoint)
    return {"seconds": time.perf_counter() - t0, "cpu": _cpu() - c0, "rss": peak_rss_mib()}


def _child_resume(client: str, key: str, workdir: str, endpoint: str) -> dict[str, float]:
    """Restore the checkpoint ``key`` until its tensors are copied into a model's."""
    import torch
    import zstandard

    if client == "boto3":
        import boto3  # noqa: F401
    meta = json.loads(os.environ["BENCH_CKPT_SHAPES"])
    model = {name: torch.empty(shape, dtype=torch.float32) for name, shape in meta.items()}
    for t in model.values():
        t.zero_()  # allocated and touched before the timing, as a model's parameters are
    work = Path(workdir)
    t0, c0 = time.perf_counter(), _cpu()
    if client == "ours":
        import ckpt

        state = ckpt.load(
            key, object_store=ours_hparams(endpoint, BUCKET), progress=False, tmp_dir=workdir
        )
    else:
        compressed = work / "ckpt.pt.zst"
        plain = work / "ckpt.pt"
        _download(client, key, str(compressed), endpoint)
        with open(compressed, "rb") as src, open(plain, "wb") as dst:
            zstandard.ZstdDecompressor().copy_stream(src, dst, write_size=4 * MiB)
        state = torch.load(plain, map_location="cpu", weights_only=True)
        compressed.unlink()
        plain.unlink()
    tensors = state["state"]["model"]
    for name, t in model.items():
        t.copy_(tensors[name])
    seconds, cpu = time.perf_counter() - t0, _cpu() - c0
    if set(tensors) != set(model):
        raise SystemExit(f"{client}: restored tensors {sorted(tensors)[:3]}... do not match")
    return {"seconds": seconds, "cpu": cpu, "rss": peak_rss_mib()}


# -- parent ------------------------------------------------------------------------------------


@dataclass
class Sample:
    seconds: float
    cpu: float
    rss_mib: float


@dataclass
class Results:
    size: int
    samples: dict[str, list[Sample]] = field(default_factory=dict)

    def add(self, client: str, s: Sample) -> None:
        self.samples.setdefault(client, []).append(s)

    def median(self, client: str, what: str) -> float:
        xs = self.samples.get(client, [])
        if not xs:
            return float("nan")
        if what == "mibs":
            return statistics.median(self.size / MiB / s.seconds for s in xs)
        if what == "seconds":
            return statistics.median(s.seconds for s in xs)
        if what == "cpu":
            return statistics.median(s.cpu for s in xs)
        if what == "cpu_gib":
            return statistics.median(s.cpu / (self.size / GiB) for s in xs)
        return statistics.median(s.rss_mib for s in xs)


def _measure(argv: list[str], env: dict[str, str]) -> Sample:
    """Run the child ``argv``; what it measured (its last stdout line)."""
    proc = subprocess.run(argv, env=env, capture_output=True, cwd=ROOT, check=False)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{argv[3:5]} failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[-1500:]}"
        )
    got = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    return Sample(got["seconds"], got["cpu"], got["rss"])


def _binary_argv(
    client: str, key: str, dst: Path, server: Any, tools: dict[str, str]
) -> list[str] | None:
    """The command line of a client that runs as a process of its own, else None."""
    if client == "s5cmd":
        remote = f"s3://{BUCKET}/{key}"
        return [tools["s5cmd"], "--endpoint-url", server.endpoint, "cp", remote, str(dst)]
    if client == "rclone":
        return [tools["rclone"], "copyto", f"bench:{BUCKET}/{key}", str(dst)]
    if client == "pull":
        uri = server.uri(BUCKET, key)
        return [sys.executable, "-m", "uploader", "pull", uri, str(dst), "--quiet"]
    return None


def _write_random(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(8 * MiB, left)
            f.write(os.urandom(n))
            left -= n


def _write_checkpoint(path: Path, size: int) -> dict[str, list[int]]:
    """A ``ckpt``-format checkpoint (zstd) of ``size`` bytes of float32 normal noise
    (compresses about as well as trained weights: barely); return the tensor shapes."""
    import torch

    from ckpt.codecs import compressing_writer

    per = max(1, size // 4 // TENSORS)
    gen = torch.Generator().manual_seed(0)
    shapes = {f"layer{i}.weight": [per // 1024, 1024] for i in range(TENSORS)}
    model = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
    with open(path, "wb") as raw, compressing_writer(raw, "zstd") as w:
        torch.save({"state": {"model": model}, "step": 1}, w)
    return shapes


def _rotations(clients: list[str], r: int) -> list[str]:
    return clients[r % len(clients) :] + clients[: r % len(clients)]


def run_downloads(
    size: int,
    runs: int,
    clients: list[str],
    base: Path,
    server: Any,
    env: dict[str, str],
    tools: dict[str, str],
) -> Results:
    res = Results(size)
    src = base / "random.bin"
    log.info("(a) writing %d MiB of random bytes", size // MiB)
    _write_random(src, size)
    key = "downloads/random.bin"
    with server.hparams(BUCKET).initialize_object() as store:
        store.upload_file(src, key)
    src.unlink()
    warm_object(server, BUCKET, key)
    for r in range(runs):
        for client in _rotations(clients, r):
            dst = base / f"dst-{client}.bin"
            binary = _binary_argv(client, key, dst, server, tools)
            argv = [
                sys.executable,
                "-m",
                "bench.restore",
                "--child-download",
                client,
                key,
                str(dst),
                server.endpoint,
            ]
            os.sync()  # earlier runs' dirty pages written back before the clock starts
            s = _measure(argv, dict(env, BENCH_ARGV=json.dumps(binary)))
            if dst.stat().st_size != size:
                raise RuntimeError(f"{client} downloaded {dst.stat().st_size} bytes, not {size}")
            dst.unlink()
            res.add(client, s)
            log.info(
                "(a) run %d %-8s %7.1f MiB/s  cpu %.2f s/GiB  rss %.0f MiB",
                r + 1,
                client,
                size / MiB / s.seconds,
                s.cpu / (size / GiB),
                s.rss_mib,
            )
    return res


def run_resume(
    size: int, runs: int, clients: list[str], base: Path, server: Any, env: dict[str, str]
) -> Results:
    src = base / "ep1.pt.zst"
    log.info("(b) writing a %d MiB checkpoint (zstd)", size // MiB)
    shapes = _write_checkpoint(src, size)
    res = Results(src.stat().st_size)
    key = "resume/rank_0/ep1.pt.zst"
    with server.hparams(BUCKET).initialize_object() as store:
        store.upload_file(src, key)
    src.unlink()
    warm_object(server, BUCKET, key)
    env = dict(env, BENCH_CKPT_SHAPES=json.dumps(shapes))
    for r in range(runs):
        for client in _rotations(clients, r):
            work = base / f"resume-{client}"
            work.mkdir(exist_ok=True)
            argv = [
                sys.executable,
                "-m",
                "bench.restore",
                "--child-resume",
                client,
                key,
                str(work),
                server.endpoint,
            ]
            s = _measure(argv, env)
            res.add(client, s)
            log.info(
                "(b) run %d %-8s %6.2f s  cpu %.2f s  rss %.0f MiB",
                r + 1,
                client,
                s.seconds,
                s.cpu,
                s.rss_mib,
            )
    return res


def report_downloads(res: Results, runs: int) -> str:
    m = res.median
    lines = [
        "## Restore (a): downloads (`bench/restore.py`)",
        "",
        f"{res.size // MiB} MiB random file pushed by `ObjectStore.upload_file`, `rclone serve "
        f"s3` on 127.0.0.1, the object warmed before any timing (one HEAD, so the server "
        f"computes its MD5 first, and one full read); {runs} interleaved run(s) per client, "
        "medians; `sync` before each run, so no client pays for another's writeback. `ours` "
        "verifies the recorded digest (CRC64NVME) end to end, receives into a temporary file's mapped pages and "
        "renames it into place, leaving it in the page cache as every peer does; `ours-fsync` "
        "also flushes it to disk first (`pull --fsync`); `ours-pwrite` takes the path of a "
        "filesystem that cannot allocate ahead (4 MiB buffers written at their offsets); `pull` is the whole `ckpt-uploader "
        "pull` process, start-up included. CPU is the client's (user + system) per GiB; RSS "
        "its peak resident set.",
        "",
        "| client | MiB/s | CPU s/GiB | peak RSS MiB | ours / client (speed) |",
        "|---|---:|---:|---:|---:|",
    ]
    ours = m("ours", "mibs")
    for c in DOWNLOAD_CLIENTS:
        if c not in res.samples:
            continue
        lines.append(
            f"| {c} | {m(c, 'mibs'):.0f} | {m(c, 'cpu_gib'):.2f} | {m(c, 'rss'):.0f} "
            f"| {ratio_text(ours, m(c, 'mibs'))} |"
        )
    if "s5cmd" in res.samples:
        ratio = ours / m("s5cmd", "mibs")
        lines += [
            "",
            f"Target: downloads at least 1.0x s5cmd with verification on: {ratio:.2f}x, "
            + ("met" if ratio >= 1.0 else "**not met**")
            + ("" if ratio < 1.2 else " (and the 1.2x moonshot)")
            + ".",
        ]
    return "\n".join(lines)


def report_resume(res: Results, runs: int) -> str:
    m = res.median
    lines = [
        "## Restore (b): time to resume (`bench/restore.py`)",
        "",
        f"A {res.size // MiB} MiB checkpoint (`ckpt` format, zstd, {TENSORS} float32 tensors of "
        "normal noise), pushed and warmed as in (a); from the call until every tensor is copied "
        f"into model tensors allocated beforehand. {runs} interleaved run(s) per client, "
        "medians. `ours` is `ckpt.load` from the bucket (download, digest check, zstd decompression "
        "and `torch.load(mmap=True)` pipelined); the others download, then decompress with "
        "`zstandard` into a file, then `torch.load(weights_only=True)`.",
        "",
        "| client | seconds | CPU s | peak RSS MiB | speed-up of ours |",
        "|---|---:|---:|---:|---:|",
    ]
    ours = m("ours", "seconds")
    for c in RESUME_CLIENTS:
        if c not in res.samples:
            continue
        lines.append(
            f"| {c} | {m(c, 'seconds'):.2f} | {m(c, 'cpu'):.2f} "
            f"| {m(c, 'rss'):.0f} | {ratio_text(m(c, 'seconds'), ours)} |"
        )
    peers = [m(c, "seconds") for c in RESUME_CLIENTS[1:] if c in res.samples]
    if peers:
        ratio = min(peers) / ours
        lines += [
            "",
            f"Target: at least 1.3x faster than the fastest download-then-load peer: "
            f"{ratio:.2f}x, " + ("met." if ratio >= 1.3 else "**not met**."),
        ]
    return "\n".join(lines)


def _load_note(loads: list[float]) -> str:
    """The machine's load while the table was measured: on a shared 2-core machine, a
    load far above 2 means every client got a fraction of a core, whatever it needs."""
    return (
        f"\n\nLoad average (1 min) on this {os.cpu_count()}-core machine at the start and the "
        f"end of these runs: {loads[0]:.1f} and {loads[-1]:.1f}."
    )


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in and args_in[0] in ("--child-download", "--child-resume"):
        mode, client, key, path, endpoint = args_in
        fn = _child_download if mode == "--child-download" else _child_resume
        print(json.dumps(fn(client, key, path, endpoint)))
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.restore", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="256 MiB, 1 run (a fast check)")
    p.add_argument("--part", choices=("a", "b", "all"), default="all")
    p.add_argument("--size-mib", type=int, default=None, help="size in MiB (default 1024)")
    p.add_argument("--runs", type=int, default=None, help="runs per client (default 3)")
    p.add_argument("--clients", default=None, help="comma-separated subset (with ours)")
    p.add_argument("--no-write", action="store_true", help="print the tables only")
    args = p.parse_args(args_in)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    size = (args.size_mib or (256 if args.quick else 1024)) * MiB
    runs = args.runs or (1 if args.quick else 3)
    wanted = args.clients.split(",") if args.clients else None

    def pick(all_: list[str]) -> list[str]:
        return [c for c in all_ if wanted is None or c in wanted or c == "ours"]

    from harness.servers.s3 import find_binary, start_rclone_s3

    tools = {"s5cmd": find_binary("s5cmd"), "rclone": find_binary("rclone")}
    texts: dict[str, str] = {}
    loads: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-restore-") as tmp:
        base = Path(tmp)
        server = start_rclone_s3(base / "data", bucket=BUCKET)
        try:
            env = dict(client_env(server, base), BENCH_S5CMD=tools["s5cmd"])
            if args.part in ("a", "all"):
                loads.append(os.getloadavg()[0])
                res = run_downloads(size, runs, pick(DOWNLOAD_CLIENTS), base, server, env, tools)
                loads.append(os.getloadavg()[0])
                texts["restore-download"] = report_downloads(res, runs) + _load_note(loads)
            if args.part in ("b", "all"):
                loads[:] = [os.getloadavg()[0]]
                res = run_resume(size, runs, pick(RESUME_CLIENTS), base, server, env)
                loads.append(os.getloadavg()[0])
                texts["restore-resume"] = report_resume(res, runs) + _load_note(loads)
        finally:
            server.close()
    command = "python -m bench.restore" + "".join(
        (" --quick" if args.quick else "")
        + (f" --part {args.part}" if args.part != "all" else "")
        + (f" --size-mib {args.size_mib}" if args.size_mib else "")
        + (f" --runs {args.runs}" if args.runs else "")
    )
    for name, text in texts.items():
        print(text + "\n")
        if not args.no_write:
            from bench.report import write_section

            write_section(name, text, command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
