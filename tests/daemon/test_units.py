"""In-process checks of the daemon's parts: journal, file filter, layout, retention, config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from uploader.bucket.pointer import ManifestFile, PointerEntry, merge
from uploader.config.files import load_config_file, parse_bytes, store_location
from uploader.daemon.checkpoints import NUMBERED
from uploader.daemon.journal import FileRecord, Journal
from uploader.daemon.layouts import (
    DEFAULT_DIR_RULES,
    Checkpoints,
    FileFilter,
    RunLayout,
    Unit,
    is_inside,
    parse_dir_rule,
    scan,
)
from uploader.daemon.retention import apply_local
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
    ("rel", "why"),
    [
        ("ep1.pt", None),
        ("checkpoints/ba100.pt.zst", None),
        ("model.tar.gz", None),
        ("notes.txt", None),  # every file is uploaded, checkpoints or not
        ("step_10/.metadata", None),  # a dot file is not temporary by itself
        (".hidden/ep1.pt", None),
        (".ep1.pt.tmp", "temporary name (*.tmp)"),
        ("ep1.pt.tmp", "temporary name (*.tmp)"),
        ("ep1.pt.part", "temporary name (*.part)"),
        ("ep1.pt~", "temporary name (*~)"),
        (".notes.txt.swp", "temporary name (*.swp)"),
        ("run.lock", "temporary name (*.lock)"),
        ("x.tmp/ep1.pt", "temporary name (*.tmp)"),
        (".ckpt-uploader.sqlite", ""),  # our own: not uploaded, not listed
        (".ckpt-uploader.status.json", ""),
        ("..ckpt-uploader.status.json.123.tmp", ""),
        ("ckpt-uploader-notes.txt", None),  # a user's file, not ours
    ],
)
def test_default_filter(rel: str, why: str | None) -> None:
    assert FileFilter().exclusion(rel) == why
    assert FileFilter().accepts(rel) is (why is None)


def test_include_exclude_say_why() -> None:
    f = FileFilter(include=("*.pt", "*.json", "logs/*"), exclude=("scratch*",))
    assert f.accepts("a.pt") and f.accepts("meta.json") and f.accepts("logs/x.txt")
    assert f.exclusion("scratch1.pt") == "excluded by --exclude scratch*"
    assert f.exclusion("other/x.txt") == "not matched by --include *.pt *.json logs/*"
    assert FileFilter(own=frozenset({"status.json"})).exclusion("status.json") == ""


def _touch(root: Path, rel: str, data: bytes = b"x") -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(data)


def test_checkpoint_units_by_layout(tmp_path: Path) -> None:
    """Which checkpoint each file belongs to: numbered, DeepSpeed and Megatron directories
    by name, DCP once .metadata exists, single files by name, everything else an artifact;
    a numbered directory's trainer (and so its marker) read from its files."""
    rules = Checkpoints()
    for rel in (
        "checkpoint-8/model.safetensors",
        "checkpoint-8/optimizer.pt",
        "ckpts/__0_0.distcp",
        "global_step5/mp_rank_00_model_states.pt",
        "lightning_logs/version_0/metrics.csv",
        "epoch=0-step=8.ckpt",
        "sub/w.safetensors",
    ):
        _touch(tmp_path, rel)
    unit = rules.unit
    hf = unit(tmp_path, "checkpoint-8/optimizer.pt")
    assert hf == Unit("checkpoint-8", "numbered", True)
    # nothing yet shows which trainer wrote it, but checkpoint-N is the HF Trainer's
    # (and diffusers') name: never merely settled
    assert rules.resolve(tmp_path, hf).name == "hf"
    _touch(tmp_path, "checkpoint-8/training_args.bin")
    assert rules.resolve(tmp_path, hf).name == "hf"
    assert not rules.complete(tmp_path, hf)
    _touch(tmp_path, "checkpoint-8/trainer_state.json")
    assert rules.complete(tmp_path, hf)
    # DCP in a directory without a number: an artifact until its marker exists
    assert unit(tmp_path, "ckpts/__0_0.distcp") is None
    _touch(tmp_path, "ckpts/.metadata")
    assert unit(tmp_path, "ckpts/__0_0.distcp") == Unit("ckpts", "dcp", True)
    # DeepSpeed: complete once 'latest' names it
    ds = unit(tmp_path, "global_step5/mp_rank_00_model_states.pt")
    assert ds == Unit("global_step5", "deepspeed", True)
    assert not rules.complete(tmp_path, ds)
    (tmp_path / "latest").write_text("global_step5\n")
    assert rules.complete(tmp_path, ds)
    assert unit(tmp_path, "epoch=0-step=8.ckpt") == Unit("epoch=0-step=8.ckpt", "file", False)
    assert unit(tmp_path, "sub/w.safetensors") == Unit("sub/w.safetensors", "file", False)
    assert unit(tmp_path, "lightning_logs/version_0/metrics.csv") is None
    # a user rule comes first
    user = Checkpoints(rules=(parse_dir_rule("lightning_logs=metrics.csv"), *DEFAULT_DIR_RULES))
    _touch(tmp_path, "lightning_logs/metrics.csv")
    assert user.unit(tmp_path, "lightning_logs/x.txt") == Unit(
        "lightning_logs", "dir:lightning_logs", True
    )


