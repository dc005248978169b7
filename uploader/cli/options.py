"""The argparse option groups the commands share, and reading them back.

Every ``watch``/``push`` flag is a field of :class:`uploader.config.options.WatchOptions`
and its help shows that field's default; :func:`watch_options` reads the parsed flags
(over a config file's ``[watch]`` table) back into one. With
:func:`uploader.config.options.to_argv` it is the one pair that turns options into a
command line and back (the worker process the training side starts goes through it).
"""

from __future__ import annotations

import argparse
from typing import Any

from uploader.config.files import STORE_FIELDS, TLS_KEYS, parse_extra_kwargs, store_location
from uploader.config.hparams import StoreLocation
from uploader.config.options import WATCH_KEYS, WatchOptions
from uploader.daemon.layouts import CHECKPOINT_PATTERNS, TEMPORARY_PATTERNS
from uploader.daemon.status import STATUS_FILE
from uploader.errors import AuthError, ConfigError, ContainerNotFoundError, ExitCode
from uploader.transfer.retry import RetryPolicy
from uploader.transfer.store import ObjectStore

__all__ = [
    "Formatter",
    "EXIT_CODES",
    "add_store_options",
    "add_watch_options",
    "add_output_options",
    "store_flags",
    "location",
    "watch_options",
    "open_store",
    "retry_policy",
]

#: The "exit codes:" block at the end of every command's --help.
EXIT_CODES = ExitCode.help_text()


class Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34, width=100)


def _size(n: int | None) -> str:
    """``8388608`` -> ``8M`` (the notation --part-size and --bwlimit take)."""
    if not n:
        return "none"
    for unit, scale in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return " ".join(value) or "none"
    return str(value)


def add_store_options(p: argparse.ArgumentParser, to: bool = True) -> None:
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
        help="bucket or container; local: an absolute directory, or a folder of the "
        "directory named by --key-environ ('.' for that directory) (default: from the URI)",
    )
    g.add_argument(
        "--key-environ",
        metavar="VAR",
        help="name of the environment variable holding the access key (for local: the base "
        "directory that a relative --container is in) (default: AWS_ACCESS_KEY_ID for s3://, AZURE_STORAGE_ACCOUNT for azure://)",
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
        "--ca-bundle",
        metavar="PEM",
        help="PEM file of the CA certificates that the endpoint's certificate is checked "
        "against, for a private CA (default: $AWS_CA_BUNDLE, $SSL_CERT_FILE or "
        "$REQUESTS_CA_BUNDLE, else the system's trust store)",
    )
    g.add_argument(
        "--insecure-skip-tls-verify",
        action="store_true",
        default=None,
        help="do NOT check the endpoint's TLS certificate (anyone on the path can read and "
        "change the data); a warning says so at start (default: off: always checked)",
    )
    g.add_argument(
        "--prefix",
        help="object name prefix; overrides the URI's path (default: the URI's path)",
    )


