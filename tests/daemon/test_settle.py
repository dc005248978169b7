"""The settling rules, in process, with an injected clock (no files, no sleeping)."""

from __future__ import annotations

import pytest

from uploader.daemon.settle import Settler, Verdict

SETTLE = 1.0
OPEN_TIMEOUT = 30.0


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def settler(clock: Clock) -> Settler:
    # The wall clock stands before every mtime the tests give: none looks old by itself.
    return Settler(SETTLE, OPEN_TIMEOUT, clock=clock, wall=lambda: 0.0)


def take(settler: Settler, rel: str, stat: tuple[int, int], writing: bool | None = None) -> Verdict:
    """What the intake does each tick: check, and ask about a writer when quiet."""
    verdict = settler.check(rel, stat)
    if verdict is Verdict.QUIET:
        verdict = settler.writer(rel, writing)
    return verdict


@pytest.mark.parametrize("kind", ["moved", "scan"])
def test_renamed_or_scanned_file_is_complete_once_quiet_for_settle(
    settler: Settler, clock: Clock, kind: str
) -> None:
    settler.observe("ep1.pt", kind, 10, 1)
    clock.advance(SETTLE - 0.01)
    assert take(settler, "ep1.pt", (10, 1)) is Verdict.WAIT
    assert "ep1.pt" in settler
    clock.advance(0.01)
    assert take(settler, "ep1.pt", (10, 1)) is Verdict.DONE
    assert "ep1.pt" not in settler and len(settler) == 0


def test_scanned_file_counts_its_quiet_time_from_its_mtime(clock: Clock) -> None:
    """A run directory pushed after training: files last written long ago are complete
    at their first check; one written a moment ago waits out the rest of --settle."""
    now = 1_000_000.0
    s = Settler(SETTLE, OPEN_TIMEOUT, clock=clock, wall=lambda: now)
    old, fresh = int((now - 3600) * 1e9), int((now - SETTLE / 2) * 1e9)
    s.observe("old.pt", "scan", 10, old)
    s.observe("fresh.pt", "scan", 10, fresh)
    s.observe("moved.pt", "moved", 10, old)  # a rename is a new version: full settle
    assert take(s, "old.pt", (10, old)) is Verdict.DONE
    assert take(s, "fresh.pt", (10, fresh)) is Verdict.WAIT
    assert take(s, "moved.pt", (10, old)) is Verdict.WAIT
    clock.advance(SETTLE / 2)
    assert take(s, "fresh.pt", (10, fresh)) is Verdict.DONE
    # an mtime in the future (another host's clock) counts for nothing
    s.observe("skew.pt", "scan", 10, int((now + 60) * 1e9))
    assert take(s, "skew.pt", (10, int((now + 60) * 1e9))) is Verdict.WAIT


def test_in_place_write_waits_for_its_close_event(settler: Settler, clock: Clock) -> None:
    settler.observe("ep1.pt", "created", 0, 1)
    settler.observe("ep1.pt", "modified", 0, 1)
    clock.advance(SETTLE * 5)
    assert take(settler, "ep1.pt", (0, 1)) is Verdict.WAIT  # modified, never closed
    settler.observe("ep1.pt", "closed", 0, 1)
    clock.advance(SETTLE - 0.01)
    assert take(settler, "ep1.pt", (0, 1)) is Verdict.WAIT  # the close restarts the quiet time
    clock.advance(0.01)
    assert take(settler, "ep1.pt", (0, 1)) is Verdict.DONE


def test_modify_after_close_needs_another_close(settler: Settler, clock: Clock) -> None:
    settler.observe("a.pt", "closed", 5, 1)
    settler.observe("a.pt", "modified", 5, 1)
    clock.advance(SETTLE * 3)
    assert take(settler, "a.pt", (5, 1)) is Verdict.WAIT


def test_final_flag_takes_an_in_place_write_without_a_close(settler: Settler, clock: Clock) -> None:
    settler.observe("ep1.pt", "modified", 7, 1)
    clock.advance(SETTLE)
    assert take(settler, "ep1.pt", (7, 1)) is Verdict.WAIT
    settler.final = True
    assert take(settler, "ep1.pt", (7, 1)) is Verdict.DONE


