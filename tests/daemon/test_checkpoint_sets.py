"""Checkpoints as sets of files, end to end: real ``ckpt-uploader watch/push/pull/ls``
processes, real files and signals, the LOCAL store (a directory as the bucket).

Covers the layout rules (Hugging Face, torch DCP, ``--checkpoint-dir``), incomplete
checkpoints, ``kill -9`` in the middle of a directory, symlinks as aliases, left-out
files, artifacts re-uploaded at most every ``--artifact-interval``, retention by
checkpoint, format-1 pointers, and bad input.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.data import bytes_digest
from tests.daemon.test_process import (
    Daemon,
    _journal_states,
    atomic_write,
    local_uri,
    pointer,
    run_cli,
    sha256,
    wait_for,
)

SETTLE = ("--settle", "0.2")


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        d.kill()


def new_run(tmp: Path, checkpoint: str = "") -> Path:
    """The run directory ``tmp/rank_0`` (and its subdirectory ``checkpoint``), created."""
    run = tmp / "rank_0"
    (run / checkpoint).mkdir(parents=True)
    return run


def watch(
    daemons: list[Daemon],
    run: Path,
    bucket: Path,
    prefix: str,
    *args: str,
    name: str = "d",
    ready: bool = True,
) -> Daemon:
    """``ckpt-uploader watch RUN --to`` ``prefix`` of the local bucket, with ``args``; its
    files beside RUN. ``ready``: returns once it runs (its start-up scan begun)."""
    d = Daemon(run.parent, run, "--to", local_uri(bucket, prefix), *args, name=name)
    daemons.append(d)
    if ready:
        d.wait_running()
    return d


def pull_latest(bucket: Path, prefix: str, dest: Path) -> dict[str, str]:
    """``ckpt-uploader pull`` of the latest checkpoint under ``prefix`` into ``dest``;
    what it wrote there (see :func:`tree`)."""
    out = run_cli("pull", local_uri(bucket, f"{prefix}/latest"), f"{dest}/", "-q")
    assert out.returncode == 0, out.stderr
    return tree(dest)


def drain(d: Daemon, code: int = 0, timeout: float = 30) -> str:
    """SIGTERM ``d``, assert it drains with exit ``code``; its log."""
    d.signal(signal.SIGTERM)
    assert d.wait(timeout) == code, d.log()
    return d.log()


def tree(root: Path) -> dict[str, str]:
    """Every regular file under ``root`` (relative path -> sha256)."""
    return {
        p.relative_to(root).as_posix(): sha256(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def stored(bucket: Path, prefix: str) -> dict[str, str]:
    """The objects under ``prefix`` (relative path -> sha256), digest records aside."""
    return {k: v for k, v in tree(bucket / prefix).items() if not k.endswith(".ckpt-digest")}


def manifest(entry: dict[str, Any]) -> dict[str, tuple[int, str]]:
    return {f["path"]: (f["size"], f["digest"]) for f in entry["files"]}


def on_disk(run: Path, names: list[str]) -> dict[str, tuple[int, str]]:
    return {n: ((run / n).stat().st_size, bytes_digest((run / n).read_bytes())) for n in names}


def pointer_or_none(bucket: Path, prefix: str) -> dict[str, Any] | None:
    try:
        return pointer(bucket, prefix)
    except (OSError, ValueError):
        return None


def committed_names(bucket: Path, prefix: str) -> set[str]:
    p = pointer_or_none(bucket, prefix)
    return {e["name"] for e in p["history"]} if p else set()


def write_now(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


# -- 1. Hugging Face: the marker first, the other files settling after -----------------
def test_hf_dir_is_committed_only_once_every_file_is_verified(
    tmp_path: Path, local_bucket: Path, daemons: list[Daemon]
) -> None:
    run = new_run(tmp_path, "checkpoint-8")
    ck = run / "checkpoint-8"
    d = watch(daemons, run, local_bucket, "hf", *SETTLE)
    shards = {"model.safetensors": 300_000, "optimizer.pt": 200_000, "rng_state.pth": 5_000}
    bodies = {n: os.urandom(size) for n, size in shards.items()}
    # Every shard exists (written in place, still open) before the marker is complete.
    handles = {n: open(ck / n, "wb") for n in shards}
    try:
        for n, f in handles.items():
            f.write(bodies[n][: len(bodies[n]) // 2])
            f.flush()
        (ck / "trainer_state.json").write_text(json.dumps({"global_step": 8}))
        d.wait_status(lambda s: s.get("done") == 1)  # the marker alone is verified
        for i, (n, f) in enumerate(handles.items()):
            time.sleep(0.3)
            assert "checkpoint-8" not in committed_names(local_bucket, "hf"), (
                f"committed before {n} was verified"
            )
            f.write(bodies[n][len(bodies[n]) // 2 :])
            f.close()
            if i < len(handles) - 1:
                d.wait_status(lambda s, k=i + 2: s.get("done") == k)
    finally:
        for f in handles.values():
            f.close()
    d.wait_status(lambda s: s.get("committed") == 1 and s.get("done") == 4)
    names = sorted(f"checkpoint-8/{n}" for n in [*shards, "trainer_state.json"])
    p = pointer(local_bucket, "hf")
    latest = p["latest"]
    assert p["format"] == "ckpt-uploader/pointer/2"
    assert (latest["name"], latest["rule"]) == ("checkpoint-8", "hf")
    assert latest["object"] == "hf/rank_0/checkpoint-8"
    assert manifest(latest) == on_disk(run, names)
    assert latest["size"] == sum((run / n).stat().st_size for n in names)
    assert [e["name"] for e in p["history"]] == ["checkpoint-8"]
    drain(d)
    assert stored(local_bucket, "hf/rank_0") == {
        **{n: sha256(run / n) for n in names},
        "latest.json": sha256(local_bucket / "hf/rank_0/latest.json"),
    }
    restored = pull_latest(local_bucket, "hf", tmp_path / "restore")
    assert restored == {n: sha256(run / n) for n in names}


def test_hf_marker_complete_before_the_other_files_exist_is_not_committed_alone(
    tmp_path: Path, local_bucket: Path, daemons: list[Daemon]
) -> None:
    """A directory holding only its marker is not a checkpoint: the files written after
    it are waited for (files written after the marker *and* after that judgement cannot
    be: the rules trust the marker to be written last, as the trainers do)."""
    run = new_run(tmp_path, "checkpoint-9")
    ck = run / "checkpoint-9"
    d = watch(daemons, run, local_bucket, "mf", *SETTLE)
    write_now(ck / "trainer_state.json", b"{}")
    d.wait_status(lambda s: s.get("done") == 1)
    time.sleep(0.5)
    partial = pointer_or_none(local_bucket, "mf")
    write_now(ck / "model.safetensors", os.urandom(1000))
    d.wait_status(lambda s: s.get("done") == 2 and s.get("committed", 0) >= 1)
    drain(d)
    assert partial is None, partial["latest"]["files"]
    whole = pointer_or_none(local_bucket, "mf")
    assert whole is not None
    assert [f["path"] for f in whole["latest"]["files"]] == [
        "checkpoint-9/model.safetensors",
        "checkpoint-9/trainer_state.json",
    ]


# -- 2. torch DCP: .metadata last; a save without it never becomes latest --------------
def test_dcp_dir_committed_with_metadata_and_half_save_never_latest(
    tmp_path: Path, local_bucket: Path, daemons: list[Daemon]
) -> None:
    run = new_run(tmp_path)
    d = watch(daemons, run, local_bucket, "dcp", *SETTLE)
    (run / "step_10").mkdir()
    atomic_write(run / "step_10" / "__0_0.distcp", 100_000, seed=1)
    atomic_write(run / "step_10" / "__1_0.distcp", 100_000, seed=2)
    d.wait_status(lambda s: s.get("done") == 2)
    assert pointer_or_none(local_bucket, "dcp") is None  # no .metadata yet
    atomic_write(run / "step_10" / ".metadata", 2_000, seed=3)
    d.wait_status(lambda s: s.get("committed") == 1)
    # A newer save killed before its .metadata: uploaded, never committed.
    (run / "step_20").mkdir()
    atomic_write(run / "step_20" / "__0_0.distcp", 100_000, seed=4)
    atomic_write(run / "step_20" / "__1_0.distcp", 100_000, seed=5)
    d.wait_status(lambda s: s.get("done") == 5)
    drain(d)
    p = pointer(local_bucket, "dcp")
    names = [f"step_10/{n}" for n in (".metadata", "__0_0.distcp", "__1_0.distcp")]
    assert (p["latest"]["name"], p["latest"]["rule"]) == ("step_10", "dcp")
    assert manifest(p["latest"]) == on_disk(run, names)
    assert [e["name"] for e in p["history"]] == ["step_10"]
    assert d.status()["committed"] == 1
    restored = pull_latest(local_bucket, "dcp", tmp_path / "restore")
    assert restored == {n: sha256(run / n) for n in names}


# -- 3. a file of a directory checkpoint deleted before its upload ---------------------
def test_dir_file_deleted_after_accept_makes_the_checkpoint_incomplete(
    tmp_path: Path, local_bucket: Path, daemons: list[Daemon]
) -> None:
    run = new_run(tmp_path, "checkpoint-5")
    ck = run / "checkpoint-5"
    d = watch(daemons, run, local_bucket, "inc", "--files", "1", "--bwlimit", "1M", *SETTLE)
    atomic_write(run / "big.pt", 3 << 20)  # about 3 s at 1 MiB/s: the shards queue behind
    wait_for(lambda: _journal_states(run).get("big.pt") == "uploading", 10, "big.pt uploading")
    atomic_write(ck / "model.safetensors", 1000, seed=1)
    atomic_write(ck / "optimizer.pt", 1000, seed=2)
    wait_for(
        lambda: _journal_states(run).get("checkpoint-5/optimizer.pt") == "pending",
        10,
        "optimizer.pt accepted",
    )
    (ck / "optimizer.pt").unlink()
    assert _journal_states(run)["big.pt"] == "uploading", "too slow to race big.pt"
    atomic_write(ck / "trainer_state.json", 100, seed=3)
    d.wait_status(lambda s: "checkpoint-5" in s.get("incomplete", {}) and s.get("done") == 3)
    st = d.status()
    assert "optimizer.pt" in st["incomplete"]["checkpoint-5"]
    assert st["failed"] == 1 and st["committed"] == 1  # big.pt
    log = drain(d, 1)
    assert committed_names(local_bucket, "inc") == {"big.pt"}
    assert "checkpoint checkpoint-5 was not committed" in log
    assert "checkpoint-5" in d.status()["incomplete"]


def test_dir_file_deleted_while_settling_is_not_in_the_manifest(
    tmp_path: Path, local_bucket: Path, daemons: list[Daemon]
) -> None:
    """A file deleted before it was ever accepted is not part of the checkpoint: the
    daemon never knew it. What is committed is then exactly what is on disk."""
    run = new_run(tmp_path, "checkpoint-6")
    ck = run / "checkpoint-6"
    d = watch(daemons, run, local_bucket, "del", "--settle", "1.0")
    write_now(ck / "model.safetensors", os.urandom(1000))
    write_now(ck / "optimizer.pt", os.urandom(1000))
    write_now(ck / "trainer_state.json", b"{}")
    (ck / "optimizer.pt").unlink()  # well within --settle
    d.wait_status(lambda s: s.get("committed") == 1)
    drain(d)
    names = ["checkpoint-6/model.safetensors", "checkpoint-6/trainer_state.json"]
    p = pointer(local_bucket, "del")
    assert manifest(p["latest"]) == on_disk(run, names)
    assert sorted(tree(run / "checkpoint-6")) == ["model.safetensors", "trainer_state.json"]


def test_dir_file_deleted_while_settling_after_the_rest_is_verified_still_commits(
    tmp_path: Path, local_bucket: Path, daemons: list[Daemon]
) -> None:
    """The other files (marker included) are verified while one file is still being
    written; that file is then deleted before it settles. Nothing else is verified
    afterwards, yet the checkpoint (as on disk) is committed without waiting for a
    restart."""
    run = new_run(tmp_path, "checkpoint-7")
    ck = run / "checkpoint-7"
    d = watch(daemons, run, local_bucket, "del2", *SETTLE)
    with open(ck / "scratch.bin", "wb") as f:
        f.write(b"partial")
        f.flush()
        write_now(ck / "model.safetensors", os.urandom(1000))
        write_now(ck / "trainer_state.json", b"{}")
        d.wait_status(lambda s: s.get("done") == 2)
        (ck / "scratch.bin").unlink()
    d.wait_status(lambda s: s.get("committed") == 1, timeout=10)
    drain(d)
    names = ["checkpoint-7/model.safetensors", "checkpoint-7/trainer_state.json"]
    assert manifest(pointer(local_bucket, "del2")["latest"]) == on_disk(run, names)


# -- 4. kill -9 in the middle of a directory checkpoint --------------------------------
def test_kill9_between_files_of_a_dir_commits_it_once_after_restart(
    tmp_path: Path, local_bucket: Path, daemons: list[Daemon]
) -> None:
    run = new_run(tmp_path, "checkpoint-12")
    ck = run / "checkpoint-12"
    for i, n in enumerate(("model-00001.safetensors", "model-00002.safetensors", "optimizer.pt")):
        atomic_write(ck / n, 3 << 19, seed=i)  # 1.5 MiB each
    atomic_write(ck / "trainer_state.json", 200, seed=9)
    names = sorted(f"checkpoint-12/{p.name}" for p in ck.iterdir())
    slow_args = ("--files", "1", "--bwlimit", "1M", *SETTLE)
    slow = watch(daemons, run, local_bucket, "k9", *slow_args, ready=False)
    slow.wait_status(lambda s: 1 <= s.get("done", 0) < 4)
    slow.proc.kill()  # SIGKILL: no drain
    slow.wait()
    assert "committed rank=" not in slow.log()
    assert pointer_or_none(local_bucket, "k9") is None
    again = watch(
        daemons, run, local_bucket, "k9", "--exit-when-idle", *SETTLE, name="d2", ready=False
    )
    assert again.wait() == 0, again.log()
    p = pointer(local_bucket, "k9")
    assert (p["latest"]["name"], p["latest"]["rule"]) == ("checkpoint-12", "hf")
    assert manifest(p["latest"]) == on_disk(run, names)
    assert [e["name"] for e in p["history"]] == ["checkpoint-12"]
    assert again.log().count("committed rank=0") == 1
    assert {k: v for k, v in stored(local_bucket, "k9/rank_0").items() if k != "latest.json"} == {
        n: sha256(run / n) for n in names
    }


# -- 5. symlinks: aliases inside RUN_DIR; outside and loops left out --------------------
def test_symlinks_alias_inside_and_left_out_outside_or_looping(
    tmp_path: Path, local_bucket: Path, daemons: list[Daemon]
) -> None:
    run = new_run(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.ckpt").write_bytes(b"never uploaded")
    digest = atomic_write(run / "epoch=2-step=24.ckpt", 50_000, seed=2)
    os.symlink("epoch=2-step=24.ckpt", run / "last.ckpt")
    os.symlink(outside / "secret.ckpt", run / "escape.ckpt")
    os.symlink("b", run / "a")
    os.symlink("a", run / "b")
    d = watch(daemons, run, local_bucket, "ln", *SETTLE, ready=False)
    wait_for(lambda: (pointer_or_none(local_bucket, "ln") or {}).get("aliases"), 15, "the alias")
    d.wait_status(lambda s: s.get("committed") == 1 and len(s.get("left_out", {})) == 3)
    left = d.status()["left_out"]
    assert set(left) == {"escape.ckpt", "a", "b"}
    assert all("symlink" in why for why in left.values()), left
    drain(d, timeout=15)
    p = pointer(local_bucket, "ln")
    assert p["aliases"] == {"last.ckpt": "epoch=2-step=24.ckpt"}
    assert p["latest"]["name"] == "epoch=2-step=24.ckpt"
    assert stored(local_bucket, "ln/rank_0") == {
        "epoch=2-step=24.ckpt": digest,
        "latest.json": sha256(local_bucket / "ln/rank_0/latest.json"),
    }
    dest = tmp_path / "restored.ckpt"
    out = run_cli("pull", local_uri(local_bucket, "ln/rank_0/last.ckpt"), str(dest), "-q")
    assert out.returncode == 0, out.stderr
    assert sha256(dest) == digest
    # into a directory, an alias lands under its own name
    into = tmp_path / "into"
    out = run_cli("pull", local_uri(local_bucket, "ln/rank_0/last.ckpt"), f"{into}/", "-q")
    assert out.returncode == 0, out.stderr
    assert [p.name for p in into.iterdir()] == ["last.ckpt"]
    assert sha256(into / "last.ckpt") == digest


# -- 6. left-out files ------------------------------------------------------------------
def test_left_out_files_show_in_status_and_summary_and_the_rest_is_uploaded(
    tmp_path: Path, local_bucket: Path, daemons: list[Daemon]
) -> None:
    run = new_run(tmp_path)
    for name in ("x.tmp", "notes.txt.swp", "debug.log", "config.yaml", ".hidden_file"):
        (run / name).write_text(f"body of {name}")
    (run / "sub").mkdir()
    (run / "sub" / "metrics.csv").write_text("step,loss\n1,0.5\n")
    d = watch(daemons, run, local_bucket, "lo", "--exclude", "*.log", *SETTLE, ready=False)
    d.wait_status(lambda s: s.get("done") == 3 and s.get("left_out_count") == 3)
    st = d.status()
    assert st["left_out"] == {
        "x.tmp": "temporary name (*.tmp)",
        "notes.txt.swp": "temporary name (*.swp)",
        "debug.log": "excluded by --exclude *.log",
    }
    log = drain(d)
    assert "left out 3 file(s)" in log
    for piece in ("x.tmp (temporary name", "notes.txt.swp (temporary", "debug.log (excluded"):
        assert piece in log
    assert stored(local_bucket, "lo/rank_0") == {
        n: sha256(run / n) for n in ("config.yaml", ".hidden_file", "sub/metrics.csv")
    }


# -- 7. artifacts: uploaded while changing, throttled, final content at the end --------
def test_growing_log_is_uploaded_throttled_and_final_after_sigterm(
    tmp_path: Path, local_bucket: Path, daemons: list[Daemon]
) -> None:
    run = new_run(tmp_path)
    d = watch(daemons, run, local_bucket, "art", "--artifact-interval", "2", *SETTLE)
    obj = local_bucket / "art" / "rank_0" / "train.log"
    interval, least, most = 2.0, 6.0, 30.0  # written for 6 s, longer if the machine is slow
    with open(run / "train.log", "a") as log:  # held open, as a logger does
        t0 = time.monotonic()
        i = count = 0
        uploaded_while_writing = False
        while (elapsed := time.monotonic() - t0) < least or (count < 2 and elapsed < most):
            log.write(f"step {i} loss {1 / (i + 1):.4f}\n")
            log.flush()
            i += 1
            uploaded_while_writing = uploaded_while_writing or obj.exists()
            count = d.log().count("verified path=train.log")
            time.sleep(0.2)
        elapsed = time.monotonic() - t0
        count = d.log().count("verified path=train.log")
        assert uploaded_while_writing, d.log()
        # again while it changes, and throttled: at most one upload per interval
        assert 2 <= count <= elapsed / interval + 2, d.log()
        log.write("the last line\n")
        log.flush()
        drain(d)
    assert obj.read_bytes() == (run / "train.log").read_bytes()
    assert obj.read_bytes().endswith(b"the last line\n")
    st = d.status()
    assert st["failed"] == 0 and st["committed"] == 0
    assert "failed path=train.log" not in d.log()
    assert pointer_or_none(local_bucket, "art") is None


# -- 8. retention by checkpoint ---------------------------------------------------------
def test_retention_keeps_the_newest_dir_checkpoint_locally_and_remotely(
    tmp_path: Path, local_bucket: Path, daemons: list[Daemon]
) -> None:
    run = new_run(tmp_path)
    (run / "config.yaml").write_text("lr: 0.1\n")
    keep = ("--keep-local", "1", "--keep-remote", "1")
    d = watch(daemons, run, local_bucket, "ret", *keep, *SETTLE)
    for step in (1, 2, 3):
        ck = run / f"checkpoint-{step}"
        ck.mkdir()
        atomic_write(ck / "model.safetensors", 20_000, seed=step)
        atomic_write(ck / "optimizer.pt", 10_000, seed=10 + step)
        atomic_write(ck / "trainer_state.json", 100, seed=20 + step)
        d.wait_status(lambda s, k=step: s.get("committed") == k)
    wait_for(lambda: not (run / "checkpoint-2").exists(), 10, "local retention of checkpoint-2")
    drain(d)
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == [
        "checkpoint-3",
        "config.yaml",
    ]
    newest = sorted(f"checkpoint-3/{p.name}" for p in (run / "checkpoint-3").iterdir())
    assert stored(local_bucket, "ret/rank_0") == {
        **{n: sha256(run / n) for n in [*newest, "config.yaml"]},
        "latest.json": sha256(local_bucket / "ret/rank_0/latest.json"),
    }
    p = pointer(local_bucket, "ret")
    assert [e["name"] for e in p["history"]] == ["checkpoint-3"]
    assert p["latest"]["name"] == "checkpoint-3"


def test_large_dir_manifests_are_objects_retired_with_their_checkpoints(
    tmp_path: Path, local_bucket: Path, daemons: list[Daemon]
) -> None:
    """DCP saves of 900 files: each manifest is an object of its own (pointer format 3);
    retention deletes it with its checkpoint, also for one committed before a restart."""
    run = new_run(tmp_path)
    keep = ("--keep-local", "1", "--keep-remote", "1")
    n = 900  # past the inline bound with CRC64NVME digests (shorter than sha256's)

    def save(step: int) -> None:
        ck = run / f"step_{step}"
        ck.mkdir()
        for i in range(n):
            atomic_write(ck / f"__{i}_0.distcp", 64, seed=1000 * step + i)
        atomic_write(ck / ".metadata", 100, seed=step)

    d = watch(daemons, run, local_bucket, "big", *keep, *SETTLE)
    save(1)
    d.wait_status(lambda s: s.get("committed") == 1, timeout=60)
    drain(d)
    save(2)
    d = watch(daemons, run, local_bucket, "big", *keep, *SETTLE, name="d2")
    d.wait_status(lambda s: s.get("committed") == 1, timeout=60)
    wait_for(lambda: not (run / "step_1").exists(), 10, "local retention of step_1")
    save(3)
    d.wait_status(lambda s: s.get("committed") == 2, timeout=60)
    wait_for(lambda: not (run / "step_2").exists(), 10, "local retention of step_2")
    drain(d)

    p = pointer(local_bucket, "big")
    assert p["format"] == "ckpt-uploader/pointer/3"
    assert [e["name"] for e in p["history"]] == ["step_3"]
    ref = p["latest"]["manifest"]
    assert ref["files"] == n + 1 and "files" not in p["latest"]
    held = stored(local_bucket, "big/rank_0")
    assert sorted(k for k in held if k.startswith(".ckpt-uploader/")) == [
        ref["object"].removeprefix("big/rank_0/")
    ]
    assert not any(k.startswith(("step_1/", "step_2/")) for k in held)
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == ["step_3"]
    restored = pull_latest(local_bucket, "big", tmp_path / "restore")
    assert restored == {k: v for k, v in tree(run).items() if k.startswith("step_3/")}
    assert len(restored) == n + 1


# -- 9. format-1 pointers ---------------------------------------------------------------
def test_format1_pointer_resolves_and_is_upgraded_by_a_new_commit(
    tmp_path: Path, local_bucket: Path
) -> None:
    objs = local_bucket / "old" / "rank_0"
    objs.mkdir(parents=True)
    body = os.urandom(4000)
    digest = write_now(objs / "ep1.pt", body)
    entry = {
        "name": "ep1.pt",
        "object": "old/rank_0/ep1.pt",
        "size": len(body),
        "digest": f"sha256:{digest}",
        "mtime_ns": 1,
        "committed_at": 1.0,
    }
    v1 = {"format": "ckpt-uploader/pointer/1", "rank": 0, "latest": entry, "history": [entry]}
    (objs / "latest.json").write_text(json.dumps(v1))
    dest = tmp_path / "ep1.pt"
    out = run_cli("pull", local_uri(local_bucket, "old/latest"), str(dest), "-q")
    assert out.returncode == 0, out.stderr
    assert dest.read_bytes() == body
    out = run_cli("ls", local_uri(local_bucket, "old"), "--json", "-q")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r["name"], r["rule"], r["files"], r["latest"]) for r in rows] == [
        ("ep1.pt", "file", 1, True)
    ]
    run = new_run(tmp_path)
    atomic_write(run / "ep2.pt", 3000, seed=2)
    out = run_cli("push", str(run), "--to", local_uri(local_bucket, "old"), "--settle", "0.1")
    assert out.returncode == 0, out.stderr
    p = pointer(local_bucket, "old")
    assert p["format"] == "ckpt-uploader/pointer/2"
    assert p["latest"]["name"] == "ep2.pt"
    assert [e["name"] for e in p["history"]] == ["ep2.pt", "ep1.pt"]
    assert p["history"][1]["digest"] == f"sha256:{digest}"


# -- 10. bad input ----------------------------------------------------------------------
def test_checkpoint_dir_without_marker_exits_2(tmp_path: Path, local_bucket: Path) -> None:
    run = new_run(tmp_path)
    out = run_cli(
        "watch", str(run), "--to", local_uri(local_bucket, "b"), "--checkpoint-dir", "step_*"
    )
    assert out.returncode == 2, out.stderr
    assert "GLOB=MARKER" in out.stderr
    assert not (local_bucket / "b").exists()


@pytest.mark.parametrize(
    "path", ["checkpoint-1/../../escape.bin", "../escape.bin", "checkpoint-1/../escape.bin"]
)
def test_pull_refuses_a_manifest_path_with_dotdot(
    tmp_path: Path, local_bucket: Path, path: str
) -> None:
    objs = local_bucket / "evil" / "rank_0"
    (objs / "checkpoint-1").mkdir(parents=True)
    body = b"payload"
    digest = write_now(objs / "checkpoint-1" / "model.bin", body)
    write_now(local_bucket / "evil" / "escape.bin", body)
    write_now(local_bucket / "escape.bin", body)
    files = [{"path": path, "size": len(body), "digest": f"sha256:{digest}"}]
    entry = {
        "name": "checkpoint-1",
        "object": "evil/rank_0/checkpoint-1",
        "size": len(body),
        "digest": "sha256:" + "0" * 64,
        "mtime_ns": 1,
        "rule": "hf",
        "files": files,
    }
    doc = {"format": "ckpt-uploader/pointer/2", "rank": 0, "latest": entry, "history": [entry]}
    (objs / "latest.json").write_text(json.dumps(doc))
    box = tmp_path / "box"
    box.mkdir()
    dest = box / "dest"
    for uri in ("evil/latest", "evil/rank_0/checkpoint-1"):
        out = run_cli("pull", local_uri(local_bucket, uri), f"{dest}/", "-q")
        assert out.returncode != 0, (uri, out.stdout, out.stderr)
        assert "Traceback" not in out.stderr
        assert [p for p in box.rglob("*") if p.is_file()] == [], uri
    out = run_cli("pull", local_uri(local_bucket, "evil/latest"), f"{dest}/", "-q")
    assert path in out.stderr or "not a plain relative path" in out.stderr, out.stderr
    assert not (tmp_path / "escape.bin").exists()


# -- 11. --checkpoint-dir GLOB=MARKER ---------------------------------------------------
def test_user_checkpoint_dir_rule_commits_once_marker_exists(
    tmp_path: Path, local_bucket: Path, daemons: list[Daemon]
) -> None:
    run = new_run(tmp_path, "ckpt_1")
    d = watch(daemons, run, local_bucket, "usr", "--checkpoint-dir", "ckpt_*=DONE", *SETTLE)
    atomic_write(run / "ckpt_1" / "weights.bin", 30_000, seed=1)
    atomic_write(run / "ckpt_1" / "extra.json", 300, seed=2)
    d.wait_status(lambda s: s.get("done") == 2)
    time.sleep(0.3)
    assert pointer_or_none(local_bucket, "usr") is None
    (run / "ckpt_1" / "DONE").write_text("")
    d.wait_status(lambda s: s.get("committed") == 1)
    drain(d)
    p = pointer(local_bucket, "usr")
    names = [f"ckpt_1/{n}" for n in ("DONE", "extra.json", "weights.bin")]
    assert (p["latest"]["name"], p["latest"]["rule"]) == ("ckpt_1", "dir:ckpt_*")
    assert manifest(p["latest"]) == on_disk(run, names)
    out = run_cli("ls", local_uri(local_bucket, "usr"), "-q")
    assert out.returncode == 0 and "ckpt_1/" in out.stdout and "dir:ckpt_*" in out.stdout
