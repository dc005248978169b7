"""The daemon's status report: one dataclass, written by the daemon, read by everyone else.

The daemon rewrites its status file (``--status-file``, by default
``STATE_DIR/.ckpt-uploader.status.json``) at least every second and at exit, atomically (temporary file + rename; in place when the disk is full)::

    {"pid": 4242, "state": "running", "pending": 1, "uploading": 1, "done": 7,
     "failed": 0, "bytes_total": 1234, "bytes_done": 1000, "rate_bytes_per_s": 5e7,
     "last_error": null, "journal_saved": true, "intake_finished": true,
     "committed": 2, "fenced": true, "fencing": "conditional writes honoured",
     "conflicts": 0, "conflict_failures": 0, "removed": 0, "rotated": 0,
     "skipped_superseded": 0, "lag_seconds": 0.0, "max_lag_seconds": 1.9,
     "pending_bytes": 0, "pending_checkpoints": 0, "save_interval_seconds": 1.0,
     "incomplete": {"checkpoint-24": "no trainer_state.json yet ..."},
     "left_out": {"notes.txt.swp": "temporary name (*.swp)"}, "left_out_count": 1,
     "updated_at": 1764000000.0}

``state`` is one of :data:`STATES`. The training side (the worker handle behind the
callback and ``Sidecar``) reads only this report, never the daemon's journal. It
never holds a secret: errors pass through :func:`uploader.redact.redact`.

Example::

    StatusReport(pid=os.getpid(), state="running").write(Path("status.json"))
    report = StatusReport.read(Path("status.json"))   # None while missing
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uploader.redact import redact

__all__ = ["StatusReport", "STATES", "LEFT_OUT_SHOWN", "STATUS_FILE", "log_summary"]

log = logging.getLogger("uploader.status")

#: The daemon's states, in the order it passes through them.
STATES = ("starting", "running", "draining", "done", "failed")
#: The status file's name in the state directory, where the daemon writes it unless
#: ``--status-file`` says otherwise (``ckpt-uploader status`` reads it there).
STATUS_FILE = ".ckpt-uploader.status.json"
#: Left-out files named in a report (the count covers all).
LEFT_OUT_SHOWN = 100


@dataclass(frozen=True)
class StatusReport:
    """One reading of the daemon's progress."""

    pid: int | None = None
    state: str = "starting"
    #: files accepted and waiting, being uploaded, verified, failed for good
    pending: int = 0
    uploading: int = 0
    done: int = 0
    failed: int = 0
    bytes_total: int = 0
    bytes_done: int = 0
    rate_bytes_per_s: float = 0.0
    last_error: str | None = None
    #: False while the daemon's journal is held in memory (its disk is full): the
    #: journal file then lags behind, and this report is the word on what is verified.
    journal_saved: bool = True
    #: True once the daemon has accepted every file complete on disk that it knows
    #: of (journal resumed, start-up scan done, nothing left settling).
    intake_finished: bool = False
    #: checkpoints committed by this daemon
    committed: int = 0
    #: whether this daemon's pointer commits are compare-and-swap (None: not known
    #: yet), and why: the answer of the store's start-up probe
    fenced: bool | None = None
    fencing: str = ""
    #: pointer writes that lost to another writer (then merged and written again),
    #: and commits that lost every write in a row (then retried with backoff)
    conflicts: int = 0
    conflict_failures: int = 0
    #: files deleted from RUN_DIR before they were uploaded with their whole checkpoint
    #: (or artifacts), and checkpoints the trainer rotated away before they were
    #: committed (HF ``save_total_limit``, Lightning ``save_top_k``): counted, no failure
    removed: int = 0
    rotated: int = 0
    #: checkpoints not sent because --keep-remote would delete them on arrival (newer
    #: complete ones wait or are committed): counted as uploaded and retired, no failure
    skipped_superseded: int = 0
    #: seconds since the newest complete checkpoint not yet committed became complete
    #: (0: latest names the newest), the largest seen, bytes and checkpoints waiting, and
    #: the median seconds between two saves (None: not known yet)
    lag_seconds: float = 0.0
    max_lag_seconds: float = 0.0
    pending_bytes: int = 0
    pending_checkpoints: int = 0
    save_interval_seconds: float | None = None
    #: --dedup: the scope chunks are shared in (None: files are plain objects), and since
    #: start the bytes of checkpoint files sent as new chunks and found in the scope
    dedup_scope: str | None = None
    dedup_new_bytes: int = 0
    dedup_reused_bytes: int = 0
    #: checkpoints with files uploaded that are not committed, and why
    incomplete: dict[str, str] = dataclasses.field(default_factory=dict)
    #: files in RUN_DIR not uploaded, and why (at most LEFT_OUT_SHOWN named)
    left_out: dict[str, str] = dataclasses.field(default_factory=dict)
    left_out_count: int = 0
    #: which credentials the store is used with, in words ("web identity, role ...,
    #: expires ..."); never a secret
    identity: str = ""
    updated_at: float = 0.0

    @property
    def outstanding(self) -> int:
        """Files accepted but not yet verified."""
        return self.pending + self.uploading

    def to_dict(self) -> dict[str, Any]:
        body = dataclasses.asdict(self)
        for key in ("last_error", "fencing", "identity"):
            if body[key]:
                body[key] = redact(str(body[key]))
        if not body["updated_at"]:
            body["updated_at"] = time.time()
        return body

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StatusReport:
        """A report from parsed JSON; missing or malformed fields take their defaults."""

        def num(key: str, kind: type = int) -> Any:
            try:
                return kind(d.get(key) or 0)
            except (TypeError, ValueError):
                return kind(0)

        pid = d.get("pid")
        last = d.get("last_error")
        fenced = d.get("fenced")
        return cls(
            pid=int(pid) if isinstance(pid, int) else None,
            state=str(d.get("state") or "starting"),
            pending=num("pending"),
            uploading=num("uploading"),
            done=num("done"),
            failed=num("failed"),
            bytes_total=num("bytes_total"),
            bytes_done=num("bytes_done"),
            rate_bytes_per_s=num("rate_bytes_per_s", float),
            last_error=str(last) if last else None,
            journal_saved=d.get("journal_saved") is not False,
            intake_finished=d.get("intake_finished") is True,
            committed=num("committed"),
            fenced=fenced if isinstance(fenced, bool) else None,
            fencing=str(d.get("fencing") or ""),
            conflicts=num("conflicts"),
            conflict_failures=num("conflict_failures"),
            removed=num("removed"),
            rotated=num("rotated"),
            skipped_superseded=num("skipped_superseded"),
            dedup_scope=str(d["dedup_scope"]) if isinstance(d.get("dedup_scope"), str) else None,
            dedup_new_bytes=num("dedup_new_bytes"),
            dedup_reused_bytes=num("dedup_reused_bytes"),
            lag_seconds=num("lag_seconds", float),
            max_lag_seconds=num("max_lag_seconds", float),
            pending_bytes=num("pending_bytes"),
            pending_checkpoints=num("pending_checkpoints"),
            save_interval_seconds=_opt_float(d.get("save_interval_seconds")),
            incomplete=_str_map(d.get("incomplete")),
            left_out=_str_map(d.get("left_out")),
            left_out_count=num("left_out_count"),
            identity=str(d.get("identity") or ""),
            updated_at=num("updated_at", float),
        )

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> StatusReport | None:
        """The report in ``path``, or None when it is missing or (briefly) unreadable."""
        try:
            with open(path, "rb") as f:
                data = f.read(1 << 20)
            d = json.loads(data)
        except (OSError, ValueError):
            return None
        return cls.from_dict(d) if isinstance(d, dict) else None

    def write(self, path: Path) -> None:
        """Write this report as JSON to ``path`` atomically (readers never see half a file).

        On a full disk the file is overwritten in place instead (padded with spaces to
        its old length, in one write), which needs no new space while it fits in the
        blocks it already has; a reader that catches it half written retries.
        """
        text = (json.dumps(self.to_dict(), sort_keys=True) + "\n").encode()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(text)
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT) and _overwrite(path, text):
                return
            _warn_once(path, f"cannot write the status file {path}: {exc.strerror}")


