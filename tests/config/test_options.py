"""WatchOptions: every watch/push default once, and the one options <-> argv pair.

``to_argv`` (what the training side's worker process is started with) and the
command line's own parser must agree exactly: parse(to_argv(x)) == x.
"""

from __future__ import annotations

import string
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uploader.cli.main import build_parser
from uploader.config.hparams import KNOWN_PROVIDERS, ObjectStoreHparams, StoreLocation
from uploader.config.options import WatchOptions, to_argv
from uploader.config.resolve import resolve
from uploader.errors import ConfigError
from uploader.transfer.retry import RetryPolicy
from uploader.transfer.store import DEFAULT_CONCURRENCY, DEFAULT_PART_SIZE


def parse(argv: list[str]) -> tuple[WatchOptions, StoreLocation]:
    """What ``ckpt-uploader watch RUN ...argv`` reads: the inverse of to_argv."""
    options = resolve(vars(build_parser().parse_args(["watch", "/run", *argv])))
    return options.watch, options.location


# -- strategies -------------------------------------------------------------------------------
# "--" alone is refused by to_argv (argparse reads it as the end of the options).
_word = st.text(string.ascii_letters + string.digits + "-_.", min_size=1, max_size=8).filter(
    lambda w: w not in (".", "..", "--")
)
_glob = st.text(string.ascii_letters + string.digits + "*?.-_/[]", min_size=1, max_size=12).filter(
    lambda g: g != "--"
)
_patterns = st.lists(_glob, min_size=1, max_size=3).map(tuple)
_path = st.lists(_word, min_size=1, max_size=3).map(lambda p: Path("/" + "/".join(p)))
_seconds = st.floats(min_value=0, max_value=1e9, allow_nan=False, allow_infinity=False)
_count = st.integers(min_value=1, max_value=10_000)
_env = st.from_regex(r"[A-Z_][A-Z0-9_]{0,12}", fullmatch=True)

watch_options_strategy = st.builds(
    WatchOptions,
    rank=st.integers(min_value=0, max_value=4096),
    state_dir=st.none() | _path,
    include=st.none() | _patterns,
    exclude=st.just(()) | _patterns,
    pointer_pattern=st.none() | _patterns,
    settle=_seconds,
    open_timeout=_seconds,
    files=_count,
    concurrency=_count,
    part_size=st.integers(min_value=1, max_value=1 << 40),
    attempts=_count,
    retry_delay=_seconds,
    retries=_count,
    retry_seconds=_seconds,
    drain_timeout=_seconds,
    exit_when_idle=st.booleans(),
    parent_pid=st.none() | st.integers(min_value=1, max_value=1 << 22),
    status_file=st.none() | _path,
    keep_local=st.none() | _count,
    keep_remote=st.none() | _count,
    bwlimit=st.none() | st.integers(min_value=1, max_value=1 << 40),
    nice=st.none() | st.integers(min_value=-20, max_value=19),
    create_container=st.booleans(),
    verify_resumed=st.booleans(),
    metrics_port=st.none() | st.integers(min_value=0, max_value=65535),
    metrics_addr=st.sampled_from(["127.0.0.1", "0.0.0.0", "::1", "$(POD_IP)", "node-3.local"]),
    metrics_file=st.none() | _path,
    ready_max_lag=_seconds,
)

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_word, inner, max_size=3),
    max_leaves=6,
)


@st.composite
def locations(draw: st.DrawFn) -> StoreLocation:
    provider = draw(st.sampled_from(sorted(KNOWN_PROVIDERS)))
    key_environ = draw(st.none() | _env)
    extra_key: dict[str, object] = {}
    if provider == "local":
        # An absolute directory, or (libcloud's LOCAL) a folder of the key's directory.
        container = draw(st.just(".") | _word | st.builds(str, _path))
        if not container.startswith("/") and key_environ is None:
            extra_key = {"key": str(draw(_path))}
    else:
        container = draw(_word)
    hp = ObjectStoreHparams(
        provider=provider,
        container=container,
        key_environ=key_environ,
        secret_environ=draw(st.none() | _env),
        host=draw(st.none() | st.from_regex(r"[a-z0-9][a-z0-9.-]{0,20}", fullmatch=True)),
        port=draw(st.none() | st.integers(min_value=1, max_value=65535)),
        region=draw(st.none() | _word),
        extra_init_kwargs=draw(
            st.dictionaries(_word.filter(lambda k: k not in ("key", "secret")), _json, max_size=3)
        )
        | extra_key,
    )
    prefix = "/".join(draw(st.lists(_word, max_size=3)))
    return StoreLocation(hp, prefix)


# -- the pair -----------------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(watch_options_strategy, locations())
def test_the_command_line_reads_to_argv_back_exactly(
    options: WatchOptions, loc: StoreLocation
) -> None:
    argv = to_argv(options, loc)
    assert parse(argv) == (options, loc)


