"""The worker process's command line is what the CLI reads back as the worker's settings,
and the status file is the only thing the training side reads."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from uploader.cli.main import build_parser
from uploader.config.hparams import ObjectStoreHparams, StoreLocation
from uploader.config.options import WatchOptions
from uploader.config.resolve import resolve
from uploader.daemon.status import StatusReport
from uploader.launch.options import NO_LIMIT
from uploader.launch.progress import StatusReader
from uploader.launch.worker import UploadWorker


def read_back(cmd: list[str]) -> tuple[WatchOptions, StoreLocation]:
    argv = cmd[cmd.index("watch") :]
    args = build_parser().parse_args(argv)
    assert args.command == "watch"
    options = resolve(vars(args))
    return options.watch, options.location


def test_the_cli_reads_the_worker_command_back_as_its_settings(tmp_path: Path) -> None:
    hp = ObjectStoreHparams(
        provider="s3",
        container="ckpts",
        key_environ="CKPT_W_KEY",
        secret_environ="CKPT_W_SECRET",
        host="127.0.0.1",
        port=9000,
        extra_init_kwargs={"secure": False},
    )
    worker = UploadWorker(
        tmp_path / "run",
        hparams=hp,
        prefix="/exp1/",
        rank=3,
        keep_local=2,
        drain_timeout=None,
        create_container=True,
        dedup=True,
        dedup_scope="team",
        parent_pid=4242,
    )
    options, loc = read_back(worker.command())
    assert options.dedup and options.dedup_scope == "team"
    assert options == worker.options()
    assert loc == StoreLocation(hp, "exp1")
    assert options.rank == 3 and options.keep_local == 2 and options.create_container
    assert options.drain_timeout == NO_LIMIT and options.parent_pid == 4242
    assert options.status_file == worker.status_path and options.state_dir == worker.state_dir
    assert "CKPT_W_SECRET" in " ".join(worker.command())


def test_a_uri_store_keeps_its_prefix_unless_one_is_given(tmp_path: Path) -> None:
    uri = "s3://bkt/from-uri?endpoint=http://127.0.0.1:9000"
    _, loc = read_back(UploadWorker(tmp_path, to=uri, parent_pid=None).command())
    assert loc.prefix == "from-uri" and loc.hparams.container == "bkt"
    assert loc.hparams.host == "127.0.0.1" and loc.hparams.port == 9000
    assert loc.hparams.extra_init_kwargs == {"secure": False}
    assert loc.hparams.key_environ is None  # the AWS credential chain
    options, loc = read_back(UploadWorker(tmp_path, to=uri, prefix="mine").command())
    assert loc.prefix == "mine" and options.parent_pid == os.getpid()


def test_extra_args_come_last_and_win(tmp_path: Path) -> None:
    worker = UploadWorker(
        tmp_path,
        to=f"file://{tmp_path}/bucket",
        keep_local=2,
        verbosity=-1,
        log_format="json",
        extra_args=["--keep-local", "5", "--include", "*.ckpt"],
    )
    cmd = worker.command()
    assert cmd[-4:] == ["--keep-local", "5", "--include", "*.ckpt"]
    args = build_parser().parse_args(cmd[cmd.index("watch") :])
    assert args.quiet and args.log_format == "json"
    options = resolve(vars(args)).watch
    assert options.keep_local == 5 and options.include == ("*.ckpt",)


def test_status_reader_replaces_an_old_report_and_reads_changes(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    StatusReport(pid=1, state="done", done=9).write(path)
    reader = StatusReader(path, interval=3600.0)
    reader.reset()
    first = reader.read(fresh=True)
    assert first is not None and first.state == "starting" and first.done == 0
    time.sleep(0.01)
    StatusReport(pid=2, state="running", done=1, intake_finished=True).write(path)
    assert reader.read() is first  # within the interval: no read at all
    now = reader.read(fresh=True)
    assert now is not None and now.done == 1 and now.intake_finished


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"drain_timeout": 0}, "drain_timeout 0 must be positive"),
        ({"keep_local": 0}, "keep_local 0 must be at least 1"),
        ({"rank": -1}, "rank -1 must not be negative"),
        ({"to": "nope"}, "malformed store URI"),
    ],
)
def test_bad_worker_settings_fail_before_anything_starts(
    tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    from uploader.errors import ConfigError

    kwargs.setdefault("to", f"file://{tmp_path}")
    with pytest.raises(ConfigError, match=message):
        UploadWorker(tmp_path / "run", **kwargs)  # type: ignore[arg-type]
