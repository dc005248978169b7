"""Large manifests live in objects of their own, named by the pointer (format 3), on real
stores: a directory (LOCAL), rclone serve s3 and moto_server."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from harness.servers.s3 import FAST_RETRY, S3Server
from uploader import IntegrityError, ObjectNotFoundError, ObjectStore
from uploader.bucket import format as pointer_format
from uploader.bucket.fetch import fetch_entry
from uploader.bucket.manifest import (
    INLINE_MANIFEST_BYTES,
    MAX_MANIFEST_BYTES,
    is_manifest_object,
    load_manifest,
)
from uploader.bucket.pointer import (
    MANIFEST_DIR,
    ManifestFile,
    Pointer,
    PointerEntry,
    commit,
    manifest_digest,
    pointer_name,
    read_pointer,
    select_latest,
    write_pointer,
)
from uploader.bucket.retention import delete_checkpoints, prune
from uploader.bucket.verify import audit_pointer, verify_prefix
from uploader.cli.main import main

PREFIX = "run"
MANY = 10_000


@pytest.fixture(params=["local", "rclone", "moto"])
def store(request: pytest.FixtureRequest) -> Iterator[ObjectStore]:
    if request.param == "local":
        yield request.getfixturevalue("local_store")
        return
    server: S3Server = request.getfixturevalue(f"{request.param}_s3")
    if not server.alive():  # a fault test may have left it stopped
        server.start()
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    server.make_bucket(bucket)
    s = server.hparams(bucket).initialize_object(concurrency=4, retry=FAST_RETRY)
    try:
        yield s
    finally:
        s.close()


def _content(name: str, i: int) -> bytes:
    return f"{name} file {i}\n".encode()


def _upload_dir(
    store: ObjectStore, src: Path, name: str, count: int, mtime_ns: int = 1
) -> PointerEntry:
    """Upload ``count`` small files as the directory checkpoint ``name`` (each with its
    digest recorded, as the daemon does); return its entry, manifest inline."""
    src.mkdir(parents=True, exist_ok=True)
    obj = f"{PREFIX}/rank_0/{name}"

    def one(i: int) -> ManifestFile:
        rel = f"shard_{i // 1000:02d}/part_{i:05d}.distcp"
        path = src / f"{name.replace('/', '_')}-{i}"
        path.write_bytes(_content(name, i))
        result = store.upload_file(path, f"{obj}/{rel}", verify=False)
        return ManifestFile(f"{name}/{rel}", result.size, str(result.digest))

    with ThreadPoolExecutor(16) as pool:
        files = tuple(pool.map(one, range(count)))
    return PointerEntry(
        name, obj, sum(f.size for f in files), manifest_digest(files), mtime_ns, 1.0, "dcp", files
    )


def _raw(store: ObjectStore) -> dict[str, object]:
    return json.loads(store.get_bytes(pointer_name(PREFIX, 0)))  # type: ignore[no-any-return]


@pytest.mark.slow
def test_a_directory_of_10000_files_keeps_its_manifest_out_of_the_pointer(
    store: ObjectStore, tmp_path: Path
) -> None:
    entry = _upload_dir(store, tmp_path / "src", "step_100", MANY)
    commit(store, PREFIX, 0, entry)

    size = len(store.get_bytes(pointer_name(PREFIX, 0)))
    raw = _raw(store)
    assert size < 4096, size  # inline, the manifest would be about 1.2 MB
    assert raw["format"] == "ckpt-uploader/pointer/3"
    latest = raw["latest"]
    assert isinstance(latest, dict) and "files" not in latest
    ref = latest["manifest"]
    assert ref["files"] == MANY
    assert ref["object"].startswith(f"{PREFIX}/rank_0/{MANIFEST_DIR}/step_100.")
    data = store.get_bytes(ref["object"])
    assert len(data) == ref["size"] > INLINE_MANIFEST_BYTES
    assert ref["digest"] == "sha256:" + hashlib.sha256(data).hexdigest()

    # Restore: ``latest`` resolves, the manifest object is read and checked, every file
    # lands verified.
    sel = select_latest(store, f"{PREFIX}/latest")
    assert sel is not None
    got = sel.entries[0]
    assert got.file_count == MANY and not got.manifest_loaded
    top = fetch_entry(store, got, tmp_path / "restore")
    restored = sorted(p for p in top.rglob("*") if p.is_file())
    assert len(restored) == MANY
    for i in (0, 1, 4321, MANY - 1):
        rel = f"shard_{i // 1000:02d}/part_{i:05d}.distcp"
        assert (top / rel).read_bytes() == _content("step_100", i)

    # The audit behind 'verify' reads the manifest object and checks every file it names.
    sizes = {o.name: o.size for o in store.list(f"{PREFIX}/")}
    assert audit_pointer(store, pointer_name(PREFIX, 0), sizes) == []
    victim = f"{PREFIX}/rank_0/step_100/shard_04/part_04321.distcp"
    store.delete(victim)
    sizes.pop(victim)
    [failure] = audit_pointer(store, pointer_name(PREFIX, 0), sizes)
    assert f"names {victim}, which is missing" in failure


def test_verify_and_ls_of_a_pointer_with_a_manifest_object(
    local_store: ObjectStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    entry = _upload_dir(local_store, tmp_path / "src", "step_1", 1000)
    commit(local_store, PREFIX, 0, entry)
    report = verify_prefix(local_store, PREFIX, strict=True)
    # Every file checked; the manifest object is checked by the pointer's audit, not
    # downloaded as an object without a digest.
    assert report.failures == [] and report.checked == 1000

    uri = f"file://{local_store.hparams.container}?prefix={PREFIX}"
    capsys.readouterr()
    assert main(["ls", "--json", uri]) == 0
    [row] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["files"] == 1000 and row["name"] == "step_1" and row["latest"]

    ref = read_pointer(local_store, PREFIX, 0).latest.manifest_ref  # type: ignore[union-attr]
    assert ref is not None
    data = local_store.get_bytes(ref.object)
    local_store.put_bytes(ref.object, data.replace(b"part_00007", b"part_00008", 1))
    report = verify_prefix(local_store, PREFIX)
    assert len(report.failures) == 1
    assert "replaced or damaged, do not use it" in report.failures[0]


def test_a_small_manifest_stays_inline_in_a_format_2_pointer(
    local_store: ObjectStore, tmp_path: Path
) -> None:
    entry = _upload_dir(local_store, tmp_path / "src", "small", 20)
    commit(local_store, PREFIX, 0, entry)
    raw = _raw(local_store)
    assert raw["format"] == "ckpt-uploader/pointer/2"
    assert len(raw["latest"]["files"]) == 20  # type: ignore[index]
    assert not any(is_manifest_object(o.name) for o in local_store.list(""))


def test_retention_deletes_manifest_objects_with_their_checkpoints(
    store: ObjectStore, tmp_path: Path
) -> None:
    n = 800  # above the inline bound, small enough to upload three times quickly
    entries = [_upload_dir(store, tmp_path / "src", f"step_{k}", n, mtime_ns=k) for k in (1, 2, 3)]
    for e in entries:
        commit(store, PREFIX, 0, e)
    pointer = read_pointer(store, PREFIX, 0)
    assert pointer is not None and [e.name for e in pointer.history] == [
        "step_3",
        "step_2",
        "step_1",
    ]
    refs = {e.name: e.manifest_ref for e in pointer.history}
    assert all(r is not None for r in refs.values())

    kept, doomed = prune(pointer, keep=1)
    write_pointer(store, PREFIX, kept)
    gone = delete_checkpoints(store, kept, doomed)  # entries as read: manifests not loaded

    names = {o.name for o in store.list(f"{PREFIX}/")}
    for old in ("step_1", "step_2"):
        ref = refs[old]
        assert ref is not None and ref.object in gone and ref.object not in names
        assert not any(x.startswith(f"{PREFIX}/rank_0/{old}/") for x in names)
    ref = refs["step_3"]
    assert ref is not None and ref.object in names
    assert sum(x.startswith(f"{PREFIX}/rank_0/step_3/") for x in names) == n
    assert len(gone) == 2 * (n + 1)
    latest = read_pointer(store, PREFIX, 0)
    assert latest is not None
    fetch_entry(store, latest.latest, tmp_path / "restore")
    assert len(list((tmp_path / "restore" / "step_3").rglob("*.distcp"))) == n


def test_a_damaged_manifest_object_is_refused_with_what_to_do(
    local_store: ObjectStore, tmp_path: Path
) -> None:
    entry = _upload_dir(local_store, tmp_path / "src", "step_9", 1000)
    commit(local_store, PREFIX, 0, entry)
    got = read_pointer(local_store, PREFIX, 0)
    assert got is not None
    ref = got.latest.manifest_ref
    assert ref is not None
    good = local_store.get_bytes(ref.object)
    dest = tmp_path / "restore"

    local_store.put_bytes(ref.object, good + b" " * 10)  # oversized
    with pytest.raises(IntegrityError, match="larger than the .* bytes its pointer records"):
        fetch_entry(local_store, got.latest, dest)
    local_store.put_bytes(ref.object, good[:-1] + b"]")  # same size, other bytes
    with pytest.raises(IntegrityError, match="replaced or damaged.*ckpt-uploader push"):
        fetch_entry(local_store, got.latest, dest)
    local_store.delete(ref.object)
    with pytest.raises(ObjectNotFoundError, match="is missing, so its files are unknown"):
        fetch_entry(local_store, got.latest, dest)
    assert not dest.exists()  # nothing downloaded


def test_pointers_of_the_older_formats_still_resolve(
    local_store: ObjectStore, tmp_path: Path
) -> None:
    """Pointers as versions before manifest objects wrote them, byte for byte."""
    data = b"weights"
    sha = "sha256:" + hashlib.sha256(data).hexdigest()
    local_store.put_bytes(f"{PREFIX}/rank_0/ep1.pt", data)
    local_store.put_bytes(f"{PREFIX}/rank_0/ckpt/a.bin", data)
    v1 = {
        "format": "ckpt-uploader/pointer/1",
        "rank": 0,
        "latest": {
            "name": "ep1.pt",
            "object": f"{PREFIX}/rank_0/ep1.pt",
            "size": len(data),
            "digest": sha,
            "mtime_ns": 1,
        },
    }
    files = [{"path": "ckpt/a.bin", "size": len(data), "digest": sha}]
    digest = manifest_digest([ManifestFile("ckpt/a.bin", len(data), sha)])
    dir_entry = {
        "name": "ckpt",
        "object": f"{PREFIX}/rank_0/ckpt",
        "size": len(data),
        "digest": digest,
        "mtime_ns": 2,
        "committed_at": 2.0,
        "rule": "dcp",
        "files": files,
    }
    v2 = {"format": "ckpt-uploader/pointer/2", "rank": 0, "latest": dir_entry}
    v2["history"] = [dir_entry]
    for body, name in ((v1, "ep1.pt"), (v2, "ckpt")):
        local_store.put_bytes(pointer_name(PREFIX, 0), json.dumps(body).encode())
        sel = select_latest(local_store, f"{PREFIX}/latest")
        assert sel is not None and sel.entries[0].name == name
        got = fetch_entry(local_store, sel.entries[0], tmp_path / name, into=True)
        assert (got / "a.bin" if name == "ckpt" else got).read_bytes() == data


def test_a_pointer_of_a_newer_format_says_to_upgrade() -> None:
    body = {"format": "ckpt-uploader/pointer/5", "rank": 0, "latest": {}}
    with pytest.raises(IntegrityError, match="format 5, written by a newer ckpt-uploader.*upgrade"):
        Pointer.from_json(json.dumps(body).encode(), "run/rank_0/latest.json")


def test_a_reader_of_format_2_refuses_format_3(
    local_store: ObjectStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader that knows formats up to 2 meets a pointer naming a manifest object: it
    refuses it, and says why, instead of taking the entry for a single file."""
    commit(local_store, PREFIX, 0, _upload_dir(local_store, tmp_path / "src", "big", 1000))
    monkeypatch.setattr(pointer_format, "FORMAT", pointer_format.FORMAT_INLINE)
    monkeypatch.setattr(pointer_format, "FORMATS", pointer_format.FORMATS[:2])
    with pytest.raises(IntegrityError, match="format 3, written by a newer ckpt-uploader"):
        read_pointer(local_store, PREFIX, 0)


def test_a_manifest_reference_beyond_the_bound_is_refused_before_reading(
    local_store: ObjectStore,
) -> None:
    files = (ManifestFile("ckpt/a.bin", 1, "sha256:" + "1" * 64),)
    entry = PointerEntry("ckpt", f"{PREFIX}/rank_0/ckpt", 1, manifest_digest(files), 1)
    d = entry.to_dict()
    d["rule"] = "dcp"
    digest = "sha256:" + "2" * 64
    d["manifest"] = {
        "object": f"{PREFIX}/rank_0/{MANIFEST_DIR}/ckpt.{'2' * 16}.json",
        "size": MAX_MANIFEST_BYTES + 1,
        "digest": digest,
        "files": 1,
    }
    loaded = PointerEntry.from_dict(d)
    with pytest.raises(IntegrityError, match="more than the .* bytes a manifest may have"):
        load_manifest(local_store, loaded)
