"""What the trainer scripts share: the weights digest, JSON records on stdout, offline setup.

Imported by the trainer processes only (it imports torch when a digest is computed).
With ``--upload-to URI`` a trainer adds the uploader's callback for its framework and,
right after ``fit()``/``train()`` returns, prints :func:`bucket_report`: what the bucket
holds at that moment and which worker processes are still alive.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sys
from collections.abc import Mapping
from typing import Any

__all__ = [
    "bucket_report",
    "emit",
    "go_offline",
    "kill_self",
    "remove_local_bucket",
    "state_digest",
]

log = logging.getLogger(__name__)


def go_offline() -> None:
    """No downloads, no telemetry, one CPU thread: set before a framework is imported."""
    from harness.trainers import _OFFLINE

    for key, value in _OFFLINE.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)


def state_digest(state: Mapping[str, Any]) -> str:
    """sha256 over a (nested) state dict's tensors: for each tensor in sorted key order its
    dotted key, dtype, shape and raw bytes. Non-tensor values are left out."""
    import torch

    h = hashlib.sha256()

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key in sorted(value, key=str):
                walk(f"{prefix}.{key}" if prefix else str(key), value[key])
        elif isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"{prefix}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())

    walk("", state)
    return h.hexdigest()


def emit(**record: Any) -> None:
    """One JSON record as one line on stdout (the trainers' results, read by tests)."""
    sys.stdout.write(json.dumps(record, sort_keys=True) + "\n")
    sys.stdout.flush()


def kill_self(why: str) -> None:
    """SIGKILL this process now, as a crash or an OOM killer would (no cleanup runs)."""
    log.warning("killing this process with SIGKILL: %s", why)
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def bucket_report(uri: str, worker_pid: int | None = None) -> dict[str, Any]:
    """What the store at ``uri`` holds now, and which worker processes still run.

    ``objects``: ``{name: sha256 of its bytes}`` under the URI's prefix; ``pointers``:
    ``{rank: latest.json as a dict}``; ``workers_alive``: this process's descendants
    that run ``uploader watch``, plus ``worker_pid`` if that process still exists.
    """
    import psutil

    from uploader import parse_uri
    from uploader.bucket.pointer import list_ranks, read_pointer

    location = parse_uri(uri)
    objects: dict[str, str] = {}
    pointers: dict[str, Any] = {}
    with location.hparams.initialize_object() as store:
        for info in store.list(location.prefix):
            objects[info.name] = hashlib.sha256(store.get_bytes(info.name)).hexdigest()
        for rank in list_ranks(store, location.prefix):
            pointer = read_pointer(store, location.prefix, rank)
            if pointer is not None:
                pointers[str(rank)] = json.loads(pointer.to_json())
    alive: set[int] = set()
    for child in psutil.Process().children(recursive=True):
        try:
            cmd = child.cmdline()
        except psutil.Error:
            continue
        if "uploader" in cmd and "watch" in cmd:
            alive.add(child.pid)
    if worker_pid is not None and psutil.pid_exists(worker_pid):
        try:
            if psutil.Process(worker_pid).status() != psutil.STATUS_ZOMBIE:
                alive.add(worker_pid)
        except psutil.Error:
            pass
    return {"objects": objects, "pointers": pointers, "workers_alive": sorted(alive)}


def remove_local_bucket(uri: str) -> None:
    """Take away the directory a ``file://`` bucket URI names (a permanent store error).

    It is renamed aside, in one step, rather than deleted: a delete of a tree the worker
    is writing into races with it and fails in training with the harness's own OSError.
    To the uploader the bucket is gone either way."""
    from uploader import parse_uri

    hp = parse_uri(uri).hparams
    if hp.provider != "local":
        raise SystemExit(f"--remove-bucket needs a file:// URI, not {uri}")
    log.warning("removing the bucket %s", hp.container)
    os.rename(hp.container, f"{hp.container.rstrip('/')}.removed")
