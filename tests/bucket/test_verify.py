"""The bucket audit behind ``ckpt-uploader verify``, on the LOCAL store."""

from __future__ import annotations

import json
from pathlib import Path

from uploader import ObjectStore
from uploader.bucket.pointer import PointerEntry, commit, pointer_name
from uploader.bucket.verify import audit_pointer, is_pointer, verify_prefix


def _put(store: ObjectStore, name: str, data: bytes) -> PointerEntry:
    """Upload ``data`` as ``name`` (its digest recorded, as the daemon does)."""
    src = Path(store.hparams.container).parent / "src"
    src.write_bytes(data)
    digest = str(store.upload_file(src, name).digest)
    return PointerEntry(name.split("/rank_0/")[1], name, len(data), digest, len(data), 1.0)


def _sizes(store: ObjectStore) -> dict[str, int]:
    return {o.name: o.size for o in store.list("run/")}


def test_a_pointer_that_matches_its_objects_has_no_failures(local_store: ObjectStore) -> None:
    e = _put(local_store, "run/rank_0/ep1.pt", b"one" * 100)
    commit(local_store, "run", 0, e)
    assert audit_pointer(local_store, pointer_name("run", 0), _sizes(local_store)) == []
    report = verify_prefix(local_store, "run")
    assert report.failures == [] and report.checked == 1


def test_pointer_claims_that_do_not_hold_are_each_reported(local_store: ObjectStore) -> None:
    old = _put(local_store, "run/rank_0/ep1.pt", b"a" * 50)
    mid = _put(local_store, "run/rank_0/ep2.pt", b"b" * 60)
    new = _put(local_store, "run/rank_0/ep3.pt", b"c" * 70)
    commit(local_store, "run", 0, old)
    commit(local_store, "run", 0, PointerEntry(mid.name, mid.object, 61, mid.digest, 61))
    commit(
        local_store,
        "run",
        0,
        PointerEntry(new.name, new.object, new.size, "sha256:" + "0" * 64, 99),
    )
    local_store.delete("run/rank_0/ep1.pt")  # an old entry gone (retention): not a failure
    failures = audit_pointer(local_store, pointer_name("run", 0), _sizes(local_store))
    assert len(failures) == 2, failures
    assert "names run/rank_0/ep2.pt with 61 bytes but it holds 60" in failures[1] + failures[0]
    assert any("ep3.pt with digest sha256:000" in f for f in failures)
    local_store.delete("run/rank_0/ep3.pt")
    failures = audit_pointer(local_store, pointer_name("run", 0), _sizes(local_store))
    assert any("latest (ep3.pt) names run/rank_0/ep3.pt, which is missing" in f for f in failures)


def test_an_unreadable_pointer_and_objects_without_digest(local_store: ObjectStore) -> None:
    local_store.put_bytes("run/rank_0/latest.json", json.dumps({"format": "other"}).encode())
    [failure] = audit_pointer(local_store, "run/rank_0/latest.json", {})
    assert failure.startswith("run/rank_0/latest.json: commit pointer") and "unreadable" in failure
    assert is_pointer("run/rank_0/latest.json") and is_pointer("latest.json")
    assert not is_pointer("run/rank_0/latest.json.bak")
