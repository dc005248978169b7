"""Full-length fault and load cases; writes docs/reliability.md (``make reliability``).

Runs every scenario of ``harness/reliability/`` at its full size (the tests run
the same code shortened) against real processes on loopback, then writes one
table with the figures of each case. ``--quick`` runs the shortened sizes (to
check the harness); ``--only NAME`` runs some cases and keeps the report's
other rows as they were.

Example::

    python -m bench.reliability            # all cases, full length (about 10 minutes)
    python -m bench.reliability --quick    # the shortened forms, about 2 minutes
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness import reliability as R

__all__ = ["CASES", "main"]

DOC = Path(__file__).resolve().parent.parent / "docs" / "reliability.md"
MiB = 1 << 20

#: name -> (scenario, full-length arguments, shortened arguments)
CASES: dict[str, tuple[Callable[..., R.Result], dict[str, Any], dict[str, Any]]] = {
    "kill9": (R.scenario_kill9, {"cycles": 30}, {"cycles": 5, "max_files": 25}),
    "server_down": (
        R.scenario_server_down,
        {"size": 60 * MiB, "down_seconds": 30.0},
        {"size": 24 * MiB, "down_seconds": 3.0},
    ),
    "proxy": (R.scenario_proxy_faults, {"files": 120}, {"files": 12, "seed": 5}),
    "proxy_daemon": (
        R.scenario_proxy_faults,
        {"files": 90, "via": "daemon"},
        {"files": 9, "seed": 5, "via": "daemon"},
    ),
    "trainer_sigkill": (R.scenario_trainer_sigkill, {"runs": 6}, {"runs": 1}),
    "slow_writer": (
        R.scenario_slow_writer,
        {"files": 3, "write_seconds": 8.0, "chunks": 8},
        {"files": 1, "write_seconds": 4.0, "chunks": 4},
    ),
    "disk_full": (R.scenario_disk_full, {"fs_mib": 16, "width": 512}, {"fs_mib": 8}),
    "disk_full_injected": (
        R.scenario_disk_full,
        {"fs_mib": 16, "width": 512, "force_inject": True},
        {"fs_mib": 6, "width": 384, "force_inject": True},
    ),
    "disk_full_journal": (
        R.scenario_disk_full,
        {"fs_mib": 16, "width": 512, "journal_on_full_disk": True},
        {"fs_mib": 8, "journal_on_full_disk": True},
    ),
    "disk_full_late_start": (
        R.scenario_disk_full_late_start,
        {"fs_mib": 16, "width": 512},
        {"fs_mib": 8, "width": 384},
    ),
    "corrupt": (R.scenario_corrupt_object, {}, {"width": 600}),
    "two_writers_moto": (
        R.scenario_two_writers,
        {"store": "moto", "rounds": 200},
        {"store": "moto", "rounds": 30},
    ),
    "two_writers_azurite": (
        R.scenario_two_writers,
        {"store": "azurite", "rounds": 200},
        {"store": "azurite", "rounds": 30},
    ),
    "two_writers_local": (
        R.scenario_two_writers,
        {"store": "local", "rounds": 200},
        {"store": "local", "rounds": 30},
    ),
    "two_writers_unfenced": (
        R.scenario_two_writers,
        {"store": "moto", "rounds": 200, "unfenced": True},
        {"store": "moto", "rounds": 30, "unfenced": True},
    ),
    "load": (
        R.scenario_load,
        {"ranks": 8, "files_per_rank": 50, "size": 4 * MiB},
        {"ranks": 4, "files_per_rank": 6, "size": 4 * MiB},
    ),
}

_MAIN = ("cycles", "runs", "files", "lost", "corrupted", "retries")
_PASS = {
    "lost": 0,
    "corrupted": 0,
    "bad_pointers": 0,
    "reuploaded_after_verify": 0,
    "uploaded_before_complete": 0,
    "partial_files_left": 0,
    "files_left_by_loader": 0,
    "parent_fd_leak": 0,
    "parent_thread_leak": 0,
}

HEADER = """# Reliability

Every row below is a fault or load case run against real processes on
loopback: `rclone serve s3` as the object store, the `ckpt-uploader` daemon and
upload workers as separate processes, real training processes, real signals,
a real size-limited filesystem, and a fault-injecting TCP proxy
(`harness/faultproxy.py`) between uploader and server; the two-writer
cases (8) use moto, Azurite and a local directory, which honour conditional
writes. `make test` runs a
shortened form of every case (`tests/scenarios/`);
`make reliability` runs the full forms below with the same scenario code
(`harness/reliability/`) and rewrites this file.

