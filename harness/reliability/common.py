"""What the reliability scenarios share: results, bucket audits, the daemon process,
checkpoint writers.

Every scenario (see the package docstring) takes its counts and durations as
arguments, runs real processes on loopback, and returns a :class:`Result`. Every
loop here is bounded in count and in time, and every process a scenario starts
is killed in a ``finally``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.servers.s3 import S3Server, start_rclone_s3
from uploader import ObjectStore, RetryPolicy
from uploader.bucket.pointer import read_pointer
from uploader.errors import IntegrityError, ObjectNotFoundError

__all__ = [
    "Result",
    "ROOT",
    "MiB",
    "sha256_file",
    "write_checkpoint_file",
    "Audit",
    "bucket_audit",
    "rclone_server",
    "Daemon",
    "journal_rows",
    "check_pointer_on_disk",
    "CheckpointWriter",
    "wait_gone",
]

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20


@dataclass
class Result:
    """What one scenario measured. ``figures`` go into the report table as they are."""

    case: str
    figures: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __getitem__(self, key: str) -> Any:
        return self.figures[key]


# -- files and checks -------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(4 * MiB)
            if not block:
                return h.hexdigest()
            h.update(block)


def write_checkpoint_file(path: Path, size: int, seed: int, atomic: bool = True) -> str:
    """Write ``size`` pseudo-random bytes the way a trainer does; return their sha256.

    ``atomic``: write ``.<name>.tmp``, fsync, rename (protocol 1). Otherwise write
    in place.
    """
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    target = path.with_name(f".{path.name}.tmp") if atomic else path
    h = hashlib.sha256()
    block = rng.randbytes(min(size, MiB)) if size else b""
    with open(target, "wb") as f:
        left, i = size, 0
        while left > 0:
            n = min(len(block), left)
            chunk = i.to_bytes(8, "little") + block[8:n] if n >= 8 else block[:n]
            f.write(chunk)
            h.update(chunk)
            left -= n
            i += 1
        f.flush()
        os.fsync(f.fileno())
    if atomic:
        os.replace(target, path)
    return h.hexdigest()


@dataclass
class Audit:
    """The bucket against what should be there."""

    expected: int
    present: int
    lost: list[str]
    corrupted: list[str]
    bad_pointers: list[str]
    #: Present and with the right bytes, but the store kept no digest for them
    #: (rclone's server forgets object metadata when it restarts).
    no_digest: list[str] = field(default_factory=list)


def bucket_audit(
    store: ObjectStore,
    expected: dict[str, str],
    scratch: Path,
    pointers: Sequence[tuple[str, int]] = (),
) -> Audit:
    """Check every ``object name -> sha256`` in ``expected``.

    Each object is downloaded through the store (which checks the digest it
    recorded at upload, where the server kept it) and its sha256 compared with
    the local file's, so an object is *corrupted* when either check fails, and
    *lost* when absent.
    ``pointers``: (prefix, rank) pairs whose ``latest.json`` must name an object
    that is present with the sha256 and size the pointer records.
    """
    scratch.mkdir(parents=True, exist_ok=True)
    lost: list[str] = []
    corrupted: list[str] = []
    no_digest: list[str] = []
    for name, sha in sorted(expected.items()):
        dest = scratch / "audit.bin"
        try:
            if store.stat(name).digest is None:
                no_digest.append(name)
            store.download_file(name, dest, progress=False)
        except ObjectNotFoundError:
            lost.append(name)
            continue
        except IntegrityError as exc:
            log.error("corrupted: %s", exc)
            corrupted.append(name)
            continue
        if sha256_file(dest) != sha:
            corrupted.append(name)
        dest.unlink()
    bad: list[str] = []
    for prefix, rank in pointers:
        p = read_pointer(store, prefix, rank)
        if p is None:
            bad.append(f"rank {rank}: no pointer")
            continue
        for entry in {e.object: e for e in (p.latest, *p.history)}.values():
            try:
                st = store.stat(entry.object)
            except ObjectNotFoundError:
                bad.append(f"{entry.object}: named by the pointer but absent")
                continue
            if st.size != entry.size or (st.digest is not None and str(st.digest) != entry.digest):
                bad.append(f"{entry.object}: pointer says {entry.size}/{entry.digest}")
            want = expected.get(entry.object)
            if want is not None and entry.digest.startswith("sha256:") and entry.digest[7:] != want:
                bad.append(f"{entry.object}: pointer digest is not the file's sha256")
    return Audit(len(expected), len(expected) - len(lost), lost, corrupted, bad, no_digest)


@contextlib.contextmanager
def rclone_server(workdir: Path) -> Iterator[S3Server]:
    """A private ``rclone serve s3`` for one scenario (so stopping it disturbs no other test)."""
    server = start_rclone_s3(workdir / "s3data")
    try:
        yield server
    finally:
        server.close()


def _store(
    server: S3Server,
    bucket: str,
    *,
    port: int | None = None,
    retry: RetryPolicy,
    timeout: float = 30.0,
    part_size: int = 5 * MiB,
    concurrency: int = 4,
) -> ObjectStore:
    server.make_bucket(bucket)
    hp = server.hparams(bucket, port=port or server.port, extra_init_kwargs={"timeout": timeout})
    return hp.initialize_object(part_size=part_size, concurrency=concurrency, retry=retry)


# -- the daemon -------------------------------------------------------------------------------


class Daemon:
    """One ``ckpt-uploader watch`` process in its own session; its output goes to ``log``."""

    def __init__(
        self,
        run_dir: Path,
        uri: str,
        state_dir: Path,
        *args: str,
        log: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.status_file = state_dir / "status.json"
        self.argv = [
            sys.executable,
            "-m",
            "uploader",
            "watch",
            str(run_dir),
            "--to",
            uri,
            "--state-dir",
            str(state_dir),
            "--status-file",
            str(self.status_file),
            "--no-progress",
            *args,
        ]
        self.log = log
        logf = open(log, "ab")
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                cwd=str(ROOT),
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        finally:
            logf.close()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        if self.proc.poll() is None:  # pragma: no cover - last resort
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise TimeoutError(
                f"the daemon did not exit within {timeout}s; log tail:\n{self.tail()}"
            ) from None

    def status(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.status_file.read_text()))
        except (OSError, ValueError):
            return {}

    def wait_running(self, timeout: float) -> None:
        """Wait (bounded) until this daemon's status file says it is running."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            st = self.status()
            if st.get("pid") == self.proc.pid and st.get("state") in ("running", "draining"):
                return
            time.sleep(0.02)

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def journal_rows(state_dir: Path) -> dict[str, dict[str, Any]]:
    """The daemon's journal as object -> row (read-only; the daemon is not running)."""
    import sqlite3

    from uploader.daemon.journal import JOURNAL_NAME

    path = state_dir / JOURNAL_NAME
    if not path.exists():
        return {}
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        con.row_factory = sqlite3.Row
        return {r["object"]: dict(r) for r in con.execute("SELECT * FROM files")}
    finally:
        con.close()


