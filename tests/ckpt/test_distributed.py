"""Two gloo ranks in real processes: shared run timestamp, DDP checkpoints, exact resume;
``latest`` resolved once by rank 0 and broadcast (requests counted by a proxy).

Run as a script, this file is one rank's worker
(``python tests/ckpt/test_distributed.py RANK PORT STORE_JSON``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from harness.servers.s3 import S3Server

ROOT = Path(__file__).resolve().parents[2]


def worker(rank: int, port: int, store_json: str) -> None:
    sys.path.insert(0, str(ROOT))
    import torch
    import torch.distributed as dist

    from tests.ckpt.helpers import assert_same_training_state, make_trainer

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        ref = make_trainer("4ep")
        ref.fit()
        first = make_trainer("7ba", save_folder="ckpts", save_interval="3ba")
        first.fit()
        folder = first.checkpoint_saver.checkpoint_folder  # type: ignore[union-attr]
        names = sorted(p.name for p in folder.iterdir())
        data = torch.load(folder / "ba3.pt", weights_only=True)
        resumed = make_trainer(
            "4ep", load_path_format=str(folder.parent.parent / "rank_{rank}" / "ckpts" / "ba6.pt")
        )
        resumed.fit()
        assert_same_training_state(ref, resumed)
        report = {
            "rank": resumed.rank,
            "world_size": resumed.world_size,
            "run_directory": str(first.run_directory),
            "files": names,
            "is_model_ddp": data["state"]["is_model_ddp"],
            "model_keys": sorted(data["state"]["model"]),
            "batches": ref.timer.batch,
            "samples": ref.timer.sample,
        }
        Path(f"rank{rank}.json").write_text(json.dumps(report))
        load_latest(rank, store_json, folder / "ba6.pt")
    finally:
        dist.destroy_process_group()


def load_latest(rank: int, store_json: str, saved: Path) -> None:
    """Commit this rank's checkpoint ``saved`` (directly), then, through the counting
    proxy, load ``latest`` with ckpt.load and fetch_latest together with the other rank;
    a prefix with nothing committed fails on both ranks instead of leaving one waiting."""
    import torch
    import torch.distributed as dist

    import ckpt
    from harness.ranks import commit_world
    from uploader import ObjectNotFoundError, ObjectStoreHparams, fetch_latest

    where = json.loads(store_json)
    with ObjectStoreHparams(**where["direct"]).initialize_object() as store:
        commit_world(store, "run", 2, ["ep1.pt", "ep2.pt"], saved.read_bytes(), ranks=[rank])
    dist.barrier()
    hp = ObjectStoreHparams(**where["proxied"])
    data = ckpt.load("latest", object_store=hp, prefix="run", rank=rank, world_size=2,
                     progress=False)  # fmt: skip
    want = torch.load(saved, weights_only=True)
    assert torch.equal(data["state"]["model"]["l1.weight"], want["state"]["model"]["l1.weight"])
    path = fetch_latest(hp, f"restore{rank}", prefix="run", rank=rank,
                        share=ckpt.share_from_rank_zero)  # fmt: skip
    assert path is not None and path.read_bytes() == saved.read_bytes(), path
    try:
        ckpt.load("latest", object_store=hp, prefix="empty", rank=rank, world_size=2)
    except ObjectNotFoundError as exc:
        assert "rank 0 has committed no checkpoint" in str(exc), exc
    else:
        raise AssertionError("latest under an empty prefix loaded something")
    dist.barrier()


def test_two_gloo_ranks_resume_exactly_and_resolve_latest_once(
    tmp_path: Path, rclone_s3: S3Server
) -> None:
    from harness.faultproxy import FaultProxy
    from harness.ranks import pointer_requests
    from harness.servers.net import free_port

    if not rclone_s3.alive():  # a fault test may have left it stopped
        rclone_s3.start()
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    rclone_s3.make_bucket(bucket)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with FaultProxy(("127.0.0.1", rclone_s3.port)) as proxy:
        direct = {
            "provider": "s3", "container": bucket, "host": "127.0.0.1", "port": rclone_s3.port,
            "key_environ": rclone_s3.key_env, "secret_environ": rclone_s3.secret_env,
            "region": "us-east-1",
        }  # fmt: skip
        where = json.dumps({"direct": direct, "proxied": {**direct, "port": proxy.port}})
        procs = [
            subprocess.Popen(
                [sys.executable, __file__, str(r), str(port), where],
                cwd=tmp_path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            for r in range(2)
        ]
        outputs = []
        try:
            for p in procs:
                out, _ = p.communicate(timeout=120)
                outputs.append(out.decode(errors="replace"))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        counts = pointer_requests(proxy)
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    # rank 0 alone read the pointers: 2 for ckpt.load, 2 (and one listing) for
    # fetch_latest, 1 for the empty prefix; ranks resolving alone would read 10
    assert (counts["pointer"], counts["list"]) == (5, 1), counts
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    dirs = [Path(r["run_directory"]) for r in reports]
    assert [d.name for d in dirs] == ["rank_0", "rank_1"]
    assert dirs[0].parent == dirs[1].parent  # one runs/<timestamp>/ agreed across ranks
    assert dirs[0].parent.parent == tmp_path / "runs"
    for r in reports:
        assert r["world_size"] == 2
        assert r["files"] == ["ba3.pt", "ba6.pt", "ba7.pt"]
        assert r["is_model_ddp"] is True
        assert r["model_keys"] == ["l1.bias", "l1.weight", "l2.bias", "l2.weight"]
        # 40 samples sharded over 2 ranks: 20 each, 3 batches (8, 8, 4) per epoch
        assert (r["batches"], r["samples"]) == (12, 80)


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
