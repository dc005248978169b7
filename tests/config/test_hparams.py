"""ObjectStoreHparams fields, URIs, credentials from the environment, and plain-HTTP rules."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uploader import ConfigError, ObjectStoreHparams, parse_uri
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


@pytest.mark.parametrize(
    ("uri", "provider", "container", "prefix"),
    [
        ("s3://bucket/run/1", "s3", "bucket", "run/1"),
        ("s3://bucket", "s3", "bucket", ""),
        ("s3://bucket/", "s3", "bucket", ""),
        ("azure://ckpts/a/b/", "azure_blobs", "ckpts", "a/b"),
        ("az://ckpts/x", "azure_blobs", "ckpts", "x"),
        ("gs://bkt/p", "google_storage", "bkt", "p"),
        ("gcs://bkt", "google_storage", "bkt", ""),
        ("file:///data/bucket", "local", "/data/bucket", ""),
        ("file:///data/bucket?prefix=run/1", "local", "/data/bucket", "run/1"),
        ("s3://b/with%20space", "s3", "b", "with space"),
    ],
)
def test_uris(uri: str, provider: str, container: str, prefix: str) -> None:
    loc = parse_uri(uri)
    assert loc.hparams.provider == provider
    assert loc.hparams.container == container
    assert loc.prefix == prefix
    assert ObjectStoreHparams.from_uri(uri).container == container


def test_uri_default_credential_variables() -> None:
    assert parse_uri("s3://b").hparams.key_environ == "AWS_ACCESS_KEY_ID"
    assert parse_uri("s3://b").hparams.secret_environ == "AWS_SECRET_ACCESS_KEY"
    assert parse_uri("azure://cc").hparams.key_environ == "AZURE_STORAGE_ACCOUNT"
    assert parse_uri("gs://b").hparams.key_environ == "GOOGLE_CLIENT_EMAIL"
    assert parse_uri("file:///x/y").hparams.key_environ is None
    hp = parse_uri("s3://b?key_environ=MY_KEY&secret_environ=MY_SECRET").hparams
    assert (hp.key_environ, hp.secret_environ) == ("MY_KEY", "MY_SECRET")


def test_uri_endpoint_and_region() -> None:
    hp = parse_uri("s3://b/p?endpoint=http://127.0.0.1:9000&region=eu-west-1").hparams
    assert (hp.host, hp.port, hp.region) == ("127.0.0.1", 9000, "eu-west-1")
    assert hp.extra_init_kwargs == {"secure": False}
    assert hp.secure is False
    hp = parse_uri("s3://b?endpoint=https://minio.example.com").hparams
    assert (hp.host, hp.port, hp.secure) == ("minio.example.com", None, True)
    hp = parse_uri("azure://cc?endpoint=127.0.0.1:10000").hparams
    assert (hp.host, hp.port) == ("127.0.0.1", 10000)
    assert hp.secure is False  # loopback
    # Overrides refine the URI.
    hp = parse_uri("s3://b?region=x", region="y", port=1234).hparams
    assert (hp.region, hp.port) == ("y", 1234)


@pytest.mark.parametrize(
    ("uri", "words"),
    [
        ("s3://b?colour=red", "unknown URI parameter"),
        ("s3://AKIA:secret@bucket/p", "must not be written into the URI"),
        ("s3://b/a/../c", "'..'"),
        ("s3://b/..", "'..'"),
        ("ftp://b/p", "unsupported URI scheme"),
        ("bucket/p", "malformed"),
        ("s3:///p", "names no container"),
        ("file://host/x", "names a host"),
        ("s3://b?endpoint=ftp://h", "must be http"),
        ("s3://b?endpoint=http://h:99999", "bad port"),
        ("s3://b?endpoint=http://:80", "names no host"),
        ("file:///x/y?prefix=a/../b", "'..'"),
    ],
)
def test_bad_uris(uri: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_uri(uri)
    assert words in str(info.value)
    if "secret" in uri:
        assert "secret" not in str(info.value).replace("secret_environ", "")


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
        ObjectStoreHparams(provider="s3", container="c").credentials()
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


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=80))
def test_parse_uri_never_raises_anything_but_config_error(text: str) -> None:
    for candidate in (text, "s3://" + text, "file:///" + text, "azure://c/" + text):
        try:
            parse_uri(candidate)
        except ConfigError:
            pass


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(["s3", "azure", "gs"]),
    _bucket,
    st.lists(_segment, max_size=4),
)
def test_parse_uri_round_trips_container_and_prefix(
    scheme: str, bucket: str, segments: list[str]
) -> None:
    from urllib.parse import quote

    prefix = "/".join(segments)
    uri = f"{scheme}://{bucket}/{quote(prefix)}"
    loc = parse_uri(uri)
    assert loc.hparams.container == bucket
    assert loc.prefix == prefix
    assert loc.key("ep1.pt") == (f"{prefix}/ep1.pt" if prefix else "ep1.pt")
