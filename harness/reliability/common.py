"""Fault and load scenarios, shared by the shortened tests and ``make reliability``.

Every scenario takes its counts and durations as arguments, runs real
processes on loopback (S3 servers, the ``ckpt-uploader`` daemon, training
processes), injects its fault, and returns a :class:`Result` with the figures
that ``bench/reliability.py`` writes to docs/reliability.md. The tests in
``tests/test_faults_*.py`` and ``tests/test_load.py`` call the same functions
with small counts and assert on the figures.

Every loop here is bounded in count and in time, and every process a scenario
starts is killed in a ``finally``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.faultproxy import FaultPlan, FaultProxy
from tests.fixtures.s3 import S3Server, start_rclone_s3
from uploader import ObjectStore, RetryPolicy
from uploader.bucket.pointer import read_pointer
from uploader.errors import IntegrityError, ObjectNotFoundError

__all__ = [
    "Result",
    "ROOT",
    "sha256_file",
    "write_checkpoint_file",
    "bucket_audit",
    "rclone_server",
    "scenario_proxy_faults",
    "scenario_server_down",
]

log = logging.getLogger("tests.reliability")

ROOT = Path(__file__).resolve().parent.parent
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


# -- 3. the fault proxy -----------------------------------------------------------------------


def scenario_proxy_faults(
    workdir: Path,
    files: int = 40,
    reset_rate: float = 0.08,
    stall_rate: float = 0.04,
    slowdown_rate: float = 0.08,
    stall_seconds: float = 3.0,
    timeout: float = 2.0,
    seed: int = 1234,
    time_limit: float = 600.0,
    via: str = "store",
) -> Result:
    """Upload ``files`` checkpoints (small and multipart) through the fault proxy.

    The client's socket timeout is shorter than a stall, so a stall is seen as a
    timeout and retried. ``via="store"``: the ObjectStore API uploads the files;
    one whose upload still fails after the store's retries is uploaded again (at
    most 5 times), as the daemon does. ``via="daemon"``: ``ckpt-uploader push``
    uploads the run directory through the proxy, and the retries are counted in
    its log.
    """
    if via == "daemon":
        return _proxy_faults_daemon(
            workdir,
            files,
            reset_rate,
            stall_rate,
            slowdown_rate,
            stall_seconds,
            timeout,
            seed,
            time_limit,
        )
    run_dir = workdir / "run"
    retry = RetryPolicy(attempts=12, total_seconds=120, base_delay=0.05, max_delay=1.0)
    plan = FaultPlan(
        reset_rate=reset_rate,
        reset_after=(1, 4 * MiB),
        stall_rate=stall_rate,
        stall_seconds=stall_seconds,
        slowdown_rate=slowdown_rate,
    )
    expected: dict[str, str] = {}
    sizes = [256 << 10, 3 * MiB, 11 * MiB]  # one part; one part; three 5 MiB parts
    for i in range(files):
        rel = f"checkpoints/ba{i}.pt"
        sha = write_checkpoint_file(run_dir / rel, sizes[i % len(sizes)], seed + i)
        expected[f"proxy/rank_0/{rel}"] = sha
    file_retries = 0
    t0 = time.monotonic()
    with rclone_server(workdir) as server:
        proxy = FaultProxy(("127.0.0.1", server.port), FaultPlan(), seed=seed).start()
        try:
            store = _store(server, "proxy", port=proxy.port, retry=retry, timeout=timeout)
            proxy.set_plan(plan)
            try:
                for name in expected:
                    rel = name.split("/", 2)[2]
                    for attempt in range(5):
                        if time.monotonic() - t0 > time_limit:
                            raise TimeoutError(f"proxy scenario exceeded {time_limit}s")
                        try:
                            store.upload_file(run_dir / rel, name)
                            break
                        except Exception as exc:  # the daemon retries a failed file later
                            log.warning("upload of %s failed (%s); again", name, exc)
                            file_retries += 1
                            if attempt == 4:
                                raise
                request_retries = store.retries.n
                resent = int(getattr(store.backend, "resent", 0))
            finally:
                store.close()
            stats = proxy.stats()
            proxy.set_plan(FaultPlan())
        finally:
            proxy.stop()
        seconds = time.monotonic() - t0
        with _store(server, "proxy", retry=retry) as clean:
            audit = bucket_audit(clean, expected, workdir / "audit")
    return _proxy_result(
        "3. fault proxy (resets mid-body, stalls, 503 SlowDown)",
        files,
        sizes,
        stats,
        retries=request_retries,
        resent=resent,
        file_retries=file_retries,
        audit=audit,
        seconds=seconds,
        note=f"rates: reset {reset_rate}, stall {stall_rate} ({stall_seconds}s against a "
        f"{timeout}s client timeout), slowdown {slowdown_rate}; seed {seed}",
    )


def _proxy_result(
    case: str,
    files: int,
    sizes: Sequence[int],
    stats: dict[str, int],
    *,
    retries: int,
    resent: int | None,
    file_retries: int,
    audit: Audit,
    seconds: float,
    note: str,
    pointers: bool = False,
) -> Result:
    """The figures of a fault-proxy case, in the same order for both ways of uploading."""
    figures: dict[str, Any] = {
        "files": files,
        "bytes": sum(sizes[i % len(sizes)] for i in range(files)),
        "requests": stats["requests"],
        "resets": stats["reset"],
        "stalls": stats["stall"],
        "slowdowns": stats["slowdown"],
        "retries": retries,
        "resent_on_fresh_connection": resent,
        "file_retries": file_retries,
        "lost": len(audit.lost),
        "corrupted": len(audit.corrupted),
    }
    if pointers:
        figures["bad_pointers"] = len(audit.bad_pointers)
    figures["seconds"] = round(seconds, 1)
    return Result(case, figures, [note])


def _proxy_faults_daemon(
    workdir: Path,
    files: int,
    reset_rate: float,
    stall_rate: float,
    slowdown_rate: float,
    stall_seconds: float,
    timeout: float,
    seed: int,
    time_limit: float,
) -> Result:
    run_dir, state_dir = workdir / "run", workdir / "state"
    prefix, bucket = "proxyd", "proxyd"
    sizes = [256 << 10, 3 * MiB, 11 * MiB]
    expected: dict[str, str] = {}
    for i in range(files):
        rel = f"checkpoints/ba{i}.pt"
        expected[f"{prefix}/rank_0/{rel}"] = write_checkpoint_file(
            run_dir / rel, sizes[i % len(sizes)], seed + i
        )
    plan = FaultPlan(
        reset_rate=reset_rate,
        reset_after=(1, 4 * MiB),
        stall_rate=stall_rate,
        stall_seconds=stall_seconds,
        slowdown_rate=slowdown_rate,
    )
    t0 = time.monotonic()
    with rclone_server(workdir) as server:
        server.make_bucket(bucket)
        proxy = FaultProxy(("127.0.0.1", server.port), plan, seed=seed).start()
        log_path = workdir / "push.log"
        try:
            uri = server.uri(bucket, prefix).replace(server.endpoint, proxy.url)
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "uploader",
                    "push",
                    str(run_dir),
                    "--to",
                    uri,
                    "--state-dir",
                    str(state_dir),
                    "--part-size",
                    "5M",
                    "--retries",
                    "12",
                    "--retry-seconds",
                    "120",
                    "--retry-delay",
                    "0.2",
                    "--no-progress",
                    "--extra-init-kwargs",
                    json.dumps({"timeout": timeout}),
                ],
                capture_output=True,
                text=True,
                timeout=time_limit,
                cwd=str(ROOT),
            )
            log_path.write_text(proc.stderr)
            if proc.returncode != 0:
                raise AssertionError(f"push exited {proc.returncode}:\n{proc.stderr[-3000:]}")
            stats = proxy.stats()
        finally:
            proxy.stop()
        with _store(server, bucket, retry=RetryPolicy(attempts=3)) as store:
            audit = bucket_audit(store, expected, workdir / "audit", [(prefix, 0)])
    text = log_path.read_text()
    resent = re.findall(r"(\d+) resent on a fresh connection", text)
    return _proxy_result(
        "3b. fault proxy, through ckpt-uploader push",
        files,
        sizes,
        stats,
        retries=text.count(" retry "),
        resent=int(resent[-1]) if resent else None,
        file_retries=text.count("failed, retrying"),
        audit=audit,
        seconds=time.monotonic() - t0,
        note=f"rates: reset {reset_rate}, stall {stall_rate} ({stall_seconds}s against a "
        f"{timeout}s client timeout), slowdown {slowdown_rate}; seed {seed}",
        pointers=True,
    )


# -- 2. the store goes away -----------------------------------------------------------------


def scenario_server_down(
    workdir: Path,
    size: int = 60 * MiB,
    down_seconds: float = 30.0,
    step_seconds: float = 0.02,
    save_every: int = 25,
    bwlimit: str = "4M",
    time_limit: float = 600.0,
) -> Result:
    """Stop the S3 server in the middle of a large upload for ``down_seconds``.

    A "training loop" in this process runs beside the upload worker
    (:class:`uploader.Sidecar`, a separate process): it steps every
    ``step_seconds``, calls ``check()`` each step, writes a small checkpoint every
    ``save_every`` steps, and records the longest gap between two steps. The
    worker's upload is throttled (``--bwlimit``) so the server surely stops
    mid-upload; its retry flags cover the outage.
    """
    from uploader import Sidecar

    run_dir, state_dir = workdir / "run", workdir / "state"
    prefix, bucket = "down", "down"
    big = "checkpoints/ep1.pt"
    expected = {f"{prefix}/rank_0/{big}": write_checkpoint_file(run_dir / big, size, 7)}
    retry_args = [
        "--part-size",
        "5M",
        "--bwlimit",
        bwlimit,
        "--concurrency",
        "1",
        "--retries",
        str(int(down_seconds) + 20),
        "--retry-seconds",
        str(int(down_seconds * 3 + 60)),
        "--settle",
        "0.3",
    ]
    steps = saves = steps_during_outage = 0
    max_gap = 0.0
    stopped_at = 0
    outage = [0.0, 0.0]
    t0 = time.monotonic()
    with rclone_server(workdir) as server:
        server.make_bucket(bucket)
        sidecar = Sidecar(
            run_dir,
            server.uri(bucket, prefix),
            rank=0,
            state_dir=state_dir,
            drain_timeout=time_limit,
            progress_bar=False,
            check_interval=0.2,
            extra_args=retry_args,
        )
        sidecar.start()
        try:
            last = time.monotonic()
            deadline = t0 + time_limit
            while time.monotonic() < deadline:
                time.sleep(step_seconds)
                sidecar.check()
                now = time.monotonic()
                max_gap = max(max_gap, now - last)
                last = now
                steps += 1
                if outage[0] and not outage[1]:
                    steps_during_outage += 1
                if steps % save_every == 0:
                    rel = f"checkpoints/ba{steps}.pt"
                    sha = write_checkpoint_file(run_dir / rel, 64 << 10, steps)
                    expected[f"{prefix}/rank_0/{rel}"] = sha
                    saves += 1
                st = sidecar.status()
                if not outage[0]:
                    if st is not None and st.bytes_done >= size // 4 and st.uploading:
                        stopped_at = st.bytes_done
                        server.stop()
                        outage[0] = time.monotonic()
                elif not outage[1]:
                    if now - outage[0] >= down_seconds:
                        server.start()
                        outage[1] = time.monotonic()
                elif now - outage[1] >= 1.0 and saves >= 3:
                    break
            else:
                raise TimeoutError(f"server-down scenario exceeded {time_limit}s")
            final = sidecar.stop(timeout=time_limit)
        finally:
            if sidecar.worker.running:
                sidecar.worker.kill()
        drained = time.monotonic() - outage[1]
        with _store(server, bucket, retry=RetryPolicy(attempts=3)) as clean:
            audit = bucket_audit(clean, expected, workdir / "audit", [(prefix, 0)])
    log_tail = (state_dir / ".ckpt-uploader.log").read_text(errors="replace")
    return Result(
        "2. object store down mid-upload",
        {
            "files": len(expected),
            "bytes": size,
            "down_seconds": round(outage[1] - outage[0], 1),
            "stopped_after_bytes": stopped_at,
            "retries": log_tail.count("retry "),
            "training_steps": steps,
            "steps_during_outage": steps_during_outage,
            "max_step_gap_s": round(max_gap, 3),
            "drained_s_after_restart": round(drained, 1),
            "verified": final.done if final is not None else 0,
            "lost": len(audit.lost),
            "corrupted": len(audit.corrupted),
            "bad_pointers": len(audit.bad_pointers),
            "no_recorded_digest": len(audit.no_digest),
        },
        [
            f"upload worker throttled to {bwlimit}/s; server stopped (SIGTERM) once "
            f"{stopped_at} bytes were sent, started again after {down_seconds}s",
            "rclone's server forgets unfinished multipart uploads when it restarts; the "
            "store then answers NoSuchUpload and the uploader uploads the file again from "
            "its start",
            "no_recorded_digest: rclone's server keeps object metadata in memory, so objects "
            "stored before the restart lost the digest kept there; their bytes were checked "
            "against the local files, and the commit pointer still records their digests",
        ],
    )


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
    from uploader.bucket.pointer import Pointer, pointer_name
    from uploader.transfer.digest import Digest, file_digest

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
        got = file_digest(obj, want.part_size if want.algo == "sha256-parts" else e.size or 1)
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


# -- 1. kill -9 of the daemon ------------------------------------------------------------------


def scenario_kill9(
    workdir: Path,
    cycles: int = 30,
    kill_after: tuple[float, float] = (0.3, 3.0),
    interval: float = 0.25,
    sizes: Sequence[int] = (96 << 10, 1536 << 10, 6 * MiB + 12345),
    max_files: int = 400,
    seed: int = 99,
    final_timeout: float = 300.0,
) -> Result:
    """``kill -9`` the daemon at random moments, ``cycles`` times, while checkpoints appear.

    Between daemon and server sits the fault proxy with no faults, recording every
    request, so a re-upload of a file verified before a kill is seen on the wire.
    After each kill the commit pointer is read from the server's directory and every
    object it names is checked complete and correct.
    """
    rng = random.Random(seed)
    run_dir, state_dir = workdir / "run", workdir / "state"
    run_dir.mkdir(parents=True)
    state_dir.mkdir(parents=True)
    prefix, bucket = "kill9", "kill9"
    log_path = workdir / "daemon.log"
    kills: list[tuple[float, set[str]]] = []
    pointer_checks = 0
    pointer_problems: list[str] = []
    t0 = time.monotonic()
    with rclone_server(workdir) as server:
        server.make_bucket(bucket)
        assert server.data_dir is not None
        proxy = FaultProxy(("127.0.0.1", server.port), seed=seed).start()
        writer = CheckpointWriter(run_dir, prefix, sizes, interval, max_files, seed)
        daemon: Daemon | None = None
        try:
            uri = server.uri(bucket, prefix).replace(server.endpoint, proxy.url)
            args = ("--part-size", "5M", "--settle", "0.3", "--retry-seconds", "60", "-v")
            writer.start()
            for _ in range(cycles):
                daemon = Daemon(run_dir, uri, state_dir, *args, log=log_path)
                # One kill in four lands during start-up (recovery); the others count from
                # the moment the daemon runs, so a slow machine still kills mid-stream.
                if rng.random() >= 0.25:
                    daemon.wait_running(60)
                time.sleep(rng.uniform(*kill_after))
                daemon.kill(signal.SIGKILL)
                killed_at = time.time()
                rows = journal_rows(state_dir)
                kills.append((killed_at, {o for o, r in rows.items() if r["state"] == "done"}))
                pointer_checks += 1
                pointer_problems += check_pointer_on_disk(server.data_dir, bucket, prefix, 0)
            expected = writer.finish()
            daemon = Daemon(run_dir, uri, state_dir, *args, "--exit-when-idle", log=log_path)
            code = daemon.wait(final_timeout)
            if code != 0:
                raise AssertionError(f"final daemon run exited {code}:\n{daemon.tail()}")
            pointer_checks += 1
            pointer_problems += check_pointer_on_disk(server.data_dir, bucket, prefix, 0)
        finally:
            writer.stop_event.set()
            if daemon is not None:
                daemon.kill()
            proxy.stop()
        requests = list(proxy.requests)
        reuploaded: set[str] = set()
        for killed_at, done in kills:
            for ts, method, path in requests:
                if ts > killed_at and method in ("PUT", "POST"):
                    obj = path.split("/", 2)[2] if path.count("/") >= 2 else ""
                    if obj in done:
                        reuploaded.add(obj)
        with _store(server, bucket, retry=RetryPolicy(attempts=3)) as store:
            audit = bucket_audit(store, expected, workdir / "audit", [(prefix, 0)])
    verified_before = len(kills[-1][1]) if kills else 0
    return Result(
        "1. kill -9 of the daemon, restarted",
        {
            "cycles": cycles,
            "files": len(expected),
            "verified_before_last_kill": verified_before,
            "reuploaded_after_verify": len(reuploaded),
            "pointer_checks": pointer_checks,
            "bad_pointers": len(pointer_problems) + len(audit.bad_pointers),
            "lost": len(audit.lost),
            "corrupted": len(audit.corrupted),
            "seconds": round(time.monotonic() - t0, 1),
        },
        [
            f"kill after uniform{kill_after}s of each start (3 in 4 counted from the moment "
            f"the daemon runs); a new checkpoint every {interval}s"
        ]
        + pointer_problems[:5]
        + audit.bad_pointers[:5]
        + [f"re-uploaded: {sorted(reuploaded)[:5]}"] * bool(reuploaded),
    )


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


# -- 4. training SIGKILLed right after a save ---------------------------------------------------

TRAIN_AND_DIE = """
import json, os, signal, sys
import torch
from ckpt import Trainer
from uploader import RunDirectoryUploader

