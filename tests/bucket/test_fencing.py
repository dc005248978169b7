"""The fenced pointer write (update_pointer) on the LOCAL store, step by step.

The "writers" here take turns on one store, interleaved by hand so each lost race
happens at a known point; two processes under real contention are in
tests/scenarios/test_fencing.py.
"""

from __future__ import annotations

import pytest

from uploader import ObjectStore
from uploader.bucket.pointer import (
    Pointer,
    PointerEntry,
    fencing,
    merge,
    read_pointer,
    read_pointer_versioned,
    update_pointer,
)
from uploader.errors import PreconditionFailedError

PREFIX = "run1"


def entry(name: str, mtime: int) -> PointerEntry:
    return PointerEntry(name, f"{PREFIX}/rank_0/{name}", 1, "sha256:" + "0" * 64, mtime, 1.0)


def adding(e: PointerEntry):  # type: ignore[no-untyped-def]
    return lambda cur: merge(cur, 0, e)


def test_a_stale_write_is_refused_then_merged(local_store: ObjectStore) -> None:
    assert fencing(local_store, PREFIX)[0]
    a = update_pointer(local_store, PREFIX, 0, adding(entry("ep2.pt", 20)))
    assert a.written and a.conflicts == 0 and a.version is not None
    # Writer B commits ep3 behind A's back.
    b = update_pointer(local_store, PREFIX, 0, adding(entry("ep3.pt", 30)))
    assert b.written and b.version != a.version
    # A, still holding its own (now stale) pointer and version, commits an older ep1:
    # its write is refused, it reads B's pointer, merges, and writes again.
    calls: list[Pointer | None] = []

    def change(cur: Pointer | None) -> Pointer | None:
        calls.append(cur)
        return merge(cur, 0, entry("ep1.pt", 10))

    again = update_pointer(
        local_store, PREFIX, 0, change, known=(a.pointer, a.version), sleep=lambda s: None
    )
    assert again.written and again.conflicts == 1 and len(calls) == 2
    assert calls[0] == a.pointer and calls[1] is not None and calls[1].latest.name == "ep3.pt"
    final = read_pointer(local_store, PREFIX, 0)
    assert final is not None and final.latest.name == "ep3.pt"  # never back to ep2 or ep1
    assert [e.name for e in final.history] == ["ep3.pt", "ep2.pt", "ep1.pt"]  # none lost
    assert read_pointer_versioned(local_store, PREFIX, 0)[1] == again.version


def test_nothing_is_written_when_nothing_changes(local_store: ObjectStore) -> None:
    first = update_pointer(local_store, PREFIX, 0, adding(entry("ep1.pt", 10)))
    same = update_pointer(local_store, PREFIX, 0, adding(entry("ep1.pt", 10)))
    assert not same.written and same.version == first.version


def test_losing_every_race_fails_with_what_to_do(local_store: ObjectStore) -> None:
    update_pointer(local_store, PREFIX, 0, adding(entry("ep1.pt", 10)))
    n = 0

    def rival_first(cur: Pointer | None) -> Pointer | None:
        # Another writer changes the pointer between every read and write of ours.
        nonlocal n
        n += 1
        update_pointer(local_store, PREFIX, 0, adding(entry(f"rival{n}.pt", 100 + n)))
        return merge(cur, 0, entry("mine.pt", 50))

    with pytest.raises(PreconditionFailedError, match="more than one uploader"):
        update_pointer(local_store, PREFIX, 0, rival_first, attempts=3, sleep=lambda s: None)
    assert n == 3
    final = read_pointer(local_store, PREFIX, 0)
    assert final is not None and "mine.pt" not in {e.name for e in final.history}
