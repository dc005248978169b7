"""TLS: certificates are always verified; a private CA is trusted by option or environment;
a failed check is a clear, permanent error (exit 2, no retries); insecure only by name.

Real servers throughout: ``rclone serve s3 --cert --key`` and Azurite ``--cert --key`` on
loopback, presenting certificates made by tests/fixtures/tls.py (a private CA's leaf for
``localhost`` only, an expired leaf, a self-signed certificate). Connecting to the leaf's
server as ``127.0.0.1`` is the wrong host name. The daemon's case restarts a server of its own
on the same port with another certificate while ``ckpt-uploader watch`` runs.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from harness.reliability import ROOT
from harness.servers.azure import Azurite
from harness.servers.certs import Certs
from harness.servers.s3 import S3Server, start_rclone_s3
from tests.daemon.test_process import Daemon, atomic_write, run_cli
from uploader import ConfigError, ObjectStoreHparams, PermanentError, RetryPolicy, TLSError
from uploader.daemon.status import StatusReport
from uploader.errors import ExitCode
from uploader.launch.failure import worker_error
from uploader.transfer.store import make_backend
from uploader.transfer.tls import CA_ENVIRON

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_ca_environ")]

#: Generous retry bounds: a failure that were retried would take seconds, not milliseconds.
PATIENT = RetryPolicy(attempts=6, total_seconds=60.0, base_delay=1.0, max_delay=2.0)


def _hparams(server: S3Server, host: str, **extra: Any) -> ObjectStoreHparams:
    return server.hparams("ckpts", host=host, extra_init_kwargs={"secure": True, **extra})


def _files(certs: Certs, value: Any) -> Any:
    """``"ca"`` / ``"self"`` stand for the certificate files (made per session)."""
    return {"ca": str(certs.ca), "self": str(certs.self_signed)}.get(value, value)


# server, host, extra_init_kwargs, environment, expected reason (None: accepted)
S3_CASES = {
    "self-signed": ("self", "127.0.0.1", {}, {}, "self-signed certificate"),
    "self-signed, trusted by ca_bundle": ("self", "127.0.0.1", {"ca_bundle": "self"}, {}, None),
    "private CA, not trusted": ("leaf", "localhost", {}, {}, "unable to get local issuer"),
    "private CA, ca_bundle": ("leaf", "localhost", {"ca_bundle": "ca"}, {}, None),
    "private CA, AWS_CA_BUNDLE": ("leaf", "localhost", {}, {"AWS_CA_BUNDLE": "ca"}, None),
    "private CA, SSL_CERT_FILE": ("leaf", "localhost", {}, {"SSL_CERT_FILE": "ca"}, None),
    "private CA, REQUESTS_CA_BUNDLE": (
        "leaf",
        "localhost",
        {},
        {"REQUESTS_CA_BUNDLE": "ca"},
        None,
    ),
    "ca_bundle wins over the environment": (
        "leaf",
        "localhost",
        {"ca_bundle": "ca"},
        {"AWS_CA_BUNDLE": "self"},
        None,
    ),
    "AWS_CA_BUNDLE wins over SSL_CERT_FILE": (
        "leaf",
        "localhost",
        {},
        {"AWS_CA_BUNDLE": "self", "SSL_CERT_FILE": "ca"},
        "unable to get local issuer",
    ),
    "expired": ("expired", "127.0.0.1", {"ca_bundle": "ca"}, {}, "certificate has expired"),
    "wrong host name": ("leaf", "127.0.0.1", {"ca_bundle": "ca"}, {}, "mismatch"),
    "insecure, by name": ("self", "127.0.0.1", {"insecure_skip_tls_verify": True}, {}, None),
}


def _retried(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The retries the store logged."""
    return [r.getMessage() for r in caplog.records if r.name == "uploader.transfer.retry"]


