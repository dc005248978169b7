"""Any trainer, no configuration: real Accelerate and Hugging Face Trainer runs beside a
real ``ckpt-uploader watch`` (the LOCAL store: a directory as the bucket), and layouts
reproduced from the trainers' own save code where the library does not install here.

Each checkpoint directory is committed whole, by the rule of the trainer that wrote it;
no file inside one is ever ``latest``; a checkpoint the trainer rotated away is counted,
not warned about; a save cut short is never committed.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from harness.trainers import last, records, run_trainer, succeeded
from tests.daemon.test_checkpoint_sets import daemons, drain, watch  # noqa: F401
from tests.daemon.test_process import Daemon, local_uri, pointer, run_cli

pytestmark = pytest.mark.slow

ACCELERATE_FILES = {
    "model.safetensors",
    "optimizer.bin",
    "scheduler.bin",
    "random_states_0.pkl",
    "custom_checkpoint_0.pkl",
}
DIFFUSERS_FILES = (ACCELERATE_FILES - {"model.safetensors"}) | {
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
}


def latest_entry(bucket: Path, prefix: str) -> dict[str, Any]:
    return dict(pointer(bucket, prefix)["latest"])


def names(entry: dict[str, Any]) -> set[str]:
    """The entry's files, relative to its directory."""
    return {f["path"][len(entry["name"]) + 1 :] for f in entry["files"]}


def resume(bucket: Path, prefix: str, tmp: Path, layout: str) -> dict[str, Any]:
    """``fetch_latest`` then ``accelerator.load_state`` in a fresh trainer process."""
    done = run_trainer(
        "accelerate_run",
        tmp / "resume-run",
        "--layout",
        layout,
        "--resume-from-bucket",
        local_uri(bucket, prefix),
        tmp / "restore",
    )
    return last(succeeded(done), "loaded")


