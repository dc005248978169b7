"""Across ranks: two gloo ranks (spawned processes), each with its own upload worker.

One spawn runs three trainings on both ranks (DDP over gloo on loopback):

1. uninterrupted: 4 epochs, no checkpoints;
2. interrupted: 2 epochs with RunDirectoryUploader to a LOCAL bucket, each rank's
   worker uploading its own run directory;
3. resumed: every rank loads ``latest`` from the bucket and trains to epoch 4.

The parent checks that each rank's objects are in the bucket, that ``latest``
resolves to a checkpoint both ranks committed, and that the resumed weights equal
the uninterrupted ones bit for bit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ckpt import Trainer
from harness.servers.net import free_port
from uploader import ObjectStoreHparams, RunDirectoryUploader
from uploader.bucket.pointer import read_pointer, resolve_latest

WORLD = 2
PREFIX = "dist"


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(6, 8)
        self.l2 = torch.nn.Linear(8, 1)
        self.drop = torch.nn.Dropout(0.2)  # uses the RNG: resume must restore it

    def forward(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.l2(self.drop(torch.relu(self.l1(x)))), y)


def loader() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(32, 6, generator=g)
    y = x[:, :1] * 2 - x[:, 1:2]
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=4, shuffle=True
    )


def make_trainer(**kw: Any) -> Trainer:
    torch.manual_seed(0)  # same initial weights on every rank and in every phase
    model = TinyNet()
    return Trainer(
        model=model,
        train_dataloader=loader(),
        optimizers=torch.optim.Adam(model.parameters(), lr=0.01),
        seed=7,
        load_progress_bar=False,
        **kw,
    )


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.state.raw_model.state_dict().items()}


def rank_main(rank: int, port: int, out: str, bucket: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        os.chdir(out)
        hp = ObjectStoreHparams(provider="local", container=bucket)
        # 1. uninterrupted
        full = make_trainer(max_duration="4ep")
        full.fit()
        # 2. interrupted after 2 epochs, uploading from a worker per rank
        cb = RunDirectoryUploader(hp, object_name_prefix=PREFIX, progress_bar=False)
        part = make_trainer(max_duration="2ep", save_folder="checkpoints", callbacks=[cb])
        part.fit()
        assert cb.worker is not None and cb.final_status is not None
        dist.barrier()  # every rank's worker has drained
        # 3. resume every rank from the bucket's latest
        resumed = make_trainer(
            max_duration="4ep",
            load_path_format="latest",
            load_object_store=hp,
            load_prefix=PREFIX,
        )
        resumed.fit()
        torch.save({"full": weights(full), "resumed": weights(resumed)}, Path(out) / f"w{rank}.pt")
        (Path(out) / f"info{rank}.json").write_text(
            json.dumps(
                {
                    "worker_pid": cb.worker.pid,
                    "run_directory": str(part.run_directory),
                    "verified": cb.final_status.done,
                    "resumed_epoch": resumed.timer.epoch,
                }
            )
        )
    finally:
        dist.destroy_process_group()


def test_two_ranks_upload_their_own_directories_and_resume_bit_identically(
    tmp_path: Path,
) -> None:
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    out = tmp_path / "work"
    out.mkdir()
    mp.spawn(rank_main, args=(free_port(), str(out), str(bucket)), nprocs=WORLD, join=True)

    infos = [json.loads((out / f"info{r}.json").read_text()) for r in range(WORLD)]
    # One worker per rank, each on its own run directory runs/<ts>/rank_<r>.
    assert infos[0]["worker_pid"] != infos[1]["worker_pid"]
    dirs = [Path(i["run_directory"]) for i in infos]
    assert [d.name for d in dirs] == ["rank_0", "rank_1"] and dirs[0].parent == dirs[1].parent
    assert all(i["verified"] == 2 for i in infos)

    store = ObjectStoreHparams(provider="local", container=str(bucket)).initialize_object()
    names = {o.name for o in store.list(PREFIX)}
    for r in range(WORLD):
        for ep in (1, 2):
            obj = f"{PREFIX}/rank_{r}/checkpoints/ep{ep}.pt"
            assert obj in names
            local = dirs[r] / "checkpoints" / f"ep{ep}.pt"
            assert store.get_bytes(obj) == local.read_bytes()
        pointer = read_pointer(store, PREFIX, r)
        assert pointer is not None and pointer.latest.name == "checkpoints/ep2.pt"

    latest = resolve_latest(store, PREFIX, world_size=WORLD)
    assert {r: e.name for r, e in latest.items()} == {
        0: "checkpoints/ep2.pt",
        1: "checkpoints/ep2.pt",
    }

    # Resuming every rank from the bucket reproduces the uninterrupted run exactly.
    for r in range(WORLD):
        w = torch.load(out / f"w{r}.pt", weights_only=True)
        assert infos[r]["resumed_epoch"] == 4
        assert w["full"].keys() == w["resumed"].keys()
        for k in w["full"]:
            assert torch.equal(w["full"][k], w["resumed"][k]), (r, k)
    # DDP kept the ranks in step.
    w0 = torch.load(out / "w0.pt", weights_only=True)["resumed"]
    w1 = torch.load(out / "w1.pt", weights_only=True)["resumed"]
    assert all(torch.equal(w0[k], w1[k]) for k in w0)


def test_latest_waits_for_the_slowest_rank(tmp_path: Path) -> None:
    """When rank 1 has committed only ep1, ``latest`` is ep1 for every rank.

    The pointers are written by real workers: rank 0's run directory holds ep1 and
    ep2, rank 1's only ep1 (as when rank 1's upload of ep2 is still running).
    """
    from uploader.launch.worker import UploadWorker

    bucket = tmp_path / "bucket"
    bucket.mkdir()
    hp = ObjectStoreHparams(provider="local", container=str(bucket))
    workers = []
    for rank, epochs in ((0, (1, 2)), (1, (1,))):
        run = tmp_path / "runs" / "t" / f"rank_{rank}"
        for ep in epochs:
            path = run / "checkpoints" / f"ep{ep}.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(os.urandom(1000))
            os.utime(path, ns=(ep * 10**18, ep * 10**18))  # ep2 is newer than ep1
        workers.append(
            UploadWorker(run, hparams=hp, prefix=PREFIX, rank=rank, drain_timeout=60).start()
        )
    for w in workers:
        w.drain(progress=False)
    store = hp.initialize_object()
    assert read_pointer(store, PREFIX, 0).latest.name == "checkpoints/ep2.pt"  # type: ignore[union-attr]
    latest = resolve_latest(store, PREFIX, world_size=WORLD)
    assert {r: e.name for r, e in latest.items()} == {
        0: "checkpoints/ep1.pt",
        1: "checkpoints/ep1.pt",
    }
