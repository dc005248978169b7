"""Azure-specific cases against Azurite: blob properties and metadata rules, block ids,
ranges, listing pages, container names, shared-key errors, restarts, Content-MD5, resets
and the public endpoint. The cases every backend shares are in test_contract.py."""

from __future__ import annotations

import base64
import threading
import time
from pathlib import Path

import pytest

from harness.data import file_digest, write_random
from harness.faultproxy import FaultPlan, FaultProxy
from harness.servers.azure import AZURITE_SECRET_ENV, Azurite
from uploader import (
    AuthError,
    ConfigError,
    ObjectNotFoundError,
    ObjectStore,
    ObjectStoreHparams,
    RetryPolicy,
    TransientError,
)
from uploader.transfer.backends.azure import AzureBackend
from uploader.transfer.store import DIGEST_META

MiB = 1 << 20


def test_metadata_and_digest_in_blob_metadata(azure_store: ObjectStore, tmp_path: Path) -> None:
    src = write_random(tmp_path / "a.bin", 5000)
    result = azure_store.upload_file(src, "m/a.bin", metadata={"Run": "r1", "rank": "0"})
    info = azure_store.backend.stat("m/a.bin")
    assert info.metadata[DIGEST_META] == str(result.digest)
    st = azure_store.stat("m/a.bin")
    assert st.metadata == {"run": "r1", "rank": "0"}
    assert st.etag and st.mtime and abs(st.mtime - time.time()) < 600
    # Multipart objects carry user metadata too (set at Put Block List).
    big = write_random(tmp_path / "b.bin", 2 * MiB + 1)
    azure_store.upload_file(big, "m/b.bin", metadata={"run": "r2"})
    assert azure_store.stat("m/b.bin").metadata == {"run": "r2"}
    assert azure_store.stat("m/b.bin").digest == file_digest(big, MiB)
    # A content type is a blob property, not metadata.
    azure_store.put_bytes("m/p.json", b"{}", {"content-type": "application/json"})
    assert azure_store.get_bytes("m/p.json") == b"{}"
    with pytest.raises(ConfigError, match="not valid on Azure"):
        azure_store.put_bytes("m/x", b"1", {"bad-key": "v"})


def test_block_ids_fixed_length_and_unique() -> None:
    ids = {AzureBackend.block_id("a" * 32, i) for i in (0, 1, 9_999, 49_999)}
    assert len(ids) == 4
    assert len({len(i) for i in ids}) == 1
    assert all(len(base64.b64decode(i)) <= 64 for i in ids)
    assert AzureBackend.block_id("b" * 32, 0) not in ids


def test_range_reads(azure_store: ObjectStore, tmp_path: Path) -> None:
    src = write_random(tmp_path / "a.bin", 3 * MiB)
    data = src.read_bytes()
    azure_store.upload_file(src, "r/a.bin")
    be = azure_store.backend
    assert b"".join(be.read_range("r/a.bin", 0, 10)) == data[:10]
    assert b"".join(be.read_range("r/a.bin", MiB - 5, 10, chunk_size=4)) == data[MiB - 5 : MiB + 5]
    assert b"".join(be.read_range("r/a.bin", 3 * MiB - 3, None)) == data[-3:]
    assert b"".join(be.read_range("r/a.bin", 3 * MiB, None)) == b""
    with pytest.raises(ObjectNotFoundError):
        list(be.read_range("r/missing", 0, 10))


def test_list_prefixes_pagination_delete(azure_store: ObjectStore) -> None:
    # More than one page (libcloud asks for 100 per request).
    names = [f"p/rank_{i % 2}/o{i:03d}" for i in range(105)]
    for n in names:
        azure_store.put_bytes(n, n.encode())
    azure_store.put_bytes("q/other", b"x")
    listed = [i.name for i in azure_store.list("p/")]
    assert listed == sorted(names)
    assert len(azure_store.list("p/rank_1/")) == 52
    assert [i.name for i in azure_store.list("q")] == ["q/other"]
    assert azure_store.list("zzz") == []
    assert azure_store.delete("q/other") is True
    assert azure_store.delete("q/other") is False
    with pytest.raises(ObjectNotFoundError):
        azure_store.stat("q/other")


def test_invalid_container_name(azurite: Azurite) -> None:
    with pytest.raises(ConfigError, match="invalid"):
        azurite.hparams("Bad_Name").initialize_object()


