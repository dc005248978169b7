"""UploadWorker: the handle on the worker process, the uploader daemon run by training.

The training side never uploads anything itself. It starts the uploader daemon as
a separate process (``python -m uploader watch RUN_DIR ...``, the worker process)
in its own process session, so a Ctrl-C or a crash of training does not reach it;
the worker is told the training process's pid (``--parent-pid``) and, when that
process is gone, finishes every checkpoint complete on disk and exits by itself.

Credentials reach the worker through its environment only: the command line
carries the *names* of the variables (``--key-environ``), never their values.

While training runs, :meth:`UploadWorker.check` costs a ``waitpid`` and, at most
once per ``check_interval``, a ``stat`` and a small read of the status file the
worker rewrites every second (the daemon's :class:`StatusReport`, the only thing
the training side reads). It raises :class:`WorkerError` with the worker's own
reason when the worker crashed or an upload failed for good. At the end,
:meth:`UploadWorker.drain` waits until the worker has taken in every checkpoint
complete on disk, sends SIGTERM (the worker uploads what is pending, then exits),
shows a progress bar fed by the status file, and raises unless the exit code and
the final report say everything was verified.

This module is shared by :class:`uploader.RunDirectoryUploader` (the Trainer
callback) and :class:`uploader.Sidecar` (a context manager for any loop).

Example::

    worker = UploadWorker("runs/1/rank_0", to="file:///data/bucket", prefix="exp1", rank=0)
    worker.start()
    for step in range(1000):
        train_step()
        worker.check()          # raises WorkerError if uploads are failing
    worker.drain(timeout=600)   # waits, then raises unless all were verified
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from uploader.config.hparams import ObjectStoreHparams, StoreLocation, parse_uri
from uploader.config.options import WatchOptions
from uploader.daemon.journal import make_reserve
from uploader.daemon.status import StatusReport
from uploader.errors import ConfigError, ExitCode, UploaderError
from uploader.launch.failure import WorkerError, worker_error
from uploader.launch.options import (
    LOG_FILE,
    NO_LIMIT,
    STATUS_FILE,
    default_state_dir,
    watch_command,
    worker_environment,
)
from uploader.launch.progress import DrainBar, StatusReader

__all__ = ["UploadWorker", "WorkerError", "DRAIN_GRACE", "INTAKE_WAIT"]

log = logging.getLogger("uploader.launch.worker")


#: Seconds the parent waits beyond the worker's own drain timeout before it
#: interrupts the worker (the worker normally exits with ExitCode.TIMEOUT first).
DRAIN_GRACE = 15.0
#: Seconds :meth:`UploadWorker.drain` waits, before SIGTERM, for the worker to be up
#: (SIGTERM then ends intake with a final scan of every file complete on disk).
INTAKE_WAIT = 60.0
#: How much lower the worker's CPU priority is than training's, unless told otherwise.
WORKER_NICE = 10
#: The worker's drain timeout unless told otherwise (training waits long at the end).
WORKER_DRAIN_TIMEOUT = 3600.0


class UploadWorker:
    """One ``ckpt-uploader watch`` child process for one run directory.

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
        self.log_to = log_to
        self.log_format = log_format
        self.verbosity = verbosity
        self.check_interval = check_interval
        self.env = dict(env or {})
        self.extra_args = list(extra_args)
        self.python = python or sys.executable
        self.status_path = self.state_dir / STATUS_FILE
        self.log_path = self.state_dir / LOG_FILE if log_to == "file" else None
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._reader = StatusReader(self.status_path, check_interval)
        self._draining = False
        self._result: int | None = None

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

    # -- lifecycle ------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def exit_code(self) -> int | None:
        """The worker's exit status once :meth:`drain` returned or raised, else None."""
        return self._result

    @property
    def finished(self) -> bool:
        return self._draining and (self.proc is None or self.proc.returncode is not None)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> UploadWorker:
        """Start the worker process (in its own session, stdin closed). Returns self."""
        if self.proc is not None:
            raise UploaderError(
                f"the worker process for {self.run_dir} was already started (pid {self.proc.pid})"
            )
        env = self.environment()
        cmd = self.command()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._reader.reset()  # a report of an earlier worker is not this one's
        # The journal's disk reserve, set aside now, before training can fill the disk.
        make_reserve(self.state_dir)
        out: IO[bytes] | None = None
        if self.log_path is not None:
            self._log_file = out = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT if out is not None else None,
                env=env,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            self._close_log()
            raise UploaderError(
                f"could not start the worker process ({exc}); check that {self.python} "
                "can run 'python -m uploader'"
            ) from None
        log.info(
            "worker process pid %d watching %s (rank %d, log %s)",
            self.proc.pid,
            self.run_dir,
            self.rank,
            self.log_path or "stderr",
        )
        return self

    def status(self, fresh: bool = False) -> StatusReport | None:
        """The worker's last status; read again at most once per ``check_interval``."""
        return self._reader.read(fresh)

    def check(self) -> None:
        """Raise :class:`WorkerError` if the worker died or an upload failed for good.

        Cheap enough for every batch: a ``waitpid``, and at most once per
        ``check_interval`` a ``stat`` and a small read.
        """
        if self.proc is None or self._draining:
            return
        code = self.proc.poll()
        if code is not None:
            st = self.status(fresh=True)
            what = (
                "could not start"
                if code == ExitCode.CONFIG
                else "stopped while training was still running"
            )
            raise self._error(code, st, what)
        st = self.status()
        if st is not None and (st.state == "failed" or st.failed > 0):
            raise self._error(None, st, "could not upload a checkpoint")

    def drain(self, timeout: float | None = None, progress: bool = True) -> StatusReport | None:
        """Ask the worker to finish (SIGTERM), wait, and raise unless all was verified.

        Args:
            timeout: seconds to wait; default: the worker's ``drain_timeout`` plus a
                grace period. On expiry the worker is interrupted and WorkerError
                raised; its journal keeps what was not uploaded.
            progress: show a tqdm progress bar of the bytes still to upload.

        Returns the worker's final status.
        """
        if self.proc is None:
            raise UploaderError("the worker process was never started; call start() first")
        self._draining = True
        if timeout is None and self.drain_timeout is not None:
            timeout = self.drain_timeout + DRAIN_GRACE
        deadline = None if timeout is None else time.monotonic() + timeout
        if self.proc.poll() is None:
            # SIGTERM ends intake with a final scan of every checkpoint complete on
            # disk: first let the worker come up, so the signal starts a drain.
            self._await_intake(deadline)
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
        code = self._wait(deadline, DrainBar(progress, self.rank))
        if code is None:
            code = self._interrupt()
            st = self.status(fresh=True)
            self._finish(code)
            raise self._error(
                code,
                st,
                f"did not finish draining within {timeout:g} s and was interrupted",
            )
        st = self.status(fresh=True)
        self._finish(code)
        if code == ExitCode.CONFIG:
            raise self._error(code, st, "could not start")
        if code != ExitCode.OK:
            raise self._error(code, st, "did not upload every checkpoint")
        if st is not None and (st.failed > 0 or st.outstanding > 0):
            raise self._error(code, st, "exited with checkpoints not verified")
        if st is not None and not st.journal_saved:
            log.warning(
                "the uploader daemon could not save its journal %s (disk full); its final "
                "status reports %d file(s) verified",
                self.state_dir,
                st.done,
            )
        log.info(
            "worker process pid %d finished: %s",
            self.proc.pid,
            f"{st.done} file(s) verified" if st is not None else "exit 0",
        )
        return st

    def _wait(self, deadline: float | None, bar: DrainBar) -> int | None:
        """The worker's exit code, or None when ``deadline`` passed first."""
        assert self.proc is not None
        try:
            while True:
                try:
                    return self.proc.wait(timeout=0.25)
                except subprocess.TimeoutExpired:
                    pass
                st = self.status()
                if st is not None:
                    bar.show(st)
                if deadline is not None and time.monotonic() >= deadline:
                    return None
        finally:
            bar.close()

    def _await_intake(self, deadline: float | None) -> None:
        """Wait (bounded) until the daemon reports, in a report written after this
        call began, that it is up: its watcher runs and SIGTERM starts a drain whose
        final scan takes every file complete on disk, closed or not.

        Waiting for the whole intake to go quiet instead would hold the drain for
        ``--open-timeout`` on a file renamed into place from outside the directory and
        then chmod-ed (fsspec's local write, which Lightning uses): watchdog reports the
        chmod as a modification, and no close event follows."""
        assert self.proc is not None
        asked = time.time()
        limit = time.monotonic() + INTAKE_WAIT
        if deadline is not None:
            limit = min(limit, deadline)
        while self.proc.poll() is None and time.monotonic() < limit:
            st = self.status(fresh=True)
            if (
                st is not None
                and st.updated_at >= asked
                # up: running, or running with uploads failed (not a failed start)
                and (st.intake_finished or st.state == "running" or st.failed > 0)
            ):
                return
            time.sleep(0.1)
        if self.proc.poll() is None:
            log.warning(
                "the uploader daemon has not taken in every checkpoint within %.0f s; "
                "draining anyway",
                INTAKE_WAIT,
            )

    def kill(self) -> None:
        """Stop the worker at once (SIGKILL). Its journal resumes the work next time."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        self._close_log()

    def _interrupt(self) -> int | None:
        """Second SIGTERM (the worker stops: ``ExitCode.SIGTERM``), then SIGKILL."""
        assert self.proc is not None
        for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                return self.proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                continue
        return None

    def _finish(self, code: int | None) -> None:
        self._result = code
        self._close_log()

    def _close_log(self) -> None:
        if self._log_file is not None:
            with contextlib.suppress(OSError):
                self._log_file.close()
            self._log_file = None

    def _error(self, code: int | None, st: StatusReport | None, what: str) -> WorkerError:
        return worker_error(
            what,
            rank=self.rank,
            pid=self.pid,
            code=code,
            status=st,
            log_path=self.log_path,
            run_dir=self.run_dir,
            state_dir=self.state_dir,
        )
