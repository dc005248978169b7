"""The worker beside any training loop: the Sidecar context manager, the shell example,
and the Kubernetes pod example.

Real processes and signals: ``ckpt-uploader watch`` runs as its own process
beside a training process (a plain Python loop writing checkpoint files the
atomic way); when training ends it gets SIGTERM and drains.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from harness.data import bytes_digest
from harness.servers.s3 import find_binary
from uploader import ObjectStoreHparams, Sidecar
from uploader.bucket.pointer import read_pointer
from uploader.launch.worker import WORKER_NICE

ROOT = Path(__file__).resolve().parents[2]


def save(path: Path, data: bytes) -> Path:
    """Write a checkpoint the safe way: hidden temporary name, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def sha(data: bytes) -> str:
    """The digest the store records by default for a file of ``data``."""
    return bytes_digest(data)


def test_sidecar_context_manager_uploads_and_drains_on_exit(tmp_path: Path) -> None:
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    run = tmp_path / "out" / "run1"
    written = {}
    with Sidecar(run, to=f"file://{bucket}?prefix=team", prefix="exp1", progress_bar=False) as sc:
        assert sc.pid is not None and sc.pid != os.getpid()
        assert os.getsid(sc.pid) == sc.pid  # its own session: Ctrl-C in training misses it
        # a lower CPU priority than training's: uploads never take a step's CPU
        deadline = time.monotonic() + 30  # up: past its own os.nice
        while (st := sc.status()) is None or st.state != "running":
            assert time.monotonic() < deadline, st
            time.sleep(0.05)
        assert os.getpriority(os.PRIO_PROCESS, sc.pid) == os.getpriority(os.PRIO_PROCESS, 0) + min(
            WORKER_NICE, 19 - os.getpriority(os.PRIO_PROCESS, 0)
        )
        for epoch in range(1, 4):
            data = os.urandom(200_000 + epoch)
            save(run / f"ep{epoch}.pt", data)
            written[f"ep{epoch}.pt"] = data
            sc.check()
        # Leave at once after the last save: the drain must still include it.
    assert sc.worker.exit_code == 0
    assert sc.final_status is not None and sc.final_status.done == 3
    store = ObjectStoreHparams(provider="local", container=str(bucket)).initialize_object()
    for name, data in written.items():
        assert store.get_bytes(f"team/exp1/rank_0/{name}") == data
    pointer = read_pointer(store, "team/exp1", 0)
    assert pointer is not None
    assert pointer.latest.name == "ep3.pt" and pointer.latest.digest == sha(written["ep3.pt"])


def test_sidecar_drains_after_an_exception_and_lets_it_propagate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    run = tmp_path / "run"
    monkeypatch.setenv("RANK", "3")  # as torchrun sets it
    data = os.urandom(50_000)
    with (
        pytest.raises(RuntimeError, match="loss is NaN"),
        Sidecar(run, to=f"file://{bucket}", progress_bar=False) as sc,
    ):
        save(run / "ba100.pt", data)
        raise RuntimeError("loss is NaN")
    assert sc.worker.exit_code == 0
    store = ObjectStoreHparams(provider="local", container=str(bucket)).initialize_object()
    assert store.get_bytes("rank_3/ba100.pt") == data


TRAINING = textwrap.dedent(
    """
    # A training process that knows nothing of the uploader: it writes checkpoints.
    import os, sys, time
    run = sys.argv[1]
    os.makedirs(os.path.join(run, "checkpoints"), exist_ok=True)
    for epoch in range(1, 4):
        time.sleep(0.3)  # "training"
        data = (b"epoch %d " % epoch) * 40000
        tmp = os.path.join(run, "checkpoints", ".ep%d.pt.tmp" % epoch)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(run, "checkpoints", "ep%d.pt" % epoch))
    print("training done", flush=True)
    """
)


