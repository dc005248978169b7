"""The pointer's one update rule (:func:`merge`) and remote retention's pruning."""

from __future__ import annotations

import itertools

from uploader import ObjectStore
from uploader.bucket.pointer import (
    ManifestFile,
    PointerEntry,
    commit,
    manifest_digest,
    merge,
    read_pointer,
)
from uploader.bucket.retention import delete_checkpoints, prune

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


def _dir_entry(name: str, mtime: int, files: tuple[str, ...]) -> PointerEntry:
    manifest = tuple(ManifestFile(f"{name}/{f}", 1, "sha256:" + "1" * 64) for f in files)
    return PointerEntry(
        name,
        f"{PREFIX}/rank_0/{name}",
        len(manifest),
        manifest_digest(manifest),
        mtime,
        1.0,
        rule="hf",
        files=manifest,
    )


def test_retention_deletes_whole_checkpoints_beyond_keep(local_store: ObjectStore) -> None:
    """Two directory checkpoints and a single file: keep 1 removes every file of the two
    older ones, from the pointer first; artifacts and the newest stay."""
    p = None
    entries = [
        _dir_entry("checkpoint-8", 10, ("model.safetensors", "trainer_state.json")),
        entry("ep1.pt", 15),
        _dir_entry("checkpoint-16", 20, ("model.safetensors", "trainer_state.json")),
    ]
    for e in entries:
        for _, obj in e.objects():
            local_store.put_bytes(obj, b"x")
        p = commit(local_store, PREFIX, 0, e, current=p)
    local_store.put_bytes(f"{PREFIX}/rank_0/train.log", b"x")  # an artifact
    assert p is not None
    kept, doomed = prune(p, 1)
    assert [e.name for e in doomed] == ["ep1.pt", "checkpoint-8"]
    assert [e.name for e in kept.history] == ["checkpoint-16"]
    gone = delete_checkpoints(local_store, kept, doomed)
    assert sorted(gone) == [
        f"{PREFIX}/rank_0/checkpoint-8/model.safetensors",
        f"{PREFIX}/rank_0/checkpoint-8/trainer_state.json",
        f"{PREFIX}/rank_0/ep1.pt",
    ]
    left = sorted(i.name for i in local_store.list(f"{PREFIX}/rank_0/"))
    assert left == [
        f"{PREFIX}/rank_0/checkpoint-16/model.safetensors",
        f"{PREFIX}/rank_0/checkpoint-16/trainer_state.json",
        f"{PREFIX}/rank_0/latest.json",
        f"{PREFIX}/rank_0/train.log",
    ]


def test_retention_never_removes_latest() -> None:
    """A re-saved checkpoint with an older mtime stays latest (same name) even when
    keep=1 ranks another entry newer."""
    p = merge(merge(None, 0, entry("ep1.pt", 10)), 0, entry("ep2.pt", 20))
    p = merge(p, 0, entry("ep2.pt", 5))  # latest, now the oldest entry
    assert p.latest.name == "ep2.pt"
    kept, doomed = prune(p, 1)
    assert [e.name for e in doomed] == []
    assert kept.latest.name == "ep2.pt"
    # keep 0 would still leave latest
    kept, doomed = prune(p, 0)
    assert [e.name for e in doomed] == ["ep1.pt"] and kept.latest.name == "ep2.pt"
