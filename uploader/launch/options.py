"""How the training side describes the worker process, and the command line it runs.

:class:`WorkerOptions` are the keywords that :class:`uploader.RunDirectoryUploader`
and :class:`uploader.Sidecar` hand to :class:`uploader.launch.worker.UploadWorker`
unchanged. :func:`watch_command` turns the worker's settings into the argv of
``python -m uploader watch``, through :func:`uploader.config.options.to_argv` (the
one options-to-argv function, whose inverse is the command line's own parser): the
argv carries the NAMES of the credential variables, never their values.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypedDict, cast

from uploader.config.hparams import ObjectStoreHparams, StoreLocation, parse_uri
from uploader.config.options import WatchOptions, to_argv
from uploader.daemon.status import STATUS_FILE
from uploader.errors import ConfigError
from uploader.redact import register_secret

__all__ = [
    "WorkerOptions",
    "checked_worker_options",
    "store_location",
    "default_state_dir",
    "watch_command",
    "worker_environment",
    "STATUS_FILE",
    "LOG_FILE",
    "NO_LIMIT",
]

#: The worker's log, in its state directory (its status file: STATUS_FILE, the daemon's).
LOG_FILE = ".ckpt-uploader.log"
#: The drain timeout given to a worker that may take as long as it needs (ten years).
NO_LIMIT = 10 * 365 * 86400.0


class WorkerOptions(TypedDict, total=False):
    """How the worker runs: the :class:`UploadWorker` arguments that
    :class:`uploader.RunDirectoryUploader` and :class:`uploader.Sidecar` take as
    keywords and pass on unchanged (see :class:`UploadWorker` for each).

    Example::

        options: WorkerOptions = {"keep_local": 2, "extra_args": ["--part-size", "8M"]}
        UploadWorker("runs/1", to="file:///data/bucket", **options)
    """

    state_dir: str | os.PathLike[str] | None
    drain_timeout: float | None
    keep_local: int | None
    nice: int | None
    create_container: bool
    dedup: bool
    dedup_scope: str | None
    log_to: str
    log_format: str
    verbosity: int
    check_interval: float
    env: Mapping[str, str] | None
    extra_args: Sequence[str]


def checked_worker_options(owner: str, options: Mapping[str, Any]) -> WorkerOptions:
    """A copy of ``options`` for :class:`UploadWorker`; a name it does not take
    raises TypeError at once, as a misspelt keyword argument of ``owner`` would."""
    for name in options:
        if name not in WorkerOptions.__optional_keys__:
            raise TypeError(f"{owner}() got an unexpected keyword argument {name!r}")
    copy = dict(options)
    if copy.get("env") is not None:
        copy["env"] = dict(copy["env"])
    if "extra_args" in copy:
        copy["extra_args"] = list(copy["extra_args"])
    return cast(WorkerOptions, copy)


def store_location(
    store: ObjectStoreHparams | str, wrong_type: str
) -> tuple[ObjectStoreHparams, str]:
    """The store's hparams and the object name prefix a URI carries ("" for hparams).

    Args:
        store: a store URI (``s3://bucket/prefix``) or :class:`ObjectStoreHparams`.
        wrong_type: the start of the ConfigError message for anything else; the
            type that was given is appended.
    """
    if isinstance(store, str):
        location = parse_uri(store)
        return location.hparams, location.prefix
    if isinstance(store, ObjectStoreHparams):
        return store, ""
    raise ConfigError(f"{wrong_type}, not {type(store).__name__}")


def default_state_dir(run_dir: str | os.PathLike[str]) -> Path:
    """Where the worker keeps its journal, status file and log for ``run_dir``.

    The run directory itself, as for ``ckpt-uploader watch``: the files are
    hidden (``.ckpt-uploader.*``) and the watcher never uploads them, and
    ``ckpt-uploader status RUN_DIR`` finds the journal without further flags.
    """
    return Path(run_dir).absolute()


def watch_command(
    python: str,
    run_dir: Path,
    options: WatchOptions,
    location: StoreLocation,
    *,
    log_format: str,
    verbosity: int,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """``python -m uploader watch RUN_DIR ...`` for ``options`` and the store at
    ``location``; ``extra_args`` (further watch flags) come last, as given."""
    # -P (Python 3.11+): a folder or file named "uploader" in the current
    # directory must not shadow the installed package.
    safe_path = ["-P"] if sys.version_info >= (3, 11) else []
    cmd = [python, *safe_path, "-m", "uploader", "watch", str(run_dir)]
    cmd += to_argv(options, location)
    cmd.append(f"--log-format={log_format}")
    if verbosity < 0:
        cmd.append("-q")
    elif verbosity > 0:
        cmd.append("-v")
    return cmd + list(extra_args)


def worker_environment(hparams: ObjectStoreHparams, extra: Mapping[str, str]) -> dict[str, str]:
    """The worker's environment: this process's plus ``extra``. The credential
    variables ``hparams`` names must be set (ConfigError otherwise, before anything
    starts); their values are registered as secrets, so no log line shows them. For
    ``local`` the key is the base directory, a path rather than a secret: it must be
    set too, but is not masked."""
    env = dict(os.environ)
    env.update(extra)
    env.setdefault("PYTHONUNBUFFERED", "1")
    for field_name in ("key_environ", "secret_environ"):
        var = getattr(hparams, field_name)
        if var is None:
            continue
        if not env.get(var, "").strip():
            raise ConfigError(
                f"environment variable {var} (named by {field_name}) is not set or "
                f"empty; export it before training starts, e.g. export {var}=..."
            )
        if not (field_name == "key_environ" and hparams.family == "local"):
            register_secret(env[var])
    return env
