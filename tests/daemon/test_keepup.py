"""The keeping-up policy (uploader.daemon.keepup.Backlog) with an injected clock."""

from __future__ import annotations

import pytest

from uploader.daemon.keepup import GATE_BYTES, Backlog, Ckpt
from uploader.daemon.reporter import lag_behind

MiB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def single(i: int, rank: int = 0) -> tuple[str, Ckpt]:
    rel = f"ckpt/ep{i:02d}.pt"
    return rel, Ckpt(rank, rel, rel)


def add_single(b: Backlog, clock: Clock, i: int, size: int = 8 * MiB) -> str:
    rel, ck = single(i)
    clock.now += 1.0
    b.add(rel, ck, size, mtime_ns=i * 1_000_000_000, complete=True)
    return rel


def drain(b: Backlog) -> list[str]:
    out = []
    while (rel := b.next()) is not None:
        out.append(rel)
        b.finish(rel)
    return out


def test_newest_complete_checkpoint_goes_first_then_older_fill_in() -> None:
    clock = Clock()
    b = Backlog(None, clock)
    rels = [add_single(b, clock, i) for i in range(5)]
    assert drain(b) == list(reversed(rels))
    assert b.skipped == 0  # without --keep-remote every checkpoint is sent


def test_a_started_checkpoint_is_not_abandoned_for_a_newer_one() -> None:
    clock = Clock()
    b = Backlog(None, clock)
    first = add_single(b, clock, 0)
    assert b.next() == first  # in flight, 8 MiB: above the gate
    newer = add_single(b, clock, 1)
    assert b.next() is None  # the newer one waits: one big checkpoint at a time
    b.finish(first)
    assert b.next() == newer