def test_wrong_key_is_auth_error_quickly(
    azurite: Azurite, azure_container: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = base64.b64encode(b"not the real account key, 64 bytes long..........").decode()
    monkeypatch.setenv(AZURITE_SECRET_ENV, wrong)
    start = time.monotonic()
    with pytest.raises(AuthError) as info:
        azurite.hparams(azure_container).initialize_object(create_container=True)
    assert time.monotonic() - start < 5
    assert wrong not in str(info.value)
    assert AZURITE_SECRET_ENV in str(info.value)


def test_key_not_base64(
    azurite: Azurite, azure_container: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(AZURITE_SECRET_ENV, "not base64 at all!")
    with pytest.raises(ConfigError) as info:
        azurite.hparams(azure_container).initialize_object()
    assert "not base64 at all" not in str(info.value)


def test_unreachable_endpoint_gives_up_within_bounds(azure_container: str) -> None:
    from harness.servers.net import free_port

    hp = ObjectStoreHparams(
        provider="azure_blobs",
        container=azure_container,
        key_environ="CKPTUP_TEST_AZURITE_ACCOUNT",
        secret_environ="CKPTUP_TEST_AZURITE_KEY",
        host="127.0.0.1",
        port=free_port(),
    )
    start = time.monotonic()
    from uploader import TransientError

    with pytest.raises(TransientError, match="gave up after 3 attempts"):
        hp.initialize_object(retry=RetryPolicy(attempts=3, total_seconds=5, base_delay=0.01))
    assert time.monotonic() - start < 5


def test_server_restart_within_retry_window(
    azurite: Azurite, azure_store: ObjectStore, tmp_path: Path
) -> None:
    """Stop Azurite, restart it a moment later: an upload started meanwhile succeeds."""
    src = write_random(tmp_path / "a.bin", 2 * MiB + 9)
    store = ObjectStore(
        azure_store.hparams,
        part_size=MiB,
        # bounded by time, not attempts: Azurite (node) can take seconds to start again
        retry=RetryPolicy(attempts=1000, total_seconds=60, base_delay=0.1, max_delay=0.5),
    )
    azurite.stop()
    restarter = threading.Timer(1.0, azurite.start)
    restarter.start()
    try:
        result = store.upload_file(src, "restart/a.bin")
    finally:
        restarter.join(timeout=70)
        if azurite.proc is None or azurite.proc.poll() is not None:
            azurite.start()  # leave the session fixture usable
        store.close()
    assert result.retries > 0
    out = azure_store.download_file("restart/a.bin", tmp_path / "o.bin", progress=False)
    assert file_digest(out, MiB) == result.digest


def test_md5_mismatch_is_transient(azure_store: ObjectStore) -> None:
    """Azurite rejects a block whose bytes do not match their Content-MD5 (as Azure
    does); that is damage in transit, so the store retries it."""
    be = azure_store.backend
    assert isinstance(be, AzureBackend)
    body = b"x" * 1000
    resp = be._request(
        "put",
        be._path("md5/obj"),
        "PUT",
        {"comp": "block", "blockid": be.block_id("0" * 32, 0)},
        {"Content-Length": "1000", "Content-MD5": base64.b64encode(b"0" * 16).decode()},
        body,
    )
    assert resp.status_code == 400
    err = be._fail("put", resp, "md5/obj")
    assert isinstance(err, TransientError) and "damaged in transit" in str(err)


def test_resets_mid_upload_are_retried(
    azurite: Azurite, azure_store: ObjectStore, tmp_path: Path
) -> None:
    """Connections cut by TCP resets while blocks are sent: every block is retried
    and the object arrives whole."""
    plan = FaultPlan(reset_rate=0.4, reset_after=(1, 512 << 10), max_faults=4)
    with FaultProxy((azurite.host, azurite.port), plan, seed=3) as proxy:
        hp = azure_store.hparams
        via = ObjectStoreHparams(
            provider=hp.provider,
            container=hp.container,
            key_environ=hp.key_environ,
            secret_environ=hp.secret_environ,
            host=proxy.host,
            port=proxy.port,
            extra_init_kwargs={"secure": False},
        )
        retry = RetryPolicy(attempts=6, total_seconds=30, base_delay=0.05, max_delay=0.2)
        with ObjectStore(via, part_size=MiB, retry=retry) as store:
            src = write_random(tmp_path / "a.bin", 6 * MiB + 5)
            result = store.upload_file(src, "faults/a.bin")
        assert proxy.stats()["reset"] >= 1
    assert result.retries >= 1
    out = azure_store.download_file("faults/a.bin", tmp_path / "o.bin", progress=False)
    assert file_digest(out, MiB) == file_digest(src, MiB) == result.digest


def test_public_endpoint_written_in_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """host=<account>.blob.core.windows.net addresses the account by host name, not
    by path (no request is sent)."""
    monkeypatch.setenv("T_AZ_ACCOUNT", "myacct")
    monkeypatch.setenv("T_AZ_KEY", base64.b64encode(b"k" * 64).decode())
    hp = ObjectStoreHparams(
        provider="azure_blobs",
        container="ckpts",
        key_environ="T_AZ_ACCOUNT",
        secret_environ="T_AZ_KEY",
        host="myacct.blob.core.windows.net",
    )
    conn = AzureBackend(hp.store_settings())._driver().connection
    assert conn.host == "myacct.blob.core.windows.net"
    assert conn.morph_action_hook("/ckpts/x") == "/ckpts/x"
    assert hp.secure
