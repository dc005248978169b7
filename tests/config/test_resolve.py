"""resolve(): the parsed flags (a plain mapping), the config file and the URI, in one call.

Flags win over the config file, the file over the defaults; a reading command (pull, ls,
verify) is not held to the daemon's settings; every WatchOptions field is an option of
its own (flag, [watch] key, argv) from its one declaration.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from uploader.cli.main import build_parser
from uploader.config.options import WATCH_KEYS, WatchOptions, flag_name, option_of, to_argv
from uploader.config.resolve import Options, resolve
from uploader.errors import ConfigError
from uploader.transfer.retry import RetryPolicy


def _config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "up.toml"
    path.write_text(text)
    return str(path)


def test_flags_win_over_the_config_file_for_the_store_and_the_daemon(tmp_path: Path) -> None:
    cfg = _config(
        tmp_path,
        '[store]\nuri = "s3://from-file/p1?endpoint=http://127.0.0.1:9000"\nregion = "eu"\n'
        "[watch]\nkeep_local = 2\nfiles = 3\nretries = 4\n",
    )
    argv = ["push", "/run", "--config", cfg, "--files", "9", "--region", "us", "--prefix", "p2"]
    options = resolve(vars(build_parser().parse_args(argv)))
    assert options.watch.files == 9 and options.watch.keep_local == 2
    assert options.watch.retry == RetryPolicy(attempts=4, total_seconds=RetryPolicy.total_seconds)
    hp = options.location.hparams
    assert (hp.container, hp.region, hp.host, options.location.prefix) == (
        "from-file",
        "us",
        "127.0.0.1",
        "p2",
    )
    assert options.store_options() == {
        "part_size": WatchOptions().part_size,
        "concurrency": WatchOptions().concurrency,
        "retry": options.watch.retry,
        "create_container": False,
        "digest": "crc64nvme",
    }


def test_a_plain_mapping_is_enough() -> None:
    options = resolve({"to": "file:///data/bucket?prefix=exp", "keep_remote": 3, "bwlimit": "1M"})
    assert options.location.hparams.container == "/data/bucket"
    assert options.location.prefix == "exp"
    assert options.watch == WatchOptions(keep_remote=3, bwlimit=1 << 20)


def test_a_reading_command_ignores_the_daemon_settings(tmp_path: Path) -> None:
    # pull's own --files and --rank are not the daemon's; [watch] is not read at all.
    cfg = _config(tmp_path, '[store]\nuri = "file:///data/b"\n[watch]\nnot_a_key = 1\n')
    flags = {"config": cfg, "files": 0, "rank": -1}
    assert resolve(flags, reading=True) == Options(resolve({"uri": "file:///data/b"}).location)
    with pytest.raises(ConfigError, match="unknown \\[watch\\] key"):
        resolve(flags)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({}, "no store given: pass --to URI"),
        ({"to": "file:///b", "extra_init_kwargs": "[1]"}, "must be a JSON object"),
        ({"to": "file:///b", "files": 0}, "--files 0 must be at least 1"),
        ({"to": "nope"}, "malformed store URI"),
    ],
)
def test_bad_settings_are_configuration_errors(flags: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve(flags)


def test_every_field_is_declared_once_as_an_option() -> None:
    parser_help = build_parser().parse_args(["watch", "/run", "--to", "file:///b"])
    for f in fields(WatchOptions):
        opt = option_of(f.name)
        assert "(default: " in opt.help, f.name
        assert hasattr(parser_help, f.name)  # a flag
        assert f.name in WATCH_KEYS  # a [watch] key
    # A setting that differs from its default goes through argv and back.
    for key in ("keep_local", "files", "nice"):
        options = WatchOptions(**{key: 7})
        argv = to_argv(options, resolve({"to": "file:///b"}).location)
        assert f"{flag_name(key)}=7" in argv
        assert resolve(vars(build_parser().parse_args(["watch", "/r", *argv]))).watch == options


def test_the_uri_is_given_once_positionally_or_as_to() -> None:
    uri = "file:///data/b"
    assert resolve({"uri": uri}) == resolve({"to": uri}) == resolve({"uri": uri, "to": uri})
    with pytest.raises(ConfigError, match="the destination is given twice.*give it once"):
        resolve({"uri": uri, "to": "file:///data/c"})


def test_prefix_replaces_the_store_prefix_not_what_a_reading_command_names() -> None:
    loc = resolve({"uri": "s3://b/exp/rank_0/ep1.pt", "prefix": "other"}, reading=True).location
    assert (loc.prefix, loc.target, loc.name) == ("other", "rank_0/ep1.pt", "other/rank_0/ep1.pt")
    # push and watch write where the URI says, latest or not.
    assert resolve({"uri": "s3://b/exp/latest"}).location.prefix == "exp/latest"
