"""``latest`` resolution, the one place both ``pull`` and the loader use, and what it
costs when every rank of a job resolves it at once (requests counted by a proxy)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from harness.faultproxy import FaultProxy
from harness.ranks import OnceShare, commit_world, pointer_requests
from harness.servers.s3 import FAST_RETRY, S3Server
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


WORLD = 8


@pytest.fixture
def proxied(rclone_s3: S3Server) -> Iterator[tuple[ObjectStore, FaultProxy]]:
    """A store on rclone serve s3 whose every request passes a counting proxy."""
    if not rclone_s3.alive():  # a fault test may have left it stopped
        rclone_s3.start()
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    rclone_s3.make_bucket(bucket)
    with FaultProxy(("127.0.0.1", rclone_s3.port)) as proxy:
        store = rclone_s3.hparams(bucket, port=proxy.port).initialize_object(retry=FAST_RETRY)
        try:
            yield store, proxy
        finally:
            store.close()


def test_ranks_resolving_together_read_each_pointer_once(
    proxied: tuple[ObjectStore, FaultProxy],
) -> None:
    store, proxy = proxied
    commit_world(store, "run", WORLD, ["ep1.pt", "ep2.pt"])
    # each rank alone reads every rank's pointer: W x W
    start = len(proxy.requests)
    alone = [select_latest(store, "run/latest", rank=r) for r in range(WORLD)]
    assert pointer_requests(proxy, start) == {
        "pointer": WORLD * WORLD, "list": WORLD, "other": 0, "total": WORLD * WORLD + WORLD,
    }  # fmt: skip
    # shared (rank 0 resolves, the others receive): W pointer GETs and one listing in all
    share = OnceShare()
    start = len(proxy.requests)
    shared = [select_latest(store, "run/latest", rank=r, share=share) for r in range(WORLD)]
    assert pointer_requests(proxy, start) == {
        "pointer": WORLD, "list": 1, "other": 0, "total": WORLD + 1,
    }  # fmt: skip
    assert share.calls == WORLD
    for one, other in zip(alone, shared, strict=True):
        assert one is not None and other is not None
        assert one.chosen == other.chosen and other.chosen[other.rank or 0].name == "ep2.pt"
    # rank 0's error reaches every rank: world_size asks for a rank with no pointer
    share = OnceShare()
    for r in range(3):
        with pytest.raises(ObjectNotFoundError, match=f"rank {WORLD} has committed no"):
            select_latest(store, "run/latest", world_size=WORLD + 1, rank=r, share=share)
