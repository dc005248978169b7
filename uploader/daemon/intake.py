"""Intake: from the run directory to complete files, handed to the engine in batches.

Three sources feed one :class:`~uploader.daemon.settle.Settler`:

* the watchdog observer thread (:class:`Watcher`), whose events enter the event
  loop into a bounded stream: while the stream has room, an event is posted
  without waiting for the loop (``call_soon_threadsafe``: the observer thread does
  not wake up again in the middle of the loop's work on that event); a full stream
  blocks the observer thread (``anyio.from_thread.run``; back-pressure, events
  wait in watchdog's own queue, none is dropped) until :class:`Intake` reads on;
* the start-up scan (after the engine has resumed the journal), and a scan of
  every directory that appears later;
* at the end, a final scan (a checkpoint renamed into place just before a signal,
  or before the parent process exited, is part of the drain).

:class:`Intake` stats the files the settler tracks (it does the filesystem calls
the settler does not) and hands each complete file to the engine's ``take``.
:func:`watch_parent` finishes the run when the parent process (``--parent-pid``)
is gone.

Example::

    intake = Intake(layout, filt, Settler(1.0, 30.0), watch=True, take=take, fresh=fresh)
    await task_group.start(intake.run, resume)   # ready once the watcher runs
    ...
    await intake.stop(final=True)                # run() returns once all is settled
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
from anyio.abc import TaskStatus

from uploader.daemon.layouts import FileFilter, RunLayout, is_inside, scan
from uploader.daemon.settle import Settler, Verdict

__all__ = [
    "Intake",
    "Watcher",
    "watch_parent",
    "open_for_writing",
    "ignore_lease_breaks",
    "EVENT_BUFFER",
]

log = logging.getLogger(__name__)

#: Watch events held between the observer thread and the intake (then it waits).
EVENT_BUFFER = 1024
#: Files left out that are remembered (for status); more are counted, not named.
LEFT_OUT_LIMIT = 1000

Found = list[tuple[str, os.stat_result]]
#: Callback kinds: "moved" (renamed into place: complete now), "created", "modified",
#: "closed" (closed after writing), "dirmoved" / "dircreated" (a directory appeared: scan it).
EventFn = Callable[[str, str], None]


class Watcher:
    """Recursive watchdog observer forwarding file events to ``notify(kind, abs_path)``.

    ``notify`` runs on the observer thread; it may block (back-pressure).
    """

    def __init__(self, root: os.PathLike[str], notify: EventFn) -> None:
        from watchdog.events import (
            DirCreatedEvent,
            DirMovedEvent,
            FileClosedEvent,
            FileCreatedEvent,
            FileModifiedEvent,
            FileMovedEvent,
            FileSystemEvent,
            FileSystemEventHandler,
        )
        from watchdog.observers import Observer

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                try:
                    if isinstance(event, FileMovedEvent):
                        if event.dest_path:
                            notify("moved", os.fsdecode(event.dest_path))
                    elif isinstance(event, FileClosedEvent):
                        notify("closed", os.fsdecode(event.src_path))
                    elif isinstance(event, FileCreatedEvent):
                        notify("created", os.fsdecode(event.src_path))
                    elif isinstance(event, FileModifiedEvent):
                        notify("modified", os.fsdecode(event.src_path))
                    elif isinstance(event, DirMovedEvent):
                        if event.dest_path:
                            notify("dirmoved", os.fsdecode(event.dest_path))
                    elif isinstance(event, DirCreatedEvent):
                        notify("dircreated", os.fsdecode(event.src_path))
                except Exception:  # the intake is over; never kill the observer
                    log.debug("event dropped during shutdown: %r", event)

        filters: list[type[Any]] = [
            FileMovedEvent,
            FileClosedEvent,
            FileCreatedEvent,
            FileModifiedEvent,
            DirMovedEvent,
            DirCreatedEvent,
        ]
        self._observer = _observer(Observer)
        self._observer.daemon = True
        self._observer.schedule(Handler(), os.fspath(root), recursive=True, event_filter=filters)

    def start(self) -> None:
        self._observer.start()

    def stop(self, join: bool = True) -> None:
        """Stop watching; ``join`` waits (up to 5 s) for the observer thread to end.

        Blocks while the observer thread is delivering an event (watchdog holds a lock
        meanwhile): call it off the event loop the events are delivered to."""
        if self._observer.is_alive():
            self._observer.stop()
            if join:
                self._observer.join(timeout=5)


class Intake:
    """Watch events and scans -> settling -> ``take(rel, stat)`` for each complete file.

    Args:
        layout: the run directory.
        filt: which files are considered.
        settler: the settling rules (its ``final`` flag is set here at the end).
        watch: start a :class:`Watcher` (False: scans only).
        take: accept complete files, in order (the engine records them in one journal
            call and queues their uploads).
        fresh: of scanned files, those whose version the journal does not hold yet.
        buffer: watch events held before the observer thread waits.
        is_artifact: whether a file belongs to no checkpoint (asked when it is first
            seen): such a file is taken as a snapshot (see :class:`Settler`).
        link: called with each symlink found: None when taken as an alias, else why
            it is left out.
    """

    def __init__(
        self,
        layout: RunLayout,
        filt: FileFilter,
        settler: Settler,
        watch: bool,
        take: Callable[[Found], Awaitable[None]],
        fresh: Callable[[Found], Awaitable[Found]],
        buffer: int = EVENT_BUFFER,
        is_artifact: Callable[[str], bool] = lambda rel: False,
        link: Callable[[str], str | None] = lambda rel: "symlink (not followed)",
    ) -> None:
        self.layout = layout
        self._is_artifact = is_artifact
        self._link = link
        #: Files in RUN_DIR that are not uploaded: rel -> why (at most LEFT_OUT_LIMIT).
        self.left_out: dict[str, str] = {}
        self.root = layout.root
        self.filt = filt
        self.settler = settler
        self._watch = watch
        self._take = take
        self._fresh = fresh
        self._send, self._recv = anyio.create_memory_object_stream[tuple[str, str]](buffer)
        self._unread = 0  # events entered into the loop and not yet handled
        self._buffer = buffer
        # Events the observer thread posted and the intake has not read yet (fast posts
        # are made only while this is below ``buffer``: they always find room).
        self._posted = 0
        self._posted_lock = threading.Lock()
        self._handing = 0  # batches of complete files being handed to ``take``
        self._wake = anyio.Event()
        self._watcher: Watcher | None = None
        self.scanned = False
        self._snapshots: set[str] = set()
        # Files taken when renamed into place, by (size, mtime): a later "modified" event
        # with the same stat is an attribute change (fsspec chmods after its rename), not
        # a write, and does not make the file wait for a close event that never comes.
        self._renamed: dict[str, tuple[int, int]] = {}
        self._stopping = False
        self._events_over = False

    @property
    def quiet(self) -> bool:
        """Start-up scan done, nothing settling, no watch event unread."""
        return self.scanned and not self.settler and not self._unread and not self._handing

    def __len__(self) -> int:
        """Files settling."""
        return len(self.settler)

    async def run(
        self,
        before_scan: Callable[[], Awaitable[None]],
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Watch (ready once the watcher runs), await ``before_scan`` (the engine resumes
        the journal), scan, and settle, until :meth:`stop` and everything is settled."""
        if self._watch:
            token = anyio.lowlevel.current_token()
            post = _poster()

            def notify(kind: str, path: str) -> None:  # on the observer thread
                with self._posted_lock:
                    room = self._posted < self._buffer
                    self._posted += 1
                if room and post is not None:
                    post(self._post, (kind, path))
                    return
                anyio.from_thread.run(self._deliver, (kind, path), token=token)

            self._watcher = Watcher(self.root, notify)
            self._watcher.start()
        task_status.started()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._event_loop)
                tg.start_soon(self._settle_loop)
                await before_scan()
                await self._scan("", "scan")
                self.scanned = True
                self._wake.set()
        finally:
            self._recv.close()  # releases an observer thread blocked on a full stream
            if self._watcher is not None:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(self._watcher.stop)

    async def stop(self, final: bool) -> None:
        """No more events (later ones are dropped); ``final`` also takes files written in
        place without their close event, and scans once more for files complete on disk.

        The watcher itself is stopped when :meth:`run` ends, in a worker thread: never on
        the event loop, since watchdog holds a lock while its thread waits on the loop.
        """
        if final:
            await self.finish_scan()
        self._stopping = True  # from here, the settle loop ends once nothing is left
        self._send.close()  # the event loop ends once it has read what was sent
        self._wake.set()

    async def finish_scan(self) -> None:
        """Take every file complete on disk now, closed or not (see :attr:`Settler.final`)."""
        self.settler.final = True
        await self._scan("", "scan")
        self._wake.set()

    def _read_one(self) -> None:
        with self._posted_lock:
            self._posted -= 1

    def _post(self, event: tuple[str, str]) -> None:
        """On the loop, for an event posted while the stream had room."""
        self._unread += 1
        try:
            self._send.send_nowait(event)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._unread -= 1
            self._read_one()
            log.debug("event dropped after the intake stopped: %r", event)

    async def _deliver(self, event: tuple[str, str]) -> None:
        self._unread += 1
        try:
            await self._send.send(event)  # waits while the stream is full
        except BaseException:
            self._unread -= 1
            self._read_one()
            raise

    async def _event_loop(self) -> None:
        async with self._recv:
            async for kind, path in self._recv:
                self._read_one()
                try:
                    await self._on_event(kind, path)
                finally:
                    self._unread -= 1
        self._events_over = True
        self._wake.set()

    async def _on_event(self, kind: str, path: str) -> None:
        rel = self.layout.relative(path)
        if rel is None:
            return
        if kind in ("dirmoved", "dircreated"):
            await self._scan(rel, "moved" if kind == "dirmoved" else "created")
            return
        why = self.filt.exclusion(rel)
        if why is not None:
            if why:
                self._leave_out(rel, why)
            return
        st = is_inside(self.root, rel)
        if st is None and kind in ("moved", "created") and os.path.islink(path):
            self._linked(rel)
            return
        renamed = self._renamed.pop(rel, None)
        if kind == "moved":
            self.settler.drop(rel)
            if st is not None:
                if len(self._renamed) >= LEFT_OUT_LIMIT:
                    self._renamed.clear()  # a bound; at worst a file waits for a close
                self._renamed[rel] = _key(st)
                await self._hand([(rel, st)])
            return
        if (
            kind == "modified"
            and renamed is not None
            and st is not None
            and _key(st) == renamed
            and rel not in self.settler
        ):
            self._renamed[rel] = renamed  # attributes only: the data taken is unchanged
            return
        self._observe(rel, kind, st)

    async def _hand(self, found: Found) -> None:
        self._handing += 1
        try:
            await self._take(found)
        finally:
            self._handing -= 1

    def _leave_out(self, rel: str, why: str) -> None:
        if rel in self.left_out or len(self.left_out) < LEFT_OUT_LIMIT:
            self.left_out[rel] = why

    def _linked(self, rel: str) -> None:
        why = self._link(rel)
        if why:
            self._leave_out(rel, why)
        else:
            self.left_out.pop(rel, None)

    def prune_left_out(self) -> None:
        """Forget left-out files that are gone (temporary files renamed into place)."""
        for rel in list(self.left_out):
            if not os.path.lexists(self.root / rel.rstrip("/")):
                self.left_out.pop(rel, None)

    def _observe(self, rel: str, kind: str, st: os.stat_result | None) -> None:
        if st is None:
            self.settler.drop(rel)
            return
        snapshot = rel not in self.settler and self._is_artifact(rel)
        if snapshot:
            self._snapshots.add(rel)
        self.settler.observe(rel, kind, st.st_size, st.st_mtime_ns, snapshot)
        self._wake.set()

    async def _scan(self, sub: str, kind: str) -> None:
        links: list[str] = []
        left_out: dict[str, str] = {}

        def listing() -> Found:
            found = []
            for rel in scan(self.root, self.filt, sub, left_out, links):
                st = is_inside(self.root, rel)
                if st is not None:
                    found.append((rel, st))
            return found

        found = await anyio.to_thread.run_sync(listing)
        for rel, why in left_out.items():
            self._leave_out(rel, why)
        for rel in links:
            self._linked(rel)
        if kind == "scan":
            found = await self._fresh(found)
        for rel, st in found:
            self._observe(rel, kind, st)

    async def _settle_loop(self) -> None:
        tick = max(0.02, min(0.1, self.settler.settle / 4))
        while True:
            if not self.settler:
                if self._stopping and self._events_over and self.scanned:
                    return
                await self._wake.wait()
                self._wake = anyio.Event()
                continue
            await anyio.sleep(tick)
            complete: Found = []
            self._handing += 1  # taken from the settler, not yet handed over
            try:
                for rel in self.settler.paths():
                    st = is_inside(self.root, rel)
                    verdict = self.settler.check(rel, None if st is None else _key(st))
                    if verdict is Verdict.QUIET:
                        # A writer is asked about for checkpoint files only: an artifact
                        # (a log held open) is taken as it is, and again when it changes.
                        writing = (
                            False if rel in self._snapshots else open_for_writing(self.root / rel)
                        )
                        verdict = self.settler.writer(rel, writing)
                        if verdict is Verdict.HELD:
                            # Quiet, but a writer still holds it open (one that started
                            # before this daemon, say): wait for it to close, or for
                            # --open-timeout.
                            log.info("path=%s is quiet but still open for writing; waiting", rel)
                    if verdict in (Verdict.DONE, Verdict.GONE):
                        self._snapshots.discard(rel)
                    if verdict is Verdict.DONE and st is not None:
                        complete.append((rel, st))
                if complete:
                    await self._hand(complete)
            finally:
                self._handing -= 1


