"""Real trainers writing real run directories, for tests of the uploader.

Each trainer is a module run as its own process (``python -m harness.trainers.NAME RUN_DIR
...``) that writes into ``RUN_DIR`` exactly as its framework does:

- ``lightning_run``: a LightningModule with ``ModelCheckpoint`` (``epoch=E-step=S.ckpt``,
  ``last.ckpt``) and a ``CSVLogger`` (``logs/metrics.csv``).
- ``hf_run``: the Hugging Face ``Trainer`` (``checkpoint-N/`` directories, whose
  ``trainer_state.json`` is written last).
- ``accelerate_run``: ``Accelerator.save_state``, with automatic naming
  (``checkpoints/checkpoint_<i>/``, ``total_limit``) or as diffusers' scripts call it
  (``checkpoint-<step>/`` with the model in ``unet/``); ``random_states_0.pkl`` last but
  for the registered objects.
- ``dcp_run``: ``torch.distributed.checkpoint`` on one or more gloo ranks (``step_N/`` with
  ``__R_0.distcp`` shards and ``.metadata``, written last).

Every trainer is small, seeded and CPU only, uses loopback only and downloads nothing. Each
prints its results as JSON lines on stdout (:func:`records` parses them); a weights digest
is the sha256 that :func:`harness.trainers.common.state_digest` computes. This module
imports neither torch nor any framework: tests start trainers through :func:`run_trainer`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "ROOT",
    "TRAINERS",
    "HF_FILES",
    "files_digest",
    "records",
    "last",
    "saves",
    "succeeded",
    "run_trainer",
    "trainer_env",
]

ROOT = Path(__file__).resolve().parents[2]
"""The repository root, put on ``PYTHONPATH`` of every trainer process."""

TRAINERS = ("lightning_run", "hf_run", "dcp_run", "accelerate_run")
"""The trainer modules under ``harness.trainers``."""

HF_FILES = frozenset(
    {
        "config.json",
        "model.safetensors",
        "optimizer.pt",
        "rng_state.pth",
        "scheduler.pt",
        "trainer_state.json",
        "training_args.bin",
    }
)
"""The files of each ``checkpoint-N/`` that ``hf_run`` (the HF Trainer) writes."""

_OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def trainer_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a trainer process: this one's, offline and on one CPU thread,
    the repository root on ``PYTHONPATH``, then ``env`` on top."""
    out = {**os.environ, **_OFFLINE, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    path = os.environ.get("PYTHONPATH")
    out["PYTHONPATH"] = str(ROOT) + (os.pathsep + path if path else "")
    out.update(env or {})
    return out


def run_trainer(
    module: str,
    *args: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    timeout: float = 180.0,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m harness.trainers.MODULE ARGS...`` and wait for it.

    The trainer runs in its own session, so a timeout ends it and every rank it started.
    A trainer that killed itself (``--kill-mid-save``) returns ``-signal.SIGKILL``.
    With ``check``, a non-zero exit raises :class:`subprocess.CalledProcessError` that
    carries the output.
    """
    name = module if "." in module else f"harness.trainers.{module}"
    argv = [sys.executable, "-m", name, *map(str, args)]
    proc = subprocess.Popen(
        argv,
        cwd=ROOT,
        env=trainer_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(argv, timeout, out, err) from None
    finally:
        # ranks a launcher left behind (it was killed) go with it
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    done = subprocess.CompletedProcess(argv, proc.returncode, out, err)
    if check:
        done.check_returncode()
    return done


def records(done: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    """The JSON records a trainer printed on stdout, in order (other lines are skipped)."""
    out: list[dict[str, Any]] = []
    for line in done.stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
    return out


def succeeded(done: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    """``done``, asserting that the trainer exited 0 (its args and output tails otherwise)."""
    assert done.returncode == 0, f"{done.args}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


def last(done: subprocess.CompletedProcess[str], event: str) -> dict[str, Any]:
    """The last record of ``event`` a trainer printed (asserting there is one)."""
    found = [r for r in records(done) if r.get("event") == event]
    assert found, f"no {event!r} record in {done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return found[-1]


def saves(done: subprocess.CompletedProcess[str]) -> dict[int, str]:
    """``{step: digest}`` of the saves a trainer reported."""
    return {r["step"]: r["digest"] for r in records(done) if r["event"] == "save"}


def recorded_digests(directory: str | os.PathLike[str]) -> dict[str, str]:
    """``{relative path: digest}`` as a store records them by default (``crc64nvme``),
    of every file under ``directory``."""
    from harness.data import file_digest

    root = Path(directory)
    return {
        p.relative_to(root).as_posix(): str(file_digest(p, 1 << 30))
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def files_digest(directory: str | os.PathLike[str]) -> dict[str, str]:
    """``{relative path: sha256 hex}`` of every file under ``directory`` (symbolic links
    are followed, so ``last.ckpt`` as a link digests its target's bytes)."""
    root = Path(directory)
    out: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while data := f.read(1 << 20):
                    h.update(data)
            out[path.relative_to(root).as_posix()] = h.hexdigest()
    return out
