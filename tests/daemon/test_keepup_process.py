"""Keeping up with a real daemon: newest first, superseded checkpoints skipped, lag in
status, and the same policy after kill -9 and a restart with a backlog."""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from pathlib import Path

from tests.daemon.test_process import (
    Daemon,
    _journal_states,
    atomic_write,
    daemons,  # noqa: F401  (fixture)
    local_uri,
    run_cli,
    wait_for,
)
from uploader.daemon.status import STATUS_FILE

MiB = 1 << 20


def _latest(bucket: Path, prefix: str) -> str | None:
    try:
        doc = json.loads((bucket / prefix / "rank_0" / "latest.json").read_text())
    except (OSError, ValueError):
        return None
    return str(doc["latest"]["name"])


class Watcher(threading.Thread):
    """Records every name ``latest`` takes while it runs."""

    def __init__(self, bucket: Path, prefix: str) -> None:
        super().__init__(daemon=True)
        self.bucket, self.prefix = bucket, prefix
        self.seen: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            name = _latest(self.bucket, self.prefix)
            if name is not None and (not self.seen or self.seen[-1] != name):
                self.seen.append(name)
            time.sleep(0.01)


def _verified(log: str) -> list[str]:
    return re.findall(r"verified path=(ckpt/\S+)", log)


def test_watch_behind_sends_newest_first_and_skips_what_retention_deletes(
    tmp_path: Path,
    local_bucket: Path,
    daemons: list[Daemon],  # noqa: F811
) -> None:
    run = tmp_path / "run"
    (run / "ckpt").mkdir(parents=True)
    uri = local_uri(local_bucket, "kr")
    d = Daemon(
        tmp_path, run, "--to", uri, "--bwlimit", "2M", "--keep-remote", "2", "--settle", "0.2"
    )
    daemons.append(d)
    d.wait_running()
    watcher = Watcher(local_bucket, "kr")
    watcher.start()
    names = [f"ckpt/ep{i:02d}.pt" for i in range(8)]
    for i, name in enumerate(names):  # 2 MiB every 0.4 s: one takes 1 s to send
        atomic_write(run / name, 2 * MiB, seed=i)
        time.sleep(0.4)
    wait_for(lambda: _latest(local_bucket, "kr") == names[-1], 30, "latest = the last save")
    d.wait_status(
        lambda s: s.get("intake_finished") and not s.get("pending") and not s.get("uploading")
    )
    status = d.status()
    d.signal(signal.SIGTERM)
    assert d.wait() == 0, d.log()
    watcher.stop.set()
    watcher.join()
    log = d.log()
    skipped = set(re.findall(r"skipping checkpoint (\S+) ", log))
    assert skipped, log
    assert status["skipped_superseded"] == len(skipped)
    assert status["rotated"] == 0  # superseded is not "rotated away by the trainer"
    assert status["lag_seconds"] == 0
    assert status["pending_bytes"] == 0 and status["pending_checkpoints"] == 0
    assert status["max_lag_seconds"] > 0
    # At most a few checkpoints were sent, never one that retention deleted at once.
    sent = _verified(log)
    assert len(sent) <= 5, log
    assert not skipped & set(sent) - {names[-1], names[-2]}
    # A skipped checkpoint was never the one latest named; latest never went back.
    assert not skipped & set(watcher.seen), (watcher.seen, skipped)
    assert watcher.seen == sorted(watcher.seen)
    stored = sorted(p.name for p in (local_bucket / "kr" / "rank_0" / "ckpt").glob("*.pt"))
    assert stored == ["ep06.pt", "ep07.pt"]
    states = _journal_states(run)
    assert {states[n] for n in skipped} == {"superseded"}
    assert "skipped as superseded: " in log and "largest lag" in log


def test_without_keep_remote_every_checkpoint_is_sent_newest_first(
    tmp_path: Path,
    local_bucket: Path,
    daemons: list[Daemon],  # noqa: F811
) -> None:
    run = tmp_path / "run"
    (run / "ckpt").mkdir(parents=True)
    names = [f"ckpt/ep{i:02d}.pt" for i in range(5)]
    base = time.time_ns() - 10**10
    for i, name in enumerate(names):  # a backlog already there at start
        atomic_write(run / name, 1 * MiB, seed=i, mtime_ns=base + i * 10**9)
    d = Daemon(
        tmp_path,
        run,
        "--to",
        local_uri(local_bucket, "all"),
        "--bwlimit",
        "2M",
        "--settle",
        "0.2",
        "--exit-when-idle",
    )
    daemons.append(d)
    assert d.wait(60) == 0, d.log()
    sent = _verified(d.log())
    assert sorted(sent) == names
    assert sent[0] == names[-1], sent  # the newest first, the others fill in after
    assert _latest(local_bucket, "all") == names[-1]


