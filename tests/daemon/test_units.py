"""In-process checks of the daemon's parts: journal, file filter, layout, retention, config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from uploader.config.files import load_config_file, parse_bytes, store_location
from uploader.daemon.journal import FileRecord, Journal
from uploader.daemon.layouts import FileFilter, RunLayout, is_inside, scan
from uploader.daemon.retention import local_deletions
from uploader.errors import ConfigError


def _rec(path: str, size: int = 10, mtime_ns: int = 1, state: str = "pending") -> FileRecord:
    return FileRecord(path, 0, path, f"p/rank_0/{path}", size, mtime_ns, True, state)


def test_journal_records_state_changes_and_recovers(tmp_path: Path) -> None:
    j = Journal.open(tmp_path)
    j.accept(_rec("a.pt"))
    j.accept(_rec("b.pt"))
    j.accept(_rec("c.pt"))
    j.start("a.pt")
    j.done("a.pt", "sha256:" + "0" * 64)
    j.start("b.pt")  # interrupted while uploading
    j.start("c.pt")
    j.fail("c.pt", "boom")
    assert j.totals().done == 1 and j.totals().failed == 1 and j.totals().uploading == 1
    j.close()

    j = Journal.open(tmp_path)
    stale = j.recover()
    assert [r.path for r in stale] == ["b.pt"]
    states = {r.path: r.state for r in j.records()}
    assert states == {"a.pt": "done", "b.pt": "pending", "c.pt": "pending"}
    assert j.get("a.pt").digest == "sha256:" + "0" * 64  # type: ignore[union-attr]
    # A changed file is accepted again: back to pending, digest cleared.
    j.accept(_rec("a.pt", size=11, mtime_ns=2))
    a = j.get("a.pt")
    assert a is not None and a.state == "pending" and a.digest is None and a.size == 11
    j.close()


def test_journal_readonly_sees_a_live_journal(tmp_path: Path) -> None:
    j = Journal.open(tmp_path)
    j.accept(_rec("a.pt", size=5))
    ro = Journal.open_readonly(tmp_path)
    assert ro.totals().pending == 1 and ro.totals().bytes_total == 5
    ro.close()
    j.close()
    with pytest.raises(ConfigError, match="no journal"):
        Journal.open_readonly(tmp_path / "elsewhere")


@pytest.mark.parametrize(
    ("rel", "accepted"),
    [
        ("ep1.pt", True),
        ("checkpoints/ba100.pt.zst", True),
        ("model.tar.gz", True),
        (".ep1.pt.tmp", False),
        ("ep1.pt.tmp", False),
        ("ep1.pt.part", False),
        ("ep1.pt~", False),
        (".hidden/ep1.pt", False),
        ("notes.txt", False),
        (".ckpt-uploader.sqlite", False),
    ],
)
def test_default_filter(rel: str, accepted: bool) -> None:
    assert FileFilter().accepts(rel) is accepted


def test_include_exclude_and_pointer_patterns() -> None:
    f = FileFilter(include=("*.pt", "*.json", "logs/*"), exclude=("scratch*",))
    assert f.accepts("a.pt") and f.accepts("meta.json") and f.accepts("logs/x.txt")
    assert not f.accepts("scratch1.pt") and not f.accepts("other/x.txt")
    assert f.moves_pointer("a.pt") and not f.moves_pointer("meta.json")


def test_layout_maps_ranks(tmp_path: Path) -> None:
    (tmp_path / "rank_3").mkdir()
    single = RunLayout(tmp_path / "rank_3", "exp", default_rank=0)
    loc = single.locate("checkpoints/ep3.pt")
    assert (loc.rank, loc.name, loc.object) == (
        3,
        "checkpoints/ep3.pt",
        "exp/rank_3/checkpoints/ep3.pt",
    )
    multi = RunLayout(tmp_path, "exp/run1", default_rank=5)
    loc = multi.locate("rank_1/ep3.pt")
    assert (loc.rank, loc.name, loc.object) == (1, "ep3.pt", "exp/run1/rank_1/ep3.pt")
    loc = multi.locate("ep3.pt")
    assert (loc.rank, loc.object) == (5, "exp/run1/rank_5/ep3.pt")
    assert RunLayout(tmp_path, "").locate("a.pt").object == "rank_0/a.pt"
    assert multi.relative("/etc/passwd") is None


def test_symlinks_are_not_followed(tmp_path: Path) -> None:
    root = tmp_path / "run"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.pt").write_bytes(b"s")
    (root / "real.pt").write_bytes(b"r")
    os.symlink(outside / "secret.pt", root / "link.pt")
    os.symlink(outside, root / "linkdir")
    real_root = Path(os.path.realpath(root))
    assert list(scan(real_root, FileFilter())) == ["real.pt"]
    assert is_inside(real_root, "link.pt") is None
    assert is_inside(real_root, "linkdir/secret.pt") is None
    assert is_inside(real_root, "real.pt") is not None


def test_local_retention_deletes_only_verified(tmp_path: Path) -> None:
    recs = []
    for i, state in enumerate(["done", "failed", "pending", "done", "done"]):
        p = tmp_path / f"ep{i}.pt"
        p.write_bytes(b"x" * (i + 1))
        os.utime(p, ns=(i * 10**9, i * 10**9))
        st = p.stat()
        recs.append(FileRecord(p.name, 0, p.name, p.name, st.st_size, st.st_mtime_ns, True, state))
    doomed = {r.path for r in local_deletions(recs, tmp_path, keep=2, rank=0)}
    # ep3, ep4 are the newest two; of the rest only the verified ep0 may go.
    assert doomed == {"ep0.pt"}
    # A verified file changed on disk since is not the verified one: kept.
    (tmp_path / "ep0.pt").write_bytes(b"changed")
    os.utime(tmp_path / "ep0.pt", ns=(0, 0))
    assert local_deletions(recs, tmp_path, keep=2, rank=0) == []


def test_config_file_flags_override(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[store]\nprovider = "local"\ncontainer = "/tmp/b1"\nprefix = "p1"\n'
        "[watch]\nkeep_local = 2\n"
    )
    data = load_config_file(str(cfg))
    assert data["watch"] == {"keep_local": 2}
    loc = store_location(None, {}, data["store"])
    assert (loc.hparams.provider, loc.hparams.container, loc.prefix) == ("local", "/tmp/b1", "p1")
    loc = store_location(None, {"container": "/tmp/b2"}, data["store"], prefix="p2")
    assert (loc.hparams.container, loc.prefix) == ("/tmp/b2", "p2")
    # A URI refined by flags: an endpoint for an S3-compatible server.
    loc = store_location("s3://bkt/a/b", {"host": "127.0.0.1", "port": 9000})
    assert (loc.hparams.host, loc.hparams.port, loc.prefix) == ("127.0.0.1", 9000, "a/b")


def test_config_rejects_secrets_and_garbage(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[store]\nprovider = "s3"\ncontainer = "b"\nsecret = "hunter22"\n')
    with pytest.raises(ConfigError, match="credentials come only"):
        load_config_file(str(cfg))
    cfg.write_text("[store\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config_file(str(cfg))
    with pytest.raises(ConfigError, match="no store given"):
        store_location(None, {})
    assert (
        parse_bytes("200M") == 200 << 20 and parse_bytes("1.5k") == 1536 and parse_bytes(None) == 0
    )
    with pytest.raises(ConfigError):
        parse_bytes("fast")
