"""AWS credentials from botocore's chain, against moto with IAM authentication on.

moto checks every request's key, secret and session token (not their expiry). The
web identity STS action, the container credentials endpoint and IMDSv2 are small
stubs in harness/servers/aws_identity.py that speak those protocols and hand out
credentials minted by moto's STS: no real cloud endpoint can exist here.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.data import write_random
from harness.faultproxy import FaultPlan, FaultProxy
from harness.servers.aws_identity import (
    ContainerCredentials,
    IMDSv2,
    MotoIam,
    WebIdentitySTS,
)
from uploader.config.hparams import parse_uri
from uploader.errors import AuthError, ConfigError
from uploader.redact import redact
from uploader.transfer.backends.aws_identity import AwsIdentity
from uploader.transfer.store import ObjectStore

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20


def _store(moto: MotoIam, uri: str | None = None, **over: str) -> ObjectStore:
    return parse_uri(uri or moto.uri(), **over).hparams.initialize_object(part_size=5 * MiB)


def _round_trip(store: ObjectStore, tmp_path: Path, name: str, size: int = 11 * MiB) -> None:
    src = write_random(tmp_path / f"{name}.bin", size, seed=size)
    store.upload_file(src, f"id/{name}")  # multipart: every part signed
    dest = tmp_path / f"{name}.back"
    store.download_file(f"id/{name}", dest, progress=False)
    assert dest.read_bytes() == src.read_bytes()


def _env_temporary(moto: MotoIam, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    c = moto.assume_role()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", c["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", c["secret"])
    monkeypatch.setenv("AWS_SESSION_TOKEN", c["token"])
    return c


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "uploader", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    )


# -- sources ---------------------------------------------------------------------------
def test_named_static_key(moto_iam: MotoIam, aws_env: dict, tmp_path: Path, monkeypatch) -> None:
    key, secret = moto_iam.users["uploader"]
    monkeypatch.setenv("MY_KEY", key)
    monkeypatch.setenv("MY_SECRET", secret)
    with _store(moto_iam, key_environ="MY_KEY", secret_environ="MY_SECRET") as store:
        _round_trip(store, tmp_path, "static")
        assert store.identity == "environment variables $MY_KEY / $MY_SECRET"


def test_session_token_from_the_environment(
    moto_iam: MotoIam, aws_env: dict, tmp_path: Path, monkeypatch
) -> None:
    c = _env_temporary(moto_iam, monkeypatch)
    with _store(moto_iam) as store:
        _round_trip(store, tmp_path, "sts")
        assert store.identity == "environment (with session token)"
    assert c["token"] not in redact(f"token {c['token']} secret {c['secret']}")
    assert c["secret"] not in redact(f"secret {c['secret']}")
    # Named explicitly as the standard variables, the token goes with them too.
    hp = parse_uri(
        moto_iam.uri(), key_environ="AWS_ACCESS_KEY_ID", secret_environ="AWS_SECRET_ACCESS_KEY"
    ).hparams
    with hp.initialize_object() as store:
        assert store.list("id/sts")
        assert "with $AWS_SESSION_TOKEN" in store.identity


def test_profile_from_the_shared_files(
    moto_iam: MotoIam, aws_env: dict, tmp_path: Path, monkeypatch
) -> None:
    key, secret = moto_iam.users["uploader"]
    Path(aws_env["credentials"]).write_text(
        f"[train]\naws_access_key_id = {key}\naws_secret_access_key = {secret}\n"
    )
    Path(aws_env["config"]).write_text(
        f"[profile assumed]\nrole_arn = {moto_iam.role_arn}\nsource_profile = train\n"
    )
    monkeypatch.setenv("AWS_PROFILE", "train")
    with _store(moto_iam) as store:
        _round_trip(store, tmp_path, "profile", size=1000)
        assert store.identity == "shared credentials file, profile train"
    # The profile option picks another one: an assume-role profile (STS is moto's).
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", moto_iam.endpoint)
    with _store(moto_iam, moto_iam.uri() + "&profile=assumed") as store:
        assert store.list("id/profile")
        assert store.identity.startswith(f"assume role, role {moto_iam.role_arn}, profile assumed")
        assert ", expires " in store.identity
    # A profile that does not exist is a configuration error naming it.
    with pytest.raises(ConfigError, match="nosuch"):
        _store(moto_iam, moto_iam.uri() + "&profile=nosuch")


def test_credential_process_profile(
    moto_iam: MotoIam, aws_env: dict, tmp_path: Path, monkeypatch
) -> None:
    c = moto_iam.assume_role()
    out = {
        "Version": 1,
        "AccessKeyId": c["key"],
        "SecretAccessKey": c["secret"],
        "SessionToken": c["token"],
        "Expiration": (c["expiration"]).isoformat(),
    }
    script = tmp_path / "creds.sh"
    script.write_text(f"#!/bin/sh\ncat <<'EOF'\n{json.dumps(out)}\nEOF\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    Path(aws_env["config"]).write_text(f"[profile proc]\ncredential_process = {script}\n")
    monkeypatch.setenv("AWS_PROFILE", "proc")
    with _store(moto_iam) as store:
        _round_trip(store, tmp_path, "process", size=1000)
        assert store.identity.startswith("credential_process, profile proc, expires ")


def test_web_identity(moto_iam: MotoIam, aws_env: dict, tmp_path: Path, monkeypatch) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("eyJ-projected-service-account-token")
    with WebIdentitySTS(moto_iam, token="eyJ-projected-service-account-token") as sts:
        monkeypatch.setenv("AWS_ROLE_ARN", moto_iam.role_arn)
        monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(token_file))
        monkeypatch.setenv("AWS_ENDPOINT_URL_STS", sts.url)
        with _store(moto_iam) as store:
            _round_trip(store, tmp_path, "webid", size=1000)
            assert store.identity.startswith(f"web identity, role {moto_iam.role_arn}, expires ")
        assert len(sts.issued) == 1
        # A token STS does not accept: a clear exit 2, quickly, with no secret shown.
        token_file.write_text("eyJ-wrong")
        run = tmp_path / "run"
        run.mkdir()
        (run / "ep1.pt").write_bytes(b"x" * 100)
        t0 = time.monotonic()
        proc = _cli("push", str(run), moto_iam.uri("webneg"))
        assert proc.returncode == 2, proc.stderr
        assert time.monotonic() - t0 < 30
        assert "InvalidIdentityToken" in proc.stderr and "AWS credentials" in proc.stderr


def test_wrong_secret_and_wrong_token_exit_2(
    moto_iam: MotoIam, aws_env: dict, tmp_path: Path, monkeypatch
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "ep1.pt").write_bytes(b"x" * 100)
    key, secret = moto_iam.users["uploader"]
    c = moto_iam.assume_role()
    cases = {
        "wrong secret": {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": "wrong-" + secret},
        "wrong token": {
            "AWS_ACCESS_KEY_ID": c["key"],
            "AWS_SECRET_ACCESS_KEY": c["secret"],
            "AWS_SESSION_TOKEN": "wrong-" + c["token"][6:],
        },
    }
    for what, env in cases.items():
        t0 = time.monotonic()
        proc = _cli("push", str(run), moto_iam.uri("neg"), env=env)
        assert proc.returncode == 2, (what, proc.stderr)
        assert time.monotonic() - t0 < 30, what
        assert "refused" in proc.stderr, (what, proc.stderr)
        for value in env.values():
            assert value not in proc.stderr + proc.stdout, what


def test_no_credentials_anywhere_is_a_config_error(moto_iam: MotoIam, aws_env: dict) -> None:
    with pytest.raises(ConfigError, match="no AWS credentials found.*AWS_PROFILE"):
        _store(moto_iam)


# -- container credentials and IMDSv2 ------------------------------------------------------
def test_container_credentials_rotate_during_a_watch_run(
    moto_iam: MotoIam, aws_env: dict, tmp_path: Path
) -> None:
    """Credentials that expire within a minute (refreshed before every request: botocore
    refreshes within 15 minutes of expiry): the run uploads everything and the store
    sees several access keys."""
    token_file = tmp_path / "pod-token"
    token_file.write_text("pod-identity-token")
    run = tmp_path / "run"
    run.mkdir()
    with (
        ContainerCredentials(moto_iam, token="pod-identity-token", lifetime=50) as stub,
        FaultProxy(("127.0.0.1", moto_iam.port)) as proxy,
    ):
        env = {
            "AWS_CONTAINER_CREDENTIALS_FULL_URI": stub.url,
            "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE": str(token_file),
        }
        daemon = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uploader",
                "watch",
                str(run),
                moto_iam.uri("pod", port=proxy.port),
                "--settle",
                "0.2",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO), **env},
        )
        try:
            for i in range(3):
                write_random(run / f"ep{i}.pt", 6 * MiB + i, seed=i)
                time.sleep(1.0)
            deadline = time.monotonic() + 60
            while len(_uploaded(moto_iam, "pod/")) < 3 and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            daemon.send_signal(signal.SIGTERM)
            out, err = daemon.communicate(timeout=120)
        assert daemon.returncode == 0, err
        keys = set(proxy.access_keys)
    assert len(keys) >= 2 and keys <= set(stub.issued)
    assert "identity: container credentials" in err
    assert "pod-identity-token" not in err
    assert len(_uploaded(moto_iam, "pod/")) == 3


def _uploaded(moto: MotoIam, prefix: str) -> list[str]:
    listed = moto.client("s3").list_objects_v2(Bucket=moto.bucket, Prefix=prefix)
    return [o["Key"] for o in listed.get("Contents", []) if o["Key"].endswith(".pt")]


def test_instance_metadata_v2(
    moto_iam: MotoIam, aws_env: dict, tmp_path: Path, monkeypatch
) -> None:
    with IMDSv2(moto_iam) as imds:
        monkeypatch.delenv("AWS_EC2_METADATA_DISABLED")
        monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.url)
        with _store(moto_iam) as store:
            _round_trip(store, tmp_path, "imds", size=1000)
            assert store.identity.startswith("instance metadata, expires ")
        assert imds.issued and imds.refused == 0  # the token came first, every time


# -- refresh ---------------------------------------------------------------------------
class _FakeSession:
    """A botocore session whose credentials run on a fake clock (in-process timing)."""

    def __init__(self, moto: MotoIam, clock: list[_dt.datetime], minted: list[str]) -> None:
        self.moto, self.clock, self.minted = moto, clock, minted

    def get_credentials(self):  # noqa: ANN201
        from botocore.credentials import RefreshableCredentials

        def fetch() -> dict:
            c = self.moto.assume_role()
            self.minted.append(c["key"])
            expiry = self.clock[0] + _dt.timedelta(hours=1)
            return {
                "access_key": c["key"],
                "secret_key": c["secret"],
                "token": c["token"],
                "expiry_time": expiry.isoformat(),
            }

        first = fetch()
        return RefreshableCredentials(
            first["access_key"],
            first["secret_key"],
            first["token"],
            _dt.datetime.fromisoformat(first["expiry_time"]),
            fetch,
            "container-role",
            time_fetcher=lambda: self.clock[0],
        )


def test_refresh_ahead_of_expiry_on_a_fake_clock(moto_iam: MotoIam, aws_env: dict) -> None:
    t0 = _dt.datetime(2026, 1, 1, 12, 0, tzinfo=_dt.timezone.utc)
    clock, minted = [t0], []
    settings = parse_uri(moto_iam.uri()).hparams.store_settings()
    identity = AwsIdentity(
        settings, session_factory=lambda _p: _FakeSession(moto_iam, clock, minted)
    )
    first = identity.frozen()
    clock[0] = t0 + _dt.timedelta(minutes=44)  # 16 minutes left: kept
    assert identity.frozen() == first and len(minted) == 1
    clock[0] = t0 + _dt.timedelta(minutes=46)  # 14 minutes left: refreshed ahead of expiry
    second = identity.frozen()
    assert second.key != first.key and len(minted) == 2
    assert identity.describe().endswith("expires 2026-01-01 13:46Z")


def test_expired_token_once_refreshes_once_and_the_upload_id_stays(
    moto_iam: MotoIam, aws_env: dict, tmp_path: Path, monkeypatch
) -> None:
    _env_temporary(moto_iam, monkeypatch)
    with (
        FaultProxy(("127.0.0.1", moto_iam.port)) as proxy,
        _store(moto_iam, moto_iam.uri(port=proxy.port)) as store,
    ):
        src = write_random(tmp_path / "big.bin", 16 * MiB, seed=3)
        proxy.set_plan(FaultPlan(expired_token=1, methods=frozenset({"PUT"})))
        store.upload_file(src, "id/expired")
        assert store.backend.identity.refreshes == 1  # type: ignore[attr-defined]
        assert proxy.stats()["expired_token"] == 1
        creates = [r for r in proxy.requests if r[1] == "POST"]
        assert len(creates) == 2  # one CreateMultipartUpload, one Complete: one upload id
        assert store.stat("id/expired").size == 16 * MiB
        # A second refusal in a row is for good: AuthError, a configuration error.
        proxy.set_plan(FaultPlan(expired_token=2, methods=frozenset({"PUT"})))
        with pytest.raises(AuthError) as info:
            store.backend.put_bytes("id/x", b"x", {}, __import__("hashlib").sha256(b"x").digest())
        assert info.value.exit_code == 2


# -- naming the identity, never a secret -------------------------------------------------
def test_session_token_and_secret_never_shown_identity_named(
    moto_iam: MotoIam, aws_env: dict, tmp_path: Path
) -> None:
    c = moto_iam.assume_role()
    env = {
        "AWS_ACCESS_KEY_ID": c["key"],
        "AWS_SECRET_ACCESS_KEY": c["secret"],
        "AWS_SESSION_TOKEN": c["token"],
    }
    run = tmp_path / "run"
    run.mkdir()
    write_random(run / "ep1.pt", 6 * MiB, seed=9)
    push = _cli("push", str(run), moto_iam.uri("redact"), "-v", env=env)
    assert push.returncode == 0, push.stderr
    assert "identity: environment (with session token)" in push.stderr
    status = _cli("status", str(run), "--json", env=env)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["daemon"]["identity"] == "environment (with session token)"
    text = _cli("status", str(run), env=env).stdout
    assert "identity: environment (with session token)" in text
    shown = push.stdout + push.stderr + status.stdout + text
    shown += b"".join(
        p.read_bytes() for p in run.rglob("*") if p.is_file() and p.suffix != ".pt"
    ).decode("latin-1")
    for value in (c["secret"], c["token"]):
        assert value not in shown
    # A refusal's message names the source, not the values.
    bad = {**env, "AWS_SESSION_TOKEN": "x" + c["token"][1:]}
    refused = _cli("push", str(run), moto_iam.uri("redact2"), "-v", env=bad)
    assert refused.returncode == 2
    assert "environment (with session token)" in refused.stderr
    for value in (c["secret"], bad["AWS_SESSION_TOKEN"]):
        assert value not in refused.stderr + refused.stdout


# -- check -------------------------------------------------------------------------------
def test_check_all_allowed_and_delete_denied(moto_iam: MotoIam, aws_env: dict) -> None:
    key, secret = moto_iam.users["uploader"]
    env = {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}
    ok = _cli("check", moto_iam.uri("chk"), env=env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    for row in ("identity", "bucket", "put", "get", "list", "conditional writes", "delete"):
        assert any(line.startswith(row) and " ok " in line for line in ok.stdout.splitlines()), row
    assert "environment" in ok.stdout and "honoured" in ok.stdout
    as_json = json.loads(_cli("check", moto_iam.uri("chk"), "--json", env=env).stdout)
    assert as_json["ok"] is True
    assert [r["check"] for r in as_json["checks"]] == [
        "identity",
        "bucket",
        "put",
        "get",
        "list",
        "conditional writes",
        "delete",
        "tls",
        "clock",
    ]
    key, secret = moto_iam.users["nodelete"]
    denied = _cli(
        "check",
        moto_iam.uri("chk"),
        env={"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret},
    )
    assert denied.returncode == 2, denied.stdout + denied.stderr
    line = next(x for x in denied.stdout.splitlines() if x.startswith("delete"))
    assert "FAILED" in line and "AccessDenied" in line and "left behind" in line
    assert secret not in denied.stdout + denied.stderr
    none = _cli("check", moto_iam.uri("chk"))
    assert none.returncode == 2 and "no AWS credentials found" in none.stdout