def test_kill9_then_restart_with_a_backlog_applies_the_same_policy(
    tmp_path: Path,
    local_bucket: Path,
    daemons: list[Daemon],  # noqa: F811
) -> None:
    run = tmp_path / "run"
    (run / "ckpt").mkdir(parents=True)
    uri = local_uri(local_bucket, "k9")
    slow = Daemon(tmp_path, run, "--to", uri, "--bwlimit", "1M", "--settle", "0.2", "--files", "1")
    daemons.append(slow)
    slow.wait_running()
    names = [f"ckpt/ep{i:02d}.pt" for i in range(6)]
    base = time.time_ns() - 10**10
    for i, name in enumerate(names):
        atomic_write(run / name, 2 * MiB, seed=i, mtime_ns=base + i * 10**9)
    slow.wait_status(lambda s: s.get("uploading", 0) >= 1 or s.get("done", 0) >= 1)
    wait_for(lambda: len(_journal_states(run)) == 6, 20, "all six accepted")
    slow.proc.kill()  # SIGKILL with a backlog: no drain
    slow.wait()

    again = Daemon(
        tmp_path,
        run,
        "--to",
        uri,
        "--keep-remote",
        "2",
        "--settle",
        "0.2",
        "--exit-when-idle",
        name="d2",
    )
    daemons.append(again)
    assert again.wait(60) == 0, again.log()
    log = again.log()
    assert _latest(local_bucket, "k9") == names[-1]
    states = _journal_states(run)
    assert states[names[-1]] == "done" and states[names[-2]] == "done"
    # Whatever the first daemon did not verify, the second one skipped or sent newest
    # first; no checkpoint retention deletes stays in the bucket.
    stored = sorted(p.name for p in (local_bucket / "k9" / "rank_0" / "ckpt").glob("*.pt"))
    assert stored == ["ep04.pt", "ep05.pt"], log
    resent = _verified(log)
    assert resent and resent[0] == names[-1], log
    assert any(states[n] == "superseded" for n in names[:4]), states


def test_keep_local_deletes_a_superseded_checkpoint_only_after_a_newer_one_is_committed(
    tmp_path: Path,
    local_bucket: Path,
    daemons: list[Daemon],  # noqa: F811
) -> None:
    run = tmp_path / "run"
    (run / "ckpt").mkdir(parents=True)
    names = [f"ckpt/ep{i:02d}.pt" for i in range(4)]
    base = time.time_ns() - 10**10
    for i, name in enumerate(names):
        atomic_write(run / name, 256 << 10, seed=i, mtime_ns=base + i * 10**9)
    d = Daemon(
        tmp_path,
        run,
        "--to",
        local_uri(local_bucket, "kl"),
        "--keep-remote",
        "1",
        "--keep-local",
        "1",
        "--settle",
        "0.2",
        "--exit-when-idle",
        status=run / STATUS_FILE,
    )
    daemons.append(d)
    assert d.wait(60) == 0, d.log()
    assert _latest(local_bucket, "kl") == names[-1]
    assert sorted(p.name for p in (run / "ckpt").glob("*.pt")) == ["ep03.pt"], d.log()
    assert "superseded: not sent" in d.log()
    assert d.status()["skipped_superseded"] == 3
    out = run_cli("status", str(run), "--json")
    body = json.loads(out.stdout)
    assert body["daemon"]["skipped_superseded"] == 3
    assert body["daemon"]["lag_seconds"] == 0 and body["daemon"]["pending_bytes"] == 0
    assert body["superseded"] == 3
    text = run_cli("status", str(run)).stdout
    assert "skipped as superseded: 3 checkpoint(s)" in text and "lag 0.0s" in text


def test_directory_checkpoints_skipped_leave_nothing_behind_across_a_restart(
    tmp_path: Path,
    local_bucket: Path,
    daemons: list[Daemon],  # noqa: F811
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    uri = local_uri(local_bucket, "hf")
    args = ("--to", uri, "--bwlimit", "2M", "--keep-remote", "1", "--settle", "0.2")
    d = Daemon(tmp_path, run, *args, status=run / STATUS_FILE)
    daemons.append(d)
    d.wait_running()
    for step in range(1, 6):  # Hugging Face layout: trainer_state.json is written last
        ck = run / f"checkpoint-{step}"
        ck.mkdir()
        atomic_write(ck / "model.safetensors", 1 * MiB, seed=step)
        atomic_write(ck / "optimizer.pt", 512 << 10, seed=100 + step)
        (ck / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        time.sleep(0.3)
    wait_for(lambda: _latest(local_bucket, "hf") == "checkpoint-5", 40, "latest = checkpoint-5")
    d.wait_status(
        lambda s: s.get("intake_finished") and not s.get("pending") and not s.get("uploading")
    )
    d.signal(signal.SIGTERM)
    assert d.wait() == 0, d.log()
    log = d.log()
    assert "skipping checkpoint checkpoint-" in log, log
    assert "was not committed" not in log and "incomplete" not in log, log
    stored = {
        p.relative_to(local_bucket / "hf" / "rank_0").parts[0]
        for p in (local_bucket / "hf" / "rank_0").rglob("*")
        if p.is_file() and p.name != "latest.json"
    }
    assert stored == {"checkpoint-5"}, stored  # nothing of a skipped checkpoint stays
    again = Daemon(tmp_path, run, *args, "--exit-when-idle", name="d2", status=run / STATUS_FILE)
    daemons.append(again)
    assert again.wait(60) == 0, again.log()
    assert "incomplete" not in again.log() and "was not committed" not in again.log()
    assert again.status()["incomplete"] == {}
    assert _latest(local_bucket, "hf") == "checkpoint-5"
