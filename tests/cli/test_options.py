"""The watch/push option groups: help shows WatchOptions' defaults, and the engine is
told exactly what the options say."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import pytest

from uploader.cli.main import build_parser
from uploader.cli.watch import engine_options
from uploader.config.options import WATCH_KEYS, WatchOptions, flag_name
from uploader.daemon.layouts import (
    CHECKPOINT_PATTERNS,
    DEFAULT_DIR_RULES,
    TEMPORARY_PATTERNS,
    DirRule,
)
from uploader.errors import ConfigError


def _sub(command: str) -> argparse.ArgumentParser:
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    raise AssertionError("no subcommands")


@pytest.mark.parametrize("command", ["watch", "push"])
def test_every_watch_option_is_a_flag_whose_help_shows_its_default(command: str) -> None:
    helps = {
        opt: action.help or "" for action in _sub(command)._actions for opt in action.option_strings
    }
    implied = {"exit_when_idle", "parent_pid"} if command == "push" else set()
    for key in WATCH_KEYS:
        if key in implied:
            assert flag_name(key) not in helps
            continue
        assert "(default: " in helps[flag_name(key)], key
    d = WatchOptions()
    assert f"(default: {d.files})" in helps["--files"]
    assert f"(default: {d.retries})" in helps["--retries"]
    assert f"(default: {d.drain_timeout:g})" in helps["--drain-timeout"]
    assert "(default: 8M)" in helps["--part-size"]
    assert " ".join(CHECKPOINT_PATTERNS) in helps["--pointer-pattern"].replace("\n", " ")
    assert " ".join(TEMPORARY_PATTERNS) in helps["--include"].replace("\n", " ")
    assert f"(default: {d.artifact_interval:g})" in helps["--artifact-interval"]


def test_engine_options_carry_every_setting(tmp_path: Path) -> None:
    o = replace(
        WatchOptions(),
        rank=3,
        settle=0.25,
        files=7,
        attempts=2,
        keep_local=4,
        bwlimit=1024,
        parent_pid=99,
        exit_when_idle=False,
        exclude=("*.tmp.pt",),
    )
    e = engine_options(o, tmp_path, "exp", push=False, progress=False)
    assert (e.rank, e.settle, e.files, e.attempts, e.keep_local) == (3, 0.25, 7, 2, 4)
    assert (e.bwlimit, e.parent_pid, e.exit_when_idle, e.watch) == (1024, 99, False, True)
    # None: every file is uploaded; the daemon's own single-file checkpoint names.
    assert e.filter.include == ("*",) and e.checkpoints.single == CHECKPOINT_PATTERNS
    assert e.checkpoints.rules == DEFAULT_DIR_RULES and e.artifact_interval == 300.0
    assert e.filter.exclude == ("*.tmp.pt",)
    assert e.filter.accepts("ep1.pt") and not e.filter.accepts("x.tmp.pt")
    assert e.filter.accepts("notes.txt")
    # --checkpoint-dir rules come first; a status file inside RUN_DIR is never uploaded.
    r = engine_options(
        replace(o, checkpoint_dir=("step_*=DONE",), status_file=tmp_path / "st.json"),
        tmp_path,
        "exp",
        push=False,
        progress=False,
    )
    assert r.checkpoints.rules[0] == DirRule("dir:step_*", "step_*", "DONE")
    assert not r.filter.accepts("st.json")
    with pytest.raises(ConfigError, match="GLOB=MARKER"):
        engine_options(
            replace(o, checkpoint_dir=("step_*",)), tmp_path, "", push=False, progress=False
        )
    # push: once, then exit; no parent to follow; no limit is 0 for the engine.
    p = engine_options(
        replace(o, include=("*.ckpt",), bwlimit=None), tmp_path, "", push=True, progress=True
    )
    assert (p.watch, p.exit_when_idle, p.parent_pid, p.bwlimit) == (False, True, None, 0)
    assert p.filter.include == ("*.ckpt",) and not p.filter.accepts("ep1.pt")
