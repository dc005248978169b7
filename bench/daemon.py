"""Daemon benchmark: detection latency, time to durable, many small files, idle cost.

One ``rclone serve s3`` on loopback (started here) serves everything, in one run:

(a) detection latency: a small file is renamed into the watched directory;
    latency is the rename's wall-clock time to the daemon's ``sending`` log
    line, written just before the upload's first request (JSON log, ms
    resolution). Median and p90 of N samples, one rename at a time.
(b) time to durable: a large file is renamed into place; time until the
    daemon logs the commit pointer written for it, against a bare
    ``ObjectStore.upload_file`` of the same file (same part size and
    concurrency) in this process. Runs interleave; medians.
(c) many small files: ``ckpt-uploader push`` of a tree of 1 MiB files (whole
    process, start-up included, ``--files 8 --concurrency 8``) against ``rclone copy
    --transfers 8`` of the same tree. Runs interleave; medians.
(d) the daemon's CPU (fraction of one core) and RSS while idle, and its peak
    RSS and CPU while uploading (sampled with psutil every 50 ms during (b) and (c)).

Usage::

    python -m bench.daemon            # 50 samples, 1 GiB, 1,000 files, 60 s idle, 3 runs
    python -m bench.daemon --quick    # 20 samples, 128 MiB, 100 files, 5 s idle, 1 run
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
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import ROOT, client_env

__all__ = ["main"]

log = logging.getLogger("bench.daemon")

MiB = 1 << 20
BUCKET = "bench"


@dataclass
class Sampler:
    """Samples a process's RSS (peak) and CPU time in a background thread."""

    pid: int
    interval: float = 0.05
    peak_rss: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        import psutil

        self._proc = psutil.Process(self.pid)

    def cpu(self) -> float:
        t = self._proc.cpu_times()
        return float(t.user + t.system)

    def rss(self) -> int:
        return int(self._proc.memory_info().rss)

    def start(self) -> Sampler:
        self.peak_rss = 0
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                self.peak_rss = max(self.peak_rss, self.rss())
            except psutil.Error:
                return
            time.sleep(self.interval)

    def stop(self) -> int:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self.peak_rss


