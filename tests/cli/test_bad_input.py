"""A catalogue of bad input: each case is refused with a message that says what to do.

Library cases check the exception type and that the message names a remedy.
Command cases (``ckpt-uploader ...`` in a real subprocess) check a non-zero exit,
a one-paragraph message without a traceback, and that nothing in the run
directory or the bucket was lost or overwritten. Checkpoint-file cases run the
loader on real damaged files. Property-based tests (hypothesis) cover every
parser: they never crash with anything but the documented error, and accept
what they should.
"""

from __future__ import annotations

import json
import os
import re
import string
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.data import file_digest
from uploader import ConfigError, IntegrityError, ObjectStoreHparams, parse_uri
from uploader.bucket.pointer import Pointer, PointerEntry, resolve_latest
from uploader.errors import ContainerNotFoundError, ObjectNotFoundError
from uploader.transfer.digest import Digest
from uploader.transfer.store import check_object_name

#: Words a message uses when it tells the user what to do next.
REMEDY = re.compile(
    r"\b(use|give|set|export|name|pass|create|put|expected|must|check|run|"
    r"load|fetch|restore|wait|try|accepted|remove|choose|did you mean|mkdir|may not|named by|"
    r"known|usage)\b"
    r"|e\.g\. |\d+-\d+",  # an example, or the accepted range
    re.I,
)


@dataclass(frozen=True)
class Case:
    id: str
    run: Callable[[Path], Any]
    raises: type[BaseException] | tuple[type[BaseException], ...]
    match: str


def _hp(**kw: Any) -> Callable[[Path], Any]:
    return lambda _tmp: ObjectStoreHparams(**kw)


def _uri(uri: str) -> Callable[[Path], Any]:
    return lambda _tmp: parse_uri(uri)


def _env_missing(tmp: Path) -> Any:
    os.environ.pop("CKPT_BADINPUT_UNSET_VAR", None)
    return ObjectStoreHparams(
        provider="s3",
        container="b",
        key_environ="CKPT_BADINPUT_UNSET_VAR",
        secret_environ="CKPT_BADINPUT_UNSET_VAR",
    ).credentials()


def _env_empty(tmp: Path) -> Any:
    os.environ["CKPT_BADINPUT_EMPTY_VAR"] = ""
    try:
        return ObjectStoreHparams(
            provider="s3",
            container="b",
            key_environ="CKPT_BADINPUT_EMPTY_VAR",
            secret_environ="CKPT_BADINPUT_EMPTY_VAR",
        ).credentials()
    finally:
        del os.environ["CKPT_BADINPUT_EMPTY_VAR"]


def _no_container(tmp: Path) -> Any:
    hp = ObjectStoreHparams(provider="local", container=str(tmp / "does-not-exist"))
    return hp.initialize_object()


def _store(tmp: Path) -> Any:
    bucket = tmp / "bucket"
    bucket.mkdir(exist_ok=True)
    return ObjectStoreHparams(provider="local", container=str(bucket)).initialize_object(
        part_size=1 << 20
    )


def _upload_as(name: str) -> Callable[[Path], Any]:
    def run(tmp: Path) -> Any:
        src = tmp / "f.bin"
        src.write_bytes(b"data")
        with _store(tmp) as store:
            return store.upload_file(src, name)

    return run


def _download_missing(tmp: Path) -> Any:
    with _store(tmp) as store:
        return store.download_file("run/rank_0/none.pt", tmp / "out.pt", progress=False)


def _download_corrupt(tmp: Path) -> Any:
    src = tmp / "f.bin"
    src.write_bytes(os.urandom(4096))
    with _store(tmp) as store:
        store.upload_file(src, "run/rank_0/ep1.pt")
        obj = tmp / "bucket" / "run/rank_0/ep1.pt"
        data = bytearray(obj.read_bytes())
        data[100] ^= 0xFF
        obj.write_bytes(bytes(data))
        return store.download_file("run/rank_0/ep1.pt", tmp / "out.pt", progress=False)


