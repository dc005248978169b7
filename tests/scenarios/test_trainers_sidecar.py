"""The sidecar beside real trainers: ``ckpt-uploader watch RUN_DIR`` runs as its own process
while Lightning, the Hugging Face Trainer or torch DCP (harness/trainers) writes RUN_DIR.

Each case starts the sidecar before the trainer, lets the trainer run to its end (or kill
itself in the middle of a save), then ends the sidecar with SIGTERM (a drain, exit 0) and
checks the bucket: every file byte-identical, the pointer naming only complete checkpoints
with their manifests, and ``pull .../latest`` restoring a checkpoint the trainer resumes
from with the uninterrupted run's weights. The stores are the LOCAL one (a directory) and,
for one trainer, a real S3 server (rclone).

Each framework's runs start once per module, one at a time (the machine has two cores);
the tests read their directories, buckets, pointers and status files.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from harness.trainers import (
    HF_FILES,
    files_digest,
    last,
    recorded_digests,
    run_trainer,
    saves,
    succeeded,
)
from tests.daemon.test_process import Daemon, local_uri, run_cli
from tests.fixtures.s3 import S3Server
from uploader.transfer.digest import DIGEST_SUFFIX

pytestmark = pytest.mark.timeout(600)

Run = subprocess.CompletedProcess[str]
KILLED = -signal.SIGKILL
PREFIX = "exp"
OWN = ".ckpt-uploader"  # the sidecar's journal and lock in RUN_DIR


@dataclass
class Side:
    """One trainer run with the sidecar beside it."""

    run_dir: Path
    bucket: Path  # the directory that holds ``{PREFIX}/rank_0/...``
    uri: str  # the sidecar's --to (prefix PREFIX)
    latest_uri: str  # ``.../PREFIX/latest`` for pull
    run: Run
    ended: float  # time.time() when the trainer had exited (the sidecar was signalled then)
    code: int  # the sidecar's exit code
    status: dict[str, Any]
    log: str

    def pointer(self) -> dict[str, Any]:
        return dict(json.loads((self.bucket / PREFIX / "rank_0" / "latest.json").read_text()))

    def objects(self) -> dict[str, str]:
        """``{name inside rank_0: sha256}`` of the bucket's objects, without the pointer and
        the digest records a store without metadata (LOCAL) keeps beside each object."""
        got = files_digest(self.bucket / PREFIX / "rank_0")
        return {
            k: v for k, v in got.items() if k != "latest.json" and not k.endswith(DIGEST_SUFFIX)
        }

    def local_files(self) -> dict[str, str]:
        """``{path: sha256}`` of RUN_DIR without the sidecar's own files."""
        return {k: v for k, v in files_digest(self.run_dir).items() if not k.startswith(OWN)}

    def pull(self, dest: Path, what: str = "latest") -> Path:
        uri = self.latest_uri if what == "latest" else self.uri_of(what)
        out = run_cli("pull", uri, f"{dest}/", "-q", timeout=120)
        assert out.returncode == 0, f"pull {uri}: {out.stdout}\n{out.stderr}"
        return dest

    def uri_of(self, name: str) -> str:
        return self.latest_uri.replace(f"{PREFIX}/latest", f"{PREFIX}/rank_0/{name}")


def _left_running(marker: Path) -> list[str]:
    """Processes whose command line names ``marker`` (a run directory)."""
    out = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if any(str(marker) in part for part in cmd):
            out.append(" ".join(cmd))
    return out


def beside(
    base: Path,
    name: str,
    module: str,
    *args: str | Path,
    s3: tuple[S3Server, str] | None = None,
) -> Side:
    """Start the sidecar on ``base/name/run``, run the trainer there, then SIGTERM the
    sidecar and wait for its drain. The store is a LOCAL bucket ``base/name/bucket``, or
    ``s3=(server, bucket)``."""
    home = base / name
    run_dir = home / "run"
    run_dir.mkdir(parents=True)
    if s3 is None:
        bucket = home / "bucket"
        bucket.mkdir()
        uri, latest = local_uri(bucket, PREFIX), local_uri(bucket, f"{PREFIX}/latest")
    else:
        server, container = s3
        assert server.data_dir is not None
        bucket = server.data_dir / container
        uri, latest = server.uri(container, PREFIX), server.uri(container, f"{PREFIX}/latest")
    d = Daemon(home, run_dir, "--to", uri, "--settle", "0.3", "--drain-timeout", "120")
    try:
        d.wait_running()
        run = run_trainer(module, run_dir, *args)
        ended = time.time()
        d.signal(signal.SIGTERM)
        code = d.wait(timeout=150)
    finally:
        d.kill()
    return Side(run_dir, bucket, uri, latest, run, ended, code, d.status(), d.log())


