"""ObjectStoreHparams fields, URIs, credentials from the environment, and plain-HTTP rules."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import strategies as st

from uploader import ConfigError, ObjectStoreHparams
from uploader.config.hparams import is_loopback, provider_family


def test_fields_exactly() -> None:
    names = [f.name for f in dataclasses.fields(ObjectStoreHparams)]
    assert names == [
        "provider",
        "container",
        "key_environ",
        "secret_environ",
        "host",
        "port",
        "region",
        "extra_init_kwargs",
    ]
    hp = ObjectStoreHparams(provider="S3", container="b")
    assert hp.provider == "s3"
    assert (hp.key_environ, hp.secret_environ, hp.host, hp.port, hp.region) == (None,) * 5
    assert hp.extra_init_kwargs == {}
    assert hp.to_dict()["container"] == "b"


def test_unknown_provider_suggests_close_matches() -> None:
    with pytest.raises(ConfigError, match="Did you mean 'azure_blobs'"):
        ObjectStoreHparams(provider="azure_blob", container="c")
    with pytest.raises(ConfigError, match="'s3'"):
        ObjectStoreHparams(provider="s33", container="c")
    with pytest.raises(ConfigError, match="unknown object store provider 'zzzzzz'"):
        provider_family("zzzzzz")
    assert provider_family("minio") == "s3"
    assert provider_family("LOCAL") == "local"


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"provider": "", "container": "c"}, "provider is empty"),
        ({"provider": "s3", "container": " "}, "container is empty"),
        ({"provider": "s3", "container": "a/b"}, "slash"),
        ({"provider": "local", "container": "relative/dir"}, "absolute"),
        ({"provider": "s3", "container": "c", "key_environ": "not a name"}, "NAME"),
        ({"provider": "s3", "container": "c", "port": 0}, "out of range"),
        ({"provider": "s3", "container": "c", "port": 70000}, "out of range"),
        ({"provider": "s3", "container": "c", "port": "http"}, "not a number"),
        ({"provider": "s3", "container": "c", "host": "http://x"}, "without scheme"),
        ({"provider": "s3", "container": "c", "extra_init_kwargs": []}, "mapping"),
        ({"provider": "s3", "container": "c", "extra_init_kwargs": {"secret": "x"}}, "secret"),
        ({"provider": "s3", "container": "c", "extra_init_kwargs": {"key": "x"}}, "key"),
    ],
)
def test_validation(kwargs: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        ObjectStoreHparams(**kwargs)


def test_port_string_is_converted() -> None:
    assert ObjectStoreHparams(provider="s3", container="c", port="9000").port == 9000  # type: ignore[arg-type]


def test_credentials_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    hp = ObjectStoreHparams(
        provider="s3", container="c", key_environ="T_KEY_VAR", secret_environ="T_SECRET_VAR"
    )
    monkeypatch.delenv("T_KEY_VAR", raising=False)
    monkeypatch.setenv("T_SECRET_VAR", "s3cr3t-value-xyz")
    with pytest.raises(ConfigError) as info:
        hp.credentials()
    assert "T_KEY_VAR" in str(info.value) and "not set" in str(info.value)
    monkeypatch.setenv("T_KEY_VAR", "   ")
    with pytest.raises(ConfigError) as info:
        hp.credentials()
    assert "T_KEY_VAR" in str(info.value) and "empty" in str(info.value)
    monkeypatch.setenv("T_KEY_VAR", "AKIAEXAMPLE")
    monkeypatch.setenv("T_SECRET_VAR", "")
    with pytest.raises(ConfigError) as info:
        hp.credentials()
    assert "T_SECRET_VAR" in str(info.value)
    assert "AKIAEXAMPLE" not in str(info.value)
    monkeypatch.setenv("T_SECRET_VAR", "s3cr3t-value-xyz")
    assert hp.credentials() == ("AKIAEXAMPLE", "s3cr3t-value-xyz")
    for text in (repr(hp), str(hp), str(hp.to_dict())):
        assert "s3cr3t-value-xyz" not in text and "AKIAEXAMPLE" not in text
    assert "T_SECRET_VAR" in repr(hp)


def test_cloud_provider_needs_credentials() -> None:
    with pytest.raises(ConfigError, match="needs credentials"):
        ObjectStoreHparams(provider="azure_blobs", container="c").credentials()
    assert ObjectStoreHparams(provider="local", container="/x/y").credentials() == (None, None)


@pytest.mark.parametrize(
    ("host", "extra", "secure"),
    [
        (None, {}, True),
        ("s3.example.com", {}, True),
        ("10.0.0.5", {}, True),
        ("127.0.0.1", {}, False),
        ("127.1.2.3", {}, False),
        ("localhost", {}, False),
        ("::1", {}, False),
        ("s3.example.com", {"secure": False}, False),
        ("127.0.0.1", {"secure": True}, True),
    ],
)
def test_plain_http_only_on_loopback_or_when_asked(
    host: str | None, extra: dict, secure: bool
) -> None:
    hp = ObjectStoreHparams(provider="minio", container="c", host=host, extra_init_kwargs=extra)
    assert hp.secure is secure


def test_is_loopback() -> None:
    assert is_loopback("[::1]") and is_loopback("a.localhost")
    assert not is_loopback("") and not is_loopback(None) and not is_loopback("example.com")


# -- properties ---------------------------------------------------------------------------

_segment = st.text(
    alphabet=st.characters(
        codec="ascii", categories=("Lu", "Ll", "Nd"), include_characters="-_.~ "
    ),
    min_size=1,
    max_size=12,
).filter(lambda s: s not in (".", "..") and s.strip() == s)
_bucket = st.from_regex(r"[a-z0-9][a-z0-9-]{1,20}[a-z0-9]", fullmatch=True)
