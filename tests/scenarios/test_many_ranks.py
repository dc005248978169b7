"""Load, shortened: several upload workers against one server at once.

``make reliability`` runs the full form (8 ranks x 50 checkpoints of 4 MiB) with
the same scenario code (harness/reliability/) and records the figures.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.reliability import scenario_load

pytestmark = pytest.mark.timeout(240)


def test_ranks_uploading_at_once(tmp_path: Path) -> None:
    r = scenario_load(tmp_path, ranks=4, files_per_rank=6, size=4 << 20)
    assert r["files"] == 24 and r["verified"] == 24, r
    assert r["lost"] == 0 and r["corrupted"] == 0 and r["bad_pointers"] == 0, r
    # Memory: the part buffers (concurrency x part size) plus the interpreter.
    assert r["peak_worker_rss_mib"] < 200, r
    # Bounded, whatever the file count: no descriptor or thread per file.
    assert r["max_worker_fds"] < 64, r
    assert r["max_worker_threads"] < 40, r
    # The training side (this process) gets back every descriptor and thread.
    assert r["parent_fd_leak"] <= 0 and r["parent_thread_leak"] <= 0, r