def _download_truncated(tmp: Path) -> Any:
    src = tmp / "f.bin"
    src.write_bytes(os.urandom(4096))
    with _store(tmp) as store:
        store.upload_file(src, "run/rank_0/ep1.pt")
        obj = tmp / "bucket" / "run/rank_0/ep1.pt"
        obj.write_bytes(obj.read_bytes()[:1000])
        return store.download_file("run/rank_0/ep1.pt", tmp / "out.pt", progress=False)


def _pointer(data: bytes) -> Callable[[Path], Any]:
    return lambda _tmp: Pointer.from_json(data, "run/rank_0/latest.json")


def _latest_empty(tmp: Path) -> Any:
    with _store(tmp) as store:
        return resolve_latest(store, "run")


def _verify_mismatch(tmp: Path) -> Any:
    with _store(tmp) as store:
        store.put_bytes("x.bin", b"hello")
        return store.download_file(
            "x.bin", tmp / "x.bin", progress=False, expected_digest="sha256:" + "0" * 64
        )


def _interval(value: Any) -> Callable[[Path], Any]:
    def run(_tmp: Path) -> Any:
        from ckpt.interval import parse_interval

        return parse_interval(value)

    return run


def _codec(value: Any) -> Callable[[Path], Any]:
    def run(_tmp: Path) -> Any:
        from ckpt.codecs import normalize_codec

        return normalize_codec(value)

    return run


LIBRARY_CASES = [
    # -- provider names and fields
    Case("provider-unknown", _hp(provider="s4", container="b"), ConfigError, "did you mean"),
    Case("provider-empty", _hp(provider="", container="b"), ConfigError, "provider is empty"),
    Case("container-empty", _hp(provider="s3", container=" "), ConfigError, "container is empty"),
    Case("container-slash", _hp(provider="s3", container="a/b"), ConfigError, "prefix"),
    Case("local-relative", _hp(provider="local", container="rel/dir"), ConfigError, "absolute"),
    Case("port-text", _hp(provider="s3", container="b", port="http"), ConfigError, "1-65535"),
    Case("port-range", _hp(provider="s3", container="b", port=70000), ConfigError, "1-65535"),
    Case(
        "host-with-scheme",
        _hp(provider="s3", container="b", host="http://h:9000"),
        ConfigError,
        "without scheme",
    ),
    Case(
        "secret-as-env-name",
        _hp(provider="s3", container="b", key_environ="AKIA/abc+secret="),
        ConfigError,
        "NAME of an environment variable",
    ),
    Case(
        "secret-in-extra-kwargs",
        _hp(provider="s3", container="b", extra_init_kwargs={"secret": "x"}),
        ConfigError,
        "environment variables",
    ),
    Case(
        "extra-kwargs-not-mapping",
        _hp(provider="s3", container="b", extra_init_kwargs=["secure"]),
        ConfigError,
        "mapping",
    ),
    # -- environment variables
    Case("env-missing", _env_missing, ConfigError, "export CKPT_BADINPUT_UNSET_VAR"),
    Case("env-empty", _env_empty, ConfigError, "is empty"),
    Case(
        "azure-without-credentials",
        lambda _t: ObjectStoreHparams(provider="azure_blobs", container="b").credentials(),
        ConfigError,
        "key_environ",
    ),
    # -- URIs
    Case("uri-no-scheme", _uri("bucket/prefix"), ConfigError, "expected e.g. s3://"),
    Case("uri-bad-scheme", _uri("ftp://bucket/p"), ConfigError, "use one of"),
    Case("uri-no-container", _uri("s3:///prefix"), ConfigError, "names no container"),
    Case("uri-credentials", _uri("s3://AKIA:secret@bucket/p"), ConfigError, "key_environ"),
    Case("uri-dotdot-prefix", _uri("s3://bucket/a/../b"), ConfigError, "'\\.\\.'"),
    Case("uri-file-relative", _uri("file://relative/dir"), ConfigError, "file:///"),
    Case("uri-unknown-param", _uri("s3://b/p?colour=red"), ConfigError, "accepted"),
    Case("uri-endpoint-scheme", _uri("s3://b/p?endpoint=ftp://h:1"), ConfigError, "http://"),
    Case("uri-endpoint-port", _uri("s3://b/p?endpoint=http://h:99999"), ConfigError, "1-65535"),
    # -- containers that do not exist
    Case("container-missing", _no_container, ContainerNotFoundError, "create-container"),
    # -- object names
    Case("object-dotdot", _upload_as("run/../../etc/passwd"), ConfigError, "'\\.\\.'"),
    Case("object-absolute", _upload_as("/etc/passwd"), ConfigError, "relative path"),
    Case("object-empty-segment", _upload_as("run//ep1.pt"), ConfigError, "empty segments"),
    Case("object-nul", _upload_as("run/ep\x001.pt"), ConfigError, "NUL"),
    # -- digests and integrity
    Case("digest-garbage", lambda _t: Digest.parse("md5:abc"), IntegrityError, "expected"),
    Case("digest-mismatch", _verify_mismatch, IntegrityError, "do not use it"),
    Case("download-missing", _download_missing, ObjectNotFoundError, "not found"),
    Case("download-flipped", _download_corrupt, IntegrityError, "corrupt, do not use it"),
    Case("download-truncated", _download_truncated, IntegrityError, "do not use it|truncated"),
    # -- commit pointers
    Case("pointer-not-json", _pointer(b"<html>"), IntegrityError, "restore it"),
    Case("pointer-wrong-format", _pointer(b'{"format": "x"}'), IntegrityError, "restore it"),
    Case(
        "pointer-missing-field",
        _pointer(b'{"format": "ckpt-uploader/pointer/1", "rank": 0, "latest": {}}'),
        IntegrityError,
        "restore it",
    ),
    Case("latest-nothing-uploaded", _latest_empty, ObjectNotFoundError, "ckpt-uploader ls"),
    # -- intervals and codecs
    Case("interval-zero", _interval("0ep"), ValueError, "positive"),
    Case("interval-unit", _interval("10 epochs"), ValueError, "'<N>ep'"),
    Case("interval-bool", _interval(True), ValueError, "'<N>ep'"),
    Case("interval-negative", _interval(-3), ValueError, "positive"),
    Case("codec-unknown", _codec("brotli"), ValueError, "zstd"),
]


