"""Commit pointers on the LOCAL store: never backwards, bounded, agreed across ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from uploader import IntegrityError, ObjectNotFoundError, ObjectStore, UploaderError
from uploader.bucket.pointer import (
    HISTORY_LIMIT,
    Pointer,
    PointerEntry,
    commit,
    list_ranks,
    pointer_name,
    read_pointer,
    resolve_latest,
)

PREFIX = "run1"


def entry(name: str, mtime: int, rank: int = 0) -> PointerEntry:
    return PointerEntry(
        name=name,
        object=f"{PREFIX}/rank_{rank}/{name}",
        size=100 + mtime,
        digest="sha256:" + f"{mtime:064x}",
        mtime_ns=mtime,
        committed_at=1.0,
    )


def test_pointer_name_and_round_trip(local_store: ObjectStore) -> None:
    assert pointer_name("run1", 3) == "run1/rank_3/latest.json"
    assert pointer_name("", 0) == "rank_0/latest.json"
    assert read_pointer(local_store, PREFIX, 0) is None
    p = commit(local_store, PREFIX, 0, entry("ep1.pt", 10))
    assert read_pointer(local_store, PREFIX, 0) == p
    raw = json.loads(local_store.get_bytes("run1/rank_0/latest.json"))
    assert raw["format"] == "ckpt-uploader/pointer/2"
    assert raw["latest"]["name"] == "ep1.pt"


def test_latest_never_moves_back(local_store: ObjectStore) -> None:
    commit(local_store, PREFIX, 0, entry("ep1.pt", 10))
    commit(local_store, PREFIX, 0, entry("ep3.pt", 30))
    # A late upload of an older checkpoint joins the history only.
    p = commit(local_store, PREFIX, 0, entry("ep2.pt", 20))
    assert p.latest.name == "ep3.pt"
    assert [e.name for e in p.history] == ["ep3.pt", "ep2.pt", "ep1.pt"]
    stored = read_pointer(local_store, PREFIX, 0)
    assert stored is not None and stored.latest.name == "ep3.pt"
    # Re-committing the same name (e.g. after a re-upload) keeps one history entry.
    p = commit(local_store, PREFIX, 0, entry("ep3.pt", 31))
    assert p.latest.name == "ep3.pt" and p.latest.mtime_ns == 31
    assert [e.name for e in p.history].count("ep3.pt") == 1
    # Passing the current pointer gives the same result as reading it.
    p2 = commit(local_store, PREFIX, 0, entry("ep0.pt", 1), current=p)
    assert p2.latest.name == "ep3.pt"


def test_history_bounded(local_store: ObjectStore) -> None:
    p = None
    for i in range(HISTORY_LIMIT + 10):
        p = commit(local_store, PREFIX, 0, entry(f"ba{i}.pt", i), current=p)
    assert p is not None
    assert len(p.history) == HISTORY_LIMIT
    assert p.latest.name == f"ba{HISTORY_LIMIT + 9}.pt"
    assert p.history[-1].name == "ba10.pt"  # the oldest were dropped
    small = commit(local_store, PREFIX, 1, entry("a", 1, 1), history_limit=2)
    small = commit(local_store, PREFIX, 1, entry("b", 2, 1), history_limit=2)
    small = commit(local_store, PREFIX, 1, entry("c", 3, 1), history_limit=2)
    assert [e.name for e in small.history] == ["c", "b"]


def test_resolve_latest_newest_common(local_store: ObjectStore) -> None:
    # rank 0 is ahead (ep3), rank 1 has ep1, ep2, rank 2 has ep1, ep2 and ep3 partially.
    for name, t in (("ep1.pt", 10), ("ep2.pt", 20), ("ep3.pt", 30)):
        commit(local_store, PREFIX, 0, entry(name, t, 0))
    for name, t in (("ep1.pt", 11), ("ep2.pt", 21)):
        commit(local_store, PREFIX, 1, entry(name, t, 1))
    for name, t in (("ep2.pt", 22), ("ep1.pt", 12), ("ep3.pt", 32)):
        commit(local_store, PREFIX, 2, entry(name, t, 2))
    assert list_ranks(local_store, PREFIX) == [0, 1, 2]
    got = resolve_latest(local_store, PREFIX)
    assert sorted(got) == [0, 1, 2]
    assert {e.name for e in got.values()} == {"ep2.pt"}
    assert got[1].object == "run1/rank_1/ep2.pt"
    # Once rank 1 commits ep3, ep3 wins.
    commit(local_store, PREFIX, 1, entry("ep3.pt", 31, 1))
    assert {e.name for e in resolve_latest(local_store, PREFIX).values()} == {"ep3.pt"}
    # Restricting to a world size of 1 looks at rank 0 only.
    assert list(resolve_latest(local_store, PREFIX, world_size=1)) == [0]


def test_ranks_ignore_other_objects(local_store: ObjectStore) -> None:
    commit(local_store, PREFIX, 0, entry("ep1.pt", 1))
    local_store.put_bytes("run1/rank_0/sub/latest.json", b"{}")
    local_store.put_bytes("run1/rank_x/latest.json", b"{}")
    local_store.put_bytes("run10/rank_5/latest.json", b"{}")
    assert list_ranks(local_store, PREFIX) == [0]
    assert list_ranks(local_store, "") == []


def test_missing_rank_is_clear(local_store: ObjectStore) -> None:
    commit(local_store, PREFIX, 0, entry("ep1.pt", 1))
    with pytest.raises(ObjectNotFoundError, match="rank 1 has committed no checkpoint"):
        resolve_latest(local_store, PREFIX, world_size=2)
    with pytest.raises(ObjectNotFoundError, match="no commit pointer"):
        resolve_latest(local_store, "elsewhere")


def test_no_common_checkpoint(local_store: ObjectStore) -> None:
    commit(local_store, PREFIX, 0, entry("ep2.pt", 2, 0))
    commit(local_store, PREFIX, 1, entry("ep1.pt", 1, 1))
    with pytest.raises(UploaderError, match="share no committed checkpoint"):
        resolve_latest(local_store, PREFIX)


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"\xff\xfe",
        b"[]",
        b'"text"',
        b"{}",
        b'{"format": "other/1", "rank": 0, "latest": {}}',
        b'{"format": "ckpt-uploader/pointer/1", "rank": 0, "latest": {"name": "x"}}',
        b'{"format": "ckpt-uploader/pointer/1", "rank": 0, "latest": '
        b'{"name": "x", "object": "y", "size": "big", "digest": "d", "mtime_ns": 1}}',
    ],
)
def test_damaged_pointer(local_store: ObjectStore, local_bucket: Path, body: bytes) -> None:
    local_store.put_bytes("run1/rank_0/latest.json", body)
    with pytest.raises(IntegrityError, match="unreadable"):
        read_pointer(local_store, PREFIX, 0)
    with pytest.raises(IntegrityError):
        resolve_latest(local_store, PREFIX)
    with pytest.raises(IntegrityError):
        Pointer.from_json(body, "x")
