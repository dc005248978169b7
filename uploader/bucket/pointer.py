"""Commit pointers: which checkpoints of a rank are safely in the bucket, with manifests.

After every file of a checkpoint is uploaded and verified, the daemon writes
``{prefix}/rank_{r}/latest.json``, naming the checkpoint with its manifest (each
file's path, size and sha256). This module is the one place to import the pointer
rules from; each concern lives in a module of its own:

* :mod:`uploader.bucket.format`: the entries, manifests and pointer, their JSON, the
  checks on everything read back from the bucket, reading and writing the object;
* :mod:`uploader.bucket.commit`: the merge rule (``latest`` never moves back, no
  committed entry is lost) and compare-and-swap writes where the store allows;
* :mod:`uploader.bucket.manifest`: a large manifest as an object of its own, written
  before the pointer that names it and read back checked against it;
* :mod:`uploader.bucket.latest`: resolving ``latest`` across ranks (once per job with
  a ``share`` function) and checking that an entry's objects are where its rank's
  pointer is.
"""

from __future__ import annotations

from uploader.bucket.commit import (
    CONFLICT_ATTEMPTS,
    PointerUpdate,
    alias,
    beyond,
    commit,
    fencing,
    merge,
    update_pointer,
)
from uploader.bucket.format import (
    FILE_RULE,
    FORMAT,
    FORMAT_INLINE,
    FORMATS,
    HISTORY_LIMIT,
    INLINE_MANIFEST_BYTES,
    MANIFEST_DIR,
    MAX_NAME_BYTES,
    MAX_PATH_BYTES,
    MAX_POINTER_BYTES,
    POINTER_FILE,
    ManifestFile,
    ManifestRef,
    Pointer,
    PointerEntry,
    manifest_digest,
    pointer_name,
    read_pointer,
    read_pointer_versioned,
    write_pointer,
)
from uploader.bucket.latest import (
    LatestSelection,
    Share,
    check_location,
    latest_prefix,
    list_ranks,
    resolve_latest,
    select_latest,
)
from uploader.bucket.manifest import MAX_MANIFEST_BYTES, load_manifest, store_manifest

__all__ = [
    "ManifestFile",
    "ManifestRef",
    "load_manifest",
    "store_manifest",
    "INLINE_MANIFEST_BYTES",
    "MAX_MANIFEST_BYTES",
    "MANIFEST_DIR",
    "FORMAT_INLINE",
    "PointerEntry",
    "manifest_digest",
    "Pointer",
    "pointer_name",
    "read_pointer",
    "commit",
    "merge",
    "alias",
    "beyond",
    "write_pointer",
    "read_pointer_versioned",
    "update_pointer",
    "PointerUpdate",
    "fencing",
    "CONFLICT_ATTEMPTS",
    "resolve_latest",
    "LatestSelection",
    "Share",
    "latest_prefix",
    "select_latest",
    "list_ranks",
    "POINTER_FILE",
    "HISTORY_LIMIT",
    "MAX_POINTER_BYTES",
    "MAX_NAME_BYTES",
    "MAX_PATH_BYTES",
    "FORMAT",
    "FORMATS",
    "FILE_RULE",
    "check_location",
]
