"""Manifest objects: a large manifest stored as an object of its own, named by the pointer.

A directory checkpoint of many files (a sharded DCP checkpoint of 10,000 files makes
about 1.2 MB of manifest) would make every pointer that names it large, and a pointer
is read whole by every commit and every restore. So when an entry's manifest takes more
than :data:`INLINE_MANIFEST_BYTES` of JSON, :func:`store_manifest` writes it as
``{prefix}/rank_N/.ckpt-uploader/manifests/{name}.{16 hex}.json``::

    {"format": "ckpt-uploader/manifest/1", "name": "checkpoint-16",
     "files": [{"path": "checkpoint-16/model-00001.safetensors", "size": 100,
                "digest": "sha256:..."}, ...]}

before the pointer that names it is written (durable before visible), and the entry
carries a :class:`ManifestRef` (the object, its size, the sha256 of its bytes, its file
count) instead of its files. :func:`load_manifest` reads it back with the size the
pointer records as its bound, checks the sha256 and the checkpoint's digest, and applies
the same checks as to a manifest inside the pointer. Retention deletes a manifest object
with its checkpoint's files, after the pointer that no longer names it is written.

A **chunked** checkpoint (``--dedup``, :mod:`uploader.transfer.chunks`) always has its
manifest as an object, whatever its size (a single file too), of the second format::

    {"format": "ckpt-uploader/manifest/2", "name": "checkpoint-16", "scope_up": 0,
     "files": [{"path": "checkpoint-16/model.safetensors", "size": 100,
                "digest": "crc64nvme:<16 hex>", "chunks": [["<blake3 hex>", 100]]}, ...]}

(a chunk of at most 4 KiB carries its bytes: ``["<blake3 hex>", 112, "<base64>"]``)

``scope_up`` says where its chunks are: the run's prefix (the pointer's, ``{prefix}``)
with that many trailing path parts removed is the scope, and the chunks are under
``{scope}/.ckpt-uploader/chunks/``; relative, so a run copied to another prefix with its
scope still restores. Each file's chunks, in order, add up to its size; its digest is
the CRC64NVME of the whole file. The pointer's reference says ``"chunked": true`` (and the
bytes this checkpoint added to the scope, ``"stored"``); a pointer holding one is of
format 4, which older versions refuse with "upgrade" rather than misread.

Example::

    entry = store_manifest(store, entry)      # before the pointer write
    ...
    entry = load_manifest(store, entry)       # a reader: entry.files are now at hand
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from uploader.bucket.format import (
    INLINE_MANIFEST_BYTES,
    MANIFEST_DIR,
    MAX_POINTER_BYTES,
    ManifestFile,
    ManifestRef,
    PointerEntry,
    check_manifest,
    manifest_digest,
    manifest_object,
)
from uploader.errors import IntegrityError, ObjectNotFoundError, PermanentError

if TYPE_CHECKING:  # pragma: no cover
    from uploader.transfer.store import ObjectStore

__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_FORMAT_CHUNKED",
    "run_prefix",
    "scope_up",
    "MAX_MANIFEST_BYTES",
    "INLINE_MANIFEST_BYTES",
    "encode_manifest",
    "is_manifest_object",
    "load_manifest",
    "store_manifest",
]

MANIFEST_FORMAT = "ckpt-uploader/manifest/1"
#: The manifest of a chunked checkpoint: each file's chunks, and the scope they are in.
MANIFEST_FORMAT_CHUNKED = "ckpt-uploader/manifest/2"
#: The most bytes of a manifest object, written or read (about 500,000 files): the
#: bound a pointer had when it held every manifest itself, so nothing that could be
#: committed before is refused now.
MAX_MANIFEST_BYTES = MAX_POINTER_BYTES
_META = {"content-type": "application/json"}


def is_manifest_object(name: str) -> bool:
    """Whether object ``name`` is a manifest object (``.../.ckpt-uploader/manifests/...``)."""
    return name.startswith(MANIFEST_DIR + "/") or f"/{MANIFEST_DIR}/" in name


def _inline_size(files: tuple[ManifestFile, ...]) -> int:
    return len(json.dumps([f.to_dict() for f in files], separators=(",", ":")))


def run_prefix(entry: PointerEntry) -> str:
    """The run's prefix (the pointer's) that ``entry``'s objects are under:
    ``entry.object`` is ``{prefix}/rank_N/{name}``."""
    rank_dir = entry.object[: len(entry.object) - len(entry.name)].rstrip("/")
    return rank_dir.rsplit("/", 1)[0] if "/" in rank_dir else ""


def _parts(prefix: str) -> list[str]:
    return [p for p in prefix.strip("/").split("/") if p]


def scope_up(entry: PointerEntry, scope: str) -> int:
    """How many trailing parts of the run's prefix to drop to reach ``scope``; ValueError
    unless ``scope`` is that prefix or a parent of it."""
    run, up = _parts(run_prefix(entry)), _parts(scope)
    if run[: len(up)] != up:
        raise ValueError(
            f"dedup scope {scope!r} is not the run's prefix {run_prefix(entry)!r} or a parent of it"
        )
    return len(run) - len(up)


def _scope_of(entry: PointerEntry, up: object) -> str:
    run = _parts(run_prefix(entry))
    if not isinstance(up, int) or isinstance(up, bool) or not 0 <= up <= len(run):
        raise ValueError(f"scope_up {up!r} is not 0 to {len(run)}")
    return "/".join(run[: len(run) - up])


def encode_manifest(entry: PointerEntry) -> bytes:
    """The bytes of ``entry``'s manifest object."""
    body: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "name": entry.name,
        "files": [f.to_dict() for f in entry.files],
    }
    if entry.chunked:
        if entry.scope is None:
            raise ValueError(f"chunked checkpoint {entry.name!r} has no scope")
        body["format"] = MANIFEST_FORMAT_CHUNKED
        body["scope_up"] = scope_up(entry, entry.scope)
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