class Model(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.lin = torch.nn.Linear(width, width)
    def forward(self, batch):
        x, y = batch
        return torch.nn.functional.mse_loss(self.lin(x), y)

class DieAfterSave:
    def __init__(self, cb, epoch):
        self.cb, self.epoch = cb, epoch
    def checkpoint_saved(self, trainer, path):
        if path.name == f"ep{self.epoch}.pt":
            print(json.dumps({"worker": self.cb.worker.pid, "path": str(path)}), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

uri, width, epoch, save_async = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
x = torch.randn(16, width)
data = torch.utils.data.TensorDataset(x, x)
cb = RunDirectoryUploader(uri, "trainkill", progress_bar=False, extra_args=["--part-size", "5M"])
Trainer(model=Model(width), train_dataloader=torch.utils.data.DataLoader(data, batch_size=8),
        max_duration="50ep", save_folder="checkpoints", save_async=save_async,
        callbacks=[cb, DieAfterSave(cb, epoch)], seed=0).fit()
"""


def scenario_trainer_sigkill(
    workdir: Path, runs: int = 5, width: int = 1280, time_limit: float = 180.0
) -> Result:
    """Run a real Trainer with RunDirectoryUploader; SIGKILL it right after a save.

    ``width`` sets the model (a width x width linear layer: 1280 -> 6.3 MiB, a
    multipart upload). Runs alternate synchronous and asynchronous saves and
    the epoch they die at. The orphaned worker must upload every checkpoint on
    disk, commit the pointer to the last one, and exit by itself.
    """
    script = workdir / "train_and_die.py"
    script.write_text(TRAIN_AND_DIE)
    bucket = "trainkill"
    files = lost = corrupted = bad = 0
    worker_exit_s: list[float] = []
    t0 = time.monotonic()
    with rclone_server(workdir) as server:
        server.make_bucket(bucket)
        for i in range(runs):
            run_cwd = workdir / f"run{i}"
            run_cwd.mkdir()
            prefix = f"run{i}"
            epoch = 1 + i % 3
            proc = subprocess.run(
                [
                    sys.executable,
                    str(script),
                    server.uri(bucket, prefix),
                    str(width),
                    str(epoch),
                    str(i % 2),
                ],
                cwd=run_cwd,
                capture_output=True,
                timeout=time_limit,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
            if proc.returncode != -signal.SIGKILL:
                raise AssertionError(
                    f"training exited {proc.returncode}:\n{proc.stderr.decode()[-3000:]}"
                )
            info = json.loads(proc.stdout.decode().strip().splitlines()[-1])
            killed = time.monotonic()
            if not wait_gone(int(info["worker"]), time_limit):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(info["worker"]), signal.SIGKILL)
                raise AssertionError("the upload worker outlived the training process")
            worker_exit_s.append(time.monotonic() - killed)
            ckdir = Path(info["path"]).parent
            expected = {
                f"{prefix}/trainkill/rank_0/checkpoints/{p.name}": sha256_file(p)
                for p in sorted(ckdir.glob("*.pt"))
            }
            files += len(expected)
            with _store(server, bucket, retry=RetryPolicy(attempts=3)) as store:
                audit = bucket_audit(
                    store, expected, workdir / "audit", [(f"{prefix}/trainkill", 0)]
                )
                p = read_pointer(store, f"{prefix}/trainkill", 0)
                if p is None or p.latest.name != f"checkpoints/ep{epoch}.pt":
                    bad += 1
            lost += len(audit.lost)
            corrupted += len(audit.corrupted)
            bad += len(audit.bad_pointers)
    return Result(
        "4. training SIGKILLed right after a save",
        {
            "runs": runs,
            "files": files,
            "checkpoint_mib": round(width * (width + 1) * 4 / MiB, 1),
            "max_worker_exit_s": round(max(worker_exit_s), 1),
            "lost": lost,
            "corrupted": corrupted,
            "bad_pointers": bad,
            "seconds": round(time.monotonic() - t0, 1),
        },
        ["alternating save_async False/True; dying after epoch 1, 2 or 3"],
    )


# -- 5. a slow writer writing in place -------------------------------------------------------


def scenario_slow_writer(
    workdir: Path,
    files: int = 4,
    write_seconds: float = 8.0,
    chunks: int = 8,
    size: int = 6 * MiB,
    seed: int = 5,
    time_limit: float = 300.0,
) -> Result:
    """Write files in place over ``write_seconds`` (pauses up to 1.5x ``--settle``), then
    rewrite each once. No byte may be sent for a version before it is complete, and
    the rewritten version must be uploaded again.

    The daemon talks to the server through the (fault-free) proxy, whose request
    log shows when each object was first written.
    """
    rng = random.Random(seed)
    run_dir, state_dir = workdir / "run", workdir / "state"
    run_dir.mkdir(parents=True)
    state_dir.mkdir()
    prefix, bucket = "slow", "slow"
    early: list[str] = []
    rewrites_uploaded = 0
    t0 = time.monotonic()
    with rclone_server(workdir) as server:
        server.make_bucket(bucket)
        proxy = FaultProxy(("127.0.0.1", server.port), seed=seed).start()
        daemon: Daemon | None = None
        try:
            uri = server.uri(bucket, prefix).replace(server.endpoint, proxy.url)
            daemon = Daemon(
                run_dir,
                uri,
                state_dir,
                "--settle",
                "1.0",
                "--part-size",
                "5M",
                log=workdir / "daemon.log",
            )
            time.sleep(1.0)
            expected: dict[str, str] = {}
            for version in (0, 1):
                for i in range(files):
                    rel = f"checkpoints/slow{i}.pt"
                    obj = f"{prefix}/rank_0/{rel}"
                    path = run_dir / rel
                    path.parent.mkdir(parents=True, exist_ok=True)
                    data = random.Random(seed * 100 + i * 10 + version).randbytes(size)
                    started = time.time()
                    with open(path, "wb") as f:  # in place: no temporary name
                        step = -(-size // chunks)
                        for c in range(chunks):
                            f.write(data[c * step : (c + 1) * step])
                            f.flush()
                            time.sleep(rng.uniform(0.2, 2 * write_seconds / chunks - 0.2))
                    closed = time.time()
                    for ts, method, path_ in list(proxy.requests):
                        if (
                            started <= ts < closed
                            and method in ("PUT", "POST")
                            and path_ == f"/{bucket}/{obj}"
                        ):
                            early.append(f"{obj} v{version}")
                    expected[obj] = hashlib.sha256(data).hexdigest()
                # Wait (bounded) until every object holds this version.
                deadline = time.monotonic() + time_limit
                while time.monotonic() < deadline:
                    rows = journal_rows(state_dir)
                    if all(
                        rows.get(o, {}).get("state") == "done"
                        and rows[o]["digest"]
                        and rows[o]["size"] == size
                        and (run_dir / rows[o]["path"]).stat().st_mtime_ns == rows[o]["mtime_ns"]
                        for o in expected
                    ):
                        break
                    time.sleep(0.3)
                else:
                    raise TimeoutError(f"slow-writer files not uploaded:\n{daemon.tail()}")
                if version == 1:
                    data_dir = server.data_dir
                    assert data_dir is not None
                    rewrites_uploaded = sum(
                        sha256_file(data_dir / bucket / o) == s for o, s in expected.items()
                    )
        finally:
            if daemon is not None:
                daemon.kill(signal.SIGTERM)
            proxy.stop()
        with _store(server, bucket, retry=RetryPolicy(attempts=3)) as store:
            audit = bucket_audit(store, expected, workdir / "audit", [(prefix, 0)])
    return Result(
        "5. slow in-place writer, then a rewrite",
        {
            "files": files,
            "versions": 2,
            "write_seconds": write_seconds,
            "uploaded_before_complete": len(early),
            "rewrites_uploaded": rewrites_uploaded,
            "lost": len(audit.lost),
            "corrupted": len(audit.corrupted),
            "bad_pointers": len(audit.bad_pointers),
            "seconds": round(time.monotonic() - t0, 1),
        },
        [
            f"{chunks} writes per file, pauses of 0.2-{2 * write_seconds / chunks - 0.2:.1f}s "
            "(longer than --settle 1.0), file open throughout"
        ],
    )


# -- 6. local disk full while saving -------------------------------------------------------------


@contextlib.contextmanager
def small_filesystem(path: Path, size_mib: int) -> Iterator[bool]:
    """Mount a ``size_mib`` tmpfs on ``path``; yields False where the machine refuses."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0700", "tmpfs", str(path)],
            capture_output=True,
            timeout=30,
        )
        mounted = r.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        mounted = False
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