def test_file_with_no_modify_event_is_taken_when_quiet_unless_empty(
    settler: Settler, clock: Clock
) -> None:
    settler.observe("full.pt", "created", 9, 1)
    settler.observe("empty.pt", "created", 0, 1)
    clock.advance(SETTLE)
    assert take(settler, "full.pt", (9, 1)) is Verdict.DONE
    assert take(settler, "empty.pt", (0, 1)) is Verdict.WAIT
    clock.advance(OPEN_TIMEOUT)
    assert take(settler, "empty.pt", (0, 1)) is Verdict.DONE  # --open-timeout


def test_open_timeout_takes_a_quiet_file_without_a_close(settler: Settler, clock: Clock) -> None:
    settler.observe("ep1.pt", "modified", 3, 1)
    clock.advance(OPEN_TIMEOUT - 0.01)
    assert take(settler, "ep1.pt", (3, 1)) is Verdict.WAIT
    clock.advance(0.01)
    # No writer probe past --open-timeout: taken even when a writer holds it.
    assert settler.check("ep1.pt", (3, 1)) is Verdict.DONE


@pytest.mark.parametrize("change", [(11, 1), (10, 2)], ids=["size", "mtime"])
def test_any_change_restarts_the_quiet_time(
    settler: Settler, clock: Clock, change: tuple[int, int]
) -> None:
    settler.observe("ep1.pt", "moved", 10, 1)
    clock.advance(SETTLE * 0.9)
    assert take(settler, "ep1.pt", change) is Verdict.WAIT
    clock.advance(SETTLE * 0.9)  # 1.8 s since the first event, 0.9 since the change
    assert take(settler, "ep1.pt", change) is Verdict.WAIT
    clock.advance(SETTLE * 0.1)
    assert take(settler, "ep1.pt", change) is Verdict.DONE


def test_change_restarts_open_timeout_too(settler: Settler, clock: Clock) -> None:
    settler.observe("ep1.pt", "modified", 1, 1)
    clock.advance(OPEN_TIMEOUT - 1)
    assert take(settler, "ep1.pt", (2, 1)) is Verdict.WAIT
    clock.advance(2)
    assert take(settler, "ep1.pt", (2, 1)) is Verdict.WAIT


def test_file_open_for_writing_is_held_then_taken_after_open_timeout(
    settler: Settler, clock: Clock
) -> None:
    settler.observe("ep1.pt", "moved", 4, 1)
    clock.advance(SETTLE)
    assert take(settler, "ep1.pt", (4, 1), writing=True) is Verdict.HELD  # said once
    clock.advance(SETTLE)
    assert take(settler, "ep1.pt", (4, 1), writing=True) is Verdict.WAIT
    assert "ep1.pt" in settler
    clock.advance(OPEN_TIMEOUT)
    assert take(settler, "ep1.pt", (4, 1), writing=True) is Verdict.DONE


def test_file_no_longer_open_is_taken(settler: Settler, clock: Clock) -> None:
    settler.observe("ep1.pt", "moved", 4, 1)
    clock.advance(SETTLE)
    assert take(settler, "ep1.pt", (4, 1), writing=True) is Verdict.HELD
    assert take(settler, "ep1.pt", (4, 1), writing=False) is Verdict.DONE


def test_unknown_writer_does_not_hold(settler: Settler, clock: Clock) -> None:
    settler.observe("ep1.pt", "moved", 4, 1)
    clock.advance(SETTLE)
    assert take(settler, "ep1.pt", (4, 1), writing=None) is Verdict.DONE


def test_deleted_file_drops_out(settler: Settler, clock: Clock) -> None:
    settler.observe("a.pt", "moved", 4, 1)
    settler.observe("b.pt", "moved", 4, 1)
    assert settler.check("a.pt", None) is Verdict.GONE
    settler.drop("b.pt")
    assert len(settler) == 0 and settler.paths() == []
    clock.advance(OPEN_TIMEOUT)
    assert settler.check("a.pt", (4, 1)) is Verdict.GONE


def test_later_events_do_not_reset_the_stat_seen(settler: Settler, clock: Clock) -> None:
    """An event for a tracked file keeps its recorded stat: only a check sees changes."""
    settler.observe("a.pt", "created", 1, 1)
    settler.observe("a.pt", "closed", 2, 2)
    clock.advance(SETTLE)
    assert take(settler, "a.pt", (1, 1)) is Verdict.DONE


def test_paths_in_first_seen_order(settler: Settler) -> None:
    for name in ("c.pt", "a.pt", "b.pt"):
        settler.observe(name, "scan", 1, 1)
    settler.observe("c.pt", "modified", 1, 1)
    assert settler.paths() == ["c.pt", "a.pt", "b.pt"]