def add_watch_options(p: argparse.ArgumentParser, push: bool = False) -> None:
    """RUN_DIR, the store, and one flag per :class:`WatchOptions` field (push: not
    ``--exit-when-idle`` and ``--parent-pid``, which it implies and ignores)."""
    d = WatchOptions()
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory to upload from")
    add_store_options(p)
    g = p.add_argument_group("files")
    g.add_argument(
        "--rank",
        type=int,
        help="rank of files not under a rank_N directory, when RUN_DIR is not itself "
        f"rank_N (default: {d.rank})",
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
        help="upload only files matching GLOB; repeat for more (default: every file but "
        f"temporary names: {_shown(TEMPORARY_PATTERNS)})",
    )
    g.add_argument(
        "--exclude",
        action="append",
        metavar="GLOB",
        help="never upload files matching GLOB; repeat for more; left-out files show "
        f"in status (default: {_shown(d.exclude)})",
    )
    g.add_argument(
        "--pointer-pattern",
        action="append",
        metavar="GLOB",
        help="single-file checkpoint names (outside directory checkpoints), committed "
        "once verified; repeat for more; replaces the default "
        f"(default: {_shown(d.pointer_pattern or CHECKPOINT_PATTERNS)})",
    )
    g.add_argument(
        "--checkpoint-dir",
        action="append",
        metavar="GLOB=MARKER",
        help="directories matching GLOB are checkpoints, complete once MARKER exists in "
        "them and every file is verified; repeat for more; checked before the built-in "
        "rules (torch DCP .metadata, Hugging Face checkpoint-*/trainer_state.json, "
        "DeepSpeed global_step*/ named by 'latest') (default: none)",
    )
    g.add_argument(
        "--artifact-interval",
        type=float,
        metavar="SECONDS",
        help="a file in no checkpoint (log, metrics) that keeps changing is uploaded "
        f"again at most this often, and once more at drain (default: {d.artifact_interval:g})",
    )
    g.add_argument(
        "--settle",
        type=float,
        metavar="SECONDS",
        help="a file written in place is taken once closed and unchanged this long; "
        f"renamed files are taken at once (default: {d.settle})",
    )
    g.add_argument(
        "--open-timeout",
        type=float,
        metavar="SECONDS",
        help="a file unchanged this long is taken even without a close event "
        f"(default: {d.open_timeout})",
    )
    g = p.add_argument_group("transfers")
    g.add_argument("--files", type=int, help=f"files uploaded at once (default: {d.files})")
    g.add_argument(
        "--concurrency",
        type=int,
        help=f"parts in flight across all files; memory is about this x part size (default: {d.concurrency})",
    )
    g.add_argument(
        "--part-size", metavar="SIZE", help=f"multipart part size (default: {_size(d.part_size)})"
    )
    g.add_argument(
        "--attempts",
        type=int,
        help=f"upload attempts per file before it is marked failed (default: {d.attempts})",
    )
    g.add_argument(
        "--retry-delay",
        type=float,
        metavar="SECONDS",
        help="first pause between attempts of a file; doubles each time, at most 60 "
        f"(default: {d.retry_delay})",
    )
    g.add_argument(
        "--retries",
        type=int,
        help=f"tries per request on transient errors (default: {d.retries})",
    )
    g.add_argument(
        "--retry-seconds",
        type=float,
        help=f"longest time spent retrying one request (default: {d.retry_seconds})",
    )
    g.add_argument(
        "--bwlimit",
        metavar="RATE",
        help=f"upload bandwidth limit in bytes per second, e.g. 50M (default: {_size(d.bwlimit)})",
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
        help="create the bucket or container when missing "
        f"(default: {_shown(d.create_container)}; missing is exit {int(ExitCode.CONFIG)})",
    )
    g = p.add_argument_group("lifecycle and reporting")
    g.add_argument(
        "--drain-timeout",
        type=float,
        metavar="SECONDS",
        help="on SIGTERM/SIGINT, finish queued and in-flight work for at most this long "
        f"(default: {d.drain_timeout})",
    )
    if not push:
        g.add_argument(
            "--exit-when-idle",
            action="store_true",
            default=None,
            help="exit once everything found is verified and nothing is pending "
            f"(default: {_shown(d.exit_when_idle)})",
        )
        g.add_argument(
            "--parent-pid",
            type=int,
            metavar="PID",
            help="when PID is gone, finish accepted and complete files, then exit "
            f"(default: {_shown(d.parent_pid)})",
        )
    g.add_argument(
        "--status-file",
        metavar="PATH",
        help="JSON status rewritten atomically every second and at exit; 'ckpt-uploader "
        f"status' reads it there (default: STATE_DIR/{STATUS_FILE})",
    )
    g.add_argument(
        "--keep-local",
        type=int,
        metavar="N",
        help="delete local checkpoints beyond the newest N, whole, only once every file is verified (default: keep all)",
    )
    g.add_argument(
        "--keep-remote",
        type=int,
        metavar="N",
        help="delete stored checkpoints beyond the newest N, whole, never the pointer's latest "
        "(default: keep all)",
    )
    add_output_options(p)


def add_output_options(p: argparse.ArgumentParser) -> None:
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


# -- reading the flags back -----------------------------------------------------------------
def store_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The ObjectStoreHparams fields given as flags (None where absent)."""
    flags = {key: getattr(args, key, None) for key in (*STORE_FIELDS, *TLS_KEYS)}
    flags["extra_init_kwargs"] = parse_extra_kwargs(flags["extra_init_kwargs"])
    return flags


def location(args: argparse.Namespace, uri: str | None, cfg: dict[str, Any]) -> StoreLocation:
    """The store and prefix: URI, then the config file's [store], then flags (which win)."""
    return store_location(uri, store_flags(args), cfg.get("store"), args.prefix)


def watch_options(args: argparse.Namespace, cfg: dict[str, Any]) -> WatchOptions:
    """The watch/push flags over the config file's [watch] table over the defaults."""
    return WatchOptions.resolve(
        {key: getattr(args, key, None) for key in WATCH_KEYS},
        cfg.get("watch"),
        where=f"config file {getattr(args, 'config', None)}",
    )


def retry_policy(options: WatchOptions) -> RetryPolicy:
    """The request retry bounds ``--retries`` and ``--retry-seconds`` ask for."""
    return RetryPolicy(attempts=options.retries, total_seconds=options.retry_seconds)


def open_store(loc: StoreLocation, **options: Any) -> ObjectStore:
    """The store, with a missing container or refused credentials as a ConfigError."""
    try:
        return loc.hparams.initialize_object(**options)
    except (ContainerNotFoundError, AuthError) as exc:
        raise ConfigError(str(exc)) from None
