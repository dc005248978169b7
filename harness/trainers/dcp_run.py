"""A tiny data-parallel run saving torch.distributed.checkpoint directories, as FSDP-style jobs do.

``python -m harness.trainers.dcp_run RUN_DIR --steps 10,20 [--world-size 2]
[--kill-mid-save STEP [--kill-at metadata|rename]] [--async thread|process]
[--reference-dir REF] [--upload-to URI] [--load DIR [--expect FILE]] [--width 32]``

``--world-size`` ranks (gloo on loopback; more than one run as child processes of this one,
meeting at the ``TCPStore`` rank 0 serves on a free port) train the same small model,
averaging gradients. At each step in ``--steps`` every rank calls ``dcp.save(state_dict,
storage_writer=FileSystemWriter(RUN_DIR/step_N))`` with the model parameters and SGD
momentum as ``DTensor`` shards (``Shard(0)`` over the ranks), so the one shared directory
holds ``__R_0.distcp`` from each rank R and, written last by rank 0 in the storage writer's
``finish()``, ``.metadata``. Rank 0 prints ``{"event": "save", "step", "dir", "digest"}``
per save, the digest being :func:`harness.trainers.common.state_digest` of the whole
(unsharded) ``{"model", "optim"}`` state.

``--async thread|process`` saves with ``dcp.async_save`` instead, with that executor
(``AsyncCheckpointerType.THREAD``, the default one, or ``PROCESS``: a checkpoint process
torch spawns, with a gloo group of its own on loopback), coordinating on a gloo group made
for the saves (``dist.new_group``). The state is staged (copied) when the call returns and
training goes on while the save writes; before the next save, and before the run ends,
the previous save's future is waited on, and the ``save`` record is printed once its
``.metadata`` is written. At the end rank 0 prints ``{"event": "async", "executor",
"checkpoint_pid"}``, the pid of the checkpoint process (None for ``thread``).

``--reference-dir REF``: rank 0 also writes the whole state of each save, as it was when
the save began, with ``torch.save`` to ``REF/step_N.pt`` (keep REF outside RUN_DIR).

``--upload-to URI`` runs the training inside ``uploader.Sidecar(RUN_DIR, to=URI)`` (in the
launcher process: one worker for the shared directory, rank 0), prints ``{"event":
"worker", "pid"}`` once it started and, after the ``with`` block drained it, ``{"event":
"bucket", ...}`` (:func:`harness.trainers.common.bucket_report`).

``--kill-mid-save STEP``: the save of STEP uses a ``FileSystemWriter`` whose ``finish()``
SIGKILLs rank 0 before it writes ``.metadata`` (or, with ``--kill-at rename``, after it wrote
and fsynced ``.metadata.tmp`` and before renaming that to ``.metadata``); every rank's shard
is already written (DCP gathers the write results before ``finish``). The launcher then
kills the other ranks and itself with SIGKILL, as a job scheduler ends a job that lost a
rank.

``--load DIR``: build a fresh model, ``dcp.load`` the checkpoint into the same sharded
layout (any ``--world-size``: DCP reshards) and print ``{"event": "load", "dir", "step",
"digest"}``, comparable with the save's digest (``RUN_DIR`` is not written then). With
``--expect FILE`` (a ``--reference-dir`` file) the record also holds ``tensors`` (how many
were compared), ``unequal`` (the names where ``torch.equal`` is false, or whose shape or
dtype differs) and ``expected_step``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness.servers.net import free_port
from harness.trainers.common import bucket_report, emit, go_offline, kill_self, state_digest

__all__ = ["main", "ASYNC_EXECUTORS", "BATCH", "KILL_POINTS"]

log = logging.getLogger(__name__)

BATCH = 8
_IN = 8
_OUT = 4
KILL_POINTS = ("metadata", "rename")
ASYNC_EXECUTORS = ("thread", "process")
_TIMEOUT = datetime.timedelta(seconds=120)


def _model(width: int) -> Any:
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(_IN, width), nn.Tanh(), nn.Linear(width, _OUT))


def _batch(step: int, rank: int) -> tuple[Any, Any]:
    import torch

    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(BATCH, _IN, generator=g)
    y = torch.stack([x.sum(dim=1), x[:, 0] - x[:, 1], x[:, 2] * x[:, 3], x[:, 4].abs()], dim=1)
    return x, y


def _full_state(model: Any, opt: Any) -> dict[str, dict[str, Any]]:
    """The replicated ``{"model", "optim"}`` state, parameter name to tensor."""
    import torch

    optim: dict[str, Any] = {}
    for name, param in model.named_parameters():
        buf = opt.state.get(param, {}).get("momentum_buffer")
        optim[name] = buf if buf is not None else torch.zeros_like(param)
    return {"model": dict(model.named_parameters()), "optim": optim}


def _sharded(full: dict[str, dict[str, Any]], mesh: Any) -> dict[str, Any]:
    """Each rank's slice (along dim 0) of the replicated state, as DTensors."""
    from torch.distributed.tensor import DTensor, Shard

    rank, world = mesh.get_local_rank(), mesh.size()
    return {
        group: {
            name: DTensor.from_local(
                t.detach().chunk(world, dim=0)[rank].clone(), mesh, [Shard(0)], run_check=False
            )
            for name, t in tensors.items()
        }
        for group, tensors in full.items()
    }