def _drained(side: Side) -> Side:
    assert side.code == 0, f"sidecar exit {side.code}\n{side.log[-4000:]}"
    assert side.status.get("state") == "done", side.status
    return side


def _entries(pointer: dict[str, Any]) -> list[dict[str, Any]]:
    return [pointer["latest"], *pointer.get("history", [])]


def _committed_names(pointer: dict[str, Any]) -> set[str]:
    return {e["name"] for e in _entries(pointer)}


def _manifest(entry: dict[str, Any]) -> dict[str, tuple[int, str]]:
    return {f["path"]: (f["size"], f["digest"]) for f in entry["files"]}


def _on_disk(side: Side, name: str) -> dict[str, tuple[int, str]]:
    """The manifest that ``name`` (a directory in RUN_DIR) should have."""
    out = {}
    for rel, digest in recorded_digests(side.run_dir / name).items():
        size = (side.run_dir / name / rel).stat().st_size
        out[f"{name}/{rel}"] = (size, digest)
    return out


# -- Lightning -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lightning(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("lightning-side")
    full = beside(base, "full", "lightning_run", "--epochs", "3")
    # stops after epoch 0 of a 3-epoch schedule, last.ckpt a link
    cut = beside(
        base, "cut", "lightning_run", "--epochs", "3", "--max-epochs", "1", "--save-last", "link"
    )
    succeeded(full.run)
    succeeded(cut.run)
    pulled = cut.pull(base / "pulled")
    resumed = succeeded(
        run_trainer(
            "lightning_run",
            base / "resumed",
            "--epochs",
            "3",
            "--resume",
            pulled / "epoch=0-step=8.ckpt",
        )
    )
    return {"full": full, "cut": cut, "pulled": pulled, "resumed": resumed, "base": base}


def test_lightning_every_file_reaches_the_bucket_byte_identical(lightning: dict[str, Any]) -> None:
    full: Side = _drained(lightning["full"])
    local = full.local_files()
    assert {"epoch=2-step=24.ckpt", "last.ckpt", "logs/metrics.csv"} <= set(local)
    # the metrics log keeps changing during training: its final version is the one up
    assert full.objects() == local
    names = _committed_names(full.pointer())
    assert {"epoch=0-step=8.ckpt", "epoch=1-step=16.ckpt", "epoch=2-step=24.ckpt"} <= names
    assert not any(n.startswith("logs/") for n in names), names
    assert full.pointer()["latest"]["rule"] == "file"
    # committed beside training, not only at the drain: Lightning renames each checkpoint
    # in from TMPDIR (fsspec), and a rename is taken at once (the margin is the trainer's
    # seconds of teardown)
    first = {e["name"]: e for e in _entries(full.pointer())}["epoch=0-step=8.ckpt"]
    assert first["committed_at"] < full.ended, full.log[-3000:]


def test_lightning_last_link_is_an_alias_not_an_object(lightning: dict[str, Any]) -> None:
    cut: Side = _drained(lightning["cut"])
    assert (cut.run_dir / "last.ckpt").is_symlink()
    local = cut.local_files()
    del local["last.ckpt"]
    assert cut.objects() == local
    ptr = cut.pointer()
    assert ptr["aliases"] == {"last.ckpt": "epoch=0-step=8.ckpt"}
    assert ptr["latest"]["name"] == "epoch=0-step=8.ckpt"
    assert not (cut.bucket / PREFIX / "rank_0" / "last.ckpt").exists()


def test_lightning_resumes_from_the_pulled_latest_bit_exact(lightning: dict[str, Any]) -> None:
    cut: Side = lightning["cut"]
    pulled: Path = lightning["pulled"]
    assert files_digest(pulled) == {
        "epoch=0-step=8.ckpt": files_digest(cut.run_dir)["epoch=0-step=8.ckpt"]
    }
    end = last(lightning["resumed"], "end")
    assert end["global_step"] == 24
    assert end["digest"] == last(lightning["full"].run, "end")["digest"]


def test_lightning_pull_the_alias_and_the_full_runs_latest(lightning: dict[str, Any]) -> None:
    base: Path = lightning["base"]
    cut: Side = lightning["cut"]
    via_alias = cut.pull(base / "alias", "last.ckpt")
    assert list(files_digest(via_alias).values()) == [
        files_digest(cut.run_dir)["epoch=0-step=8.ckpt"]
    ]
    full: Side = lightning["full"]
    latest = full.pointer()["latest"]["name"]
    assert latest in ("epoch=2-step=24.ckpt", "last.ckpt")  # last.ckpt is a copy, saved last
    pulled = full.pull(base / "full-latest")
    assert files_digest(pulled) == {latest: files_digest(full.run_dir)[latest]}


