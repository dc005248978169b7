"""WatchOptions: every setting of ``ckpt-uploader watch`` / ``push``, declared once.

Each field is one option: its default, how a value is checked, and the help line of its
flag are declared together with :func:`option`. Everything else follows from that one
declaration: the command line's flag (``--keep-local``, built by
:func:`uploader.cli.options.add_watch_options`), a config file's ``[watch]`` key
(``keep_local``), :meth:`WatchOptions.resolve` (flags over the file over the default)
and :func:`to_argv`, which writes options (and a store) as the flags that the command
line reads back into the same values: the training side never builds an argv by hand.
Adding a setting is adding a field.

Defaults owned elsewhere are referred to, not copied: the part size and part
concurrency are :class:`uploader.transfer.store.ObjectStore`'s, the request retry
bounds :class:`uploader.transfer.retry.RetryPolicy`'s. ``include`` (None: every
file) and ``pointer_pattern`` (None: the daemon's single-file checkpoint names) are
resolved by the daemon when it builds its layout rules; ``checkpoint_dir`` holds
``GLOB=MARKER`` rules, checked there.

Example::

    options = WatchOptions.resolve({"keep_local": 3}, {"settle": 0.5})   # flags, [watch]
    argv = to_argv(options, StoreLocation(hparams, "exp1"))
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from uploader.config.files import STORE_FIELDS, parse_bytes
from uploader.config.hparams import StoreLocation
from uploader.errors import ConfigError, ExitCode
from uploader.transfer.digest import DIGEST_KINDS
from uploader.transfer.retry import RetryPolicy
from uploader.transfer.store import DEFAULT_CONCURRENCY, DEFAULT_DIGEST, DEFAULT_PART_SIZE

__all__ = [
    "WatchOptions",
    "WATCH_KEYS",
    "Kind",
    "Option",
    "COUNT",
    "SECONDS",
    "RANK",
    "INTEGER",
    "PATTERNS",
    "SIZE",
    "RATE",
    "PATH",
    "SWITCH",
    "PORT",
    "HOST",
    "DIGEST",
    "option",
    "option_of",
    "to_argv",
    "flag_name",
]


def flag_name(key: str) -> str:
    """``keep_local`` -> ``--keep-local``."""
    return "--" + key.replace("_", "-")


# -- kinds of values: how one is checked, shown in --help, and taken by argparse -------------
def _number(key: str, value: Any, kind: type, minimum: float | None) -> Any:
    name = flag_name(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} {value!r} is not a number")
    if kind is int and value != int(value):
        raise ConfigError(f"{name} {value!r} must be a whole number")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} {value!r} must be at least {minimum:g}")
    return kind(value)


def _rank(key: str, value: Any) -> int:
    rank: int = _number(key, value, int, None)
    if rank < 0:
        raise ConfigError(f"{flag_name(key)} must be 0 or more")
    return rank


def _patterns(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not all(isinstance(p, str) for p in value):
        raise ConfigError(f"{flag_name(key)} takes a list of glob patterns, e.g. ['*.pt']")
    return tuple(value)


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return " ".join(value) or "none"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _show_size(n: int | None) -> str:
    """``8388608`` -> ``8M`` (the notation --part-size and --bwlimit take)."""
    if not n:
        return "none"
    for unit, scale in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


@dataclass(frozen=True)
class Kind:
    """A kind of value: ``check(key, value)`` returns it in the field's type or raises
    ConfigError naming the flag; ``show`` writes a default for ``--help``; ``argparse``
    holds the keywords of the flag's ``add_argument``."""

    check: Callable[[str, Any], Any]
    show: Callable[[Any], str] = _show
    argparse: Mapping[str, Any] = field(default_factory=dict)


COUNT = Kind(lambda k, v: _number(k, v, int, 1), argparse={"type": int})  # at least 1
SECONDS = Kind(lambda k, v: _number(k, v, float, 0), argparse={"type": float, "metavar": "SECONDS"})
RANK = Kind(_rank, argparse={"type": int})
INTEGER = Kind(lambda k, v: _number(k, v, int, None), argparse={"type": int})
PATTERNS = Kind(_patterns, argparse={"action": "append", "metavar": "GLOB"})  # one flag each
SIZE = Kind(lambda k, v: parse_bytes(v, flag_name(k)), _show_size, {"metavar": "SIZE"})
RATE = Kind(lambda k, v: parse_bytes(v, flag_name(k)) or None, _show_size, {"metavar": "RATE"})
PATH = Kind(lambda k, v: Path(v), argparse={"metavar": "PATH"})
SWITCH = Kind(lambda k, v: bool(v), argparse={"action": "store_true", "default": None})


