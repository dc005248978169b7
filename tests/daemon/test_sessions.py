"""The journal's multipart sessions: the schema upgrade of an older journal, and the
status report of sessions a restart will resume."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from uploader.daemon.journal import Journal
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
    assert con.execute("PRAGMA user_version").fetchone()[0] == 1
    con.execute("PRAGMA user_version = 99")
    con.commit()
    con.close()
    with pytest.raises(ConfigError, match="newer ckpt-uploader"):
        Journal.open(state)
    Journal.open(state.parent / "other").close()  # the refused open released nothing wrongly


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
