"""The command line: help text, exit codes, and watch/push/pull/ls/verify against real S3
servers (rclone's, and moto for multipart-upload listing)."""

from __future__ import annotations

import argparse
import json
import signal
import uuid
from pathlib import Path

import pytest

from harness.servers.s3 import S3Server
from tests.daemon.test_process import Daemon, atomic_write, run_cli, sha256, wait_for
from uploader.cli.main import build_parser, main


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def test_every_option_of_every_command_documents_its_default() -> None:
    subs = _subparsers(build_parser())
    assert set(subs) == {"watch", "push", "pull", "ls", "verify", "status", "check", "gc"}
    for name, sub in subs.items():
        for action in sub._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            if "-h" in action.option_strings:
                continue
            assert action.help and "default" in action.help, (name, action.option_strings)
        text = sub.format_help()
        assert "exit codes:" in text and "143" in text, name


def test_python_m_uploader_is_the_console_script() -> None:
    out = run_cli("--help")
    assert out.returncode == 0
    assert "watch" in out.stdout and "exit codes:" in out.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["push", "{run}", "--to", "no-scheme"],
        ["push", "{run}", "--to", "file:///definitely/not/here"],
        [
            "push",
            "{run}",
            "--to",
            "s3://b/p",
            "--key-environ",
            "CKPT_UNSET_K",
            "--secret-environ",
            "CKPT_UNSET_S",
        ],
        ["push", "{run}", "--provider", "local"],
        ["push", "{run}", "--to", "file:///tmp", "--frobnicate"],
        ["push", "{run}", "--to", "file:///tmp", "--files", "0"],
        ["push", "{run}", "--to", "file:///tmp", "--extra-init-kwargs", "{nope"],
        ["push", "{run}", "--config", "{run}/missing.toml"],
        ["ls", "s3://b/p?endpoint=ftp://x"],
    ],
)
def test_configuration_errors_exit_2(tmp_path: Path, args: list[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    argv = [a.replace("{run}", str(run)) for a in args]
    assert main(argv) == 2
    assert not (run / ".ckpt-uploader.sqlite").exists()


def test_config_file_and_flags_combine(tmp_path: Path, local_bucket: Path) -> None:
    run = tmp_path / "rank_2"
    run.mkdir()
    atomic_write(run / "a.pt", 10)
    atomic_write(run / "b.json", 10)
    atomic_write(run / "c.txt", 10)
    cfg = tmp_path / "up.toml"
    cfg.write_text(
        '[store]\nprovider = "local"\ncontainer = "/nonexistent"\nprefix = "fromfile"\n'
        '[watch]\ninclude = ["*.pt", "*.json"]\nsettle = 0.1\n'
    )
    # --container overrides the file's; the [watch] include narrows the files.
    assert (
        main(["push", str(run), "--config", str(cfg), "--container", str(local_bucket), "-q"]) == 0
    )
    assert (local_bucket / "fromfile" / "rank_2" / "a.pt").exists()
    assert (local_bucket / "fromfile" / "rank_2" / "b.json").exists()
    assert not (local_bucket / "fromfile" / "rank_2" / "c.txt").exists()
    pointer = json.loads((local_bucket / "fromfile" / "rank_2" / "latest.json").read_text())
    assert pointer["latest"]["name"] == "a.pt"  # only checkpoints move the pointer


def test_watch_pull_ls_verify_against_rclone_s3(tmp_path: Path, rclone_s3: S3Server) -> None:
    bucket = "cli-" + uuid.uuid4().hex[:8]
    rclone_s3.make_bucket(bucket)
    uri = rclone_s3.uri(bucket, "exp1")
    run = tmp_path / "run"
    for r in (0, 1):
        (run / f"rank_{r}").mkdir(parents=True)
    sums = {0: atomic_write(run / "rank_0" / "ep1.pt", 100_000, seed=0)}
    d = Daemon(tmp_path, run, "--to", uri, "--part-size", "5M", "--settle", "0.2")
    try:
        d.wait_status(lambda s: s.get("done") == 1)
        sums[1] = atomic_write(run / "rank_1" / "ep1.pt", 6 << 20, seed=1)  # multipart
        atomic_write(run / "rank_0" / "ep2.pt", 1000, seed=2)  # only rank 0 has ep2
        d.wait_status(lambda s: s.get("done", 0) + s.get("uploading", 0) + s.get("pending", 0) == 3)
        d.signal(signal.SIGTERM)
        assert d.wait() == 0, d.log()
    finally:
        d.kill()
    assert rclone_s3.secret not in d.log() and rclone_s3.secret not in d.status_path.read_text()

    # latest = newest checkpoint committed by every rank: ep1, not rank 0's ep2.
    dest = tmp_path / "restore"
    out = run_cli("pull", rclone_s3.uri(bucket, "exp1/latest"), str(dest))
    assert out.returncode == 0, out.stderr
    for r in (0, 1):
        assert sha256(dest / f"rank_{r}" / "ep1.pt") == sums[r]
    out = run_cli(
        "pull", rclone_s3.uri(bucket, "exp1/latest"), str(tmp_path / "one.pt"), "--rank", "1"
    )
    assert out.returncode == 0 and sha256(tmp_path / "one.pt") == sums[1]

    out = run_cli("ls", uri, "--json")  # checkpoints, per rank
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r["rank"], r["name"], r["latest"], r["files"]) for r in rows] == [
        (0, "ep2.pt", True, 1),
        (0, "ep1.pt", False, 1),
        (1, "ep1.pt", True, 1),
    ]
    assert rows[2]["bytes"] == 6 << 20
    out = run_cli("ls", uri, "--files", "--json")
    assert out.returncode == 0, out.stderr
    listed = {json.loads(line)["name"]: json.loads(line) for line in out.stdout.splitlines()}
    assert set(listed) == {
        "exp1/rank_0/ep1.pt",
        "exp1/rank_0/ep2.pt",
        "exp1/rank_0/latest.json",
        "exp1/rank_1/ep1.pt",
        "exp1/rank_1/latest.json",
    }
    assert listed["exp1/rank_0/latest.json"]["latest"] == "ep2.pt"

    out = run_cli("verify", uri)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "3 object(s) verified, 0 failure(s)" in out.stdout
    # Damage an object behind the store's back (same size): verify must catch it.
    victim = rclone_s3.data_dir / bucket / "exp1" / "rank_1" / "ep1.pt"  # type: ignore[operator]
    data = bytearray(victim.read_bytes())
    data[1000] ^= 0xFF
    victim.write_bytes(bytes(data))
    out = run_cli("verify", uri)
    assert out.returncode == 1
    assert "FAILED  exp1/rank_1/ep1.pt" in out.stdout


