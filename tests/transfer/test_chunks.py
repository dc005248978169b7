"""Chunks of ``--dedup``: where files are cut (safetensors, torch.save zips, FastCDC), chunk
objects' bodies, and a file sent and put back together through a real store (LOCAL)."""

from __future__ import annotations

import json
import os
import random
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from uploader import IntegrityError, ObjectNotFoundError, ObjectStore
from uploader.transfer.chunk_restore import restore_file, stream_chunks
from uploader.transfer.chunking import MAX_CHUNK, MIN_CHUNK, kind_of, spans
from uploader.transfer.chunks import (
    INLINE_MAX,
    Chunk,
    ChunkWriter,
    check_chunk,
    chunk_object,
    chunk_prefix,
    decode_chunk,
    encode_chunk,
)
from uploader.transfer.digest import crc64nvme

MiB = 1 << 20


def write_safetensors(path: Path, tensors: list[tuple[str, bytes]]) -> list[int]:
    """A safetensors file of raw byte tensors; each tensor's offset in the file."""
    header, off = {}, 0
    for name, data in tensors:
        header[name] = {"dtype": "U8", "shape": [len(data)], "data_offsets": [off, off + len(data)]}
        off += len(data)
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(d for _, d in tensors))
    base = 8 + len(h)
    return [base + header[n]["data_offsets"][0] for n, _ in tensors]


def _check_cover(cuts: list[tuple[int, int]], size: int) -> None:
    pos = 0
    for offset, length in cuts:
        assert offset == pos and 0 < length <= MAX_CHUNK
        pos += length
    assert pos == size


def test_safetensors_chunks_start_at_every_large_tensor(tmp_path: Path) -> None:
    rng = random.Random(1)
    tensors = [("norm.0", rng.randbytes(4096)), ("w.0", rng.randbytes(3 * MiB))]
    tensors += [(f"b.{i}", rng.randbytes(1000)) for i in range(30)]
    tensors += [("embed", rng.randbytes(MAX_CHUNK + 5 * MiB)), ("w.1", rng.randbytes(2 * MiB))]
    path = tmp_path / "model.safetensors"
    offsets = write_safetensors(path, tensors)
    cuts = spans(path)
    assert kind_of(path) == "safetensors"
    _check_cover(cuts, path.stat().st_size)
    starts = {o for o, _ in cuts}
    big = [
        off for (name, data), off in zip(tensors, offsets, strict=True) if len(data) >= MIN_CHUNK
    ]
    assert set(big) <= starts  # every large tensor starts a chunk of its own
    embed = offsets[-2]
    assert (embed, MAX_CHUNK) in cuts and (embed + MAX_CHUNK, 5 * MiB) in cuts
    # the 30 small tensors are joined, not one chunk (one request) each
    assert len(cuts) < 10


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 3 * MiB), min_size=1, max_size=12), seed=st.integers(0, 99))
def test_any_safetensors_layout_is_covered_and_changing_one_tensor_changes_few_chunks(
    tmp_path_factory: pytest.TempPathFactory, sizes: list[int], seed: int
) -> None:
    tmp = tmp_path_factory.mktemp("st")
    rng = random.Random(seed)
    tensors = [(f"t{i}", rng.randbytes(n)) for i, n in enumerate(sizes)]
    a, b = tmp / "a.safetensors", tmp / "b.safetensors"
    write_safetensors(a, tensors)
    k = rng.randrange(len(tensors))
    changed = list(tensors)
    changed[k] = (tensors[k][0], rng.randbytes(len(tensors[k][1])))
    write_safetensors(b, changed)
    ca, cb = spans(a), spans(b)
    _check_cover(ca, a.stat().st_size)
    assert ca == cb  # same layout, same cuts
    da, db = a.read_bytes(), b.read_bytes()
    differ = sum(n for o, n in ca if da[o : o + n] != db[o : o + n])
    # only the chunk(s) holding the changed tensor differ: its bytes, plus neighbours
    # joined with it when it is small
    assert differ <= len(tensors[k][1]) + 2 * MIN_CHUNK


