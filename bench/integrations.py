"""Integrations benchmark: what the framework callbacks cost a training run's steps.

A model of stacked ``Linear(W, W)`` layers with Adam is trained on CPU by PyTorch
Lightning and by the Hugging Face ``Trainer``, saving a checkpoint every N steps into a
run directory. Each checkpoint holds the weights AND the Adam state (two buffers per
parameter), about 500 MiB in all (Lightning: one ``.ckpt`` file; HF: ``model.safetensors``
plus ``optimizer.pt`` and small files). Every framework runs in three variants:

* ``none``: no callback;
* ``callback``: ``UploaderCallback(file://BUCKET)`` with its default worker options (the
  worker runs at ``nice`` 10, below training);
* ``callback nice 0``: the same with ``nice=0`` (the worker at training's priority).

The bucket is a LOCAL directory on the same disk as the run directory, so the worker's
reads, hashing and writes compete with training for the same disk, memory bandwidth and
CPU cores (torch trains on ``--threads`` threads, default 1, as a data loader, a GPU
driver and other jobs would take the other cores; with every core busy in torch the step
times of this shared machine vary by more than the 5% measured here). Runs of the
variants interleave, rotating their order each round; every run is its own process. In each run the step time is the wall time from one
step's start to the next one's (the last: to the end of training), so a step includes the
framework's own checkpoint saves; the first step is left out (warm-up). Reported: the
median and p95 step time over all steps of all rounds, the training time (first step to
the end of training) and ``fit()``/``train()``'s wall time (with a callback: including the
drain that waits for the last checkpoint's upload), each as a ratio to ``none``.

Usage::

    python -m bench.integrations            # ~500 MiB checkpoints, 48 steps, save every 12, 3 rounds
    python -m bench.integrations --quick    # ~64 MiB, 24 steps, save every 8, 1 round (< 2 min)
    python -m bench.integrations --no-write # print the table only
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT

__all__ = ["main", "VARIANTS", "FRAMEWORKS"]

log = logging.getLogger("bench.integrations")

MiB = 1 << 20
FRAMEWORKS = ("lightning", "hf")
VARIANTS = ("none", "callback", "callback nice 0")
TARGET = 1.05
_LABEL = {"lightning": "Lightning", "hf": "HF Trainer"}


# -- one training run, in a child process -------------------------------------------------


def _layers(total_mib: int, width: int) -> int:
    """Linear layers whose weights and two Adam buffers make about ``total_mib``."""
    per_layer = (width * width + width) * 4 * 3
    return max(1, round(total_mib * MiB / per_layer))


def _model(width: int, layers: int) -> Any:
    import torch
    from torch import nn

    torch.manual_seed(0)
    blocks: list[nn.Module] = []
    for _ in range(layers):
        blocks += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*blocks[:-1])


def _data(width: int, steps: int, batch: int) -> Any:
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randn(steps * batch, width, generator=g)


class _Clock:
    """Step start times, the end of training, and the worker's niceness and CPU."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.end = 0.0
        self.worker_nice: int | None = None
        self.worker_cpu: float | None = None

    def step(self) -> None:
        self.starts.append(time.perf_counter())

    def done(self, worker: Any) -> None:
        self.end = time.perf_counter()
        pid = getattr(worker, "pid", None)
        if pid is not None:
            import psutil

            try:
                proc = psutil.Process(pid)
                self.worker_nice = proc.nice()
                t = proc.cpu_times()
                self.worker_cpu = t.user + t.system
            except psutil.Error:
                pass

    def steps(self) -> list[float]:
        marks = [*self.starts, self.end]
        return [b - a for a, b in zip(marks[:-1], marks[1:], strict=True)]


def _uploader_options(variant: str) -> dict[str, Any]:
    options: dict[str, Any] = {"progress_bar": False, "drain_timeout": 600}
    if variant == "callback nice 0":
        options["nice"] = 0
    return options


