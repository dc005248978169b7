"""parse_uri: the one home of its cases (examples, bad URIs, TLS rules, properties)."""

from __future__ import annotations

import string
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uploader import ConfigError, ObjectStoreHparams, parse_uri
from uploader.config.hparams import join_key


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


@pytest.mark.parametrize(
    ("uri", "container", "prefix", "target"),
    [
        ("s3://b/exp/latest", "b", "exp", "latest"),
        ("s3://b/exp/rank_0/checkpoint-16?region=eu", "b", "exp", "rank_0/checkpoint-16"),
        ("s3://b/latest", "b", "", "latest"),
        ("s3://b/exp", "b", "exp", ""),
        ("s3://b/exp/latest/rank_1/x", "b", "exp", "latest/rank_1/x"),  # the first one
        ("s3://b/rank_x/latest", "b", "rank_x", "latest"),  # rank_ and a number only
        ("gs://b/a/b/rank_12/ep.pt", "b", "a/b", "rank_12/ep.pt"),
        ("azure://c/exp/latest/", "c", "exp", "latest"),
        # file://: the directory push named is the container (its lock and staging too).
        ("file:///data/bucket/exp/latest", "/data/bucket/exp", "", "latest"),
        ("file:///data/bucket/exp/rank_0/ep1.pt", "/data/bucket/exp", "", "rank_0/ep1.pt"),
        ("file:///data/bucket/exp", "/data/bucket/exp", "", ""),
        ("file:///data/bucket?prefix=exp/latest", "/data/bucket", "exp", "latest"),
    ],
)
def test_a_reading_command_splits_off_what_it_names_below_the_prefix(
    uri: str, container: str, prefix: str, target: str
) -> None:
    loc = parse_uri(uri, split_target=True)
    assert (loc.hparams.container, loc.prefix, loc.target) == (container, prefix, target)
    assert loc.name == join_key(prefix, target)
    # Without the split (push, watch), the URI is the store and prefix as written.
    whole = parse_uri(uri)
    assert whole.target == "" and join_key(whole.hparams.container, whole.prefix).endswith(
        join_key(prefix, target).strip("/")
    )


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("file:///data/b/latest?prefix=exp", "names a path below the container and a"),
        ("s3://b/exp/rank_0/../x", "contains '..'"),
    ],
)
def test_a_target_that_cannot_be_meant_is_refused(uri: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_uri(uri, split_target=True)


def test_uri_default_credential_variables() -> None:
    # s3:// names none: botocore's credential chain finds them (environment first).
    assert parse_uri("s3://b").hparams.key_environ is None
    assert parse_uri("s3://b").hparams.secret_environ is None
    assert parse_uri("azure://cc").hparams.key_environ == "AZURE_STORAGE_ACCOUNT"
    # gs:// names none either: google-auth's chain (GOOGLE_APPLICATION_CREDENTIALS first).
    assert parse_uri("gs://b").hparams.key_environ is None
    assert parse_uri("gs://b").hparams.secret_environ is None
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


def test_uri_endpoint_without_scheme_is_tls() -> None:
    assert parse_uri("s3://b/p?endpoint=s3.example.com:9000").hparams.secure is True
    assert parse_uri("s3://b/p?endpoint=https://s3.example.com").hparams.secure is True
    assert parse_uri("s3://b/p?endpoint=http://s3.example.com").hparams.secure is False
    assert parse_uri("azure://c/p").hparams.secure is True


# -- properties ---------------------------------------------------------------------------

#: Any text, up to 80 characters of all of Unicode but lone surrogates.
_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=80)
#: Path segments: letters, digits and "-_.~ " (quoted in the URI), or plain "_-." names.
_segment = st.one_of(
    st.text(
        alphabet=st.characters(
            codec="ascii", categories=("Lu", "Ll", "Nd"), include_characters="-_.~ "
        ),
        min_size=1,
        max_size=12,
    ).filter(lambda s: s.strip() == s),
    st.text(string.ascii_letters + string.digits + "_-.", min_size=1, max_size=12),
).filter(lambda s: s not in (".", ".."))
_bucket = st.one_of(
    st.from_regex(r"[a-z0-9][a-z0-9-]{1,20}[a-z0-9]", fullmatch=True),
    st.text(string.ascii_lowercase + string.digits + "-", min_size=3, max_size=20),
)


@settings(max_examples=300, deadline=None)
@given(_text)
def test_parse_uri_total(text: str) -> None:
    """Any string, bare or after a scheme, is either a location or a ConfigError with a
    message, never another exception; a location never climbs out of its prefix.
    (File URIs name directories, where "@" is an ordinary character.)"""
    for candidate in (text, "s3://" + text, "file:///" + text, "azure://c/" + text):
        try:
            loc = parse_uri(candidate)
        except ConfigError as exc:
            assert str(exc)
            continue
        assert ".." not in loc.prefix.split("/")
        if candidate == text:  # a bare string that parses names no credentials
            assert "@" not in loc.hparams.container


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["s3", "azure", "gs"]), _bucket, st.lists(_segment, max_size=4))
def test_parse_uri_round_trips_container_and_prefix(
    scheme: str, bucket: str, segments: list[str]
) -> None:
    prefix = "/".join(segments)
    uri = f"{scheme}://{bucket}/{quote(prefix)}"
    loc = parse_uri(uri)
    assert loc.hparams.container == bucket
    assert loc.prefix == prefix
    assert join_key(loc.prefix, "ep1.pt") == (f"{prefix}/ep1.pt" if prefix else "ep1.pt")


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=1, max_value=65535), st.sampled_from(["127.0.0.1", "localhost"]))
def test_parse_uri_endpoint(port: int, host: str) -> None:
    loc = parse_uri(f"s3://b/p?endpoint=http://{host}:{port}")
    assert loc.hparams.port == port and loc.hparams.host == host
    assert loc.hparams.secure is False