@pytest.mark.parametrize("case", LIBRARY_CASES, ids=[c.id for c in LIBRARY_CASES])
def test_library_refuses_bad_input(case: Case, tmp_path: Path) -> None:
    with pytest.raises(case.raises) as info:
        case.run(tmp_path)
    msg = str(info.value)
    assert re.search(case.match, msg, re.I), msg
    assert REMEDY.search(msg), f"no remedy in: {msg}"
    # Nothing of a partial download is left behind.
    assert not list(tmp_path.glob(".out.pt.*.part"))
    assert not (tmp_path / "out.pt").exists()


def test_failed_download_keeps_the_existing_destination(tmp_path: Path) -> None:
    """A corrupt object never overwrites a good local file of the same name."""
    dest = tmp_path / "out.pt"
    dest.write_bytes(b"the good copy")
    with pytest.raises(IntegrityError):
        _download_corrupt(tmp_path)
    assert dest.read_bytes() == b"the good copy"


# -- property-based tests of the parsers ------------------------------------------------------

# parse_uri's property tests live in tests/config/test_parse_uri.py.

_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=60)
_segment = st.text(string.ascii_letters + string.digits + "_-.", min_size=1, max_size=12).filter(
    lambda s: s not in (".", "..")
)


@settings(max_examples=300, deadline=None)
@given(_text)
def test_check_name_total(name: str) -> None:
    try:
        out = check_object_name(name)
    except ConfigError:
        return
    assert not out.startswith("/")
    assert ".." not in out.split("/") and "" not in out.split("/")