@contextlib.contextmanager
def enospc_after(limit_bytes: int, folder: Path) -> Iterator[None]:
    """Fallback where no small filesystem can be mounted: ``torch.save`` inside the
    checkpoint writer raises ENOSPC once ``folder`` holds ``limit_bytes`` (injected at
    the write layer, after writing part of the file, as a full disk would)."""
    import errno

    import ckpt.saver as saver

    real = saver.torch.save

    def save(obj: Any, f: Any, *a: Any, **kw: Any) -> None:
        used = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        if used >= limit_bytes:
            with (
                open(f, "wb")
                if isinstance(f, (str, os.PathLike))
                else contextlib.nullcontext(f) as out
            ):
                out.write(b"\0" * 4096)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(obj, f, *a, **kw)

    saver.torch.save = save
    try:
        yield
    finally:
        saver.torch.save = real


def scenario_disk_full(
    workdir: Path,
    fs_mib: int = 8,
    width: int = 512,
    epochs: int = 40,
    force_inject: bool = False,
    journal_on_full_disk: bool = False,
) -> Result:
    """Train with checkpoints going to a ``fs_mib`` filesystem until it is full.

    The Trainer must stop with a clear error naming the cause; every checkpoint
    saved before must still be on disk, intact, and uploaded by the worker (which
    keeps running and drains normally); no partial file may be left.
    """
    import torch

    from ckpt import Trainer
    from ckpt.errors import CheckpointError
    from uploader import RunDirectoryUploader

    mount = workdir / "small"
    bucket, prefix = "diskfull", "diskfull"
    with rclone_server(workdir) as server, small_filesystem(mount, fs_mib) as mounted:
        server.make_bucket(bucket)
        run_dir = mount / "run"
        inject = (
            contextlib.nullcontext()
            if mounted and not force_inject
            else enospc_after(fs_mib * MiB - 2 * MiB, mount)
        )
        torch.manual_seed(0)
        model = torch.nn.Linear(width, width)
        x = torch.randn(16, width)
        data = torch.utils.data.TensorDataset(x, x)
        # journal_on_full_disk: the journal stays in the run directory (the default), on
        # the disk that fills up, and uploads are throttled so that journal updates are
        # still due when it is full. Otherwise the journal lives on another disk.
        cb = RunDirectoryUploader(
            server.uri(bucket, prefix),
            progress_bar=False,
            state_dir=None if journal_on_full_disk else workdir / "state",
            extra_args=["--settle", "0.2"]
            + (["--bwlimit", "1M", "--files", "1"] if journal_on_full_disk else []),
        )
        error: BaseException | None = None
        try:
            with inject:
                Trainer(
                    model=model,
                    train_dataloader=torch.utils.data.DataLoader(data, batch_size=8),
                    max_duration=f"{epochs}ep",
                    loss_fn=torch.nn.functional.mse_loss,
                    save_folder=str(run_dir),
                    save_async=True,
                    callbacks=[cb],
                    seed=0,
                ).fit()
        except CheckpointError as exc:
            error = exc
        finally:
            final = cb.close(timeout=120)
        worker_log = (run_dir if journal_on_full_disk else workdir / "state") / ".ckpt-uploader.log"
        errors = [
            line.split(" ERROR ", 1)[1]
            for line in (
                worker_log.read_text(errors="replace") if worker_log.exists() else ""
            ).splitlines()
            if " ERROR " in line
        ]
        causes = [
            line.strip()
            for line in (
                worker_log.read_text(errors="replace") if worker_log.exists() else ""
            ).splitlines()
            if line.startswith(("sqlite3.", "OSError", "PermissionError"))
        ]
        worker_error = "; ".join(errors[:1] + causes[:1])
        saved = sorted(run_dir.glob("*.pt"))
        leftovers = [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]
        expected = {f"{prefix}/rank_0/{p.name}": sha256_file(p) for p in saved}
        with _store(server, bucket, retry=RetryPolicy(attempts=3)) as store:
            audit = bucket_audit(store, expected, workdir / "audit", [(prefix, 0)])
    message = str(error) if error is not None else ""
    return Result(
        "6. local disk full while saving"
        + (" (journal on the full disk)" if journal_on_full_disk else ""),
        {
            "filesystem": f"tmpfs {fs_mib} MiB"
            if mounted and not force_inject
            else "ENOSPC injected",
            "files": len(saved),
            "saved_before_full": len(saved),
            "clear_error": int("space" in message.lower()),
            "partial_files_left": len(leftovers),
            "uploaded": final.done if final is not None else 0,
            "lost": len(audit.lost),
            "corrupted": len(audit.corrupted),
            "bad_pointers": len(audit.bad_pointers),
        },
        [message.splitlines()[0][:300] if message else "no error raised"]
        + [f"upload worker: {worker_error[:300]}"] * bool(worker_error),
    )