def _run_lightning(args: argparse.Namespace, clock: _Clock) -> float:
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    width, layers = args.width, _layers(args.state_mib, args.width)

    class Stack(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _model(width, layers)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            (x,) = batch
            return torch.nn.functional.mse_loss(self.net(x), x)

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=1e-4)

    uploader_cb = None
    callbacks: list[Any] = [
        ModelCheckpoint(dirpath=args.run_dir, every_n_train_steps=args.every, save_top_k=-1)
    ]
    if args.variant != "none":
        from uploader.integrations.lightning import UploaderCallback

        uploader_cb = UploaderCallback(args.to, **_uploader_options(args.variant))
        callbacks.append(uploader_cb)

    class Timing(pl.Callback):
        def on_train_batch_start(self, *a: Any) -> None:
            clock.step()

        def on_train_end(self, *a: Any) -> None:  # before the uploader's on_fit_end drain
            clock.done(uploader_cb.worker if uploader_cb is not None else None)

    callbacks.insert(0, Timing())
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=args.steps,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=args.run_dir,
    )
    loader = DataLoader(TensorDataset(_data(width, args.steps, args.batch)), batch_size=args.batch)
    model = Stack()
    t0 = time.perf_counter()
    trainer.fit(model, train_dataloaders=loader)
    return time.perf_counter() - t0