def test_to_argv_writes_only_what_differs_from_the_defaults() -> None:
    hp = ObjectStoreHparams(provider="local", container="/data/bucket")
    assert to_argv(WatchOptions(), StoreLocation(hp, "")) == [
        "--provider=local",
        "--container=/data/bucket",
    ]
    argv = to_argv(WatchOptions(keep_local=2, exclude=("-x*",)), StoreLocation(hp, "exp"))
    assert argv[2:] == ["--prefix=exp", "--exclude=-x*", "--keep-local=2"]
    # A value starting with '-' stays joined to its flag, so it is read as a value.
    assert parse(argv)[0].exclude == ("-x*",)


def test_credentials_are_variable_names_in_argv_never_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CKPT_OPT_KEY", "AKIA-VALUE-NEVER-SHOWN")
    monkeypatch.setenv("CKPT_OPT_SECRET", "secret-value-never-shown")
    hp = ObjectStoreHparams(
        provider="s3",
        container="b",
        key_environ="CKPT_OPT_KEY",
        secret_environ="CKPT_OPT_SECRET",
    )
    text = " ".join(to_argv(WatchOptions(), StoreLocation(hp, "p")))
    assert "--key-environ=CKPT_OPT_KEY" in text and "--secret-environ=CKPT_OPT_SECRET" in text
    assert "VALUE-NEVER-SHOWN" not in text and "never-shown" not in text


def test_what_argparse_cannot_carry_is_refused_not_changed() -> None:
    hp = ObjectStoreHparams(provider="local", container="/b")
    with pytest.raises(ConfigError, match="config file"):
        to_argv(WatchOptions(include=()), StoreLocation(hp, ""))
    with pytest.raises(ConfigError, match="--pointer-pattern '--' cannot be passed"):
        to_argv(WatchOptions(pointer_pattern=("--",)), StoreLocation(hp, ""))
    with pytest.raises(ConfigError, match="--region '--'"):
        to_argv(WatchOptions(), StoreLocation(replace(hp, region="--"), ""))


# -- defaults and resolution ----------------------------------------------------------------------
def test_defaults_owned_elsewhere_are_referred_to() -> None:
    d = WatchOptions()
    assert d.part_size == DEFAULT_PART_SIZE and d.concurrency == DEFAULT_CONCURRENCY
    assert d.retries == RetryPolicy().attempts
    assert d.retry_seconds == RetryPolicy().total_seconds
    assert d.include is None and d.pointer_pattern is None  # the daemon's checkpoint names


def test_flags_win_over_the_file_which_wins_over_the_defaults() -> None:
    o = WatchOptions.resolve(
        {"files": 8, "settle": None, "part_size": "16M"},
        {"files": 2, "settle": 0.5, "bwlimit": "1M", "include": ["*.ckpt"]},
    )
    assert o.files == 8 and o.settle == 0.5
    assert o.part_size == 16 << 20 and o.bwlimit == 1 << 20
    assert o.include == ("*.ckpt",)
    assert o.open_timeout == WatchOptions().open_timeout
    assert WatchOptions.resolve({}, {"bwlimit": 0}).bwlimit is None  # 0: no limit


def test_metrics_settings_come_from_the_config_file_too() -> None:
    o = WatchOptions.resolve(
        {"metrics_port": 9200},
        {"metrics_port": 9108, "metrics_addr": "0.0.0.0", "metrics_file": "/var/m.prom"},
    )
    assert o.metrics_port == 9200 and o.metrics_addr == "0.0.0.0"
    assert o.metrics_file == Path("/var/m.prom")
    d = WatchOptions()
    assert d.metrics_port is None and d.metrics_addr == "127.0.0.1" and d.metrics_file is None


@pytest.mark.parametrize(
    ("flags", "file", "message"),
    [
        ({}, {"fils": 3}, "unknown \\[watch\\] key.*fils.*known:"),
        ({"files": 0}, {}, "--files 0 must be at least 1"),
        ({}, {"settle": -1}, "--settle -1 must be at least 0"),
        ({}, {"keep_local": 0}, "--keep-local 0 must be at least 1"),
        ({"rank": -1}, {}, "--rank must be 0 or more"),
        ({}, {"files": "four"}, "--files 'four' is not a number"),
        ({}, {"attempts": 2.5}, "whole number"),
        ({}, {"include": "*.pt"}, "list of glob patterns"),
        ({}, {"part_size": "big"}, "--part-size 'big' is not a size"),
        ({}, {"metrics_port": 70000}, "--metrics-port 70000 is not a TCP port"),
        ({"metrics_port": -1}, {}, "--metrics-port -1 must be at least 0"),
        ({}, {"metrics_addr": "http://x"}, "--metrics-addr .* is not an address"),
        ({}, {"ready_max_lag": -5}, "--ready-max-lag -5 must be at least 0"),
    ],
)
def test_bad_settings_are_configuration_errors(
    flags: dict[str, object], file: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        WatchOptions.resolve(flags, file, where="config file up.toml")