def _opt_float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _str_map(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {str(k): str(v) for k, v in value.items()}


def _overwrite(path: Path, text: bytes) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError:
        return False
    try:
        old = os.fstat(fd).st_size
        data = text + b" " * (old - len(text)) if old > len(text) else text
        return os.pwrite(fd, data, 0) == len(data)
    except OSError:
        return False
    finally:
        os.close(fd)


_warned: dict[str, float] = {}


def _warn_once(path: Path, message: str, every: float = 60.0) -> None:
    """Log ``message`` at most once per ``every`` seconds for ``path``."""
    now = time.monotonic()
    if now - _warned.get(str(path), -every) >= every:
        _warned[str(path)] = now
        log.warning("%s", message)


def log_summary(
    root: Path,
    committed: int,
    left_out: dict[str, str],
    uncommitted: dict[str, str],
    unmatched: list[Any],
    rotated: int = 0,
    skipped: int = 0,
    max_lag: float = 0.0,
) -> None:
    """The drain summary: checkpoints committed, files left out, checkpoints the trainer
    rotated away before upload (counted: no failure), checkpoints skipped as superseded
    (not sent: retention would delete them on arrival), the largest lag seen, checkpoints
    not committed (each with the reason), ``--checkpoint-dir`` rules that matched nothing."""
    log.info("committed %d checkpoint(s); largest lag %.1fs", committed, max_lag)
    if rotated:
        log.info("rotated away before upload: %d (deleted by the trainer; not a failure)", rotated)
    if skipped:
        log.info(
            "skipped as superseded: %d (--keep-remote would delete them on arrival; "
            "not sent, not a failure)",
            skipped,
        )
    if left_out:
        shown = sorted(left_out.items())[:20]
        log.warning(
            "left out %d file(s) in %s (not uploaded): %s%s",
            len(left_out),
            root,
            "; ".join(f"{rel} ({why})" for rel, why in shown),
            " ..." if len(left_out) > len(shown) else "",
        )
    for rel, why in sorted(uncommitted.items()):
        log.warning("checkpoint %s was not committed: %s", rel, why)
    for rule in unmatched:
        log.warning(
            "--checkpoint-dir %s=%s matched no directory in %s: check GLOB (a directory "
            "name, or a path inside the rank directory) and MARKER",
            rule.glob,
            rule.marker,
            root,
        )
