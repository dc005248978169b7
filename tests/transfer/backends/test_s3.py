"""S3-specific cases against rclone serve s3 and moto_server: listing pages, the
missing-bucket message, bit rot in rclone's data directory, SigV4 credentials, restarts
and pauses, and endpoint resolution. The cases every backend shares (round trips,
metadata, ranges, listing, integrity, stale uploads) are in test_contract.py.

Both servers run on loopback (see ``harness/servers/s3.py``). Fault tests use
rclone only: moto keeps everything in memory (a restart forgets the bucket)
and checks no credentials.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.data import file_digest, write_random
from harness.servers.s3 import FAST_RETRY, S3Server
from uploader import (
    AuthError,
    ConfigError,
    ContainerNotFoundError,
    IntegrityError,
    ObjectStore,
    ObjectStoreHparams,
    RetryPolicy,
    TransientError,
)
from uploader.transfer.backends.s3 import S3Backend
from uploader.transfer.store import DIGEST_SUFFIX

MiB = 1 << 20
PART = 5 * MiB


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(4 * MiB), b""):
            h.update(block)
    return h.hexdigest()


def _round_trip(store: ObjectStore, tmp_path: Path, size: int, name: str) -> None:
    src = write_random(tmp_path / "src" / name, size, seed=size)
    result = store.upload_file(src, f"rt/{name}")
    assert result.size == size
    assert result.digest == file_digest(src, store.effective_part_size(size))
    assert result.parts == max(1, -(-size // PART))
    st = store.stat(f"rt/{name}")
    assert st.size == size
    assert st.digest == result.digest
    out = store.download_file(f"rt/{name}", tmp_path / "dst" / name, progress=False)
    assert out.stat().st_size == size
    assert _sha256(out) == _sha256(src)


@pytest.mark.slow
def test_round_trip_200mib(s3_store: ObjectStore, tmp_path: Path) -> None:
    _round_trip(s3_store, tmp_path, 200 * MiB, "big.pt")


def test_listing_pages(s3_server: S3Server, s3_store: ObjectStore) -> None:
    """Prefixes are in the contract suite; here, listing across ListObjectsV2 pages."""
    names = ["a/1", "a/2", "a/b/3", "a/b/4", "a/c", "ab/5", "b/6"]
    for n in names:
        s3_store.put_bytes(n, n.encode())
    # Pagination: two keys per page forces several ListObjectsV2 round trips.
    paged = S3Backend(
        s3_server.hparams(s3_store.hparams.container).store_settings(), list_page_size=2
    )
    try:
        before = paged.requests
        assert sorted(i.name for i in paged.list("a")) == names[:6]
        assert paged.requests - before == 3
    finally:
        paged.close()


def test_missing_bucket(s3_server: S3Server, tmp_path: Path) -> None:
    bucket = f"missing-{uuid.uuid4().hex[:10]}"
    hp = s3_server.hparams(bucket)
    t0 = time.monotonic()
    with pytest.raises(ContainerNotFoundError) as info:
        hp.initialize_object(retry=FAST_RETRY)
    assert time.monotonic() - t0 < 5
    text = str(info.value)
    assert bucket in text and "create_container=True" in text and "--create-container" in text
    with hp.initialize_object(retry=FAST_RETRY, create_container=True, part_size=PART) as store:
        src = write_random(tmp_path / "f", 100)
        store.upload_file(src, "x/f")
        assert [i.name for i in store.list("x/")] == ["x/f"]
    hp.initialize_object(retry=FAST_RETRY).close()  # exists now


# -- rclone only: data directory, credentials, faults ----------------------------------------


@pytest.fixture
def rclone_store(rclone_s3: S3Server) -> Iterator[ObjectStore]:
    if not rclone_s3.alive():
        rclone_s3.start()
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    rclone_s3.make_bucket(bucket)
    store = rclone_s3.hparams(bucket).initialize_object(part_size=PART, retry=FAST_RETRY)
    try:
        yield store
    finally:
        store.close()
        if not rclone_s3.alive():
            rclone_s3.start()


@pytest.mark.parametrize("size", [2 * MiB, 12 * MiB], ids=["single", "multipart"])
def test_corrupted_object_is_rejected(
    rclone_s3: S3Server, rclone_store: ObjectStore, tmp_path: Path, size: int
) -> None:
    src = write_random(tmp_path / "src", size)
    rclone_store.upload_file(src, "c/ep1.pt")
    assert rclone_s3.data_dir is not None
    on_disk = rclone_s3.data_dir / rclone_store.hparams.container / "c" / "ep1.pt"
    before = on_disk.stat()
    with open(on_disk, "r+b") as f:  # bit rot: same size and mtime, one byte differs
        f.seek(size // 2)
        byte = f.read(1)
        f.seek(size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    # rclone forgets an object's metadata when its mtime moves; silent rot keeps it.
    os.utime(on_disk, ns=(before.st_atime_ns, before.st_mtime_ns))
    dest = tmp_path / "restore"
    dest.mkdir()
    with pytest.raises(IntegrityError, match="corrupt"):
        rclone_store.download_file("c/ep1.pt", dest / "ep1.pt", progress=False)
    assert list(dest.iterdir()) == []


def test_wrong_credentials_fail_once(rclone_s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = "wrong-secret-" + uuid.uuid4().hex
    monkeypatch.setenv("CKPT_TEST_WRONG_SECRET", wrong)
    hp = rclone_s3.hparams(secret_environ="CKPT_TEST_WRONG_SECRET")
    backend = S3Backend(hp.store_settings())
    t0 = time.monotonic()
    with pytest.raises(AuthError) as info:
        ObjectStore(hp, backend=backend, retry=RetryPolicy(attempts=8, base_delay=1.0))
    assert time.monotonic() - t0 < 2
    assert backend.requests == 1  # permanent: no retry storm
    text = str(info.value)
    assert "CKPT_TEST_WRONG_SECRET" in text
    assert wrong not in text and rclone_s3.key not in text
    assert "Signature=" not in text and "AWS4-HMAC" not in text
    # An unknown key is refused the same way.
    monkeypatch.setenv(rclone_s3.key_env, "NOSUCHKEY1234")
    with pytest.raises(AuthError):
        S3Backend(rclone_s3.hparams().store_settings()).check_container()
    backend.close()


def _slow_retry(seconds: float) -> RetryPolicy:
    return RetryPolicy(attempts=100, total_seconds=seconds, base_delay=0.05, max_delay=0.3)


def test_server_restarted_during_upload(
    rclone_s3: S3Server, rclone_store: ObjectStore, tmp_path: Path
) -> None:
    """The server goes away and comes back on the same port within the retry window;
    stale keep-alive connections and refused connections are retried."""
    src = write_random(tmp_path / "src", 4 * PART + 123)
    hp = rclone_store.hparams
    with hp.initialize_object(part_size=PART, concurrency=2, retry=_slow_retry(30)) as store:
        store.put_bytes("warm/x", b"x")  # leaves open keep-alive connections behind
        rclone_s3.stop()
        result: dict[str, object] = {}

        def upload() -> None:
            try:
                result["ok"] = store.upload_file(src, "restart/ep1.pt")
            except BaseException as exc:  # reported below
                result["err"] = exc

        t = threading.Thread(target=upload)
        t.start()
        time.sleep(1.0)
        rclone_s3.start()
        t.join(30)
        assert not t.is_alive()
        assert "err" not in result, result.get("err")
        assert store.retries.n > 0
        out = store.download_file("restart/ep1.pt", tmp_path / "out", progress=False)
        assert _sha256(out) == _sha256(src)


def test_idle_connection_closed_by_server_is_reopened(
    rclone_s3: S3Server, rclone_store: ObjectStore
) -> None:
    """Keep-alive connections the server dropped are replaced without a retry."""
    rclone_store.put_bytes("idle/x", b"12345")
    rclone_s3.stop()
    rclone_s3.start()
    before = rclone_store.retries.n
    assert rclone_store.stat("idle/x").size == 5
    assert rclone_store.retries.n == before


def test_server_paused_mid_upload(
    rclone_s3: S3Server, rclone_store: ObjectStore, tmp_path: Path
) -> None:
    """The server freezes (SIGSTOP) while parts are in flight and resumes (SIGCONT):
    timed-out parts are sent again and the object is whole."""
    src = write_random(tmp_path / "src", 8 * PART)
    hp = rclone_s3.hparams(rclone_store.hparams.container, extra_init_kwargs={"timeout": 1.0})
    sent = threading.Event()
    total = [0]

    def progress(n: int) -> None:
        total[0] += n
        if total[0] >= 2 * PART:
            sent.set()

    assert rclone_s3.proc is not None
    pid = rclone_s3.proc.pid
    with hp.initialize_object(part_size=PART, concurrency=2, retry=_slow_retry(30)) as store:
        result: dict[str, object] = {}

        def upload() -> None:
            try:
                result["ok"] = store.upload_file(src, "pause/ep1.pt", progress=progress)
            except BaseException as exc:  # reported below
                result["err"] = exc

        t = threading.Thread(target=upload)
        t.start()
        try:
            assert sent.wait(20)
            os.kill(pid, signal.SIGSTOP)
            time.sleep(2.5)
        finally:
            os.kill(pid, signal.SIGCONT)
        t.join(40)
        assert not t.is_alive()
        assert "err" not in result, result.get("err")
        assert store.retries.n > 0
        out = store.download_file("pause/ep1.pt", tmp_path / "out", progress=False)
        assert _sha256(out) == _sha256(src)


def test_server_that_stays_down(
    rclone_s3: S3Server, rclone_store: ObjectStore, tmp_path: Path
) -> None:
    src = write_random(tmp_path / "src", 2 * PART)
    policy = RetryPolicy(attempts=5, total_seconds=3.0, base_delay=0.1, max_delay=0.5)
    with rclone_store.hparams.initialize_object(part_size=PART, retry=policy) as store:
        rclone_s3.stop()
        t0 = time.monotonic()
        with pytest.raises(TransientError, match="gave up after") as info:
            store.upload_file(src, "down/ep1.pt")
        assert time.monotonic() - t0 < 6
        assert "Connection refused" in str(info.value) or "refused" in repr(info.value.__cause__)
    rclone_s3.start()
    assert not rclone_store.exists("down/ep1.pt")
    assert not rclone_store.exists("down/ep1.pt" + DIGEST_SUFFIX)


def _endpoint_backend(monkeypatch: pytest.MonkeyPatch, **fields: object) -> S3Backend:
    """An S3Backend for hparams ``fields`` with placeholder credentials (nothing is sent)."""
    monkeypatch.setenv("CKPT_TEST_EP_KEY", "AKIAEXAMPLE")
    monkeypatch.setenv("CKPT_TEST_EP_SECRET", "example-secret-value")
    hp = ObjectStoreHparams(
        container="b",
        key_environ="CKPT_TEST_EP_KEY",
        secret_environ="CKPT_TEST_EP_SECRET",
        **fields,  # type: ignore[arg-type]
    )
    return S3Backend(hp.store_settings())


@pytest.mark.parametrize(
    ("fields", "endpoint"),
    [
        ({"provider": "s3"}, ("s3.amazonaws.com", 443, "us-east-1", True)),
        ({"provider": "s3_eu_west"}, ("s3-eu-west-1.amazonaws.com", 443, "eu-west-1", True)),
        (
            {"provider": "s3", "region": "xx-new-1"},
            ("s3.xx-new-1.amazonaws.com", 443, "xx-new-1", True),
        ),
        (
            {"provider": "digitalocean_spaces", "region": "ams3"},
            ("ams3.digitaloceanspaces.com", 443, "ams3", True),
        ),
        (
            {"provider": "minio", "host": "127.0.0.1", "port": 9000},
            ("127.0.0.1", 9000, "us-east-1", False),
        ),
        (
            {"provider": "s3", "host": "10.0.0.5", "port": 9000},
            ("10.0.0.5", 9000, "us-east-1", True),
        ),
        ({"provider": "s3", "host": "minio.internal"}, ("minio.internal", 443, "us-east-1", True)),
        (
            {"provider": "s3", "host": "10.0.0.5", "region": "eu-west-3"},
            ("10.0.0.5", 443, "eu-west-3", True),
        ),
    ],
)
def test_endpoint_resolution(
    monkeypatch: pytest.MonkeyPatch, fields: dict[str, object], endpoint: tuple[object, ...]
) -> None:
    """libcloud's driver table decides host and region; nothing is sent."""
    backend = _endpoint_backend(monkeypatch, **fields)
    assert (backend.host, backend.port, backend.region, backend.secure) == endpoint
    assert backend.requests == 0


