"""How watch events reach the loop: posted without waiting while the event stream has
room, through a blocking send once it is full; either way every renamed file is taken
exactly once (watchdog itself may reorder moves, so the order is not checked)."""

from __future__ import annotations

from pathlib import Path

import anyio

from tests.daemon.test_intake import make_intake, rename_in
from uploader.daemon.intake import Found


def run_renames(tmp_path: Path, buffer: int, delay: float) -> tuple[list[str], list[str], int]:
    root = tmp_path / "run"
    root.mkdir()
    names = [f"ep{i:03d}.pt" for i in range(40)]
    taken: list[str] = []
    waited = 0

    async def take(found: Found) -> None:
        nonlocal waited
        await anyio.sleep(delay)
        waited = max(waited, intake._send.statistics().tasks_waiting_send)
        taken.extend(rel for rel, _ in found)

    intake = make_intake(root, take, buffer)

    async def main() -> None:
        async def nothing() -> None:
            pass

        async with anyio.create_task_group() as tg:
            await tg.start(intake.run, nothing)
            # The startup scan is over before the renames: a file both scanned and
            # reported moved may reach ``take`` twice (the engine's journal keeps one:
            # same version), and this test is about the events alone.
            with anyio.fail_after(30):
                while not intake.scanned:
                    await anyio.sleep(0.01)
            await anyio.to_thread.run_sync(rename_in, root, names)
            with anyio.fail_after(30):
                while len(taken) < len(names):
                    await anyio.sleep(0.05)
            await anyio.sleep(0.2)  # a duplicate would arrive meanwhile
            await intake.stop(final=False)

    anyio.run(main)
    return names, taken, waited


def test_with_room_every_file_is_taken_once_and_nothing_waits(tmp_path: Path) -> None:
    names, taken, waited = run_renames(tmp_path, buffer=1024, delay=0.0)
    assert sorted(taken) == names  # none lost, none twice
    assert waited == 0  # the stream never filled: every event was posted


def test_a_full_stream_still_takes_every_file_once(tmp_path: Path) -> None:
    names, taken, waited = run_renames(tmp_path, buffer=2, delay=0.01)
    assert sorted(taken) == names  # none lost, none twice
    assert waited >= 1  # some events did wait for room (the blocking send)
