"""Content digests: CRC64NVME of the whole file combined from its parts (the default);
with the sha256 kind, plain sha256 for one part, sha256 over part digests for more."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.data import write_random
from uploader import Digest, IntegrityError, ObjectStore, ObjectStoreHparams
from uploader.transfer.digest import (
    PartHasher,
    combine_parts,
    crc64nvme,
    crc64nvme_b64,
    crc64nvme_combine,
)

KiB = 1 << 10


def _expected(data: bytes, part: int) -> Digest:
    if len(data) <= part:
        return Digest("sha256", hashlib.sha256(data).hexdigest())
    parts = b"".join(hashlib.sha256(data[i : i + part]).digest() for i in range(0, len(data), part))
    return Digest("sha256-parts", hashlib.sha256(parts).hexdigest(), part)


def _local_store(tmp_path: Path, concurrency: int = 4, digest: str = "sha256") -> ObjectStore:
    bucket = tmp_path / "bucket"
    bucket.mkdir(exist_ok=True)
    hp = ObjectStoreHparams(provider="local", container=str(bucket))
    return hp.initialize_object(part_size=64 * KiB, concurrency=concurrency, digest=digest)


def test_crc64nvme_is_the_check_value_of_the_standard_and_combines() -> None:
    # CRC-64/NVME's check value (the CRC of "123456789") in the catalogue of CRCs.
    assert crc64nvme(b"123456789") == 0xAE8B14860A799888
    assert crc64nvme_b64(0xAE8B14860A799888) == "rosUhgp5mIg="
    a, b = b"x" * 1000, bytes(range(256)) * 3
    assert crc64nvme_combine(crc64nvme(a), crc64nvme(b), len(b)) == crc64nvme(a + b)
    assert crc64nvme(b, crc64nvme(a)) == crc64nvme(a + b)


@pytest.mark.parametrize("size", [0, 1, 64 * KiB - 1, 64 * KiB, 64 * KiB + 1, 300 * KiB])
def test_default_upload_digest_is_the_files_crc64nvme(tmp_path: Path, size: int) -> None:
    path = write_random(tmp_path / "f", size, seed=size)
    want = Digest("crc64nvme", f"{crc64nvme(path.read_bytes()):016x}")
    with _local_store(tmp_path, digest="crc64nvme") as store:
        d = store.upload_file(path, "f").digest
        assert d == want and str(d) == f"crc64nvme:{want.hex}"
        assert store.stat("f").digest == d
    with _local_store(tmp_path, concurrency=1, digest="crc64nvme") as store:
        assert store.upload_file(path, "f1").digest == d
    hp = ObjectStoreHparams(provider="local", container=str(tmp_path / "bucket"))
    with hp.initialize_object(part_size=64 * KiB) as store:
        assert store.digest == "crc64nvme"  # the default
        assert store.upload_file(path, "f2").digest == d


def test_an_unknown_digest_kind_is_refused(tmp_path: Path) -> None:
    from uploader.errors import ConfigError

    with pytest.raises(ConfigError, match="crc64nvme, sha256"):
        _local_store(tmp_path, digest="md5")


def test_crc_part_hasher_combines_parts_of_any_order() -> None:
    data = bytes(range(256)) * 10
    h = PartHasher(len(data), 1000, "crc64nvme")
    for i in (2, 1, 0):
        h.add(i, crc64nvme(data[i * 1000 : (i + 1) * 1000]).to_bytes(8, "big"))
    assert h.digest() == Digest("crc64nvme", f"{crc64nvme(data):016x}")


@pytest.mark.parametrize("size", [0, 1, 64 * KiB - 1, 64 * KiB, 64 * KiB + 1, 300 * KiB])
def test_upload_digest_matches_definition(tmp_path: Path, size: int) -> None:
    path = write_random(tmp_path / "f", size, seed=size)
    data = path.read_bytes()
    with _local_store(tmp_path) as store:
        d = store.upload_file(path, "f").digest
        assert d == _expected(data, 64 * KiB)
        assert store.stat("f").digest == d  # what a download checks against
    # The number of threads hashing parts does not change the result.
    with _local_store(tmp_path, concurrency=1) as store:
        assert store.upload_file(path, "f1").digest == d
    if size <= 64 * KiB:
        assert str(d) == "sha256:" + hashlib.sha256(data).hexdigest()  # what sha256sum prints


def test_part_hasher_out_of_order_and_missing() -> None:
    data = bytes(range(256)) * 10  # 2560 bytes
    h = PartHasher(len(data), 1000)
    assert h.count == 3
    for i in (2, 0):
        h.add(i, hashlib.sha256(data[i * 1000 : (i + 1) * 1000]).digest())
    with pytest.raises(ValueError, match="not hashed"):
        h.digest()
    h.add(1, hashlib.sha256(data[1000:2000]).digest())
    assert h.digest() == _expected(data, 1000)
    assert PartHasher(0, 1000).count == 1


def test_combine_parts_rules() -> None:
    assert combine_parts([], 0, 10) == Digest("sha256", hashlib.sha256(b"").hexdigest())
    with pytest.raises(ValueError):
        combine_parts([b"a" * 32, b"b" * 32], 5, 10)


def test_download_verifies_digest(tmp_path: Path) -> None:
    path = write_random(tmp_path / "f", 200 * KiB)
    d = _expected(path.read_bytes(), 64 * KiB)
    out = tmp_path / "out"
    with _local_store(tmp_path) as store:
        assert store.upload_file(path, "f").digest == d
        assert store.download_file("f", out / "a", progress=False).read_bytes() == path.read_bytes()
        store.download_file(
            "f", out / "b", progress=False, expected_digest=str(d), expected_size=200 * KiB
        )
        with pytest.raises(IntegrityError, match="bytes"):
            store.download_file("f", out / "c", progress=False, expected_size=1)
        with open(tmp_path / "bucket" / "f", "r+b") as f:  # damage the stored object
            f.seek(100)
            f.write(b"\x00\x01\x02")
        with pytest.raises(IntegrityError, match="do not use it"):
            store.download_file("f", out / "d", progress=False)
        assert not (out / "c").exists() and not (out / "d").exists()
        store.put_bytes("s", b"hello")
        store.download_file(
            "s", out / "s", progress=False, expected_digest=hashlib.sha256(b"hello").hexdigest()
        )
        with pytest.raises(IntegrityError):
            store.download_file(
                "s", out / "t", progress=False, expected_digest="sha256:" + "0" * 64
            )


def test_parse_forms() -> None:
    hexd = "ab" * 32
    assert Digest.parse(" crc64nvme:AE8B14860A799888\n") == Digest("crc64nvme", "ae8b14860a799888")
    assert Digest.parse("crc64nvme:ae8b14860a799888").kind == "crc64nvme"
    assert Digest.parse(hexd).kind == "sha256"
    assert Digest.parse(hexd) == Digest("sha256", hexd)
    assert Digest.parse(" sha256:" + hexd.upper() + "\n") == Digest("sha256", hexd)
    assert Digest.parse(f"sha256-parts:1048576:{hexd}") == Digest("sha256-parts", hexd, 1048576)
    for bad in (
        "",
        "md5:" + hexd,
        "sha256:" + hexd[:-1],
        "sha256:" + "zz" * 32,
        f"sha256-parts:0:{hexd}",
        f"sha256-parts:-5:{hexd}",
        f"sha256-parts:x:{hexd}",
        f"sha256-parts:{hexd}",
        "\u0663" * 64,  # Arabic-Indic digits: int() takes them, a digest must not
        f"sha256-parts:\uff15:{hexd}",
        "crc64nvme:" + "ab" * 7,
        "crc64nvme:" + "ab" * 9,
        "crc64nvme:" + "\u0663" * 16,
        "crc64nvme-parts:1:" + "ab" * 8,
    ):
        with pytest.raises(IntegrityError, match="unrecognised digest"):
            Digest.parse(bad)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=120))
def test_parse_never_raises_anything_but_integrity_error(text: str) -> None:
    try:
        d = Digest.parse(text)
    except IntegrityError:
        return
    assert Digest.parse(str(d)) == d


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.integers(min_value=1, max_value=2**40))
def test_str_parse_round_trip(raw: bytes, part: int) -> None:
    hexd = raw.hex()
    crc = Digest("crc64nvme", raw[:8].hex())
    for d in (Digest("sha256", hexd), Digest("sha256-parts", hexd, part), crc):
        assert Digest.parse(str(d)) == d
        assert Digest.parse(str(d).replace(d.hex, d.hex.upper())) == d
