"""torch DCP ``async_save``, with each of its executors, writing into a watched directory.

The trainer (harness/trainers/dcp_run.py with ``--async thread|process``) saves steps 5 and
10 with ``dcp.async_save``: the THREAD executor (torch's default) writes from a thread of
the training process, the PROCESS executor from a checkpoint process torch spawns, with
its own gloo group. Each executor runs twice: (a) beside the sidecar (``ckpt-uploader
watch`` started before the trainer, SIGTERM after it), and (b) inside
``uploader.Sidecar(RUN_DIR, to=URI)`` as a context manager in the training process. The
bucket is a local directory (file://).

For every run: each step directory is committed by the ``dcp`` rule with a manifest of
every file on disk, its objects byte-identical; ``uploader.fetch_latest`` restores
``step_10`` into a new directory, and ``dcp.load`` of it (in a new process) gives tensors
``torch.equal`` to the state the save began with (``--reference-dir``, ``--expect``).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

import uploader
from harness.reliability import wait_gone
from harness.trainers import files_digest, last, recorded_digests, run_trainer, saves, succeeded
from tests.daemon.test_process import local_uri
from tests.scenarios.test_trainers_sidecar import PREFIX, Side, beside
from uploader.transfer.digest import DIGEST_SUFFIX

pytestmark = pytest.mark.timeout(400)

Run = subprocess.CompletedProcess[str]
STEPS = ("step_5", "step_10")
ARGS = ("--steps", "5,10")
EXECUTORS = ("thread", "process")
TENSORS = 8  # model and momentum: two Linear layers' weight and bias each


def _within(run_dir: Path) -> dict[str, str]:
    """``{path: sha256}`` of RUN_DIR without the worker's own files."""
    return {k: v for k, v in files_digest(run_dir).items() if not k.startswith(".ckpt-uploader")}


def _objects(bucket: Path) -> dict[str, str]:
    got = files_digest(bucket / PREFIX / "rank_0")
    return {k: v for k, v in got.items() if k != "latest.json" and not k.endswith(DIGEST_SUFFIX)}


def _pointer(bucket: Path) -> dict[str, Any]:
    return dict(json.loads((bucket / PREFIX / "rank_0" / "latest.json").read_text()))


def _entries(pointer: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in [pointer["latest"], *pointer.get("history", [])]}


def _in_process(base: Path, executor: str) -> dict[str, Any]:
    """The trainer inside ``uploader.Sidecar`` (``--upload-to``)."""
    home = base / f"{executor}-ctx"
    bucket = home / "bucket"
    bucket.mkdir(parents=True)
    uri = local_uri(bucket, PREFIX)
    run = run_trainer(
        "dcp_run",
        home / "run",
        *ARGS,
        "--async",
        executor,
        "--reference-dir",
        home / "ref",
        "--upload-to",
        uri,
    )
    return {"run_dir": home / "run", "bucket": bucket, "uri": uri, "run": run, "ref": home / "ref"}


