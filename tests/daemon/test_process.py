"""The daemon as a real process: real files, real signals, the LOCAL store (a directory)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.data import write_random

REPO = Path(__file__).resolve().parents[2]


def uploader_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "uploader", *args]


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        uploader_cmd(*args), capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def wait_for(cond: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Daemon:
    """``ckpt-uploader watch`` in a subprocess, with its status file and log."""

    def __init__(
        self, tmp: Path, run_dir: Path, *args: str, name: str = "d", status: Path | None = None
    ) -> None:
        self.status_path = status or tmp / f"{name}-status.json"
        self.log_path = tmp / f"{name}.log"
        self.status_path.unlink(missing_ok=True)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            uploader_cmd("watch", str(run_dir), "--status-file", str(self.status_path), *args),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )

    def status(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.status_path.read_text()))
        except (OSError, ValueError):
            return {}

    def wait_status(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 20) -> None:
        wait_for(
            lambda: pred(self.status()), timeout, f"status ({self.status()}); log:\n{self.log()}"
        )

    def wait_running(self) -> None:
        self.wait_status(lambda s: s.get("state") == "running")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        d.kill()


def atomic_write(path: Path, size: int, seed: int = 0, mtime_ns: int | None = None) -> str:
    """Write like the training side: hidden temporary name, fsync, rename. Returns sha256."""
    tmp = path.with_name(f".{path.name}.tmp")
    write_random(tmp, size, seed)
    if mtime_ns is not None:
        os.utime(tmp, ns=(mtime_ns, mtime_ns))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
        digest = hashlib.sha256(f.read()).hexdigest()
    os.rename(tmp, path)
    return digest


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pointer(bucket: Path, prefix: str, rank: int = 0) -> dict[str, Any]:
    return dict(json.loads((bucket / prefix / f"rank_{rank}" / "latest.json").read_text()))


def _journal_states(run: Path) -> dict[str, str]:
    """Read the live journal directly (read-only), as ``status`` does."""
    from uploader.daemon.journal import Journal

    try:
        j = Journal.open_readonly(run)
    except Exception:
        return {}
    try:
        return {r.path: r.state for r in j.records()}
    finally:
        j.close()


def local_uri(bucket: Path, prefix: str) -> str:
    return f"file://{bucket}?prefix={prefix}"


def test_watch_uploads_existing_and_new_files_then_drains_on_sigterm(
    tmp_path: Path, local_bucket: Path, daemons: list[Daemon]
) -> None:
    run = tmp_path / "run" / "rank_0"
    run.mkdir(parents=True)
    before = atomic_write(run / "ep1.pt", 300_000, seed=1)
    (run / "notes.txt").write_text("not a checkpoint")  # an artifact: uploaded too
    d = Daemon(tmp_path, run, "--to", local_uri(local_bucket, "exp"), "--settle", "0.3")
    daemons.append(d)
    d.wait_status(lambda s: s.get("done") == 2)
    (run / "sub").mkdir()
    during = atomic_write(run / "sub" / "ep2.pt", 2_500_000, seed=2)
    d.wait_status(lambda s: s.get("done") == 3)
    # Accepted but still on its way when the signal arrives: the drain finishes it.
    atomic_write(run / "ep3.pt", 100_000, seed=3)
    d.wait_status(lambda s: s.get("done", 0) + s.get("pending", 0) + s.get("uploading", 0) == 4)
    d.signal(signal.SIGTERM)
    assert d.wait() == 0, d.log()
    objs = local_bucket / "exp" / "rank_0"
    assert sha256(objs / "ep1.pt") == before
    assert sha256(objs / "sub" / "ep2.pt") == during
    assert (objs / "ep3.pt").exists()
    assert (objs / "notes.txt").read_text() == "not a checkpoint"
    history = json.loads((objs / "latest.json").read_text())["history"]
    assert sorted(e["name"] for e in history) == ["ep1.pt", "ep3.pt", "sub/ep2.pt"]
    assert not list(local_bucket.rglob("*.tmp"))
    latest = pointer(local_bucket, "exp")["latest"]
    assert latest["name"] == "ep3.pt" and latest["size"] == 100_000
    final = d.status()
    assert final["state"] == "done" and final["done"] == 4 and final["failed"] == 0
    assert final["committed"] == 3 and final["left_out"] == {}
    assert final["bytes_done"] == final["bytes_total"] == 2_900_016  # + notes.txt
    # The status command reads the same journal.
    out = run_cli("status", str(run), "--json")
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert (body["done"], body["pending"], body["failed"]) == (4, 0, 0)
    assert {f["path"] for f in body["files"]} == {"ep1.pt", "sub/ep2.pt", "ep3.pt", "notes.txt"}


@pytest.mark.parametrize("attempt", range(3))
def test_sigterm_right_after_renames_still_uploads_every_file(
    tmp_path: Path, local_bucket: Path, daemons: list[Daemon], attempt: int
) -> None:
    """Checkpoints renamed into place just before SIGTERM, whose events the daemon has not
    processed yet, are part of the drain: exit 0 means all of them are in the bucket."""
    run = tmp_path / "rank_0"
    run.mkdir()
    d = Daemon(tmp_path, run, "--to", local_uri(local_bucket, "t"), "--settle", "0.3")
    daemons.append(d)
    d.wait_running()
    digests = {f"ep{i}.pt": atomic_write(run / f"ep{i}.pt", 200_000, seed=i) for i in (1, 2, 3)}
    d.signal(signal.SIGTERM)
    assert d.wait() == 0, d.log()
    objs = local_bucket / "t" / "rank_0"
    assert {n: sha256(objs / n) for n in digests} == digests
    assert pointer(local_bucket, "t")["latest"]["name"] == "ep3.pt"


def test_sigterm_before_the_engine_starts_drains_instead_of_dying(
    tmp_path: Path, local_bucket: Path, daemons: list[Daemon]
) -> None:
    run = tmp_path / "rank_0"
    run.mkdir()
    digest = atomic_write(run / "ep1.pt", 100_000, seed=7)
    d = Daemon(tmp_path, run, "--to", local_uri(local_bucket, "e"))
    daemons.append(d)
    # As soon as the status file says "starting" (store not yet open or engine not running).
    d.wait_status(lambda s: s.get("state") in ("starting", "running"))
    d.signal(signal.SIGTERM)
    assert d.wait() == 0, d.log()
    assert sha256(local_bucket / "e" / "rank_0" / "ep1.pt") == digest


def test_slow_in_place_writer_is_not_uploaded_early(
    tmp_path: Path, local_bucket: Path, daemons: list[Daemon]
) -> None:
    run = tmp_path / "rank_0"
    run.mkdir()
    d = Daemon(tmp_path, run, "--to", local_uri(local_bucket, "p"), "--settle", "0.4")
    daemons.append(d)
    d.wait_running()
    obj = local_bucket / "p" / "rank_0" / "slow.pt"
    chunk = os.urandom(64 * 1024)
    with open(run / "slow.pt", "wb") as f:
        for _ in range(10):  # 2.5 s of writing with pauses longer than --settle
            f.write(chunk)
            f.flush()
            time.sleep(0.25)
            assert not obj.exists(), "uploaded while the writer still had it open"
    d.wait_status(lambda s: s.get("done") == 1)
    assert obj.read_bytes() == chunk * 10
    d.signal(signal.SIGTERM)
    assert d.wait() == 0, d.log()


def test_file_renamed_in_from_outside_and_chmodded_is_committed_at_once(
    tmp_path: Path, local_bucket: Path, daemons: list[Daemon]
) -> None:
    # fsspec's local transaction (Lightning's checkpoint save): write a temporary file
    # in TMPDIR, rename it into RUN_DIR, chmod it. No close event is ever seen in RUN_DIR.
    run = tmp_path / "rank_0"
    run.mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    uri = local_uri(local_bucket, "p")
    d = Daemon(tmp_path, run, "--to", uri, "--settle", "0.3", "--open-timeout", "60")
    daemons.append(d)
    d.wait_running()
    digest = atomic_write(outside / "ep1.ckpt", 200_000, seed=4)
    os.chmod(outside / "ep1.ckpt", 0o600)
    os.rename(outside / "ep1.ckpt", run / "ep1.ckpt")
    os.chmod(run / "ep1.ckpt", 0o644)
    # well before --open-timeout: taken as a rename, and the chmod leaves nothing settling
    d.wait_status(lambda s: s.get("committed") == 1 and s.get("intake_finished") is True, 10)
    assert sha256(local_bucket / "p" / "rank_0" / "ep1.ckpt") == digest
    d.signal(signal.SIGTERM)
    assert d.wait() == 0, d.log()
    assert d.status()["done"] == 1


def test_writer_that_started_before_the_daemon_is_waited_for(
    tmp_path: Path, local_bucket: Path, daemons: list[Daemon]
) -> None:
    """The start-up scan finds a file another process is still writing in place (a
    sidecar restarted mid-write). No close event can tell the daemon; the kernel's
    read-lease check does: the file is taken only after its writer closes it, even
    though it stays quiet for many times --settle in between."""
    run = tmp_path / "rank_0"
    run.mkdir()
    obj = local_bucket / "p" / "rank_0" / "early.pt"
    part = os.urandom(256 * 1024)
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; f = open(sys.argv[1], 'wb'); f.write(sys.stdin.buffer.read(262144)); "
            "f.flush(); sys.stdin.buffer.read(1); f.write(sys.stdin.buffer.read()); f.close()",
            str(run / "early.pt"),
        ],
        stdin=subprocess.PIPE,
    )
    assert writer.stdin is not None
    try:
        writer.stdin.write(part)
        writer.stdin.flush()
        wait_for(lambda: (run / "early.pt").stat().st_size == len(part), 10, "first half")
        d = Daemon(tmp_path, run, "--to", local_uri(local_bucket, "p"), "--settle", "0.2")
        daemons.append(d)
        d.wait_running()
        wait_for(lambda: "still open for writing" in d.log(), 10, "the open-file notice")
        time.sleep(1.5)  # 7x --settle of quiet
        assert not obj.exists(), "uploaded while its writer still had it open"
        writer.stdin.write(b"+" + part)
        writer.stdin.close()
        assert writer.wait(10) == 0
    finally:
        if writer.poll() is None:
            writer.kill()
    d.wait_status(lambda s: s.get("done") == 1)
    assert obj.read_bytes() == part * 2
    d.signal(signal.SIGTERM)
    assert d.wait() == 0, d.log()


def test_restart_after_kill9_loses_nothing_and_reuploads_nothing(
    tmp_path: Path, local_bucket: Path, daemons: list[Daemon]
) -> None:
    run = tmp_path / "rank_0"
    run.mkdir()
    sums = {f"ep{i}.pt": atomic_write(run / f"ep{i}.pt", 2 << 20, seed=i) for i in range(1, 4)}
    uri = local_uri(local_bucket, "k9")
    slow = Daemon(tmp_path, run, "--to", uri, "--files", "1", "--bwlimit", "1M", "--settle", "0.2")
    daemons.append(slow)
    slow.wait_status(lambda s: s.get("done", 0) >= 1 and s.get("done", 0) < 3)
    slow.proc.kill()  # SIGKILL: no drain, no cleanup
    slow.wait()
    objs = local_bucket / "k9" / "rank_0"
    verified = [n for n in sums if "verified path=" + n in slow.log()]
    assert verified, slow.log()
    before = {n: (objs / n).stat().st_ino for n in verified}

    again = Daemon(tmp_path, run, "--to", uri, "--exit-when-idle", "--settle", "0.2", name="d2")
    daemons.append(again)
    assert again.wait() == 0, again.log()
    for n, digest in sums.items():
        assert sha256(objs / n) == digest
    for n, ino in before.items():
        assert (objs / n).stat().st_ino == ino, f"{n} was uploaded again"
        assert "verified path=" + n not in again.log()
    assert pointer(local_bucket, "k9")["latest"]["name"] == "ep3.pt"


def test_pointer_never_moves_back_when_an_older_checkpoint_lands_late(
    tmp_path: Path, local_bucket: Path, daemons: list[Daemon]
) -> None:
    run = tmp_path / "rank_0"
    run.mkdir()
    d = Daemon(tmp_path, run, "--to", local_uri(local_bucket, "pt"))
    daemons.append(d)
    d.wait_running()
    now = time.time_ns()
    atomic_write(run / "ep2.pt", 1000, seed=2, mtime_ns=now)
    d.wait_status(lambda s: s.get("done") == 1)
    # ep1 is older (by mtime) but finishes its upload after ep2.
    atomic_write(run / "ep1.pt", 1000, seed=1, mtime_ns=now - 10**10)
    d.wait_status(lambda s: s.get("done") == 2)
    p = pointer(local_bucket, "pt")
    assert p["latest"]["name"] == "ep2.pt"
    assert {e["name"] for e in p["history"]} == {"ep1.pt", "ep2.pt"}
    # A file changed after its upload is uploaded again; its object is overwritten.
    new = atomic_write(run / "ep2.pt", 2000, seed=9)
    obj = local_bucket / "pt" / "rank_0" / "ep2.pt"
    wait_for(lambda: obj.exists() and sha256(obj) == new, 20, "re-upload of ep2.pt")
    d.wait_status(lambda s: s.get("done") == 2 and s.get("pending") == 0)
    wait_for(lambda: pointer(local_bucket, "pt")["latest"]["size"] == 2000, 10, "pointer update")
    d.signal(signal.SIGINT)
    assert d.wait() == 0, d.log()


def test_keep_local_deletes_only_verified_and_symlinks_are_ignored(
    tmp_path: Path, local_bucket: Path
) -> None:
    run = tmp_path / "run"
    outside = tmp_path / "outside"
    run.mkdir()
    outside.mkdir()
    (outside / "secret.pt").write_bytes(b"outside the run directory")
    os.symlink(outside / "secret.pt", run / "escape.pt")
    os.symlink(outside, run / "escape_dir")
    base = time.time_ns() - 10**11
    for i in range(4):
        atomic_write(run / f"ep{i}.pt", 1000, seed=i, mtime_ns=base + i * 10**9)
    # Oldest of all, but excluded from upload: never verified, so never deleted.
    atomic_write(run / "old-excluded.pt", 10, mtime_ns=base - 10**9)
    out = run_cli(
        "push",
        str(run),
        "--to",
        local_uri(local_bucket, "ret"),
        "--keep-local",
        "2",
        "--exclude",
        "old-*",
        "--settle",
        "0.1",
    )
    assert out.returncode == 0, out.stderr
    remaining = sorted(p.name for p in run.iterdir() if not p.name.startswith("."))
    assert remaining == ["ep2.pt", "ep3.pt", "escape.pt", "escape_dir", "old-excluded.pt"]
    stored = sorted(
        str(p.relative_to(local_bucket))
        for p in local_bucket.rglob("*")
        if p.is_file() and not p.name.endswith(".ckpt-digest")
    )
    assert stored == [f"ret/rank_0/ep{i}.pt" for i in range(4)] + ["ret/rank_0/latest.json"]
    assert (outside / "secret.pt").exists()


def test_second_daemon_on_same_journal_exits_2(
    tmp_path: Path, local_bucket: Path, daemons: list[Daemon]
) -> None:
    run = tmp_path / "rank_0"
    run.mkdir()
    d = Daemon(tmp_path, run, "--to", local_uri(local_bucket, "x"))
    daemons.append(d)
    d.wait_running()
    out = run_cli("watch", str(run), "--to", local_uri(local_bucket, "x"))
    assert out.returncode == 2
    assert "already running" in out.stderr
    d.signal(signal.SIGTERM)
    assert d.wait() == 0


def _slow_daemon(tmp: Path, bucket: Path, *extra: str) -> tuple[Daemon, Path]:
    run = tmp / "rank_0"
    run.mkdir()
    atomic_write(run / "big.pt", 8 << 20)
    d = Daemon(tmp, run, "--to", local_uri(bucket, "s"), "--bwlimit", "1M", *extra)
    d.wait_status(lambda s: s.get("uploading") == 1)
    return d, run


def test_drain_timeout_exits_3_and_restart_resumes(tmp_path: Path, local_bucket: Path) -> None:
    d, run = _slow_daemon(tmp_path, local_bucket, "--drain-timeout", "0.5")
    try:
        d.signal(signal.SIGTERM)
        assert d.wait() == 3, d.log()
        assert d.status()["state"] == "failed"
    finally:
        d.kill()
    out = run_cli("push", str(run), "--to", local_uri(local_bucket, "s"))
    assert out.returncode == 0, out.stderr
    assert sha256(local_bucket / "s" / "rank_0" / "big.pt") == sha256(run / "big.pt")


def test_second_signal_exits_at_once(tmp_path: Path, local_bucket: Path) -> None:
    d, run = _slow_daemon(tmp_path, local_bucket)
    try:
        d.signal(signal.SIGTERM)
        d.wait_status(lambda s: s.get("state") == "draining")
        t0 = time.monotonic()
        d.signal(signal.SIGTERM)
        assert d.wait() == 128 + signal.SIGTERM
        assert time.monotonic() - t0 < 3
    finally:
        d.kill()
    out = run_cli("status", str(run), "--json")
    body = json.loads(out.stdout)
    assert body["uploading"] + body["pending"] == 1  # the journal still holds it


def test_parent_pid_gone_finishes_and_exits(
    tmp_path: Path, local_bucket: Path, daemons: list[Daemon]
) -> None:
    run = tmp_path / "rank_0"
    run.mkdir()
    parent = subprocess.Popen(["sleep", "60"])
    try:
        d = Daemon(
            tmp_path, run, "--to", local_uri(local_bucket, "pp"), "--parent-pid", str(parent.pid)
        )
        daemons.append(d)
        d.wait_running()
        atomic_write(run / "ep1.pt", 1000)
        time.sleep(0.2)
        assert d.proc.poll() is None
    finally:
        parent.kill()
        parent.wait()
    assert d.wait(20) == 0, d.log()
    assert (local_bucket / "pp" / "rank_0" / "ep1.pt").exists()
    assert d.status()["state"] == "done"


def test_multi_rank_run_dir_writes_one_pointer_per_rank(tmp_path: Path, local_bucket: Path) -> None:
    run = tmp_path / "run"
    for r in (0, 1):
        (run / f"rank_{r}" / "checkpoints").mkdir(parents=True)
        atomic_write(run / f"rank_{r}" / "checkpoints" / "ep1.pt", 100, seed=r)
    out = run_cli("push", str(run), "--to", local_uri(local_bucket, "mr"), "--settle", "0.1")
    assert out.returncode == 0, out.stderr
    for r in (0, 1):
        p = pointer(local_bucket, "mr", r)
        assert p["latest"]["name"] == "checkpoints/ep1.pt"
        assert p["latest"]["object"] == f"mr/rank_{r}/checkpoints/ep1.pt"
    with contextlib.suppress(FileNotFoundError):
        assert not (run / "rank_0" / ".ckpt-uploader.sqlite").exists()
    assert (run / ".ckpt-uploader.sqlite").exists()


def test_accepted_file_that_vanishes_is_counted_as_rotated_not_dropped(
    tmp_path: Path, local_bucket: Path, daemons: list[Daemon]
) -> None:
    """A checkpoint file the trainer deletes after it was accepted and before it was sent
    (Lightning's save_top_k): counted, shown in status, and no failure."""
    run = tmp_path / "rank_0"
    run.mkdir()
    d = Daemon(
        tmp_path, run, "--to", local_uri(local_bucket, "v"), "--files", "1", "--bwlimit", "1M"
    )
    daemons.append(d)
    d.wait_running()
    atomic_write(run / "a.pt", 4 << 20)  # about 3 s at 1 MiB/s
    journal = wait_for(lambda: _journal_states(run).get("a.pt") == "uploading", 10, "a.pt")
    atomic_write(run / "b.pt", 1000)  # queued behind a.pt
    wait_for(lambda: _journal_states(run).get("b.pt") == "pending", 10, "b.pt accepted")
    (run / "b.pt").unlink()
    assert journal and _journal_states(run)["a.pt"] == "uploading", "too slow to race a.pt"
    d.wait_status(lambda s: s.get("removed") == 1 and s.get("done") == 1)
    st = d.status()
    assert st["state"] == "running" and st["failed"] == 0 and st["rotated"] == 1
    d.signal(signal.SIGTERM)
    assert d.wait() == 0
    assert "rotated away before upload: 1" in d.log()
    assert pointer(local_bucket, "v")["latest"]["name"] == "a.pt"
    out = run_cli("status", str(run))
    assert out.returncode == 0 and "removed before upload 1" in out.stdout
    assert _journal_states(run)["b.pt"] == "removed"


def test_keep_remote_keeps_newest_and_never_the_pointer_target(
    tmp_path: Path, local_bucket: Path
) -> None:
    run = tmp_path / "rank_0"
    run.mkdir()
    base = time.time_ns() - 10**11
    for i in range(4):
        atomic_write(run / f"ep{i}.pt", 100, seed=i, mtime_ns=base + i * 10**9)
    uri = local_uri(local_bucket, "kr")
    out = run_cli("push", str(run), "--to", uri, "--keep-remote", "2", "--settle", "0.1")
    assert out.returncode == 0, out.stderr
    objs = local_bucket / "kr" / "rank_0"
    assert sorted(p.name for p in objs.iterdir() if p.suffix == ".pt") == ["ep2.pt", "ep3.pt"]
    assert pointer(local_bucket, "kr")["latest"]["name"] == "ep3.pt"
    # An older checkpoint arriving late is pruned, and the pointer's latest stays.
    atomic_write(run / "old.pt", 100, mtime_ns=base - 10**9)
    out = run_cli("push", str(run), "--to", uri, "--keep-remote", "2", "--settle", "0.1")
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in objs.iterdir() if p.suffix == ".pt") == ["ep2.pt", "ep3.pt"]
    assert pointer(local_bucket, "kr")["latest"]["name"] == "ep3.pt"