def _port(key: str, value: Any) -> int:
    port: int = _number(key, value, int, 0)
    if port > 65535:
        raise ConfigError(f"{flag_name(key)} {port} is not a TCP port (0-65535; 0: any free one)")
    return port


def _host(key: str, value: Any) -> str:
    text = str(value).strip()
    if not text or any(c.isspace() or c in "/@" for c in text):
        raise ConfigError(
            f"{flag_name(key)} {value!r} is not an address to listen on; give an IP address "
            "or host name, e.g. 127.0.0.1, 0.0.0.0 or the pod IP"
        )
    return text


PORT = Kind(_port, argparse={"type": int, "metavar": "PORT"})
HOST = Kind(_host, argparse={"metavar": "ADDR"})
TEXT = Kind(lambda k, v: str(v).strip("/"), argparse={})


def _digest_kind(key: str, value: Any) -> str:
    if value not in DIGEST_KINDS:
        raise ConfigError(
            f"{flag_name(key)} {value!r} is not a digest kind; use one of {', '.join(DIGEST_KINDS)}"
        )
    return str(value)


DIGEST = Kind(_digest_kind, argparse={"choices": DIGEST_KINDS})

FILES, TRANSFERS, LIFECYCLE = "files", "transfers", "lifecycle and reporting"


@dataclass(frozen=True)
class Option:
    """How a :class:`WatchOptions` field is given. ``help`` is the flag's help line;
    ``{default}`` in it is the field's default as ``kind`` shows it, and the command line
    fills in facts it owns (``{temporary}``, ``{checkpoint_names}``, ``{status_file}``)."""

    kind: Kind
    group: str
    help: str
    metavar: str | None = None


def option(default: Any, kind: Kind, group: str, help: str, metavar: str | None = None) -> Any:
    """A :class:`WatchOptions` field: its default and how it is given (see :class:`Option`)."""
    return field(default=default, metadata={"option": Option(kind, group, help, metavar)})