def _beside(base: Path, executor: str) -> dict[str, Any]:
    """The trainer beside the ``ckpt-uploader watch`` sidecar."""
    ref = base / f"{executor}-side-ref"
    side: Side = beside(
        base, f"{executor}-side", "dcp_run", *ARGS, "--async", executor, "--reference-dir", ref
    )
    assert side.code == 0, f"sidecar exit {side.code}\n{side.log[-4000:]}"
    assert side.status.get("state") == "done", side.status
    return {
        "run_dir": side.run_dir,
        "bucket": side.bucket,
        "uri": side.uri,
        "run": side.run,
        "ref": ref,
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Four runs (each executor, beside the sidecar and inside ``Sidecar``), one at a time;
    for each, ``fetch_latest`` into a new directory and ``dcp_run --load`` of what it
    returned, compared with the reference of step 10."""
    base = tmp_path_factory.mktemp("dcp-async")
    out: dict[str, dict[str, Any]] = {}
    for executor in EXECUTORS:
        out[f"{executor}-side"] = _beside(base, executor)
        out[f"{executor}-ctx"] = _in_process(base, executor)
    for name, case in out.items():
        succeeded(case["run"])
        dest = base / f"{name}-restore"
        case["fetched"] = uploader.fetch_latest(case["uri"], dest)
        if case["fetched"] is not None:
            case["load"] = run_trainer(
                "dcp_run",
                base / f"{name}-unused",
                "--load",
                case["fetched"],
                "--expect",
                case["ref"] / "step_10.pt",
            )
    return out


CASES = [f"{e}-{how}" for e in EXECUTORS for how in ("side", "ctx")]


@pytest.mark.parametrize("name", CASES)
def test_the_executor_named_wrote_the_saves(runs: dict[str, Any], name: str) -> None:
    run: Run = runs[name]["run"]
    assert sorted(saves(run)) == [5, 10]
    used = last(run, "async")
    executor = name.split("-")[0]
    assert used["executor"] == executor
    if executor == "process":
        # torch's checkpoint process wrote the files, and ended with the run
        pid = used["checkpoint_pid"]
        assert isinstance(pid, int) and pid > 0
        assert wait_gone(pid, 10), f"the checkpoint process {pid} outlived the run"
    else:
        assert used["checkpoint_pid"] is None


@pytest.mark.parametrize("name", CASES)
def test_each_step_is_committed_by_the_dcp_rule_with_a_full_manifest(
    runs: dict[str, Any], name: str
) -> None:
    case = runs[name]
    run_dir: Path = case["run_dir"]
    local = _within(run_dir)
    assert set(local) == {f"{s}/{f}" for s in STEPS for f in (".metadata", "__0_0.distcp")}
    assert _objects(case["bucket"]) == local
    pointer = _pointer(case["bucket"])
    entries = _entries(pointer)
    assert set(entries) == set(STEPS)
    assert pointer["latest"]["name"] == "step_10"
    for step in STEPS:
        entry = entries[step]
        assert entry["rule"] == "dcp"
        assert entry["object"] == f"{PREFIX}/rank_0/{step}"
        manifest = {f["path"]: (f["size"], f["digest"]) for f in entry["files"]}
        assert manifest == {
            f"{step}/{rel}": ((run_dir / step / rel).stat().st_size, digest)
            for rel, digest in recorded_digests(run_dir / step).items()
        }
        assert entry["size"] == sum(size for size, _ in manifest.values())


@pytest.mark.parametrize("name", [c for c in CASES if c.endswith("-ctx")])
def test_the_context_manager_returns_once_every_step_is_committed(
    runs: dict[str, Any], name: str
) -> None:
    run: Run = runs[name]["run"]
    report = last(run, "bucket")  # printed right after the with block
    assert set(_entries(report["pointers"]["0"])) == set(STEPS)
    assert report["workers_alive"] == []
    assert wait_gone(last(run, "worker")["pid"], 5)


@pytest.mark.parametrize("name", CASES)
def test_fetch_latest_then_dcp_load_gives_equal_tensors(runs: dict[str, Any], name: str) -> None:
    case = runs[name]
    fetched: Path | None = case["fetched"]
    assert fetched is not None, "fetch_latest found nothing committed"
    assert fetched.name == "step_10"
    assert files_digest(fetched) == files_digest(case["run_dir"] / "step_10")
    loaded = last(succeeded(case["load"]), "load")
    assert (loaded["step"], loaded["expected_step"]) == (10, 10)
    assert loaded["tensors"] == TENSORS
    assert loaded["unequal"] == []
    assert loaded["digest"] == saves(case["run"])[10]


def test_fetch_latest_of_an_empty_bucket_is_none(tmp_path: Path) -> None:
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    assert uploader.fetch_latest(local_uri(bucket, PREFIX), tmp_path / "restore") is None
