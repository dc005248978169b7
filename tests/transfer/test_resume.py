"""Resumable multipart uploads against real stores: an interrupted attempt leaves its
session, recorded in a real journal, and the next attempt sends only what is missing.

An attempt is interrupted by raising from its progress callback once some parts are
confirmed, which fails the upload as a dropped connection would after those parts.
Whole-process kills are in tests/scenarios/test_resume_kill.py.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.data import file_digest, write_random
from tests.fixtures.stores import Target
from uploader import ObjectStore
from uploader.daemon.journal import Journal
from uploader.transfer.resume import Resume, Session
from uploader.transfer.store import UploadResult

MiB = 1 << 20
RESUMABLE = ["rclone", "moto", "azurite", "local"]


class Interrupted(Exception):
    """Raised to cut an upload short."""


def _cut_after(parts: int) -> Callable[[int], None]:
    sent: list[int] = []

    def progress(n: int) -> None:
        sent.append(n)
        if len(sent) >= parts:
            raise Interrupted(f"cut after {len(sent)} parts")

    return progress


@dataclass
class Cut:
    """An upload of ``src`` to ``name`` cut short after some parts; its session is
    recorded in ``journal``."""

    store: ObjectStore
    journal: Journal
    src: Path
    name: str
    back: Path

    @property
    def part(self) -> int:
        return self.store.part_size

    def session(self) -> Session | None:
        return self.journal.sessions.session(self.name)

    def again(self, verify: bool = False) -> tuple[UploadResult, list[int]]:
        """The next attempt: its result, and the bytes each progress call reported."""
        sent: list[int] = []
        resume = Resume(self.journal.sessions, verify)
        result = self.store.upload_file(self.src, self.name, progress=sent.append, resume=resume)
        return result, sent

    def check(self, result: UploadResult) -> None:
        """The digest is the file's, and the object reads back as the file."""
        assert result.digest == file_digest(self.src, self.part)
        dest = self.store.download_file(self.name, self.back / "f.bin", progress=False)
        assert dest.read_bytes() == self.src.read_bytes()
        dest.unlink()


#: cut(parts, extra, seed=, name=, after=, concurrency=): a file of ``parts`` whole parts
#: and ``extra`` bytes, its upload to run/rank_0/``name`` cut after ``after`` parts.
CutUpload = Callable[..., Cut]


@pytest.fixture
def cut(target: Target, tmp_path: Path) -> Iterator[CutUpload]:
    with ExitStack() as stack:

        def make(
            parts: int, extra: int, *, seed: int, name: str, after: int, concurrency: int
        ) -> Cut:
            store = target.store(concurrency=concurrency)
            src = write_random(tmp_path / "f.bin", parts * store.part_size + extra, seed=seed)
            journal = stack.enter_context(Journal.open(tmp_path / "state"))
            stack.enter_context(store)
            c = Cut(store, journal, src, f"run/rank_0/{name}", tmp_path / "back")
            with pytest.raises(Interrupted):
                store.upload_file(
                    src, c.name, progress=_cut_after(after), resume=Resume(journal.sessions)
                )
            return c

        yield make


@pytest.mark.parametrize("target", RESUMABLE, indirect=True)
def test_a_retried_attempt_sends_only_the_missing_parts(cut: CutUpload) -> None:
    c = cut(6, 1234, seed=3, name="f.bin", after=3, concurrency=2)
    session = c.session()
    assert session is not None and len(session.parts) >= 3
    held = dict(session.parts)
    result, sent = c.again()
    # Only the parts not recorded as held went out again.
    assert sum(sent) == c.src.stat().st_size - sum(p.size for p in held.values())
    assert c.store.stat(c.name).digest == result.digest
    assert c.session() is None
    assert c.store.backend.list_uploads("run/") == []
    c.check(result)


@pytest.mark.parametrize("target", ["local"], indirect=True)
def test_verify_resumed_rehashes_kept_parts(cut: CutUpload) -> None:
    c = cut(4, 7, seed=4, name="v.bin", after=2, concurrency=1)
    # The file's bytes change without its size or mtime changing (a clock set back):
    # only re-hashing the kept parts notices.
    st = c.src.stat()
    with open(c.src, "r+b") as f:
        f.write(b"\xff" * 16)
    os.utime(c.src, ns=(st.st_atime_ns, st.st_mtime_ns))
    result, sent = c.again(verify=True)
    assert sent[0] == c.part  # part 1 differed from its record and was sent again
    c.check(result)