@dataclass(frozen=True)
class WatchOptions:
    """What the uploader daemon does; see ``ckpt-uploader watch --help`` for each field.

    Sizes are bytes (``part_size``, ``bwlimit``); times are seconds. None means
    "not set": no limit, keep everything, or the daemon's own choice (see each flag).
    """

    rank: int = option(
        0,
        RANK,
        FILES,
        "rank of files not under a rank_N directory, when RUN_DIR is not itself rank_N "
        "(default: {default})",
    )
    state_dir: Path | None = option(
        None, PATH, FILES, "where the journal and lock live (default: RUN_DIR)", "DIR"
    )
    include: tuple[str, ...] | None = option(
        None,
        PATTERNS,
        FILES,
        "upload only files matching GLOB; repeat for more (default: every file but "
        "temporary names: {temporary})",
    )
    exclude: tuple[str, ...] = option(
        (),
        PATTERNS,
        FILES,
        "never upload files matching GLOB; repeat for more; left-out files show in status "
        "(default: {default})",
    )
    pointer_pattern: tuple[str, ...] | None = option(
        None,
        PATTERNS,
        FILES,
        "single-file checkpoint names (outside directory checkpoints), committed once "
        "verified; repeat for more; replaces the default (default: {checkpoint_names})",
    )
    checkpoint_dir: tuple[str, ...] = option(
        (),
        PATTERNS,
        FILES,
        "directories matching GLOB are checkpoints, complete once MARKER exists in them and "
        "every file is verified ('settled:GLOB': once every file is settled and verified); "
        "repeat for more; checked before the built-in rules (numbered directories such as "
        "checkpoint-N, step_N, epoch_N read by their trainer's files: HF trainer_state.json, "
        "Accelerate random_states_0.pkl, DCP .metadata, else settled; DeepSpeed global_step*/ "
        "named by 'latest'; Megatron iter_N/ named by its tracker; DCP .metadata) "
        "(default: none)",
        "GLOB=MARKER|settled:GLOB",
    )
    #: Five minutes: a lost node loses at most five minutes of its logs, and a file
    #: that keeps changing costs at most 12 uploads an hour (a 100 MiB event file,
    #: 1.2 GiB an hour); every change is uploaded once more at drain.
    artifact_interval: float = option(
        300.0,
        SECONDS,
        FILES,
        "a file in no checkpoint (log, metrics) that keeps changing is uploaded again at "
        "most this often, and once more at drain (default: {default})",
    )
    settle: float = option(
        1.0,
        SECONDS,
        FILES,
        "a file written in place is taken once closed and unchanged this long; renamed "
        "files are taken at once (default: {default})",
    )
    open_timeout: float = option(
        30.0,
        SECONDS,
        FILES,
        "a file unchanged this long is taken even without a close event (default: {default})",
    )
    #: Many small files (a DCP or Megatron directory of one shard per rank) are bound by
    #: requests in flight, not bytes: 16 at once sends 1000 of 256 bytes in 1.45 s where 4
    #: take 1.70 s (bench/many_files.py). Memory stays bounded by the part buffers, shared.
    files: int = option(16, COUNT, TRANSFERS, "files uploaded at once (default: {default})")
    concurrency: int = option(
        DEFAULT_CONCURRENCY,
        COUNT,
        TRANSFERS,
        "parts in flight across all files; memory is about this x part size (default: {default})",
    )
    part_size: int = option(
        DEFAULT_PART_SIZE, SIZE, TRANSFERS, "multipart part size (default: {default})"
    )
    attempts: int = option(
        5,
        COUNT,
        TRANSFERS,
        "upload attempts per file before it is marked failed (default: {default})",
    )
    retry_delay: float = option(
        1.0,
        SECONDS,
        TRANSFERS,
        "first pause between attempts of a file; doubles each time, at most 60 "
        "(default: {default})",
    )
    retries: int = option(
        RetryPolicy.attempts,
        COUNT,
        TRANSFERS,
        "tries per request on transient errors (default: {default})",
    )
    retry_seconds: float = option(
        RetryPolicy.total_seconds,
        SECONDS,
        TRANSFERS,
        "longest time spent retrying one request (default: {default})",
    )
    drain_timeout: float = option(
        600.0,
        SECONDS,
        LIFECYCLE,
        "on SIGTERM/SIGINT, finish queued and in-flight work for at most this long "
        "(default: {default})",
    )
    exit_when_idle: bool = option(
        False,
        SWITCH,
        LIFECYCLE,
        "exit once everything found is verified and nothing is pending (default: {default})",
    )
    parent_pid: int | None = option(
        None,
        INTEGER,
        LIFECYCLE,
        "when PID is gone, finish accepted and complete files, then exit (default: {default})",
        "PID",
    )
    status_file: Path | None = option(
        None,
        PATH,
        LIFECYCLE,
        "JSON status rewritten atomically every second and at exit; 'ckpt-uploader status' "
        "reads it there (default: STATE_DIR/{status_file})",
    )
    keep_local: int | None = option(
        None,
        COUNT,
        LIFECYCLE,
        "delete local checkpoints beyond the newest N, whole, only once every file is "
        "verified (default: keep all)",
        "N",
    )
    keep_remote: int | None = option(
        None,
        COUNT,
        LIFECYCLE,
        "delete stored checkpoints beyond the newest N, whole, never the pointer's latest "
        "(default: keep all)",
        "N",
    )
    bwlimit: int | None = option(
        None,
        RATE,
        TRANSFERS,
        "upload bandwidth limit in bytes per second, e.g. 50M (default: {default})",
    )
    nice: int | None = option(
        None,
        INTEGER,
        TRANSFERS,
        "raise the process niceness by N so training keeps the CPU (default: unchanged)",
        "N",
    )
    create_container: bool = option(
        False,
        SWITCH,
        TRANSFERS,
        "create the bucket or container when missing "
        f"(default: {{default}}; missing is exit {int(ExitCode.CONFIG)})",
    )
    digest: str = option(
        DEFAULT_DIGEST,
        DIGEST,
        TRANSFERS,
        "the checksum each file is uploaded and recorded with: crc64nvme (hardware speed, "
        "checked by S3 on arrival) or sha256 (a cryptographic identity) (default: {default})",
    )
    dedup: bool = option(
        False,
        SWITCH,
        TRANSFERS,
        "store checkpoint files as content-named chunks shared inside --dedup-scope, "
        "cut at tensor boundaries; only chunks the scope lacks are sent (default: {default})",
    )
    dedup_scope: str | None = option(
        None,
        TEXT,
        TRANSFERS,
        "the bucket prefix whose runs share chunks: the run's prefix or a parent of it "
        "(default: the run's prefix)",
        "PREFIX",
    )
    verify_resumed: bool = option(
        False,
        SWITCH,
        TRANSFERS,
        "when an interrupted multipart upload resumes, read and hash again the parts the "
        "store already holds instead of trusting their recorded hashes (default: {default})",
    )
    metrics_port: int | None = option(
        None,
        PORT,
        LIFECYCLE,
        "serve Prometheus metrics, /livez and /readyz over HTTP on PORT (0: any free "
        "port, logged) (default: {default})",
    )
    metrics_addr: str = option(
        "127.0.0.1",
        HOST,
        LIFECYCLE,
        "address the metrics server listens on, e.g. the pod IP (default: {default})",
    )
    metrics_file: Path | None = option(
        None,
        PATH,
        LIFECYCLE,
        "write the metrics every second, atomically, in node_exporter's textfile format "
        "(default: {default})",
    )
    ready_max_lag: float = option(
        600.0,
        SECONDS,
        LIFECYCLE,
        "/readyz answers 503 while the lag of the newest checkpoint is above this "
        "(default: {default})",
    )

    @classmethod
    def resolve(
        cls,
        flags: Mapping[str, Any],
        file: Mapping[str, Any] | None = None,
        where: str = "config file",
    ) -> WatchOptions:
        """Options from command-line ``flags`` over a config file's ``[watch]`` table
        over the defaults; a flag or key set to None counts as absent.

        Raises ConfigError naming the setting for an unknown key or a bad value;
        ``where`` names the file in the message.
        """
        file = dict(file or {})
        unknown = set(file) - set(WATCH_KEYS)
        if unknown:
            raise ConfigError(
                f"{where}: unknown [watch] key(s) {', '.join(sorted(unknown))}; "
                f"known: {', '.join(sorted(WATCH_KEYS))}"
            )
        given: dict[str, Any] = {}
        for key in WATCH_KEYS:
            value = flags.get(key)
            if value is None:
                value = file.get(key)
            if value is not None:
                given[key] = option_of(key).kind.check(key, value)
        return replace(cls(), **given)

    @property
    def retry(self) -> RetryPolicy:
        """The request retry bounds ``--retries`` and ``--retry-seconds`` ask for."""
        return RetryPolicy(attempts=self.retries, total_seconds=self.retry_seconds)