*Lost*: a file written locally whose object is missing from the bucket.
*Corrupted*: an object whose bytes differ from the local file's sha256, or
fail the digest recorded at upload. *Retries*: request retries counted by the
uploader (the store's RetryPolicy; the fault proxy's own counts are in the
figures).
"""


def _cell(figures: dict[str, Any], key: str) -> str:
    v = figures.get(key)
    return "" if v is None else str(v)


def _row(name: str, r: R.Result) -> str:
    f = r.figures
    cycles = f.get("cycles", f.get("runs", f.get("ranks", "")))
    others = ", ".join(f"{k}={v}" for k, v in f.items() if k not in _MAIN and k != "ranks")
    ok = all(f.get(k, v) == v for k, v in _PASS.items())
    if "fenced" in f:
        if f["fenced"]:
            ok = ok and f["backwards"] == 0 and f["latest_is_newest"] == 1
        else:  # the control without fencing: the check must see what fencing prevents
            ok = f["lost"] > 0 or f["backwards"] > 0
    # Case-specific conditions of the contract.
    if "damaged" in f:
        ok = ok and f["refused_by_loader"] == f["damaged"] and f["verify_exit"] == 1
        ok = ok and f["verify_names_both"] == 1 and f["intact_loads"] == 1
    if "clear_error" in f:
        ok = ok and f["clear_error"] == 1 and f["uploaded"] == f["saved_before_full"]
    if "rewrites_uploaded" in f:
        ok = ok and f["rewrites_uploaded"] == f["files"]
    if "verified" in f:
        ok = ok and f["verified"] == f["files"]
    if "recorded_after_space_freed" in f:
        ok = ok and f["exit_code"] == 0 and f["uploaded"] == f["files"] >= 2
        ok = ok and f["second_run_exit"] == 0 and f["recorded_after_space_freed"] == f["files"]
    return (
        f"| {r.case} | {cycles} | {_cell(f, 'files')} | {_cell(f, 'lost')} | "
        f"{_cell(f, 'corrupted')} | {_cell(f, 'retries')} | {others} | "
        f"{'pass' if ok else '**FAIL**'} |"
    )


def write_report(
    rows: dict[str, tuple[str, list[str]]], quick: bool, only: list[str] | None = None
) -> Path:
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    produced = (
        f"_Produced by `make reliability`{' --quick' if quick else ''} on {stamp} "
        f"({platform.machine()}, Python {platform.python_version()})._"
    )
    if only:
        # Keep the date of the full run, and say which rows are newer.
        m = re.search(r"^_Produced by .*? on ([^(]+?) \(", DOC.read_text(), re.M)
        first = m.group(1) if m else "an earlier run"
        produced = (
            f"_Produced by `make reliability` on {first} "
            f"({platform.machine()}, Python {platform.python_version()}); re-run on {stamp} "
            f"with `python -m bench.reliability --only`: {', '.join(only)}._"
        )
    lines = [
        HEADER,
        produced,
        "",
        "| Case | Cycles / runs | Files | Lost | Corrupted | Retries | Other figures | Result |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    notes: list[str] = []
    for name in CASES:
        if name in rows:
            line, case_notes = rows[name]
            lines.append(line)
            notes += [f"- {line.split('|')[1].strip()}: {n}" for n in case_notes]
    lines += ["", "## Notes", "", *notes, ""]
    lines.append(f"<!-- rows: {json.dumps({k: list(v) for k, v in rows.items()})} -->")
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text("\n".join(lines) + "\n")
    return DOC


def _previous_rows() -> dict[str, tuple[str, list[str]]]:
    if not DOC.exists():
        return {}
    m = re.search(r"<!-- rows: (.*) -->", DOC.read_text())
    if not m:
        return {}
    rows = json.loads(m.group(1))
    return {k: (v, []) if isinstance(v, str) else (v[0], list(v[1])) for k, v in rows.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the shortened sizes (as in make test)")
    p.add_argument("--only", action="append", choices=sorted(CASES), help="run only these")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    rows = _previous_rows() if args.only else {}
    failed = []
    for name, (fn, full, short) in CASES.items():
        if args.only and name not in args.only:
            continue
        kwargs = short if args.quick else full
        work = Path(tempfile.mkdtemp(prefix=f"reliability-{name}-"))
        t0 = time.monotonic()
        print(f"{name}: running {fn.__name__}({kwargs}) ...", flush=True)
        try:
            result = fn(work, **kwargs)
        except Exception as exc:
            failed.append(name)
            rows[name] = (f"| {name} | | | | | | {type(exc).__name__}: {exc} | **FAIL** |", [])
            print(f"{name}: FAILED: {exc}", file=sys.stderr, flush=True)
            continue
        finally:
            shutil.rmtree(work, ignore_errors=True)
        line = _row(name, result)
        if "**FAIL**" in line:
            failed.append(name)
        rows[name] = (line, result.notes)
        print(f"{name}: {time.monotonic() - t0:.0f}s {result.figures}", flush=True)
    doc = write_report(rows, args.quick, args.only)
    print(f"wrote {doc}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