def scenario_disk_full_late_start(workdir: Path, fs_mib: int = 16, width: int = 512) -> Result:
    """The uploader starts only after training has filled the disk to the last byte
    (a sidecar restarted late): no reserve can be set aside and the journal cannot be
    written. Every checkpoint must still be uploaded and verified, with the journal
    held in memory; once space is freed, a second run records them all.
    """
    import torch

    from ckpt import Trainer
    from ckpt.errors import CheckpointError
    from uploader.daemon.journal import Journal

    mount = workdir / "small"
    bucket, prefix = "latestart", "latestart"
    with rclone_server(workdir) as server, small_filesystem(mount, fs_mib) as mounted:
        if not mounted:
            raise AssertionError("could not mount a tmpfs (this case needs root)")
        server.make_bucket(bucket)
        run_dir = mount / "run"
        run_dir.mkdir()
        # 2 MiB set aside now and topped up to the last byte after training: removing
        # it later is "the operator frees space".
        ballast = run_dir / ".ballast"
        ballast.write_bytes(b"\0" * (2 * MiB))
        torch.manual_seed(0)
        model = torch.nn.Linear(width, width)
        x = torch.randn(16, width)
        data = torch.utils.data.TensorDataset(x, x)
        stopped = ""
        try:
            Trainer(
                model=model,
                train_dataloader=torch.utils.data.DataLoader(data, batch_size=8),
                max_duration="1000ep",
                loss_fn=torch.nn.functional.mse_loss,
                save_folder=str(run_dir),
                seed=0,
            ).fit()
        except CheckpointError as exc:
            stopped = str(exc).splitlines()[0][:160]
        fd = os.open(ballast, os.O_WRONLY | os.O_APPEND)
        try:
            for _ in range(1 << 20):
                os.write(fd, b"\0" * 4096)
        except OSError:
            pass
        finally:
            os.close(fd)
        free_at_start = shutil.disk_usage(mount).free
        saved = sorted(run_dir.glob("*.pt"))
        expected = {f"{prefix}/rank_0/{p.name}": sha256_file(p) for p in saved}
        uri = server.uri(bucket, prefix)
        log1 = workdir / "first.log"
        t0 = time.monotonic()
        # The journal stays in the run directory (the default), on the full disk; the
        # status file is written elsewhere so that this report can read it.
        here = ("--exit-when-idle", "--state-dir", str(run_dir))
        (workdir / "status1").mkdir()
        (workdir / "status2").mkdir()
        code1 = Daemon(run_dir, uri, workdir / "status1", *here, log=log1).wait(300)
        seconds = time.monotonic() - t0
        text1 = log1.read_text(errors="replace")
        status1 = json.loads((workdir / "status1" / "status.json").read_text())
        with _store(server, bucket, retry=RetryPolicy(attempts=3)) as store:
            audit = bucket_audit(store, expected, workdir / "audit", [(prefix, 0)])
        ballast.unlink()
        log2 = workdir / "second.log"
        code2 = Daemon(run_dir, uri, workdir / "status2", *here, log=log2).wait(300)
        with Journal.open_readonly(run_dir) as journal:
            recorded = journal.totals().done
    return Result(
        "6. disk already full when the uploader starts (journal in memory)",
        {
            "filesystem": f"tmpfs {fs_mib} MiB",
            "files": len(saved),
            "free_bytes_at_start": free_at_start,
            "exit_code": code1,
            "uploaded": int(status1.get("done", 0)),
            "journal_in_memory": int("keeping the journal in memory" in text1),
            "journal_saved_at_exit": int(bool(status1.get("journal_saved"))),
            "lost": len(audit.lost),
            "corrupted": len(audit.corrupted),
            "bad_pointers": len(audit.bad_pointers),
            "second_run_exit": code2,
            "recorded_after_space_freed": recorded,
            "seconds": round(seconds, 1),
        },
        [f"training stopped: {stopped}" if stopped else "training did not fill the disk"],
    )