@pytest.mark.parametrize("case", list(S3_CASES))
def test_s3_certificate_checks(
    case: str,
    tls_s3: dict[str, S3Server],
    certs: Certs,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    kind, host, extra, env, reason = S3_CASES[case]
    for var, value in env.items():
        monkeypatch.setenv(var, _files(certs, value))
    server = tls_s3[kind]
    hp = _hparams(server, host, **{k: _files(certs, v) for k, v in extra.items()})
    caplog.set_level(logging.WARNING, "uploader.transfer.tls")
    caplog.set_level(logging.INFO, "uploader.transfer.retry")
    if reason is None:
        with hp.initialize_object(retry=PATIENT) as store:
            store.put_bytes(f"tls/{case}", b"over TLS")
            assert store.get_bytes(f"tls/{case}") == b"over TLS"
        warned = [r for r in caplog.records if "NOT verified" in r.getMessage()]
        assert len(warned) == (1 if "insecure_skip_tls_verify" in extra else 0)
        return
    with pytest.raises(TLSError) as info:
        hp.initialize_object(retry=PATIENT)
    assert not _retried(caplog)  # a permanent error: PATIENT would retry a transient one
    err = info.value
    assert isinstance(err, PermanentError) and isinstance(err, ConfigError)
    assert err.exit_code == ExitCode.CONFIG == 2
    text = str(err)
    assert f"{host}:{server.port}" in text  # the endpoint
    assert reason in text  # the reason
    assert "ca_bundle" in text and "--ca-bundle" in text  # what trusts a private CA
    if case == "wrong host name":
        assert "host name the certificate was issued for" in text


def test_a_failed_check_is_one_request(tls_s3: dict[str, S3Server]) -> None:
    backend = make_backend(_hparams(tls_s3["self"], "127.0.0.1").store_settings())
    try:
        for _ in range(2):
            with pytest.raises(TLSError):
                backend.check_container()
        assert backend.requests == 2  # one each: no resend on a fresh connection
    finally:
        backend.close()


def test_an_endpoint_without_tls_says_so(rclone_s3: S3Server) -> None:
    if not rclone_s3.alive():
        rclone_s3.start()
    with pytest.raises(TLSError, match=r"does not answer TLS.*http://"):
        _hparams(rclone_s3, "127.0.0.1").initialize_object(retry=PATIENT)


def test_missing_ca_bundle_is_a_config_error(
    tmp_path: Path, tls_s3: dict[str, S3Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "no-such-ca.pem"
    with pytest.raises(ConfigError, match="no-such-ca.pem.*does not exist"):
        _hparams(tls_s3["leaf"], "localhost", ca_bundle=str(missing)).initialize_object()
    monkeypatch.setenv("AWS_CA_BUNDLE", str(missing))
    with pytest.raises(ConfigError, match=r"\$AWS_CA_BUNDLE"):
        _hparams(tls_s3["leaf"], "localhost").initialize_object()
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="cannot be loaded"):
        _hparams(tls_s3["leaf"], "localhost", ca_bundle=str(not_pem)).initialize_object()


@pytest.mark.parametrize(
    "extra",
    [{"insecure_skip_tls_verify": "true"}, {"insecure_skip_tls_verify": 1}, {"ca_bundle": ""}],
    ids=["string-true", "number", "empty-bundle"],
)
def test_tls_options_are_checked(extra: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        ObjectStoreHparams("s3", "b", "K", "S", extra_init_kwargs=extra)


def test_a_ca_bundle_means_tls_on_loopback(certs: Certs) -> None:
    plain = ObjectStoreHparams("s3", "b", "K", "S", host="localhost")
    assert not plain.secure
    hp = ObjectStoreHparams.from_uri(f"s3://b/p?endpoint=localhost:9&ca_bundle={certs.ca}")
    assert hp.secure and hp.store_settings().ca_bundle == str(certs.ca)
    assert "ca_bundle" not in hp.store_settings().extra  # not passed on to a driver


# server, host, extra_init_kwargs, expected reason (None: accepted)
AZURE_CASES = {
    "private CA, ca_bundle": ("localhost", {"ca_bundle": "ca"}, None),
    "private CA, not trusted": ("localhost", {}, "unable to get local issuer"),
    "wrong host name": ("127.0.0.1", {"ca_bundle": "ca"}, "mismatch"),
    "insecure, by name": ("127.0.0.1", {"insecure_skip_tls_verify": True}, None),
}


@pytest.mark.parametrize("case", list(AZURE_CASES))
def test_azurite_certificate_checks(
    case: str, tls_azurite: Azurite, certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    host, extra, reason = AZURE_CASES[case]
    hp = tls_azurite.hparams("tls", secure=True, **{k: _files(certs, v) for k, v in extra.items()})
    hp.host = host
    if reason is None:
        with hp.initialize_object(create_container=True, retry=PATIENT) as store:
            store.put_bytes(f"tls/{case}", b"over TLS")
            assert store.get_bytes(f"tls/{case}") == b"over TLS"
        return
    caplog.set_level(logging.INFO, "uploader.transfer.retry")
    with pytest.raises(TLSError) as info:
        hp.initialize_object(create_container=True, retry=PATIENT)
    assert not _retried(caplog)
    assert f"{host}:{tls_azurite.port}" in str(info.value) and reason in str(info.value)
    assert "ca_bundle" in str(info.value)


# -- the command line: every way to name the bundle, and the failure seen by a user --------


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in CA_ENVIRON}
    return subprocess.run(
        [sys.executable, "-m", "uploader", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=str(cwd),
        stdin=subprocess.DEVNULL,
    )


def _uri(server: S3Server, host: str, prefix: str, query: str = "") -> str:
    return (
        f"s3://ckpts/{prefix}?endpoint=https://{host}:{server.port}"
        f"&key_environ={server.key_env}&secret_environ={server.secret_env}{query}"
    )


def test_cli_trusts_a_private_ca_by_flag_uri_and_config_file(
    tmp_path: Path, tls_s3: dict[str, S3Server], certs: Certs
) -> None:
    server = tls_s3["leaf"]
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "ep1.pt").write_bytes(os.urandom(300_000))
    common = ["--no-progress", "--state-dir", str(tmp_path / "state")]
    push = _cli(
        "push", str(run), "--to", _uri(server, "localhost", "cli"), "--ca-bundle", str(certs.ca),
        *common, cwd=ROOT,
    )  # fmt: skip
    assert push.returncode == 0, push.stderr
    pulled = _cli(
        "pull",
        _uri(server, "localhost", "cli/latest", f"&ca_bundle={certs.ca}"),
        str(tmp_path / "dl") + "/",
        "--no-progress",
        cwd=ROOT,
    )
    assert pulled.returncode == 0, pulled.stderr
    assert (tmp_path / "dl" / "checkpoints" / "ep1.pt").read_bytes() == (
        run / "checkpoints" / "ep1.pt"
    ).read_bytes()
    config = tmp_path / "store.toml"
    config.write_text(f'[store]\nca_bundle = "{certs.ca}"\n')
    listed = _cli("ls", _uri(server, "localhost", "cli"), "--config", str(config), cwd=ROOT)
    assert listed.returncode == 0 and "ep1.pt" in listed.stdout, listed.stderr


def test_cli_certificate_failure_exits_2_at_once_with_what_to_do(
    tmp_path: Path, tls_s3: dict[str, S3Server]
) -> None:
    server = tls_s3["self"]
    run = tmp_path / "run"
    run.mkdir()
    (run / "ep1.pt").write_bytes(b"x" * 1000)
    p = _cli(
        "push", str(run), "--to", _uri(server, "127.0.0.1", "bad"), "--retries", "8",
        "--state-dir", str(tmp_path / "state"), "--no-progress", cwd=ROOT,
    )  # fmt: skip
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and "retry" not in p.stderr.lower()
    assert f"127.0.0.1:{server.port}" in p.stderr and "self-signed certificate" in p.stderr
    assert "--ca-bundle" in p.stderr
    insecure = _cli(
        "push", str(run), "--to", _uri(server, "127.0.0.1", "bad"), "--insecure-skip-tls-verify",
        "--state-dir", str(tmp_path / "state"), "--no-progress", cwd=ROOT,
    )  # fmt: skip
    assert insecure.returncode == 0, insecure.stderr
    assert insecure.stderr.count("NOT verified") == 1


def test_daemon_exits_2_when_the_certificate_goes_bad_while_it_runs(
    tmp_path: Path, certs: Certs
) -> None:
    """The server restarts with a certificate the daemon does not trust: the file dropped
    then fails at once, stays in the journal, and the daemon drains with exit 2 and the
    message that says what to do, as at start-up."""
    server = start_rclone_s3(
        tmp_path / "s3" / "data",
        extra_args=["--cert", str(certs.leaf), "--key", str(certs.leaf_key)],
    )
    run = tmp_path / "run"
    run.mkdir()
    d = Daemon(
        tmp_path, run, "--to", _uri(server, "localhost", "live"), "--ca-bundle", str(certs.ca),
        "--settle", "0.2", "--retries", "8",
    )  # fmt: skip
    try:
        atomic_write(run / "ep1.pt", 100_000, seed=1)
        d.wait_status(lambda s: s.get("committed") == 1)
        server.restart({"--cert": str(certs.self_signed), "--key": str(certs.self_signed_key)})
        atomic_write(run / "ep2.pt", 100_000, seed=2)
        d.wait_status(lambda s: s.get("failed") == 1)
        d.signal(signal.SIGTERM)
        assert d.wait() == 2, d.log()
    finally:
        d.kill()
        server.close()
    log = d.log()
    assert "Traceback" not in log
    assert "failed path=ep2.pt attempts=1 " in log, log  # not retried, though --retries 8
    summary = [line for line in log.splitlines() if "finished with a configuration error" in line]
    assert len(summary) == 1, log
    for piece in (f"localhost:{server.port}", "self-signed certificate", "--ca-bundle"):
        assert piece in summary[0], summary[0]
    # Nothing lost: the file is still there and the journal holds it as failed.
    assert (run / "ep2.pt").is_file()
    out = run_cli("status", str(run), "--json")
    assert out.returncode == 1, out.stderr  # status says a file failed
    states = {f["path"]: f["state"] for f in json.loads(out.stdout)["files"]}
    assert states == {"ep1.pt": "done", "ep2.pt": "failed"}, out.stdout
    assert "self-signed certificate" in d.status()["last_error"]


def test_training_side_is_told_the_files_are_kept_when_a_setting_goes_bad_mid_run(
    tmp_path: Path,
) -> None:
    """The message a training process raises for the exit above (the worker's own status
    report as the daemon wrote it), beside the one for a wrong setting at start-up."""
    reason = (
        "TLSError: the TLS certificate of bucket 'ckpts' at https://localhost:9 was not accepted"
    )

    def told(status: StatusReport) -> str:
        return str(
            worker_error(
                "exited",
                rank=0,
                pid=7,
                code=ExitCode.CONFIG,
                status=status,
                log_path=None,
                run_dir=tmp_path / "run",
                state_dir=tmp_path / "state",
            )  # fmt: skip
        )

    text = told(StatusReport(pid=7, state="failed", done=1, failed=1, last_error=reason))
    assert reason in text and "fix the setting named above" in text
    assert "nothing accepted is lost" in text and "1 failed" in text
    text = told(StatusReport(pid=7, state="failed", last_error="ConfigError: no such bucket"))
    assert "fix the setting named above" in text and "nothing accepted is lost" not in text