@settings(max_examples=200, deadline=None)
@given(st.lists(_segment, min_size=1, max_size=5))
def test_check_name_accepts_plain_paths(segs: list[str]) -> None:
    name = "/".join(segs)
    assert check_object_name(name) == name


# Digest.parse: tests/transfer/test_digest.py has its property tests.


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.binary(max_size=5000), st.integers(min_value=1, max_value=2000))
def test_file_digest_verifies_itself(tmp_path: Path, data: bytes, part: int) -> None:
    """A digest of any part size, computed from its definition, verifies on download
    (ranged reads aligned to those parts, each hashed as it arrives)."""
    f = tmp_path / "d.bin"
    f.write_bytes(data)
    d = file_digest(f, part)
    with _store(tmp_path) as store:
        store.put_bytes("d.bin", data)
        out = store.download_file(
            "d.bin",
            tmp_path / "out.bin",
            progress=False,
            expected_digest=d,
            expected_size=len(data),
        )
    assert out.read_bytes() == data


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), _text.map(str.encode)))
def test_pointer_parse_total(data: bytes) -> None:
    try:
        Pointer.from_json(data, "p")
    except IntegrityError as exc:
        assert "restore it" in str(exc)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["format", "rank", "latest", "history", "x"]), _json_values, max_size=5
    )
)
def test_pointer_parse_total_structured(d: dict[str, Any]) -> None:
    d = dict(d)
    if "format" in d:
        d["format"] = "ckpt-uploader/pointer/1"
    try:
        Pointer.from_json(json.dumps(d).encode(), "p")
    except IntegrityError:
        pass


@settings(max_examples=100, deadline=None)
@given(
    st.text(string.ascii_letters + "/_.", min_size=1, max_size=20),
    st.integers(min_value=0, max_value=1 << 60),
    st.integers(min_value=0, max_value=1 << 62),
)
def test_pointer_round_trip(name: str, size: int, mtime: int) -> None:
    """A pointer reads back as written; a name that is not a plain relative path (empty,
    absolute, '.', '..' or empty parts) is refused on reading, never used as a path."""
    e = PointerEntry(name, f"run/rank_0/{name}", size, "sha256:" + "a" * 64, mtime, 1.5)
    p = Pointer(0, e, (e,))
    parts = name.split("/")
    if name.startswith("/") or any(part in ("", ".", "..") for part in parts):
        with pytest.raises(IntegrityError, match="not a plain relative path"):
            Pointer.from_json(p.to_json(), "p")
    else:
        assert Pointer.from_json(p.to_json(), "p") == p


@settings(max_examples=300, deadline=None)
@given(st.one_of(_text, st.integers(), st.booleans(), st.none(), st.floats()))
def test_parse_interval_total(value: Any) -> None:
    from ckpt.interval import parse_interval

    try:
        iv = parse_interval(value)
    except ValueError as exc:
        assert "'<N>ep'" in str(exc)
        return
    assert iv.value > 0 and iv.unit in ("ep", "ba")
    assert parse_interval(str(iv)) == iv


@settings(max_examples=200, deadline=None)
@given(_text)
def test_normalize_codec_total(value: str) -> None:
    from ckpt.codecs import CODECS, normalize_codec

    try:
        out = normalize_codec(value)
    except ValueError as exc:
        assert "zstd" in str(exc)
        return
    assert out is None or out in CODECS


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(sorted(["s3", "S3", " minio ", "azure_blobs", "local", "google_storage"])),
    st.one_of(st.none(), st.integers()),
    st.one_of(st.none(), _text),
)
def test_hparams_total(provider: str, port: int | None, host: str | None) -> None:
    container = "/tmp/b" if provider.strip().lower() == "local" else "bucket"
    try:
        hp = ObjectStoreHparams(provider=provider, container=container, port=port, host=host)
    except ConfigError as exc:
        assert REMEDY.search(str(exc))
        return
    assert hp.provider == provider.strip().lower()
    assert hp.port is None or 1 <= hp.port <= 65535


