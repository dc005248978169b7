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
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from anyio.abc import TaskGroup

from uploader.bucket.pointer import ManifestFile, PointerEntry, manifest_digest
from uploader.config.hparams import join_key
from uploader.daemon.checkpoints import (
    DEEPSPEED_TAG,
    MEGATRON_TRACKER,
    Checkpoints,
    DirRule,
    Unit,
)
from uploader.daemon.chunk_journal import with_chunks
from uploader.daemon.committer import Committer
from uploader.daemon.journal import FileRecord, Journal
from uploader.daemon.layouts import FileFilter, RunLayout, alias_target, is_inside, scan_stat

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
        #: Uploads queued and not over, per directory checkpoint (rel -> count), and the
        #: checkpoint each such file was counted in: a checkpoint is judged once none is
        #: left, so a directory of N files costs O(N) in all, not O(N) per file.
        self._open: dict[str, int] = {}
        self._open_of: dict[str, str] = {}
        self._deferred: dict[str, UnitKey] = {}
        #: Checkpoints the trainer deleted (rotated away) before every file was uploaded.
        self.rotated: set[str] = set()
        #: Checkpoints not sent because retention would delete them on arrival (rel):
        #: never committed (:mod:`uploader.daemon.keepup`).
        self.superseded: set[str] = set()
        #: The dedup scope (set by the engine; None: files are plain objects).
        self.scope: str | None = None

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
        """For DeepSpeed's ``latest`` tag file or Megatron-LM's tracker file: the directory
        checkpoint beside it that it names."""
        base = rel.rsplit("/", 1)[-1]
        if base not in (DEEPSPEED_TAG, MEGATRON_TRACKER):
            return None
        try:
            with open(self.root / rel, "rb") as f:
                tag = f.read(256).decode(errors="replace").strip()
        except OSError:
            return None
        if base == MEGATRON_TRACKER:
            tag = f"iter_{int(tag):07d}" if tag.isdigit() else ""
        if not tag or "/" in tag or tag in (".", ".."):
            return None
        parent = rel.rpartition("/")[0]
        sibling = f"{parent}/{tag}/{base}" if parent else f"{tag}/{base}"
        key = self.key(sibling)
        wanted = "deepspeed" if base == DEEPSPEED_TAG else "megatron"
        return key if key is not None and key.unit.rule == wanted else None

    def tags_seen(self, rels: list[str]) -> None:
        """Files just taken: a tag or tracker file among them may complete the checkpoint
        it names now, whenever its own (artifact) upload happens."""
        keys = {k for k in map(self._tagged, rels) if k is not None}
        for key in keys:
            self._request(key)

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
        if self._open.get(key.rel):
            self._deferred[key.rel] = key  # judged once its last queued upload is over
            return
        self._dirty.add(key)
        if key not in self._running:
            self._running.add(key)
            self.task_group.start_soon(self._judge_loop, key)

    def opened(self, rel: str) -> None:
        """An upload of ``rel`` is queued."""
        key = self.key(rel)
        if key is not None and key.unit.directory and rel not in self._open_of:
            self._open_of[rel] = key.rel
            self._open[key.rel] = self._open.get(key.rel, 0) + 1

    def closed(self, rel: str) -> None:
        """The upload of ``rel`` is over (verified, failed or gone): once its checkpoint
        has no queued upload left, a judgement asked for meanwhile runs."""
        unit = self._open_of.pop(rel, None)
        if unit is None:
            return
        left = self._open[unit] - 1
        if left:
            self._open[unit] = left
            return
        del self._open[unit]
        key = self._deferred.pop(unit, None)
        if key is not None:
            self._request(key)

    def removed(self, rel: str) -> bool:
        """The accepted file ``rel`` is gone before its upload: True when it went with
        its whole checkpoint (the trainer rotated it away: HF ``save_total_limit``,
        Accelerate ``total_limit``, Lightning ``save_top_k``) or was an artifact; False
        when it is missing from a checkpoint directory still on disk."""
        key = self.key(rel)
        if key is None or not key.unit.directory:
            if key is not None:
                self.rotated.add(key.rel)
            return True
        if os.path.isdir(self.root / key.rel):
            return False
        self.rotated.add(key.rel)
        return True

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
        if key.rel in self.superseded:
            return None
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
            return with_chunks(self.journal.chunks, self.scope, entry, {rec.path: rec}), [rec.path]
        try:
            names = os.listdir(self.root / key.rel)
        except OSError:
            return None  # the directory is gone (rotated away: counted at drain)
        rule = self.rules.resolve(rank_root, unit, names)
        if rule is None or not rule.complete(rank_root, unit.name):
            return None
        # One read of the directory tree and one journal query: linear in its files.
        records = {r.path: r for r in self.journal.under(key.rel)}
        files: dict[str, FileRecord] = {}
        for rel, st in scan_stat(self.root, self.filt, key.rel):
            rec = records.pop(rel, None)
            if rec is None or rec.state not in ("done", "failed"):
                return None  # still settling or uploading: judged again once verified
            if rec.state == "failed":
                return f"{rel} failed: {rec.last_error or 'upload failed'}"
            if (st.st_size, st.st_mtime_ns) != (rec.size, rec.mtime_ns):
                return None  # changed since it was verified: the new version comes
            files[rel] = rec
        for rec in records.values():
            if rec.state in ("pending", "uploading"):
                return None  # its upload finds it gone and says why (rotated, or failed)
            if rec.state != "done":
                return (
                    f"{rec.path} was deleted before it was uploaded; the checkpoint is "
                    "missing a file (save it again to commit it)"
                )
            files[rec.path] = rec  # verified, then removed locally: its bytes are stored
        if not files:
            return None
        if rule.inside_marker and (
            len(files) < 2
            or not any(Checkpoints.is_marker(rule, unit, r.name) for r in files.values())
        ):
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
            rule=rule.name,
            files=manifest,
        )
        return with_chunks(self.journal.chunks, self.scope, entry, files), sorted(files)

    def uncommitted(self) -> tuple[dict[str, str], set[str]]:
        """Checkpoints with verified files that are not committed, and why; and those the
        trainer rotated away before they were (journal lock held): for the drain summary
        and ``status``."""
        out: dict[str, str] = {}
        rotated = set(self.rotated)
        for rec in self.journal.records("superseded"):  # skipped before a restart too
            key = self.key(rec.path)
            if key is not None:
                self.superseded.add(key.rel)
        for rec in self.journal.records("done"):
            if rec.committed:
                continue
            key = self.key(rec.path)
            if key is None and rec.path.endswith(DCP_SHARD_SUFFIX) and "/" in rec.path:
                directory = rec.path.rsplit("/", 1)[0]
                if not os.path.isdir(self.root / directory):
                    rotated.add(directory)
                    continue
                # torch DCP shards whose directory never got its .metadata
                out.setdefault(
                    directory,
                    "torch DCP shards without .metadata (the save did not finish); "
                    "uploaded as plain files, not committed",
                )
                continue
            if key is None or key.rel in out or key.rel in rotated or key.rel in self.superseded:
                continue
            if key.unit.directory and not os.path.isdir(self.root / key.rel):
                rotated.add(key.rel)  # the trainer deleted it before it was committed
                continue
            if key.rel in self.incomplete:
                out[key.rel] = self.incomplete[key.rel]
                continue
            rank_root = self.root / key.base if key.base else self.root
            rule = self.rules.resolve(rank_root, key.unit)
            if rule is not None and not rule.complete(rank_root, key.unit.name):
                out[key.rel] = f"{rule.waits_for()} [rule {rule.name}]"
            elif key.unit.directory:
                out[key.rel] = "not every file is verified yet"
            else:
                out[key.rel] = "its pointer write did not succeed"
        for rel in rotated:
            self.incomplete.pop(rel, None)
        return out, rotated

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
