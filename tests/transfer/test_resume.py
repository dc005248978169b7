"""Resumable multipart uploads against real stores: an interrupted attempt leaves its
session, recorded in a real journal, and the next attempt sends only what is missing.

An attempt is interrupted by raising from its progress callback once some parts are
confirmed, which fails the upload as a dropped connection would after those parts.
Whole-process kills are in tests/scenarios/test_resume_kill.py.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from harness.data import file_digest, write_random
from tests.fixtures.stores import Target
from uploader.daemon.journal import Journal
from uploader.transfer.resume import Resume

MiB = 1 << 20
RESUMABLE = ["rclone", "moto", "azurite", "local"]


class Interrupted(Exception):
    """Raised to cut an upload short."""


def _cut_after(parts: int, part_size: int) -> tuple[list[int], object]:
    sent: list[int] = []

    def progress(n: int) -> None:
        sent.append(n)
        if len(sent) >= parts:
            raise Interrupted(f"cut after {len(sent)} parts")

    return sent, progress


def _interrupted(store, src: Path, name: str, resume: Resume, parts: int) -> None:  # type: ignore[no-untyped-def]
    _, progress = _cut_after(parts, store.part_size)
    with pytest.raises(Interrupted):
        store.upload_file(src, name, progress=progress, resume=resume)


def _check(store, src: Path, name: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    dest = store.download_file(name, tmp_path / "back" / "f.bin", progress=False)
    assert dest.read_bytes() == src.read_bytes()
    dest.unlink()


@pytest.mark.parametrize("target", RESUMABLE, indirect=True)
def test_a_retried_attempt_sends_only_the_missing_parts(target: Target, tmp_path: Path) -> None:
    store = target.store(concurrency=2)
    part = store.part_size
    src = write_random(tmp_path / "f.bin", 6 * part + 1234, seed=3)
    name = "run/rank_0/f.bin"
    with Journal.open(tmp_path / "state") as journal, store:
        resume = Resume(journal.sessions)
        _interrupted(store, src, name, resume, parts=3)
        session = journal.sessions.session(name)
        assert session is not None and len(session.parts) >= 3
        held = dict(session.parts)
        sent: list[int] = []
        result = store.upload_file(src, name, progress=sent.append, resume=resume)
        # Only the parts not recorded as held went out again.
        assert sum(sent) == src.stat().st_size - sum(p.size for p in held.values())
        assert result.digest == file_digest(src, part)
        assert store.stat(name).digest == result.digest
        assert journal.sessions.session(name) is None
        assert store.backend.list_uploads("run/") == []
        _check(store, src, name, tmp_path)


@pytest.mark.parametrize("target", ["local"], indirect=True)
def test_verify_resumed_rehashes_kept_parts(target: Target, tmp_path: Path) -> None:
    store = target.store(concurrency=1)
    part = store.part_size
    src = write_random(tmp_path / "f.bin", 4 * part + 7, seed=4)
    name = "run/rank_0/v.bin"
    with Journal.open(tmp_path / "state") as journal, store:
        _interrupted(store, src, name, Resume(journal.sessions), parts=2)
        # The file's bytes change without its size or mtime changing (a clock set back):
        # only re-hashing the kept parts notices.
        st = src.stat()
        with open(src, "r+b") as f:
            f.write(b"\xff" * 16)
        os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
        sent: list[int] = []
        result = store.upload_file(
            src, name, progress=sent.append, resume=Resume(journal.sessions, verify=True)
        )
        assert sent[0] == part  # part 1 differed from its record and was sent again
        assert result.digest == file_digest(src, part)
        _check(store, src, name, tmp_path)


@pytest.mark.parametrize("target", ["azurite", "local"], indirect=True)
def test_a_changed_file_is_sent_whole_from_its_new_content(target: Target, tmp_path: Path) -> None:
    store = target.store(concurrency=2)
    part = store.part_size
    src = write_random(tmp_path / "f.bin", 5 * part, seed=5)
    name = "run/rank_0/c.bin"
    with Journal.open(tmp_path / "state") as journal, store:
        resume = Resume(journal.sessions)
        _interrupted(store, src, name, resume, parts=2)
        write_random(src, 5 * part, seed=6)  # same size, new bytes, new mtime
        sent: list[int] = []
        result = store.upload_file(src, name, progress=sent.append, resume=resume)
        assert sum(sent) == 5 * part
        assert result.digest == file_digest(src, part)
        _check(store, src, name, tmp_path)


@pytest.mark.parametrize("target", ["moto", "local"], indirect=True)
def test_a_part_held_with_another_etag_is_sent_again(target: Target, tmp_path: Path) -> None:
    store = target.store(concurrency=1)
    part = store.part_size
    src = write_random(tmp_path / "f.bin", 4 * part + 99, seed=7)
    name = "run/rank_0/e.bin"
    with Journal.open(tmp_path / "state") as journal, store:
        resume = Resume(journal.sessions)
        _interrupted(store, src, name, resume, parts=2)
        session = journal.sessions.session(name)
        assert session is not None and 0 in session.parts
        # Another writer replaces part 1 in the store with other bytes of the same size.
        other = memoryview(os.urandom(part))
        store.backend.put_part(name, session.upload_id, 0, 0, other, os.urandom(32))
        sent: list[int] = []
        result = store.upload_file(src, name, progress=sent.append, resume=resume)
        assert sum(sent) == src.stat().st_size - session.parts[1].size
        assert result.digest == file_digest(src, part)
        _check(store, src, name, tmp_path)


@pytest.mark.parametrize("target", ["rclone"], indirect=True)
def test_a_session_the_store_forgot_starts_from_zero(
    target: Target, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = target.store(concurrency=2)
    part = store.part_size
    src = write_random(tmp_path / "f.bin", 4 * part + 1, seed=8)
    name = "run/rank_0/z.bin"
    with Journal.open(tmp_path / "state") as journal, store:
        resume = Resume(journal.sessions)
        _interrupted(store, src, name, resume, parts=2)
        session = journal.sessions.session(name)
        assert session is not None
        # rclone serve s3 keeps multipart uploads in memory only: a restart forgets them.
        target.server.stop()
        target.server.start()
        sent: list[int] = []
        with caplog.at_level(logging.INFO, "uploader.transfer.upload"):
            result = store.upload_file(src, name, progress=sent.append, resume=resume)
        assert sum(sent) == src.stat().st_size
        assert result.digest == file_digest(src, part)
        _check(store, src, name, tmp_path)
        forgot = [r for r in caplog.records if "no longer knows" in r.getMessage()]
        assert len(forgot) == 1


@pytest.mark.parametrize("target", ["moto", "azurite"], indirect=True)
def test_an_upload_completed_before_a_kill_is_not_sent_again(
    target: Target, tmp_path: Path
) -> None:
    """The store completed the upload, but the process died before it heard so (and
    before it wrote the digest record)."""
    store = target.store(concurrency=2)
    part = store.part_size
    src = write_random(tmp_path / "f.bin", 3 * part + 5, seed=9)
    name = "run/rank_0/done.bin"
    with Journal.open(tmp_path / "state") as journal, store:
        resume = Resume(journal.sessions)
        _interrupted(store, src, name, resume, parts=4)
        session = journal.sessions.session(name)
        assert session is not None and len(session.parts) == 4
        b = store.backend
        b.reopen(name, session.upload_id, {})
        b.complete(
            name, session.upload_id, [b.part_token(i, session.parts[i].etag) for i in range(4)]
        )
        sent: list[int] = []
        result = store.upload_file(src, name, progress=sent.append, resume=resume)
        assert sent == []
        assert result.digest == file_digest(src, part) == store.stat(name).digest
        _check(store, src, name, tmp_path)
