"""Where a file is cut into chunks for ``--dedup``: at tensor boundaries where its format
says where tensors lie, content-defined elsewhere.

An unchanged tensor is an identical byte range, so a chunker that starts a chunk at every
tensor finds each unchanged tensor exactly, whatever moved around it. Formats read here
(never by importing torch):

* **safetensors** (``*.safetensors``): an 8-byte little-endian header length, a JSON
  header whose ``data_offsets`` place each tensor in the data section after it.
* **torch's zip** (``torch.save``, what ``*.pt``/``*.bin``/``*.pth``/``*.ckpt`` usually
  are; Lightning's ``.ckpt`` and the HF Trainer's ``optimizer.pt`` among them): one
  stored (uncompressed) zip entry per tensor storage, found through the central
  directory; each entry's data is a piece of its own, and so is its local header (which
  names the archive after the file, ``epoch=3-step=9/data/0``, and carries the data's
  CRC-32, so it differs between saves whose tensor is the same).
* anything else (DCP's ``.distcp``, whose offsets are in a torch pickle; a legacy
  ``torch.save``; a log): **FastCDC** (PyPI ``fastcdc``), content-defined boundaries that
  survive insertions, average :data:`CDC_AVERAGE`.

Boundaries then become spans. In a safetensors file, pieces smaller than
:data:`MIN_CHUNK` (biases, norms, smaller matrices) are joined with their neighbours until
the chunk reaches it, and a piece of at least :data:`MIN_CHUNK` always starts its own
chunk (so a large tensor's chunks do not depend on the small ones before it). A zip's
pieces are never joined: a local header names the file it is in (Lightning's
``epoch=3-step=9.ckpt``), so joined with a tensor it would make that tensor's chunk new at
every save; headers and small storages become chunks of a few bytes, which the manifest
carries inline (:data:`uploader.transfer.chunks.INLINE_MAX`). FastCDC's pieces are its
own. Anything longer than :data:`MAX_CHUNK` is cut into pieces of :data:`MAX_CHUNK` from
its start. Sizes are chosen for requests against bytes saved (docs/benchmarks.md,
``bench/dedup.py``): a GiB of large tensors is 64 requests; MiniLM's 87 MiB (tensors of
0.6 and 2.3 MiB) are 14 chunks with a 4 MiB minimum against 41 with 1 MiB, and its
frozen-base saves add the same 0.6 MiB either way (5.6 MiB with 8 MiB); a changed tensor
costs its own bytes plus the small pieces joined with it.

Example::

    for offset, length in spans("/run/checkpoint-8/model.safetensors"):
        ...
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from collections.abc import Iterable
from pathlib import Path

__all__ = ["MAX_CHUNK", "MIN_CHUNK", "CDC_AVERAGE", "boundaries", "spans", "kind_of"]

MiB = 1 << 20
#: The longest chunk: a longer tensor or content-defined piece is cut at this length.
MAX_CHUNK = 16 * MiB
#: Pieces shorter than this are joined with their neighbours into one chunk.
MIN_CHUNK = 4 * MiB
#: FastCDC's average and smallest chunk lengths where no tensor boundaries are known.
CDC_AVERAGE = 4 * MiB
CDC_MIN = 1 * MiB
#: The most header bytes a safetensors file may claim (its own readers cap it at 100 MB).
_MAX_ST_HEADER = 100_000_000


def kind_of(path: str | os.PathLike[str]) -> str:
    """How ``path`` is cut: "safetensors", "zip" (torch.save) or "cdc"."""
    p = Path(path)
    if p.suffix == ".safetensors" and _safetensors(p) is not None:
        return "safetensors"
    if _zip(p) is not None:
        return "zip"
    return "cdc"


def boundaries(path: str | os.PathLike[str], size: int) -> tuple[str, list[int]]:
    """How ``path`` (``size`` bytes) is cut (see :func:`kind_of`) and the offsets where
    its pieces start, sorted, from 0."""
    p = Path(path)
    kind, found = "safetensors", None
    if p.suffix == ".safetensors":
        found = _safetensors(p)
    if found is None:
        kind, found = "zip", _zip(p)
    if found is None:
        kind, found = "cdc", _cdc(p, size)
    return kind, sorted({0, *(b for b in found if 0 < b < size)})


def spans(path: str | os.PathLike[str], size: int | None = None) -> list[tuple[int, int]]:
    """The chunks of ``path`` as (offset, length), in order, covering it exactly."""
    if size is None:
        size = os.stat(path).st_size
    if size == 0:
        return []
    kind, starts = boundaries(path, size)
    pieces = [(a, b - a) for a, b in zip(starts, [*starts[1:], size], strict=True)]
    if kind != "safetensors":
        return [cut for start, length in pieces for cut in _cut(start, length)]
    return list(_joined(pieces))


def _joined(pieces: list[tuple[int, int]]) -> Iterable[tuple[int, int]]:
    cur_start, cur_len = 0, 0
    for start, length in pieces:
        if length >= MIN_CHUNK or cur_len >= MIN_CHUNK:
            if cur_len:  # a large piece starts its own chunk; a full chunk is closed
                yield from _cut(cur_start, cur_len)
            cur_start, cur_len = start, length
        else:
            cur_len += length
    if cur_len:
        yield from _cut(cur_start, cur_len)


def _cut(start: int, length: int) -> Iterable[tuple[int, int]]:
    end = start + length
    while start < end:
        n = min(MAX_CHUNK, end - start)
        yield start, n
        start += n


def _safetensors(path: Path) -> list[int] | None:
    """Each tensor's start (and the data section's); None unless a safetensors file."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return None
            (n,) = struct.unpack("<Q", head)
            if not 2 <= n <= _MAX_ST_HEADER:
                return None
            header = json.loads(f.read(n))
    except (OSError, ValueError):
        return None
    if not isinstance(header, dict):
        return None
    base = 8 + n
    out = [base]
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin = int(info["data_offsets"][0])
        except (TypeError, KeyError, IndexError, ValueError):
            return None
        out.append(base + begin)
    return out


def _zip(path: Path) -> list[int] | None:
    """Each zip entry's local header and data start; None unless a zip file."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                return None
            zf = zipfile.ZipFile(f)
            out = []
            for info in zf.infolist():
                f.seek(info.header_offset)
                local = f.read(30)
                if len(local) < 30 or local[:4] != b"PK\x03\x04":
                    return None
                name_len, extra_len = struct.unpack("<HH", local[26:30])
                data = info.header_offset + 30 + name_len + extra_len
                out += [info.header_offset, data, data + info.compress_size]
            return out
    except (OSError, zipfile.BadZipFile, ValueError, struct.error):
        return None


def _cdc(path: Path, size: int) -> list[int]:
    """FastCDC's boundaries (the file mapped, not read into memory)."""
    if size <= CDC_MIN:
        return [0]
    from fastcdc import fastcdc  # noqa: PLC0415 - its import pulls click; only when needed

    return [
        c.offset
        for c in fastcdc(
            str(path),
            min_size=CDC_MIN,
            avg_size=CDC_AVERAGE,
            max_size=MAX_CHUNK,
            fat=False,
        )
    ]
