"""Azure credentials through azure-identity and SAS, against Azurite.

Azurite runs with ``--oauth basic`` over HTTPS (the test CA's certificate): it accepts
bearer tokens and checks their audience, issuer and lifetime (``nbf``/``exp``), but
not their signature, so what these tests show is that the right token reaches every
request, is renewed, and that a refused one ends the run cleanly, not that Azure's
signature check passes. The Microsoft Entra token endpoint is a stub
(harness/servers/azure_identity.py) because no real one can exist here; azure-identity's
real ``DefaultAzureCredential`` (its ``EnvironmentCredential`` with a client secret, and
``WorkloadIdentityCredential`` with a token file) talks to it through msal, moved by
``AZURE_AUTHORITY_HOST``. SAS tokens are signed here with Azurite's published account
key per the documented string-to-sign, and Azurite checks them.
"""

from __future__ import annotations

import datetime as _dt
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.data import write_random
from harness.servers.azure import AZURITE_ACCOUNT, AZURITE_KEY, AZURITE_KEY_ENV, Azurite
from harness.servers.azure_identity import EntraTokenEndpoint, account_sas
from harness.servers.certs import Certs
from tests.fixtures.azure import serve_azurite
from uploader.config.hparams import parse_uri
from uploader.errors import AuthError, ConfigError
from uploader.redact import redact
from uploader.transfer.backends.azure_identity import REFRESH_MARGIN, AzureIdentity
from uploader.transfer.settings import StoreSettings
from uploader.transfer.store import ObjectStore
from uploader.transfer.tls import resolve_trust

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20
_ENTRA_VARS = (
    "AZURE_AUTHORITY_HOST",
    "AZURE_TENANT_ID",
    "AZURE_CLIENT_ID",
    "AZURE_CLIENT_SECRET",
    "AZURE_CLIENT_CERTIFICATE_PATH",
    "AZURE_FEDERATED_TOKEN_FILE",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_ACCOUNT",
)


class Clock:
    """A clock the test moves forward."""

    def __init__(self) -> None:
        self.now = _dt.datetime.now(_dt.timezone.utc)

    def __call__(self) -> _dt.datetime:
        return self.now


