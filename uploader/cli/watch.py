"""``ckpt-uploader watch`` and ``push``: run the uploader daemon on a run directory.

``watch`` keeps watching RUN_DIR and uploads every finished file; ``push`` uploads
what is there now and exits once all of it is verified. Both read their settings
into one :class:`uploader.config.options.WatchOptions` (flags over the config
file's ``[watch]`` table over the defaults), with the store, in one call to
:func:`uploader.config.resolve.resolve`, and hand the daemon an
:class:`uploader.daemon.engine.EngineOptions` built from it by :func:`engine_options`.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from uploader.cli.options import EXIT_CODES, Formatter, add_watch_options, open_store
from uploader.config.options import WatchOptions
from uploader.config.resolve import resolve
from uploader.daemon.journal import Journal
from uploader.daemon.layouts import (
    CHECKPOINT_PATTERNS,
    DEFAULT_DIR_RULES,
    Checkpoints,
    FileFilter,
    parse_dir_rule,
)
from uploader.daemon.privacy import make_private
from uploader.daemon.progress import stderr_is_terminal
from uploader.daemon.signals import capture_early_signals
from uploader.daemon.status import STATUS_FILE, StatusReport
from uploader.errors import ConfigError, ExitCode, UploaderError

if TYPE_CHECKING:  # pragma: no cover - imported when a daemon runs, not for other commands
    from uploader.daemon.engine import EngineOptions

__all__ = ["register", "engine_options", "cmd_watch", "cmd_push"]

log = logging.getLogger("uploader.cli.watch")


def register(sub: Any) -> None:
    """Add the ``watch`` and ``push`` subcommands to ``sub`` (argparse subparsers)."""
    p = sub.add_parser(
        "watch",
        help="watch RUN_DIR and upload every finished checkpoint",
        description="Watch RUN_DIR (recursively) and upload every finished file to the store, "
        "verified, recording each in a journal so a restart resumes. A renamed file is "
        "taken at once; a file written in place once closed and stable. After a "
        "checkpoint is verified, {prefix}/rank_N/latest.json is committed. A changed "
        "file is uploaded again and overwrites its object. SIGTERM/SIGINT drain.",
        epilog=EXIT_CODES,
        formatter_class=Formatter,
    )
    add_watch_options(p)
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser(
        "push",
        help="upload what is in RUN_DIR now, wait until verified, exit",
        description="Upload every file now in RUN_DIR (and journal entries not yet "
        "verified), wait until all are verified and pointers committed, then exit.",
        epilog=EXIT_CODES,
        formatter_class=Formatter,
    )
    add_watch_options(p, push=True)
    p.set_defaults(func=cmd_push)


def cmd_watch(args: argparse.Namespace) -> int:
    return _run(args, push=False)


def cmd_push(args: argparse.Namespace) -> int:
    return _run(args, push=True)


def _dedup_scope(options: WatchOptions, prefix: str) -> str | None:
    """The scope chunks are shared in (None: no --dedup); ConfigError unless it is the
    run's prefix or a parent of it."""
    if not options.dedup:
        if options.dedup_scope is not None:
            raise ConfigError("--dedup-scope is given without --dedup; add --dedup")
        return None
    if options.dedup_scope is None:
        return prefix.strip("/")
    scope = [p for p in options.dedup_scope.split("/") if p]
    run = [p for p in prefix.split("/") if p]
    if run[: len(scope)] != scope:
        raise ConfigError(
            f"--dedup-scope {options.dedup_scope!r} is not the run's prefix {prefix!r} or a "
            "parent of it; chunks are shared under a prefix that holds the runs"
        )
    return "/".join(scope)