def store_manifest(store: ObjectStore, entry: PointerEntry) -> PointerEntry:
    """``entry`` as the pointer is to hold it: unchanged when its manifest is small (or
    already stored); else its manifest is written as an object of its own, now, and the
    entry returned names it (keeping its files in memory for this process).

    Raises PermanentError when the manifest is larger than readers accept
    (:data:`MAX_MANIFEST_BYTES`).
    """
    chunked = entry.chunked
    if entry.manifest_ref is not None or not entry.files:
        return entry
    if not chunked and (
        not entry.is_directory or _inline_size(entry.files) <= INLINE_MANIFEST_BYTES
    ):
        return entry
    data = encode_manifest(entry)
    if len(data) > MAX_MANIFEST_BYTES:
        raise PermanentError(
            f"checkpoint {entry.name!r} has {len(entry.files)} files; its manifest takes "
            f"{len(data)} bytes, more than the {MAX_MANIFEST_BYTES} a reader accepts: save "
            "it as fewer, larger files"
        )
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    name = manifest_object(entry.object, entry.name, digest)
    store.put_bytes(name, data, _META)
    stored = entry.stored if chunked else None
    ref = ManifestRef(name, len(data), digest, len(entry.files), chunked, stored)
    return replace(entry, manifest_ref=ref)


def load_manifest(store: ObjectStore, entry: PointerEntry) -> PointerEntry:
    """``entry`` with its files at hand: read from its manifest object when the pointer
    names one (else ``entry`` itself).

    The object is read with the size the pointer records as its bound, and must match
    the recorded sha256, name the checkpoint, list the recorded number of files, each
    inside the checkpoint, and have the checkpoint's digest. Raises IntegrityError (what
    is wrong and what to do) otherwise, and ObjectNotFoundError when it is missing.
    """
    ref = entry.manifest_ref
    if ref is None or entry.files:
        return entry
    what = f"manifest object {ref.object} of checkpoint {entry.name!r}"
    redo = (
        "restore another checkpoint (see 'ckpt-uploader ls'), or upload this one again "
        "with 'ckpt-uploader push' to write its manifest anew"
    )
    if ref.size > MAX_MANIFEST_BYTES:
        raise IntegrityError(
            f"{what}: the pointer records {ref.size} bytes, more than the "
            f"{MAX_MANIFEST_BYTES} bytes a manifest may have; the pointer is damaged or "
            f"was not written by ckpt-uploader: {redo}"
        )
    try:
        data = store.get_bytes(ref.object, max_size=ref.size)
    except ObjectNotFoundError:
        raise ObjectNotFoundError(
            f"{what} is missing, so its files are unknown; it was deleted by hand or by "
            f"another tool: {redo}"
        ) from None
    except IntegrityError:
        raise IntegrityError(
            f"{what} is larger than the {ref.size} bytes its pointer records; it was "
            f"replaced or damaged, do not use it: {redo}"
        ) from None
    sha = "sha256:" + hashlib.sha256(data).hexdigest()
    if len(data) != ref.size or sha != ref.digest:
        raise IntegrityError(
            f"{what} holds {len(data)} bytes with {sha}, but its pointer records "
            f"{ref.size} bytes with {ref.digest}; it was replaced or damaged, do not use "
            f"it: {redo}"
        )
    try:
        files, scope = _parse(data, entry)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise IntegrityError(f"{what} is unreadable ({exc}); {redo}") from None
    return replace(entry, files=files, scope=scope)


def _parse(data: bytes, entry: PointerEntry) -> tuple[tuple[ManifestFile, ...], str | None]:
    d: Any = json.loads(data)
    assert entry.manifest_ref is not None
    chunked = entry.manifest_ref.chunked
    want = MANIFEST_FORMAT_CHUNKED if chunked else MANIFEST_FORMAT
    if d.get("format") != want:
        raise ValueError(
            f"unknown format {d.get('format')!r} where the pointer expects {want!r} "
            "(a newer format needs a newer ckpt-uploader)"
        )
    if d.get("name") != entry.name:
        raise ValueError(f"it is the manifest of {d.get('name')!r}")
    files = tuple(ManifestFile.from_dict(f) for f in d["files"])
    check_manifest(entry.name, entry.rule, files)
    if len(files) != entry.manifest_ref.files:
        raise ValueError(f"it lists {len(files)} files, the pointer {entry.manifest_ref.files}")
    if not chunked:
        if manifest_digest(files) != entry.digest:
            raise ValueError(f"its files do not make the checkpoint's digest {entry.digest}")
        return files, None
    if entry.is_directory:  # a file without chunks is a plain object (sent before --dedup)
        if manifest_digest(files) != entry.digest:
            raise ValueError(f"its files do not make the checkpoint's digest {entry.digest}")
    elif (files[0].size, files[0].digest) != (entry.size, entry.digest):
        raise ValueError(
            f"it records {files[0].size} bytes with {files[0].digest}, the pointer "
            f"{entry.size} bytes with {entry.digest}"
        )
    return files, _scope_of(entry, d.get("scope_up"))