def _run_hf(args: argparse.Namespace, clock: _Clock) -> float:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    width, layers = args.width, _layers(args.state_mib, args.width)

    class Stack(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _model(width, layers)

        def forward(self, x: Any) -> dict[str, Any]:
            return {"loss": torch.nn.functional.mse_loss(self.net(x), x)}

    data = _data(width, args.steps, args.batch)
    dataset = [{"x": row} for row in data]
    uploader_cb = None
    callbacks: list[Any] = []

    class Timing(TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            clock.step()

        def on_train_end(self, *a: Any, **k: Any) -> None:  # before the uploader's drain
            clock.done(uploader_cb.worker if uploader_cb is not None else None)

    callbacks.append(Timing())
    if args.variant != "none":
        from uploader.integrations.transformers import UploaderCallback

        uploader_cb = UploaderCallback(args.to, **_uploader_options(args.variant))
        callbacks.append(uploader_cb)
    training_args = TrainingArguments(
        output_dir=os.fspath(args.run_dir),
        max_steps=args.steps,
        save_strategy="steps",
        save_steps=args.every,
        per_device_train_batch_size=args.batch,
        learning_rate=1e-4,
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    trainer = Trainer(model=Stack(), args=training_args, train_dataset=dataset, callbacks=callbacks)
    t0 = time.perf_counter()
    trainer.train()
    return time.perf_counter() - t0


def _child(args: argparse.Namespace) -> None:
    """Run one training (``--child``) and print its timings as one JSON line."""
    from harness.trainers.common import go_offline

    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    go_offline()
    import torch

    torch.set_num_threads(args.threads)
    clock = _Clock()
    runner = _run_lightning if args.child == "lightning" else _run_hf
    fit = runner(args, clock)
    ckpt = sum(  # the checkpoints, not the worker's journal and log beside them
        p.stat().st_size
        for p in args.run_dir.rglob("*")
        if p.is_file() and not p.name.startswith(".ckpt-uploader")
    )
    record = {
        "steps": clock.steps(),
        "train": clock.end - clock.starts[0],
        "fit": fit,
        "worker_nice": clock.worker_nice,
        "worker_cpu": clock.worker_cpu,
        "run_dir_bytes": ckpt,
        "saves": args.steps // args.every,
        "trainer_nice": os.nice(0),
    }
    sys.stdout.write(json.dumps(record) + "\n")


# -- the driver -----------------------------------------------------------------------------


def _one(framework: str, variant: str, cfg: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One run of ``framework`` in ``variant`` in a fresh process; its record."""
    run_dir = work / "run"
    bucket = (cfg.bucket_root or work) / "bucket"
    for d in (run_dir, bucket):
        shutil.rmtree(d, ignore_errors=True)
    bucket.mkdir(parents=True)
    argv = [
        sys.executable,
        "-m",
        "bench.integrations",
        "--child",
        framework,
        "--variant",
        variant,
        "--run-dir",
        str(run_dir),
        "--to",
        bucket.as_uri(),
        "--state-mib",
        str(cfg.state_mib),
        "--width",
        str(cfg.width),
        "--steps",
        str(cfg.steps),
        "--every",
        str(cfg.every),
        "--batch",
        str(cfg.batch),
        "--threads",
        str(cfg.threads),
    ]
    env = {**os.environ, "PYTHONPATH": ROOT}
    t0 = time.perf_counter()
    done = subprocess.run(
        argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=cfg.run_timeout
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"{framework} {variant} exited with {done.returncode}:\n{done.stderr[-4000:]}"
        )
    record: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    record["process"] = time.perf_counter() - t0
    if variant != "none":
        objects = [p for p in bucket.rglob("*") if p.is_file()]
        record["bucket_bytes"] = sum(p.stat().st_size for p in objects)
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(bucket, ignore_errors=True)
    log.info(
        "%s %s: median step %.3f s, train %.1f s, fit %.1f s, worker nice %s",
        framework,
        variant,
        statistics.median(record["steps"][1:]),
        record["train"],
        record["fit"],
        record["worker_nice"],
    )
    return record


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def run(cfg: argparse.Namespace, work: Path) -> dict[str, dict[str, list[dict[str, Any]]]]:
    results: dict[str, dict[str, list[dict[str, Any]]]] = {
        f: {v: [] for v in VARIANTS} for f in FRAMEWORKS
    }
    for r in range(cfg.rounds):
        for framework in FRAMEWORKS:
            order = list(VARIANTS)
            order = order[r % len(order) :] + order[: r % len(order)]
            for variant in order:
                results[framework][variant].append(_one(framework, variant, cfg, work))
    return results


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    steps = [s for rec in runs for s in rec["steps"][1:]]
    nice = {rec["worker_nice"] for rec in runs}
    cpu = [rec["worker_cpu"] for rec in runs if rec["worker_cpu"] is not None]
    return {
        "median": statistics.median(steps),
        "p95": _p95(steps),
        "train": statistics.median(rec["train"] for rec in runs),
        "fit": statistics.median(rec["fit"] for rec in runs),
        "nice": nice.pop() if len(nice) == 1 else sorted(nice, key=str),
        "worker_cpu": statistics.median(cpu) if cpu else None,
        "steps": len(steps),
        "ckpt_bytes": runs[0]["run_dir_bytes"] / max(1, runs[0]["saves"]),
        "saves": runs[0]["saves"],
    }


def table(results: dict[str, dict[str, list[dict[str, Any]]]], cfg: argparse.Namespace) -> str:
    layers = _layers(cfg.state_mib, cfg.width)
    where = (
        "a LOCAL directory (`file://`) on the same disk as the run directory: the upload "
        "competes with training for the same disk and CPU"
        if cfg.bucket_dir is None
        else f"a LOCAL directory (`file://`) under `{cfg.bucket_dir}`"
        + (
            " (memory: a stand-in for a remote store, whose writes cost this machine's disk "
            "nothing; the worker still reads, hashes and copies every byte)"
            if str(cfg.bucket_dir).startswith("/dev/shm")
            else ""
        )
    )
    lines = [
        "## Framework callbacks: step time (`bench/integrations.py`)",
        "",
        f"{layers} x `Linear({cfg.width}, {cfg.width})` with Adam, batch {cfg.batch}, "
        f"{cfg.steps} steps, a checkpoint every {cfg.every} steps (weights and Adam state: "
        f"the size below), on CPU, torch on {cfg.threads} thread(s) of the machine's "
        f"{os.cpu_count()} cores; "
        f"{cfg.rounds} interleaved round(s) of each variant, one process a run. The bucket is "
        f"{where}. Step time: one step's start to "
        "the next one's, so the steps that save include the framework's own save; the first "
        "step is left out. Median and p95 over every step of every round; train: first step "
        "to the end of training; fit: `fit()`/`train()` wall time, with a callback including "
        "the drain that waits for the last checkpoint's upload. Ratios are to `none`. Cost "
        "per checkpoint: the training time added, divided by the checkpoints saved; the "
        "5% interval is the save interval at which that cost is 5% of training time.",
        "",
        "| framework | variant | ckpt (MiB) | worker nice | median step (s) | p95 step (s) "
        "| train (s) | fit (s) | median ratio | p95 ratio | train ratio | fit ratio "
        "| worker CPU (s) | cost per checkpoint (s) | 5% interval (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    verdicts = []
    for framework in FRAMEWORKS:
        base = summarize(results[framework]["none"])
        for variant in VARIANTS:
            s = summarize(results[framework][variant])
            nice = "-" if variant == "none" else str(s["nice"])
            cpu = "-" if s["worker_cpu"] is None else f"{s['worker_cpu']:.1f}"
            cost = (s["train"] - base["train"]) / max(1, s["saves"])
            costs = "-" if variant == "none" else f"{cost:.2f}"
            interval = "-" if variant == "none" else f"{max(0.0, cost) / (TARGET - 1):.0f}"
            lines.append(
                f"| {_LABEL[framework]} | {variant} | {s['ckpt_bytes'] / MiB:.0f} | {nice} "
                f"| {s['median']:.3f} | {s['p95']:.3f} | {s['train']:.1f} | {s['fit']:.1f} "
                f"| {s['median'] / base['median']:.3f} | {s['p95'] / base['p95']:.3f} "
                f"| {s['train'] / base['train']:.3f} | {s['fit'] / base['fit']:.3f} | {cpu} "
                f"| {costs} | {interval} |"
            )
            if variant != "none":
                worst = max(s["median"] / base["median"], s["train"] / base["train"])
                verdicts.append(
                    f"- {_LABEL[framework]}, {variant}: median step x"
                    f"{s['median'] / base['median']:.3f}, train x{s['train'] / base['train']:.3f}"
                    f": {'met' if worst <= TARGET else '**not met**'}"
                )
    default_nice = {
        summarize(results[f]["callback"])["nice"] for f in FRAMEWORKS if results[f]["callback"]
    }
    lines += [
        "",
        f"Target: at most {TARGET - 1:.0%} overhead on the median step and on the training time:",
        "",
        *verdicts,
        "",
        "`worker nice` is the worker process's niceness as training ends (the trainer runs "
        f"at {results[FRAMEWORKS[0]]['none'][0]['trainer_nice']}); with the default options it "
        f"is {', '.join(map(str, sorted(default_nice, key=str)))} (the worker option `nice`; "
        "0 keeps training's priority). Worker CPU: the worker's CPU seconds up to the end of "
        "training (before the drain).",
    ]
    return "\n".join(lines)


def _command(args: argparse.Namespace) -> str:
    parts = ["python -m bench.integrations"]
    if args.quick:
        parts.append("--quick")
    for flag in ("state_mib", "width", "steps", "every", "batch", "rounds", "threads"):
        value = getattr(args, f"given_{flag}")
        if value is not None:
            parts.append(f"--{flag.replace('_', '-')} {value}")
    if args.bucket_dir is not None:
        parts.append(f"--bucket-dir {args.bucket_dir}")
    return " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.integrations", description=__doc__)
    p.add_argument("--quick", action="store_true", help="~64 MiB checkpoints, one round")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    p.add_argument("--state-mib", type=int, help="checkpoint size in MiB (default 500)")
    p.add_argument("--width", type=int, help="layer width (default 1024; quick: 512)")
    p.add_argument("--steps", type=int, help="training steps (default 48; quick: 24)")
    p.add_argument("--every", type=int, help="save every N steps (default 12; quick: 8)")
    p.add_argument("--batch", type=int, help="batch size (default 16)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3; quick: 1)")
    p.add_argument("--threads", type=int, help="torch threads in training (default 1)")
    p.add_argument("--dir", help="where runs and the bucket go (default: a temporary dir)")
    p.add_argument(
        "--bucket-dir",
        type=Path,
        help="where the bucket goes instead (e.g. /dev/shm: a stand-in for a remote store)",
    )
    # one training run (the driver starts these)
    p.add_argument("--child", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--to", help=argparse.SUPPRESS)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    for flag in ("state_mib", "width", "steps", "every", "batch", "rounds", "threads"):
        setattr(args, f"given_{flag}", getattr(args, flag))
    q = args.quick
    args.state_mib = args.state_mib or (64 if q else 500)
    args.width = args.width or (512 if q else 1024)
    args.steps = args.steps or (24 if q else 48)
    args.every = args.every or (8 if q else 12)
    args.batch = args.batch or 16
    args.threads = args.threads or 1
    args.rounds = args.rounds or (1 if q else 3)
    args.run_timeout = 300 if q else 900
    if args.child:
        _child(args)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    work = Path(tempfile.mkdtemp(prefix="bench-integrations-", dir=args.dir))
    args.bucket_root = args.bucket_dir and Path(
        tempfile.mkdtemp(prefix="bench-integrations-", dir=args.bucket_dir)
    )
    try:
        results = run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if args.bucket_root:
            shutil.rmtree(args.bucket_root, ignore_errors=True)
    text = table(results, args)
    print(text)
    log.info(
        "raw: %s",
        json.dumps(
            {f: {v: [r["steps"] for r in rs] for v, rs in vs.items()} for f, vs in results.items()}
        ),
    )
    if not args.no_write:
        from bench.report import write_section

        write_section("integrations", text, _command(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
