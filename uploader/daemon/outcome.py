"""How a drained daemon ends: the summary it logs, and its exit code.

* :func:`nothing_committed`: checkpoints were uploaded and none was ever committed, so
  ``latest`` names none: an error, said with what each checkpoint waits for.
* :func:`outcome`: the exit code once drained: 0 when everything accepted is verified
  and committed; 2 when a file or pointer failed for a configuration reason; 1 for any
  other failure, or when nothing was committed.
"""

from __future__ import annotations

import logging

from uploader.daemon.journal import Totals
from uploader.errors import ExitCode
from uploader.transfer.store import ObjectStore

__all__ = ["outcome", "nothing_committed"]

log = logging.getLogger("uploader.daemon.engine")


def nothing_committed(uncommitted: dict[str, str], ever: bool) -> bool:
    """True (and says so) when checkpoints wait (``uncommitted``: rel -> what for) and no
    checkpoint was ever committed from this run directory (``ever``)."""
    if not uncommitted or ever:
        return False
    log.error(
        "nothing was committed: files were uploaded, but no checkpoint is complete, so "
        "'latest' names none; waiting: %s. Check the trainer finished a save, or name the "
        "rule with --checkpoint-dir (see docs/trainers.md)",
        "; ".join(f"{rel} ({why})" for rel, why in sorted(uncommitted.items())[:10]),
    )
    return True


def outcome(
    totals: Totals,
    failures: int,
    last_error: str | None,
    config_error: str | None,
    store: ObjectStore,
    nothing_committed: bool = False,
) -> int:
    """The exit code once drained: 0 everything verified and committed; 2 failures, one
    of them for a configuration reason (``config_error``); 1 other failures, or
    checkpoints uploaded and none ever committed (``nothing_committed``)."""
    if nothing_committed and not (totals.failed or totals.pending or totals.uploading or failures):
        log.error(
            "finished: %d file(s) verified, but no checkpoint committed (see above)", totals.done
        )
        return ExitCode.FAILED
    if totals.failed or totals.pending or totals.uploading or failures:
        if config_error is not None:
            log.error(
                "finished with a configuration error: failed=%d pending=%d "
                "pointer_failures=%d error=%s; the files not sent stay in the journal: "
                "fix the configuration and start again to send them",
                totals.failed,
                totals.pending + totals.uploading,
                failures,
                config_error,
            )
            return ExitCode.CONFIG
        log.error(
            "finished with failures: failed=%d pending=%d pointer_failures=%d last_error=%s",
            totals.failed,
            totals.pending + totals.uploading,
            failures,
            last_error or totals.last_error,
        )
        return ExitCode.FAILED
    log.info(
        "finished: %d file(s) verified, %d bytes, %d request retries, %d resent on a "
        "fresh connection",
        totals.done,
        totals.bytes_done,
        store.retries.n,
        int(getattr(store.backend, "resent", 0)),
    )
    return ExitCode.OK
