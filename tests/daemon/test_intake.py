"""The intake in process, with a real watchdog observer on a temporary directory:
a stop releases a blocked observer thread, and ``quiet`` (what ``intake_finished``
reports) is exact. Back-pressure is in test_intake_posting."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import anyio
from watchdog.observers.api import BaseObserver

from uploader.daemon.intake import Found, Intake
from uploader.daemon.layouts import FileFilter, RunLayout
from uploader.daemon.settle import Settler


async def keep_all(found: Found) -> Found:
    return found


def make_intake(root: Path, take: object, buffer: int = 1024) -> Intake:
    return Intake(
        RunLayout(root, "p"),
        FileFilter(),
        Settler(0.05, 5.0),
        watch=True,
        take=take,  # type: ignore[arg-type]
        fresh=keep_all,
        buffer=buffer,
    )


def rename_in(root: Path, names: list[str]) -> None:
    staging = root / ".staging.tmp"  # watched, left out (a temporary name): renames are moves
    staging.mkdir(exist_ok=True)
    for name in names:
        (staging / name).write_bytes(b"x" * 10)
        os.rename(staging / name, root / name)


def test_stop_releases_an_observer_thread_blocked_on_a_full_stream(tmp_path: Path) -> None:
    root = tmp_path / "run"
    root.mkdir()
    stuck = threading.Event()

    async def take(found: Found) -> None:
        stuck.set()
        await anyio.sleep_forever()  # the work stream is full, say

    intake = make_intake(root, take, buffer=1)
    elapsed = 0.0

    async def main() -> None:
        nonlocal elapsed

        async def nothing() -> None:
            pass

        t0: float | None = None
        with anyio.move_on_after(30):
            async with anyio.create_task_group() as tg:
                await tg.start(intake.run, nothing)
                # A rename reaches the intake as a move, handed to ``take`` on the event
                # loop, which then stops reading; under load watchdog may report a rename as
                # a create instead (its move pairing has a deadline), so rename more files,
                # in bounded rounds, until the observer thread waits on the full stream.
                for batch in range(10):
                    names = [f"e{batch}-{i}.pt" for i in range(20)]
                    await anyio.to_thread.run_sync(rename_in, root, names)
                    for _ in range(100):
                        if intake._send.statistics().tasks_waiting_send and stuck.is_set():
                            break
                        await anyio.sleep(0.02)
                    else:
                        continue
                    break
                assert intake._send.statistics().tasks_waiting_send, "the stream never filled"
                assert stuck.is_set()
                t0 = time.monotonic()
                tg.cancel_scope.cancel()
        assert t0 is not None, "timed out before the stop"
        elapsed = time.monotonic() - t0

    anyio.run(main)
    # The watcher is joined with a 5 s timeout: a send left blocked would take that long.
    assert elapsed < 3.0
    assert not [t for t in threading.enumerate() if isinstance(t, BaseObserver) and t.is_alive()]


def test_quiet_only_after_the_scan_and_once_every_file_is_taken(tmp_path: Path) -> None:
    root = tmp_path / "run"
    root.mkdir()
    (root / "old.pt").write_bytes(b"old")
    taken: list[str] = []
    seen: list[tuple[str, bool]] = []

    async def take(found: Found) -> None:
        taken.extend(rel for rel, _ in found)

    intake = make_intake(root, take)

    async def main() -> None:
        gate = anyio.Event()

        async def resume() -> None:
            seen.append(("before scan", intake.quiet))
            await gate.wait()

        async with anyio.create_task_group() as tg:
            await tg.start(intake.run, resume)
            await anyio.sleep(0.2)
            seen.append(("resuming", intake.quiet))
            gate.set()
            with anyio.fail_after(10):
                while "old.pt" not in taken:
                    await anyio.sleep(0.01)
            await anyio.sleep(0.05)
            seen.append(("scanned", intake.quiet))
            with open(root / "new.pt", "wb") as f:  # written in place: settles after close
                f.write(b"new")
                f.flush()
                await anyio.sleep(0.3)
                seen.append(("open", intake.quiet))
            with anyio.fail_after(10):
                while "new.pt" not in taken:
                    await anyio.sleep(0.01)
            seen.append(("taken", intake.quiet))
            await intake.stop(final=False)

    anyio.run(main)
    assert seen == [
        ("before scan", False),
        ("resuming", False),
        ("scanned", True),
        ("open", False),
        ("taken", True),
    ]


def test_stop_while_the_observer_waits_on_the_loop_does_not_deadlock(tmp_path: Path) -> None:
    """watchdog holds a lock while its thread delivers an event; stopping the watcher on
    the event loop then would wait for that thread, which waits for the loop."""
    root = tmp_path / "run"
    root.mkdir()
    taken: list[str] = []

    async def take(found: Found) -> None:
        await anyio.sleep(0.2)
        taken.extend(rel for rel, _ in found)

    intake = make_intake(root, take, buffer=1)

    async def main() -> None:
        async def nothing() -> None:
            pass

        async with anyio.create_task_group() as tg:
            await tg.start(intake.run, nothing)
            await anyio.to_thread.run_sync(rename_in, root, [f"e{i}.pt" for i in range(6)])
            # stop while a file is being handed over and the observer waits on a full stream
            with anyio.fail_after(10):
                while not (
                    (taken or intake._handing) and intake._send.statistics().tasks_waiting_send
                ):
                    await anyio.sleep(0.01)
            await intake.stop(final=False)

    runner = threading.Thread(target=anyio.run, args=(main,), daemon=True)
    runner.start()
    runner.join(timeout=20)
    assert not runner.is_alive(), "the intake did not finish: stop() deadlocked"
    assert taken  # what was delivered before the stop is still taken


def test_a_file_renamed_in_from_outside_then_chmod_is_taken_at_once(tmp_path: Path) -> None:
    """fsspec's local write (Lightning's checkpoints): a temporary file outside the watched
    tree, renamed in, then chmod-ed. The rename makes it complete; the chmod (a modify
    event without a close) must not make it wait for ``open_timeout``."""
    root = tmp_path / "run"
    root.mkdir()
    outside = tmp_path / "tmp-elsewhere"
    outside.mkdir()
    taken: list[str] = []
    versions: dict[str, tuple[int, int]] = {}  # what the engine's journal would hold

    async def take(found: Found) -> None:
        taken.extend(rel for rel, _ in found)
        versions.update((rel, (st.st_size, st.st_mtime_ns)) for rel, st in found)

    async def fresh(found: Found) -> Found:
        return [(r, st) for r, st in found if versions.get(r) != (st.st_size, st.st_mtime_ns)]

    intake = make_intake(root, take)  # open_timeout 5 s
    intake._fresh = fresh
    quiet_after: list[bool] = []

    async def main() -> None:
        async def nothing() -> None:
            pass

        async with anyio.create_task_group() as tg:
            await tg.start(intake.run, nothing)
            await anyio.sleep(0.2)
            start = time.monotonic()
            src = outside / "epoch=0-step=8.ckpt"
            src.write_bytes(b"x" * 1000)
            os.rename(src, root / "epoch=0-step=8.ckpt")
            os.chmod(root / "epoch=0-step=8.ckpt", 0o644)
            with anyio.fail_after(3):  # well before open_timeout
                while "epoch=0-step=8.ckpt" not in taken:
                    await anyio.sleep(0.01)
            await anyio.sleep(0.3)
            quiet_after.append(intake.quiet)
            assert time.monotonic() - start < 3
            await intake.stop(final=False)

    anyio.run(main)
    assert taken == ["epoch=0-step=8.ckpt"]
    assert quiet_after == [True]  # the chmod left nothing waiting for a close
