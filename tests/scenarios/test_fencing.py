"""Two uploaders on one rank's pointer, shortened; and the stores that cannot fence.

Two processes, each with its own journal, run the daemon's commit path
(harness/reliability/fencing.py) on rank 0's pointer at once, 100 checkpoints each,
interleaved (200 commits in all), on moto and on Azurite, which both honour
conditional writes. ``make reliability`` runs 200 each, on LOCAL too, and the same
writers without fencing, to show what it prevents.

A real daemon's status (``ckpt-uploader status``) says whether its commits are fenced
and why, and counts the writes that lost to another writer. A store that answers 501
NotImplemented to conditional writes is played by a loopback proxy (harness/faultproxy.py)
in front of moto: no server at hand answers 501 to them, and moto itself honours the
conditions, so the 501 is the only reason the daemon falls back.
"""

from __future__ import annotations

import json
import signal
import uuid
from pathlib import Path
from typing import Any

import pytest

from harness.faultproxy import FaultPlan, FaultProxy
from harness.reliability.fencing import two_writers
from harness.servers.azure import Azurite
from harness.servers.s3 import S3Server
from tests.daemon.test_process import Daemon, atomic_write, run_cli
from uploader import ObjectStoreHparams
from uploader.bucket.pointer import CONFLICT_ATTEMPTS, PointerEntry, commit, read_pointer
from uploader.cli.main import main
from uploader.daemon.status import STATUS_FILE

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
    rclone_s3: S3Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
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
    daemon, text = _status(capsys, run, tmp_path / "s")
    assert daemon["fenced"] is False and "ignores conditional writes" in daemon["fencing"]
    assert daemon["conflicts"] == daemon["conflict_failures"] == 0
    assert "fenced: no (the store ignores conditional writes" in text, text
    _assert_committed_without_probe(rclone_s3, bucket)


def _assert_committed_without_probe(server: S3Server, bucket: str) -> None:
    """The unfenced commit landed (``ep1.pt`` is latest) and the probe left no object."""
    store = server.hparams(bucket).initialize_object()
    try:
        pointer = read_pointer(store, "exp", 0)
        assert pointer is not None and pointer.latest.name == "ep1.pt"
        assert [i.name for i in store.list("exp/") if "probe" in i.name] == []
    finally:
        store.close()


def _status(
    capsys: pytest.CaptureFixture[str], run: Path, state: Path
) -> tuple[dict[str, Any], str]:
    """The daemon part of ``ckpt-uploader status --json``, and the text form (run in
    this process: the daemon has exited, and its report is all that is read)."""
    main(["status", str(run), "--state-dir", str(state), "--json"])
    body = json.loads(capsys.readouterr().out)
    main(["status", str(run), "--state-dir", str(state)])
    return body["daemon"], capsys.readouterr().out


