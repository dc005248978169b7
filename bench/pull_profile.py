"""Where a verified download's CPU goes: ``ckpt-uploader pull`` of a warm 1 GiB object under
``perf record -e cpu-clock`` (the software clock: hardware counters need not exist), its
samples grouped by step.

One ``rclone serve s3`` on loopback holds a 1 GiB random object, pushed with the default
CRC64NVME digest and warmed (:func:`bench.common.warm_object`). ``pull`` runs twice under
perf: as users run it (the file left in the page cache) and with ``--fsync``. Each sample's
own symbol decides its step:

* receive: the socket's bytes copied into the destination's mapped pages (``_copy_to_iter``,
  the TCP stack);
* checksum: awscrt's CRC64NVME;
* page cache: faulting the mapped pages in, zeroing them, marking them dirty (ext4's
  delayed allocation included);
* fsync / writeback: what the process itself spends on flushing (the flusher threads' own
  work is not the process's);
* interpreter and libraries: Python, start-up and imports included;
* other kernel: scheduling, locks, system calls.

Needs ``perf`` (Debian's ``linux-perf``); not part of ``make bench``.

Usage::

    python -m bench.pull_profile [--size-mib 1024] [--no-write]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import ROOT, MiB, client_env, warm_object
from bench.report import publish

__all__ = ["main", "STEPS"]

#: (step, pattern on the symbol) in the order they are tried; Python and libraries are
#: the user-space samples no pattern names, other kernel the kernel ones.
STEPS: tuple[tuple[str, str], ...] = (
    ("checksum (CRC64NVME)", r"crc64|aws_checksums"),
    (
        "receive (socket to mapped pages)",
        r"copy_to_iter|skb|tcp|sock|recv|napi|net_|ip_|__dev|softirq|loopback|xmit|inet|sk_",
    ),
    (
        "page cache (fault, zero, dirty)",
        r"memset|zero_user|page_fault|folio|dirty|ext4|filemap|block_|mapping|lru|pte|pmd|"
        r"rmqueue|alloc_pages|clear_page|handle_mm|do_fault|zap|unmap|mmap",
    ),
    ("fsync / writeback", r"writeback|submit_bio|blk_|jbd2|fsync|nvme|virtio|scsi|bio_"),
)
ORDER = [s for s, _ in STEPS] + ["interpreter and libraries", "other kernel"]


def _steps(data: Path) -> tuple[float, dict[str, float]]:
    """CPU seconds of the recording, and the share of each step (0-100)."""
    out = subprocess.run(
        ["perf", "report", "-i", str(data), "--no-children", "--sort", "sym", "--stdio"]
        + ["-g", "none", "--percent-limit", "0"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    m = re.search(r"# Event count \(approx\.\): (\d+)", out)
    seconds = int(m.group(1)) / 1e9 if m else 0.0
    shares: collections.Counter[str] = collections.Counter()
    for line in out.splitlines():
        row = re.match(r"\s+([\d.]+)%\s+\[(.)\]\s+(\S+)", line)
        if not row:
            continue
        pct, kind, sym = float(row.group(1)), row.group(2), row.group(3)
        step = next((s for s, p in STEPS if re.search(p, sym)), None)
        if step is None:
            step = "interpreter and libraries" if kind == "." else "other kernel"
        shares[step] += pct
    return seconds, dict(shares)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.pull_profile", description=__doc__.split("\n")[0]
    )
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--no-write", action="store_true", help="print the table only")
    args = p.parse_args(argv)
    if shutil.which("perf") is None:
        raise SystemExit("perf is not installed: apt-get install linux-perf")
    from harness.data import write_random
    from harness.servers.s3 import start_rclone_s3

    gib = args.size_mib * MiB / (1 << 30)
    results: dict[str, tuple[float, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-pull-profile-") as tmp:
        base = Path(tmp)
        server = start_rclone_s3(base / "data", bucket="bench")
        try:
            env = client_env(server, base)
            src = base / "big.bin"
            write_random(src, args.size_mib * MiB)
            with server.hparams("bench").initialize_object() as store:
                store.upload_file(src, "dl/big.bin")
            src.unlink()
            warm_object(server, "bench", "dl/big.bin")
            load0 = os.getloadavg()[0]
            for variant, extra in (("pull", []), ("pull --fsync", ["--fsync"])):
                os.sync()
                data = base / "perf.data"
                dest = base / "out.bin"
                subprocess.run(
                    ["perf", "record", "-q", "-e", "cpu-clock", "-F", "2000", "-o", str(data)]
                    + ["--", sys.executable, "-m", "uploader", "pull"]
                    + [server.uri("bench", "dl/big.bin"), str(dest), "-q", *extra],
                    env=env,
                    cwd=ROOT,
                    check=True,
                    stdout=subprocess.DEVNULL,
                )
                results[variant] = _steps(data)
                dest.unlink()
            load1 = os.getloadavg()[0]
        finally:
            server.close()
    lines = [
        "## Where a verified download's CPU goes (`bench/pull_profile.py`)",
        "",
        f"`ckpt-uploader pull` of a warm {args.size_mib} MiB object (CRC64NVME digest, checked "
        "as it arrives) from `rclone serve s3` on 127.0.0.1 under `perf record -e cpu-clock`, "
        "the process's own samples grouped by the step their symbol belongs to; CPU seconds "
        "per GiB, start-up included. One run each.",
        "",
        "| step | " + " | ".join(results) + " |",
        "|---|" + "---:|" * len(results),
    ]
    for step in ORDER:
        cells = [
            f"{secs * shares.get(step, 0.0) / 100 / gib:.2f}" for secs, shares in results.values()
        ]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    lines.append(
        "| **all** | " + " | ".join(f"**{secs / gib:.2f}**" for secs, _ in results.values()) + " |"
    )
    lines += [
        "",
        f"Load average (1 min) on this 2-core machine at the start and the end of these runs: "
        f"{load0:.1f} and {load1:.1f}.",
    ]
    text = "\n".join(lines)
    publish("pull-profile", text, "bench.pull_profile", argv, not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