def _writer(path: Path, kill: str | None) -> Any:
    """DCP's ``FileSystemWriter``; with ``kill``, one whose ``finish()`` (rank 0 only, after
    every rank's shards are written) SIGKILLs the process at that point."""
    from torch.distributed.checkpoint import FileSystemWriter

    if kill is None:
        return FileSystemWriter(path)

    class KillingWriter(FileSystemWriter):
        def finish(self, metadata: Any, results: Any) -> None:
            if kill == "metadata":
                kill_self(f"--kill-mid-save: before {path / '.metadata'}")

            def rename(src: Any, dst: Any) -> None:
                kill_self(f"--kill-mid-save: {src} written, not yet renamed to {dst}")

            self.fs.rename = rename  # type: ignore[method-assign,assignment]
            super().finish(metadata, results)

    return KillingWriter(path)


def _compare(loaded: dict[str, dict[str, Any]], expect: Path) -> dict[str, Any]:
    """``torch.equal`` of every loaded tensor against a ``--reference-dir`` file."""
    import torch

    ref = torch.load(expect, weights_only=True)
    names: list[str] = []
    unequal: list[str] = []
    for group in sorted(set(ref) | set(loaded)):
        if group == "step":
            continue
        want, got = ref.get(group, {}), loaded.get(group, {})
        for name in sorted(set(want) | set(got)):
            key = f"{group}.{name}"
            names.append(key)
            a, b = want.get(name), got.get(name)
            if (
                a is None
                or b is None
                or a.dtype != b.dtype
                or a.shape != b.shape
                or not torch.equal(a, b)
            ):
                unequal.append(key)
    return {"tensors": len(names), "unequal": unequal, "expected_step": ref["step"]}


def _load(args: argparse.Namespace, model: Any, opt: Any, mesh: Any, rank: int) -> None:
    """``dcp.load`` ``args.load`` into a zeroed copy of the sharded state; rank 0 reports."""
    import torch.distributed.checkpoint as dcp

    fresh = _sharded(_full_state(model, opt), mesh)
    for tensors in fresh.values():
        for t in tensors.values():
            t.to_local().zero_()
    state = {**fresh, "step": -1}
    dcp.load(state, checkpoint_id=args.load)
    full = {g: {n: t.full_tensor() for n, t in ts.items()} for g, ts in fresh.items()}
    if rank == 0:
        checked = _compare(full, args.expect) if args.expect is not None else {}
        emit(
            event="load",
            dir=os.fspath(args.load),
            step=state["step"],
            digest=state_digest(full),
            **checked,
        )


def _rank_main(args: argparse.Namespace, rank: int, port: int) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    world = args.world_size
    # rank 0 serves the rendezvous store on loopback (a free port when it runs alone)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=_TIMEOUT)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        model = _model(args.width)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        if args.load is not None:
            _load(args, model, opt, mesh, rank)
            return
        steps = sorted(args.steps)
        pending: tuple[int, Path, str, Any] | None = None  # an async save not yet waited on
        # async saves coordinate on a group of their own, so that a save's collectives in
        # the background never interleave with training's on the default group
        save_group = dist.new_group(backend="gloo") if args.async_save else None
        for step in range(1, steps[-1] + 1):
            x, y = _batch(step, rank)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            if world > 1:
                for param in model.parameters():
                    dist.all_reduce(param.grad)
                    param.grad /= world
            opt.step()
            if step in steps:
                path = args.run_dir / f"step_{step}"
                full = _full_state(model, opt)
                digest = state_digest(full)
                if rank == 0 and args.reference_dir is not None:
                    _save_reference(args.reference_dir / f"step_{step}.pt", full, step)
                state = {**_sharded(full, mesh), "step": step}
                if args.async_save is None:
                    kill = args.kill_at if step == args.kill_mid_save else None
                    dcp.save(state, storage_writer=_writer(path, kill))
                    if rank == 0:
                        emit(event="save", step=step, dir=os.fspath(path), digest=digest)
                    continue
                if pending is not None:
                    _finish_async(pending, rank)
                pending = (
                    step,
                    path,
                    digest,
                    _async_save(state, path, args.async_save, save_group),
                )
        if pending is not None:
            _finish_async(pending, rank)
        if args.async_save is not None and rank == 0:
            emit(event="async", executor=args.async_save, checkpoint_pid=_checkpoint_pid())
    finally:
        dist.destroy_process_group()


