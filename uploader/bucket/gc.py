"""Garbage collection of a dedup scope's chunks, and the protocol that keeps it from
deleting a chunk a writer is about to reference.

A chunk (``{scope}/.ckpt-uploader/chunks/{blake3}``) is deleted only when **no manifest
object in the scope references it** and it is **older than the grace period** (its
last-modified time, by the store's clock). Fenced pointers are a per-rank
compare-and-swap, not a lock over a scope; so writers (daemons of any run in the scope)
and a collector coordinate through one small object, ``{scope}/.ckpt-uploader/gc.json``::

    {"format": "ckpt-uploader/gc/1", "generation": 7, "state": "running" | "done",
     "window": 5.0, "limit": 300.0}

**The collector** (:func:`collect`):

1. writes ``generation + 1``, state ``running`` (only-if-unchanged where the store honours
   conditions, so two collectors do not overlap; refused while another one's is live);
2. waits :data:`WINDOW` seconds (or its ``window``, when longer) and a margin, so that
   every writer that read the state before step 1 has written its manifest (a writer
   redoes its check when it took longer than :data:`WINDOW`, a constant of the protocol
   that no collector may shorten);
3. lists the scope: every manifest object (each read; one it cannot read stops the
   collection, deleting nothing) and every chunk;
4. deletes the chunks no manifest references that are older than ``grace``, but only
   while less than ``limit`` seconds have passed since step 1 (then it stops: run it
   again);
5. writes state ``done``. A collector that dies leaves ``running``: once that mark is older
   than its limit and a margin (by the store's clock), writers no longer wait for it and
   the next collection takes over.

**A writer** sends a file's chunks (skipping those its index or a HEAD finds) and records
the generation it sent them at (``"7:done"``). Before it writes a manifest
(:func:`confirm_chunks`) it reads the state: while a collection runs it waits (at most
``limit`` plus a margin: a collector stops deleting by then); when the generation differs
from the one a file's chunks were sent or looked up at, a collection ran in between, so
it asks the store for each of that file's chunks and sends the missing ones again from
the file (which must be unchanged). Then it writes the manifest; if more than
:data:`WINDOW` seconds passed since it read the state, it checks again. A collector that started after
that read waits at least :data:`WINDOW` before listing and so sees the manifest; one that started
before it is seen by the writer. Either way no chunk a manifest names is deleted, and
the grace period spares chunks of uploads still in flight in the common case.

``ckpt-uploader gc URI --dry-run`` shows what would go.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from uploader.bucket.format import MAX_POINTER_BYTES, ManifestFile
from uploader.bucket.manifest import MANIFEST_FORMAT_CHUNKED, is_manifest_object
from uploader.errors import (
    ConfigError,
    IntegrityError,
    ObjectNotFoundError,
    PreconditionFailedError,
)
from uploader.transfer.chunks import CHUNK_DIR, chunk_prefix

if TYPE_CHECKING:  # pragma: no cover
    from uploader.transfer.store import ObjectStore

__all__ = [
    "GC_FORMAT",
    "GcState",
    "GcReport",
    "collect",
    "confirm_chunks",
    "gc_object",
    "read_generation",
    "read_state",
]

log = logging.getLogger(__name__)

GC_FORMAT = "ckpt-uploader/gc/1"
#: Seconds a writer may take from reading the state to its manifest being written: a
#: constant of the protocol (a collector waits at least this long, whatever it is told).
WINDOW = 5.0
#: Seconds a collection may delete for after it began (then it stops).
LIMIT = 300.0
#: Default age a chunk must have before it may be deleted.
GRACE = 6 * 3600.0
_MARGIN = 2.0


def gc_object(scope: str) -> str:
    scope = scope.strip("/")
    return f"{scope}/.ckpt-uploader/gc.json" if scope else ".ckpt-uploader/gc.json"


@dataclass(frozen=True)
class GcState:
    generation: int = 0
    state: str = "done"
    window: float = WINDOW
    limit: float = LIMIT

    @property
    def token(self) -> str:
        """What writers compare: changes whenever a collection starts or ends."""
        return f"{self.generation}:{self.state}"

    def to_json(self) -> bytes:
        body = {
            "format": GC_FORMAT,
            "generation": self.generation,
            "state": self.state,
            "window": self.window,
            "limit": self.limit,
        }
        return json.dumps(body, sort_keys=True).encode()


def _parse_state(data: bytes, name: str) -> GcState:
    try:
        d: Any = json.loads(data)
        if d.get("format") != GC_FORMAT:
            raise ValueError(f"format {d.get('format')!r}, this version reads {GC_FORMAT!r}")
        st = GcState(int(d["generation"]), str(d["state"]), float(d["window"]), float(d["limit"]))
        if st.state not in ("running", "done") or st.generation < 0:
            raise ValueError(f"state {st.state!r} generation {st.generation}")
        return st
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise IntegrityError(
            f"{name} is unreadable ({exc}); it coordinates garbage collection of the scope's "
            "chunks: delete it only when no 'ckpt-uploader gc' runs in the scope"
        ) from None


def read_state(store: ObjectStore, scope: str) -> tuple[GcState, str | None]:
    """The scope's collection state (a fresh scope: generation 0, done) and its version."""
    name = gc_object(scope)
    try:
        data, version = store.get_versioned(name, max_size=64 << 10)
    except ObjectNotFoundError:
        return GcState(), None
    return _parse_state(data, name), version


