"""``latest`` resolution, the one place both ``pull`` and the loader use."""

from __future__ import annotations

import pytest

from uploader import ObjectNotFoundError, ObjectStore
from uploader.bucket.pointer import PointerEntry, commit, latest_prefix, select_latest


@pytest.mark.parametrize(
    ("name", "prefix"),
    [
        ("latest", ""),
        ("/latest/", ""),
        ("run1/latest", "run1"),
        ("a/b/latest", "a/b"),
        ("run1/ep3.pt", None),
        ("run1/latest.json", None),
        ("run1/notlatest", None),
    ],
)
def test_latest_prefix(name: str, prefix: str | None) -> None:
    assert latest_prefix(name) == prefix


def _entry(rank: int, name: str, mtime: int) -> PointerEntry:
    return PointerEntry(name, f"run/rank_{rank}/{name}", 10, "sha256:" + "1" * 64, mtime, 1.0)


def test_select_latest_agrees_across_ranks_and_picks_a_rank(local_store: ObjectStore) -> None:
    assert select_latest(local_store, "run/ep1.pt") is None
    commit(local_store, "run", 0, _entry(0, "ep1.pt", 1))
    commit(local_store, "run", 0, _entry(0, "ep2.pt", 2))
    commit(local_store, "run", 1, _entry(1, "ep1.pt", 1))
    sel = select_latest(local_store, "run/latest")
    assert sel is not None and sel.prefix == "run"
    assert {r: e.name for r, e in sel.chosen.items()} == {0: "ep1.pt", 1: "ep1.pt"}
    one = select_latest(local_store, "run/latest", rank=1)
    assert one is not None and list(one.chosen) == [1]
    missing = select_latest(local_store, "run/latest", rank=5)
    assert missing is not None and missing.chosen == {} and sorted(missing.entries) == [0, 1]
    with pytest.raises(ObjectNotFoundError, match="rank 2 has committed no checkpoint"):
        select_latest(local_store, "run/latest", world_size=3)
