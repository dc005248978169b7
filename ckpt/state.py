"""What a checkpoint holds, in plain data that ``torch.load(..., weights_only=True)`` accepts.

A checkpoint is ``{"rng": ..., "state": {...}}``. ``state`` has exactly the keys in
:data:`STATE_KEYS`; everything is tensors, numbers, strings, None, lists and dicts
(no pickled classes), so loading never runs code from the file.

* ``rng``: the saving rank's generators at the save point (torch CPU, CUDA when in
  use, numpy when installed, Python ``random``).
* ``state["rng"]``: the same generators as they were at the start of the current
  epoch, so a mid-epoch resume can rebuild the epoch's data order and skip the
  batches already trained on.
* ``state["timer"]``: epoch, batch, batch_in_epoch and sample counts.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import CheckpointError

__all__ = [
    "STATE_KEYS",
    "State",
    "Timer",
    "callback_keys",
    "capture_rng",
    "restore_rng",
    "snapshot",
    "strip_ddp_prefix",
]

STATE_KEYS = (
    "model",
    "timer",
    "optimizers",
    "schedulers",
    "scaler",
    "algorithms",
    "callbacks",
    "rng",
    "rank_zero_seed",
    "is_model_ddp",
)


@dataclass
class Timer:
    """Training progress: completed epochs, batches (total and in this epoch), samples."""

    epoch: int = 0
    batch: int = 0
    batch_in_epoch: int = 0
    sample: int = 0

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "batch_in_epoch": self.batch_in_epoch,
            "sample": self.sample,
        }

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        self.epoch = int(d["epoch"])
        self.batch = int(d["batch"])
        self.batch_in_epoch = int(d.get("batch_in_epoch", 0))
        self.sample = int(d.get("sample", 0))


def capture_rng() -> dict[str, Any]:
    """The current state of every random generator, as plain data."""
    py_version, py_state, py_gauss = random.getstate()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = list(torch.cuda.get_rng_state_all())
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy ships with torch wheels
        pass
    else:
        st: Any = np.random.get_state(legacy=True)
        name, keys, pos, has_gauss, cached = st
        out["numpy"] = {
            "name": str(name),
            "keys": torch.from_numpy(keys.astype("int64")),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    return out


def restore_rng(d: Mapping[str, Any]) -> None:
    """Set every generator from :func:`capture_rng` output (missing parts are left alone)."""
    if "torch" in d:
        torch.set_rng_state(d["torch"].to(torch.uint8))
    if "python" in d:
        p = d["python"]
        random.setstate((int(p["version"]), tuple(int(x) for x in p["state"]), p["gauss"]))
    if "cuda" in d and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(d["cuda"]))
    if "numpy" in d:
        try:
            import numpy as np
        except ImportError:  # pragma: no cover
            return
        n = d["numpy"]
        np.random.set_state(
            (
                n["name"],
                n["keys"].numpy().astype("uint32"),
                int(n["pos"]),
                int(n["has_gauss"]),
                float(n["cached_gaussian"]),
            )
        )


_LEAVES = (int, float, bool, complex, str, bytes, type(None), torch.device, torch.dtype, torch.Size)


def _unsupported(obj: Any, where: str) -> CheckpointError:
    return CheckpointError(
        f"cannot save {where}: it is a {type(obj).__module__}.{type(obj).__qualname__}. A "
        "checkpoint holds only tensors, numbers, strings, None, lists, tuples, sets and dicts, "
        "so that it loads with torch.load(..., weights_only=True); convert it in the "
        "state_dict() that returns it (numpy -> torch.tensor or .item(), Path -> str)"
    )


def snapshot(obj: Any, where: str = "checkpoint", copy: bool = True) -> Any:
    """A deep copy with every tensor copied to CPU memory; the training loop may go on.

    Raises CheckpointError naming the first value that ``weights_only`` loading would
    refuse. With ``copy=False`` only checks, and returns ``obj``.
    """
    if isinstance(obj, torch.Tensor):
        if not copy:
            return obj
        t = obj.detach()
        if t.device.type == "cpu":
            return t.clone()
        return t.to("cpu", copy=True)
    kind = type(obj)
    if kind in _LEAVES:
        return obj
    if kind in (dict, OrderedDict):
        out: dict[Any, Any] = OrderedDict() if kind is OrderedDict else {}
        for k, v in obj.items():
            if type(k) not in _LEAVES:
                raise _unsupported(k, f"a key of {where}")
            out[k] = snapshot(v, f"{where}[{k!r}]", copy)
        meta = getattr(obj, "_metadata", None)  # module versions of a state_dict()
        if meta is not None and copy:
            out._metadata = snapshot(meta, f"{where}._metadata")  # type: ignore[attr-defined]
        return out if copy else obj
    if kind in (list, tuple, set):
        items = [snapshot(v, f"{where}[{i}]", copy) for i, v in enumerate(obj)]
        return kind(items) if copy else obj
    raise _unsupported(obj, where)


def strip_ddp_prefix(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Drop the ``module.`` prefix that DistributedDataParallel adds to parameter names.

    The result is an OrderedDict that keeps the state dict's ``_metadata`` (module versions).
    """
    out: dict[str, Any] = OrderedDict()
    meta = getattr(sd, "_metadata", None)
    if sd and all(k.startswith("module.") for k in sd):
        for k, v in sd.items():
            out[k[len("module.") :]] = v
        if meta is not None:
            meta = OrderedDict(
                ("" if k == "module" else k[len("module.") :] if k.startswith("module.") else k, v)
                for k, v in meta.items()
            )
    else:
        out.update(sd)
    if meta is not None:
        out._metadata = meta  # type: ignore[attr-defined]
    return out