@settings(max_examples=300, deadline=None)
@given(st.one_of(_text, st.integers(min_value=0, max_value=1 << 50)))
def test_parse_bytes_total(value: Any) -> None:
    from uploader.config.files import parse_bytes

    try:
        n = parse_bytes(value)
    except ConfigError as exc:
        assert "e.g." in str(exc)
        return
    assert isinstance(n, int) and n >= 0


@settings(max_examples=100, deadline=None)
@given(
    st.integers(min_value=0, max_value=1 << 20),
    st.sampled_from(["", "K", "M", "G", "k", "Mi", "MiB"]),
)
def test_parse_bytes_units(n: int, unit: str) -> None:
    from uploader.config.files import parse_bytes

    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[unit[:1].lower()]
    assert parse_bytes(f"{n}{unit}") == n * scale


@settings(max_examples=300, deadline=None)
@given(st.one_of(_text, _json_values.map(json.dumps)))
def test_parse_extra_kwargs_total(text: str) -> None:
    from uploader.config.files import parse_extra_kwargs

    try:
        out = parse_extra_kwargs(text)
    except ConfigError as exc:
        assert "secure" in str(exc)  # the message shows an example
        return
    assert isinstance(out, dict)


_toml_lines = st.lists(
    st.one_of(
        st.sampled_from(
            [
                "[store]",
                "[watch]",
                "[other]",
                "[store",
                "uri = 'file:///b'",
                "provider = 'local'",
                "container = '/tmp/b'",
                "secret = 'x'",
                "port = 'abc'",
                "keep_local = 3",
                "bwlimit = '1M'",
                "= 1",
                "x = [1,",
            ]
        ),
        _text,
    ),
    max_size=6,
)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(_toml_lines)
def test_load_config_file_total(tmp_path: Path, lines: list[str]) -> None:
    from uploader.config.files import load_config_file, store_location

    f = tmp_path / "c.toml"
    f.write_text("\n".join(lines), encoding="utf-8")
    try:
        cfg = load_config_file(str(f))
        store_location(None, {}, cfg["store"])
    except ConfigError as exc:
        assert str(exc)
        return


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            _text,
            st.sampled_from(
                [
                    "watch",
                    "push",
                    "pull",
                    "ls",
                    "verify",
                    "status",
                    "--to",
                    "--port",
                    "--rank",
                    "--settle",
                    "--part-size",
                    "--files",
                    "--bwlimit",
                    "--extra-init-kwargs",
                    "-v",
                    "--json",
                    "/tmp/x",
                ]
            ),
        ),
        max_size=6,
    )
)
def test_cli_parser_total(argv: list[str]) -> None:
    """Any argv is parsed, or refused by argparse with exit 2 (never another exception)."""
    import contextlib
    import io

    from uploader.cli.main import build_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(argv)
    except SystemExit as exc:
        assert exc.code in (0, 2), err.getvalue()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), _text)
def test_detect_format_total(head: bytes, name: str) -> None:
    from ckpt.codecs import detect_format

    assert detect_format(head, name) in (
        None,
        "zip",
        "pickle",
        "tar",
        "gzip",
        "bzip2",
        "xz",
        "lzma",
        "zstd",
    )


# -- commands ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cmd:
    id: str
    args: tuple[str, ...]
    code: int
    match: str
    env: tuple[tuple[str, str], ...] = ()
    config: str | None = None


