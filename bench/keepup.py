"""Keeping up: a trainer that saves faster than the uploads can go.

A loop saves a new 8 MiB single-file checkpoint every second (12 in all, each written
to a temporary name and renamed), beside ``ckpt-uploader watch RUN --to file://DEST
--bwlimit 4M``: one checkpoint takes 2 s to send, so a backlog builds. Two variants:
``--keep-remote 2``, and keeping every checkpoint. For each: the lag of the last
checkpoint (from its rename to the moment ``latest.json`` names it) against one
checkpoint's transfer time (8 MiB at 4 MiB/s = 2 s; the target is at most 2x), the MiB
and checkpoints sent (the daemon's ``verified`` lines, and uploads stopped by a skip after
their bytes went out: the bandwidth limit waits after each part, so a single put stopped
during that wait counts as sent), and those skipped as superseded.

``--base DIR`` runs the daemon from another source tree too (e.g. a git worktree of the
main branch, before this change), as one more row per variant.

Usage::

    python -m bench.keepup [--base /tmp/keep-base] [--count 12] [--size-mib 8]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import ROOT, MiB

BWLIMIT = 4 * MiB


@dataclass(frozen=True)
class Row:
    tree: str
    variant: str
    lag: float
    transfer: float
    mib_sent: float
    sent: int
    count: int
    skipped: int

    @property
    def ratio(self) -> float:
        return self.lag / self.transfer


def _latest(dest: Path) -> str | None:
    try:
        doc = json.loads((dest / "rank_0" / "latest.json").read_text())
    except (OSError, ValueError):
        return None
    latest = doc.get("latest")
    if isinstance(latest, dict):
        return str(latest.get("name") or "") or None
    return str(latest) if latest else None


def run_one(tree: str, label: str, keep: int | None, count: int, size: int, work: Path) -> Row:
    run, dest = work / "run", work / "dest"
    run.mkdir(parents=True)
    dest.mkdir()
    (run / "ckpt").mkdir()
    env = dict(os.environ, PYTHONPATH=tree)
    args = [sys.executable, "-m", "uploader", "watch", str(run), "--to", f"file://{dest}"]
    args += ["--bwlimit", "4M", "--status-file", str(work / "status.json")]
    if keep is not None:
        args += ["--keep-remote", str(keep)]
    log_path = work / "daemon.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tree)
        try:
            time.sleep(1.5)  # started and watching
            payload = os.urandom(size)
            saved: dict[str, float] = {}
            for i in range(count):
                name = f"ckpt/ep{i:02d}.pt"
                tmp = run / "ckpt" / f".ep{i:02d}.pt.tmp"
                tmp.write_bytes(payload[:-8] + i.to_bytes(8, "big"))
                os.replace(tmp, run / name)
                saved[name] = time.monotonic()
                time.sleep(1.0)
            last = f"ckpt/ep{count - 1:02d}.pt"
            deadline = time.monotonic() + 120
            while _latest(dest) != last and time.monotonic() < deadline:
                time.sleep(0.02)
            lag = time.monotonic() - saved[last]
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:  # let the older ones fill in
                try:
                    st = json.loads((work / "status.json").read_text())
                except (OSError, ValueError):
                    st = {}
                if st.get("intake_finished") and not st.get("pending") and not st.get("uploading"):
                    break
                time.sleep(0.2)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    text = log_path.read_text()
    sizes = [int(m) for m in re.findall(r"verified path=ckpt/\S+ object=\S+ size=(\d+)", text)]
    # A single put stopped by the skip went out whole (the limit waits after a part).
    sizes += [size] * len(re.findall(r"path=ckpt/\S+ stopped: its checkpoint was superseded", text))
    skipped = len(set(re.findall(r"skipping checkpoint (\S+) ", text)))
    variant = f"keep-remote {keep}" if keep is not None else "keep all"
    return Row(label, variant, lag, size / BWLIMIT, sum(sizes) / MiB, len(sizes), count, skipped)


def table(rows: list[Row]) -> str:
    lines = [
        "| tree | variant | lag of last (s) | one transfer (s) | lag / transfer "
        "| MiB sent | checkpoints sent | skipped |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.tree} | {r.variant} | {r.lag:.1f} | {r.transfer:.1f} | {r.ratio:.1f}x "
            f"| {r.mib_sent:.0f} | {r.sent} of {r.count} | {r.skipped} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", help="another source tree to run the daemon from (a row each)")
    ap.add_argument("--count", type=int, default=12)
    ap.add_argument("--size-mib", type=int, default=8)
    a = ap.parse_args(argv)
    trees = [("this tree", ROOT)] + ([("base", a.base)] if a.base else [])
    rows = []
    for label, tree in trees:
        for keep in (2, None):
            with tempfile.TemporaryDirectory(prefix="keepup-") as tmp:
                rows.append(run_one(tree, label, keep, a.count, a.size_mib * MiB, Path(tmp)))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