# -- Hugging Face Trainer --------------------------------------------------------------------

HF_ARGS = ("--save-steps", "8", "--max-steps", "16")


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("hf-side")
    full = beside(base, "full", "hf_run", *HF_ARGS)
    killed = beside(base, "killed", "hf_run", *HF_ARGS, "--kill-mid-save", "16")
    succeeded(full.run)
    pulled = killed.pull(base / "pulled")
    resumed = succeeded(
        run_trainer("hf_run", base / "resumed", *HF_ARGS, "--resume", pulled / "checkpoint-8")
    )
    return {"full": full, "killed": killed, "pulled": pulled, "resumed": resumed, "base": base}


def test_hf_checkpoint_dirs_reach_the_bucket_byte_identical(hf: dict[str, Any]) -> None:
    full: Side = _drained(hf["full"])
    local = full.local_files()
    assert {rel.split("/")[0] for rel in local} == {"checkpoint-8", "checkpoint-16"}
    assert len(local) == 2 * len(HF_FILES)
    assert full.objects() == local


def test_hf_pointer_names_checkpoint_16_with_its_manifest(hf: dict[str, Any]) -> None:
    full: Side = hf["full"]
    ptr = full.pointer()
    latest = ptr["latest"]
    assert (latest["name"], latest["rule"]) == ("checkpoint-16", "hf")
    assert latest["object"] == f"{PREFIX}/rank_0/checkpoint-16"
    assert _manifest(latest) == _on_disk(full, "checkpoint-16")
    assert {p.split("/", 1)[1] for p in _manifest(latest)} == HF_FILES
    assert latest["size"] == sum(size for size, _ in _manifest(latest).values())
    older = {e["name"]: e for e in ptr["history"] if e["name"] != "checkpoint-16"}
    assert set(older) == {"checkpoint-8"}
    assert older["checkpoint-8"]["rule"] == "hf"
    assert _manifest(older["checkpoint-8"]) == _on_disk(full, "checkpoint-8")


def test_hf_pull_restores_directories_whole(hf: dict[str, Any]) -> None:
    base: Path = hf["base"]
    full: Side = hf["full"]
    dest = full.pull(base / "full-latest")
    assert [p.name for p in dest.iterdir()] == ["checkpoint-16"]
    assert files_digest(dest / "checkpoint-16") == files_digest(full.run_dir / "checkpoint-16")
    by_name = full.pull(base / "by-name", "checkpoint-8")
    assert files_digest(by_name) == {
        f"checkpoint-8/{k}": v for k, v in files_digest(full.run_dir / "checkpoint-8").items()
    }


def test_hf_killed_mid_save_never_commits_the_checkpoint(hf: dict[str, Any]) -> None:
    killed: Side = _drained(hf["killed"])
    assert killed.run.returncode == KILLED, killed.run.stderr[-3000:]
    assert not (killed.run_dir / "checkpoint-16" / "trainer_state.json").exists()
    ptr = killed.pointer()
    assert ptr["latest"]["name"] == "checkpoint-8"
    assert "checkpoint-16" not in _committed_names(ptr)
    assert "checkpoint-16" in killed.status.get("incomplete", {}), killed.status
    assert "checkpoint checkpoint-16 was not committed" in killed.log
    # the files that were written are uploaded all the same (nothing is lost)
    assert killed.objects() == killed.local_files()
    # and they are what an uninterrupted run writes
    full = hf["full"].local_files()
    for rel in ("checkpoint-8/model.safetensors", "checkpoint-16/model.safetensors"):
        assert killed.local_files()[rel] == full[rel]


def test_hf_resumes_from_the_pulled_latest_bit_exact(hf: dict[str, Any]) -> None:
    pulled: Path = hf["pulled"]
    assert [p.name for p in pulled.iterdir()] == ["checkpoint-8"]
    killed: Side = hf["killed"]
    assert files_digest(pulled / "checkpoint-8") == files_digest(killed.run_dir / "checkpoint-8")
    end = last(hf["resumed"], "end")
    assert end["global_step"] == 16
    assert end["digest"] == last(hf["full"].run, "end")["digest"]


# -- torch.distributed.checkpoint ------------------------------------------------------------

DCP_ARGS = ("--steps", "10,20")