def test_small_checkpoints_keep_their_parallelism() -> None:
    clock = Clock()
    b = Backlog(None, clock)
    a = add_single(b, clock, 0, size=GATE_BYTES // 4)
    c = add_single(b, clock, 1, size=GATE_BYTES // 4)
    assert b.next() == c
    assert b.next() == a  # both in flight at once


def test_artifacts_and_incomplete_checkpoints_keep_their_place() -> None:
    clock = Clock()
    complete: set[Ckpt] = set()
    b = Backlog(None, clock, complete=lambda c: c in complete)
    old = add_single(b, clock, 0)
    b.add("train.log", None, 10, 5, complete=False)
    d = Ckpt(0, "checkpoint-9", "checkpoint-9")
    b.add("checkpoint-9/model.safetensors", d, 8 * MiB, 9 * 10**9, complete=False)
    new = add_single(b, clock, 1)
    # FIFO slots: old's goes to the newest complete (new); old moves to new's place.
    assert b.next() == new
    b.finish(new)
    assert b.next() == "train.log"
    assert b.next() == "checkpoint-9/model.safetensors"  # not complete: never reordered
    assert b.next() == old  # only complete checkpoints in flight hold others back


def test_directory_checkpoint_becomes_complete_when_its_marker_appears() -> None:
    clock = Clock()
    complete: set[Ckpt] = set()
    b = Backlog(None, clock, complete=lambda c: c in complete)
    d = Ckpt(0, "checkpoint-9", "checkpoint-9")
    b.add("checkpoint-9/a.bin", d, 10, 9, complete=False)
    assert b.lag() == 0.0
    complete.add(d)
    clock.now += 5
    assert b.next() == "checkpoint-9/a.bin"  # asked again: complete now
    clock.now += 3
    assert b.lag() == pytest.approx(3.0)


def test_keep_remote_skips_what_retention_would_delete() -> None:
    clock = Clock()
    b = Backlog(2, clock)
    rels = [add_single(b, clock, i) for i in range(5)]
    skipped = b.take_skipped()
    assert [c.rel for c, _ in skipped] == rels[:3]  # only ep03, ep04 are among the newest 2
    assert b.skipped == 3
    assert drain(b) == [rels[4], rels[3]]


def test_in_flight_upload_is_superseded_only_under_keep_remote() -> None:
    clock = Clock()
    b = Backlog(1, clock)
    first = add_single(b, clock, 0)
    assert b.next() == first
    assert not b.is_superseded(first)
    add_single(b, clock, 1)  # one newer complete checkpoint: keep-remote 1 deletes ep00
    assert b.is_superseded(first)
    b.finish(first)
    assert not b.is_superseded(first)


def test_a_checkpoint_still_waiting_for_its_marker_is_never_skipped() -> None:
    clock = Clock()
    b = Backlog(1, clock, complete=lambda c: False)
    d = Ckpt(0, "checkpoint-1", "checkpoint-1")
    b.add("checkpoint-1/model.bin", d, 10, 1, complete=False)
    add_single(b, clock, 5)
    add_single(b, clock, 6)
    assert [c.rel for c, _ in b.take_skipped()] == ["ckpt/ep05.pt"]


def test_committed_checkpoints_count_and_latest_is_never_skipped() -> None:
    clock = Clock()
    b = Backlog(2, clock)
    new = add_single(b, clock, 9)
    assert b.next() == new
    b.finish(new)
    b.committed(0, [new], [(9 * 10**9, new), (8 * 10**9, "ckpt/ep08.pt")])
    old = add_single(b, clock, 3)  # resumed from long ago: two newer ones are committed
    assert [c.rel for c, _ in b.take_skipped()] == [old]
    assert b.next() is None


def test_other_ranks_do_not_supersede() -> None:
    clock = Clock()
    b = Backlog(1, clock)
    rel0, ck0 = single(1, rank=0)
    b.add(rel0, ck0, 10, 1, True)
    rel1 = "rank_1/ckpt/ep02.pt"
    b.add(rel1, Ckpt(1, "ckpt/ep02.pt", rel1), 10, 2, True)
    assert b.take_skipped() == []


def test_lag_counts_from_completion_until_the_newest_is_committed() -> None:
    clock = Clock()
    b = Backlog(None, clock)
    assert b.lag() == 0.0
    a = add_single(b, clock, 0)
    clock.now += 2.0
    assert b.lag() == pytest.approx(2.0)
    assert b.pending_checkpoints == 1
    assert b.pending_bytes == 8 * MiB
    c = add_single(b, clock, 1)
    clock.now += 0.5
    assert b.lag() == pytest.approx(0.5)  # the newest: ep01
    assert b.save_interval() == pytest.approx(3.0)
    assert drain(b) == [c, a]
    b.committed(0, [c], [(1 * 10**9, c)])
    assert b.lag() == 0.0  # latest names the newest; ep00 fills in
    assert b.max_lag >= 2.0
    assert list(b.commit_delays) == [pytest.approx(0.5)]
    assert b.pending_bytes == 0


def test_lag_warning_threshold() -> None:
    assert not lag_behind(5.0, None)
    assert not lag_behind(1.9, 1.0)
    assert lag_behind(2.1, 1.0)


def test_skipped_checkpoints_are_forgotten_unless_keep_local_needs_them() -> None:
    clock = Clock()
    b = Backlog(1, clock)
    for i in range(200):
        add_single(b, clock, i)
        drain(b)
        b.committed(0, [f"ckpt/ep{i:02d}.pt"], [])
    assert len(b._states) <= 3  # a long run's bookkeeping stays small
    kept = Backlog(1, clock, keep_skipped=True)
    rels = [add_single(kept, clock, i) for i in range(3)]
    assert [rel for rel, _ in kept.superseded(0)] == rels[:2]
    kept.retired(rels[:2])
    assert kept.superseded(0) == []


def test_work_queue_waits_when_full_and_ends_when_closed() -> None:
    import anyio

    from uploader.daemon.keepup import WorkQueue

    skipped: list[str] = []

    async def skip(ckpt: Ckpt, rels: list[str]) -> None:
        skipped.extend(rels)

    async def main() -> list[str]:
        clock = Clock()
        q = WorkQueue(Backlog(2, clock), bound=2, skip=skip)
        got: list[str] = []

        async def producer() -> None:
            for i in range(5):
                rel, ck = single(i)
                clock.now += 1
                await q.put(rel, ck, 10, i, True)  # waits while 2 are queued
            q.close()

        async def consumer() -> None:
            await anyio.sleep(0.05)
            while (rel := await q.get()) is not None:
                got.append(rel)
                q.done(rel)

        async with anyio.create_task_group() as tg:
            tg.start_soon(producer)
            tg.start_soon(consumer)
        return got

    got = anyio.run(main)
    assert sorted(got + skipped) == [f"ckpt/ep{i:02d}.pt" for i in range(5)]
    assert "ckpt/ep04.pt" in got and "ckpt/ep03.pt" in got  # the newest two are sent


def test_lag_warning_when_the_lag_stays_above_twice_the_save_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from uploader.daemon.reporter import LAG_CHECKS, Reporter
    from uploader.daemon.status import StatusReport

    clock = Clock()
    reporter = Reporter(engine=None, clock=clock)
    behind = StatusReport(lag_seconds=5.0, save_interval_seconds=1.0, pending_checkpoints=4)
    fine = StatusReport(lag_seconds=1.5, save_interval_seconds=1.0)
    with caplog.at_level("WARNING"):
        warned = [reporter.check_lag(behind) for _ in range(LAG_CHECKS)]
        assert warned == [False] * (LAG_CHECKS - 1) + [True]  # it stayed above
        clock.now += 10
        assert not reporter.check_lag(behind)  # at most once a minute
        assert not reporter.check_lag(fine)
        clock.now += 60
        assert [reporter.check_lag(behind) for _ in range(LAG_CHECKS)][-1]
    assert "falling behind" in caplog.text and "5.0s" in caplog.text


def test_a_checkpoint_saved_again_under_its_name_waits_again() -> None:
    clock = Clock()
    b = Backlog(1, clock)
    rel, ck = single(1)
    b.add(rel, ck, 10, 1, True)
    assert drain(b) == [rel]
    b.committed(0, [rel], [(1, rel)])
    assert b.lag() == 0.0
    clock.now += 1
    b.add(rel, ck, 10, 2, True)  # model.pt overwritten by the next save
    clock.now += 2
    assert b.lag() == pytest.approx(2.0)
    assert b.take_skipped() == []  # the new version is the newest: never superseded
    assert drain(b) == [rel]
