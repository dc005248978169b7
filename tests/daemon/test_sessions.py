"""The journal's multipart sessions: the schema upgrade of an older journal, and the
status report of sessions a restart will resume."""

from __future__ import annotations

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