def check_pointer_on_disk(data_dir: Path, bucket: str, prefix: str, rank: int) -> list[str]:
    """Read ``latest.json`` straight from the S3 server's directory; check what it names.

    Returns the problems (empty when the pointer is absent or every entry it names is
    a complete object with the recorded size and digest).
    """
    from harness.data import file_digest
    from uploader.bucket.pointer import Pointer, pointer_name
    from uploader.transfer.digest import Digest

    root = data_dir / bucket
    ptr = root / pointer_name(prefix, rank)
    if not ptr.exists():
        return []
    try:
        pointer = Pointer.from_json(ptr.read_bytes(), str(ptr))
    except IntegrityError as exc:
        return [f"unreadable pointer: {exc}"]
    problems = []
    for e in {x.object: x for x in (pointer.latest, *pointer.history)}.values():
        obj = root / e.object
        if not obj.is_file():
            problems.append(f"{e.object}: named but absent")
            continue
        if obj.stat().st_size != e.size:
            problems.append(f"{e.object}: {obj.stat().st_size} bytes, pointer says {e.size}")
            continue
        want = Digest.parse(e.digest)
        got = file_digest(
            obj, want.part_size if want.algo == "sha256-parts" else e.size or 1, want.kind
        )
        if got != want:
            problems.append(f"{e.object}: digest {got}, pointer says {want}")
    return problems


class CheckpointWriter(threading.Thread):
    """Writes checkpoints into ``run_dir`` every ``interval`` s (atomic renames), in a thread.

    ``expected`` maps object name -> sha256 of every file written.
    """

    def __init__(
        self,
        run_dir: Path,
        prefix: str,
        sizes: Sequence[int],
        interval: float,
        max_files: int,
        seed: int = 0,
        rank: int = 0,
        sub: str = "checkpoints",
    ) -> None:
        super().__init__(name="checkpoint-writer", daemon=True)
        self.run_dir, self.prefix, self.sizes = run_dir, prefix, list(sizes)
        self.interval, self.max_files, self.seed = interval, max_files, seed
        self.rank, self.sub = rank, sub
        self.expected: dict[str, str] = {}
        self.stop_event = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for i in range(self.max_files):
                if self.stop_event.wait(self.interval):
                    return
                rel = f"{self.sub}/ba{i}.pt"
                sha = write_checkpoint_file(
                    self.run_dir / rel, self.sizes[i % len(self.sizes)], self.seed + i
                )
                self.expected[f"{self.prefix}/rank_{self.rank}/{rel}"] = sha
        except BaseException as exc:  # pragma: no cover - reported by the scenario
            self.error = exc

    def finish(self) -> dict[str, str]:
        self.stop_event.set()
        self.join(60)
        if self.error is not None:
            raise self.error
        return dict(self.expected)


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait (bounded) until process ``pid`` no longer exists (or is a zombie)."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False
