"""The ``ckpt-uploader`` command line (also ``python -m uploader``).

Subcommands: ``watch``, ``push``, ``pull``, ``ls``, ``verify``, ``status``.
Each one that talks to a store takes it as ``--to URI`` (or URI positional for
pull/ls/verify), as hparams flags, or from ``--config FILE``; flags win over the
file. Credentials come only from the environment variables the config names.

Example::

    export AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=...
    ckpt-uploader watch runs/1/rank_0 --to s3://ckpts/exp1 --keep-local 3
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from uploader.config.files import load_config_file, parse_bytes, parse_extra_kwargs, store_location
from uploader.config.hparams import StoreLocation, join_key
from uploader.daemon.layouts import CHECKPOINT_PATTERNS, FileFilter
from uploader.daemon.progress import format_bytes, stderr_is_terminal
from uploader.errors import AuthError, ConfigError, ContainerNotFoundError, ExitCode, UploaderError
from uploader.redact import RedactingFilter, redact
from uploader.transfer.retry import RetryPolicy

__all__ = ["main", "build_parser", "EXIT_CODES"]

log = logging.getLogger("uploader.cli.main")

EXIT_CODES = ExitCode.help_text()

#: Defaults of the watch/push options (also the [watch] keys of a config file).
WATCH_DEFAULTS: dict[str, Any] = {
    "rank": 0,
    "state_dir": None,
    "include": list(CHECKPOINT_PATTERNS),
    "exclude": [],
    "pointer_pattern": list(CHECKPOINT_PATTERNS),
    "settle": 1.0,
    "open_timeout": 30.0,
    "files": 4,
    "concurrency": 4,
    "part_size": "8M",
    "attempts": 5,
    "retry_delay": 1.0,
    "retries": 8,
    "retry_seconds": 300.0,
    "drain_timeout": 600.0,
    "exit_when_idle": False,
    "parent_pid": None,
    "status_file": None,
    "keep_local": None,
    "keep_remote": None,
    "bwlimit": None,
    "nice": None,
    "create_container": False,
}


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34, width=100)


# -- logging -----------------------------------------------------------------------------
class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg (journald/ELK friendly)."""

    def format(self, record: logging.LogRecord) -> str:
        body = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        if record.exc_info:
            body["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(body)


def setup_logging(fmt: str = "text", verbosity: int = 0) -> None:
    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter(
                "%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S"
            )
        )
    handler.addFilter(RedactingFilter())
    handler.set_name("ckpt-uploader")
    root = logging.getLogger()
    for h in list(root.handlers):
        if h.get_name() == "ckpt-uploader":
            root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("uploader").setLevel(level)


# -- option groups -----------------------------------------------------------------------
def _add_store_options(p: argparse.ArgumentParser, to: bool = True) -> None:
    g = p.add_argument_group("store (a URI, hparams flags, or a config file; flags win)")
    if to:
        g.add_argument(
            "--to",
            metavar="URI",
            help="destination, e.g. s3://bucket/prefix?endpoint=http://127.0.0.1:9000, "
            "azure://container/prefix, gs://bucket/prefix, file:///abs/dir?prefix=p "
            "(default: from --config)",
        )
    g.add_argument(
        "--config", metavar="FILE", help="TOML file with [store] and [watch] tables (default: none)"
    )
    g.add_argument(
        "--provider",
        help="libcloud provider: s3, azure_blobs, google_storage, local, minio ... (default: from the URI)",
    )
    g.add_argument(
        "--container",
        help="bucket or container; local: an absolute directory (default: from the URI)",
    )
    g.add_argument(
        "--key-environ",
        metavar="VAR",
        help="name of the environment variable holding the access key "
        "(default: AWS_ACCESS_KEY_ID for s3://, AZURE_STORAGE_ACCOUNT for azure://)",
    )
    g.add_argument(
        "--secret-environ",
        metavar="VAR",
        help="name of the environment variable holding the secret "
        "(default: AWS_SECRET_ACCESS_KEY for s3://, AZURE_STORAGE_KEY for azure://)",
    )
    g.add_argument(
        "--host", help="endpoint host of an S3-compatible server or emulator (default: provider's)"
    )
    g.add_argument("--port", type=int, help="endpoint port (default: provider's)")
    g.add_argument("--region", help="region (default: provider's)")
    g.add_argument(
        "--extra-init-kwargs",
        metavar="JSON",
        help="further driver arguments as a JSON object, e.g. '{\"secure\": false}' (default: none)",
    )
    g.add_argument(
        "--prefix",
        help="object name prefix; overrides the URI's path (default: the URI's path)",
    )