# -- 7. an object corrupted in the bucket ----------------------------------------------------------


def scenario_corrupt_object(workdir: Path, width: int = 1280) -> Result:
    """Upload real checkpoints, then flip bytes in one object and truncate another on the
    server's disk. ``ckpt.load`` must refuse both (no data returned, no file left) and
    ``ckpt-uploader verify`` must exit 1 naming both, while the intact one still loads.
    """
    import torch

    import ckpt
    from ckpt.saver import write_checkpoint

    bucket, prefix = "corrupt", "corrupt"
    run_dir = workdir / "run"
    names = ["ep1.pt", "ep2.pt", "ep3.pt"]
    for i, n in enumerate(names):
        torch.manual_seed(i)
        write_checkpoint({"model": torch.nn.Linear(width, width).state_dict()}, run_dir / n)
    refused: dict[str, str] = {}
    with rclone_server(workdir) as server:
        server.make_bucket(bucket)
        assert server.data_dir is not None
        uri = server.uri(bucket, prefix)
        d = Daemon(run_dir, uri, workdir / "state", "--exit-when-idle", log=workdir / "d.log")
        if d.wait(120) != 0:
            raise AssertionError(d.tail())
        root = server.data_dir / bucket / prefix / "rank_0"
        flipped, truncated = root / "ep1.pt", root / "ep2.pt"
        with open(flipped, "r+b") as f:
            f.seek(flipped.stat().st_size // 2)
            b = f.read(16)
            f.seek(-16, os.SEEK_CUR)
            f.write(bytes(x ^ 0xFF for x in b))
        with open(truncated, "r+b") as f:
            f.truncate(truncated.stat().st_size - 4096)
        tmp = workdir / "loadtmp"
        tmp.mkdir()
        for n in ("ep1.pt", "ep2.pt"):
            obj_uri = server.uri(bucket, f"{prefix}/rank_0/{n}")
            try:
                ckpt.load(obj_uri, progress=False, tmp_dir=str(tmp))
            except Exception as exc:
                refused[n] = f"{type(exc).__name__}: {exc}"
        ok = ckpt.load(server.uri(bucket, f"{prefix}/rank_0/ep3.pt"), progress=False)
        intact_loads = int("model" in ok)
        left = [str(p) for p in tmp.rglob("*") if p.is_file()]
        verify = subprocess.run(
            [sys.executable, "-m", "uploader", "verify", uri, "--no-progress"],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=str(ROOT),
        )
    report = verify.stdout + verify.stderr
    return Result(
        "7. object corrupted in the bucket",
        {
            "files": len(names),
            "objects": len(names),
            "damaged": 2,
            "refused_by_loader": len(refused),
            "files_left_by_loader": len(left),
            "intact_loads": intact_loads,
            "verify_exit": verify.returncode,
            "verify_names_both": int("ep1.pt" in report and "ep2.pt" in report),
        },
        [f"{n}: {m.splitlines()[0][:200]}" for n, m in sorted(refused.items())],
    )


# -- load: many ranks at once -------------------------------------------------------------------


def scenario_load(
    workdir: Path,
    ranks: int = 8,
    files_per_rank: int = 50,
    size: int = 4 * MiB,
    interval: float = 0.0,
    time_limit: float = 900.0,
) -> Result:
    """``ranks`` upload workers (one :class:`uploader.Sidecar` each, as the callback
    starts them) upload ``files_per_rank`` checkpoints of ``size`` bytes each to one
    server at once. Samples every worker's memory, file descriptors and threads
    twice a second; compares them early (after a fifth of the files) with late
    (after all were written), and this process's before and after.
    """
    import psutil

    from uploader import Sidecar

    me = psutil.Process()
    fds_before, threads_before = me.num_fds(), threading.active_count()
    prefix, bucket = "load", "load"
    expected: dict[str, str] = {}
    samples: dict[int, list[tuple[float, int, int, int]]] = {}
    stop = threading.Event()
    marks: dict[str, float] = {}
    t0 = time.monotonic()
    with rclone_server(workdir) as server:
        server.make_bucket(bucket)
        sidecars = [
            Sidecar(
                workdir / "run" / f"rank_{r}",
                server.uri(bucket, prefix),
                rank=r,
                state_dir=workdir / f"state{r}",
                progress_bar=False,
                drain_timeout=time_limit,
                check_interval=0.5,
            )
            for r in range(ranks)
        ]

        def sample() -> None:
            procs = {sc.pid: psutil.Process(sc.pid) for sc in sidecars if sc.pid}
            while not stop.wait(0.5):
                for pid, p in procs.items():
                    with contextlib.suppress(psutil.Error):
                        samples.setdefault(pid, []).append(
                            (time.monotonic(), p.memory_info().rss, p.num_fds(), p.num_threads())
                        )

        sampler = threading.Thread(target=sample, name="load-sampler", daemon=True)
        try:
            for sc in sidecars:
                sc.start()
            sampler.start()
            for i in range(files_per_rank):
                if time.monotonic() - t0 > time_limit:
                    raise TimeoutError(f"load scenario exceeded {time_limit}s")
                for r, sc in enumerate(sidecars):
                    rel = f"checkpoints/ba{i}.pt"
                    sha = write_checkpoint_file(
                        workdir / "run" / f"rank_{r}" / rel, size, 1000 * r + i
                    )
                    expected[f"{prefix}/rank_{r}/{rel}"] = sha
                    sc.check()
                if i + 1 == max(1, files_per_rank // 5):
                    marks["early"] = time.monotonic()
                if interval:
                    time.sleep(interval)
            marks["late"] = time.monotonic()
            finals = [sc.stop(timeout=time_limit) for sc in sidecars]
            marks["drained"] = time.monotonic()
        finally:
            stop.set()
            if sampler.is_alive():
                sampler.join(5)
            for sc in sidecars:
                if sc.worker.running:
                    sc.worker.kill()
        with _store(server, bucket, retry=RetryPolicy(attempts=3)) as store:
            audit = bucket_audit(
                store, expected, workdir / "audit", [(prefix, r) for r in range(ranks)]
            )
    fds_after, threads_after = me.num_fds(), threading.active_count()

    def at(series: list[tuple[float, int, int, int]], when: float) -> tuple[int, int]:
        """(fds, threads) of the sample nearest to ``when``."""
        best = min(series, key=lambda s: abs(s[0] - when))
        return best[2], best[3]

    peak_rss = max((s[1] for ss in samples.values() for s in ss), default=0)
    growth_fds = growth_threads = 0
    for ss in samples.values():
        e_fd, e_th = at(ss, marks.get("early", t0))
        l_fd, l_th = at(ss, marks.get("late", t0))
        growth_fds = max(growth_fds, l_fd - e_fd)
        growth_threads = max(growth_threads, l_th - e_th)
    seconds = marks.get("drained", time.monotonic()) - t0
    total = ranks * files_per_rank * size
    return Result(
        "load: ranks uploading to one server at once",
        {
            "ranks": ranks,
            "files": len(expected),
            "file_mib": round(size / MiB, 1),
            "verified": sum(f.done for f in finals if f is not None),
            "lost": len(audit.lost),
            "corrupted": len(audit.corrupted),
            "bad_pointers": len(audit.bad_pointers),
            "peak_worker_rss_mib": round(peak_rss / MiB, 1),
            "max_worker_fds": max((s[2] for ss in samples.values() for s in ss), default=0),
            "max_worker_threads": max((s[3] for ss in samples.values() for s in ss), default=0),
            "worker_fd_growth": growth_fds,
            "worker_thread_growth": growth_threads,
            "parent_fd_leak": fds_after - fds_before,
            "parent_thread_leak": threads_after - threads_before,
            "mib_per_s": round(total / MiB / max(seconds, 1e-9), 1),
            "seconds": round(seconds, 1),
        },
        [f"{len(samples)} workers sampled twice a second; default part size and concurrency"],
    )
