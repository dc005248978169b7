"""What the trainer scripts share: the weights digest, JSON records on stdout, offline setup.

Imported by the trainer processes only (it imports torch when a digest is computed).
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

__all__ = ["emit", "go_offline", "kill_self", "state_digest"]

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