@pytest.mark.parametrize(
    "name",
    [
        "checkpoint-64",
        "checkpoint_4",
        "step_10",
        "step-10",
        "global_step100",
        "iter_0000100",
        "epoch_3",
        "epoch=3-step=100",
        "Epoch3",
        "ckpt-7",
    ],
)
def test_numbered_directories_are_one_checkpoint(name: str) -> None:
    assert NUMBERED.match(name)


@pytest.mark.parametrize(
    "name", ["checkpoints", "version_0", "rank_1", "run3", "lightning_logs", "step", "best-5x"]
)
def test_unnumbered_directories_are_folders(name: str) -> None:
    assert not NUMBERED.match(name)


def test_outermost_numbered_directory_wins(tmp_path: Path) -> None:
    """diffusers' checkpoint-N/unet/..., Megatron's iter_N/mp_rank_00/..., an HF Trainer's
    FSDP checkpoint-N/pytorch_model_fsdp_0/.metadata: one checkpoint each, the outer one."""
    rules = Checkpoints()
    _touch(tmp_path, "out/checkpoint-4/unet/diffusion_pytorch_model.safetensors")
    _touch(tmp_path, "iter_0000100/mp_rank_00/model_optim_rng.pt")
    _touch(tmp_path, "checkpoint-8/pytorch_model_fsdp_0/.metadata")
    _touch(tmp_path, "checkpoints/step_3/epoch_1/x.pt")
    assert rules.unit(tmp_path, "out/checkpoint-4/unet/diffusion_pytorch_model.safetensors") == (
        Unit("out/checkpoint-4", "numbered", True)
    )
    mg = rules.unit(tmp_path, "iter_0000100/mp_rank_00/model_optim_rng.pt")
    assert mg == Unit("iter_0000100", "megatron", True)
    assert not rules.complete(tmp_path, mg)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("50")
    assert not rules.complete(tmp_path, mg)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("100")
    assert rules.complete(tmp_path, mg)
    assert rules.unit(tmp_path, "checkpoint-8/pytorch_model_fsdp_0/.metadata") == Unit(
        "checkpoint-8", "numbered", True
    )
    assert rules.unit(tmp_path, "checkpoints/step_3/epoch_1/x.pt") == Unit(
        "checkpoints/step_3", "numbered", True
    )


@pytest.mark.parametrize(
    "files,rule,marker",
    [
        (["model.safetensors", "optimizer.bin"], "accelerate", "random_states_0.pkl"),
        (["unet/config.json", "scheduler.bin"], "accelerate", "random_states_0.pkl"),
        (["model.safetensors", "rng_state.pth"], "hf", "trainer_state.json"),
        (["__0_0.distcp", "__1_0.distcp"], "dcp", ".metadata"),
        (["model.pt", "notes.txt"], "settled", ""),
        (["pytorch_model_fsdp_0/.metadata"], "accelerate", "random_states_0.pkl"),
    ],
)
def test_a_numbered_directory_is_read_by_its_files(
    tmp_path: Path, files: list[str], rule: str, marker: str
) -> None:
    rules = Checkpoints()
    for f in files:
        _touch(tmp_path, f"step_5/{f}")
    u = rules.unit(tmp_path, f"step_5/{files[0]}")
    assert u is not None
    r = rules.resolve(tmp_path, u)
    assert (r.name, r.marker) == (rule, marker)
    assert rules.complete(tmp_path, u) == (rule == "settled")
    if marker:
        _touch(tmp_path, f"step_5/{marker}")
        assert rules.complete(tmp_path, u)


