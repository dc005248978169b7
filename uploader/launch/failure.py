"""WorkerError: what the training side raises when the worker process fails, and why.

The message is built from the daemon's status report (its own reason, the counts)
and, when the report has no reason, the tail of the worker's log; it always says
what to do next, and never holds a secret.
"""

from __future__ import annotations

import os
from pathlib import Path

from uploader.daemon.status import StatusReport
from uploader.errors import ExitCode, UploaderError
from uploader.redact import redact

__all__ = ["WorkerError", "worker_error"]


class WorkerError(UploaderError):
    """The worker process crashed, or could not upload and verify a checkpoint.

    ``worker_exit_code`` is the worker's exit status (None while it still runs),
    ``last_error`` its own reason (secrets removed), ``status`` its last status.
    """

    def __init__(
        self,
        message: str,
        *,
        exit_code: int | None = None,
        last_error: str | None = None,
        status: StatusReport | None = None,
    ) -> None:
        super().__init__(redact(message))
        self.worker_exit_code = exit_code
        self.last_error = redact(last_error) if last_error else None
        self.status = status


def worker_error(
    what: str,
    *,
    rank: int,
    pid: int | None,
    code: int | None,
    status: StatusReport | None,
    log_path: Path | None,
    run_dir: Path,
    state_dir: Path,
) -> WorkerError:
    """A WorkerError saying that the worker for ``rank`` ``what``, why, and what next."""
    parts = [f"the worker process for rank {rank} (pid {pid or '?'}) {what}"]
    if code is not None:
        if code < 0:
            parts.append(f"it was killed by signal {-code}")
        else:
            parts.append(f"exit code {code}: {ExitCode.describe(code)}")
    last = status.last_error if status is not None else None
    if last:
        parts.append(f"reason: {last}")
    elif log_path is not None:
        tail = _tail(log_path)
        if tail:
            parts.append(f"last log lines: {tail}")
    if status is not None and (status.outstanding or status.failed):
        parts.append(
            f"{status.failed} failed, {status.outstanding} not yet uploaded, {status.done} verified"
        )
    parts.append(f"its log: {log_path}" if log_path else "its log went to stderr")
    left = status is not None and bool(status.outstanding or status.failed)
    if code == ExitCode.CONFIG:
        parts.append("fix the setting named above and start again")
    if code != ExitCode.CONFIG or left:  # a setting that went bad mid-run left files
        parts.append(
            f"nothing accepted is lost: the journal in {state_dir} keeps it, and "
            f"'ckpt-uploader watch {run_dir} ... --state-dir {state_dir} "
            "--exit-when-idle' finishes the uploads once the cause is fixed"
        )
    return WorkerError("; ".join(parts) + ".", exit_code=code, last_error=last, status=status)


def _tail(path: Path, lines: int = 5, limit: int = 4096) -> str:
    """The last error lines of the log (else its last lines), secrets removed."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    kept = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in kept if " ERROR " in ln or "Error" in ln]
    kept = (errors or kept)[-lines:]
    return redact(" | ".join(kept))