def _observer(default: Callable[[], Any]) -> Any:
    """An observer that reports a file renamed in from outside the watched tree as moved
    (inotify's full events: complete at once, as a rename inside it), not as created; on
    platforms without inotify, watchdog's default observer."""
    try:
        from watchdog.observers.inotify import InotifyObserver
    except ImportError:
        return default()
    try:
        return InotifyObserver(generate_full_events=True)
    except Exception:
        return default()


def _poster() -> Callable[[Callable[[tuple[str, str]], None], tuple[str, str]], Any] | None:
    """``call_soon_threadsafe`` of the running asyncio event loop (None on another backend:
    every event then goes through ``anyio.from_thread.run``)."""
    try:
        return asyncio.get_running_loop().call_soon_threadsafe
    except RuntimeError:
        return None


def _key(st: os.stat_result) -> tuple[int, int]:
    return (st.st_size, st.st_mtime_ns)


async def watch_parent(
    pid: int, intake: Intake, idle: Callable[[], bool], stop: Callable[[str], None]
) -> None:
    """When process ``pid`` is gone: take every complete file, finish, and ``stop("parent")``."""
    while _alive(pid):
        await anyio.sleep(0.5)
    log.info("parent process %d is gone; finishing accepted and complete files", pid)
    await intake.finish_scan()
    intake.scanned = True
    quiet = 0
    while quiet < 3:
        await anyio.sleep(0.1)
        quiet = quiet + 1 if idle() else 0
    stop("parent")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


