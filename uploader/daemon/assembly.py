"""Assembly: from verified files to complete checkpoints, handed to the committer.

A checkpoint is a set of files (see :mod:`uploader.daemon.layouts`). Each time a
file is verified, :class:`Assembler` finds the checkpoint it belongs to and judges
it, in a worker thread holding the journal lock:

* a single-file checkpoint is complete at once;
* a directory checkpoint is complete once its marker says so and every file in the
  directory (on disk, and in the journal) is verified, the version on disk being the
  one verified. A file still settling or uploading means "not yet": the checkpoint is
  judged again when that file is verified (or, still settling, vanishes: the
  checkpoint is then what is on disk). A directory holding only its marker is not
  complete: the rules trust the marker to be written last (as DCP and the Hugging
  Face Trainer do), so files that do not exist yet when the marker is verified
  cannot be waited for. A file that failed, or was deleted after it
  was accepted but before it was uploaded, makes the checkpoint *incomplete*: it is
  reported (:attr:`Assembler.incomplete`, shown in ``status``) and never committed.

A complete checkpoint goes to the committer as one :class:`PointerEntry` with its
manifest (every file's path, size and digest) and the journal paths to mark
committed. Judgements of one checkpoint are coalesced: while one runs, later
requests for it make one more run, so a directory of N files costs O(N) work per
burst, not O(N^2). Symlinks to files inside RUN_DIR become aliases
(:meth:`Assembler.link`): Lightning's ``last.ckpt`` names its target and is not
uploaded twice.

Example::

    assembler = Assembler(layout, rules, filt, journal, call, committer)
    assembler.task_group = tg
    assembler.verified(record)        # after the upload of record is verified
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from anyio.abc import TaskGroup

from uploader.bucket.pointer import ManifestFile, PointerEntry, manifest_digest
from uploader.config.hparams import join_key
from uploader.daemon.committer import Committer
from uploader.daemon.journal import FileRecord, Journal
from uploader.daemon.layouts import (
    DEEPSPEED_TAG,
    Checkpoints,
    DirRule,
    FileFilter,
    RunLayout,
    Unit,
    alias_target,
    is_inside,
    scan,
)

__all__ = ["Assembler", "UnitKey"]

#: torch DCP's shard files: a directory of them without ``.metadata`` is a save that did
#: not finish (reported as such at drain).
DCP_SHARD_SUFFIX = ".distcp"

log = logging.getLogger(__name__)

#: Runs a callable off the event loop, holding the journal lock.
JournalCall = Callable[..., Awaitable[Any]]


@dataclass(frozen=True)
class UnitKey:
    """One checkpoint of one rank: ``base`` is the rank directory's path relative to
    RUN_DIR ("" when it is RUN_DIR itself)."""

    rank: int
    base: str
    unit: Unit

    @property
    def rel(self) -> str:
        """The checkpoint's path relative to RUN_DIR."""
        return f"{self.base}/{self.unit.name}" if self.base else self.unit.name


