"""Faults 4-7, shortened: training SIGKILLed after a save, a slow in-place writer,
a full disk while saving, an object corrupted in the bucket.

The full-length forms run in ``make reliability`` with the same scenario code
(harness/reliability/).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.reliability import (
    scenario_corrupt_object,
    scenario_disk_full,
    scenario_disk_full_late_start,
    scenario_slow_writer,
    scenario_trainer_sigkill,
)

pytestmark = pytest.mark.timeout(240)


def test_training_sigkilled_after_a_save_still_uploads(tmp_path: Path) -> None:
    # One synchronous save, killed after epoch 1; a 6.3 MiB (multipart) checkpoint.
    r = scenario_trainer_sigkill(tmp_path, runs=1)
    assert r["files"] >= 1, r
    assert r["lost"] == 0 and r["corrupted"] == 0 and r["bad_pointers"] == 0, r


def test_slow_writer_is_never_uploaded_early_and_rewrites_are(tmp_path: Path) -> None:
    r = scenario_slow_writer(tmp_path, files=1, write_seconds=4.0, chunks=4)
    assert r["uploaded_before_complete"] == 0, r
    assert r["rewrites_uploaded"] == 1, r
    assert r["lost"] == 0 and r["corrupted"] == 0 and r["bad_pointers"] == 0, r


def test_disk_full_while_saving(tmp_path: Path) -> None:
    """A real 8 MiB tmpfs where the machine allows mounting one; otherwise ENOSPC is
    injected at the write layer (torch.save in the checkpoint writer) and the
    figures say so."""
    r = scenario_disk_full(tmp_path, fs_mib=8, width=512)
    assert r["saved_before_full"] >= 2, r
    assert r["clear_error"] == 1, r.notes
    assert r["partial_files_left"] == 0, r
    assert r["uploaded"] == r["saved_before_full"], r
    assert r["lost"] == 0 and r["corrupted"] == 0 and r["bad_pointers"] == 0, r


def test_disk_full_with_the_journal_on_the_full_disk(tmp_path: Path) -> None:
    """The default layout: the journal lives in the run directory, on the disk that fills.
    The journal's space reserve keeps it recording, so every saved checkpoint is uploaded."""
    r = scenario_disk_full(tmp_path, fs_mib=16, width=512, journal_on_full_disk=True)
    assert r["saved_before_full"] >= 2, r
    assert r["clear_error"] == 1, r.notes
    assert r["uploaded"] == r["saved_before_full"], (r, r.notes)
    assert r["lost"] == 0 and r["corrupted"] == 0 and r["bad_pointers"] == 0, r


def test_disk_full_injected_enospc(tmp_path: Path) -> None:
    """The fallback path itself (ENOSPC injected at the write layer)."""
    r = scenario_disk_full(tmp_path, fs_mib=6, width=384, force_inject=True)
    assert r["filesystem"] == "ENOSPC injected"
    assert r["clear_error"] == 1 and "No space left on device" in r.notes[0], r.notes
    assert r["uploaded"] == r["saved_before_full"] >= 2, r
    assert r["lost"] == 0 and r["corrupted"] == 0, r


def test_corrupted_object_is_refused_and_reported(tmp_path: Path) -> None:
    r = scenario_corrupt_object(tmp_path, width=600)
    assert r["refused_by_loader"] == 2, r.notes
    assert all("IntegrityError" in n for n in r.notes), r.notes
    assert r["files_left_by_loader"] == 0, r
    assert r["intact_loads"] == 1, r
    assert r["verify_exit"] == 1 and r["verify_names_both"] == 1, r


def test_disk_already_full_when_the_uploader_starts(tmp_path: Path) -> None:
    """No reserve can be set aside and the journal cannot be written: it is held in
    memory, every checkpoint is still uploaded, and a later run records them."""
    r = scenario_disk_full_late_start(tmp_path, fs_mib=8, width=384)
    assert r["files"] >= 2, r
    assert r["free_bytes_at_start"] == 0, r
    assert r["exit_code"] == 0 and r["uploaded"] == r["files"], r
    assert r["journal_in_memory"] == 1 and r["journal_saved_at_exit"] == 0, r
    assert r["lost"] == 0 and r["corrupted"] == 0 and r["bad_pointers"] == 0, r
    assert r["second_run_exit"] == 0 and r["recorded_after_space_freed"] == r["files"], r