def _save_reference(path: Path, full: dict[str, dict[str, Any]], step: int) -> None:
    """The whole state as it is now, for ``--load DIR --expect`` to compare with."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    copy = {g: {n: t.detach().clone() for n, t in ts.items()} for g, ts in full.items()}
    torch.save({**copy, "step": step}, path)


def _async_save(state: dict[str, Any], path: Path, executor: str, group: Any) -> Any:
    """``dcp.async_save`` into ``path`` with the named executor, coordinating on ``group``;
    the future of its completion."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.state_dict_saver import (
        AsyncCheckpointerType,
        AsyncSaveResponse,
    )

    kind = AsyncCheckpointerType.PROCESS if executor == "process" else AsyncCheckpointerType.THREAD
    started = dcp.async_save(
        state,
        storage_writer=FileSystemWriter(path),
        process_group=group,
        async_checkpointer_type=kind,
    )
    # torch returns AsyncSaveResponse only for a stager that stages asynchronously
    return started.upload_completion if isinstance(started, AsyncSaveResponse) else started


def _checkpoint_pid() -> int | None:
    """The pid of the PROCESS executor's checkpoint process, if this process started one."""
    from torch.distributed.checkpoint import _async_process_executor as executor

    running = executor._CHECKPOINT_PROCESS
    return None if running is None else running._save_process.pid


def _finish_async(pending: tuple[int, Path, str, Any], rank: int) -> None:
    step, path, digest, future = pending
    future.result(timeout=_TIMEOUT.total_seconds())
    if rank == 0:
        emit(event="save", step=step, dir=os.fspath(path), digest=digest)


def _launch(args: argparse.Namespace, argv: list[str]) -> int:
    """Start ``world_size`` rank processes and wait; when one fails, end the rest."""
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", __spec__.name if __spec__ else "harness.trainers.dcp_run"]
            + argv
            + ["--rank", str(r), "--store-port", str(port)]
        )
        for r in range(args.world_size)
    ]
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed or all(c == 0 for c in codes):
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
            p.wait()
    if failed:
        code = failed[0]
        log.error("a rank exited with %s; the other ranks were killed", code)
        if code < 0:
            os.kill(os.getpid(), -code)
        return code
    return 0


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m harness.trainers.dcp_run")
    p.add_argument("run_dir", type=Path)
    p.add_argument(
        "--steps",
        type=lambda s: [int(x) for x in s.split(",") if x],
        default=[10, 20],
        help="comma separated steps to save at; training stops at the last",
    )
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--width", type=int, default=32, help="hidden width (--world-size divides it)")
    p.add_argument("--kill-mid-save", type=int, metavar="STEP")
    p.add_argument(
        "--kill-at",
        choices=KILL_POINTS,
        default="metadata",
        help="metadata: before .metadata is written; rename: after .metadata.tmp is written "
        "and fsynced, before it is renamed to .metadata",
    )
    p.add_argument(
        "--load", type=Path, metavar="DIR", help="load this checkpoint, print its digest"
    )
    p.add_argument(
        "--async",
        dest="async_save",
        choices=ASYNC_EXECUTORS,
        help="save with dcp.async_save and this executor (default: dcp.save)",
    )
    p.add_argument(
        "--reference-dir",
        type=Path,
        metavar="REF",
        help="also torch.save each save's whole state to REF/step_N.pt",
    )
    p.add_argument("--upload-to", metavar="URI", help="train inside uploader.Sidecar(RUN_DIR)")
    p.add_argument(
        "--expect",
        type=Path,
        metavar="FILE",
        help="with --load: compare every tensor with this --reference-dir file",
    )
    p.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("--store-port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.steps or min(args.steps) < 1:
        p.error(f"--steps {args.steps} names no step to save at: pass e.g. --steps 10,20")
    if args.kill_mid_save is not None and args.kill_mid_save not in args.steps:
        p.error(f"--kill-mid-save {args.kill_mid_save} is not a save step: pick one of --steps")
    if _OUT % args.world_size or args.width % args.world_size:
        p.error(
            f"--world-size {args.world_size} must divide {_OUT} (the output features) and "
            f"--width {args.width}: pass 1, 2 or 4 and a width that it divides"
        )
    if args.async_save is not None and args.kill_mid_save is not None:
        p.error("--kill-mid-save works with dcp.save only: leave out --async")
    if args.expect is not None and args.load is None:
        p.error("--expect compares a loaded checkpoint: pass --load DIR too")
    if args.upload_to is not None and args.load is not None:
        p.error("--upload-to watches the run directory of a training run: leave out --load")
    go_offline()
    # the PROCESS executor's checkpoint process meets its peers at MASTER_ADDR: loopback
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if args.rank is not None:  # a rank the launcher started (its sidecar runs there)
        _rank_main(args, args.rank, args.store_port)
        return
    with _sidecar(args.run_dir, args.upload_to):
        if args.world_size == 1:
            _rank_main(args, 0, 0)
        else:
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
            code = _launch(args, argv)
            if code:
                sys.exit(code)


@contextlib.contextmanager
def _sidecar(run_dir: Path, uri: str | None) -> Iterator[None]:
    """``uploader.Sidecar(run_dir, to=uri)`` around the block, with its records; nothing
    without ``uri``."""
    if uri is None:
        yield
        return
    import uploader

    with uploader.Sidecar(
        run_dir, to=uri, rank=0, progress_bar=False, drain_timeout=120
    ) as sidecar:
        emit(event="worker", pid=sidecar.pid)
        yield
    emit(event="bucket", **bucket_report(uri, sidecar.pid))


if __name__ == "__main__":
    main()
