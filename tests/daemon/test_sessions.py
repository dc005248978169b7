"""The journal's multipart sessions: the schema upgrade of an older journal, and the
status report of sessions a restart will resume."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from uploader.daemon.journal import JOURNAL_VERSION, Journal
from uploader.errors import ConfigError


def test_a_journal_of_the_previous_version_is_upgraded(tmp_path: Path) -> None:
    """The files table exactly as the previous release wrote it, with a row in it."""
    state = tmp_path / "state"
    state.mkdir()
    old = sqlite3.connect(state / ".ckpt-uploader.sqlite")
    old.executescript((Path(__file__).parent / "journal_v0.sql").read_text())
    old.close()
    with Journal.open(state) as journal:
        rec = journal.get("checkpoints/ep1.pt")
        assert rec is not None and rec.state == "uploading" and rec.size == 12582912
        assert journal.sessions.all() == []
        assert journal.recover()[0].path == "checkpoints/ep1.pt"
    con = sqlite3.connect(state / ".ckpt-uploader.sqlite")
    assert con.execute("PRAGMA user_version").fetchone()[0] == JOURNAL_VERSION == 3
    con.execute("PRAGMA user_version = 99")
    con.commit()
    con.close()
    with pytest.raises(ConfigError, match="newer ckpt-uploader"):
        Journal.open(state)
    Journal.open(state.parent / "other").close()  # the refused open released nothing wrongly


_SCHEMA_1_PARTS = """
CREATE TABLE sessions (object TEXT PRIMARY KEY, upload_id TEXT NOT NULL,
    part_size INTEGER NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    started_at REAL NOT NULL);
CREATE TABLE parts (object TEXT NOT NULL, upload_id TEXT NOT NULL, idx INTEGER NOT NULL,
    size INTEGER NOT NULL, sha256 TEXT NOT NULL, etag TEXT NOT NULL,
    PRIMARY KEY (upload_id, idx));
INSERT INTO sessions VALUES ('run/ep1.pt', 'u1', 5242880, 12582912, 7, 100.0);
INSERT INTO parts VALUES ('run/ep1.pt', 'u1', 0, 5242880, '%s', '"e0"');
PRAGMA user_version = 1;
""" % ("ab" * 32)


def test_a_journal_of_schema_1_keeps_its_sha256_parts_and_gains_crc_records(
    tmp_path: Path,
) -> None:
    from uploader.transfer.resume import PartRecord

    state = tmp_path / "state"
    state.mkdir()
    old = sqlite3.connect(state / ".ckpt-uploader.sqlite")
    old.executescript(_SCHEMA_1_PARTS)
    old.close()
    with Journal.open_readonly(state) as journal:  # read as it is, not upgraded
        (session,) = journal.sessions.all()
        assert session.parts[0] == PartRecord(0, 5242880, "ab" * 32, '"e0"')
    with Journal.open(state) as journal:
        (session,) = journal.sessions.all()
        assert session.parts[0].checksum("sha256") == "ab" * 32
        assert session.parts[0].checksum("crc64nvme") is None
        journal.sessions.record_part(
            "run/ep1.pt", "u1", PartRecord(1, 5242880, "", '"e1"', "0123456789abcdef")
        )
    with Journal.open(state) as journal:
        (session,) = journal.sessions.all()
        assert session.parts[1].checksum("crc64nvme") == "0123456789abcdef"
        assert session.parts[1].checksum("sha256") is None
    con = sqlite3.connect(state / ".ckpt-uploader.sqlite")
    assert con.execute("PRAGMA user_version").fetchone()[0] == JOURNAL_VERSION == 3


def test_status_lists_resumable_uploads_and_the_bytes_held(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from uploader.cli.main import main
    from uploader.transfer.resume import PartRecord, Session

    state = tmp_path / "run"
    with Journal.open(state) as journal:
        journal.sessions.begin_session(
            Session("exp/rank_0/ep1.pt", "u1", 4 << 20, 10 << 20, 1, 5.0)
        )
        for i in (0, 1):
            journal.sessions.record_part(
                "exp/rank_0/ep1.pt", "u1", PartRecord(i, 4 << 20, "ab" * 32, f'"e{i}"')
            )
    assert main(["status", str(state), "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["bytes_held"] == 8 << 20
    assert body["resumable"][0]["object"] == "exp/rank_0/ep1.pt"
    assert body["resumable"][0]["parts_held"] == 2
    assert main(["status", str(state)]) == 0
    text = capsys.readouterr().out
    assert "resumable 1 upload(s)" in text and "(2 of 3 parts)" in text