#: The fields of :class:`WatchOptions`: the ``[watch]`` keys of a config file.
WATCH_KEYS: tuple[str, ...] = tuple(f.name for f in fields(WatchOptions))
_OPTIONS: dict[str, Option] = {f.name: f.metadata["option"] for f in fields(WatchOptions)}


def option_of(key: str) -> Option:
    """How the :class:`WatchOptions` field ``key`` is given."""
    return _OPTIONS[key]


def _flag(key: str, value: Any) -> str:
    text = str(value)
    if text == "--":  # argparse reads a value "--" as "end of options", not as itself
        raise ConfigError(f"{flag_name(key)} '--' cannot be passed on a command line")
    return f"{flag_name(key)}={text}"


def to_argv(options: WatchOptions, location: StoreLocation) -> list[str]:
    """The ``watch`` flags that the command line reads back as ``options`` and ``location``.

    Only settings that differ from the defaults are written (so a config file given
    as well still fills the rest). The store goes as its hparams fields: credentials
    as the NAMES of environment variables, never their values. Values are joined to
    their flag (``--prefix=-x``), so none is mistaken for an option.
    """
    argv: list[str] = []
    hp = location.hparams
    for key in STORE_FIELDS:
        value = getattr(hp, key)
        if key == "extra_init_kwargs":
            if value:
                argv.append(f"--extra-init-kwargs={json.dumps(value, sort_keys=True)}")
        elif value is not None:
            argv.append(_flag(key, value))
    if location.prefix:
        argv.append(_flag("prefix", location.prefix))
    default = WatchOptions()
    for key in WATCH_KEYS:
        value = getattr(options, key)
        if value == getattr(default, key):
            continue
        if option_of(key).kind is PATTERNS:
            if not value:
                raise ConfigError(
                    f"{key} = [] (no patterns) cannot be given as flags; use a config file"
                )
            argv += [_flag(key, p) for p in value]
        elif isinstance(value, bool):
            argv.append(flag_name(key))  # only True differs from a False default
        else:
            argv.append(_flag(key, value))
    return argv