# -- is a writer still at work? ----------------------------------------------------------
# Linux grants a read lease on a file only when no process has it open for writing,
# whatever process, container or mount namespace that writer lives in. Taking one and
# releasing it at once tells whether a file that looks quiet is really finished, e.g.
# one a slow writer started before the daemon (whose close event would come later).
if sys.platform == "linux":
    import fcntl

    _F_SETLEASE: int | None = getattr(fcntl, "F_SETLEASE", 1024)
else:  # pragma: no cover
    _F_SETLEASE = None
_probe_ready = False


def ignore_lease_breaks() -> bool:
    """Let :func:`open_for_writing` work in this process: a writer opening the file in
    the microseconds the lease is held sends SIGIO, whose default action ends a process.
    Must be called from the main thread; True when the probe is available."""
    global _probe_ready
    if _F_SETLEASE is None or threading.current_thread() is not threading.main_thread():
        return _probe_ready
    signal.signal(signal.SIGIO, signal.SIG_IGN)
    _probe_ready = True
    return True


def open_for_writing(path: str | os.PathLike[str]) -> bool | None:
    """True if some process has ``path`` open for writing, False if none has, None when
    this cannot be told here (not Linux, probe not enabled, another user's file, a
    filesystem without leases)."""
    if not _probe_ready or _F_SETLEASE is None:
        return None
    try:
        # O_NONBLOCK: never wait for another process's lease to be broken.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        return True if exc.errno in (errno.EAGAIN, errno.EBUSY) else None
    else:
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_UNLCK)
        return False
    finally:
        os.close(fd)