@pytest.mark.parametrize("name", ["checkpoint-7", "checkpoint_7"])
def test_hf_and_accelerate_names_are_never_merely_settled(tmp_path: Path, name: str) -> None:
    """Their first files (the model) show no trainer yet: they wait for a marker."""
    rules = Checkpoints()
    _touch(tmp_path, f"{name}/model.safetensors")
    u = rules.unit(tmp_path, f"{name}/model.safetensors")
    assert u is not None and rules.resolve(tmp_path, u).name == "hf"
    assert not rules.complete(tmp_path, u)


def test_settled_user_rule(tmp_path: Path) -> None:
    r = parse_dir_rule("settled:run_*")
    assert (r.name, r.glob, r.marker) == ("settled:run_*", "run_*", "")
    rules = Checkpoints(rules=(r, *DEFAULT_DIR_RULES))
    _touch(tmp_path, "run_a/w.pt")
    u = rules.unit(tmp_path, "run_a/w.pt")
    assert u == Unit("run_a", "settled:run_*", True) and rules.complete(tmp_path, u)


@pytest.mark.parametrize(
    "text", ["step_*", "=COMMITTED", "step_*=", "step_*=a/b", "../x=M", "settled:", "settled:../x"]
)
def test_bad_checkpoint_dir_rules(text: str) -> None:
    with pytest.raises(ConfigError, match="--checkpoint-dir"):
        parse_dir_rule(text)


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


def test_local_retention_deletes_whole_verified_checkpoints(tmp_path: Path) -> None:
    """keep=1: the older directory checkpoint goes whole (files, then the directory) once
    every file is verified; a checkpoint with an unverified file is kept whole."""
    root = tmp_path / "run"
    j = Journal.open(tmp_path / "state")
    layout = RunLayout(root, "p")
    entries = []
    for n, state in ((8, "done"), (16, "pending"), (24, "done")):
        files = []
        for f in ("model.safetensors", "trainer_state.json"):
            rel = f"checkpoint-{n}/{f}"
            _touch(root, rel, b"w" * n)
            st = (root / rel).stat()
            j.accept(FileRecord(rel, 0, rel, f"p/rank_0/{rel}", st.st_size, st.st_mtime_ns, True))
            if state == "done" or f == "model.safetensors":
                j.done(rel, "sha256:" + "0" * 64)
            files.append(ManifestFile(rel, st.st_size, "sha256:" + "0" * 64))
        entries.append(
            PointerEntry(
                f"checkpoint-{n}",
                f"p/rank_0/checkpoint-{n}",
                2 * n,
                "d",
                n,
                rule="hf",
                files=tuple(files),
            )
        )
    p = None
    for e in entries:
        p = merge(p, 0, e)
    assert p is not None and p.latest.name == "checkpoint-24"
    deleted = apply_local(j, layout, p, keep=1)
    assert sorted(deleted) == ["checkpoint-8/model.safetensors", "checkpoint-8/trainer_state.json"]
    assert not (root / "checkpoint-8").exists()
    # checkpoint-16 has an unverified file: nothing of it goes
    assert sorted(x.name for x in (root / "checkpoint-16").iterdir()) == [
        "model.safetensors",
        "trainer_state.json",
    ]
    # a verified file changed on disk since is not the verified one: kept
    j.done("checkpoint-16/trainer_state.json", "sha256:" + "0" * 64)
    (root / "checkpoint-16/model.safetensors").write_bytes(b"changed")
    assert apply_local(j, layout, p, keep=1) == []
    j.close()


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
