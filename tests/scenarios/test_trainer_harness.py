"""The real-trainer harness (harness/trainers) itself: importing it needs no torch, its
digests, and bad arguments refused before anything runs.

What each trainer writes, exact resumes, and the incomplete state a kill in the middle of
a save leaves are checked on the runs of tests/scenarios/test_trainers_sidecar.py (the
same trainer runs, with the sidecar beside them): running each trainer twice would cost
minutes of framework imports for nothing more.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from harness.trainers import ROOT, files_digest, run_trainer

pytestmark = pytest.mark.timeout(300)

Run = subprocess.CompletedProcess[str]
KILLED = -signal.SIGKILL


def _both(*calls: Callable[[], Run]) -> list[Run]:
    """Run trainer calls two at a time (the machine has two cores)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda call: call(), calls))


def _names(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def _left_running(marker: Path) -> list[str]:
    """Processes whose command line names ``marker`` (a run directory)."""
    out = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if any(str(marker) in part for part in cmd):
            out.append(" ".join(cmd))
    return out


# -- the helpers -----------------------------------------------------------------------------


def test_trainer_modules_import_without_torch() -> None:
    code = (
        "import sys, harness.trainers, harness.trainers.lightning_run, "
        "harness.trainers.hf_run, harness.trainers.dcp_run\n"
        "heavy = [m for m in ('torch', 'transformers', 'pytorch_lightning') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_files_digest_follows_links_and_names_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.bin").write_bytes(b"abc")
    (tmp_path / "b.ckpt").write_bytes(b"")
    os.symlink("sub/a.bin", tmp_path / "last.ckpt")
    got = files_digest(tmp_path)
    abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert got == {"sub/a.bin": abc, "b.ckpt": empty, "last.ckpt": abc}


def test_run_trainer_passes_failures_back(tmp_path: Path) -> None:
    run = run_trainer("dcp_run", tmp_path, "--world-size", "two")
    assert run.returncode == 2 and "--world-size" in run.stderr
    with pytest.raises(subprocess.CalledProcessError):
        run_trainer("dcp_run", tmp_path, "--world-size", "two", check=True)
    # a kill step that is no save step would never kill: refused before anything runs
    for module, args in [
        ("dcp_run", ("--steps", "10,20", "--kill-mid-save", "15")),
        ("hf_run", ("--save-steps", "8", "--kill-mid-save", "12")),
    ]:
        run = run_trainer(module, tmp_path / module, *args)
        assert run.returncode == 2 and "is not a save step" in run.stderr, run.stderr
        assert not (tmp_path / module).exists()
