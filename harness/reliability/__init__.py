"""Fault and load scenarios, shared by the shortened tests and ``make reliability``.

Every scenario takes its counts and durations as arguments, runs real processes on
loopback (S3 servers, the ``ckpt-uploader`` daemon, training processes), injects its
fault, and returns a :class:`Result` with the figures that ``bench/reliability.py``
writes to docs/reliability.md. The tests in ``tests/scenarios/`` call the same
functions with small counts and assert on the figures.

Modules: ``common`` (results, audits, the daemon process, checkpoint writers),
``proxy`` (store outage, faulty network), ``process`` (kill -9, SIGKILLed training,
slow writer), ``disk`` (full disk, corrupted object), ``load`` (many ranks), ``fencing``
(two uploaders committing one rank's pointer).
"""

from __future__ import annotations

from harness.reliability.common import (
    ROOT,
    Audit,
    CheckpointWriter,
    Daemon,
    Result,
    bucket_audit,
    check_pointer_on_disk,
    journal_rows,
    rclone_server,
    sha256_file,
    wait_gone,
    write_checkpoint_file,
)
from harness.reliability.disk import (
    enospc_after,
    scenario_corrupt_object,
    scenario_disk_full,
    scenario_disk_full_late_start,
    small_filesystem,
)
from harness.reliability.fencing import scenario_two_writers, two_writers
from harness.reliability.load import scenario_load
from harness.reliability.process import (
    scenario_kill9,
    scenario_slow_writer,
    scenario_trainer_sigkill,
)
from harness.reliability.proxy import scenario_proxy_faults, scenario_server_down

__all__ = [
    "ROOT",
    "Audit",
    "CheckpointWriter",
    "Daemon",
    "Result",
    "bucket_audit",
    "check_pointer_on_disk",
    "enospc_after",
    "journal_rows",
    "rclone_server",
    "scenario_corrupt_object",
    "scenario_disk_full",
    "scenario_disk_full_late_start",
    "scenario_kill9",
    "scenario_load",
    "scenario_proxy_faults",
    "scenario_server_down",
    "scenario_slow_writer",
    "scenario_trainer_sigkill",
    "scenario_two_writers",
    "sha256_file",
    "small_filesystem",
    "two_writers",
    "wait_gone",
    "write_checkpoint_file",
]
