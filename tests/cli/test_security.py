"""Security: secrets never shown, nothing read or written outside where it belongs,
private file modes, TLS by default, and torch.load only with weights_only=True.

Real processes throughout: rclone's S3 server checks SigV4 signatures, so its
(random, unique) secret is the marker on the success paths; a second marker,
a wrong secret, drives the failure paths.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import secrets
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.reliability import ROOT, Daemon, write_checkpoint_file
from harness.servers.s3 import S3Server
from uploader import ObjectStoreHparams, UploaderError
from uploader.daemon.journal import JOURNAL_NAME

pytestmark = pytest.mark.timeout(180)


def _cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "uploader", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        cwd=str(cwd or ROOT),
        stdin=subprocess.DEVNULL,
    )


def _all_text(root: Path) -> str:
    """Every file under ``root`` (logs, status, journal, downloads), as text."""
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.stat().st_size < (8 << 20):
            out.append(p.read_bytes().decode("latin-1"))
    return "\n".join(out)


@pytest.fixture
def bucket(rclone_s3: S3Server) -> Iterator[str]:
    if not rclone_s3.alive():
        rclone_s3.start()
    name = f"sec-{secrets.token_hex(4)}"
    rclone_s3.make_bucket(name)
    yield name


# -- secrets -----------------------------------------------------------------------------------------


def test_secret_never_shown_by_any_command(
    rclone_s3: S3Server, bucket: str, tmp_path: Path
) -> None:
    marker = rclone_s3.secret
    assert len(marker) >= 20 and marker == os.environ[rclone_s3.secret_env]
    run = tmp_path / "run"
    write_checkpoint_file(run / "checkpoints" / "ep1.pt", 6 << 20, 1)
    write_checkpoint_file(run / "checkpoints" / "ep2.pt", 1 << 20, 2)
    uri = rclone_s3.uri(bucket, "sec")
    state = tmp_path / "state"
    outputs: list[str] = []
    codes: dict[str, int] = {}

    def run_cli(label: str, *args: str, env: dict[str, str] | None = None) -> None:
        p = _cli(*args, env=env)
        codes[label] = p.returncode
        outputs.append(p.stdout + p.stderr)

    # Success paths, text and JSON logs, verbose.
    run_cli(
        "watch",
        "watch",
        str(run),
        "--to",
        uri,
        "--state-dir",
        str(state),
        "--exit-when-idle",
        "--status-file",
        str(state / "status.json"),
        "-v",
        "--no-progress",
    )
    run_cli(
        "push",
        "push",
        str(run),
        "--to",
        uri,
        "--state-dir",
        str(state),
        "-v",
        "--log-format",
        "json",
        "--no-progress",
    )
    run_cli("ls", "ls", uri, "-v")
    run_cli("ls-json", "ls", uri, "--json")
    run_cli("verify", "verify", uri, "-v", "--no-progress")
    run_cli(
        "pull",
        "pull",
        rclone_s3.uri(bucket, "sec/latest"),
        str(tmp_path / "dl"),
        "-v",
        "--no-progress",
    )
    run_cli("status", "status", str(run), "--state-dir", str(state), "--json")
    run_cli("status-files", "status", str(run), "--state-dir", str(state), "--files")
    assert codes == {k: 0 for k in codes}, (codes, outputs)
    # Failure paths: missing bucket, missing object, wrong secret (the server refuses it).
    wrong = "WRONGSECRET-" + secrets.token_hex(12)
    bad_env = {rclone_s3.secret_env: wrong}
    run_cli("no-bucket", "ls", rclone_s3.uri("no-such-bucket-x", "p"), "-v")
    run_cli("no-object", "pull", rclone_s3.uri(bucket, "sec/rank_0/none.pt"), str(tmp_path / "x"))
    run_cli("bad-secret-ls", "ls", uri, "-v", env=bad_env)
    run_cli(
        "bad-secret-watch",
        "watch",
        str(run),
        "--to",
        uri,
        "--state-dir",
        str(tmp_path / "state2"),
        "--exit-when-idle",
        "-v",
        "--log-format",
        "json",
        env=bad_env,
    )
    run_cli(
        "bad-secret-pull",
        "pull",
        rclone_s3.uri(bucket, "sec/latest"),
        str(tmp_path / "dl2"),
        env=bad_env,
    )
    for label in ("no-bucket", "no-object", "bad-secret-ls", "bad-secret-watch", "bad-secret-pull"):
        assert codes[label] != 0, (label, outputs)
    text = "\n".join(outputs)
    assert "SignatureDoesNotMatch" in text or "credential" in text.lower() or "refused" in text
    files = _all_text(tmp_path)  # logs, status files, journals, downloads
    for secret in (marker, wrong):
        assert secret not in text
        assert secret not in files


def test_secret_never_in_exceptions_or_worker_argv(
    rclone_s3: S3Server, bucket: str, tmp_path: Path
) -> None:
    import traceback

    from uploader.launch.worker import UploadWorker

    wrong = "WRONGSECRET-" + secrets.token_hex(12)
    os.environ["CKPT_SEC_TEST_SECRET"] = wrong
    try:
        hp = rclone_s3.hparams(bucket, secret_environ="CKPT_SEC_TEST_SECRET")
        with pytest.raises(UploaderError) as info:
            hp.initialize_object()
        shown = "".join(traceback.format_exception(info.value)) + repr(info.value) + repr(hp)
        assert wrong not in shown and rclone_s3.secret not in shown
        # The worker's argv names the variables, never the values; so does /proc.
        worker = UploadWorker(
            tmp_path / "run", hparams=rclone_s3.hparams(bucket), parent_pid=None, log_to="file"
        )
        assert rclone_s3.secret not in " ".join(worker.command())
        worker.start()
        try:
            cmdline = Path(f"/proc/{worker.pid}/cmdline").read_bytes().decode()
            assert rclone_s3.secret not in cmdline and rclone_s3.key not in cmdline
            time.sleep(1.0)
        finally:
            worker.kill()
        assert rclone_s3.secret not in _all_text(tmp_path)
        # A worker whose secret is wrong fails; its error (with the log tail) hides it.
        from uploader.launch.worker import WorkerError

        bad = UploadWorker(
            tmp_path / "run2",
            hparams=rclone_s3.hparams(bucket, secret_environ="CKPT_SEC_TEST_SECRET"),
            parent_pid=None,
            drain_timeout=30,
        )
        write_checkpoint_file(tmp_path / "run2" / "ep1.pt", 1000, 1)
        bad.start()
        try:
            with pytest.raises(WorkerError) as failed:
                bad.drain(timeout=60, progress=False)
        finally:
            bad.kill()
        shown = "".join(traceback.format_exception(failed.value))
        assert shown and wrong not in shown and wrong not in _all_text(tmp_path)
    finally:
        del os.environ["CKPT_SEC_TEST_SECRET"]


def test_worker_keeps_the_secret_to_itself(
    rclone_s3: S3Server, bucket: str, tmp_path: Path
) -> None:
    """A real worker, verbose, uploading: the secret (the marker) is in its environment
    only. Not in its argv, not in the environment of any process it starts (it starts
    none; any that appeared is checked), not in its status file, journal or log; and the
    worker is non-dumpable (no core dump; /proc/<pid>/environ private to root)."""
    import psutil

    from uploader.launch.worker import UploadWorker

    marker = rclone_s3.secret.encode()
    run, state = tmp_path / "run", tmp_path / "state"
    write_checkpoint_file(run / "checkpoints" / "ep1.pt", 6 << 20, 1)
    worker = UploadWorker(
        run,
        hparams=rclone_s3.hparams(bucket),
        prefix="w",
        state_dir=state,
        parent_pid=None,
        log_to="file",
        verbosity=1,
        drain_timeout=60,
    )
    worker.start()
    children: set[int] = set()
    try:
        assert worker.pid is not None
        proc = psutil.Process(worker.pid)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until the checkpoint is verified
            assert marker not in Path(f"/proc/{worker.pid}/cmdline").read_bytes()
            for child in proc.children(recursive=True):
                children.add(child.pid)
                with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                    assert marker not in Path(f"/proc/{child.pid}/environ").read_bytes()
            st = worker.status(fresh=True)
            if st is not None and st.done >= 1:
                break
            time.sleep(0.05)
        if os.getuid() != 0:  # root reads every process's environment
            with pytest.raises(PermissionError):
                Path(f"/proc/{worker.pid}/environ").read_bytes()
        worker.drain(timeout=60, progress=False)
    finally:
        worker.kill()
    log_text = (state / ".ckpt-uploader.log").read_text()
    assert "process marked non-dumpable (no core dumps, /proc/<pid> private): True" in log_text
    assert "verified path=checkpoints/ep1.pt" in log_text  # verbose: every step was logged
    assert not children  # the worker starts no processes
    assert sorted(p.name for p in state.iterdir())  # status, journal (and -wal), log
    assert rclone_s3.secret not in _all_text(tmp_path)


def test_non_dumpable_is_set_and_kept_across_fork(tmp_path: Path) -> None:
    """``make_private`` in a fresh interpreter (not this one: it would stay private),
    without starting any process (a child would inherit the worker's environment)."""
    code = (
        "import os, subprocess, sys\n"
        "from uploader.daemon.privacy import make_private, is_dumpable\n"
        "def refuse(*a, **k):\n"  # a child would inherit the worker's credentials
        "    raise AssertionError(f'make_private started a process: {a}')\n"
        "subprocess.Popen.__init__ = refuse\n"
        "os.popen = os.posix_spawn = refuse\n"
        "before = is_dumpable()\n"
        "assert make_private()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os._exit(0 if is_dumpable() is False else 1)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "print(before, is_dumpable(), os.waitstatus_to_exitcode(status))\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=str(ROOT)
    )
    assert p.stdout.split() == ["True", "False", "0"], p.stderr


# -- reading and writing only where it belongs --------------------------------------------------------


def test_nothing_outside_the_run_directory_is_read(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    write_checkpoint_file(outside / "secret.pt", 1000, 1)
    write_checkpoint_file(outside / "dir" / "inner.pt", 1000, 2)
    run = tmp_path / "run"
    write_checkpoint_file(run / "checkpoints" / "ep1.pt", 1000, 3)
    (run / "checkpoints" / "link.pt").symlink_to(outside / "secret.pt")
    (run / "linkdir").symlink_to(outside / "dir", target_is_directory=True)
    (run / "checkpoints" / "rel.pt").symlink_to("../../outside/secret.pt")
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    p = _cli("push", str(run), "--to", f"file://{bucket}", "--prefix", "p", "--no-progress")
    names = sorted(str(f.relative_to(bucket)) for f in bucket.rglob("*.pt"))
    assert names == ["p/rank_0/checkpoints/ep1.pt"], (names, p.stderr)


def test_pull_never_writes_outside_the_destination(moto_s3: S3Server, tmp_path: Path) -> None:
    """Object names written by another tool with '..' or a leading slash are refused
    (or kept inside DEST) by pull; nothing appears outside DEST."""
    import boto3

    if not moto_s3.alive():
        moto_s3.start()
    name = f"evil-{secrets.token_hex(4)}"
    moto_s3.make_bucket(name)
    s3 = boto3.client(
        "s3",
        endpoint_url=moto_s3.endpoint,
        aws_access_key_id=moto_s3.key,
        aws_secret_access_key=moto_s3.secret,
        region_name="us-east-1",
    )
    s3.put_object(Bucket=name, Key="run/rank_0/ok.pt", Body=b"fine")
    for key in ("run/rank_0/../../../escaped.pt", "run/rank_0/../../escaped2.pt", "run//abs.pt"):
        s3.put_object(Bucket=name, Key=key, Body=b"evil")
    dest = tmp_path / "deep" / "dest"
    dest.mkdir(parents=True)
    p = _cli("pull", moto_s3.uri(name, "run"), str(dest), "--no-progress")
    everything = {str(f.relative_to(tmp_path)) for f in tmp_path.rglob("*") if f.is_file()}
    outside = {f for f in everything if not f.startswith("deep/dest/")}
    assert outside == set(), (outside, p.stdout, p.stderr)
    assert not any(f.endswith("escaped.pt") or f.endswith("escaped2.pt") for f in everything)
    # The safe object is fetched; the unsafe ones are skipped by name, and the exit
    # code says not everything was downloaded (1, not a configuration error).
    assert (dest / "rank_0" / "ok.pt").read_bytes() == b"fine"
    assert p.returncode == 1, p.stderr
    assert "not downloaded: 3 object(s)" in p.stderr, p.stderr
    for key in ("run/rank_0/../../../escaped.pt", "run/rank_0/../../escaped2.pt", "run//abs.pt"):
        assert repr(key) in p.stderr, p.stderr


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_downloads_journal_and_status_are_private(
    rclone_s3: S3Server, bucket: str, tmp_path: Path, umask: int
) -> None:
    run = tmp_path / "run"
    write_checkpoint_file(run / "ep1.pt", 2 << 20, 1)
    uri = rclone_s3.uri(bucket, f"modes{umask:o}")
    state = tmp_path / "state"
    (tmp_path / "dl").mkdir()
    old = os.umask(umask)
    try:
        d = Daemon(run, uri, state, "--exit-when-idle", log=tmp_path / "d.log")
        assert d.wait(120) == 0, d.tail()
        p = _cli(
            "pull",
            rclone_s3.uri(bucket, f"modes{umask:o}/latest"),
            str(tmp_path / "dl"),
            "--no-progress",
        )
        assert p.returncode == 0, p.stderr
    finally:
        os.umask(old)
    journal = state / JOURNAL_NAME
    downloads = [f for f in (tmp_path / "dl").rglob("*") if f.is_file()]
    assert downloads and journal.exists()
    allowed = 0o666 & ~umask
    for f in [journal, state / "status.json", *downloads]:
        mode = f.stat().st_mode & 0o777
        assert mode & ~allowed == 0, f"{f} has mode {mode:o} under umask {umask:o}"
        assert mode & 0o002 == 0, f"{f} is world-writable"
    for f in downloads:  # downloads are created 0600 whatever the umask
        assert f.stat().st_mode & 0o077 == 0, f"{f} is readable by others"


# -- TLS ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "secure"),
    [
        ({"host": "s3.example.com"}, True),
        ({"host": "10.1.2.3", "port": 9000}, True),
        ({}, True),  # the provider's own endpoint
        ({"host": "127.0.0.1", "port": 9000}, False),  # loopback: plain HTTP allowed
        ({"host": "s3.example.com", "extra_init_kwargs": {"secure": False}}, False),  # by name
    ],
)
def test_tls_by_default_for_non_loopback(kwargs: dict[str, object], secure: bool) -> None:
    """No connection is made: the backend is built and its connection class inspected."""
    import http.client

    from uploader.transfer.backends.s3 import S3Backend

    os.environ["CKPT_TLS_KEY"] = "AKIDEXAMPLE"
    os.environ["CKPT_TLS_SECRET"] = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
    try:
        hp = ObjectStoreHparams(
            provider="s3",
            container="bucket",
            key_environ="CKPT_TLS_KEY",
            secret_environ="CKPT_TLS_SECRET",
            region="us-east-1",
            **kwargs,  # type: ignore[arg-type]
        )
        assert hp.secure is secure
        backend = S3Backend(hp.store_settings())
        conn = backend._conn()
        assert isinstance(conn, http.client.HTTPSConnection) is secure
        backend.close()
    finally:
        del os.environ["CKPT_TLS_KEY"], os.environ["CKPT_TLS_SECRET"]


# -- torch.load ---------------------------------------------------------------------------------


def test_every_torch_load_passes_weights_only_true() -> None:
    calls = []
    for path in sorted((ROOT / "ckpt").rglob("*.py")) + sorted((ROOT / "uploader").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
            ):
                kw = {k.arg: k.value for k in node.keywords}
                ok = (
                    isinstance(kw.get("weights_only"), ast.Constant)
                    and kw["weights_only"].value is True
                )
                calls.append((f"{path.relative_to(ROOT)}:{node.lineno}", ok))
    assert calls, "no torch.load call found: the check would prove nothing"
    assert all(ok for _, ok in calls), [c for c, ok in calls if not ok]


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("codec", [None, "zstd"])
def test_pickle_that_would_run_code_is_refused(tmp_path: Path, codec: str | None) -> None:
    import torch

    import ckpt
    from ckpt.errors import UnsafeCheckpointError
    from ckpt.saver import write_checkpoint

    marker = tmp_path / "PWNED"
    name = "evil.pt" if codec is None else "evil.pt.zst"
    write_checkpoint(
        {"model": {"w": torch.zeros(2)}, "x": _RunsCode(str(marker))},
        tmp_path / name,
        compression=codec,
    )
    with pytest.raises(UnsafeCheckpointError) as info:
        ckpt.load(str(tmp_path / name))
    assert "weights_only" in str(info.value)
    assert not marker.exists(), "loading ran the pickled code"
    shutil.rmtree(tmp_path / "x", ignore_errors=True)


def test_journal_holds_no_secret(rclone_s3: S3Server, bucket: str, tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_checkpoint_file(run / "ep1.pt", 1000, 1)
    state = tmp_path / "state"
    d = Daemon(run, rclone_s3.uri(bucket, "j"), state, "--exit-when-idle", log=tmp_path / "d.log")
    assert d.wait(120) == 0, d.tail()
    con = sqlite3.connect(state / JOURNAL_NAME)
    try:
        dump = "\n".join(con.iterdump())
    finally:
        con.close()
    assert "ep1.pt" in dump
    assert rclone_s3.secret not in dump and rclone_s3.key not in dump
    status = json.loads((state / "status.json").read_text())
    assert rclone_s3.secret not in json.dumps(status)
