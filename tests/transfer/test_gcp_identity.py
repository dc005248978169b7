"""Google credentials through google-auth, against fake-gcs-server.

fake-gcs-server accepts any Authorization header, so a recording proxy
(harness/faultproxy.py) sits in front of it and shows which bearer token each request
carried; it can also answer 401 as GCS does to a token it no longer accepts. The GCE
metadata server is a stub (harness/servers/gcp_identity.py) speaking its real protocol:
no metadata server can exist here. The service account key file test uses a real RSA
key, and an OAuth token endpoint stub that checks the signed JWT google-auth sends.
"""

from __future__ import annotations

import datetime as _dt
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.data import write_random
from harness.faultproxy import FaultPlan, FaultProxy
from harness.servers.certs import Certs
from harness.servers.gcp_identity import (
    MetadataServer,
    OAuthTokenEndpoint,
    write_service_account_key,
)
from harness.servers.gcs import FakeGCS
from uploader.config.hparams import parse_uri
from uploader.errors import AuthError, ConfigError
from uploader.redact import redact
from uploader.transfer.backends.gcp_identity import REFRESH_MARGIN, GcpIdentity
from uploader.transfer.settings import StoreSettings
from uploader.transfer.store import ObjectStore
from uploader.transfer.tls import resolve_trust

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20
EMAIL = "ckpt-train@ckpt-proj.iam.gserviceaccount.com"


class Clock:
    """A clock the test moves forward."""

    def __init__(self) -> None:
        self.now = _dt.datetime.now(_dt.timezone.utc)

    def __call__(self) -> _dt.datetime:
        return self.now


@pytest.fixture
def mds(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[MetadataServer]:
    """The metadata server stub, and an environment where it is the only credential."""
    with MetadataServer(email=EMAIL) as server:
        for k, v in server.env().items():
            monkeypatch.setenv(k, v)
        monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
        monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "no-gcloud"))
        # google-auth reads GCE_METADATA_HOST once, when first imported.
        from google.auth.compute_engine import _metadata

        monkeypatch.setattr(_metadata, "_GCE_METADATA_HOST", server.host)
        yield server


@pytest.fixture
def proxy(fake_gcs_server: FakeGCS) -> Iterator[FaultProxy]:
    assert fake_gcs_server.shim is not None
    with FaultProxy((fake_gcs_server.host, fake_gcs_server.shim.port), FaultPlan()) as p:
        yield p


def _uri(gcs: FakeGCS, proxy: FaultProxy) -> str:
    bucket = "id-" + uuid.uuid4().hex[:10]
    gcs.make_bucket(bucket)
    return f"gs://{bucket}/exp?endpoint={proxy.url}"


def _store(uri: str) -> ObjectStore:
    return parse_uri(uri).hparams.initialize_object(part_size=1 * MiB)