class State:
    """What the Trainer trains and what a checkpoint holds (see :data:`STATE_KEYS`)."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizers: list[torch.optim.Optimizer],
        schedulers: list[Any],
        callbacks: list[Any],
        timer: Timer,
        rank_zero_seed: int,
        is_model_ddp: bool,
        scaler: Any = None,
    ) -> None:
        self.model = model
        self.optimizers = optimizers
        self.schedulers = schedulers
        self.callbacks = callbacks
        self.timer = timer
        self.rank_zero_seed = rank_zero_seed
        self.is_model_ddp = is_model_ddp
        self.scaler = scaler
        self.algorithms: list[Any] = []
        self.epoch_start_rng: dict[str, Any] = {}

    @property
    def raw_model(self) -> torch.nn.Module:
        """The model without its DistributedDataParallel wrapper."""
        return self.model.module if self.is_model_ddp else self.model  # type: ignore[return-value]

    def callback_states(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, cb in callback_keys(self.callbacks):
            fn = getattr(cb, "state_dict", None)
            if callable(fn):
                out[key] = fn()
        return out

    def state_dict(self) -> dict[str, Any]:
        sd = {
            "model": strip_ddp_prefix(self.raw_model.state_dict()),
            "timer": self.timer.state_dict(),
            "optimizers": [o.state_dict() for o in self.optimizers],
            "schedulers": [s.state_dict() for s in self.schedulers],
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "algorithms": [],
            "callbacks": self.callback_states(),
            "rng": self.epoch_start_rng,
            "rank_zero_seed": self.rank_zero_seed,
            "is_model_ddp": self.is_model_ddp,
        }
        assert tuple(sd) == STATE_KEYS
        return sd

    def checkpoint(self) -> dict[str, Any]:
        """The whole checkpoint: ``{"rng": ..., "state": ...}``."""
        return {"rng": capture_rng(), "state": self.state_dict()}


def callback_keys(callbacks: Sequence[Any]) -> Iterator[tuple[str, Any]]:
    """(key, callback) pairs: the class name, with ``#n`` for the n-th repeat of a class."""
    seen: dict[str, int] = {}
    for cb in callbacks:
        name = type(cb).__name__
        n = seen.get(name, 0)
        seen[name] = n + 1
        yield (name if n == 0 else f"{name}#{n}"), cb
