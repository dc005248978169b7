"""A tiny data-parallel run saving torch.distributed.checkpoint directories, as FSDP-style jobs do.

``python -m harness.trainers.dcp_run RUN_DIR --steps 10,20 [--world-size 2]
[--kill-mid-save STEP [--kill-at metadata|rename]] [--load DIR] [--width 32]``

``--world-size`` ranks (gloo on loopback; more than one run as child processes of this one,
meeting at the ``TCPStore`` rank 0 serves on a free port) train the same small model,
averaging gradients. At each step in ``--steps`` every rank calls ``dcp.save(state_dict,
storage_writer=FileSystemWriter(RUN_DIR/step_N))`` with the model parameters and SGD
momentum as ``DTensor`` shards (``Shard(0)`` over the ranks), so the one shared directory
holds ``__R_0.distcp`` from each rank R and, written last by rank 0 in the storage writer's
``finish()``, ``.metadata``. Rank 0 prints ``{"event": "save", "step", "dir", "digest"}``
per save, the digest being :func:`harness.trainers.common.state_digest` of the whole
(unsharded) ``{"model", "optim"}`` state.

``--kill-mid-save STEP``: the save of STEP uses a ``FileSystemWriter`` whose ``finish()``
SIGKILLs rank 0 before it writes ``.metadata`` (or, with ``--kill-at rename``, after it wrote
and fsynced ``.metadata.tmp`` and before renaming that to ``.metadata``); every rank's shard
is already written (DCP gathers the write results before ``finish``). The launcher then
kills the other ranks and itself with SIGKILL, as a job scheduler ends a job that lost a
rank.

``--load DIR``: build a fresh model, ``dcp.load`` the checkpoint into the same sharded
layout (any ``--world-size``: DCP reshards) and print ``{"event": "load", "dir", "step",
"digest"}``, comparable with the save's digest (``RUN_DIR`` is not written then).
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
from pathlib import Path
from typing import Any

from harness.servers.net import free_port
from harness.trainers.common import emit, go_offline, kill_self, state_digest

__all__ = ["main", "BATCH", "KILL_POINTS"]

log = logging.getLogger(__name__)

BATCH = 8
_IN = 8
_OUT = 4
KILL_POINTS = ("metadata", "rename")
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
            fresh = _sharded(_full_state(model, opt), mesh)
            for tensors in fresh.values():
                for t in tensors.values():
                    t.to_local().zero_()
            state = {**fresh, "step": -1}
            dcp.load(state, checkpoint_id=args.load)
            full = {g: {n: t.full_tensor() for n, t in ts.items()} for g, ts in fresh.items()}
            if rank == 0:
                emit(
                    event="load",
                    dir=os.fspath(args.load),
                    step=state["step"],
                    digest=state_digest(full),
                )
            return
        steps = sorted(args.steps)
        for step in range(1, steps[-1] + 1):
            x, y = _batch(step, rank)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            for param in model.parameters():
                dist.all_reduce(param.grad)
                param.grad /= world
            opt.step()
            if step in steps:
                path = args.run_dir / f"step_{step}"
                full = _full_state(model, opt)
                digest = state_digest(full)
                state = {**_sharded(full, mesh), "step": step}
                kill = args.kill_at if step == args.kill_mid_save else None
                dcp.save(state, storage_writer=_writer(path, kill))
                if rank == 0:
                    emit(event="save", step=step, dir=os.fspath(path), digest=digest)
    finally:
        dist.destroy_process_group()


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
    go_offline()
    if args.rank is not None:
        _rank_main(args, args.rank, args.store_port)
    elif args.world_size == 1:
        _rank_main(args, 0, 0)
    else:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        sys.exit(_launch(args, argv))


if __name__ == "__main__":
    main()
