"""StoreSettings: the resolved form of ObjectStoreHparams that the transfer layer takes."""

from __future__ import annotations

from pathlib import Path

import pytest

from uploader import ConfigError, ObjectStore, ObjectStoreHparams
from uploader.redact import redact
from uploader.transfer.settings import StoreSettings, resolve_settings


def test_hparams_resolve_to_settings() -> None:
    hp = ObjectStoreHparams(
        provider="minio",
        container="ckpts",
        key_environ="K_VAR",
        secret_environ="S_VAR",
        host="127.0.0.1",
        port=9000,
        region="eu-1",
        extra_init_kwargs={"secure": True, "timeout": 5},
    )
    st = hp.store_settings()
    assert (st.provider, st.family, st.container) == ("minio", "s3", "ckpts")
    assert (st.key_environ, st.secret_environ) == ("K_VAR", "S_VAR")
    assert (st.host, st.port, st.region, st.secure) == ("127.0.0.1", 9000, "eu-1", True)
    assert dict(st.extra) == {"timeout": 5}  # 'secure' is resolved, not passed on
    with pytest.raises(TypeError):
        st.extra["timeout"] = 1  # type: ignore[index]
    assert (
        ObjectStoreHparams(provider="s3", container="b", host="localhost").store_settings().secure
        is False
    )


def test_credentials_are_read_registered_and_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CKPT_SETTINGS_KEY", "AKIA-settings-test-key")
    monkeypatch.setenv("CKPT_SETTINGS_SECRET", "settings-test-secret-value")
    st = StoreSettings(
        provider="s3",
        family="s3",
        container="b",
        key_environ="CKPT_SETTINGS_KEY",
        secret_environ="CKPT_SETTINGS_SECRET",
    )
    assert st.credentials() == ("AKIA-settings-test-key", "settings-test-secret-value")
    assert redact("key AKIA-settings-test-key secret settings-test-secret-value") == (
        "key *** secret ***"
    )
    for text in (repr(st), str(st)):
        assert "settings-test-secret-value" not in text and "AKIA-settings-test-key" not in text
        assert "CKPT_SETTINGS_SECRET" in text
    monkeypatch.delenv("CKPT_SETTINGS_SECRET")
    with pytest.raises(ConfigError, match="CKPT_SETTINGS_SECRET"):
        st.credentials()


def test_cloud_family_needs_a_key_local_does_not() -> None:
    with pytest.raises(ConfigError, match="needs credentials"):
        StoreSettings(provider="azure_blobs", family="azure", container="c").credentials()
    # GCS (like S3) names no variables for its own chain: google-auth finds them.
    assert StoreSettings(provider="gcs", family="gcs", container="b").credentials() == (
        None,
        None,
    )
    assert StoreSettings(provider="local", family="local", container="/x/y").credentials() == (
        None,
        None,
    )
    with pytest.raises(ConfigError, match="family"):
        StoreSettings(provider="ftp", family="ftp", container="b")


def test_store_takes_settings_or_hparams(tmp_path: Path) -> None:
    bucket = tmp_path / "bucket"
    hp = ObjectStoreHparams(provider="local", container=str(bucket))
    with hp.initialize_object(create_container=True) as store:
        assert store.hparams is hp and store.settings == hp.store_settings()
        store.put_bytes("a", b"one")
    with ObjectStore(hp.store_settings()) as store:
        assert store.get_bytes("a") == b"one"
    assert resolve_settings(hp) == hp.store_settings()
    with pytest.raises(ConfigError, match="ObjectStoreHparams or StoreSettings"):
        ObjectStore("file:///tmp/x")  # type: ignore[arg-type]
