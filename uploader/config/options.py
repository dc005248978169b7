"""WatchOptions: every setting of ``ckpt-uploader watch`` / ``push``, with its default, once.

One object holds what the uploader daemon is told: the command line's flags, a config
file's ``[watch]`` table (whose keys are exactly the fields here) and the worker process
the training side starts all go through it. The flags' ``--help`` shows these defaults,
and :func:`to_argv` writes options (and a store) as the flags that the command line
reads back into the same values: the training side never builds an argv by hand.

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
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from uploader.config.files import STORE_FIELDS, parse_bytes
from uploader.config.hparams import StoreLocation
from uploader.errors import ConfigError
from uploader.transfer.retry import RetryPolicy
from uploader.transfer.store import DEFAULT_CONCURRENCY, DEFAULT_PART_SIZE

__all__ = ["WatchOptions", "WATCH_KEYS", "to_argv", "flag_name"]


@dataclass(frozen=True)
class WatchOptions:
    """What the uploader daemon does; see ``ckpt-uploader watch --help`` for each field.

    Sizes are bytes (``part_size``, ``bwlimit``); times are seconds. None means
    "not set": no limit, keep everything, or the daemon's own choice (see each flag).
    """

    rank: int = 0
    state_dir: Path | None = None
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    pointer_pattern: tuple[str, ...] | None = None
    checkpoint_dir: tuple[str, ...] = ()
    #: Five minutes: a lost node loses at most five minutes of its logs, and a file
    #: that keeps changing costs at most 12 uploads an hour (a 100 MiB event file,
    #: 1.2 GiB an hour); every change is uploaded once more at drain.
    artifact_interval: float = 300.0
    settle: float = 1.0
    open_timeout: float = 30.0
    files: int = 4
    concurrency: int = DEFAULT_CONCURRENCY
    part_size: int = DEFAULT_PART_SIZE
    attempts: int = 5
    retry_delay: float = 1.0
    retries: int = RetryPolicy.attempts
    retry_seconds: float = RetryPolicy.total_seconds
    drain_timeout: float = 600.0
    exit_when_idle: bool = False
    parent_pid: int | None = None
    status_file: Path | None = None
    keep_local: int | None = None
    keep_remote: int | None = None
    bwlimit: int | None = None
    nice: int | None = None
    create_container: bool = False
    verify_resumed: bool = False

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
                given[key] = _checked(key, value)
        return replace(cls(), **given)


#: The fields of :class:`WatchOptions`: the ``[watch]`` keys of a config file.
WATCH_KEYS: tuple[str, ...] = tuple(f.name for f in fields(WatchOptions))

_COUNTS = ("files", "concurrency", "attempts", "retries")  # at least 1
_SECONDS = (
    "settle",
    "open_timeout",
    "drain_timeout",
    "retry_seconds",
    "retry_delay",
    "artifact_interval",
)
#: repeated flags: one per pattern
_PATTERNS = ("include", "exclude", "pointer_pattern", "checkpoint_dir")


def flag_name(key: str) -> str:
    """``keep_local`` -> ``--keep-local``."""
    return "--" + key.replace("_", "-")


def _number(key: str, value: Any, kind: type, minimum: float | None) -> Any:
    name = flag_name(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} {value!r} is not a number")
    if kind is int and value != int(value):
        raise ConfigError(f"{name} {value!r} must be a whole number")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} {value!r} must be at least {minimum:g}")
    return kind(value)


def _checked(key: str, value: Any) -> Any:
    """``value`` for field ``key`` in the field's type; ConfigError when it cannot be."""
    if key in _COUNTS:
        return _number(key, value, int, 1)
    if key in _SECONDS:
        return _number(key, value, float, 0)
    if key in ("keep_local", "keep_remote"):
        return _number(key, value, int, 1)
    if key == "rank":
        rank = _number(key, value, int, None)
        if rank < 0:
            raise ConfigError("--rank must be 0 or more")
        return rank
    if key in ("parent_pid", "nice"):
        return _number(key, value, int, None)
    if key in _PATTERNS:
        if isinstance(value, str) or not all(isinstance(p, str) for p in value):
            raise ConfigError(f"{flag_name(key)} takes a list of glob patterns, e.g. ['*.pt']")
        return tuple(value)
    if key == "part_size":
        return parse_bytes(value, "--part-size")
    if key == "bwlimit":
        return parse_bytes(value) or None
    if key in ("state_dir", "status_file"):
        return Path(value)
    return bool(value)  # exit_when_idle, create_container, verify_resumed


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
        if key in _PATTERNS:
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