def engine_options(
    options: WatchOptions, run_dir: Path, prefix: str, *, push: bool, progress: bool
) -> EngineOptions:
    """What the daemon's engine is told, from the watch/push options.

    ``include`` left as None uploads every file; ``pointer_pattern`` left as None takes
    the daemon's single-file checkpoint names; ``checkpoint_dir`` rules come before the
    built-in directory rules. ``push`` uploads once and exits when idle, and does not
    follow a parent process. A status file inside RUN_DIR is never uploaded.
    """
    from uploader.daemon.engine import EngineOptions

    root = Path(os.path.realpath(run_dir))
    own = set()
    if options.status_file is not None:
        status = os.path.realpath(options.status_file)
        if status.startswith(str(root) + os.sep):
            own.add(status[len(str(root)) + 1 :].replace(os.sep, "/"))
    rules = tuple(parse_dir_rule(r) for r in options.checkpoint_dir)
    return EngineOptions(
        run_dir=run_dir,
        prefix=prefix,
        rank=options.rank,
        filter=FileFilter(
            include=options.include or ("*",), exclude=options.exclude, own=frozenset(own)
        ),
        checkpoints=Checkpoints(
            single=options.pointer_pattern or CHECKPOINT_PATTERNS,
            rules=rules + DEFAULT_DIR_RULES,
        ),
        artifact_interval=options.artifact_interval,
        watch=not push,
        settle=options.settle,
        open_timeout=options.open_timeout,
        files=options.files,
        attempts=options.attempts,
        retry_delay=options.retry_delay,
        drain_timeout=options.drain_timeout,
        exit_when_idle=push or options.exit_when_idle,
        parent_pid=None if push else options.parent_pid,
        status_file=options.status_file,
        keep_local=options.keep_local,
        keep_remote=options.keep_remote,
        bwlimit=options.bwlimit or 0,
        verify_resumed=options.verify_resumed,
        progress=progress,
        metrics_port=options.metrics_port,
        metrics_addr=options.metrics_addr,
        metrics_file=options.metrics_file,
        ready_max_lag=options.ready_max_lag,
        dedup_scope=_dedup_scope(options, prefix),
    )


def _early_status(path: str | None, state: str, error: str | None = None) -> None:
    """Status file before the engine runs (starting) or when it cannot (failed)."""
    if path:
        StatusReport(pid=os.getpid(), state=state, last_error=error).write(Path(path))


def _run(args: argparse.Namespace, push: bool) -> int:
    capture_early_signals()  # from here on, SIGTERM drains instead of killing
    make_private()  # before any credential is read: no core dumps, /proc/<pid> private
    _early_status(args.status_file, "starting")
    try:
        return _run_engine(args, push)
    except UploaderError as exc:
        _early_status(args.status_file, "failed", str(exc))
        raise


def _prepare_run_dir(run_dir: Path, push: bool) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"RUN_DIR {run_dir} is not a directory")
    if push and not run_dir.exists():
        raise ConfigError(
            f"RUN_DIR {run_dir} does not exist, so there is nothing to push; check the path "
            "(watch creates a missing RUN_DIR and waits for files, push does not)"
        )
    if not run_dir.exists():
        try:
            run_dir.mkdir(parents=True)
        except OSError as exc:
            raise ConfigError(f"RUN_DIR {run_dir} cannot be created: {exc.strerror}") from None
        log.info("created run directory %s", run_dir)


def _run_engine(args: argparse.Namespace, push: bool) -> int:
    resolved = resolve(vars(args))
    options, loc = resolved.watch, resolved.location
    run_dir = Path(args.run_dir).expanduser()
    _prepare_run_dir(run_dir, push)
    state_dir = Path(options.state_dir or run_dir).expanduser()
    if options.status_file is None:  # `ckpt-uploader status` reads it there
        options = replace(options, status_file=state_dir / STATUS_FILE)
    if options.nice:
        try:
            os.nice(options.nice)
        except OSError as exc:
            log.warning("cannot change niceness: %s", exc.strerror)
    store = open_store(loc, **resolved.store_options())
    code: int | None = None
    try:
        journal = Journal.open(state_dir)
        try:
            progress = stderr_is_terminal() and not args.quiet and not args.no_progress
            from uploader.daemon.engine import Engine

            engine = Engine(
                engine_options(options, run_dir, loc.prefix, push=push, progress=progress),
                store,
                journal,
            )
            log.info(
                "%s %s -> %s (prefix %r), journal in %s, identity: %s",
                "pushing" if push else "watching",
                run_dir,
                loc.hparams.provider + ":" + store.settings.container,
                loc.prefix,
                state_dir,
                store.identity,
            )
            code = engine.run()
        finally:
            journal.close()
    finally:
        if code == ExitCode.TIMEOUT:
            # In-flight transfers may still hold threads: leave without waiting for them.
            logging.shutdown()
            os._exit(ExitCode.TIMEOUT)
        store.close()
    assert code is not None
    return code
