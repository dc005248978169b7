"""UploadWorker: run ``ckpt-uploader watch`` as a child process, watch it, drain it.

The training side never uploads anything itself. It starts the uploader as a
separate process (``python -m uploader watch RUN_DIR ...``) in its own process
session, so a Ctrl-C or a crash of training does not reach it; the worker is told
the training process's pid (``--parent-pid``) and, when that process is gone,
finishes every checkpoint complete on disk and exits by itself.

Credentials reach the worker through its environment only: the command line
carries the *names* of the variables (``--key-environ``), never their values.

While training runs, :meth:`UploadWorker.check` costs a ``waitpid`` and, at most
once per ``check_interval``, a ``stat`` and a small read of the status file the
worker rewrites every second. It raises :class:`WorkerError` with the worker's
own reason when the worker crashed or an upload failed for good. At the end,
:meth:`UploadWorker.drain` sends SIGTERM (the worker uploads what is pending,
then exits), shows a progress bar fed by the status file, and raises unless
everything was verified.

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
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any, TypedDict, cast

from uploader.config.hparams import ObjectStoreHparams, parse_uri
from uploader.daemon.journal import Journal, journal_path, make_reserve
from uploader.daemon.status import StatusReport
from uploader.errors import ConfigError, ExitCode, UploaderError
from uploader.redact import redact, register_secret

__all__ = [
    "UploadWorker",
    "WorkerOptions",
    "store_location",
    "checked_worker_options",
    "WorkerError",
    "default_state_dir",
]

log = logging.getLogger("uploader.launch.worker")


#: Seconds the parent waits beyond the worker's own drain timeout before it
#: interrupts the worker (the worker normally exits with code 3 first).
DRAIN_GRACE = 15.0
NO_LIMIT = 10 * 365 * 86400.0
#: Seconds :meth:`UploadWorker.drain` waits, before SIGTERM, for the worker to be up
#: and to have accepted every checkpoint complete on disk (SIGTERM ends intake).
INTAKE_WAIT = 60.0
STATUS_FILE = ".ckpt-uploader.status.json"
LOG_FILE = ".ckpt-uploader.log"


class WorkerError(UploaderError):
    """The upload worker crashed, or could not upload and verify a checkpoint.

    ``worker_exit_code`` is the worker's exit status (None while it still runs),
    ``last_error`` its own reason (secrets removed), ``status`` its last status.
    """

    def __init__(
        self,
        message: str,
        *,
        exit_code: int | None = None,
        last_error: str | None = None,
        status: StatusReport | None = None,
    ) -> None:
        super().__init__(redact(message))
        self.worker_exit_code = exit_code
        self.last_error = redact(last_error) if last_error else None
        self.status = status


def default_state_dir(run_dir: str | os.PathLike[str]) -> Path:
    """Where the worker keeps its journal, status file and log for ``run_dir``.

    The run directory itself, as for ``ckpt-uploader watch``: the files are
    hidden (``.ckpt-uploader.*``) and the watcher never uploads them, and
    ``ckpt-uploader status RUN_DIR`` finds the journal without further flags.
    """
    return Path(run_dir).absolute()


def hparams_args(hp: ObjectStoreHparams) -> list[str]:
    """Command-line flags for ``hp``: environment variable names, never values."""
    args = ["--provider", hp.provider, "--container", hp.container]
    if hp.key_environ:
        args += ["--key-environ", hp.key_environ]
    if hp.secret_environ:
        args += ["--secret-environ", hp.secret_environ]
    if hp.host:
        args += ["--host", hp.host]
    if hp.port is not None:
        args += ["--port", str(hp.port)]
    if hp.region:
        args += ["--region", hp.region]
    if hp.extra_init_kwargs:
        args += ["--extra-init-kwargs", json.dumps(hp.extra_init_kwargs, sort_keys=True)]
    return args


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
    create_container: bool
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
            after the parent is gone) before it gives up with exit code 3.
            None: no limit.
        keep_local: keep only the newest N verified checkpoints on local disk.
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
        drain_timeout: float | None = 3600.0,
        keep_local: int | None = None,
        create_container: bool = False,
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
        if to is not None:
            # Parse now, so a malformed URI fails here and not in the child.
            self.location_hparams = parse_uri(to).hparams
        else:
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
        self.run_dir = Path(run_dir).absolute()
        self.hparams = hparams
        self.to = to
        self.prefix = prefix.strip("/")
        self.rank = int(rank)
        self.state_dir = (
            Path(state_dir).absolute() if state_dir else default_state_dir(self.run_dir)
        )
        self.parent_pid = os.getpid() if parent_pid == -1 else parent_pid
        self.drain_timeout = drain_timeout
        self.keep_local = keep_local
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
        self._last_read = 0.0
        self._last_mtime: int | None = None
        self._status: StatusReport | None = None
        self._draining = False
        self._result: int | None = None

    # -- command and environment ----------------------------------------------------------
    def command(self) -> list[str]:
        """The worker's argv. Holds environment variable names, never credentials."""
        # -P (Python 3.11+): a folder or file named "uploader" in the current
        # directory must not shadow the installed package.
        safe_path = ["-P"] if sys.version_info >= (3, 11) else []
        cmd = [self.python, *safe_path, "-m", "uploader", "watch", str(self.run_dir)]
        if self.to is not None:
            cmd += ["--to", self.to]
        else:
            assert self.hparams is not None
            cmd += hparams_args(self.hparams)
        if self.prefix:
            cmd += ["--prefix", self.prefix]
        cmd += ["--rank", str(self.rank), "--state-dir", str(self.state_dir)]
        cmd += ["--status-file", str(self.status_path)]
        if self.parent_pid:
            cmd += ["--parent-pid", str(self.parent_pid)]
        # No limit: ten years stands for "as long as it takes".
        drain = self.drain_timeout if self.drain_timeout is not None else NO_LIMIT
        cmd += ["--drain-timeout", f"{drain:.10g}"]
        if self.keep_local is not None:
            cmd += ["--keep-local", str(self.keep_local)]
        if self.create_container:
            cmd.append("--create-container")
        cmd += ["--log-format", self.log_format]
        if self.verbosity < 0:
            cmd.append("-q")
        elif self.verbosity > 0:
            cmd.append("-v")
        return cmd + self.extra_args

    def environment(self) -> dict[str, str]:
        """This process's environment plus ``env``; checks the credential variables exist."""
        env = dict(os.environ)
        env.update(self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        hp = self.location_hparams
        for field_name in ("key_environ", "secret_environ"):
            var = getattr(hp, field_name)
            if var is None:
                continue
            if not env.get(var, "").strip():
                raise ConfigError(
                    f"environment variable {var} (named by {field_name}) is not set or "
                    f"empty; export it before training starts, e.g. export {var}=..."
                )
            register_secret(env[var])
        return env

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
                f"the upload worker for {self.run_dir} was already started (pid {self.proc.pid})"
            )
        env = self.environment()
        cmd = self.command()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # A status file left by an earlier worker must not be taken for this one's. A
        # fresh one holds a block the worker can overwrite in place if the disk fills.
        with contextlib.suppress(FileNotFoundError):
            self.status_path.unlink()
        StatusReport().write(self.status_path)
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
                f"could not start the upload worker ({exc}); check that {self.python} "
                "can run 'python -m uploader'"
            ) from None
        log.info(
            "upload worker pid %d watching %s (rank %d, log %s)",
            self.proc.pid,
            self.run_dir,
            self.rank,
            self.log_path or "stderr",
        )
        return self

    def status(self, fresh: bool = False) -> StatusReport | None:
        """The worker's last status; read again at most once per ``check_interval``."""
        now = time.monotonic()
        if fresh or now - self._last_read >= self.check_interval:
            self._last_read = now
            try:
                mtime = os.stat(self.status_path).st_mtime_ns
            except OSError:
                mtime = None
            if mtime is not None and (fresh or mtime != self._last_mtime):
                st = StatusReport.read(self.status_path)
                if st is not None:
                    self._status = st
                    self._last_mtime = mtime
        return self._status

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
            raise UploaderError("the upload worker was never started; call start() first")
        self._draining = True
        if timeout is None and self.drain_timeout is not None:
            timeout = self.drain_timeout + DRAIN_GRACE
        deadline = None if timeout is None else time.monotonic() + timeout
        if self.proc.poll() is None:
            # SIGTERM ends intake: first let the worker come up and accept every
            # checkpoint already complete on disk, so the drain includes them all.
            self._await_intake(deadline)
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
        bar = _DrainBar(progress, self.rank)
        code: int | None = None
        try:
            while True:
                try:
                    code = self.proc.wait(timeout=0.25)
                    break
                except subprocess.TimeoutExpired:
                    pass
                st = self.status()
                if st is not None:
                    bar.show(st)
                if deadline is not None and time.monotonic() >= deadline:
                    break
        finally:
            bar.close()
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
        if code != 0:
            raise self._error(code, st, "did not upload every checkpoint")
        if st is not None and (st.failed > 0 or st.outstanding > 0):
            raise self._error(code, st, "exited with checkpoints not verified")
        # The journal is the second witness, unless the worker could not save it (its
        # disk is full): then the worker's final status is the only record.
        missing = self.unverified() if st is None or st.journal_saved else []
        if st is not None and not st.journal_saved:
            log.warning(
                "the upload worker could not save its journal %s (disk full); its final "
                "status reports %d file(s) verified",
                self.state_dir,
                st.done,
            )
        if missing:
            shown = ", ".join(missing[:5]) + (
                f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            )
            raise self._error(code, st, f"exited without uploading {shown}")
        log.info(
            "upload worker pid %d finished: %s",
            self.proc.pid,
            f"{st.done} file(s) verified" if st is not None else "exit 0",
        )
        return st

    # -- what the journal holds -----------------------------------------------------------
    def _journal_view(self, want_done: bool) -> list[str]:
        """Files complete on disk that the journal lacks (or has not verified, with
        ``want_done``), for the default checkpoint patterns. Best effort: [] on errors."""
        from uploader.daemon.layouts import FileFilter, scan

        root = Path(os.path.realpath(self.run_dir))
        patterns = self._patterns()
        if patterns is None:
            return []  # the files are chosen by a config file: do not second-guess it
        include, exclude = patterns
        filt = FileFilter(include=include or FileFilter().include, exclude=exclude)
        try:
            files = list(scan(root, filt))
        except OSError:
            return []
        if not files:
            return []
        if not journal_path(self.state_dir).exists():
            return files
        out: list[str] = []
        try:
            with Journal.open_readonly(self.state_dir) as journal:
                for rel in files:
                    try:
                        st = os.lstat(root / rel)
                    except OSError:
                        continue  # deleted meanwhile (e.g. local retention)
                    rec = journal.get(rel)
                    current = rec is not None and (rec.size, rec.mtime_ns) == (
                        st.st_size,
                        st.st_mtime_ns,
                    )
                    if not current or (want_done and rec is not None and rec.state != "done"):
                        out.append(rel)
        except Exception as exc:  # sqlite busy, schema changing under us: do not guess
            log.debug("cannot read the journal in %s: %s", self.state_dir, exc)
            return []
        return out

    def _patterns(self) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
        """``--include`` / ``--exclude`` patterns from ``extra_args``; None with ``--config``."""
        found: dict[str, list[str]] = {"--include": [], "--exclude": []}
        args = list(self.extra_args)
        for i, arg in enumerate(args):
            if arg == "--config" or arg.startswith("--config="):
                return None
            for flag, into in found.items():
                if arg == flag and i + 1 < len(args):
                    into.append(args[i + 1])
                elif arg.startswith(flag + "="):
                    into.append(arg.split("=", 1)[1])
        return tuple(found["--include"]), tuple(found["--exclude"])

    def unaccepted(self) -> list[str]:
        """Checkpoint files complete on disk that the worker has not accepted yet."""
        return self._journal_view(want_done=False)

    def unverified(self) -> list[str]:
        """Checkpoint files on disk whose current version is not verified in the store."""
        return self._journal_view(want_done=True)

    def _await_intake(self, deadline: float | None) -> None:
        """Wait (bounded) until the worker runs and has accepted every complete file."""
        assert self.proc is not None
        limit = time.monotonic() + INTAKE_WAIT
        if deadline is not None:
            limit = min(limit, deadline)
        while self.proc.poll() is None and time.monotonic() < limit:
            st = self.status(fresh=True)
            # A journal held in memory (disk full) lags behind: nothing to compare with.
            if (
                st is not None
                and st.state != "starting"
                and (not st.journal_saved or not self.unaccepted())
            ):
                return
            time.sleep(0.1)
        if self.proc.poll() is None:
            log.warning(
                "the upload worker has not accepted every checkpoint within %.0f s; "
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
        """Second SIGTERM (the worker stops, exit 143), then SIGKILL."""
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

    # -- errors ---------------------------------------------------------------------------
    def _error(self, code: int | None, st: StatusReport | None, what: str) -> WorkerError:
        pid = self.proc.pid if self.proc is not None else "?"
        parts = [f"the checkpoint upload worker for rank {self.rank} (pid {pid}) {what}"]
        if code is not None:
            if code < 0:
                parts.append(f"it was killed by signal {-code}")
            else:
                parts.append(f"exit code {code}: {ExitCode.describe(code)}")
        last = st.last_error if st is not None else None
        if last:
            parts.append(f"reason: {last}")
        elif self.log_path is not None:
            tail = _tail(self.log_path)
            if tail:
                parts.append(f"last log lines: {tail}")
        if st is not None and (st.outstanding or st.failed):
            parts.append(
                f"{st.failed} failed, {st.outstanding} not yet uploaded, {st.done} verified"
            )
        parts.append(f"its log: {self.log_path}" if self.log_path else "its log went to stderr")
        if code == ExitCode.CONFIG:
            parts.append("fix the setting named above and start again")
        else:
            parts.append(
                f"nothing accepted is lost: the journal in {self.state_dir} keeps it, and "
                f"'ckpt-uploader watch {self.run_dir} ... --state-dir {self.state_dir} "
                "--exit-when-idle' finishes the uploads once the cause is fixed"
            )
        return WorkerError("; ".join(parts) + ".", exit_code=code, last_error=last, status=st)


def _tail(path: Path, lines: int = 5, limit: int = 4096) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    kept = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in kept if " ERROR " in ln or "Error" in ln]
    kept = (errors or kept)[-lines:]
    return redact(" | ".join(kept))


class _DrainBar:
    """A tqdm bar of bytes uploaded while draining; silent when disabled."""

    def __init__(self, enabled: bool, rank: int) -> None:
        self.enabled = enabled
        self.rank = rank
        self.bar: Any = None

    def show(self, st: StatusReport) -> None:
        if not self.enabled or (self.bar is None and st.bytes_total <= 0):
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(
                total=max(st.bytes_total, 1),
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=f"uploading rank_{self.rank}",
                leave=False,
                dynamic_ncols=True,
            )
        if st.bytes_total and st.bytes_total != self.bar.total:
            self.bar.total = st.bytes_total
        self.bar.n = min(st.bytes_done, self.bar.total)
        self.bar.set_postfix_str(f"{st.outstanding} file(s) left", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