def test_torch_save_zip_cuts_at_its_storages_so_unchanged_tensors_are_equal_chunks(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    frozen = {f"enc.{i}": torch.randn(512, 1024) for i in range(4)}  # 2 MiB each
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save({**frozen, "head": torch.randn(256, 1024)}, a)
    torch.save({**frozen, "head": torch.randn(256, 1024)}, b)
    assert kind_of(a) == "zip"

    def chunks(p: Path) -> set[bytes]:
        data = p.read_bytes()
        _check_cover(spans(p), len(data))
        return {data[o : o + n] for o, n in spans(p)}

    shared = chunks(a) & chunks(b)
    assert sum(len(c) for c in shared) >= 4 * 2 * MiB  # every frozen tensor's bytes


def test_tiny_chunks_live_in_the_manifest_not_as_objects(
    local_store: ObjectStore, local_bucket: Path, tmp_path: Path
) -> None:
    """A torch.save zip's entry headers (about 100 bytes each, named after the file) are
    chunks of their own; kept inline, they cost no request and no object."""
    torch.manual_seed(1)
    path = tmp_path / "epoch=0-step=8.ckpt"
    torch.save({f"w{i}": torch.randn(512, 1024) for i in range(6)}, path)
    got = ChunkWriter(local_store, "s").upload_file(path)
    inline = [c for c in got.chunks if c.data is not None]
    stored = [c for c in got.chunks if c.data is None]
    assert len(inline) >= 6 and all(c.size <= INLINE_MAX for c in inline)
    objects = list((local_bucket / chunk_prefix("s")).iterdir())
    assert sorted(p.name for p in objects) == sorted({c.hash for c in stored})
    back = [Chunk.from_json(json.loads(json.dumps(c.to_json()))) for c in got.chunks]
    assert back == list(got.chunks)
    out = restore_file(local_store, "s", back, tmp_path / "o" / path.name, got.size, got.digest)
    assert out.read_bytes() == path.read_bytes()


def test_other_files_get_content_defined_cuts_that_survive_an_insertion(tmp_path: Path) -> None:
    rng = random.Random(2)
    data = rng.randbytes(40 * MiB)
    a, b = tmp_path / "a.distcp", tmp_path / "b.distcp"
    a.write_bytes(data)
    b.write_bytes(data[: 20 * MiB] + b"inserted" + data[20 * MiB :])
    assert kind_of(a) == "cdc"
    ca, cb = spans(a), spans(b)
    _check_cover(ca, len(data))
    pieces_a = {data[o : o + n] for o, n in ca}
    bb = b.read_bytes()
    pieces_b = {bb[o : o + n] for o, n in cb}
    same = sum(len(p) for p in pieces_a & pieces_b)
    assert same >= 0.6 * len(data)  # fixed-size cuts would share only the first half


def test_chunk_bodies_compress_when_it_pays_and_refuse_any_damage() -> None:
    zeros = bytes(4 * MiB)
    noise = random.Random(3).randbytes(MiB)
    for raw in (zeros, noise):
        from blake3 import blake3

        c = Chunk(blake3(raw).hexdigest(), len(raw))
        body = encode_chunk(raw)
        assert body[:4] == b"CKC1"
        assert (len(body) < len(raw) // 10) == (raw is zeros)
        assert decode_chunk(body, c, "x") == raw
        for bad in (
            body[:4] + b"\x07" + body[5:],  # unknown encoding
            b"XXXX" + body[4:],  # not a chunk object
            body[:-1],  # truncated
            body[:100] + bytes([body[100] ^ 1]) + body[101:],  # one flipped bit
        ):
            with pytest.raises(IntegrityError):
                decode_chunk(bad, c, "x")
    with pytest.raises(IntegrityError, match="manifest says"):
        decode_chunk(encode_chunk(noise), Chunk(c.hash, len(noise) - 1), "x")


def test_a_second_file_sends_only_its_new_chunks_and_restores_verified(
    local_store: ObjectStore, tmp_path: Path
) -> None:
    rng = random.Random(4)
    base = [(f"frozen.{i}", rng.randbytes(3 * MiB)) for i in range(6)]
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_safetensors(a, [*base, ("head", rng.randbytes(2 * MiB))])
    write_safetensors(b, [*base, ("head", rng.randbytes(2 * MiB))])
    writer = ChunkWriter(local_store, "scope")  # no index: the store is asked (HEAD)
    ra = writer.upload_file(a)
    rb = writer.upload_file(b)
    assert ra.new_bytes == a.stat().st_size
    assert 2 * MiB <= rb.new_bytes < 2 * MiB + MIN_CHUNK
    assert str(rb.digest) == f"crc64nvme:{crc64nvme(b.read_bytes()):016x}"
    out = restore_file(local_store, "scope", rb.chunks, tmp_path / "out" / "b", rb.size, rb.digest)
    assert out.read_bytes() == b.read_bytes()
    got = bytearray()
    stream_chunks(local_store, "scope", rb.chunks, got.extend, rb.size, rb.digest)
    assert bytes(got) == b.read_bytes()
    assert check_chunk(local_store, chunk_object("scope", rb.chunks[-1].hash)) > 0


def test_a_damaged_or_missing_chunk_is_refused_and_leaves_no_file(
    local_store: ObjectStore, local_bucket: Path, tmp_path: Path
) -> None:
    src = tmp_path / "model.safetensors"
    write_safetensors(src, [(f"w{i}", os.urandom(2 * MiB)) for i in range(3)])
    got = ChunkWriter(local_store, "s").upload_file(src)
    victim = local_bucket / chunk_object("s", got.chunks[1].hash)
    body = bytearray(victim.read_bytes())
    body[-10] ^= 0xFF
    victim.write_bytes(bytes(body))
    target = tmp_path / "out" / "model.safetensors"
    with pytest.raises(IntegrityError, match="does not hash to its name"):
        restore_file(local_store, "s", got.chunks, target, got.size, got.digest)
    assert not target.exists() and not list(target.parent.iterdir())
    victim.unlink()
    with pytest.raises(ObjectNotFoundError, match=got.chunks[1].hash):
        restore_file(local_store, "s", got.chunks, target, got.size, got.digest)
    assert not target.exists()
    # a manifest whose digest is not the file's is caught after the chunks check out
    other = ChunkWriter(local_store, "s").upload_file(src)  # sends the missing chunk again
    with pytest.raises(IntegrityError, match="digest"):
        restore_file(
            local_store, "s", other.chunks, target, other.size, "crc64nvme:0123456789abcdef"
        )
