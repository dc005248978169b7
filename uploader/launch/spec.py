"""WorkerSpec: what a worker process runs with, checked before anything starts.

The arguments of :class:`uploader.launch.worker.UploadWorker` (the store as
``hparams`` or a URI, prefix, rank, state directory, drain timeout, retention,
logging ...) are validated here, in the training process, so a mistake fails at once
and not later in the child. :meth:`WorkerSpec.command` turns them into the worker's
argv (variable names, never credentials) and :meth:`WorkerSpec.environment` into its
environment (this process's, plus ``env``; the credential variables must exist).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from uploader.config.hparams import ObjectStoreHparams, StoreLocation, parse_uri
from uploader.config.options import WatchOptions
from uploader.errors import ConfigError
from uploader.launch.options import (
    LOG_FILE,
    NO_LIMIT,
    STATUS_FILE,
    default_state_dir,
    watch_command,
    worker_environment,
)

__all__ = ["WorkerSpec", "WORKER_NICE", "WORKER_DRAIN_TIMEOUT"]

#: How much lower the worker's CPU priority is than training's, unless told otherwise.
WORKER_NICE = 10
#: The worker's drain timeout unless told otherwise (training waits long at the end).
WORKER_DRAIN_TIMEOUT = 3600.0


class WorkerSpec:
    """What a worker process runs with: validated settings, its argv and environment.

    Args:
        run_dir: the directory to watch (for the Trainer, one rank's run directory).
        hparams: the store, as :class:`ObjectStoreHparams`; or give ``to``.
        to: the store as a URI (``s3://bucket/prefix``, ``file:///dir`` ...).
        prefix: object name prefix; objects are ``{prefix}/rank_{rank}/...``.
        rank: the rank whose directory this is (default 0).
        state_dir: journal, status file and log; default :func:`default_state_dir`.
        parent_pid: the worker drains and exits when this process is gone
            (default: the calling process; 0 or None disables it).
        drain_timeout: seconds the worker may spend draining after SIGTERM (or
            after the parent is gone) before it gives up with ``ExitCode.TIMEOUT``.
            None: no limit.
        keep_local: keep only the newest N verified checkpoints on local disk.
        nice: how much lower than training the worker's CPU priority is (``os.nice``;
            default :data:`WORKER_NICE`; 0 or None: the same): uploads never take the
            CPU from a training step.
        create_container: create the bucket when it does not exist.
        dedup: store checkpoint files as chunks shared in ``dedup_scope`` (``--dedup``).
        dedup_scope: the bucket prefix whose runs share chunks (default: the run's prefix).
        log_to: ``"file"`` (``.ckpt-uploader.log`` in the state dir) or ``"stderr"``
            (inherit this process's stderr).
        log_format: ``"text"`` or ``"json"``.
        verbosity: -1 quiet, 0 normal, 1 verbose.
        check_interval: least seconds between two reads of the status file.
        env: extra environment variables for the worker (it inherits this
            process's environment, which is where credentials come from).
        extra_args: further ``watch`` flags, passed as given.
        python: the interpreter to run (default ``sys.executable``).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        hparams: ObjectStoreHparams | None = None,
        to: str | None = None,
        prefix: str = "",
        rank: int = 0,
        state_dir: str | os.PathLike[str] | None = None,
        parent_pid: int | None = -1,
        drain_timeout: float | None = WORKER_DRAIN_TIMEOUT,
        keep_local: int | None = WatchOptions.keep_local,
        nice: int | None = None,
        create_container: bool = WatchOptions.create_container,
        dedup: bool = WatchOptions.dedup,
        dedup_scope: str | None = WatchOptions.dedup_scope,
        log_to: str = "file",
        log_format: str = "text",
        verbosity: int = 0,
        check_interval: float = 1.0,
        env: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
        python: str | None = None,
    ) -> None:
        if (hparams is None) == (to is None):
            raise ConfigError("give the store either as hparams or as a URI (to=...), not both")
        uri_prefix = ""
        if to is not None:
            # Parse now, so a malformed URI fails here and not in the child.
            location = parse_uri(to)
            hparams, uri_prefix = location.hparams, location.prefix
        assert hparams is not None
        hparams.validate()
        self.location_hparams = hparams
        if log_to not in ("file", "stderr"):
            raise ConfigError(f"log_to must be 'file' or 'stderr', not {log_to!r}")
        if log_format not in ("text", "json"):
            raise ConfigError(f"log_format must be 'text' or 'json', not {log_format!r}")
        if drain_timeout is not None and drain_timeout <= 0:
            raise ConfigError(f"drain_timeout {drain_timeout} must be positive (or None)")
        if keep_local is not None and keep_local < 1:
            raise ConfigError(f"keep_local {keep_local} must be at least 1 (or None)")
        if rank < 0:
            raise ConfigError(f"rank {rank} must not be negative")
        if nice is not None and not 0 <= nice <= 19:
            raise ConfigError(f"nice {nice} must be between 0 and 19 (or None)")
        self.run_dir = Path(run_dir).absolute()
        self.hparams = hparams if to is None else None
        self.to = to
        # A prefix given wins over the URI's own, as --prefix does on the command line.
        self.prefix = prefix.strip("/") or uri_prefix
        self.rank = int(rank)
        self.state_dir = (
            Path(state_dir).absolute() if state_dir else default_state_dir(self.run_dir)
        )
        self.parent_pid = os.getpid() if parent_pid == -1 else parent_pid
        self.drain_timeout = drain_timeout
        self.keep_local = keep_local
        self.nice = WORKER_NICE if nice is None else nice
        self.create_container = create_container
        self.dedup = bool(dedup)
        self.dedup_scope = dedup_scope
        self.log_to = log_to
        self.log_format = log_format
        self.verbosity = verbosity
        self.check_interval = check_interval
        self.env = dict(env or {})
        self.extra_args = list(extra_args)
        self.python = python or sys.executable
        self.status_path = self.state_dir / STATUS_FILE
        self.log_path = self.state_dir / LOG_FILE if log_to == "file" else None

    # -- command and environment ----------------------------------------------------------
    def options(self) -> WatchOptions:
        """The watch options this worker runs with (all others: their defaults)."""
        return WatchOptions(
            rank=self.rank,
            state_dir=self.state_dir,
            status_file=self.status_path,
            parent_pid=self.parent_pid or None,
            drain_timeout=NO_LIMIT if self.drain_timeout is None else self.drain_timeout,
            keep_local=self.keep_local,
            nice=self.nice or None,
            create_container=self.create_container,
            dedup=self.dedup,
            dedup_scope=self.dedup_scope,
        )

    def command(self) -> list[str]:
        """The worker's argv. Holds environment variable names, never credentials."""
        return watch_command(
            self.python,
            self.run_dir,
            self.options(),
            StoreLocation(self.location_hparams, self.prefix),
            log_format=self.log_format,
            verbosity=self.verbosity,
            extra_args=self.extra_args,
        )

    def environment(self) -> dict[str, str]:
        """This process's environment plus ``env``; checks the credential variables exist."""
        return worker_environment(self.location_hparams, self.env)
