"""Batches and data loaders: moving batches to the device, sharding by rank, skipping on resume.

Example::

    loader = shard_for_rank(loader, world_size=2, rank=1, seed=17)
    it = iter(loader)
    skip_batches(it, 5)        # resume mid-epoch without loading the skipped data
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, RandomSampler

__all__ = [
    "as_list",
    "to_device",
    "batch_size",
    "shard_for_rank",
    "require_batches",
    "len_or_none",
    "skip_batches",
]


def as_list(x: Any) -> list[Any]:
    if x is None:
        return []
    if isinstance(x, (list, tuple)):
        return list(x)
    return [x]


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return type(batch)({k: to_device(v, device) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, Mapping):
        for v in batch.values():
            return batch_size(v)
    if isinstance(batch, (list, tuple)) and batch:
        return batch_size(batch[0])
    return 1


def shard_for_rank(loader: Iterable[Any], world_size: int, rank: int, seed: int) -> Iterable[Any]:
    """Give each rank its own deterministic share of the data (seeded by epoch).

    Anything but a DataLoader, or one that already has a DistributedSampler, is returned as is.
    """
    from torch.utils.data.distributed import DistributedSampler

    if not isinstance(loader, DataLoader) or isinstance(loader.sampler, DistributedSampler):
        return loader
    sampler: DistributedSampler[Any] = DistributedSampler(
        loader.dataset,  # type: ignore[arg-type]
        num_replicas=world_size,
        rank=rank,
        shuffle=isinstance(loader.sampler, RandomSampler),
        seed=seed,
        drop_last=loader.drop_last,
    )
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        worker_init_fn=loader.worker_init_fn,
    )


def require_batches(it: Iterator[Any]) -> Iterator[Any]:
    """Yield from ``it``; an epoch without a single batch is an error (it would never end)."""
    empty = True
    for batch in it:
        empty = False
        yield batch
    if empty:
        raise ValueError(
            "train_dataloader yielded no batches in this epoch; check the dataset size, "
            "batch_size and drop_last"
        )


def len_or_none(x: Any) -> int | None:
    try:
        return len(x)
    except TypeError:
        return None


def skip_batches(it: Iterator[Any], n: int) -> None:
    """Advance a DataLoader iterator by ``n`` batches (without loading them when possible)."""
    from torch.utils.data.dataloader import _DatasetKind, _SingleProcessDataLoaderIter

    # A map-style dataset in this process: drawing indices skips without loading data.
    if isinstance(it, _SingleProcessDataLoaderIter) and it._dataset_kind == _DatasetKind.Map:
        for _ in range(n):
            next(it._sampler_iter)
            it._num_yielded += 1
        return
    for _ in range(n):
        next(it)