def _add_watch_options(p: argparse.ArgumentParser, push: bool = False) -> None:
    d = WATCH_DEFAULTS
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory to upload from")
    _add_store_options(p)
    g = p.add_argument_group("files")
    g.add_argument(
        "--rank",
        type=int,
        help="rank of files not under a rank_N directory, when RUN_DIR is not itself "
        f"rank_N (default: {d['rank']})",
    )
    g.add_argument(
        "--state-dir",
        metavar="DIR",
        help="where the journal and lock live (default: RUN_DIR)",
    )
    g.add_argument(
        "--include",
        action="append",
        metavar="GLOB",
        help="upload files matching GLOB; repeat for more; replaces the default "
        f"(default: {' '.join(d['include'])})",
    )
    g.add_argument(
        "--exclude",
        action="append",
        metavar="GLOB",
        help="never upload files matching GLOB; repeat for more (default: none)",
    )
    g.add_argument(
        "--pointer-pattern",
        action="append",
        metavar="GLOB",
        help="uploaded files matching GLOB move the commit pointer; repeat for more "
        "(default: the checkpoint patterns above)",
    )
    g.add_argument(
        "--settle",
        type=float,
        metavar="SECONDS",
        help="a file written in place is taken once closed and unchanged this long; "
        f"renamed files are taken at once (default: {d['settle']})",
    )
    g.add_argument(
        "--open-timeout",
        type=float,
        metavar="SECONDS",
        help="a file unchanged this long is taken even without a close event "
        f"(default: {d['open_timeout']})",
    )
    g = p.add_argument_group("transfers")
    g.add_argument("--files", type=int, help=f"files uploaded at once (default: {d['files']})")
    g.add_argument(
        "--concurrency",
        type=int,
        help=f"parts in flight across all files; memory is about this x part size (default: {d['concurrency']})",
    )
    g.add_argument(
        "--part-size", metavar="SIZE", help=f"multipart part size (default: {d['part_size']})"
    )
    g.add_argument(
        "--attempts",
        type=int,
        help=f"upload attempts per file before it is marked failed (default: {d['attempts']})",
    )
    g.add_argument(
        "--retry-delay",
        type=float,
        metavar="SECONDS",
        help="first pause between attempts of a file; doubles each time, at most 60 "
        f"(default: {d['retry_delay']})",
    )
    g.add_argument(
        "--retries",
        type=int,
        help=f"tries per request on transient errors (default: {d['retries']})",
    )
    g.add_argument(
        "--retry-seconds",
        type=float,
        help=f"longest time spent retrying one request (default: {d['retry_seconds']})",
    )
    g.add_argument(
        "--bwlimit",
        metavar="RATE",
        help="upload bandwidth limit in bytes per second, e.g. 50M (default: none)",
    )
    g.add_argument(
        "--nice",
        type=int,
        metavar="N",
        help="raise the process niceness by N so training keeps the CPU (default: unchanged)",
    )
    g.add_argument(
        "--create-container",
        action="store_true",
        default=None,
        help="create the bucket or container when missing (default: off; missing is exit 2)",
    )
    g = p.add_argument_group("lifecycle and reporting")
    g.add_argument(
        "--drain-timeout",
        type=float,
        metavar="SECONDS",
        help="on SIGTERM/SIGINT, finish queued and in-flight work for at most this long "
        f"(default: {d['drain_timeout']})",
    )
    if not push:
        g.add_argument(
            "--exit-when-idle",
            action="store_true",
            default=None,
            help="exit once everything found is verified and nothing is pending (default: off)",
        )
        g.add_argument(
            "--parent-pid",
            type=int,
            metavar="PID",
            help="when PID is gone, finish accepted and complete files, then exit (default: none)",
        )
    g.add_argument(
        "--status-file",
        metavar="PATH",
        help="JSON status rewritten atomically every second and at exit (default: none)",
    )
    g.add_argument(
        "--keep-local",
        type=int,
        metavar="N",
        help="delete local checkpoints beyond the newest N, only once verified (default: keep all)",
    )
    g.add_argument(
        "--keep-remote",
        type=int,
        metavar="N",
        help="delete stored checkpoints beyond the newest N, never the pointer's latest "
        "(default: keep all)",
    )
    _add_output_options(p)


