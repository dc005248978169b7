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
import functools
import logging
import signal
import subprocess
import time
from typing import IO

from uploader.daemon.journal import make_reserve
from uploader.daemon.status import StatusReport
from uploader.errors import ExitCode, UploaderError
from uploader.launch.failure import WorkerError, worker_error
from uploader.launch.progress import DrainBar, StatusReader
from uploader.launch.spec import WORKER_DRAIN_TIMEOUT, WORKER_NICE, WorkerSpec

__all__ = [
    "UploadWorker",
    "WorkerSpec",
    "WorkerError",
    "DRAIN_GRACE",
    "INTAKE_WAIT",
    "WORKER_NICE",
    "WORKER_DRAIN_TIMEOUT",
]

log = logging.getLogger("uploader.launch.worker")


#: Seconds the parent waits beyond the worker's own drain timeout before it
#: interrupts the worker (the worker normally exits with ExitCode.TIMEOUT first).
DRAIN_GRACE = 15.0
#: Seconds :meth:`UploadWorker.drain` waits, before SIGTERM, for the worker to be up
#: (SIGTERM then ends intake with a final scan of every file complete on disk).
INTAKE_WAIT = 60.0


class UploadWorker(WorkerSpec):
    """One ``ckpt-uploader watch`` child process for one run directory.

    Takes the arguments of :class:`WorkerSpec` (the store, prefix, rank, state
    directory, drain timeout, retention, logging ...), which also builds the worker's
    argv and environment; this class starts the process, reads its status, and
    drains or stops it.
    """

    proc: subprocess.Popen[bytes] | None = None
    _log_file: IO[bytes] | None = None
    _draining = False
    _result: int | None = None

    @functools.cached_property
    def _reader(self) -> StatusReader:
        return StatusReader(self.status_path, self.check_interval)

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