@pytest.fixture(scope="session")
def oauth_azurite(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[Azurite]:
    args = ("--cert", str(certs.leaf), "--key", str(certs.leaf_key), "--oauth", "basic")
    yield from serve_azurite(tmp_path_factory, "azurite-oauth", args)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No Azure credential in the environment but what the test sets; no Azure CLI login."""
    for var in _ENTRA_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AZURE_CONFIG_DIR", str(tmp_path / "no-az-login"))


@pytest.fixture
def entra(
    certs: Certs, monkeypatch: pytest.MonkeyPatch, clean_env: None
) -> Iterator[EntraTokenEndpoint]:
    with EntraTokenEndpoint(certs.leaf, certs.leaf_key) as endpoint:
        for k, v in endpoint.env().items():
            monkeypatch.setenv(k, v)
        yield endpoint


def _uri(az: Azurite, certs: Certs, **params: str) -> str:
    container = f"t{uuid.uuid4().hex[:20]}"
    extra = "".join(f"&{k}={v}" for k, v in params.items())
    return (
        f"azure://{container}/exp?endpoint=https://localhost:{az.port}"
        f"&key_environ={AZURITE_KEY_ENV}&ca_bundle={certs.ca}{extra}"
    )


def _store(uri: str) -> ObjectStore:
    return parse_uri(uri).hparams.initialize_object(part_size=1 * MiB, create_container=True)


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.run(
        [sys.executable, "-m", "uploader", *args],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=REPO,
        env=full,
    )


def test_client_secret_tokens_upload_and_are_renewed_before_expiry(
    oauth_azurite: Azurite, certs: Certs, entra: EntraTokenEndpoint, tmp_path: Path
) -> None:
    with _store(_uri(oauth_azurite, certs)) as store:
        identity = store.backend.identity  # type: ignore[attr-defined]
        assert identity.bearer and len(entra.issued) == 1
        assert store.identity.startswith(
            f"account {AZURITE_ACCOUNT}, Microsoft Entra token, service principal "
            f"{entra.client_id} (client secret) in tenant {entra.tenant}, token expires"
        )
        clock = Clock()
        identity.clock = clock
        src = write_random(tmp_path / "a.bin", 3 * MiB, seed=1)
        store.upload_file(src, "id/a")  # three blocks and a block list
        # Not yet within the margin: the same token.
        clock.now += _dt.timedelta(seconds=entra.lifetime) - REFRESH_MARGIN * 2
        store.backend.put_bytes("id/b", b"b", {}, b"")
        assert len(entra.issued) == 1
        # Within the margin of its expiry: a new one, before the store could refuse it.
        clock.now += REFRESH_MARGIN
        store.backend.put_bytes("id/c", b"c", {}, b"")
        assert len(entra.issued) == 2 and entra.issued[0] != entra.issued[1]
        assert identity.token() == entra.issued[1] and identity.refreshes == 1
        dest = tmp_path / "a.back"
        store.download_file("id/a", dest, progress=False)
        assert dest.read_bytes() == src.read_bytes()
        assert {o.name for o in store.list("id/")} == {"id/a", "id/b", "id/c"}
        assert entra.refused == 0
        for token in entra.issued:  # registered as secrets when handed out
            assert token not in redact(f"Authorization: Bearer {token}")


def test_workload_identity_token_file(
    oauth_azurite: Azurite,
    certs: Certs,
    entra: EntraTokenEndpoint,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.delenv("AZURE_CLIENT_SECRET")
    token_file = tmp_path / "azure-identity-token"
    token_file.write_text("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2EifQ.c2ln")
    monkeypatch.setenv("AZURE_FEDERATED_TOKEN_FILE", str(token_file))
    with _store(_uri(oauth_azurite, certs)) as store:
        assert "workload identity, client" in store.identity
        assert "token file $AZURE_FEDERATED_TOKEN_FILE" in store.identity
        store.backend.put_bytes("id/wi", b"x", {}, b"")
    assert entra.assertions == [token_file.read_text()]  # the file's token was presented


def test_a_refused_token_is_renewed_once_then_exit_2_without_printing_it(
    oauth_azurite: Azurite, certs: Certs, entra: EntraTokenEndpoint, tmp_path: Path
) -> None:
    uri = _uri(oauth_azurite, certs)
    with _store(uri) as store:  # creates the container with a good token
        entra.expired = True  # from now on every token is past its exp
        identity = store.backend.identity  # type: ignore[attr-defined]
        identity.refresh()
        with pytest.raises(AuthError) as err:
            store.backend.put_bytes("id/x", b"x", {}, b"")
        assert f"service principal {entra.client_id}" in str(err.value)
        assert len(entra.issued) == 3  # refused, renewed once, refused again: no loop

    run = tmp_path / "run"
    run.mkdir()
    write_random(run / "ep1.pt", 1 * MiB, seed=3)
    env = {k: os.environ[k] for k in _ENTRA_VARS if k in os.environ}
    env[AZURITE_KEY_ENV] = AZURITE_ACCOUNT
    start = time.monotonic()
    res = _cli("push", str(run), uri, env=env)
    elapsed = time.monotonic() - start
    assert res.returncode == 2, res.stdout + res.stderr
    assert elapsed < 30
    out = res.stdout + res.stderr
    assert "refused the credentials" in out
    assert len(entra.issued) >= 5
    for token in entra.issued:
        assert token not in out
    assert entra.client_secret not in out


def test_check_and_push_name_the_azure_identity_never_the_token(
    oauth_azurite: Azurite, certs: Certs, entra: EntraTokenEndpoint, tmp_path: Path
) -> None:
    uri = _uri(oauth_azurite, certs)
    _store(uri).close()
    env = {k: os.environ[k] for k in _ENTRA_VARS if k in os.environ}
    env[AZURITE_KEY_ENV] = AZURITE_ACCOUNT
    run = tmp_path / "run"
    run.mkdir()
    write_random(run / "ep1.pt", 2 * MiB, seed=4)
    push = _cli("push", str(run), uri, "-v", env=env)
    assert push.returncode == 0, push.stderr
    check = _cli("check", uri, env=env)
    assert check.returncode == 0, check.stdout + check.stderr
    named = f"Microsoft Entra token, service principal {entra.client_id} (client secret)"
    assert named in check.stdout and named in push.stderr
    out = push.stdout + push.stderr + check.stdout + check.stderr
    assert len(entra.issued) >= 3
    for token in entra.issued:
        assert token not in out
    assert entra.client_secret not in out


def test_no_azure_credentials_anywhere_exit_2_with_what_to_do(
    oauth_azurite: Azurite, certs: Certs, clean_env: None
) -> None:
    env = {AZURITE_KEY_ENV: AZURITE_ACCOUNT, "AZURE_CONFIG_DIR": os.environ["AZURE_CONFIG_DIR"]}
    res = _cli("check", _uri(oauth_azurite, certs), env=env)
    assert res.returncode == 2, res.stdout + res.stderr
    out = res.stdout + res.stderr
    assert "Microsoft Entra token" in out and "AZURE_STORAGE_KEY" in out
    assert "AZURE_FEDERATED_TOKEN_FILE" in out and "sas_environ" in out


def test_tokens_over_plain_http_are_refused(azurite: Azurite, clean_env: None) -> None:
    settings = parse_uri(
        f"azure://ckpts/x?endpoint=http://127.0.0.1:{azurite.port}&key_environ={AZURITE_KEY_ENV}"
    ).hparams
    with pytest.raises(ConfigError, match="over HTTPS only"):
        settings.initialize_object()


def test_a_sas_works_and_an_expired_one_is_refused_clearly(
    oauth_azurite: Azurite,
    certs: Certs,
    clean_env: None,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    now = _dt.datetime.now(_dt.timezone.utc)
    sas = account_sas(AZURITE_ACCOUNT, AZURITE_KEY, now + _dt.timedelta(hours=1))
    monkeypatch.setenv("T_AZ_SAS", sas)
    uri = _uri(oauth_azurite, certs, sas_environ="T_AZ_SAS")
    with _store(uri) as store:
        assert store.identity.startswith(f"account {AZURITE_ACCOUNT}, SAS $T_AZ_SAS, SAS expires")
        src = write_random(tmp_path / "s.bin", 2 * MiB, seed=5)
        store.upload_file(src, "sas/s")
        dest = tmp_path / "s.back"
        store.download_file("sas/s", dest, progress=False)
        assert dest.read_bytes() == src.read_bytes()
    sig = sas.split("sig=")[1]
    assert sig not in redact(f"GET /?{sas}") and sas not in redact(sas)

    # Expiring while the store is open: Azurite refuses it (403), the error says why.
    monkeypatch.setenv("T_AZ_SAS", account_sas(AZURITE_ACCOUNT, AZURITE_KEY, now))
    with pytest.raises(AuthError, match="issue a new SAS"):
        _store(uri)  # already past its signed expiry: refused before any request
    soon = _dt.datetime.now(_dt.timezone.utc) + _dt.timedelta(seconds=2)
    monkeypatch.setenv("T_AZ_SAS", account_sas(AZURITE_ACCOUNT, AZURITE_KEY, soon))
    with _store(uri) as store:
        time.sleep(max(0.0, (soon - _dt.datetime.now(_dt.timezone.utc)).total_seconds()) + 1.2)
        with pytest.raises(AuthError, match="expired.*issue a new SAS") as err:
            store.backend.put_bytes("sas/late", b"x", {}, b"")
        assert "sig=" not in str(err.value)

    # The CLI: exit 2, the advice, and never the SAS.
    env = {
        AZURITE_KEY_ENV: AZURITE_ACCOUNT,
        "T_AZ_SAS": account_sas(AZURITE_ACCOUNT, AZURITE_KEY, now),
    }
    res = _cli("ls", uri, env=env)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "issue a new SAS" in res.stderr and sig not in res.stdout + res.stderr


def test_sas_environ_is_azure_only_and_names_a_variable() -> None:
    with pytest.raises(ConfigError, match="Azure stores only"):
        parse_uri("s3://b/p?sas_environ=X").hparams.initialize_object()
    with pytest.raises(ConfigError, match="names an environment variable"):
        parse_uri("azure://ckpts/p?sas_environ=sv%3D2020%26sig%3Dabc").hparams.initialize_object()


def test_missing_azure_identity_names_the_pip_command(
    monkeypatch: pytest.MonkeyPatch, clean_env: None
) -> None:
    monkeypatch.setitem(sys.modules, "azure.identity", None)  # as if not installed
    monkeypatch.setenv("T_AZ_ACCOUNT", "acct")
    settings = StoreSettings(
        provider="azure_blobs", family="azure", container="c", key_environ="T_AZ_ACCOUNT"
    )
    with pytest.raises(ConfigError, match=r"pip install 'ckpt-uploader\[azure\]'"):
        AzureIdentity(settings, resolve_trust(None, False, "azure"))


def test_a_sas_is_registered_in_every_form_a_request_carries_it(
    monkeypatch: pytest.MonkeyPatch, clean_env: None, caplog: pytest.LogCaptureFixture
) -> None:
    import logging
    from urllib.parse import parse_qsl, urlencode

    from uploader.redact import RedactingFilter

    expiry = _dt.datetime.now(_dt.timezone.utc) + _dt.timedelta(hours=1)
    sas = account_sas("redactacct", AZURITE_KEY, expiry, permissions="rl")
    monkeypatch.setenv("T_AZ_ACCOUNT", "redactacct")
    monkeypatch.setenv("T_AZ_SAS_R", "?" + sas)  # as copied from a SAS URL
    settings = StoreSettings(
        provider="azure_blobs",
        family="azure",
        container="c",
        key_environ="T_AZ_ACCOUNT",
        extra={"sas_environ": "T_AZ_SAS_R"},
    )
    identity = AzureIdentity(settings, resolve_trust(None, False, "azure"))
    assert identity.mode == "sas" and identity.describe().startswith("account redactacct, SAS")
    sig = dict(parse_qsl(sas))["sig"]
    on_the_wire = urlencode({"restype": "container", **identity.sas})  # as libcloud sends it
    for text in (sas, sig, on_the_wire, f"https://h/c?{on_the_wire}"):
        assert sig not in redact(text) and "***" in redact(text)
    logger = logging.getLogger("test.azure.redact")
    logger.addFilter(RedactingFilter())
    with caplog.at_level(logging.INFO, logger="test.azure.redact"):
        logger.info("GET %s", f"https://h/c?{on_the_wire}")
    assert sig not in caplog.text and "***" in caplog.text