def _add_output_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="log line format on stderr (default: text)",
    )
    g.add_argument(
        "-q", "--quiet", action="store_true", help="warnings and errors only (default: off)"
    )
    g.add_argument("-v", "--verbose", action="store_true", help="debug logging (default: off)")
    g.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars even on a terminal (default: bars on a terminal)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ckpt-uploader",
        description="Upload training checkpoints from a run directory to an object store, "
        "durably and verifiably, and fetch them back.",
        epilog=EXIT_CODES,
        formatter_class=_Formatter,
    )
    from uploader import __version__

    parser.add_argument("--version", action="version", version=f"ckpt-uploader {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser(
        "watch",
        help="watch RUN_DIR and upload every finished checkpoint",
        description="Watch RUN_DIR (recursively) and upload every finished file to the store, "
        "verified, recording each in a journal so a restart resumes. A renamed file is "
        "taken at once; a file written in place once closed and stable. After a "
        "checkpoint is verified, {prefix}/rank_N/latest.json is committed. A changed "
        "file is uploaded again and overwrites its object. SIGTERM/SIGINT drain.",
        epilog=EXIT_CODES,
        formatter_class=_Formatter,
    )
    _add_watch_options(p)
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser(
        "push",
        help="upload what is in RUN_DIR now, wait until verified, exit",
        description="Upload every file now in RUN_DIR (and journal entries not yet "
        "verified), wait until all are verified and pointers committed, then exit.",
        epilog=EXIT_CODES,
        formatter_class=_Formatter,
    )
    _add_watch_options(p, push=True)
    p.set_defaults(func=cmd_push)

    p = sub.add_parser(
        "pull",
        help="download a checkpoint (or 'latest') and verify it",
        description="Download URI to DEST, checking size and digest. URI names an object "
        "(s3://b/run/rank_0/ep3.pt), 'latest' under a prefix (s3://b/run/latest: the "
        "newest checkpoint committed by every rank), or a prefix (everything under it).",
        epilog=EXIT_CODES,
        formatter_class=_Formatter,
    )
    p.add_argument("uri", metavar="URI")
    p.add_argument("dest", metavar="DEST", help="a file path, or a directory")
    p.add_argument(
        "--rank",
        type=int,
        help="with latest: only this rank's file, written to DEST (default: every rank, "
        "to DEST/rank_N/NAME; a single rank goes straight to DEST)",
    )
    p.add_argument(
        "--world-size",
        type=int,
        help="with latest: ranks that must have committed (default: every rank with a pointer)",
    )
    _add_store_options(p, to=False)
    _add_output_options(p)
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser(
        "ls",
        help="list stored objects under a prefix",
        description="List objects under URI's prefix with size and time; pointers show their latest.",
        epilog=EXIT_CODES,
        formatter_class=_Formatter,
    )
    p.add_argument("uri", metavar="URI")
    p.add_argument(
        "--json", action="store_true", help="one JSON object per line (default: a table)"
    )
    _add_store_options(p, to=False)
    _add_output_options(p)
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser(
        "verify",
        help="re-check sizes and digests of stored objects",
        description="Download every object under URI's prefix into a temporary directory, "
        "check its size and recorded sha256 digest, and check that every commit "
        "pointer's entries match the objects they name. Reports each failure.",
        epilog=EXIT_CODES,
        formatter_class=_Formatter,
    )
    p.add_argument("uri", metavar="URI")
    p.add_argument(
        "--strict",
        action="store_true",
        help="count objects with no recorded digest as failures (default: warn only)",
    )
    p.add_argument(
        "--tmp-dir",
        metavar="DIR",
        help="where objects are staged while checked (default: the system temp dir)",
    )
    _add_store_options(p, to=False)
    _add_output_options(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "status",
        help="what the journal of RUN_DIR says",
        description="Counts (pending, uploading, done, failed), bytes, rate and the last "
        "error, from the journal of RUN_DIR (works while the daemon runs).",
        epilog=EXIT_CODES,
        formatter_class=_Formatter,
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--state-dir", metavar="DIR", help="where the journal lives (default: RUN_DIR)")
    p.add_argument("--json", action="store_true", help="print JSON (default: text)")
    p.add_argument(
        "--files", action="store_true", help="also list every file and its state (default: off)"
    )
    p.set_defaults(func=cmd_status)
    return parser


# -- helpers -----------------------------------------------------------------------------
def _store_flags(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "provider": args.provider,
        "container": args.container,
        "key_environ": args.key_environ,
        "secret_environ": args.secret_environ,
        "host": args.host,
        "port": args.port,
        "region": args.region,
        "extra_init_kwargs": parse_extra_kwargs(args.extra_init_kwargs),
    }


def _location(args: argparse.Namespace, uri: str | None, cfg: dict[str, Any]) -> StoreLocation:
    return store_location(uri, _store_flags(args), cfg.get("store"), args.prefix)


def _open_store(loc: StoreLocation, **options: Any) -> Any:
    try:
        return loc.hparams.initialize_object(**options)
    except (ContainerNotFoundError, AuthError) as exc:
        raise ConfigError(str(exc)) from None


def _setting(args: argparse.Namespace, cfg: dict[str, Any], key: str) -> Any:
    value = getattr(args, key, None)
    if value is not None:
        return value
    watch = cfg.get("watch", {})
    if key in watch:
        return watch[key]
    return WATCH_DEFAULTS[key]


def _positive(name: str, value: Any, minimum: float = 1) -> Any:
    if value is None:
        return None
    if not isinstance(value, (int, float)) or value < minimum:
        raise ConfigError(f"--{name.replace('_', '-')} {value!r} must be at least {minimum}")
    return value


# -- watch / push ------------------------------------------------------------------------
def _early_status(args: argparse.Namespace, state: str, error: str | None = None) -> None:
    """Status file before the engine runs (starting) or when it cannot (failed)."""
    from uploader.daemon.status import StatusReport

    if not getattr(args, "status_file", None):
        return
    StatusReport(pid=os.getpid(), state=state, last_error=error).write(Path(args.status_file))


def _run_engine(args: argparse.Namespace, push: bool) -> int:
    from uploader.daemon.signals import capture_early_signals

    capture_early_signals()  # from here on, SIGTERM drains instead of killing
    _early_status(args, "starting")
    try:
        return _run_engine_inner(args, push)
    except UploaderError as exc:
        _early_status(args, "failed", str(exc))
        raise


def _run_engine_inner(args: argparse.Namespace, push: bool) -> int:
    from uploader.daemon.engine import Engine, EngineOptions
    from uploader.daemon.journal import Journal

    cfg = load_config_file(args.config)
    unknown = set(cfg["watch"]) - set(WATCH_DEFAULTS)
    if unknown:
        raise ConfigError(
            f"config file {args.config}: unknown [watch] key(s) {', '.join(sorted(unknown))}; "
            f"known: {', '.join(sorted(WATCH_DEFAULTS))}"
        )
    loc = _location(args, args.to, cfg)

    def s(key: str) -> Any:
        return _setting(args, cfg, key)

    run_dir = Path(args.run_dir).expanduser()
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
    for key in ("files", "concurrency", "attempts", "retries"):
        _positive(key, s(key))
    for key in ("settle", "open_timeout", "drain_timeout", "retry_seconds", "retry_delay"):
        _positive(key, s(key), 0)
    for key in ("keep_local", "keep_remote"):
        _positive(key, s(key), 1)
    if s("rank") < 0:
        raise ConfigError("--rank must be 0 or more")
    part_size = parse_bytes(s("part_size"), "--part-size")
    bwlimit = parse_bytes(s("bwlimit"))
    status_file = s("status_file")
    state_dir = Path(s("state_dir") or run_dir).expanduser()
    parent_pid = None if push else s("parent_pid")
    filt = FileFilter(tuple(s("include")), tuple(s("exclude") or ()), tuple(s("pointer_pattern")))
    if s("nice"):
        try:
            os.nice(int(s("nice")))
        except OSError as exc:
            log.warning("cannot change niceness: %s", exc.strerror)
    store = _open_store(
        loc,
        part_size=part_size,
        concurrency=s("concurrency"),
        retry=RetryPolicy(attempts=s("retries"), total_seconds=s("retry_seconds")),
        create_container=bool(s("create_container")),
    )
    try:
        journal = Journal.open(state_dir)
        try:
            opts = EngineOptions(
                run_dir=run_dir,
                prefix=loc.prefix,
                rank=s("rank"),
                filter=filt,
                watch=not push,
                settle=s("settle"),
                open_timeout=s("open_timeout"),
                files=s("files"),
                attempts=s("attempts"),
                retry_delay=s("retry_delay"),
                drain_timeout=s("drain_timeout"),
                exit_when_idle=bool(push or s("exit_when_idle")),
                parent_pid=parent_pid,
                status_file=Path(status_file) if status_file else None,
                keep_local=s("keep_local"),
                keep_remote=s("keep_remote"),
                bwlimit=bwlimit,
                progress=stderr_is_terminal() and not args.quiet and not args.no_progress,
            )
            log.info(
                "%s %s -> %s (prefix %r), journal in %s",
                "pushing" if push else "watching",
                run_dir,
                loc.hparams.provider + ":" + loc.hparams.container,
                loc.prefix,
                state_dir,
            )
            code = Engine(opts, store, journal).run()
        finally:
            journal.close()
    finally:
        if "code" in locals() and code == ExitCode.TIMEOUT:
            # In-flight transfers may still hold threads: leave without waiting for them.
            logging.shutdown()
            os._exit(ExitCode.TIMEOUT)
        store.close()
    return code


def cmd_watch(args: argparse.Namespace) -> int:
    return _run_engine(args, push=False)


def cmd_push(args: argparse.Namespace) -> int:
    return _run_engine(args, push=True)


# -- pull / ls / verify -----------------------------------------------------------------
def _simple_store(args: argparse.Namespace) -> tuple[Any, StoreLocation]:
    cfg = load_config_file(args.config)
    loc = _location(args, args.uri, cfg)
    return _open_store(loc), loc


def cmd_pull(args: argparse.Namespace) -> int:
    from uploader.bucket.pointer import resolve_latest
    from uploader.transfer.store import check_object_name

    store, loc = _simple_store(args)
    progress = not args.quiet and not args.no_progress and stderr_is_terminal()
    dest = Path(args.dest)
    with store:
        prefix = loc.prefix
        if prefix == "latest" or prefix.endswith("/latest"):
            base = prefix[: -len("latest")].rstrip("/")
            entries = resolve_latest(store, base, args.world_size)
            if args.rank is not None:
                if args.rank not in entries:
                    raise ConfigError(f"rank {args.rank} has no pointer under {base!r}")
                entries = {args.rank: entries[args.rank]}
            for rank, e in sorted(entries.items()):
                target = dest if len(entries) == 1 else dest / f"rank_{rank}" / e.name
                got = store.download_file(
                    e.object,
                    target,
                    progress=progress,
                    expected_digest=e.digest,
                    expected_size=e.size,
                    require_digest=True,
                )
                print(f"{e.object} -> {got} ({format_bytes(e.size)}, {e.digest})")
            return 0
        if prefix and store.exists(prefix):
            got = store.download_file(prefix, dest, progress=progress)
            print(f"{prefix} -> {got}")
            return 0
        base = join_key(prefix, "")
        base = base + "/" if base else ""
        objs = store.list(base)
        if not objs:
            raise UploaderError(
                f"nothing under {prefix or '(root)'!r}; check the URI with 'ckpt-uploader ls'"
            )
        unsafe = []
        for info in objs:
            rel = info.name[len(base) :]
            try:
                check_object_name(rel)
            except ConfigError:
                # Another tool wrote it: it would land outside DEST. Skip it, say so.
                unsafe.append(info.name)
                continue
            target = dest / rel
            store.download_file(info.name, target, progress=progress)
            print(f"{info.name} -> {target}")
        if unsafe:
            log.error(
                "not downloaded: %d object(s) whose names would land outside %s "
                "(absolute, '..', '.' or empty segments): %s; rename them in the store "
                "to fetch them",
                len(unsafe),
                dest,
                ", ".join(repr(n) for n in unsafe[:5]) + (" ..." if len(unsafe) > 5 else ""),
            )
            return 1
        return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from uploader.bucket.pointer import POINTER_FILE, Pointer

    store, loc = _simple_store(args)
    with store:
        base = join_key(loc.prefix, "")
        base = base + "/" if base else ""
        for info in store.list(base):
            latest = None
            if info.name.endswith("/" + POINTER_FILE) or info.name == POINTER_FILE:
                try:
                    latest = Pointer.from_json(store.get_bytes(info.name), info.name).latest.name
                except UploaderError:
                    latest = "(unreadable)"
            when = (
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(info.mtime)) if info.mtime else "-"
            )
            if args.json:
                print(
                    json.dumps(
                        {
                            "name": info.name,
                            "size": info.size,
                            "mtime": info.mtime,
                            "latest": latest,
                        }
                    )
                )
            else:
                extra = f"  -> {latest}" if latest else ""
                print(f"{info.size:>14}  {when}  {info.name}{extra}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from uploader.bucket.pointer import POINTER_FILE, Pointer

    store, loc = _simple_store(args)
    failures: list[str] = []
    checked = 0
    with store, tempfile.TemporaryDirectory(prefix="ckpt-verify-", dir=args.tmp_dir) as tmp:
        base = join_key(loc.prefix, "")
        base = base + "/" if base else ""
        objects = store.list(base)
        sizes = {o.name: o.size for o in objects}
        for info in objects:
            if info.name.endswith("/" + POINTER_FILE) or info.name == POINTER_FILE:
                try:
                    pointer = Pointer.from_json(store.get_bytes(info.name), info.name)
                except UploaderError as exc:
                    failures.append(f"{info.name}: {exc}")
                    continue
                for e in pointer.history:
                    if e.object not in sizes:
                        if e is pointer.latest or e.name == pointer.latest.name:
                            failures.append(
                                f"{info.name}: latest names {e.object}, which is missing"
                            )
                        continue
                    if sizes[e.object] != e.size:
                        failures.append(
                            f"{info.name}: names {e.object} with {e.size} bytes but it holds "
                            f"{sizes[e.object]}"
                        )
                    else:
                        recorded = store.stat(e.object).digest
                        if recorded is not None and str(recorded) != e.digest:
                            failures.append(
                                f"{info.name}: names {e.object} with digest {e.digest} but "
                                f"the object records {recorded}"
                            )
                continue
            stat = store.stat(info.name)
            if stat.digest is None:
                msg = f"{info.name}: no digest recorded; size only ({info.size} bytes)"
                if args.strict:
                    failures.append(msg)
                else:
                    log.warning("%s", msg)
                continue
            target = Path(tmp) / f"obj{checked}"
            try:
                store.download_file(info.name, target, progress=False)
                checked += 1
                print(f"ok      {info.name}  {info.size} bytes  {stat.digest}")
            except UploaderError as exc:
                failures.append(f"{info.name}: {exc}")
            finally:
                target.unlink(missing_ok=True)
    for f in failures:
        print(f"FAILED  {redact(f)}")
    print(f"{checked} object(s) verified, {len(failures)} failure(s)")
    return 1 if failures else 0


# -- status ------------------------------------------------------------------------------
def cmd_status(args: argparse.Namespace) -> int:
    from uploader.daemon.journal import Journal

    state_dir = Path(args.state_dir or args.run_dir)
    journal = Journal.open_readonly(state_dir)
    try:
        totals = journal.totals()
        body = totals.as_dict()
        if args.files or args.json:
            body["files"] = [
                {
                    "path": r.path,
                    "state": r.state,
                    "size": r.size,
                    "object": r.object,
                    "attempts": r.attempts,
                    "digest": r.digest,
                    "last_error": r.last_error,
                }
                for r in journal.records()
            ]
    finally:
        journal.close()
    if args.json:
        print(json.dumps(body, indent=1, sort_keys=True))
    else:
        print(
            f"pending {totals.pending}  uploading {totals.uploading}  done {totals.done}  "
            f"failed {totals.failed}"
        )
        print(
            f"bytes {format_bytes(totals.bytes_done)} of {format_bytes(totals.bytes_total)} "
            f"verified, rate {format_bytes(totals.rate_bytes_per_s)}/s"
        )
        if totals.last_error:
            print(f"last error: {redact(totals.last_error)}")
        for f in body.get("files", []):
            print(f"{f['state']:<10} {f['size']:>14}  {f['path']}")
    return 0 if totals.failed == 0 else 1


# -- entry point -------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: 2 on bad flags, 0 for --help
        return int(exc.code or 0)
    verbosity = -1 if getattr(args, "quiet", False) else 1 if getattr(args, "verbose", False) else 0
    setup_logging(getattr(args, "log_format", "text"), verbosity)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ConfigError as exc:
        log.error("configuration error: %s", redact(str(exc)))
        return ExitCode.CONFIG
    except UploaderError as exc:
        log.error("%s", redact(str(exc)))
        return exc.exit_code
    except KeyboardInterrupt:
        return ExitCode.SIGINT
    except BrokenPipeError:
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