BAD_TOML = "[store\nuri = 'x'"
CLI_CASES = [
    Cmd("no-store", ("watch", "{run}"), 2, "--to URI"),
    Cmd(
        "unknown-provider",
        ("push", "{run}", "--provider", "s4", "--container", "b"),
        2,
        "did you mean",
    ),
    Cmd("uri-scheme", ("push", "{run}", "--to", "ftp://b/p"), 2, "use one of"),
    Cmd("uri-credentials", ("ls", "s3://AKIA:secret@b/p"), 2, "key_environ"),
    Cmd("uri-dotdot", ("pull", "file://{bucket}?prefix=x/../y", "{tmp}/out"), 2, "'\\.\\.'"),
    Cmd(
        "pull-files",
        ("pull", "file://{bucket}?prefix=x", "{tmp}/out", "--files", "0"),
        2,
        "at least 1",
    ),
    Cmd(
        "port-range", ("push", "{run}", "--to", "file://{bucket}", "--port", "99999"), 2, "1-65535"
    ),
    Cmd(
        "port-text",
        ("push", "{run}", "--to", "file://{bucket}", "--port", "http"),
        2,
        "invalid int",
    ),
    Cmd(
        "extra-json",
        ("push", "{run}", "--to", "file://{bucket}", "--extra-init-kwargs", "{bad"),
        2,
        "not valid JSON",
    ),
    Cmd(
        "extra-not-object",
        ("push", "{run}", "--to", "file://{bucket}", "--extra-init-kwargs", "[1]"),
        2,
        "JSON object",
    ),
    Cmd("config-missing", ("push", "{run}", "--config", "{tmp}/nope.toml"), 2, "does not exist"),
    Cmd(
        "config-bad-toml",
        ("push", "{run}", "--config", "{cfg}"),
        2,
        "not valid TOML",
        config=BAD_TOML,
    ),
    Cmd(
        "config-secret",
        ("push", "{run}", "--config", "{cfg}"),
        2,
        "environment variables",
        config="[store]\nuri = 'file:///x'\nsecret = 'abc'\n",
    ),
    Cmd(
        "config-section",
        ("push", "{run}", "--config", "{cfg}"),
        2,
        "use \\[store\\] and \\[watch\\]",
        config="[stor]\nuri = 'x'\n",
    ),
    Cmd(
        "config-key",
        ("push", "{run}", "--config", "{cfg}"),
        2,
        "known:",
        config="[store]\nbukket = 'x'\n",
    ),
    Cmd(
        "interval-settle",
        ("push", "{run}", "--to", "file://{bucket}", "--settle", "-1"),
        2,
        "at least 0",
    ),
    Cmd(
        "interval-drain",
        ("watch", "{run}", "--to", "file://{bucket}", "--drain-timeout", "-5"),
        2,
        "at least 0",
    ),
    Cmd(
        "interval-text",
        ("push", "{run}", "--to", "file://{bucket}", "--settle", "soon"),
        2,
        "invalid float",
    ),
    Cmd(
        "bwlimit", ("push", "{run}", "--to", "file://{bucket}", "--bwlimit", "fast"), 2, "e.g. 500K"
    ),
    Cmd(
        "part-size",
        ("push", "{run}", "--to", "file://{bucket}", "--part-size", "1K"),
        2,
        "part size",
    ),
    Cmd(
        "files-zero", ("push", "{run}", "--to", "file://{bucket}", "--files", "0"), 2, "at least 1"
    ),
    Cmd(
        "keep-local-zero",
        ("push", "{run}", "--to", "file://{bucket}", "--keep-local", "0"),
        2,
        "at least 1",
    ),
    Cmd(
        "rank-negative",
        ("push", "{run}", "--to", "file://{bucket}", "--rank", "-1"),
        2,
        "0 or more",
    ),
    Cmd(
        "env-unset",
        (
            "push",
            "{run}",
            "--to",
            "s3://bkt/p?endpoint=http://127.0.0.1:9&key_environ=CKPT_BI_UNSET&secret_environ=CKPT_BI_UNSET",
        ),
        2,
        "export CKPT_BI_UNSET",
    ),
    Cmd(
        "env-empty",
        (
            "push",
            "{run}",
            "--to",
            "s3://bkt/p?endpoint=http://127.0.0.1:9&key_environ=CKPT_BI_EMPTY&secret_environ=CKPT_BI_EMPTY",
        ),
        2,
        "empty",
        env=(("CKPT_BI_EMPTY", ""),),
    ),
    Cmd(
        "container-missing",
        ("push", "{run}", "--to", "file://{tmp}/no-bucket"),
        2,
        "create-container",
    ),
    Cmd(
        "local-relative",
        ("push", "{run}", "--provider", "local", "--container", "rel/dir"),
        2,
        "absolute",
    ),
    Cmd(
        "run-dir-is-file", ("push", "{run}/ep1.pt", "--to", "file://{bucket}"), 2, "not a directory"
    ),
    Cmd(
        "pull-missing",
        ("pull", "file://{bucket}?prefix=p/rank_0/none.pt", "{tmp}/out"),
        1,
        "ckpt-uploader ls",
    ),
    Cmd("status-no-journal", ("status", "{tmp}/elsewhere"), 2, "no journal"),
    Cmd(
        "unknown-flag",
        ("push", "{run}", "--to", "file://{bucket}", "--colour", "red"),
        2,
        "unrecognized",
    ),
    Cmd("unknown-command", ("upload", "{run}"), 2, "invalid choice"),
]