class Assembler:
    """Judges checkpoints after their files are verified; submits complete ones.

    Args:
        layout: the run directory.
        rules: which files form one checkpoint.
        filt: which files are uploaded (a directory checkpoint's files are those).
        journal: the journal; ``call`` runs a callable holding its lock, off the loop.
        committer: takes complete checkpoints (and aliases).
    """

    def __init__(
        self,
        layout: RunLayout,
        rules: Checkpoints,
        filt: FileFilter,
        journal: Journal,
        call: JournalCall,
        committer: Committer,
    ) -> None:
        self.layout = layout
        self.root = layout.root
        self.rules = rules
        self.filt = filt
        self.journal = journal
        self._call = call
        self.committer = committer
        #: Where the judging tasks run (set by the engine).
        self.task_group: TaskGroup | None = None
        #: Checkpoints that can never be committed as they are: rel -> why.
        self.incomplete: dict[str, str] = {}
        #: Symlinks seen: rel -> target rel (None: refused), for status.
        self.links: dict[str, str | None] = {}
        self._dirty: set[UnitKey] = set()
        self._running: set[UnitKey] = set()
        #: What was last submitted for each checkpoint (rel -> manifest digest).
        self._submitted: dict[str, str] = {}
        #: Rules that recognised at least one checkpoint.
        self.matched: set[str] = set()

    @property
    def busy(self) -> bool:
        return bool(self._running)

    # -- what a file belongs to -------------------------------------------------------
    def key(self, rel: str) -> UnitKey | None:
        """The checkpoint that the file ``rel`` belongs to now (None: an artifact)."""
        loc = self.layout.locate(rel)
        rank_root = self.layout.rank_root(loc)
        unit = self.rules.unit(rank_root, loc.name)
        if unit is None:
            return None
        self.matched.add(unit.rule)
        base = loc.rel[: len(loc.rel) - len(loc.name)].rstrip("/")
        return UnitKey(loc.rank, base, unit)

    def _tagged(self, rel: str) -> UnitKey | None:
        """For DeepSpeed's ``latest`` tag file: the directory checkpoint it names."""
        if rel.rsplit("/", 1)[-1] != DEEPSPEED_TAG:
            return None
        try:
            tag = (self.root / rel).read_text(errors="replace").strip()
        except OSError:
            return None
        if not tag or "/" in tag or tag in (".", ".."):
            return None
        parent = rel.rpartition("/")[0]
        sibling = f"{parent}/{tag}/{DEEPSPEED_TAG}" if parent else f"{tag}/{DEEPSPEED_TAG}"
        key = self.key(sibling)
        return key if key is not None and key.unit.rule == "deepspeed" else None

    # -- requests ---------------------------------------------------------------------
    def verified(self, rec: FileRecord) -> None:
        """``rec`` is verified: judge the checkpoint it belongs to (soon)."""
        self.request_many([rec.path])

    def request_many(self, rels: list[str]) -> None:
        """Judge the checkpoints the files ``rels`` belong to (each once)."""
        keys = set()
        for rel in rels:
            for key in (self.key(rel), self._tagged(rel)):
                if key is not None:
                    keys.add(key)
        for key in keys:
            self._request(key)

    def _request(self, key: UnitKey) -> None:
        assert self.task_group is not None
        self._dirty.add(key)
        if key not in self._running:
            self._running.add(key)
            self.task_group.start_soon(self._judge_loop, key)

    def failed(self, rel: str, why: str) -> None:
        """``rel`` failed for good: its directory checkpoint is incomplete."""
        key = self.key(rel)
        if key is not None and key.unit.directory:
            self._incomplete(key, f"{rel} failed: {why}")

    def _incomplete(self, key: UnitKey, why: str) -> None:
        if self.incomplete.get(key.rel) != why:
            log.error("checkpoint %s is incomplete and will not be committed: %s", key.rel, why)
        self.incomplete[key.rel] = why

    async def _judge_loop(self, key: UnitKey) -> None:
        try:
            while key in self._dirty:
                self._dirty.discard(key)
                try:
                    verdict = await self._call(self._judge, key)
                except Exception as exc:  # a bug must not stop the other checkpoints
                    log.exception("judging checkpoint %s failed", key.rel)
                    self._incomplete(key, f"internal error: {exc}")
                    continue
                if isinstance(verdict, str):
                    self._incomplete(key, verdict)
                elif verdict is not None:
                    entry, paths = verdict
                    self.incomplete.pop(key.rel, None)
                    if self._submitted.get(key.rel) != entry.digest:
                        self._submitted[key.rel] = entry.digest
                        self.committer.submit(key.rank, entry, paths)
        finally:
            self._running.discard(key)

    # -- judging (worker thread, journal lock held) -----------------------------------
    def _judge(self, key: UnitKey) -> tuple[PointerEntry, list[str]] | str | None:
        """(entry, journal paths) when complete and not yet committed; a reason when it
        can never be committed as it is; None when not yet (or already) committed."""
        unit = key.unit
        rank_root = self.root / key.base if key.base else self.root
        obj = join_key(self.layout.prefix, f"rank_{key.rank}/{unit.name}")
        if not unit.directory:
            rec = self.journal.get(key.rel)
            if rec is None or rec.state != "done" or rec.committed or rec.digest is None:
                return None
            st = is_inside(self.root, key.rel)
            if st is not None and (st.st_size, st.st_mtime_ns) != (rec.size, rec.mtime_ns):
                return None  # a newer version is on its way
            entry = PointerEntry(unit.name, obj, rec.size, rec.digest, rec.mtime_ns, rule=unit.rule)
            return entry, [rec.path]
        if not self.rules.complete(rank_root, unit):
            return None
        files: dict[str, FileRecord] = {}
        for rel in scan(self.root, self.filt, key.rel):
            rec = self.journal.get(rel)
            st = is_inside(self.root, rel)
            if rec is None or st is None or rec.state in ("pending", "uploading"):
                return None  # still settling or uploading: judged again once verified
            if rec.state == "failed":
                return f"{rel} failed: {rec.last_error or 'upload failed'}"
            if (st.st_size, st.st_mtime_ns) != (rec.size, rec.mtime_ns):
                return None  # changed since it was verified: the new version comes
            files[rel] = rec
        for rec in self.journal.under(key.rel):
            if rec.path in files:
                continue
            if rec.state != "done":
                return (
                    f"{rec.path} was deleted before it was uploaded; the checkpoint is "
                    "missing a file (save it again to commit it)"
                )
            files[rec.path] = rec  # verified, then removed locally: its bytes are stored
        if not files:
            return None
        marker = [r for r in files.values() if self.rules.is_marker(unit, r.name)]
        rule = self.rules.rule(unit.rule)
        if rule is not None and rule.name != "deepspeed" and (not marker or len(files) < 2):
            return None  # the marker alone is no checkpoint: its files are still to come
        if all(r.committed for r in files.values()):
            return None
        manifest = tuple(
            sorted(
                (ManifestFile(r.name, r.size, r.digest or "") for r in files.values()),
                key=lambda f: f.path,
            )
        )
        entry = PointerEntry(
            unit.name,
            obj,
            sum(f.size for f in manifest),
            manifest_digest(manifest),
            max(r.mtime_ns for r in files.values()),
            rule=unit.rule,
            files=manifest,
        )
        return entry, sorted(files)

    def uncommitted(self) -> dict[str, str]:
        """Checkpoints with verified files that are not committed, and why (journal lock
        held): for the drain summary and ``status``."""
        out: dict[str, str] = {}
        for rec in self.journal.records("done"):
            if rec.committed:
                continue
            key = self.key(rec.path)
            if key is None and rec.path.endswith(DCP_SHARD_SUFFIX) and "/" in rec.path:
                # torch DCP shards whose directory never got its .metadata
                out.setdefault(
                    rec.path.rsplit("/", 1)[0],
                    "torch DCP shards without .metadata (the save did not finish); "
                    "uploaded as plain files, not committed",
                )
                continue
            if key is None or key.rel in out:
                continue
            if key.rel in self.incomplete:
                out[key.rel] = self.incomplete[key.rel]
                continue
            rank_root = self.root / key.base if key.base else self.root
            rule = self.rules.rule(key.unit.rule)
            if rule is not None and not self.rules.complete(rank_root, key.unit):
                if rule.name == "deepspeed":
                    out[key.rel] = f"the '{DEEPSPEED_TAG}' tag file does not name it yet"
                else:
                    out[key.rel] = f"no {rule.marker} yet (the save did not finish)"
            elif key.unit.directory:
                out[key.rel] = "not every file is verified yet"
            else:
                out[key.rel] = "its pointer write did not succeed"
        return out

    def unmatched_rules(self) -> list[DirRule]:
        """The user's ``--checkpoint-dir`` rules that recognised no directory."""
        return [
            r for r in self.rules.rules if r.name.startswith("dir:") and r.name not in self.matched
        ]

    # -- symlinks ---------------------------------------------------------------------
    def link(self, rel: str) -> str | None:
        """A symlink at ``rel``: an alias of its target when that is a file inside RUN_DIR
        (committed as such once the target is); else refused: the reason is returned
        (the intake lists it as left out)."""
        target = alias_target(self.root, rel)
        self.links[rel] = target
        if target is None:
            why = "symlink leading outside RUN_DIR or to no file (not followed)"
            log.warning("path=%s is a %s; not uploaded", rel, why)
            return why
        loc, tloc = self.layout.locate(rel), self.layout.locate(target)
        if loc.rank != tloc.rank:
            self.links[rel] = None
            why = f"symlink to another rank's file {target}"
            log.warning("path=%s is a %s; not uploaded", rel, why)
            return why
        log.info("path=%s is an alias of %s", rel, target)
        self.committer.alias(loc.rank, loc.name, tloc.name)
        return None

    def unlink(self, rel: str) -> None:
        """The symlink ``rel`` is gone (or is no longer a symlink)."""
        if self.links.pop(rel, None) is not None:
            loc = self.layout.locate(rel)
            self.committer.alias(loc.rank, loc.name, None)