def _put(store: ObjectStore, name: str, data: bytes) -> None:
    """One small object, in one request of the adapter's own."""
    store.backend.put_bytes(name, data, {}, b"")


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The CLI in its own process, with no key file in its environment."""
    full = {**os.environ, "PYTHONPATH": str(REPO), **env}
    full.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
    return subprocess.run(
        [sys.executable, "-m", "uploader", *args],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=REPO,
        env=full,
    )


def test_metadata_server_token_is_sent_and_renewed_before_expiry(
    fake_gcs_server: FakeGCS, proxy: FaultProxy, mds: MetadataServer, tmp_path: Path
) -> None:
    with _store(_uri(fake_gcs_server, proxy)) as store:
        identity = store.backend.identity  # type: ignore[attr-defined]
        clock = Clock()
        identity.clock = clock
        assert identity.bearer
        assert store.identity.startswith(f"metadata server, service account {EMAIL}")
        assert "token expires" in store.identity
        src = write_random(tmp_path / "a.bin", 3 * MiB, seed=1)
        store.upload_file(src, "id/a")  # streamed: one PUT
        _put(store, "id/small", b"hi")
        first = list(proxy.bearer_tokens)
        assert first and set(first) == {mds.issued[0]}

        # Not yet within the margin: the same token.
        clock.now += _dt.timedelta(seconds=mds.lifetime) - REFRESH_MARGIN * 2
        _put(store, "id/b", b"b")
        assert proxy.bearer_tokens[-1] == mds.issued[0]
        # Within the margin of its expiry: a new one, before the store could refuse it.
        clock.now += REFRESH_MARGIN
        _put(store, "id/c", b"c")
        dest = tmp_path / "a.back"
        store.download_file("id/a", dest, progress=False)
        assert dest.read_bytes() == src.read_bytes()
        assert len(mds.issued) == 2
        assert proxy.bearer_tokens[-1] == mds.issued[1] != mds.issued[0]
        assert identity.refreshes == 1
        assert proxy.stats()["unauthorized"] == 0
        assert mds.refused == 0  # every metadata request carried Metadata-Flavor
        for token in mds.issued:  # registered as secrets when handed out
            assert token not in redact(f"Authorization: Bearer {token}")


def test_a_401_gets_a_new_token_and_one_more_try(
    fake_gcs_server: FakeGCS, proxy: FaultProxy, mds: MetadataServer, tmp_path: Path
) -> None:
    with _store(_uri(fake_gcs_server, proxy)) as store:
        proxy.set_plan(FaultPlan(unauthorized=1))
        _put(store, "id/small", b"hi")  # a request of our own: sent again at once
        assert proxy.stats()["unauthorized"] == 1
        assert proxy.bearer_tokens[-2:] == [mds.issued[0], mds.issued[1]]

        proxy.set_plan(FaultPlan(unauthorized=1, methods=frozenset({"PUT"})))
        src = write_random(tmp_path / "big.bin", 3 * MiB, seed=2)
        store.upload_file(src, "id/big")  # streamed through libcloud: the retry sends it
        assert proxy.bearer_tokens[-1] == mds.issued[2]
        assert list(store.list("id/")) and len(mds.issued) == 3

        proxy.set_plan(FaultPlan(unauthorized=1, methods=frozenset({"GET"})))
        assert {o.name for o in store.list("id/")} == {"id/small", "id/big"}
        assert len(mds.issued) == 4


def test_a_token_refused_twice_is_an_auth_error_naming_the_identity(
    fake_gcs_server: FakeGCS, proxy: FaultProxy, mds: MetadataServer
) -> None:
    with _store(_uri(fake_gcs_server, proxy)) as store:
        proxy.set_plan(FaultPlan(unauthorized=2))
        with pytest.raises(AuthError) as err:
            store.backend.put_bytes("id/x", b"x", {}, b"")
        text = str(err.value)
        assert f"service account {EMAIL}" in text and "ckpt-uploader check" in text
        assert not any(tok in text for tok in mds.issued)
        assert len(mds.issued) == 2  # refreshed once, not in a loop


def test_push_status_and_check_name_the_metadata_identity_never_the_token(
    fake_gcs_server: FakeGCS, proxy: FaultProxy, mds: MetadataServer, tmp_path: Path
) -> None:
    env = {**mds.env(), "CLOUDSDK_CONFIG": str(tmp_path / "no-gcloud")}
    uri = _uri(fake_gcs_server, proxy)
    run = tmp_path / "run"
    run.mkdir()
    write_random(run / "ep1.pt", 2 * MiB, seed=3)
    push = _cli("push", str(run), uri, "-v", env=env)
    assert push.returncode == 0, push.stderr
    check = _cli("check", uri, env=env)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"metadata server, service account {EMAIL}, token expires" in check.stdout
    assert f"identity: metadata server, service account {EMAIL}" in push.stderr
    out = push.stdout + push.stderr + check.stdout + check.stderr
    assert mds.issued and proxy.bearer_tokens
    for token in mds.issued:
        assert token not in out
    assert set(proxy.bearer_tokens) <= set(mds.issued)
    assert redact(mds.issued[0]) == mds.issued[0]  # this process never saw them


def test_no_credentials_anywhere_exit_2_with_what_to_do(
    fake_gcs_server: FakeGCS, proxy: FaultProxy, tmp_path: Path
) -> None:
    closed = "127.0.0.1:9"  # discard port: nothing listens on loopback
    env = {
        "GCE_METADATA_HOST": closed,
        "GCE_METADATA_IP": closed,
        "GCE_METADATA_DETECT_RETRIES": "1",
        "CLOUDSDK_CONFIG": str(tmp_path / "no-gcloud"),
    }
    res = _cli("check", _uri(fake_gcs_server, proxy), env=env)
    assert res.returncode == 2, res.stdout + res.stderr
    out = res.stdout + res.stderr
    assert "no Google credentials found" in out
    assert "GOOGLE_APPLICATION_CREDENTIALS" in out and "gcloud" in out


@pytest.fixture
def oauth(certs: Certs, tmp_path: Path) -> Iterator[tuple[OAuthTokenEndpoint, Path]]:
    """A service account key file and the HTTPS token endpoint it names (test CA)."""
    key_file = tmp_path / "sa.json"
    with OAuthTokenEndpoint(EMAIL, None, certs.leaf, certs.leaf_key) as endpoint:
        endpoint.public_key = write_service_account_key(key_file, EMAIL, endpoint.url).public_key()
        yield endpoint, key_file


def test_key_file_token_request_trusts_the_ca_bundle_option(
    fake_gcs_server: FakeGCS,
    proxy: FaultProxy,
    oauth: tuple[OAuthTokenEndpoint, Path],
    certs: Certs,
    no_ca_environ: None,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    endpoint, key_file = oauth
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key_file))
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "no-gcloud"))
    uri = _uri(fake_gcs_server, proxy)
    # The token endpoint's certificate is from the test CA: not trusted by default.
    with pytest.raises(ConfigError, match="getting a Google access token") as err:
        _store(uri)
    assert "not trusted" in str(err.value) and "ca_bundle" in str(err.value)
    assert endpoint.issued == []

    with _store(f"{uri}&ca_bundle={certs.ca}") as store:
        assert store.identity.startswith(
            f"file $GOOGLE_APPLICATION_CREDENTIALS, service account {EMAIL}, token expires"
        )
        _put(store, "id/sa", b"signed by a key file")
        assert len(endpoint.issued) == 1
        assert set(proxy.bearer_tokens) == {endpoint.issued[0]}
        assert endpoint.refused == 0  # the JWT's signature, issuer and audience checked


def test_key_file_named_by_variables_as_before(
    fake_gcs_server: FakeGCS,
    proxy: FaultProxy,
    oauth: tuple[OAuthTokenEndpoint, Path],
    certs: Certs,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    endpoint, key_file = oauth
    monkeypatch.setenv("T_GCS_EMAIL", EMAIL)
    monkeypatch.setenv("T_GCS_KEYFILE", str(key_file))
    named = f"&key_environ=T_GCS_EMAIL&secret_environ=T_GCS_KEYFILE&ca_bundle={certs.ca}"
    uri = _uri(fake_gcs_server, proxy) + named
    with _store(uri) as store:
        assert store.identity.startswith(f"key file $T_GCS_KEYFILE, service account {EMAIL}")
        _put(store, "id/named", b"x")
        assert proxy.bearer_tokens[-1] == endpoint.issued[-1]
    monkeypatch.setenv("T_GCS_EMAIL", "someone-else@ckpt-proj.iam.gserviceaccount.com")
    with pytest.raises(ConfigError, match="make them agree"):
        _store(uri)


def test_hmac_keys_are_still_signed_not_bearer(
    fake_gcs_server: FakeGCS, proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("T_GCS_HMAC_ID", "GOOG1EXAMPLEHMACID0000")
    monkeypatch.setenv("T_GCS_HMAC_SECRET", "hmac-secret-value-not-shown")
    uri = (
        _uri(fake_gcs_server, proxy) + "&key_environ=T_GCS_HMAC_ID&secret_environ=T_GCS_HMAC_SECRET"
    )
    with _store(uri) as store:
        assert store.identity == "HMAC key $T_GCS_HMAC_ID / $T_GCS_HMAC_SECRET"
        _put(store, "id/hmac", b"x")
        assert proxy.bearer_tokens == []


def test_missing_google_auth_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "google.auth", None)  # as if not installed
    settings = StoreSettings(provider="google_storage", family="gcs", container="b")
    with pytest.raises(ConfigError, match=r"pip install 'ckpt-uploader\[gcs\]'"):
        GcpIdentity(settings, resolve_trust(None, False, "storage.googleapis.com"))
