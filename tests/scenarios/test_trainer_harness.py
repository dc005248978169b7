"""The real-trainer harness (harness/trainers): what each trainer writes, exact resumes, and
the incomplete state a kill in the middle of a save leaves.

Each framework's runs start once per module, two at a time, and the tests read their
directories and JSON records.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest

from harness.trainers import ROOT, files_digest, records, run_trainer

pytestmark = pytest.mark.timeout(300)

Run = subprocess.CompletedProcess[str]
KILLED = -signal.SIGKILL

HF_FILES = {
    "config.json",
    "model.safetensors",
    "optimizer.pt",
    "rng_state.pth",
    "scheduler.pt",
    "trainer_state.json",
    "training_args.bin",
}


def _both(*calls: Callable[[], Run]) -> list[Run]:
    """Run trainer calls two at a time (the machine has two cores)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda call: call(), calls))


def _ok(run: Run) -> Run:
    assert run.returncode == 0, f"{run.args}\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
    return run


def _last(run: Run, event: str) -> dict[str, Any]:
    found = [r for r in records(run) if r.get("event") == event]
    assert found, f"no {event!r} record in {run.stdout[-2000:]}"
    return found[-1]


def _names(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def _left_running(marker: Path) -> list[str]:
    """Processes whose command line names ``marker`` (a run directory)."""
    out = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if any(str(marker) in part for part in cmd):
            out.append(" ".join(cmd))
    return out


# -- the helpers -----------------------------------------------------------------------------


def test_trainer_modules_import_without_torch() -> None:
    code = (
        "import sys, harness.trainers, harness.trainers.lightning_run, "
        "harness.trainers.hf_run, harness.trainers.dcp_run\n"
        "heavy = [m for m in ('torch', 'transformers', 'pytorch_lightning') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_files_digest_follows_links_and_names_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.bin").write_bytes(b"abc")
    (tmp_path / "b.ckpt").write_bytes(b"")
    os.symlink("sub/a.bin", tmp_path / "last.ckpt")
    got = files_digest(tmp_path)
    abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert got == {"sub/a.bin": abc, "b.ckpt": empty, "last.ckpt": abc}


# -- Lightning -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lightning(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("lightning")
    full, cut = base / "full", base / "cut"
    full_run, cut_run = _both(
        lambda: run_trainer("lightning_run", full, "--epochs", "3"),
        lambda: run_trainer(
            "lightning_run", cut, "--epochs", "3", "--max-epochs", "1", "--save-last", "link"
        ),
    )
    _ok(full_run)
    _ok(cut_run)
    cut_files = files_digest(cut)
    resumed = base / "resumed"
    resume_run = _ok(
        run_trainer(
            "lightning_run", resumed, "--epochs", "3", "--resume", cut / "epoch=0-step=8.ckpt"
        )
    )
    return {
        "full": full,
        "full_run": full_run,
        "cut": cut,
        "cut_files": cut_files,
        "resumed": resumed,
        "resume_run": resume_run,
    }


def test_lightning_writes_epoch_checkpoints_last_and_metrics(lightning: dict[str, Any]) -> None:
    full: Path = lightning["full"]
    assert _names(full) == {
        "epoch=0-step=8.ckpt",
        "epoch=1-step=16.ckpt",
        "epoch=2-step=24.ckpt",
        "last.ckpt",
        "logs",
    }
    assert not (full / "last.ckpt").is_symlink()
    assert _names(full / "logs") == {"metrics.csv", "hparams.yaml"}
    header = (full / "logs" / "metrics.csv").read_text().splitlines()[0]
    assert "train_loss_step" in header
    end = _last(lightning["full_run"], "end")
    assert end["global_step"] == 24 and end["epoch"] == 3


def test_lightning_save_last_link_is_a_symlink_to_the_newest_epoch(
    lightning: dict[str, Any],
) -> None:
    cut: Path = lightning["cut"]
    assert set(lightning["cut_files"]) == {
        "epoch=0-step=8.ckpt",
        "last.ckpt",
        "logs/metrics.csv",
        "logs/hparams.yaml",
    }
    assert (cut / "last.ckpt").is_symlink()
    assert os.readlink(cut / "last.ckpt") == "epoch=0-step=8.ckpt"


def test_lightning_resume_is_bit_exact(lightning: dict[str, Any]) -> None:
    full_end = _last(lightning["full_run"], "end")
    resumed_end = _last(lightning["resume_run"], "end")
    assert resumed_end["global_step"] == 24
    assert resumed_end["digest"] == full_end["digest"]
    # the resumed run writes the epochs after the one it resumed from
    assert {"epoch=1-step=16.ckpt", "epoch=2-step=24.ckpt"} <= _names(lightning["resumed"])


# -- Hugging Face Trainer --------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("hf")
    full, killed = base / "full", base / "killed"
    args = ("--save-steps", "8", "--max-steps", "16")
    full_run, kill_run = _both(
        lambda: run_trainer("hf_run", full, *args),
        lambda: run_trainer("hf_run", killed, *args, "--kill-mid-save", "16"),
    )
    _ok(full_run)
    killed_files = files_digest(killed)
    resume_run = _ok(run_trainer("hf_run", killed, *args, "--resume", killed / "checkpoint-8"))
    return {
        "full": full,
        "full_run": full_run,
        "killed": killed,
        "kill_run": kill_run,
        "killed_files": killed_files,
        "resume_run": resume_run,
    }


def test_hf_writes_checkpoint_dirs_with_trainer_state(hf: dict[str, Any]) -> None:
    full: Path = hf["full"]
    assert _names(full) == {"checkpoint-8", "checkpoint-16"}
    for n in (8, 16):
        assert _names(full / f"checkpoint-{n}") == HF_FILES
    saves = [r["step"] for r in records(hf["full_run"]) if r["event"] == "save"]
    assert saves == [8, 16]
    assert _last(hf["full_run"], "end")["global_step"] == 16


def test_hf_kill_mid_save_leaves_a_dir_without_trainer_state(hf: dict[str, Any]) -> None:
    run: Run = hf["kill_run"]
    assert run.returncode == KILLED, run.stderr[-3000:]
    assert "end" not in {r["event"] for r in records(run)}
    by_dir: dict[str, set[str]] = {}
    for rel in hf["killed_files"]:
        folder, name = rel.split("/", 1)
        by_dir.setdefault(folder, set()).add(name)
    assert by_dir == {"checkpoint-8": HF_FILES, "checkpoint-16": HF_FILES - {"trainer_state.json"}}
    # what was written before the kill is what an uninterrupted run writes
    full = files_digest(hf["full"])
    for rel in ("checkpoint-8/model.safetensors", "checkpoint-16/model.safetensors"):
        assert hf["killed_files"][rel] == full[rel]


def test_hf_resume_from_the_last_complete_checkpoint_is_bit_exact(hf: dict[str, Any]) -> None:
    resumed = _last(hf["resume_run"], "end")
    assert resumed["global_step"] == 16
    assert resumed["digest"] == _last(hf["full_run"], "end")["digest"]
    assert _names(hf["killed"] / "checkpoint-16") == HF_FILES


# -- torch.distributed.checkpoint ------------------------------------------------------------


@pytest.fixture(scope="module")
def dcp(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("dcp")
    full, killed = base / "full", base / "killed"
    ws2 = ("--steps", "10,20", "--world-size", "2")
    full_run, kill_run = _both(
        lambda: run_trainer("dcp_run", full, *ws2),
        lambda: run_trainer("dcp_run", killed, *ws2, "--kill-mid-save", "20"),
    )
    _ok(full_run)
    left = _left_running(killed)
    load_run = _ok(run_trainer("dcp_run", base / "unused", "--load", full / "step_20"))
    return {
        "full": full,
        "full_run": full_run,
        "killed": killed,
        "kill_run": kill_run,
        "left": left,
        "load_run": load_run,
    }


def _saves(run: Run) -> dict[int, str]:
    return {r["step"]: r["digest"] for r in records(run) if r["event"] == "save"}


def test_dcp_two_ranks_write_one_shared_directory(dcp: dict[str, Any]) -> None:
    full: Path = dcp["full"]
    assert _names(full) == {"step_10", "step_20"}
    for step in (10, 20):
        assert _names(full / f"step_{step}") == {".metadata", "__0_0.distcp", "__1_0.distcp"}
    assert set(_saves(dcp["full_run"])) == {10, 20}


def test_dcp_load_on_another_world_size_gives_the_saved_digest(dcp: dict[str, Any]) -> None:
    loaded = _last(dcp["load_run"], "load")
    assert loaded["step"] == 20
    assert loaded["digest"] == _saves(dcp["full_run"])[20]


def test_dcp_kill_mid_save_leaves_shards_without_metadata(dcp: dict[str, Any]) -> None:
    run: Run = dcp["kill_run"]
    assert run.returncode == KILLED, run.stderr[-3000:]
    killed: Path = dcp["killed"]
    assert _names(killed / "step_10") == {".metadata", "__0_0.distcp", "__1_0.distcp"}
    assert _names(killed / "step_20") == {"__0_0.distcp", "__1_0.distcp"}
    assert _saves(run) == {10: _saves(dcp["full_run"])[10]}
    # the shards on disk are the bytes a completed save writes (only .metadata, which
    # names the save's id and path, differs between runs)
    complete = files_digest(dcp["full"] / "step_20")
    del complete[".metadata"]
    assert files_digest(killed / "step_20") == complete
    assert dcp["left"] == [], "ranks outlived their killed launcher"


def test_dcp_single_rank_kill_before_the_metadata_rename(tmp_path: Path) -> None:
    run = run_trainer(
        "dcp_run", tmp_path, "--steps", "3,6", "--kill-mid-save", "6", "--kill-at", "rename"
    )
    assert run.returncode == KILLED, run.stderr[-3000:]
    assert _names(tmp_path / "step_3") == {".metadata", "__0_0.distcp"}
    assert _names(tmp_path / "step_6") == {".metadata.tmp", "__0_0.distcp"}
    assert (tmp_path / "step_6" / ".metadata.tmp").stat().st_size > 0


def test_run_trainer_passes_failures_back(tmp_path: Path) -> None:
    run = run_trainer("dcp_run", tmp_path, "--world-size", "two")
    assert run.returncode == 2 and "--world-size" in run.stderr
    with pytest.raises(subprocess.CalledProcessError):
        run_trainer("dcp_run", tmp_path, "--world-size", "two", check=True)
    # a kill step that is no save step would never kill: refused before anything runs
    for module, args in [
        ("dcp_run", ("--steps", "10,20", "--kill-mid-save", "15")),
        ("hf_run", ("--save-steps", "8", "--kill-mid-save", "12")),
    ]:
        run = run_trainer(module, tmp_path / module, *args)
        assert run.returncode == 2 and "is not a save step" in run.stderr, run.stderr
        assert not (tmp_path / module).exists()