@pytest.mark.parametrize("fields", [{"host": "10.0.0.5", "port": 9000}, {"host": "minio.internal"}])
def test_an_explicit_endpoint_agrees_with_libcloud(
    monkeypatch: pytest.MonkeyPatch, fields: dict[str, object]
) -> None:
    """With an explicit endpoint the backend does not ask libcloud (a faster start-up), and
    says what libcloud's S3 driver would: host, port (or the scheme's) and its region."""
    from libcloud.storage.providers import get_driver

    backend = _endpoint_backend(monkeypatch, provider="s3", **fields)
    driver = get_driver("s3")("k", "s", secure=True, **fields)
    want = (driver.connection.host, int(driver.connection.port), driver.region_name)
    assert (backend.host, backend.port, backend.region) == want


def test_pull_from_an_explicit_endpoint_does_not_import_libcloud() -> None:
    """What ``ckpt-uploader pull s3://b/x?endpoint=...`` imports to open its store."""
    code = (
        "import sys, os; os.environ['K'] = os.environ['S'] = 'x';"
        "from uploader import ObjectStoreHparams as H;"
        "from uploader.transfer.backends.s3 import S3Backend;"
        "S3Backend(H.from_uri('s3://b?endpoint=http://127.0.0.1:9', key_environ='K',"
        " secret_environ='S').store_settings());"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('libcloud', 'requests')))"
    )
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert got.stdout.strip() == "[]", got.stdout


def test_endpoint_required_for_minio(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="give host"):
        _endpoint_backend(monkeypatch, provider="minio")