class LogTail:
    """Reads the daemon's JSON log file incrementally."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pos = 0
        self.buf = ""

    def wait(self, needle: str, timeout: float, poll: float = 0.02) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(self.path) as f:
                f.seek(self.pos)
                chunk = f.read()
                self.pos = f.tell()
            self.buf += chunk
            while "\n" in self.buf:
                line, self.buf = self.buf.split("\n", 1)
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if needle in rec.get("msg", ""):
                    return dict(rec)
            time.sleep(poll)
        raise TimeoutError(f"no log line with {needle!r} within {timeout}s")


def _write_random(path: Path, size: int) -> None:
    block = os.urandom(min(size, 4 * MiB)) if size else b""
    with open(path, "wb") as f:
        left, i = size, 0
        while left > 0:
            n = min(len(block), left)
            f.write(i.to_bytes(8, "little") + block[8:n] if n >= 8 else block[:n])
            left -= n
            i += 1
        f.flush()
        os.fsync(f.fileno())


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def run(samples: int, big: int, nfiles: int, idle: float, runs: int) -> dict[str, Any]:
    from harness.servers.s3 import find_binary, start_rclone_s3
    from uploader.transfer.retry import RetryPolicy

    rclone = find_binary("rclone")
    out: dict[str, Any] = {
        "durable_daemon": [],
        "durable_bare": [],
        "many_daemon": [],
        "many_rclone": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-daemon-") as tmp:
        base = Path(tmp)
        server = start_rclone_s3(base / "data", bucket=BUCKET)
        try:
            env = client_env(server, base)
            run_dir = base / "run" / "rank_0"
            run_dir.mkdir(parents=True)
            logf = base / "daemon.log"
            status = base / "status.json"
            with open(logf, "w") as lf:
                proc = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "uploader",
                        "watch",
                        str(run_dir),
                        "--to",
                        server.uri(BUCKET, "watch"),
                        "--log-format",
                        "json",
                        "-v",
                        "--status-file",
                        str(status),
                    ],
                    stdout=lf,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=ROOT,
                )
            try:
                tail = LogTail(logf)
                tail.wait("watching", 30)
                time.sleep(1.0)
                sampler = Sampler(proc.pid)
                # (a) detection latency
                lat = []
                payload = os.urandom(4096)
                for i in range(samples):
                    tmpf = run_dir / f".lat{i}.pt.tmp"
                    tmpf.write_bytes(payload)
                    t0 = time.time()
                    os.rename(tmpf, run_dir / f"lat{i}.pt")
                    rec = tail.wait(f"sending path=lat{i}.pt ", 30, poll=0.002)
                    lat.append(max(0.0, rec["ts"] - t0))
                    tail.wait(f"committed rank=0 latest=lat{i}.pt", 30)
                out["latency_ms"] = [x * 1000 for x in lat]
                # (d) idle
                time.sleep(1.0)
                c0, t0m = sampler.cpu(), time.monotonic()
                rss_idle = []
                end = t0m + idle
                while time.monotonic() < end:
                    rss_idle.append(sampler.rss())
                    time.sleep(min(1.0, idle / 5))
                out["idle_cpu"] = (sampler.cpu() - c0) / (time.monotonic() - t0m)
                out["idle_rss"] = max(rss_idle)
                # (b) time to durable, interleaved with the bare upload
                src = base / "big.bin"
                log.info("writing %d MiB", big // MiB)
                _write_random(src, big)
                peak = 0
                cpu_up = []
                hp = server.hparams(BUCKET)
                for r in range(runs):
                    name = f"big{r}.pt"
                    tmpf = run_dir / f".{name}.tmp"
                    os.link(src, tmpf)

                    def bare(r: int = r) -> None:
                        store = hp.initialize_object(retry=RetryPolicy())
                        try:
                            t1 = time.perf_counter()
                            store.upload_file(src, f"bare/big{r}.bin")
                            out["durable_bare"].append(time.perf_counter() - t1)
                        finally:
                            store.close()

                    if r % 2:  # interleave: alternate which goes first
                        bare()
                    sampler.start()
                    c0 = sampler.cpu()
                    t0 = time.time()
                    os.rename(tmpf, run_dir / name)
                    rec = tail.wait(f"committed rank=0 latest={name}", 600)
                    out["durable_daemon"].append(rec["ts"] - t0)
                    cpu_up.append((sampler.cpu() - c0) / (rec["ts"] - t0))
                    peak = max(peak, sampler.stop())
                    if not r % 2:
                        bare()
                    (run_dir / name).unlink()
                out["upload_rss"] = peak
                out["upload_cpu"] = statistics.median(cpu_up)
            finally:
                proc.terminate()
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
            # (c) many small files
            tree = base / "tree"
            tree.mkdir()
            block = os.urandom(MiB)
            for i in range(nfiles):
                (tree / f"f{i:05d}.pt").write_bytes(i.to_bytes(8, "little") + block[8:])
            many_peak = 0
            for r in range(runs):
                state = base / f"state{r}"
                t0 = time.perf_counter()
                p = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "uploader",
                        "push",
                        str(tree),
                        "--to",
                        server.uri(BUCKET, f"many{r}"),
                        "--state-dir",
                        str(state),
                        "--files",
                        "8",
                        "--concurrency",
                        "8",
                        "--settle",
                        "0.1",
                        "-q",
                    ],
                    env=env,
                    cwd=ROOT,
                )
                s = Sampler(p.pid).start()
                rc = p.wait()
                many_peak = max(many_peak, s.stop())
                out["many_daemon"].append(time.perf_counter() - t0)
                if rc != 0:
                    raise RuntimeError(f"push exited {rc}")
                shutil.rmtree(state)
                t0 = time.perf_counter()
                subprocess.run(
                    [rclone, "copy", str(tree), f"bench:{BUCKET}/rclone{r}", "--transfers", "8"],
                    env=env,
                    check=True,
                    capture_output=True,
                )
                out["many_rclone"].append(time.perf_counter() - t0)
            out["many_rss"] = many_peak
        finally:
            server.close()
    return out


def table(res: dict[str, Any], samples: int, big: int, nfiles: int, idle: float, runs: int) -> str:
    lat = res["latency_ms"]
    med = statistics.median(lat)
    dd = statistics.median(res["durable_daemon"])
    db = statistics.median(res["durable_bare"])
    md = statistics.median(res["many_daemon"])
    mr = statistics.median(res["many_rclone"])
    up_rss = max(res["upload_rss"], res["many_rss"]) / MiB

    def ok(cond: bool) -> str:
        return "yes" if cond else "**no**"

    rows = [
        "| measure | result | target | met |",
        "|---|---|---|---|",
        f"| (a) rename to first request, median of {samples} | {med:.1f} ms "
        f"(p90 {_pct(lat, 0.9):.1f} ms) | <= 50 ms | {ok(med <= 50)} |",
        f"| (b) {big // MiB} MiB: rename to pointer written | {dd:.2f} s vs bare "
        f"upload_file {db:.2f} s = {dd / db:.2f}x | <= 1.15x | {ok(dd / db <= 1.15)} |",
        f"| (c) {nfiles} x 1 MiB: `push --files 8 --concurrency 8` vs `rclone copy --transfers 8` | "
        f"{md:.2f} s vs {mr:.2f} s = {mr / md:.2f}x rclone's speed | >= 1.0x | {ok(mr / md >= 1.0)} |",
        f"| (d) idle CPU over {idle:.0f} s | {res['idle_cpu'] * 100:.2f}% of a core | < 1% | "
        f"{ok(res['idle_cpu'] < 0.01)} |",
        f"| (d) idle RSS | {res['idle_rss'] / MiB:.0f} MiB | < 100 MiB | "
        f"{ok(res['idle_rss'] / MiB < 100)} |",
        f"| (d) peak RSS while uploading ((b) and (c)) | {up_rss:.0f} MiB | < 160 MiB | "
        f"{ok(up_rss < 160)} |",
        f"| (d) CPU while uploading (b) | {res['upload_cpu'] * 100:.0f}% of a core | - | - |",
    ]
    return (
        "## Daemon\n\n"
        f"`ckpt-uploader watch` against `rclone serve s3` on loopback; {runs} interleaved "
        "run(s) for (b) and (c), medians. Default daemon options except where named.\n\n"
        + "\n".join(rows)
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="small sizes, one run")
    ap.add_argument("--samples", type=int)
    ap.add_argument("--size-mib", type=int)
    ap.add_argument("--files", type=int)
    ap.add_argument("--idle", type=float)
    ap.add_argument("--runs", type=int)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    q = args.quick
    samples = args.samples or (20 if q else 50)
    big = (args.size_mib or (128 if q else 1024)) * MiB
    nfiles = args.files or (100 if q else 1000)
    idle = args.idle or (5.0 if q else 60.0)
    runs = args.runs or (1 if q else 3)
    res = run(samples, big, nfiles, idle, runs)
    md = table(res, samples, big, nfiles, idle, runs)
    print(md)
    log.info("raw: %s", json.dumps({k: v for k, v in res.items() if k != "latency_ms"}))
    from bench.report import write_section

    cmd = "python -m bench.daemon" + (" --quick" if q else "")
    write_section("daemon", md, cmd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
