"""Resumable uploads under ``kill -9``: the daemon killed at random points of multipart
uploads, restarted each time, against one store (rclone serve s3, moto, Azurite, LOCAL).

Bytes sent are counted outside the daemon: through the fault proxy between daemon and
server (request body bytes, bodies cut by the kill included), or for LOCAL, where
there is no server, by the kernel: the daemon is stopped (SIGSTOP) before it is
killed, and its ``/proc/PID/io`` ``wchar`` (every byte it wrote: parts, and its own
journal, log and status file) read in between. The daemon is non-dumpable, so only
a privileged reader (root) may read that file; elsewhere the LOCAL bound is
reported as ``n/a``. The bound checked is the one a
resumable upload promises: every file's bytes once, plus at most ``concurrency`` parts
in flight per kill, plus each file sent whole again when it changed or the server
forgot its session.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.faultproxy import FaultProxy
from harness.reliability.common import (
    Daemon,
    MiB,
    Result,
    bucket_audit,
    journal_rows,
    write_checkpoint_file,
)
from uploader import ObjectStore, ObjectStoreHparams, RetryPolicy
from uploader.errors import ObjectNotFoundError

__all__ = ["scenario_resume_kill", "STORES", "LOCAL_WRITE_SLACK", "BLOCK_LIST_SLACK"]

log = logging.getLogger(__name__)

#: Store kind -> (part size, file size, --bwlimit): a file of several parts, a few
#: seconds at the limit, so a random kill lands mid-upload.
STORES: dict[str, tuple[int, int, int]] = {
    "rclone": (5 * MiB, 40 * MiB, 16 * MiB),
    "moto": (5 * MiB, 40 * MiB, 16 * MiB),
    "azurite": (MiB, 12 * MiB, 4 * MiB),
    "local": (256 << 10, 4 * MiB, MiB),
}
#: LOCAL: what the daemon writes besides parts (journal pages, log lines, status file)
#: in one run, allowed on top of the bound.
LOCAL_WRITE_SLACK = 512 << 10
#: Azure: the XML block list that completes a blob is a PUT to the blob's path too; this
#: much of it a run is allowed on top of the bound (about 60 bytes a block).
BLOCK_LIST_SLACK = 16 << 10


@dataclass
class _Store:
    """Where the daemon uploads: its URI, how the bytes it sent are counted, the server."""

    kind: str
    uri: str
    hparams: ObjectStoreHparams
    proxy: FaultProxy | None
    server: Any


def _wchar(pid: int) -> int | None:
    """Bytes process ``pid`` wrote; None when this process may not read its counters (the
    daemon is non-dumpable, so only a privileged reader may)."""
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                if line.startswith("wchar:"):
                    return int(line.split()[1])
    except PermissionError:
        return None
    return 0


@contextlib.contextmanager
def _store(kind: str, workdir: Path, server: Any, bucket: str, prefix: str) -> Iterator[_Store]:
    """The store of ``kind`` (``server``: a running one, or None to start a private one)."""
    if kind == "local":
        root = workdir / "bucket"
        root.mkdir(parents=True, exist_ok=True)
        hp = ObjectStoreHparams(provider="local", container=str(root))
        yield _Store(kind, f"file://{root}?prefix={prefix}", hp, None, None)
        return
    own = server is None
    if own:
        server = _start(kind, workdir)
    try:
        if kind == "azurite":
            hp = server.hparams(bucket)
            with hp.initialize_object(create_container=True):
                pass
        else:
            server.make_bucket(bucket)
            hp = server.hparams(bucket)
        proxy = FaultProxy(("127.0.0.1", server.port)).start()
        try:
            if kind == "azurite":
                uri = (
                    f"azure://{bucket}/{prefix}?endpoint={proxy.url}"
                    f"&key_environ={hp.key_environ}&secret_environ={hp.secret_environ}"
                )
            else:
                uri = server.uri(bucket, prefix).replace(server.endpoint, proxy.url)
            yield _Store(kind, uri, hp, proxy, server)
        finally:
            proxy.stop()
    finally:
        if own:
            server.stop() if kind == "azurite" else server.close()


def _start(kind: str, workdir: Path) -> Any:
    if kind == "rclone":
        from harness.servers.s3 import start_rclone_s3

        return start_rclone_s3(workdir / "s3data")
    if kind == "moto":
        from harness.servers.s3 import start_moto_s3

        return start_moto_s3(workdir / "moto")
    from harness.servers.azure import (
        AZURITE_ACCOUNT,
        AZURITE_KEY,
        AZURITE_KEY_ENV,
        AZURITE_SECRET_ENV,
        start_azurite,
    )

    os.environ.setdefault(AZURITE_KEY_ENV, AZURITE_ACCOUNT)
    os.environ.setdefault(AZURITE_SECRET_ENV, AZURITE_KEY)
    return start_azurite(workdir / "azurite")


def scenario_resume_kill(
    workdir: Path,
    kind: str = "rclone",
    cycles: int = 20,
    concurrency: int = 2,
    modify_every: int = 0,
    restart_server_every: int = 0,
    kill_window: tuple[float, float] = (0.2, 1.0),
    seed: int = 12,
    server: Any = None,
    shape: tuple[int, int, int] | None = None,
    final_timeout: float = 300.0,
) -> Result:
    """``kill -9`` the daemon ``cycles`` times at random points while it uploads
    multipart files, restarting it each time; then let it finish and audit the bucket.

    ``kill_window``: each kill comes this many seconds (uniform) after the daemon runs,
    as a fraction of a whole file's time at the bandwidth limit (see :data:`STORES`).
    ``modify_every``: every so many kills, the file being uploaded is rewritten (same
    size, new bytes) before the restart. ``restart_server_every``: every so many kills,
    the server is restarted before the daemon (rclone forgets its multipart uploads).
    ``server``: a running server of ``kind`` to use (tests pass their fixture's).
    ``shape``: (part size, file size, bandwidth limit) instead of :data:`STORES`'.
    """
    rng = random.Random(seed)
    part, size, bwlimit = shape or STORES[kind]
    file_seconds = size / bwlimit
    run_dir, state_dir = workdir / "run", workdir / "state"
    run_dir.mkdir(parents=True)
    state_dir.mkdir(parents=True)
    prefix, bucket = "resume", f"resume{kind}"
    log_path = workdir / "daemon.log"
    # Enough files that the kills find one in flight; each a few parts.
    n_files = max(2, int(cycles * sum(kill_window) / 2 + 1))
    expected: dict[str, str] = {}
    seeds: dict[str, int] = {}
    for i in range(n_files):
        rel = f"checkpoints/ep{i}.pt"
        seeds[rel] = seed * 1000 + i
        expected[f"{prefix}/rank_0/{rel}"] = write_checkpoint_file(run_dir / rel, size, seeds[rel])
    budget = n_files * size  # bytes a perfect uploader sends
    sent_local: int | None = 0
    kills = modified = restarts = 0
    t0 = time.monotonic()
    args = (
        "--part-size",
        str(part),
        "--concurrency",
        str(concurrency),
        "--files",
        "1",
        "--bwlimit",
        str(bwlimit),
        "--settle",
        "0.2",
        "--retry-seconds",
        "30",
    )
    with _store(kind, workdir, server, bucket, prefix) as st:
        daemon: Daemon | None = None
        try:
            for cycle in range(1, cycles + 1):
                daemon = Daemon(run_dir, st.uri, state_dir, *args, log=log_path)
                daemon.wait_running(60)
                time.sleep(rng.uniform(*kill_window) * file_seconds)
                pid = daemon.proc.pid
                if daemon.proc.poll() is None:
                    os.kill(pid, signal.SIGSTOP)  # frozen: nothing more is written or sent
                    if kind == "local":
                        sent_local = _add(sent_local, _wchar(pid))
                    daemon.kill(signal.SIGKILL)
                    kills += 1
                    budget += concurrency * part
                rows = journal_rows(state_dir)
                busy = [r for r in rows.values() if r["state"] in ("uploading", "pending")]
                if modify_every and cycle % modify_every == 0 and busy:
                    rec = min(busy, key=lambda r: (r["state"] != "uploading", r["path"]))
                    seeds[rec["path"]] += 7919
                    expected[rec["object"]] = write_checkpoint_file(
                        run_dir / rec["path"], size, seeds[rec["path"]]
                    )
                    budget += size  # sent whole from its new content
                    modified += 1
                if restart_server_every and cycle % restart_server_every == 0:
                    st.server.stop()
                    st.server.start()
                    budget += size  # the session in flight is forgotten
                    restarts += 1
            # The last run goes on until every file is verified; it is then stopped the same
            # way, so its writes are counted too.
            daemon = Daemon(run_dir, st.uri, state_dir, *args, log=log_path)
            deadline = time.monotonic() + final_timeout
            while time.monotonic() < deadline and daemon.proc.poll() is None:
                rows = journal_rows(state_dir)
                if len(rows) == n_files and all(r["state"] == "done" for r in rows.values()):
                    break
                time.sleep(0.1)
            else:
                raise AssertionError(f"the last run did not finish:\n{daemon.tail()}")
            os.kill(daemon.proc.pid, signal.SIGSTOP)
            if kind == "local":
                sent_local = _add(sent_local, _wchar(daemon.proc.pid))
            daemon.kill(signal.SIGKILL)
        finally:
            if daemon is not None:
                daemon.kill()
        if st.proxy is not None:
            # File data goes in PUTs (parts, blocks); not counted: digest records, pointers,
            # and the small XML bodies that complete an upload.
            sent = sum(
                n
                for (method, path), n in st.proxy.body_bytes.items()
                if method == "PUT" and not path.endswith((".ckpt-digest", ".json"))
            )
            slack = BLOCK_LIST_SLACK * (cycles + 1)  # Azure's block lists are PUTs too
        else:
            sent = -1 if sent_local is None else sent_local  # -1: not countable here
            slack = LOCAL_WRITE_SLACK * (cycles + 1)
        with ObjectStore(st.hparams, retry=RetryPolicy(attempts=3)) as store:
            audit = bucket_audit(store, expected, workdir / "audit", [])
            leftover: int | None = None  # Azure keeps no list of unfinished uploads
            if kind != "azurite":
                try:
                    leftover = len(store.backend.list_uploads(prefix))
                except ObjectNotFoundError:  # rclone after a restart: 404 NoSuchUpload
                    leftover = None
    text = log_path.read_text(errors="replace")
    shutil.rmtree(run_dir, ignore_errors=True)
    return Result(
        f"resume after kill -9 ({kind})",
        {
            "cycles": cycles,
            "kills": kills,
            "files": n_files,
            "file_mib": size // MiB,
            "part_kib": part >> 10,
            "modified": modified,
            "server_restarts": restarts,
            "resumed": text.count("resuming upload of"),
            "sent_mib": round(sent / MiB, 1) if sent >= 0 else "n/a",
            "resent_mib": round(max(0, sent - n_files * size) / MiB, 1) if sent >= 0 else "n/a",
            "bound_mib": round((budget + slack) / MiB, 1),
            "within_bound": sent <= budget + slack if sent >= 0 else "n/a",
            "lost": len(audit.lost),
            "corrupted": len(audit.corrupted),
            "unfinished_uploads": "n/a" if leftover is None else leftover,
            "seconds": round(time.monotonic() - t0, 1),
        },
        [
            f"kill after uniform{kill_window} x {file_seconds:.1f}s (one file at "
            f"--bwlimit {bwlimit // MiB} MiB/s) from the moment the daemon runs; "
            f"--concurrency {concurrency}, --files 1"
        ],
    )


def _add(total: int | None, n: int | None) -> int | None:
    return None if total is None or n is None else total + n