def _dead(store: ObjectStore, scope: str, state: GcState) -> bool:
    """Whether a ``running`` state was left by a collection that can no longer delete:
    its mark is older (by the store's clock) than its limit and the margin."""
    if state.state != "running":
        return False
    try:
        mtime = store.stat(gc_object(scope)).mtime
    except ObjectNotFoundError:
        return True
    now = store.backend.server_date() or time.time()
    return mtime is not None and now - mtime > state.limit + _MARGIN


def read_generation(store: ObjectStore, scope: str) -> str:
    """The scope's generation token (``"7:done"``) as writers record it."""
    return read_state(store, scope)[0].token


# -- the writer's side -------------------------------------------------------------------
def confirm_chunks(
    store: ObjectStore,
    scope: str,
    files: list[tuple[ManifestFile, str]],
    resend: Callable[[ManifestFile], None],
    write: Callable[[], None],
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Write a chunked manifest (``write``) safely beside a collector: ``files`` are the
    manifest's files with the generation token their chunks were sent at; ``resend(f)``
    sends ``f``'s missing chunks again (its file must be unchanged)."""
    for _ in range(100):
        t0 = clock()
        state, _ = read_state(store, scope)
        seen = clock()
        while (
            state.state == "running"
            and clock() - seen < state.limit + _MARGIN
            and not _dead(store, scope, state)
        ):
            log.info("a garbage collection runs in scope %r; the manifest waits", scope or "/")
            sleep(1.0)
            t0 = clock()
            state, _ = read_state(store, scope)
        for f, token in files:
            if token != state.token:
                _check_present(store, scope, f, resend)
        write()
        if clock() - t0 <= WINDOW:
            return
        log.info("the manifest took longer than the collection window; checking again")
    raise IntegrityError("the manifest could not be written inside the collection window")


def _check_present(
    store: ObjectStore, scope: str, f: ManifestFile, resend: Callable[[ManifestFile], None]
) -> None:
    prefix = chunk_prefix(scope)
    missing = [c for c in f.chunks if c.data is None and not store.exists(f"{prefix}/{c.hash}")]
    if missing:
        log.warning(
            "%d chunk(s) of %s were collected while it was sent; sending them again",
            len(missing),
            f.path,
        )
        resend(f)


# -- the collector -------------------------------------------------------------------------
@dataclass
class GcReport:
    """What a collection found and did."""

    manifests: int = 0
    chunks: int = 0
    referenced: int = 0
    doomed: list[tuple[str, int]] = field(default_factory=list)
    young: int = 0
    deleted: int = 0
    deleted_bytes: int = 0
    stopped: bool = False


def collect(
    store: ObjectStore,
    scope: str,
    *,
    grace: float = GRACE,
    window: float = WINDOW,
    limit: float = LIMIT,
    dry_run: bool = False,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> GcReport:
    """Collect the scope's unreferenced chunks older than ``grace`` (see the module
    docstring); ``dry_run``: only report them (no state written, no wait)."""
    scope = scope.strip("/")
    if grace < 0 or window < 0 or limit <= 0:
        raise ConfigError("grace and window must be >= 0 and limit > 0")
    state, version = read_state(store, scope)
    t0 = clock()
    if not dry_run:
        if state.state == "running" and _dead(store, scope, state):
            log.warning(
                "the collection of generation %d in scope %r ended without marking it done "
                "(its limit passed); taking over",
                state.generation,
                scope or "/",
            )
        elif state.state == "running":
            raise ConfigError(
                f"a garbage collection of scope {scope or '/'!r} is running (generation "
                f"{state.generation}); wait for it, or, if it died, for its limit of "
                f"{state.limit:.0f} s to pass, and run again"
            )
        running = GcState(state.generation + 1, "running", window, limit)
        _write_state(store, scope, running, version)
        t0 = clock()
        sleep(max(window, WINDOW) + _MARGIN)
    report = GcReport()
    try:
        referenced, chunks = _survey(store, scope, report)
        now = store.backend.server_date() or time.time()
        for name, size, mtime in chunks:
            h = name.rsplit("/", 1)[1]
            if h in referenced:
                continue
            if mtime is None or now - mtime < grace:
                report.young += 1
                continue
            report.doomed.append((name, size))
        if dry_run:
            return report
        for name, size in report.doomed:
            if clock() - t0 > limit:
                report.stopped = True
                log.warning("garbage collection stopped at its limit of %.0f s", limit)
                break
            if store.delete(name):
                report.deleted += 1
                report.deleted_bytes += size
    finally:
        if not dry_run:
            done = GcState(state.generation + 1, "done", window, limit)
            _write_state(store, scope, done, None, force=True)
    return report


def _write_state(
    store: ObjectStore, scope: str, st: GcState, version: str | None, force: bool = False
) -> None:
    name = gc_object(scope)
    if force or not store.backend.conditional:
        store.put_bytes(name, st.to_json(), {"content-type": "application/json"})
        return
    try:
        store.put_if(name, st.to_json(), version, {"content-type": "application/json"})
    except PreconditionFailedError:
        raise ConfigError(
            f"another garbage collection of scope {scope or '/'!r} started at the same "
            "time; run again later"
        ) from None


def _survey(
    store: ObjectStore, scope: str, report: GcReport
) -> tuple[set[str], list[tuple[str, int, float | None]]]:
    """Every chunk some manifest in the scope references, and every chunk present."""
    prefix = f"{scope}/" if scope else ""
    cprefix = chunk_prefix(scope) + "/"
    referenced: set[str] = set()
    chunks: list[tuple[str, int, float | None]] = []
    for info in store.list(prefix):
        if info.name.startswith(cprefix):
            chunks.append((info.name, info.size, info.mtime))
        elif is_manifest_object(info.name) and f"/{CHUNK_DIR}/" not in info.name:
            report.manifests += 1
            referenced.update(_references(store, info.name, info.size))
    report.chunks = len(chunks)
    report.referenced = len(referenced)
    return referenced, chunks


def _references(store: ObjectStore, name: str, size: int) -> set[str]:
    """The chunks a manifest object names (none for a manifest of plain files)."""
    try:
        data = store.get_bytes(name, max_size=max(size, 1) if size else MAX_POINTER_BYTES)
        d: Any = json.loads(data)
        if d.get("format") != MANIFEST_FORMAT_CHUNKED:
            return set()
        return {
            c.hash
            for f in d["files"]
            for c in ManifestFile.from_dict(f).chunks  # checks every chunk's form
        }
    except ObjectNotFoundError:
        return set()  # deleted by retention since the listing: it references nothing now
    except (ValueError, KeyError, TypeError, AttributeError, IntegrityError) as exc:
        raise IntegrityError(
            f"manifest object {name} cannot be read ({exc}); nothing was collected, since "
            "the chunks it may reference are unknown: remove or repair it, then run again"
        ) from None
