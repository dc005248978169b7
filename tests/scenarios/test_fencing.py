"""Two uploaders on one rank's pointer, shortened; and the stores that cannot fence.

Two processes, each with its own journal, run the daemon's commit path
(harness/reliability/fencing.py) on rank 0's pointer at once, 100 checkpoints each,
interleaved (200 commits in all), on moto and on Azurite, which both honour
conditional writes. ``make reliability`` runs 200 each, on LOCAL too, and the same
writers without fencing, to show what it prevents.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from harness.reliability.fencing import two_writers
from harness.servers.azure import Azurite
from harness.servers.s3 import S3Server
from tests.daemon.test_process import atomic_write, run_cli
from uploader import ObjectStoreHparams
from uploader.bucket.pointer import read_pointer

pytestmark = pytest.mark.timeout(240)


def _hparams(request: pytest.FixtureRequest, kind: str) -> ObjectStoreHparams:
    container = f"fence{uuid.uuid4().hex[:12]}"
    if kind == "moto":  # one request at a time: see harness/servers/moto_serial.py
        server: S3Server = request.getfixturevalue("moto_serial_s3")
        server.make_bucket(container)
        return server.hparams(container)
    az: Azurite = request.getfixturevalue("azurite")
    hp = az.hparams(container)
    hp.initialize_object(create_container=True).close()
    return hp


@pytest.mark.parametrize("kind", ["moto", "azurite"])
def test_two_writers_never_move_the_pointer_back_nor_lose_a_commit(
    request: pytest.FixtureRequest, tmp_path: Path, kind: str
) -> None:
    f = two_writers(_hparams(request, kind), "run1", tmp_path, rounds=100)
    assert f["fenced"] == 1, f
    assert f["committed"] == 200 and f["failed_commits"] == 0, f
    # Every commit either writer made is in the pointer, and latest is the newest of all.
    assert f["lost"] == 0 and f["latest_is_newest"] == 1, f
    # Neither the writers after each of their writes nor a third reader ever saw latest
    # go back to an older checkpoint.
    assert f["backwards"] == 0 and f["reads"] > 0, f
    # The writers did collide: some writes lost the race and were merged and redone.
    assert f["conflicts"] > 0, f


def test_a_store_ignoring_conditions_falls_back_and_says_so_once(
    rclone_s3: S3Server, tmp_path: Path
) -> None:
    """rclone serve s3 accepts If-None-Match / If-Match and ignores them: the daemon finds
    that out at start-up, says so once, and commits with a plain PUT as before."""
    bucket = f"fence-{uuid.uuid4().hex[:8]}"
    rclone_s3.make_bucket(bucket)
    run = tmp_path / "run"
    (run / "rank_0").mkdir(parents=True)
    atomic_write(run / "rank_0" / "ep1.pt", 1000, seed=1)
    uri = rclone_s3.uri(bucket, "exp")
    out = run_cli("push", str(run), "--to", uri, "--state-dir", str(tmp_path / "s"))
    assert out.returncode == 0, out.stderr
    log = out.stdout + out.stderr
    assert log.count("pointer commits are NOT fenced") == 1, log
    assert "ignores conditional writes" in log and "one uploader per rank" in log
    store = rclone_s3.hparams(bucket).initialize_object()
    try:
        pointer = read_pointer(store, "exp", 0)
        assert pointer is not None and pointer.latest.name == "ep1.pt"
        assert [i.name for i in store.list("exp/") if "probe" in i.name] == []
    finally:
        store.close()