def test_keep_local_never_deletes_a_file_whose_upload_failed(
    tmp_path: Path, local_bucket: Path
) -> None:
    run = tmp_path / "rank_0"
    run.mkdir()
    base = time.time_ns() - 10**11
    for i in (1, 2, 3):
        atomic_write(run / f"ep{i}.pt", 1000, seed=i, mtime_ns=base + i * 10**9)
    # The store cannot take ep1: a directory sits where its object would go.
    (local_bucket / "f" / "rank_0" / "ep1.pt").mkdir(parents=True)
    out = run_cli(
        "push",
        str(run),
        "--to",
        local_uri(local_bucket, "f"),
        "--keep-local",
        "1",
        "--attempts",
        "2",
        "--retry-delay",
        "0.1",
        "--settle",
        "0.1",
    )
    assert out.returncode == 1, out.stderr
    # ep3 is the newest (kept); ep2 is verified (deleted); ep1 failed: never deleted.
    assert sorted(p.name for p in run.glob("*.pt")) == ["ep1.pt", "ep3.pt"]
    assert "failed path=ep1.pt attempts=2" in out.stderr
    body = json.loads(run_cli("status", str(run), "--json").stdout)
    states = {f["path"]: (f["state"], f["attempts"]) for f in body["files"]}
    assert states == {"ep1.pt": ("failed", 2), "ep2.pt": ("done", 1), "ep3.pt": ("done", 1)}