def test_configuration_error_is_reported_in_the_status_file(tmp_path: Path) -> None:
    status = tmp_path / "status.json"
    argv = ["watch", str(tmp_path / "run"), "--to", "file:///definitely/not/here"]
    assert main([*argv, "--status-file", str(status)]) == 2
    body = json.loads(status.read_text())
    assert body["state"] == "failed" and "does not exist" in body["last_error"]


def test_kill9_mid_multipart_upload_then_push_resumes_it(tmp_path: Path, moto_s3: S3Server) -> None:
    # moto: rclone's server answers ListMultipartUploads with 404, so the check needs moto.
    bucket = "k9-" + uuid.uuid4().hex[:8]
    moto_s3.make_bucket(bucket)
    uri = moto_s3.uri(bucket, "p")
    run = tmp_path / "rank_0"
    run.mkdir()
    digest = atomic_write(run / "big.pt", 20 << 20)
    d = Daemon(tmp_path, run, "--to", uri, "--part-size", "5M", "--bwlimit", "2M")
    store = moto_s3.hparams(bucket).initialize_object()
    try:
        wait_for(lambda: _parts_recorded(run) >= 1, 20, "a part recorded in the journal")
        d.proc.kill()
        d.wait()
        out = run_cli("push", str(run), "--to", uri, "--part-size", "5M")
        assert out.returncode == 0, out.stderr
        assert "resuming interrupted upload path=big.pt" in out.stderr
        assert "resuming upload of p/rank_0/big.pt: the store holds" in out.stderr
        assert store.backend.list_uploads("p/") == []
        assert store.stat("p/rank_0/big.pt").size == 20 << 20
        got = store.download_file("p/rank_0/big.pt", tmp_path / "back.pt", progress=False)
        assert sha256(got) == digest
    finally:
        d.kill()
        store.close()


def _parts_recorded(run: Path) -> int:
    """Parts the journal in ``run`` records as held by the store (read-only)."""
    import sqlite3

    path = run / ".ckpt-uploader.sqlite"
    if not path.exists():
        return 0
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        return int(con.execute("SELECT COUNT(*) FROM parts").fetchone()[0])
    except sqlite3.OperationalError:  # not created yet
        return 0
    finally:
        con.close()
