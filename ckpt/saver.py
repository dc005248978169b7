"""CheckpointSaver: atomic, asynchronous checkpoint writes.

A save first copies the state to CPU memory (the only time the training loop is
blocked), then encodes, compresses and writes it in a background thread. The
file is written to a hidden temporary name (``.ep1.pt.tmp``) that the uploader
ignores, fsynced, renamed to its final name, and the folder is fsynced, so a
watcher never sees a partial checkpoint.

At most one save is in flight: the next save waits for the previous one (a
checkpoint is never dropped). A failure in the background is raised in the
training loop at its next :meth:`poll`, :meth:`save` or :meth:`wait`.

Example::

    saver = CheckpointSaver("/data/ckpts", save_interval="1ep", compression="zstd")
    saver.save(state_dict, saver.filename(epoch=1, batch=0, unit="ep"))  # ep1.pt.zst
    saver.wait()                    # the file is on disk
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from uploader.transfer.files import fsync_dir

from .codecs import compressing_writer, extension_for, normalize_codec
from .errors import CheckpointError
from .interval import Interval, parse_interval
from .state import snapshot

__all__ = ["CheckpointSaver", "write_checkpoint", "temp_name"]

log = logging.getLogger("ckpt.saver")


def temp_name(path: Path) -> Path:
    """The hidden name a checkpoint is written under before its rename."""
    return path.parent / f".{path.name}.tmp"


def write_checkpoint(
    obj: Any, path: str | os.PathLike[str], compression: str | None = None, threads: int = 0
) -> Path:
    """Write ``obj`` with ``torch.save`` to ``path`` atomically (temp name, fsync, rename)."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(final)
    codec = normalize_codec(compression)
    try:
        # torch.save writes through Python file objects here (not its own C++ file
        # writer, which holds the interpreter lock for whole tensors), so a background
        # write leaves the training thread free to run between slices.
        with open(tmp, "wb", buffering=0) as raw:
            with compressing_writer(raw, codec, threads) as w:
                torch.save(obj, w)
            os.fsync(raw.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(final.parent)
    return final


def write_failed(exc: BaseException, folder: Path, how: str = "") -> CheckpointError:
    """A CheckpointError that names the cause of a failed write, a full disk above all.

    torch reports a short write as ``RuntimeError: ... unexpected pos ...`` rather than
    ENOSPC; the free space of the folder's disk tells the two apart.
    """
    detail = f"{type(exc).__name__}: {exc}"
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = -1
    full = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or (
        "unexpected pos" in str(exc) or "file write failed" in str(exc)
    )
    if full:
        room = f" ({free / 2**20:.1f} MiB free now)" if free >= 0 else ""
        return CheckpointError(
            f"writing a checkpoint {how}failed: the disk holding {folder} is full{room} "
            f"[{detail}]. Free space there or point save_folder at a larger disk; training "
            "stopped so no checkpoint is lost silently (checkpoints already saved are intact)"
        )
    return CheckpointError(
        f"writing a checkpoint {how}failed: {detail}. Check free space and permissions of "
        f"{folder}; training stopped so no checkpoint is lost silently"
    )


class CheckpointSaver:
    """Decides when to save and writes checkpoints into ``checkpoint_folder``.

    Args:
        checkpoint_folder: where files go (created when missing).
        save_interval: ``"10ep"``, ``"500ba"``, or an integer (epochs).
        compression: None / ``""``, ``"zstd"``, ``"gzip"``, ``"bzip2"`` or ``"lzma"``.
        async_save: encode and write in a background thread (default); False
            writes in the caller.
        compression_threads: zstd worker threads (0: half the cores, at most 4).

    Example::

        saver = CheckpointSaver(Path("ckpts"), "500ba", compression="zstd")
        if saver.should_save(timer.epoch, timer.batch, "batch"):
            # a callable is called after the previous save finished, then copied to CPU
            saver.save(state.checkpoint, saver.filename(timer.epoch, timer.batch, "ba"))
    """

    def __init__(
        self,
        checkpoint_folder: str | os.PathLike[str],
        save_interval: str | int | Interval = "1ep",
        compression: str | None = None,
        async_save: bool = True,
        compression_threads: int = 0,
    ) -> None:
        self.checkpoint_folder = Path(checkpoint_folder)
        self.save_interval = parse_interval(save_interval)
        self.compression = normalize_codec(compression)
        self.async_save = async_save
        self.compression_threads = compression_threads
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._completed: list[Path] = []
        self._lock = threading.Lock()
        self.saved: list[Path] = []
        #: Seconds the caller was blocked by each save (snapshot plus waiting for the previous one).
        self.blocked_seconds: list[float] = []

    # -- policy -----------------------------------------------------------------------------
    def should_save(self, epoch: int, batch: int, event: str) -> bool:
        """True at ``event`` ("batch" or "epoch") when the interval is due."""
        iv = self.save_interval
        if event == "batch" and iv.unit == "ba":
            return batch > 0 and batch % iv.value == 0
        if event == "epoch" and iv.unit == "ep":
            return epoch > 0 and epoch % iv.value == 0
        return False

    def filename(self, epoch: int, batch: int, unit: str) -> str:
        stem = f"ep{epoch}" if unit == "ep" else f"ba{batch}"
        return stem + extension_for(self.compression)

    # -- saving -----------------------------------------------------------------------------
    def save(self, state: Any | Callable[[], Any], filename: str) -> Path:
        """Save ``state`` (or the result of calling it) as ``checkpoint_folder/filename``.

        Returns the final path; with ``async_save`` the file appears there later
        (see :meth:`poll` and :meth:`wait`).
        """
        start = time.perf_counter()
        self._join()  # at most one save in flight; raises a previous failure
        obj = state() if callable(state) else state
        path = self.checkpoint_folder / filename
        self.checkpoint_folder.mkdir(parents=True, exist_ok=True)
        if not self.async_save:
            snapshot(obj, copy=False)  # refuse what weights_only loading would refuse
            try:
                write_checkpoint(obj, path, self.compression, self.compression_threads)
            except OSError as exc:
                raise write_failed(exc, self.checkpoint_folder) from exc
            except RuntimeError as exc:  # torch reports a short write this way
                raise write_failed(exc, self.checkpoint_folder) from exc
            self.blocked_seconds.append(time.perf_counter() - start)
            with self._lock:
                self._completed.append(path)
            self.saved.append(path)
            return path
        copy = snapshot(obj)
        del obj
        go = threading.Event()
        self._thread = threading.Thread(
            target=self._background, args=(copy, path, go), name=f"ckpt-save-{filename}"
        )
        self._thread.start()
        # The writer starts only once the caller is back to training, so it cannot hold
        # the interpreter lock while the caller is still returning from this call.
        go.set()
        self.blocked_seconds.append(time.perf_counter() - start)
        return path

    def _background(self, obj: Any, path: Path, go: threading.Event) -> None:
        go.wait()
        try:
            t0 = time.perf_counter()
            write_checkpoint(obj, path, self.compression, self.compression_threads)
            log.info("wrote %s in %.2fs", path, time.perf_counter() - t0)
            with self._lock:
                self._completed.append(path)
            self.saved.append(path)
        except BaseException as exc:  # re-raised in the training loop
            log.error("writing %s failed: %s", path, exc)
            self._error = exc

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            exc, self._error = self._error, None
            raise write_failed(exc, self.checkpoint_folder, "in the background ") from exc

    def poll(self) -> list[Path]:
        """Paths written since the last call; raises a background failure."""
        if self._thread is not None and not self._thread.is_alive():
            self._thread.join()
            self._thread = None
        self._raise()
        with self._lock:
            done, self._completed = self._completed, []
        return done

    def wait(self) -> list[Path]:
        """Block until the last write is on disk; return the paths written since the last poll."""
        self._join()
        return self.poll()

    @property
    def in_flight(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