@pytest.fixture(scope="module")
def dcp(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("dcp-side")
    ws2 = ("--world-size", "2")
    runs = {
        "ws2": beside(base, "ws2", "dcp_run", *DCP_ARGS, *ws2),
        "killed": beside(base, "killed", "dcp_run", *DCP_ARGS, *ws2, "--kill-mid-save", "20"),
    }
    left = _left_running(base / "killed" / "run")  # the killed launcher's ranks
    runs |= {
        "rename": beside(
            base, "rename", "dcp_run", *DCP_ARGS, "--kill-mid-save", "20", "--kill-at", "rename"
        ),
    }
    pulled = runs["ws2"].pull(base / "pulled")
    load = run_trainer("dcp_run", base / "unused", "--load", pulled / "step_20")
    return {**runs, "pulled": pulled, "load": load, "base": base, "left": left}


def _dcp_steps_committed(side: Side, ranks: int) -> None:
    """Both steps committed by the ``dcp`` rule, each manifest every file on disk, byte-identical
    in the bucket."""
    succeeded(side.run)
    assert side.objects() == side.local_files()
    ptr = side.pointer()
    by_name = {e["name"]: e for e in _entries(ptr)}
    assert set(by_name) == {"step_10", "step_20"}
    assert ptr["latest"]["name"] == "step_20"
    for step in ("step_10", "step_20"):
        entry = by_name[step]
        assert entry["rule"] == "dcp"
        assert entry["object"] == f"{PREFIX}/rank_0/{step}"
        expected = {".metadata", *(f"__{r}_0.distcp" for r in range(ranks))}
        assert {p.split("/", 1)[1] for p in _manifest(entry)} == expected
        assert _manifest(entry) == _on_disk(side, step)


def test_dcp_two_ranks_commit_each_step_with_every_shard(dcp: dict[str, Any]) -> None:
    _dcp_steps_committed(_drained(dcp["ws2"]), ranks=2)


def test_dcp_pulled_latest_loads_to_the_saved_digest(dcp: dict[str, Any]) -> None:
    pulled: Path = dcp["pulled"]
    assert [p.name for p in pulled.iterdir()] == ["step_20"]
    loaded = last(succeeded(dcp["load"]), "load")
    assert loaded["step"] == 20
    assert loaded["digest"] == saves(dcp["ws2"].run)[20]


@pytest.mark.parametrize("name,left", [("killed", ".metadata"), ("rename", ".metadata.tmp")])
def test_dcp_killed_mid_save_never_commits_the_step(
    dcp: dict[str, Any], name: str, left: str
) -> None:
    side: Side = _drained(dcp[name])
    assert side.run.returncode == KILLED, side.run.stderr[-3000:]
    on_disk = {p.name for p in (side.run_dir / "step_20").iterdir()}
    assert ".metadata" not in on_disk
    if left == ".metadata.tmp":
        assert left in on_disk
    ptr = side.pointer()
    assert ptr["latest"]["name"] == "step_10"
    assert "step_20" not in _committed_names(ptr)
    # without .metadata step_20 is never committed: its shards go up, the temporary
    # .metadata.tmp is left out (and named in status)
    assert side.objects() == {k: v for k, v in side.local_files().items() if not k.endswith(".tmp")}
    if name == "killed":
        assert dcp["left"] == [], "ranks outlived their killed launcher"
        # the shards on disk are the bytes a completed save writes (only .metadata, which
        # names the save's id and path, differs between runs)
        complete = files_digest(dcp["ws2"].run_dir / "step_20")
        del complete[".metadata"]
        assert files_digest(side.run_dir / "step_20") == complete
    if left == ".metadata.tmp":
        assert side.status["left_out"] == {"step_20/.metadata.tmp": "temporary name (*.tmp)"}
    # ... and the drain names the save that did not finish
    assert "no .metadata yet" in side.status["incomplete"]["step_20"]
    assert "checkpoint step_20 was not committed" in side.log
    dest = side.pull(dcp["base"] / f"{name}-pulled")
    assert [p.name for p in dest.iterdir()] == ["step_10"]
    assert files_digest(dest / "step_10") == files_digest(side.run_dir / "step_10")


# -- a real S3 server ------------------------------------------------------------------------


@pytest.fixture
def s3_bucket(rclone_s3: S3Server) -> Iterator[tuple[S3Server, str]]:
    if not rclone_s3.alive():
        rclone_s3.start()
    name = f"side-{uuid.uuid4().hex[:8]}"
    rclone_s3.make_bucket(name)
    yield rclone_s3, name


def test_dcp_single_process_beside_the_sidecar_on_s3(
    tmp_path: Path, s3_bucket: tuple[S3Server, str]
) -> None:
    side = _drained(beside(tmp_path, "s3", "dcp_run", *DCP_ARGS, s3=s3_bucket))
    _dcp_steps_committed(side, ranks=1)
    dest = side.pull(tmp_path / "pulled")
    assert files_digest(dest) == {
        f"step_20/{k}": v for k, v in files_digest(side.run_dir / "step_20").items()
    }