def run_shell_example(
    tmp_path: Path, store_uri: str, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "train.py"
    script.write_text(TRAINING)
    run = tmp_path / "run1"
    env = dict(os.environ)
    env.update(
        RUN_DIR=str(run),
        STORE=store_uri,
        UPLOADER=find_binary("ckpt-uploader"),
        UPLOADER_ARGS="--drain-timeout 60",
        **(extra_env or {}),
    )
    return subprocess.run(
        ["bash", str(ROOT / "examples" / "sidecar.sh"), sys.executable, str(script), str(run)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_shell_example_runs_the_cli_beside_training_and_drains_on_sigterm(
    tmp_path: Path,
) -> None:
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    t0 = time.monotonic()
    proc = run_shell_example(tmp_path, f"file://{bucket}?prefix=exp1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training done" in proc.stdout
    # The uploader logged that SIGTERM started its drain, and that it finished clean.
    assert "SIGTERM" in proc.stderr and "finished" in proc.stderr
    store = ObjectStoreHparams(provider="local", container=str(bucket)).initialize_object()
    run = tmp_path / "run1"
    for epoch in range(1, 4):
        local = (run / "checkpoints" / f"ep{epoch}.pt").read_bytes()
        assert store.get_bytes(f"exp1/rank_0/checkpoints/ep{epoch}.pt") == local
    pointer = read_pointer(store, "exp1", 0)
    assert pointer is not None and pointer.latest.name == "checkpoints/ep3.pt"
    assert time.monotonic() - t0 < 60
    # `ckpt-uploader status` reads the journal the sidecar left.
    status = subprocess.run(
        [find_binary("ckpt-uploader"), "status", str(run), "--json"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["done"] == 3 and report["failed"] == 0 and report["pending"] == 0


def test_shell_example_does_not_start_training_when_the_uploader_cannot_start(
    tmp_path: Path,
) -> None:
    proc = run_shell_example(tmp_path, f"file://{tmp_path}/no-such-bucket")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "training not started" in proc.stderr
    assert "training done" not in proc.stdout
    assert "no-such-bucket" in proc.stderr


def test_kubernetes_example_shares_a_volume_with_a_draining_sidecar() -> None:
    docs = list(
        yaml.safe_load_all((ROOT / "examples" / "kubernetes" / "training-pod.yaml").read_text())
    )
    [account] = [d for d in docs if d["kind"] == "ServiceAccount"]
    [pod] = [d for d in docs if d["kind"] == "Pod"]
    spec = pod["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    [sidecar] = [c for c in spec["initContainers"] if c["name"] == "ckpt-uploader"]
    [train] = spec["containers"]
    assert sidecar["restartPolicy"] == "Always"  # a native sidecar: stopped after training
    # The image's entrypoint is the console script (see the Dockerfile): args follow it.
    assert "command" not in sidecar
    cmd = ["ckpt-uploader", *sidecar["args"]]
    assert cmd[:2] == ["ckpt-uploader", "watch"]
    mounts = {m["name"]: m["mountPath"] for m in sidecar["volumeMounts"]}
    train_mounts = {m["name"]: m["mountPath"] for m in train["volumeMounts"]}
    shared = set(mounts) & set(train_mounts)
    assert shared and all("emptyDir" in volumes[n] for n in shared)
    assert cmd[2] in {mounts[n] for n in shared}  # it watches the shared volume
    # No keys at all: the pod's service account is bound to an IAM role (IRSA), which
    # botocore's chain finds (an s3:// URI names no key variables).
    assert spec["serviceAccountName"] == account["metadata"]["name"]
    role = account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert role.startswith("arn:aws:iam::") and ":role/" in role
    env = {e["name"]: e for e in sidecar.get("env", [])}
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env)
    uri = cmd[cmd.index("--to") + 1]
    assert uri.startswith("s3://") and "key_environ" not in uri
    assert "secret" not in " ".join(cmd).lower()
    # The pod waits long enough for the drain.
    drain = float(cmd[cmd.index("--drain-timeout") + 1])
    assert spec["terminationGracePeriodSeconds"] > drain
    # Metrics on the pod IP, behind both probes.
    assert cmd[cmd.index("--metrics-addr") + 1] == "$(POD_IP)"
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    port = int(cmd[cmd.index("--metrics-port") + 1])
    assert {p["name"]: p["containerPort"] for p in sidecar["ports"]} == {"metrics": port}
    assert sidecar["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "metrics"}
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    # The command line is one ckpt-uploader accepts.
    from uploader.cli.main import build_parser

    build_parser().parse_args(cmd[1:])


def test_sidecar_with_include_patterns_uploads_only_those(tmp_path: Path) -> None:
    """Lightning/Hugging Face names: the drain waits for the chosen files only."""
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    run = tmp_path / "hf"
    weights = os.urandom(30_000)
    with Sidecar(
        run,
        to=f"file://{bucket}",
        extra_args=["--include", "*.safetensors", "--include=*.ckpt"],
        progress_bar=False,
        drain_timeout=60,
    ) as sc:
        save(run / "checkpoint-500" / "model.safetensors", weights)
        save(run / "last.ckpt", b"lightning" * 1000)
        save(run / "notes.pt", b"not chosen")
    assert sc.final_status is not None and sc.final_status.done == 2
    store = ObjectStoreHparams(provider="local", container=str(bucket)).initialize_object()
    names = {o.name for o in store.list("rank_0")}
    assert "rank_0/checkpoint-500/model.safetensors" in names
    assert "rank_0/last.ckpt" in names
    assert "rank_0/notes.pt" not in names
    assert store.get_bytes("rank_0/checkpoint-500/model.safetensors") == weights