@pytest.mark.parametrize("target", ["azurite", "local"], indirect=True)
def test_a_changed_file_is_sent_whole_from_its_new_content(cut: CutUpload) -> None:
    c = cut(5, 0, seed=5, name="c.bin", after=2, concurrency=2)
    write_random(c.src, 5 * c.part, seed=6)  # same size, new bytes, new mtime
    result, sent = c.again()
    assert sum(sent) == 5 * c.part
    c.check(result)


@pytest.mark.parametrize("target", ["moto", "local"], indirect=True)
def test_a_part_held_with_another_etag_is_sent_again(cut: CutUpload) -> None:
    c = cut(4, 99, seed=7, name="e.bin", after=2, concurrency=1)
    session = c.session()
    assert session is not None and 0 in session.parts
    # Another writer replaces part 1 in the store with other bytes of the same size.
    other = memoryview(os.urandom(c.part))
    c.store.backend.put_part(c.name, session.upload_id, 0, 0, other, os.urandom(32))
    result, sent = c.again()
    assert sum(sent) == c.src.stat().st_size - session.parts[1].size
    c.check(result)


@pytest.mark.parametrize("target", ["rclone"], indirect=True)
def test_a_session_the_store_forgot_starts_from_zero(
    cut: CutUpload, target: Target, caplog: pytest.LogCaptureFixture
) -> None:
    c = cut(4, 1, seed=8, name="z.bin", after=2, concurrency=2)
    assert c.session() is not None
    # rclone serve s3 keeps multipart uploads in memory only: a restart forgets them.
    target.server.stop()
    target.server.start()
    with caplog.at_level(logging.INFO, "uploader.transfer.upload"):
        result, sent = c.again()
    assert sum(sent) == c.src.stat().st_size
    c.check(result)
    forgot = [r for r in caplog.records if "no longer knows" in r.getMessage()]
    assert len(forgot) == 1


@pytest.mark.parametrize("target", ["moto", "azurite"], indirect=True)
def test_an_upload_completed_before_a_kill_is_not_sent_again(cut: CutUpload) -> None:
    """The store completed the upload, but the process died before it heard so (and
    before it wrote the digest record)."""
    c = cut(3, 5, seed=9, name="done.bin", after=4, concurrency=2)
    session = c.session()
    assert session is not None and len(session.parts) == 4
    b = c.store.backend
    b.reopen(c.name, session.upload_id, {})
    b.complete(
        c.name, session.upload_id, [b.part_token(i, session.parts[i].etag) for i in range(4)]
    )
    result, sent = c.again()
    assert sent == []
    assert result.digest == c.store.stat(c.name).digest
    c.check(result)


@pytest.mark.parametrize("target", ["moto", "local"], indirect=True)
def test_parts_are_recorded_with_the_uploads_kind_and_another_kind_starts_afresh(
    cut: CutUpload, target: Target, caplog: pytest.LogCaptureFixture
) -> None:
    """A CRC64NVME upload records each part's CRC (no sha256); a session recorded by a
    sha256 upload (an older uploader's journal) is not continued by a CRC one, which
    aborts it and sends the file whole."""
    c = cut(4, 99, seed=6, name="k.bin", after=2, concurrency=1)
    session = c.session()
    assert session is not None and session.parts
    data = c.src.read_bytes()
    for i, p in session.parts.items():
        chunk = data[i * c.part : i * c.part + p.size]
        assert p.sha256 == "" and p.crc64nvme == file_digest_of(chunk)
    # The same interrupted upload by a sha256 uploader: its records are sha256 ones.
    c.journal.sessions.end_session(c.name, session.upload_id)
    c.store.backend.abort(c.name, session.upload_id)
    with target.store(concurrency=1, digest="sha256") as sha_store, pytest.raises(Interrupted):
        sha_store.upload_file(
            c.src, c.name, progress=_cut_after(2), resume=Resume(c.journal.sessions)
        )
    old = c.session()
    assert old is not None and all(p.sha256 and not p.crc64nvme for p in old.parts.values())
    caplog.set_level(logging.INFO, "uploader.transfer.upload")
    result, sent = c.again()
    assert sum(sent) == len(data)  # sent whole
    assert "recorded without their crc64nvme checksum" in caplog.text
    assert c.session() is None and c.store.backend.list_uploads("run/") == []
    c.check(result)


def file_digest_of(chunk: bytes) -> str:
    from uploader.transfer.digest import crc64nvme

    return f"{crc64nvme(chunk):016x}"
