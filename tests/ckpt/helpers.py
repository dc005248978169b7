"""Shared pieces for the ckpt tests: a tiny model, its data, and comparisons (no tests here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ckpt

BATCHES_PER_EPOCH = 5


class TinyNet(nn.Module):
    """Dropout makes the result depend on the torch RNG, so RNG restore is exercised."""

    def __init__(self, hidden: int = 8, extra: bool = False) -> None:
        super().__init__()
        self.l1 = nn.Linear(4, hidden)
        self.drop = nn.Dropout(0.2)
        self.l2 = nn.Linear(hidden, 1)
        if extra:
            self.extra = nn.Linear(1, 1)

    def forward(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.l2(self.drop(F.relu(self.l1(x)))).squeeze(-1), y)


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(1234)
    return TensorDataset(torch.randn(40, 4, generator=g), torch.randn(40, generator=g))


def loader(**kw: Any) -> DataLoader[Any]:
    return DataLoader(dataset(), batch_size=8, shuffle=True, **kw)


def make_trainer(
    max_duration: str = "2ep",
    hidden: int = 8,
    optimizer: str = "adam",
    extra: bool = False,
    loader_kw: dict[str, Any] | None = None,
    **kw: Any,
) -> ckpt.Trainer:
    """A fresh model, optimizer and scheduler (the same initial weights every time)."""
    torch.manual_seed(0)
    model = TinyNet(hidden, extra)
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    kw.setdefault("seed", 17)
    kw.setdefault("load_progress_bar", False)
    return ckpt.Trainer(
        model=model,
        train_dataloader=loader(**(loader_kw or {})),
        max_duration=max_duration,
        optimizers=opt,
        schedulers=sched,
        **kw,
    )


def assert_same_tensors(a: Any, b: Any, where: str = "") -> None:
    """Bit-identical nested state (tensors compared with torch.equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"tensors differ at {where}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_training_state(a: ckpt.Trainer, b: ckpt.Trainer) -> None:
    assert_same_tensors(a.model.state_dict(), b.model.state_dict(), "model")
    for i, (oa, ob) in enumerate(zip(a.optimizers, b.optimizers, strict=True)):
        assert_same_tensors(oa.state_dict(), ob.state_dict(), f"optimizer{i}")
    assert a.timer == b.timer


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())
