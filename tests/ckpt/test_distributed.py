"""Two gloo ranks in real processes: shared run timestamp, DDP checkpoints, exact resume.

Run as a script, this file is one rank's worker (``python tests/ckpt/test_distributed.py RANK PORT``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def worker(rank: int, port: int) -> None:
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
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_resume_exactly(tmp_path: Path) -> None:
    from harness.servers.net import free_port

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(r), str(port)],
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
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
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
    worker(int(sys.argv[1]), int(sys.argv[2]))
