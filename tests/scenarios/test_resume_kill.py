"""kill -9 of the daemon in the middle of multipart uploads, restarted each time, on
rclone serve s3, moto, Azurite and LOCAL: nothing lost or corrupted, and no more sent
than every file once plus the parts in flight at each kill (counted through the fault
proxy, or by the kernel for LOCAL). A shortened form of ``make reliability``'s
resume cases (harness/reliability/resume.py), which run 20 kills a store.

Also here: a file rewritten between a kill and the restart (uploaded whole from its
new content), and, on rclone, a server restart that forgets every session.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.reliability import scenario_resume_kill

MiB = 1 << 20

#: kind -> (part size, file size, bandwidth limit), the server fixture, extra arguments
CASES = {
    "rclone": ((5 * MiB, 15 * MiB, 10 * MiB), "rclone_s3", {"restart_server_every": 2}),
    "moto": ((5 * MiB, 10 * MiB, 10 * MiB), "moto_s3", {}),
    "azurite": ((MiB, 4 * MiB, 4 * MiB), "azurite", {"modify_every": 2}),
    "local": ((256 << 10, 2 * MiB, 2 * MiB), None, {"modify_every": 2}),
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_kill9_mid_upload_resumes(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    shape, fixture, extra = CASES[kind]
    server = request.getfixturevalue(fixture) if fixture else None
    if server is not None and hasattr(server, "alive") and not server.alive():
        server.start()
    r = scenario_resume_kill(tmp_path, kind, cycles=2, server=server, shape=shape, seed=3, **extra)
    assert r["lost"] == 0 and r["corrupted"] == 0, r.figures
    # n/a: LOCAL's count needs root (the daemon's /proc/PID/io is private)
    assert r["within_bound"] in (True, "n/a"), r.figures
    assert r["unfinished_uploads"] in (0, "n/a"), r.figures  # n/a: the store cannot list them
    assert r["kills"] >= 1, r.figures