def test_status_shows_fenced_commits_and_the_writes_that_lost_to_another_writer(
    moto_serial_s3: S3Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A daemon on moto (which honours conditions) behind a proxy: another writer commits
    behind its back (one lost write, merged), then every conditional write is refused
    (412 from the proxy: another writer always wins), so one commit loses every write."""
    bucket = f"fence-{uuid.uuid4().hex[:8]}"
    moto_serial_s3.make_bucket(bucket)
    run, state = tmp_path / "run", tmp_path / "state"
    run.mkdir()
    rival = moto_serial_s3.hparams(bucket).initialize_object()
    with FaultProxy(("127.0.0.1", moto_serial_s3.port)) as proxy:
        uri = moto_serial_s3.uri(bucket, "exp", port=proxy.port)
        d = Daemon(
            tmp_path,
            run,
            *("--to", uri, "--settle", "0.2", "--attempts", "1", "--state-dir", str(state)),
            status=state / STATUS_FILE,  # where ckpt-uploader status finds it
        )
        try:
            d.wait_status(lambda s: s.get("fenced") is True)
            atomic_write(run / "ep1.pt", 1000, seed=1)
            d.wait_status(lambda s: s.get("committed") == 1)
            # Another writer commits to rank 0 while the daemon holds its own last version.
            commit(rival, "exp", 0, PointerEntry("other.pt", "exp/rank_0/other.pt", 1, "x", 1))
            atomic_write(run / "ep2.pt", 1000, seed=2)
            d.wait_status(lambda s: s.get("committed") == 2)
            assert d.status()["conflicts"] == 1 and d.status()["conflict_failures"] == 0
            proxy.set_plan(FaultPlan(conditional_status=412))
            atomic_write(run / "ep3.pt", 1000, seed=3)
            d.wait_status(lambda s: s.get("conflict_failures") == 1)
            d.signal(signal.SIGTERM)
            assert d.wait() == 1, d.log()  # the commit of ep3 failed for good
        finally:
            d.kill()
    try:
        pointer = read_pointer(rival, "exp", 0)
    finally:
        rival.close()
    assert pointer is not None and pointer.latest.name == "ep2.pt"
    assert {e.name for e in pointer.history} == {"ep1.pt", "ep2.pt", "other.pt"}
    daemon, text = _status(capsys, run, state)
    assert daemon["state"] == "failed" and daemon["committed"] == 2
    assert daemon["fenced"] is True and daemon["fencing"] == "conditional writes honoured"
    assert daemon["conflicts"] == 1 + CONFLICT_ATTEMPTS and daemon["conflict_failures"] == 1
    assert "fenced: yes (conditional writes honoured)" in text, text
    assert f"conflicts {1 + CONFLICT_ATTEMPTS}  conflict failures 1" in text, text


def test_a_permanent_error_on_a_pointer_write_is_not_retried(
    moto_serial_s3: S3Server, tmp_path: Path
) -> None:
    """Once the commit pointer's writes are refused for good (403 AccessDenied from the
    proxy, to the conditional writes only: the checkpoint itself uploads), the daemon
    fails the commit at the first answer instead of trying ``--attempts`` times, and
    says why."""
    bucket = f"deny-{uuid.uuid4().hex[:8]}"
    moto_serial_s3.make_bucket(bucket)
    run = tmp_path / "run"
    run.mkdir()
    with FaultProxy(("127.0.0.1", moto_serial_s3.port)) as proxy:
        uri = moto_serial_s3.uri(bucket, "exp", port=proxy.port)
        d = Daemon(tmp_path, run, "--to", uri, "--settle", "0.2", "--attempts", "4")
        try:
            d.wait_status(lambda s: s.get("fenced") is True)
            atomic_write(run / "ep1.pt", 1000, seed=1)
            d.wait_status(lambda s: s.get("committed") == 1)
            proxy.set_plan(FaultPlan(conditional_status=403))
            atomic_write(run / "ep2.pt", 1000, seed=2)
            d.wait_status(lambda s: "AccessDenied" in (s.get("last_error") or ""))
            d.signal(signal.SIGTERM)
            assert d.wait() == 2, d.log()  # refused credentials: a configuration error
        finally:
            d.kill()
        assert proxy.stats()["conditional"] == 1  # one write, not four
    assert "AuthError" in d.log() and "commit pointer" in d.log()


def test_a_store_answering_501_to_conditional_writes_commits_unfenced(
    moto_serial_s3: S3Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """501 NotImplemented to a conditional PUT means the store cannot do them: the probe
    says so (naming the 501), and the daemon commits with plain PUTs."""
    bucket = f"fence-{uuid.uuid4().hex[:8]}"
    moto_serial_s3.make_bucket(bucket)
    run = tmp_path / "run"
    (run / "rank_0").mkdir(parents=True)
    atomic_write(run / "rank_0" / "ep1.pt", 1000, seed=1)
    with FaultProxy(("127.0.0.1", moto_serial_s3.port), FaultPlan(conditional_status=501)) as proxy:
        uri = moto_serial_s3.uri(bucket, "exp", port=proxy.port)
        out = run_cli("push", str(run), "--to", uri, "--state-dir", str(tmp_path / "s"))
        answered = proxy.stats()["conditional"]
    assert out.returncode == 0, out.stderr
    log = out.stdout + out.stderr
    assert log.count("pointer commits are NOT fenced") == 1, log
    assert "HTTP 501 NotImplemented" in log, log
    assert answered == 1  # the probe's first write; the commit was a plain PUT
    daemon, text = _status(capsys, run, tmp_path / "s")
    assert daemon["fenced"] is False and "HTTP 501 NotImplemented" in daemon["fencing"]
    assert daemon["committed"] == 1 and daemon["conflicts"] == 0
    assert "fenced: no (a conditional write failed" in text, text
    _assert_committed_without_probe(moto_serial_s3, bucket)