@pytest.mark.parametrize(
    "layout,args,latest,files",
    [
        ("auto", ("--total-limit", "2"), "checkpoints/checkpoint_3", ACCELERATE_FILES),
        ("diffusers", (), "checkpoint-8", DIFFUSERS_FILES),
    ],
)
def test_accelerate_save_state_commits_whole_directories_and_resumes(
    tmp_path: Path,
    local_bucket: Path,
    daemons: list[Daemon],  # noqa: F811
    layout: str,
    args: tuple[str, ...],
    latest: str,
    files: set[str],
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    d = watch(daemons, run, local_bucket, "acc", "--settle", "0.3")
    trained = succeeded(
        run_trainer("accelerate_run", run, "--layout", layout, "--steps", "8", *args)
    )
    log = drain(d)
    entry = latest_entry(local_bucket, "acc")
    assert (entry["name"], entry["rule"]) == (latest, "accelerate"), log
    assert names(entry) == files
    history = pointer(local_bucket, "acc")["history"]
    # every committed entry is a whole directory, never a file inside one
    assert all(e["rule"] == "accelerate" and names(e) == files for e in history)
    assert "was not committed" not in log
    loaded = resume(local_bucket, "acc", tmp_path, layout)
    assert loaded["path"] == str(tmp_path / "restore" / latest)
    assert loaded["digest"] == last(trained, "end")["digest"] and loaded["step"] == 8


def test_accelerate_killed_before_its_last_file_is_never_committed(
    tmp_path: Path,
    local_bucket: Path,
    daemons: list[Daemon],  # noqa: F811
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    d = watch(daemons, run, local_bucket, "acc", "--settle", "0.3")
    killed = run_trainer(
        "accelerate_run", run, "--layout", "diffusers", "--steps", "8", "--kill-before-rng", "4"
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    saved = [r["step"] for r in records(killed) if r["event"] == "save"]
    assert saved == [2]
    cut = run / "checkpoint-4"
    assert (cut / "optimizer.bin").exists() and not (cut / "random_states_0.pkl").exists()
    log = drain(d)  # checkpoint-2 was committed: the run is not in error
    entry = latest_entry(local_bucket, "acc")
    assert entry["name"] == "checkpoint-2"
    assert {e["name"] for e in pointer(local_bucket, "acc")["history"]} == {"checkpoint-2"}
    assert "checkpoint-4 was not committed: no random_states_0.pkl yet" in log
    status = run_cli("status", str(run), "--json")
    assert "checkpoint-4" in status.stdout


def test_hf_save_total_limit_rotation_is_counted_not_warned(
    tmp_path: Path,
    local_bucket: Path,
    daemons: list[Daemon],  # noqa: F811
) -> None:
    """The Trainer deletes old checkpoint-N/ itself; an uploader slower than its saves
    (--bwlimit) sees directories vanish before their files are sent."""
    run = tmp_path / "run"
    run.mkdir()
    d = watch(daemons, run, local_bucket, "hf", "--settle", "0.2", "--bwlimit", "150K")
    trained = succeeded(
        run_trainer(
            "hf_run", run, "--save-steps", "2", "--max-steps", "16", "--save-total-limit", "2"
        )
    )
    log = drain(d, timeout=120)
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint-")) == [
        "checkpoint-14",
        "checkpoint-16",
    ]
    assert latest_entry(local_bucket, "hf")["name"] == "checkpoint-16", log
    assert "was not committed" not in log and " ERROR " not in log, log
    rotated = [line for line in log.splitlines() if "rotated away before upload:" in line]
    assert len(rotated) == 1, log
    assert int(rotated[0].split("rotated away before upload: ")[1].split()[0]) >= 1
    assert last(trained, "end")


def test_unrecognised_numbered_directory_written_slowly_is_committed_once_whole(
    tmp_path: Path,
    local_bucket: Path,
    daemons: list[Daemon],  # noqa: F811
) -> None:
    """A loop of its own writing step_N/ file by file, with pauses shorter than --settle:
    one commit of the whole directory, by the ``settled`` rule."""
    run = tmp_path / "run"
    (run / "step_100").mkdir(parents=True)
    d = watch(daemons, run, local_bucket, "own", "--settle", "1.0")
    parts = [f"part{i}.pt" for i in range(5)]
    for n in parts:
        with open(run / "step_100" / n, "wb") as f:
            f.write(os.urandom(50_000))
        time.sleep(0.4)
    d.wait_status(lambda s: s.get("committed", 0) >= 1, timeout=30)
    log = drain(d)
    p = pointer(local_bucket, "own")
    assert [(e["name"], e["rule"]) for e in p["history"]] == [("step_100", "settled")], log
    assert {f["path"] for f in p["history"][0]["files"]} == {f"step_100/{n}" for n in parts}
    assert d.status()["committed"] == 1


def test_a_run_that_committed_nothing_exits_1_and_says_what_it_waited_for(
    tmp_path: Path, local_bucket: Path
) -> None:
    """Files uploaded, a checkpoint directory seen, nothing committed: push exits 1."""
    run = tmp_path / "run"
    (run / "checkpoint-3").mkdir(parents=True)
    (run / "checkpoint-3" / "model.safetensors").write_bytes(os.urandom(1000))
    (run / "checkpoint-3" / "training_args.bin").write_bytes(b"args")
    out = run_cli("push", str(run), "--to", local_uri(local_bucket, "p"), "--settle", "0.1")
    assert out.returncode == 1, out.stderr
    assert "checkpoint-3 was not committed: no trainer_state.json yet" in out.stderr
    assert "nothing was committed" in out.stderr


def test_sidecar_raises_when_a_run_committed_nothing(tmp_path: Path, local_bucket: Path) -> None:
    """The training side's view of the same: leaving the Sidecar block raises WorkerError
    that names the checkpoint and what it waited for."""
    from uploader import Sidecar
    from uploader.launch.failure import WorkerError

    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(WorkerError) as err, Sidecar(run, to=local_uri(local_bucket, "sc")):
        (run / "checkpoint-3").mkdir()
        (run / "checkpoint-3" / "model.safetensors").write_bytes(os.urandom(1000))
        (run / "checkpoint-3" / "training_args.bin").write_bytes(b"args")
    assert "checkpoint-3" in str(err.value) and "trainer_state.json" in str(err.value)


def _deepspeed_save(save_dir: Path, step: int, finish: bool = True) -> None:
    """DeepSpeed's ``engine.save_checkpoint(save_dir)`` as its code writes it (reproduced:
    the package builds native code and is not installed here): each rank's model and
    optimizer states in ``global_step{N}/``, then, after a barrier, rank 0 writes the tag
    file ``latest`` naming the directory."""
    ck = save_dir / f"global_step{step}"
    ck.mkdir(parents=True)
    (ck / "mp_rank_00_model_states.pt").write_bytes(os.urandom(30_000))
    for rank in range(2):
        (ck / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(os.urandom(20_000))
    if finish:
        (save_dir / "latest").write_text(f"global_step{step}")


def _megatron_save(save_dir: Path, iteration: int, finish: bool = True) -> None:
    """Megatron-LM's ``save_checkpoint`` as its code writes it (reproduced: not on PyPI):
    each tensor-parallel rank's ``iter_{:07d}/mp_rank_0T/model_optim_rng.pt``, then, after
    a barrier, rank 0 writes ``latest_checkpointed_iteration.txt``."""
    for tp in range(2):
        d = save_dir / f"iter_{iteration:07d}" / f"mp_rank_0{tp}"
        d.mkdir(parents=True)
        (d / "model_optim_rng.pt").write_bytes(os.urandom(25_000))
    if finish:
        (save_dir / "latest_checkpointed_iteration.txt").write_text(str(iteration))


@pytest.mark.parametrize(
    "save,names,rule",
    [
        (_deepspeed_save, ["global_step10", "global_step20", "global_step30"], "deepspeed"),
        (_megatron_save, ["iter_0000010", "iter_0000020", "iter_0000030"], "megatron"),
    ],
)
def test_tagged_layouts_commit_each_save_once_its_tag_names_it(
    tmp_path: Path,
    local_bucket: Path,
    daemons: list[Daemon],  # noqa: F811
    save: Any,
    names: list[str],
    rule: str,
) -> None:
    """Saves complete once the tag (DeepSpeed) or tracker (Megatron) file names them; a
    save cut short before its tag is never committed, and the tag of the last complete
    save keeps `latest` where it is."""
    run = tmp_path / "run"
    run.mkdir()
    d = watch(daemons, run, local_bucket, rule, "--settle", "0.2")
    save(run, 10)
    d.wait_status(lambda s: s.get("committed", 0) >= 1, timeout=30)
    save(run, 20)
    d.wait_status(lambda s: s.get("committed", 0) >= 2, timeout=30)
    save(run, 30, finish=False)  # killed before the tag: its files are all on disk
    log = drain(d)
    p = pointer(local_bucket, rule)
    assert p["latest"]["name"] == names[1], log
    assert {(e["name"], e["rule"]) for e in p["history"]} == {(n, rule) for n in names[:2]}
    assert all(len(e["files"]) == (3 if rule == "deepspeed" else 2) for e in p["history"])
    assert f"checkpoint {names[2]} was not committed" in log
