"""The pointer's one update rule (:func:`merge`) and remote retention's pruning."""

from __future__ import annotations

import itertools

from uploader import ObjectStore
from uploader.bucket.pointer import PointerEntry, commit, merge, read_pointer
from uploader.bucket.retention import prune_remote

PREFIX = "exp"


def entry(name: str, mtime: int) -> PointerEntry:
    return PointerEntry(name, f"{PREFIX}/rank_0/{name}", 1, "sha256:" + "0" * 64, mtime, 1.0)


def test_latest_is_the_newest_whatever_the_order_of_arrival() -> None:
    entries = [entry("ep1.pt", 10), entry("ep2.pt", 20), entry("ep3.pt", 30)]
    for order in itertools.permutations(entries):
        p = None
        for e in order:
            p = merge(p, 0, e)
        assert p is not None
        assert p.latest.name == "ep3.pt"
        assert [h.name for h in p.history] == ["ep3.pt", "ep2.pt", "ep1.pt"]


def test_a_rewritten_checkpoint_replaces_its_entry_and_may_move_latest_back() -> None:
    p = merge(merge(None, 0, entry("ep1.pt", 10)), 0, entry("ep2.pt", 20))
    again = merge(p, 0, entry("ep2.pt", 5))  # ep2 uploaded again, older mtime now
    assert [h.name for h in again.history] == ["ep1.pt", "ep2.pt"]
    assert again.latest.name == "ep2.pt"  # the same name as latest: it is replaced


def test_history_is_cut_to_the_limit_keeping_the_newest() -> None:
    p = None
    for i in range(10):
        p = merge(p, 0, entry(f"ep{i}.pt", i), history_limit=4)
    assert p is not None
    assert [h.name for h in p.history] == ["ep9.pt", "ep8.pt", "ep7.pt", "ep6.pt"]


def test_commit_writes_what_merge_computes(local_store: ObjectStore) -> None:
    first = commit(local_store, PREFIX, 0, entry("ep2.pt", 20))
    second = commit(local_store, PREFIX, 0, entry("ep1.pt", 10))  # reads the pointer back
    assert second == merge(first, 0, entry("ep1.pt", 10))
    assert read_pointer(local_store, PREFIX, 0) == second


def test_prune_remote_deletes_beyond_keep_and_only_checkpoints(local_store: ObjectStore) -> None:
    p = None
    for name, mtime in (("ep1.pt", 10), ("ep2.pt", 20), ("ep3.pt", 30)):
        local_store.put_bytes(f"{PREFIX}/rank_0/{name}", b"x")
        p = commit(local_store, PREFIX, 0, entry(name, mtime), current=p)
    local_store.put_bytes(f"{PREFIX}/rank_0/notes.txt", b"x")
    assert p is not None

    def is_checkpoint(name: str) -> bool:
        return name.endswith(".pt")

    assert prune_remote(local_store, PREFIX, 0, 1, is_checkpoint, p) == [
        f"{PREFIX}/rank_0/ep2.pt",
        f"{PREFIX}/rank_0/ep1.pt",
    ]
    left = sorted(i.name for i in local_store.list(f"{PREFIX}/rank_0/"))
    assert left == [f"{PREFIX}/rank_0/{n}" for n in ("ep3.pt", "latest.json", "notes.txt")]
