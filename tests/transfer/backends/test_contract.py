"""The ObjectStore contract, held against every backend family with the same cases.

``target`` (tests/fixtures/stores.py) is parametrised over rclone serve s3, moto_server,
Azurite, a LOCAL directory and fake-gcs-server, all real servers on loopback. Sizes are
counted in the backend's smallest part (5 MiB on S3, 1 MiB elsewhere), so "one part",
"just over one part" and "several parts" mean the same on each.

Where a backend cannot honour a case, the case asserts what it does instead and says
why; nothing is skipped. Backend-specific cases (SigV4, Azure block limits, GCS request
details, pagination sizes, restarts and faults) live in test_s3.py, test_azure.py,
test_gcs.py and test_local.py beside this file.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.data import file_digest, write_random
from tests.fixtures.local import assert_growing_file_is_refused
from tests.fixtures.stores import Target, roundtrip
from uploader import (
    ConfigError,
    ContainerNotFoundError,
    IntegrityError,
    ObjectNotFoundError,
    ObjectStore,
)
from uploader.errors import PreconditionFailedError
from uploader.transfer.digest import Digest

MiB = 1 << 20


@pytest.fixture
def store(target: Target) -> Iterator[ObjectStore]:
    s = target.store()
    yield s
    s.close()


def user_metadata(store: ObjectStore, given: dict[str, str]) -> dict[str, str]:
    """The user metadata ``stat`` returns for an object stored with ``given``: the LOCAL
    driver keeps none (its digests live in sidecar files), every other backend keeps it
    with lower-case keys."""
    if not store.backend.keeps_metadata:
        return {}
    return {k.lower(): v for k, v in given.items()}


# -- upload and download ------------------------------------------------------------------


@pytest.mark.parametrize("parts", ["0", "1B", "P-1", "P", "P+1", "2P", "3P+7"])
def test_roundtrip_sizes(target: Target, store: ObjectStore, tmp_path: Path, parts: str) -> None:
    p = target.part
    sizes = {"0": 0, "1B": 1, "P-1": p - 1, "P": p, "P+1": p + 1, "2P": 2 * p, "3P+7": 3 * p + 7}
    size = sizes[parts]
    roundtrip(store, tmp_path, size)


def test_many_parts_in_parallel(target: Target, tmp_path: Path) -> None:
    """Eight parts from four threads at once; the digest is checked on the way back."""
    with target.store(concurrency=4) as store:
        roundtrip(store, tmp_path, 8 * target.part + 3)


def test_digest_form_and_parts(target: Target, tmp_path: Path) -> None:
    src = write_random(tmp_path / "a.bin", 2 * target.part + 3)
    small = write_random(tmp_path / "b.bin", 1000)
    with target.store(digest="sha256") as store:
        result = store.upload_file(src, "a.bin")
        assert result.parts == 3
        assert result.digest.algo == "sha256-parts" and result.digest.part_size == target.part
        assert store.stat("a.bin").digest == result.digest
        r2 = store.upload_file(small, "b.bin")
        assert r2.parts == 1
        assert str(r2.digest) == "sha256:" + hashlib.sha256(small.read_bytes()).hexdigest()
        assert store.stat("b.bin").digest == r2.digest
    with target.store() as store:  # the default: the whole file's CRC64NVME
        for path in (src, small):
            r = store.upload_file(path, "c/" + path.name)
            assert r.digest == file_digest(path, target.part, "crc64nvme")
            assert r.digest == store.stat("c/" + path.name).digest
            out = store.download_file("c/" + path.name, tmp_path / "out", progress=False)
            assert out.read_bytes() == path.read_bytes()


def test_put_and_get_bytes(store: ObjectStore) -> None:
    store.put_bytes("b/one", b"12345")
    assert store.get_bytes("b/one") == b"12345"
    assert store.stat("b/one").size == 5
    store.put_bytes("b/empty", b"")
    assert store.get_bytes("b/empty") == b""
    assert store.stat("b/empty").size == 0
    with pytest.raises(ObjectNotFoundError):
        store.get_bytes("b/missing")


def test_a_file_sent_as_chunks_is_restored_and_streamed(store: ObjectStore, tmp_path: Path) -> None:
    """--dedup on every backend: chunk objects sent from reused buffers (memoryviews),
    received into the file's mapped pages, a compressible chunk stored compressed, a
    tiny one inline; a second send finds every chunk in the store (one HEAD each)."""
    from tests.transfer.test_chunks import write_safetensors
    from uploader.transfer.chunk_restore import restore_file, stream_chunks
    from uploader.transfer.chunks import ChunkWriter

    src = tmp_path / "model.safetensors"
    write_safetensors(
        src,
        [
            ("zeros", bytes(5 * MiB)),
            ("noise", write_random(tmp_path / "r", 6 * MiB).read_bytes()),
            ("bias", b"b" * 100),
        ],
    )
    first = ChunkWriter(store, "scope").upload_file(src)
    assert 0 < first.stored_bytes < first.new_bytes == src.stat().st_size  # zeros compress
    again = ChunkWriter(store, "scope").upload_file(src)
    assert again.new_bytes == sum(c.size for c in again.chunks if c.data is not None)
    out = restore_file(
        store, "scope", first.chunks, tmp_path / "o" / src.name, first.size, first.digest
    )
    assert out.read_bytes() == src.read_bytes()
    got = bytearray()
    stream_chunks(store, "scope", first.chunks, got.extend, first.size, first.digest)
    assert bytes(got) == src.read_bytes()


def test_download_into_directory(target: Target, store: ObjectStore, tmp_path: Path) -> None:
    src = write_random(tmp_path / "a.bin", target.part + 1500)
    store.upload_file(src, "run/rank_0/ep1.pt")
    d = tmp_path / "restore"
    d.mkdir()
    out = store.download_file("run/rank_0/ep1.pt", d, progress=False)
    assert out == d / "ep1.pt"
    assert out.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in d.iterdir()) == ["ep1.pt"]


def test_overwrite_and_metadata(target: Target, store: ObjectStore, tmp_path: Path) -> None:
    first = write_random(tmp_path / "one", 1000, seed=1)
    second = write_random(tmp_path / "two", 2 * target.part + 1, seed=2)
    r1 = store.upload_file(first, "run/ep1.pt", metadata={"Run": "r1", "epoch": "1"})
    st = store.stat("run/ep1.pt")
    assert st.metadata == user_metadata(store, {"Run": "r1", "epoch": "1"})
    assert st.digest == r1.digest and st.digest.algo == "crc64nvme"
    r2 = store.upload_file(second, "run/ep1.pt", metadata={"epoch": "2"})
    st = store.stat("run/ep1.pt")
    assert st.size == second.stat().st_size
    assert st.digest == r2.digest and st.digest.algo == "crc64nvme" and r2.parts == 3
    assert st.metadata == user_metadata(store, {"epoch": "2"})
    out = store.download_file("run/ep1.pt", tmp_path / "out.pt", progress=False)
    assert out.read_bytes() == second.read_bytes()


def test_file_changing_during_upload(store: ObjectStore, tmp_path: Path) -> None:
    """A writer appends while the store reads the file: the upload fails, nothing is stored."""
    assert_growing_file_is_refused(store, tmp_path)


@pytest.mark.parametrize("name", ["a b/c+d%e/\u00fc.pt", "x/y=z&w?.pt", "semi;colon/#hash"])
def test_names_needing_escapes(
    target: Target, store: ObjectStore, tmp_path: Path, name: str
) -> None:
    """Spaces, unicode and URL metacharacters round-trip and list as given."""
    roundtrip(store, tmp_path, target.part + 1, name=name)
    assert [i.name for i in store.list(name[:3])] == [name]


# -- listing, stat, delete ----------------------------------------------------------------


def test_list_with_prefix(store: ObjectStore) -> None:
    names = ["a/1", "a/2", "a/b/3", "a/b/4", "a/c", "ab/5", "b/6"]
    for n in names:
        store.put_bytes(n, n.encode())
    assert [i.name for i in store.list("a/")] == ["a/1", "a/2", "a/b/3", "a/b/4", "a/c"]
    assert [i.name for i in store.list("a")] == names[:6]
    assert [i.name for i in store.list("a/b/")] == ["a/b/3", "a/b/4"]
    assert store.list("zzz/") == []
    assert {i.name: i.size for i in store.list("")} == {n: len(n) for n in names}


def test_delete_and_missing_objects(store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFoundError):
        store.stat("nope/x.pt")
    with pytest.raises(ObjectNotFoundError):
        store.download_file("nope/x.pt", tmp_path / "x.pt", progress=False)
    assert not (tmp_path / "x.pt").exists()
    # Missing is reported before the destination is looked at.
    with pytest.raises(ObjectNotFoundError):
        store.download_file("nope/x.pt", "/nonexistent-dir/x", progress=False)
    assert store.delete("nope/x.pt") is False
    store.put_bytes("yes/x.pt", b"x")
    assert store.exists("yes/x.pt")
    assert store.delete("yes/x.pt") is True
    assert store.delete("yes/x.pt") is False
    assert not store.exists("yes/x.pt")
    with pytest.raises(ObjectNotFoundError):
        store.stat("yes/x.pt")
    assert store.list("") == []


def test_stat_fields(store: ObjectStore) -> None:
    store.put_bytes("s/x", b"abc", {"run": "r9"})
    st = store.stat("s/x")
    assert st.size == 3 and st.metadata == user_metadata(store, {"run": "r9"})
    assert st.mtime is not None and abs(st.mtime - time.time()) < 3600
    # put_bytes records its digest in the object's metadata; the LOCAL driver keeps no
    # metadata and put_bytes writes no sidecar (its small objects are read whole).
    want = Digest("sha256", hashlib.sha256(b"abc").hexdigest())
    assert st.digest == (want if store.backend.keeps_metadata else None)


def test_ranged_reads(target: Target, store: ObjectStore, tmp_path: Path) -> None:
    data = bytes(range(256)) * 40
    store.put_bytes("r/obj", data)
    be = store.backend
    assert b"".join(be.read_range("r/obj", 3, 10)) == data[3:13]
    assert b"".join(be.read_range("r/obj", 1000, None, chunk_size=7)) == data[1000:]
    chunks = list(be.read_range("r/obj", 0, 5000, chunk_size=1000))
    assert [len(c) for c in chunks] == [1000] * 5 and b"".join(chunks) == data[:5000]
    assert b"".join(be.read_range("r/obj", len(data) - 1, 1)) == data[-1:]
    with pytest.raises(ObjectNotFoundError):
        b"".join(be.read_range("r/missing", 0, 10))
    # Ranges across a part boundary of a multipart object, and up to its end.
    src = write_random(tmp_path / "m.bin", 2 * target.part + 3)
    big = src.read_bytes()
    store.upload_file(src, "r/multi")
    p = target.part
    assert b"".join(be.read_range("r/multi", p - 5, 10, chunk_size=4)) == big[p - 5 : p + 5]
    assert b"".join(be.read_range("r/multi", len(big) - 3, None)) == big[-3:]


def test_ranged_reads_into_a_buffer(target: Target, store: ObjectStore, tmp_path: Path) -> None:
    """Pieces fill the caller's buffer from its start and wrap around once it is full; a
    buffer as long as the range ends up holding all of it."""
    src = write_random(tmp_path / "m.bin", 2 * target.part + 3)
    big = src.read_bytes()
    store.upload_file(src, "r/into")
    be = store.backend
    start, length = target.part - 5, target.part + 5
    for room in (4099, 65536, length):
        buf = memoryview(bytearray(room))
        got = b"".join(bytes(p) for p in be.read_range_into("r/into", start, length, buf))
        assert got == big[start : start + length], room
    whole = memoryview(bytearray(length))
    list(be.read_range_into("r/into", start, length, whole))
    assert whole == big[start : start + length]
    # Past the end: what there is.
    tail = b"".join(bytes(p) for p in be.read_range_into("r/into", len(big) - 3, 10, buf))
    assert tail == big[-3:]
    with pytest.raises(ObjectNotFoundError):
        list(be.read_range_into("r/missing", 0, 10, buf))


class _Windows:
    """A RangeTarget that hands out windows of a few bytes each, at the offsets asked for."""

    def __init__(self, length: int, width: int) -> None:
        self.mem = memoryview(bytearray(length))
        self.width = width
        self.asked: list[tuple[int, int]] = []

    def window(self, offset: int, limit: int) -> memoryview:
        self.asked.append((offset, limit))
        return self.mem[offset : offset + min(limit, self.width)]


def test_ranged_reads_into_a_target(target: Target, store: ObjectStore, tmp_path: Path) -> None:
    """A RangeTarget is asked for windows in order, each at the offset where the pieces
    so far end, and each piece is the start of the window it was received into; what the
    target holds at the end is the range."""
    src = write_random(tmp_path / "t.bin", target.part + 11)
    big = src.read_bytes()
    store.upload_file(src, "r/target")
    start, length = 7, target.part
    into = _Windows(length, 65537)
    pieces = [bytes(p) for p in store.backend.read_range_into("r/target", start, length, into)]
    assert b"".join(pieces) == into.mem == big[start : start + length]
    ends = [sum(len(p) for p in pieces[:k]) for k in range(len(pieces))]
    assert [o for o, _ in into.asked] == ends
    assert all(0 < len(p) <= 65537 for p in pieces)


@pytest.mark.parametrize("parts", ["P-1", "3P+7"])
def test_stream_in_order(target: Target, tmp_path: Path, parts: str) -> None:
    """``download_stream`` hands over every byte once, in order, from parallel ranges
    (several per upload part where the digest allows it), and checks the digest."""
    size = target.part - 1 if parts == "P-1" else 3 * target.part + 7
    src = write_random(tmp_path / "s.bin", size, seed=size)
    with target.store(concurrency=3, download_part_size=target.part // 2) as store:
        store.upload_file(src, "s/obj")
        got = bytearray()
        info = store.download_stream("s/obj", got.extend, require_digest=True)
    assert info.size == size and bytes(got) == src.read_bytes()


# -- integrity ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("multipart", "kind", "algo"),
    [
        (False, "sha256", "sha256"),
        (True, "sha256", "sha256-parts"),
        (False, "crc64nvme", "crc64nvme"),
        (True, "crc64nvme", "crc64nvme"),
    ],
    ids=["sha256", "sha256-parts", "crc64nvme-single", "crc64nvme-multipart"],
)
def test_corrupted_object_detected(
    target: Target, tmp_path: Path, multipart: bool, kind: str, algo: str
) -> None:
    """One flipped byte in the bucket, the recorded digest kept: the restore is an
    IntegrityError, whichever digest kind the object was uploaded with."""
    size = 2 * target.part + 5 if multipart else 1000
    src = write_random(tmp_path / "a.bin", size)
    with target.store(digest=kind) as store:
        assert store.upload_file(src, "c/a.bin").digest.algo == algo
        damaged = bytearray(src.read_bytes())
        damaged[size // 2] ^= 0xFF
        target.replace_bytes(store, "c/a.bin", bytes(damaged))
        out_dir = tmp_path / "out"
        with pytest.raises(IntegrityError, match="corrupt"):
            store.download_file("c/a.bin", out_dir / "a.bin", progress=False)
        assert not out_dir.exists() or list(out_dir.iterdir()) == []
        with pytest.raises(IntegrityError, match="corrupt"):
            store.download_stream("c/a.bin", lambda view: None)


def test_corrupted_object_detected_in_a_stream(target: Target, tmp_path: Path) -> None:
    """A stream passes damaged bytes on before its digest is known: it ends with the
    IntegrityError, and a sink that chokes on the damage does not hide it."""
    size = 2 * target.part + 5
    src = write_random(tmp_path / "a.bin", size)
    with target.store(download_part_size=target.part) as store:
        store.upload_file(src, "c/a.bin")
        damaged = bytearray(src.read_bytes())
        damaged[size // 2] ^= 0xFF
        target.replace_bytes(store, "c/a.bin", bytes(damaged))
        with pytest.raises(IntegrityError, match="corrupt"):
            store.download_stream("c/a.bin", lambda view: None)

        def choke(view: memoryview) -> None:
            raise ValueError("undecodable")

        with pytest.raises(IntegrityError, match="corrupt"):
            store.download_stream("c/a.bin", choke)
        # Intact bytes: the sink's own error is the one raised.
        store.upload_file(src, "c/b.bin")
        with pytest.raises(ValueError, match="undecodable"):
            store.download_stream("c/b.bin", choke)


def test_truncated_object_detected(target: Target, store: ObjectStore, tmp_path: Path) -> None:
    src = write_random(tmp_path / "a.bin", 2 * target.part + 5)
    result = store.upload_file(src, "t/a.bin")
    target.replace_bytes(store, "t/a.bin", src.read_bytes()[: target.part])
    out_dir = tmp_path / "out"
    with pytest.raises(IntegrityError):
        store.download_file("t/a.bin", out_dir / "a.bin", progress=False)
    with pytest.raises(IntegrityError, match="truncated"):
        store.download_file("t/a.bin", out_dir / "a.bin", progress=False, expected_size=result.size)
    # A small object cut short is caught by the digest the caller knows.
    small = write_random(tmp_path / "s.bin", 4000)
    r = store.upload_file(small, "t/s.bin")
    target.replace_bytes(store, "t/s.bin", small.read_bytes()[:3000])
    with pytest.raises(IntegrityError):
        store.download_file("t/s.bin", out_dir / "s.bin", progress=False, expected_digest=r.digest)
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


def test_expected_digest_mismatch(store: ObjectStore, tmp_path: Path) -> None:
    src = write_random(tmp_path / "a.bin", 100)
    store.upload_file(src, "a.bin")
    with pytest.raises(IntegrityError):
        store.download_file(
            "a.bin", tmp_path / "o.bin", progress=False, expected_digest=Digest("sha256", "0" * 64)
        )
    assert not (tmp_path / "o.bin").exists()


def test_object_without_digest(target: Target, store: ObjectStore, tmp_path: Path) -> None:
    """An object written by someone else has no recorded digest: it downloads (size
    only) unless a digest is required."""
    src = write_random(tmp_path / "a.bin", target.part + 5)
    store.upload_file(src, "a.bin")
    target.replace_bytes(store, "a.bin", src.read_bytes(), keep=False)
    assert store.stat("a.bin").digest is None
    out = store.download_file("a.bin", tmp_path / "o.bin", progress=False)
    assert out.read_bytes() == src.read_bytes()
    with pytest.raises(IntegrityError, match="no digest"):
        store.download_file("a.bin", tmp_path / "o2.bin", progress=False, require_digest=True)
    assert not (tmp_path / "o2.bin").exists()


# -- containers, names, options -----------------------------------------------------------


def test_missing_container(target: Target) -> None:
    container = target.new_container()
    with pytest.raises(ContainerNotFoundError) as info:
        target.hparams(container).initialize_object()
    text = str(info.value)
    assert container in text and "does not exist" in text and "create" in text


def test_create_container(target: Target) -> None:
    container = target.new_container()
    hp = target.hparams(container)
    with hp.initialize_object(create_container=True, part_size=target.part) as store:
        store.put_bytes("a", b"1")
        assert store.get_bytes("a") == b"1"
    # Creating again is harmless, and the container is found without creating it.
    hp.initialize_object(create_container=True).close()
    hp.initialize_object().close()


def test_upload_into_missing_container(target: Target, tmp_path: Path) -> None:
    """Without the container check, an upload into a missing container says so."""
    hp = target.hparams(target.new_container())
    src = write_random(tmp_path / "a.bin", 2 * target.part + 1)
    with (
        hp.initialize_object(part_size=target.part, check=False) as store,
        pytest.raises(ContainerNotFoundError, match="does not exist"),
    ):
        store.upload_file(src, "a.bin")


@pytest.mark.parametrize(
    "name", ["../escape", "a/../../b", "/abs/path", "a//b", "a/./b", "", "a/", "x\x00y"]
)
def test_bad_object_names(store: ObjectStore, tmp_path: Path, name: str) -> None:
    src = write_random(tmp_path / "a.bin", 10)
    with pytest.raises(ConfigError):
        store.upload_file(src, name)
    with pytest.raises(ConfigError):
        store.put_bytes(name, b"x")
    with pytest.raises(ConfigError):
        store.stat(name)
    with pytest.raises(ConfigError):
        store.download_file(name, tmp_path / "o", progress=False)
    assert not (tmp_path / "escape").exists()


def test_part_size_bounds(target: Target) -> None:
    hp = target.hparams(target.new_container())
    with pytest.raises(ConfigError):
        hp.initialize_object(part_size=1, check=False)
    with pytest.raises(ConfigError):
        hp.initialize_object(concurrency=0, check=False)


def test_no_secret_in_repr_or_errors(target: Target, store: ObjectStore) -> None:
    secret = target.secret
    if target.kind == "local":
        # A directory bucket has no credentials to leak.
        assert secret is None and store.hparams.secret_environ is None
        return
    assert secret and secret not in repr(store)
    with pytest.raises(ObjectNotFoundError) as info:
        store.stat("nope")
    assert secret not in str(info.value)


def test_abort_stale_uploads(target: Target, store: ObjectStore) -> None:
    be = store.backend
    if not be.multipart:
        # GCS writes each object with one streamed PUT: there are no unfinished uploads.
        with pytest.raises(NotImplementedError):
            be.begin("stale/0.pt", {})
        assert be.list_uploads("") == [] and store.abort_stale_uploads("") == 0
        return
    ids = [be.begin(f"stale/{i}.pt", {"epoch": str(i)}) for i in range(2)]
    other = be.begin("elsewhere/x.pt", {})
    # Nothing unfinished shows up as an object.
    assert store.list("") == []
    if target.kind == "azurite":
        # Uncommitted block lists cannot be listed on Azure (the service drops them after
        # a week), so there is nothing to abort; aborting is still harmless.
        assert be.list_uploads("") == [] and store.abort_stale_uploads("") == 0
        be.abort("elsewhere/x.pt", other)
        be.abort("elsewhere/x.pt", other)
        return
    listed = be.list_uploads("stale/")
    assert sorted((n, u) for n, u, _ in listed) == sorted(
        (f"stale/{i}.pt", ids[i]) for i in range(2)
    )
    if target.kind != "moto":  # moto reports a fixed 2010 start time for every upload
        assert all(abs(t - time.time()) < 3600 for _, _, t in listed)
        assert store.abort_stale_uploads("stale/", older_than=3600) == 0
    assert store.abort_stale_uploads("stale/") == 2
    assert be.list_uploads("stale/") == []
    assert [n for n, _, _ in be.list_uploads("")] == ["elsewhere/x.pt"]
    be.abort("elsewhere/x.pt", other)
    be.abort("elsewhere/x.pt", other)  # aborting twice is harmless


# -- compare-and-swap (commit pointers) ---------------------------------------------------------

#: Which servers honour conditional writes. rclone serve s3 (1.75) ignores If-None-Match
#: and If-Match; the probe must find that out rather than trust it.
HONOURS_CONDITIONS = {
    "rclone": False,
    "moto": True,
    "azurite": True,
    "local": True,
    "fake_gcs": True,
}


def test_conditional_writes(target: Target, store: ObjectStore) -> None:
    honoured, why = store.conditions_honoured("run/.ckpt-uploader-probe")
    assert honoured is HONOURS_CONDITIONS[target.kind], why
    assert store.list("") == []  # the scratch object is gone
    if not honoured:
        assert "ignores conditional writes" in why
        return
    first = store.put_if("run/p.json", b"one", None)
    with pytest.raises(PreconditionFailedError):
        store.put_if("run/p.json", b"two", None)  # create-only: it exists now
    data, version = store.get_versioned("run/p.json")
    assert data == b"one" and version is not None and version == (first or version)
    second = store.put_if("run/p.json", b"two", version)
    with pytest.raises(PreconditionFailedError):
        store.put_if("run/p.json", b"three", version)  # a stale version loses
    data, latest = store.get_versioned("run/p.json")
    assert data == b"two" and latest != version and latest == (second or latest)
    # A conditional write is an ordinary object: digest recorded where metadata is kept.
    want = Digest("sha256", hashlib.sha256(b"two").hexdigest())
    assert store.stat("run/p.json").digest == (want if store.backend.keeps_metadata else None)
    with pytest.raises(ObjectNotFoundError):
        store.get_versioned("run/absent.json")
    # Read with a bound, as pointers are: a larger object is refused, not read whole.
    assert store.get_versioned("run/p.json", max_size=3) == (b"two", latest)
    with pytest.raises(IntegrityError, match="larger than the 2 bytes"):
        store.get_versioned("run/p.json", max_size=2)
