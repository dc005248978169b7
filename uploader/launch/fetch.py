"""``uploader.fetch_latest``: resume a job from the bucket, whatever trainer wrote it.

A job script can always call it: on the first run nothing is committed yet and it
returns None (start fresh); afterwards it restores the newest checkpoint that every
rank has committed, every file verified against the pointer's manifest, and returns
its local path: the file, or the directory of a directory checkpoint (a Hugging Face
``checkpoint-N/``, a DCP directory), ready for the framework's own resume::

    from uploader import fetch_latest

    path = fetch_latest("s3://ckpts/exp1", "restore/")
    trainer.train(resume_from_checkpoint=str(path) if path else None)

It takes the same URIs and :class:`ObjectStoreHparams` as the callbacks and the
command line (``ckpt-uploader pull URI/latest DEST/`` does the same).

When every rank of a job calls it at once, pass ``share`` (see
:data:`uploader.bucket.pointer.Share`): the pointers are then read by one process
and the answer handed to the others, W requests in all instead of W per rank::

    import ckpt
    path = fetch_latest(uri, "restore/", rank=rank, share=ckpt.share_from_rank_zero)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from uploader.bucket.fetch import fetch_entry
from uploader.bucket.pointer import PointerEntry, Share, list_ranks, resolve_latest
from uploader.config.hparams import ObjectStoreHparams
from uploader.errors import ConfigError
from uploader.launch.options import store_location

__all__ = ["fetch_latest"]

log = logging.getLogger(__name__)


def fetch_latest(
    to: str | ObjectStoreHparams,
    dest: str | os.PathLike[str],
    *,
    rank: int | None = None,
    prefix: str | None = None,
    world_size: int | None = None,
    progress: bool = False,
    share: Share[dict[int, PointerEntry] | None] | None = None,
) -> Path | None:
    """Download the newest committed checkpoint into the directory ``dest``.

    Args:
        to: a store URI (``s3://bucket/prefix``) or :class:`ObjectStoreHparams`.
        dest: the directory the checkpoint lands in (``dest/<name>``; created).
        rank: the rank whose checkpoint to fetch (default: the only rank; with several
            ranks, each lands in ``dest/rank_N/<name>`` and ``dest`` is returned).
        prefix: the object name prefix (default: the URI's path; "" for hparams).
        world_size: ranks that must have committed ``latest`` (default: every rank
            with a pointer).
        progress: draw a progress bar per file.
        share: when every rank calls this together, resolves ``latest`` on one of them
            and hands the result to all (e.g. ``ckpt.share_from_rank_zero``, a
            torch.distributed broadcast); default: each call reads every pointer.

    Returns:
        The local path of the checkpoint (file or directory), or None when nothing has
        been committed under the prefix yet.
    """
    hparams, uri_prefix = store_location(
        to, "fetch_latest takes a store URI or an ObjectStoreHparams"
    )
    where = uri_prefix if prefix is None else prefix
    if rank is not None and rank < 0:
        raise ConfigError(f"rank {rank} must be 0 or more")
    base = Path(dest)
    with hparams.initialize_object() as store:

        def resolve() -> dict[int, PointerEntry] | None:
            ranks = list_ranks(store, where)
            if not ranks:
                return None
            return resolve_latest(store, where, world_size, listed=ranks)

        found = share(resolve) if share else resolve()
        if found is None:
            log.info("nothing committed under %r yet: starting fresh", where or "(root)")
            return None
        entries = found
        if rank is not None:
            if rank not in entries:
                raise ConfigError(
                    f"rank {rank} has no committed checkpoint under {where or '(root)'!r}; "
                    f"ranks with one: {sorted(entries)}"
                )
            entries = {rank: entries[rank]}
        paths = {}
        for r, e in sorted(entries.items()):
            target = base if len(entries) == 1 else base / f"rank_{r}"
            paths[r] = fetch_entry(store, e, target, progress=progress, into=True)
            log.info("restored %s (%s, %d file(s)) to %s", e.name, e.rule, e.file_count, paths[r])
    return next(iter(paths.values())) if len(paths) == 1 else base