def _fill(text: str, paths: dict[str, str]) -> str:
    for k, v in paths.items():
        text = text.replace("{" + k + "}", v)
    return text


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run every command case (concurrently, each in its own directory) once."""
    from concurrent.futures import ThreadPoolExecutor

    def one(case: Cmd) -> dict[str, Any]:
        tmp = tmp_path_factory.mktemp(case.id)
        run, bucket = tmp / "run", tmp / "bucket"
        (run / "checkpoints").mkdir(parents=True)
        (run / "checkpoints" / "ep1.pt").write_bytes(b"precious local bytes")
        (run / "ep1.pt").write_bytes(b"x")
        obj = bucket / "p" / "rank_0" / "checkpoints" / "ep1.pt"
        obj.parent.mkdir(parents=True)
        obj.write_bytes(b"precious bucket bytes")
        cfg = tmp / "cfg.toml"
        if case.config is not None:
            cfg.write_text(case.config)
        paths = {"tmp": str(tmp), "run": str(run), "bucket": str(bucket), "cfg": str(cfg)}
        before = _snapshot(tmp)
        proc = subprocess.run(
            [sys.executable, "-m", "uploader", *(_fill(a, paths) for a in case.args)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **dict(case.env)},
            stdin=subprocess.DEVNULL,
        )
        after = _snapshot(tmp)
        changed = {k for k in before if before[k] != after.get(k)}
        return {"proc": proc, "changed": changed}

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip([c.id for c in CLI_CASES], pool.map(one, CLI_CASES), strict=True))


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_command_refuses_bad_input(case: Cmd, cli_results: dict[str, Any]) -> None:
    res = cli_results[case.id]
    proc: subprocess.CompletedProcess[str] = res["proc"]
    out = proc.stdout + proc.stderr
    assert proc.returncode == case.code, out
    assert "Traceback" not in out, out
    assert re.search(case.match, out, re.I), out
    assert REMEDY.search(out), f"no remedy in: {out}"
    # Nothing that was there (local checkpoints, bucket objects) was lost or overwritten.
    assert res["changed"] == set(), res["changed"]


def test_push_of_a_missing_run_dir_is_refused(tmp_path: Path) -> None:
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "uploader",
            "push",
            str(tmp_path / "typo"),
            "--to",
            f"file://{bucket}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "does not exist" in proc.stderr and "check the path" in proc.stderr
    assert not (tmp_path / "typo").exists()


# -- checkpoint files ----------------------------------------------------------------------------


def _write(tmp: Path, name: str, codec: str | None = None, obj: Any = None) -> Path:
    import torch

    from ckpt.saver import write_checkpoint

    obj = obj if obj is not None else {"model": torch.nn.Linear(64, 64).state_dict()}
    return write_checkpoint(obj, tmp / name, compression=codec)


def _truncated(name: str, codec: str | None) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        p = _write(tmp, name, codec)
        data = p.read_bytes()
        p.write_bytes(data[: len(data) * 2 // 3])
        return p

    return make


def _flipped(tmp: Path) -> Path:
    p = _write(tmp, "flip.pt")
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    return p


def _wrong_codec(tmp: Path) -> Path:
    """Bytes of a codec the loader does not read (lz4 frame magic), named .pt.zst."""
    p = tmp / "ep1.pt.zst"
    p.write_bytes(b"\x04\x22\x4d\x18" + os.urandom(2000))
    return p


def _not_a_checkpoint(tmp: Path) -> Path:
    p = tmp / "notes.pt"
    p.write_text("these are my notes, not a checkpoint\n" * 50)
    return p


def _empty(tmp: Path) -> Path:
    p = tmp / "empty.pt"
    p.write_bytes(b"")
    return p


def _gzip_of_text(tmp: Path) -> Path:
    import gzip

    p = tmp / "ep1.pt.gz"
    p.write_bytes(gzip.compress(b"not a torch file" * 100))
    return p


def _code_pickle(tmp: Path) -> Path:
    import pickle

    p = tmp / "evil.pt"
    p.write_bytes(pickle.dumps(_Evil(str(tmp / "PWNED")), protocol=2))
    return p


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


FILE_CASES: list[tuple[str, Callable[[Path], Path], str, str]] = [
    (
        "truncated-pt",
        _truncated("t.pt", None),
        "CorruptCheckpointError",
        "truncated|corrupt|damaged",
    ),
    ("truncated-zst", _truncated("t.pt.zst", "zstd"), "CorruptCheckpointError", "truncated"),
    ("truncated-gz", _truncated("t.pt.gz", "gzip"), "CorruptCheckpointError", "truncated"),
    ("flipped-byte", _flipped, "CorruptCheckpointError", "corrupt|damaged|CRC"),
    ("wrong-codec", _wrong_codec, "CorruptCheckpointError", "not a|unrecogni|format"),
    ("not-a-checkpoint", _not_a_checkpoint, "CorruptCheckpointError", "not a"),
    ("empty-file", _empty, "CorruptCheckpointError", "empty|not a"),
    ("gzip-of-text", _gzip_of_text, "CorruptCheckpointError", "not a|unrecogni"),
    ("pickle-runs-code", _code_pickle, "UnsafeCheckpointError", "weights_only"),
]


@pytest.mark.parametrize(
    ("make", "exc_name", "match"),
    [c[1:] for c in FILE_CASES],
    ids=[c[0] for c in FILE_CASES],
)
def test_loader_refuses_bad_checkpoint_files(
    tmp_path: Path, make: Callable[[Path], Path], exc_name: str, match: str
) -> None:
    import ckpt

    path = make(tmp_path)
    before = path.read_bytes()
    with pytest.raises(Exception) as info:
        ckpt.load(str(path))
    assert type(info.value).__name__ == exc_name, repr(info.value)
    msg = str(info.value)
    assert re.search(match, msg, re.I), msg
    assert REMEDY.search(msg), msg
    assert path.read_bytes() == before  # the file is left as it was
    assert not (tmp_path / "PWNED").exists()


def test_checkpoint_incompatible_with_the_model(tmp_path: Path) -> None:
    import torch

    from ckpt import Trainer
    from ckpt.errors import IncompatibleStateError

    def trainer(width: int, **kw: Any) -> Trainer:
        x = torch.randn(8, width)
        data = torch.utils.data.TensorDataset(x, x)
        return Trainer(
            model=torch.nn.Linear(width, width),
            train_dataloader=torch.utils.data.DataLoader(data, batch_size=4),
            max_duration="1ep",
            loss_fn=torch.nn.functional.mse_loss,
            seed=0,
            **kw,
        )

    trainer(8, save_folder=str(tmp_path / "ck"), save_async=False).fit()
    saved = tmp_path / "ck" / "ep1.pt"
    before = saved.read_bytes()
    with pytest.raises(IncompatibleStateError) as info:
        trainer(16, load_path_format=str(saved)).fit()
    assert REMEDY.search(str(info.value)), str(info.value)
    assert saved.read_bytes() == before
