"""``ckpt-uploader status``: what the journal of a run directory says, and the daemon.

Reads the journal read-only, so it works while the uploader daemon runs, and the
daemon's last status report (``STATE_DIR/.ckpt-uploader.status.json``) when there is
one: its state, the checkpoints it committed, whether its pointer commits are fenced
(compare-and-swap) and why, how many of its pointer writes lost to another writer,
the checkpoints not committed and why, and the files in RUN_DIR it does not upload
and why. Unfinished multipart uploads
the journal records are listed as resumable, with the bytes the store already holds
(parts it confirmed): a restarted ``watch`` or ``push`` sends only the rest.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from uploader.cli.options import EXIT_CODES, Formatter
from uploader.daemon.journal import Journal
from uploader.daemon.progress import format_bytes
from uploader.daemon.status import STATUS_FILE, StatusReport
from uploader.errors import ExitCode
from uploader.redact import redact

__all__ = ["register", "cmd_status"]


def register(sub: Any) -> None:
    """Add the ``status`` subcommand to ``sub`` (argparse subparsers)."""
    p = sub.add_parser(
        "status",
        help="what the journal of RUN_DIR says",
        description="Counts (pending, uploading, done, failed), bytes, rate and the last "
        "error, from the journal of RUN_DIR (works while the daemon runs); resumable "
        "uploads and the bytes the store already holds of them; with the "
        "daemon's last report: checkpoints committed, whether pointer commits are fenced "
        "(and why) and how many lost to another writer, not committed (and why), and "
        "files left out (and why).",
        epilog=EXIT_CODES,
        formatter_class=Formatter,
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--state-dir", metavar="DIR", help="where the journal lives (default: RUN_DIR)")
    p.add_argument("--json", action="store_true", help="print JSON (default: text)")
    p.add_argument(
        "--files", action="store_true", help="also list every file and its state (default: off)"
    )
    p.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir or args.run_dir)
    journal = Journal.open_readonly(state_dir)
    try:
        totals = journal.totals()
        body = totals.as_dict()
        if args.files or args.json:
            body["files"] = [
                {
                    "path": r.path,
                    "state": r.state,
                    "size": r.size,
                    "object": r.object,
                    "attempts": r.attempts,
                    "digest": r.digest,
                    "last_error": r.last_error,
                }
                for r in journal.records()
            ]
        sessions = journal.sessions.all()
    finally:
        journal.close()
    body["resumable"] = [
        {
            "object": s.object,
            "size": s.size,
            "part_size": s.part_size,
            "parts_held": len(s.parts),
            "bytes_held": s.bytes_held,
            "started_at": s.started_at,
        }
        for s in sessions
    ]
    body["bytes_held"] = sum(s.bytes_held for s in sessions)
    report = StatusReport.read(state_dir / STATUS_FILE)
    if report is not None:
        body["daemon"] = {
            "pid": report.pid,
            "state": report.state,
            "committed": report.committed,
            "fenced": report.fenced,
            "fencing": report.fencing,
            "identity": redact(report.identity),
            "conflicts": report.conflicts,
            "conflict_failures": report.conflict_failures,
            "removed": report.removed,
            "rotated": report.rotated,
            "skipped_superseded": report.skipped_superseded,
            "lag_seconds": report.lag_seconds,
            "max_lag_seconds": report.max_lag_seconds,
            "pending_bytes": report.pending_bytes,
            "pending_checkpoints": report.pending_checkpoints,
            "save_interval_seconds": report.save_interval_seconds,
            "dedup_scope": report.dedup_scope,
            "dedup_new_bytes": report.dedup_new_bytes,
            "dedup_reused_bytes": report.dedup_reused_bytes,
            "incomplete": report.incomplete,
            "left_out": report.left_out,
            "left_out_count": report.left_out_count,
            "updated_at": report.updated_at,
        }
    if args.json:
        print(json.dumps(body, indent=1, sort_keys=True))
    else:
        print(
            f"pending {totals.pending}  uploading {totals.uploading}  done {totals.done}  "
            f"failed {totals.failed}"
            + (f"  removed before upload {totals.removed}" if totals.removed else "")
            + (f"  superseded {totals.superseded}" if totals.superseded else "")
        )
        print(
            f"bytes {format_bytes(totals.bytes_done)} of {format_bytes(totals.bytes_total)} "
            f"verified, rate {format_bytes(totals.rate_bytes_per_s)}/s"
        )
        if totals.last_error:
            print(f"last error: {redact(totals.last_error)}")
        if sessions:
            print(
                f"resumable {len(sessions)} upload(s): the store holds "
                f"{format_bytes(body['bytes_held'])} of "
                f"{format_bytes(sum(s.size for s in sessions))}"
            )
            for s in sessions:
                print(
                    f"  {s.object}: {format_bytes(s.bytes_held)} of {format_bytes(s.size)} "
                    f"({len(s.parts)} of {-(-s.size // s.part_size)} parts)"
                )
        if report is not None:
            _print_report(report)
        for f in body.get("files", []):
            print(f"{f['state']:<10} {f['size']:>14}  {f['path']}")
    return ExitCode.OK if totals.failed == 0 else ExitCode.FAILED


def _print_report(report: StatusReport) -> None:
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(report.updated_at))
    print(f"daemon {report.state} (pid {report.pid}, {when}): {report.committed} committed")
    if report.identity:
        print(f"identity: {redact(report.identity)}")
    fenced = {True: "yes", False: "no", None: "not known yet"}[report.fenced]
    why = f" ({redact(report.fencing)})" if report.fencing else ""
    print(
        f"fenced: {fenced}{why}  conflicts {report.conflicts}  "
        f"conflict failures {report.conflict_failures}"
    )
    print(
        f"lag {report.lag_seconds:.1f}s (largest {report.max_lag_seconds:.1f}s)  pending "
        f"{report.pending_checkpoints} checkpoint(s), {format_bytes(report.pending_bytes)}"
    )
    if report.dedup_scope is not None:
        new, reused = report.dedup_new_bytes, report.dedup_reused_bytes
        ratio = f" ({(new + reused) / new:.1f}x)" if new else ""
        print(
            f"dedup in scope {report.dedup_scope or '(root)'!r}: {format_bytes(new + reused)} "
            f"of checkpoint files, {format_bytes(new)} sent as new chunks{ratio}, "
            f"{format_bytes(reused)} already in the scope"
        )
    if report.rotated:
        print(
            f"rotated away before upload: {report.rotated} checkpoint(s) (deleted by the trainer)"
        )
    if report.skipped_superseded:
        print(
            f"skipped as superseded: {report.skipped_superseded} checkpoint(s) "
            "(--keep-remote would delete them on arrival; not sent)"
        )
    for rel, why in sorted(report.incomplete.items()):
        print(f"not committed: {rel}: {why}")
    if report.left_out_count:
        print(f"left out {report.left_out_count} file(s):")
        for rel, why in sorted(report.left_out.items()):
            print(f"  {rel}: {why}")
        if report.left_out_count > len(report.left_out):
            print(f"  ... and {report.left_out_count - len(report.left_out)} more")
