"""Re-check what a prefix of the bucket holds: every object's bytes, every pointer's claims.

:func:`verify_prefix` downloads each object that records a digest (the download
checks size and digest, then the copy is removed) and audits each commit pointer
with :func:`audit_pointer`: every entry it names must exist (``latest`` at least),
with the size and digest the entry records; a manifest object is read and checked
against its pointer there (and not downloaded a second time). Both return the failures as sentences
naming the object; they never raise for a bad object, so one pass reports all.

Example::

    report = verify_prefix(store, "exp1", strict=True)
    for failure in report.failures:
        print("FAILED", failure)
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from uploader.bucket.manifest import is_manifest_object, load_manifest
from uploader.bucket.pointer import MAX_POINTER_BYTES, POINTER_FILE, Pointer
from uploader.config.hparams import listing_prefix
from uploader.errors import ObjectNotFoundError, UploaderError
from uploader.transfer.chunks import check_chunk, chunk_object, is_chunk_object

if TYPE_CHECKING:  # pragma: no cover
    from uploader.transfer.store import ObjectStat, ObjectStore

__all__ = ["VerifyReport", "audit_pointer", "verify_prefix", "is_pointer"]

log = logging.getLogger("uploader.bucket.verify")


@dataclass
class VerifyReport:
    """How many objects were downloaded and matched, and what failed (one line each)."""

    checked: int = 0
    failures: list[str] = field(default_factory=list)


def is_pointer(name: str) -> bool:
    """Whether object ``name`` is a commit pointer (``.../latest.json``)."""
    return name == POINTER_FILE or name.endswith("/" + POINTER_FILE)


def audit_pointer(store: ObjectStore, name: str, sizes: Mapping[str, int]) -> list[str]:
    """What is wrong with the pointer object ``name``, given the sizes of the objects
    listed beside it: unreadable; a file of ``latest``'s manifest is missing; a
    manifest file's size or digest differs from the object's; a manifest object
    (:mod:`uploader.bucket.manifest`) is missing for ``latest``, or is larger than,
    or differs from, what the pointer records, or is unreadable. An older entry whose
    objects are gone (removed by retention) is not a failure."""
    try:
        pointer = Pointer.from_json(store.get_bytes(name, max_size=MAX_POINTER_BYTES), name)
    except UploaderError as exc:
        return [f"{name}: {exc}"]
    failures: list[str] = []
    for e in pointer.history:
        is_latest = e.name == pointer.latest.name
        try:
            e = load_manifest(store, e)
        except ObjectNotFoundError as exc:
            if is_latest or (e.manifest_ref is not None and e.manifest_ref.object in sizes):
                failures.append(f"{name}: {exc}")
            continue
        except UploaderError as exc:
            failures.append(f"{name}: {exc}")
            continue
        for f, obj in e.objects():
            if f.chunks:  # a chunked file: every chunk must be there (each checked alone)
                assert e.scope is not None
                gone = [
                    c.hash
                    for c in f.chunks
                    if c.data is None
                    and chunk_object(e.scope, c.hash) not in sizes
                    and not store.exists(chunk_object(e.scope, c.hash))
                ]
                if gone:
                    failures.append(
                        f"{name}: {e.name} names {len(gone)} chunk(s) of {f.path} that are "
                        f"missing (first {chunk_object(e.scope, gone[0])}); it cannot be restored"
                    )
                continue
            if obj not in sizes:
                if is_latest:
                    failures.append(f"{name}: latest ({e.name}) names {obj}, which is missing")
                continue
            if sizes[obj] != f.size:
                failures.append(
                    f"{name}: names {obj} with {f.size} bytes but it holds {sizes[obj]}"
                )
                continue
            recorded = store.stat(obj).digest
            if recorded is not None and str(recorded) != f.digest:
                failures.append(
                    f"{name}: names {obj} with digest {f.digest} but the object records {recorded}"
                )
    return failures


def verify_prefix(
    store: ObjectStore,
    prefix: str,
    *,
    strict: bool = False,
    tmp_dir: str | None = None,
    on_verified: Callable[[ObjectStat], None] | None = None,
) -> VerifyReport:
    """Check every object and pointer under ``prefix``.

    Args:
        strict: an object with no recorded digest is a failure (else a warning).
        tmp_dir: where each object is staged while checked (removed right after).
        on_verified: called with the stat (name, size, digest) of each object that matched.
    """
    report = VerifyReport()
    base = listing_prefix(prefix)
    objects = store.list(base)
    sizes = {o.name: o.size for o in objects}
    with tempfile.TemporaryDirectory(prefix="ckpt-verify-", dir=tmp_dir) as tmp:
        for info in objects:
            if is_pointer(info.name):
                report.failures += audit_pointer(store, info.name, sizes)
                continue
            if is_manifest_object(info.name):
                continue  # checked against the sha256 its pointer records, by the audit
            if is_chunk_object(info.name):  # named by its BLAKE3: checked against its name
                try:
                    check_chunk(store, info.name)
                    report.checked += 1
                except UploaderError as exc:
                    report.failures.append(f"{info.name}: {exc}")
                continue
            stat = store.stat(info.name)
            if stat.digest is None:
                msg = f"{info.name}: no digest recorded; size only ({info.size} bytes)"
                if strict:
                    report.failures.append(msg)
                else:
                    log.warning("%s", msg)
                continue
            target = Path(tmp) / f"obj{report.checked}"
            try:
                store.download_file(info.name, target, progress=False)
                report.checked += 1
                if on_verified is not None:
                    on_verified(stat)
            except UploaderError as exc:
                report.failures.append(f"{info.name}: {exc}")
            finally:
                target.unlink(missing_ok=True)
    return report
